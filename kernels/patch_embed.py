"""Patch embedding: image → tokens in one matrix product, Triton forward and backward kernels.

Same signatures, return conventions and math as ``epg.reference``:

* ``patch_embed(img, weight, bias, pos_embed) -> tokens``: img (B, C, H, W), weight (D, C, p, p)
  (a stride-p Conv2d's), bias (D,), pos_embed (N, D), N = (H/p)·(W/p) → tokens (B, N, D) =
  patches·Wᵀ + bias + pos_embed, tokens row-major over the patch grid, patch features in Conv2d's
  (c, p1, p2) order.
* ``patch_embed_backward(grad, img, weight, pos_embed, need_img_grad)
  -> (grad_img, grad_weight, grad_bias, grad_pos_embed)``; grad_img is an empty (0,) tensor when
  ``need_img_grad`` is False (the image is data in training).

Patch gather. No patchified copy of the image is made: the kernels treat the image as the matrix
A (B·N, C·p·p) whose entry (m, k) lives at a computable address. With m = b·N + i·w + j (token
(i, j) of sample b) and k = c·p² + p1·p + p2, the address is
    row(m) + col(k) = [b·s_b + i·p·s_h + j·p·s_w] + [c·s_c + p1·s_h + p2·s_w],
a per-row plus a per-column offset, so an operand tile is loaded straight from the image (any
strides: NCHW, channels-last, slices) with one broadcast add. K is walked in chunks of ROWS
whole patch rows of one channel (BLOCK_K = ROWS·p features, p padded to a power of two): the
in-chunk column offsets p1'·s_h + p2·s_w are computed once per program and each chunk adds one
scalar, c·s_c + p1_0·s_h, so the gather costs nothing per step beyond the load. The weight is
read as Wᵀ (C·p·p, D) through its own four strides the same way, and the image-gradient kernel
scatters its tiles into grad_img through the same addresses (patches do not overlap: each pixel
is written once, without atomics). :func:`_chunking` lists the chunk shapes per patch size.

Blocking (one configuration per shape and dtype, the same under the interpreter and on a GPU; no
autotune). Forward: a program owns BLOCK_M = 64 tokens (a tile may span two samples) × BLOCK_N
features (128 for 16-bit inputs, 64 for float32) and walks all C·CHUNKS chunks (of 64 features,
32 for float32, whose 64-wide chunks spill registers); the epilogue adds
bias and pos_embed[n] and stores once. Backward:
1. ``_patch_embed_bwd_weight_kernel``: a program owns 64 features × one chunk of grad_weight and
   reduces over all B·N tokens, walking token blocks of 64 and, inside, the batch, so it sums
   gᵀ·A deterministically without partial buffers. The programs of chunk 0 also sum their
   gradient tiles over the batch (grad_pos_embed for that token block, stored before moving on)
   and over the tokens (grad_bias): the three parameter gradients come from one pass over grad.
2. ``_patch_embed_bwd_img_kernel`` (only when need_img_grad): g·W per 64 tokens × one chunk,
   reduced over D in pieces of 64, scattered into the image layout.

Numerics. Every product accumulates in float32. The dtype the products are taken in is the
forward's, for the backward too: an image and weight of one 16-bit dtype go to tl.dot as they are
(their products are exact in float32), and the backward rounds the gradient to that dtype for its
products (as autocast's conv2d backward does with its 16-bit output's gradient: under autocast
the op layer hands this kernel 16-bit image and weight, while the tokens, and so their gradient,
are float32 like pos_embed; grad_bias and grad_pos_embed sum the unrounded gradient). Any other
mix, and float32, is multiplied in IEEE float32 (no TF32), so float32 inputs match a float64
reference to ~1e-6.
Outputs are rounded once on store: tokens to the dtype the reference returns (img's dtype
promoted with pos_embed's), each gradient to the dtype of its input (grad_bias to weight's, as
the reference does). float64 is not taken (tl.dot has no float64 path worth using): SUPPORTS
declines it, so automatic backend choice runs the reference for it.

What only a GPU can confirm: speed and the block sizes, num_warps and num_stages (chosen by
reasoning, not measured; compiled ahead of time for sm_90 the bf16 kernels use wgmma with
cp.async-pipelined operand loads); bfloat16 numerics (the interpreter cannot do bfloat16
arithmetic; tests/test_triton_patch_embed.py has ``cuda`` tests at the EPG shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, cdiv, device_guard, is_interpreter, next_power_of_2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_BLOCK_M = 64  # tokens per tile (and features per tile in the weight-gradient kernel)
_BLOCK_K = 64  # patch features per chunk, where the patch size allows


# --- device helpers -----------------------------------------------------------------------------


@triton.jit
def _token_offsets(offs_m, N, W_PATCHES, stride_b, stride_h, stride_w, P: tl.constexpr):
    """(image offset of the top-left pixel of each token's patch, token index n within its
    sample) for flat token indices m = b·N + i·W_PATCHES + j."""
    b = offs_m // N
    n = offs_m % N
    i = n // W_PATCHES
    j = n % W_PATCHES
    off = b.to(tl.int64) * stride_b + (i * P).to(tl.int64) * stride_h + (j * P) * stride_w
    return off, n


@triton.jit
def _chunk_layout(stride_h, stride_w, P: tl.constexpr, P_PAD: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """For the BLOCK_K columns of a chunk (ROWS = BLOCK_K / P_PAD patch rows of one channel, P_PAD
    columns each): (offset of each column relative to the chunk's first pixel, patch row of each
    column within the chunk, whether its column p2 < P)."""
    kk = tl.arange(0, BLOCK_K)
    row = kk // P_PAD
    col = kk % P_PAD
    return row * stride_h + col * stride_w, row, col < P


# --- kernels ------------------------------------------------------------------------------------
#
# The K = C·p² features are walked in chunks t = 0 .. C·CHUNKS: chunk t covers channel
# c = t // CHUNKS, patch rows p1 = p1_0 .. p1_0 + ROWS (p1_0 = (t % CHUNKS)·ROWS) and columns
# p2 = 0 .. P_PAD, i.e. features k = c·p² + p1·p + p2, masked where p1 >= p or p2 >= p (only when
# MASK_K: p not a power of two, or ROWS not dividing p). The in-chunk offsets are computed once;
# a chunk adds one scalar offset c·s_c + p1_0·s_h.


@triton.jit
def _patch_embed_fwd_kernel(
    img_ptr, weight_ptr, bias_ptr,  # (B, C, H, W), (D, C, p, p), (D,)
    pos_ptr, out_ptr,  # (N, D), (B, N, D)
    M, N, D, C, W_PATCHES, tiles_n,
    stride_img_b, stride_img_c, stride_img_h, stride_img_w,
    stride_w_d, stride_w_c, stride_w_h, stride_w_w,
    stride_bias_d, stride_pos_n, stride_pos_d,
    P: tl.constexpr, P_PAD: tl.constexpr, CHUNKS: tl.constexpr, MASK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: tokens m0 .. m0 + BLOCK_M (flat over B·N) × features d0 .. d0 + BLOCK_N of
    out = A·Wᵀ + bias + pos_embed[n], A gathered from the image. Grid: (cdiv(M, BLOCK_M) ·
    tiles_n,), program id = m_tile · tiles_n + n_tile. Accumulation: float32."""
    ROWS: tl.constexpr = BLOCK_K // P_PAD
    pid = tl.program_id(0)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_d = offs_d < D
    row, n = _token_offsets(offs_m, N, W_PATCHES, stride_img_b, stride_img_h, stride_img_w, P)
    a_off, k_row, k_col_ok = _chunk_layout(stride_img_h, stride_img_w, P, P_PAD, BLOCK_K)
    w_off, _, _ = _chunk_layout(stride_w_h, stride_w_w, P, P_PAD, BLOCK_K)
    a_ptrs = img_ptr + row[:, None] + a_off[None, :]  # A tile of chunk 0 [BLOCK_M, BLOCK_K]
    w_ptrs = weight_ptr + offs_d.to(tl.int64)[None, :] * stride_w_d + w_off[:, None]  # Wᵀ tile

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, C * CHUNKS):
        c = t // CHUNKS
        p1_0 = (t % CHUNKS) * ROWS
        if MASK_K:
            k_ok = k_col_ok & (k_row < P - p1_0)
            a = tl.load(a_ptrs + (c.to(tl.int64) * stride_img_c + p1_0 * stride_img_h),
                        mask=mask_m[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs + (c * stride_w_c + p1_0 * stride_w_h),
                         mask=k_ok[:, None] & mask_d[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs + (c.to(tl.int64) * stride_img_c + p1_0 * stride_img_h),
                        mask=mask_m[:, None], other=0.0)
            wt = tl.load(w_ptrs + (c * stride_w_c + p1_0 * stride_w_h),
                         mask=mask_d[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)

    bias = tl.load(bias_ptr + offs_d * stride_bias_d, mask=mask_d, other=0.0).to(tl.float32)
    mask = mask_m[:, None] & mask_d[None, :]
    pos = tl.load(pos_ptr + n.to(tl.int64)[:, None] * stride_pos_n + offs_d[None, :] * stride_pos_d,
                  mask=mask, other=0.0).to(tl.float32)
    out = acc + bias[None, :] + pos
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_bwd_weight_kernel(
    grad_ptr, img_ptr,  # (B, N, D), (B, C, H, W)
    grad_w_ptr, grad_bias_ptr, grad_pos_ptr,  # (D, C, p, p), (D,), (N, D), contiguous
    B, N, D, K, W_PATCHES, tiles_k,
    stride_g_b, stride_g_n, stride_g_d,
    stride_img_b, stride_img_c, stride_img_h, stride_img_w,
    P: tl.constexpr, P_PAD: tl.constexpr, CHUNKS: tl.constexpr, MASK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program: features d0 .. d0 + BLOCK_D × chunk t of grad_weight = Σ_m g[m, d]·A[m, k]
    over all B·N tokens, walking token blocks of BLOCK_M and, inside each, the batch. The
    programs of chunk 0 also store grad_pos_embed (Σ_b g) for each token block and grad_bias
    (Σ_b Σ_n g) for their features. Grid: (cdiv(D, BLOCK_D) · tiles_k,), tiles_k = C·CHUNKS,
    program id = d_tile · tiles_k + t. Accumulation: float32."""
    ROWS: tl.constexpr = BLOCK_K // P_PAD
    pid = tl.program_id(0)
    t = pid % tiles_k
    c = t // CHUNKS
    p1_0 = (t % CHUNKS) * ROWS
    offs_d = (pid // tiles_k) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    a_off, k_row, k_col_ok = _chunk_layout(stride_img_h, stride_img_w, P, P_PAD, BLOCK_K)
    k_ok = k_col_ok & (k_row < P - p1_0)
    chunk_off = c.to(tl.int64) * stride_img_c + p1_0 * stride_img_h
    g_cols = grad_ptr + offs_d.to(tl.int64)[:, None] * stride_g_d

    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_M):
        offs_n = n0 + tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        # Tokens of sample 0; the pointers advance one sample per step of the batch loop.
        row, _ = _token_offsets(offs_n, N, W_PATCHES, 0, stride_img_h, stride_img_w, P)
        g_ptrs = g_cols + offs_n.to(tl.int64)[None, :] * stride_g_n  # gᵀ [BLOCK_D, BLOCK_M]
        a_ptrs = img_ptr + chunk_off + row[:, None] + a_off[None, :]  # A [BLOCK_M, BLOCK_K]
        mask_g = mask_d[:, None] & mask_n[None, :]
        if MASK_K:
            mask_a = mask_n[:, None] & k_ok[None, :]
        else:
            mask_a = mask_n[:, None]
        acc_pos = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        for _ in range(0, B):
            gt = tl.load(g_ptrs, mask=mask_g, other=0.0)
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
            acc = tl.dot(gt.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
            acc_pos += gt.to(tl.float32)
            g_ptrs += stride_g_b
            a_ptrs += stride_img_b
        if t == 0:
            tl.store(grad_pos_ptr + offs_n.to(tl.int64)[None, :] * D + offs_d[:, None],
                     acc_pos.to(grad_pos_ptr.dtype.element_ty), mask=mask_g)
            acc_bias += tl.sum(acc_pos, axis=1)

    # grad_weight is contiguous (D, C, p, p): feature k = c·p² + p1·p + p2.
    k = c * (P * P) + (p1_0 + k_row) * P + (tl.arange(0, BLOCK_K) % P_PAD)
    tl.store(grad_w_ptr + offs_d.to(tl.int64)[:, None] * K + k[None, :],
             acc.to(grad_w_ptr.dtype.element_ty), mask=mask_d[:, None] & k_ok[None, :])
    if t == 0:
        tl.store(grad_bias_ptr + offs_d, acc_bias.to(grad_bias_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _patch_embed_bwd_img_kernel(
    grad_ptr, weight_ptr, grad_img_ptr,  # (B, N, D), (D, C, p, p), (B, C, H, W)
    M, N, D, W_PATCHES, tiles_k,
    stride_g_b, stride_g_n, stride_g_d,
    stride_w_d, stride_w_c, stride_w_h, stride_w_w,
    stride_gi_b, stride_gi_c, stride_gi_h, stride_gi_w,
    P: tl.constexpr, P_PAD: tl.constexpr, CHUNKS: tl.constexpr, MASK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: tokens m0 .. m0 + BLOCK_M × chunk t of g·W (reduced over D in BLOCK_D
    pieces), scattered into grad_img at the patch addresses. Grid: (cdiv(M, BLOCK_M) · tiles_k,),
    tiles_k = C·CHUNKS, program id = m_tile · tiles_k + t. Accumulation: float32."""
    ROWS: tl.constexpr = BLOCK_K // P_PAD
    pid = tl.program_id(0)
    t = pid % tiles_k
    c = t // CHUNKS
    p1_0 = (t % CHUNKS) * ROWS
    offs_m = (pid // tiles_k) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    b = (offs_m // N).to(tl.int64)
    n = (offs_m % N).to(tl.int64)
    w_off, k_row, k_col_ok = _chunk_layout(stride_w_h, stride_w_w, P, P_PAD, BLOCK_K)
    k_ok = k_col_ok & (k_row < P - p1_0)
    g_ptrs = grad_ptr + b[:, None] * stride_g_b + n[:, None] * stride_g_n  # g [BLOCK_M, ·]
    w_ptrs = weight_ptr + (c.to(tl.int64) * stride_w_c + p1_0 * stride_w_h) + w_off[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptrs + offs_d[None, :] * stride_g_d,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if MASK_K:
            w = tl.load(w_ptrs + offs_d.to(tl.int64)[:, None] * stride_w_d,
                        mask=mask_d[:, None] & k_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs + offs_d.to(tl.int64)[:, None] * stride_w_d,
                        mask=mask_d[:, None], other=0.0)
        acc = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

    row, _ = _token_offsets(offs_m, N, W_PATCHES, stride_gi_b, stride_gi_h, stride_gi_w, P)
    gi_off, _, _ = _chunk_layout(stride_gi_h, stride_gi_w, P, P_PAD, BLOCK_K)
    gi_ptrs = (grad_img_ptr + (c.to(tl.int64) * stride_gi_c + p1_0 * stride_gi_h)
               + row[:, None] + gi_off[None, :])
    tl.store(gi_ptrs, acc.to(grad_img_ptr.dtype.element_ty),
             mask=mask_m[:, None] & k_ok[None, :])


# --- launch helpers -----------------------------------------------------------------------------


def _block(n: int, cap: int) -> int:
    """A tl.dot dimension for a problem extent n: a power of two in [16, cap]."""
    return max(_MIN_DOT, min(cap, next_power_of_2(n)))


def _chunking(p: int, block_k: int = _BLOCK_K) -> dict:
    """Constexprs of the feature chunks for patch size p: P_PAD = p rounded up to a power of two,
    ROWS patch rows of one channel per chunk (BLOCK_K = ROWS·P_PAD: ``block_k`` where p allows,
    never below tl.dot's 16), CHUNKS = chunks per channel, MASK_K = some chunk has padding.
    p=2: 8 rows (2 used) × 2; p=4: 4 × 4; p=8: 8 × 8; p=16: 4 × 16 (4 chunks); p=32: 2 × 32."""
    p_pad = next_power_of_2(p)
    rows = max(cdiv(_MIN_DOT, p_pad), min(block_k // p_pad, p_pad))
    return dict(P=p, P_PAD=p_pad, CHUNKS=cdiv(p, rows), MASK_K=p_pad != p or p % rows != 0,
                BLOCK_K=rows * p_pad)


def _dot_config(a: torch.dtype, b: torch.dtype) -> dict:
    """The dtype two operands are multiplied in and the tl.dot precision: a 16-bit dtype when
    both are it (exact products, float32 sums), else IEEE float32 (no TF32)."""
    if a == b and a in (torch.float16, torch.bfloat16):
        # "tf32" is tl.dot's default; it only affects float32 operands.
        return dict(DOT_DTYPE=tl.float16 if a == torch.float16 else tl.bfloat16, PRECISION="tf32")
    return dict(DOT_DTYPE=tl.float32, PRECISION="ieee")


def _geometry(name: str, img: Tensor, weight: Tensor, pos_embed: Tensor, bias: Tensor | None = None,
              grad: Tensor | None = None) -> tuple[int, int, int, int, int, int]:
    """Validates the inputs; returns (B, C, D, p, N, w) with w = W/p patches per row."""
    if img.dim() != 4:
        raise ValueError(f"{name}: img must be (B, C, H, W), got {tuple(img.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{name}: weight must be (D, C, p, p), got {tuple(weight.shape)}")
    B, C, H, W = img.shape
    D, c_w, p, _ = weight.shape
    if c_w != C or C == 0 or p == 0 or H % p or W % p:
        raise ValueError(
            f"{name}: img {tuple(img.shape)} does not fit weight {tuple(weight.shape)} "
            f"(expected {c_w} > 0 channels and sides divisible by {p})"
        )
    N = (H // p) * (W // p)
    tensors = {"img": (img, None), "weight": (weight, None), "pos_embed": (pos_embed, (N, D)),
               "bias": (bias, (D,)), "grad": (grad, (B, N, D))}
    for key, (t, shape) in tensors.items():
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: {key} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {key} dtype {t.dtype} not supported (one of "
                            f"{SUPPORTED_DTYPES})")
        if t.device != img.device:
            raise ValueError(f"{name}: {key} is on {t.device}, img on {img.device}")
    if not img.is_cuda and not is_interpreter():
        raise ValueError(
            f"{name}: img is on {img.device}; the Triton kernels run CUDA tensors, or CPU tensors "
            "under TRITON_INTERPRET=1"
        )
    return B, C, D, p, N, W // p


def declines(*args) -> str | None:
    """The SUPPORTS hook of both launchers (args as they take them): why they would refuse
    inputs the op layer accepts (a dtype other than float16/bfloat16/float32, an image without
    channels), or None."""
    for t in args:
        if isinstance(t, Tensor) and t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} (the kernels take {SUPPORTED_DTYPES})"
        if isinstance(t, Tensor) and t.dim() == 4 and t.shape[1] == 0:
            return "no channels"
    return None


# --- public launchers ---------------------------------------------------------------------------


def patch_embed(img: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    """Conv2d(kernel = stride = p) as tokens, + bias + positional embedding, in one kernel.

    Args: img (B, C, H, W), H and W multiples of p; weight (D, C, p, p); bias (D,);
    pos_embed (N, D), N = (H/p)·(W/p); any strides; float16, bfloat16 or float32.
    Returns tokens (B, N, D), contiguous, in img's dtype promoted with pos_embed's (as the
    reference), float32 accumulation.
    """
    B, C, D, p, N, w = _geometry("patch_embed", img, weight, pos_embed, bias=bias)
    out = torch.empty((B, N, D), dtype=torch.promote_types(img.dtype, pos_embed.dtype),
                      device=img.device)
    M = B * N
    if out.numel() == 0:
        return out
    sixteen_bit = img.dtype != torch.float32 and weight.dtype != torch.float32
    block_n = _block(D, 128 if sixteen_bit else 64)
    # float32 (IEEE products on the CUDA cores, operands in registers) at 64-feature chunks
    # spilled ~660 bytes per thread on sm_80 (scripts/compile_triton_kernels.py); 32-feature
    # chunks spill on neither sm_80 nor sm_90a. Sampling runs this at its default float32.
    block_k = _BLOCK_K if sixteen_bit else _BLOCK_K // 2
    tiles_n = cdiv(D, block_n)
    with device_guard(img):
        _patch_embed_fwd_kernel[(cdiv(M, _BLOCK_M) * tiles_n,)](
            img, weight, bias, pos_embed, out,
            M, N, D, C, w, tiles_n,
            *img.stride(), *weight.stride(), bias.stride(0), *pos_embed.stride(),
            **_chunking(p, block_k), **_dot_config(img.dtype, weight.dtype),
            BLOCK_M=_BLOCK_M, BLOCK_N=block_n, num_warps=4 if block_n <= 64 else 8, num_stages=3,
            **FP_FUSION,
        )
    return out


def patch_embed_backward(
    grad: Tensor, img: Tensor, weight: Tensor, pos_embed: Tensor, need_img_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`patch_embed`.

    Args: grad (B, N, D), any strides; img, weight, pos_embed as for :func:`patch_embed`;
    need_img_grad: whether to compute the image gradient.
    Returns (grad_img (B, C, H, W) in img's dtype, or an empty (0,) tensor when need_img_grad
    is False; grad_weight (D, C, p, p) and grad_bias (D,) in weight's dtype; grad_pos_embed
    (N, D) in pos_embed's dtype), all contiguous, float32 accumulation.
    """
    B, C, D, p, N, w = _geometry("patch_embed_backward", img, weight, pos_embed, grad=grad)
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=img.device)
    grad_bias = torch.empty(D, dtype=weight.dtype, device=img.device)
    grad_pos = torch.empty((N, D), dtype=pos_embed.dtype, device=img.device)
    grad_img = torch.empty(img.shape if need_img_grad else (0,), dtype=img.dtype,
                           device=img.device)
    if B * N == 0 or D == 0:
        return grad_img.zero_(), grad_w.zero_(), grad_bias.zero_(), grad_pos.zero_()
    chunking = _chunking(p)
    tiles_k = C * chunking["CHUNKS"]
    dot = _dot_config(img.dtype, weight.dtype)  # the forward's (see the module docstring)
    with device_guard(img):
        _patch_embed_bwd_weight_kernel[(cdiv(D, _BLOCK_M) * tiles_k,)](
            grad, img, grad_w, grad_bias, grad_pos,
            B, N, D, C * p * p, w, tiles_k,
            *grad.stride(), *img.stride(),
            **chunking, **dot,
            BLOCK_D=_BLOCK_M, BLOCK_M=_block(N, _BLOCK_M), num_warps=4, num_stages=3, **FP_FUSION,
        )
        if need_img_grad:
            _patch_embed_bwd_img_kernel[(cdiv(B * N, _BLOCK_M) * tiles_k,)](
                grad, weight, grad_img,
                B * N, N, D, w, tiles_k,
                *grad.stride(), *weight.stride(), *grad_img.stride(),
                **chunking, **dot,
                BLOCK_M=_BLOCK_M, BLOCK_D=_block(D, _BLOCK_M), num_warps=4, num_stages=3,
                **FP_FUSION,
            )
    return grad_img, grad_w, grad_bias, grad_pos
