"""Triton gated residual x + gate·y (epg_kernels.residual) against epg.reference.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_residual.py

Inputs are drawn in float64 and cast to the test dtype (keeping their strides). The truth is the
reference on the float64 originals; the baseline is the reference on the cast inputs. A kernel
output passes when its error against the truth is at most twice the baseline's largest error
plus a floor, atol·sqrt(n) + rtol·|truth|, n the number of tokens a value sums over (T for
grad_gate, 1 otherwise).
"""

from __future__ import annotations

import importlib

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
residual_module = importlib.import_module("epg_kernels.residual")
DEVICE = "cuda" if CUDA else "cpu"
TOL = {  # (atol, rtol) floors
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
F32, F16 = torch.float32, torch.float16
# (B, T, D) and the layout of the inputs.
CASES = {
    "1x7x37": ((1, 7, 37), "contiguous"),  # batch 1, odd width below one column tile
    "2x258x96": ((2, 258, 96), "contiguous"),  # EPG's token count, a width not a power of 2
    "3x5x1584": ((3, 5, 1584), "contiguous"),  # EPG-XL decoder width: 12.4 column tiles
    "strided": ((3, 20, 160), "strided"),  # as the model hands them over, and worse
}


# --- inputs and comparison -----------------------------------------------------------------------


def _inputs(shape, layout, seed):
    """float64 (x, gate, y, grad) on DEVICE. ``strided``: x transposed from (T, B, D), gate a
    chunk of a (B, 6·D) adaLN output, y with column stride 2, grad a strided slice."""
    B, T, D = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x, gate, y, grad = randn(B, T, D), randn(B, D), randn(B, T, D), randn(B, T, D)
    if layout == "strided":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        gate = torch.cat([randn(B, 2 * D), gate, randn(B, 3 * D)], dim=1)[:, 2 * D: 3 * D]
        y = torch.stack([y, randn(B, T, D)], dim=-1)[..., 0]
        grad = torch.cat([grad, randn(B, T, D)], dim=1).reshape(B, T, 2, D)[:, :, 0]
        assert not any(t.is_contiguous() for t in (x, gate, y, grad))
    return tuple(t.to(DEVICE) for t in (x, gate, y, grad))


def _cast(tensors, dtype):
    """Casts keeping the layout (strides) of each tensor."""
    return [cast_keeping_layout(t, dtype) for t in tensors]


def _check(name, out, truth, baseline, dtype, n=1, inputs=()):
    check_against_baseline(name, out, truth, baseline, dtype, *TOL[dtype], n=n, inputs=inputs)


def _check_forward_backward(shape, layout, dtype, seed):
    x, gate, y, grad = full = _inputs(shape, layout, seed)
    low = _cast(full, dtype)
    xl, gatel, yl, gradl = low
    _check("out", K["gated_residual"](xl, gatel, yl), R.gated_residual(x, gate, y),
           R.gated_residual(xl, gatel, yl), dtype, inputs=low)
    outs = K["gated_residual_backward"](gradl, gatel, yl)
    truths = R.gated_residual_backward(grad, gate, y)
    bases = R.gated_residual_backward(gradl, gatel, yl)
    for name, o, t, base, n in zip(("grad_gate", "grad_y"), outs, truths, bases, (shape[1], 1)):
        _check(name, o, t, base, dtype, n=n, inputs=low)


# --- tests ---------------------------------------------------------------------------------------


def test_registered():
    assert K["gated_residual"] is residual_module.gated_residual
    assert K["gated_residual_backward"] is residual_module.gated_residual_backward


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_gated_residual_forward_backward(case, dtype):
    shape, layout = CASES[case]
    _check_forward_backward(shape, layout, dtype, seed=len(case))


def test_float64():
    """float64 inputs are computed in float64 (the reference's compute dtype for them)."""
    _check_forward_backward((2, 9, 24), "strided", torch.float64, seed=1)


def test_mixed_dtypes():
    """float16 activations with a float32 gate (mixed precision): each output takes its own
    input's dtype, as in the reference."""
    x, gate, y, grad = full = _inputs((2, 9, 40), "contiguous", seed=2)
    xl, yl, gradl = _cast((x, y, grad), F16)
    (gatel,) = _cast((gate,), F32)
    _check("out", K["gated_residual"](xl, gatel, yl), R.gated_residual(*full[:3]),
           R.gated_residual(xl, gatel, yl), F16)
    outs = K["gated_residual_backward"](gradl, gatel, yl)
    bases = R.gated_residual_backward(gradl, gatel, yl)
    for name, o, t, base, n in zip(("grad_gate", "grad_y"), outs,
                                   R.gated_residual_backward(grad, gate, y), bases, (9, 1)):
        _check(name, o, t, base, F16, n=n)
    assert (outs[0].dtype, outs[1].dtype) == (F32, F16)


def test_op_layer_autograd():
    """epg.ops.gated_residual with the Triton backend forced: forward and gradients (grad_x
    passed through, grad_gate, grad_y) equal the reference's, also for the stride-0 gradient
    that `.sum()` sends back."""
    from epg import _backend, ops

    x64, gate64, y64, grad64 = _inputs((2, 11, 24), "strided", seed=3)
    leaves = [t.float().requires_grad_() for t in (x64, gate64, y64)]
    with ops.use_backend("triton", "gated_residual"):
        assert _backend.choose("gated_residual_backward", leaves[0].device) == "triton"
        out = ops.gated_residual(*leaves)
        grads = torch.autograd.grad(out, leaves, grad64.float())
        grads_sum = torch.autograd.grad(ops.gated_residual(*leaves).sum(), leaves)
    torch.testing.assert_close(out.double(), R.gated_residual(x64, gate64, y64),
                               atol=1e-6, rtol=1e-6)
    for g_out, g in ((grad64, grads), (torch.ones_like(grad64), grads_sum)):
        expected = (g_out, *R.gated_residual_backward(g_out, gate64, y64))
        for o, r in zip(g, expected):
            torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-6)


def test_invalid_inputs():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be \(B, T, D\)"):
        K["gated_residual"](x[0], x[:, 0], x[0])
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 8\)"):
        K["gated_residual"](x, x[:, 0, :7], x)
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3, 8\)"):
        K["gated_residual_backward"](x, x[:, 0], x[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        K["gated_residual"](x, x[:, 0], x.to(torch.int32))


def test_empty_inputs():
    for shape in ((0, 5, 8), (2, 0, 8), (2, 5, 0)):
        x = torch.randn(shape, device=DEVICE)
        gate = torch.randn(shape[0], shape[2], device=DEVICE)
        assert K["gated_residual"](x, gate, x).shape == shape
        grad_gate, grad_y = K["gated_residual_backward"](x, gate, x)
        assert grad_gate.shape == gate.shape and not grad_gate.any() and grad_y.shape == shape


@pytest.mark.cuda
@pytest.mark.parametrize("width", [1152, 1584])
def test_bfloat16_at_epg_shapes(width):
    """bfloat16 at EPG shapes (B=4, T=258), which the interpreter cannot check."""
    _check_forward_backward((4, 258, width), "contiguous", torch.bfloat16, seed=width)
    _check_forward_backward((4, 258, width), "strided", torch.bfloat16, seed=width + 1)
