"""Attention from other libraries behind the ``attention`` op: PyTorch SDPA and flash-attn.

Two op-layer backends that implement only ``attention`` / ``attention_backward``, with the
reference's signatures (packed qkv (B, T, 3·H·Dh) → (B, T, H·Dh)):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. ``EPG_SDPA_KERNEL`` pins one of
  its kernels (``flash``, ``cudnn``, ``efficient``, ``math``); unset, PyTorch picks. Runs
  everywhere PyTorch does.
* ``flash_attn``: the flash-attn package's packed-qkv function (FA3's ``flash_attn_interface`` when
  importable, else FA2's ``flash_attn``); CUDA, fp16/bf16, head dim ≤ 256 and a multiple of 8.

The backward contract of the op layer is ``attention_backward(grad, qkv, num_heads)``: both
recompute the forward under autograd and differentiate it (the libraries' own fused backward).
Neither is in the automatic order until GPU benchmarks show one fastest at the model's shapes;
pick them with ``EPG_BACKEND_ATTENTION=sdpa|flash_attn`` or ``use_backend(name, "attention")``.
Speed, and flash-attn as a whole, can only be checked on a GPU with the package installed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SDPA_KERNEL_ENV = "EPG_SDPA_KERNEL"
_SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def _heads(qkv: Tensor, num_heads: int) -> tuple[int, int, int]:
    B, T, width = qkv.shape
    return B, T, width // (3 * num_heads)


def _sdpa_kernel_name() -> str:
    return os.environ.get(SDPA_KERNEL_ENV, "").strip().lower()


def _unknown_kernel(name: str) -> str:
    return f"{SDPA_KERNEL_ENV}={name!r}: expected one of {sorted(_SDPA_KERNELS)}"


def sdpa_kernel_problem() -> str | None:
    """What is wrong with ``EPG_SDPA_KERNEL`` (None: unset or valid)."""
    name = _sdpa_kernel_name()
    return _unknown_kernel(name) if name and name not in _SDPA_KERNELS else None


def _sdpa_context():
    name = _sdpa_kernel_name()  # read once per attention call
    if not name:
        return contextlib.nullcontext()
    if name not in _SDPA_KERNELS:
        raise ValueError(_unknown_kernel(name))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, _SDPA_KERNELS[name]))


def sdpa_attention(qkv: Tensor, num_heads: int) -> Tensor:
    B, T, Dh = _heads(qkv, num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, Dh)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh)
    with _sdpa_context():
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, T, num_heads * Dh).contiguous()


def _recompute_backward(forward: Callable[[Tensor, int], Tensor]):
    def backward(grad: Tensor, qkv: Tensor, num_heads: int) -> Tensor:
        # torch.func.vjp, not torch.autograd.grad: the op layer calls this inside a custom op,
        # below the autograd dispatch key, where tensors record no autograd graph.
        _, vjp = torch.func.vjp(lambda x: forward(x, num_heads), qkv)
        (grad_qkv,) = vjp(grad.to(qkv.dtype))
        return grad_qkv.contiguous()

    return backward


sdpa_attention_backward = _recompute_backward(sdpa_attention)


def _flash_module():
    """(module, what it is) of the installed flash-attn packed-qkv interface, or (None, reason)."""
    for name, what in (("flash_attn_interface", "FA3"), ("flash_attn", "FA2")):
        try:
            module = importlib.import_module(name)
        except Exception:  # ImportError, or a wheel built for another torch raising on import
            continue
        if hasattr(module, "flash_attn_qkvpacked_func"):
            return module, f"{what} ({name} {getattr(module, '__version__', '')})".strip()
    return None, "flash-attn is not installed (pip install flash-attn; it builds for a GPU)"


def _flash_packed(packed: Tensor) -> Tensor:
    """flash-attn on (B, T, 3, H, Dh) -> (B, T, H, Dh)."""
    out = _flash_module()[0].flash_attn_qkvpacked_func(packed)
    return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, softmax_lse)


def flash_attention(qkv: Tensor, num_heads: int) -> Tensor:
    B, T, Dh = _heads(qkv, num_heads)
    return _flash_packed(qkv.view(B, T, 3, num_heads, Dh)).reshape(B, T, num_heads * Dh)


def flash_attention_backward(grad: Tensor, qkv: Tensor, num_heads: int) -> Tensor:
    # Not torch.func.vjp as for SDPA: flash-attn's packed function is a torch.autograd.Function
    # without setup_context, which torch.func transforms refuse ("it must override the
    # setup_context staticmethod"). A Python autograd.Function records its graph node even below
    # the autograd dispatch key, so plain autograd differentiates it here; the reshapes stay
    # outside the recorded part (below that key a view would record nothing).
    B, T, Dh = _heads(qkv, num_heads)
    with torch.enable_grad():
        packed = qkv.detach().reshape(B, T, 3, num_heads, Dh).requires_grad_()
        out = _flash_packed(packed)
        grad_out = grad.to(qkv.dtype).reshape(out.shape)
        (grad_qkv,) = torch.autograd.grad(out, packed, grad_out)
    return grad_qkv.reshape(qkv.shape).contiguous()


def flash_declines(qkv: Tensor, num_heads: int, *rest) -> str | None:
    if not qkv.is_cuda:
        return "flash-attn runs CUDA tensors only"
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, got {qkv.dtype}"
    Dh = qkv.shape[-1] // (3 * num_heads)
    if Dh > 256 or Dh % 8:
        return f"flash-attn takes head dims up to 256 in multiples of 8, got {Dh}"
    return None


SDPA_IMPLEMENTATIONS = {"attention": sdpa_attention, "attention_backward": sdpa_attention_backward}
FLASH_IMPLEMENTATIONS = {"attention": flash_attention, "attention_backward": flash_attention_backward}
FLASH_SUPPORTS = {
    "attention": flash_declines,
    "attention_backward": lambda grad, qkv, num_heads: flash_declines(qkv, num_heads),
}
