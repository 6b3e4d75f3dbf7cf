"""Batches from in-memory tensors, sharded over ranks, with a resumable position.

Epoch e visits the samples in the order ``randperm(N)`` drawn from a generator seeded with
(seed, e); global batch i of the epoch is rows [i·G, (i+1)·G) of that order (the last partial
batch is dropped), and rank r takes rows [r·B, (r+1)·B) of it, B = G / world_size. The position
(epoch, batch index) is all the state there is, so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .folder import BatchSchedule, ScheduledLoader


class InMemoryLoader(ScheduledLoader):
    """``next(loader)`` → this rank's rows of the next global batch, as {name: tensor on device}.

    The order, sharding and argument checks are :class:`epg.data.folder.BatchSchedule`'s (no
    flips), so an in-memory and a folder run over the same samples see the same batches.
    """

    def __init__(
        self,
        tensors: dict[str, Tensor],
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if not tensors:
            raise ValueError("InMemoryLoader needs at least one tensor")
        sizes = {k: t.shape[0] for k, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all tensors need the same number of rows, got {sizes}")
        self.schedule = BatchSchedule(
            next(iter(sizes.values())), global_batch_size, rank, world_size, seed, flip_p=0.0
        )
        self.tensors = tensors
        self.device = torch.device(device)
        self.epoch, self.index = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Tensor]:
        self.epoch, self.index = self.schedule.normalize(self.epoch, self.index)
        rows = torch.from_numpy(self.schedule.rows(self.epoch, self.index)[0])
        self.index += 1
        return {k: t[rows].to(self.device, non_blocking=True) for k, t in self.tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "global_batch_size": self.global_batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("global_batch_size", self.global_batch_size) != self.global_batch_size:
            raise ValueError(
                f"cannot resume the data position: the checkpoint used global batch "
                f"{state['global_batch_size']}, this run {self.global_batch_size}"
            )
        self.schedule.seed = state["seed"]
        self.epoch, self.index = state["epoch"], state["index"]
