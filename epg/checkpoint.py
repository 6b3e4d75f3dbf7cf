"""Safe checkpoint I/O: epg's own format (safetensors + JSON config) and the official EPG files.

Nothing here unpickles arbitrary objects: epg checkpoints are safetensors, and official ``.pth``
files are read with ``torch.load(weights_only=True)``, which refuses any pickle that would run
code. Writes are atomic (temporary file, fsync, rename), so a crash leaves the previous file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .models import build, build_from_config, config_from_dict, config_to_dict
from .models.configs import EPGConfig, RCMConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
OFFICIAL_NAMES = ("nnet_ema.pth", "nnet.pth")  # in order of preference (EMA weights sample)
_WRAPPER_KEYS = ("nnet_ema", "ema", "model_ema", "state_dict", "model", "nnet", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not fit the network."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the directory.

    ``model`` must be an epg network (it carries its config); ``metadata`` is stored in the JSON;
    ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered state of a sharded model).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, (EPGConfig, RCMConfig)):
        raise TypeError("save() needs an epg network built by epg.models.build")
    directory = Path(directory)
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    payload = {"config": config_to_dict(config), "metadata": dict(metadata or {})}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
    atomic_write(
        directory / CONFIG_NAME,
        lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True)),
    )
    return directory


def is_epg_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save` or its ``.safetensors`` file (not an official
    ``.pth``)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or path.suffix == ".safetensors"


def read_config(directory: str | os.PathLike) -> tuple[EPGConfig | RCMConfig, dict[str, Any]]:
    """The network config and the metadata stored by :func:`save`."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory} (an epg checkpoint folder holds "
                                f"{WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        payload = json.loads(path.read_text())
        return config_from_dict(payload["config"]), payload.get("metadata", {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid epg config: {exc}") from exc


def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network saved by :func:`save` and load its weights (strictly)."""
    directory = Path(directory)
    if directory.is_file():  # the .safetensors file itself was given
        directory = directory.parent
    config, _ = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {exc}") from exc
    return _materialize(build_from_config, config, state, device, str(weights))


def _materialize(builder, config, state, device, source: str) -> nn.Module:
    # Built on the meta device and then given the checkpoint's tensors: no throwaway random init.
    with torch.device("meta"):
        model = builder(config)
    load_state_dict_strict(model, state, source=source, assign=True)
    # A file saved in half precision is widened: training keeps fp32 weights (bf16 only under
    # autocast) and sampling runs in fp32 unless asked for bf16 autocast.
    half = (torch.float16, torch.bfloat16)
    if any(t.dtype in half for t in model.state_dict().values()):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype in half:
                t.data = t.data.float()
    return model.to(device)


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, Tensor], source: str, assign: bool = False
) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error naming every bad key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
            problems.append(f"{len(keys)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} ({getattr(model, 'config', '')}): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True, assign=assign)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        candidates = [k for k, v in obj.items() if _is_state_dict(v)]
        if len(candidates) == 1:
            return dict(obj[candidates[0]])
        raise CheckpointError(
            f"{source} holds a dict with keys {sorted(map(str, obj))[:20]}; expected a state dict "
            f"or a dict wrapping exactly one (found {len(candidates)})"
        )
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_official_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of an official EPG/RCM checkpoint, with a ``module.`` prefix removed.

    ``path`` is a directory holding ``nnet_ema.pth`` (else ``nnet.pth``), a bare state-dict
    ``.pth``, or a ``.pth`` of a dict wrapping one. Read with ``weights_only=True``: a file whose
    unpickling would execute code is refused.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in OFFICIAL_NAMES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds none of {OFFICIAL_NAMES} (found: {sorted(p.name for p in path.iterdir())[:20]})"
            )
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        detail = next((ln.strip() for ln in lines if "global" in ln.lower()), lines[0] if lines else "")
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint, and unpickling it could "
            f"run code (torch.load(weights_only=True): {detail})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint: {exc}") from exc
    return _strip_prefixes(_unwrap(obj, str(path)))


def load_official(
    path: str | os.PathLike, config_name: str, device: str | torch.device = "cpu", **overrides: Any
) -> nn.Module:
    """Build ``config_name`` (e.g. ``"epg-xl-16"``) and load an official checkpoint into it,
    unchanged and strictly: missing, unexpected and shape-mismatched keys are reported by name."""
    state = read_official_state_dict(path)
    return _materialize(lambda name: build(name, **overrides), config_name, state, device, str(path))
