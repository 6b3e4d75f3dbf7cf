"""More of `epg sample` (epg.generate), the demo's pieces (epg.demo), DALI's CPU-checkable parts
(epg.data.dali) and the samplers' input checks (epg.sampling): behaviour the other test files
left unpinned."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import _png_stack, _tiny, _write_random_pngs

from epg import checkpoint as ckpt
from epg import generate, sampling
from epg.generate import SampleSettings, check_resume, image_path, load_network, make_denoiser, run_sampling
from epg.models import Denoiser

# --------------------------------------------------------------------------------------------------
# epg.generate
# --------------------------------------------------------------------------------------------------


def test_make_denoiser_is_the_epg_denoiser_of_the_recorded_mode_in_fp32():
    # "diffusion" networks predict x0, "consistency" ones go through the EDM preconditioning;
    # fp32 must run without autocast (a bf16 autocast would round every fp32 sample).
    net = _tiny()
    x, sigma, y = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 0.5]), torch.tensor([1, 7])
    with torch.no_grad():
        for mode, inner in (("diffusion", "x0"), ("consistency", "edm")):
            got = make_denoiser(net, mode)(x, sigma, y)
            assert got.dtype == torch.float32, mode
            assert torch.equal(got, Denoiser(net, mode=inner)(x, sigma, y)), mode
        bf16 = make_denoiser(net, "diffusion", precision="bf16")(x, sigma, y)
    assert bf16.dtype == torch.float32  # the sampler state stays float32
    assert not torch.equal(bf16, make_denoiser(net, "diffusion")(x, sigma, y))  # but autocast acted


def test_a_checkpoints_safetensors_file_samples_as_its_folder(tmp_path):
    # The module documents "a checkpoint folder or its .safetensors file as given".
    folder = tmp_path / "final"
    ckpt.save(_tiny(), folder, metadata={"mode": "diffusion", "convention": "simple"})
    (weights,) = folder.glob("*.safetensors")
    net, info = load_network(weights)
    assert info["source"] == str(weights.resolve()), info
    assert (info["mode"], info["convention"]) == ("diffusion", "simple"), info
    assert info["weights"] == load_network(folder)[1]["weights"]


def test_a_folder_of_released_files_given_as_a_checkpoint_points_to_official(tmp_path):
    # A folder holding only released .pth files is no epg checkpoint: the error says how to
    # sample it (--official --config), which it does not for a folder without any .pth.
    (tmp_path / "released").mkdir()
    torch.save({}, tmp_path / "released" / "nnet_ema.pth")
    with pytest.raises(FileNotFoundError, match=r"a released \.pth file samples with --official"):
        load_network(tmp_path / "released")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        load_network(tmp_path / "empty")
    assert "--official" not in str(exc.value)


def test_gray_networks_write_gray_pngs_and_an_nhwc_archive_with_one_channel(tmp_path):
    # The ADM layout is (N, H, W, C) also for C = 1; a gray PNG decodes to (H, W).
    net = _tiny(in_channels=1)
    settings = SampleSettings(num_images=2, steps=2, convention="simple", labels="random")
    run_sampling(net, tmp_path, settings, batch_size=2, progress=False)
    assert Image.open(image_path(tmp_path, 0)).mode == "L"
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (2, 32, 32, 1) and arr.dtype == np.uint8, arr.shape
    np.testing.assert_array_equal(arr[..., 0], _png_stack(tmp_path, 2))


def test_a_16_bit_png_under_an_image_name_is_resampled_not_archived(tmp_path):
    # Only 8-bit PNGs are this sampler's; a 16-bit one (not written by it) would put two bytes
    # per level into the uint8 archive.
    net = _tiny(in_channels=1)
    settings = SampleSettings(num_images=2, steps=2, convention="simple", labels="random")
    run_sampling(net, tmp_path, settings, batch_size=2, progress=False)
    ref = _png_stack(tmp_path, 2)
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(image_path(tmp_path, 1))
    summary = run_sampling(net, tmp_path, settings, batch_size=2, progress=False)
    assert summary["sampled_now_by_this_rank"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"][..., 0], ref)


def test_write_npz_refuses_an_image_of_another_size(tmp_path):
    # Rows of another size would shift every later image in the flat arr_0.
    (tmp_path / "images").mkdir()
    for i in range(3):
        generate._write_png(image_path(tmp_path, i), np.full((8, 8, 3), i, np.uint8))
    generate._write_png(image_path(tmp_path, 2), np.zeros((8, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="000002.png is missing, corrupt or of another size"):
        generate.write_npz(tmp_path, 3, None, progress=False)


def test_the_archive_labels_are_int64_and_absent_when_unconditional(tmp_path):
    # np.savez of the released sampler's labels: int64 arr_1; an unconditional run has no arr_1.
    (tmp_path / "images").mkdir()
    for i in range(3):
        generate._write_png(image_path(tmp_path, i), np.full((4, 4, 3), i, np.uint8))
    with np.load(generate.write_npz(tmp_path, 3, torch.tensor([2, 0, 1]), progress=False)) as npz:
        assert npz["arr_1"].dtype == np.int64 and npz["arr_1"].tolist() == [2, 0, 1]
        assert npz["arr_0"][:, 0, 0, 0].tolist() == [0, 1, 2]
    with np.load(generate.write_npz(tmp_path, 3, None, progress=False)) as npz:
        assert npz.files == ["arr_0"]


def test_a_bool_batch_size_is_refused_before_the_folder_is_touched(tmp_path):
    # True is an int to Python; the sampler refuses it, but only after rank 0 wrote settings.json.
    net = _tiny()
    settings = SampleSettings(num_images=2, steps=2, convention="simple")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        run_sampling(net, tmp_path / "s", settings, batch_size=True, progress=False)
    assert not (tmp_path / "s").exists()


def test_the_preview_is_the_grid_of_the_first_64_pngs(tmp_path):
    # preview.png: the first 64 images (8 per row), magnified to at least 64 px, pixels as
    # in their PNGs. The PNGs are all there, so nothing is sampled.
    images = _write_random_pngs(tmp_path, 65, 32)
    settings = SampleSettings(num_images=65, steps=2, convention="simple")
    summary = run_sampling(_tiny(), tmp_path, settings, batch_size=8, progress=False)
    assert summary["sampled_now_by_this_rank"] == 0 and summary["preview"] == str(tmp_path / "preview.png")
    preview = np.asarray(Image.open(tmp_path / "preview.png"))
    tile, pad = 32 * 2, 2  # scale ceil(64 / 32) = 2, padding 2
    assert preview.shape == (8 * (tile + pad) + pad, 8 * (tile + pad) + pad, 3), preview.shape
    for i in (0, 9, 63):
        r, c = divmod(i, 8)
        top, left = pad + r * (tile + pad), pad + c * (tile + pad)
        expected = images[i].repeat(2, axis=0).repeat(2, axis=1)
        np.testing.assert_array_equal(preview[top : top + tile, left : left + tile], expected, err_msg=str(i))


def test_ranks_meet_after_the_settings_and_after_their_pngs(tmp_path):
    # Under torchrun the first barrier keeps the other ranks from checking the folder before
    # rank 0 wrote settings.json (or, with --overwrite, discarded the old images); the second
    # keeps rank 0 from archiving before every rank wrote its PNGs.
    net = _tiny()
    settings = SampleSettings(num_images=5, steps=2, convention="simple")
    out = tmp_path / "s"
    seen = []

    def barrier():
        seen.append(((out / "settings.json").exists(), sorted(p.name for p in (out / "images").glob("*.png"))))

    s1 = run_sampling(net, out, settings, batch_size=2, rank=1, world_size=2, barrier=barrier, progress=False)
    assert s1["sampled_now_by_this_rank"] == 3 and not (out / "samples.npz").exists()
    assert seen == [(False, []), (False, ["000002.png", "000003.png", "000004.png"])], seen
    seen.clear()
    run_sampling(net, out, settings, batch_size=2, rank=0, world_size=2, barrier=barrier, progress=False)
    assert [s for s, _ in seen] == [True, True] and seen[0][1] == [f"00000{i}.png" for i in (2, 3, 4)], seen
    assert len(seen[1][1]) == 5


def test_each_rank_samples_a_contiguous_index_range():
    # The module's contract: rank r samples [r·N/W, (r+1)·N/W).
    assert [list(generate._shard(7, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [list(generate._shard(2, r, 4)) for r in range(4)] == [[], [0], [], [1]]


def test_overwrite_discards_the_old_summary_and_archive_too(tmp_path):
    # A run killed after its last PNG would otherwise pass off the old run's measurements
    # (summary.json) as its own on the rerun that finds every image there.
    (tmp_path / "images").mkdir()
    for name in ("settings.json", "samples.npz", "preview.png", "summary.json", "notes.txt"):
        (tmp_path / name).write_text("old")
    for name in ("000001.png", ".000002.png.77.tmp", "mine.png"):
        (tmp_path / "images" / name).write_text("old")
    generate._discard_samples(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["images", "mine.png", "notes.txt"]


def test_without_a_weights_digest_another_model_path_is_another_run(tmp_path):
    # The same-weights fallback needs a digest: two settings without one ("" = unknown) say
    # nothing about the weights being the same.
    saved = SampleSettings(num_images=2, steps=2, model="/a/final")
    (tmp_path / "settings.json").write_text(json.dumps(saved.to_dict()))
    now = SampleSettings(num_images=2, steps=2, model="/b/final")
    with pytest.raises(ValueError, match="other settings.*model"):
        check_resume(tmp_path, now, overwrite=False)


def test_guidance_without_labels_on_a_conditional_network_says_so():
    net = _tiny()
    settings = SampleSettings(num_images=2, steps=8, guidance=2.0, labels="none")
    with pytest.raises(ValueError, match=r"classifier-free guidance needs class labels \(labels='none' given\)"):
        generate.check_sampling(net, settings)


def test_bool_class_counts_are_refused():
    with pytest.raises(ValueError, match="class_counts must be ints"):
        SampleSettings(labels="random", class_counts=(True,) * 10).validate()


def test_guidance_0_is_valid_and_means_none():
    # As the released sample.py (guidance only when cfg_scale > 0): 0 is "off", not an error.
    net = _tiny()
    SampleSettings(guidance=0.0).validate()
    off = SampleSettings(num_images=1, steps=3, guidance=0.0, convention="simple")
    generate.check_sampling(net, off)
    with pytest.raises(ValueError, match="guidance must be finite and >= 0"):
        SampleSettings(guidance=-0.5).validate()


def test_damaged_json_beside_the_images_or_the_weights_is_ignored(tmp_path):
    # A summary.json or train_config.json that is JSON but no object (hand-edited, or a
    # half-restored backup) reads as absent, not as an AttributeError in the middle of a run.
    net = _tiny()
    settings = SampleSettings(num_images=1, steps=2, convention="simple")
    out = tmp_path / "s"
    run_sampling(net, out, settings, batch_size=1, progress=False)
    (out / "summary.json").write_text("[1, 2]")
    again = run_sampling(net, out, settings, batch_size=1, progress=False)  # nothing left to sample
    assert again["sampled_now_by_this_rank"] == 0 and "measured_by" not in again
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("[1]")
    with pytest.raises(FileNotFoundError, match="nor a training run folder"):
        load_network(run)


# --------------------------------------------------------------------------------------------------
# epg.data.dali: what runs without a GPU (header parsing, routing, argument checks)
# --------------------------------------------------------------------------------------------------


def _jpeg(width=6, height=4, mode="RGB") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png(width=6, height=4) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_header_size_reads_width_then_height_of_pngs_and_jpegs():
    # A non-square image must not pass for resolution² because width and height were swapped
    # (the check only compares with (resolution, resolution)).
    from epg.data.dali import header_size

    assert header_size(_png(6, 4)) == (6, 4)
    assert header_size(_jpeg(6, 4)) == (6, 4)
    assert header_size(b"GIF89a" + bytes(20)) is None


def test_jpeg_frame_headers_are_found_only_where_they_are():
    # Huffman tables (FF C4) may precede the frame header; they are not a frame. A scan
    # (FF DA) before any frame, a byte that starts no marker, or a frame header cut short
    # means no size can be trusted: None, not a size read from elsewhere and not an IndexError.
    from epg.data.dali import header_size, pillow_route

    jpeg = _jpeg(6, 4)
    dht_first = b"\xff\xd8" + b"\xff\xc4\x00\x04\x00\x00" + jpeg[2:]
    assert header_size(dht_first) == (6, 4) and pillow_route(dht_first) is None
    assert header_size(b"\xff\xd8" + b"\xff\xda\x00\x02" + jpeg[2:]) is None
    sof = jpeg.index(b"\xff\xc0")
    assert header_size(b"\xff\xd8\x00" + jpeg[sof + 1 :]) is None  # a stray byte where FF belongs
    cut = b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x04\x00\x06"  # ends before the component count
    assert header_size(cut) is None


def test_pillow_route_of_padded_gray_and_truncated_jpegs():
    # Zero padding after the end marker (some encoders write it) is a whole JPEG for DALI;
    # a gray JPEG (1 component) is decoded by DALI like Pillow; without its end marker a file
    # goes through Pillow.
    from epg.data.dali import pillow_route

    jpeg = _jpeg()
    assert pillow_route(jpeg) is None
    assert pillow_route(jpeg + b"\x00" * 8) is None
    assert pillow_route(_jpeg(mode="L")) is None
    assert pillow_route(jpeg[:-2]) == "JPEG without its end marker"
    assert pillow_route(_png()) is None
    assert pillow_route(_png()[:-5]) == "incomplete PNG"


def test_png_checksums_ok_holds_for_whole_pngs_and_non_pngs():
    # False would route every file of a failed batch through Pillow (_diagnose); only a wrong
    # or cut chunk is a checksum failure.
    from epg.data.dali import png_checksums_ok

    png = _png()
    assert png_checksums_ok(png) and png_checksums_ok(_jpeg()) and png_checksums_ok(b"not an image")
    at = png.index(b"IDAT")
    assert not png_checksums_ok(png[: at + 10])  # cut inside IDAT: its CRC is not there
    assert not png_checksums_ok(png[: at + 4] + bytes([png[at + 4] ^ 1]) + png[at + 5 :])


def test_read_for_dali_passes_whole_files_and_refuses_other_sizes(tmp_path):
    from epg.data.dali import read_for_dali
    from epg.data.folder import ImageSizeError

    (tmp_path / "ok.png").write_bytes(_png(8, 8))
    (tmp_path / "wide.png").write_bytes(_png(8, 6))
    assert read_for_dali(str(tmp_path / "ok.png"), 8).tobytes() == _png(8, 8)  # the file itself
    with pytest.raises(ImageSizeError):
        read_for_dali(str(tmp_path / "wide.png"), 8)


@pytest.fixture
def small_tree(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for k in range(2):
            (tmp_path / c / f"{k}.png").write_bytes(_png(8, 8))
    return tmp_path


def test_dali_decoder_choice_and_its_checks(small_tree):
    # "cpu" on a CPU device by default; an unknown decoder, or "mixed" without a CUDA device,
    # is refused when the loader is made, not at the first batch inside DALI.
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    from epg.data.dali import DaliLoader

    with DaliLoader(small_tree, 8, 2, num_threads=1) as loader:
        assert loader.decoder == "cpu"
    with pytest.raises(ValueError, match="decoder must be 'mixed' or 'cpu', got 'gpu'"):
        DaliLoader(small_tree, 8, 2, decoder="gpu")
    with pytest.raises(ValueError, match="'mixed' decoder needs a CUDA device, got cpu"):
        DaliLoader(small_tree, 8, 2, decoder="mixed")


# --------------------------------------------------------------------------------------------------
# epg.demo: its pieces, with the training and the judge stood in for (the real demo takes minutes)
# --------------------------------------------------------------------------------------------------


def test_demo_config_refuses_a_bool_seed_and_an_unknown_objective(tmp_path):
    from epg.demo import DemoConfig

    with pytest.raises(ValueError, match="seed must be a non-negative int, got True"):
        DemoConfig(out_dir=str(tmp_path / "d"), seed=True).validate()
    with pytest.raises(ValueError, match="objective must be diffusion or consistency, got 'edm'"):
        DemoConfig(out_dir=str(tmp_path / "d"), objective="edm").validate()
    cfg = DemoConfig(out_dir=str(tmp_path / "d"), stage2_steps=7)
    cfg.validate()
    assert cfg.stage2_steps == 7  # given: kept, not the preset's


def test_demo_stage_configs_take_the_seed_the_encoder_and_the_extra_fields(tmp_path):
    # Stage 2 draws with seed + 1 (not stage 1's stream again) and fine-tunes the encoder stage 1
    # exported; both start afresh (the demo says a rerun starts afresh), with the extra fields
    # of DemoConfig.stage1/stage2 on top of the presets.
    from epg.demo import DemoConfig, _stage1_config, _stage2_config

    cfg = DemoConfig(objective="consistency", out_dir=str(tmp_path), seed=3, stage2_steps=42, batch_size=16,
                     stage1={"lr": 0.123}, stage2={"warmup_steps": 5})  # fmt: skip
    cfg.validate()
    s1 = _stage1_config(cfg, tmp_path / "stage1")
    s2 = _stage2_config(cfg, tmp_path / "stage2", tmp_path / "stage1" / "final")
    assert (s1.seed, s2.seed) == (3, 4)
    assert (s1.lr, s2.warmup_steps) == (0.123, 5)
    assert s2.encoder == str(tmp_path / "stage1" / "final")
    assert (s1.steps, s2.steps, s1.batch_size, s2.batch_size) == (cfg.stage1_steps, 42, 16, 16)
    assert (s1.resume, s2.resume, s1.ckpt_every, s2.ckpt_every) == ("restart", "restart", 0, 0)
    assert (s1.run_dir, s2.run_dir) == (str(tmp_path / "stage1"), str(tmp_path / "stage2"))
    assert s2.objective["stage_length"] == 10  # ECT stages a quarter of the run: 42 // 4
    short = DemoConfig(objective="consistency", out_dir=str(tmp_path), stage2_steps=3)
    short.validate()
    assert _stage2_config(short, tmp_path, tmp_path).objective["stage_length"] == 1  # never 0


@pytest.mark.parametrize("objective, sampler, steps, mode", [
    ("diffusion", "heun", 5, "x0"), ("consistency", "consistency", 1, "edm")])  # fmt: skip
def test_demo_sampling_settings(monkeypatch, tmp_path, objective, sampler, steps, mode):
    # Class-balanced labels (samples_per_class of each), the run's seed, and for diffusion Heun
    # with the demo's guidance and interval (null class 10); consistency: one EDM-mode step.
    from epg import demo

    seen = {}
    real = sampling.sample

    def spy(denoiser, labels, *args, **kwargs):
        seen.update(kwargs, mode=denoiser.mode, labels=labels)
        return real(denoiser, labels, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    cfg = demo.DemoConfig(objective=objective, out_dir=str(tmp_path), seed=4, samples_per_class=2,
                          sampling_steps=5, guidance=1.7, guidance_interval=(0.5, 9.0), progress=False)  # fmt: skip
    images, labels = demo._sample(cfg, _tiny(name="epg-digits"), torch.device("cpu"))
    assert images.shape == (20, 1, 16, 16) and torch.equal(labels, torch.arange(20) % 10)
    assert torch.equal(seen["labels"], labels)
    assert (seen["sampler"], seen["steps"], seen["mode"], seen["seed"]) == (sampler, steps, mode, 4), seen
    if objective == "diffusion":
        assert (seen["guidance"], seen["null_class"], seen["guidance_interval"]) == (1.7, 10, (0.5, 9.0)), seen


def test_run_demo_chains_the_stages_and_writes_metrics_and_the_class_grid(monkeypatch, tmp_path):
    from epg import demo
    from epg.data.embedded import to_uint8

    trainers = []

    class FakeTrainer:  # stage 1 exports a folder, stage 2 a sampleable digits network
        def __init__(self, cfg):
            self.cfg, self.step, self.closed = cfg, 2, False
            trainers.append(self)

        def fit(self):
            last = 0.25 if self.cfg.mode == "pretrain" else 0.5
            return [{"step": 1, "loss": 9.0}, {"step": 2, "loss": last}]

        def export(self):
            final = Path(self.cfg.run_dir) / "final"
            if self.cfg.mode == "pretrain":
                final.mkdir(parents=True)
            else:
                ckpt.save(_tiny(name="epg-digits"), final, metadata={"mode": self.cfg.mode})
            return final

        def close(self):
            self.closed = True

    class FakeJudge:
        def __init__(self, *args):
            pass

        def fit(self, x, y, seed):
            self.seed = seed
            return self

    seen = {}

    def report(samples, labels, judge, real_test, real_reference, seed):
        seen.update(samples=samples, labels=labels, judge_seed=judge.seed, seed=seed)
        return {"accuracy": 0.75, "frechet_distance": 3.5, "reference_frechet_distance": 1.25}

    monkeypatch.setattr(demo, "Trainer", FakeTrainer)
    monkeypatch.setattr(demo, "DigitsJudge", FakeJudge)
    monkeypatch.setattr(demo, "digits_report", report)
    out = tmp_path / "demo"
    cfg = demo.DemoConfig(out_dir=str(out), seed=2, samples_per_class=3, sampling_steps=3, progress=False)
    metrics = demo.run_demo(cfg)

    assert [t.cfg.mode for t in trainers] == ["pretrain", "diffusion"] and all(t.closed for t in trainers)
    assert trainers[1].cfg.encoder == str(out / "stage1" / "final")
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (metrics["accuracy"], metrics["frechet_distance"], metrics["reference_frechet_distance"]) == (0.75, 3.5, 1.25)
    assert metrics["final_losses"] == {"stage1": 0.25, "stage2": 0.5}
    assert (seen["seed"], seen["judge_seed"]) == (2, 2)
    assert metrics["model"] == str(out / "stage2" / "final") and metrics["samples_png"] == str(out / "samples.png")
    assert metrics["objective"] == "diffusion" and metrics["config"]["seed"] == 2
    assert set(metrics["times"]) == {"stage1_s", "stage2_s", "sampling_s", "judging_s"}
    # samples.png: one row per class (0..9 top to bottom), that class's samples in index order,
    # each 16 px tile magnified 4 times, 2 px of padding.
    grid = np.asarray(Image.open(out / "samples.png"))
    tile, pad = 64, 2
    assert grid.shape[:2] == (10 * (tile + pad) + pad, 3 * (tile + pad) + pad), grid.shape
    tiles = to_uint8(seen["samples"], "simple")  # (N, 16, 16, 1)
    for k, j in ((0, 0), (3, 1), (9, 2)):
        i = k + 10 * j  # class-balanced labels: image i has class i mod 10
        assert seen["labels"][i] == k
        top, left = pad + k * (tile + pad), pad + j * (tile + pad)
        expected = tiles[i, ..., 0].repeat(4, axis=0).repeat(4, axis=1)
        np.testing.assert_array_equal(grid[top : top + tile, left : left + tile], expected, err_msg=f"{k},{j}")


# --------------------------------------------------------------------------------------------------
# epg.sampling: input checks and the guidance interval
# --------------------------------------------------------------------------------------------------


def _zeros(x, sigma, y):
    return torch.zeros_like(x)


@pytest.mark.parametrize("sigmas, message", [
    ([3.0, -1.0], "strictly decreasing and >= 0"),  # a negative end
    ([3.0, 3.0, 1.0], "strictly decreasing"),  # a repeated σ: a step of length 0
    (torch.tensor([[3.0, 1.0]]), "1-D"),
    ([3.0, 0.0, 0.0], "finite and positive"),  # only the last may be 0
    ([float("nan"), 1.0], "finite and positive"),
])  # fmt: skip
def test_bad_sigma_grids_are_refused_with_the_reason(sigmas, message):
    with pytest.raises(ValueError, match=message):
        sampling.euler(_zeros, torch.zeros(1, 1, 2, 2), sigmas)


def test_guided_denoiser_argument_checks():
    with pytest.raises(ValueError, match="need sigma_low < sigma_high"):
        sampling.GuidedDenoiser(_zeros, 2.0, 10, sigma_low=1.0, sigma_high=1.0)
    for bad in (1.5, True, "10"):
        with pytest.raises(ValueError, match="null_class must be an int or None"):
            sampling.GuidedDenoiser(_zeros, 2.0, bad)
    assert sampling.GuidedDenoiser(_zeros, 2.0, np.int64(10)).null_class == 10  # numpy ints are ints


def test_guidance_without_labels_is_the_plain_denoiser():
    # y=None (unconditional sampling) has no label to swap for the null class: one pass, no
    # guidance, even inside the interval with w != 1.
    calls = []

    def den(x, sigma, y):
        calls.append(y)
        return x * 0.5

    guided = sampling.GuidedDenoiser(den, 3.0, 10, 0.0, float("inf"), img_size=64, clamp=False)
    x = torch.randn(2, 1, 2, 2)
    assert torch.equal(guided(x, torch.full((2,), 1.0), None), x * 0.5)
    assert calls == [None] and (guided.nfe_cond, guided.nfe_uncond) == (1, 0)


def test_the_interval_is_shifted_at_both_ends():
    # (σ_low·H/64, σ_high·H/64]: at 128 px (shift 2), the default (0.19, 1.61] is (0.38, 3.22].
    guided = sampling.GuidedDenoiser(_zeros, 2.0, 10, img_size=128)
    sigma = torch.tensor([0.38, 0.381, 1.7, 3.22, 3.23], dtype=torch.float64)
    assert guided.in_interval(sigma).tolist() == [False, True, True, True, False]


def test_int32_labels_sample_as_int64_ones():
    # The documented label dtypes are int64 and int32 (torch.arange on some paths gives int32).
    den = lambda x, sigma, y: x * 0 + y.view(-1, 1, 1, 1).float() / 10  # noqa: E731
    y64 = torch.tensor([1, 3])
    a = sampling.sample(den, y64, 8, 1, steps=2, progress=False)
    b = sampling.sample(den, y64.to(torch.int32), 8, 1, steps=2, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"labels must be a \(2,\) int64 tensor"):
        sampling.sample(den, y64.float(), 8, 1, steps=2, progress=False)


def test_samplers_refuse_integer_states():
    with pytest.raises(ValueError, match="x_T must be a floating-point"):
        sampling.heun(_zeros, torch.zeros(1, 1, 2, 2, dtype=torch.int64), [3.0, 1.0])


def test_class_labels_edge_cases():
    assert sampling.class_labels(0, 10).tolist() == []  # an empty rank share is no error
    assert sampling.class_labels(0, 3, balanced=False, class_counts=[1, 1, 1]).tolist() == []
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        sampling.class_labels(-1, 10)
    with pytest.raises(ValueError, match="class_counts is only used with balanced=False"):
        sampling.class_labels(4, 2, balanced=True, class_counts=[1, 1])


def test_consistency_sampler_checks():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="must all be positive"):
        sampling.consistency(_zeros, x, [3.0, 0.0])
    with pytest.raises(ValueError, match="sigma_min must be in"):
        sampling.consistency(_zeros, x, [3.0, 1.0], sigma_min=1.0)  # the identity point itself
    with pytest.raises(ValueError, match="steps must be an integer >= 1 for consistency, got 0"):
        sampling.sample(_zeros, torch.zeros(1, dtype=torch.int64), 8, 1, steps=0, sampler="consistency",
                        progress=False)  # fmt: skip


def test_sample_prior_and_generator_checks():
    with pytest.raises(ValueError, match="unconditional sampling .* needs indices"):
        sampling.sample(_zeros, None, 8, 1, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 1, 2, 2\)"):
        sampling.prior((2, 1, 2, 2), [3.0, 1.0], noise=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        sampling.image_generators([0], -1)
    with pytest.raises(ValueError, match="image indices must be non-negative ints"):
        sampling.image_generators([0, -2], 0)
