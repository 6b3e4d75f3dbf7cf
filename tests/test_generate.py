"""`epg sample` and epg.generate: files, resume, sharding, official checkpoints, pass counts."""

import dataclasses
import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from epg import checkpoint as ckpt
from epg import generate, sampling
from epg.cli import _SAMPLERS, main
from epg.generate import (
    SampleSettings,
    check_resume,
    image_path,
    labels_for,
    load_network,
    make_denoiser,
    run_sampling,
)
from epg.models import build
from helpers import torchrun


def _tiny(seed=0, name="epg-tiny", **overrides):
    torch.manual_seed(seed)
    net = build(name, **overrides).eval()
    # A random init has a zero output layer (adaLN-zero style): give it weights so images differ.
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return net


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    ckpt.save(_tiny(), folder, metadata={"mode": "diffusion", "convention": "simple"})
    return folder


def _sample_cli(ckpt_dir, out, *extra):
    return main(["sample", str(ckpt_dir), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--num-images", "6", "--steps", "3", *extra])  # fmt: skip


def _png_stack(out, n):
    return np.stack([np.asarray(Image.open(image_path(out, i))) for i in range(n)])


def _write_random_pngs(out, n, size):
    """n random RGB images of size² written as ``out``'s PNGs 0..n-1; returns them (n, size, size, 3)."""
    images = np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    (out / "images").mkdir()
    for i, img in enumerate(images):
        generate._write_png(image_path(out, i), img)
    return images


def _assert_same_images(got, ref):
    # Same noise, same labels; only the float rounding of batched matrix products differs
    # with the batch shape, which can move a pixel that sits on a rounding edge by one level.
    got, ref = got.astype(int), ref.astype(int)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3


def test_sample_writes_pngs_npz_preview_and_summary(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample_cli(tiny_ckpt, out, "--batch-size", "4") == 0
    data = np.load(out / "samples.npz")
    images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]  # class-balanced: i mod 10
    np.testing.assert_array_equal(images, _png_stack(out, 6))
    assert images.std() > 0  # not a constant image
    assert Image.open(out / "preview.png").size[0] > 64
    settings = json.loads((out / "settings.json").read_text())
    assert settings["convention"] == "simple" and settings["mode"] == "diffusion"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passes_per_image"] == 4  # Heun, 3 points, no trailing zero: 2·(3−1)
    assert "network passes per image: 4" in capsys.readouterr().out


def test_pixels_follow_to_uint8_of_the_sampled_tensor(tiny_ckpt, tmp_path):
    net, _ = load_network(tiny_ckpt)
    settings = SampleSettings(num_images=3, steps=3, convention="simple", labels="random", seed=5)
    run_sampling(net, tmp_path, settings, batch_size=3, progress=False)
    x = sampling.sample(make_denoiser(net, "diffusion"), labels_for(settings, 10), 32, 3, steps=3,
                        seed=5, progress=False)  # fmt: skip
    x01 = ((x + 1) / 2).clamp(0, 1)
    expected = torch.floor(x01 * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], expected)


def test_images_do_not_depend_on_batch_size_or_the_number_of_ranks(tiny_ckpt, tmp_path):
    net, _ = load_network(tiny_ckpt)
    settings = SampleSettings(num_images=5, steps=8, guidance=2.0, convention="simple")
    one = run_sampling(net, tmp_path / "one", settings, batch_size=5, progress=False)
    assert one["passes_per_image"] > 14  # guided passes happened (σ grid crosses the interval)
    run_sampling(net, tmp_path / "small", settings, batch_size=2, progress=False)
    # Two ranks, run one after the other (rank 0 last: it writes the archive from all PNGs).
    run_sampling(net, tmp_path / "ranks", settings, batch_size=2, rank=1, world_size=2, progress=False)
    r0 = run_sampling(net, tmp_path / "ranks", settings, batch_size=2, rank=0, world_size=2, progress=False)
    assert r0["sampled_now_by_this_rank"] == 2  # indices 0..1; rank 1 did 2..4
    ref = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    for other in ("small", "ranks"):
        _assert_same_images(np.load(tmp_path / other / "samples.npz")["arr_0"], ref)


def test_rerun_resumes_missing_and_corrupt_images_only(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample_cli(tiny_ckpt, out) == 0
    ref = np.load(out / "samples.npz")["arr_0"]
    image_path(out, 1).unlink()
    image_path(out, 4).write_bytes(b"not a png")
    (out / "samples.npz").unlink()
    assert _sample_cli(tiny_ckpt, out) == 0
    assert json.loads((out / "summary.json").read_text())["sampled_now_by_this_rank"] == 2
    _assert_same_images(np.load(out / "samples.npz")["arr_0"], ref)
    assert not list((out / "images").glob(".*.tmp"))
    # Nothing left: said so, and the summary keeps the measurements of the run that sampled
    # (it was overwritten with passes_per_image None, and the CLI printed "None").
    measured = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert _sample_cli(tiny_ckpt, out) == 0
    assert "nothing left to sample: all 6 images were there" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert again["sampled_now_by_this_rank"] == 0 and again["measured_by"].startswith("an earlier run")
    assert "measured_by" not in measured
    assert {k: again[k] for k in ("passes_per_image", "images_per_s")} == {
        k: measured[k] for k in ("passes_per_image", "images_per_s")} and measured["passes_per_image"]


def test_other_settings_in_the_same_folder_are_refused_without_losing_images(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample_cli(tiny_ckpt, out) == 0
    before = _png_stack(out, 6)
    capsys.readouterr()
    assert _sample_cli(tiny_ckpt, out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 0 there, 1 now" in err
    np.testing.assert_array_equal(_png_stack(out, 6), before)
    stale = out / "images" / ".000003.png.0123abcd.tmp"  # a write a killed run left behind
    stale.write_bytes(b"partial")
    assert _sample_cli(tiny_ckpt, out, "--seed", "1", "--overwrite") == 0
    assert not np.array_equal(_png_stack(out, 6), before)
    assert not stale.exists()


def test_an_interrupted_overwrite_run_resumes_with_its_own_images_only(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "s"
    assert _sample_cli(tiny_ckpt, out) == 0
    net, _ = load_network(tiny_ckpt)
    new = SampleSettings(num_images=6, steps=3, convention="simple", seed=1)
    run_sampling(net, tmp_path / "ref", new, batch_size=6, progress=False)
    ref = _png_stack(tmp_path / "ref", 6)

    class Killed(Exception):
        pass

    write_png, written = generate._write_png, []

    def killed_after_two_images(path, pixels):  # the run dies after its first batch
        if len(written) == 2:
            raise Killed
        written.append(path)
        write_png(path, pixels)

    monkeypatch.setattr(generate, "_write_png", killed_after_two_images)
    with pytest.raises(Killed):
        run_sampling(net, out, new, batch_size=2, overwrite=True, progress=False)
    monkeypatch.undo()
    # The old run's images are gone, not taken for the new run's: a plain rerun samples 2..5.
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["000000.png", "000001.png"]
    assert not (out / "samples.npz").exists()
    summary = run_sampling(net, out, new, batch_size=2, progress=False)
    assert summary["sampled_now_by_this_rank"] == 4
    _assert_same_images(_png_stack(out, 6), ref)


def test_official_layout_state_dict_samples_without_renaming(tmp_path):
    net = _tiny(seed=3)
    # Released files are plain state dicts, sometimes saved from a DDP-wrapped module.
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "nnet_ema.pth")
    out = tmp_path / "s"
    assert main(["sample", "--official", str(tmp_path), "--config", "epg-tiny", "--out", str(out),
                 "--num-images", "2", "--steps", "2", "--device", "cpu", "--no-progress",
                 "--labels", "random"]) == 0  # fmt: skip
    assert json.loads((out / "settings.json").read_text())["convention"] == "imagenet"
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_an_official_file_without_a_class_embedding_samples_unconditionally(tmp_path, capsys):
    # The official code's unconditional consistency config (spec §12, open question §13.8): the
    # file decides, and that config's normalisation ("simple") comes with it.
    torch.save(_tiny(seed=3, num_classes=0).state_dict(), tmp_path / "nnet_ema.pth")
    out = tmp_path / "s"
    assert main(["sample", "--official", str(tmp_path), "--config", "epg-tiny", "--out", str(out),
                 "--num-images", "2", "--steps", "2", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    assert "note: nnet_ema.pth has no class_embed.weight: an unconditional network" in capsys.readouterr().out
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["convention"], settings["labels"], settings["guidance"]) == ("simple", "none", 1.0)
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


@pytest.mark.parametrize("config, mode", [("epg-l-16", "consistency"), ("epg-xl-16", "diffusion"),
                                          ("epg-tiny", "diffusion")])
def test_a_released_file_samples_as_the_released_network_of_its_config(monkeypatch, tmp_path, config, mode):
    # EPG-L/16 at 256 px is released only as the one-step consistency model (spec §10.1).
    monkeypatch.setattr(ckpt, "load_official", lambda path, name, device="cpu": _tiny())
    (tmp_path / "EPG.pth").write_bytes(b"weights")  # read for the digest only
    _, info = load_network(None, tmp_path / "EPG.pth", config)
    assert info["mode"] == mode


def test_zero_steps_are_refused(tiny_ckpt, tmp_path, capsys):
    assert _sample_cli(tiny_ckpt, tmp_path / "s", "--steps", "0") == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


def test_official_needs_a_config_and_a_matching_one(tmp_path, capsys):
    torch.save(_tiny().state_dict(), tmp_path / "nnet_ema.pth")
    assert main(["sample", "--official", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["sample", "--official", str(tmp_path), "--config", "epg-digits",
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "does not fit EPGViT" in err and "missing key(s): blocks.2.attn.proj.bias" in err


def test_consistency_checkpoint_samples_in_one_pass(tmp_path):
    folder = tmp_path / "cm"
    ckpt.save(_tiny(), folder, metadata={"mode": "consistency", "convention": "simple"})
    out = tmp_path / "s"
    assert main(["sample", str(folder), "--out", str(out), "--num-images", "3", "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["sampler"], settings["steps"], settings["mode"]) == ("consistency", 1, "consistency")
    assert json.loads((out / "summary.json").read_text())["passes_per_image"] == 1


def test_stage1_and_missing_checkpoints_are_reported(tmp_path, capsys):
    rcm = tmp_path / "rcm"
    ckpt.save(build("rcm-tiny"), rcm, metadata={"mode": "pretrain"})
    assert main(["sample", str(rcm), "--out", str(tmp_path / "o")]) == 2
    assert "stage-1 encoder" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_a_stage1_run_is_refused_finished_or_not(tmp_path, capsys):
    # An unfinished run would otherwise get the advice to `epg export` it, into a folder that
    # sampling refuses too.
    run = tmp_path / "stage1"
    (run / ckpt.RUN_CHECKPOINTS_NAME).mkdir(parents=True)
    (run / ckpt.RUN_CONFIG_NAME).write_text(json.dumps({"mode": "pretrain", "model": "rcm-tiny"}))
    (run / ckpt.RUN_CHECKPOINTS_NAME / "step_5.pt").write_bytes(b"x")
    for given in (run, run / ckpt.RUN_CHECKPOINTS_NAME / "step_5.pt"):
        assert main(["sample", str(given), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "stage-1 (pre-training) run" in err and "epg export" not in err, err
    (run / ckpt.RUN_CONFIG_NAME).write_text(json.dumps({"mode": "diffusion", "model": "epg-tiny"}))
    assert main(["sample", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "has not finished" in capsys.readouterr().err  # a stage-2 run is pointed to `epg export`


def test_a_wrong_checkpoint_path_is_named_in_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt.save(_tiny(), tmp_path / "f1" / "final", metadata={"mode": "diffusion"})
    (tmp_path / "empty").mkdir()
    torch.save(_tiny().state_dict(), tmp_path / "nnet_ema.pth")
    for given, expected in [("nope", "nope does not exist"), ("f1/finall", "f1/finall does not exist"),
                            ("empty", "empty is neither an epg checkpoint folder (it has no config.json) "
                                      "nor a training run folder (it has no final/)"),
                            ("nnet_ema.pth", "nnet_ema.pth is a file, not an epg checkpoint folder "
                                             "(a released .pth file samples with --official")]:  # fmt: skip
        assert main(["sample", given, "--out", "o", "--device", "cpu"]) == 2
        assert f"error: {expected}" in capsys.readouterr().err, given
    _, info = load_network("f1")  # a run folder samples its exported network
    assert info["source"] == str((tmp_path / "f1" / "final").resolve())  # the same from anywhere


def test_settings_are_validated():
    with pytest.raises(ValueError, match="sampler"):
        SampleSettings(sampler="ddim").validate()
    with pytest.raises(ValueError, match="num_images"):
        SampleSettings(num_images=0).validate()
    with pytest.raises(ValueError, match="interval"):
        SampleSettings(guidance_interval=(2.0, 1.0)).validate()


def test_cli_sampler_names_match_the_library():
    assert set(_SAMPLERS) == set(sampling.SAMPLERS)


@pytest.mark.slow
def test_compiled_sampling_matches_eager_on_cpu():
    net = _tiny()
    labels = torch.arange(3) % 10
    # 8 points: with only 2–3 the last Heun step divides by a tiny σ and magnifies float noise.
    kw = dict(steps=8, guidance=2.0, null_class=net.null_class, progress=False,
              guidance_interval=(0.0, float("inf")))  # fmt: skip
    eager = sampling.sample(make_denoiser(net, "diffusion"), labels, 32, 3, **kw)
    compiled = sampling.sample(make_denoiser(net, "diffusion", compile=True), labels, 32, 3, **kw)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_cuda_graph_denoiser_refuses_cpu_tensors():
    graphed = sampling.CUDAGraphDenoiser(lambda x, s, y: x)
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA tensors"):
        graphed(torch.zeros(1, 3, 4, 4), torch.ones(1), None)


@pytest.mark.cuda
def test_cuda_graph_and_compiled_sampling_match_eager_on_gpu():
    net = _tiny().cuda()
    settings = dict(steps=4, guidance=2.0, null_class=net.null_class, seed=0, progress=False,
                    device="cuda", guidance_interval=(0.0, float("inf")))  # fmt: skip
    labels = torch.arange(4) % 10
    eager = sampling.sample(make_denoiser(net, "diffusion"), labels, 32, 3, **settings)
    graphed = sampling.CUDAGraphDenoiser(make_denoiser(net, "diffusion"))
    replayed = sampling.sample(graphed, labels, 32, 3, **settings)
    assert len(graphed.graphs) == 1  # one batched (cond + uncond) shape at every σ
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    compiled = sampling.sample(make_denoiser(net, "diffusion", compile=True), labels, 32, 3, **settings)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_torchrun_two_processes_split_the_indices_and_match_one(tiny_ckpt, tmp_path):
    proc = torchrun(tmp_path, 2, 29571, "-m", "epg.cli", "sample", tiny_ckpt, "--out", tmp_path / "two",
                    "--num-images", 5, "--steps", 3, "--batch-size", 2, "--device", "cpu", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["sample", str(tiny_ckpt), "--out", str(tmp_path / "one"), "--num-images", "5", "--steps",
                 "3", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sampled_now_by_this_rank"] == 2  # rank 0: 0..1
    _assert_same_images(np.load(tmp_path / "two" / "samples.npz")["arr_0"],
                        np.load(tmp_path / "one" / "samples.npz")["arr_0"])


def test_sample_then_evaluate_end_to_end_with_a_random_inception(tiny_ckpt, tmp_path, capsys):
    from epg.evaluation import InceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(InceptionV3().state_dict(), weights)
    for name, seed in (("samples", "0"), ("reference", "1")):
        assert _sample_cli(tiny_ckpt, tmp_path / name, "--seed", seed) == 0
    capsys.readouterr()
    common = ["--inception-weights", str(weights), "--device", "cpu", "--no-progress", "--batch-size", "4"]
    ref = tmp_path / "ref_stats.npz"
    assert main(["evaluate", str(tmp_path / "reference" / "samples.npz"), "--save-ref", str(ref), *common]) == 0
    assert main(["evaluate", str(tmp_path / "samples" / "samples.npz"), "--ref", str(ref), *common]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "Precision" in out
    metrics = json.loads((tmp_path / "samples" / "samples_metrics.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["fid"] > 0
    # Neither or both of --ref / --save-ref: one line on stderr.
    assert main(["evaluate", str(tmp_path / "samples" / "samples.npz"), *common]) == 2
    assert "--ref" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(steps=1), dict(convention="imagenet")])
def test_settings_that_cannot_sample_are_refused_before_the_folder_is_touched(tmp_path, bad):
    # A gray network: the "imagenet" convention needs 3 channels. Heun needs 2 grid points.
    net = _tiny(in_channels=1)
    good = SampleSettings(num_images=2, steps=2, convention="simple", labels="random")
    out = tmp_path / "s"
    run_sampling(net, out, good, batch_size=2, progress=False)
    before, settings = _png_stack(out, 2), (out / "settings.json").read_text()
    with pytest.raises(ValueError):
        run_sampling(net, out, dataclasses.replace(good, **bad), overwrite=True, progress=False)
    np.testing.assert_array_equal(_png_stack(out, 2), before)  # --overwrite discarded nothing
    assert (out / "settings.json").read_text() == settings and (out / "samples.npz").exists()
    # A fresh folder keeps no settings.json either, which would refuse the corrected rerun.
    with pytest.raises(ValueError):
        run_sampling(net, tmp_path / "fresh", dataclasses.replace(good, **bad), progress=False)
    assert not (tmp_path / "fresh" / "settings.json").exists()


def test_progress_bars_follow_the_progress_flag(tiny_ckpt, tmp_path, capsys):
    net, _ = load_network(tiny_ckpt)
    settings = SampleSettings(num_images=2, steps=2, convention="simple")
    run_sampling(net, tmp_path, settings, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""  # the npz bar too
    # A rerun decodes every existing PNG before it samples: long for 50k images, so a bar.
    run_sampling(net, tmp_path, settings, batch_size=2, progress=True)
    assert "checking existing images" in capsys.readouterr().err


def test_npz_is_written_one_image_at_a_time(tmp_path):
    images = _write_random_pngs(tmp_path, 64, 64)
    labels = torch.arange(64) % 10
    generate.write_npz(tmp_path, 64, labels, progress=False)  # imports and caches warmed up
    tracemalloc.start()
    try:
        path = generate.write_npz(tmp_path, 64, labels, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Holding the whole arr_0 (768 KB here) would take 39 GB for 50k images at 512 px.
    assert peak < images.nbytes / 4, peak
    with np.load(path) as npz:  # np.savez's format: np.load and the ADM evaluator read it
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], labels.numpy())
    image_path(tmp_path, 5).write_bytes(b"not a png")
    with pytest.raises(ValueError, match="000005.png is missing, corrupt"):
        generate.write_npz(tmp_path, 64, labels, progress=False)
    np.testing.assert_array_equal(np.load(path)["arr_0"], images)  # the old archive stays whole


def test_random_labels_follow_the_training_class_counts(tiny_ckpt, tmp_path, capsys):
    # The released sampler without balanced sampling draws labels from the training set's class
    # frequencies (§8): here only classes 3 and 7 have images, 1 : 3.
    data = tmp_path / "train"
    for k in range(10):
        (data / f"c{k}").mkdir(parents=True)
    for name, n in (("c3", 1), ("c7", 3)):
        for i in range(n):
            Image.new("RGB", (4, 4)).save(data / name / f"{i}.png")
    assert generate.training_class_counts(data) == (0, 0, 0, 1, 0, 0, 0, 3, 0, 0)
    out = tmp_path / "s"
    assert _sample_cli(tiny_ckpt, out, "--num-images", "40", "--steps", "2", "--labels", "random",
                       "--class-counts", str(data)) == 0  # fmt: skip
    settings = SampleSettings.from_dict(json.loads((out / "settings.json").read_text()))
    assert settings.class_counts == (0, 0, 0, 1, 0, 0, 0, 3, 0, 0)  # recorded: a resume must match
    labels = np.load(out / "samples.npz")["arr_1"]
    assert set(labels.tolist()) == {3, 7} and (labels == 7).sum() > (labels == 3).sum()

    assert _sample_cli(tiny_ckpt, tmp_path / "b", "--class-counts", str(data)) == 2
    assert "--class-counts goes with --labels random" in capsys.readouterr().err
    wrong = SampleSettings(num_images=2, steps=2, labels="random", class_counts=(1, 2, 3))
    with pytest.raises(ValueError, match="class_counts gives 3 classes; this network has 10"):
        run_sampling(load_network(tiny_ckpt)[0], tmp_path / "c", wrong, progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="only used with labels='random'"):
        SampleSettings(class_counts=(1,) * 10).validate()


def test_a_folder_recorded_with_a_relative_model_path_resumes(tiny_ckpt, tmp_path, monkeypatch):
    # Earlier versions recorded the checkpoint path as given; the same path from the same
    # folder is the same run, not "other settings".
    monkeypatch.chdir(tiny_ckpt.parent)
    out = tmp_path / "s"
    assert _sample_cli("final", out, "--num-images", "2") == 0
    saved = json.loads((out / "settings.json").read_text())
    assert saved["model"] == str(tiny_ckpt.resolve())
    saved["model"] = "final"
    (out / "settings.json").write_text(json.dumps(saved))
    assert _sample_cli("final", out, "--num-images", "2") == 0


def test_cuda_graphs_on_a_cpu_network_are_refused_before_the_folder_is_touched(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample_cli(tiny_ckpt, out) == 0
    before = _png_stack(out, 6)
    assert _sample_cli(tiny_ckpt, out, "--seed", "1", "--overwrite", "--cuda-graph") == 2
    assert "CUDA graphs need a network on a CUDA device" in capsys.readouterr().err
    np.testing.assert_array_equal(_png_stack(out, 6), before)
    assert json.loads((out / "settings.json").read_text())["seed"] == 0


def test_a_trained_networks_config_name_picks_the_default_guidance(tiny_ckpt, tmp_path, capsys):
    # Checkpoints from the Trainer recorded no config name, so `epg sample` ran every one of
    # them without guidance, even an epg-xl-16 diffusion run (released scale 2.5).
    folder = tmp_path / "run" / "final"
    ckpt.save(_tiny(), folder, metadata={"mode": "diffusion", "model": "epg-xl-16"})
    assert load_network(folder)[1]["config"] == "epg-xl-16"
    # 8 points: with 3 at 32 px no σ of the grid lies in the guidance interval (it is refused).
    assert _sample_cli(folder, tmp_path / "s", "--num-images", "2", "--steps", "8") == 0
    assert "guidance 2.5" in capsys.readouterr().out
    # A folder exported before the name was recorded: the run's train_config.json has it.
    old = tmp_path / "old" / "final"
    ckpt.save(_tiny(), old, metadata={"mode": "diffusion"})
    (old.parent / "train_config.json").write_text(json.dumps({"model": "epg-l-32"}))
    assert load_network(old)[1]["config"] == "epg-l-32"
    assert load_network(tiny_ckpt)[1]["config"] is None  # nothing known: guidance 1


def test_other_weights_behind_the_same_path_do_not_resume(tmp_path, capsys):
    folder = tmp_path / "final"
    ckpt.save(_tiny(seed=0), folder, metadata={"mode": "diffusion"})
    out = tmp_path / "s"
    assert _sample_cli(folder, out, "--num-images", "2") == 0
    image_path(out, 1).unlink()
    ckpt.save(_tiny(seed=1), folder, metadata={"mode": "diffusion"})  # re-exported
    assert _sample_cli(folder, out, "--num-images", "2") == 2
    assert "weights: 'sha256:" in capsys.readouterr().err
    assert not image_path(out, 1).exists()
    # settings.json written before the digest was recorded: nothing to compare, it resumes.
    settings = json.loads((out / "settings.json").read_text())
    del settings["weights"]
    (out / "settings.json").write_text(json.dumps(settings))
    assert _sample_cli(folder, out, "--num-images", "2") == 0


def test_non_finite_guidance_and_images_are_refused(tmp_path, capsys):
    folder = tmp_path / "final"
    ckpt.save(_tiny(), folder, metadata={"mode": "diffusion"})
    assert _sample_cli(folder, tmp_path / "a", "--guidance", "inf") == 2
    assert "guidance must be finite" in capsys.readouterr().err
    broken = _tiny()
    with torch.no_grad():
        broken.patch_embed.proj.weight.fill_(float("nan"))
    ckpt.save(broken, tmp_path / "nan", metadata={"mode": "diffusion"})
    # to_uint8 turned NaN into 0: the run used to finish with black images.
    assert _sample_cli(tmp_path / "nan", tmp_path / "b", "--num-images", "2") == 2
    assert "non-finite values for images 0..1" in capsys.readouterr().err
    assert not image_path(tmp_path / "b", 0).exists()


@pytest.mark.parametrize("content", [b"[]", b"\xff\xfe"])
def test_a_damaged_settings_file_is_named(tiny_ckpt, tmp_path, capsys, content):
    out = tmp_path / "s"
    out.mkdir()
    (out / "settings.json").write_bytes(content)
    assert _sample_cli(tiny_ckpt, out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'settings.json'} is corrupt" in err and "--overwrite" in err


def test_the_same_weights_from_another_path_resume(tiny_ckpt, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, copy)
    out = tmp_path / "s"
    assert _sample_cli(copy, out, "--num-images", "2") == 0
    image_path(out, 1).unlink()
    capsys.readouterr()
    assert _sample_cli(tiny_ckpt, out, "--num-images", "2") == 0  # the sha256 is the same
    printed = capsys.readouterr().out
    assert f"{out} was sampled from the same weights (sha256:" in printed
    assert f"at {copy.resolve()}; they are read from {tiny_ckpt.resolve()} now" in printed
    assert json.loads((out / "summary.json").read_text())["sampled_now_by_this_rank"] == 1
    other = tmp_path / "other"
    ckpt.save(_tiny(seed=1), other, metadata={"mode": "diffusion", "convention": "simple"})
    assert _sample_cli(other, out, "--num-images", "2") == 2  # other weights: other images
    err = capsys.readouterr().err
    assert "model: " in err and "weights: 'sha256:" in err


def test_guidance_that_no_sigma_of_the_grid_reaches_is_refused(tmp_path, capsys):
    # The one-step consistency sampler evaluates at σ_max = 80, outside (0.19, 1.61]: the
    # banner used to announce "guidance 2" for a run that made one pass per image.
    folder = tmp_path / "cm"
    ckpt.save(_tiny(), folder, metadata={"mode": "consistency", "convention": "simple"})
    out = tmp_path / "s"
    assert _sample_cli(folder, out, "--steps", "1", "--guidance", "2") == 2
    printed = capsys.readouterr()
    assert ("guidance 2 would change nothing: consistency with 1 step evaluates the network at σ 80 "
            "(unshifted), none inside the guidance interval (0.19, 1.61]; guide at every σ "
            "(--no-interval)") in printed.err and printed.out == ""  # fmt: skip
    assert not out.exists()
    assert _sample_cli(folder, out, "--steps", "1", "--guidance", "2", "--no-interval") == 0
    assert json.loads((out / "summary.json").read_text())["passes_per_image"] == 2
    with pytest.raises(SystemExit) as exc:  # the interval was dropped without a word
        _sample_cli(folder, out, "--no-interval", "--interval", "0.1", "2")
    assert exc.value.code == 2
    assert "--interval: not allowed with argument --no-interval" in capsys.readouterr().err


@pytest.mark.parametrize("sampler, interval, guided", [
    # At 32 px, 3 points: the grid is σ 80, 2.515, 0.002 (unshifted).
    ("heun", (0.19, 1.61), False),
    ("heun", (2.5, 2.6), True),
    ("heun", (0.001, 0.003), True),  # Heun's correction evaluates the last point
    ("euler", (0.001, 0.003), False),  # Euler does not
    ("edm_sde", (0.001, 0.003), False),  # its last step is Euler, as released
    ("edm_sde", (100, 120), True),  # churn: 80·(1 + γ) with γ = √2 − 1, i.e. 113.1
    ("heun", (100, 120), False),
])  # fmt: skip
def test_the_guidance_check_follows_the_sigmas_each_sampler_evaluates(sampler, interval, guided):
    net = _tiny()
    settings = SampleSettings(num_images=2, sampler=sampler, steps=3, guidance=2.0, guidance_interval=interval)
    if guided:
        generate.check_sampling(net, settings)
        denoiser = sampling.GuidedDenoiser(make_denoiser(net, "diffusion"), 2.0, net.null_class,
                                           *interval, img_size=32)  # fmt: skip
        sampling.SAMPLERS[sampler](denoiser, torch.randn(1, 3, 32, 32) * 40,
                                   sampling.sampling_sigmas(3, 32), torch.zeros(1, dtype=torch.int64))
        assert denoiser.nfe_uncond > 0  # and guidance did act
    else:
        with pytest.raises(ValueError, match=r"would change nothing: .* none inside the guidance interval"):
            generate.check_sampling(net, settings)


def test_hand_edited_checkpoint_metadata_is_named(tmp_path, capsys):
    folder = tmp_path / "m"
    ckpt.save(_tiny(), folder, metadata={"mode": "diffusion"})
    config = json.loads((folder / "config.json").read_text())
    config["metadata"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert _sample_cli(folder, tmp_path / "s") == 2
    assert (f'{folder / "config.json"} is not a valid epg config: "metadata" must be a JSON object '
            "or absent, got null") in capsys.readouterr().err  # fmt: skip
    # No metadata on a gray network: the default convention cannot invert it; the flag is named.
    gray = tmp_path / "gray"
    ckpt.save(_tiny(in_channels=1), gray)
    assert _sample_cli(gray, tmp_path / "g") == 2
    assert ("records no convention, and the default, imagenet, needs 3 channels; this network has "
            "1: pass --convention simple") in capsys.readouterr().err  # fmt: skip
    assert _sample_cli(gray, tmp_path / "g", "--convention", "simple", "--num-images", "1") == 0


def test_a_settings_file_missing_a_key_is_another_run(tmp_path):
    # A settings.json that lacks a setting this run has (say a hand-edited or older file without
    # "clamp") must not be taken as this run's.
    settings = SampleSettings(num_images=4, steps=2)
    saved = settings.to_dict()
    del saved["clamp"]
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / generate.SETTINGS_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings.*clamp: None there, True now"):
        check_resume(tmp_path, settings, overwrite=False)
    (tmp_path / generate.SETTINGS_NAME).write_text(json.dumps(settings.to_dict()))
    assert check_resume(tmp_path, settings, overwrite=False) is None


def test_released_guidance_scales_per_config():
    # Spec §8: 2.5 for EPG-XL/16 at 256 px, 3.2 for EPG-L/32 at 512 px.
    assert generate.GUIDANCE_SCALES == {"epg-xl-16": 2.5, "epg-l-32": 3.2}


def test_a_consistency_network_of_a_guided_config_samples_without_guidance(tmp_path, capsys):
    # The released scale is the diffusion model's; a consistency network of the same config
    # samples with guidance 1.
    folder = tmp_path / "run" / "final"
    ckpt.save(_tiny(), folder, metadata={"mode": "consistency", "model": "epg-xl-16", "convention": "simple"})
    out = tmp_path / "s"
    assert main(["sample", str(folder), "--out", str(out), "--num-images", "2", "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((out / "settings.json").read_text())["guidance"] == 1.0


def test_random_labels_are_pinned_to_the_seed():
    # A regression pin, on purpose: a sampling run resumed by a later version recomputes every
    # image's label from `seed` for the .npz, so the label stream of a given seed must not move
    # between versions (images sampled before the resume would be filed under other classes).
    # Values from the current code.
    from epg.sampling import class_labels

    assert class_labels(12, 10, balanced=False, seed=5).tolist() == [1, 4, 7, 5, 6, 0, 2, 3, 8, 4, 9, 0]
    assert class_labels(12, 4, balanced=False, seed=5, class_counts=[1, 1, 1, 1]).tolist() == [
        2, 1, 1, 1, 1, 3, 2, 2, 3, 1, 1, 1]


def test_negative_class_counts_are_a_value_error():
    # Without the check torch.multinomial would fail with a RuntimeError (or, for some inputs,
    # draw from a meaningless distribution); the documented refusal is a ValueError naming the
    # requirement, which the CLI reports as a usage error.
    from epg.sampling import class_labels

    with pytest.raises(ValueError, match="non-negative"):
        class_labels(10, 3, balanced=False, class_counts=[2.0, -1.0, 2.0])


def test_an_old_settings_file_with_a_relative_model_path_and_no_digest_resumes(tmp_path, monkeypatch):
    # settings.json of earlier versions recorded the path as given ("final") and no weights
    # digest; rerun from the same folder, that is this run. (With a recorded digest the same-
    # weights fallback hides the mutant, so the file here has none, as those versions wrote.)
    (tmp_path / "final").mkdir()
    monkeypatch.chdir(tmp_path)
    settings = SampleSettings(num_images=4, steps=2, model=str((tmp_path / "final").resolve()),
                              weights="sha256:" + "0" * 64)  # fmt: skip
    saved = settings.to_dict()
    saved["model"] = "final"
    del saved["weights"]
    out = tmp_path / "s"
    out.mkdir()
    (out / generate.SETTINGS_NAME).write_text(json.dumps(saved))
    assert check_resume(out, settings, overwrite=False) is None
    saved["model"] = "elsewhere"  # another path still is another run
    (out / generate.SETTINGS_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings.*model"):
        check_resume(out, settings, overwrite=False)
