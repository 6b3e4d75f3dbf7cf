"""Embedded digits, uint8/PNG output, sample JPEGs, and the stage-1 view augmentations."""

import colorsys
import os

import numpy as np
import pytest
import torch
from helpers import assert_close
from PIL import Image

from epg.data import (
    EmbeddedDigits,
    ViewAugment,
    from_unit,
    load_digits_tensors,
    make_grid_png,
    sample_jpeg_paths,
    stage1_views,
    to_uint8,
    to_unit,
    view1_config,
    view2_config,
)
from epg.data.augment import _adjust_contrast, _adjust_hue, _gaussian_blur, blur_kernel_size

# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_shapes_dtypes_ranges(image_size):
    x, y = load_digits_tensors("all", image_size=image_size)
    assert x.shape == (1797, 1, image_size, image_size) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


def test_digits_values_follow_the_simple_convention():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = load_digits_tensors("all", image_size=8)
    assert_close(x[:, 0], torch.from_numpy(raw.images).float() / 8 - 1)
    assert torch.equal(y, torch.from_numpy(raw.target).long())
    # Bilinear upscaling of a constant image is exact; of a digit, stays in range (convex weights).
    x16, _ = load_digits_tensors("all", image_size=16)
    assert_close(x16.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05, rtol=0)


def test_split_sizes_disjoint_stratified_deterministic():
    x_all, y_all = load_digits_tensors("all", image_size=8)
    x_tr, y_tr = load_digits_tensors("train", image_size=8)
    x_te, y_te = load_digits_tensors("test", image_size=8)
    assert len(y_tr) + len(y_te) == len(y_all) == 1797
    assert len(y_tr) == 1438 and len(y_te) == 359

    # Disjoint and complete: as multisets of (image, label) rows, train + test == all.
    def rows(x, y):
        return sorted(map(tuple, torch.cat([x.flatten(1), y[:, None].float()], 1).tolist()))

    assert rows(torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])) == rows(x_all, y_all)
    # Stratified: each class's test share is 20% of that class, to the nearest image.
    for c in range(10):
        n_c = int((y_all == c).sum())
        assert int((y_te == c).sum()) == round(0.2 * n_c)
    # Deterministic given the seed, different for another seed.
    assert torch.equal(load_digits_tensors("test", image_size=8)[0], x_te)
    other = load_digits_tensors("test", image_size=8, seed=1)[0]
    assert other.shape == x_te.shape and not torch.equal(other, x_te)


def test_three_channels_replicate_gray():
    x1, y1 = load_digits_tensors("test", image_size=16, channels=1)
    x3, y3 = load_digits_tensors("test", image_size=16, channels=3)
    assert x3.shape == (len(y1), 3, 16, 16) and x3.is_contiguous()
    assert torch.equal(y1, y3)
    for c in range(3):
        assert torch.equal(x3[:, c], x1[:, 0])


def test_dataset_items_and_tensors():
    ds = EmbeddedDigits("test", image_size=16, channels=3)
    assert len(ds) == 359
    item = ds[5]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dim() == 0 and item["label"].dtype == torch.int64
    images, labels = ds.tensors
    assert torch.equal(images[5], item["image"]) and labels[5] == item["label"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        load_digits_tensors("val")
    with pytest.raises(ValueError):
        load_digits_tensors(channels=2)
    with pytest.raises(ValueError):
        load_digits_tensors(test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# uint8, PNG grid, sample JPEGs
# ---------------------------------------------------------------------------------------------


def test_to_uint8_round_trip_exact():
    levels = torch.arange(256, dtype=torch.float32)
    x = (levels / 255 * 2 - 1).view(1, 1, 16, 16)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 16, 16, 1)
    assert np.array_equal(out.reshape(-1), np.arange(256))
    # Clamping and rounding at the edges; (C, H, W) input gives (H, W, C).
    edge = torch.tensor([-3.0, -1.0, 1.0, 4.0, 0.5 / 255 * 2 - 1 + 1e-4]).view(1, 1, 5)
    assert to_uint8(edge).reshape(-1).tolist() == [0, 0, 255, 255, 1]
    # ImageNet convention: x01 levels survive the normalisation round trip.
    rgb = levels.view(1, 1, 16, 16).expand(1, 3, 16, 16) / 255
    out3 = to_uint8(from_unit(rgb, "imagenet"), "imagenet")
    assert out3.shape == (1, 16, 16, 3)
    assert np.array_equal(out3[0, ..., 1].reshape(-1), np.arange(256))


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_png(tmp_path, channels):
    x, _ = load_digits_tensors("test", image_size=16, channels=channels)
    path = tmp_path / "sub" / "grid.png"
    size = make_grid_png(x[:10], path, nrow=4, padding=2, scale=2)
    width, height = 4 * (32 + 2) + 2, 3 * (32 + 2) + 2
    assert size == (width, height)
    with Image.open(path) as im:
        assert im.size == (width, height) and im.mode == ("L" if channels == 1 else "RGB")
        arr = np.asarray(im)
    tile = arr[2 : 2 + 32 : 2, 2 : 2 + 32 : 2]  # first image, undone nearest ×2
    expected = to_uint8(x[0])
    assert np.array_equal(tile.reshape(16, 16, -1), expected)
    assert arr[0].max() == 0  # padding is black


def test_sample_jpeg_paths():
    paths = sample_jpeg_paths()
    assert [os.path.basename(p) for p in paths] == ["china.jpg", "flower.jpg"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (640, 427)


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------


def _rgb_batch(n=8, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)  # x01


def _batch(convention, n=8, size=24):
    if convention == "simple":
        return load_digits_tensors("test", image_size=size)[0][:n]
    return from_unit(_rgb_batch(n, size), "imagenet")


IDENTITY = {
    "crop_scale": (1.0, 1.0),
    "jitter_p": 0.0,
    "grayscale_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
    "flip_p": 0.0,
}


@pytest.mark.parametrize("convention", ["simple", "imagenet"])
def test_views_deterministic_and_well_formed(convention):
    x = _batch(convention)
    aug1 = ViewAugment(view1_config(convention=convention))
    aug2 = ViewAugment(view2_config(convention=convention))
    v1, v2 = stage1_views(x, torch.Generator().manual_seed(3), aug1, aug2)
    w1, w2 = stage1_views(x, torch.Generator().manual_seed(3), aug1, aug2)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    u1, _ = stage1_views(x, torch.Generator().manual_seed(4), aug1, aug2)
    assert not torch.equal(u1, v1)
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
        x01 = to_unit(v, convention)
        assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
    assert not torch.equal(v1, x) and not torch.equal(v1, v2)


@pytest.mark.parametrize("convention", ["simple", "imagenet"])
def test_identity_when_everything_is_off(convention):
    x = _batch(convention)
    out = ViewAugment(view1_config(convention=convention, **IDENTITY))(
        x, torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, x)


def test_flip_p1_flips_exactly():
    x = _batch("simple")
    cfg = view1_config(**{**IDENTITY, "flip_p": 1.0})
    assert torch.equal(ViewAugment(cfg)(x, torch.Generator().manual_seed(0)), x.flip(-1))


@pytest.mark.parametrize("convention", ["simple", "imagenet"])
def test_solarize_p1_matches_formula(convention):
    x = _batch(convention)
    cfg = view2_config(**{**IDENTITY, "solarize_p": 1.0}, convention=convention)
    out = ViewAugment(cfg)(x, torch.Generator().manual_seed(0))
    x01 = to_unit(x, convention)
    expected = from_unit(torch.where(x01 >= 128 / 255, 1 - x01, x01), convention)
    assert_close(out, expected)


def test_blur_reduces_high_frequencies_and_keeps_constants():
    x = _batch("simple", n=16, size=32)
    cfg = view1_config(**{**IDENTITY, "blur_p": 1.0})
    out = ViewAugment(cfg)(x, torch.Generator().manual_seed(0))

    def hf_energy(t):  # energy of the finite differences, per image
        return (t.diff(dim=-1) ** 2).sum(dim=(1, 2, 3)) + (t.diff(dim=-2) ** 2).sum(dim=(1, 2, 3))

    assert (hf_energy(out) < hf_energy(x)).all()
    flat = torch.full((2, 3, 9, 9), 0.3)
    assert_close(_gaussian_blur(flat, torch.tensor([0.5, 2.0]), 25), flat)  # kernel > image


def test_blur_matches_a_dense_gaussian():
    x = torch.rand(1, 1, 12, 12, dtype=torch.float64)
    sigma, k = 1.3, 5
    out = _gaussian_blur(x, torch.tensor([sigma]), k)
    t = torch.arange(k, dtype=torch.float64) - k // 2
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    w = w / w.sum()
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = torch.nn.functional.conv2d(pad, (w[:, None] * w[None, :])[None, None])
    assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_crop_stays_in_range_and_handles_non_square_images():
    x = _batch("simple", n=32)
    cfg = view1_config(**{**IDENTITY, "crop_scale": [0.3, 0.6]})  # lists, as from a YAML file
    assert cfg.crop_scale == (0.3, 0.6)
    out = ViewAugment(cfg)(x, torch.Generator().manual_seed(0))
    assert out.min() >= -1 and out.max() <= 1 and not torch.equal(out, x)
    wide = from_unit(_rgb_batch(4, 12).repeat(1, 1, 1, 3), "imagenet")  # (4, 3, 12, 36)
    out = ViewAugment(view2_config(convention="imagenet"))(wide, torch.Generator().manual_seed(0))
    assert out.shape == wide.shape


def test_crop_fallback_is_the_centred_box_resampled_bilinearly():
    # 12×36 image, scale 1, ratio in [0.9, 1.1]: no try fits, so the box is the centred
    # 13×12 (w×h) one at column 11; a ramp along the columns is resampled exactly.
    ramp = torch.arange(36, dtype=torch.float64).expand(2, 1, 12, 36)
    cfg = view1_config(**{**IDENTITY, "crop_ratio": (0.9, 1.1)})
    out = ViewAugment(cfg)(ramp, torch.Generator().manual_seed(0))
    k = torch.arange(36, dtype=torch.float64)
    assert_close(out, (11 + (k + 0.5) * 13 / 36 - 0.5).expand(2, 1, 12, 36))


def test_hue_matches_colorsys():
    x01 = _rgb_batch(2, 4)
    shift = torch.tensor([0.1, -0.25])
    out = _adjust_hue(x01, shift)
    for b in range(2):
        for i, j in [(0, 0), (1, 2), (3, 3)]:
            h, s, v = colorsys.rgb_to_hsv(*x01[b, :, i, j].tolist())
            expected = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
            assert_close(
                out[b, :, i, j], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5
            )


def test_jitter_and_grayscale_on_rgb():
    x = from_unit(_rgb_batch(16), "imagenet")
    gray_cfg = view1_config(**{**IDENTITY, "grayscale_p": 1.0}, convention="imagenet")
    g01 = to_unit(ViewAugment(gray_cfg)(x, torch.Generator().manual_seed(0)), "imagenet")
    assert_close(g01[:, 0], g01[:, 1], atol=1e-5, rtol=0)
    assert_close(g01[:, 1], g01[:, 2], atol=1e-5, rtol=0)
    jit_cfg = view1_config(**{**IDENTITY, "jitter_p": 1.0}, convention="imagenet")
    j = ViewAugment(jit_cfg)(x, torch.Generator().manual_seed(0))
    assert not torch.isclose(j, x).all(dim=(1, 2, 3)).any()  # every sample changed


def test_gray_images_ignore_saturation_hue_grayscale():
    x = _batch("simple")
    cfg = view1_config(
        **{**IDENTITY, "grayscale_p": 1.0, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0}
    )
    assert_close(ViewAugment(cfg)(x, torch.Generator().manual_seed(0)), x)


def test_augment_follows_the_images_device():
    x = _batch("simple")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        out = ViewAugment(view2_config())(x.to(dev), torch.Generator().manual_seed(1))
        assert out.device.type == dev
        if dev != "cpu":
            ref = ViewAugment(view2_config())(x, torch.Generator().manual_seed(1))
            assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


# Spec §2's recipe, pinned value by value: the tests above check each step's math, not which
# settings the two views get.
_OFF = dict(crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0)


def test_view_configs_are_the_spec_recipe():
    v1, v2 = view1_config(), view2_config()
    for v in (v1, v2):
        assert v.crop_scale == (0.08, 1.0) and v.crop_ratio == pytest.approx((3 / 4, 4 / 3))
        assert (v.jitter_p, v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
        assert v.grayscale_p == 0.2 and v.blur_sigma == (0.1, 2.0) and v.flip_p == 0.5
        assert v.solarize_threshold == 128 / 255
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)  # blur always, never solarize
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    # ≈10% of the side, odd; σ ≤ 2 needs 13 taps for ±3σ
    assert [blur_kernel_size(s) for s in (16, 224, 256)] == [3, 23, 27]


def test_stage1_views_are_view1_then_view2_from_one_generator():
    x = load_digits_tensors("test", image_size=16)[0][:8]
    a1, a2 = ViewAugment(view1_config()), ViewAugment(view2_config())
    y1, y2 = stage1_views(x, torch.Generator().manual_seed(5), a1, a2)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(y1, a1(x, g)) and torch.equal(y2, a2(x, g))


def _one_colour(n, colour):
    return from_unit(torch.tensor(colour).view(1, 3, 1, 1).expand(n, 3, 2, 2).contiguous(), "imagenet")


def test_jitter_draws_span_their_ranges():
    n, g = 4000, torch.Generator().manual_seed(0)
    # hue alone, on one saturated colour: the shift recovered by colorsys spans ±0.1
    cfg = view1_config(**{**_OFF, "jitter_p": 1.0, "brightness": 0, "contrast": 0, "saturation": 0},
                       convention="imagenet")  # fmt: skip
    out = to_unit(ViewAugment(cfg)(_one_colour(n, [0.8, 0.4, 0.2]), g), "imagenet")[:, :, 0, 0].double()
    h0 = colorsys.rgb_to_hsv(0.8, 0.4, 0.2)[0]
    shifts = np.array([((colorsys.rgb_to_hsv(*p)[0] - h0 + 0.5) % 1) - 0.5 for p in out.tolist()])
    assert shifts.min() < -0.09 and shifts.max() > 0.09 and np.abs(shifts).max() <= 0.1 + 1e-4
    # saturation alone: the blend factor with the luma spans [0.8, 1.2]
    cfg = view1_config(**{**_OFF, "jitter_p": 1.0, "brightness": 0, "contrast": 0, "hue": 0},
                       convention="imagenet")  # fmt: skip
    c = [0.6, 0.5, 0.4]
    out = to_unit(ViewAugment(cfg)(_one_colour(n, c), g), "imagenet")[:, :, 0, 0].double()
    luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    factor = ((out[:, 0] - luma) / (c[0] - luma)).numpy()
    assert factor.min() == pytest.approx(0.8, abs=0.01) and factor.max() == pytest.approx(1.2, abs=0.01)


def test_contrast_blends_with_the_mean_luma_as_torchvision():
    x = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    f = torch.tensor([0.7, 1.0, 1.3]).view(3, 1, 1, 1)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2)).view(3, 1, 1, 1)
    torch.testing.assert_close(_adjust_contrast(x, f.view(3)), (f * x + (1 - f) * luma).clamp(0, 1))


def test_crop_boxes_have_their_size_and_reach_every_position():
    # Pixel value = row index; scale 0.25 with ratio 1 is a 4x4 box at top 0..4 of the 8x8
    # image, resampled to 8x8: output row 1 samples source row top + 0.25, row 6 top + 2.75.
    img = torch.arange(8, dtype=torch.float64).view(1, 1, 8, 1).expand(3000, 1, 8, 8).contiguous()
    cfg = view1_config(**{**_OFF, "crop_scale": (0.25, 0.25), "crop_ratio": (1.0, 1.0)})
    out = ViewAugment(cfg)(img, torch.Generator().manual_seed(0))
    tops = out[:, 0, 1, 0] - 0.25
    assert torch.equal(tops, tops.round())
    counts = torch.bincount(tops.long(), minlength=5)
    assert len(counts) == 5 and (counts > 450).all()  # uniform over 0..4
    assert torch.allclose(out[:, 0, 6, 0] - out[:, 0, 1, 0], torch.full_like(tops, 2.5))


def test_solarize_inverts_the_threshold_pixel_itself():
    # PIL's solarize inverts pixels ≥ 128
    x01 = torch.tensor([127 / 255, 128 / 255, 129 / 255, 130 / 255]).view(1, 1, 2, 2)
    cfg = view2_config(**{**_OFF, "solarize_p": 1.0})
    out = to_unit(ViewAugment(cfg)(from_unit(x01, "simple"), torch.Generator()), "simple")
    assert to_uint8(from_unit(out, "simple")).reshape(-1).tolist() == [127, 127, 126, 125]


def test_png_pixels_round_half_up():
    # x01·255 exactly k + 0.5 (k even): floor(x01·255 + 0.5) gives k + 1, round-half-even k
    k = torch.arange(0, 254, 2, dtype=torch.float64)
    x = (2 * (k + 0.5) / 255 - 1).float()
    exact = (x * 0.5 + 0.5) * 255.0 == (k + 0.5).float()
    assert exact.any()
    out = torch.from_numpy(to_uint8(x.view(1, 1, 1, -1)).reshape(-1).astype(np.int64))
    assert torch.equal(out[exact], (k[exact] + 1).long())


def test_grayscale_is_the_itu_luma_and_each_image_draws_its_blur():
    x01 = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    cfg = view1_config(**{**_OFF, "grayscale_p": 1.0}, convention="imagenet")
    gray = to_unit(ViewAugment(cfg)(from_unit(x01, "imagenet"), torch.Generator()), "imagenet")
    luma = 0.299 * x01[:, 0] + 0.587 * x01[:, 1] + 0.114 * x01[:, 2]
    torch.testing.assert_close(gray[:, 1], luma, atol=1e-5, rtol=0)
    same = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)).expand(8, 1, 16, 16) * 2 - 1
    out = ViewAugment(view1_config(**{**_OFF, "blur_p": 1.0}))(same.contiguous(), torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8  # a σ per image, not per batch


def test_an_empty_test_share_is_refused():
    # The bounds are exclusive: a split with no test images (or no train images) is refused.
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 0"):
        load_digits_tensors(test_fraction=0.0)


def test_a_grid_of_fewer_images_than_a_row_is_as_wide_as_its_images(tmp_path):
    x, _ = load_digits_tensors("test", image_size=8, channels=3)
    assert make_grid_png(x[:3], tmp_path / "g.png", nrow=8, padding=1) == (3 * 9 + 1, 9 + 1)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (28, 10) and im.mode == "RGB"
