"""Triton flash attention (epg_kernels.attention) against epg.reference.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_attention.py

Inputs are drawn in float64 and cast to the test dtype. The truth is the reference on the float64
originals; the baseline is plain PyTorch attention run in the test dtype (scores, probabilities
and products rounded to it, as flash attention rounds them), differentiated by autograd. A kernel
output passes when its error against the truth is at most twice the baseline's largest error
plus a floor (atol + rtol·|truth|): the rule adapts to dtype, head dim and sequence length.
"""

from __future__ import annotations

import dataclasses
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
# The module itself (the package attribute `attention` is the launcher of that name).
attention_module = importlib.import_module("epg_kernels.attention")
DEVICE = "cuda" if CUDA else "cpu"
TOL = {  # (atol, rtol) floors on top of twice the baseline's error
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
F32, F16 = torch.float32, torch.float16
# (B, T, H, Dh), dtypes. Under the interpreter the inner tile is 64 tokens for padded head rows
# up to 256 bytes (float32 Dh <= 64), else 32; the remainder runs in masked 16-token tiles.
CASES = {
    "T1": ((1, 1, 1, 16), (F32,)),  # a single token
    "Dh8": ((1, 40, 1, 8), (F32,)),  # head dim below the 16-wide dot: masked; three tail tiles
    "Dh64_full_tiles": ((2, 64, 1, 64), (F32, F16)),  # one full tile, no tail
    "Dh72": ((2, 17, 3, 72), (F32, F16)),  # chunks 64 + 16, columns masked past 72
    "Dh96_two_blocks": ((1, 100, 1, 96), (F32, F16)),  # chunks 64 + 32; two query blocks
    "Dh120": ((1, 17, 2, 120), (F32, F16)),  # one 128 chunk, columns masked past 120
    "Dh256": ((1, 9, 1, 256), (F32,)),  # the largest head dim
    "Dh256_three_blocks": ((1, 70, 1, 256), (F32,)),  # float32's 32-row blocks: 3, a full tile
    "T258_Dh72": ((1, 258, 1, 72), (F32,)),  # EPG's token count and decoder head dim
    "Dh176_three_blocks": ((1, 70, 1, 176), (F16,)),  # 16-bit backward's 32-row blocks, 128 + 64
}
PARAMS = [
    pytest.param(case, dtype, id=f"{case}-{str(dtype).removeprefix('torch.')}")
    for case, (_, dtypes) in CASES.items()
    for dtype in dtypes + ((torch.bfloat16,) if CUDA else ())
]


# --- inputs, baseline and comparison -------------------------------------------------------------


def _inputs(B, T, H, Dh, seed, layout="contiguous"):
    """float64 (qkv (B, T, 3·H·Dh), grad (B, T, H·Dh)) on DEVICE. ``strided``: qkv is a (T, B, ·)
    tensor transposed and grad has a column stride of 2."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, B, 3 * H * Dh, generator=g, dtype=torch.float64).transpose(0, 1)
    grad = torch.randn(B, T, H * Dh, 2, generator=g, dtype=torch.float64)[..., 0]
    if layout == "contiguous":
        qkv, grad = qkv.contiguous(), grad.contiguous()
    return qkv.to(DEVICE), grad.to(DEVICE)


def _cast(t, dtype):
    """Casts keeping the strides."""
    return cast_keeping_layout(t, dtype)


def _baseline(qkv, grad, H):
    """(out, grad_qkv) of attention computed in qkv's dtype by plain PyTorch + autograd."""
    qkv = qkv.detach().clone().requires_grad_()
    B, T, _ = qkv.shape
    q, k, v = R._split_qkv(qkv, H)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.float(), dim=-1).to(qkv.dtype)
    out = (p @ v).transpose(1, 2).reshape(B, T, -1)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), grad_qkv


def _check(name, out, truth, baseline, dtype, inputs=()):
    check_against_baseline(
        name, out, truth, baseline, dtype, *TOL[dtype], inputs=inputs, out_dtype=dtype
    )


def _check_forward_backward(shape, dtype, seed, layout="contiguous"):
    B, T, H, Dh = shape
    qkv, grad = _inputs(B, T, H, Dh, seed, layout)
    qkv_low, grad_low = _cast(qkv, dtype), _cast(grad, dtype)
    base_out, base_grad = _baseline(qkv_low, grad_low, H)
    _check("out", K["attention"](qkv_low, H), R.attention(qkv, H), base_out, dtype,
           inputs=(qkv_low,))
    _check("grad_qkv", K["attention_backward"](grad_low, qkv_low, H),
           R.attention_backward(grad, qkv, H), base_grad, dtype, inputs=(qkv_low, grad_low))


# --- tests ---------------------------------------------------------------------------------------


def test_registered():
    assert K["attention"] is attention_module.attention
    assert K["attention_backward"] is attention_module.attention_backward


def test_head_dim_chunks():
    chunks = attention_module.head_dim_chunks
    expected = {8: (16, 0), 16: (16, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 96: (64, 32),
                112: (128, 0), 120: (128, 0), 160: (128, 32), 200: (256, 0), 256: (256, 0)}
    assert {d: chunks(d) for d in expected} == expected
    for d in range(1, 257):
        d0, d1 = chunks(d)
        assert d0 + d1 >= d and d0 >= 16 and (d1 == 0 or d1 >= 16)
        assert d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0


def test_launch_configs_fit_an_a100s_shared_memory():
    """The backward kernels keep two [BLOCK_M, width] operand tiles (Q and dO, or K and V) in
    shared memory for their whole loop and two [BLOCK_N, width] tiles per step. Compiled ahead of
    time with Triton 3.8 for sm_80 they used at most 6% more than that model (for sm_90 up to
    1.5 times it, but at most 133 KiB of its 227 KiB); float32 at head dims 193-256 with
    BLOCK_M = 64 needed ~200 KiB, over an A100's 163 KiB (166912 bytes per block), so the launch
    failed there. A launch-config check: it runs without a GPU."""
    for dtype in attention_module.SUPPORTED_DTYPES:
        for head_dim in range(1, attention_module.MAX_HEAD_DIM + 1):
            for forward in (True, False):
                cfg = attention_module._launch_config(head_dim, dtype, forward)
                width = cfg["D0"] + cfg["D1"]
                model = 2 * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * width * dtype.itemsize
                assert model <= 148 * 1024, (dtype, head_dim, forward, cfg, model)


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_attention_forward_backward(case, dtype):
    _check_forward_backward(CASES[case][0], dtype, seed=len(case))


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_strided_inputs(dtype):
    """qkv transposed from a (T, B, ·) tensor and a grad with column stride 2: read in place."""
    _check_forward_backward((2, 19, 2, 40), dtype, seed=7, layout="strided")


def test_grad_of_another_dtype_is_cast_to_qkv_dtype():
    qkv, grad = _inputs(1, 5, 1, 16, seed=8)
    out = K["attention_backward"](grad.half(), qkv.float(), 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, K["attention_backward"](grad.half().float(), qkv.float(), 1))


def test_op_layer_autograd():
    """epg.ops.attention with the Triton backend forced: forward and autograd gradients equal
    the reference's, including the stride-0 gradient that `.sum()` sends back."""
    from epg import _backend, ops

    B, T, H, Dh = 1, 17, 2, 72
    qkv64, grad64 = _inputs(B, T, H, Dh, seed=9)
    qkv = qkv64.float().requires_grad_()
    with ops.use_backend("triton", "attention"):
        assert _backend.choose("attention", qkv.device) == "triton"
        assert _backend.choose("attention_backward", qkv.device) == "triton"
        out = ops.attention(qkv, H)
        (grad_qkv,) = torch.autograd.grad(out, qkv, grad64.float())
        (grad_sum,) = torch.autograd.grad(ops.attention(qkv, H).sum(), qkv)
    torch.testing.assert_close(out.double(), R.attention(qkv64, H), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_qkv.double(), R.attention_backward(grad64, qkv64, H),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grad_sum.double(), R.attention_backward(torch.ones_like(grad64), qkv64, H),
        atol=1e-5, rtol=1e-5,
    )


def test_invalid_inputs():
    qkv = torch.randn(1, 4, 24, device=DEVICE)
    with pytest.raises(ValueError, match="3·num_heads·head_dim"):
        K["attention"](qkv, 3)
    with pytest.raises(ValueError, match=r"must be \(B, T, 3·H·Dh\)"):
        K["attention"](qkv[0], 2)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        K["attention"](qkv, 0)
    with pytest.raises(ValueError, match="head dim 258 > 256"):
        K["attention"](torch.randn(1, 2, 3 * 258, device=DEVICE), 1)
    with pytest.raises(TypeError, match="dtype"):
        K["attention"](qkv.double(), 2)
    with pytest.raises(ValueError, match=r"grad must be \(1, 4, 8\)"):
        K["attention_backward"](torch.randn(1, 4, 9, device=DEVICE), qkv, 2)


def test_empty_inputs():
    for shape in ((0, 5, 24), (2, 0, 24), (2, 5, 0)):
        qkv = torch.randn(shape, device=DEVICE)
        out = K["attention"](qkv, 2)
        assert out.shape == (shape[0], shape[1], shape[2] // 3)
        assert K["attention_backward"](out, qkv, 2).shape == shape


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 72, 120])
def test_bfloat16_at_epg_shapes(head_dim):
    """bfloat16 parity at the EPG shapes (B=4, T=258, H=16): encoders use head dim 64,
    decoders 72 and 120. Needs a GPU (the interpreter cannot do bfloat16 arithmetic)."""
    _check_forward_backward((4, 258, 16, head_dim), torch.bfloat16, seed=head_dim)


def test_automatic_choice_passes_on_inputs_the_kernel_declines(monkeypatch):
    """On CUDA tensors the automatic choice must never pick a kernel that would raise."""
    from epg import _backend

    supports = epg_kernels.SUPPORTS["attention"]
    assert supports(torch.zeros(1, 4, 3 * 2 * 64), 2) is None
    assert "dtype" in supports(torch.zeros(1, 4, 3 * 64, dtype=torch.float64), 1)
    assert "head dim 320" in supports(torch.zeros(1, 4, 3 * 320), 1)
    # Pretend Triton runs CUDA tensors here, so the choice among backends can be seen on CPU.
    triton = _backend.info("triton")
    monkeypatch.setitem(_backend._PROBED, "triton", dataclasses.replace(triton, runs_on_cuda=True))
    monkeypatch.setattr(_backend, "AUTO_ORDER", ("triton",))
    cuda = torch.device("cuda")
    assert _backend.choose("attention", cuda, (torch.zeros(1, 4, 3 * 72), 1)) == "triton"
    assert _backend.choose("attention", cuda, (torch.zeros(1, 4, 3 * 72, dtype=torch.float64), 1)) == "reference"
    big = torch.zeros(1, 4, 3 * 320)
    assert _backend.choose("attention_backward", cuda, (torch.zeros(1, 4, 320), big, 1)) == "reference"
