"""torchrun integration: process-group setup, rank facts, and a BatchNorm synchronised over ranks.

Launch with torchrun (``torchrun --nproc_per_node 8 -m epg.cli finetune ...``); a plain
``python``/``epg`` call is one process. NCCL on GPUs, gloo on CPUs. No launcher of our own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """The device a name means ("auto"/None: cuda when present), checked; no side effects."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: epg runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU: use cpu")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} asked for, but there are {torch.cuda.device_count()} GPU(s)")
    return dev


_joined_gloo = False  # whether setup() made this process a member of a gloo process group


def setup(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        global _joined_gloo
        _joined_gloo = _joined_gloo or backend == "gloo"
    return DistInfo(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int) -> None:
    """End a process that joined a gloo process group now, with exit status ``code``, skipping
    Python's interpreter finalization; any other process returns at once (the caller exits).

    Why: torch never stops a gloo group's worker threads once DDP has used the group (its
    process group outlives ``destroy_process_group`` and the model), and a worker still releasing
    the last collective's tensors needs the GIL; if the interpreter is finalizing by then, the
    process aborts (SIGABRT, "terminate called without an active exception", in
    ``ProcessGroupGloo::runLoop`` → ``TensorImpl::decref_pyobject``, caught here: rare, once in 42
    looped runs of the two-process tests on a loaded machine, none in 76 with this exit). Everything
    epg writes is closed and synced before this; stdout, stderr and logging are flushed here."""
    if not _joined_gloo:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe has nothing left to flush
            stream.flush()
    os._exit(code)


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (``t`` itself in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every rank, on any backend.

    torch's SyncBatchNorm runs on CUDA only; this one all-reduces the per-feature sum and sum of
    squares (with autograd, through ``torch.distributed.nn``), so a run on N ranks computes what
    one process computes on the global batch, on gloo/CPU too. Same parameters and buffers as
    BatchNorm1d, so state dicts are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([x.shape[0]])])
        stats = all_reduce(stats)
        D = x.shape[1]
        n = stats[-1]
        mean = stats[:D] / n
        var = stats[D : 2 * D] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d in ``module`` for a :class:`GlobalBatchNorm1d` (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module
