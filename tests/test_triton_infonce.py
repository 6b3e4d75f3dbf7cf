"""Triton InfoNCE (epg_kernels.infonce) against a plain-PyTorch reference of the same math.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_infonce.py

The launchers take queries and keys that are already L2-normalised (the caller normalises and
gathers); ``ref_info_nce`` / ``ref_info_nce_backward`` below define that math (they are meant to
move into epg.reference). Inputs are drawn in float64 and cast to the test dtype. The truth is the
reference on the float64 originals; the baseline is the reference on the cast inputs (float32
arithmetic, as the op promises), so its error is what the input rounding alone costs. A kernel
output passes when its error against the truth is at most twice the baseline's largest error plus
a floor (atol + rtol·|truth|).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from triton_support import (
    cast_keeping_layout,
    check_against_baseline,
    import_epg_kernels,
    require_triton,
)

CUDA = torch.cuda.is_available()
require_triton()
pytestmark = pytest.mark.triton

epg_kernels = import_epg_kernels()
K = epg_kernels.IMPLEMENTATIONS
infonce_module = importlib.import_module("epg_kernels.infonce")
DEVICE = "cuda" if CUDA else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {  # (atol, rtol) floors on top of twice the baseline's error
    F32: (1e-5, 1e-5),
    F16: (1e-3, 1e-3),
    BF16: (1e-2, 1e-2),
}


# --- reference (the math of the launchers) ------------------------------------------------------


def ref_info_nce(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """ℓ_i = logsumexp_j(q_i·k_j/τ) − q_i·k_i/τ for already L2-normalised q (B, D), k (M, D),
    M >= B (key i is query i's positive). Returns (B,) in float32 (float64 for float64 q)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = q.to(ct) @ k.to(ct).T / tau  # (B, M)
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).contiguous()


def ref_info_nce_backward(grad: Tensor, q: Tensor, k: Tensor, tau: float) -> Tensor:
    """grad_q_i = grad_i/τ · (Σ_j p_ij k_j − k_i), p_i = softmax_j(q_i·k_j/τ); (B, D) in q's
    dtype, computed in float32 (float64 for float64 q). Keys get no gradient."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kc = k.to(ct)
    p = torch.softmax(q.to(ct) @ kc.T / tau, dim=1)  # (B, M)
    grad_q = grad.to(ct)[:, None] / tau * (p @ kc - kc[: q.shape[0]])
    return grad_q.to(q.dtype).contiguous()


# --- inputs, baseline and comparison -------------------------------------------------------------


def _inputs(B, M, D, seed, hard=False, strided=False):
    """float64 (q (B, D), k (M, D), grad (B,)) on DEVICE, rows unit-norm. Keys: key i (i < B) is a
    noisy copy of query i, the others random; ``hard``: every key j is a noisy copy of query
    j mod B, so with a small τ the logits are large and nearly tied (the softmax is neither
    uniform nor one-hot). ``strided``: q has a column stride of 2, k is the transpose of a
    (D, M) tensor and grad has a stride of 3."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    noise = torch.randn(M, D, generator=g, dtype=torch.float64)
    if hard:
        k = q[torch.arange(M) % B] + 0.3 * noise / D**0.5
    else:
        k = noise.clone()
        k[:B] = q + noise[:B] / D**0.5
    k = F.normalize(k, dim=1)
    grad = torch.randn(B, generator=g, dtype=torch.float64)
    q, k, grad = q.to(DEVICE), k.to(DEVICE), grad.to(DEVICE)
    if strided:
        q = torch.zeros(B, 2 * D, dtype=q.dtype, device=DEVICE)[:, ::2].copy_(q)
        k = k.T.contiguous().T
        grad = torch.zeros(B, 3, dtype=grad.dtype, device=DEVICE)[:, 0].copy_(grad)
        assert q.stride() == (2 * D, 2) and k.stride() == (1, M) and grad.stride() == (3,)
    return q, k, grad


def _cast(t, dtype):
    """Casts keeping the strides."""
    return cast_keeping_layout(t, dtype)


def _check(name, out, truth, baseline, dtype, inputs=()):
    check_against_baseline(
        name, out, truth, baseline, dtype, *TOL[dtype], inputs=inputs, out_dtype=dtype
    )


def _check_forward_backward(B, M, D, tau, dtype, seed, hard=False, strided=False):
    q, k, grad = _inputs(B, M, D, seed, hard, strided)
    q_low, k_low, grad32 = _cast(q, dtype), _cast(k, dtype), _cast(grad, F32)
    _check("loss", K["info_nce"](q_low, k_low, tau), ref_info_nce(q, k, tau),
           ref_info_nce(q_low, k_low, tau), F32, inputs=(q_low, k_low))
    _check("grad_q", K["info_nce_backward"](grad32, q_low, k_low, tau),
           ref_info_nce_backward(grad, q, k, tau), ref_info_nce_backward(grad32, q_low, k_low, tau),
           dtype, inputs=(q_low, k_low, grad32))


# --- tests ---------------------------------------------------------------------------------------


def test_registered():
    assert K["info_nce"] is infonce_module.info_nce
    assert K["info_nce_backward"] is infonce_module.info_nce_backward


@pytest.mark.parametrize("B,M,D,tau", [(1, 1, 3, 0.1), (3, 9, 5, 0.2), (4, 4, 7, 0.01)])
def test_reference_against_autograd_and_cross_entropy(B, M, D, tau):
    """The explicit backward equals autograd of the forward; the forward equals cross-entropy
    with target i over the logits row i (float64)."""
    q, k, grad = _inputs(B, M, D, seed=B + M, hard=True)
    q = q.requires_grad_()
    loss = ref_info_nce(q, k, tau)
    (autograd,) = torch.autograd.grad(loss, q, grad)
    torch.testing.assert_close(ref_info_nce_backward(grad, q.detach(), k, tau), autograd,
                               atol=1e-12, rtol=1e-10)
    ce = F.cross_entropy(q.detach() @ k.T / tau, torch.arange(B, device=q.device),
                         reduction="none")
    torch.testing.assert_close(loss.detach(), ce, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda x: ref_info_nce(x, k, tau), (q,))


# (B, M, D, tau, hard): odd sizes; one query; M = B (no negatives beyond the positives) and
# M = 3B; D below one 64-column chunk, 40 (masked) and 256 (four chunks); τ 0.01 with nearly tied
# logits around 100 (exp overflows float32 without the online max).
CASES = {
    "B1_M1_D24": (1, 1, 24, 0.1, False),
    "B1_M3_D40": (1, 3, 40, 0.2, False),
    "B17_M17_D24": (17, 17, 24, 0.2, False),
    "B17_M51_D40": (17, 51, 40, 0.1, False),
    "B17_M51_D256": (17, 51, 256, 0.2, False),
    "B17_M51_D40_tau0.01": (17, 51, 40, 0.01, True),
    "B40_M120_D256_tau0.01": (40, 120, 256, 0.01, True),  # two key tiles, two splits
}
PARAMS = [
    pytest.param(case, dtype, id=f"{case}-{str(dtype).removeprefix('torch.')}")
    for case in CASES
    for dtype in (F32, F16)
]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_forward_backward(case, dtype):
    B, M, D, tau, hard = CASES[case]
    _check_forward_backward(B, M, D, tau, dtype, seed=len(case), hard=hard)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_strided_inputs(dtype):
    """q with column stride 2, k transposed from a (D, M) tensor, grad with stride 3: read in
    place, no copies."""
    _check_forward_backward(17, 51, 40, 0.1, dtype, seed=5, strided=True)


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_key_splits(monkeypatch, programs):
    """B=20, M=300 (five 64-key tiles): all tiles in one program (online rescaling across tiles),
    splits of two tiles (the last one short) and one split per tile (merged by the combine
    kernel). The grid's program budget decides."""
    monkeypatch.setattr(infonce_module, "target_programs", lambda device: programs)
    plan = infonce_module._plan(20, 300, 40, F32, torch.device(DEVICE))
    assert plan["n_tiles"] == 5
    assert plan["splits"] == {1: 1, 3: 3, 64: 5}[programs]
    _check_forward_backward(20, 300, 40, 0.05, F32, seed=programs, hard=True)


@pytest.mark.parametrize("M", [17, 51])
def test_concentrated_softmax_adds_no_rounding(M):
    """When p_i sits almost all on the positive, Σ_j p_ij k_j − k_i nearly cancels. On the same
    float16 inputs the kernel must then match float32 math to about the output's own rounding
    (two half-ulps of the largest entry); rounding p_ii to float16 before the product (the
    kernel leaves the diagonal out for this) would err by ~grad/τ·2⁻¹¹, about ten times more."""
    q, k, grad = _inputs(17, M, 40, seed=M)
    q16, k16, grad32 = q.half(), k.half(), grad.float()
    base = ref_info_nce_backward(grad32, q16.float(), k16.float(), 0.05)
    out = K["info_nce_backward"](grad32, q16, k16, 0.05).float()
    assert (out - base).abs().max().item() <= 2.0**-10 * base.abs().max().item()


def test_very_large_logits():
    """τ = 0.002: logits near 500, past where exp overflows even in float64."""
    q, k, grad = _inputs(9, 27, 24, seed=11, hard=True)
    qf, kf = q.float(), k.float()
    loss = K["info_nce"](qf, kf, 0.002)
    grad_q = K["info_nce_backward"](grad.float(), qf, kf, 0.002)
    assert torch.isfinite(loss).all() and torch.isfinite(grad_q).all()
    _check("loss", loss, ref_info_nce(q, k, 0.002), ref_info_nce(qf, kf, 0.002), F32)
    _check("grad_q", grad_q, ref_info_nce_backward(grad, q, k, 0.002),
           ref_info_nce_backward(grad.float(), qf, kf, 0.002), F32)


def test_bfloat16_through_upcast_or_tensor_cores():
    """bfloat16 plumbing: under the interpreter the kernels load bfloat16 and multiply in float32;
    on a GPU this runs the native bfloat16 tl.dot."""
    _check_forward_backward(17, 51, 40, 0.1, BF16, seed=3)


def test_grad_of_another_dtype():
    q, k, grad = _inputs(5, 10, 24, seed=4)
    q16, k16 = q.half(), k.half()
    out = K["info_nce_backward"](grad.half(), q16, k16, 0.1)
    assert out.dtype == F16
    torch.testing.assert_close(out, K["info_nce_backward"](grad.half().float(), q16, k16, 0.1))


def test_empty_and_zero_width():
    k = torch.randn(4, 8, device=DEVICE)
    assert K["info_nce"](k[:0], k, 0.1).shape == (0,)
    assert K["info_nce_backward"](torch.ones(0, device=DEVICE), k[:0], k, 0.1).shape == (0, 8)
    # D = 0: every logit is 0, so ℓ = log M.
    z = torch.zeros(3, 0, device=DEVICE)
    torch.testing.assert_close(K["info_nce"](z, torch.zeros(5, 0, device=DEVICE), 0.1),
                               torch.full((3,), 5.0, device=DEVICE).log())


def test_invalid_inputs():
    q, k = torch.randn(3, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must be 2-D"):
        K["info_nce"](q[0], k, 0.1)
    with pytest.raises(ValueError, match="must be 2-D"):
        K["info_nce"](q, k[None], 0.1)
    with pytest.raises(ValueError, match="same D, got 8 and 7"):
        K["info_nce"](q, k[:, :7], 0.1)
    with pytest.raises(ValueError, match="M >= B"):
        K["info_nce"](q, k[:2], 0.1)
    for tau in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau must be finite and > 0"):
            K["info_nce"](q, k, tau)
    for tau in ("0.1", torch.tensor(0.1)):
        with pytest.raises(TypeError, match="tau must be a real number"):
            K["info_nce"](q, k, tau)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        K["info_nce"](q.double(), k.double(), 0.1)
    with pytest.raises(TypeError, match="dtypes differ"):
        K["info_nce_backward"](torch.ones(3, device=DEVICE), q.half(), k, 0.1)
    with pytest.raises(ValueError, match=r"grad must be \(3,\)"):
        K["info_nce_backward"](torch.ones(3, 1, device=DEVICE), q, k, 0.1)
    with pytest.raises(ValueError, match="M >= B"):
        K["info_nce_backward"](torch.ones(3, device=DEVICE), q, k[:2], 0.1)


def test_supports_declines_what_the_kernels_refuse():
    supports = epg_kernels.SUPPORTS
    q, k = torch.zeros(2, 8), torch.zeros(4, 8)
    assert supports["info_nce"](q, k, 0.1) is None
    assert supports["info_nce_backward"](torch.zeros(2), q.half(), k.half(), 0.1) is None
    assert "float64" in supports["info_nce"](q.double(), k.double(), 0.1)
    assert "dtypes differ" in supports["info_nce_backward"](torch.zeros(2), q, k.bfloat16(), 0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
def test_epg_size(dtype):
    """The real size (B=1024 queries, M=4096 keys from 4 ranks, D=256), τ 0.1, bfloat16 on the
    native tensor-core path. Needs a GPU (the interpreter cannot do bfloat16 arithmetic)."""
    _check_forward_backward(1024, 4096, 256, 0.1, dtype, seed=1)
