"""Which implementation runs each op: the one place that knows about backends.

Backends:
  reference  epg.reference, plain PyTorch; runs everywhere and defines correct results.
  triton     the Triton kernels of ``epg_kernels`` (top-level ``kernels/``); CUDA tensors, or CPU
             tensors under ``TRITON_INTERPRET=1`` when forced (that is how the CPU tests run them).
  cuda       the compiled extension ``epg._C``: CUDA kernels for CUDA tensors and their C++ twins
             (same arithmetic) for CPU tensors; the CPU twins run only when forced.
  sdpa       attention only: PyTorch's scaled_dot_product_attention (``EPG_SDPA_KERNEL`` pins
             one of its kernels); see ``epg._attention_providers``.
  flash_attn attention only: the flash-attn package (FA3 or FA2) when installed; CUDA fp16/bf16.

Automatic choice (the default, ``EPG_BACKEND=auto``): on a CUDA tensor the first backend in
``AUTO_ORDER`` that implements the op, else the reference; on any other device the reference.
Automatic choice never raises. (On a CPU, unforced calls of the network's ops then skip the custom
op and call the reference directly: see ``epg.ops``.)

Forcing: ``EPG_BACKEND=reference|triton|cuda|sdpa|flash_attn`` for every op the backend implements
(the others keep the automatic choice), ``EPG_BACKEND_<OP>`` (for example
``EPG_BACKEND_LAYER_NORM``) for one op, or :func:`use_backend` in code (it wins over both
variables). A forced backend that cannot run the op (not installed, not built, the wrong device;
forced for one op: without that op) raises :class:`BackendUnavailableError` saying why. A backward
(``<op>_backward``) follows its forward's forced backend when that backend has a backward for it
and otherwise runs the reference backward: backwards recompute everything from the op's inputs, so
any forward pairs with any backward. A :func:`use_backend` force reaches the
backward through the op's autograd formula, which a ``torch.compile``'d backward does not run: it
calls the backward ops directly, on CUDA from the autograd engine's own thread, where only the
``EPG_BACKEND`` variables are seen (force compiled CUDA runs with those).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import reference

BACKENDS = ("reference", "triton", "cuda", "sdpa", "flash_attn")
AUTO_ORDER = ("cuda", "triton")
ENV_VAR = "EPG_BACKEND"

_forced: contextvars.ContextVar[dict[str | None, str]] = contextvars.ContextVar(
    "epg_forced_backend", default={}
)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it is built from
    implementations: dict[str, Callable]
    runs_on_cuda: bool = False  # can run CUDA tensors (the CUDA kernels were built)
    # op -> check(*args) -> reason or None: inputs an implementation declines (dtype, size)
    supports: dict[str, Callable[..., str | None]] = field(default_factory=dict)


def _reference_info() -> BackendInfo:
    ops = {
        name: fn
        for name, fn in vars(reference).items()
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == reference.__name__
    }
    return BackendInfo("reference", True, "plain PyTorch (epg.reference)", ops, runs_on_cuda=True)


def _triton_info() -> BackendInfo:
    try:
        import epg_kernels
    except ImportError as exc:  # the package itself is part of epg; only a broken install lands here
        return BackendInfo("triton", False, f"epg_kernels does not import: {exc}", {})
    impls = dict(getattr(epg_kernels, "IMPLEMENTATIONS", {}))
    reason = getattr(epg_kernels, "UNAVAILABLE_REASON", None)
    if reason:
        return BackendInfo("triton", False, reason, {})
    import triton

    if not impls:
        return BackendInfo("triton", False, f"Triton {triton.__version__}: no kernels registered", {})
    on_gpu = torch.cuda.is_available()
    detail = f"Triton {triton.__version__}"
    # Triton reads TRITON_INTERPRET once, when the kernels are decorated (their import, above).
    if not on_gpu and os.environ.get("TRITON_INTERPRET") == "1":
        detail += " (no CUDA GPU here: CPU tensors under TRITON_INTERPRET=1, when forced)"
    elif not on_gpu:
        detail += " (GPU only here: no CUDA GPU; CPU tensors need TRITON_INTERPRET=1)"
    return BackendInfo(
        "triton", True, detail, impls, runs_on_cuda=on_gpu,
        supports=dict(getattr(epg_kernels, "SUPPORTS", {})),
    )  # fmt: skip


def _cuda_info() -> BackendInfo:
    try:
        from . import _C
    except ImportError as exc:
        return BackendInfo(
            "cuda", False, f"extension epg._C not built or not importable ({exc})", {}
        )
    ops_namespace = torch.ops.epg_C
    impls = {}
    for name in info("reference").implementations:
        if hasattr(ops_namespace, name):
            impls[name] = getattr(ops_namespace, name)
    with_cuda = bool(getattr(_C, "WITH_CUDA", 0))
    if not with_cuda:
        detail = "epg._C: C++ kernels only (built without CUDA): they run on CPU when forced"
    elif torch.cuda.is_available():
        detail = "epg._C: C++ and CUDA kernels"
    else:
        detail = "epg._C built with CUDA kernels; no GPU here: its C++ twins run on CPU when forced"
    if not getattr(_C, "WITH_OPENMP", 0):
        detail += " (C++ kernels on one thread: built without OpenMP)"
    return BackendInfo("cuda", True, detail, impls, runs_on_cuda=with_cuda)


def _sdpa_info() -> BackendInfo:
    from . import _attention_providers as providers

    return BackendInfo("sdpa", True, f"PyTorch SDPA (torch {torch.__version__}); attention only",
                       dict(providers.SDPA_IMPLEMENTATIONS), runs_on_cuda=True)  # fmt: skip


def _flash_info() -> BackendInfo:
    from . import _attention_providers as providers

    module, what = providers._flash_module()
    if module is None:
        return BackendInfo("flash_attn", False, what, {})
    return BackendInfo("flash_attn", True, f"{what}; attention only, CUDA fp16/bf16",
                       dict(providers.FLASH_IMPLEMENTATIONS), runs_on_cuda=torch.cuda.is_available(),
                       supports=dict(providers.FLASH_SUPPORTS))  # fmt: skip


_INFO = {
    "reference": _reference_info,
    "triton": _triton_info,
    "cuda": _cuda_info,
    "sdpa": _sdpa_info,
    "flash_attn": _flash_info,
}


# The probes' results, per process. A plain dict rather than functools.cache: torch.compile
# traces a cached function's body (with a warning on every compiled run) but a dict lookup.
_PROBED: dict[str, BackendInfo] = {}


def info(name: str) -> BackendInfo:
    """Availability and implemented ops of one backend."""
    found = _PROBED.get(name)
    if found is None:
        if name not in _INFO:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        found = _PROBED[name] = _INFO[name]()
    return found


def probe_again() -> None:
    """Forget the probes' results, so that the next :func:`info` looks again (for tests that
    change what the probes see)."""
    _PROBED.clear()


# os.environ's own dict (bytes keys on POSIX). torch.compile guards a lookup in it also when the
# variable is unset, where it does not guard ``os.environ.get`` of an unset variable: a function
# compiled with EPG_BACKEND unset would keep the automatic choice after it is set.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _environ_get(var: str) -> str:
    """``os.environ.get(var, "")``, read so that ``torch.compile`` guards it (see above)."""
    if isinstance(_ENVIRON_DATA, dict):
        raw = _ENVIRON_DATA.get(var.encode())
        return "" if raw is None else raw.decode(errors="replace")
    return os.environ.get(var, "")


@torch.compiler.assume_constant_result
def choice_traceable() -> bool:
    """Whether ``torch.compile`` can trace, and guard, the backend choice itself: dynamo traces
    the :func:`use_backend` context variable in torch 2.14, while torch 2.11's stops at it (a graph
    break, an error under ``fullgraph=True``). Fixed per process; run once per traced graph."""
    try:
        variables = importlib.import_module("torch._dynamo.variables")  # loaded when compiling
    except ImportError:
        return False
    return hasattr(variables, "ContextVarVariable")


def _forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` (a forward op's name), or None for the automatic choice. A
    force for every op passes over the ops an available backend has no implementation of: they
    follow the next setting (a variable after :func:`use_backend`), else the automatic choice."""
    forced = _forced.get()
    for key in (op, None):
        if key in forced:
            name = None if forced[key] == "auto" else forced[key]
            if key is not None or _covers(name, op):
                return name
    for var in (f"{ENV_VAR}_{op.upper()}", ENV_VAR):
        value = _backend_name(_environ_get(var))
        if value and value != "auto":
            if value not in BACKENDS:
                raise ValueError(f"{var}={value!r}: expected auto or one of {BACKENDS}")
            return value if var != ENV_VAR or _covers(value, op) else None
    return None


def _backend_name(raw: str) -> str:
    """A backend name as the variables and :func:`use_backend` both take it: any case, ``ref``
    for ``reference``."""
    name = raw.strip().lower()
    return "reference" if name == "ref" else name


def _dispatched_ops() -> tuple[str, ...]:
    """``epg.ops.OPS``, the ops a backend can be forced for; read on use, since epg.ops imports
    this module. (The reference module also holds helpers that no backend is chosen for.)"""
    from . import ops

    return ops.OPS


def _unknown_op(op: str) -> str | None:
    """None when ``op`` is a dispatched op, else why not (with the closest name, if any)."""
    ops = _dispatched_ops()
    if op in ops:
        return None
    close = difflib.get_close_matches(op, ops, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"epg has no op {op!r} ({hint}ops: {', '.join(sorted(ops))})"


def _covers(name: str | None, op: str) -> bool:
    """Whether a force of ``name`` for every op reaches ``op``: `EPG_BACKEND=triton` means the
    Triton kernels wherever there is one, as `sdpa` means SDPA for attention. An unavailable
    backend covers every op, so that forcing it says why it cannot run."""
    if name is None:
        return True
    backend = info(name)
    return not backend.available or op in backend.implementations


def is_forced(op: str) -> bool:
    """Whether a backend other than ``auto`` (the reference included) is forced for ``op``."""
    return _forced_backend(_base_op(op)) is not None


def environment_problems() -> list[str]:
    """What is wrong with the ``EPG_BACKEND*`` and ``EPG_SDPA_KERNEL`` variables (empty:
    nothing). Commands check this when they start: a typo otherwise fails at the first op,
    after data, checkpoints and output folders were already touched."""
    problems = []
    for var, raw in sorted(os.environ.items()):
        if var != ENV_VAR and not var.startswith(ENV_VAR + "_"):
            continue
        op = var[len(ENV_VAR) + 1 :].lower() or None
        if op is not None and (unknown := _unknown_op(op)):
            problems.append(f"{var}: {unknown}")
            continue
        value = _backend_name(raw)
        if value in ("", "auto"):
            continue
        if value not in BACKENDS:
            problems.append(f"{var}={raw!r}: expected auto or one of {', '.join(BACKENDS)}")
        elif not info(value).available:
            problems.append(f"{var}={raw!r}: {info(value).reason}")
        elif op is not None and op not in info(value).implementations:
            problems.append(f"{var}={raw!r}: {value} has no implementation of {op!r}")
        elif value in ("triton", "flash_attn") and not torch.cuda.is_available():
            if value == "flash_attn" or os.environ.get("TRITON_INTERPRET") != "1":
                why = _why_not(info(value), "attention", torch.device("cpu"))
                problems.append(f"{var}={raw!r}: no CUDA GPU here, and {why}")
    from ._attention_providers import sdpa_kernel_problem

    if sdpa_problem := sdpa_kernel_problem():  # read at the first attention call otherwise
        problems.append(sdpa_problem)
    return problems


def _why_not(backend: BackendInfo, op: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if not backend.available:
        return backend.reason
    if op not in backend.implementations:
        return f"{backend.name} has no implementation of {op!r} (it has: {sorted(backend.implementations)})"
    if device.type == "cuda" and not backend.runs_on_cuda:
        return f"{backend.name} cannot run CUDA tensors here ({backend.reason})"
    if device.type != "cuda" and backend.name == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device.type != "cuda" and backend.name == "flash_attn":
        return "flash-attn runs CUDA tensors only"
    if device.type not in ("cpu", "cuda") and backend.name not in ("reference", "sdpa"):
        return f"{backend.name} does not support device {device.type}"
    return None


def _base_op(op: str) -> str:
    return op.removesuffix("_backward")


def _declines(backend: BackendInfo, op: str, args: tuple) -> str | None:
    check = backend.supports.get(op)
    return check(*args) if check is not None and args else None


def choose(op: str, device: torch.device, args: tuple = ()) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    Automatic choice also skips a backend whose implementation declines these ``args`` (e.g.
    a dtype or head dim its kernel does not take); a forced backend is used as forced.
    """
    forced = _forced_backend(_base_op(op))
    if forced is not None:
        backend = info(forced)
        reason = _why_not(backend, op, device)
        if reason is None:
            return forced
        if op.endswith("_backward") and _why_not(backend, _base_op(op), device) is None:
            return "reference"
        raise BackendUnavailableError(f"backend {forced!r} was forced for {op!r} but: {reason}")
    if device.type == "cuda":
        for name in AUTO_ORDER:
            backend = info(name)
            if _why_not(backend, op, device) is None and _declines(backend, op, args) is None:
                return name
    return "reference"


def pick(op: str, device: torch.device, args: tuple = ()) -> Callable:
    """The implementation of ``op`` for tensors on ``device`` (and these ``args``)."""
    return info(choose(op, device, args)).implementations[op]


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Force ``name`` for ``op`` (one of ``epg.ops.OPS``, or None: every op) inside the block;
    ``"auto"`` undoes a force. Names as in ``EPG_BACKEND``: any case, ``ref`` for ``reference``."""
    backend = _backend_name(name)
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {name!r}; expected auto, ref or one of {BACKENDS}")
    if op is not None and (unknown := _unknown_op(op)):
        raise ValueError(f"use_backend: {unknown}")
    forced = {**_forced.get(), op: backend}
    token = _forced.set(forced)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_state() -> dict[str | None, str]:
    """The backends forced by :func:`use_backend` in this context (to hand to another thread)."""
    return _forced.get()


@contextlib.contextmanager
def forced_as(state: dict[str | None, str]) -> Iterator[None]:
    """Run the block with the forced backends of another context (see :func:`forced_state`).

    The autograd engine runs CUDA backwards on its own threads, where the context variable of
    the forward's thread is not visible; the op layer carries it over with these two."""
    token = _forced.set(state)
    try:
        yield
    finally:
        _forced.reset(token)
