"""What the Triton kernel test modules share: the skip rule and the import of epg_kernels.

Each module calls :func:`require_triton` at import time (a module-level skip), then
:func:`import_epg_kernels`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def require_triton() -> None:
    """Skip the calling test module unless Triton can run here (a GPU, or the interpreter)."""
    if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip(
            "Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them on the CPU",
            allow_module_level=True,
        )
    pytest.importorskip("triton", reason="triton is not installed")
    reason = interpreter_problem()
    if reason:
        pytest.skip(reason, allow_module_level=True)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run kernels here (None: it can, or it is not in use)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        # Its interpreter turns 1-element arrays into ints with int(), which NumPy 2.4
        # refuses: every kernel would fail with an InterpreterError (3.7 uses squeeze()).
        return (f"Triton {triton.__version__}'s interpreter needs NumPy < 2.4 (this is "
                f"{numpy.__version__}); scripts/check_triton_versions.sh pairs it with NumPy 2.2")  # fmt: skip
    return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])


def import_epg_kernels():
    """The installed ``epg_kernels``, or the repository's kernels/ folder under that name."""
    try:
        import epg_kernels
    except ImportError:  # not installed: load the kernels/ folder under its installed name
        spec = importlib.util.spec_from_file_location(
            "epg_kernels", REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )  # fmt: skip
        epg_kernels = importlib.util.module_from_spec(spec)
        sys.modules["epg_kernels"] = epg_kernels
        spec.loader.exec_module(epg_kernels)
    return epg_kernels


def cast_keeping_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with the same strides (kernels must see the caller's layout)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=t.device).copy_(t)


def check_against_baseline(
    name, out, truth, baseline, dtype, atol, rtol, n=1, inputs=(), out_dtype=None
):
    """The tolerance rule of style.md: |out − truth| ≤ 2·max|baseline − truth| + atol·sqrt(n) +
    rtol·|truth|, elementwise (NaN fails). ``truth`` is the float64 reference, ``baseline`` the
    same math run in the test dtype, ``n`` the number of terms a reduced output sums. Also checks
    the output's dtype (``out_dtype``, default the baseline's), shape, contiguity and that it
    aliases none of ``inputs``; on failure names the worst element and all three values."""
    expected = baseline.dtype if out_dtype is None else out_dtype
    assert out.dtype == expected, f"{name}: dtype {out.dtype}, expected {expected}"
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(truth.shape)}"
    assert out.is_contiguous(), f"{name}: output is not contiguous"
    for t in inputs:
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), (
            f"{name}: output aliases an input"
        )
    o, r, base = out.double().cpu(), truth.double().cpu(), baseline.double().cpu()
    base_err = (base - r).abs().max().item() if r.numel() else 0.0
    tol = 2.0 * base_err + atol * math.sqrt(n) + rtol * r.abs()
    err = (o - r).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        worst = torch.where(bad, err - tol, torch.full_like(err, -1.0)).nan_to_num(float("inf"))
        idx = tuple(int(v) for v in torch.unravel_index(worst.argmax(), r.shape))
        pytest.fail(
            f"{name} [{dtype}]: {int(bad.sum())} of {r.numel()} values off; worst at {idx}: "
            f"kernel {o[idx].item():.8g}, float64 reference {r[idx].item():.8g}, {dtype} "
            f"baseline {base[idx].item():.8g}; |error| {err[idx].item():.3g} > tolerance "
            f"{tol[idx].item():.3g} (baseline max error {base_err:.3g})"
        )
