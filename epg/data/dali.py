"""The DALI folder loader: NVIDIA DALI decodes (on the GPU with ``"mixed"``) and flips.

Same schedule, same interface and the same images as :class:`epg.data.portable.PortableLoader`:
bit for bit on 8-bit PNG input (lossless); on JPEG input within ``JPEG_TOLERANCE`` uint8 levels
(measured: 0 for DALI's ``"cpu"`` decoder, libjpeg-turbo like Pillow; nvJPEG on the GPU is only
held to a loose bound until measured there). Files DALI decodes differently from Pillow, or that
are unverified — 16-bit PNGs, CMYK JPEGs, truncated files, other formats — are decoded by Pillow
instead and handed to DALI as an uncompressed PNG (:func:`pillow_route`, :func:`read_for_dali`),
so they match too, at Pillow's speed (see :func:`pillow_route` for what was measured).

How the order is kept: DALI's own file reader shuffles with a buffer and cannot reproduce a seeded
permutation or resume mid-epoch, so the pipeline starts from ``fn.external_source`` instead. Its
callback receives DALI's iteration number k (counted from the pipeline's start, prefetching
included), maps start + k to the position (epoch, batch index), and returns the encoded bytes of
this rank's files at that position (read by a thread pool, one batch ahead), their labels and
the scheduled flips (epg/data/folder.py). Each DALI iteration depends only on its position, so
prefetching never shifts the data, and resuming means building the pipeline at the saved
position. The rest of the graph:

    external_source → decoders.image ("mixed" on a CUDA device, "cpu" otherwise; RGB, EXIF
    orientation ignored like Pillow) → crop_mirror_normalize (the scheduled mirror, HWC, uint8;
    no crop: the images are resolution² already)

and the uint8 batch is normalised by the same torch code as the portable loader, so both paths
agree exactly. Sharding is the schedule's: each rank's pipeline reads its share of the global
batch (DALI's ``shard_id``/``num_shards`` belong to its file reader, which is not used).

Image size: as for the portable loader, every image must be exactly resolution² (the contract
in epg/data/folder.py). The reader threads take each PNG's or JPEG's size from its header
(:func:`header_size`, a few bytes); a file whose header gives another size goes through Pillow
(:func:`read_for_dali`), which raises :class:`~epg.data.folder.ImageSizeError` when it decodes to
that size. The loader re-raises it at once, whatever ``on_error`` says, without diagnosing.

Bad files: DALI stops the pipeline on a decoding error without naming the file, so after a
failure the loader decodes the files of the failed batch (and of the prefetched ones)
with Pillow to find the culprit. ``on_error="raise"`` then raises :class:`BadImageError` naming
it; ``"skip"`` marks it bad, rebuilds the pipeline at the same position and substitutes the next
good file in index order, as the portable loader does. A file that Pillow decodes but DALI
refuses — a PNG with a wrong chunk checksum (libpng checks them, Pillow does not; the pixel data
are intact when the zlib checksum holds) — is not bad: it is routed through Pillow from then on
(:func:`png_checksums_ok`), so both loaders keep training on the same images.

Only a GPU can confirm: the ``"mixed"`` decoder path (``device`` a CUDA device), i.e. GPU
decoding of JPEG (DALI decodes PNG on host threads even in ``"mixed"`` mode), the GPU flip,
the copy into torch's CUDA tensors, and its throughput. The tests run the ``"cpu"`` mode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .folder import (
    JPEG_END,
    PNG_END,
    BadImageError,
    BatchSchedule,
    FolderIndex,
    FolderLoaderBase,
    ImageSizeError,
    decode_image,
    substitute,
)

log = logging.getLogger("epg.data")

INSTALL_HINT = "pip install 'epg[dali]'  (the wheel nvidia-dali-cuda130)"
# Max |DALI − Pillow| in uint8 levels on the same JPEG bytes with the "cpu" decoder, measured on
# scikit-learn's sample photos and re-encodings of them (tests/test_data_folder.py).
JPEG_TOLERANCE = 0


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _import_dali():
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as exc:
        raise ImportError(
            f"the DALI loader needs NVIDIA DALI, which is not installed: {INSTALL_HINT}; "
            "or use the portable loader (loader='portable')"
        ) from exc
    return Pipeline, fn, types, DALIGenericIterator


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); C4, C8 and CC
# are other segments.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, colour components) from a JPEG's frame header (None if none is found)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:  # FF Cn, length (2), precision (1), Y (2), X (2), components (1)
            if pos + 9 >= len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height, data[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a PNG's IHDR or a JPEG's frame header states it (None: neither)."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8"):
        frame = _jpeg_frame(data)
        return None if frame is None else frame[:2]
    return None


def pillow_route(data: bytes) -> str | None:
    """Why a file should be decoded by Pillow rather than DALI (None: DALI decodes it alike).

    Measured with the ``"cpu"`` decoder: DALI gives Pillow's RGB (:func:`epg.data.folder.to_rgb`)
    exactly for 8-bit PNGs of every colour type (gray, gray + alpha, palette with or without
    transparency, RGB, RGBA) and for RGB, gray and (Pillow-written, Adobe) CMYK JPEGs. Pillow
    decodes instead:

    * 16-bit PNGs: DALI reduces a level v to round(v / 257), Pillow (and ``to_rgb``) to v >> 8,
      up to 1 level apart;
    * 4-component (CMYK/YCCK) JPEGs: they match on the CPU, but nvJPEG's handling (``"mixed"``)
      and YCCK are unverified, and such files are rare (ImageNet's training set has a few dozen);
    * files that do not end like a whole PNG or JPEG (truncated): DALI failed on the ones tried,
      but libjpeg-turbo can finish a JPEG cut short with only a warning; through Pillow such a
      file is bad for both loaders alike;
    * other formats (BMP, WebP): not compared.
    """
    if data.startswith(_PNG_SIGNATURE):
        if not data.endswith(PNG_END):
            return "incomplete PNG"
        if len(data) > 24 and data[24] == 16:  # IHDR bit depth
            return "16-bit PNG"
        return None
    if data.startswith(b"\xff\xd8"):
        if not data.rstrip(b"\x00").endswith(JPEG_END):
            return "JPEG without its end marker"
        frame = _jpeg_frame(data)
        components = None if frame is None else frame[2]
        if components not in (1, 3):
            return f"JPEG with {components} components"
        return None
    return "neither PNG nor JPEG"


def png_checksums_ok(data: bytes) -> bool:
    """Whether every chunk CRC of a PNG holds (True for data that is not a PNG)."""
    import zlib

    if not data.startswith(_PNG_SIGNATURE):
        return True
    view, pos = memoryview(data), len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):  # length (4), type (4), data, CRC (4) over type + data
        end = pos + 8 + int.from_bytes(data[pos : pos + 4], "big")
        if end + 4 > len(data):
            return False
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return False
        pos = end + 4
    return True


def read_for_dali(path: str, resolution: int, via_pillow: bool = False) -> np.ndarray:
    """The bytes DALI decodes for ``path``: the file itself, or — for the files
    :func:`pillow_route` names, those whose header does not state resolution², and with
    ``via_pillow`` — Pillow's decoded RGB image as an uncompressed PNG (so DALI's output is
    Pillow's, bit for bit).
    Raises :class:`ImageSizeError` for an image that decodes to another size, and
    :class:`BadImageError` for a file Pillow cannot decode (DALI then fails and the loader's
    diagnosis handles it).
    """
    if not via_pillow:
        data = np.fromfile(path, np.uint8)
        encoded = data.tobytes()
        if pillow_route(encoded) is None and header_size(encoded) == (resolution, resolution):
            return data
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(decode_image(path, resolution)).save(buffer, format="PNG", compress_level=0)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def _batch_files(
    folder: FolderIndex, schedule: BatchSchedule, bad: set[int], batch: int
) -> tuple[list[int], np.ndarray]:
    """(file per slot after substitution, flips) of a rank's batch number ``batch`` (absolute)."""
    files, flips = schedule.rows(0, batch)  # rows() folds the batch number into epochs
    if bad:
        return [substitute(i, bad, len(folder)) for i in files.tolist()], flips
    return files.tolist(), flips


class _Feeder:
    """The external source: DALI iteration k → (encoded files, labels, flips) at start + k."""

    def __init__(
        self,
        folder: FolderIndex,
        schedule: BatchSchedule,
        resolution: int,
        start: int,
        bad: set[int],
        via_pillow: set[int],
        pool: ThreadPoolExecutor,
    ):
        self.folder, self.schedule, self.resolution, self.start, self.bad, self.pool = (
            folder, schedule, resolution, start, bad, pool,
        )  # fmt: skip
        self.via_pillow = via_pillow
        self._ahead: dict[int, tuple[list[Future], np.ndarray, np.ndarray]] = {}

    def _submit(self, batch: int):
        files, flips = _batch_files(self.folder, self.schedule, self.bad, batch)
        reads = [self.pool.submit(read_for_dali, self.folder.path(i), self.resolution,
                                  i in self.via_pillow) for i in files]  # fmt: skip
        return reads, self.folder.labels[files], flips.astype(np.int32)

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        batch = self.start + info.iteration
        reads, labels, flips = self._ahead.pop(batch, None) or self._submit(batch)
        if batch + 1 not in self._ahead:  # read the next batch while DALI decodes this one
            self._ahead[batch + 1] = self._submit(batch + 1)
        return [r.result() for r in reads], labels, flips


class DaliLoader(FolderLoaderBase):
    """Batches of an image folder decoded by NVIDIA DALI.

    The images equal the portable loader's: exactly for PNG, within :data:`JPEG_TOLERANCE`
    (0 levels, measured with ``decoder="cpu"``) for JPEG; 16-bit PNGs, CMYK JPEGs, truncated
    files and other formats are decoded by Pillow (:func:`pillow_route`).

    Args as :class:`~epg.data.portable.PortableLoader` (source, resolution, global_batch_size,
    rank, world_size, seed, device, convention, flip_p, on_error), and:
        decoder: ``"mixed"`` (GPU decoding, output on ``device``) or ``"cpu"``; default
            ``"mixed"`` when ``device`` is a CUDA device, else ``"cpu"`` (``device_id=None``).
        num_threads: DALI's CPU threads (host decoding, and the host part of ``"mixed"``).
        read_threads: threads reading the encoded files.
        prefetch_queue_depth: batches DALI prepares ahead.
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
        decoder: str | None = None,
        num_threads: int = 4,
        read_threads: int = 8,
        prefetch_queue_depth: int = 2,
    ):
        _import_dali()
        super().__init__(source, resolution, global_batch_size, rank, world_size, seed, device,
                         convention, flip_p, on_error)  # fmt: skip
        if decoder is None:
            decoder = "mixed" if self.device.type == "cuda" else "cpu"
        if decoder not in ("mixed", "cpu"):
            raise ValueError(f"decoder must be 'mixed' or 'cpu', got {decoder!r}")
        if decoder == "mixed":
            if self.device.type != "cuda" or not torch.cuda.is_available():
                raise ValueError(f"DALI's 'mixed' decoder needs a CUDA device, got {self.device}")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.decoder = decoder
        self.num_threads, self.read_threads = num_threads, read_threads
        self.prefetch_queue_depth = prefetch_queue_depth
        self._bad: set[int] = set()  # file indices known bad (skip mode)
        self._via_pillow: set[int] = set()  # good files DALI refuses: decoded by Pillow
        self._iterator: Iterator | None = None
        self._pipe = None
        self._pool: ThreadPoolExecutor | None = None

    def _batch_number(self) -> int:
        return self.epoch * self.batches_per_epoch + self.index

    def _start(self) -> Iterator:
        Pipeline, fn, types, DALIGenericIterator = _import_dali()
        self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="epg-dali-read")
        feeder = _Feeder(self.folder, self.schedule, self.resolution, self._batch_number(),
                         set(self._bad), set(self._via_pillow), self._pool)  # fmt: skip
        pipe = Pipeline(
            batch_size=self.local_batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if self.decoder == "mixed" else None,
            prefetch_queue_depth=self.prefetch_queue_depth,
            seed=self.seed,  # nothing in the graph is random; the schedule drew the flips
        )
        with pipe:
            encoded, labels, flips = fn.external_source(
                source=feeder, num_outputs=3, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT64, types.INT32], ndim=[1, 0, 0],
            )  # fmt: skip
            images = fn.decoders.image(
                encoded, device=self.decoder, output_type=types.RGB, adjust_orientation=False
            )
            # No crop: the reader checked that every image is resolution² (read_for_dali).
            images = fn.crop_mirror_normalize(
                images, mirror=flips, dtype=types.UINT8, output_layout="HWC"
            )
            pipe.set_outputs(images, labels)
        pipe.build()
        self._pipe = pipe
        return DALIGenericIterator([pipe], ["image", "label"], size=-1)

    def _fetch(self) -> tuple[Tensor, Tensor, list[tuple[str, str]], int]:
        new_bad: list[tuple[str, str]] = []
        while True:
            try:
                if self._iterator is None:
                    self._iterator = self._start()
                out = next(self._iterator)[0]
                break
            except ImageSizeError:  # a configuration error, never a file to skip: stop now
                self.close()
                raise
            except Exception as exc:  # DALI's pipeline is dead after an error: rebuild it
                self.close()
                new_bad += self._diagnose(exc)
        files = self.schedule.rows(self.epoch, self.index)[0].tolist()
        substituted = sum(i in self._bad for i in files)
        # (B, 3, H, W) over the (B, H, W, 3) memory: normalize_uint8 reads it as is.
        return out["image"].permute(0, 3, 1, 2), out["label"].view(-1), new_bad, substituted

    def _diagnose(self, exc: Exception) -> list[tuple[str, str]]:
        """Find, with Pillow, the bad files behind a DALI failure; raise or mark them bad.

        An image of the wrong size found on the way raises its :class:`ImageSizeError`. When
        Pillow decodes every file, those DALI refuses for a reason Pillow ignores (a PNG chunk
        checksum) are routed through Pillow from then on instead.
        """
        found: list[tuple[int, BadImageError]] = []
        scanned: list[int] = []
        start = self._batch_number()
        for batch in range(start, start + self.prefetch_queue_depth + 2):  # + the read-ahead
            for i in _batch_files(self.folder, self.schedule, self._bad, batch)[0]:
                scanned.append(i)
                try:
                    decode_image(self.folder.path(i), self.resolution)
                except BadImageError as bad:
                    found.append((i, bad))
            if found:
                break
        if not found:
            refused = sorted(
                i for i in set(scanned) - self._via_pillow
                if not png_checksums_ok(Path(self.folder.path(i)).read_bytes())
            )  # fmt: skip
            if refused:
                for i in refused:
                    log.warning("%s: a PNG chunk checksum is wrong, which DALI refuses; decoding "
                                "it with Pillow instead", self.folder.path(i))  # fmt: skip
                self._via_pillow.update(refused)
                return []
            raise RuntimeError(
                f"DALI failed at epoch {self.epoch}, batch {self.index} and Pillow decodes every "
                f"file of that batch; try loader='portable'. DALI said: {exc}"
            ) from exc
        if self.on_error == "raise":
            raise BadImageError(f"{found[0][1]} (DALI failed on it)", found[0][1].path) from exc
        self._bad.update(i for i, _ in found)
        return [(self.folder.path(i), str(bad)) for i, bad in found]

    def __del__(self):
        if "_pool" in self.__dict__:  # not when __init__ failed early
            self.close()

    def close(self) -> None:
        """Drop the pipeline; the next batch builds a fresh one at the current position."""
        self._iterator = None
        if self._pipe is not None:
            # A DALI pipeline sits in reference cycles, so dropping it leaves it to the cyclic
            # garbage collector — which may first run in a process forked from this one (a
            # DataLoader worker) and tear down DALI's threads there: a crash. Stop it here.
            shutdown = getattr(self._pipe, "_shutdown", None)
            if shutdown is not None:
                shutdown()
            self._pipe = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
