"""Unusual and broken inputs: every kind is converted to RGB or skipped with a count and a warning,
by `prepare`, the portable loader and the DALI loader alike; layout errors say what is expected."""

import io
import logging
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from epg.data.embedded import sample_jpeg_paths
from epg.data.folder import BadImageError, FolderIndex, decode_image
from epg.data.portable import PortableLoader
from epg.data.prepare import center_crop_arr, prepare

RES = 16


def _photo(seed: int) -> np.ndarray:
    """A natural-looking RES² RGB crop of china.jpg (JPEG-friendly content; the loaders' size)."""
    china = np.asarray(Image.open(sample_jpeg_paths()[0]).convert("RGB"))
    top, left = 100 + 37 * seed, 200 + 23 * seed
    return np.ascontiguousarray(china[top : top + RES, left : left + RES])


def _png16_rgb(levels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, depth 16), which Pillow cannot write, built by hand."""
    height, width, _ = levels.shape
    rows = b"".join(b"\0" + levels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _good_kinds() -> dict[str, tuple[bytes, np.ndarray | None]]:
    """file name → (bytes, the expected full-size RGB image, None where only Pillow defines it)."""
    rgb = _photo(0)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    rng = np.random.default_rng(0)
    g16 = gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape).astype(np.uint16)
    rgb16 = rgb.astype(np.uint16) * 256 + rng.integers(0, 256, rgb.shape).astype(np.uint16)
    alpha = rng.integers(0, 256, gray.shape, dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(32)
    return {
        "gray.jpg": (_encode(Image.fromarray(gray), "JPEG", quality=90), None),
        "cmyk.jpg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90), None),
        "palette.png": (_encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "palette_alpha.png": (_encode(palette, "PNG", transparency=0), np.asarray(palette.convert("RGB"))),
        "la.png": (_encode(Image.fromarray(np.dstack([gray, alpha])), "PNG"), np.dstack([gray] * 3)),
        "rgba.png": (_encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), rgb),
        "gray16.png": (_encode(Image.fromarray(g16), "PNG"), np.dstack([g16 >> 8] * 3).astype(np.uint8)),
        "rgb16.png": (_png16_rgb(rgb16), (rgb16 >> 8).astype(np.uint8)),
    }  # fmt: skip


def _bad_kinds() -> dict[str, bytes]:
    jpeg = _encode(Image.fromarray(_photo(1)), "JPEG", quality=90)
    png = _encode(Image.fromarray(_photo(1)), "PNG")
    return {
        "truncated_jpeg.jpg": jpeg[: len(jpeg) // 2],
        "truncated_png.png": png[: len(png) // 2],
        "corrupt.png": png[:40] + bytes(len(png) - 40),  # header intact, data zeroed
        "text.png": b"not an image at all\n",
        "empty.jpg": b"",
    }


@pytest.fixture(scope="module")
def kinds_tree(tmp_path_factory):
    """n0/<good kind> and n1/<bad kind>: one file of each kind."""
    root = tmp_path_factory.mktemp("kinds")
    for cls, files in (("n0", {k: v[0] for k, v in _good_kinds().items()}), ("n1", _bad_kinds())):
        os.makedirs(root / cls)
        for name, data in files.items():
            (root / cls / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", sorted(_good_kinds()))
def test_decode_image_makes_rgb_of_every_good_kind(kinds_tree, name):
    path = str(kinds_tree / "n0" / name)
    out = decode_image(path, RES)
    assert out.dtype == np.uint8 and out.shape == (RES, RES, 3)
    expected = _good_kinds()[name][1]
    if expected is not None:
        np.testing.assert_array_equal(out, expected)
    elif name == "gray.jpg":  # gray replicated into three equal channels
        assert (out == out[..., :1]).all()
    elif name == "cmyk.jpg":  # Pillow's RGB→CMYK→RGB round trip: the photo up to JPEG error
        diff = np.abs(out.astype(int) - _photo(0).astype(int))
        assert diff.mean() < 4


@pytest.mark.parametrize("name", sorted(_bad_kinds()))
def test_decode_image_names_every_bad_kind(kinds_tree, name):
    with pytest.raises(BadImageError, match=name) as info:
        decode_image(str(kinds_tree / "n1" / name), RES)
    assert info.value.path.endswith(name)


def test_prepare_converts_good_kinds_and_skips_bad_ones(kinds_tree, tmp_path, caplog):
    src = tmp_path / "src"  # the kinds, and one good image in the class of the bad ones
    shutil.copytree(kinds_tree, src)
    Image.fromarray(_photo(2)).save(src / "n1" / "good.png")
    with caplog.at_level(logging.WARNING, logger="epg.data"):
        report = prepare(src, tmp_path / "out", RES, workers=0, progress=False)
    good, bad = sorted(_good_kinds()), sorted(_bad_kinds())
    assert (report.total, report.written) == (len(good) + len(bad) + 1, len(good) + 1)
    assert [rel for rel, _ in report.failed] == [f"n1/{name}" for name in bad]
    assert all(name in caplog.text for name in bad)
    for name in good:
        with Image.open(tmp_path / "out" / "n0" / (os.path.splitext(name)[0] + ".png")) as out:
            assert out.mode == "RGB" and out.size == (RES, RES)
            with Image.open(kinds_tree / "n0" / name) as source:
                from epg.data.folder import to_rgb

                np.testing.assert_array_equal(np.asarray(out), center_crop_arr(to_rgb(source), RES))
    # The 16-bit images are scaled, not clipped to white as Pillow's convert("RGB") would.
    with Image.open(tmp_path / "out" / "n0" / "gray16.png") as out:
        assert np.asarray(out).mean() < 200
    # The prepared tree and its index list agree.
    listed = FolderIndex.from_file_list(report.index_list)
    scanned = FolderIndex.scan(tmp_path / "out")
    assert [listed.relpath(i) for i in range(len(listed))] == [
        scanned.relpath(i) for i in range(len(scanned))
    ]
    assert scanned.classes == ("n0", "n1") and listed.labels.tolist() == [0] * len(good) + [1]


def _uint8_batches(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_portable_skip_mode_survives_every_bad_kind(kinds_tree, caplog, workers):
    folder = FolderIndex.scan(kinds_tree)
    n = len(folder)
    options = dict(convention=None, flip_p=0.0, on_error="skip", num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="epg.data"):
        loader = PortableLoader(folder, RES, n, **options)
        batch = next(loader)
        loader.close()
    bad_names = sorted(_bad_kinds())
    assert loader.skipped == len(bad_names)
    assert sorted(os.path.basename(p) for p in loader.bad_files) == bad_names
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(sum(name in w for w in warnings) == 1 for name in bad_names)  # once per file
    good = {folder.path(i) for i in range(n)} - loader.bad_files
    expected = {p: decode_image(p, RES) for p in good}
    images = batch["image"].permute(0, 2, 3, 1).numpy()
    assert all(any(np.array_equal(image, e) for e in expected.values()) for image in images)


def test_portable_raise_mode_names_the_bad_file(kinds_tree):
    loader = PortableLoader(kinds_tree, RES, 13, num_workers=0)
    with pytest.raises(BadImageError, match="|".join(sorted(_bad_kinds()))):
        next(loader)


def test_empty_or_flat_folders_say_which_layout_is_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    layout = r"expected the layout .*/<class>/<image>"
    for call in (lambda: PortableLoader(empty, RES, 1, num_workers=0),
                 lambda: prepare(empty, tmp_path / "out", RES, workers=0, progress=False)):  # fmt: skip
        with pytest.raises(ValueError, match=layout):
            call()
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(_photo(0)).save(flat / "a.png")
    with pytest.raises(ValueError, match=r"1 images lie directly in it.*" + layout):
        PortableLoader(flat, RES, 1, num_workers=0)
    (flat / "n0").mkdir()  # a class folder, but no images in any
    with pytest.raises(ValueError, match="no images .*" + layout):
        prepare(flat, tmp_path / "out2", RES, workers=0, progress=False)


def test_prepare_and_file_lists_keep_any_file_name(tmp_path):
    # A POSIX file name is bytes: one that is not valid UTF-8 (here Latin-1 "café") is prepared
    # and listed as itself, and so is one holding a character str.splitlines() breaks at. Such a
    # name made prepare fail after all the work (writing index.txt), and the list split it.
    src = tmp_path / "src"
    os.makedirs(src / "n0")
    names = ["a.png", "b\u2028c.png", os.fsdecode(b"caf\xe9.png")]
    for k, name in enumerate(names):
        try:
            Image.fromarray(_photo(k)).save(os.path.join(src, "n0", name), format="PNG")
        except (OSError, UnicodeError):
            pytest.skip(f"this file system does not take the name {name!r}")
    Image.fromarray(_photo(3)).save(src / "n0" / "bad name.png", format="PNG")
    (src / "n0" / os.fsdecode(b"broken\xff.png")).write_bytes(b"not an image")
    report = prepare(src, tmp_path / "out", RES, workers=0, progress=False)
    assert report.written == 4 and [rel for rel, _ in report.failed] == [
        os.fsdecode(b"n0/broken\xff.png")
    ]
    assert b"broken\xff.png" in (tmp_path / "out" / "skipped.txt").read_bytes()
    listed = FolderIndex.from_file_list(report.index_list)
    scanned = FolderIndex.scan(tmp_path / "out")
    assert listed.paths() == scanned.paths() and len(listed) == 4
    assert all(os.path.isfile(p) for p in listed.paths())
    batch = next(PortableLoader(report.index_list, RES, 4, num_workers=0, convention=None))
    assert batch["label"].tolist() == [0] * 4
    # A rerun reads the settings line of that index.txt back and keeps every output.
    again = prepare(src, tmp_path / "out", RES, workers=0, progress=False)
    assert (again.written, again.existing) == (0, 4)


# ---------------------------------------------------------------------------------------------
# DALI: the kinds it decodes differently go through Pillow (epg.data.dali.pillow_route)
# ---------------------------------------------------------------------------------------------


def test_dali_routes_the_kinds_it_decodes_differently_to_pillow(kinds_tree):
    from epg.data.dali import pillow_route

    routed = {name: pillow_route(data) for name, (data, _) in _good_kinds().items()}
    assert {name for name, why in routed.items() if why} == {"cmyk.jpg", "gray16.png", "rgb16.png"}
    china = open(sample_jpeg_paths()[0], "rb").read()
    assert pillow_route(china) is None  # an ordinary JPEG goes to DALI's decoder
    assert all(pillow_route(data) for data in _bad_kinds().values())


def test_dali_cpu_matches_portable_on_every_kind(kinds_tree):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    from epg.data.dali import DaliLoader

    n = len(FolderIndex.scan(kinds_tree))
    options = dict(convention=None, flip_p=0.5, seed=2, on_error="skip")
    portable = PortableLoader(kinds_tree, RES, n, num_workers=0, **options)
    expected = _uint8_batches(portable, 2)
    with DaliLoader(kinds_tree, RES, n, num_threads=1, **options) as loader:
        got = _uint8_batches(loader, 2)
        assert loader.bad_files == portable.bad_files and loader.skipped == portable.skipped
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"], b["image"])  # the JPEGs here decode identically


def test_dali_takes_a_png_with_a_wrong_checksum_as_the_portable_loader_does(tmp_path, caplog):
    # libpng (DALI) refuses a PNG whose IDAT CRC is wrong; Pillow does not check it and decodes
    # the intact pixels. DALI stopped with "Pillow decodes every file", naming none, even with
    # on_error="skip"; now the file goes through Pillow and both loaders give the same batches.
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    from epg.data.dali import DaliLoader, png_checksums_ok

    for k in range(6):
        os.makedirs(tmp_path / f"n{k % 2}", exist_ok=True)
        data = _encode(Image.fromarray(_photo(k)), "PNG", compress_level=0)
        if k == 3:
            at = data.index(b"IDAT")
            end = at + 4 + int.from_bytes(data[at - 4 : at], "big")  # the IDAT chunk's CRC
            data = data[:end] + bytes(b ^ 0xFF for b in data[end : end + 4]) + data[end + 4 :]
            assert not png_checksums_ok(data)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), _photo(k))
        (tmp_path / f"n{k % 2}" / f"{k}.png").write_bytes(data)
    options = dict(convention=None, seed=1)
    expected = _uint8_batches(PortableLoader(tmp_path, RES, 2, num_workers=0, **options), 6)
    with caplog.at_level(logging.WARNING, logger="epg.data"):
        with DaliLoader(tmp_path, RES, 2, num_threads=1, **options) as loader:
            got = _uint8_batches(loader, 6)
            assert loader.bad_files == set() and loader.skipped == 0
    assert "3.png: a PNG chunk checksum is wrong" in caplog.text
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_dali_cpu_decoder_itself_on_every_kind():
    """What pillow_route's docstring states: DALI's own CPU decoding equals Pillow's RGB except
    for 16-bit PNGs (round(v/257) against v >> 8: at most 1 level apart)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    from nvidia.dali import fn, pipeline_def, types

    from epg.data.folder import to_rgb

    kinds = _good_kinds()
    names = sorted(kinds)

    @pipeline_def(batch_size=len(names), num_threads=1, device_id=None)
    def decode():
        encoded = fn.external_source(
            source=lambda: [np.frombuffer(kinds[n][0], np.uint8) for n in names],
            batch=True, dtype=types.UINT8, ndim=1,
        )  # fmt: skip
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB,
                                 adjust_orientation=False)  # fmt: skip

    pipe = decode()
    pipe.build()
    try:
        out = [np.array(image) for image in pipe.run()[0]]
    finally:  # stop DALI's threads now, not in a later garbage collection (see DaliLoader.close)
        getattr(pipe, "_shutdown", lambda: None)()
    diffs = {}
    for k, name in enumerate(names):
        pillow = np.asarray(to_rgb(Image.open(io.BytesIO(kinds[name][0])))).astype(int)
        diffs[name] = int(np.abs(out[k].astype(int) - pillow).max())
    assert diffs == {name: 1 if name in ("gray16.png", "rgb16.png") else 0 for name in names}
