"""Safe checkpoint I/O: epg's own format (safetensors + JSON config) and the official EPG files.

Nothing here unpickles arbitrary objects: epg checkpoints are safetensors, and official ``.pth``
files are read with ``torch.load(weights_only=True)``, which refuses any pickle that would run
code. Writes are atomic (temporary file, fsync, rename), so a crash leaves the previous file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .models import build, build_from_config, config_from_dict, config_to_dict
from .models.configs import EPGConfig, RCMConfig, get_config

# The class embedding's key in EPGViT's (and the official DMViT's) state dict.
CLASS_EMBED_KEY = "class_embed.weight"

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
WEIGHTS_DIGEST_KEY = "weights_sha256"  # in config.json: what save() wrote, checked by load()
# A training run folder: the network it exports and the options it ran with.
RUN_FINAL_NAME = "final"
RUN_CONFIG_NAME = "train_config.json"
RUN_CHECKPOINTS_NAME = "checkpoints"  # a training run folder's step_N.pt files
OFFICIAL_NAMES = ("nnet_ema.pth", "nnet.pth")  # in order of preference (EMA weights sample)
_WRAPPER_KEYS = ("nnet_ema", "ema", "model_ema", "state_dict", "model", "nnet", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")
_HEAD_BYTES = 512  # enough of a file's start to tell what it is
_PICKLE_OPCODES = frozenset(op.code for op in pickletools.opcodes)


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not fit the network."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it onto ``path``.

    The file gets the permissions of any newly created file (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(path)
    try:
        write(tmp)
        # The writer may have replaced the file: safetensors writes a 0600 file of its own and
        # renames it onto tmp, which would leave the checkpoint unreadable to a shared group.
        os.chmod(tmp, mode)
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


def _create_temporary(path: Path) -> tuple[str, int]:
    """A new empty file next to ``path``, under a name no other writer uses, and its mode."""
    # Not tempfile.mkstemp, which creates the file 0600: asking for 0666 lets the kernel apply the
    # umask (and any default ACL of the folder), as for a file opened with open(path, "w").
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return str(tmp), stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the directory.

    ``model`` must be an epg network (it carries its config); ``metadata`` is stored in the JSON,
    with the weights file's SHA-256, which :func:`load` checks; ``state_dict`` replaces
    ``model.state_dict()`` (e.g. the gathered state of a sharded model).
    """
    model = unwrapped(model)
    config = getattr(model, "config", None)
    if not isinstance(config, (EPGConfig, RCMConfig)):
        raise TypeError("save() needs an epg network built by epg.models.build")
    directory = Path(directory)
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    created = not directory.exists()
    try:
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: _save_safetensors(state, tmp, directory / WEIGHTS_NAME))
        # Read back from disk: what load() will compare against is the file as stored.
        payload = {"config": config_to_dict(config), "metadata": dict(metadata or {}),
                   WEIGHTS_DIGEST_KEY: weights_digest(directory / WEIGHTS_NAME)}  # fmt: skip
        atomic_write(
            directory / CONFIG_NAME,
            lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True)),
        )
    except BaseException:
        if created:  # (a full disk, say): no half checkpoint that looks like a network to use
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def unwrapped(model: nn.Module) -> nn.Module:
    """The network inside ``torch.compile`` and DDP wrappers, whose state-dict keys carry no
    ``_orig_mod.``/``module.`` prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def _save_safetensors(state: Mapping[str, Tensor], tmp: str, path: Path) -> None:
    try:
        save_file(state, tmp)
    except SafetensorError as exc:  # safetensors reports a full disk as its own error type
        found = re.search(r"os error (\d+)", str(exc))
        errno_ = int(found.group(1)) if found else None
        raise OSError(errno_, f"{path} cannot be written: {os.strerror(errno_) if errno_ else exc}") from exc


def weights_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a weights file (1.3 GB/s on this project's CPU machines)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def checked_weights_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the weights :func:`load` reads for ``path`` (a folder or a weights file in
    one): the digest recorded in ``config.json`` where :func:`load` checks the file against it,
    so a caller that loaded the folder need not read the file again; else computed."""
    path = Path(path)
    weights = path if path.is_file() else path / WEIGHTS_NAME
    if _digest_is_checked(weights):
        _, _, recorded = _read_payload(weights.parent)
        if isinstance(recorded, str):
            return recorded
    return weights_digest(weights)


def _digest_is_checked(weights: Path) -> bool:
    """Whether :func:`load` checks ``weights`` against the recorded digest: the digest is of the
    folder's own weights file, not of another one a caller points at."""
    return weights.name == WEIGHTS_NAME


def _check_digest(weights: Path, recorded: Any) -> None:
    """Refuse a weights file whose bytes are not the ones :func:`save` wrote: safetensors reads a
    changed byte inside a tensor as a silently different weight."""
    if recorded is None:  # a folder written before digests were recorded (_read_payload checks the form)
        return
    actual = weights_digest(weights)
    if actual != recorded:
        raise CheckpointError(
            f"{weights} is damaged: its SHA-256 is not the one recorded in {CONFIG_NAME} when it was "
            f"saved ({actual.removeprefix('sha256:')[:16]}… against {recorded.removeprefix('sha256:')[:16]}…): "
            "the file changed after it was written, as a failing disk or a bad copy does; copy it "
            f"again (if it was changed on purpose, delete {WEIGHTS_DIGEST_KEY!r} from {CONFIG_NAME})"
        )


def torch_save_checksummed(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` with a CRC-32 stored for every record of the archive, whatever the process's
    ``torch.serialization.set_crc32_options`` says, so :func:`zip_damage` can check the file."""
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.set_crc32_options(was)


def zip_damage(path: str | os.PathLike) -> str | None:
    """What is damaged in a ``torch.save`` archive, in words, or None when every record's bytes
    match the CRC-32 written with them.

    ``torch.load`` does not check those checksums: a byte changed inside a tensor's data after the
    file was written (a failing disk, a bad copy) loads as a silently different tensor. Reads the
    whole file (about 2.5 GB/s from the page cache on this project's CPU machines)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        return f"its archive structure is damaged ({exc})"
    if bad is None:
        return None
    return (f"the bytes of its record {bad!r} do not match the checksum written with them: the file "
            "changed on disk after it was saved")  # fmt: skip


def is_epg_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save` or its ``.safetensors`` file (not an official
    ``.pth``)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or path.suffix == ".safetensors"


def read_config(directory: str | os.PathLike) -> tuple[EPGConfig | RCMConfig, dict[str, Any]]:
    """The network config and the metadata stored by :func:`save`."""
    config, metadata, _ = _read_payload(directory)
    return config, metadata


def _read_payload(directory: str | os.PathLike) -> tuple[EPGConfig | RCMConfig, dict[str, Any], Any]:
    """The config, the metadata and the recorded weights digest (None if absent) of ``config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory} (an epg checkpoint folder holds "
                                f"{WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or "config" not in payload:
            raise ValueError('no "config" key (the network config that save() writes)')
        if not isinstance(payload["config"], dict):
            raise ValueError(f'"config" must be a JSON object (the network config), '
                             f'got {json.dumps(payload["config"])}')
        metadata, digest = payload.get("metadata", {}), payload.get(WEIGHTS_DIGEST_KEY)
        if not isinstance(metadata, dict):  # a hand edit: generate and train read keys of it
            raise ValueError(f'"metadata" must be a JSON object or absent, got {json.dumps(metadata)}')
        if digest is not None and not (isinstance(digest, str) and digest.startswith("sha256:")):
            raise ValueError(f"{WEIGHTS_DIGEST_KEY!r} must be a string 'sha256:<hex>', got "
                             f"{json.dumps(digest)}; delete the key to load without the check")  # fmt: skip
        return config_from_dict(payload["config"]), metadata, digest
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        head = _read_head(path)
        kind = _file_kind(head)
        what = f" ({_looks_like(kind, head)})" if kind in ("empty", "lfs-pointer", "html") else ""
        raise CheckpointError(f"{path} is not a valid epg config{what}: {exc}") from exc


def run_folder_of(checkpoint_file: Path) -> Path | None:
    """The training run folder a ``RUN/checkpoints/step_N.pt`` lies in; None for a file elsewhere."""
    return checkpoint_file.parent.parent if checkpoint_file.parent.name == RUN_CHECKPOINTS_NAME else None


def run_output(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a training run folder (no config.json, a ``final/``) the network
    the run exported. A missing path, or a run that has not finished (checkpoints, no
    ``final/``), is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        if (path / RUN_FINAL_NAME).is_dir():
            return path / RUN_FINAL_NAME
        if any((path / RUN_CHECKPOINTS_NAME).glob("step_*.pt")):
            raise FileNotFoundError(
                f"{path} is a training run that has not finished (no {RUN_FINAL_NAME}/ yet); `epg export "
                f"{path}` writes the network of its newest checkpoint as a folder to use"
            )
    return path


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's undecodable bytes, as surrogate escapes
        return False
    return True


def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network saved by :func:`save` and load its weights (strictly); in eval mode.

    ``directory`` is the folder :func:`save` wrote, a ``.safetensors`` file in such a folder, or
    a finished training run folder (its ``final/``).
    """
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N)") from exc
    path = run_output(directory)
    if path.is_file() and path.suffix != ".safetensors":
        _refuse_other_file(path)
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        official = [n for n in OFFICIAL_NAMES if (path / n).is_file()]
        if official:
            raise CheckpointError(f"{path} holds an official EPG checkpoint ({official[0]}): read it with "
                                  "checkpoint.load_official(path, config_name)")  # fmt: skip
    if path.is_file():  # the weights file itself was given: its folder holds the config
        directory, weights = path.parent, path
    else:
        directory, weights = path, path / WEIGHTS_NAME
    config, _, recorded_digest = _read_payload(directory)
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        if _is_utf8(str(weights)):
            state = load_file(str(weights), device=str(device))
        else:  # safetensors opens UTF-8 paths only; a Linux name may be any bytes
            state = {k: v.to(device) for k, v in load_bytes(weights.read_bytes()).items()}
    except (SafetensorError, OSError) as exc:
        head = _read_head(weights)
        kind = _file_kind(head)
        if kind != "safetensors":
            raise CheckpointError(
                f"{weights} is not a safetensors file: {_looks_like(kind, head)} ({exc})"
            ) from exc
        raise CheckpointError(
            f"{weights} is corrupt, perhaps truncated by an interrupted copy or download "
            f"({weights.stat().st_size} bytes): {exc}"
        ) from exc
    if _digest_is_checked(weights):
        _check_digest(weights, recorded_digest)
    return _materialize(build_from_config, config, state, device, str(weights))


def _refuse_other_file(path: Path) -> None:
    """A file :func:`load` cannot read: named with the function or command that reads it."""
    if run_folder_of(path) is not None:
        raise CheckpointError(f"{path} is a training checkpoint; `epg export {path}` writes its network "
                              "as a folder that load() reads")  # fmt: skip
    raise CheckpointError(
        f"{path} is not an epg checkpoint: load() reads the folder save() wrote ({WEIGHTS_NAME} and "
        f"{CONFIG_NAME}) or its {WEIGHTS_NAME}; an official .pth goes through "
        "checkpoint.load_official(path, config_name), a training step_N.pt through `epg export`"
    )


def network_from_state(
    config: EPGConfig | RCMConfig, state: Mapping[str, Tensor], source: str, device: str | torch.device = "cpu"
) -> nn.Module:
    """The network of ``config`` holding ``state`` (loaded strictly; errors name ``source``), in
    eval mode."""
    return _materialize(build_from_config, config, state, device, source)


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
    # Eval mode, ready to sample: dropout (0.5 in the consistency decoders) stays off unless a
    # caller asks for .train(), as the Trainer does.
    return model.to(device).eval()


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
    # In whatever order they nest: torch.compile(DDP(net)) saves "_orig_mod.module.".
    while state:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def official_file(path: str | os.PathLike) -> Path:
    """The file an official checkpoint path names: the path itself, or for a folder its
    ``nnet_ema.pth`` (else ``nnet.pth``)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in OFFICIAL_NAMES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds none of {OFFICIAL_NAMES} (found: {sorted(p.name for p in path.iterdir())[:20]})"
            )
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def read_official_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of an official EPG/RCM checkpoint, with a ``module.`` prefix removed.

    ``path`` is a directory holding ``nnet_ema.pth`` (else ``nnet.pth``), a bare state-dict
    ``.pth``, or a ``.pth`` of a dict wrapping one. Read with ``weights_only=True``: a file whose
    unpickling would execute code is refused.
    """
    path = official_file(path)
    head = _read_head(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # Any exception: torch.load's safe unpickler is pure Python, and damaged or foreign bytes
        # surface as whatever it trips over (KeyError, IndexError, EOFError...). The error names
        # the cause and keeps torch's exception chained.
        raise _official_load_error(path, head, exc) from exc
    return _strip_prefixes(_unwrap(obj, str(path)))


def _official_load_error(path: Path, head: bytes, exc: Exception) -> CheckpointError:
    """The error for a ``.pth`` file that ``torch.load(weights_only=True)`` could not read."""
    kind = _file_kind(head)
    if kind not in ("zip", "pickle"):  # torch.save writes a zip archive (a pickle before 1.6)
        return CheckpointError(f"{path} is not a PyTorch checkpoint: {_looks_like(kind, head)}")
    cause = torch_load_cause(exc)
    if _is_unsafe_pickle_refusal(exc):
        return CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint, and unpickling it could "
            f"run code (torch.load(weights_only=True): {cause})"
        )
    size = path.stat().st_size
    if _is_cut_short(path, kind, exc):
        return CheckpointError(f"{path} is corrupt: {_cut_short(kind, size)}; fetch it again ({cause})")
    return CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({size} bytes): {cause}")


def _is_cut_short(path: Path, kind: str, exc: Exception) -> bool:
    """Whether a torch.save file that torch.load could not read looks truncated."""
    # A pre-1.6 pickle cut within its tensor data: torch says "unexpected EOF, expected N more bytes".
    cut_in_data = kind == "pickle" and "unexpected EOF" in str(exc)
    return isinstance(exc, EOFError) or cut_in_data or (kind == "zip" and not zipfile.is_zipfile(path))


def _cut_short(kind: str, size: int) -> str:
    container = "a zip archive" if kind == "zip" else "a pickle"
    return (f"it begins as a PyTorch checkpoint ({container}) but does not read as one, as happens "
            f"to a file truncated by an interrupted copy, download or write ({size} bytes)")  # fmt: skip


def unreadable_cause(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, in words: empty, cut short, another kind of
    file, or torch's own cause (torch says "EOFError" for an empty file, and a paragraph about
    miniz for a truncated one)."""
    try:
        head, size = _read_head(path), path.stat().st_size
    except OSError as err:
        return f"{err.strerror or err}"
    kind = _file_kind(head)
    if kind == "empty":
        return "the file is empty (0 bytes)"
    if kind not in ("zip", "pickle"):
        return _looks_like(kind, head)
    if _is_cut_short(path, kind, exc):
        return _cut_short(kind, size)
    return torch_load_cause(exc)


def _is_unsafe_pickle_refusal(exc: Exception) -> bool:
    """True when ``torch.load(weights_only=True)`` refused a pickle for what it would import or
    call, False for damage (an unknown opcode) or any other failure."""
    if not isinstance(exc, pickle.UnpicklingError):
        return False
    operand = re.search(r"Unsupported operand (\d+)", str(exc))
    # A real pickle opcode that the safe unpickler lacks (e.g. STACK_GLOBAL, which imports a
    # callable) is a refusal; a byte that is no opcode at all is damage.
    return operand is None or chr(int(operand.group(1))) in _PICKLE_OPCODES


def torch_load_cause(exc: Exception) -> str:
    """The cause in a torch.load error, without torch's advice on how to load the file anyway."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch wraps the safe unpickler's own message in lines that suggest retrying with
    # weights_only=False: the very code execution the refusal exists to prevent. Every wrapping
    # line mentions weights_only; the cause itself is the last line that does not.
    cause = [line for line in lines if "weights_only" not in line]
    text = (cause or lines or [""])[-1].removeprefix("WeightsUnpickler error:").strip()
    return text or type(exc).__name__


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def _file_kind(head: bytes) -> str:
    """What a file is, from its first bytes: "empty", "lfs-pointer", "html", "zip", "pickle",
    "safetensors", "text" or "unknown"."""
    if not head:
        return "empty"
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return "lfs-pointer"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    # safetensors: the JSON header's length (8 bytes, little-endian, far below 2**32), then it
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**32:
        return "safetensors"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and (b"<html" in text or b"<!doctype html" in text):
        return "html"
    if not any(byte < 0x20 and byte not in b"\t\n\r\f" for byte in head):
        return "text"
    return "unknown"


def _looks_like(kind: str, head: bytes) -> str:
    """What a file of ``kind`` (:func:`_file_kind`) is, and what to do about it, for errors."""
    if kind == "text":
        lines = head.decode("utf-8", errors="replace").strip().splitlines()
        return f"it is a text file, starting {lines[0][:80]!r}" if lines else "it is blank text"
    return {
        "empty": "the file is empty (0 bytes); copy or download it again",
        "lfs-pointer": "it is a Git LFS pointer, a small text file standing in for the real one; "
                       "fetch the real file with `git lfs pull` in the repository it came from",
        "html": "it is an HTML page, probably a failed download (an error or sign-in page saved "
                "under the file's name); download the file itself again",
        "zip": "it is a zip archive, as torch.save writes (a released .pth is read by "
               "load_official, or `epg sample --official PATH --config NAME`)",
        "pickle": "it is a pickle, as torch.save wrote before PyTorch 1.6 (a released .pth is read "
                  "by load_official, or `epg sample --official PATH --config NAME`)",
        "safetensors": "it is a safetensors file, epg's own format (read by epg.checkpoint.load, "
                       "or `epg sample FOLDER` without --official)",
    }.get(kind, f"its first bytes are {head[:8].hex(' ')}")


def load_official(
    path: str | os.PathLike, config_name: str, device: str | torch.device = "cpu", **overrides: Any
) -> nn.Module:
    """Build ``config_name`` (e.g. ``"epg-xl-16"``) and load an official checkpoint into it,
    unchanged and strictly: missing, unexpected and shape-mismatched keys are reported by name.
    The network comes back in eval mode.

    A stage-2 file without ``class_embed.weight`` is taken as an unconditional network
    (``num_classes=0``) unless ``num_classes`` is given: the official code has a class-conditional
    and an unconditional consistency config, and which one the released one-step model was
    trained with is open (epg-method.md §12, §13.8); the file says."""
    path = official_file(path)  # a key mismatch names the file read, not only its folder
    state = read_official_state_dict(path)
    if "num_classes" not in overrides and _unconditional_official(config_name, state):
        overrides["num_classes"] = 0
    return _materialize(lambda name: build(name, **overrides), config_name, state, device, str(path))


def _unconditional_official(config_name: str, state: Mapping[str, Tensor]) -> bool:
    """Whether an official state dict is a stage-2 network without class conditioning (its
    decoder keys there, ``class_embed.weight`` not), for a conditional stage-2 config."""
    config = get_config(config_name)
    return (isinstance(config, EPGConfig) and config.num_classes > 0 and CLASS_EMBED_KEY not in state
            and any(key.startswith("decoder_blocks.") for key in state))  # fmt: skip
