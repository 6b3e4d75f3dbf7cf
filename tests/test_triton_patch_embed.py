"""Triton patch embedding (epg_kernels.patch_embed) against epg.reference.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_patch_embed.py

Inputs are drawn in float64 and cast to the test dtype (keeping their strides). The truth is the
reference on the float64 originals; the baseline is the reference on the cast inputs. A kernel
output passes when its error against the truth is at most twice the baseline's largest error
plus a floor, atol·sqrt(n) + rtol·|truth|, n the length of the sum behind each value (C·p² for
the tokens, B·N for grad_weight and grad_bias, B for grad_pos_embed, D for grad_img).
"""

from __future__ import annotations

import dataclasses
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
patch_embed_module = importlib.import_module("epg_kernels.patch_embed")
DEVICE = "cuda" if CUDA else "cpu"
TOL = {  # (atol, rtol) floors on top of twice the baseline's error
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
F32, F16 = torch.float32, torch.float16
# (B, C, H, W, p, D), layout. Interpreter-sized stand-ins for EPG's 256 tokens of 16x16x3 pixels.
CASES = {
    "16px_p4_C3_D96": ((2, 3, 16, 16, 4, 96), "contiguous"),  # 16 tokens, one 48-feature chunk
    "32px_p8_C1_D40_B1": ((1, 1, 32, 32, 8, 40), "contiguous"),  # batch 1, odd width
    "p16_C1_rect": ((1, 1, 32, 48, 16, 24), "contiguous"),  # EPG's patch size: 4 chunks of rows
    "tiles_span_samples": ((3, 3, 24, 40, 4, 72), "contiguous"),  # 60 tokens, 180 rows
    "p2_padded_chunks": ((2, 3, 6, 10, 2, 24), "contiguous"),  # 2 of 8 chunk rows used
    "p6_not_pow2": ((2, 2, 12, 18, 6, 20), "contiguous"),  # columns masked past 6
    "strided": ((2, 3, 16, 24, 4, 48), "strided"),  # every input a non-contiguous view
    "width768": ((1, 3, 16, 16, 4, 768), "contiguous"),  # a real encoder width
}


# --- inputs and comparison -----------------------------------------------------------------------


def _inputs(shape, layout, seed):
    """float64 (img, weight, bias, pos_embed, grad) on DEVICE. ``strided``: a channels-last image,
    the weight a permuted (D, p, p, C) tensor, bias with stride 2, pos_embed the patch rows of a
    (N + 2, D) table (as the model passes it) and grad transposed from (N, B, D)."""
    B, C, H, W, p, D = shape
    N = (H // p) * (W // p)
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    img = randn(B, H, W, C).permute(0, 3, 1, 2)
    weight = randn(D, p, p, C).permute(0, 3, 1, 2) / math.sqrt(C * p * p)
    bias, pos, grad = randn(D, 2)[:, 0], randn(N + 2, D)[2:], randn(N, B, D).transpose(0, 1)
    if layout == "contiguous":
        img, weight, bias, pos, grad = (t.contiguous() for t in (img, weight, bias, pos, grad))
    else:
        assert not any(t.is_contiguous() for t in (img, weight, bias, grad))
    return tuple(t.to(DEVICE) for t in (img, weight, bias, pos, grad))


def _cast(tensors, dtype):
    """Casts keeping the layout (strides and storage offset) of each tensor."""
    return [cast_keeping_layout(t, dtype) for t in tensors]


def _check(name, out, truth, baseline, dtype, n=1, inputs=()):
    check_against_baseline(name, out, truth, baseline, dtype, *TOL[dtype], n=n, inputs=inputs)


def _check_forward_backward(shape, layout, dtype, seed, need_img_grad=True):
    B, C, H, W, p, D = shape
    img, weight, bias, pos, grad = full = _inputs(shape, layout, seed)
    low = _cast(full, dtype)
    imgl, wl, bl, posl, gl = low
    _check("tokens", K["patch_embed"](imgl, wl, bl, posl), R.patch_embed(img, weight, bias, pos),
           R.patch_embed(imgl, wl, bl, posl), dtype, n=C * p * p, inputs=low)
    outs = K["patch_embed_backward"](gl, imgl, wl, posl, need_img_grad)
    truths = R.patch_embed_backward(grad, img, weight, pos, need_img_grad)
    bases = R.patch_embed_backward(gl, imgl, wl, posl, need_img_grad)
    names = ("grad_img", "grad_weight", "grad_bias", "grad_pos_embed")
    N = (H // p) * (W // p)
    for name, o, t, base, n in zip(names, outs, truths, bases, (D, B * N, B * N, B)):
        _check(name, o, t, base, dtype, n=n, inputs=low)


# --- tests ---------------------------------------------------------------------------------------


def test_registered():
    assert K["patch_embed"] is patch_embed_module.patch_embed
    assert K["patch_embed_backward"] is patch_embed_module.patch_embed_backward


def test_chunking():
    """Chunks hold whole patch rows of one channel, are a valid tl.dot width, and cover p."""
    chunking = patch_embed_module._chunking
    expected = {2: (8, 1), 4: (4, 1), 6: (8, 1), 8: (8, 1), 14: (4, 4), 16: (4, 4), 32: (2, 16)}
    assert {p: (c["BLOCK_K"] // c["P_PAD"], c["CHUNKS"]) for p in expected
            for c in [chunking(p)]} == expected
    # 32-feature chunks (the float32 forward): p=16 takes 2 rows × 8 chunks, p=4 keeps 4 × 1
    assert [(chunking(p, 32)["BLOCK_K"], chunking(p, 32)["CHUNKS"]) for p in (4, 16, 32)] == [
        (16, 1), (32, 8), (32, 32)]
    for p, block_k in [(p, k) for p in range(1, 65) for k in (32, 64)]:
        c = chunking(p, block_k)
        rows = c["BLOCK_K"] // c["P_PAD"]
        assert c["P_PAD"] >= p and c["BLOCK_K"] >= 16 and c["BLOCK_K"] & (c["BLOCK_K"] - 1) == 0
        assert rows * c["CHUNKS"] >= p and rows * (c["CHUNKS"] - 1) < p
        assert c["MASK_K"] == (rows * c["CHUNKS"] != p or c["P_PAD"] != p)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_patch_embed_forward_backward(case, dtype):
    shape, layout = CASES[case]
    _check_forward_backward(shape, layout, dtype, seed=len(case))


def test_backward_without_image_gradient():
    """need_img_grad=False: grad_img is the reference's empty (0,) tensor, the rest unchanged."""
    img, weight, _, pos, grad = (t.float() for t in _inputs((2, 3, 8, 12, 4, 24), "contiguous", 3))
    grad_img, *rest = K["patch_embed_backward"](grad, img, weight, pos, False)
    ref_img, *ref_rest = R.patch_embed_backward(grad, img, weight, pos, False)
    assert grad_img.shape == ref_img.shape == (0,) and grad_img.dtype == ref_img.dtype
    for o, r in zip(rest, ref_rest):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes():
    """float16 image and weights with a float32 positional table: the tokens come out float32,
    as the reference promotes them; each gradient takes its own input's dtype."""
    img, weight, bias, pos, grad = full = _inputs((2, 3, 8, 8, 4, 32), "contiguous", seed=4)
    imgl, wl, bl = _cast((img, weight, bias), F16)
    posl, gl = _cast((pos, grad), F32)
    out = K["patch_embed"](imgl, wl, bl, posl)
    _check("tokens", out, R.patch_embed(*full[:4]), R.patch_embed(imgl, wl, bl, posl), F16, n=48)
    outs = K["patch_embed_backward"](gl, imgl, wl, posl, True)
    truths = R.patch_embed_backward(grad, img, weight, pos, True)
    bases = R.patch_embed_backward(gl, imgl, wl, posl, True)
    for name, o, t, base, n in zip(("grad_img", "grad_weight", "grad_bias", "grad_pos_embed"),
                                   outs, truths, bases, (32, 8, 8, 2)):
        _check(name, o, t, base, F16, n=n)
    assert [o.dtype for o in outs] == [F16, F16, F16, F32]


def test_op_layer_autograd():
    """epg.ops.patch_embed with the Triton backend forced: forward and every gradient (image
    included, and the stride-0 gradient `.sum()` sends back) equal the reference's."""
    from epg import _backend, ops

    img64, w64, b64, pos64, grad64 = _inputs((2, 3, 8, 12, 4, 40), "contiguous", seed=5)
    leaves = [t.float().requires_grad_() for t in (img64, w64, b64, pos64)]
    with ops.use_backend("triton", "patch_embed"):
        assert _backend.choose("patch_embed", leaves[0].device) == "triton"
        assert _backend.choose("patch_embed_backward", leaves[0].device) == "triton"
        out = ops.patch_embed(*leaves)
        grads = torch.autograd.grad(out, leaves, grad64.float())
        grads_sum = torch.autograd.grad(ops.patch_embed(*leaves).sum(), leaves)
    torch.testing.assert_close(out.double(), R.patch_embed(img64, w64, b64, pos64),
                               atol=1e-5, rtol=1e-5)
    for g_out, g in ((grad64, grads), (torch.ones_like(grad64), grads_sum)):
        gi, gw, gb, gp = R.patch_embed_backward(g_out, img64, w64, pos64, True)
        for o, r in zip(g, (gi, gw, gb, gp)):
            torch.testing.assert_close(o.double(), r, atol=1e-4, rtol=1e-5)


def test_op_layer_under_autocast(monkeypatch):
    """Under autocast the op layer gives the kernel the image, weight and bias in the autocast
    dtype, as autocast gives them to conv2d (custom ops are not autocast: the kernel used to get
    them float32, and multiplied without tensor cores on a GPU). float16 here: the interpreter
    cannot do bfloat16. Tokens and gradients match the reference under the same autocast; the
    tokens stay float32 (pos_embed is), and so do the parameters' gradients."""
    from epg import _backend, ops

    img64, w64, b64, pos64, grad64 = _inputs((2, 3, 8, 12, 4, 40), "contiguous", seed=10)
    img = img64.float()
    leaves = [t.float().requires_grad_() for t in (w64, b64, pos64)]
    seen, kernel = [], K["patch_embed"]
    monkeypatch.setitem(_backend.info("triton").implementations, "patch_embed",
                        lambda *args: seen.append([a.dtype for a in args]) or kernel(*args))
    with ops.use_backend("triton", "patch_embed"), torch.autocast(DEVICE, dtype=F16):
        out = ops.patch_embed(img, *leaves)
        grads = torch.autograd.grad(out, leaves, grad64.float())
    with torch.autocast(DEVICE, dtype=F16):  # conv2d under autocast, + the float32 table
        ref = R.patch_embed(img, *leaves)
        ref_grads = torch.autograd.grad(ref, leaves, grad64.float())
    assert seen == [[F16, F16, F16, F32]]
    _check("tokens", out, R.patch_embed(img64, w64, b64, pos64), ref, F16, n=48)
    truths = R.patch_embed_backward(grad64, img64, w64, pos64, False)[1:]
    for name, o, t, base, n in zip(("grad_weight", "grad_bias", "grad_pos_embed"), grads, truths,
                                   ref_grads, (12, 12, 2)):  # fmt: skip  (B·N, B·N, B)
        _check(name, o, t, base, F16, n=n)


def test_declines_float64(monkeypatch):
    """float64 has no kernel: the launchers raise, SUPPORTS says why, and automatic choice on a
    CUDA tensor passes it to the reference."""
    from epg import _backend

    img, weight, bias, pos, grad = _inputs((1, 3, 8, 8, 4, 16), "contiguous", seed=6)
    supports = epg_kernels.SUPPORTS
    assert supports["patch_embed"](img.float(), weight.float(), bias.float(), pos.float()) is None
    assert "float64" in supports["patch_embed"](img, weight, bias, pos)
    assert "float64" in supports["patch_embed_backward"](grad, img, weight, pos, True)
    with pytest.raises(TypeError, match="float64"):
        K["patch_embed"](img, weight, bias, pos)
    triton = _backend.info("triton")
    monkeypatch.setitem(_backend._PROBED, "triton", dataclasses.replace(triton, runs_on_cuda=True))
    monkeypatch.setattr(_backend, "AUTO_ORDER", ("triton",))
    cuda = torch.device("cuda")
    f32 = tuple(t.float() for t in (img, weight, bias, pos))
    assert _backend.choose("patch_embed", cuda, f32) == "triton"
    assert _backend.choose("patch_embed", cuda, (img, weight, bias, pos)) == "reference"


def test_invalid_inputs():
    img = torch.randn(1, 3, 8, 8, device=DEVICE)
    w, b, pos = (torch.randn(s, device=DEVICE) for s in ((16, 3, 4, 4), (16,), (4, 16)))
    with pytest.raises(ValueError, match="sides divisible by 3"):
        K["patch_embed"](img, torch.randn(16, 3, 3, 3, device=DEVICE), b, torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"expected 1 > 0 channels"):
        K["patch_embed"](img, w[:, :1], b, pos)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(4, 16\)"):
        K["patch_embed"](img, w, b, pos[:3])
    with pytest.raises(ValueError, match=r"grad must have shape \(1, 4, 16\)"):
        K["patch_embed_backward"](torch.randn(1, 4, 15, device=DEVICE), img, w, pos, True)


def test_empty_batch():
    img = torch.randn(0, 3, 8, 8, device=DEVICE)
    w, b, pos = (torch.randn(s, device=DEVICE) for s in ((16, 3, 4, 4), (16,), (4, 16)))
    assert K["patch_embed"](img, w, b, pos).shape == (0, 4, 16)
    gi, gw, gb, gp = K["patch_embed_backward"](torch.randn(0, 4, 16, device=DEVICE), img, w, pos,
                                               True)
    assert gi.shape == img.shape and gw.shape == w.shape and gp.shape == pos.shape
    assert not (gw.any() or gb.any() or gp.any())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, F16, F32], ids=str)
def test_epg_shapes_on_gpu(dtype):
    """The EPG-XL stem (B=4, 256x256x3, p=16, D=1152; 256 tokens), and bfloat16 numerics, which
    the interpreter cannot check."""
    _check_forward_backward((4, 3, 256, 256, 16, 1152), "contiguous", dtype, seed=7)
    _check_forward_backward((4, 3, 256, 256, 16, 1152), "strided", dtype, seed=8)


@pytest.mark.cuda
def test_p32_on_gpu():
    """EPG-L/32 at 512 px: 256 tokens of 32x32x3 pixels, 16 chunks per channel."""
    _check_forward_backward((2, 3, 512, 512, 32, 1024), "contiguous", torch.bfloat16, seed=9)
