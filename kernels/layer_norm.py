"""LayerNorm and LayerNorm + adaLN modulation: Triton forward and backward kernels.

Same signatures, return conventions and math as ``epg.reference``:

* ``layer_norm(x, weight, bias, eps) -> y``
* ``layer_norm_backward(grad, x, weight, eps) -> (grad_x, grad_weight, grad_bias)``
* ``ln_modulate(x, weight, bias, shift, scale, eps) -> out``, out = LN(x)·(1 + scale) + shift
* ``ln_modulate_backward(grad, x, weight, bias, shift, scale, eps)
  -> (grad_x, grad_weight, grad_bias, grad_shift, grad_scale)``

Both ops share one forward and one backward kernel: plain LayerNorm is the modulated kernel with
``HAS_MODULATION=False`` over a (1, N, D) view of the rows. Statistics, modulation and every
reduction are computed in float32 (float64 for float64 inputs) and cast once on store. Nothing
is saved between forward and backward: the backward recomputes mean and rstd from x.

Layout: x and grad are seen as (B, T, D) with arbitrary strides (no copy for transposes or
strided slices of a 3-D tensor); weight, bias, shift and scale may be strided too. Outputs are
fresh contiguous tensors. grad_weight / grad_bias (and grad_shift / grad_scale per sample) are
reduced through per-program partial sums, a (programs, D) buffer summed afterwards in torch, so
the result is deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, cdiv, device_guard, row_block, target_programs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Each program holds whole rows (BLOCK_D >= D), and the backward four accumulators of a row, so
# wide rows spill registers long before Triton's block limit stops the compile. The cap keeps
# EPG's widths (at most 1584) far inside; wider rows go to the reference.
MAX_WIDTH = 8192


def declines(x: Tensor, *rest) -> str | None:
    """The SUPPORTS hook of the four launchers (called with their forward input, or with grad
    and x): rows wider than MAX_WIDTH go to the reference, or None."""
    if x.dim() >= 1 and x.shape[-1] > MAX_WIDTH:
        return f"rows of {x.shape[-1]} > {MAX_WIDTH} elements"
    return None


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _normalize_tile(x, mask, D, eps):
    """x_hat and rstd of the rows of an fp32/fp64 tile [BLOCK_T, BLOCK_D] whose masked entries
    are 0; masked entries of x_hat come out 0."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _ln_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, y_ptr,
    T, D, tiles_per_sample, eps,
    stride_x_b, stride_x_t, stride_x_d,
    stride_weight_d, stride_bias_d,
    stride_shift_b, stride_shift_d,
    stride_scale_b, stride_scale_d,
    stride_y_b, stride_y_t, stride_y_d,
    HAS_MODULATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_T consecutive rows (tokens) of one sample b, each row whole
    (BLOCK_D >= D, columns masked). y = x_hat·weight + bias, then ·(1 + scale[b]) + shift[b]
    when HAS_MODULATION. Grid: (B · tiles_per_sample,), program id = b · tiles_per_sample + tile.
    Accumulation dtype: ACC_DTYPE (fp32, fp64 for fp64 inputs); y is cast to y's dtype on store.
    """
    pid = tl.program_id(0)
    b = (pid // tiles_per_sample).to(tl.int64)
    offs_t = (pid % tiles_per_sample) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < T)[:, None] & mask_d[None, :]
    rows = offs_t.to(tl.int64)[:, None]

    x = tl.load(
        x_ptr + b * stride_x_b + rows * stride_x_t + offs_d[None, :] * stride_x_d,
        mask=mask, other=0.0,
    ).to(ACC_DTYPE)
    x_hat, _ = _normalize_tile(x, mask, D, eps)
    w = tl.load(weight_ptr + offs_d * stride_weight_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    bias = tl.load(bias_ptr + offs_d * stride_bias_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    y = x_hat * w[None, :] + bias[None, :]
    if HAS_MODULATION:
        shift = tl.load(
            shift_ptr + b * stride_shift_b + offs_d * stride_shift_d, mask=mask_d, other=0.0
        ).to(ACC_DTYPE)
        scale = tl.load(
            scale_ptr + b * stride_scale_b + offs_d * stride_scale_d, mask=mask_d, other=0.0
        ).to(ACC_DTYPE)
        y = y * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(
        y_ptr + b * stride_y_b + rows * stride_y_t + offs_d[None, :] * stride_y_d,
        y.to(y_ptr.dtype.element_ty), mask=mask,
    )


@triton.jit
def _ln_bwd_kernel(
    grad_ptr, x_ptr, weight_ptr, bias_ptr, scale_ptr,
    grad_x_ptr, part_weight_ptr, part_bias_ptr, part_shift_ptr, part_scale_ptr,
    T, D, progs_per_sample, eps,
    stride_grad_b, stride_grad_t, stride_grad_d,
    stride_x_b, stride_x_t, stride_x_d,
    stride_weight_d, stride_bias_d,
    stride_scale_b, stride_scale_d,
    stride_grad_x_b, stride_grad_x_t, stride_grad_x_d,
    HAS_MODULATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: sample b, chunk c; it walks the row tiles c, c + progs_per_sample, ... of
    sample b (BLOCK_T rows each, rows whole), recomputes x_hat and rstd, stores grad_x for those
    rows, and writes row pid of each (B · progs_per_sample, D) partial-sum buffer:
    sum of grad_y·x_hat (-> grad_weight), grad_y (-> grad_bias) and, when HAS_MODULATION,
    grad (-> grad_shift[b]) and grad·y (-> grad_scale[b]), grad_y = grad·(1 + scale[b]).
    Grid: (B · progs_per_sample,), program id = b · progs_per_sample + c.
    Accumulation dtype: ACC_DTYPE (fp32, fp64 for fp64 inputs), partials stored in ACC_DTYPE.
    """
    pid = tl.program_id(0)
    b = (pid // progs_per_sample).to(tl.int64)
    chunk = pid % progs_per_sample
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    w = tl.load(weight_ptr + offs_d * stride_weight_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    if HAS_MODULATION:
        bias = tl.load(bias_ptr + offs_d * stride_bias_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
        scale = tl.load(
            scale_ptr + b * stride_scale_b + offs_d * stride_scale_d, mask=mask_d, other=0.0
        ).to(ACC_DTYPE)
        gain = 1.0 + scale

    acc_weight = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    acc_bias = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    acc_shift = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    acc_scale = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    for t0 in range(chunk * BLOCK_T, T, progs_per_sample * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_d[None, :]
        rows = offs_t.to(tl.int64)[:, None]
        x = tl.load(
            x_ptr + b * stride_x_b + rows * stride_x_t + offs_d[None, :] * stride_x_d,
            mask=mask, other=0.0,
        ).to(ACC_DTYPE)
        g = tl.load(
            grad_ptr + b * stride_grad_b + rows * stride_grad_t + offs_d[None, :] * stride_grad_d,
            mask=mask, other=0.0,
        ).to(ACC_DTYPE)
        x_hat, rstd = _normalize_tile(x, mask, D, eps)
        if HAS_MODULATION:
            acc_shift += g
            acc_scale += g * (x_hat * w[None, :] + bias[None, :])
            grad_y = g * gain[None, :]
        else:
            grad_y = g
        acc_weight += grad_y * x_hat
        acc_bias += grad_y
        # d/dx of x_hat = (x - mean)·rstd, given d/dx_hat = grad_y·weight (0 in masked entries).
        grad_xhat = grad_y * w[None, :]
        mean_gx = tl.sum(grad_xhat, axis=1) / D
        mean_gx_xhat = tl.sum(grad_xhat * x_hat, axis=1) / D
        grad_x = (grad_xhat - mean_gx[:, None] - x_hat * mean_gx_xhat[:, None]) * rstd[:, None]
        tl.store(
            grad_x_ptr + b * stride_grad_x_b + rows * stride_grad_x_t
            + offs_d[None, :] * stride_grad_x_d,
            grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask,
        )

    part = pid.to(tl.int64) * D + offs_d
    tl.store(part_weight_ptr + part, tl.sum(acc_weight, axis=0), mask=mask_d)
    tl.store(part_bias_ptr + part, tl.sum(acc_bias, axis=0), mask=mask_d)
    if HAS_MODULATION:
        tl.store(part_shift_ptr + part, tl.sum(acc_shift, axis=0), mask=mask_d)
        tl.store(part_scale_ptr + part, tl.sum(acc_scale, axis=0), mask=mask_d)


# --- launch helpers -----------------------------------------------------------------------------


def _acc_dtypes(x: Tensor) -> tuple[torch.dtype, object]:
    """(torch, triton) accumulation dtypes for input x: float64 for float64, else float32."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _check(name: str, x: Tensor, weight: Tensor, others: dict[str, tuple[Tensor, tuple]]) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: x dtype {x.dtype} not supported (one of {SUPPORTED_DTYPES})")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dim (..., D)")
    D = x.shape[-1]
    for key, (t, shape) in {"weight": (weight, (D,)), **others}.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: {key} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: {key} is on {t.device}, x on {x.device}")


def _as_3d(x: Tensor) -> Tensor:
    """(B, T, D) view of x (..., D) without copying when possible: (1, N, D) when the rows have
    one common stride, else x itself for 3-D x, else the leading dims flattened (may copy)."""
    D = x.shape[-1]
    try:
        return x.view(1, -1, D)
    except RuntimeError:
        pass
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], D)


def _forward(x3: Tensor, weight: Tensor, bias: Tensor, shift, scale, y3: Tensor, eps: float):
    B, T, D = x3.shape
    block_t, block_d, num_warps = row_block(D, T)
    tiles = cdiv(T, block_t)
    has_mod = shift is not None
    shift_t, scale_t = (shift, scale) if has_mod else (weight, weight)
    shift_strides = (shift.stride(0), shift.stride(1)) if has_mod else (0, 0)
    scale_strides = (scale.stride(0), scale.stride(1)) if has_mod else (0, 0)
    with device_guard(x3):
        _ln_fwd_kernel[(B * tiles,)](
            x3, weight, bias, shift_t, scale_t, y3,
            T, D, tiles, float(eps),
            *x3.stride(),
            weight.stride(0), bias.stride(0),
            *shift_strides, *scale_strides,
            *y3.stride(),
            HAS_MODULATION=has_mod, ACC_DTYPE=_acc_dtypes(x3)[1],
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps, **FP_FUSION,
        )


def _backward(grad3: Tensor, x3: Tensor, weight: Tensor, bias, scale, grad_x3: Tensor,
              eps: float) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """Launches the backward kernel; returns (programs per sample, partial buffers for weight,
    bias, shift, scale), each (B · programs per sample, D) in the accumulation dtype."""
    B, T, D = x3.shape
    block_t, block_d, num_warps = row_block(D, T, tile_scale=0.5)
    progs = max(1, min(cdiv(T, block_t), cdiv(target_programs(x3.device), B)))
    has_mod = scale is not None
    acc_torch, acc_tl = _acc_dtypes(x3)
    n_part = 4 if has_mod else 2
    parts = torch.empty((n_part, B * progs, D), dtype=acc_torch, device=x3.device)
    part_w, part_b = parts[0], parts[1]
    part_shift, part_scale = (parts[2], parts[3]) if has_mod else (part_w, part_b)
    bias_t, scale_t = (bias, scale) if has_mod else (weight, weight)
    scale_strides = (scale.stride(0), scale.stride(1)) if has_mod else (0, 0)
    with device_guard(x3):
        _ln_bwd_kernel[(B * progs,)](
            grad3, x3, weight, bias_t, scale_t,
            grad_x3, part_w, part_b, part_shift, part_scale,
            T, D, progs, float(eps),
            *grad3.stride(), *x3.stride(),
            weight.stride(0), bias_t.stride(0),
            *scale_strides,
            *grad_x3.stride(),
            HAS_MODULATION=has_mod, ACC_DTYPE=acc_tl,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps, **FP_FUSION,
        )
    return progs, part_w, part_b, part_shift, part_scale


# --- public launchers ---------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """y = (x − mean) / sqrt(var + eps) · weight + bias over the last dim. x (..., D) → y in
    x's dtype, contiguous; statistics in float32 (float64 for float64 x)."""
    _check("layer_norm", x, weight, {"bias": (bias, weight.shape)})
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x3 = _as_3d(x)
    _forward(x3, weight, bias, None, None, y.view(x3.shape), eps)
    return y


def layer_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias): grad_x in x's dtype, the others in weight's."""
    _check("layer_norm_backward", x, weight, {"grad": (grad, x.shape)})
    D = x.shape[-1]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        zeros = torch.zeros(D, dtype=weight.dtype, device=x.device)
        return grad_x, zeros, zeros.clone()
    x3 = _as_3d(x)
    grad3 = grad.reshape(x3.shape)
    _, part_w, part_b, _, _ = _backward(grad3, x3, weight, None, None, grad_x.view(x3.shape), eps)
    return grad_x, part_w.sum(0).to(weight.dtype), part_b.sum(0).to(weight.dtype)


def ln_modulate(
    x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> Tensor:
    """LN(x)·(1 + scale) + shift; x (B, T, D), shift and scale (B, D) broadcast over tokens.
    All math in float32 (float64 for float64 x), one cast to x's dtype at the end."""
    if x.dim() != 3:
        raise ValueError(f"ln_modulate: x must be (B, T, D), got {tuple(x.shape)}")
    B, _, D = x.shape
    _check("ln_modulate", x, weight,
           {"bias": (bias, (D,)), "shift": (shift, (B, D)), "scale": (scale, (B, D))})
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    _forward(x, weight, bias, shift, scale, out, eps)
    return out


def ln_modulate_backward(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias, grad_shift, grad_scale), each in the dtype of
    the matching input."""
    if x.dim() != 3:
        raise ValueError(f"ln_modulate_backward: x must be (B, T, D), got {tuple(x.shape)}")
    B, T, D = x.shape
    _check("ln_modulate_backward", x, weight,
           {"grad": (grad, x.shape), "bias": (bias, (D,)), "shift": (shift, (B, D)),
            "scale": (scale, (B, D))})
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        def zeros(shape, like):
            return torch.zeros(shape, dtype=like.dtype, device=x.device)
        return (grad_x, zeros(D, weight), zeros(D, bias), zeros((B, D), shift),
                zeros((B, D), scale))
    progs, part_w, part_b, part_shift, part_scale = _backward(
        grad, x, weight, bias, scale, grad_x, eps
    )
    return (
        grad_x,
        part_w.sum(0).to(weight.dtype),
        part_b.sum(0).to(bias.dtype),
        part_shift.view(B, progs, D).sum(1).to(shift.dtype),
        part_scale.view(B, progs, D).sum(1).to(scale.dtype),
    )
