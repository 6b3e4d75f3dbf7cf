"""More tests of the CPU kernels of ``epg._C``: the gaps a mutation round on csrc/ found.

The CPU kernels promise the references' values bit for bit where an op is elementwise, for
inputs of any float dtype and layout; and every bad argument must be refused by the CPU and the
Meta kernel alike (torch.compile only sees the Meta kernel). Skipped as a whole when the extension is not built.
"""

import math

import pytest
import torch
from helpers import assert_close
from test_extension_ops import randn, sigmas

from epg import reference

_C = pytest.importorskip("epg._C")
E = torch.ops.epg_C

SD, SMIN, C_HUBER = 0.5, 0.008, 0.06
IMAGENET = (list(reference.IMAGENET_MEAN), [2 * s for s in reference.IMAGENET_STD])


def x_in_formula(x0, eps, sigma, c_in):
    """x_in = c_in·(x0 + σ·ε) in float32 (float64 for float64 images), rounded to x0's dtype once,
    with the kernel's own c_in (so that only the elementwise part is compared)."""
    ct = torch.float64 if x0.dtype == torch.float64 else torch.float32
    shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    s, ci = sigma.to(ct).reshape(shape), c_in.to(ct).reshape(shape)
    return ((x0.to(ct) + s * eps.to(ct)) * ci).to(x0.dtype)


def sqrt_rn(t):
    """Correctly rounded square root of a (B,) float32/float64 tensor. torch.sqrt's vectorized CPU
    path is not (AVX512: about one float32 result in six is one ulp off), the kernels' sqrt is."""
    return torch.tensor([math.sqrt(v) for v in t.tolist()], dtype=torch.float64).to(t.dtype)


# --- noise_precondition ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 2, 9, 13), (4, 3, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_noise_precondition_x_in_is_the_formula_rounded_once(dtype, shape):
    """x_in is elementwise: the kernel must round (x0 + σ·ε)·c_in like torch does, bit for bit
    (the CUDA kernel is held to the CPU kernel's bits, so a reordered formula here would move the
    GPU's values too). The existing tests compare with a tolerance of ~10 ulps."""
    x0, eps = randn(shape, dtype, 1), randn(shape, dtype, 2)
    sigma = sigmas(shape[0], torch.float64 if dtype == torch.float64 else torch.float32)
    for mode in ("x0", "edm"):
        x_in, c_in = E.noise_precondition(x0, eps, sigma, SD, SMIN, mode)[:2]
        expected = x_in_formula(x0, eps, sigma, c_in)
        assert torch.equal(x_in, expected), (
            f"{dtype} {mode}: {(x_in != expected).sum().item()} of {x_in.numel()} elements differ "
            "from (x0 + sigma*eps)*c_in rounded once"
        )


# --- losses ---------------------------------------------------------------------------------------


def test_pseudo_huber_backward_takes_any_layout_and_float_dtype_of_sqsum_and_grad():
    """sqsum and grad (B,) may be strided views or of another float dtype than the compute dtype
    (autograd hands over whatever the forward / the next op produced); the kernel must convert
    them, not reinterpret their memory."""
    pred, target = randn((4, 3, 5), torch.float32, 1), randn((4, 3, 5), torch.float32, 2)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    sqsum = E.pseudo_huber_loss(pred, target, weight, C_HUBER)[1]
    grad = torch.tensor([1.0, -2.0, 0.5, 4.0])
    expected = reference.pseudo_huber_loss_backward(grad, pred, target, weight, sqsum, C_HUBER)
    strided_sqsum = torch.stack([sqsum, torch.full_like(sqsum, 1e6)], dim=1)[:, 0]
    assert not strided_sqsum.is_contiguous()
    cases = {
        "strided sqsum": (grad, strided_sqsum),
        "float64 sqsum": (grad, sqsum.double()),
        "float64 grad": (grad.double(), sqsum),
        "bfloat16 grad": (grad.bfloat16(), sqsum),  # these grads are exact in bfloat16
    }
    for what, (gr, sq) in cases.items():
        g = E.pseudo_huber_loss_backward(gr, pred, target, weight, sq, C_HUBER)
        assert_close(g, expected, atol=1e-6, rtol=1e-6, what=what)


def test_weighted_mse_backward_converts_grad_of_another_float_dtype():
    """Same for the weighted MSE: a float64 grad with a float32 pred is converted."""
    pred, target = randn((3, 7), torch.float32, 1), randn((3, 7), torch.float32, 2)
    weight, grad = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, -2.0, 0.5])
    expected = reference.weighted_mse_loss_backward(grad, pred, target, weight)
    for gr in (grad.double(), grad.half()):
        g = E.weighted_mse_loss_backward(gr, pred, target, weight)
        assert_close(g, expected, atol=1e-6, rtol=1e-6, what=f"{gr.dtype} grad")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_loss_refuses_float32_target_for_float32_or_float64_pred(device):
    """A float32 target is only allowed for a bfloat16/float16 pred; a float64 pred with a
    float32 target must be refused on the Meta kernel too (torch.compile traces with it)."""
    p, w = torch.randn(2, 5, dtype=torch.float64, device=device), torch.rand(2, device=device)
    with pytest.raises(RuntimeError, match=r"or torch.float32 for a torch.bfloat16/torch.float16 `pred`"):
        E.weighted_mse_loss(p, p.float(), w.double())
    with pytest.raises(RuntimeError, match=r"or torch.float32 for a torch.bfloat16/torch.float16 `pred`"):
        E.pseudo_huber_loss(p, p.float(), w.double(), C_HUBER)
    with pytest.raises(RuntimeError, match=r"or torch.float32 for a torch.bfloat16/torch.float16 `pred`"):
        E.weighted_mse_loss_backward(w.double(), p, p.float(), w.double())


@pytest.mark.parametrize("c", [math.inf, math.nan, -0.06, 0.0])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_pseudo_huber_refuses_non_finite_or_non_positive_c(device, c):
    """c must be a finite number > 0: c = inf would silently give a zero loss and gradient."""
    p, w = torch.randn(2, 5, device=device), torch.rand(2, device=device)
    with pytest.raises(RuntimeError, match=r"`c` to be a finite number > 0"):
        E.pseudo_huber_loss(p, p, w, c)
    with pytest.raises(RuntimeError, match=r"`c` to be a finite number > 0"):
        E.pseudo_huber_loss_backward(w, p, p, w, w, c)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_loss_per_sample_arguments_must_be_float(device):
    """weight, grad and sqsum are (B,) float tensors: an integer tensor names the expected dtypes
    instead of being converted silently."""
    p = torch.randn(2, 5, device=device)
    w, iw = torch.rand(2, device=device), torch.ones(2, dtype=torch.int64, device=device)
    float_msg = r"to have dtype torch.float32, torch.float64, torch.bfloat16 or torch.float16"
    with pytest.raises(RuntimeError, match=r"`weight` " + float_msg):
        E.weighted_mse_loss(p, p, iw)
    with pytest.raises(RuntimeError, match=r"`weight` " + float_msg):
        E.pseudo_huber_loss(p, p, iw, C_HUBER)
    with pytest.raises(RuntimeError, match=r"`grad` " + float_msg):
        E.weighted_mse_loss_backward(iw, p, p, w)
    with pytest.raises(RuntimeError, match=r"`sqsum` " + float_msg):
        E.pseudo_huber_loss_backward(w, p, p, w, iw, C_HUBER)


@pytest.mark.parametrize("shape", [(1, 7), (3, 3, 5, 7), (2, 20011)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_loss_backward_is_the_reference_bit_for_bit(dtype, shape):
    """The backward is elementwise (factor_b·(p − t), factor_b = grad_b·w_b·2/M or
    grad_b·w_b·2/sqrt(S_b + c²)): the same operations as the reference in the same order, so the
    same bits (up to torch.sqrt's own rounding, replaced by sqrt_rn); the CUDA kernel is held to these."""
    pred, target = randn(shape, dtype, 1), randn(shape, dtype, 2)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 100).to(ct)
    grad = randn((shape[0],), ct, 7)
    g = E.weighted_mse_loss_backward(grad, pred, target, weight)
    g_ref = reference.weighted_mse_loss_backward(grad, pred, target, weight)
    assert torch.equal(g, g_ref), f"weighted_mse_loss_backward: {(g != g_ref).sum().item()} elements differ"
    sqsum = E.pseudo_huber_loss(pred, target, weight, C_HUBER)[1]
    g = E.pseudo_huber_loss_backward(grad, pred, target, weight, sqsum, C_HUBER)
    # The reference's formula with a correctly rounded sqrt (see sqrt_rn).
    factor = grad * weight * 2 / sqrt_rn(sqsum + C_HUBER * C_HUBER)
    d = pred.to(ct) - target.to(ct)
    g_ref = (factor.reshape((-1,) + (1,) * (d.dim() - 1)) * d).to(dtype)
    assert torch.equal(g, g_ref), f"pseudo_huber_loss_backward: {(g != g_ref).sum().item()} elements differ"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_from_its_statistic_is_rounded_like_the_reference(dtype):
    """Only the sum of squares S_b may differ from torch's (summation order); the loss must follow
    from the returned statistic exactly as the reference computes it: w·mse, and (w·S)/sqrt(S + c²)."""
    pred, target = randn((6, 3, 7, 5), dtype, 4), randn((6, 3, 7, 5), dtype, 5)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(6, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 100).to(ct)
    loss, mse = E.weighted_mse_loss(pred, target, weight)
    assert torch.equal(loss, weight * mse), "weighted_mse_loss: loss != weight * mse"
    loss, sqsum = E.pseudo_huber_loss(pred, target, weight, C_HUBER)
    expected = weight * sqsum / sqrt_rn(sqsum + C_HUBER * C_HUBER)
    assert torch.equal(loss, expected), f"pseudo_huber_loss: {loss.tolist()} != {expected.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_losses_of_an_empty_batch(dtype):
    """B = 0 (an empty shard of a batch) gives empty per-sample results and gradients, not a
    division by a zero sample count."""
    pred = torch.empty(0, 3, 4, dtype=dtype)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.empty(0, dtype=ct)
    for name, extra in (("weighted_mse_loss", ()), ("pseudo_huber_loss", (C_HUBER,))):
        loss, stat = getattr(E, name)(pred, pred, w, *extra)
        assert loss.shape == (0,) and stat.shape == (0,) and loss.dtype == ct, name
        stat_arg = (stat,) if extra else ()
        g = getattr(E, name + "_backward")(w, pred, pred, w, *stat_arg, *extra)
        assert g.shape == pred.shape and g.dtype == dtype, name


# --- normalize_images / to_uint8 --------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_image_conversion_refuses_non_finite_mean(device):
    """A NaN or infinite mean would turn every pixel into NaN/inf (normalize) or garbage bytes
    (to_uint8); both ops must refuse it, like a zero std."""
    u = torch.zeros(2, 4, 4, 3, dtype=torch.uint8, device=device)
    x = torch.zeros(2, 3, 4, 4, device=device)
    std = [0.5] * 3
    for bad in (math.nan, math.inf):
        mean = [0.5, bad, 0.5]
        with pytest.raises(RuntimeError, match=r"finite `mean` and finite non-zero `std`"):
            E.normalize_images(u, None, mean, std, torch.float32)
        with pytest.raises(RuntimeError, match=r"finite `mean` and finite non-zero `std`"):
            E.to_uint8(x, mean, std)
        with pytest.raises(RuntimeError, match=r"finite `mean` and finite non-zero `std`"):
            E.to_uint8(x, [0.5] * 3, [0.5, bad, 0.5])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_to_uint8_checks_mean_and_std(device):
    """to_uint8 needs one mean and std per channel and a non-zero std, as normalize_images does
    (the existing error tests only cover normalize_images)."""
    x = torch.zeros(2, 3, 4, 4, device=device)
    with pytest.raises(RuntimeError, match=r"one value per channel \(C = 3\)"):
        E.to_uint8(x, [0.5], [0.5])
    with pytest.raises(RuntimeError, match=r"one value per channel \(C = 3\)"):
        E.to_uint8(x, [0.5] * 3, [0.5] * 4)
    with pytest.raises(RuntimeError, match=r"finite non-zero `std`"):
        E.to_uint8(x, [0.5] * 3, [0.5, 0.0, 0.5])
    with pytest.raises(RuntimeError, match=r"\(B, C, H, W\) with 1 <= C <= 16"):
        E.to_uint8(torch.zeros(1, 17, 2, 2, device=device), [0.5] * 17, [0.5] * 17)
    with pytest.raises(RuntimeError, match=r"\(B, C, H, W\) with 1 <= C <= 16"):
        E.to_uint8(torch.zeros(1, 0, 2, 2, device=device), [], [])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_normalize_images_refuses_zero_channels_and_a_2d_flip(device):
    """C = 0 images and a (B, 1) flip are malformed inputs, refused with the expected form (a
    zero-channel batch would otherwise come back as an empty tensor without a word)."""
    with pytest.raises(RuntimeError, match=r"\(B, H, W, C\) with 1 <= C <= 16"):
        E.normalize_images(torch.zeros(2, 4, 4, 0, dtype=torch.uint8, device=device), None, [], [], torch.float32)
    u = torch.zeros(2, 4, 4, 3, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match=r"`flip` to be a 1-D tensor of shape \(B,\)"):
        E.normalize_images(u, torch.ones(2, 1, dtype=torch.bool, device=device), *IMAGENET, torch.float32)


# --- patch layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_patch_layout_refuses_malformed_arguments(device):
    """16-byte elements, tokens without features and a zero height are refused naming the
    expected form (on the Meta kernel too), rather than producing an empty or garbage layout."""
    with pytest.raises(RuntimeError, match=r"1, 2, 4 or 8 bytes per element"):
        E.patchify_hwc(torch.zeros(1, 3, 8, 8, dtype=torch.complex128, device=device), 4)
    with pytest.raises(RuntimeError, match=r"1, 2, 4 or 8 bytes per element"):
        E.unpatchify_hwc(torch.zeros(1, 4, 16, dtype=torch.complex128, device=device), 4, 8)
    with pytest.raises(RuntimeError, match=r"p\*p = 16 dividing the last dim"):
        E.unpatchify_hwc(torch.zeros(1, 4, 0, device=device), 4, 8)
    with pytest.raises(RuntimeError, match=r"`height` to be a multiple of patch_size = 4"):
        E.unpatchify_hwc(torch.zeros(1, 4, 48, device=device), 4, 0)
    with pytest.raises(RuntimeError, match=r"`patch_size` >= 1"):
        E.unpatchify_hwc(torch.zeros(1, 4, 48, device=device), 0, 8)


# --- noise_precondition arguments and registration ------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_noise_precondition_checks_every_dim_and_the_device_of_sigma(device):
    """eps must match x0 in every dim (the last one too), and sigma must live on x0's device:
    the error names `sigma` and `x0`, not an internal kernel."""
    x0 = torch.randn(2, 3, 4, 4, device=device)
    sigma = torch.rand(2, device=device)
    with pytest.raises(RuntimeError, match=r"`eps` to have the shape of `x0`"):
        E.noise_precondition(x0, torch.randn(2, 3, 4, 5, device=device), sigma, SD, SMIN, "x0")
    if device == "cpu":  # (a meta sigma with CPU images dispatches to the CPU kernel)
        with pytest.raises(RuntimeError, match=r"`sigma` on the device of `x0` \(cpu\)"):
            E.noise_precondition(x0, x0, sigma.to("meta"), SD, SMIN, "x0")


def test_loss_target_must_match_pred_in_every_dim():
    """Same for the losses: a target differing from pred in its last dim only is refused."""
    p, w = torch.randn(2, 3, 5), torch.rand(2)
    with pytest.raises(RuntimeError, match=r"`target` to have the shape of `pred`"):
        E.weighted_mse_loss(p, torch.randn(2, 3, 4), w)


def test_every_op_is_tagged_pt2_compliant():
    """torch.compile traces through ops tagged pt2_compliant_tag without graph breaks; every op
    of epg_C is registered with it."""
    names = [
        "edm_scalings", "noise_precondition", "weighted_mse_loss", "weighted_mse_loss_backward",
        "pseudo_huber_loss", "pseudo_huber_loss_backward", "normalize_images", "to_uint8",
        "patchify_hwc", "unpatchify_hwc",
    ]
    untagged = [n for n in names if torch.Tag.pt2_compliant_tag not in getattr(E, n).default.tags]
    assert not untagged, f"ops without pt2_compliant_tag: {untagged}"
