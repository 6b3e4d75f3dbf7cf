"""Gated residual add (adaLN-Zero's x + gate·y): Triton forward and backward kernels.

Same signatures, return conventions and math as ``epg.reference``:

* ``gated_residual(x, gate, y) -> out``: x, y (B, T, D), gate (B, D) broadcast over tokens;
  out = x + gate·y in x's dtype.
* ``gated_residual_backward(grad, gate, y) -> (grad_gate, grad_y)``: grad_gate = Σ_t grad·y
  (B, D) in gate's dtype, grad_y = grad·gate in y's dtype. grad_x is ``grad`` itself, so (as in
  the reference) it is not returned: the op layer passes grad through without a copy.

Arithmetic in float32 (float64 for float64 x in the forward, float64 grad in the backward, as
the reference chooses), one rounding on store. Inputs may have any strides (gates are typically
chunks of one (B, 6·D) adaLN output, so their row stride is 6·D); outputs are fresh contiguous
tensors.

Blocking: tiles of BLOCK_T tokens × BLOCK_D = 128 columns (the next power of two for narrower D),
about 4096 elements each, so wide rows (D = 1152, 1584, 2688) are split into column tiles rather
than padded to a power of two. The forward runs one program per tile. The backward's program
owns one (sample b, column tile) and one of ``chunks`` interleaved sets of its token tiles; it
stores grad_y for its tiles and the partial Σ grad·y of its columns into a
(B, chunks, D) float32 buffer, summed in torch afterwards: deterministic, no atomics. ``chunks``
is chosen so that the grid has about 4 programs per SM (4 in all under the interpreter).

This lives in its own module rather than in layer_norm.py: it is a separate op in epg.ops (the
model calls it after the attention / MLP branch, not after a norm), it shares no kernel code with
LayerNorm, and layer_norm.py would pass the ~400-line budget with it.

What only a GPU can confirm: speed (the op is memory-bound: it should run near bandwidth, 3
reads + 1 write per element forward, 2 reads + 1 write backward) and bfloat16 numerics (the
interpreter cannot do bfloat16 arithmetic; tests/test_triton_residual.py has a ``cuda`` test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FP_FUSION,
    cdiv,
    device_guard,
    is_interpreter,
    next_power_of_2,
    num_warps_for,
    target_programs,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_BLOCK_D = 128
_TILE_ELEMS = 4096
_MAX_ROWS = 64


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, out_ptr,  # (B, T, D), (B, D), (B, T, D), (B, T, D)
    T, D, tiles_t, tiles_d,
    stride_x_b, stride_x_t, stride_x_d,
    stride_gate_b, stride_gate_d,
    stride_y_b, stride_y_t, stride_y_d,
    stride_out_b, stride_out_t, stride_out_d,
    ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: a [BLOCK_T, BLOCK_D] tile of sample b, out = x + gate[b]·y.
    Grid: (B · tiles_t · tiles_d,), program id = (b · tiles_t + t_tile) · tiles_d + d_tile.
    Arithmetic in ACC_DTYPE (float32, float64 for float64 x), cast to out's dtype on store."""
    pid = tl.program_id(0)
    d_tile = pid % tiles_d
    bt = pid // tiles_d
    b = (bt // tiles_t).to(tl.int64)
    offs_t = (bt % tiles_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < T)[:, None] & mask_d[None, :]
    rows = offs_t.to(tl.int64)[:, None]
    cols = offs_d[None, :]

    gate = tl.load(gate_ptr + b * stride_gate_b + offs_d * stride_gate_d, mask=mask_d, other=0.0)
    x = tl.load(x_ptr + b * stride_x_b + rows * stride_x_t + cols * stride_x_d, mask=mask,
                other=0.0)
    y = tl.load(y_ptr + b * stride_y_b + rows * stride_y_t + cols * stride_y_d, mask=mask,
                other=0.0)
    out = x.to(ACC_DTYPE) + gate.to(ACC_DTYPE)[None, :] * y.to(ACC_DTYPE)
    tl.store(out_ptr + b * stride_out_b + rows * stride_out_t + cols * stride_out_d,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    grad_ptr, gate_ptr, y_ptr,  # (B, T, D), (B, D), (B, T, D)
    grad_y_ptr, part_gate_ptr,  # (B, T, D); (B, chunks, D) in ACC_DTYPE
    T, D, chunks, tiles_d,
    stride_grad_b, stride_grad_t, stride_grad_d,
    stride_gate_b, stride_gate_d,
    stride_y_b, stride_y_t, stride_y_d,
    stride_gy_b, stride_gy_t, stride_gy_d,
    ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: sample b, column tile d_tile, chunk c: it walks the token tiles c,
    c + chunks, ... of sample b, stores grad_y = grad·gate[b] for them and row b·chunks + c of the
    partial-sum buffer: Σ grad·y over those tokens. Grid: (B · chunks · tiles_d,), program id =
    (b · chunks + c) · tiles_d + d_tile. Arithmetic and partial sums in ACC_DTYPE."""
    pid = tl.program_id(0)
    d_tile = pid % tiles_d
    bc = pid // tiles_d
    b = (bc // chunks).to(tl.int64)
    chunk = bc % chunks
    offs_d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    cols = offs_d[None, :]
    gate = tl.load(gate_ptr + b * stride_gate_b + offs_d * stride_gate_d, mask=mask_d,
                   other=0.0).to(ACC_DTYPE)

    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    for t0 in range(chunk * BLOCK_T, T, chunks * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_d[None, :]
        rows = offs_t.to(tl.int64)[:, None]
        g = tl.load(grad_ptr + b * stride_grad_b + rows * stride_grad_t + cols * stride_grad_d,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        y = tl.load(y_ptr + b * stride_y_b + rows * stride_y_t + cols * stride_y_d,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        acc += g * y
        tl.store(grad_y_ptr + b * stride_gy_b + rows * stride_gy_t + cols * stride_gy_d,
                 (g * gate[None, :]).to(grad_y_ptr.dtype.element_ty), mask=mask)
    tl.store(part_gate_ptr + bc.to(tl.int64) * D + offs_d, tl.sum(acc, axis=0), mask=mask_d)


# --- launch helpers -----------------------------------------------------------------------------


def _tiles(T: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): BLOCK_D columns up to 128, rows up to ~4096 elements."""
    block_d = min(_MAX_BLOCK_D, next_power_of_2(D))
    block_t = max(1, min(next_power_of_2(T), _TILE_ELEMS // block_d, _MAX_ROWS))
    return block_t, block_d, num_warps_for(block_t * block_d)


def _acc_dtype(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _check(name: str, ref: Tensor, tensors: dict[str, tuple[Tensor, tuple]]) -> None:
    for key, (t, shape) in tensors.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: {key} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {key} dtype {t.dtype} not supported (one of "
                            f"{SUPPORTED_DTYPES})")
        if t.device != ref.device:
            raise ValueError(f"{name}: {key} is on {t.device}, not {ref.device}")
    if not ref.is_cuda and not is_interpreter():
        raise ValueError(
            f"{name}: tensors are on {ref.device}; the Triton kernels run CUDA tensors, or CPU "
            "tensors under TRITON_INTERPRET=1"
        )


# --- public launchers ---------------------------------------------------------------------------


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate·y with a per-sample gate broadcast over tokens.

    Args: x, y (B, T, D); gate (B, D); any strides and float dtypes.
    Returns (B, T, D), contiguous, in x's dtype (float32 arithmetic, float64 for float64 x).
    """
    if x.dim() != 3:
        raise ValueError(f"gated_residual: x must be (B, T, D), got {tuple(x.shape)}")
    B, T, D = x.shape
    _check("gated_residual", x, {"x": (x, x.shape), "gate": (gate, (B, D)), "y": (y, x.shape)})
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_t, block_d, num_warps = _tiles(T, D)
    tiles_t, tiles_d = cdiv(T, block_t), cdiv(D, block_d)
    with device_guard(x):
        _gated_residual_fwd_kernel[(B * tiles_t * tiles_d,)](
            x, gate, y, out, T, D, tiles_t, tiles_d,
            *x.stride(), *gate.stride(), *y.stride(), *out.stride(),
            ACC_DTYPE=_acc_dtype(x), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps, **FP_FUSION,
        )
    return out


def gated_residual_backward(grad: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`gated_residual` with respect to gate and y (grad_x is grad itself).

    Args: grad, y (B, T, D); gate (B, D); any strides.
    Returns (grad_gate (B, D) in gate's dtype, grad_y (B, T, D) in y's dtype), contiguous;
    float32 arithmetic (float64 for float64 grad).
    """
    if grad.dim() != 3:
        raise ValueError(
            f"gated_residual_backward: grad must be (B, T, D), got {tuple(grad.shape)}"
        )
    B, T, D = grad.shape
    _check("gated_residual_backward", grad,
           {"grad": (grad, grad.shape), "gate": (gate, (B, D)), "y": (y, grad.shape)})
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if grad.numel() == 0:
        return torch.zeros((B, D), dtype=gate.dtype, device=gate.device), grad_y
    block_t, block_d, num_warps = _tiles(T, D)
    tiles_d = cdiv(D, block_d)
    chunks = max(1, min(cdiv(T, block_t), cdiv(target_programs(grad.device), B * tiles_d)))
    acc = _acc_dtype(grad)
    part = torch.empty((B, chunks, D), device=grad.device,
                       dtype=torch.float64 if acc == tl.float64 else torch.float32)
    with device_guard(grad):
        _gated_residual_bwd_kernel[(B * chunks * tiles_d,)](
            grad, gate, y, grad_y, part, T, D, chunks, tiles_d,
            *grad.stride(), *gate.stride(), *y.stride(), *grad_y.stride(),
            ACC_DTYPE=acc, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps, **FP_FUSION,
        )
    return part.sum(1).to(gate.dtype), grad_y
