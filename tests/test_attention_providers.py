"""SDPA and flash-attn as backends of the attention op."""

import dataclasses
import sys
import types

import pytest
import torch

from epg import _attention_providers, _backend, ops, reference
from epg._attention_providers import SDPA_KERNEL_ENV, flash_declines
from helpers import assert_close
from triton_support import check_against_baseline


def _qkv(B=2, T=19, H=3, Dh=24, dtype=torch.float64):
    return torch.randn(B, T, 3 * H * Dh, dtype=dtype, requires_grad=True), H


@pytest.mark.parametrize("kernel", [None, "math"])
def test_sdpa_backend_matches_the_reference_forward_and_backward(monkeypatch, kernel):
    if kernel:
        monkeypatch.setenv(SDPA_KERNEL_ENV, kernel)
    qkv, H = _qkv()
    grad = torch.randn(2, 19, 3 * 24, dtype=torch.float64)
    with ops.use_backend("sdpa", "attention"):
        out = ops.attention(qkv, H)
        (got,) = torch.autograd.grad(out, qkv, grad)
    assert_close(out, reference.attention(qkv.detach(), H), what="out")
    assert_close(got, reference.attention_backward(grad, qkv.detach(), H), what="grad_qkv")


def test_sdpa_kernel_name_is_checked(monkeypatch):
    monkeypatch.setenv(SDPA_KERNEL_ENV, "fastest")
    qkv, H = _qkv()
    with ops.use_backend("sdpa", "attention"), pytest.raises(ValueError, match=SDPA_KERNEL_ENV):
        ops.attention(qkv.detach(), H)


def test_sdpa_is_listed_and_lacks_the_other_ops():
    info = _backend.info("sdpa")
    assert info.available and set(info.implementations) == {"attention", "attention_backward"}
    x = torch.randn(2, 3, 8)
    with ops.use_backend("sdpa", "layer_norm"), pytest.raises(_backend.BackendUnavailableError):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8))


def test_flash_attn_reports_why_it_cannot_run_here():
    info = _backend.info("flash_attn")
    if not info.available:
        assert "flash-attn is not installed" in info.reason
    cpu = torch.zeros(1, 4, 3 * 64, dtype=torch.float16)
    assert "CUDA" in flash_declines(cpu, 1)
    qkv, H = _qkv()
    with ops.use_backend("flash_attn", "attention"), pytest.raises(_backend.BackendUnavailableError):
        ops.attention(qkv.detach(), H)


class _FlashStub(torch.autograd.Function):
    """flash_attn_qkvpacked_func's shape: (B, T, 3, H, Dh) -> (B, T, H, Dh), an autograd.Function
    with the old-style forward(ctx, ...) (no setup_context), as flash-attn 2 and 3 define it."""

    @staticmethod
    def forward(ctx, qkv):
        ctx.save_for_backward(qkv)
        B, T, _, H, Dh = qkv.shape
        return reference.attention(qkv.reshape(B, T, -1), H).view(B, T, H, Dh)

    @staticmethod
    def backward(ctx, grad):
        (qkv,) = ctx.saved_tensors
        B, T, _, H, _ = qkv.shape
        flat = reference.attention_backward(grad.reshape(B, T, -1), qkv.reshape(B, T, -1), H)
        return flat.view(qkv.shape)


def test_flash_attn_backward_differentiates_an_old_style_autograd_function(monkeypatch):
    """The flash_attn backend's backward, run by the op layer below the autograd key, must work
    with flash-attn's autograd.Function (torch.func.vjp refuses one without setup_context)."""
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_qkvpacked_func = _FlashStub.apply
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    # A CPU stand-in for the backend (the real one takes CUDA tensors only).
    stub = dataclasses.replace(_backend.info("sdpa"), name="flash_attn stub",
                               implementations=dict(_attention_providers.FLASH_IMPLEMENTATIONS))
    monkeypatch.setitem(_backend._PROBED, "flash_attn", stub)
    qkv, H = _qkv()
    grad = torch.randn(2, 19, 3 * 24, dtype=torch.float64)
    with ops.use_backend("flash_attn", "attention"):
        assert _backend.choose("attention_backward", qkv.device) == "flash_attn"
        out = ops.attention(qkv, H)
        (got,) = torch.autograd.grad(out, qkv, grad)
    assert_close(out, reference.attention(qkv.detach(), H), what="out")
    assert_close(got, reference.attention_backward(grad, qkv.detach(), H), what="grad_qkv")


def _plain_attention_grad(qkv, grad, H):
    """grad_qkv of attention computed in qkv's dtype by plain PyTorch + autograd: the baseline of
    the tolerance rule (scores and probabilities rounded to that dtype, as the kernels round)."""
    x = qkv.detach().clone().requires_grad_()
    q, k, v = reference._split_qkv(x, H)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.float(), dim=-1).to(x.dtype)
    out = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return torch.autograd.grad(out, x, grad)[0]


def _check_providers(device, head_dim):
    qkv = torch.randn(2, 258, 3 * 4 * head_dim, device=device, dtype=torch.bfloat16)
    grad = torch.randn(2, 258, 4 * head_dim, device=device, dtype=torch.bfloat16)
    expected = reference.attention(qkv.double(), 4)
    expected_grad = reference.attention_backward(grad.double(), qkv.double(), 4)
    baseline_grad = _plain_attention_grad(qkv, grad, 4)
    names = ["sdpa"] + (["flash_attn"] if _backend.info("flash_attn").available else [])
    for name in names:
        x = qkv.clone().requires_grad_()
        with ops.use_backend(name, "attention"):
            out = ops.attention(x, 4)
            (got,) = torch.autograd.grad(out, x, grad)
        assert_close(out.double(), expected, atol=2e-2, rtol=2e-2, what=name)
        check_against_baseline(f"{name} grad_qkv", got, expected_grad, baseline_grad,
                               torch.bfloat16, 1e-2, 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 72, 120])
def test_sdpa_and_flash_attn_match_the_reference_on_gpu(head_dim):
    """Forward, and the backward the op layer runs (on the autograd engine's CUDA thread), against
    the float64 reference; the gradient within twice plain bfloat16 attention's error."""
    _check_providers("cuda", head_dim)


@pytest.mark.parametrize("head_dim", [64, 72])
def test_sdpa_matches_the_reference_in_bfloat16_on_cpu(head_dim):
    """The GPU test's body on the CPU (SDPA's CPU kernels, bfloat16 at 258 tokens): the same
    tolerance rule, and the provider's forcing and backward path exercised without a GPU."""
    _check_providers("cpu", head_dim)
