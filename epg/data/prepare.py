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
* from its start to its end a run leaves ``index.txt`` with the header line
  :data:`~epg.data.folder.UNFINISHED_PREPARE`, and the entries of every output it may write: a
  folder scan of ``DST`` and a read of that list refuse an interrupted run's output (rerunning the
  command finishes it), and the next run knows which files are its own;
* a rerun removes the outputs an earlier run listed whose source is gone (a folder scan of
  ``DST`` would still train on them), and only those; ``DST`` must be new, empty or an earlier
  output (holding its ``index.txt``), so no other file is ever in the way;
* files the folder scan of ``SRC`` leaves out (other extensions, sub-folders of a class folder)
  are counted in the report, as are the images upscaled from a source smaller than resolution²;
* a run whose every image of some class fails still writes the rest, but then raises naming the
  class (see below); its empty folder stays in ``DST``, and ``index.txt`` keeps listing every
  output the run may have written (so a rerun knows its files), under a header that says which
  class was lost.

Classes: ``DST/index.txt`` and a folder scan of ``DST`` must give the same classes and labels, those
of the sorted source class folders. So a class without images — an empty source class folder,
or a label of a ``FolderIndex`` source that no file carries — is refused before anything is
written, and so is a ``FolderIndex`` whose labels are not the rank of each file's class folder
(what a scan of ``DST`` would give). A class whose images all fail leaves that header in
``index.txt``, so the loaders and a scan of ``DST`` refuse it, as they refuse an unfinished run.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .folder import (
    IMAGE_EXTENSIONS,
    INCOMPLETE_PREPARE,
    INDEX_LIST,
    LIST_TEXT,
    PREPARE_HEADER,
    UNFINISHED_PREPARE,
    FolderIndex,
    listable,
    prepare_header,
    to_rgb,
    write_file_list,
)

log = logging.getLogger("epg.data")

SKIPPED_LIST = "skipped.txt"
FORMATS = {"png": ".png", "jpeg": ".jpg"}  # format → output extension


def center_crop_arr(image, resolution: int) -> np.ndarray:
    """ADM's centre crop of a PIL image → numpy (resolution, resolution, channels), or
    (resolution, resolution) for a one-band image (``L``, ``I``...), in the image's own dtype
    (uint8 for 8-bit modes); :func:`prepare` gives it RGB, so (resolution, resolution, 3) uint8.

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
    upscaled: int = 0  # of the written images, those whose source's short side was < resolution
    removed: int = 0  # outputs of an earlier run whose source is gone, removed from DST
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (SRC-relative path, reason)

    def __str__(self) -> str:
        upscaled = f" ({self.upscaled} upscaled from a smaller source)" if self.upscaled else ""
        lines = [
            f"{self.total} images: {self.written} written{upscaled}, {self.existing} already "
            f"prepared, {len(self.failed)} skipped (listed in {self.skipped_list}) in "
            f"{self.seconds:.1f} s"
        ]
        if self.removed:
            lines.append(f"{self.removed} output(s) of an earlier run removed: their source is "
                         "gone, and a folder scan would still train on them")  # fmt: skip
        if self.ignored:
            reasons: dict[str, list[str]] = {}
            for rel, reason in self.ignored:
                reasons.setdefault(reason, []).append(rel)
            shown = ", ".join(f"{len(rels)} {reason} (first: {rels[0]})"
                              for reason, rels in reasons.items())  # fmt: skip
            lines.append(f"{len(self.ignored)} files ignored: {shown}")
        return "\n".join(lines)


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


@contextlib.contextmanager
def _writing(path: str | os.PathLike):
    """Name ``path`` in a write error that names no file: a full disk's (errno 28) comes from a
    write, not an open, and reached the user as a bare "No space left on device"."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc}: cannot write {path}") from exc


def _prepare_one(task: tuple[str, str, str, int, str, int]) -> tuple[str, str, str, bool]:
    """(status, relative source path, reason, upscaled) for one image; status
    written|existing|failed, upscaled whether the source's short side was below resolution."""
    from PIL import Image

    src, rel, out, resolution, fmt, quality = task
    if os.path.exists(out) and _output_ok(out, resolution, fmt):
        return "existing", rel, "", False
    try:
        with Image.open(src) as image:
            upscaled = min(image.size) < resolution
            array = center_crop_arr(to_rgb(image), resolution)
    except Exception as exc:  # a bad input file, never a reason to stop the run
        return "failed", rel, f"{type(exc).__name__}: {exc}", False
    # Write errors (disk full, permissions) are not the input's fault: they propagate.
    folder, name = os.path.split(out)
    tmp = os.path.join(folder, f".{name}.tmp")
    with _writing(out):
        if fmt == "png":
            Image.fromarray(array).save(tmp, format="PNG", compress_level=0)
        else:
            Image.fromarray(array).save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, out)
    return "written", rel, "", upscaled


def _ignore_interrupts() -> None:
    # Ctrl-C goes to the whole process group: the parent alone stops the run (and terminates
    # the pool), where every worker would print a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def _check_dst(dst: Path, header: list[str], settings: str) -> None:
    """Refuse a DST prepared with other settings (the first line of its index list records
    them), and one holding files that no run of ``epg prepare`` wrote (its index list absent)."""
    if header and header[0] != settings:
        raise ValueError(
            f"{dst} was prepared with other settings ({header[0]}); this run asks "
            f"for {settings.removeprefix(PREPARE_HEADER).strip()}: use another output folder"
        )
    if not header and dst.is_dir():
        with os.scandir(dst) as it:
            names = sorted(e.name for e in it)
        if names:  # the class folders and index.txt would land among the user's files
            raise ValueError(
                f"{dst} exists, is not empty and is not an earlier `epg prepare` output (it "
                f"holds {_shown(names)}, and no {INDEX_LIST} of epg prepare): use a new or "
                "empty folder"
            )


def _listed(listing: Path) -> dict[str, int]:
    """The ``path label`` entries of an index list, finished or not (its header aside)."""
    entries = {}
    with open(listing, **LIST_TEXT) as f:
        text = f.read()
    for line in text.split("\n"):  # as FolderIndex.from_file_list splits: names may hold breaks
        parts = line.strip().rsplit(None, 1)
        if len(parts) == 2 and not parts[0].startswith("#") and parts[1].lstrip("-").isdigit():
            entries[parts[0]] = int(parts[1])
    return entries


def _own_output(rel: str, ext: str) -> bool:
    """Whether an index entry has the form of an output of this format: ``<class>/<stem><ext>``,
    nothing hidden, nothing outside DST (the entries of an edited list may not)."""
    parts = rel.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and rel.endswith(ext)


def _ignored_files(root: Path, classes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path relative to ``root``, reason) of each file a folder scan of ``root`` leaves out,
    hidden ones aside: other extensions, files in sub-folders of a class folder, files beside
    the class folders."""
    exts = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    other = "not " + "/".join(IMAGE_EXTENSIONS)
    ignored = []
    with os.scandir(root) as it:
        ignored += [(e.name, "outside the class folders") for e in it
                    if not e.name.startswith(".") and not e.is_dir()]  # fmt: skip
    for cls in classes:
        with os.scandir(root / cls) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        for entry in entries:
            if entry.is_dir():
                for folder, dirs, files in os.walk(entry.path):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    base = Path(folder).relative_to(root).as_posix()
                    ignored += [(f"{base}/{f}", "in a sub-folder") for f in files
                                if not f.startswith(".")]  # fmt: skip
            elif not entry.name.lower().endswith(exts):
                ignored.append((f"{cls}/{entry.name}", other))
            elif not entry.is_file():  # a broken link, a pipe
                ignored.append((f"{cls}/{entry.name}", "not a file"))
    return sorted(ignored)


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", …" if len(names) > 5 else "")


def _remove_stale_classes(dst: Path, classes: list[str]) -> None:
    """Remove empty sub-folders of ``dst`` that are not among ``classes`` (the class folders an
    earlier run made, for a class since removed from the source), which a folder scan of ``dst``
    would refuse; warn about non-empty ones, which it would count as classes ``index.txt`` lacks.
    (``dst`` was new or empty, or an earlier run's output: it holds nothing else of the user's.)"""
    keep = set(classes)
    with os.scandir(dst) as it:
        folders = [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
    for name in sorted(set(folders) - keep):
        try:
            os.rmdir(dst / name)
            continue
        except OSError:  # not empty
            pass
        log.warning(
            "prepare: %s is not a class of the source; a folder scan of %s would count it as "
            "one, %s does not: remove it", dst / name, dst, INDEX_LIST,
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
            earlier with other settings, ``dst`` a non-empty folder that is not an earlier
            output (it lacks the ``index.txt`` of ``epg prepare``), a source without the
            ``src/<class>/<image>`` layout, a class without images or labels that are not the
            class folders' ranks (before anything is written), or a class none of whose images
            could be prepared (at the end; see the module docstring).
        OSError: an output that cannot be written (a full disk...), named in the message.
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
    found = prepare_header(index_list)
    _check_dst(dst, found, settings)

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
    ignored = _ignored_files(index.root, index.classes) if scanned else []
    planned = {f"{cls}/{name}": label for cls, name, label in entries.values()}
    ext = FORMATS[format]
    earlier = _listed(index_list) if found else {}
    gone = sorted(rel for rel in earlier if rel not in planned and _own_output(rel, ext))
    os.makedirs(dst, exist_ok=True)
    # Until the run ends, index.txt lists every output it may write and those earlier runs wrote
    # whose source is gone: a run killed at any point leaves DST refused for training (the
    # header) and tells the next run which files are its own to remove.
    tracked = {**{rel: earlier[rel] for rel in gone}, **planned}
    with _writing(index_list):
        write_file_list(index_list, list(tracked), list(tracked.values()),
                        header=[settings, UNFINISHED_PREPARE])  # fmt: skip
    removed = 0
    for rel in gone:  # a folder scan of DST would train on them, index.txt would not
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst / rel)
            removed += 1
    for cls in classes:
        os.makedirs(dst / cls, exist_ok=True)
    _remove_stale_classes(dst, classes)

    counts = {"written": 0, "existing": 0, "upscaled": 0}
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
            pool = multiprocessing.get_context(method).Pool(workers, _ignore_interrupts)
            chunk = max(1, min(64, len(tasks) // (workers * 16)))
            results = pool.imap_unordered(_prepare_one, tasks, chunksize=chunk)
        else:
            results = map(_prepare_one, tasks)
        for status, rel, reason, upscaled in results:
            if status == "failed":
                failed.append((rel, reason))
                log.warning("prepare: skipping %s: %s", rel, reason)
                bar.set_postfix_str(f"{len(failed)} skipped", refresh=False)
            else:
                counts[status] += 1
                counts["upscaled"] += upscaled
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
    with _writing(listing):
        tmp.write_text("".join(f"{rel}\t{reason}\n" for rel, reason in failed),
                       **LIST_TEXT)  # names as the file system has them (see folder.py)
        os.replace(tmp, listing)
    failed_rels = {rel for rel, _ in failed}
    # Sorted by (class folder, output file name): the order FolderIndex.scan(dst) gives.
    done = sorted(v for rel, v in entries.items() if rel not in failed_rels)
    lost = sorted(set(classes) - {cls for cls, _, _ in done})
    if lost:  # training refuses the header; the entries stay those the run tracked
        why = f"{INCOMPLETE_PREPARE} no image of the class folder(s) {_shown(lost)} could be prepared"
        with _writing(index_list):
            write_file_list(index_list, list(tracked), list(tracked.values()),
                            header=[settings, f"{why} (see {SKIPPED_LIST})"])  # fmt: skip
        raise ValueError(
            f"no image of the class folder(s) {_shown(lost)} could be prepared (their files are "
            f"listed in {listing}), so {dst} lacks those classes: fix or remove them in the "
            f"source and rerun (the {len(done)} prepared images are kept)"
        )
    header = [settings, "<class>/<file> <label>; labels: sorted source classes"]
    with _writing(index_list):
        write_file_list(index_list, [f"{cls}/{name}" for cls, name, _ in done],
                        [label for _, _, label in done], header)  # fmt: skip
    return PrepareReport(len(tasks) + len(unlisted), counts["written"], counts["existing"],
                         failed, listing, time.perf_counter() - start, index_list,
                         counts["upscaled"], removed, ignored)  # fmt: skip
