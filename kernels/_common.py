"""Small helpers shared by the kernel launchers: block sizes, launch heuristics, device guard.

The launchers do not autotune (except precondition.py's elementwise kernels, which autotune their
block size on a GPU and use one of the candidates under the interpreter): each picks one configuration from the problem shape with the heuristics
below, so the configuration the Triton interpreter (``TRITON_INTERPRET=1``, kernels run on the
CPU through numpy; it cannot autotune) tests is the one a GPU runs. The only
interpreter-specific choice is the program count of the reduction kernels (no SMs to fill; kept
small but above one so the cross-program reductions are exercised).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# Whether Triton may contract a*b + c into one fused multiply-add (one rounding instead of two).
# Every launch says so: Triton 3.9 warns that its default (on) turns off in 3.10, and the GPU
# numerics must not move with the Triton version. On, as Triton has always run these kernels,
# except the elementwise preconditioning, whose scalings are meant to round as torch's separate
# operations do (kernels/precondition.py). The interpreter never contracts.
FP_FUSION = {"enable_fp_fusion": True}
NO_FP_FUSION = {"enable_fp_fusion": False}
# Elements of one [BLOCK_T, BLOCK_D] tile that the row-block heuristic aims for, and its row cap.
_TILE_ELEMS = 4096
_MAX_ROWS = 64
# Programs per streaming multiprocessor for the persistent-style backward kernels.
_PROGRAMS_PER_SM = 4
# Programs the backward kernels use under the interpreter (small, but > 1 to exercise reductions).
_INTERPRETER_PROGRAMS = 4


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps_for(tile_elems: int) -> int:
    """Warps for a program working on a tile of ``tile_elems`` elements: ~16 elements per thread,
    clamped to [1, 16]. (Ignored by the interpreter.)"""
    warps = next_power_of_2(max(1, tile_elems // (32 * 16)))
    return max(1, min(16, warps))


def row_block(n_cols: int, n_rows: int, tile_scale: float = 1.0) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for kernels that give each program BLOCK_T whole rows.

    BLOCK_D covers a full row (next power of two >= n_cols); BLOCK_T rows are stacked until the
    tile holds about ``tile_scale`` times the target element count, never more rows than exist.
    The same on a GPU and under the interpreter.
    """
    block_d = next_power_of_2(n_cols)
    target = int(_TILE_ELEMS * tile_scale)
    block_t = max(1, min(next_power_of_2(n_rows), target // block_d, _MAX_ROWS))
    return block_t, block_d, num_warps_for(block_t * block_d)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a grid-strided (reduction) kernel should launch on ``device``."""
    if is_interpreter() or device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _PROGRAMS_PER_SM * _sm_count(index)


def device_guard(t: torch.Tensor):
    """Makes ``t``'s GPU the current one for the launch (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
