"""Which backend epg._backend picks: the automatic order on CUDA tensors, what a forced backend may
and may not run, how nested forces combine, and what the EPG_BACKEND variables are checked for.

A machine without a GPU cannot show the CUDA choice with the real probes (no backend runs CUDA
tensors there), so these tests stand fake backends in for the probed ones."""

import pytest
import torch

from epg import _backend, ops
from epg._backend import BackendInfo, BackendUnavailableError

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


def _impl(*args):
    raise AssertionError("a fake backend's kernel is never run")


def _fake(monkeypatch, name, ops_=(), available=True, runs_on_cuda=True, supports=None):
    backend = BackendInfo(name, available, f"fake {name}", dict.fromkeys(ops_, _impl),
                          runs_on_cuda=runs_on_cuda, supports=supports or {})  # fmt: skip
    monkeypatch.setitem(_backend._PROBED, name, backend)
    return backend


def _head_dim_3_declined(qkv, num_heads):
    return "head dim 3 is not taken" if num_heads == 3 else None


def test_automatic_choice_on_cuda_is_the_extension_then_triton_then_reference(monkeypatch):
    _fake(monkeypatch, "cuda", ["layer_norm", "to_uint8"])
    _fake(monkeypatch, "triton", ["layer_norm", "attention"], supports={"attention": _head_dim_3_declined})
    assert _backend.choose("layer_norm", CUDA) == "cuda"  # both have it: the extension first
    assert _backend.choose("attention", CUDA, ("qkv", 2)) == "triton"
    # An implementation that declines these inputs is passed over, never forced on them...
    assert _backend.choose("attention", CUDA, ("qkv", 3)) == "reference"
    # ...and with no inputs to judge (a check at no call), nothing is declined.
    assert _backend.choose("attention", CUDA) == "triton"
    assert _backend.choose("info_nce", CUDA) == "reference"  # nobody has it
    for op in ("layer_norm", "attention", "to_uint8"):
        assert _backend.choose(op, CPU) == "reference"  # automatic choice on a CPU
        assert _backend.choose(op, META) == "reference"


def test_automatic_choice_skips_a_backend_that_cannot_run_cuda_tensors(monkeypatch):
    _fake(monkeypatch, "cuda", ["layer_norm"], runs_on_cuda=False)  # an extension built without CUDA
    _fake(monkeypatch, "triton", ["layer_norm"])
    assert _backend.choose("layer_norm", CUDA) == "triton"
    with ops.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda cannot run CUDA tensors here"):
        _backend.choose("layer_norm", CUDA)
    with ops.use_backend("cuda"):
        assert _backend.choose("layer_norm", CPU) == "cuda"  # its C++ twin


def test_forced_triton_runs_cpu_tensors_only_under_the_interpreter(monkeypatch):
    _fake(monkeypatch, "triton", ["layer_norm"], runs_on_cuda=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("triton"):
        assert _backend.choose("layer_norm", CPU) == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(BackendUnavailableError, match="only under TRITON_INTERPRET=1"):
            _backend.choose("layer_norm", CPU)


def test_a_forced_backend_refuses_a_device_it_cannot_run(monkeypatch):
    _fake(monkeypatch, "cuda", ["layer_norm"])
    with ops.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda does not support device meta"):
        _backend.choose("layer_norm", META)
    for name in ("reference", "sdpa"):  # plain PyTorch runs on any device
        with ops.use_backend(name, "attention"):
            assert _backend.choose("attention", META) == name


def test_forcing_an_unavailable_backend_says_why_for_every_op(monkeypatch):
    # It does not quietly fall back to the automatic choice: the force names what is missing.
    _fake(monkeypatch, "flash_attn", available=False)
    with ops.use_backend("flash_attn"):
        for op in ("attention", "layer_norm"):
            with pytest.raises(BackendUnavailableError, match=rf"'flash_attn' was forced for '{op}' but: fake flash_attn"):
                _backend.choose(op, CPU)
    monkeypatch.setenv("EPG_BACKEND", "flash_attn")
    with pytest.raises(BackendUnavailableError, match="fake flash_attn"):
        _backend.choose("layer_norm", CPU)


def test_a_forced_backend_without_a_backward_leaves_the_backward_to_the_reference(monkeypatch):
    _fake(monkeypatch, "cuda", ["noise_precondition"])
    with ops.use_backend("cuda"):
        assert _backend.choose("noise_precondition", CPU) == "cuda"
        assert _backend.choose("noise_precondition_backward", CPU) == "reference"
    # A forward it cannot run is no reason to run its backward elsewhere: that force still fails.
    with ops.use_backend("cuda", "attention"), pytest.raises(BackendUnavailableError, match="no implementation"):
        _backend.choose("attention_backward", CPU)


def test_a_force_for_one_op_wins_over_a_force_for_every_op_in_any_nesting(monkeypatch):
    _fake(monkeypatch, "cuda", ["normalize_images", "to_uint8"])
    with ops.use_backend("cuda"), ops.use_backend("reference", "normalize_images"):
        assert _backend.choose("normalize_images", CPU) == "reference"
        assert _backend.choose("to_uint8", CPU) == "cuda"
    with ops.use_backend("reference", "normalize_images"), ops.use_backend("cuda"):
        assert _backend.choose("normalize_images", CPU) == "reference"
        assert _backend.choose("to_uint8", CPU) == "cuda"


def test_nested_forces_add_up_and_end_with_their_block():
    with ops.use_backend("reference", "layer_norm"):
        with ops.use_backend("reference", "attention"):
            assert _backend.is_forced("layer_norm") and _backend.is_forced("attention")
            assert _backend.forced_state() == {"layer_norm": "reference", "attention": "reference"}
        assert _backend.is_forced("layer_norm") and not _backend.is_forced("attention")
    assert not _backend.is_forced("layer_norm") and _backend.forced_state() == {}
    with pytest.raises(RuntimeError, match="inside"), ops.use_backend("reference"):
        raise RuntimeError("inside")
    assert not _backend.is_forced("layer_norm")  # an exception ends the force too


def test_a_backward_counts_as_forced_with_its_forward(monkeypatch):
    with ops.use_backend("reference", "layer_norm"):
        assert _backend.is_forced("layer_norm_backward") and not _backend.is_forced("attention_backward")
    monkeypatch.setenv("EPG_BACKEND_ATTENTION", "reference")
    assert _backend.is_forced("attention_backward") and not _backend.is_forced("layer_norm_backward")


def test_a_variable_forcing_an_op_its_backend_lacks_is_an_environment_problem(monkeypatch):
    _fake(monkeypatch, "cuda", ["normalize_images"])
    monkeypatch.setenv("EPG_BACKEND_ATTENTION", "cuda")
    assert _backend.environment_problems() == ["EPG_BACKEND_ATTENTION='cuda': cuda has no implementation of 'attention'"]
    monkeypatch.setenv("EPG_BACKEND_ATTENTION", "auto")
    monkeypatch.setenv("EPG_BACKEND_NORMALIZE_IMAGES", "CUDA")
    assert _backend.environment_problems() == []


def test_an_unavailable_backend_in_a_variable_is_an_environment_problem(monkeypatch):
    _fake(monkeypatch, "flash_attn", available=False)
    monkeypatch.setenv("EPG_BACKEND_ATTENTION", "flash_attn")
    assert _backend.environment_problems() == ["EPG_BACKEND_ATTENTION='flash_attn': fake flash_attn"]
