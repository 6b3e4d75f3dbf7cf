"""Sampling to disk (``epg sample``): PNG files, an ADM-layout ``.npz`` and a preview grid.

The images of a run are numbered 0..N−1. Image i gets class label ``labels[i]`` (class-balanced:
``i mod K``, as the released 256-px script; or i.i.d. from the run's seed) and its noise from the
generator seeded by (seed, i) (:func:`epg.sampling.image_generators`), so every image is the same
whatever the batch size, the number of processes or how often the run was interrupted (up to the
float rounding of matrix products, which varies with the batch shape: on CPU a few pixels in ten
thousand move by one 8-bit level).

Layout of the output folder::

    settings.json     what the images were sampled with; a resumed run must match it
    images/000123.png one PNG per image (x01 = x·2·std + mean, rounded as floor(x01·255 + 0.5))
    samples.npz       arr_0: (N, H, W, C) uint8 in index order (ADM evaluator layout), arr_1: labels
    preview.png       a grid of the first images
    summary.json      network passes per image, images/s, wall time (a rerun that finds every
                      image there keeps those of the run that sampled, marked "measured_by")

Under torchrun each rank samples the contiguous index range ``[r·N/W, (r+1)·N/W)`` and writes
its PNGs; rank 0 then reads all of them back into the ``.npz``, so the archive holds exactly the
pixels of the PNGs. A PNG is written to a temporary name and renamed, so an interrupted run
leaves only whole files, and a rerun skips the images whose PNG exists and decodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import sampling
from .checkpoint import atomic_write
from .data.augment import CONVENTIONS
from .data.embedded import make_grid_png, to_uint8
from .models import Denoiser
from .models.networks import EPGViT
from .schedules import resolution_shift

SETTINGS_NAME = "settings.json"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
PREVIEW_NAME = "preview.png"
SUMMARY_NAME = "summary.json"

# Guidance scales of the released sampling scripts (epg-method.md §8); other models: none known.
GUIDANCE_SCALES = {"epg-xl-16": 2.5, "epg-l-32": 3.2}
# The released networks of these configs are consistency models (§10.1: EPG-L/16 at 256 px is
# released as the one-step CM only); other released stage-2 files are diffusion models.
RELEASED_CONSISTENCY_CONFIGS = {"epg-l-16"}
MODES = {"diffusion": "x0", "consistency": "edm"}


@dataclass
class SampleSettings:
    """Everything that decides the pixels of image i (and so must match on resume)."""

    num_images: int = 50_000
    mode: str = "diffusion"  # "diffusion" (x0 output) or "consistency" (EDM output)
    sampler: str = "heun"
    steps: int = 32
    guidance: float = 1.0
    guidance_interval: tuple[float, float] = (sampling.GUIDANCE_SIGMA_LOW, sampling.GUIDANCE_SIGMA_HIGH)
    trailing_zero: bool = False
    clamp: bool = True
    labels: str = "balanced"  # "balanced" | "random" | "none" (unconditional)
    # With labels="random": per-class training image counts; labels are drawn from these
    # frequencies, as the released sampler does without balanced sampling (§8). None: uniform.
    class_counts: tuple[int, ...] | None = None
    seed: int = 0
    convention: str = "imagenet"
    precision: str = "fp32"  # "fp32" | "bf16" (autocast around the network)
    model: str = ""  # where the weights came from, for the record
    # sha256 of the weights file: the same path holding other weights (a re-exported final/)
    # must not resume into images sampled from the old ones.
    weights: str = ""

    def validate(self) -> None:
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {self.num_images!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {sorted(sampling.SAMPLERS)}")
        if self.labels not in ("balanced", "random", "none"):
            raise ValueError(f"labels must be 'balanced', 'random' or 'none', got {self.labels!r}")
        if self.class_counts is not None:
            if self.labels != "random":
                raise ValueError(f"class_counts is only used with labels='random', not {self.labels!r}")
            # Their values are checked where the labels are drawn (sampling.class_labels).
            if any(not isinstance(c, int) or isinstance(c, bool) for c in self.class_counts):
                raise ValueError("class_counts must be ints, images per class")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be finite and >= 0 (0 or 1: no guidance), got {self.guidance!r}")
        low, high = self.guidance_interval
        if not 0 <= low < high:
            raise ValueError(f"guidance interval needs 0 <= low < high, got {self.guidance_interval}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["guidance_interval"] = [float(v) for v in self.guidance_interval]
        if self.class_counts is not None:
            d["class_counts"] = list(self.class_counts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleSettings:
        d = dict(d)
        d["guidance_interval"] = tuple(d["guidance_interval"])
        if d.get("class_counts") is not None:
            d["class_counts"] = tuple(d["class_counts"])
        return cls(**d)


# --------------------------------------------------------------------------------------------------
# Loading a network to sample from
# --------------------------------------------------------------------------------------------------


def load_network(
    checkpoint: str | os.PathLike | None = None,
    official: str | os.PathLike | None = None,
    config: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[EPGViT, dict[str, Any]]:
    """The stage-2 network to sample from, and what is known about it.

    ``checkpoint``: an epg checkpoint folder (``config.json`` + weights, as ``Trainer.export``
    writes) or a training run folder holding ``final/``. ``official`` + ``config``: a released
    ``.pth`` file or folder (``nnet_ema.pth`` preferred) loaded unchanged into ``config``.
    Returns (network in eval mode, info) with info keys "config" (name or None), "mode" and
    "convention" when the checkpoint recorded them, and "source". A released file's mode is
    that of the released network of its config (consistency for epg-l-16, else diffusion); one
    without a class embedding is unconditional, with the "simple" convention and a "note" that
    says so (see :func:`epg.checkpoint.load_official`).
    """
    if (checkpoint is None) == (official is None):
        raise ValueError("give either an epg checkpoint folder or --official PATH (with --config)")
    if config and official is None:  # an epg checkpoint carries its config; this one was ignored
        raise ValueError(f"--config {config} goes with --official (a released file); an epg "
                         "checkpoint folder records its own config")
    if official is not None:
        if not config:
            raise ValueError("--official needs --config NAME (e.g. epg-xl-16), the released files "
                             "hold weights only")
        net = ckpt.load_official(official, config, device=device)
        weights_file = ckpt.official_file(official)
        info = {"config": config, "source": f"official:{Path(official).resolve()}", "convention": "imagenet",
                "mode": "consistency" if config in RELEASED_CONSISTENCY_CONFIGS else "diffusion",
                "weights": ckpt.weights_digest(weights_file)}
        if getattr(net.config, "num_classes", None) == 0:  # no class_embed.weight in the file
            # The official unconditional config (the consistency one of commit 21c2ca2) also
            # sets no normalisation statistics: "simple" [-1, 1] (epg-method.md §12).
            info["convention"] = "simple"
            info["note"] = (f"{weights_file.name} has no {ckpt.CLASS_EMBED_KEY}: an "
                            "unconditional network, sampled with the 'simple' [-1, 1] normalisation "
                            "of the official unconditional config (--convention imagenet to change)")
    else:
        folder = _checkpoint_path(Path(checkpoint))
        # The recorded mode decides before the weights are read: a stage-1 folder is refused
        # without loading it.
        directory = folder if folder.is_dir() else folder.parent
        _, meta = ckpt.read_config(directory)
        # Absolute: settings.json records it, and a rerun from another folder (or with the
        # other spelling of the path) is the same run.
        info = {"config": _trained_config_name(directory, meta), "source": str(folder.resolve())}
        if meta.get("mode") in MODES:
            info["mode"] = meta["mode"]
        elif meta.get("mode") == "pretrain":
            raise ValueError(f"{folder} holds a stage-1 encoder (pre-training); sampling needs a "
                             "fine-tuned (diffusion or consistency) network")
        if meta.get("convention") in CONVENTIONS:
            info["convention"] = meta["convention"]
        net = ckpt.load(folder, device=device)
        info["weights"] = ckpt.checked_weights_digest(folder)
    if not isinstance(net, EPGViT):
        raise ValueError(f"{info['source']} is a {type(net).__name__}; sampling needs an EPGViT "
                         "(a stage-2 diffusion or consistency network)")
    return net.eval().requires_grad_(False), info


def _trained_config_name(directory: Path, meta: dict[str, Any]) -> str | None:
    """The config name an epg checkpoint was trained from (it picks the default guidance):
    recorded by ``Trainer.export``; for folders exported before it was, the run's
    ``train_config.json`` next to ``final/``."""
    if isinstance(meta.get("model"), str):
        return meta["model"]
    if directory.name == ckpt.RUN_FINAL_NAME:
        name = _run_config(directory.parent).get("model")
        if isinstance(name, str):
            return name
    return None


def _run_config(run: Path) -> dict[str, Any]:
    """A training run folder's ``train_config.json``; empty when absent or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((run / ckpt.RUN_CONFIG_NAME).read_text())
        if isinstance(config, dict):
            return config
    return {}


def _checkpoint_path(path: Path) -> Path:
    """The epg checkpoint that ``path`` names: a checkpoint folder or its ``.safetensors`` file as
    given, a training run folder's ``final/``; anything else is an error naming ``path``."""
    run = (ckpt.run_folder_of(path) if path.is_file() else None) or path
    if run.is_dir() and not (run / ckpt.CONFIG_NAME).is_file() and _run_config(run).get("mode") == "pretrain":
        # Before run_output, whose advice for an unfinished run (`epg export`) leads to a folder
        # that would be refused here too.
        raise ValueError(f"{path} is a stage-1 (pre-training) run; sampling needs a fine-tuned "
                         "(diffusion or consistency) network")
    path = ckpt.run_output(path)
    official = "a released .pth file samples with --official PATH --config NAME"
    if path.is_file():
        if path.suffix == ".safetensors":
            return path
        if path.suffix == ".pt":  # what the Trainer writes
            official = f"`epg export {path}` writes the network of a training checkpoint as a folder to sample"
        raise NotADirectoryError(f"{path} is a file, not an epg checkpoint folder ({official})")
    if (path / ckpt.CONFIG_NAME).is_file():
        return path
    hint = f" ({official})" if any(path.glob("*.pth")) else ""
    raise FileNotFoundError(
        f"{path} is neither an epg checkpoint folder (it has no {ckpt.CONFIG_NAME}) nor a training "
        f"run folder (it has no final/){hint}"
    )


# --------------------------------------------------------------------------------------------------
# The denoiser as sampled
# --------------------------------------------------------------------------------------------------


class PassCounter:
    """Counts the network's forward passes and the images that went through them."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.images = 0

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return self.fn(x, sigma, y)


def make_denoiser(
    net: EPGViT,
    mode: str,
    precision: str = "fp32",
    compile: bool = False,
    cuda_graph: bool = False,
):
    """``denoiser(x, sigma, y) -> x0_hat`` in float32 around ``net``.

    precision "bf16" runs the network under bf16 autocast (the sampler state stays float32);
    ``compile`` wraps the network in ``torch.compile``; ``cuda_graph`` captures the denoiser in a
    CUDA graph per input shape (:class:`epg.sampling.CUDAGraphDenoiser`; CUDA only).
    """
    if compile:
        net = torch.compile(net, dynamic=False)
    denoiser = Denoiser(net, mode=MODES[mode])

    def run(x: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        autocast = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            return denoiser(x, sigma, y).float()

    if cuda_graph:
        _check_cuda_graph_device(net)
        return sampling.CUDAGraphDenoiser(run)
    return run


def _check_cuda_graph_device(net: EPGViT) -> None:
    device = next(net.parameters()).device
    if device.type != "cuda":  # checked up front, not at the first batch: before a folder is touched
        raise ValueError(f"CUDA graphs need a network on a CUDA device, got {device}; sample "
                         "without --cuda-graph")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def image_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / IMAGES_DIR / f"{index:06d}.png"


def _read_png(path: Path) -> np.ndarray | None:
    """The PNG's pixels as (H, W, C) uint8, or None when it is missing, does not decode or is not
    8-bit (not one this sampler wrote: resampled, never written into the uint8 archive)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if arr.dtype != np.uint8:
        return None
    return arr[..., None] if arr.ndim == 2 else arr


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    # Temporary name + rename, so a killed run leaves no partial PNG under the final name. No
    # fsync per image (50k of them): a file lost to a power cut fails to decode and is resampled.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def check_resume(out_dir: str | os.PathLike, settings: SampleSettings, overwrite: bool) -> str | None:
    """Refuse to sample into a folder that holds a run with other settings (unless
    ``overwrite``). The same weights (sha256) read from another path count as the same model:
    the returned note says so (None otherwise)."""
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS_NAME
    note = None
    if path.is_file() and not overwrite:
        restart = ("--overwrite discards this folder's samples and starts over (removing only the "
                   "settings would let a rerun take the old images for its own)")  # fmt: skip
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is corrupt ({exc}); {restart}") from exc
        if not isinstance(saved, dict):
            raise ValueError(f"{path} is corrupt (a JSON {type(saved).__name__}, not an object); {restart}")
        mine = settings.to_dict()
        recorded_weights = saved.get("weights")
        saved.setdefault("weights", mine["weights"])  # not recorded before: nothing to compare
        if isinstance(saved.get("model"), str) and _same_source(saved["model"], mine["model"]):
            saved["model"] = mine["model"]
        elif saved.get("model") != mine["model"] and mine["weights"] and recorded_weights == mine["weights"]:
            note = (f"{out_dir} was sampled from the same weights ({mine['weights'][:19]}…) at "
                    f"{saved.get('model')}; they are read from {mine['model']} now")
            saved["model"] = mine["model"]
        different = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if different:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} now" for k in different)
            raise ValueError(
                f"{out_dir} belongs to a sampling run with other settings ({detail}); use "
                "another output folder, or --overwrite to discard what it sampled"
            )
    return note


def _same_source(saved: str, now: str) -> bool:
    """Whether a recorded weights path names ``now`` (absolute): earlier versions recorded the
    path as given, relative to the folder the command ran in."""
    prefix = "official:" if now.startswith("official:") else ""
    if not saved.startswith(prefix):
        return False
    return Path(saved[len(prefix):]).resolve() == Path(now[len(prefix):])


def _discard_samples(out_dir: Path) -> None:
    """Remove what an earlier run sampled (its settings first), before the new settings are
    written: an interrupted ``--overwrite`` run must not leave old images that a rerun would
    take for its own."""
    (out_dir / SETTINGS_NAME).unlink(missing_ok=True)
    for name in (NPZ_NAME, PREVIEW_NAME, SUMMARY_NAME):
        (out_dir / name).unlink(missing_ok=True)
    images = out_dir / IMAGES_DIR
    if images.is_dir():
        for path in images.iterdir():
            # Images, and the temporary files of writes a killed run left (".000012.png.<pid>.tmp").
            if (path.suffix == ".png" and path.stem.isdigit()) or (
                path.name.startswith(".") and path.name.endswith(".tmp")
            ):
                path.unlink()


def _shard(n: int, rank: int, world_size: int) -> range:
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def training_class_counts(source: str | os.PathLike) -> tuple[int, ...]:
    """Images per class of a training set: an image folder ``root/<class>/<image>`` (classes in
    sorted order, as training labels them) or a file list; for ``SampleSettings.class_counts``."""
    from .data.folder import open_index

    index = open_index(source, allow_empty_classes=True)
    return tuple(int(c) for c in np.bincount(index.labels, minlength=index.num_classes))


def labels_for(settings: SampleSettings, num_classes: int) -> Tensor | None:
    """The label of every image 0..N−1 (None when unconditional)."""
    if settings.labels == "none":
        return None
    if num_classes < 1:
        raise ValueError("this network is unconditional (num_classes 0): use labels='none'")
    counts = settings.class_counts
    if counts is not None and len(counts) != num_classes:
        raise ValueError(f"class_counts gives {len(counts)} classes; this network has {num_classes}")
    return sampling.class_labels(
        settings.num_images, num_classes, balanced=settings.labels == "balanced", seed=settings.seed,
        class_counts=counts,
    )  # fmt: skip


def write_npz(
    out_dir: str | os.PathLike, num_images: int, labels: Tensor | None, progress: bool = True
) -> Path:
    """Read images 0..N−1 back from their PNGs into ``samples.npz`` (arr_0 NHWC uint8, arr_1).

    The file is what ``np.savez`` writes, but streamed one image at a time: the whole arr_0 is
    N·H·W·C bytes (9.8 GB for 50k images at 256 px, 39 GB at 512 px).
    """
    out_dir = Path(out_dir)
    first = _read_png(image_path(out_dir, 0))
    if first is None:
        raise FileNotFoundError(f"{image_path(out_dir, 0)} is missing or corrupt")
    header = {"descr": "|u1", "fortran_order": False, "shape": (num_images, *first.shape)}
    path = out_dir / NPZ_NAME

    def save(tmp: str) -> None:
        # np.savez's layout: uncompressed members arr_0.npy, arr_1.npy, zip64 for > 4 GiB.
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for i in tqdm(range(num_images), desc="npz", unit="img", disable=not progress,
                              leave=False):  # fmt: skip
                    pixels = first if i == 0 else _read_png(image_path(out_dir, i))
                    if pixels is None or pixels.shape != first.shape:
                        raise ValueError(
                            f"{image_path(out_dir, i)} is missing, corrupt or of another size"
                        )
                    f.write(np.ascontiguousarray(pixels).tobytes())
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, labels.numpy().astype(np.int64))

    atomic_write(path, save)
    return path


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _read_summary(path: Path) -> dict[str, Any]:
    """An earlier run's summary.json, or {} when there is none that reads."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def check_sampling(net: EPGViT, settings: SampleSettings, *, batch_size: int = 100,
                   cuda_graph: bool = False) -> None:
    """Refuse settings that cannot sample from ``net``, or whose guidance would change nothing,
    without sampling or writing anything (:func:`run_sampling` calls it first; ``epg sample``
    before it announces the run)."""
    settings.validate()
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = net.config
    labels = labels_for(settings, cfg.num_classes)
    guided = sampling.guidance_applies(settings.guidance)
    if guided and labels is None:
        if cfg.num_classes == 0:
            raise ValueError(f"guidance {settings.guidance:g}: this network is unconditional (no "
                             "class labels), so there is no classifier-free guidance; sample with "
                             "guidance 1 (none)")  # fmt: skip
        raise ValueError("classifier-free guidance needs class labels (labels='none' given)")
    if cuda_graph:
        _check_cuda_graph_device(net)
    to_uint8(torch.zeros(0, cfg.in_channels, 1, 1), settings.convention)
    # Image 0 sampled through a stand-in network (zeros): the sampler's grid, the seed and the
    # interval are checked by the code that samples, and the σ it evaluates at, which do not
    # depend on the network's output, show whether guidance acts (the unconditional pass is the
    # one labelled with the null class).
    null_class = cfg.num_classes if cfg.num_classes > 0 else None
    evaluations: list[tuple[float, bool]] = []

    def stand_in(x: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        unconditional = y is not None and bool((y == null_class).any())
        evaluations.append((float(sigma[0]), unconditional))
        return torch.zeros_like(x)

    sampling.sample(
        stand_in, None if labels is None else labels[:1], cfg.img_size, 1, settings.steps,
        settings.sampler, settings.guidance, null_class=null_class, indices=[0],
        guidance_interval=settings.guidance_interval, clamp=settings.clamp,
        trailing_zero=settings.trailing_zero, seed=settings.seed, batch_size=1, progress=False,
    )  # fmt: skip
    if guided and not any(unconditional for _, unconditional in evaluations):
        shift = resolution_shift(cfg.img_size)
        sigmas = sorted({sigma / shift for sigma, _ in evaluations}, reverse=True)
        where = (", ".join(f"{s:.4g}" for s in sigmas) if len(sigmas) <= 4
                 else f"{len(sigmas)} values from {sigmas[0]:.4g} down to {sigmas[-1]:.4g}")
        low, high = settings.guidance_interval
        steps = f"{settings.steps} step" + ("s" if settings.steps != 1 else "")
        raise ValueError(
            f"guidance {settings.guidance:g} would change nothing: {settings.sampler} with {steps} "
            f"evaluates the network at σ {where} (unshifted), none inside the guidance interval "
            f"({low:g}, {high:g}]; guide at every σ (--no-interval), give an --interval that holds "
            "some of them, or sample without guidance (--guidance 1)"
        )


def run_sampling(
    net: EPGViT,
    out_dir: str | os.PathLike,
    settings: SampleSettings,
    *,
    batch_size: int = 100,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    compile: bool = False,
    cuda_graph: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    write_archive: bool = True,
) -> dict[str, Any]:
    """Sample ``settings.num_images`` images from ``net`` into ``out_dir`` (see the module
    docstring); resumable. ``barrier`` is called between the PNGs and the archive when
    ``world_size > 1``. Returns the summary (also written to ``summary.json`` by rank 0)."""
    # Everything that can refuse these settings runs first, before the folder is touched:
    # failing later, after rank 0 discarded the old images (--overwrite) or wrote its
    # settings.json, loses them or leaves a folder that refuses a corrected rerun.
    check_sampling(net, settings, batch_size=batch_size, cuda_graph=cuda_graph)
    out_dir = Path(out_dir)
    cfg = net.config
    device = next(net.parameters()).device
    labels = labels_for(settings, cfg.num_classes)
    denoiser = make_denoiser(net, settings.mode, settings.precision, compile, cuda_graph)
    counter = PassCounter(denoiser)
    null_class = cfg.num_classes if cfg.num_classes > 0 else None  # the null label is K
    sample_kwargs = dict(
        guidance_interval=settings.guidance_interval, clamp=settings.clamp,
        trailing_zero=settings.trailing_zero, seed=settings.seed, batch_size=batch_size,
        device=device, progress=False,
    )  # fmt: skip
    if rank == 0:
        check_resume(out_dir, settings, overwrite)
        if overwrite:
            _discard_samples(out_dir)
        (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / SETTINGS_NAME,
                     lambda tmp: Path(tmp).write_text(json.dumps(settings.to_dict(), indent=2)))
    if world_size > 1 and barrier is not None:
        barrier()

    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    mine = _shard(settings.num_images, rank, world_size)
    # Every existing PNG is decoded (a file cut short by a crash must be resampled): minutes
    # for 50k images, so it gets a bar of its own.
    check = tqdm(mine, desc="checking existing images", unit="img", disable=not progress,
                 leave=False)  # fmt: skip
    todo = [i for i in check if _read_png(image_path(out_dir, i)) is None]
    start = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sampling ({settings.sampler})",
               unit="img", disable=not progress, dynamic_ncols=True)
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        y = None if labels is None else labels[batch]
        images = sampling.sample(
            counter, y, cfg.img_size, cfg.in_channels, settings.steps, settings.sampler,
            settings.guidance, null_class=null_class, indices=batch, **sample_kwargs,
        )  # fmt: skip
        if not torch.isfinite(images).all():  # to_uint8 would save NaN as black, silently
            raise ValueError(
                f"the network gave non-finite values for images {batch[0]}..{batch[-1]} (NaN or "
                f"inf weights, or an overflow at guidance {settings.guidance:g}, precision "
                f"{settings.precision}); nothing of this batch was written"
            )
        pixels = to_uint8(images, settings.convention)
        for i, px in zip(batch, pixels):
            _write_png(image_path(out_dir, i), px)
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - start
    if world_size > 1 and barrier is not None:
        barrier()

    summary = {
        "images": settings.num_images,
        "sampled_now_by_this_rank": len(todo),
        "network_passes": counter.calls,
        "passes_per_image": counter.images / len(todo) if todo else None,
        "seconds": round(elapsed, 3),
        "images_per_s": round(len(todo) / elapsed, 3) if todo and elapsed > 0 else None,
        "world_size": world_size,
        "device": str(device),
    }
    if rank == 0:
        if not todo:  # a rerun with nothing left: the earlier run's measurements stay
            earlier = _read_summary(out_dir / SUMMARY_NAME)
            measured = ("network_passes", "passes_per_image", "seconds", "images_per_s", "world_size", "device")
            if earlier.get("images") == settings.num_images:
                summary.update({k: earlier[k] for k in measured if k in earlier})
                # Beside "sampled_now_by_this_rank": 0, the seconds and rates would read as this run's.
                summary["measured_by"] = earlier.get("measured_by", "an earlier run, which sampled the images")
        if write_archive:
            summary["npz"] = str(write_npz(out_dir, settings.num_images, labels, progress))
            preview = torch.from_numpy(
                np.stack([_read_png(image_path(out_dir, i)) for i in range(min(64, settings.num_images))])
            ).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # fmt: skip
            scale = max(1, math.ceil(64 / cfg.img_size))
            make_grid_png(preview, out_dir / PREVIEW_NAME, nrow=8, scale=scale, convention="simple")
            summary["preview"] = str(out_dir / PREVIEW_NAME)
        atomic_write(out_dir / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary
