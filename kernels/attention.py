"""Multi-head attention on packed qkv: Triton flash-attention forward and backward.

Same signatures, return conventions and math as ``epg.reference``:

* ``attention(qkv, num_heads) -> out``: qkv (B, T, 3·H·Dh) with columns ordered (3, H, Dh);
  out (B, T, H·Dh) = softmax(Q·Kᵀ/sqrt(Dh))·V per head, non-causal, heads concatenated.
* ``attention_backward(grad, qkv, num_heads) -> grad_qkv`` (B, T, 3·H·Dh), same column order.

Layout. Q, K and V are read straight from qkv through its strides (any strides, no split or
transpose copy), ``out`` is written in (B, T, H·Dh) and ``grad_qkv`` in the packed layout. Both are
fresh contiguous tensors in qkv's dtype (float16, bfloat16 or float32). Memory is O(T): besides
the outputs, the backward keeps two float32 values per (batch, head, token).

Blocking. A program owns BLOCK_M = 64 tokens (32 for float32 head dims above 192, to fit an
A100's shared memory, and where 64-row tiles spill registers: the float32 forward and the 16-bit
backward at head dims above 160) of one
(batch, head) and walks the other side in
tiles of BLOCK_N tokens (64, or 32 when a tile row of the padded head is wider than 256 bytes;
512 in the float32 forward), unmasked; the T mod BLOCK_N tokens left over are taken in 16-token
tiles, the only masked ones.
So 258 tokens cost 4 full tiles + one 16-token tile per pass (272 columns of work, not 320 or 384).
One configuration per (head dim, dtype) and pass, the same under the interpreter and on a GPU; no
autotune.

Head dims. ``tl.dot`` needs every dimension >= 16 and a power of two, so the head dim is rounded
up to a multiple of 16 and covered by at most two power-of-two column chunks, whichever cover is
narrower (:func:`head_dim_chunks`): 64 -> 64, 72 -> 64 + 16 (80 columns, where padding to a
power of two would compute 128), 120 -> 128 (a cover of 64 + 32 + 16 + 8 would need an 8-wide
dot), 96 -> 64 + 32, 256 -> 256. Every product splits along the chunks: Q·Kᵀ = Σ_c Q_c·K_cᵀ,
and P·V, dS·K, Pᵀ·dO, dSᵀ·Q are computed per chunk. Only the last chunk masks columns past Dh.

Backward. The op layer's contract recomputes from (grad, qkv), so nothing comes from the forward:
1. ``_attn_bwd_dq_kernel``, one program per query block: an online-softmax pass over the keys
   (the forward's loop) gives the row logsumexp and O, hence delta = rowsum(dO ∘ O); both are
   stored (float32, (B·H, T)); a second pass over the keys accumulates dQ = Σ dS·K·scale, with
   dS = P ∘ (dO·Vᵀ − delta), and stores it into grad_qkv.
2. ``_attn_bwd_dkdv_kernel``, one program per key block: a pass over the queries accumulates
   dV = Σ Pᵀ·dO and dK = Σ dSᵀ·Q·scale, using the stored logsumexp and delta.
dQ and dK/dV are computed by different programs rather than with atomic adds into a float32 dQ:
the result is deterministic and written once in the input dtype, at the price of recomputing
Q·Kᵀ and dO·Vᵀ in the second kernel (9 block products per tile instead of 7).

Numerics. Scores, softmax statistics and every accumulator are float32; the exponentials are
base 2 with log2(e) folded into the score scale. For float16/bfloat16 inputs the probabilities
and dS are rounded to the input dtype before their products (as flash attention does); float32
inputs use IEEE float32 products (no TF32), so they match a float32 reference closely.

What only a GPU can confirm: speed and the choice of BLOCK_N / num_warps / num_stages (set by
reasoning and by the register use of the compiled kernels, not by timing), and bfloat16 numerics
(the interpreter cannot do bfloat16 arithmetic; tests/test_triton_attention.py has a ``cuda`` test
for it). That every head dim 8-256 in each dtype compiles for sm_80 and sm_90a within shared
memory (at most 93% of an A100's) is checked without a GPU by scripts/compile_triton_kernels.py,
which also reports spills: see the README.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, cdiv, device_guard, is_interpreter, next_power_of_2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_BLOCK_M = 64  # tokens per program (halved for float32 head dims above 192)
_TAIL = 16  # rows of the masked tail tiles
_LOG2E = 1.4426950408889634


# --- device helpers -----------------------------------------------------------------------------


@triton.jit
def _load_chunk(base, rows, T, stride_t, stride_d, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """[len(rows), WIDTH] tile: columns COL0 .. COL0 + WIDTH of one head for the given tokens;
    entries of tokens >= T (MASK_ROWS) or columns >= HEAD_DIM (MASK_COLS) read as 0."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :] * stride_d
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(rows < T)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < T)[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_head(base, rows, T, stride_t, stride_d, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """One head's columns for the given tokens as chunks (x0 [R, D0], x1 [R, D1]). Without a
    second chunk (D1 == 0) x1 is x0, a placeholder no caller uses."""
    x0 = _load_chunk(base, rows, T, stride_t, stride_d, 0, D0, HEAD_DIM, MASK_ROWS, MASK0)
    if D1 > 0:
        x1 = _load_chunk(base, rows, T, stride_t, stride_d, D0, D1, HEAD_DIM, MASK_ROWS, MASK1)
    else:
        x1 = x0
    return x0, x1


@triton.jit
def _store_chunk(base, rows, T, stride_t, stride_d, x, COL0: tl.constexpr, WIDTH: tl.constexpr,
                 HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :] * stride_d
    if MASK_COLS:
        mask = (rows < T)[:, None] & (cols < HEAD_DIM)[None, :]
    else:
        mask = (rows < T)[:, None]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _store_head(base, rows, T, stride_t, stride_d, x0, x1, HEAD_DIM: tl.constexpr,
                D0: tl.constexpr, D1: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr):
    _store_chunk(base, rows, T, stride_t, stride_d, x0, 0, D0, HEAD_DIM, MASK0)
    if D1 > 0:
        _store_chunk(base, rows, T, stride_t, stride_d, x1, D0, D1, HEAD_DIM, MASK1)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a·b in float32; IEEE float32 products (no TF32) for float32 inputs."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _scores(a0, a1, b0, b1, D1: tl.constexpr, IEEE: tl.constexpr):
    """a·bᵀ over the head's chunks: a0·b0ᵀ (+ a1·b1ᵀ), float32 [len(a), len(b)]."""
    s = _dot(a0, tl.trans(b0), tl.zeros([a0.shape[0], b0.shape[0]], dtype=tl.float32), IEEE)
    if D1 > 0:
        s = _dot(a1, tl.trans(b1), s, IEEE)
    return s


@triton.jit
def _softmax_step(q0, q1, m, l, acc0, acc1, k_base, v_base, start, T, stride_t, stride_d,
                  qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  MASK0: tl.constexpr, MASK1: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Online softmax over keys start .. start + BLOCK: updates the running row max m and sum l
    (base-2 units) and the unnormalised outputs acc = Σ p·V, rescaled to the new max."""
    keys = start + tl.arange(0, BLOCK)
    k0, k1 = _load_head(k_base, keys, T, stride_t, stride_d, HEAD_DIM, D0, D1, MASK0, MASK1,
                        MASK_KEYS)
    s = _scores(q0, q1, k0, k1, D1, IEEE) * qk_scale
    if MASK_KEYS:
        s = tl.where((keys < T)[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v0, v1 = _load_head(v_base, keys, T, stride_t, stride_d, HEAD_DIM, D0, D1, MASK0, MASK1,
                        MASK_KEYS)
    p = p.to(v0.dtype)
    acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE)
    if D1 > 0:
        acc1 = _dot(p, v1, acc1 * alpha[:, None], IEEE)
    return m_new, l, acc0, acc1


@triton.jit
def _softmax_pass(q0, q1, k_base, v_base, T, stride_t, stride_d, qk_scale,
                  HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  MASK0: tl.constexpr, MASK1: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr):
    """Row max m, row sum l (base 2) and unnormalised outputs acc0/acc1 over all T keys."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        acc1 = acc0
    t_full = (T // BLOCK_N) * BLOCK_N
    for start in range(0, t_full, BLOCK_N):
        m, l, acc0, acc1 = _softmax_step(q0, q1, m, l, acc0, acc1, k_base, v_base, start, T,
                                         stride_t, stride_d, qk_scale, HEAD_DIM, D0, D1, MASK0,
                                         MASK1, IEEE, BLOCK_N, False)
    for start in range(t_full, T, TAIL):
        m, l, acc0, acc1 = _softmax_step(q0, q1, m, l, acc0, acc1, k_base, v_base, start, T,
                                         stride_t, stride_d, qk_scale, HEAD_DIM, D0, D1, MASK0,
                                         MASK1, IEEE, TAIL, True)
    return m, l, acc0, acc1


@triton.jit
def _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, k_base, v_base, start, T, stride_t,
             stride_d, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             MASK0: tl.constexpr, MASK1: tl.constexpr, IEEE: tl.constexpr, BLOCK: tl.constexpr,
             MASK_KEYS: tl.constexpr):
    """dQ += dS·K over keys start .. start + BLOCK (unscaled), dS = P ∘ (dO·Vᵀ − delta)."""
    keys = start + tl.arange(0, BLOCK)
    k0, k1 = _load_head(k_base, keys, T, stride_t, stride_d, HEAD_DIM, D0, D1, MASK0, MASK1,
                        MASK_KEYS)
    v0, v1 = _load_head(v_base, keys, T, stride_t, stride_d, HEAD_DIM, D0, D1, MASK0, MASK1,
                        MASK_KEYS)
    p = tl.exp2(_scores(q0, q1, k0, k1, D1, IEEE) * qk_scale - lse[:, None])
    if MASK_KEYS:
        p = tl.where((keys < T)[None, :], p, 0.0)
    dp = _scores(do0, do1, v0, v1, D1, IEEE)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = _dot(ds, k0, dq0, IEEE)
    if D1 > 0:
        dq1 = _dot(ds, k1, dq1, IEEE)
    return dq0, dq1


@triton.jit
def _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, q_base, g_base, lse_base, delta_base, start,
               T, stride_t, stride_d, stride_g_t, stride_g_d, qk_scale, HEAD_DIM: tl.constexpr,
               D0: tl.constexpr, D1: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr,
               IEEE: tl.constexpr, BLOCK: tl.constexpr, MASK_QUERIES: tl.constexpr):
    """dV += Pᵀ·dO and dK += dSᵀ·Q (unscaled) over queries start .. start + BLOCK."""
    rows = start + tl.arange(0, BLOCK)
    q0, q1 = _load_head(q_base, rows, T, stride_t, stride_d, HEAD_DIM, D0, D1, MASK0, MASK1,
                        MASK_QUERIES)
    do0, do1 = _load_head(g_base, rows, T, stride_g_t, stride_g_d, HEAD_DIM, D0, D1, MASK0,
                          MASK1, MASK_QUERIES)
    if MASK_QUERIES:
        # lse = +inf makes the probabilities of padded queries exp2(-inf) = 0.
        lse = tl.load(lse_base + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    pt = tl.exp2(_scores(k0, k1, q0, q1, D1, IEEE) * qk_scale - lse[None, :])  # Pᵀ [keys, rows]
    dv0 = _dot(pt.to(do0.dtype), do0, dv0, IEEE)
    if D1 > 0:
        dv1 = _dot(pt.to(do1.dtype), do1, dv1, IEEE)
    dpt = _scores(v0, v1, do0, do1, D1, IEEE)
    dst = (pt * (dpt - delta[None, :])).to(q0.dtype)
    dk0 = _dot(dst, q0, dk0, IEEE)
    if D1 > 0:
        dk1 = _dot(dst, q1, dk1, IEEE)
    return dk0, dk1, dv0, dv1


@triton.jit
def _program(qkv_ptr, H, n_blocks, stride_qkv_b, stride_qkv_d, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr):
    """Decodes program id (b·H + h)·n_blocks + block: returns (b·H + h, b, h, the block's
    tokens, and the Q, K, V base pointers of head h of sample b)."""
    pid = tl.program_id(0)
    bh = pid // n_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tokens = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = qkv_ptr + b * stride_qkv_b + h * HEAD_DIM * stride_qkv_d
    k_base = q_base + H * HEAD_DIM * stride_qkv_d
    v_base = k_base + H * HEAD_DIM * stride_qkv_d
    return bh.to(tl.int64), b, h, tokens, q_base, k_base, v_base


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    qkv_ptr, out_ptr,  # (B, T, 3·H·Dh), (B, T, H·Dh)
    T, H, n_blocks, qk_scale,
    stride_qkv_b, stride_qkv_t, stride_qkv_d,
    stride_out_b, stride_out_t, stride_out_d,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK0: tl.constexpr, MASK1: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch b, head h); out = softmax(Q·Kᵀ·scale)·V over
    all T keys. Grid: (B·H·n_blocks,), program id = (b·H + h)·n_blocks + block.
    Accumulation: float32; out cast to its dtype on store."""
    _, b, h, rows, q_base, k_base, v_base = _program(qkv_ptr, H, n_blocks, stride_qkv_b,
                                                      stride_qkv_d, HEAD_DIM, BLOCK_M)
    q0, q1 = _load_head(q_base, rows, T, stride_qkv_t, stride_qkv_d, HEAD_DIM, D0, D1, MASK0,
                        MASK1, True)
    m, l, acc0, acc1 = _softmax_pass(q0, q1, k_base, v_base, T, stride_qkv_t, stride_qkv_d,
                                     qk_scale, HEAD_DIM, D0, D1, MASK0, MASK1, IEEE, BLOCK_M,
                                     BLOCK_N, TAIL)
    inv_l = 1.0 / l
    o_base = out_ptr + b * stride_out_b + h * HEAD_DIM * stride_out_d
    _store_head(o_base, rows, T, stride_out_t, stride_out_d, acc0 * inv_l[:, None],
                acc1 * inv_l[:, None], HEAD_DIM, D0, D1, MASK0, MASK1)


@triton.jit
def _attn_bwd_dq_kernel(
    qkv_ptr, grad_ptr, grad_qkv_ptr,  # (B, T, 3·H·Dh), (B, T, H·Dh), (B, T, 3·H·Dh)
    lse_ptr, delta_ptr,  # (B·H, T) float32, written here
    T, H, n_blocks, qk_scale, sm_scale,
    stride_qkv_b, stride_qkv_t, stride_qkv_d,
    stride_g_b, stride_g_t, stride_g_d,
    stride_gq_b, stride_gq_t, stride_gq_d,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK0: tl.constexpr, MASK1: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch b, head h). Pass 1 over the keys: logsumexp
    (base 2) and delta = rowsum(dO ∘ O), stored for the dK/dV kernel; pass 2: dQ into grad_qkv.
    Grid and program ids as in the forward. Accumulation: float32."""
    bh, b, h, rows, q_base, k_base, v_base = _program(qkv_ptr, H, n_blocks, stride_qkv_b,
                                                      stride_qkv_d, HEAD_DIM, BLOCK_M)
    g_base = grad_ptr + b * stride_g_b + h * HEAD_DIM * stride_g_d
    q0, q1 = _load_head(q_base, rows, T, stride_qkv_t, stride_qkv_d, HEAD_DIM, D0, D1, MASK0,
                        MASK1, True)
    do0, do1 = _load_head(g_base, rows, T, stride_g_t, stride_g_d, HEAD_DIM, D0, D1, MASK0,
                          MASK1, True)

    m, l, acc0, acc1 = _softmax_pass(q0, q1, k_base, v_base, T, stride_qkv_t, stride_qkv_d,
                                     qk_scale, HEAD_DIM, D0, D1, MASK0, MASK1, IEEE, BLOCK_M,
                                     BLOCK_N, TAIL)
    inv_l = 1.0 / l
    delta = tl.sum(acc0 * inv_l[:, None] * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(acc1 * inv_l[:, None] * do1.to(tl.float32), 1)
    lse = m + tl.log2(l)
    stats = bh * T + rows
    tl.store(lse_ptr + stats, lse, mask=rows < T)
    tl.store(delta_ptr + stats, delta, mask=rows < T)

    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        dq1 = dq0
    t_full = (T // BLOCK_N) * BLOCK_N
    for start in range(0, t_full, BLOCK_N):
        dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, k_base, v_base, start, T,
                            stride_qkv_t, stride_qkv_d, qk_scale, HEAD_DIM, D0, D1, MASK0, MASK1,
                            IEEE, BLOCK_N, False)
    for start in range(t_full, T, TAIL):
        dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, k_base, v_base, start, T,
                            stride_qkv_t, stride_qkv_d, qk_scale, HEAD_DIM, D0, D1, MASK0, MASK1,
                            IEEE, TAIL, True)
    dq_base = grad_qkv_ptr + b * stride_gq_b + h * HEAD_DIM * stride_gq_d
    _store_head(dq_base, rows, T, stride_gq_t, stride_gq_d, dq0 * sm_scale, dq1 * sm_scale,
                HEAD_DIM, D0, D1, MASK0, MASK1)


@triton.jit
def _attn_bwd_dkdv_kernel(
    qkv_ptr, grad_ptr, grad_qkv_ptr,  # (B, T, 3·H·Dh), (B, T, H·Dh), (B, T, 3·H·Dh)
    lse_ptr, delta_ptr,  # (B·H, T) float32, from _attn_bwd_dq_kernel
    T, H, n_blocks, qk_scale, sm_scale,
    stride_qkv_b, stride_qkv_t, stride_qkv_d,
    stride_g_b, stride_g_t, stride_g_d,
    stride_gq_b, stride_gq_t, stride_gq_d,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK0: tl.constexpr, MASK1: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    """One program: BLOCK_M keys of one (batch b, head h); one pass over all T queries gives
    dK and dV for those keys, stored into grad_qkv. Grid: (B·H·n_blocks,), program id =
    (b·H + h)·n_blocks + block. Accumulation: float32."""
    bh, b, h, keys, q_base, k_base, v_base = _program(qkv_ptr, H, n_blocks, stride_qkv_b,
                                                      stride_qkv_d, HEAD_DIM, BLOCK_M)
    g_base = grad_ptr + b * stride_g_b + h * HEAD_DIM * stride_g_d
    lse_base = lse_ptr + bh * T
    delta_base = delta_ptr + bh * T
    k0, k1 = _load_head(k_base, keys, T, stride_qkv_t, stride_qkv_d, HEAD_DIM, D0, D1, MASK0,
                        MASK1, True)
    v0, v1 = _load_head(v_base, keys, T, stride_qkv_t, stride_qkv_d, HEAD_DIM, D0, D1, MASK0,
                        MASK1, True)

    dk0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        dk1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        dk1 = dk0
        dv1 = dv0
    t_full = (T // BLOCK_N) * BLOCK_N
    for start in range(0, t_full, BLOCK_N):
        dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, q_base, g_base,
                                        lse_base, delta_base, start, T, stride_qkv_t,
                                        stride_qkv_d, stride_g_t, stride_g_d, qk_scale, HEAD_DIM,
                                        D0, D1, MASK0, MASK1, IEEE, BLOCK_N, False)
    for start in range(t_full, T, TAIL):
        dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, q_base, g_base,
                                        lse_base, delta_base, start, T, stride_qkv_t,
                                        stride_qkv_d, stride_g_t, stride_g_d, qk_scale, HEAD_DIM,
                                        D0, D1, MASK0, MASK1, IEEE, TAIL, True)
    dk_base = grad_qkv_ptr + b * stride_gq_b + (H + h) * HEAD_DIM * stride_gq_d
    dv_base = dk_base + H * HEAD_DIM * stride_gq_d
    _store_head(dk_base, keys, T, stride_gq_t, stride_gq_d, dk0 * sm_scale, dk1 * sm_scale,
                HEAD_DIM, D0, D1, MASK0, MASK1)
    _store_head(dv_base, keys, T, stride_gq_t, stride_gq_d, dv0, dv1, HEAD_DIM, D0, D1, MASK0,
                MASK1)


# --- launch helpers -----------------------------------------------------------------------------


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(D0, D1): power-of-two column chunks, each >= 16, covering ``head_dim`` (D1 = 0 for one
    chunk); the two-chunk cover is used only when it is narrower than one power of two.
    64 -> (64, 0), 72 -> (64, 16), 96 -> (64, 32), 120 -> (128, 0), 8 -> (16, 0)."""
    width = max(_MIN_DOT, cdiv(head_dim, _MIN_DOT) * _MIN_DOT)
    single = next_power_of_2(width)
    d0 = single // 2
    if d0 >= _MIN_DOT and d0 < width:
        d1 = next_power_of_2(width - d0)
        if d0 + d1 < single:
            return d0, d1
    return single, 0


def _launch_config(head_dim: int, dtype: torch.dtype, forward: bool = False) -> dict:
    """Constexprs and launch options of the forward kernel (``forward``) or of both backward
    kernels, for one head dim and dtype."""
    d0, d1 = head_dim_chunks(head_dim)
    width = d0 + d1
    # Halve the inner tile where a padded row is wider than 256 bytes, to bound shared memory.
    row_bytes = width * dtype.itemsize
    block_n = 64 if row_bytes <= 256 else 32
    # Rows of 1 KiB (float32, head dims 193-256): the backward holds four [BLOCK_M, 256] float32
    # tiles in shared memory, ~200 KiB at BLOCK_M = 64, over an A100's 163 KiB; halve BLOCK_M.
    block_m = _BLOCK_M if row_bytes <= 768 else _BLOCK_M // 2
    num_warps = 4 if width <= 64 else 8
    if not forward and dtype.itemsize == 2 and width >= 192:
        # 16-bit backward at padded widths 192 and 256 (head dims 168-256): 64-row blocks
        # spilled on sm_80 (3.7 KB per thread in dK/dV at 192) or sm_90a (48 bytes at 256);
        # 32-row blocks spill on neither (compiled by scripts/compile_triton_kernels.py; at
        # widths 144 and 160 they would add spills on sm_90a, so those keep 64).
        block_m = _BLOCK_M // 2
    if forward and dtype == torch.float32:
        # IEEE float32 products run on the CUDA cores with their operands in registers: 64-row
        # tiles spill (compiled for sm_80 / sm_90a by scripts/compile_triton_kernels.py: 736 /
        # 712 bytes per thread at head dim 64, 56 / 688 at 120). 32 rows over 8 warps with
        # 64-key tiles up to 512-byte rows spill nothing on sm_90a up to head dim 192 (8 bytes
        # on sm_80 at head dims 40 and 64). float32 is the sampler's default precision.
        block_m, num_warps = _BLOCK_M // 2, 8
        block_n = 64 if row_bytes <= 512 else 32
    return dict(
        HEAD_DIM=head_dim, D0=d0, D1=d1,
        MASK0=d1 == 0 and d0 != head_dim, MASK1=d1 > 0 and width != head_dim,
        IEEE=dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, TAIL=_TAIL,
        num_warps=num_warps, num_stages=2, **FP_FUSION,
    )


def _geometry(name: str, qkv: Tensor, num_heads) -> tuple[int, int, int, int]:
    """Validates qkv and num_heads; returns (B, T, H, Dh)."""
    try:
        H = operator.index(num_heads)
    except TypeError:
        kind = type(num_heads).__name__
        raise TypeError(f"{name}: num_heads must be an int, got {kind}") from None
    if H <= 0:
        raise ValueError(f"{name}: num_heads must be positive, got {H}")
    if qkv.dim() != 3:
        raise ValueError(f"{name}: qkv must be (B, T, 3·H·Dh), got shape {tuple(qkv.shape)}")
    B, T, width = qkv.shape
    if width % (3 * H):
        raise ValueError(
            f"{name}: last dim {width} of qkv is not 3·num_heads·head_dim for num_heads={H}"
        )
    Dh = width // (3 * H)
    if Dh > MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {Dh} > {MAX_HEAD_DIM} is not supported")
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: qkv dtype {qkv.dtype} not supported (one of {SUPPORTED_DTYPES})")
    if not qkv.is_cuda and not is_interpreter():
        raise ValueError(
            f"{name}: qkv is on {qkv.device}; the Triton kernels run CUDA tensors, or CPU tensors "
            "under TRITON_INTERPRET=1"
        )
    return B, T, H, Dh


# --- public launchers ---------------------------------------------------------------------------


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """softmax(Q·Kᵀ/sqrt(Dh))·V per head, non-causal.

    Args: qkv (B, T, 3·H·Dh), any strides, columns (3, H, Dh); num_heads H.
    Returns out (B, T, H·Dh), contiguous, in qkv's dtype (float32 accumulation).
    """
    B, T, H, Dh = _geometry("attention", qkv, num_heads)
    out = torch.empty((B, T, H * Dh), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out
    cfg = _launch_config(Dh, qkv.dtype, forward=True)
    n_blocks = cdiv(T, cfg["BLOCK_M"])
    with device_guard(qkv):
        _attn_fwd_kernel[(B * H * n_blocks,)](
            qkv, out, T, H, n_blocks, Dh**-0.5 * _LOG2E,
            *qkv.stride(), *out.stride(), **cfg,
        )
    return out


def attention_backward(grad: Tensor, qkv: Tensor, num_heads: int) -> Tensor:
    """Gradient of :func:`attention` with respect to qkv, recomputed from (grad, qkv).

    Args: grad (B, T, H·Dh), any strides (a float dtype other than qkv's is cast to qkv's);
    qkv (B, T, 3·H·Dh) as for :func:`attention`.
    Returns grad_qkv (B, T, 3·H·Dh), contiguous, in qkv's dtype (float32 accumulation).
    """
    B, T, H, Dh = _geometry("attention_backward", qkv, num_heads)
    if tuple(grad.shape) != (B, T, H * Dh):
        raise ValueError(
            f"attention_backward: grad must be {(B, T, H * Dh)} for qkv {tuple(qkv.shape)}, "
            f"got {tuple(grad.shape)}"
        )
    if grad.device != qkv.device:
        raise ValueError(f"attention_backward: grad is on {grad.device}, qkv on {qkv.device}")
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if grad_qkv.numel() == 0:
        return grad_qkv
    grad = grad.to(qkv.dtype)
    cfg = _launch_config(Dh, qkv.dtype)
    n_blocks = cdiv(T, cfg["BLOCK_M"])
    lse = torch.empty((B * H, T), dtype=torch.float32, device=qkv.device)
    delta = torch.empty_like(lse)
    args = (
        qkv, grad, grad_qkv, lse, delta, T, H, n_blocks, Dh**-0.5 * _LOG2E, Dh**-0.5,
        *qkv.stride(), *grad.stride(), *grad_qkv.stride(),
    )
    with device_guard(qkv):
        _attn_bwd_dq_kernel[(B * H * n_blocks,)](*args, **cfg)
        _attn_bwd_dkdv_kernel[(B * H * n_blocks,)](*args, **cfg)
    return grad_qkv
