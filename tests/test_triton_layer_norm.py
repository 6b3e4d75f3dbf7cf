"""Triton LayerNorm / LayerNorm+adaLN kernels (epg_kernels.layer_norm) against epg.reference.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_layer_norm.py

Inputs are drawn in float64 and cast to the test dtype; the reference runs on the float64
originals ("truth") and on the cast inputs ("reference in the low dtype"). A kernel output passes
when its error against the truth is at most twice the low-dtype reference's error plus a floor
(atol·sqrt(n) + rtol·|truth|, n the number of rows a gradient sums over, 1 for per-row outputs).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
from triton_support import (
    REPO,
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
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-6
TOL = {  # (atol, rtol) floors
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
    torch.float64: (1e-12, 1e-12),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (B, T, D) and the layout of the inputs handed to the kernels.
CASES = {
    "1x7x37": ((1, 7, 37), "contiguous"),
    "2x258x64": ((2, 258, 64), "contiguous"),
    "3x5x1584": ((3, 5, 1584), "contiguous"),
    # x a (T, B, D) tensor transposed; grad a strided slice; weight, bias strided; shift and
    # scale chunks of one (B, 2D) tensor, as an adaLN linear produces them.
    "transposed": ((3, 20, 48), "strided"),
    # x and grad with a column stride of 2 (x[..., ::2]).
    "column_stride": ((2, 11, 40), "column_stride"),
}


# --- inputs and comparison -----------------------------------------------------------------------


def _inputs(shape, layout, seed):
    """float64 (x, weight, bias, shift, scale, grad), on DEVICE, in the requested layout."""
    B, T, D = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    # Rows with a nonzero mean and various spreads, so the mean subtraction matters.
    x = randn(B, T, D) * (0.5 + randn(B, T, 1).abs()) + 3.0 * randn(B, T, 1)
    weight, bias = 1.0 + 0.2 * randn(D), 0.2 * randn(D)
    shift, scale = 0.5 * randn(B, D), 0.5 * randn(B, D)
    grad = randn(B, T, D)
    if layout == "strided":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        grad = torch.cat([grad, randn(B, T, D)], dim=1).reshape(B, T, 2, D)[:, :, 0]
        weight = torch.stack([weight, randn(D)], dim=1)[:, 0]
        bias = torch.stack([bias, randn(D)], dim=1)[:, 0]
        shift, scale = torch.cat([shift, scale], dim=1).chunk(2, dim=1)
        assert not (x.is_contiguous() or grad.is_contiguous() or shift.is_contiguous())
    elif layout == "column_stride":
        x = torch.stack([x, randn(B, T, D)], dim=-1)[..., 0]
        grad = torch.stack([grad, randn(B, T, D)], dim=-1)[..., 0]
        assert x.stride(-1) == 2 and grad.stride(-1) == 2
    return tuple(t.to(DEVICE) for t in (x, weight, bias, shift, scale, grad))


def _cast(tensors, dtype):
    """Casts keeping the layout (strides) of each tensor."""
    return [cast_keeping_layout(t, dtype) for t in tensors]


def _check(name, out, truth, ref_low, dtype, n_reduce=1, inputs=()):
    check_against_baseline(name, out, truth, ref_low, dtype, *TOL[dtype], n=n_reduce, inputs=inputs)


# --- tests ---------------------------------------------------------------------------------------


def test_package_exports():
    assert epg_kernels.UNAVAILABLE_REASON is None
    assert {"layer_norm", "layer_norm_backward", "ln_modulate", "ln_modulate_backward"} <= set(K)
    assert all(callable(f) for f in K.values())


def test_import_without_triton(monkeypatch):
    """The package imports with Triton missing, exposing no implementations and a reason."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location(
        "_epg_kernels_without_triton", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")],
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.IMPLEMENTATIONS == {}
    assert isinstance(mod.UNAVAILABLE_REASON, str) and "triton" in mod.UNAVAILABLE_REASON


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_norm(case, dtype):
    shape, layout = CASES[case]
    x, w, b, _, _, _ = full = _inputs(shape, layout, seed=1)
    xl, wl, bl = _cast(full[:3], dtype)
    out = K["layer_norm"](xl, wl, bl, EPS)
    _check("y", out, R.layer_norm(x, w, b, EPS), R.layer_norm(xl, wl, bl, EPS), dtype,
           inputs=(xl, wl, bl))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_norm_backward(case, dtype):
    shape, layout = CASES[case]
    x, w, _, _, _, g = _inputs(shape, layout, seed=2)
    gl, xl, wl = _cast((g, x, w), dtype)
    outs = K["layer_norm_backward"](gl, xl, wl, EPS)
    truths = R.layer_norm_backward(g, x, w, EPS)
    lows = R.layer_norm_backward(gl, xl, wl, EPS)
    rows = shape[0] * shape[1]
    for name, o, t, low, n in zip(("grad_x", "grad_weight", "grad_bias"), outs, truths, lows,
                                  (1, rows, rows)):
        _check(name, o, t, low, dtype, n_reduce=n, inputs=(gl, xl, wl))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_ln_modulate(case, dtype):
    shape, layout = CASES[case]
    full = _inputs(shape, layout, seed=3)
    low = _cast(full[:5], dtype)
    out = K["ln_modulate"](*low, EPS)
    _check("out", out, R.ln_modulate(*full[:5], EPS), R.ln_modulate(*low, EPS), dtype,
           inputs=low)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_ln_modulate_backward(case, dtype):
    shape, layout = CASES[case]
    x, w, b, sh, sc, g = _inputs(shape, layout, seed=4)
    low = _cast((g, x, w, b, sh, sc), dtype)
    outs = K["ln_modulate_backward"](*low, EPS)
    truths = R.ln_modulate_backward(g, x, w, b, sh, sc, EPS)
    lows = R.ln_modulate_backward(*low, EPS)
    B, T, _ = shape
    names = ("grad_x", "grad_weight", "grad_bias", "grad_shift", "grad_scale")
    for name, o, t, lo, n in zip(names, outs, truths, lows, (1, B * T, B * T, T, T)):
        _check(name, o, t, lo, dtype, n_reduce=n, inputs=low)


def test_mixed_dtypes():
    """float16 activations with float32 weight, bias, shift and scale (mixed precision):
    every output takes the dtype of its own input, as in the reference."""
    x, w, b, sh, sc, g = _inputs((2, 9, 24), "contiguous", seed=5)
    xl, gl = _cast((x, g), torch.float16)
    wl, bl, shl, scl = _cast((w, b, sh, sc), torch.float32)
    _check("out", K["ln_modulate"](xl, wl, bl, shl, scl, EPS), R.ln_modulate(x, w, b, sh, sc, EPS),
           R.ln_modulate(xl, wl, bl, shl, scl, EPS), torch.float16)
    outs = K["ln_modulate_backward"](gl, xl, wl, bl, shl, scl, EPS)
    truths = R.ln_modulate_backward(g, x, w, b, sh, sc, EPS)
    lows = R.ln_modulate_backward(gl, xl, wl, bl, shl, scl, EPS)
    for name, o, t, lo, n in zip(("grad_x", "grad_weight", "grad_bias", "grad_shift",
                                  "grad_scale"), outs, truths, lows, (1, 18, 18, 9, 9)):
        _check(name, o, t, lo, torch.float16, n_reduce=n)


def test_float64_and_leading_dims():
    """float64 inputs are computed in float64; layer_norm takes any number of leading dims
    (here a 4-D permuted x whose rows cannot be viewed as one (N, D) matrix)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, 40, generator=g, dtype=torch.float64).permute(0, 2, 1, 3)
    w = 1.0 + 0.2 * torch.randn(40, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(40, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 3, 4, 40, generator=g, dtype=torch.float64)
    x, w, b, grad = (t.to(DEVICE) for t in (x, w, b, grad))
    ref = R.layer_norm(x, w, b, EPS)
    _check("y", K["layer_norm"](x, w, b, EPS), ref, ref, torch.float64)
    refs = R.layer_norm_backward(grad, x, w, EPS)
    for name, o, t, n in zip(("grad_x", "grad_weight", "grad_bias"),
                             K["layer_norm_backward"](grad, x, w, EPS), refs, (1, 24, 24)):
        _check(name, o, t, t, torch.float64, n_reduce=n)


def test_empty_inputs():
    x = torch.empty(2, 0, 8, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    sh = sc = torch.zeros(2, 8, device=DEVICE)
    assert K["layer_norm"](x, w, b, EPS).shape == x.shape
    assert K["ln_modulate"](x, w, b, sh, sc, EPS).shape == x.shape
    gx, gw, gb, gsh, gsc = K["ln_modulate_backward"](x, x, w, b, sh, sc, EPS)
    assert gx.shape == x.shape and gsh.shape == (2, 8)
    assert all(not t.any() for t in (gw, gb, gsh, gsc))
    gx, gw, gb = K["layer_norm_backward"](x, x, w, EPS)
    assert gx.shape == x.shape and gw.shape == (8,) and not gw.any() and not gb.any()


def test_rows_wider_than_the_kernel_holds_go_to_the_reference(monkeypatch):
    """On CUDA tensors the automatic choice passes rows over MAX_WIDTH to the reference (the
    kernels keep whole rows in registers); the four SUPPORTS hooks see the right argument."""
    import dataclasses

    from epg import _backend

    supports = epg_kernels.SUPPORTS
    max_width = importlib.import_module("epg_kernels.layer_norm").MAX_WIDTH
    wide, ok = torch.zeros(1, 2, max_width + 1), torch.zeros(1, 2, 1584)
    for x in (wide, ok):
        w, b, mod = torch.ones(x.shape[-1]), torch.zeros(x.shape[-1]), torch.zeros(1, x.shape[-1])
        calls = {
            "layer_norm": (x, w, b, 1e-6),
            "layer_norm_backward": (x, x, w, 1e-6),
            "ln_modulate": (x, w, b, mod, mod, 1e-6),
            "ln_modulate_backward": (x, x, w, b, mod, mod, 1e-6),
        }
        for op, args in calls.items():
            reason = supports[op](*args)
            assert (reason is None) == (x is ok), (op, reason)
    assert f"{max_width + 1} > {max_width}" in supports["layer_norm"](wide, None, None, 1e-6)
    # Pretend Triton runs CUDA tensors here, so the choice among backends can be seen on CPU.
    triton = _backend.info("triton")
    monkeypatch.setitem(_backend._PROBED, "triton", dataclasses.replace(triton, runs_on_cuda=True))
    monkeypatch.setattr(_backend, "AUTO_ORDER", ("triton",))
    cuda = torch.device("cuda")
    assert _backend.choose("ln_modulate_backward", cuda, (ok, ok)) == "triton"
    assert _backend.choose("ln_modulate_backward", cuda, (wide, wide)) == "reference"
