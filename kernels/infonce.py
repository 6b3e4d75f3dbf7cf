"""InfoNCE over pre-normalised queries and keys: Triton forward and backward kernels.

Math (epg-method.md §5.3; the caller L2-normalises and gathers the keys, local block first):

* ``info_nce(q, k, tau) -> loss``: q (B, D), k (M, D), M >= B, query i's positive is key i;
  loss (B,) float32, ℓ_i = logsumexp_j(q_i·k_j/τ) − q_i·k_i/τ.
* ``info_nce_backward(grad, q, k, tau) -> grad_q`` (B, D) in q's dtype:
  grad_q_i = grad_i/τ · (Σ_j p_ij k_j − k_i), p_i = softmax_j(q_i·k_j/τ). Keys get no gradient.

The (B, M) logits are never stored: every kernel recomputes the [BLOCK_M, BLOCK_N] tile of
q·kᵀ it needs (a tl.dot walk over D in BLOCK_K-column chunks) and keeps only per-row statistics.

Forward (two launches):
1. ``_lse_partial_kernel``: a program owns BLOCK_M = 64 queries and one *split*, a contiguous
   range of BLOCK_N = 64-key tiles; an online logsumexp over its tiles (base 2, log2(e)/τ folded
   into the logit scale) leaves a running max and sum per row, plus the positive logit, taken
   from the tile that holds the diagonal. Per-row results go to (splits, B) float32 buffers.
2. ``_lse_combine_kernel`` merges the splits: lse = max + log2 Σ sum·2^(m − max); it writes the
   loss and the row logsumexp (the backward's input).
The key range is split so that the grid has about 4 programs per SM (4 in all under the
interpreter): with B = 128 queries per rank one row block per program would leave most of a GPU
idle, while the split costs only 3·splits·B floats.

Backward (four launches; nothing is taken from the forward, as the op layer's contract says):
the two forward kernels give the row logsumexp, then ``_grad_partial_kernel``, one program per
(BLOCK_M queries, BLOCK_D = 256 output columns, key split), recomputes the logits of its tiles,
p = 2^(s − lse), and accumulates Σ_j p_ij k_j over its keys into a (splits, B, D) float32 buffer,
which ``_grad_finalize_kernel`` sums and turns into grad_q. For D > 256 the logits of a tile are
recomputed once per 256-column output chunk (3× for D = 768): the price of keeping the float32
accumulator at 64×256 per program (flash attention's budget at head dim 256) without a
(B, M) buffer. Buffers: (splits, B, D) + (splits, B) float32; splits > 1 only while the grid has
fewer than 4 programs per SM, so the buffer stays below max(B·D, 4·SMs·64·256) floats (~35 MB on
an H200; 2 MB at B = 128, D = 256).

Cancellation. When p_i is concentrated on the positive (small τ, a well-trained encoder),
Σ_j p_ij k_j − k_i is a small difference of two near-equal vectors. The kernel therefore leaves
the diagonal out of the product and uses Σ_j p_ij = 1:
    Σ_j p_ij k_j − k_i = Σ_{j≠i} p_ij k_j − (Σ_{j≠i} p_ij) k_i,
so rounding p (to 16 bits for the tensor-core product) errs relative to the off-diagonal mass,
not to 1. (Interpreter, float16, p concentrated: the error against float32 math on the same
inputs is within the output's own rounding, about 15× below what rounding p_ii would add.)

Numerics. Logits, softmax statistics and every accumulator are float32. float16/bfloat16 inputs
go to tl.dot in their own dtype (products of 16-bit floats are exact in float32, so this is as
accurate as upcasting, and runs on tensor cores); the probabilities are rounded to that dtype for
the p·k product, as flash attention does (see the diagonal split above). float32 inputs are
multiplied in IEEE float32 (not TF32, whose 10-bit mantissa gives ~5e-4 relative error per
product, then scaled by 1/τ), so they match a float64 reference to ~1e-6.
Under the interpreter bfloat16 is loaded and converted to float32 first (its bfloat16 arithmetic
is broken); float64 is not taken (SUPPORTS declines it, the reference runs it).

What only a GPU can confirm: speed, the block sizes, num_warps / num_stages and the split
heuristic (set by reasoning, not measured), and bfloat16 numerics on the native tl.dot path
(tests/test_triton_infonce.py has a ``cuda`` test at B=1024, M=4096, D=256). That every
configuration compiles for sm_80 and sm_90a within shared memory and without spilling
registers is checked without a GPU by scripts/compile_triton_kernels.py (the 16-bit logsumexp
kernel at D ≥ 512 keeps an 8-byte stack frame on sm_80).
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, cdiv, device_guard, is_interpreter, next_power_of_2, target_programs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_BLOCK_M = 64  # queries per program
_BLOCK_N = 64  # keys per tile
_BLOCK_K = 64  # columns per chunk of the q·kᵀ contraction
_BLOCK_D = 256  # output columns per gradient program
# float32 runs IEEE products on the CUDA cores, its operand tiles held in registers: at the
# 16-bit tiles both partial kernels spill (compiled for sm_80 / sm_90a by
# scripts/compile_triton_kernels.py: 864 / 24 bytes of stack per thread for the logsumexp kernel,
# 2552 / 440 for the gradient's). These narrower tiles compile without spills on both.
_FP32_BLOCK_K = 32
_FP32_LSE_WARPS = 8
_FP32_GRAD_BLOCK_N = 32
_LOG2E = 1.4426950408889634


# --- device helpers -----------------------------------------------------------------------------


@triton.jit
def _logits(q_ptr, k_ptr, rows, keys, B, M, stride_qb, stride_qd, stride_kb, stride_kd,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr):
    """q[rows]·k[keys]ᵀ, float32 [BLOCK_M, BLOCK_N]; rows >= B and keys >= M give 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qb
    k_rows = k_ptr + keys.to(tl.int64)[:, None] * stride_kb
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + tl.arange(0, BLOCK_K)
        a = tl.load(q_rows + cols[None, :] * stride_qd,
                    mask=(rows < B)[:, None] & (cols < D)[None, :], other=0.0)
        b = tl.load(k_rows + cols[None, :] * stride_kd,
                    mask=(keys < M)[:, None] & (cols < D)[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _split_range(split, n_tiles, tiles_per_split):
    """First and one-past-last key tile of a split."""
    first = split * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, n_tiles)


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _lse_partial_kernel(
    q_ptr, k_ptr,  # (B, D), (M, D)
    max_ptr, sum_ptr, pos_ptr,  # (splits, B) float32 each, written here
    B, M, n_tiles, tiles_per_split, row_blocks, scale2,
    stride_qb, stride_qd, stride_kb, stride_kd,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """One program: BLOCK_M queries × one key split. Online logsumexp of the base-2 logits
    s = q·kᵀ·scale2 over the split's tiles: row max, Σ 2^(s − max), and the positive s_ii (0 when
    the split does not hold key i). Grid: (splits · row_blocks,), program id =
    split · row_blocks + row block (neighbours share key tiles in L2). Float32 throughout."""
    pid = tl.program_id(0)
    split = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    first, last = _split_range(split, n_tiles, tiles_per_split)
    for tile in range(first, last):
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _logits(q_ptr, k_ptr, rows, keys, B, M, stride_qb, stride_qd, stride_kb, stride_kd,
                    D, BLOCK_M, BLOCK_N, BLOCK_K, F32_DOT) * scale2
        pos += tl.sum(tl.where(keys[None, :] == rows[:, None], s, 0.0), 1)
        s = tl.where((keys < M)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds a key < M
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    out = split.to(tl.int64) * B + rows
    tl.store(max_ptr + out, m, mask=rows < B)
    tl.store(sum_ptr + out, l, mask=rows < B)
    tl.store(pos_ptr + out, pos, mask=rows < B)


@triton.jit
def _lse_combine_kernel(
    max_ptr, sum_ptr, pos_ptr,  # (splits, B) float32, from _lse_partial_kernel
    loss_ptr, lse_ptr,  # (B,) float32: the loss, and the base-2 logsumexp
    B, splits, BLOCK: tl.constexpr,
):
    """One program: BLOCK rows; merges the splits' (max, sum, positive) into the base-2
    logsumexp and the loss ln2·(lse − s_ii). Grid: (cdiv(B, BLOCK),). Float32."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < B
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for split in range(splits):
        m = tl.maximum(m, tl.load(max_ptr + split * B + rows, mask=mask, other=0.0))
    l = tl.zeros([BLOCK], dtype=tl.float32)
    pos = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(splits):
        at = split * B + rows
        m_split = tl.load(max_ptr + at, mask=mask, other=0.0)
        l += tl.load(sum_ptr + at, mask=mask, other=1.0) * tl.exp2(m_split - m)
        pos += tl.load(pos_ptr + at, mask=mask, other=0.0)
    lse = m + tl.log2(l)
    tl.store(lse_ptr + rows, lse, mask=mask)
    # ln 2 turns base-2 units back into natural ones.
    tl.store(loss_ptr + rows, (lse - pos) * 0.6931471805599453, mask=mask)


@triton.jit
def _grad_partial_kernel(
    q_ptr, k_ptr, lse_ptr,  # (B, D), (M, D), (B,) float32 base-2 logsumexp
    acc_ptr, mass_ptr,  # (splits, B, D), (splits, B) float32, written here
    B, M, n_tiles, tiles_per_split, row_blocks, d_chunks, scale2,
    stride_qb, stride_qd, stride_kb, stride_kd,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr,
):
    """One program: BLOCK_M queries × BLOCK_D output columns × one key split. Over the split's
    tiles: p = 2^(s − lse) with the diagonal (and keys >= M) zeroed, Σ_j p_ij k_j for its
    columns and the off-diagonal mass Σ_j p_ij (stored by the column-chunk-0 programs). Grid:
    (splits · d_chunks · row_blocks,), program id = (split · d_chunks + chunk) · row_blocks +
    row block. Float32 accumulation."""
    pid = tl.program_id(0)
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = (pid // row_blocks) % d_chunks
    split = pid // (row_blocks * d_chunks)
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    # lse = +inf for padded rows makes their probabilities 2^-inf = 0.
    lse = tl.load(lse_ptr + rows, mask=rows < B, other=float("inf"))
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    first, last = _split_range(split, n_tiles, tiles_per_split)
    for tile in range(first, last):
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _logits(q_ptr, k_ptr, rows, keys, B, M, stride_qb, stride_qd, stride_kb, stride_kd,
                    D, BLOCK_M, BLOCK_N, BLOCK_K, F32_DOT) * scale2
        off_diagonal = (keys < M)[None, :] & (keys[None, :] != rows[:, None])
        p = tl.where(off_diagonal, tl.exp2(s - lse[:, None]), 0.0)
        mass += tl.sum(p, 1)
        kt = tl.load(k_ptr + keys.to(tl.int64)[:, None] * stride_kb + cols[None, :] * stride_kd,
                     mask=(keys < M)[:, None] & (cols < D)[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(p, kt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(kt.dtype), kt, acc)
    out = split.to(tl.int64) * B + rows
    tl.store(acc_ptr + out[:, None] * D + cols[None, :], acc,
             mask=(rows < B)[:, None] & (cols < D)[None, :])
    # A scalar branch, not a block mask `& (chunk == 0)`: Triton 3.9's interpreter rejects a
    # mask mixing a block and a scalar condition.
    if chunk == 0:
        tl.store(mass_ptr + out, mass, mask=rows < B)


@triton.jit
def _grad_finalize_kernel(
    acc_ptr, mass_ptr,  # (splits, B, D), (splits, B) float32, from _grad_partial_kernel
    k_ptr, grad_ptr, out_ptr,  # (M, D), (B,), (B, D) contiguous in q's dtype
    B, splits, inv_tau,
    stride_kb, stride_kd, stride_g,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: a [BLOCK_M, BLOCK_D] tile of grad_q = grad/τ · (Σ_splits acc −
    (Σ_splits mass)·k_i). Grid: (cdiv(B, BLOCK_M) · cdiv(D, BLOCK_D),), program id =
    row block · column blocks + column block. Float32, rounded once on store."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(D, BLOCK_D)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(splits):
        at = split * B + rows.to(tl.int64)
        total += tl.load(acc_ptr + at[:, None] * D + cols[None, :], mask=mask, other=0.0)
        mass += tl.load(mass_ptr + at, mask=rows < B, other=0.0)
    r = rows.to(tl.int64)
    k_pos = tl.load(k_ptr + r[:, None] * stride_kb + cols[None, :] * stride_kd, mask=mask,
                    other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + r * stride_g, mask=rows < B, other=0.0).to(tl.float32) * inv_tau
    grad_q = g[:, None] * (total - mass[:, None] * k_pos)
    tl.store(out_ptr + r[:, None] * D + cols[None, :], grad_q.to(out_ptr.dtype.element_ty),
             mask=mask)


# --- launch helpers -----------------------------------------------------------------------------


def _validate(name: str, q: Tensor, k: Tensor, tau) -> float:
    """Checks q, k and tau; returns tau as a float."""
    if q.dim() != 2 or k.dim() != 2:
        raise ValueError(
            f"{name}: q and k must be 2-D (B, D) and (M, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}"
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{name}: q and k must have the same D, got {q.shape[1]} and {k.shape[1]}")
    if k.shape[0] < q.shape[0]:
        raise ValueError(
            f"{name}: need M >= B keys (key i is query i's positive), got B={q.shape[0]}, "
            f"M={k.shape[0]}"
        )
    if not isinstance(tau, numbers.Real):  # a Python (or NumPy) number, not a tensor
        raise TypeError(f"{name}: tau must be a real number, got {type(tau).__name__}")
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{name}: tau must be finite and > 0, got {tau}")
    reason = declines(q, k)
    if reason is not None:
        raise TypeError(f"{name}: {reason}")
    if k.device != q.device:
        raise ValueError(f"{name}: q is on {q.device}, k on {k.device}")
    if not q.is_cuda and not is_interpreter():
        raise ValueError(
            f"{name}: tensors are on {q.device}; the Triton kernels run CUDA tensors, or CPU "
            "tensors under TRITON_INTERPRET=1"
        )
    return tau


def _plan(B: int, M: int, D: int, dtype: torch.dtype, device: torch.device,
          d_chunks: int = 0) -> dict:
    """Block sizes, warps and key split for B queries, M keys and D columns, for the logsumexp
    kernel (``d_chunks`` 0) or the gradient kernel (``d_chunks`` column chunks). The split count
    makes the grid about ``target_programs(device)`` programs (row blocks × chunks × splits) and
    no split is empty. Chosen by dtype, not by the interpreter, so it tests what a GPU runs."""
    fp32 = dtype == torch.float32
    cap_n = _FP32_GRAD_BLOCK_N if fp32 and d_chunks else _BLOCK_N
    cap_k = _FP32_BLOCK_K if fp32 else _BLOCK_K
    block_m = min(_BLOCK_M, max(_MIN_DOT, next_power_of_2(B)))
    block_n = min(cap_n, max(_MIN_DOT, next_power_of_2(M)))
    row_blocks, n_tiles = cdiv(B, block_m), cdiv(M, block_n)
    want = max(1, target_programs(device) // (row_blocks * max(1, d_chunks)))
    tiles_per_split = cdiv(n_tiles, min(n_tiles, want))
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(cap_k, max(_MIN_DOT, next_power_of_2(D))),
        num_warps=8 if d_chunks else _FP32_LSE_WARPS if fp32 else 4,
        row_blocks=row_blocks, n_tiles=n_tiles, tiles_per_split=tiles_per_split,
        splits=cdiv(n_tiles, tiles_per_split),
        # bfloat16 arithmetic is broken in the interpreter: upcast there.
        F32_DOT=fp32 or (dtype == torch.bfloat16 and is_interpreter()),
    )


def _logsumexp(q: Tensor, k: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(loss (B,), base-2 logsumexp (B,)), float32, from the two forward kernels."""
    B, D = q.shape
    M = k.shape[0]
    plan = _plan(B, M, D, q.dtype, q.device)
    splits, row_blocks = plan["splits"], plan["row_blocks"]
    parts = torch.empty((3, splits, B), dtype=torch.float32, device=q.device)
    loss = torch.empty(B, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(loss)
    block = min(1024, next_power_of_2(B))
    with device_guard(q):
        _lse_partial_kernel[(splits * row_blocks,)](
            q, k, parts[0], parts[1], parts[2],
            B, M, plan["n_tiles"], plan["tiles_per_split"], row_blocks, _LOG2E / tau,
            *q.stride(), *k.stride(),
            D=D, BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"],
            F32_DOT=plan["F32_DOT"], num_warps=plan["num_warps"], num_stages=3, **FP_FUSION,
        )
        _lse_combine_kernel[(cdiv(B, block),)](
            parts[0], parts[1], parts[2], loss, lse, B, splits, BLOCK=block,
            num_warps=4 if block >= 512 else 1, **FP_FUSION,
        )
    return loss, lse


# --- public launchers ---------------------------------------------------------------------------


def declines(q: Tensor, k: Tensor, *rest) -> str | None:
    """The SUPPORTS hook (args as :func:`info_nce` takes them): why the kernels would refuse
    these inputs (a dtype other than float16/bfloat16/float32, or q and k of different dtypes),
    or None."""
    for name, t in (("q", q), ("k", k)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} (the kernels take {SUPPORTED_DTYPES})"
    if q.dtype != k.dtype:
        return f"q and k dtypes differ ({q.dtype}, {k.dtype})"
    return None


def info_nce(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """Per-query InfoNCE over already L2-normalised vectors (epg-method.md §5.3).

    Args: q (B, D) queries; k (M, D) keys, M >= B, key i the positive of query i (the local
    block first); any strides; float16, bfloat16 or float32, the same for both. tau > 0.
    Returns loss (B,) float32, contiguous: ℓ_i = logsumexp_j(q_i·k_j/τ) − q_i·k_i/τ, float32
    accumulation, the (B, M) logits never stored.
    """
    tau = _validate("info_nce", q, k, tau)
    if q.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=q.device)
    return _logsumexp(q, k, tau)[0]


def info_nce_backward(grad: Tensor, q: Tensor, k: Tensor, tau: float) -> Tensor:
    """Gradient of :func:`info_nce` with respect to q, recomputed from (grad, q, k).

    Args: grad (B,), any float dtype and stride; q, k, tau as for :func:`info_nce`.
    Returns grad_q (B, D), contiguous, in q's dtype: grad_i/τ · (Σ_j p_ij k_j − k_i) with
    p_i = softmax_j(q_i·k_j/τ); float32 accumulation, no (B, M) buffer.
    """
    tau = _validate("info_nce_backward", q, k, tau)
    B, D = q.shape
    if tuple(grad.shape) != (B,):
        raise ValueError(f"info_nce_backward: grad must be ({B},), got {tuple(grad.shape)}")
    if grad.device != q.device:
        raise ValueError(f"info_nce_backward: grad is on {grad.device}, q on {q.device}")
    grad_q = torch.empty((B, D), dtype=q.dtype, device=q.device)
    if grad_q.numel() == 0:
        return grad_q
    M = k.shape[0]
    _, lse = _logsumexp(q, k, tau)
    block_d = min(_BLOCK_D, max(_MIN_DOT, next_power_of_2(D)))
    d_chunks = cdiv(D, block_d)
    plan = _plan(B, M, D, q.dtype, q.device, d_chunks)
    splits, row_blocks = plan["splits"], plan["row_blocks"]
    acc = torch.empty((splits, B, D), dtype=torch.float32, device=q.device)
    mass = torch.empty((splits, B), dtype=torch.float32, device=q.device)
    fin_d = min(128, next_power_of_2(D))
    fin_m = max(1, min(next_power_of_2(B), 4096 // fin_d, 64))
    with device_guard(q):
        _grad_partial_kernel[(splits * d_chunks * row_blocks,)](
            q, k, lse, acc, mass,
            B, M, plan["n_tiles"], plan["tiles_per_split"], row_blocks, d_chunks, _LOG2E / tau,
            *q.stride(), *k.stride(),
            D=D, BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"],
            BLOCK_D=block_d, F32_DOT=plan["F32_DOT"], num_warps=plan["num_warps"], num_stages=2,
            **FP_FUSION,
        )
        _grad_finalize_kernel[(cdiv(B, fin_m) * cdiv(D, fin_d),)](
            acc, mass, k, grad, grad_q, B, splits, 1.0 / tau,
            *k.stride(), grad.stride(0),
            D=D, BLOCK_M=fin_m, BLOCK_D=fin_d, num_warps=4, **FP_FUSION,
        )
    return grad_q
