"""What ``epg evaluate`` accepts and refuses, and when: devices, 16-bit PNGs, 1-channel sample
batches, and damaged .npz files found before the network runs (a black-box review's findings).
"""

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation_adm import _images, _random_inception

from epg.data.folder import decode_image
from epg.evaluation import evaluate, precision_recall, save_reference_statistics
from epg.evaluation.adm import _device, _open_images


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-random.pth"
    torch.save(_random_inception().state_dict(), path)
    return path


@pytest.fixture
def no_gpu(monkeypatch):
    # The same answers on a machine with a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _npy(shape, dtype, data: bytes) -> bytes:
    """A .npy member: a header promising ``shape`` of ``dtype``, then ``data`` (maybe short)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    return header.getvalue() + data


def _write_npz(path, members: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, raw in members.items():
            zf.writestr(f"{key}.npy", raw)


def _array_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr))
    return buf.getvalue()


def _stats(**changes) -> dict:
    """The members of a statistics .npz (save_reference_statistics' keys), as .npy bytes."""
    arrays = {
        "mu": np.zeros(2048),
        "sigma": np.eye(2048),
        "mu_s": np.zeros(2023),
        "sigma_s": np.eye(2023),
        "pool_features": np.zeros((4, 2048), np.float32),
    }
    members = {key: _array_bytes(arr) for key, arr in arrays.items()}
    members.update(changes)
    return members


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def test_device_auto_unknown_and_cuda_without_gpu(tmp_path, monkeypatch, no_gpu):
    # epg sample's resolution: auto (and None) is CUDA when present, else the CPU.
    assert _device("auto") == _device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'bogus': use cpu, cuda, cuda:N or auto"):
        _device("bogus")
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but torch sees no CUDA GPU"):
        _device("cuda")
    feats = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    assert precision_recall(feats, feats, device="auto") == (1.0, 1.0)
    # Refused before any input is read or weights are looked for (there are none here).
    monkeypatch.delenv("EPG_INCEPTION_WEIGHTS", raising=False)
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=_images(0))
    for device in ("bogus", "cuda"):
        with pytest.raises(ValueError, match=f"device '{device}'"):
            evaluate(good, good, device=device)
        with pytest.raises(ValueError, match=f"device '{device}'"):
            save_reference_statistics(good, tmp_path / "out.npz", device=device)


# --------------------------------------------------------------------------------------------
# Image formats
# --------------------------------------------------------------------------------------------


def test_16_bit_pngs_are_read_as_epg_prepare_reads_them(tmp_path):
    # Levels spread over 0..65535: Pillow's convert("RGB") would clip nearly all to 255.
    folder = tmp_path / "png16"
    folder.mkdir()
    levels = np.random.default_rng(1).integers(0, 65536, size=(4, 32, 32), dtype=np.uint16)
    for i, gray in enumerate(levels):
        Image.fromarray(gray).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode == "I;16"
    (batch,) = _open_images(folder).batches(8)
    expected = np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, axis=3)
    assert np.array_equal(batch, expected)
    assert abs(batch.mean() - 127.5) < 2
    for i in range(4):
        assert np.array_equal(batch[i], decode_image(str(folder / f"{i}.png"), 32))


def test_one_channel_sample_batches_are_repeated_to_rgb(tmp_path, inception_weights, no_gpu):
    # epg sample's .npz for a 1-channel network holds (N, H, W, 1); evaluate reads it as the
    # folder of the same gray images would be read: each level repeated to R, G and B.
    gray = _images(3)[..., :1]
    rgb = np.repeat(gray, 3, axis=3)
    gray_npz, rgb_npz = tmp_path / "gray.npz", tmp_path / "rgb.npz"
    np.savez_compressed(gray_npz, arr_0=gray)  # compressed: the size check is on the inflated size
    np.savez(rgb_npz, arr_0=rgb)
    folder = tmp_path / "gray_png"
    folder.mkdir()
    for i, img in enumerate(gray[..., 0]):
        Image.fromarray(img).save(folder / f"{i}.png")
    for source in (gray_npz, gray, folder):
        batches = list(_open_images(source).batches(3))
        assert [len(b) for b in batches] == [3, 1]
        assert np.array_equal(np.concatenate(batches), rgb)
    results = evaluate(gray_npz, rgb_npz, weights=inception_weights, device="auto",
                       batch_size=3, progress=False)  # fmt: skip
    assert results["num_samples"] == results["num_reference"] == 4
    assert results["fid"] == pytest.approx(0.0, abs=1e-6) and results["precision"] == 1.0
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\) gray ones, got uint8 \(4, 32, 32, 2\)"):
        _open_images(np.repeat(gray, 2, axis=3))


# --------------------------------------------------------------------------------------------
# Damaged files, found before the network runs
# --------------------------------------------------------------------------------------------


def test_damaged_npz_files_are_named_before_the_network_runs(tmp_path, monkeypatch):
    # No weights anywhere: an error found after Inception was loaded (and the samples had
    # gone through it) would be the missing weights, not the damaged file.
    monkeypatch.delenv("EPG_INCEPTION_WEIGHTS", raising=False)
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=_images(0))
    # A valid zip whose arr_0 member holds half an image of the 4 its header promises.
    truncated = tmp_path / "truncated.npz"
    _write_npz(truncated, {"arr_0": _npy((4, 32, 32, 3), np.uint8, bytes(32 * 32 * 3 // 2))})
    message = r"truncated\.npz\[arr_0\] is truncated: its \.npy header promises uint8 \(4, 32, 32"
    with pytest.raises(ValueError, match=message):
        evaluate(good, truncated)
    with pytest.raises(ValueError, match=message):
        evaluate(truncated, good)
    with pytest.raises(ValueError, match=message):
        save_reference_statistics(truncated, tmp_path / "out.npz")
    # Statistics: non-finite entries, a short member, a non-float array; each named by file
    # and key.
    nan_mu = np.zeros(2048)
    nan_mu[5] = np.nan
    inf_sigma_s = np.eye(2023)
    inf_sigma_s[0, 1] = inf_sigma_s[1, 0] = np.inf
    nan_pool = np.zeros((4, 2048), np.float32)
    nan_pool[2, 7] = np.nan
    cases = {
        "nan_mu": ({"mu": _array_bytes(nan_mu)}, r"\[mu\] has 1 non-finite entries"),
        "inf_sigma_s": ({"sigma_s": _array_bytes(inf_sigma_s)}, r"\[sigma_s\] has 2 non-finite"),
        "nan_pool": ({"pool_features": _array_bytes(nan_pool)}, r"\[pool_features\] has 1 non"),
        "short_mu": (
            {"mu": _npy((2048,), np.float64, bytes(100))},
            r"\[mu\] cannot be read \(truncated or corrupt\)",
        ),
        "int_sigma": (
            {"sigma": _array_bytes(np.eye(2048, dtype=np.int64))},
            r"\[sigma\] must be a float array, got int64",
        ),
    }
    for name, (changes, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        _write_npz(path, _stats(**changes))
        with pytest.raises(ValueError, match=f"{name}\\.npz{match}"):
            evaluate(good, path)
    # The undamaged statistics pass every check (and fail only on the missing weights).
    _write_npz(tmp_path / "stats.npz", _stats())
    with pytest.raises(FileNotFoundError, match="EPG_INCEPTION_WEIGHTS"):
        evaluate(good, tmp_path / "stats.npz")


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_a_truncated_image_in_a_folder_is_named_before_the_network_runs(tmp_path, monkeypatch, fmt, suffix):
    # It used to be found when its batch was decoded, after the earlier batches had gone
    # through Inception. No weights anywhere: an error after the network was built would be those.
    monkeypatch.delenv("EPG_INCEPTION_WEIGHTS", raising=False)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}{suffix}", fmt)
    # Bytes after the end marker are tolerated, as decoders tolerate them.
    with open(folder / f"0{suffix}", "ab") as f:
        f.write(b"\0" * 100)
    assert len(_open_images(folder)) == 5
    last = folder / f"4{suffix}"
    last.write_bytes(last.read_bytes()[:-10])  # the header reads; the image data does not
    message = rf"cannot read image {last}: it is truncated \(no {fmt} end marker"
    with pytest.raises(ValueError, match=message):
        _open_images(folder)
    with pytest.raises(ValueError, match=message):
        evaluate(folder, folder)
