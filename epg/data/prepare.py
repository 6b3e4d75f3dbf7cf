"""``epg prepare``: centre-crop a raw ImageNet-style tree to resolution² PNGs (epg-method.md §2).

Per image (ADM's ``center_crop_arr``, :func:`center_crop_arr`): decode with Pillow and convert to
RGB; while the short side is ≥ 2·resolution, halve both sides (integer division) with the BOX
filter; resize so the short side is ``resolution`` with BICUBIC, each side rounded
(``round(side · resolution / short)``, Python's round); crop the centre resolution² window at
floor((H − res)/2), floor((W − res)/2). Saved as PNG with ``compress_level=0`` at
``DST/<class>/<stem>.png``, the class folders and file stems of ``SRC`` kept.

A long run must survive a bad file and an interruption:

* an image that cannot be decoded is logged (logger ``epg.data``), skipped, and listed in
  ``DST/skipped.txt`` (``<path relative to SRC><TAB><reason>``; written on every run, empty when
  nothing was skipped);
* outputs are written to a hidden temporary name and renamed, so a killed run leaves no partial
  PNG under a real name; a rerun keeps every output that is a readable PNG of the right size and
  redoes the rest (and retries the skipped files);
* every class folder of ``SRC`` is created in ``DST``, even if all its images fail, so the labels
  (sorted class folders) of the prepared tree are those of the source; a class left empty then
  stops the training loaders with an error naming it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .folder import FolderIndex

log = logging.getLogger("epg.data")

SKIPPED_LIST = "skipped.txt"


def center_crop_arr(image, resolution: int) -> np.ndarray:
    """ADM's centre crop of a PIL image → uint8 numpy (resolution, resolution, channels).

    BOX halvings while the short side is ≥ 2·resolution, a BICUBIC resize to short side
    ``resolution`` (rounded sizes), then the centre window (floor offsets).
    """
    from PIL import Image

    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


@dataclass
class PrepareReport:
    """What a :func:`prepare` run did."""

    total: int  # images found in SRC
    written: int  # PNGs written by this run
    existing: int  # valid outputs kept from an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (SRC-relative path, reason)
    skipped_list: Path | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.total} images: {self.written} written, {self.existing} already prepared, "
            f"{len(self.failed)} skipped (listed in {self.skipped_list}) in {self.seconds:.1f} s"
        )


def _output_ok(path: str, resolution: int) -> bool:
    """An existing output counts if it is a complete RGB PNG of resolution² (chunk CRCs pass)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            ok = image.format == "PNG" and image.size == (resolution, resolution)
            ok = ok and image.mode == "RGB"
            image.verify()
        return ok
    except Exception:
        return False


def _prepare_one(task: tuple[str, str, str, int]) -> tuple[str, str, str]:
    """(status, relative source path, reason) for one image; status written|existing|failed."""
    from PIL import Image

    src, rel, out, resolution = task
    if os.path.exists(out) and _output_ok(out, resolution):
        return "existing", rel, ""
    try:
        with Image.open(src) as image:
            array = center_crop_arr(image.convert("RGB"), resolution)
    except Exception as exc:  # a bad input file, never a reason to stop the run
        return "failed", rel, f"{type(exc).__name__}: {exc}"
    # Write errors (disk full, permissions) are not the input's fault: they propagate.
    folder, name = os.path.split(out)
    tmp = os.path.join(folder, f".{name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=0)
    os.replace(tmp, out)
    return "written", rel, ""


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def prepare(
    src: str | os.PathLike | FolderIndex,
    dst: str | os.PathLike,
    resolution: int,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Centre-crop every image of ``src`` (``src/<class>/<image>``) into ``dst`` as PNG.

    Args:
        src: the raw tree (or a :class:`FolderIndex` of it; outputs go to the parent folder's
            name under ``dst``).
        dst: output root; must not be inside ``src`` nor contain it.
        resolution: output side (256 or 512 in the paper).
        workers: processes (None: all CPUs; 0 or 1: this process).
        progress: show a tqdm progress bar.
    Returns:
        a :class:`PrepareReport`; the skipped files are also in ``dst/skipped.txt``.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    scanned = not isinstance(src, FolderIndex)
    index = FolderIndex.scan(src, allow_empty_classes=True) if scanned else src
    dst = Path(dst)
    if index.root is not None and _nested(index.root.resolve(), dst.resolve()):
        raise ValueError(
            f"the output {dst} and the source {index.root} must not contain each other"
        )

    tasks, outputs = [], {}
    for i in range(len(index)):
        path = index.path(i)
        cls = os.path.basename(os.path.dirname(path))
        rel = index.relpath(i)
        out = os.path.join(dst, cls, os.path.splitext(os.path.basename(path))[0] + ".png")
        if out in outputs:
            raise ValueError(f"{outputs[out]} and {rel} would both be written to {out}")
        outputs[out] = rel
        tasks.append((path, rel, out, resolution))
    folders = {os.path.dirname(out) for out in outputs}
    if scanned:  # empty class folders too, so the prepared tree keeps the source's labels
        folders.update(os.path.join(dst, cls) for cls in index.classes)
    for folder in sorted(folders):
        os.makedirs(folder, exist_ok=True)

    counts = {"written": 0, "existing": 0}
    failed: list[tuple[str, str]] = []
    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(tasks), unit="img", desc=f"prepare {resolution}px", disable=not progress,
               mininterval=1.0, smoothing=0.05)  # fmt: skip
    pool, finished = None, False
    try:
        if workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers)
            chunk = max(1, min(64, len(tasks) // (workers * 16)))
            results = pool.imap_unordered(_prepare_one, tasks, chunksize=chunk)
        else:
            results = map(_prepare_one, tasks)
        for status, rel, reason in results:
            if status == "failed":
                failed.append((rel, reason))
                log.warning("prepare: skipping %s: %s", rel, reason)
                bar.set_postfix_str(f"{len(failed)} skipped", refresh=False)
            else:
                counts[status] += 1
            bar.update()
        finished = True
    finally:
        bar.close()
        if pool is not None:
            if finished:
                pool.close()
            else:
                pool.terminate()
            pool.join()

    failed.sort()
    listing = dst / SKIPPED_LIST
    tmp = dst / f".{SKIPPED_LIST}.tmp"
    tmp.write_text("".join(f"{rel}\t{reason}\n" for rel, reason in failed))
    os.replace(tmp, listing)
    return PrepareReport(len(tasks), counts["written"], counts["existing"], failed, listing,
                         time.perf_counter() - start)  # fmt: skip
