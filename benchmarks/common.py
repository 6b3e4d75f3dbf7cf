"""Shared pieces of the benchmark suites: timing, the environment record, calibration, the plain
PyTorch path, backend forcing and the time budget of ``gpu_check.sh``.

Timing: one pytest-benchmark round calls the benchmarked function ``calls`` times and then waits
for the device (``torch.cuda.synchronize``), so asynchronous GPU work is inside the round and the
synchronisation cost is shared by ``calls`` calls. ``calls`` is chosen from one untimed call so a
round lasts about ``target_round_s``. pytest-benchmark's own columns are therefore times of one
round; the per-call time is the round median divided by ``extra_info["calls_per_round"]``, which is
what ``report.py`` shows.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from epg import ops, reference
from epg.data.prepare import usable_cpus

REPO = Path(__file__).resolve().parents[1]
DEADLINE_ENV = "EPG_BENCH_DEADLINE"  # unix time by which gpu_check.sh wants the suite done
QUICK_ENV = "EPG_BENCH_QUICK"  # "1": fewer timed rounds (gpu_check.sh)


# --- devices and timing ---------------------------------------------------------------------------


def cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hear_ctrl_c() -> None:
    """Take SIGINT back when this process started with it ignored (a background job of a
    non-interactive shell, some job runners): gpu_check.sh stops a suite at its time limit with
    SIGINT, and an ignored one would leave ``timeout -k`` to kill pytest before it writes its JSON."""
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


_hear_ctrl_c()


def time_rounds(
    benchmark,
    fn: Callable[[], object],
    device: torch.device,
    *,
    rounds: int,
    warmup_rounds: int = 1,
    target_round_s: float = 0.0,
    max_calls: int = 1000,
) -> float | None:
    """Benchmark ``fn`` (see the module docstring); returns seconds per call, or None when
    pytest-benchmark is disabled (``--benchmark-disable``: ``fn`` then runs once, as a test).

    With ``target_round_s`` > 0, one untimed call warms up (compilation, autotuning, allocator)
    and a second sizes the rounds; with 0 every round is one call and the caller warms up
    (``warmup_rounds`` untimed rounds always run first).
    """
    calls = 1
    if target_round_s > 0 or not benchmark.enabled:
        fn()
        sync(device)
        if not benchmark.enabled:
            return None
        start = time.perf_counter()
        fn()
        sync(device)
        once = time.perf_counter() - start
        calls = max(1, min(max_calls, math.ceil(target_round_s / max(once, 1e-7))))

    def one_round() -> None:
        for _ in range(calls):
            fn()
        sync(device)

    benchmark.extra_info["calls_per_round"] = calls  # before the rounds: report.py divides by it
    try:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    except BaseException:
        # pytest-benchmark marks a benchmark as failed on an Exception only; one stopped by
        # KeyboardInterrupt (gpu_check.sh's time limit) or a pytest outcome (pytest-timeout)
        # would keep no or too few rounds, and one without rounds stops the whole JSON from
        # being written. Drop it instead.
        benchmark.has_error = True
        raise
    per_call = benchmark.stats.stats.median / calls
    benchmark.extra_info["seconds_per_call"] = per_call
    return per_call


def rounds(full: int, quick: int) -> int:
    """Timed rounds: ``quick`` when ``EPG_BENCH_QUICK=1`` (gpu_check.sh), else ``full``."""
    return quick if os.environ.get(QUICK_ENV, "").strip() == "1" else full


def require_time(seconds: float) -> None:
    """Skip the case when ``EPG_BENCH_DEADLINE`` leaves less than ``seconds`` (gpu_check.sh)."""
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return
    left = float(raw) - time.time()
    if left < seconds:
        pytest.skip(
            f"time budget: {max(left, 0.0):.0f} s left of this run's budget, "
            f"the case needs about {seconds:.0f} s"
        )


def release_memory() -> None:
    """Drop compiled graphs and cached blocks between cases that build large models."""
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- environment and calibration ---------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_revision() -> str:
    """Short commit of the checkout (``+dirty`` with uncommitted changes to tracked files);
    ``EPG_GIT_REV`` wins (a copy of the tree without .git); ``unknown`` otherwise."""
    forced = os.environ.get("EPG_GIT_REV", "").strip()
    if forced:
        return forced
    rev = _git("rev-parse", "--short=12", "HEAD")
    if not rev:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{rev}+dirty" if dirty else rev


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a figure was measured with: date, devices, library versions, git revision."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken
        triton_version = None
    try:
        from epg import _C

        extension = "C++ and CUDA" if getattr(_C, "WITH_CUDA", 0) else "C++ only"
        if not getattr(_C, "WITH_OPENMP", 0):  # the CPU figures of its ops are one thread's
            extension += ", C++ kernels on one thread"
    except ImportError:
        extension = None
    try:
        import flash_attn

        flash_attn_version = flash_attn.__version__
    except Exception:
        flash_attn_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "flash_attn": flash_attn_version,
        "epg_extension": extension,
        "cpu": _cpu_name(),
        "cpu_count": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "gpu_count": 0,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
        )
    return env


def _best_rate(run: Callable[[], None], device: torch.device, reps: int, trials: int) -> float:
    """Smallest time of ``reps`` back-to-back calls over ``trials`` trials, per call."""
    run()
    sync(device)
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            run()
        sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def calibrate(device: torch.device) -> dict:
    """Copy bandwidth and matrix-product rate of ``device``, measured now.

    Copy: ``dst.copy_(src)`` of a large buffer, read + write bytes (1 GiB on a GPU, 64 MiB on a
    CPU). Matrix rate: a square bf16 matmul (8192) on a GPU; on a CPU a float32 matmul (1024),
    the dtype the CPU benchmarks train in. Best of a few trials: the device's attainable rate.
    """
    gpu = device.type == "cuda"
    nbytes = (1 << 30) if gpu else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = _best_rate(lambda: dst.copy_(src), device, reps=20 if gpu else 5, trials=3)
    del src, dst
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _best_rate(lambda: torch.mm(a, b), device, reps=20 if gpu else 3, trials=3)
    return {
        "copy_gbps": 2 * nbytes / copy_s / 1e9,
        "copy_bytes": nbytes,
        "matmul_tflops": 2 * n**3 / mm_s / 1e12,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
    }


# --- the plain PyTorch path ---------------------------------------------------------------------
# The reference functions called directly, with the public ops' signatures, defaults and gradients:
# no custom op boundary, so autograd differentiates the reference math itself, SDPA picks its own
# kernel, and torch.compile can fuse across what would be op boundaries: "PyTorch without epg".
# The op benchmarks' "ref" provider is this table too.


def _plain_layer_norm(x, weight, bias, eps=1e-5):
    return reference.layer_norm(x, weight, bias, eps)


def _plain_ln_modulate(x, weight, bias, shift, scale, eps=1e-5):
    return reference.ln_modulate(x, weight, bias, shift, scale, eps)


def _plain_gated_residual(x, gate, y):
    return reference.gated_residual(x, gate, y)


def _plain_attention(qkv, num_heads):
    return reference.attention(qkv, num_heads)


def _plain_patch_embed(img, weight, bias, pos_embed):
    return reference.patch_embed(img, weight, bias, pos_embed)


def _plain_output_head(x, norm_weight, norm_bias, weight, bias, patch_size, eps=1e-5):
    return reference.output_head(x, norm_weight, norm_bias, weight, bias, patch_size, eps)


def _plain_timestep_embedding(t, dim):
    return reference.timestep_embedding(t, dim)


def _plain_edm_scalings(sigma, sigma_data=0.5, sigma_min=0.002, mode="x0"):
    return reference.edm_scalings(sigma, sigma_data, sigma_min, mode)


def _plain_noise_precondition(x0, eps, sigma, sigma_data=0.5, sigma_min=0.002, mode="x0"):
    return reference.noise_precondition(x0, eps, sigma, sigma_data, sigma_min, mode)


def _plain_weighted_mse_loss(pred, target, weight):
    return reference.weighted_mse_loss(pred, target, weight)[0]


def _plain_pseudo_huber_loss(pred, target, weight, c=0.06):
    # The op's normaliser sqrt(S + c²) is under stop-gradient (official code); so it is here.
    _, sqsum = reference.pseudo_huber_loss(pred, target, weight, c)
    return weight.to(sqsum.dtype) * sqsum / torch.sqrt(sqsum.detach() + c * c)


def _plain_info_nce(q, k, tau):
    # As the public op: the keys are a stop-gradient target; a tensor τ is folded into q.
    if isinstance(tau, torch.Tensor):
        q, tau = q / tau.to(q.dtype), 1.0
    return reference.info_nce(q, k.detach(), tau)


def _plain_normalize_images(images, convention, flip=None, dtype=torch.float32):
    mean, std = reference.normalization_stats(convention, images.shape[3])
    return reference.normalize_images(images, flip, mean, std, dtype)


def _plain_to_uint8(images, convention):
    mean, std = reference.normalization_stats(convention, images.shape[1])
    return reference.to_uint8(images.detach(), mean, std)


def _plain_patchify_hwc(img, patch_size):
    return reference.patchify_hwc(img, patch_size)


def _plain_unpatchify_hwc(tokens, patch_size, height=None):
    if height is None:  # a square image, as the public op assumes
        height = math.isqrt(tokens.shape[1]) * patch_size
    return reference.unpatchify_hwc(tokens, patch_size, height)


PLAIN_OPS: dict[str, Callable] = {
    "layer_norm": _plain_layer_norm,
    "ln_modulate": _plain_ln_modulate,
    "gated_residual": _plain_gated_residual,
    "attention": _plain_attention,
    "patch_embed": _plain_patch_embed,
    "output_head": _plain_output_head,
    "timestep_embedding": _plain_timestep_embedding,
    "edm_scalings": _plain_edm_scalings,
    "noise_precondition": _plain_noise_precondition,
    "weighted_mse_loss": _plain_weighted_mse_loss,
    "pseudo_huber_loss": _plain_pseudo_huber_loss,
    "info_nce": _plain_info_nce,
    "normalize_images": _plain_normalize_images,
    "to_uint8": _plain_to_uint8,
    "patchify_hwc": _plain_patchify_hwc,
    "unpatchify_hwc": _plain_unpatchify_hwc,
}


@contextlib.contextmanager
def plain_pytorch_ops() -> Iterator[None]:
    """Inside the block, ``epg.ops.<op>`` is the reference math called directly (see above).

    The networks and objectives call the ops as ``ops.<op>(...)`` at run time, so they pick up
    the replacement; build and run the model inside the block.
    """
    missing = sorted(set(ops.OPS) - set(PLAIN_OPS))
    if missing:
        raise RuntimeError(f"benchmarks/common.py has no plain PyTorch version of {missing}")
    saved = {name: getattr(ops, name) for name in ops.OPS}
    try:
        for name in ops.OPS:
            setattr(ops, name, PLAIN_OPS[name])
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


@contextlib.contextmanager
def forced_backend(backend: str | None, op: str | None = None) -> Iterator[None]:
    """Force an epg backend through ``EPG_BACKEND[_<OP>]`` for the block (None: automatic).

    The environment variable, not ``epg.ops.use_backend``: the autograd engine runs the backward
    of CUDA tensors on a worker thread of its own, and a context variable set on this thread is
    not visible on another one; the environment is.
    """
    if backend is None:
        yield
        return
    key = "EPG_BACKEND" + (f"_{op.upper()}" if op else "")
    old = os.environ.get(key)
    os.environ[key] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
