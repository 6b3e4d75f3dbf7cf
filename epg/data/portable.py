"""The portable folder loader: a PyTorch DataLoader with Pillow decoding, on any machine.

Each DataLoader item is one whole local batch: the sampler yields positions (epoch, batch index)
from the current one on, forever, and a worker decodes that position's files (the
:class:`~epg.data.folder.BatchSchedule` of epg/data/folder.py), checks they are
``resolution``² (they are not cropped: see below), flips the scheduled ones and
stacks them as uint8 (B, 3, H, W), channels-last in memory as decoded. The main
process moves the batch to the device (from pinned memory on CUDA) and normalises it there.
Workers run batches in parallel and the DataLoader returns them in order, so the output is the
same for any ``num_workers``.

Interface as :class:`epg.data.loader.InMemoryLoader`: ``next(loader)`` → {"image": float32
(B, 3, H, W) normalised with ``convention`` (uint8 when ``convention=None``), "label": int64
(B,)} on ``device``; ``state_dict()``/``load_state_dict()`` for exact resume;
``batches_per_epoch``, ``num_samples``. Images must be exactly ``resolution``², as ``epg prepare``
writes them (the reference's centre crop in the loader is a no-op on such data); any other size
raises :class:`~epg.data.folder.ImageSizeError` at once, even with ``on_error="skip"`` (the
contract in epg/data/folder.py).
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .folder import (
    BadImageError,
    BatchSchedule,
    FolderIndex,
    FolderLoaderBase,
    decode_image,
    substitute,
)


class _Positions(Sampler):
    """(epoch, index) from a start position on, without end."""

    def __init__(self, epoch: int, index: int, batches_per_epoch: int):
        self.epoch, self.index, self.batches_per_epoch = epoch, index, batches_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, index = self.epoch, self.index
        while True:
            yield epoch, index
            index += 1
            if index == self.batches_per_epoch:
                epoch, index = epoch + 1, 0


class _BatchReader(Dataset):
    """dataset[(epoch, index)] → this rank's decoded batch at that position."""

    def __init__(self, folder: FolderIndex, schedule: BatchSchedule, resolution: int, skip: bool):
        self.folder, self.schedule, self.resolution, self.skip = folder, schedule, resolution, skip
        self.bad: set[int] = set()  # per worker; the substitution rule does not depend on it

    def _load(self, i: int) -> tuple[np.ndarray, int, list[tuple[str, str]]]:
        """(image, file index used, bad files met as (path, message)) for slot file ``i``.

        Only undecodable files are skipped; an :class:`ImageSizeError` propagates.
        """
        met = []
        while True:
            j = substitute(i, self.bad, len(self.folder)) if self.skip else i
            try:
                return decode_image(self.folder.path(j), self.resolution), j, met
            except BadImageError as exc:
                if not self.skip:
                    raise
                self.bad.add(j)
                met.append((self.folder.path(j), str(exc)))

    def __getitem__(self, position: tuple[int, int]) -> dict:
        epoch, index = position
        files, flips = self.schedule.rows(epoch, index)
        images = np.empty((len(files), self.resolution, self.resolution, 3), np.uint8)
        labels = np.empty(len(files), np.int64)
        bad, substituted = [], 0
        for k, (i, flip) in enumerate(zip(files.tolist(), flips.tolist())):
            image, j, met = self._load(i)
            images[k] = image[:, ::-1] if flip else image
            labels[k] = self.folder.labels[j]
            substituted += j != i
            bad.extend(met)
        return {
            # (B, 3, H, W) over the decoded (B, H, W, 3) memory: normalize_uint8 reads it as is.
            "image": torch.from_numpy(images).permute(0, 3, 1, 2),
            "label": torch.from_numpy(labels),
            "position": position,
            "bad": bad,
            "substituted": substituted,
        }


def _ignore_sigterm(worker_id: int) -> None:
    """Workers ignore SIGTERM. Slurm and systemd send it to every process of a job, and the
    training process answers it by finishing its step and saving; a worker dying of it would
    make torch's SIGCHLD handler raise in the training process at any point, the checkpoint
    write included. Workers still stop when the loader closes (and are killed if they do not)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_with_workers: weakref.WeakSet = weakref.WeakSet()  # loaders whose workers may be running


def _close_loaders_at_exit() -> None:
    """At exit multiprocessing SIGTERMs its daemon children and joins them; ours ignore SIGTERM
    (:func:`_ignore_sigterm`), so a script that never closed its loader would wait forever.
    Registered after multiprocessing's own handler, so it runs first."""
    for loader in list(_with_workers):
        loader.close()


class PortableLoader(FolderLoaderBase):
    """Batches of an image folder through a PyTorch DataLoader and Pillow.

    Args:
        source: a :class:`FolderIndex`, a folder ``root/<class>/<image>`` or a file list.
        resolution: output side; every image must be resolution² (``epg prepare``).
        global_batch_size: G, split over ``world_size`` ranks (G / world_size rows each).
        rank, world_size, seed: the schedule of epg/data/folder.py.
        device: where batches go; pinned host memory is used when it is a CUDA device.
        convention: ``"imagenet"`` (x01 − mean)/(2·std), ``"simple"`` 2·x01 − 1, or None for
            uint8 images.
        flip_p: probability of the (seeded) horizontal flip; 0.5 as the reference.
        on_error: for a file that cannot be decoded: ``"raise"`` (a :class:`BadImageError`
            naming the file) or ``"skip"`` (use the next good file in index order, log it once,
            count it in ``skipped``). An image of the wrong size always raises.
        num_workers: DataLoader worker processes (0: decode in the calling process).
        prefetch_factor: batches each worker keeps ready (with workers only).
    """

    def __init__(
        self,
        source: FolderIndex | str | os.PathLike,
        resolution: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        convention: str | None = "imagenet",
        flip_p: float = 0.5,
        on_error: str = "raise",
        num_workers: int = 4,
        prefetch_factor: int = 2,
    ):
        super().__init__(source, resolution, global_batch_size, rank, world_size, seed, device,
                         convention, flip_p, on_error)  # fmt: skip
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._iterator: Iterator[dict] | None = None

    def _start(self) -> Iterator[dict]:
        reader = _BatchReader(self.folder, self.schedule, self.resolution, self.on_error == "skip")
        sampler = _Positions(self.epoch, self.index, self.batches_per_epoch)
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        loader = DataLoader(
            reader,
            batch_size=None,  # each item already is a batch
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_sigterm,
            **extra,
        )
        iterator = iter(loader)
        if self.num_workers:
            # Starting workers registers multiprocessing's exit handler; ours goes after it (so
            # runs first), and only once.
            atexit.unregister(_close_loaders_at_exit)
            atexit.register(_close_loaders_at_exit)
            _with_workers.add(self)
        return iterator

    def _fetch(self) -> tuple[Tensor, Tensor, list[tuple[str, str]], int]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except BaseException:
            self.close()  # a failed DataLoader iterator cannot continue
            raise
        if tuple(batch["position"]) != (self.epoch, self.index):
            raise RuntimeError(
                f"internal error: got batch {batch['position']}, "
                f"expected {(self.epoch, self.index)}"
            )
        return batch["image"], batch["label"], batch["bad"], batch["substituted"]

    def close(self) -> None:
        """Stop the workers; the next batch starts a fresh DataLoader at the current position."""
        # Shut the workers down now rather than when the iterator is collected: after an error
        # the traceback keeps it alive, and a later cyclic collection can clear its queues
        # before its finaliser runs, which then waits out the join timeouts (5 s per worker).
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            workers = list(getattr(self._iterator, "_workers", ()))
            shutdown()
            for worker in workers:  # torch's last resort, SIGTERM, is ignored: see _ignore_sigterm
                if worker.is_alive():
                    worker.kill()
        self._iterator = None

    def __del__(self):
        if "_iterator" in self.__dict__:
            self.close()
