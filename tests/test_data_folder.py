"""Image folders: the index, `prepare`, the portable (Pillow) loader and the DALI loader."""

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from epg.data.augment import from_unit
from epg.data.embedded import sample_jpeg_paths
from epg.data.folder import BadImageError, BatchSchedule, FolderIndex, ImageSizeError, decode_image
from epg.data.loader import InMemoryLoader
from epg.data.portable import PortableLoader
from epg.data.prepare import center_crop_arr, prepare

RES = 12


def _write(path, array, **save):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **save)


@pytest.fixture(scope="module")
def png_tree(tmp_path_factory):
    """3 classes × 5 random RGB PNGs of RES², as `epg prepare` writes them."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for c in ("n03", "n01", "n02"):
        for k in range(5):
            image = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
            _write(str(root / c / f"{c}_{k}.png"), image)
    return root


def _decoded(folder):
    """(N, 3, RES, RES) uint8 of every file in index order, and labels."""
    images = np.stack([decode_image(folder.path(i), RES) for i in range(len(folder))])
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(folder.labels)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _equal(batches_a, batches_b):
    return all(
        torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        for a, b in zip(batches_a, batches_b, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------------


def test_scan_sorts_classes_and_files_and_ignores_others(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for rel in ("n2/b.png", "n2/a.JPEG", "n10/z.jpg", "n1/c.png", "n1/.hidden.png"):
        _write(str(tmp_path / rel), img)
    (tmp_path / "n1" / "notes.txt").write_text("not an image")
    (tmp_path / "skipped.txt").write_text("")  # loose files in the root are not classes
    (tmp_path / ".cache").mkdir()

    index = FolderIndex.scan(tmp_path)
    assert index.classes == ("n1", "n10", "n2")  # code-point order, not numeric
    files = [index.relpath(i) for i in range(len(index))]
    assert files == ["n1/c.png", "n10/z.jpg", "n2/a.JPEG", "n2/b.png"]
    assert index.labels.tolist() == [0, 1, 2, 2]
    assert index.path(2) == os.path.join(tmp_path, "n2/a.JPEG")

    # The same files as a list: classes from the parent folders; explicit labels win.
    same = FolderIndex.from_files(index.paths())
    assert same.classes == index.classes and same.labels.tolist() == index.labels.tolist()
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nn2/b.png 7\n\nn1/c.png 3\n")
    labelled = FolderIndex.from_file_list(listing)
    assert labelled.labels.tolist() == [7, 3] and labelled.num_classes == 8
    assert labelled.path(0) == os.path.join(tmp_path, "n2/b.png")
    listing.write_text("n2/b.png\nn1/c.png\n")
    assert FolderIndex.from_file_list(listing).labels.tolist() == [1, 0]
    listing.write_text("n2/b.png 1\nn1/c.png\n")
    with pytest.raises(ValueError, match="some lines carry a label"):
        FolderIndex.from_file_list(listing)
    listing.write_text("n2/b.png\n\nc.png\n")  # the error named the path, not the line
    with pytest.raises(ValueError, match=r"list.txt:3: 'c.png' has no parent folder to take the class from; give"):
        FolderIndex.from_file_list(listing)
    # A binary file given as the list (a checkpoint, an image): its bytes were read as paths.
    listing.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl\n")
    with pytest.raises(ValueError, match=r"list.txt is not a file list \(a text file of image paths\): it holds NUL"):
        FolderIndex.from_file_list(listing)


def test_scan_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderIndex.scan(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        FolderIndex.scan(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        FolderIndex.scan(empty)
    _write(str(empty / "loose.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="1 images lie directly in it"):
        FolderIndex.scan(empty)
    (empty / "n1").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderIndex.scan(empty)
    _write(str(empty / "n2" / "a.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="hold no images: n1"):
        FolderIndex.scan(empty)
    assert FolderIndex.scan(empty, allow_empty_classes=True).labels.tolist() == [1]


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def test_center_crop_arr_matches_hand_computed_steps():
    china = Image.open(sample_jpeg_paths()[0]).convert("RGB")
    assert china.size == (640, 427)
    # 64 px: 427 ≥ 128 → 320×213 (BOX); 213 ≥ 128 → 160×106; 106 < 128 → bicubic to
    # (round(160·64/106), 64) = (97, 64); crop left (97 − 64)//2 = 16, top 0.
    step = china.resize((320, 213), Image.BOX).resize((160, 106), Image.BOX)
    expected = np.asarray(step.resize((97, 64), Image.BICUBIC))[:, 16:80]
    out = center_crop_arr(china, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    # No halving, upscale, rounding down: 75×100 (w×h) → (64, round(85.33) = 85), top (85−64)//2.
    small = china.crop((0, 0, 75, 100))
    expected = np.asarray(small.resize((64, 85), Image.BICUBIC))[10:74]
    np.testing.assert_array_equal(center_crop_arr(small, 64), expected)


def test_prepare_skips_bad_files_lists_them_and_resumes(tmp_path, caplog):
    src, dst = tmp_path / "raw", tmp_path / "out"
    china, flower = sample_jpeg_paths()
    copies = {"n01/china.JPEG": china, "n01/flower.JPEG": flower, "n02/x.jpg": flower}
    for rel, path in copies.items():
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        shutil.copy(path, src / rel)
    (src / "n02" / "broken.JPEG").write_bytes(open(china, "rb").read()[:2000])  # truncated
    (src / "n02" / "junk.png").write_bytes(b"not an image at all")

    with caplog.at_level(logging.WARNING, logger="epg.data"):
        report = prepare(src, dst, 32, workers=2, progress=False)
    assert (report.total, report.written, report.existing) == (5, 3, 0)
    assert [rel for rel, _ in report.failed] == ["n02/broken.JPEG", "n02/junk.png"]
    assert "n02/junk.png" in caplog.text and "n02/broken.JPEG" in caplog.text
    listed = (dst / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["n02/broken.JPEG", "n02/junk.png"]

    out = dst / "n01" / "china.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        expected = center_crop_arr(Image.open(china).convert("RGB"), 32)
        np.testing.assert_array_equal(np.asarray(image), expected)
    assert out.stat().st_size > 32 * 32 * 3  # compress_level 0: stored, not deflated
    # The labels match the source's sorted classes, in a scan as in the index list.
    assert sorted(p.name for p in dst.iterdir() if p.is_dir()) == ["n01", "n02"]
    prepared = FolderIndex.scan(dst)
    assert prepared.classes == ("n01", "n02") and prepared.labels.tolist() == [0, 0, 1]
    assert FolderIndex.from_file_list(dst / "index.txt").labels.tolist() == [0, 0, 1]

    again = prepare(src, dst, 32, workers=0, progress=False)
    assert (again.written, again.existing, len(again.failed)) == (0, 3, 2)
    out.write_bytes(out.read_bytes()[:500])  # a damaged output is redone
    assert prepare(src, dst, 32, workers=0, progress=False).written == 1
    with Image.open(out) as image:
        assert image.size == (32, 32)

    with pytest.raises(ValueError, match="must not contain each other"):
        prepare(src, src / "inside", 32, workers=0, progress=False)


def test_prepare_default_workers_follow_the_cpus_it_may_use(tmp_path, monkeypatch):
    # A batch job or container pinned to one CPU of a 64-CPU node: os.cpu_count() says 64, and
    # prepare started 64 processes on that one CPU. It now runs in this process.
    prepare_module = sys.modules["epg.data.prepare"]  # the package exports the function too
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity masks on this platform")
    _write(str(tmp_path / "raw" / "n0" / "a.png"), np.zeros((20, 20, 3), np.uint8))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})

    def no_pool(*args, **kwargs):
        raise AssertionError("prepare started worker processes on one usable CPU")

    monkeypatch.setattr(prepare_module.multiprocessing, "get_context", no_pool)
    report = prepare(tmp_path / "raw", tmp_path / "out", 8, progress=False)
    assert report.written == 1


# ---------------------------------------------------------------------------------------------
# Portable loader
# ---------------------------------------------------------------------------------------------


def test_portable_batches_follow_the_schedule(png_tree):
    folder = FolderIndex.scan(png_tree)
    images, labels = _decoded(folder)
    loader = PortableLoader(folder, RES, 4, seed=3, convention=None, num_workers=0)
    assert (loader.num_samples, loader.batches_per_epoch, loader.num_classes) == (15, 3, 3)
    schedule = BatchSchedule(15, 4, seed=3)
    seen = []
    for step in range(7):  # over two epoch boundaries
        batch = next(loader)
        rows, flips = schedule.rows(*divmod(step, 3))
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, RES, RES)
        # Channels-last in memory, as decoded: normalize_images reads it without a copy.
        assert batch["image"].permute(0, 2, 3, 1).is_contiguous()
        expected = images[rows].clone()
        expected[flips] = expected[flips].flip(-1)
        assert torch.equal(batch["image"], expected)
        assert torch.equal(batch["label"], labels[rows])
        seen.append(rows)
    assert len(set(np.concatenate(seen[:3]).tolist())) == 12  # an epoch repeats no file
    assert loader.state_dict() == {"epoch": 2, "index": 1, "seed": 3, "global_batch_size": 4,
                                   "num_samples": 15, "skipped": 0}  # fmt: skip

    # Without flips, the order is InMemoryLoader's over the same samples.
    plain = PortableLoader(folder, RES, 4, seed=3, convention=None, flip_p=0.0, num_workers=0)
    memory = InMemoryLoader({"image": images, "label": labels}, 4, seed=3)
    assert _equal(_take(plain, 5), _take(memory, 5))

    # Normalisation conventions, on the first batch.
    u8 = next(PortableLoader(folder, RES, 4, seed=3, convention=None, num_workers=0))["image"]
    x01 = u8.float() / 255
    for convention in ("imagenet", "simple"):
        loader = PortableLoader(folder, RES, 4, seed=3, convention=convention, num_workers=0)
        x = next(loader)["image"]
        assert x.dtype == torch.float32 and torch.equal(x, from_unit(x01, convention))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(from_unit(x01, "imagenet"), (x01 - mean) / (2 * std), atol=1e-6)
    assert torch.allclose(from_unit(x01, "simple"), 2 * x01 - 1, atol=1e-6)


def test_portable_two_ranks_make_the_global_batch_and_resume_exactly(png_tree):
    one = _take(PortableLoader(png_tree, RES, 6, seed=1, num_workers=0), 5)
    ranks = [PortableLoader(png_tree, RES, 6, rank=r, world_size=2, seed=1, num_workers=w)
             for r, w in ((0, 2), (1, 0))]  # fmt: skip
    for step in range(5):
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["image"] for p in parts]), one[step]["image"])
        assert torch.equal(torch.cat([p["label"] for p in parts]), one[step]["label"])

    # Resume mid-epoch: the state after 3 batches continues with batches 3, 4.
    first = PortableLoader(png_tree, RES, 6, seed=1, num_workers=2)
    _take(first, 3)
    state = first.state_dict()
    resumed = PortableLoader(png_tree, RES, 6, seed=1, num_workers=0)
    resumed.load_state_dict(state)
    assert _equal(_take(resumed, 2), one[3:5])
    first.load_state_dict({**state, "index": 0})  # rewinding a running loader works too
    assert _equal(_take(first, 2), one[2:4])
    with pytest.raises(ValueError, match="global_batch_size 6, this run 3"):
        PortableLoader(png_tree, RES, 3, num_workers=0).load_state_dict(state)


@pytest.mark.parametrize("ending", ["normal", "uncaught-error"])
def test_a_script_that_never_closes_its_worker_loader_still_exits(png_tree, ending):
    # At exit multiprocessing SIGTERMs its daemon workers and joins them; ours ignore SIGTERM
    # (a job's SIGTERM is the trainer's to answer), so without the exit handler it waited forever.
    script = (f"from epg.data.portable import PortableLoader\n"
              f"loader = PortableLoader({str(png_tree)!r}, {RES}, 4, num_workers=2)\n"
              f"next(loader)\n") + ("raise RuntimeError('boom')\n" if ending == "uncaught-error" else "")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == (0 if ending == "normal" else 1), done.stderr
    assert ("RuntimeError: boom" in done.stderr) == (ending == "uncaught-error")


def test_flips_are_seeded(png_tree):
    def flips(seed):
        schedule = BatchSchedule(15, 5, seed=seed)
        return np.concatenate([schedule.rows(e, i)[1] for e in range(20) for i in range(3)])

    assert np.array_equal(flips(0), flips(0)) and not np.array_equal(flips(0), flips(1))
    assert abs(flips(0).mean() - 0.5) < 0.1  # 300 draws, p = 0.5 (σ ≈ 0.03)
    always = next(PortableLoader(png_tree, RES, 3, flip_p=1.0, convention=None, num_workers=0))
    never = next(PortableLoader(png_tree, RES, 3, flip_p=0.0, convention=None, num_workers=0))
    assert torch.equal(always["image"], never["image"].flip(-1))


@pytest.fixture()
def bad_tree(tmp_path, png_tree):
    """The PNG tree with n02_1.png truncated and n03_4.png not an image at all."""
    root = tmp_path / "bad"
    shutil.copytree(png_tree, root)
    victim = root / "n02" / "n02_1.png"
    victim.write_bytes(victim.read_bytes()[:200])
    (root / "n03" / "n03_4.png").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_portable_bad_file_raises_naming_it(bad_tree, workers):
    loader = PortableLoader(bad_tree, RES, 15, num_workers=workers)  # one batch holds every file
    with pytest.raises(BadImageError, match="n02_1.png|n03_4.png"):
        next(loader)


def test_portable_skip_mode_substitutes_and_counts(bad_tree, caplog):
    folder = FolderIndex.scan(bad_tree)
    bad = {folder.relpath(i): i for i in range(15)}
    bad = {bad["n02/n02_1.png"], bad["n03/n03_4.png"]}
    options = dict(convention=None, flip_p=0.0, on_error="skip", num_workers=0)
    loader = PortableLoader(folder, RES, 15, **options)
    with caplog.at_level(logging.WARNING, logger="epg.data"):
        batches = _take(loader, 2)
    # The slot of a bad file holds the next good file in index order (n03_4 wraps to n01_0).
    substitute = {i: (i + 1) % 15 for i in bad}
    rows = BatchSchedule(15, 15).rows(0, 0)[0]
    used = np.array([substitute.get(int(i), int(i)) for i in rows])
    assert torch.equal(batches[0]["label"], torch.from_numpy(folder.labels[used]))
    assert loader.skipped == 4 and loader.state_dict()["skipped"] == 4  # 2 files × 2 epochs
    warnings = [r.getMessage() for r in caplog.records]
    assert [sum(name in w for w in warnings) for name in ("n02_1.png", "n03_4.png")] == [1, 1]
    assert loader.bad_files == {folder.path(i) for i in bad}


# ---------------------------------------------------------------------------------------------
# DALI (CPU mode here; the "mixed" GPU decoder under the cuda marker)
# ---------------------------------------------------------------------------------------------


def test_dali_missing_names_the_install_command(monkeypatch, png_tree):
    from epg.data.dali import DaliLoader

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'epg\[dali\]'"):
        DaliLoader(png_tree, RES, 4)


def _dali_loader():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    from epg.data.dali import DaliLoader

    return DaliLoader


def test_dali_cpu_gives_the_portable_images_and_resumes(png_tree):
    DaliLoader = _dali_loader()
    for convention, rank, world in ((None, 0, 1), ("imagenet", 1, 2)):
        options = dict(rank=rank, world_size=world, seed=5, convention=convention)
        portable = _take(PortableLoader(png_tree, RES, 4, num_workers=0, **options), 8)
        with DaliLoader(png_tree, RES, 4, num_threads=1, **options) as loader:
            assert loader.decoder == "cpu"
            batches = _take(loader, 5)
            assert _equal(batches, portable[:5])
            if convention is None:  # channels-last in memory, as the portable loader's
                assert all(b["image"].permute(0, 2, 3, 1).is_contiguous() for b in batches)
            state = loader.state_dict()
        with DaliLoader(png_tree, RES, 4, num_threads=1, **options) as resumed:
            resumed.load_state_dict(state)
            assert _equal(_take(resumed, 3), portable[5:8])


def test_dali_bad_files_raise_or_are_skipped_like_the_portable_loader(bad_tree):
    DaliLoader = _dali_loader()
    with DaliLoader(bad_tree, RES, 15, num_threads=1) as loader:
        with pytest.raises(BadImageError, match="n02_1.png|n03_4.png"):
            next(loader)
    options = dict(convention=None, on_error="skip")
    portable = PortableLoader(bad_tree, RES, 5, num_workers=0, **options)
    expected = _take(portable, 6)
    with DaliLoader(bad_tree, RES, 5, num_threads=1, **options) as loader:
        assert _equal(_take(loader, 6), expected)
        assert loader.skipped == portable.skipped == 4
        assert loader.bad_files == portable.bad_files


# ---------------------------------------------------------------------------------------------
# Images of another size than the resolution: a configuration error, raised at once
# ---------------------------------------------------------------------------------------------


def _sized_tree(root, side, fmt):
    """2 classes × 4 RGB images of side² (PNG or JPEG): a folder prepared at another size."""
    rng = np.random.default_rng(1)
    for c in ("n00", "n01"):
        for k in range(4):
            _write(str(root / c / f"{k}.{fmt}"), rng.integers(0, 256, (side, side, 3), np.uint8))
    return root


def _open(kind, root, **options):
    if kind == "dali":
        return _dali_loader()(root, RES, 4, num_threads=1, **options)
    return PortableLoader(root, RES, 4, num_workers=2 if kind == "portable-workers" else 0,
                          **options)  # fmt: skip


@pytest.mark.parametrize("kind", ["portable", "portable-workers", "dali"])
@pytest.mark.parametrize("side,fmt", [(2 * RES, "png"), (RES - 4, "png"), (2 * RES, "jpg")])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_loaders_refuse_images_of_another_size_at_once(tmp_path, kind, side, fmt, on_error):
    # Larger images were centre-cropped without a resize (a 2·RES folder trained on the centre
    # quarter of every image, silently); smaller ones were "bad files" that on_error="skip"
    # tried one after another until none was left. Both are a folder prepared for another
    # resolution: the error names the file, both sizes and the fix, whatever on_error says.
    root = _sized_tree(tmp_path / "tree", side, fmt)
    with _open(kind, root, on_error=on_error, convention=None) as loader:
        message = rf"n0[01]/\d\.{fmt} is {side}×{side} pixels.* exactly {RES}×{RES}"
        with pytest.raises(ImageSizeError, match=message) as info:
            next(loader)
        assert f"epg prepare SRC DST --resolution {RES}" in str(info.value)
        assert loader.bad_files == set() and loader.skipped == 0  # none taken for a bad file

    if on_error == "raise":
        return
    # One wrong-size file among good ones and a bad one: the bad one is skipped, never it.
    mixed = _sized_tree(tmp_path / "mixed", RES, fmt)
    (mixed / "n00" / f"0.{fmt}").write_bytes(b"not an image")
    _write(str(mixed / "n01" / f"9.{fmt}"), np.zeros((side, side, 3), np.uint8))
    with _open(kind, mixed, on_error="skip", convention=None) as loader:
        with pytest.raises(ImageSizeError, match=rf"n01/9\.{fmt} is {side}×{side}"):
            for _ in range(6):  # 9 files, batches of 4: each file is met within 3 epochs
                next(loader)
        assert loader.bad_files <= {str(mixed / "n00" / f"0.{fmt}")}


@pytest.mark.cuda
def test_dali_mixed_decoder_matches_portable_on_gpu(png_tree, tmp_path):
    DaliLoader = _dali_loader()
    expected = _take(PortableLoader(png_tree, RES, 4, device="cuda", num_workers=2), 4)
    assert expected[0]["image"].is_cuda and expected[0]["label"].is_cuda
    with DaliLoader(png_tree, RES, 4, device="cuda") as loader:
        assert loader.decoder == "mixed"
        assert _equal(_take(loader, 4), expected)  # PNG is lossless: exact
    # JPEG: nvJPEG and libjpeg-turbo may round differently; the images must still agree closely.
    jpegs = tmp_path / "jpegs"
    for k, path in enumerate(sample_jpeg_paths() * 2):
        array = center_crop_arr(Image.open(path).convert("RGB"), 64)
        _write(str(jpegs / f"n{k % 2}" / f"{k}.jpg"), array, quality=95)
    options = dict(convention=None, device="cuda")
    portable = next(PortableLoader(jpegs, 64, 4, num_workers=0, **options))["image"]
    with DaliLoader(jpegs, 64, 4, **options) as loader:
        gpu = next(loader)["image"]
    diff = (gpu.int() - portable.int()).abs()
    assert diff.float().mean() < 1.0 and diff.max() <= 16


# ---------------------------------------------------------------------------------------------
# prepare: formats and the index list
# ---------------------------------------------------------------------------------------------


def _raw_tree(root):
    """The two sample JPEGs under n01/, the flower also under n00/ (three 427×640 images)."""
    china, flower = sample_jpeg_paths()
    for rel, path in (("n01/china.JPEG", china), ("n01/flower.JPEG", flower),
                      ("n00/flower.jpg", flower)):  # fmt: skip
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        shutil.copy(path, root / rel)
    return root


@pytest.mark.parametrize("fmt,ext", [("png", ".png"), ("jpeg", ".jpg")])
def test_prepare_formats_write_an_index_list_and_resume(tmp_path, fmt, ext):
    src, dst = _raw_tree(tmp_path / "raw"), tmp_path / "out"
    report = prepare(src, dst, 64, format=fmt, quality=90, workers=0, progress=False)
    assert (report.written, report.index_list) == (3, dst / "index.txt")
    out = dst / "n01" / f"china{ext}"
    expected = center_crop_arr(Image.open(sample_jpeg_paths()[0]).convert("RGB"), 64)
    with Image.open(out) as image:
        assert image.format == fmt.upper() and image.size == (64, 64) and image.mode == "RGB"
        diff = np.abs(np.asarray(image).astype(int) - expected.astype(int))
    if fmt == "png":
        assert diff.max() == 0 and out.stat().st_size > 64 * 64 * 3
    else:  # lossy, and several times smaller than the stored PNG
        assert 0 < diff.mean() < 8 and out.stat().st_size < 64 * 64 * 3 / 4

    # The index list: "<class>/<file> <label>" in scan order, read back by from_file_list.
    lines = (dst / "index.txt").read_text().splitlines()
    assert lines[0].startswith(f"# epg prepare: format={fmt}")
    assert [line for line in lines if not line.startswith("#")] == [
        f"n00/flower{ext} 0", f"n01/china{ext} 1", f"n01/flower{ext} 1"
    ]
    listed, scanned = FolderIndex.from_file_list(dst / "index.txt"), FolderIndex.scan(dst)
    assert listed.paths() == scanned.paths() and listed.labels.tolist() == [0, 1, 1]
    loader = PortableLoader(dst / "index.txt", 64, 3, convention=None, flip_p=0.0, num_workers=0)
    assert torch.equal(next(loader)["label"].sort().values, torch.tensor([0, 1, 1]))

    # Resume: valid outputs are kept, a damaged one is redone; other settings are refused.
    assert prepare(src, dst, 64, format=fmt, quality=90, workers=0, progress=False).existing == 3
    out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    again = prepare(src, dst, 64, format=fmt, quality=90, workers=0, progress=False)
    assert (again.written, again.existing) == (1, 2)
    other = "png" if fmt == "jpeg" else "jpeg"
    with pytest.raises(ValueError, match="prepared with other settings"):
        prepare(src, dst, 64, format=other, workers=0, progress=False)
    if fmt == "jpeg":
        with pytest.raises(ValueError, match="prepared with other settings"):
            prepare(src, dst, 64, format=fmt, quality=80, workers=0, progress=False)
    else:  # the quality does not apply to PNG
        assert prepare(src, dst, 64, quality=80, workers=0, progress=False).existing == 3
    with pytest.raises(ValueError, match="format must be one of"):
        prepare(src, tmp_path / "o", 64, format="webp", progress=False)
    with pytest.raises(ValueError, match="quality must be in 1..95"):
        prepare(src, tmp_path / "o", 64, format="jpeg", quality=100, progress=False)


def test_a_rerun_after_a_lost_class_removes_the_outputs_whose_source_is_gone(tmp_path):
    # The failed run's index.txt keeps listing its outputs, so the rerun knows which are its own.
    src, dst = _raw_tree(tmp_path / "raw"), tmp_path / "out"
    (src / "n02").mkdir()
    (src / "n02" / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"no image of the class folder\(s\) n02 could be"):
        prepare(src, dst, 32, workers=0, progress=False)
    assert (dst / "n01" / "china.png").is_file()
    shutil.rmtree(src / "n02")
    (src / "n01" / "china.JPEG").unlink()
    report = prepare(src, dst, 32, workers=0, progress=False)
    assert (report.existing, report.removed) == (2, 1)
    assert not (dst / "n01" / "china.png").exists()
    assert FolderIndex.scan(dst).paths() == FolderIndex.from_file_list(dst / "index.txt").paths()


def test_prepare_refuses_an_empty_class_and_keeps_index_and_scan_consistent(tmp_path):
    # An empty source class folder that sorts last used to stay in the class list: a scan of
    # the output refused it by name, while index.txt gave one class fewer. It is refused first.
    src, dst = _raw_tree(tmp_path / "raw"), tmp_path / "out"
    (src / "n02").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of .*raw hold no images: n02"):
        prepare(src, dst, 32, workers=0, progress=False)
    assert not dst.exists()  # refused before anything was written

    # A class whose every image fails: the run finishes the others, then raises naming it, and
    # both the index list and a scan of the output refuse to train on it.
    (src / "n02" / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"no image of the class folder\(s\) n02 could be"):
        prepare(src, dst, 32, workers=0, progress=False)
    assert len(list(dst.glob("n0[01]/*.png"))) == 3  # the prepared images are kept
    incomplete = r"out is an incomplete `epg prepare` output: .*no image of the class folder\(s\) n02"
    with pytest.raises(ValueError, match=incomplete):
        FolderIndex.from_file_list(dst / "index.txt")
    with pytest.raises(ValueError, match=incomplete):
        FolderIndex.scan(dst)
    # Fixed in the source (the class removed), a rerun keeps the images and the two agree.
    (src / "n02" / "junk.png").unlink()
    (src / "n02").rmdir()
    assert prepare(src, dst, 32, workers=0, progress=False).existing == 3
    listed, scanned = FolderIndex.from_file_list(dst / "index.txt"), FolderIndex.scan(dst)
    assert listed.paths() == scanned.paths() and listed.labels.tolist() == [0, 1, 1]
    assert scanned.classes == ("n00", "n01") and listed.num_classes == 2

    # A FolderIndex source: an empty class, or labels a scan of the output would not give.
    gapped = FolderIndex(scanned.paths(), [0, 2, 2], ("0", "1", "2"))
    with pytest.raises(ValueError, match=r"1 class\(es\) of the index hold no images: 1\."):
        prepare(gapped, tmp_path / "o1", 32, workers=0, progress=False)
    swapped = FolderIndex.from_files(scanned.paths(), labels=[1, 0, 0])
    with pytest.raises(ValueError, match=r"flower\.png has label 1, but .* folder 'n00' 0"):
        prepare(swapped, tmp_path / "o2", 32, workers=0, progress=False)


def test_prepare_into_a_folder_it_did_not_make_touches_nothing(tmp_path):
    # Every empty non-class folder of DST used to be removed, even on a first run there; then the
    # class folders and index.txt were written among the user's files, with a warning.
    src, dst = _raw_tree(tmp_path / "raw"), tmp_path / "out"
    (dst / "keepme").mkdir(parents=True)
    (dst / "other").mkdir()
    (dst / "other" / "f.txt").write_text("data")
    with pytest.raises(ValueError, match="is not empty and is not an earlier `epg prepare` output"):
        prepare(src, dst, 32, workers=0, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["keepme", "other"]
    assert (dst / "other" / "f.txt").read_text() == "data"


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_an_epoch_disjointly_and_completely(png_tree, world_size):
    # 12 of the 15 files, global batch 6: two batches cover every file once per epoch.
    full = FolderIndex.scan(png_tree)
    folder = FolderIndex.from_files(full.paths()[:12])
    decoded = {i: decode_image(folder.path(i), RES) for i in range(12)}
    G = 6
    for epoch in range(2):
        files = []
        for rank in range(world_size):
            schedule = BatchSchedule(12, G, rank, world_size, seed=4)
            for index in range(schedule.batches_per_epoch):
                rows = schedule.rows(epoch, index)[0]
                assert len(rows) == G // world_size
                files.extend(rows.tolist())
        assert sorted(files) == list(range(12))  # disjoint (no repeats) and complete

    # The portable loader of each rank loads exactly its schedule rows over two epochs.
    seen = []
    for rank in range(world_size):
        loader = PortableLoader(folder, RES, G, rank=rank, world_size=world_size, seed=4,
                                convention=None, flip_p=0.0, num_workers=0)  # fmt: skip
        for step in range(4):
            batch = next(loader)
            rows = BatchSchedule(12, G, rank, world_size, seed=4).rows(*divmod(step, 2))[0]
            expected = np.stack([decoded[i] for i in rows.tolist()])
            assert np.array_equal(batch["image"].permute(0, 2, 3, 1).numpy(), expected)
            assert batch["label"].tolist() == folder.labels[rows].tolist()
            seen.append((step // 2, rows.tolist()))
    for epoch in range(2):
        assert sorted(i for e, rows in seen if e == epoch for i in rows) == list(range(12))


def test_schedule_drops_a_different_remainder_each_epoch():
    schedule = BatchSchedule(15, 6, seed=0)
    used = [set(np.concatenate([schedule.rows(e, i)[0] for i in range(2)]).tolist())
            for e in range(6)]  # fmt: skip
    assert all(len(u) == 12 for u in used)
    assert set().union(*used) == set(range(15))  # no file is left out for good
    with pytest.raises(ValueError, match="not divisible by 4 ranks"):
        BatchSchedule(15, 6, rank=0, world_size=4)


def test_schedule_keeps_two_epochs_and_gives_each_thread_the_epoch_it_asked_for(monkeypatch):
    # DALI's feeder thread reads ahead into the next epoch while the main thread asks for the
    # current one: both epochs are kept (one randperm each), and concurrent callers never get
    # another epoch's order.
    import threading

    fresh = {e: BatchSchedule(64, 8, seed=3).epoch_order(e)[0].copy() for e in range(3)}
    schedule = BatchSchedule(64, 8, seed=3)
    calls = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or randperm(*a, **k))
    for epoch in (0, 1, 0, 1, 1, 0):
        assert np.array_equal(schedule.epoch_order(epoch)[0], fresh[epoch])
    assert len(calls) == 2
    monkeypatch.setattr(torch, "randperm", randperm)

    wrong = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        def ask(epoch):  # three epochs in turn: the two-epoch cache keeps being replaced
            for _ in range(20_000):
                if not np.array_equal(schedule.epoch_order(epoch)[0], fresh[epoch]):
                    wrong.append(epoch)
                    return

        threads = [threading.Thread(target=ask, args=(e,)) for e in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert wrong == []


# ---------------------------------------------------------------------------------------------
# DALI CPU against Pillow on real JPEGs
# ---------------------------------------------------------------------------------------------

# Measured: DALI's CPU decoder and Pillow decode the same JPEG bytes to the same uint8 levels
# (both use libjpeg-turbo with the same IDCT and upsampling), so the tolerance is 0. The
# DaliLoader docstring states the same figure.
JPEG_TOLERANCE = 0


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """The two sample JPEGs prepared to 256² (ADM's crop) and encoded with several chroma
    subsamplings (4:2:0, 4:4:4, 4:2:2) and qualities, progressive and gray included."""
    root = tmp_path_factory.mktemp("jpegs")
    for k, path in enumerate(sample_jpeg_paths()):
        photo = Image.fromarray(center_crop_arr(Image.open(path).convert("RGB"), 256))
        os.makedirs(root / f"n{k}")
        variants = (
            dict(quality=95), dict(quality=75), dict(quality=95, subsampling=0),
            dict(quality=50, progressive=True), dict(quality=90, subsampling=1),
        )  # fmt: skip
        for j, options in enumerate(variants):
            photo.save(root / f"n{k}" / f"v{j}.jpg", **options)
        photo.convert("L").save(root / f"n{k}" / "gray.jpg", quality=85)
    return root


def test_dali_cpu_decodes_real_jpegs_like_pillow(jpeg_tree):
    DaliLoader = _dali_loader()
    n = len(FolderIndex.scan(jpeg_tree))
    options = dict(convention=None, flip_p=0.0)
    portable = next(PortableLoader(jpeg_tree, 256, n, num_workers=0, **options))
    with DaliLoader(jpeg_tree, 256, n, num_threads=2, **options) as loader:
        dali = next(loader)
    assert torch.equal(dali["label"], portable["label"])
    diff = (dali["image"].int() - portable["image"].int()).abs()
    assert int(diff.max()) <= JPEG_TOLERANCE, f"max |DALI − Pillow| = {int(diff.max())} levels"


def test_a_negative_label_in_a_list_is_named_as_a_bad_label(tmp_path):
    # A list whose labels include -1 must be refused for the label, not read as a file named
    # "b.png -1" and then blamed on "some lines carry a label and some do not" (or, with every
    # label negative, indexed as files with spaces in their names).
    listing = tmp_path / "list.txt"
    listing.write_text("c/a.png 0\nc/b.png -1\n")
    with pytest.raises(ValueError, match=r"labels must be >= 0, got -1"):
        FolderIndex.from_file_list(listing)
    listing.write_text("c/a.png -2\nc/b.png -1\n")
    with pytest.raises(ValueError, match=r"labels must be >= 0, got -2"):
        FolderIndex.from_file_list(listing)


def test_list_lines_are_stripped_at_both_ends(tmp_path):
    # An indented line names the file without the blanks (no listable name starts with one), and
    # an indented "# ..." is a comment, not a file.
    listing = tmp_path / "list.txt"
    listing.write_text("  cat/a.png\n\t# a note\n   dog/b.png\n")
    index = FolderIndex.from_file_list(listing)
    assert [index.relpath(i) for i in range(len(index))] == ["cat/a.png", "dog/b.png"]
    assert index.classes == ("cat", "dog") and index.labels.tolist() == [0, 1]


def test_the_substituted_file_count_survives_a_resume(tmp_path):
    # The count of batch slots filled by a substitute for a bad file is part of the saved data
    # position ("skipped" in state_dict); a resumed loader must continue it, not restart it from
    # 0.
    from PIL import Image

    from epg.data.portable import PortableLoader

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (12, 12), (40 * i, 80, 120)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "b" / "1.png").write_bytes(b"not an image")
    options = dict(convention=None, flip_p=0.0, on_error="skip", num_workers=0)
    first = PortableLoader(FolderIndex.scan(tmp_path), 12, 4, **options)  # one batch: every file
    next(first)
    state = first.state_dict()
    assert first.skipped == 1 and state["skipped"] == 1
    resumed = PortableLoader(FolderIndex.scan(tmp_path), 12, 4, **options)
    resumed.load_state_dict(state)
    assert resumed.skipped == 1 and resumed.state_dict()["skipped"] == 1
    next(resumed)
    assert resumed.skipped == 2


def test_an_image_of_the_right_width_but_another_height_is_a_size_error(tmp_path):
    # Both sides are checked: a non-square image (here RES wide) is not resolution² either.
    path = str(tmp_path / "n0" / "tall.png")
    _write(path, np.zeros((RES + 3, RES, 3), np.uint8))
    with pytest.raises(ImageSizeError, match=rf"is {RES}×{RES + 3} pixels"):
        decode_image(path, RES)


def test_an_index_refuses_a_label_one_past_its_classes():
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1, got 0\.\.2"):
        FolderIndex(["a/x.png", "b/y.png"], [0, 2], ("a", "b"))
    assert FolderIndex(["a/x.png", "b/y.png"], [0, 1], ("a", "b")).num_classes == 2


@pytest.mark.parametrize("name", ["n0/a\rb.png", "n0/a\nb.png", "#n0/a.png", " n0/a.png", "n0/a.png "])
def test_a_file_list_refuses_a_name_it_cannot_read_back(tmp_path, name):
    # Text mode reads \r as a line end, "#" starts a comment and the blanks at either end are
    # stripped: such a name would come back as another file, or none.
    from epg.data.folder import write_file_list

    with pytest.raises(ValueError, match="cannot be written to a file list"):
        write_file_list(tmp_path / "list.txt", ["n0/ok.png", name], [0, 0])
    assert not (tmp_path / "list.txt").exists()


def test_32_bit_gray_levels_are_clipped_to_16_bits_and_scaled():
    # Pillow's "I" mode (32-bit) is read as 16-bit gray: clipped to 0..65535, then the top byte,
    # not Pillow's convert("RGB"), which clips every level above 255 to white.
    from epg.data.folder import to_rgb

    image = Image.fromarray(np.array([[-5, 300, 32768, 70000]], np.int32))
    assert image.mode == "I"
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb == rgb[..., :1]).all()


def test_loaders_refuse_bad_settings_with_the_reason(png_tree):
    with pytest.raises(ValueError, match=r"flip_p must be in \[0, 1\], got 1.5"):
        BatchSchedule(15, 5, flip_p=1.5)
    with pytest.raises(ValueError, match=r"on_error must be one of \('raise', 'skip'\), got 'ignore'"):
        PortableLoader(png_tree, RES, 4, on_error="ignore", num_workers=0)
    with pytest.raises(ValueError, match="resolution must be positive, got 0"):
        PortableLoader(png_tree, 0, 4, num_workers=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        PortableLoader(png_tree, RES, 4, num_workers=-1)


def test_a_bad_file_met_again_by_a_fresh_reader_is_logged_once(bad_tree, caplog):
    # Each DataLoader worker (and each restart, as after load_state_dict) finds the bad files
    # anew; the loader warns about each file once per run, not once per reader.
    options = dict(convention=None, flip_p=0.0, on_error="skip", num_workers=0)
    loader = PortableLoader(bad_tree, RES, 15, **options)  # one batch holds every file
    with caplog.at_level(logging.WARNING, logger="epg.data"):
        next(loader)
        loader.load_state_dict(loader.state_dict())  # a fresh reader at the same position
        next(loader)
    warnings = [r.getMessage() for r in caplog.records]
    assert [sum(name in w for w in warnings) for name in ("n02_1.png", "n03_4.png")] == [1, 1]
    assert loader.skipped == 4
