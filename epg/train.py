"""One Trainer for the three EPG training modes: stage-1 pre-training, diffusion and consistency
fine-tuning (epg-method.md §5–7).

The step: draw the step's randomness (``objective.draw``) from a generator seeded by (seed, step),
compute the loss (``objective.loss``, wrapped in ``torch.compile`` unless ``compile=False``, as is
``objective.keys``, the InfoNCE keys' pass that ``grad_accum`` runs first), back-propagate, clip,
and update — or skip the update when the loss or the gradient is not finite (the skip is counted,
the step number does not advance, and the retry takes the next batch with fresh noise;
``max_bad_steps`` skips in a row stop the run). Then the EMA of the model (stage 2) or of the
target encoder (stage 1), logs, previews and checkpoints.

``precision="fp16"`` (the paper's runs) scales the loss as the official GradScaler settings do
(epg-method.md §5.5): from 2^14, ×1.000693 after every step made, ×0.5 when the gradients
overflow. The scale is one number kept alike on every rank; it multiplies each micro-batch's
backward and is divided out of the gradients before clipping. An overflow skips the step like
any non-finite gradient, but while the scale is above 1 it only halves the scale and does not
count towards ``max_bad_steps``; at 1 the scale stays and the skip counts (gradients infinite
there are not the scale's doing). Two departures from the official loop: a skip does not use up
a step (the retry takes a fresh batch, so a run makes exactly ``steps`` updates), and the scale
stops halving at 1. Gradients that are infinite at any scale therefore cost ~14 halvings (each
on a fresh batch) before ``max_bad_steps`` applies, and leave the scale near 1, from where it
doubles every ~1,000 steps.

Resuming is exact: a checkpoint holds the model, EMA, target, optimiser, LR schedule, step, every
rank's torch RNG state (dropout), the data position and the config, and every other random number
is a function of (seed, step). (Resumed on another number of ranks, each rank gets a fresh
dropout stream instead: the run continues, not bit for bit.) Checkpoints are written atomically.
``resume="auto"`` continues from the newest readable checkpoint in the run folder (an unreadable
newer one, truncated or failing its records' CRC-32 checksums, is reported and renamed
``step_N.pt.unreadable``, kept for a look but out of the run's way); ``"none"`` starts afresh
and refuses a folder that already holds a run's checkpoints or network (nothing is overwritten
unasked); ``"restart"`` discards that run (checkpoints, final network, previews, exports, log)
first. :func:`export_checkpoint` (``epg export``) writes the network of a checkpoint as an epg
checkpoint folder, to sample or fine-tune from a run that has not finished.

Distributed runs go through torchrun (DDP; gloo on CPU, NCCL on GPU). With
``global_randomness`` (the default on CPU) every rank draws the randomness of the *global* batch
and keeps its rows, so N processes compute what one process computes on the same global batch.
``parallel="fsdp"`` shards the networks with FSDP2 instead of replicating them.

GPU only, not yet run on a GPU: bf16 autocast, fused AdamW, NCCL, and ``torch.compile`` of the
step on CUDA; the tests marked ``cuda`` in tests/test_train.py check them where a GPU is present.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import inspect
import json
import math
import numbers
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .data.loader import InMemoryLoader
from .models import EPGViT, RCMViT, build
from .models.configs import CONFIGS, RCMConfig
from .seeding import torch_seed

MODES = ("pretrain", "diffusion", "consistency")
CHECKPOINT_FORMAT = "epg-train-v1"
_CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")
# precision="fp16": the loss scaling of the official code's GradScaler (epg-method.md §5.5): start
# at 2^14, grow ×1.000693 after every finite step (doubling in ~1,000 steps), halve on overflow.
LOSS_SCALE_INIT, LOSS_SCALE_GROWTH, LOSS_SCALE_BACKOFF = 2.0**14, 1.000693, 0.5
EXPORTS_NAME = "exports"  # export_checkpoint's default home in a run folder
# What Trainer.state_dict writes and load_checkpoint reads ("ema"/"target" may hold None).
_CHECKPOINT_KEYS = ("step", "config", "model_config", "model", "ema", "target", "optimizer", "scheduler",
                    "rng", "data", "skipped_total", "bad_in_a_row")  # fmt: skip


# The options each mode never reads (validate refuses them set; `epg pretrain --help` leaves
# stage 2's out, `epg finetune --help` stage 1's).
UNUSED_OPTIONS = {
    "pretrain": ("init", "encoder", "perceptual", "perceptual_config", "preview_every", "ema_decay"),
    "diffusion": ("perceptual", "perceptual_config", "augment", "target_ema"),
    "consistency": ("augment", "target_ema"),
}


@dataclass
class TrainConfig:
    mode: str = "diffusion"  # pretrain | diffusion | consistency
    # a config name of epg.models.CONFIGS; "": the digits networks of `epg demo` (rcm-digits in
    # stage 1, epg-digits in stage 2), which fit the default data
    model: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"  # the embedded scikit-learn digits
    data_options: dict[str, Any] = field(default_factory=dict)  # image_size, channels, ...
    run_dir: str = ""  # "": runs/<mode>
    steps: int = 1000
    batch_size: int = 64  # global, over all ranks
    # micro-batches per step: each rank runs its batch_size/world rows in grad_accum slices, one
    # backward each, and steps once, for a batch that does not fit in memory at once. The
    # InfoNCE terms still take their negatives from the whole batch; stage 1's projector
    # BatchNorm takes its statistics from the micro-batch (see Trainer.train_step).
    grad_accum: int = 1
    # keep only each transformer block's input for the backward and run the block again there:
    # about one more forward pass per step, for most of the blocks' activation memory
    activation_checkpointing: bool = False
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    no_weight_decay: tuple[str, ...] = ("pos_embed", "cls_token")
    lr_schedule: str = "cosine"  # cosine (to 0 at `steps`) | warmup-step | constant
    warmup_steps: int = 0
    lr_milestones: tuple[int, ...] = ()  # warmup-step: multiply the lr by lr_factors[i] from here
    lr_factors: tuple[float, ...] = ()
    grad_clip: float = 0.0  # global norm; 0 = off
    clip_after_warmup: bool = True
    ema_decay: float = 0.9999  # stage 2: EMA of the model used for sampling
    target_ema: float = 0.99  # stage 1: EMA target encoder
    objective: dict[str, Any] = field(default_factory=dict)  # objective constructor options
    augment: dict[str, Any] = field(default_factory=dict)  # stage-1 view augmentation options
    encoder: str | None = None  # stage 2: stage-1 checkpoint (epg folder or official .pth)
    # stage 2: start from a whole stage-2 network (epg folder or official .pth of this config),
    # e.g. consistency tuning from a diffusion model as ECT does; the encoder option then only
    # supplies the consistency loss's perceptual network
    init: str | None = None
    perceptual: str | None = None  # consistency: frozen stage-1 network (default: encoder)
    # the config of an official perceptual .pth; "": the stage-1 config whose encoder has the
    # model's shape (rcm-l-16 for epg-l-16, as the released run uses RCM-L for both)
    perceptual_config: str = ""
    compile: bool = True
    # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32 | fp16 (autocast with loss scaling,
    # as the paper's runs; see the module docstring)
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    preview_every: int = 0
    max_bad_steps: int = 5
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block; for the large configs)
    global_randomness: bool | None = None  # None: on for CPU runs, off on GPUs
    resume: str = "auto"  # auto | none | restart | a checkpoint file (see the module docstring)
    progress: bool = True

    @property
    def aux_term_off(self) -> bool:
        """A consistency run whose objective sets aux_weight=0: the auxiliary InfoNCE is off and
        its network is neither needed nor loaded."""
        return self.mode == "consistency" and dict(self.objective).get("aux_weight") == 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        # Non-negative, as the sampler's seed: a negative seed used to train and then fail in
        # the sampling of `epg demo` and of the previews.
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.lr_schedule not in ("cosine", "warmup-step", "constant"):
            raise ValueError(f"lr_schedule must be cosine, warmup-step or constant, got {self.lr_schedule!r}")
        if len(self.lr_milestones) != len(self.lr_factors):
            raise ValueError("lr_milestones and lr_factors must have the same length")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        # Options the mode never reads: set, they used to be ignored without a word.
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name in UNUSED_OPTIONS[self.mode]:
            field_ = fields[name]
            default = field_.default_factory() if field_.default is dataclasses.MISSING else field_.default
            if getattr(self, name) != default:
                what = {"preview_every": "sample previews (stage 1 trains no generator)",
                        "augment": "stage 1's view augmentation (pretrain runs)",
                        "target_ema": "stage 1's target encoder (pretrain runs)",
                        "ema_decay": "the stage-2 network's EMA (diffusion/consistency runs)",
                        "init": "a stage-2 network to start from (diffusion/consistency runs)",
                        "encoder": "a stage-1 network for stage 2 (diffusion/consistency runs)"
                        }.get(name, "the consistency loss's perceptual network (consistency runs)")  # fmt: skip
                raise ValueError(f"{name} is an option of {what}; a {self.mode} run does not use it "
                                 f"(got {getattr(self, name)!r})")  # fmt: skip
        if self.mode == "diffusion" and self.init and self.encoder:  # the encoder went unread
            raise ValueError(f"init ({self.init}) and encoder ({self.encoder}) both given: a diffusion "
                             "run starts from init, a whole stage-2 network, or from a stage-1 encoder; "
                             "give one")  # fmt: skip
        self._check_resume()
        if self.aux_term_off:
            for name in ("perceptual", "perceptual_config"):
                if getattr(self, name):
                    raise ValueError(f"{name} names the auxiliary InfoNCE's network, which "
                                     f"objective.aux_weight=0 turns off (got {getattr(self, name)!r})")  # fmt: skip
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        # Ranges: out of them a run used to train wrongly without a word (a negative grad_clip
        # flipped every gradient, a decay above 1 extrapolates the average) or fail after its
        # first step (log_every=0: a division by zero). 0 = off where the comment says so.
        ranges = (
            ("lr", lambda v: 0 < v < math.inf, "a positive number"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("warmup_steps", lambda v: v >= 0, ">= 0"),
            ("grad_clip", lambda v: v >= 0, ">= 0 (0: no clipping)"),
            ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("target_ema", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("log_every", lambda v: v >= 1, ">= 1"),
            ("ckpt_every", lambda v: v >= 0, ">= 0 (0: a checkpoint only at the end)"),
            ("preview_every", lambda v: v >= 0, ">= 0 (0: no previews)"),
            ("keep_checkpoints", lambda v: v >= 1, ">= 1"),
            ("max_bad_steps", lambda v: v >= 1, ">= 1"),
            ("grad_accum", lambda v: isinstance(v, numbers.Integral) and v >= 1, "an integer >= 1 (1: no accumulation)"),
        )  # fmt: skip
        for name, ok, expected in ranges:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # TrainConfig(lr="1e-4")
                raise ValueError(f"{name} must be a number, got {value!r} (from_dict reads strings)")
            if not ok(value):
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.mode == "pretrain" and self.batch_size < 2 * self.grad_accum:  # failed at step 0 in BatchNorm's words
            raise ValueError(f"stage 1 needs batch_size / grad_accum >= 2 (the projector's BatchNorm takes its "
                             f"statistics over each micro-batch), got {self.batch_size} / {self.grad_accum}")  # fmt: skip
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"lr_milestones must be in ascending order, got {self.lr_milestones!r}")

    def _check_resume(self) -> None:
        if not isinstance(self.resume, str):  # YAML reads yes/no/on/off as booleans
            raise ValueError(f"resume must be auto, none, restart or a checkpoint file, got {self.resume!r}")
        if self.resume in ("auto", "none", "restart"):
            return
        path = Path(self.resume).expanduser()
        if path.is_dir():
            raise ValueError(f"resume={self.resume} is a folder; give a checkpoint file (a run folder's "
                             "checkpoints/step_N.pt), or resume=auto for the newest one of run_dir")  # fmt: skip
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {self.resume} does not exist (resume takes auto, "
                                    "none, restart or a checkpoint file)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from plain values (a preset, a YAML/JSON file, ``--set`` overrides), each
        checked against its field's type: numbers given as strings ("1e-4") are read as numbers,
        a comma-separated string fills a tuple field ("0.9,0.95"); anything else that does not
        fit is refused, naming the option."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(_unknown_names("training option", unknown, fields))
        return cls(**{key: _coerce_option(key, fields[key].type, value) for key, value in data.items()})


_TUPLE_ITEM = {"tuple[float, float]": float, "tuple[str, ...]": str, "tuple[int, ...]": int,
               "tuple[float, ...]": float}  # fmt: skip


def _coerce_option(name: str, annotation: str, value: Any) -> Any:
    """``value`` as the type ``annotation`` (a TrainConfig field's, as a string) names."""
    def fail(expected: str) -> ValueError:
        return ValueError(f"training option {name}: expected {expected}, got {value!r}")

    def scalar(kind: type, item: Any) -> Any:
        if kind is str:
            if isinstance(item, bool):  # resume=yes became "True"
                raise fail("a string (YAML reads yes/no/on/off/true/false as booleans: quote a "
                           "string so spelt)")  # fmt: skip
            if isinstance(item, (dict, list, tuple)) or item is None:
                raise fail("a string")
            return str(item)
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise fail("a number" if kind is float else "an integer")
        try:
            number = float(item)
        except ValueError:
            raise fail("a number" if kind is float else "an integer") from None
        if kind is int:
            if not number.is_integer():
                raise fail("an integer")
            return int(number)
        return number

    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise fail(base)
    if base in _TUPLE_ITEM:
        kind = _TUPLE_ITEM[base]
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        result = tuple(scalar(kind, v) for v in items)
        if base == "tuple[float, float]" and len(result) != 2:
            raise fail("two numbers (e.g. 0.9,0.95)")
        return result
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise fail("true or false")
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise fail("a mapping of options")
        return dict(value)
    kind = {"int": int, "float": float, "str": str}.get(base)
    return value if kind is None else scalar(kind, value)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of cfg.lr at ``step``: linear warm-up, then the configured schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    factor = 1.0
    if cfg.lr_schedule == "warmup-step":
        for milestone, f in zip(cfg.lr_milestones, cfg.lr_factors):
            if step >= milestone:
                factor = f
    return factor


def _parameters(target: Any) -> dict[str, Any] | None:
    """name → annotation of what ``target`` (a function, class or dataclass) takes; None when it
    takes any keyword (``**kwargs``)."""
    if dataclasses.is_dataclass(target):
        return {f.name: f.type for f in dataclasses.fields(target)}
    params = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.annotation for p in params if p.name != "self"}


def _check_options(group: str, target: Any, options: dict[str, Any], taken: tuple[str, ...] = ()) -> None:
    """Refuse option names ``target`` (a function, class or dataclass) does not take, naming the
    group (``objective``, ``augment``, ``data_options``) and the valid ones. ``taken``: names the
    Trainer passes itself."""
    params = _parameters(target)
    if params is None:
        return
    valid = set(params) - set(taken)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(_unknown_names(f"{group} option", unknown, valid))


def _unknown_names(what: str, unknown: list[str], valid) -> str:
    """The refusal of unknown option names, with the closest valid name of each typo."""
    named = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), sorted(valid), n=1)
        named.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown {what}(s) {', '.join(named)}; valid: {sorted(valid)}"


def _objective_class(mode: str) -> type:
    from .objectives.consistency import ConsistencyObjective
    from .objectives.diffusion import DiffusionObjective
    from .objectives.pretrain import PretrainObjective

    return {"pretrain": PretrainObjective, "diffusion": DiffusionObjective,
            "consistency": ConsistencyObjective}[mode]  # fmt: skip


# Names the Trainer passes the objective and the folder loaders itself.
_OBJECTIVE_TAKEN = ("net", "online", "target", "perceptual", "img_size", "num_classes")
_LOADER_TAKEN = ("source", "num_threads", "num_workers", "resolution", "global_batch_size", "rank",
                 "world_size", "seed", "device")  # fmt: skip


def _annotations(target: Any, taken: tuple[str, ...] = ()) -> dict[str, str]:
    """The annotated parameters of ``target`` (a function or a dataclass): name → annotation (a
    string: the modules use ``from __future__ import annotations``)."""
    params = _parameters(target) or {}
    return {name: a for name, a in params.items() if isinstance(a, str) and name not in taken}


def _nested_annotations(cfg: TrainConfig) -> dict[str, dict[str, str]]:
    """For each nested option group ``cfg`` (defaults applied) uses, the annotation of each option
    its receiver takes: the objective's / loader's parameters, the model config's fields."""
    from .data.augment import ViewAugmentConfig

    groups = {"objective": _annotations(_objective_class(cfg.mode).__init__, _OBJECTIVE_TAKEN)}
    if cfg.model in CONFIGS:  # an unknown name is refused by build, naming the known ones
        groups["model_overrides"] = _annotations(type(CONFIGS[cfg.model]))
    if cfg.mode == "pretrain":
        groups["augment"] = _annotations(ViewAugmentConfig)
    if cfg.data == "folder":
        from .data.dali import DaliLoader
        from .data.portable import PortableLoader

        groups["data_options"] = {
            **_annotations(PortableLoader.__init__, _LOADER_TAKEN),
            **_annotations(DaliLoader.__init__, _LOADER_TAKEN),
            "path": "str", "loader": "str", "workers": "int",  # the Trainer's own
        }  # fmt: skip
    elif cfg.data == "digits":
        from .data.embedded import load_digits_tensors

        groups["data_options"] = {**_annotations(load_digits_tensors), "convention": "str"}
    return groups


def _coerce_nested(cfg: TrainConfig, groups: dict[str, dict[str, str]] | None = None) -> TrainConfig:
    """``cfg`` with each nested option (``objective.*``, ``model_overrides.*``, ``augment.*``,
    ``data_options.*``) read as the type its receiver annotates, as ``from_dict`` reads the
    top-level ones. A value that does not fit is refused here, naming the dotted option, before
    anything is built: it used to reach the arithmetic as a TypeError, some only at the first
    step, after resume=restart had discarded the earlier run. Names no receiver takes are left to
    :func:`_check_options`."""
    groups = _nested_annotations(cfg) if groups is None else groups
    coerced = {
        group: {
            key: _coerce_option(f"{group}.{key}", annotations[key], value) if key in annotations else value
            for key, value in getattr(cfg, group).items()
        }
        for group, annotations in groups.items()
    }
    return dataclasses.replace(cfg, **coerced)


_NETWORK_PATHS = ("encoder", "init", "perceptual")  # the options that name a network to start from


def _home_expanded_paths(cfg: TrainConfig) -> dict[str, Any]:
    """The path options that start with ``~``, expanded as a shell expands them: no shell
    expands ``--set run_dir=~/r`` (a folder named ``~`` was made) or a YAML file's paths."""
    values = {name: getattr(cfg, name) for name in ("run_dir", "resume", *_NETWORK_PATHS)}
    expanded = {name: os.path.expanduser(value) for name, value in values.items()
                if isinstance(value, str) and value.startswith("~")}  # fmt: skip
    data_path = cfg.data_options.get("path") if isinstance(cfg.data_options, dict) else None
    if isinstance(data_path, str) and data_path.startswith("~"):
        expanded["data_options"] = {**cfg.data_options, "path": os.path.expanduser(data_path)}
    return expanded


def _same_identity(key: str, saved: Any, mine: Any) -> bool:
    """Whether a resumed run's identity setting ``key`` is the checkpoint's. A network path
    counts as the same when it names the same file or folder (``./r1``, ``r1``, its absolute
    path, and ``r1/final`` for a run folder ``r1``)."""
    if key in _NETWORK_PATHS and saved and mine:
        return _resolved_network(saved) == _resolved_network(mine)
    return json.dumps(saved, sort_keys=True) == json.dumps(mine, sort_keys=True)


def _network_digest(path: str) -> str | None:
    """The SHA-256 of the weights a network path names (an epg folder's recorded one, else
    the file hashed); None when there is nothing to read there."""
    try:
        return ckpt.checked_weights_digest(ckpt.run_output(path))
    except (OSError, ckpt.CheckpointError):
        return None


def _resolved_network(path: str) -> Path:
    try:
        return ckpt.run_output(path).resolve()
    except OSError:  # gone since: compared as written
        return Path(path).resolve()


def _fully_shard(model: nn.Module) -> None:
    """FSDP2: shard every transformer block, then the rest of the network."""
    from torch.distributed.fsdp import fully_shard

    for name in ("blocks", "decoder_blocks"):
        for block in getattr(model, name, []):
            fully_shard(block)
    fully_shard(model)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a training checkpoint (``step_N.pt``), or a CheckpointError saying why it
    cannot be read: damaged (its records' checksums are checked, which torch.load does not do),
    truncated, empty, not one, or missing parts."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ckpt.CheckpointError(
            f"cannot read training checkpoint {path}: {ckpt.unreadable_cause(path, exc)}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not an epg training checkpoint ({CHECKPOINT_FORMAT})")
    damage = ckpt.zip_damage(path)
    if damage is not None:
        raise ckpt.CheckpointError(f"cannot read training checkpoint {path}: it is damaged: {damage}")
    # Checked here, not met as a KeyError halfway through loading: an incomplete file is
    # unreadable like a truncated one, and resuming falls back to the one before it.
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    config = state.get("config")
    missing += [f"config.{key}" for key in ("mode", "model") if not isinstance(config, dict) or key not in config]
    if missing:
        raise ckpt.CheckpointError(f"training checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    return state


def run_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in a run's ``checkpoints/`` folder, oldest first (temporary and
    set-aside files never count)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CKPT_RE.match(p.name))


def _newest_readable(
    candidates: list[Path], map_location: str | torch.device, then: str, warn: bool
) -> tuple[Path, dict[str, Any], list[Path]]:
    """The first of ``candidates`` (newest first, at least one) that reads, its contents, and the
    ones before it that did not (each reported when ``warn``: "...; <then> the older step_N.pt").
    The last candidate's error when none reads."""
    for i, path in enumerate(candidates[:-1]):
        try:
            return path, read_checkpoint(path, map_location), candidates[:i]
        except ckpt.CheckpointError as exc:
            if warn:
                print(f"warning: {exc}; {then} the older {candidates[i + 1].name}", file=sys.stderr, flush=True)
    return candidates[-1], read_checkpoint(candidates[-1], map_location), candidates[:-1]


def _export_metadata(step: int, mode: str, model: str, convention: str | None) -> dict[str, Any]:
    # The config name picks `epg sample`'s default guidance scale, the convention its inverse
    # normalisation.
    meta = {"step": step, "mode": mode, "model": model}
    if convention is not None:
        meta["convention"] = convention
    return meta


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the network of a training checkpoint as an epg checkpoint folder, as the run's
    ``final/`` would hold it: the EMA network in stage 2, the online encoder in stage 1.

    ``path``: a ``step_N.pt`` file, or a run folder (its newest readable checkpoint). ``out``
    (default ``<run>/exports/step_N``) must be new, empty or an earlier export. Returns the folder
    and the export's metadata (step, mode, model, convention)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    path = path.absolute()  # `epg export step_N.pt` run inside checkpoints/ finds the run folder
    if path.is_dir():
        folder = path if path.name == ckpt.RUN_CHECKPOINTS_NAME else path / ckpt.RUN_CHECKPOINTS_NAME
        found = run_checkpoints(folder)[::-1]
        if not found:
            raise FileNotFoundError(f"{path} holds no training checkpoints (checkpoints/step_N.pt)")
        path, state, _ = _newest_readable(found, "cpu", "exporting", warn=True)
    else:
        state = read_checkpoint(path)
    cfg, step = state["config"], state["step"]
    if out is None:
        out = _run_of(path) / EXPORTS_NAME / f"step_{step:08d}"
    out = Path(out)
    earlier = _exported_from(out)  # the checkpoint an export already there came from
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and earlier is None)):
        raise FileExistsError(f"{out} exists and is not an earlier export; the export needs a new or empty "
                              "folder (it replaces only what epg export wrote)")  # fmt: skip
    if earlier is not None and _run_of(earlier) != _run_of(path):
        raise FileExistsError(f"{out} holds an export of another run ({earlier}); export {path} into a new "
                              "or empty folder, or remove that one first")  # fmt: skip
    config = ckpt.config_from_dict(state["model_config"])
    weights = state["ema"] if state["ema"] is not None else state["model"]
    net = ckpt.network_from_state(config, weights, str(path))
    convention = state.get("convention")
    if "convention" not in state:  # written before checkpoints recorded it: as the data gives it
        options = cfg.get("data_options") or {}
        convention = options.get("convention", "imagenet") if cfg.get("data") == "folder" else "simple"
    meta = _export_metadata(step, cfg["mode"], cfg["model"], convention)
    ckpt.save(net, out, metadata={**meta, "exported_from": str(path)})
    return out, {**meta, "source": str(path)}


def _exported_from(folder: Path) -> Path | None:
    """The training checkpoint an export in ``folder`` was written from; None where ``folder``
    holds no such export (nothing there, or something it may not replace, such as a run's
    ``final/``)."""
    try:
        source = ckpt.read_config(folder)[1].get("exported_from")
    except (OSError, ValueError):
        return None
    return Path(source) if isinstance(source, str) else None


def _run_of(checkpoint_file: Path) -> Path:
    """The run folder of a training checkpoint (its own folder for a file outside a run)."""
    return ckpt.run_folder_of(checkpoint_file) or checkpoint_file.parent


def sample_preview(trainer: Trainer, step: int) -> Path | None:
    """The default preview: a grid of EMA samples (Euler, 50 steps as the official previews; one
    step for consistency models), one column per class, saved as ``previews/step_<n>.png``.
    Runs on every rank (a sharded EMA samples collectively); the main rank writes the file."""
    if trainer.ema is None:
        return None
    from . import sampling
    from .data.embedded import make_grid_png
    from .models import Denoiser

    net_cfg = trainer.ema.config
    classes = min(net_cfg.num_classes, 10) if net_cfg.num_classes else 0
    n = 4 * max(classes, 4)
    labels = sampling.class_labels(n, classes) if classes else None
    consistency = trainer.cfg.mode == "consistency"
    denoiser = Denoiser(trainer.ema, mode="edm" if consistency else "x0")
    images = sampling.sample(
        denoiser, labels, net_cfg.img_size, channels=net_cfg.in_channels,
        steps=1 if consistency else 50, sampler="consistency" if consistency else "euler",
        seed=trainer.cfg.seed, batch_size=n, device=trainer.device, progress=False,
    )  # fmt: skip
    if not trainer.dist.is_main:
        return None
    path = trainer.run_dir / "previews" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid_png(images, path, nrow=max(classes, 4), scale=max(1, 64 // net_cfg.img_size))
    return path


class NonFiniteStop(RuntimeError):
    """``max_bad_steps`` non-finite steps in a row. The count comes from all-reduced values, so
    every rank raises it at the same step."""


class Interrupted(KeyboardInterrupt):
    """``fit`` stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption or time limit,
    a container's stop): after the current step, with a checkpoint, or at once on a second
    Ctrl-C. ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):
        return type(self), (str(self), self.signum)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_words(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def _step_seed(seed: int, step: int, stream: int, rank: int = 0, attempt: int = 0) -> int:
    # attempt: how many non-finite tries of this step came before (a retry draws afresh)
    return (seed * 1_000_003 + step * 8_191 + stream * 131 + rank + attempt * 2_147_483_647) % (2**63 - 1)


def _is_per_sample(t: Tensor, batch: int) -> bool:
    return t.dim() > 0 and t.shape[0] == batch


def load_encoder_weights(model: EPGViT, path: str | os.PathLike) -> list[str]:
    """Copy a stage-1 encoder (epg checkpoint folder or official RCM ``.pth``) into the encoder
    of ``model`` (spec §6.1); the projection head is ignored. Returns the keys copied. A stage-1
    run folder stands for its ``final/``; a stage-2 network is refused (``init`` takes those)."""
    path = ckpt.run_output(path)
    if ckpt.is_epg_checkpoint(path):
        source = ckpt.load(path)
        if not isinstance(source, RCMViT):
            raise ckpt.CheckpointError(
                f"{path} holds a stage-2 {type(source).__name__}, not a stage-1 encoder: the encoder "
                "comes from `epg pretrain` (or a released RCM file); to start from a whole stage-2 "
                f"network use --set init={path}"
            )
        state = source.state_dict()
    else:
        state = ckpt.read_official_state_dict(path)
        if any(k.startswith("decoder_blocks.") for k in state):
            raise ckpt.CheckpointError(
                f"{path} holds a stage-2 network (decoder weights), not a stage-1 encoder; to start "
                f"from it use --set init={path}"
            )
    target = model.state_dict()
    encoder_keys = [
        k for k in target if k.split(".")[0] in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")
    ]
    missing = [k for k in encoder_keys if k not in state]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in encoder_keys if k in state and state[k].shape != target[k].shape
    ]  # fmt: skip
    if missing or mismatched:
        raise ckpt.CheckpointError(
            f"{path} does not hold this network's encoder: missing {missing[:8]}, "
            f"mismatched {mismatched[:8]}"
        )
    model.load_state_dict({k: state[k] for k in encoder_keys}, strict=False)
    return encoder_keys


def load_network_weights(
    model: EPGViT, path: str | os.PathLike, official_config: str, overrides: dict[str, Any] | None = None
) -> None:
    """Copy every weight of a stage-2 network (epg checkpoint folder, or an official ``.pth``
    or training checkpoint read as ``official_config`` with the run's model ``overrides``) into
    ``model``; the architectures must match exactly."""
    source = _load_network(path, official_config, **(overrides or {}))
    # Dropout has no weights: a diffusion model (drop 0) may start a consistency run (drop 0.5).
    same = isinstance(source, EPGViT) and dataclasses.replace(source.config, drop=model.config.drop) == model.config
    if not same:
        got = source.config if isinstance(source, EPGViT) else type(source).__name__
        hint = f" (a stage-1 encoder: start from it with --encoder {path})" if isinstance(source, RCMViT) else ""
        raise ckpt.CheckpointError(f"{path} holds {got}{hint}; this run builds {model.config}")
    ckpt.load_state_dict_strict(model, source.state_dict(), source=str(path))


def _matching_rcm_config(config) -> str:
    """The named stage-1 config whose encoder has the shape of ``config``'s encoder."""
    shape = ("img_size", "patch_size", "in_channels", "embed_dim", "depth", "num_heads")
    for name, candidate in CONFIGS.items():
        if isinstance(candidate, RCMConfig) and all(getattr(candidate, f) == getattr(config, f) for f in shape):
            return name
    raise ValueError(
        "no stage-1 config matches this model's encoder "
        f"({', '.join(f'{f}={getattr(config, f)}' for f in shape)}): set perceptual_config"
    )


def _load_network(path: str | os.PathLike, official_config: str, **overrides: Any) -> nn.Module:
    path = ckpt.run_output(path)
    if ckpt.is_epg_checkpoint(path):
        return ckpt.load(path)
    return ckpt.load_official(path, official_config, **overrides)


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`.

    ``data`` (optional) replaces the configured dataset: a dict of tensors with "image" (N, C, H,
    W) normalised images and "label" (N,) int64. ``preview`` (optional) is called as
    ``preview(trainer, step)`` on the main rank every ``preview_every`` steps.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        data: dict[str, Tensor] | None = None,
        preview: Callable[[Trainer, int], None] | None = None,
    ):
        cfg.validate()
        defaults = {}
        if not cfg.model:
            defaults["model"] = "rcm-digits" if cfg.mode == "pretrain" else "epg-digits"
        if not cfg.run_dir:
            defaults["run_dir"] = f"runs/{cfg.mode}"
        defaults.update(_home_expanded_paths(cfg))
        self.cfg = cfg = _coerce_nested(dataclasses.replace(cfg, **defaults))
        self.dist = distributed.setup(cfg.device)
        world = self.dist.world_size
        if cfg.batch_size % world:
            # Each rank takes batch_size / world rows; the rest of the global batch was dropped
            # without a word (global randomness builds the loader as rank 0 of 1).
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world} "
                             f"(torchrun processes): use a multiple of {world}")  # fmt: skip
        if (cfg.batch_size // world) % cfg.grad_accum:
            raise ValueError(f"each of the {world} rank(s) takes {cfg.batch_size // world} rows of batch_size "
                             f"{cfg.batch_size}, which grad_accum {cfg.grad_accum} does not divide into "
                             "equal micro-batches")  # fmt: skip
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / ckpt.RUN_CHECKPOINTS_NAME
        self.preview = preview if preview is not None else sample_preview
        if cfg.global_randomness is None:
            self.global_randomness = self.device.type == "cpu"
        else:
            self.global_randomness = cfg.global_randomness
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        # fp16 gradients underflow unscaled: the loss is multiplied by this before the backward
        self.loss_scale = LOSS_SCALE_INIT if precision == "fp16" else None

        torch.manual_seed(torch_seed(cfg.seed))  # identical initialisation on every rank
        self._build_models()
        self._build_data(data)
        self._build_objective()
        self._build_optimizer()
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self._updating = False
        self._interrupted = 0  # the signal this rank received, asking to stop after the step (0: none)
        self.stop_signal = 0  # the signal the ranks agreed to stop on
        self._bad_before_resume = self._overflows_in_a_row = 0
        # Dropout streams differ per rank; seeded after init so init is rank-independent.
        torch.manual_seed(torch_seed(cfg.seed * 7919 + 1 + self.dist.rank))
        self._check_run_folder()
        self._network_digests: dict[str, str] | None = None  # computed for the first checkpoint
        self._maybe_resume()
        self._saved_step = self.step  # nothing new to save before the first step
        self.loss_fn = torch.compile(self.objective.loss) if cfg.compile else self.objective.loss
        # The InfoNCE objectives' keys: with grad_accum, computed for the whole batch before its
        # micro-batches, so that each contrasts with all of them.
        keys = getattr(self.objective, "keys", None) if cfg.grad_accum > 1 else None
        self.keys_fn = torch.compile(keys) if keys is not None and cfg.compile else keys

    # --- construction ------------------------------------------------------------------------

    def _build_models(self) -> None:
        cfg = self.cfg
        with torch.device(self.device):
            self.model = build(cfg.model, **cfg.model_overrides)
        kind_ok = isinstance(self.model, RCMViT) if cfg.mode == "pretrain" else isinstance(self.model, EPGViT)
        if not kind_ok:
            want = "a stage-1 rcm-* config" if cfg.mode == "pretrain" else "a generative epg-* config"
            raise ValueError(f"mode {cfg.mode!r} needs {want}, got {cfg.model!r}")
        self.target = self.ema = self.perceptual = None
        if cfg.mode == "pretrain":
            if self.dist.distributed:
                distributed.convert_batchnorm(self.model)
            self.target = self._frozen_copy(self.model)
        else:
            wants_perceptual = cfg.mode == "consistency" and not cfg.aux_term_off
            perceptual = (cfg.perceptual or cfg.encoder) if wants_perceptual else None
            if perceptual and not Path(perceptual).exists():
                raise FileNotFoundError(
                    f"{perceptual} does not exist: the consistency loss's auxiliary InfoNCE reads this "
                    "stage-1 network at every start, a resumed one's too (the checkpoint does not hold "
                    "it); put it back, or give its new path"
                )
            start = cfg.init or cfg.encoder
            if start and self._resumed_without(start):
                if self.dist.is_main:
                    print(f"note: {start} is gone; the run resumes from its checkpoint, which holds "
                          "the network's weights", file=sys.stderr)  # fmt: skip
            elif cfg.init:
                load_network_weights(self.model, cfg.init, cfg.model, cfg.model_overrides)
            elif cfg.encoder:
                load_encoder_weights(self.model, cfg.encoder)
            elif self.dist.is_main:
                print("note: no encoder (--encoder) or init given: the network starts from random "
                      "weights, without the stage-1 pre-training EPG builds on", file=sys.stderr)  # fmt: skip
            if wants_perceptual and not perceptual and self.dist.is_main:
                print("note: no stage-1 network (encoder or perceptual) given: the auxiliary InfoNCE "
                      "term of the consistency loss is off", file=sys.stderr)  # fmt: skip
            self.ema = self._frozen_copy(self.model)
            if perceptual:
                path = ckpt.run_output(perceptual)
                official = cfg.perceptual_config
                guessed = not official and not ckpt.is_epg_checkpoint(path)  # epg folders carry their config
                if guessed:
                    official = _matching_rcm_config(self.model.config)
                try:
                    net = _load_network(path, official)
                except ckpt.CheckpointError as exc:
                    if not guessed:
                        raise
                    raise ckpt.CheckpointError(
                        f"{exc}\n(read as {official}, the stage-1 config whose encoder has this model's shape; "
                        "if the file holds another stage-1 network, name its config with perceptual_config)"
                    ) from exc
                if not isinstance(net, RCMViT):
                    raise ValueError("the perceptual network of the consistency loss must be a stage-1 (rcm) network")
                self.perceptual = self._frozen_copy(net.to(self.device))
        for net in (self.model, self.perceptual):  # the networks a gradient flows through
            if net is not None:
                net.activation_checkpointing = cfg.activation_checkpointing
        self.model.train()
        self.train_model: nn.Module = self.model
        self.fsdp = self.dist.distributed and cfg.parallel == "fsdp"
        if self.fsdp:
            # The averages are sharded like the model, so the EMA update stays shard-local.
            for module in (self.model, self.ema, self.target):
                if module is not None:
                    _fully_shard(module)
        elif self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        copy_ = copy.deepcopy(model).eval()
        copy_.requires_grad_(False)
        return copy_

    def _build_folder_loader(self, rank: int, world: int):
        """A loader over an image folder (``data="folder"``): DALI or the portable Pillow one."""
        from .data.dali import DaliLoader, dali_available
        from .data.portable import PortableLoader

        cfg, net_cfg = self.cfg, self.model.config
        options = dict(cfg.data_options)
        if "path" not in options:
            raise ValueError('data="folder" (the paper presets) needs the images: --set '
                             "data_options.path=DIR, an ImageNet-style folder of class folders "
                             "(an `epg prepare` output) or a file list")
        path = options.pop("path")
        kind = options.pop("loader", "auto")
        workers = options.pop("workers", 4)
        options.setdefault("convention", "imagenet")
        self.convention = options["convention"]
        if net_cfg.in_channels != 3:
            raise ValueError(f"folder images are RGB; the network takes {net_cfg.in_channels} channel(s)")
        if kind == "auto":
            kind = "dali" if self.device.type == "cuda" and dali_available() else "portable"
        common = dict(resolution=net_cfg.img_size, global_batch_size=cfg.batch_size, rank=rank,
                      world_size=world, seed=cfg.seed, device=self.device, **options)  # fmt: skip
        loader_class = {"dali": DaliLoader, "portable": PortableLoader}.get(kind)
        if loader_class is not None:
            _check_options(f"data_options ({kind} loader)", loader_class.__init__, options, _LOADER_TAKEN)
        if kind == "dali":
            loader = DaliLoader(path, num_threads=max(1, workers), **common)  # 0 workers: 1 thread
        elif kind == "portable":
            loader = PortableLoader(path, num_workers=workers, **common)
        else:
            raise ValueError(f"data_options.loader must be auto, portable or dali, got {kind!r}")
        num_classes = getattr(net_cfg, "num_classes", None)
        if cfg.mode != "pretrain" and num_classes and loader.num_classes != num_classes:
            loader.close()
            raise ValueError(f"{path} has {loader.num_classes} classes; the network was built for "
                             f"{num_classes} (set model_overrides.num_classes)")
        return loader

    def _build_data(self, data: dict[str, Tensor] | None) -> None:
        cfg = self.cfg
        # The normalisation of the training images, recorded in the exported network so that
        # `epg sample` inverts the right one; unknown for tensors handed in directly.
        self.convention: str | None = cfg.data_options.get("convention")
        net_cfg = self.model.config
        expected = (net_cfg.in_channels, net_cfg.img_size, net_cfg.img_size)
        rank, world = (0, 1) if self.global_randomness else (self.dist.rank, self.dist.world_size)
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.image_shape = expected
        if data is None and cfg.data == "folder":
            self.loader = self._build_folder_loader(rank, world)
        else:
            self._build_tensor_loader(data, expected, rank, world)
        if cfg.mode == "pretrain":
            from .data.augment import ViewAugment, ViewAugmentConfig, view1_config, view2_config

            _check_options("augment", ViewAugmentConfig, cfg.augment)
            # Photometric augmentations work on x01, so they need the data's normalisation.
            augment = {"convention": self.convention or "simple", **cfg.augment}
            self.augment = (ViewAugment(view1_config(**augment)), ViewAugment(view2_config(**augment)))

    def _build_tensor_loader(self, data: dict[str, Tensor] | None, expected, rank: int, world: int) -> None:
        cfg = self.cfg
        if data is None:
            if cfg.data != "digits":
                raise ValueError(f"unknown dataset {cfg.data!r}; expected 'digits' (embedded) or "
                                 "'folder' (with data_options.path)")
            from .data.embedded import load_digits_tensors

            net_cfg = self.model.config
            options = {"image_size": net_cfg.img_size, "channels": net_cfg.in_channels, "split": "train"}
            options.update(cfg.data_options)
            if options.pop("convention", "simple") != "simple":
                raise ValueError("the embedded digits are normalised as 'simple' (2·x01 − 1)")
            _check_options("data_options (digits)", load_digits_tensors, options)
            images, labels = load_digits_tensors(**options)
            data = {"image": images, "label": labels}
            self.convention = "simple"  # the digits are x = 2·x01 − 1
        self._check_tensor_data(data, expected)
        self.loader = InMemoryLoader(dict(data), cfg.batch_size, rank, world, cfg.seed, self.device)

    def _check_tensor_data(self, data: Any, expected: tuple[int, int, int]) -> None:
        shape = f"(N, {', '.join(map(str, expected))})"
        wanted = f'"image" {shape} normalised float images and "label" (N,) int64 class labels'
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict of tensors, {wanted}; got a {type(data).__name__}")
        conditional = self.cfg.mode != "pretrain" and bool(getattr(self.model.config, "num_classes", 0))
        missing = [k for k in (("image", "label") if conditional else ("image",)) if k not in data]
        if missing:
            raise ValueError(f"data needs {wanted}; {', '.join(map(repr, missing))} missing from keys {sorted(data)}")
        images = data["image"]
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"training images must be {shape}, got {tuple(getattr(images, 'shape', ()))}")
        if not images.is_floating_point():
            raise ValueError(f"training images must be normalised floats, got {images.dtype} (pixel values? "
                             "epg.ops.normalize_images turns (N, H, W, C) uint8 into them)")  # fmt: skip
        # Normalised images lie within a few units of 0 under every convention; 0..255 is the
        # usual slip, and it trains without an error, to nothing.
        peak = float(images.detach().abs().amax()) if images.numel() else 0.0
        if peak > 10:
            raise ValueError(f"training images reach {peak:g}: pixel values rather than normalised "
                             "ones (2·x/255 − 1 for 'simple')?")  # fmt: skip
        labels = data.get("label")
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (len(images),)
                                   or labels.dtype not in (torch.int64, torch.int32)):  # fmt: skip
            raise ValueError(f"data's labels must be ({len(images)},) int64 or int32, got "
                             f"{tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', type(labels).__name__)}")

    def _build_objective(self) -> None:
        cfg, net_cfg = self.cfg, self.model.config
        options = dict(cfg.objective)
        objective_class = _objective_class(cfg.mode)
        _check_options(f"objective ({cfg.mode})", objective_class.__init__, options, _OBJECTIVE_TAKEN)
        if cfg.mode == "pretrain":
            options.setdefault("total_steps", cfg.steps)
            self.objective = objective_class(self.train_model, self.target, img_size=net_cfg.img_size, **options)
        elif cfg.mode == "diffusion":
            self.objective = objective_class(
                self.train_model, img_size=net_cfg.img_size, num_classes=net_cfg.num_classes, **options
            )
        else:
            self.objective = objective_class(
                self.train_model, self.perceptual, img_size=net_cfg.img_size,
                num_classes=net_cfg.num_classes, **options,
            )  # fmt: skip

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if name in cfg.no_weight_decay else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        # Fused on GPUs; on CPUs torch's default is the per-tensor loop, and the multi-tensor
        # (foreach) one takes 13% off the demo's stage-2 step (219 → 190 ms, same losses).
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused, foreach=not fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.params = [p for g in groups for p in g["params"]]
        # (average params, model params, decay) of the EMA and the stage-1 target, listed once
        # here rather than on every step.
        source = [p.detach() for p in self.model.parameters()]
        self._averages = [
            (list(average.parameters()), source, decay)
            for average, decay in ((self.ema, cfg.ema_decay), (self.target, cfg.target_ema))
            if average is not None
        ]

    # --- checkpoints ---------------------------------------------------------------------------

    def _check_run_folder(self) -> None:
        """Refuse a run folder the checkpoints cannot be written to (read-only, a file in the
        way) now: found at the first checkpoint, it used to cost the training done by then. The
        main rank writes; every rank raises."""
        error = None
        if self.dist.is_main:
            for folder in (self.run_dir, self.ckpt_dir):
                probe = folder / f".write-probe-{os.getpid()}.tmp"
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    probe.write_bytes(b"")
                    probe.unlink()
                except OSError as exc:
                    error = f"cannot write to the folder {folder} ({exc}); the run needs a writable run_dir"
                    break
        if self.dist.distributed:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error:
            raise ValueError(error)

    def _resumed_without(self, start: str) -> bool:
        """Whether the network the run started from (``start``: init or encoder) is gone but not
        needed: a checkpoint in the run folder (resume=auto) or the one named will be resumed,
        and it holds the weights. A run that cannot resume one fails there, naming why."""
        if Path(start).exists() or self.cfg.resume in ("restart", "none"):
            return False
        return self.cfg.resume != "auto" or bool(self.checkpoints())

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in the run folder, oldest first."""
        return run_checkpoints(self.ckpt_dir)

    def _module_state(self, module: nn.Module) -> dict[str, Tensor]:
        """A full (unsharded) state dict; a collective under FSDP, so every rank calls it."""
        if not self.fsdp:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_module_state(self, module: nn.Module, state: dict[str, Tensor], source: str) -> None:
        if not self.fsdp:
            ckpt.load_state_dict_strict(module, state, source)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def _rng_state(self) -> dict[str, Tensor]:
        """This process's dropout stream: the CPU generator and its own CUDA device's."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _gather_rng_states(self) -> list[dict[str, Tensor]]:
        """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
        if not self.dist.distributed:
            return [self._rng_state()]
        states: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(states, self._rng_state())
        return states

    def state_dict(self, rng_states: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs; under FSDP every rank must call it (it gathers).
        ``rng_states``: every rank's RNG state (:meth:`_gather_rng_states`); default: this
        process's only."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            optimizer = self.optimizer.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "convention": self.convention,  # for export_checkpoint
            "config": self.cfg.to_dict(),
            "model_config": ckpt.config_to_dict(self.model.config),
            "model": self._module_state(self.model),
            "ema": self._module_state(self.ema) if self.ema is not None else None,
            "target": self._module_state(self.target) if self.target is not None else None,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": {"ranks": rng_states if rng_states is not None else [self._rng_state()]},
            "data": self.loader.state_dict(),
            "skipped_total": self.skipped_total,
            "bad_in_a_row": self.bad_in_a_row,
            "loss_scale": self.loss_scale,
            "network_digests": self._started_from(),
        }

    def _started_from(self) -> dict[str, str]:
        """The SHA-256 of the networks the run started from (encoder, init, perceptual): a resume
        that names them by another path (from another working folder, or after they were
        copied or moved) is the same run when the weights are the same."""
        if self._network_digests is None:
            paths = {key: getattr(self.cfg, key) for key in _NETWORK_PATHS if getattr(self.cfg, key)}
            digests = {key: _network_digest(path) for key, path in paths.items()}
            self._network_digests = {key: digest for key, digest in digests.items() if digest}
        return self._network_digests

    def save_checkpoint(self) -> Path | None:
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        rng_states = self._gather_rng_states()
        state = self.state_dict(rng_states) if (self.dist.is_main or self.fsdp) else None
        if self.dist.is_main:
            ckpt.atomic_write(path, lambda tmp: ckpt.torch_save_checksummed(state, tmp))
            # Only older ones go: a newer file here is from a run resumed at an older checkpoint
            # (resume=PATH), and must not push out the checkpoint just written.
            older = [p for p in self.checkpoints() if p.name < path.name]
            for old in older[: max(0, len(older) - (self.cfg.keep_checkpoints - 1))]:
                old.unlink(missing_ok=True)
        if self.dist.distributed:
            dist.barrier()
        self._saved_step = self.step
        return path

    def load_checkpoint(self, path: str | os.PathLike, state: dict[str, Any] | None = None) -> None:
        """Continue from the training checkpoint ``path`` (``state``: its contents, when read)."""
        path = Path(path)
        if state is None:
            state = read_checkpoint(path, self.device)
        saved, mine = dict(state["config"]), self.cfg.to_dict()
        # Nested values read as this run reads them (`objective.c=1` is 1.0 now), for a
        # checkpoint written before they were; one this run cannot read compares as written.
        groups = {g: a for g, a in _nested_annotations(self.cfg).items() if isinstance(saved.get(g), dict)}
        try:
            normalised = _coerce_nested(dataclasses.replace(self.cfg, **{g: saved[g] for g in groups}), groups)
            saved.update({g: getattr(normalised, g) for g in groups})
        except ValueError:
            pass
        # What makes it another run (steps, logging, parallelism and the like may change).
        identity = ("mode", "model", "model_overrides", "data", "encoder", "init", "perceptual", "objective", "seed")
        different = [k for k in identity if not _same_identity(k, saved.get(k), mine[k])]
        recorded = state.get("network_digests") or {}
        moved = [k for k in different if k in recorded and mine[k] and _network_digest(mine[k]) == recorded[k]]
        if moved and self.dist.is_main:
            print("; ".join(f"note: {k} {mine[k]} holds the weights {saved.get(k)} held (same SHA-256)"
                            for k in moved), file=sys.stderr)  # fmt: skip
        different = [k for k in different if k not in moved]
        if different:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {mine[k]!r} now" for k in different)
            advice = ("continue it with its settings, discard it (resume=restart) or use another "
                      "run folder") if self.cfg.resume == "auto" else "continue it with its settings"
            raise ckpt.CheckpointError(f"{path} belongs to a run with other settings ({detail}); {advice}")
        self._network_digests = state.get("network_digests")  # None (older file): computed anew
        saved_model = ckpt.config_from_dict(state["model_config"])
        if saved_model != self.model.config:
            raise ckpt.CheckpointError(
                f"{path} was trained with {saved_model}, this run builds {self.model.config}"
            )
        self._load_module_state(self.model, state["model"], str(path))
        for name in ("ema", "target"):
            module = getattr(self, name)
            if module is not None:
                self._load_module_state(module, state[name], f"{path} [{name}]")
        optimizer = self._with_this_runs_adamw(state["optimizer"])
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer, optimizer, options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimizer_settings()
        self.loader.load_state_dict(state["data"])
        self.step = state["step"]
        self.skipped_total = state["skipped_total"]
        self.bad_in_a_row = state["bad_in_a_row"]
        if self.loss_scale is not None:  # (None in a checkpoint of another precision)
            saved_scale = state.get("loss_scale")
            self.loss_scale = LOSS_SCALE_INIT if saved_scale is None else saved_scale
        # A run stopped by non-finite steps saved its count: the resumed run gets a full
        # max_bad_steps tries of its own (the count still seeds fresh draws).
        self._bad_before_resume = self.bad_in_a_row
        ranks = state["rng"].get("ranks")
        if ranks is None:  # written before per-rank states: {"cpu", "cuda": [every device's]}
            legacy = state["rng"]
            ranks = [{"cpu": legacy["cpu"]}]
            if self.device.type == "cuda" and self.device.index < len(legacy.get("cuda", ())):
                ranks[0]["cuda"] = legacy["cuda"][self.device.index]
        if len(ranks) == self.dist.world_size:  # each rank continues its own dropout stream
            mine = ranks[self.dist.rank]
            torch.set_rng_state(mine["cpu"].cpu())
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"].cpu(), self.device)
        else:  # another number of ranks: fresh, distinct streams (the run is not bit-exact then)
            torch.manual_seed(torch_seed(self.cfg.seed * 7919 + 1 + self.dist.rank + 104729 * self.step))

    def _with_this_runs_adamw(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved optimiser state with this run's AdamW implementation (fused on a GPU, foreach
        on a CPU) in its groups: load_state_dict takes the saving run's, so a GPU run resumed
        from a CPU checkpoint stepped with the CPU's multi-tensor loop."""
        mine = {key: self.optimizer.param_groups[0][key] for key in ("fused", "foreach")}
        return {**saved, "param_groups": [{**group, **mine} for group in saved["param_groups"]]}

    def _apply_optimizer_settings(self) -> None:
        """This run's lr, betas and weight_decay over the ones a loaded optimiser and schedule
        state brought back: resumed with new values, a run used to keep the old ones while
        train_config.json recorded the new. The values are computed as the schedule computes
        them, so a resume with unchanged settings stays bit for bit."""
        cfg = self.cfg
        groups = self.optimizer.param_groups
        lr = cfg.lr * lr_factor(self.scheduler.last_epoch, cfg)
        for group in groups:
            group["betas"] = cfg.betas
            group["initial_lr"] = cfg.lr
            group["lr"] = lr
        groups[0]["weight_decay"] = cfg.weight_decay  # the decay group; the no-decay one keeps 0
        self.scheduler.base_lrs = [cfg.lr] * len(groups)
        self.scheduler._last_lr = [lr] * len(groups)  # what get_last_lr() (the log) reports

    def _earlier_run(self) -> list[Path]:
        """What an earlier run left in the run folder that a fresh start would overwrite."""
        found = self.checkpoints()
        final = self.run_dir / ckpt.RUN_FINAL_NAME
        return found + ([final] if final.exists() else [])

    def _discard_earlier_run(self) -> None:
        import shutil

        if self.dist.is_main:
            files = [*self.checkpoints(), *self.ckpt_dir.glob("step_*.pt.unreadable*")]
            log = self.run_dir / "log.jsonl"
            files += [log] if log.exists() else []
            folders = [self.run_dir / name for name in (ckpt.RUN_FINAL_NAME, "previews", EXPORTS_NAME)]
            folders = [f for f in folders if f.exists()]
            for path in files:
                path.unlink()
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            # Said, since an export or a final network may be what someone meant to keep.
            gone = [f"{f.name}/" for f in folders] + [f.name for f in files]
            if gone:
                shown = ", ".join(gone[:6]) + (f" and {len(gone) - 6} more" if len(gone) > 6 else "")
                print(f"resume=restart: discarded the earlier run in {self.run_dir} ({shown})",
                      file=sys.stderr, flush=True)
        if self.dist.distributed:
            dist.barrier()

    def _maybe_resume(self) -> None:
        resume = self.cfg.resume
        if self.dist.is_main and self.ckpt_dir.is_dir():  # temporary files of a killed writer
            for leftover in self.ckpt_dir.glob(".step_*.tmp"):
                leftover.unlink(missing_ok=True)
        if resume == "restart":
            self._discard_earlier_run()
            return
        if resume == "none":
            earlier = self._earlier_run()
            if earlier:
                raise ValueError(
                    f"{self.run_dir} holds an earlier run ({', '.join(p.name for p in earlier[-3:])}); "
                    "resume=none would overwrite it: continue it (resume=auto), discard it "
                    "(resume=restart) or use another run folder"
                )
            return
        if resume == "auto":
            candidates = self.checkpoints()[::-1]  # newest first
            if not candidates:
                return
        else:  # (an existing file: TrainConfig.validate)
            candidates = [Path(resume)]
        try:
            path, state, unreadable = _newest_readable(candidates, self.device, "resuming from", self.dist.is_main)
        except ckpt.CheckpointError as exc:
            if resume != "auto":
                raise
            raise ckpt.CheckpointError(f"{exc}; no checkpoint in {self.ckpt_dir} reads: discard the run "
                                       "(resume=restart) or use another run folder") from exc  # fmt: skip
        self.load_checkpoint(path, state)
        self._set_aside(unreadable)
        if self.dist.is_main:
            self._trim_log()
            print(f"resumed from {path} at step {self.step}", flush=True)
            if self.step >= self.cfg.steps:
                print(f"note: the run is at step {self.step} already, at or past steps={self.cfg.steps}: "
                      "nothing is left to train (raise steps to train on)", file=sys.stderr, flush=True)  # fmt: skip

    def _set_aside(self, unreadable: list[Path]) -> None:
        """Rename checkpoints resuming could not read to ``<name>.unreadable``: kept for a look,
        and out of the way of the run, which would otherwise write its own checkpoint of that
        step over the file (and try the file again first on every later resume)."""
        if self.dist.distributed:
            dist.barrier()  # every rank has tried them
        if not self.dist.is_main:
            return
        for path in unreadable:
            aside, n = path.with_name(f"{path.name}.unreadable"), 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.unreadable-{n}")
            path.rename(aside)
            print(f"set {path.name} aside as {aside.name}", file=sys.stderr, flush=True)

    def _trim_log(self) -> None:
        """Drop the log records of steps after the resumed one: they are trained again, and
        were logged twice (a line cut short by a kill goes too)."""
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("step", 0) <= self.step:
                    kept.append(line + "\n")
        ckpt.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))

    # --- the step -------------------------------------------------------------------------------

    def _local_rows(self, t: Tensor) -> Tensor:
        """This rank's rows of a global-batch tensor, micro-batch by micro-batch: the global
        batch's micro-batch i is its rows [i·B/n, (i+1)·B/n), shared out over the ranks, so the
        micro-batches (over which stage 1's BatchNorm takes its statistics) do not depend on the
        number of ranks."""
        if not self.global_randomness or not self.dist.distributed:
            return t
        n, world = self.cfg.grad_accum, self.dist.world_size
        rows = t.reshape(n, world, self.local_batch // n, *t.shape[1:])[:, self.dist.rank]
        return rows.reshape(self.local_batch, *t.shape[1:])

    def _draws(self, step: int) -> dict[str, Tensor]:
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        if self.global_randomness:
            batch, rank = self.cfg.batch_size, 0
        else:
            batch, rank = self.local_batch, self.dist.rank
        def draw(rank: int) -> dict[str, Tensor]:
            seed = _step_seed(self.cfg.seed, step, 0, rank, self.bad_in_a_row)
            g = torch.Generator(device=gen_device).manual_seed(seed)
            return self.objective.draw(step, batch, self.image_shape, g, self.device)

        draws = draw(rank)
        if rank != 0:  # per-batch draws (0-d, e.g. stage 1's noise index) are the same on all ranks
            shared = draw(0)
            draws.update({k: v for k, v in shared.items() if not _is_per_sample(v, batch)})
        return {k: self._local_rows(v) if _is_per_sample(v, batch) else v for k, v in draws.items()}

    def _batch(self, step: int) -> dict[str, Tensor]:
        batch = next(self.loader)
        if self.cfg.mode == "pretrain":
            gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
            rank = 0 if self.global_randomness else self.dist.rank
            seed = _step_seed(self.cfg.seed, step, 1, rank, self.bad_in_a_row)
            g = torch.Generator(device=gen_device).manual_seed(seed)
            image = batch["image"]
            batch = {"image": image, "view1": self.augment[0](image, g), "view2": self.augment[1](image, g)}
        return {k: self._local_rows(v) for k, v in batch.items()}

    def _autocast(self):
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _micro_batches(self, batch: dict[str, Tensor], draws: dict[str, Tensor]):
        """(batch, draws) of each of the step's ``grad_accum`` micro-batches: consecutive rows of
        the local batch; per-batch draws (0-d, like stage 1's grid index) are shared."""
        for name, v in (*batch.items(), *draws.items()):
            if v.dim() > 0 and v.shape[0] != self.local_batch:  # neither per sample nor per batch
                raise RuntimeError(f"{name} has {v.shape[0]} rows where the step has {self.local_batch}")
        n = self.cfg.grad_accum
        rows = self.local_batch // n
        for i in range(n):
            yield tuple({k: v[i * rows : (i + 1) * rows] if v.dim() > 0 else v for k, v in part.items()}
                        for part in (batch, draws))  # fmt: skip

    def _whole_batch_keys(self, micro_batches: list[tuple[dict[str, Tensor], dict[str, Tensor]]]) -> dict[str, Tensor] | None:
        """The InfoNCE keys of every row of the local batch, computed micro-batch by micro-batch
        (at a micro-batch's memory: each key depends on its own sample only, see the
        objectives' ``keys``); None where the step has no key pass."""
        if self.keys_fn is None:
            return None
        with self._autocast():
            parts = [self.keys_fn(b, d) for b, d in micro_batches]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def _gradient_sync(self, last: bool):
        """DDP reduces the gradients once, in the last micro-batch's backward. FSDP reduce-
        scatters every micro-batch's gradients: they then accumulate sharded, where skipping
        the sync would hold every gradient unsharded until the last (the memory FSDP saves)."""
        if last or not isinstance(self.train_model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def train_step(self) -> dict[str, float]:
        """One optimisation step (or a skipped one); returns the logged values.

        With ``grad_accum`` n > 1 the loss is the mean of the n micro-batches' losses, and each
        backward takes 1/n of its own. The InfoNCE keys of the whole batch are computed first
        (no gradient, micro-batch by micro-batch), and each micro-batch's queries contrast with
        all of them, as in one pass. So diffusion and consistency (with its auxiliary InfoNCE)
        take the whole batch's step up to rounding (tested without dropout: with it, each
        micro-batch's forward draws its own masks, so the step is the same in distribution
        only), and so does stage 1 but for its projector's BatchNorm: it normalises the queries
        z over the micro-batch (over ranks), and updates its running statistics n times as
        often. The keys cost no more compute; each micro-batch gathers the whole batch's keys
        over ranks (n times the keys' traffic, which is small: B × 128–768 floats).
        """
        step = self.step
        terms = self._accumulate_gradients(step)
        grad_norm = self._clip_gradients(step)
        values, bad = self._reduced_values(terms, grad_norm)
        if bad:
            self._skip(step, values)
        else:
            self._apply()
        values["skipped"] = self.skipped_total
        return values

    def _accumulate_gradients(self, step: int) -> dict[str, Tensor]:
        """The step's gradients, in ``grad_accum`` micro-batches; returns this rank's loss and
        loss terms, each the mean over the micro-batches."""
        micro_batches = list(self._micro_batches(self._batch(step), self._draws(step)))
        self.optimizer.zero_grad(set_to_none=True)
        n = self.cfg.grad_accum
        keys = self._whole_batch_keys(micro_batches)
        # 1/n of each micro-batch's loss (times the fp16 loss scale) into the gradients
        divisor = n if self.loss_scale is None else n / self.loss_scale
        parts = []
        rows = self.local_batch // n
        for i, (micro_batch, micro_draws) in enumerate(micro_batches):
            # the whole batch's keys, this micro-batch's rolled first: its queries' positives
            own_keys_first = () if keys is None else ({name: k.roll(-i * rows, 0) for name, k in keys.items()},)
            with self._gradient_sync(last=i == n - 1):
                with self._autocast():
                    micro_loss, micro_terms = self.loss_fn(micro_batch, micro_draws, *own_keys_first)
                (micro_loss / divisor).backward()
            parts.append({"loss": micro_loss.detach(), **{k: v.detach() for k, v in micro_terms.items()}})
        if n == 1:
            return parts[0]
        return {k: torch.stack([part[k] for part in parts]).mean() for k in parts[0]}

    def _clip_gradients(self, step: int) -> Tensor:
        """Unscales (fp16) and clips the gradients; returns their norm before clipping."""
        if self.loss_scale is not None:  # gradients back to the loss's scale, before clipping
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], 1.0 / self.loss_scale)
        clipping = self.cfg.grad_clip and (step >= self.cfg.warmup_steps or not self.cfg.clip_after_warmup)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if clipping else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def _reduced_values(self, terms: dict[str, Tensor], grad_norm: Tensor) -> tuple[dict[str, float], bool]:
        """The logged values (loss and terms averaged over ranks) and whether any rank's loss or
        gradient is non-finite, in one collective and one host sync. The stop flag (a signal)
        rides along, so every rank stops after the same step."""
        finite = torch.isfinite(terms["loss"]) & torch.isfinite(grad_norm)
        signals = [finite.new_full((), flag, dtype=torch.float32) for flag in self._signal_flags()]  # no copy
        # flags summed, so any rank's flag counts
        packed = torch.stack([*(t.float() for t in terms.values()), (~finite).float(), *signals])
        packed = distributed.all_reduce_sum(packed).tolist()
        self._agree_on_stop(packed[-len(_STOP_SIGNALS) :])
        world = self.dist.world_size
        values = {name: v / world for name, v in zip(terms, packed)}
        values["grad_norm"] = grad_norm.item()
        values["lr"] = self.scheduler.get_last_lr()[0]
        if self.loss_scale is not None:
            values["loss_scale"] = self.loss_scale
        return values, packed[len(terms)] > 0

    def _signal_flags(self) -> list[float]:
        """Which stop signal this rank received, one flag per signal of _STOP_SIGNALS."""
        return [float(self._interrupted == signum) for signum in _STOP_SIGNALS]

    def _agree_on_stop(self, flags_summed: list[float]) -> None:
        """Sets ``stop_signal`` from every rank's flags: this rank's own signal, else the one
        another rank received (SIGTERM first); 0 for none."""
        received = [signum for signum, n in zip(_STOP_SIGNALS, flags_summed) if n > 0]
        self.stop_signal = (self._interrupted or received[-1]) if received else 0

    def _skip(self, step: int, values: dict[str, float]) -> None:
        """Drops a non-finite step's gradients; raises NonFiniteStop after ``max_bad_steps``
        such steps in a row (fp16 overflows that lower the loss scale not counted)."""
        self.skipped_total += 1
        self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: a finite loss whose gradients overflowed at a scale above 1 asks for a smaller
        # scale, and does not count towards max_bad_steps (the official GradScaler's skip).
        if self.loss_scale is not None and self.loss_scale > 1 and math.isfinite(values["loss"]):
            # not below 1: growth makes the scale no power of two (1.5 would halve to 0.75)
            self.loss_scale = max(1.0, self.loss_scale * LOSS_SCALE_BACKOFF)
            self._overflows_in_a_row += 1
            return
        if self.bad_in_a_row - self._overflows_in_a_row - self._bad_before_resume < self.cfg.max_bad_steps:
            return
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        overflows = (f", {self._overflows_in_a_row} of them fp16 overflows that lowered the loss scale"
                     if self._overflows_in_a_row else "")  # fmt: skip
        raise NonFiniteStop(
            f"stopping: {self.bad_in_a_row} non-finite steps in a row{overflows}, the last at step "
            f"{step} ({shown}); "
            # (the steps made since the last checkpoint are saved on the way out)
            + (f"the newest checkpoint is in {self.ckpt_dir}" if self.step > 0 or self.checkpoints()
               else "no step was made, so there is no checkpoint")
        )

    def _apply(self) -> None:
        """Makes the step: optimiser, schedule, averages, counters."""
        self.bad_in_a_row = self._bad_before_resume = self._overflows_in_a_row = 0
        if self.loss_scale is not None:
            self.loss_scale *= LOSS_SCALE_GROWTH
        self._updating = True  # an exception from here on leaves no consistent state to save
        self.optimizer.step()
        self.scheduler.step()
        self._update_averages()
        self.step += 1
        self._updating = False

    @torch.no_grad()
    def _update_averages(self) -> None:
        for average, source, decay in self._averages:
            torch._foreach_lerp_(average, source, 1.0 - decay)

    # --- the loop -------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, stop_at: int | None = None) -> list[dict[str, Any]]:
        """Train until ``cfg.steps`` (or ``stop_at``); returns the per-step records."""
        cfg = self.cfg
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / ckpt.RUN_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2))
        bar = tqdm(
            total=end, initial=self.step, desc=f"{cfg.mode}", unit="step", dynamic_ncols=True,
            disable=not (cfg.progress and self.dist.is_main),
            mininterval=0.1 if sys.stderr.isatty() else 10.0,  # keep redirected logs short
        )  # fmt: skip
        records = []
        logged_time, logged_step = time.perf_counter(), self.step
        self._interrupted = self.stop_signal = 0
        with self._deferred_interrupt():
            try:
                while self.step < end and not self.stop_signal:
                    before = self.step
                    values = self.train_step()
                    record = {"step": self.step, **values}
                    records.append(record)
                    if self.step == before:  # skipped: no update happened
                        continue
                    bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == end:
                        now = time.perf_counter()
                        elapsed = max(now - logged_time, 1e-9)
                        record["images_per_s"] = cfg.batch_size * (self.step - logged_step) / elapsed
                        logged_time, logged_step = now, self.step
                        self._log(record)
                    if self.stop_signal:  # the checkpoint below; no periodic one, no preview
                        break
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < end:
                        self.save_checkpoint()
                    if self.preview and cfg.preview_every and self.step % cfg.preview_every == 0:
                        self.preview(self, self.step)  # every rank: a sharded EMA samples collectively
            except Exception as exc:
                self._save_before_failing(collective=isinstance(exc, NonFiniteStop))
                raise
            finally:
                bar.close()
            if not self.stop_signal:  # one that came after the last step's collective, on every rank alike
                flags = torch.tensor(self._signal_flags(), device=self.device)
                self._agree_on_stop(distributed.all_reduce_sum(flags).tolist())
            if (self.stop_signal or self.step >= end) and self._saved_step != self.step:
                self.save_checkpoint()
        signum = self.stop_signal or self._interrupted  # (the latter: a signal during that checkpoint)
        if signum:
            rerun = ("; this run has resume=restart, which discards it when run again: rerun with "
                     "resume=auto to continue") if self.cfg.resume == "restart" else ""  # fmt: skip
            raise Interrupted(f"{signal_words(signum)} at step {self.step}; checkpoint saved in {self.ckpt_dir}{rerun}",
                              signum)  # fmt: skip
        return records

    @contextlib.contextmanager
    def _deferred_interrupt(self):
        """Ctrl-C (SIGINT) or SIGTERM ends the run after the current step, with a checkpoint; a
        second Ctrl-C stops at once. SIGTERM is how Slurm, Kubernetes, docker and systemd stop a
        job, and torchrun passes it on to its workers: a worker of a Slurm job gets it twice
        (from Slurm and from torchrun), so a repeated SIGTERM is the same request; the sender's
        SIGKILL ends a run that takes too long. Only the main thread can handle signals;
        elsewhere both act as usual."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        pid = os.getpid()

        def on_signal(signum, frame):
            if os.getpid() != pid:  # a forked data worker: keep serving until the loader closes it
                return
            if self._interrupted:
                if signum == signal.SIGINT:
                    raise Interrupted("interrupted again: stopped at once", signum)
                return
            self._interrupted = signum
            if self.dist.is_main:
                print(f"\n{signal_words(signum)}: saving a checkpoint after this step (Ctrl-C to stop at once)",
                      file=sys.stderr, flush=True)  # fmt: skip

        previous = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _save_before_failing(self, collective: bool) -> None:
        """On an error between steps (a bad image, a stop after non-finite steps), keep the steps
        made since the last checkpoint. With several ranks only for a ``collective`` error, one
        every rank raises at the same step (the non-finite stop, decided on all-reduced values):
        after one rank's own error the others would wait in the checkpoint's collectives."""
        if (self.dist.distributed and not collective) or self._updating or self.step <= self._saved_step:
            return
        try:
            path = self.save_checkpoint()
        except Exception as exc:  # the original error matters more than this one
            print(f"could not save a checkpoint before stopping: {exc}", file=sys.stderr)
            return
        print(f"saved {path} (step {self.step}) before stopping", file=sys.stderr, flush=True)

    def export(self, directory: str | os.PathLike | None = None) -> Path:
        """Save the network to use downstream as an epg checkpoint folder: the EMA model in
        stage 2, the online encoder (with its projector) in stage 1 (the official code fine-tunes
        from the online weights)."""
        if self.step == 0:  # the random initialisation, which --encoder would take without a word
            raise ValueError("nothing is trained yet (step 0): export() saves the network fit() trained")
        directory = Path(directory) if directory else self.run_dir / ckpt.RUN_FINAL_NAME
        net = self.ema if self.ema is not None else self.model
        state = self._module_state(net)
        if self.dist.is_main:
            meta = _export_metadata(self.step, self.cfg.mode, self.cfg.model, self.convention)
            ckpt.save(net, directory, metadata=meta, state_dict=state)
        if self.dist.distributed:
            dist.barrier()
        return directory

    def close(self) -> None:
        close_loader = getattr(getattr(self, "loader", None), "close", None)
        if close_loader is not None:  # the folder loaders own worker processes / a DALI pipeline
            close_loader()
        distributed.teardown()
