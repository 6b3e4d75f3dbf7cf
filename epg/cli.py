"""The ``epg`` command line. The only module that parses arguments; nothing imports it."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict[str, Any]:
    """Versions, backends (and why any is unavailable) and devices, as a dict."""
    import torch

    from . import __version__, _backend, ops

    versions = {
        "epg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "no (CPU build)",
    }
    for dist in ("triton", "numpy", "safetensors", "nvidia-dali-cuda130", "flash-attn"):
        versions[dist] = _version(dist) or "not installed"

    backends = {}
    for name in _backend.BACKENDS:
        backend = _backend.info(name)
        backends[name] = {
            "available": backend.available,
            "detail": backend.reason,
            "ops": sorted(op for op in backend.implementations if op.removesuffix("_backward") in ops.OPS),
        }
    forced = {k: v for k, v in os.environ.items() if k.startswith(_backend.ENV_VAR)}

    devices = [{"type": "cpu", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({
                "type": "cuda", "index": i, "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_GiB": round(props.total_memory / 2**30, 1),
            })  # fmt: skip
    else:
        reason = "torch is a CPU build" if not torch.version.cuda else "no NVIDIA GPU/driver found"
        devices.append({"type": "cuda", "available": False, "reason": reason})
    return {"versions": versions, "backends": backends, "backend_env": forced, "devices": devices}


def _print_info(info: dict[str, Any]) -> None:
    print("epg", info["versions"]["epg"])
    print("\nversions")
    for k, v in info["versions"].items():
        print(f"  {k:<22} {v}")
    print("\nbackends (automatic choice: extension, then Triton, then reference on CUDA tensors;"
          " reference on CPU)")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else "unavailable"
        print(f"  {name:<10} {state}: {b['detail']}")
        if b["available"]:
            print(f"  {'':<10} ops: {', '.join(b['ops']) or 'none'}")
    if info["backend_env"]:
        print("  forced by environment:", ", ".join(f"{k}={v}" for k, v in info["backend_env"].items()))
    print("\ndevices")
    for d in info["devices"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in d.items()))


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epg", description="Pixel-space diffusion and consistency models trained with EPG."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, available backends (and why others are not), devices")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
