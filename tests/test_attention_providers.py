"""SDPA and flash-attn as backends of the attention op."""

import pytest
import torch

from epg import _backend, ops, reference
from epg._attention_providers import SDPA_KERNEL_ENV, flash_declines
from helpers import assert_close


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


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 72, 120])
def test_sdpa_and_flash_attn_match_the_reference_on_gpu(head_dim):
    qkv = torch.randn(2, 258, 3 * 4 * head_dim, device="cuda", dtype=torch.bfloat16)
    expected = reference.attention(qkv.double(), 4)
    names = ["sdpa"] + (["flash_attn"] if _backend.info("flash_attn").available else [])
    for name in names:
        with ops.use_backend(name, "attention"):
            assert_close(ops.attention(qkv, 4).double(), expected, atol=2e-2, rtol=2e-2, what=name)
