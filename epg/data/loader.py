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


class InMemoryLoader:
    def __init__(
        self,
        tensors: dict[str, Tensor],
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        sizes = {k: t.shape[0] for k, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all tensors need the same number of rows, got {sizes}")
        self.num_samples = next(iter(sizes.values()))
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by {world_size} ranks"
            )
        if global_batch_size > self.num_samples:
            raise ValueError(
                f"global batch size {global_batch_size} exceeds the dataset ({self.num_samples} samples)"
            )
        self.tensors = tensors
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.batches_per_epoch = self.num_samples // global_batch_size
        self.epoch, self.index = 0, 0
        self._order: Tensor | None = None

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_samples, generator=g)
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        start = self.index * self.global_batch_size + self.rank * self.local_batch_size
        rows = self._epoch_order()[start : start + self.local_batch_size]
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
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._order = None
