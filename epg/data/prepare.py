"""``epg prepare``: centre-crop a raw ImageNet-style tree to resolution² images (epg-method.md §2).

Per image (ADM's ``center_crop_arr``, :func:`center_crop_arr`): decode with Pillow and convert to
RGB (:func:`epg.data.folder.to_rgb`: gray, palette, alpha, CMYK and 16-bit inputs all become 8-bit
RGB); while the short side is ≥ 2·resolution, halve both sides (integer division) with the BOX
filter; resize so the short side is ``resolution`` with BICUBIC, each side rounded
(``round(side · resolution / short)``, Python's round); crop the centre resolution² window at
floor((H − res)/2), floor((W − res)/2). Saved at ``DST/<class>/<stem>.png`` (``.jpg``), the class
folders and file stems of ``SRC`` kept, in one of two formats:

* ``"png"`` (the default): lossless, ``compress_level=0`` — what the official runs trained on;
  about res²·3 bytes per image (197 kB at 256 px), decoded on host threads (also by DALI).
* ``"jpeg"`` at ``quality`` (default 95, Pillow's 4:2:0 chroma subsampling): lossy, about 5–10×
  smaller, and the format DALI's ``"mixed"`` decoder decodes on the GPU (nvJPEG), the fastest
  input for GPU training; the images differ from the PNGs by the compression error.

``DST/index.txt`` lists the prepared images as ``<class>/<file> <label>`` (label = the class
folder's position among the sorted source classes; the source index's labels when ``src`` is a
:class:`FolderIndex`), in index order, after a ``#`` header with the settings:
:meth:`FolderIndex.from_file_list` reads it back (the loaders accept its path as their source).

A long run must survive a bad file and an interruption:

* an image that cannot be decoded is logged (logger ``epg.data``), skipped, and listed in
  ``DST/skipped.txt`` (``<path relative to SRC><TAB><reason>``; written on every run, empty when
  nothing was skipped);
* the settings (format, quality, resolution) are recorded in the header of ``DST/index.txt`` at
  the start of a run; a later run into the same ``DST`` with other settings is refused (it would
  mix formats or sizes) instead of silently keeping outputs made differently;
* outputs are written to a hidden temporary name and renamed, so a killed run leaves no partial
  PNG under a real name; a rerun keeps every output that is a readable image of the right format and
  size and redoes the rest (and retries the skipped files);
* a run whose every image of some class fails still writes the rest, but then raises naming the
  class (see below), and its empty folder stays in ``DST``.

Classes: ``DST/index.txt`` and a folder scan of ``DST`` must give the same classes and labels, those
of the sorted source class folders. So a class without images — an empty source class folder,
or a label of a ``FolderIndex`` source that no file carries — is refused before anything is
written, and so is a ``FolderIndex`` whose labels are not the rank of each file's class folder
(what a scan of ``DST`` would give). A class whose images all fail leaves ``index.txt`` without
entries, its header saying why, so the loaders refuse it like the scan refuses the empty folder.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .folder import LIST_TEXT, FolderIndex, listable, to_rgb, write_file_list

log = logging.getLogger("epg.data")

SKIPPED_LIST = "skipped.txt"
INDEX_LIST = "index.txt"
FORMATS = {"png": ".png", "jpeg": ".jpg"}  # format → output extension


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
    written: int  # images written by this run
    existing: int  # valid outputs kept from an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (SRC-relative path, reason)
    skipped_list: Path | None = None
    seconds: float = 0.0
    index_list: Path | None = None  # DST/index.txt

    def __str__(self) -> str:
        return (
            f"{self.total} images: {self.written} written, {self.existing} already prepared, "
            f"{len(self.failed)} skipped (listed in {self.skipped_list}) in {self.seconds:.1f} s"
        )


def _output_ok(path: str, resolution: int, fmt: str) -> bool:
    """An existing output counts if it is a complete RGB image of resolution² in ``fmt``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            ok = image.format == fmt.upper() and image.size == (resolution, resolution)
            ok = ok and image.mode == "RGB"
            if fmt == "png":
                image.verify()  # chunk CRCs; cheap at compress_level 0
            else:
                image.load()  # JPEG has no checksums: decode it (a truncated file raises)
        return ok
    except Exception:
        return False


def _prepare_one(task: tuple[str, str, str, int, str, int]) -> tuple[str, str, str]:
    """(status, relative source path, reason) for one image; status written|existing|failed."""
    from PIL import Image

    src, rel, out, resolution, fmt, quality = task
    if os.path.exists(out) and _output_ok(out, resolution, fmt):
        return "existing", rel, ""
    try:
        with Image.open(src) as image:
            array = center_crop_arr(to_rgb(image), resolution)
    except Exception as exc:  # a bad input file, never a reason to stop the run
        return "failed", rel, f"{type(exc).__name__}: {exc}"
    # Write errors (disk full, permissions) are not the input's fault: they propagate.
    folder, name = os.path.split(out)
    tmp = os.path.join(folder, f".{name}.tmp")
    if fmt == "png":
        Image.fromarray(array).save(tmp, format="PNG", compress_level=0)
    else:
        Image.fromarray(array).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, out)
    return "written", rel, ""


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a batch job's or container's cpuset),
    not every CPU of the machine, which ``os.cpu_count()`` gives."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def _settings(fmt: str, quality: int, resolution: int) -> str:
    shown = f"quality={quality}" if fmt == "jpeg" else "lossless"
    return f"epg prepare: format={fmt} {shown} resolution={resolution}"


def _check_settings(listing: Path, settings: str) -> None:
    """Refuse to continue a DST prepared with other settings (its first line records them)."""
    if not listing.is_file():
        return
    with open(listing, **LIST_TEXT) as f:
        first = f.readline().strip()
    if first.startswith("# epg prepare:") and first != f"# {settings}":
        raise ValueError(
            f"{listing.parent} was prepared with other settings ({first[2:]}); this run asks "
            f"for {settings.removeprefix('epg prepare: ')}: use another output folder"
        )


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", …" if len(names) > 5 else "")


def _remove_stale_classes(dst: Path, classes: list[str], prepared_before: bool) -> None:
    """Remove empty sub-folders of ``dst`` that are not among ``classes`` when an earlier run
    prepared ``dst`` (its class folders, for a class since removed from the source), which a
    folder scan of ``dst`` would refuse; warn about the others (non-empty ones it would count as
    classes that ``index.txt`` lacks; empty ones in a folder no run made, which are not ours)."""
    keep = set(classes)
    with os.scandir(dst) as it:
        folders = [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
    for name in sorted(set(folders) - keep):
        if prepared_before:
            try:
                os.rmdir(dst / name)
                continue
            except OSError:  # not empty
                pass
        log.warning(
            "prepare: %s is not a class of the source; a folder scan of %s would count it (or "
            "refuse it when empty), %s does not: remove it", dst / name, dst, INDEX_LIST,
        )  # fmt: skip


def prepare(
    src: str | os.PathLike | FolderIndex,
    dst: str | os.PathLike,
    resolution: int,
    *,
    format: str = "png",
    quality: int = 95,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Centre-crop every image of ``src`` (``src/<class>/<image>``) into ``dst``, PNG or JPEG.

    Args:
        src: the raw tree (or a :class:`FolderIndex` of it; outputs go to the parent folder's
            name under ``dst``).
        dst: output root; must not be inside ``src`` nor contain it.
        resolution: output side (256 or 512 in the paper).
        format: ``"png"`` (lossless, what the paper trained on; the default) or ``"jpeg"``
            (5–10× smaller and what DALI decodes fastest, on the GPU; lossy). See the module
            docstring.
        quality: JPEG quality, 1–95 (Pillow's scale; ignored for PNG).
        workers: processes (None: the CPUs this process may run on; 0 or 1: this process).
        progress: show a tqdm progress bar.
    Returns:
        a :class:`PrepareReport`; the skipped files are also in ``dst/skipped.txt``, the
        prepared ones in ``dst/index.txt``.
    Raises:
        ValueError: bad settings, ``dst`` inside ``src`` (or around it), ``dst`` prepared
            earlier with other settings, a source without the ``src/<class>/<image>`` layout,
            a class without images or labels that are not the class folders' ranks (before
            anything is written), or a class none of whose images could be prepared (at the
            end; see the module docstring).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")
    if format == "jpeg" and not 1 <= quality <= 95:  # above 95 Pillow's docs advise against
        raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
    if workers is not None and workers < 0:  # it used to run in this process without a word
        raise ValueError(f"workers must be >= 0 (0 or 1: this process), got {workers}")
    scanned = not isinstance(src, FolderIndex)
    index = FolderIndex.scan(src, allow_empty_classes=True) if scanned else src
    # An empty class is an error rather than a warning: keeping it makes the output disagree with
    # itself (a folder scan of DST refuses the empty folder by name, while index.txt, which holds
    # labels only, gives one class fewer when the empty class sorts last and a class that never
    # appears otherwise), and dropping it would shift every later label away from the source's
    # sorted-class numbering. Refusing now loses nothing (nothing is written yet), and the fix is
    # plain. FolderIndex.scan(src) would refuse too; this message says what to do.
    per_class = np.bincount(index.labels, minlength=index.num_classes)
    empty = [index.classes[k] for k in np.flatnonzero(per_class == 0)]
    if empty:
        where = f"class folder(s) of {index.root}" if scanned else "class(es) of the index"
        raise ValueError(
            f"{len(empty)} {where} hold no images: {_shown(empty)}. The prepared classes must "
            "be the source's, so remove the empty class folder(s) or add images, then rerun"
        )
    dst = Path(dst)
    if index.root is not None and _nested(index.root.resolve(), dst.resolve()):
        raise ValueError(
            f"the output {dst} and the source {index.root} must not contain each other"
        )

    settings = _settings(format, quality, resolution)
    index_list = dst / INDEX_LIST
    _check_settings(index_list, settings)
    prepared_before = index_list.is_file()

    tasks, outputs, entries, unlisted, file_classes = [], {}, {}, [], []
    for i in range(len(index)):
        path = index.path(i)
        cls = os.path.basename(os.path.dirname(path))
        file_classes.append(cls)
        rel = index.relpath(i)
        name = os.path.splitext(os.path.basename(path))[0] + FORMATS[format]
        out = os.path.join(dst, cls, name)
        if out in outputs:
            raise ValueError(f"{outputs[out]} and {rel} would both be written to {out}")
        outputs[out] = rel
        if not listable(f"{cls}/{name}"):
            unlisted.append((rel, "its name cannot be written to index.txt (blanks at an end, "
                                  "a line break, or a leading #)"))  # fmt: skip
            continue
        entries[rel] = (cls, name, int(index.labels[i]))
        tasks.append((path, rel, out, resolution, format, quality))
    classes = sorted(set(file_classes))  # the class folders of DST, as a scan of it numbers them
    rank = {cls: label for label, cls in enumerate(classes)}
    scan_labels = np.array([rank[cls] for cls in file_classes], np.int64)
    wrong = np.flatnonzero(scan_labels != index.labels)  # only a FolderIndex with own labels
    if len(wrong):
        i = int(wrong[0])
        raise ValueError(
            f"{index.relpath(i)} has label {index.labels[i]}, but a folder scan of the prepared "
            f"tree would label its class folder {file_classes[i]!r} {scan_labels[i]} (sorted "
            "class folders → 0..K−1): prepare from the folder itself or a list without labels"
        )
    for cls in classes:
        os.makedirs(dst / cls, exist_ok=True)
    os.makedirs(dst, exist_ok=True)
    _remove_stale_classes(dst, classes, prepared_before)
    write_file_list(index_list, [], [], header=[settings, "incomplete: the run has not finished"])

    counts = {"written": 0, "existing": 0}
    failed: list[tuple[str, str]] = []
    for rel, reason in unlisted:
        failed.append((rel, reason))
        log.warning("prepare: skipping %s: %s", rel, reason)
    workers = usable_cpus() if workers is None else workers
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
    tmp.write_text("".join(f"{rel}\t{reason}\n" for rel, reason in failed),
                   **LIST_TEXT)  # names as the file system has them (see folder.py)
    os.replace(tmp, listing)
    failed_rels = {rel for rel, _ in failed}
    # Sorted by (class folder, output file name): the order FolderIndex.scan(dst) gives.
    done = sorted(v for rel, v in entries.items() if rel not in failed_rels)
    lost = sorted(set(classes) - {cls for cls, _, _ in done})
    if lost:  # index.txt stays without entries, so training from it fails as a scan of DST does
        why = f"incomplete: no image of the class folder(s) {_shown(lost)} could be prepared"
        write_file_list(index_list, [], [], header=[settings, f"{why} (see {SKIPPED_LIST})"])
        raise ValueError(
            f"no image of the class folder(s) {_shown(lost)} could be prepared (their files are "
            f"listed in {listing}), so {dst} lacks those classes: fix or remove them in the "
            f"source and rerun (the {len(done)} prepared images are kept)"
        )
    header = [settings, "<class>/<file> <label>; labels: sorted source classes"]
    write_file_list(index_list, [f"{cls}/{name}" for cls, name, _ in done],
                    [label for _, _, label in done], header)  # fmt: skip
    return PrepareReport(len(tasks) + len(unlisted), counts["written"], counts["existing"],
                         failed, listing, time.perf_counter() - start, index_list)  # fmt: skip
