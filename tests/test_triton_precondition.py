"""Triton noise preconditioning and stage-2 losses (epg_kernels.precondition) against epg.reference.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_precondition.py

Inputs are drawn in float64 and cast to the test dtype (keeping their strides). The truth is the
reference on the float64 originals (σ in float64 too); the baseline is the reference on the cast
inputs. A kernel output passes when its error against the truth is at most twice the baseline's
largest error plus a floor, atol·sqrt(n) + rtol·|truth|, n the number of elements a value sums
(C·H·W for per-sample sums and losses, 1 otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
from triton_support import (
    cast_keeping_layout,
    check_against_baseline,
    import_epg_kernels,
    require_triton,
)

CUDA = torch.cuda.is_available()
require_triton()
pytestmark = pytest.mark.triton

from epg import reference as R  # noqa: E402  (after the module-level skip)

epg_kernels = import_epg_kernels()
K = epg_kernels.IMPLEMENTATIONS
precondition_module = importlib.import_module("epg_kernels.precondition")
DEVICE = "cuda" if CUDA else "cpu"
TOL = {  # (atol, rtol) floors
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
F64, F32, F16 = torch.float64, torch.float32, torch.float16
SD, SMIN, C_HUBER = 0.5, 0.008, 0.06
# image shape and layout
CASES = {
    "1x3x5x7": ((1, 3, 5, 7), "contiguous"),  # batch 1, a length under one block, odd sizes
    "3x3x40x40": ((3, 3, 40, 40), "contiguous"),  # 4.7 blocks per sample: split over programs
    "2x3x64x64-channels-last": ((2, 3, 64, 64), "channels_last"),  # copied to (B, M) once
    "4x1200-transposed": ((4, 1200), "transposed"),  # (B, M) view with stride_m = B, no copy
}


# --- inputs and comparison -----------------------------------------------------------------------


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.T.contiguous().T
    return t


def _images(shape, layout, seed, count):
    g = torch.Generator().manual_seed(seed)
    out = [_layout(torch.randn(shape, generator=g, dtype=F64), layout) for _ in range(count)]
    if layout != "contiguous":
        assert not any(t.is_contiguous() for t in out)
    return [t.to(DEVICE) for t in out]


LOG_SIGMA_RANGE = (math.log(0.008), math.log(320.0))  # shifted σ̃_min … σ̃_max at 256 px


def _per_sample(B, seed, low=LOG_SIGMA_RANGE[0], high=LOG_SIGMA_RANGE[1]):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(B, dtype=F64).uniform_(low, high, generator=g).exp().to(DEVICE)


def _cast(tensors, dtype):
    return [cast_keeping_layout(t, dtype) for t in tensors]


def _check(name, out, truth, baseline, dtype, n=1, inputs=(), out_dtype=None):
    check_against_baseline(name, out, truth, baseline, dtype, *TOL[dtype], n=n, inputs=inputs,
                           out_dtype=out_dtype)  # fmt: skip


# --- registration ---------------------------------------------------------------------------------

OPS = (
    "noise_precondition", "noise_precondition_backward", "weighted_mse_loss",
    "weighted_mse_loss_backward", "pseudo_huber_loss", "pseudo_huber_loss_backward",
)  # fmt: skip


def test_registered():
    for name in OPS:
        assert K[name] is getattr(precondition_module, name)


def test_autotune_configs_cover_the_interpreter_block():
    """The fixed interpreter configuration is one of the GPU's candidates, so the tested block
    size is one a GPU may pick; the chunk rule gives every program at least one block."""
    blocks = [cfg.kwargs["BLOCK"] for cfg in precondition_module.AUTOTUNE_CONFIGS]
    assert precondition_module._INTERPRETER_BLOCK in blocks
    assert len(set(blocks)) > 1
    for B, M in ((1, 10), (1, 3 * 256 * 256), (256, 3 * 256 * 256), (7, 5000)):
        kernel = precondition_module._scaled_difference_kernel
        chunks = precondition_module._chunks(B, M, torch.device(DEVICE), kernel)
        assert 1 <= chunks <= max(1, math.ceil(M / min(blocks)))


def test_reducing_kernels_are_not_autotuned():
    """A sum's order follows the block and warp count: an autotuner's timing-dependent pick
    would change the losses' last bits between processes (and break exact resume on a GPU)."""
    m = precondition_module
    assert set(m._TUNED) == {m._precondition_fwd_kernel, m._scaled_difference_kernel}
    assert m._REDUCTION_CONFIG["BLOCK"] in [cfg.kwargs["BLOCK"] for cfg in m.AUTOTUNE_CONFIGS]


# --- noise_precondition ----------------------------------------------------------------------------


def _check_precondition(shape, layout, dtype, mode, seed):
    x0, eps, grad_x_in = full = _images(shape, layout, seed, 3)
    B = shape[0]
    sigma64 = _per_sample(B, seed + 1)
    grads64 = [_per_sample(B, seed + 2 + i, -1.0, 1.0) - 1.5 for i in range(4)]
    low = _cast(full, dtype)
    sigma, grads = sigma64.float(), [g.float() for g in grads64]
    args = (SD, SMIN, mode)

    outs = K["noise_precondition"](low[0], low[1], sigma, *args)
    truths = R.noise_precondition(x0, eps, sigma64, *args)
    bases = R.noise_precondition(low[0], low[1], sigma, *args)
    for name, o, t, base in zip(("x_in", "c_in", "c_skip", "c_out", "t_cond"), outs, truths, bases):
        _check(name, o, t, base, dtype if name == "x_in" else F32, inputs=low)

    outs = K["noise_precondition_backward"](low[2], *grads, low[0], low[1], sigma, *args)
    truths = R.noise_precondition_backward(grad_x_in, *grads64, x0, eps, sigma64, *args)
    bases = R.noise_precondition_backward(low[2], *grads, low[0], low[1], sigma, *args)
    M = math.prod(shape[1:])
    for name, o, t, base, n in zip(("grad_x0", "grad_eps", "grad_sigma"), outs, truths, bases, (1, 1, M)):
        _check(name, o, t, base, dtype if name != "grad_sigma" else F32, n=n, inputs=low)


@pytest.mark.parametrize("mode", ["x0", "edm"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_noise_precondition_forward_backward(case, dtype, mode):
    shape, layout = CASES[case]
    _check_precondition(shape, layout, dtype, mode, seed=len(case))


def test_noise_precondition_float64_images():
    """float64 images (float32 σ) are computed in float64, as the reference does."""
    _check_precondition((2, 3, 9, 11), "channels_last", F64, "edm", seed=4)


def test_noise_precondition_scalings_are_the_references():
    """The in-kernel scalings equal edm_scalings in float32 (correctly rounded sqrt and division;
    t_cond through float64 as the reference) at σ from σ̃_min to σ̃_max·4, both modes. On a GPU
    torch's rsqrt is within 2 ulp, not correctly rounded: there the float64 scalings are the
    yardstick, with room for the kernel's own roundings (each op rounded once, no FMA)."""
    sigma = torch.tensor([0.008, 0.01, 0.3, 0.5, 1.0, 80.0, 320.0, 1280.0], device=DEVICE)
    x0 = torch.zeros(8, 3, device=DEVICE)
    for mode in ("x0", "edm"):
        outs = K["noise_precondition"](x0, x0, sigma, SD, SMIN, mode)[1:]
        if sigma.is_cuda:
            expected, rtol = R.edm_scalings(sigma.double(), SD, SMIN, mode), 4e-7
        else:
            expected, rtol = R.edm_scalings(sigma, SD, SMIN, mode), 2e-7
        for o, r in zip(outs, expected):
            torch.testing.assert_close(o, r.to(o.dtype), rtol=rtol, atol=0)
    c_skip, c_out = K["noise_precondition"](x0[:1], x0[:1], sigma[:1], SD, SMIN, "edm")[2:4]
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # D(x, σ̃_min) = x exactly


# --- losses ----------------------------------------------------------------------------------------


def _check_loss(name, shape, layout, dtype, seed, target_dtype=None):
    pred, target = full = _images(shape, layout, seed, 2)
    B = shape[0]
    weight64, grad64 = _per_sample(B, seed + 1, -2.0, 2.0), _per_sample(B, seed + 2, -1.0, 1.0)
    pl, tl_ = _cast(full[:1], dtype)[0], _cast(full[1:], target_dtype or dtype)[0]
    weight, grad = weight64.float(), grad64.float()
    extra = (C_HUBER,) if name == "pseudo_huber_loss" else ()
    M = math.prod(shape[1:])
    out_dtype = F64 if dtype == F64 else F32

    outs = K[name](pl, tl_, weight, *extra)
    truths = getattr(R, name)(pred, target, weight64, *extra)
    bases = getattr(R, name)(pl, tl_, weight, *extra)
    for label, o, t, base in zip(("loss", "statistic"), outs, truths, bases):
        _check(f"{name} {label}", o, t, base, dtype, n=M, out_dtype=out_dtype)

    stat, stat64, stat_base = outs[1], truths[1], bases[1]
    extra_b = (stat, C_HUBER) if extra else ()
    o = K[f"{name}_backward"](grad, pl, tl_, weight, *extra_b)
    t = getattr(R, f"{name}_backward")(grad64, pred, target, weight64, *((stat64, C_HUBER) if extra else ()))
    base = getattr(R, f"{name}_backward")(grad, pl, tl_, weight, *((stat_base, C_HUBER) if extra else ()))
    _check(f"{name}_backward", o, t, base, dtype, inputs=(pl, tl_))


@pytest.mark.parametrize("name", ["weighted_mse_loss", "pseudo_huber_loss"])
@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_loss_forward_backward(case, dtype, name):
    shape, layout = CASES[case]
    _check_loss(name, shape, layout, dtype, seed=len(case) + len(name))


@pytest.mark.parametrize("name", ["weighted_mse_loss", "pseudo_huber_loss"])
def test_loss_float16_prediction_with_float32_target(name):
    """Mixed precision: a float16 network output against a float32 x0 target."""
    _check_loss(name, (3, 3, 17, 19), "contiguous", F16, seed=7, target_dtype=F32)


def test_pseudo_huber_normaliser_and_zero_weight():
    """S/sqrt(S + c²) for pred = target + a constant, and weight 0 (t = r) gives a zero loss
    and a zero gradient."""
    target = torch.zeros(2, 3, 8, 8, device=DEVICE)
    pred = target + 0.01
    S = 0.01**2 * 3 * 64
    loss, sqsum = K["pseudo_huber_loss"](pred, target, torch.tensor([1.0, 0.0], device=DEVICE), C_HUBER)
    torch.testing.assert_close(sqsum, torch.full((2,), S, device=DEVICE), rtol=1e-6, atol=0)
    expected = S / math.sqrt(S + C_HUBER**2)
    torch.testing.assert_close(loss, torch.tensor([expected, 0.0], device=DEVICE), rtol=1e-6, atol=0)
    grad = K["pseudo_huber_loss_backward"](torch.ones(2, device=DEVICE), pred, target,
                                           torch.tensor([1.0, 0.0], device=DEVICE), sqsum, C_HUBER)
    assert (grad[1] == 0).all() and (grad[0] > 0).all()


# --- the op layer -----------------------------------------------------------------------------------


def test_op_layer_autograd_matches_reference():
    """epg.ops with the Triton backend forced for all three ops: values and the gradients of
    x0, ε, σ, the network output and the weight equal the reference backend's."""
    from epg import ops

    g = torch.Generator().manual_seed(11)

    def run(backend):
        x0, eps = (torch.randn(3, 3, 12, 12, generator=g, dtype=F64).float() for _ in range(2))
        sigma = (torch.rand(3, generator=g, dtype=F64) * 4 + 0.1).float()
        weight = torch.rand(3, generator=g, dtype=F64).float()
        leaves = [t.to(DEVICE).requires_grad_() for t in (x0, eps, sigma, weight)]
        x0, eps, sigma, weight = leaves
        names = ("noise_precondition", "weighted_mse_loss", "pseudo_huber_loss")
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(ops.use_backend(backend, name))
            x_in, _, c_skip, c_out, t_cond = ops.noise_precondition(x0, eps, sigma, mode="edm")
            out = c_skip[:, None, None, None] * x_in + c_out[:, None, None, None] * x_in.tanh()
            loss = ops.weighted_mse_loss(out, x0.detach(), weight).sum()
            loss = loss + ops.pseudo_huber_loss(out, x0.detach() * 0.5, weight).sum() + t_cond.sum() * 1e-3
            loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    g.manual_seed(11)
    ref = run("reference")
    g.manual_seed(11)
    tri = run("triton")
    for name, a, b in zip(("loss", "x0", "eps", "sigma", "weight"), tri, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


def _stage2_inputs():
    g = torch.Generator().manual_seed(5)
    x0, eps, out = (torch.randn(2, 3, 8, 8, generator=g).to(DEVICE) for _ in range(3))
    sigma = torch.tensor([0.3, 5.0], device=DEVICE)
    weight = torch.tensor([2.0, 0.5], device=DEVICE)
    return x0, eps, out, sigma, weight


def test_opcheck_with_the_triton_backend():
    """The custom ops' registrations (fake kernels, autograd, schemas) hold with these kernels."""
    from epg import ops

    x0, eps, out, sigma, weight = _stage2_inputs()
    leaves = [t.clone().requires_grad_() for t in (x0, eps, sigma)]
    cases = {
        "noise_precondition": (*leaves, SD, SMIN, "edm"),
        "weighted_mse_loss": (out.clone().requires_grad_(), x0, weight.clone().requires_grad_()),
        "pseudo_huber_loss": (out.clone().requires_grad_(), x0, weight, C_HUBER),
    }
    for name, args in cases.items():
        with ops.use_backend("triton", name):
            torch.library.opcheck(getattr(torch.ops.epg, name).default, args)


def test_compiled_fullgraph_equals_eager_with_the_triton_backend():
    from epg import ops

    x0, eps, _, sigma, weight = _stage2_inputs()
    lin = torch.randn(3, 3, device=DEVICE, requires_grad=True)

    def step(x0, eps, sigma, weight, lin):
        x_in, _, c_skip, c_out, _ = ops.noise_precondition(x0, eps, sigma, SD, SMIN, "edm")
        net = torch.einsum("bchw,cd->bdhw", x_in, lin)
        d = c_skip.view(-1, 1, 1, 1) * (x0 + sigma.view(-1, 1, 1, 1) * eps) + c_out.view(-1, 1, 1, 1) * net
        return ops.weighted_mse_loss(net, x0, weight).mean() + ops.pseudo_huber_loss(d, x0, weight).mean()

    with contextlib.ExitStack() as stack:
        for name in ("noise_precondition", "weighted_mse_loss", "pseudo_huber_loss"):
            stack.enter_context(ops.use_backend("triton", name))
        eager = step(x0, eps, sigma, weight, lin)
        (grad_eager,) = torch.autograd.grad(eager, lin)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, eps, sigma, weight, lin)
        (grad_compiled,) = torch.autograd.grad(compiled, lin)
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)


def test_automatic_choice_passes_float64_sigma_to_the_reference():
    from epg import _backend

    x0 = torch.zeros(2, 4, device=DEVICE)
    check = epg_kernels.SUPPORTS["noise_precondition"]
    assert check(x0, x0, torch.ones(2, device=DEVICE), SD, SMIN, "x0") is None
    reason = check(x0, x0, torch.ones(2, dtype=F64, device=DEVICE), SD, SMIN, "x0")
    assert reason and "float64" in reason
    assert "noise_precondition" in _backend.info("triton").supports


# --- bad input and edge cases ---------------------------------------------------------------------


def test_invalid_inputs():
    x = torch.zeros(2, 3, 4, 4, device=DEVICE)
    s = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="eps"):
        K["noise_precondition"](x, x[:, :2], s, SD, SMIN, "x0")
    with pytest.raises(ValueError, match="sigma must be"):
        K["noise_precondition"](x, x, s[:1], SD, SMIN, "x0")
    with pytest.raises(TypeError, match="float32"):
        K["noise_precondition"](x, x, s.double(), SD, SMIN, "x0")
    with pytest.raises(ValueError, match="mode"):
        K["noise_precondition"](x, x, s, SD, SMIN, "v")
    with pytest.raises(TypeError, match="dtype"):
        K["weighted_mse_loss"](x.int(), x.int(), s)
    with pytest.raises(ValueError, match="weight"):
        K["pseudo_huber_loss"](x, x, s[:1], C_HUBER)
    with pytest.raises(ValueError, match="target"):
        K["weighted_mse_loss"](x, x[:, :1], s)


def test_empty_batch_and_empty_samples():
    for shape in ((0, 3, 4, 4), (2, 0)):
        x = torch.zeros(shape, device=DEVICE)
        s = torch.ones(shape[0], device=DEVICE)
        out = K["noise_precondition"](x, x, s, SD, SMIN, "edm")
        assert out[0].shape == shape and out[1].shape == (shape[0],)
        grads = K["noise_precondition_backward"](x, s, s, s, s, x, x, s, SD, SMIN, "edm")
        torch.testing.assert_close(grads[2], R.noise_precondition_backward(x, s, s, s, s, x, x, s, SD, SMIN, "edm")[2])
        loss, stat = K["weighted_mse_loss"](x, x, s)
        assert loss.shape == (shape[0],)
        assert K["pseudo_huber_loss_backward"](s, x, x, s, stat, C_HUBER).shape == shape


# --- GPU only ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="bfloat16 arithmetic needs a GPU (the interpreter gets it wrong)")
@pytest.mark.parametrize("mode", ["x0", "edm"])
def test_bfloat16_at_imagenet_shapes(mode):
    """bfloat16 at 256 px (and a batch large enough to engage autotuning's larger blocks)."""
    _check_precondition((16, 3, 256, 256), "contiguous", torch.bfloat16, mode, seed=21)
    for name in ("weighted_mse_loss", "pseudo_huber_loss"):
        _check_loss(name, (16, 3, 256, 256), "contiguous", torch.bfloat16, seed=22, target_dtype=F32)
