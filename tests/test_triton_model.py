"""Whole networks with every op the Triton backend implements forced onto its kernels, against the
same networks on the reference backend: outputs and the gradients of every parameter.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter (tiny configs, 16-px images):
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_model.py

Triton is forced for every op (``EPG_BACKEND=triton``: the ops it lacks keep the automatic
choice, the reference for CPU tensors), or op by op (one ``use_backend`` or ``EPG_BACKEND_<OP>``
per op in ``epg_kernels.IMPLEMENTATIONS``). A counting wrapper around each launcher proves every
forward and backward kernel ran.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton_support import import_epg_kernels, require_triton

CUDA = torch.cuda.is_available()
require_triton()
pytestmark = pytest.mark.triton

from helpers import assert_close  # noqa: E402

from epg import _backend, ops  # noqa: E402  (after the module-level skip)
from epg.models import build  # noqa: E402

import_epg_kernels()
DEVICE = "cuda" if CUDA else "cpu"
# The public ops the Triton backend runs (forward and backward), e.g. attention, patch_embed.
# The ops the networks call (losses such as info_nce belong to the objectives, not the model).
NETWORK_OPS = ("layer_norm", "ln_modulate", "gated_residual", "attention", "patch_embed",
               "output_head", "timestep_embedding")  # fmt: skip
TRITON_OPS = sorted(op for op in NETWORK_OPS if op in _backend.info("triton").implementations)


def _randomised(model):
    """Noise in every parameter, so adaLN-Zero's zero gates and the zero output head hide no
    op from the gradients."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.to(DEVICE)


def _output_and_grads(model, *inputs):
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out  # RCM: (z, h); z depends on h
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()))
    return out.detach(), grads


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each Triton launcher the op layer picks."""
    impls = _backend.info("triton").implementations
    counts = dict.fromkeys(impls, 0)
    for name, fn in list(impls.items()):
        def counted(*args, _name=name, _fn=fn):
            counts[_name] += 1
            return _fn(*args)
        monkeypatch.setitem(impls, name, counted)
    return counts


def _compare(model, inputs, run_triton, calls, expected_ops):
    # Forced: on a GPU the automatic choice would pick Triton for these ops.
    with ops.use_backend("reference"):
        out_ref, grads_ref = _output_and_grads(model, *inputs)
    assert not any(calls.values()), "the reference run called a Triton kernel"
    with run_triton():
        out, grads = _output_and_grads(model, *inputs)
    for op in expected_ops:
        assert calls[op] and calls[f"{op}_backward"], f"{op}: Triton forward/backward never ran"
    assert_close(out, out_ref, atol=1e-5, rtol=1e-4, what="output")
    for (name, _), g, e in zip(model.named_parameters(), grads, grads_ref):
        scale = e.abs().max().item()
        assert_close(g, e, atol=1e-5 * max(1.0, scale), rtol=1e-4, what=name)


def test_triton_runs_the_model_ops():
    assert {"patch_embed", "gated_residual", "ln_modulate", "layer_norm", "attention"} <= set(
        TRITON_OPS
    )


@pytest.mark.parametrize("force", ["op-by-op", "EPG_BACKEND"])
def test_epg_tiny_matches_reference(calls, monkeypatch, force):
    """EPG-tiny at 16 px (16 patch tokens + 2): encoder, adaLN decoder with long skips, head."""
    model = _randomised(build("epg-tiny", img_size=16))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)
    t_cond = torch.tensor([-900.0, 150.0], device=DEVICE)  # 250·ln σ for σ ≈ 0.03 and 1.8
    y = torch.tensor([3, 10], device=DEVICE)  # a class and the null class

    @contextlib.contextmanager
    def run_triton():
        with contextlib.ExitStack() as stack:
            if force == "EPG_BACKEND":
                stack.enter_context(monkeypatch.context()).setenv("EPG_BACKEND", "triton")
            else:
                for op in TRITON_OPS:
                    stack.enter_context(ops.use_backend("triton", op))
            yield

    _compare(model, (x, t_cond, y), run_triton, calls, TRITON_OPS)


def test_rcm_tiny_matches_reference_via_environment(calls, monkeypatch):
    """The stage-1 encoder with Triton chosen through EPG_BACKEND_<OP> variables. In eval mode:
    in training mode the projection head's BatchNorm cancels every batch-wide shift of h, so
    some encoder gradients (the final norm's bias) are zero up to rounding noise."""
    model = _randomised(build("rcm-tiny", img_size=16)).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 16, 16, generator=gen).to(DEVICE)
    t_cond = torch.tensor([-500.0, 0.0, 400.0], device=DEVICE)

    @contextlib.contextmanager
    def run_triton():
        with monkeypatch.context() as env:
            for op in TRITON_OPS:
                env.setenv(f"EPG_BACKEND_{op.upper()}", "triton")
            yield

    # The RCM encoder has no adaLN decoder: gated_residual and ln_modulate do not run there.
    encoder_ops = [op for op in TRITON_OPS if op not in ("gated_residual", "ln_modulate")]
    _compare(model, (x, t_cond), run_triton, calls, encoder_ops)
