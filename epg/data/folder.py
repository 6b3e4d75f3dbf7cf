"""Image folders: the index of an ImageNet-style tree, the batch schedule, and shared decoding.

Layout (epg-method.md §2): ``root/<class>/<image>``, e.g. ``train/n01440764/n01440764_10026.png``.

* Classes are the sub-folders of ``root`` in sorted (code point) order, labelled 0..K−1 — the
  folder name, not the file-name prefix, so any naming inside a class folder works.
* Files inside a class folder are sorted by name; the index is the concatenation over classes,
  i.e. sorted by relative path. Hidden entries (names starting with ``.``) are ignored, and only
  image extensions count (:data:`IMAGE_EXTENSIONS`, any case: ``.JPEG`` is ImageNet's).
* A file list (:meth:`FolderIndex.from_file_list`) gives the files, and optionally labels, in its
  own order instead.

The schedule (:class:`BatchSchedule`) is the contract every loader here keeps, the same as
:class:`epg.data.loader.InMemoryLoader`: epoch e visits the samples in the order of
``randperm(N)`` from a generator seeded with ``seed·1_000_003 + e`` (the same permutation the
in-memory loader draws), and the horizontal flips of the epoch are ``rand(N) < flip_p`` drawn
next from that generator, one per position. Global batch i of the epoch is positions
[i·G, (i+1)·G) (the last partial batch is dropped), and rank r takes positions
[r·B, (r+1)·B) of it, B = G / world_size. The position (epoch, batch index) is all the state there
is, so a resumed run sees the same images, flips included, on any number of ranks that keeps G.

Image modes: every decoder here yields 8-bit RGB through :func:`to_rgb` — gray and palette images
expanded, alpha dropped, CMYK converted, 16-bit samples scaled (not clipped) to 8 bits.

Image size: the loaders read folders prepared at the training resolution (``epg prepare``, ADM's
resize and centre crop; epg-method.md §2), so every image must be exactly resolution² — the
reference's centre crop in the loader is then a no-op, and the loaders here do not crop at all.
An image of another size means the folder was prepared for another resolution (or not prepared):
centre-cropping a larger one would silently train on a zoomed-in part of every image, and a
smaller one cannot be used. Loaders raise :class:`ImageSizeError` naming the file, its size, the
expected size and the ``epg prepare --resolution`` command, at the first such file and whatever
``on_error`` says: a dataset of the wrong size is a configuration error, not a bad file.

Bad files: a file that Pillow cannot decode (truncated, corrupt, not an image) is "bad".
Loaders raise :class:`BadImageError` naming it by default; with ``on_error="skip"`` the slot is
filled by the next good file in index order (wrapping; deterministic, so every path and every
resume picks the same substitute, with its own label) and counted.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..seeding import torch_seed
from .augment import CONVENTIONS

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
# The bytes a whole file ends with: the PNG IEND chunk with its CRC, the JPEG end-of-image marker.
PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"
ON_ERROR = ("raise", "skip")
# File lists are UTF-8 whatever the locale, and a file name that is not valid UTF-8 (bytes a
# POSIX file system allows, which os.fsdecode keeps as surrogate escapes) is written and read
# back as its own bytes, so every name a folder scan finds survives a list.
LIST_TEXT = dict(encoding="utf-8", errors="surrogateescape")  # open()/read_text() keywords
# `epg prepare` writes INDEX_LIST beside its class folders, its first line "# PREPARE_HEADER
# <settings>"; the line "# UNFINISHED_PREPARE" stays in that header from the start of a run to
# its end, so a killed run leaves it, and a scan of the folder or a read of the list refuses it,
# as it refuses any other header line starting INCOMPLETE_PREPARE (a run that lost a class).
INDEX_LIST = "index.txt"
PREPARE_HEADER = "epg prepare:"
INCOMPLETE_PREPARE = "incomplete:"
UNFINISHED_PREPARE = f"{INCOMPLETE_PREPARE} the run has not finished"

log = logging.getLogger("epg.data")


class BadImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class ImageSizeError(ValueError):
    """An image that decodes but is not resolution²: the folder was prepared for another
    resolution. A configuration error, never skipped by ``on_error="skip"``.

    (One positional argument, the message, so a DataLoader worker can re-raise it as it is.)
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def check_size(path: str, width: int, height: int, resolution: int) -> None:
    """Raise :class:`ImageSizeError` unless the image is resolution × resolution."""
    if (width, height) != (resolution, resolution):
        raise ImageSizeError(
            f"image {path} is {width}×{height} pixels, but the loader expects images of exactly "
            f"{resolution}×{resolution} (the model's img_size): the folder was prepared for "
            f"another resolution or not prepared. Prepare the raw images at this resolution "
            f"with `epg prepare SRC DST --resolution {resolution}` and train on DST, or set the "
            "model's img_size to the data's resolution",
            path,
        )


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


class FolderIndex:
    """Files, integer labels and class names of an image folder tree or a file list.

    Paths are stored as one fixed-width numpy byte array (not a list of Python strings), so
    forked DataLoader workers share it without copy-on-write page copies at ImageNet scale.

    Attributes:
        root: the folder the relative paths hang from (None when the paths are absolute).
        labels: (N,) int64 numpy array, values in 0..num_classes−1.
        classes: class names; ``classes[label]`` is the folder name (or ``str(label)`` for a
            file list with explicit labels).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        root: str | os.PathLike | None = None,
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if len(paths) == 0:
            raise ValueError("an image index needs at least one file")
        self.root = Path(root) if root is not None else None
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= len(self.classes):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}, got {lo}..{hi}")

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"FolderIndex({len(self)} files, {self.num_classes} classes, root={self.root})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def relpath(self, i: int) -> str:
        """Path of file ``i`` as stored: relative to ``root``, or absolute."""
        return os.fsdecode(self._paths[i])

    def path(self, i: int) -> str:
        """Full path of file ``i``."""
        rel = self.relpath(i)
        return rel if self.root is None else os.path.join(self.root, rel)

    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]

    # --- constructors ---------------------------------------------------------------------------

    @classmethod
    def scan(
        cls,
        root: str | os.PathLike,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        allow_empty_classes: bool = False,
    ) -> FolderIndex:
        """Index ``root/<class>/<image>``: classes = sorted sub-folders, files sorted by name.

        Raises:
            FileNotFoundError / NotADirectoryError: ``root`` is missing or not a folder.
            ValueError: no class folders, no images at all, or (unless ``allow_empty_classes``)
                a class folder without images — which would otherwise shift no labels but train
                a class that never appears; or ``root`` is the output of an ``epg prepare`` run
                that has not finished (its ``index.txt`` says so).
        """
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"image folder {root} is not a folder")
        refuse_unfinished(root / INDEX_LIST)
        exts = tuple(e.lower() for e in extensions)

        def is_image(entry: os.DirEntry) -> bool:
            return (
                not entry.name.startswith(".")
                and entry.name.lower().endswith(exts)
                and entry.is_file()
            )

        with os.scandir(root) as it:
            entries = list(it)
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not classes:
            loose = sum(is_image(e) for e in entries)
            hint = f" ({loose} images lie directly in it)" if loose else ""
            raise ValueError(
                f"no class folders in {root}{hint}: expected the layout {root}/<class>/<image>"
            )
        paths, labels, empty = [], [], []
        for label, name in enumerate(classes):
            with os.scandir(root / name) as it:
                files = sorted(e.name for e in it if is_image(e))
            if not files:
                empty.append(name)
            paths.extend(f"{name}/{f}" for f in files)
            labels.extend([label] * len(files))
        if not paths:
            raise ValueError(
                f"no images ({', '.join(exts)}) in the {len(classes)} class folders of {root}: "
                f"expected the layout {root}/<class>/<image>"
            )
        if empty and not allow_empty_classes:
            shown = ", ".join(empty[:5]) + (", …" if len(empty) > 5 else "")
            raise ValueError(f"{len(empty)} class folder(s) of {root} hold no images: {shown}")
        return cls(paths, labels, classes, root)

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        root: str | os.PathLike | None = None,
    ) -> FolderIndex:
        """Index given files, in the given order.

        Without ``labels`` the class of a file is its parent folder's name, classes sorted →
        0..K−1 (as :meth:`scan`). With ``labels``, classes are ``"0" … str(max label)``.
        Relative paths are taken relative to ``root`` (the current folder when None).
        """
        paths = [os.fspath(p) for p in paths]
        if labels is None:
            names = [_class_folder(p) for p in paths]
            if any(not n for n in names):
                bad = next(p for p, n in zip(paths, names) if not n)
                raise ValueError(f"{bad!r} has no parent folder to take the class from")
            classes = sorted(set(names))
            lookup = {name: i for i, name in enumerate(classes)}
            labels = [lookup[n] for n in names]
        else:
            labels = [int(v) for v in labels]
            if labels and min(labels) < 0:
                raise ValueError(f"labels must be >= 0, got {min(labels)}")
            classes = [str(i) for i in range(max(labels, default=-1) + 1)]
        if root is None and any(not os.path.isabs(p) for p in paths):
            root = os.getcwd()
        return cls(paths, labels, classes, root)

    @classmethod
    def from_file_list(
        cls, list_file: str | os.PathLike, root: str | os.PathLike | None = None
    ) -> FolderIndex:
        """Index a text file with one ``path`` or ``path label`` per line (all lines alike).

        Relative paths are relative to ``root``, by default the list file's folder. Blank lines
        and lines starting with ``#`` are skipped. Existence is not checked here (at ImageNet
        scale that is a million stats); a missing file fails when loaded, naming it. The
        ``index.txt`` of an ``epg prepare`` run that has not finished is refused, as
        :meth:`scan` refuses its folder.
        """
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"file list {list_file} does not exist")
        refuse_unfinished(list_file)
        paths, labels, kinds, comments, numbers = [], [], set(), [], []
        text = list_file.read_text(**LIST_TEXT)
        if "\0" in text:  # a checkpoint, an archive or an image given as data_options.path
            raise ValueError(f"{list_file} is not a file list (a text file of image paths): it holds "
                             "NUL bytes, as a binary file does; give a folder of class folders or a list")  # fmt: skip
        # Lines end at \n, \r\n or \r (the text mode's newlines), not at the other breaks
        # str.splitlines() knows (\x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029): names may hold them.
        for number, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if line.startswith("#"):
                comments.append(line[1:].strip())
                continue
            if not line:
                continue
            numbers.append(number)
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                paths.append(parts[0])
                labels.append(int(parts[1]))
                kinds.add("labelled")
            else:
                paths.append(line)
                kinds.add("bare")
            if len(kinds) > 1:
                raise ValueError(
                    f"{list_file}:{number}: some lines carry a label and some do not; "
                    "give every file a label or none"
                )
        if not paths:  # its comments say why when `epg prepare` wrote it (an unfinished run)
            said = f" ({'; '.join(comments)})" if comments else ""
            raise ValueError(f"file list {list_file} names no files{said}")
        if kinds == {"bare"}:
            for number, path in zip(numbers, paths):
                if not _class_folder(path):
                    raise ValueError(f"{list_file}:{number}: {path!r} has no parent folder to take the "
                                     "class from; give it one (CLASS/FILE) or every line a label (FILE LABEL)")  # fmt: skip
        root = Path(root) if root is not None else list_file.parent.resolve()
        return cls.from_files(paths, labels if kinds == {"labelled"} else None, root)


def prepare_header(list_file: str | os.PathLike) -> list[str]:
    """The ``#`` header lines (without ``# ``) of an index list ``epg prepare`` wrote; [] for a
    missing or unreadable file or any other file. Reads the header only, not the whole list."""
    header = []
    try:
        with open(list_file, **LIST_TEXT) as f:
            for line in f:
                if not line.startswith("# "):
                    break
                header.append(line[2:].rstrip("\r\n"))
    except OSError:
        return []
    return header if header and header[0].startswith(PREPARE_HEADER) else []


def refuse_unfinished(list_file: Path) -> None:
    """Refuse the output of an `epg prepare` run that has not finished (it was killed, or still
    runs) or that could prepare no image of some class: images are missing, and training on it
    would go on without a word."""
    header = prepare_header(list_file)
    settings = header[0].removeprefix(PREPARE_HEADER).strip() if header else ""
    if UNFINISHED_PREPARE in header:
        raise ValueError(
            f"{list_file.parent} is an unfinished `epg prepare` output: its {list_file.name} says "
            f"the run ({settings}) has not finished, so images are missing. Rerun the same "
            "`epg prepare` command to finish it (the prepared images are kept), then train on it"
        )
    incomplete = [line for line in header[1:] if line.startswith(INCOMPLETE_PREPARE)]
    if incomplete:
        raise ValueError(
            f"{list_file.parent} is an incomplete `epg prepare` output: its {list_file.name} says "
            f"{incomplete[0]!r} (run {settings}). Fix or remove those images in the source, then "
            "rerun the same `epg prepare` command (the prepared images are kept)"
        )


def _class_folder(path: str) -> str:
    """The class name of a file given without a label: its parent folder's name ("" for none)."""
    return os.path.basename(os.path.dirname(os.path.normpath(path)))


def listable(relpath: str) -> bool:
    """Whether a path survives a file list: no line break, no blank at an end, no leading ``#``."""
    return (bool(relpath) and relpath == relpath.strip() and not relpath.startswith("#")
            and "\n" not in relpath and "\r" not in relpath)  # fmt: skip


def write_file_list(
    path: str | os.PathLike,
    relpaths: Sequence[str],
    labels: Sequence[int],
    header: Sequence[str] = (),
) -> None:
    """Write the labelled form :meth:`FolderIndex.from_file_list` reads: ``path label`` lines.

    ``relpaths`` should be relative to the list file's folder (the reader's default root);
    ``header`` lines are written first as ``# `` comments. Written to a hidden temporary file
    and renamed, so a reader never sees half a list.
    """
    path = Path(path)
    lines = [f"# {line}\n" for line in header]
    for rel, label in zip(relpaths, labels, strict=True):
        if not listable(rel):
            raise ValueError(f"{rel!r} cannot be written to a file list")
        lines.append(f"{rel} {int(label)}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(lines), **LIST_TEXT)
    os.replace(tmp, path)


def open_index(source: FolderIndex | str | os.PathLike, **scan_options) -> FolderIndex:
    """An index from an index, a folder (scanned) or a file list (a regular file)."""
    if isinstance(source, FolderIndex):
        return source
    source = Path(source)
    if source.is_file():
        return FolderIndex.from_file_list(source)
    return FolderIndex.scan(source, **scan_options)


# ---------------------------------------------------------------------------------------------
# Decoding (Pillow) shared by the portable loader and the DALI loader's error diagnosis
# ---------------------------------------------------------------------------------------------


def to_rgb(image) -> Any:
    """A Pillow image of any mode → 8-bit RGB (loads the pixels; errors propagate).

    * 8-bit modes: Pillow's ``convert("RGB")``: gray (``L``, ``1``) replicated, palettes (``P``)
      expanded, alpha (``LA``, ``PA``, ``RGBA``) dropped, not composited — as ADM's
      ``convert("RGB")`` and DALI's RGB output — and CMYK turned into RGB as
      (255 − C)·(255 − K)/255 (Pillow ≥ 10; inverted Adobe CMYK JPEGs are un-inverted on decode).
    * 16-bit gray (``I;16``, ``I;16B``, ``I;16L``, and ``I``, which Pillow uses for 16-bit
      PNGs too): Pillow's convert would clip every level above 255 to white, so the level v is
      scaled to ``v >> 8`` instead (the top byte, as libpng's strip-16 and Pillow's reading of
      16-bit RGB PNGs), then replicated. ``I`` values outside 0..65535 are clipped first.
    """
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))  # (H, W, 3) uint8: RGB
    return image.convert("RGB")


def decode_image(path: str, resolution: int) -> np.ndarray:
    """Decode with Pillow to RGB (:func:`to_rgb`) → uint8 (resolution, resolution, 3).

    EXIF orientation is ignored (as ADM's preparation and DALI with ``adjust_orientation=False``).
    Raises :class:`BadImageError` naming the file if it cannot be read or decoded (truncated or
    corrupt data, not an image), and :class:`ImageSizeError` if it decodes but is not
    resolution² (see the module docstring). The size is checked after decoding, so a file whose
    header is damaged is a bad file, not a size error.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = to_rgb(image)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, … on bad data
        raise BadImageError(f"cannot read image {path}: {exc}", path) from exc
    check_size(path, *rgb.size, resolution)
    return np.asarray(rgb)


def normalize_uint8(images: Tensor, convention: str | None) -> Tensor:
    """uint8 (B, C, H, W) → float32 in the convention (``None``: the uint8 images unchanged).

    x01 = u / 255, then ``"imagenet"``: (x01 − mean)/(2·std), ``"simple"``: 2·x01 − 1. Both
    loaders call this on the device batch, so their outputs agree bit for bit. The loaders'
    batches are channels-last in memory (the decoders' layout), which the op reads without a copy.
    """
    if convention is None:
        return images
    from .. import ops  # the fused op: one read of the uint8 batch, one write (CUDA kernel on GPU)

    return ops.normalize_images(images.permute(0, 2, 3, 1), convention)


# ---------------------------------------------------------------------------------------------
# The schedule and the position both loaders keep
# ---------------------------------------------------------------------------------------------


class BatchSchedule:
    """Which files, with which flips, a rank loads at each (epoch, batch index)."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        flip_p: float = 0.5,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by {world_size} ranks"
            )
        if global_batch_size > num_samples:
            raise ValueError(
                f"global batch size {global_batch_size} exceeds the dataset ({num_samples} samples)"
            )
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank, self.world_size, self.flip_p = rank, world_size, flip_p
        self.batches_per_epoch = num_samples // global_batch_size
        self.seed = seed

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = value
        self._recent: tuple[tuple[int, np.ndarray, np.ndarray], ...] = ()

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(file index per position (N,) int64, flip per position (N,) bool) of an epoch.

        The two epochs asked for last are kept: at an epoch boundary DALI's feeder thread reads
        ahead in the next epoch while the main thread still asks for the current one. The cache
        is read once and replaced whole, so a thread never returns an order another thread put
        in between (with one slot read twice, 1 of 3 runs of two threads asking 300k times each
        got the other epoch's order)."""
        recent = self._recent
        for entry in recent:
            if entry[0] == epoch:
                return entry[1], entry[2]
        g = torch.Generator().manual_seed(torch_seed(self.seed * 1_000_003 + epoch))
        order = torch.randperm(self.num_samples, generator=g)
        flips = torch.rand(self.num_samples, generator=g) < self.flip_p
        entry = (epoch, order.numpy(), flips.numpy())
        self._recent = (entry, *recent[:1])
        return entry[1], entry[2]

    def normalize(self, epoch: int, index: int) -> tuple[int, int]:
        """The position with the batch index folded into 0..batches_per_epoch−1."""
        return epoch + index // self.batches_per_epoch, index % self.batches_per_epoch

    def rows(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(file indices (B,), flips (B,)) of this rank's share of global batch ``index``."""
        epoch, index = self.normalize(epoch, index)
        order, flips = self.epoch_order(epoch)
        start = index * self.global_batch_size + self.rank * self.local_batch_size
        stop = start + self.local_batch_size
        return order[start:stop], flips[start:stop]


class ScheduledLoader:
    """The sizes and seed the Trainer reads of a loader, from its :class:`BatchSchedule`."""

    schedule: BatchSchedule

    @property
    def num_samples(self) -> int:
        return self.schedule.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return self.schedule.batches_per_epoch

    @property
    def global_batch_size(self) -> int:
        return self.schedule.global_batch_size

    @property
    def local_batch_size(self) -> int:
        return self.schedule.local_batch_size

    @property
    def seed(self) -> int:
        return self.schedule.seed


class FolderLoaderBase(ScheduledLoader, abc.ABC):
    """Position, state and bad-file bookkeeping shared by the folder loaders.

    Subclasses implement ``_fetch()`` → (uint8 (B, 3, H, W), int64 labels (B,), the bad files met
    in this batch as (path, message), number of substituted slots) for the current position, and
    ``close()``.
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
    ):
        if convention is not None and convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS} or None, got {convention!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.folder = open_index(source)
        self.schedule = BatchSchedule(
            len(self.folder), global_batch_size, rank, world_size, seed, flip_p
        )
        self.resolution = resolution
        self.convention = convention
        self.on_error = on_error
        self.device = torch.device(device)
        self.epoch, self.index = 0, 0
        self.skipped = 0  # slots filled by a substitute, over the consumed batches
        self.bad_files: set[str] = set()

    @property
    def num_classes(self) -> int:
        return self.folder.num_classes

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Tensor]:
        self.epoch, self.index = self.schedule.normalize(self.epoch, self.index)
        images, labels, bad, substituted = self._fetch()
        for path, message in bad:
            if path not in self.bad_files:
                self.bad_files.add(path)
                log.warning("%s; using the next good file instead (on_error='skip')", message)
        self.skipped += substituted
        self.index += 1
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return {"image": normalize_uint8(images, self.convention), "label": labels}

    @abc.abstractmethod
    def _fetch(self) -> tuple[Tensor, Tensor, list[tuple[str, str]], int]:
        """The batch at the current position (see the class docstring)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release worker processes / the DALI pipeline."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        epoch, index = self.schedule.normalize(self.epoch, self.index)
        return {"epoch": epoch, "index": index, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_samples": self.num_samples,
                "skipped": self.skipped}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("global_batch_size", self.global_batch_size),
                          ("num_samples", self.num_samples)):  # fmt: skip
            theirs = state.get(key, mine)
            if theirs != mine:
                raise ValueError(
                    f"cannot resume the data position: the checkpoint used {key} {theirs}, "
                    f"this run {mine}"
                )
        self.close()  # prefetched batches belong to the old position
        self.schedule.seed = state["seed"]
        self.epoch, self.index = self.schedule.normalize(state["epoch"], state["index"])
        self.skipped = state.get("skipped", 0)


def substitute(index: int, bad: set[int], num_samples: int) -> int:
    """The first file at or after ``index`` (index order, wrapping) that is not known bad."""
    for step in range(num_samples):
        j = (index + step) % num_samples
        if j not in bad:
            return j
    raise BadImageError(f"every one of the {num_samples} images of the index failed to decode")
