"""The C++ kernels of ``epg._C`` behind the stage-2 ops, against the references of epg.reference.

Ops: noise_precondition, weighted_mse_loss(_backward), pseudo_huber_loss(_backward),
normalize_images, to_uint8, patchify_hwc, unpatchify_hwc (``torch.ops.epg_C.*``). The CPU kernels
share their arithmetic with the CUDA kernels (csrc/<op>.h), so these CPU tests check the math
the GPU runs; the tests marked ``cuda`` compare the CUDA kernels themselves (skipped without a
GPU). Skipped as a whole when the extension is not built.
"""

import math
import sys

import pytest
import torch
from helpers import assert_close

from epg import reference

_C = pytest.importorskip("epg._C")
E = torch.ops.epg_C

NEW_OPS = (
    "noise_precondition",
    "weighted_mse_loss",
    "weighted_mse_loss_backward",
    "pseudo_huber_loss",
    "pseudo_huber_loss_backward",
    "normalize_images",
    "to_uint8",
    "patchify_hwc",
    "unpatchify_hwc",
)
FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Batch 1 with odd sizes, a sample length that is not a multiple of any vector width, and an
# aligned case (every sample starts on a 16-byte boundary).
IMAGE_SHAPES = [(1, 3, 5, 7), (3, 2, 9, 13), (4, 3, 16, 16)]
SD, SMIN, C_HUBER = 0.5, 0.008, 0.06
IMAGENET = (list(reference.IMAGENET_MEAN), [2 * s for s in reference.IMAGENET_STD])


def tol(dtype):
    """Kernel vs reference run in the same dtype: both round the same float32/64 math once."""
    return {
        torch.float64: {"atol": 1e-12, "rtol": 1e-12},
        torch.float32: {"atol": 1e-6, "rtol": 1e-6},
        torch.bfloat16: {"atol": 1e-2, "rtol": 8e-3},
        torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    }[dtype]


def sigmas(n, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    log_s = torch.empty(n, dtype=torch.float64).uniform_(math.log(0.008), math.log(320.0), generator=g)
    return log_s.exp().to(dtype=dtype, device=device)


def randn(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def uint8_images(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)


def check_fresh(out, *inputs):
    """Contiguous outputs that alias no input."""
    outs = out if isinstance(out, tuple) else (out,)
    ptrs = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    for o in outs:
        assert o.is_contiguous()
        if o.numel():
            assert o.data_ptr() not in ptrs


# --- registration -----------------------------------------------------------------------------------


def test_schemas():
    schemas = {name: str(getattr(E, name).default._schema) for name in NEW_OPS}
    assert schemas["noise_precondition"] == (
        "epg_C::noise_precondition(Tensor x0, Tensor eps, Tensor sigma, float sigma_data, "
        "float sigma_min, str mode) -> (Tensor x_in, Tensor c_in, Tensor c_skip, Tensor c_out, "
        "Tensor t_cond)"
    )
    assert schemas["normalize_images"] == (
        "epg_C::normalize_images(Tensor images, Tensor? flip, float[] mean, float[] std, "
        "ScalarType dtype) -> Tensor"
    )
    assert schemas["pseudo_huber_loss_backward"] == (
        "epg_C::pseudo_huber_loss_backward(Tensor grad, Tensor pred, Tensor target, "
        "Tensor weight, Tensor sqsum, float c) -> Tensor"
    )


@pytest.mark.parametrize("name", NEW_OPS)
def test_registered_for_cpu_meta_and_cuda_when_built(name):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(f"epg_C::{name}", "CPU") and has(f"epg_C::{name}", "Meta")
    assert has(f"epg_C::{name}", "CUDA") == bool(_C.WITH_CUDA)


def test_cuda_backend_maps_every_new_op():
    from epg import _backend

    info = _backend.info("cuda")
    for name in NEW_OPS:
        assert name in info.implementations, name


# --- noise_precondition -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["x0", "edm"])
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_noise_precondition_matches_reference(dtype, shape, mode):
    x0, eps = randn(shape, dtype, 1), randn(shape, dtype, 2)
    sigma = sigmas(shape[0], torch.float64 if dtype == torch.float64 else torch.float32)
    out = E.noise_precondition(x0, eps, sigma, SD, SMIN, mode)
    ref = reference.noise_precondition(x0, eps, sigma, SD, SMIN, mode)
    assert out[0].dtype == dtype and out[0].shape == shape
    assert_close(out[0], ref[0], **tol(dtype), what="x_in")
    for name, o, r in zip(("c_in", "c_skip", "c_out", "t_cond"), out[1:], ref[1:]):
        assert o.dtype == sigma.dtype
        assert_close(o, r, **tol(sigma.dtype), what=name)
    check_fresh(out, x0, eps, sigma)


def test_noise_precondition_float64_sigma_with_float32_images():
    x0, eps = randn((2, 3, 5, 5), torch.float32, 1), randn((2, 3, 5, 5), torch.float32, 2)
    sigma = sigmas(2, torch.float64)
    out = E.noise_precondition(x0, eps, sigma, SD, SMIN, "edm")
    ref = reference.noise_precondition(x0, eps, sigma, SD, SMIN, "edm")
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float64
    assert_close(out[0], ref[0], **tol(torch.float32))


def test_noise_precondition_flat_and_non_contiguous_inputs():
    base = randn((3, 4, 10, 11), torch.float32, 3)
    x0 = base[:, 1:, :, ::2]  # a strided view with a storage offset
    eps = randn((3, 11, 10, 3), torch.float32, 4).permute(0, 3, 2, 1)[:, :, :, :6]
    sigma = sigmas(7, torch.float32)[::3]
    assert not x0.is_contiguous() and not eps.is_contiguous() and not sigma.is_contiguous()
    out = E.noise_precondition(x0, eps, sigma, SD, SMIN, "edm")
    ref = reference.noise_precondition(x0.contiguous(), eps.contiguous(), sigma.contiguous(), SD, SMIN, "edm")
    for o, r in zip(out, ref):
        assert_close(o, r, **tol(torch.float32))
    flat = E.noise_precondition(x0[:, 0, 0, 0].contiguous(), eps[:, 0, 0, 0].contiguous(), sigma, SD, SMIN, "x0")
    assert flat[0].shape == (3,)


def test_noise_precondition_empty():
    out = E.noise_precondition(torch.empty(0, 3, 4, 4), torch.empty(0, 3, 4, 4), torch.empty(0), SD, SMIN, "x0")
    assert out[0].shape == (0, 3, 4, 4) and out[1].shape == (0,)


def test_noise_precondition_errors_name_the_expected_form():
    x0, sigma = torch.randn(2, 3, 4, 4), torch.rand(2)
    with pytest.raises(RuntimeError, match=r"`x0` to have dtype torch.float32, torch.float64, torch.bfloat16"):
        E.noise_precondition(x0.long(), x0.long(), sigma, SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r"`eps` to have the shape of `x0`"):
        E.noise_precondition(x0, x0[:, :2], sigma, SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r"`eps` to have the dtype of `x0` \(torch.float32\)"):
        E.noise_precondition(x0, x0.double(), sigma, SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r"`sigma` of shape \(B,\) = \(2,\)"):
        E.noise_precondition(x0, x0, torch.rand(3), SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r"1-D tensor of shape \(B,\)"):
        E.noise_precondition(x0, x0, torch.rand(2, 1), SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r"`sigma` to have dtype torch.float32 or torch.float64"):
        E.noise_precondition(x0, x0, sigma.half(), SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r'`mode` to be "x0" or "edm"'):
        E.noise_precondition(x0, x0, sigma, SD, SMIN, "v")
    with pytest.raises(RuntimeError, match=r"`eps` on the device of `x0` \(cpu\)"):
        E.noise_precondition(x0, x0.to("meta"), sigma, SD, SMIN, "x0")
    with pytest.raises(RuntimeError, match=r"shape \(B, \.\.\.\)"):
        E.noise_precondition(torch.tensor(1.0), torch.tensor(1.0), sigma, SD, SMIN, "x0")


# --- losses ---------------------------------------------------------------------------------------

LOSS_SHAPES = [(1, 7), (3, 3, 5, 7), (2, 20011)]  # the last spans two 16384-element CPU chunks
LOSS_DTYPES = [(d, d) for d in FLOATS] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def loss_inputs(shape, pred_dtype, target_dtype, seed=0):
    pred = randn(shape, pred_dtype, seed)
    target = randn(shape, target_dtype, seed + 1)
    weight = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ct = torch.float64 if pred_dtype == torch.float64 else torch.float32
    return pred, target, (weight * 100).to(ct)


def loss_tol(dtype):
    # Sums over up to 20k elements in a different order than torch's: a few float32 ulps.
    if dtype == torch.float64:
        return {"atol": 1e-12, "rtol": 1e-12}
    return {"atol": 1e-6, "rtol": 2e-5}


@pytest.mark.parametrize("name", ["weighted_mse_loss", "pseudo_huber_loss"])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("dtypes", LOSS_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_loss_forward_and_backward_match_reference(name, shape, dtypes):
    pred, target, weight = loss_inputs(shape, *dtypes)
    extra = (C_HUBER,) if name == "pseudo_huber_loss" else ()
    out = getattr(E, name)(pred, target, weight, *extra)
    ref = getattr(reference, name)(pred, target, weight, *extra)
    ct = weight.dtype
    for o, r, what in zip(out, ref, ("loss", "stat")):
        assert o.dtype == ct and o.shape == (shape[0],)
        assert_close(o, r, **loss_tol(ct), what=what)
    check_fresh(out, pred, target, weight)

    grad = randn((shape[0],), ct, 7)
    stat = (out[1],) if name == "pseudo_huber_loss" else ()
    g = getattr(E, name + "_backward")(grad, pred, target, weight, *stat, *extra)
    g_ref = getattr(reference, name + "_backward")(grad, pred, target, weight, *stat, *extra)
    assert g.dtype == pred.dtype and g.shape == pred.shape
    assert_close(g, g_ref, **tol(pred.dtype), what="grad_pred")


@pytest.mark.parametrize("name", ["weighted_mse_loss", "pseudo_huber_loss"])
def test_loss_non_contiguous_inputs(name):
    pred = randn((4, 6, 9), torch.float32, 1).transpose(1, 2)
    target = randn((4, 9, 12), torch.float32, 2)[:, :, ::2]
    weight = torch.rand(8)[::2]
    extra = (C_HUBER,) if name == "pseudo_huber_loss" else ()
    out = getattr(E, name)(pred, target, weight, *extra)
    ref = getattr(reference, name)(pred.contiguous(), target.contiguous(), weight.contiguous(), *extra)
    for o, r in zip(out, ref):
        assert_close(o, r, **loss_tol(torch.float32))
    grad = torch.randn(8)[::2]
    stat = (out[1],) if name == "pseudo_huber_loss" else ()
    g = getattr(E, name + "_backward")(grad, pred, target, weight, *stat, *extra)
    g_ref = getattr(reference, name + "_backward")(grad, pred, target, weight, *stat, *extra)
    assert_close(g, g_ref, **tol(torch.float32))


def test_loss_weight_of_another_float_dtype_is_converted():
    pred, target, _ = loss_inputs((3, 10), torch.float32, torch.float32)
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    loss, mse = E.weighted_mse_loss(pred, target, weight)
    assert loss.dtype == torch.float32
    assert_close(loss, weight.float() * mse)


def test_loss_errors_name_the_expected_form():
    p, w = torch.randn(2, 5), torch.rand(2)
    with pytest.raises(RuntimeError, match=r"`target` to have the shape of `pred`"):
        E.weighted_mse_loss(p, p[:, :4], w)
    with pytest.raises(RuntimeError, match=r"or torch.float32 for a torch.bfloat16/torch.float16 `pred`"):
        E.weighted_mse_loss(p, p.double(), w)
    with pytest.raises(RuntimeError, match=r"`pred` to have dtype torch.float32, torch.float64"):
        E.weighted_mse_loss(p.int(), p.int(), w)
    with pytest.raises(RuntimeError, match=r"`weight` of shape \(B,\) = \(2,\)"):
        E.pseudo_huber_loss(p, p, torch.rand(3), C_HUBER)
    with pytest.raises(RuntimeError, match=r"`c` to be a finite number > 0"):
        E.pseudo_huber_loss(p, p, w, 0.0)
    with pytest.raises(RuntimeError, match=r"`grad` of shape \(B,\)"):
        E.weighted_mse_loss_backward(torch.rand(3), p, p, w)
    with pytest.raises(RuntimeError, match=r"`sqsum` to be a 1-D tensor of shape \(B,\)"):
        E.pseudo_huber_loss_backward(w, p, p, w, torch.rand(2, 1), C_HUBER)
    with pytest.raises(RuntimeError, match=r"`target` on the device of `pred` \(cpu\)"):
        E.weighted_mse_loss(p, p.to("meta"), w)


# --- normalize_images / to_uint8 -----------------------------------------------------------------------

NHWC_SHAPES = [(1, 5, 7, 3), (3, 4, 9, 1), (2, 16, 16, 4), (2, 3, 5, 16)]


def stats(channels):
    return IMAGENET if channels == 3 else ([0.5] * channels, [0.5] * channels)


@pytest.mark.parametrize("with_flip", [False, True])
@pytest.mark.parametrize("shape", NHWC_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_normalize_images_matches_reference(dtype, shape, with_flip):
    images = uint8_images(shape)
    flip = (torch.arange(shape[0]) % 2 == 0) if with_flip else None
    mean, std = stats(shape[3])
    out = E.normalize_images(images, flip, mean, std, dtype)
    ref = reference.normalize_images(images, flip, mean, std, dtype)
    assert out.dtype == dtype and out.shape == (shape[0], shape[3], shape[1], shape[2])
    # The same float32/64 operations rounded once: equal bit for bit.
    assert torch.equal(out, ref)
    check_fresh(out, images)


def test_normalize_images_non_contiguous_and_offset_inputs():
    nchw = uint8_images((3, 3, 6, 11))
    images = nchw.permute(0, 2, 3, 1)  # NHWC view of NCHW storage
    flip = torch.tensor([True, False, True, False, True, False])[::2]
    out = E.normalize_images(images, flip, *IMAGENET, torch.float32)
    assert torch.equal(out, reference.normalize_images(images.contiguous(), flip.contiguous(), *IMAGENET, torch.float32))
    offset = uint8_images((4, 6, 11, 3))[1:]  # storage offset of one sample
    assert torch.equal(
        E.normalize_images(offset, None, *IMAGENET, torch.bfloat16),
        reference.normalize_images(offset, None, *IMAGENET, torch.bfloat16),
    )


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 1, 9, 4), (2, 4, 16, 16)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_to_uint8_matches_reference_exactly(dtype, shape):
    x = (randn(shape, torch.float64, 3) * 0.8).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 7.0]).to(dtype)
    mean, std = stats(shape[1])
    out = E.to_uint8(x, mean, std)
    assert out.dtype == torch.uint8 and out.shape == (shape[0], shape[2], shape[3], shape[1])
    assert torch.equal(out, reference.to_uint8(x, mean, std))
    check_fresh(out, x)


def test_to_uint8_rounds_half_up_and_clamps():
    # x01 = x·0.5 + 0.5 in "simple" terms; 0.5/255 and 1.5/255 sit on rounding boundaries.
    x01 = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0, 1.2, -0.1], dtype=torch.float64)
    x = (2 * x01 - 1).view(1, 1, 1, -1)
    out = E.to_uint8(x, [0.5], [0.5]).flatten().tolist()
    assert out == reference.to_uint8(x, [0.5], [0.5]).flatten().tolist()
    assert out[0] == 0 and out[4] == 255 and out[5] == 255 and out[6] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_uint8_inverts_normalize_images(dtype):
    images = uint8_images((2, 7, 9, 3))
    flip = torch.tensor([True, False])
    x = E.normalize_images(images, flip, *IMAGENET, dtype)
    back = E.to_uint8(x, *IMAGENET)
    assert torch.equal(back, torch.where(flip.view(2, 1, 1, 1), images.flip(2), images))


def test_to_uint8_non_contiguous_input():
    x = randn((2, 5, 3, 8), torch.float32, 4).permute(0, 2, 1, 3)[..., ::2]
    assert torch.equal(E.to_uint8(x, *IMAGENET), reference.to_uint8(x.contiguous(), *IMAGENET))


def test_image_conversion_errors_name_the_expected_form():
    u = uint8_images((2, 4, 4, 3))
    with pytest.raises(RuntimeError, match=r"`images` to have dtype torch.uint8, but got torch.float32"):
        E.normalize_images(u.float(), None, *IMAGENET, torch.float32)
    with pytest.raises(RuntimeError, match=r"4-D tensor of shape \(B, H, W, C\)"):
        E.normalize_images(u[0], None, *IMAGENET, torch.float32)
    with pytest.raises(RuntimeError, match=r"\(B, H, W, C\) with 1 <= C <= 16"):
        E.normalize_images(uint8_images((1, 2, 2, 17)), None, [0.0] * 17, [1.0] * 17, torch.float32)
    with pytest.raises(RuntimeError, match=r"one value per channel \(C = 3\)"):
        E.normalize_images(u, None, [0.5], [0.5], torch.float32)
    with pytest.raises(RuntimeError, match=r"finite non-zero `std`"):
        E.normalize_images(u, None, [0.5] * 3, [0.5, 0.0, 0.5], torch.float32)
    with pytest.raises(RuntimeError, match=r"`dtype` torch.float32, torch.float64, torch.bfloat16"):
        E.normalize_images(u, None, *IMAGENET, torch.int32)
    with pytest.raises(RuntimeError, match=r"`flip` to have dtype torch.bool"):
        E.normalize_images(u, torch.ones(2, dtype=torch.uint8), *IMAGENET, torch.float32)
    with pytest.raises(RuntimeError, match=r"`flip` of shape \(B,\) = \(2,\)"):
        E.normalize_images(u, torch.ones(3, dtype=torch.bool), *IMAGENET, torch.float32)
    with pytest.raises(RuntimeError, match=r"`flip` on the device of `images` \(cpu\)"):
        E.normalize_images(u, torch.ones(2, dtype=torch.bool, device="meta"), *IMAGENET, torch.float32)
    with pytest.raises(RuntimeError, match=r"`images` to have dtype torch.float32, torch.float64"):
        E.to_uint8(u.permute(0, 3, 1, 2), *IMAGENET)
    with pytest.raises(RuntimeError, match=r"4-D tensor of shape \(B, C, H, W\)"):
        E.to_uint8(torch.randn(3, 4, 4), *IMAGENET)


# --- patchify_hwc / unpatchify_hwc -----------------------------------------------------------------

PATCH_CASES = [((1, 3, 8, 12), 4), ((2, 1, 6, 9), 3), ((2, 3, 32, 32), 16), ((1, 2, 10, 10), 5)]
LAYOUT_DTYPES = FLOATS + [torch.uint8, torch.int64]


def layout_tensor(shape, dtype, seed=0):
    if dtype.is_floating_point:
        return randn(shape, dtype, seed)
    return torch.randint(0, 200, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("shape,p", PATCH_CASES)
@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
def test_patchify_and_unpatchify_match_reference(dtype, shape, p):
    img = layout_tensor(shape, dtype)
    tokens = E.patchify_hwc(img, p)
    assert torch.equal(tokens, reference.patchify_hwc(img, p))
    B, C, H, W = shape
    assert tokens.shape == (B, (H // p) * (W // p), p * p * C) and tokens.dtype == dtype
    back = E.unpatchify_hwc(tokens, p, H)
    assert torch.equal(back, img)
    assert torch.equal(back, reference.unpatchify_hwc(tokens, p, H))
    check_fresh(tokens, img)
    check_fresh(back, tokens)


def test_patchify_non_contiguous_inputs():
    img = randn((2, 8, 12, 3), torch.float32).permute(0, 3, 1, 2)
    assert torch.equal(E.patchify_hwc(img, 4), reference.patchify_hwc(img.contiguous(), 4))
    tokens = randn((2, 48, 6), torch.float32).transpose(1, 2)  # (2, 6, 48): p = 4, C = 3
    assert torch.equal(E.unpatchify_hwc(tokens, 4, 8), reference.unpatchify_hwc(tokens.contiguous(), 4, 8))


def test_patch_layout_errors_name_the_expected_form():
    with pytest.raises(RuntimeError, match=r"H and W multiples of patch_size = 4"):
        E.patchify_hwc(torch.randn(1, 3, 8, 10), 4)
    with pytest.raises(RuntimeError, match=r"4-D tensor of shape \(B, C, H, W\)"):
        E.patchify_hwc(torch.randn(3, 8, 8), 4)
    with pytest.raises(RuntimeError, match=r"`patch_size` >= 1"):
        E.patchify_hwc(torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(RuntimeError, match=r"1, 2, 4 or 8 bytes per element"):
        E.patchify_hwc(torch.randn(1, 3, 8, 8, dtype=torch.complex128), 4)
    with pytest.raises(RuntimeError, match=r"p\*p = 16 dividing the last dim"):
        E.unpatchify_hwc(torch.randn(1, 4, 40), 4, 8)
    with pytest.raises(RuntimeError, match=r"`height` to be a multiple of patch_size = 4"):
        E.unpatchify_hwc(torch.randn(1, 6, 48), 4, 16)  # 4 patch rows do not divide 6 tokens


# --- meta kernels and opcheck -----------------------------------------------------------------------


def op_cases():
    x0, eps = randn((2, 3, 5, 7), torch.float32, 1), randn((2, 3, 5, 7), torch.float32, 2)
    pred, target, weight = loss_inputs((3, 2, 5, 3), torch.bfloat16, torch.float32)
    grad = torch.rand(3)
    _, sqsum = reference.pseudo_huber_loss(pred, target, weight, C_HUBER)
    images = uint8_images((2, 5, 7, 3))
    return {
        "noise_precondition": (x0, eps, sigmas(2), SD, SMIN, "edm"),
        "weighted_mse_loss": (pred, target, weight),
        "weighted_mse_loss_backward": (grad, pred, target, weight),
        "pseudo_huber_loss": (pred, target, weight, C_HUBER),
        "pseudo_huber_loss_backward": (grad, pred, target, weight, sqsum, C_HUBER),
        "normalize_images": (images, torch.tensor([True, False]), *IMAGENET, torch.bfloat16),
        "to_uint8": (x0[:, :3], *IMAGENET),
        "patchify_hwc": (randn((2, 3, 6, 9), torch.float32), 3),
        "unpatchify_hwc": (randn((2, 6, 27), torch.float64), 3, 6),
    }


@pytest.mark.parametrize("name", NEW_OPS)
def test_meta_kernel_matches_cpu_metadata(name):
    args = op_cases()[name]
    real = getattr(E, name)(*args)
    meta = getattr(E, name)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    real, meta = (real if isinstance(real, tuple) else (real,)), (meta if isinstance(meta, tuple) else (meta,))
    for r, m in zip(real, meta):
        assert m.device.type == "meta"
        assert (r.shape, r.dtype, r.stride()) == (m.shape, m.dtype, m.stride())


@pytest.mark.parametrize("name", NEW_OPS)
def test_opcheck_cpu(name):
    torch.library.opcheck(getattr(E, name).default, op_cases()[name])


# --- CUDA -------------------------------------------------------------------------------------------


def _cuda_device():
    if not _C.WITH_CUDA:
        pytest.skip("epg._C was built without its CUDA kernels (WITH_CUDA=0)")
    return torch.device("cuda", torch.cuda.current_device())


def _on(device, args, view=None, at=(0,)):
    """args moved to device; `view` (a function of a tensor) is applied to the arguments at the
    positions `at` after the move, so that slices with storage offsets stay unaligned on the GPU."""
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    if view is not None:
        for i in at:
            moved[i] = view(moved[i])
    return moved


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _same_on_cuda(name, args, exact, view=None, at=(0,)):
    """The CUDA kernel against the CPU kernel (the same shared math) on the same inputs."""
    dev = _cuda_device()
    out = _as_tuple(getattr(E, name)(*_on(dev, args, view, at)))
    cpu = _as_tuple(getattr(E, name)(*_on("cpu", args, view, at)))
    for o, c in zip(out, cpu):
        assert o.device == dev and o.is_contiguous() and o.dtype == c.dtype and o.shape == c.shape
        if exact:
            assert torch.equal(o.cpu(), c), name
        else:
            assert_close(o.cpu(), c, **loss_tol(c.dtype) if c.is_floating_point() else {}, what=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_noise_precondition_matches_cpu_kernel_and_reference(dtype):
    dev = _cuda_device()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    # 70000 samples: more than one grid row per block (gridDim.y is capped at 65535).
    for shape in IMAGE_SHAPES + [(5, 3, 64, 64), (70000, 3)]:
        args = (randn(shape, dtype, 1), randn(shape, dtype, 2), sigmas(shape[0], sdt), SD, SMIN, "edm")
        out = E.noise_precondition(*_on(dev, args))
        ref = reference.noise_precondition(*_on(dev, args))
        for o, r in zip(out, ref):
            assert_close(o.cpu(), r.cpu(), **tol(o.dtype))
        # x_in, c_in, c_skip and c_out use unfused products and sums on both devices: bit-identical
        # to the CPU kernel (x_in multiplies by c_in, so it can only match if c_in does).
        # t_cond goes through the device's log(): compare loosely.
        cpu = E.noise_precondition(*args)
        for k in range(4):
            assert torch.equal(out[k].cpu(), cpu[k]), k
        assert_close(out[4].cpu(), cpu[4], **tol(cpu[4].dtype))
    base = randn((3 * 5 * 7 + 1,), dtype, 5)
    def unaligned(t):  # every sample starts off a 16-byte boundary
        return t[1:].view(3, 5, 7)

    args = (base, base.clone(), sigmas(3, sdt), SD, SMIN, "x0")
    _same_on_cuda("noise_precondition", args, False, unaligned, at=(0, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtypes", LOSS_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_cuda_losses_match_cpu_kernel(dtypes):
    for shape in LOSS_SHAPES + [(70000, 3), (2, 3, 256, 256)]:
        pred, target, weight = loss_inputs(shape, *dtypes)
        grad = torch.rand(shape[0], dtype=weight.dtype)
        sqsum = E.pseudo_huber_loss(pred, target, weight, C_HUBER)[1]
        _same_on_cuda("weighted_mse_loss", (pred, target, weight), exact=False)
        _same_on_cuda("weighted_mse_loss_backward", (grad, pred, target, weight), exact=False)
        _same_on_cuda("pseudo_huber_loss", (pred, target, weight, C_HUBER), exact=False)
        _same_on_cuda("pseudo_huber_loss_backward", (grad, pred, target, weight, sqsum, C_HUBER), exact=False)
    pred = randn((2 * 33 + 1,), dtypes[0], 6)
    target, weight = randn((2, 33), dtypes[1], 7), torch.rand(2, dtype=weight.dtype)
    def unaligned(t):
        return t[1:].view(2, 33)

    _same_on_cuda("weighted_mse_loss", (pred, target, weight), False, unaligned)
    sqsum = E.pseudo_huber_loss(unaligned(pred), target, weight, C_HUBER)[1]
    args = (torch.rand(2, dtype=weight.dtype), pred, target, weight, sqsum, C_HUBER)
    _same_on_cuda("pseudo_huber_loss_backward", args, False, unaligned, at=(1,))


def lost_in_float32_sum(B=2, M=4096):
    """pred, target (B, M) float32 whose per-sample sum of squares a float32 accumulator gets
    wrong: each run of 4 elements has one square 1.0 followed by three squares x just below
    2**-24 (half an ulp of 1.0), which a float32 running sum of 1.0 + x rounds away, while a
    float64 sum keeps them. S_b = (M/4)(1 + 3x) rounded to float32 once (the CPU kernel) is
    one ulp above the float32 running sum M/4."""
    p = 2.0**-12 * (1 - 2.0**-11)  # p*p = 2**-24 (1 - 2**-10 + 2**-22), exact in float32
    pred = torch.full((B, M), p, dtype=torch.float32)
    pred[:, ::4] = 1.0
    return pred, torch.zeros_like(pred)


def test_loss_forward_accumulates_in_float64():
    # The CPU kernel's float64 sums (the premise of the cuda-marked test below).
    pred, target = lost_in_float32_sum()
    B, M = pred.shape
    x = (pred[0, 1].double() ** 2).item()
    exact = torch.tensor((M // 4) * (1 + 3 * x), dtype=torch.float64).float()
    assert exact != M // 4  # a float32 running sum would be one ulp low
    weight = torch.ones(B)
    assert torch.equal(E.pseudo_huber_loss(pred, target, weight, C_HUBER)[1], exact.expand(B))
    assert torch.equal(E.weighted_mse_loss(pred, target, weight)[1], (exact / M).expand(B))


@pytest.mark.cuda
def test_cuda_loss_forward_accumulates_in_float64_like_the_cpu_kernel():
    # Each sum of squares is accumulated in float64 on both devices and rounded to float32
    # once: the CUDA forward equals the CPU kernel's bit for bit here, where a float32
    # accumulator would lose every small square (see lost_in_float32_sum).
    pred, target = lost_in_float32_sum()
    weight = torch.rand(pred.shape[0], generator=torch.Generator().manual_seed(3))
    _same_on_cuda("weighted_mse_loss", (pred, target, weight), exact=True)
    _same_on_cuda("pseudo_huber_loss", (pred, target, weight, C_HUBER), exact=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_image_conversion_equals_cpu_kernel(dtype):
    # Wide rows are cut into several tiles (16 KB of shared memory per tile).
    for shape in NHWC_SHAPES + [(3, 256, 256, 3), (2, 5, 3000, 3), (2, 4, 7001, 3)]:
        images = uint8_images(shape)
        flip = torch.arange(shape[0]) % 2 == 1
        mean, std = stats(shape[3])
        _same_on_cuda("normalize_images", (images, flip, mean, std, dtype), exact=True)
        _same_on_cuda("normalize_images", (images, None, mean, std, dtype), True, lambda t: t[1:])
        x = E.normalize_images(images, flip, mean, std, dtype)
        _same_on_cuda("to_uint8", (x, mean, std), exact=True)
        _same_on_cuda("to_uint8", (x, mean, std), True, lambda t: t[:, :, :, 1:])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
def test_cuda_patch_layout_equals_cpu_kernel(dtype):
    cases = PATCH_CASES + [((4, 3, 256, 256), 16), ((2, 3, 512, 512), 32), ((1, 3, 64, 8192), 16)]
    for shape, p in cases:
        img = layout_tensor(shape, dtype)
        width = p * (shape[3] // p - 1)
        _same_on_cuda("patchify_hwc", (img, p), exact=True)
        _same_on_cuda("patchify_hwc", (img, p), True, lambda t, w=width: t[:, :, :, 1:1 + w])
        tokens = E.patchify_hwc(img, p)
        _same_on_cuda("unpatchify_hwc", (tokens, p, shape[2]), exact=True)
        flat = torch.cat([tokens.new_zeros(1), tokens.flatten()])  # tokens one element off
        _same_on_cuda("unpatchify_hwc", (flat, p, shape[2]), True, lambda t, s=tokens.shape: t[1:].view(s))


@pytest.mark.cuda
def test_cuda_ops_use_the_current_stream_and_pass_opcheck():
    dev = _cuda_device()
    stream = torch.cuda.Stream(device=dev)
    cases = op_cases()
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        outs = {name: _as_tuple(getattr(E, name)(*_on(dev, args))) for name, args in cases.items()}
    stream.synchronize()
    for name, args in cases.items():
        for o, c in zip(outs[name], _as_tuple(getattr(E, name)(*args))):
            assert_close(o.cpu(), c, **loss_tol(torch.float32), what=name)
        torch.library.opcheck(getattr(E, name).default, _on(dev, args))


def test_the_gpu_tests_run_with_the_cpu_kernels_standing_in(monkeypatch):
    """The cuda-marked tests above with the CPU kernels in the CUDA kernels' place ("cuda" is the
    CPU here). They compare the CUDA kernels only on a GPU, but their argument lists, views and
    shapes are checked now: two of them had wrong ones that the first GPU run would have met.
    (The stream test needs CUDA streams and stays GPU-only.)"""
    monkeypatch.setattr(sys.modules[__name__], "_cuda_device", lambda: torch.device("cpu"))
    for dtype in FLOATS:
        test_cuda_noise_precondition_matches_cpu_kernel_and_reference(dtype)
        test_cuda_image_conversion_equals_cpu_kernel(dtype)
    for dtypes in LOSS_DTYPES:
        test_cuda_losses_match_cpu_kernel(dtypes)
    for dtype in LAYOUT_DTYPES:
        test_cuda_patch_layout_equals_cpu_kernel(dtype)
    test_cuda_loss_forward_accumulates_in_float64_like_the_cpu_kernel()
