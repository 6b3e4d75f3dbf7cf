"""Noise preconditioning and the stage-2 losses: Triton forward and backward kernels.

Same signatures, return conventions and math as ``epg.reference``:

* ``noise_precondition(x0, eps, sigma, sigma_data, sigma_min, mode)`` ->
  ``(x_in, c_in, c_skip, c_out, t_cond)``: x_in = c_in(σ)·(x0 + σ·ε) per sample, and the four
  per-sample scalings of ``edm_scalings`` (§3), all from one kernel: every program derives its
  sample's c_in from σ, the first program of each sample also stores the four scalings.
* ``noise_precondition_backward(grad_x_in, grad_c_in, grad_c_skip, grad_c_out, grad_t_cond, x0,
  eps, sigma, sigma_data, sigma_min, mode)`` -> ``(grad_x0, grad_eps, grad_sigma)``: one pass over
  the images writes grad_x0 = g·c_in and grad_eps = g·c_in·σ and reduces Σ grad_x0·ε and Σ g·x_σ
  per sample; the (B,) chain rule through the scalings then runs in torch (a few B-element ops).
* ``weighted_mse_loss(pred, target, weight)`` -> ``(loss, mse)`` and ``pseudo_huber_loss(pred,
  target, weight, c)`` -> ``(loss, sqsum)``: one pass reduces S_b = Σ (pred − target)² per sample;
  the (B,) losses follow in torch.
* ``weighted_mse_loss_backward(grad, pred, target, weight)`` and ``pseudo_huber_loss_backward(grad,
  pred, target, weight, sqsum, c)`` -> grad_pred = f_b·(pred − target) in one pass, with the
  per-sample factor f_b (2·grad·w/M, or 2·grad·w/sqrt(S + c²)) computed in torch first.

Traffic per element is the minimum each op needs: precondition forward 2 reads + 1 write,
backward 3 reads + 2 writes; loss forward 2 reads, backward 2 reads + 1 write. (A loss cannot
write its gradient in the forward pass: the gradient scales with the upstream gradient, and for
pseudo-Huber with the complete per-sample sum.)

Arithmetic in float32 (float64 for float64 images), one rounding on store. The scalings are
computed in sigma's dtype like the reference; the kernel's scalar math is float32, so float64 σ is
declined (``declines``) and runs on the reference. Per-sample reductions are deterministic: each
program stores its partial sum in a (B, chunks) buffer that torch sums afterwards, no atomics.

Layout: images are viewed as (B, M) (M = C·H·W); any strides that allow that view are read in
place, others are copied once by ``reshape``. Grid (B, chunks): program (b, c) walks blocks c,
c + chunks, … of sample b, so a sample's reduction is split over ``chunks`` programs when the
batch alone would not fill the GPU.

Block size: on a GPU the elementwise launchers autotune BLOCK (1024–8192 elements) and the warp
count per image size (``AUTOTUNE_CONFIGS``). The kernels that reduce (the backward's σ partial
sums, the squared distance of the consistency loss) use one fixed configuration instead: the
block and warp count set the order of a sample's sum, and an autotuner's timing-dependent choice
would change a loss's last bits from one process to the next (a resumed run would not repeat
the uninterrupted one); the interpreter tests that same configuration. Under the interpreter
autotuning cannot run (it needs a driver), so the elementwise kernels use one fixed
configuration there. Which configuration wins, and whether the
kernels reach the copy bandwidth, only a GPU can say: ``benchmarks/bench_ops.py`` measures it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import NO_FP_FUSION, cdiv, device_guard, is_interpreter, target_programs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EDM_MODES = ("x0", "edm")
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16))
]
_INTERPRETER_BLOCK = 1024
# The smallest block any configuration uses: chunks are sized so each program gets at least one.
_MIN_BLOCK = min(cfg.kwargs["BLOCK"] for cfg in AUTOTUNE_CONFIGS)


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _c_in(s, sd2):
    """c_in = 1/sqrt(σ² + σ_d²) in float32, correctly rounded as torch computes it."""
    return tl.div_rn(1.0, tl.sqrt_rn(s * s + sd2))


@triton.jit
def _difference(pred_ptr, target_ptr, b, offs, mask, stride_p_b, stride_p_m, stride_t_b, stride_t_m,
                ACC_DTYPE: tl.constexpr):
    """pred − target of sample b at ``offs`` in ACC_DTYPE (0 where masked)."""
    p = tl.load(pred_ptr + b * stride_p_b + offs * stride_p_m, mask=mask, other=0.0)
    t = tl.load(target_ptr + b * stride_t_b + offs * stride_t_m, mask=mask, other=0.0)
    return p.to(ACC_DTYPE) - t.to(ACC_DTYPE)


@triton.jit
def _precondition_fwd_kernel(
    x0_ptr, eps_ptr, sigma_ptr,  # (B, M), (B, M), (B,) float32
    x_in_ptr, c_in_ptr, c_skip_ptr, c_out_ptr, t_cond_ptr,  # (B, M); four (B,) float32
    M, chunks,
    stride_x0_b, stride_x0_m, stride_eps_b, stride_eps_m, stride_out_b,
    sigma_data, sd2, sigma_min,
    EDM: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b, c): x_in = (x0 + σ_b·ε)·c_in(σ_b) over blocks c, c + chunks, … of sample b;
    program (b, 0) also stores sample b's scalings. c_in etc. in float32 with correctly rounded
    square root and division (as torch computes them); t_cond = 250·ln(σ + 1e-44) in float64."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    s = tl.load(sigma_ptr + b)
    c_in = _c_in(s, sd2)
    if chunk == 0:
        t_cond = (250.0 * tl.log(s.to(tl.float64) + 1e-44)).to(tl.float32)
        if EDM:
            d = s - sigma_min
            c_skip = tl.div_rn(sd2, d * d + sd2)
            c_out = d * sigma_data * c_in
        else:
            c_skip = s * 0.0
            c_out = s * 0.0 + 1.0
        tl.store(c_in_ptr + b, c_in)
        tl.store(c_skip_ptr + b, c_skip)
        tl.store(c_out_ptr + b, c_out)
        tl.store(t_cond_ptr + b, t_cond)
    s_acc = s.to(ACC_DTYPE)
    ci_acc = c_in.to(ACC_DTYPE)
    for start in range(chunk * BLOCK, M, chunks * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < M
        x0 = tl.load(x0_ptr + b * stride_x0_b + offs * stride_x0_m, mask=mask, other=0.0)
        eps = tl.load(eps_ptr + b * stride_eps_b + offs * stride_eps_m, mask=mask, other=0.0)
        x_in = (x0.to(ACC_DTYPE) + s_acc * eps.to(ACC_DTYPE)) * ci_acc
        tl.store(x_in_ptr + b * stride_out_b + offs, x_in.to(x_in_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _precondition_bwd_kernel(
    grad_ptr, x0_ptr, eps_ptr, sigma_ptr,  # (B, M) x3, (B,) float32
    grad_x0_ptr, grad_eps_ptr, part_ptr,  # (B, M), (B, M); (2, B, chunks) in ACC_DTYPE
    B, M, chunks,
    stride_g_b, stride_g_m, stride_x0_b, stride_x0_m, stride_eps_b, stride_eps_m, stride_out_b,
    sd2,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b, c): grad_x0 = g·c_in, grad_eps = grad_x0·σ over its blocks of sample b, and its
    partial sums Σ grad_x0·ε (the direct σ term) and Σ g·(x0 + σ·ε) (d x_in / d c_in)."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    s = tl.load(sigma_ptr + b)
    s_acc = s.to(ACC_DTYPE)
    ci_acc = _c_in(s, sd2).to(ACC_DTYPE)
    acc_eps = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_xs = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(chunk * BLOCK, M, chunks * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < M
        g = tl.load(grad_ptr + b * stride_g_b + offs * stride_g_m, mask=mask, other=0.0)
        x0 = tl.load(x0_ptr + b * stride_x0_b + offs * stride_x0_m, mask=mask, other=0.0)
        eps = tl.load(eps_ptr + b * stride_eps_b + offs * stride_eps_m, mask=mask, other=0.0)
        g = g.to(ACC_DTYPE)
        eps = eps.to(ACC_DTYPE)
        grad_x0 = g * ci_acc
        acc_eps += grad_x0 * eps
        acc_xs += g * (x0.to(ACC_DTYPE) + s_acc * eps)
        out = b * stride_out_b + offs
        tl.store(grad_x0_ptr + out, grad_x0.to(grad_x0_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_eps_ptr + out, (grad_x0 * s_acc).to(grad_eps_ptr.dtype.element_ty), mask=mask)
    row = b * chunks + chunk
    tl.store(part_ptr + row, tl.sum(acc_eps, axis=0))
    tl.store(part_ptr + B * chunks + row, tl.sum(acc_xs, axis=0))


@triton.jit
def _squared_sum_kernel(
    pred_ptr, target_ptr, part_ptr,  # (B, M), (B, M); (B, chunks) in ACC_DTYPE
    M, chunks, stride_p_b, stride_p_m, stride_t_b, stride_t_m,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b, c): Σ (pred − target)² over its blocks of sample b, into part[b, c]."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(chunk * BLOCK, M, chunks * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        d = _difference(pred_ptr, target_ptr, b, offs, offs < M, stride_p_b, stride_p_m,
                        stride_t_b, stride_t_m, ACC_DTYPE)
        acc += d * d
    tl.store(part_ptr + b * chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _scaled_difference_kernel(
    pred_ptr, target_ptr, factor_ptr, out_ptr,  # (B, M), (B, M), (B,) ACC_DTYPE, (B, M)
    M, chunks, stride_p_b, stride_p_m, stride_t_b, stride_t_m, stride_out_b,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b, c): out = factor_b·(pred − target) over its blocks of sample b."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    f = tl.load(factor_ptr + b).to(ACC_DTYPE)
    for start in range(chunk * BLOCK, M, chunks * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < M
        out = f * _difference(pred_ptr, target_ptr, b, offs, mask, stride_p_b, stride_p_m,
                              stride_t_b, stride_t_m, ACC_DTYPE)
        tl.store(out_ptr + b * stride_out_b + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


_TUNED = {
    kernel: triton.autotune(configs=AUTOTUNE_CONFIGS, key=["M"])(kernel)
    for kernel in (_precondition_fwd_kernel, _scaled_difference_kernel)
}
# The reducing kernels' one configuration on a GPU: the same sums in every process.
_REDUCTION_CONFIG = {"BLOCK": 2048, "num_warps": 8}


# --- launch helpers -----------------------------------------------------------------------------


def _launch(kernel, grid: tuple[int, int], *args, **constexprs) -> None:
    """Reducing kernels: their one configuration, everywhere (the interpreter tests the block a GPU
    runs). Elementwise kernels: autotuned on a GPU, one fixed configuration under the interpreter,
    which cannot autotune; they only store (no accumulation into outputs), so the autotuner's
    repeated trial launches leave correct results."""
    if kernel not in _TUNED:
        kernel[grid](*args, **_REDUCTION_CONFIG, **constexprs, **NO_FP_FUSION)
    elif is_interpreter():
        kernel[grid](*args, BLOCK=_INTERPRETER_BLOCK, num_warps=4, **constexprs, **NO_FP_FUSION)
    else:
        _TUNED[kernel][grid](*args, **constexprs, **NO_FP_FUSION)


def _chunks(B: int, M: int, device: torch.device, kernel) -> int:
    """Programs per sample: enough to give the grid ~4 programs per SM, at most one per block
    (of the smallest block ``kernel`` can run with)."""
    block = _MIN_BLOCK if kernel in _TUNED else _REDUCTION_CONFIG["BLOCK"]
    return max(1, min(cdiv(M, block), cdiv(target_programs(device), max(B, 1))))


def _acc(t: Tensor) -> tuple[tl.dtype, torch.dtype]:
    return (tl.float64, torch.float64) if t.dtype == torch.float64 else (tl.float32, torch.float32)


def _as_rows(name: str, arg: str, t: Tensor, batch: int) -> Tensor:
    """``t`` as (B, M): a view where the strides allow, else a copy."""
    if t.dim() < 1 or t.shape[0] != batch:
        raise ValueError(f"{name}: {arg} must be (B={batch}, ...), got {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: {arg} dtype {t.dtype} not supported (one of {SUPPORTED_DTYPES})")
    return t.reshape(batch, math.prod(t.shape[1:]))


def _check_device(name: str, ref: Tensor, *others: Tensor) -> None:
    for t in others:
        if t.device != ref.device:
            raise ValueError(f"{name}: all tensors must be on {ref.device}, one is on {t.device}")
    if not ref.is_cuda and not is_interpreter():
        raise ValueError(
            f"{name}: tensors are on {ref.device}; the Triton kernels run CUDA tensors, or CPU "
            "tensors under TRITON_INTERPRET=1"
        )


def _check_sigma(name: str, sigma: Tensor, batch: int, mode: str) -> None:
    if mode not in EDM_MODES:
        raise ValueError(f"{name}: mode must be one of {EDM_MODES}, got {mode!r}")
    if sigma.shape != (batch,):
        raise ValueError(f"{name}: sigma must be ({batch},), got {tuple(sigma.shape)}")
    if sigma.dtype != torch.float32:
        raise TypeError(f"{name}: sigma must be float32 for the Triton kernel, got {sigma.dtype}")


def declines(sigma: Tensor) -> str | None:
    """Why the precondition kernels would refuse ``noise_precondition(_backward)`` with this σ
    (automatic backend choice then runs the reference), or None."""
    if sigma.dtype != torch.float32:
        return f"sigma dtype {sigma.dtype} (the kernel's scalar math is float32)"
    return None


# --- public launchers ---------------------------------------------------------------------------


def noise_precondition(
    x0: Tensor, eps: Tensor, sigma: Tensor, sigma_data: float, sigma_min: float, mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Network input c_in·(x0 + σ·ε) and the per-sample (c_in, c_skip, c_out, t_cond), one kernel.

    Args: x0, eps (B, …) of one float dtype, any strides; sigma (B,) float32 (shifted σ);
    mode "x0" or "edm". Returns x_in contiguous in x0's dtype and four (B,) float32 tensors.
    """
    name = "noise_precondition"
    B = x0.shape[0] if x0.dim() else 0
    x0_rows, eps_rows = _as_rows(name, "x0", x0, B), _as_rows(name, "eps", eps, B)
    if eps.shape != x0.shape:
        raise ValueError(f"{name}: eps {tuple(eps.shape)} must match x0 {tuple(x0.shape)}")
    _check_sigma(name, sigma, B, mode)
    _check_device(name, x0, eps, sigma)
    x_in = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    # Four tensors of their own, not views of one buffer: a custom op's outputs must not alias.
    scalings = [torch.empty(B, dtype=torch.float32, device=x0.device) for _ in range(4)]
    M = x0_rows.shape[1]
    if B > 0:
        chunks = _chunks(B, M, x0.device, _precondition_fwd_kernel)
        sigma = sigma.contiguous()
        with device_guard(x0):
            _launch(
                _precondition_fwd_kernel, (B, chunks),
                x0_rows, eps_rows, sigma, x_in, *scalings, M, chunks,
                *x0_rows.stride(), *eps_rows.stride(), M,
                float(sigma_data), float(sigma_data) ** 2, float(sigma_min),
                EDM=mode == "edm", ACC_DTYPE=_acc(x0)[0],
            )  # fmt: skip
    return (x_in, *scalings)


def noise_precondition_backward(
    grad_x_in: Tensor,
    grad_c_in: Tensor,
    grad_c_skip: Tensor,
    grad_c_out: Tensor,
    grad_t_cond: Tensor,
    x0: Tensor,
    eps: Tensor,
    sigma: Tensor,
    sigma_data: float,
    sigma_min: float,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`noise_precondition`: (grad_x0 in x0's dtype, grad_eps in eps's dtype,
    grad_sigma (B,) float32), contiguous. One pass over the images, then the (B,) chain rule
    through the scalings (``epg.reference.edm_scalings_backward``)."""
    from epg import reference  # the (B,) scalar chain rule is the reference's own

    name = "noise_precondition_backward"
    B = x0.shape[0] if x0.dim() else 0
    rows = [_as_rows(name, arg, t, B) for arg, t in (("grad_x_in", grad_x_in), ("x0", x0), ("eps", eps))]
    if grad_x_in.shape != x0.shape or eps.shape != x0.shape:
        raise ValueError(
            f"{name}: grad_x_in {tuple(grad_x_in.shape)} and eps {tuple(eps.shape)} must match "
            f"x0 {tuple(x0.shape)}"
        )
    _check_sigma(name, sigma, B, mode)
    _check_device(name, x0, grad_x_in, eps, sigma, grad_c_in, grad_c_skip, grad_c_out, grad_t_cond)
    acc_tl, acc_torch = _acc(x0)
    grad_x0 = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    grad_eps = torch.empty(eps.shape, dtype=eps.dtype, device=eps.device)
    M = rows[1].shape[1]
    chunks = _chunks(B, M, x0.device, _precondition_bwd_kernel)
    part = torch.empty((2, B, chunks), dtype=acc_torch, device=x0.device)  # every program stores
    if B > 0:
        sigma = sigma.contiguous()
        with device_guard(x0):
            _launch(
                _precondition_bwd_kernel, (B, chunks),
                *rows, sigma, grad_x0, grad_eps, part, B, M, chunks,
                *rows[0].stride(), *rows[1].stride(), *rows[2].stride(), M,
                float(sigma_data) ** 2, ACC_DTYPE=acc_tl,
            )  # fmt: skip
    sum_eps, sum_x_sigma = part.sum(2).unbind(0)
    grad_sigma = reference.edm_scalings_backward(
        grad_c_in + sum_x_sigma.to(sigma.dtype), grad_c_skip, grad_c_out, grad_t_cond,
        sigma, sigma_data, sigma_min, mode,
    )  # fmt: skip
    return grad_x0, grad_eps, (grad_sigma + sum_eps.to(sigma.dtype)).contiguous()


def _loss_inputs(name: str, pred: Tensor, target: Tensor, weight: Tensor):
    B = pred.shape[0] if pred.dim() else 0
    p, t = _as_rows(name, "pred", pred, B), _as_rows(name, "target", target, B)
    if target.shape != pred.shape:
        raise ValueError(f"{name}: target {tuple(target.shape)} must match pred {tuple(pred.shape)}")
    if weight.shape != (B,):
        raise ValueError(f"{name}: weight must be ({B},), got {tuple(weight.shape)}")
    _check_device(name, pred, target, weight)
    return B, p, t


def _squared_sum(name: str, pred: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, int]:
    """(S (B,) in the accumulation dtype, M)."""
    B, p, t = _loss_inputs(name, pred, target, weight)
    acc_tl, acc_torch = _acc(pred)
    M = p.shape[1]
    chunks = _chunks(B, M, pred.device, _squared_sum_kernel)
    part = torch.empty((B, chunks), dtype=acc_torch, device=pred.device)  # every program stores
    if B > 0:
        with device_guard(pred):
            _launch(_squared_sum_kernel, (B, chunks), p, t, part, M, chunks,
                    *p.stride(), *t.stride(), ACC_DTYPE=acc_tl)  # fmt: skip
    return part.sum(1), M


def _scaled_difference(name: str, pred: Tensor, target: Tensor, weight: Tensor, factor: Tensor) -> Tensor:
    B, p, t = _loss_inputs(name, pred, target, weight)
    acc_tl, acc_torch = _acc(pred)
    out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    M = p.shape[1]
    if B > 0 and M > 0:
        chunks = _chunks(B, M, pred.device, _scaled_difference_kernel)
        with device_guard(pred):
            _launch(_scaled_difference_kernel, (B, chunks), p, t,
                    factor.to(acc_torch).contiguous(), out, M, chunks,
                    *p.stride(), *t.stride(), M, ACC_DTYPE=acc_tl)  # fmt: skip
    return out


def weighted_mse_loss(pred: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, mse): mse_b = mean over sample b of (pred − target)², loss_b = weight_b·mse_b.

    Args: pred (B, …), target of pred's shape (any float dtypes), weight (B,).
    Returns two (B,) tensors, float32 (float64 for float64 pred)."""
    S, M = _squared_sum("weighted_mse_loss", pred, target, weight)
    mse = S / M
    return (weight.to(S.dtype) * mse).contiguous(), mse.contiguous()


def weighted_mse_loss_backward(grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """grad_pred = grad_b·weight_b·2·(pred − target)/M in pred's dtype, contiguous."""
    acc = _acc(pred)[1]
    M = math.prod(pred.shape[1:])
    factor = grad.to(acc) * weight.to(acc) * 2 / M
    return _scaled_difference("weighted_mse_loss_backward", pred, target, weight, factor)


def pseudo_huber_loss(pred: Tensor, target: Tensor, weight: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """(loss, sqsum): S_b = Σ over sample b of (pred − target)², loss_b = weight_b·S_b/sqrt(S_b + c²).

    Args and results as :func:`weighted_mse_loss`."""
    S, _ = _squared_sum("pseudo_huber_loss", pred, target, weight)
    return (weight.to(S.dtype) * S / torch.sqrt(S + c * c)).contiguous(), S.contiguous()


def pseudo_huber_loss_backward(
    grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor, sqsum: Tensor, c: float
) -> Tensor:
    """grad_pred = grad_b·weight_b·2·(pred − target)/sqrt(S_b + c²) in pred's dtype, the
    normaliser under stop-gradient as in the reference; ``sqsum`` is the forward's S."""
    acc = _acc(pred)[1]
    factor = grad.to(acc) * weight.to(acc) * 2 / torch.sqrt(sqsum.to(acc) + c * c)
    return _scaled_difference("pseudo_huber_loss_backward", pred, target, weight, factor)
