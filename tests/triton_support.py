"""What the Triton kernel test modules share: the skip rule and the import of epg_kernels.

Each module calls :func:`require_triton` at import time (a module-level skip), then
:func:`import_epg_kernels`.
"""

from __future__ import annotations

import importlib.util
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
