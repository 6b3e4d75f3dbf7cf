"""The ``epg`` command line. The only module that parses arguments; nothing imports it."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
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


def _parse_sets(pairs: list[str]) -> list[tuple[str, Any]]:
    import yaml

    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        parsed.append((key.strip(), yaml.safe_load(raw)))
    return parsed


def _train_config(args: argparse.Namespace, mode_options: dict[str, Any]):
    from .presets import get_preset, read_config_file, set_option
    from .train import TrainConfig

    options: dict[str, Any] = get_preset(args.preset) if args.preset else {}
    if args.config:
        for key, value in read_config_file(args.config).items():
            options[key] = value
    for key, value in mode_options.items():
        if value is not None:
            options[key] = value
    for key, value in _parse_sets(args.set):
        set_option(options, key, value)
    return TrainConfig.from_dict(options)


def _cmd_train(args: argparse.Namespace, mode_options: dict[str, Any]) -> int:
    from .train import Trainer

    cfg = _train_config(args, mode_options)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        out = trainer.export()
        if trainer.dist.is_main:
            print(f"done at step {trainer.step}; network saved to {out}")
    finally:
        trainer.close()
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    return _cmd_train(args, {"mode": "pretrain", "run_dir": args.run_dir})


def _cmd_finetune(args: argparse.Namespace) -> int:
    return _cmd_train(
        args, {"mode": args.objective, "encoder": args.encoder, "run_dir": args.run_dir}
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(objective=args.objective, out_dir=args.out, seed=args.seed)
    if args.quick:
        cfg.stage1_steps, cfg.stage2_steps, cfg.samples_per_class = 20, 40, 10
    print(f"epg demo: {cfg.objective} on the embedded digits; output in {Path(cfg.out_dir).resolve()}")
    metrics = run_demo(cfg)
    print(f"\nsamples labelled as their class by the digit classifier: {metrics['accuracy']:.1%}")
    print(f"Fréchet distance (classifier features) samples vs real test digits: "
          f"{metrics['frechet_distance']:.2f}; real train vs real test: "
          f"{metrics['reference_frechet_distance']:.2f}")
    print(f"wall time {metrics['wall_time_s']:.0f} s")
    out = Path(cfg.out_dir).resolve()
    print(f"sample grid: {out / 'samples.png'}\nmetrics:     {out / 'metrics.json'}")
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a recipe of epg.presets (e.g. diffusion-epg-xl-16)")
    p.add_argument("--config", help="a YAML or JSON file of training options")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option (dotted keys reach nested ones: objective.tau_rc=0.1)")
    p.add_argument("--run-dir", help="the run folder (logs, checkpoints, the final network)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epg", description="Pixel-space diffusion and consistency models trained with EPG."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, available backends (and why others are not), devices")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)

    pre = sub.add_parser("pretrain", help="stage 1: self-supervised pre-training of the encoder")
    _add_train_options(pre)
    pre.set_defaults(func=_cmd_pretrain)

    fin = sub.add_parser("finetune", help="stage 2: diffusion or consistency fine-tuning")
    fin.add_argument("--objective", choices=("diffusion", "consistency"), required=True)
    fin.add_argument("--encoder", help="stage-1 checkpoint: an epg folder or an official RCM .pth")
    _add_train_options(fin)
    fin.set_defaults(func=_cmd_finetune)

    demo = sub.add_parser("demo", help="both stages, sampling and a quality check on bundled digits (CPU, minutes)")
    demo.add_argument("--objective", choices=("diffusion", "consistency"), default="diffusion")
    demo.add_argument("--out", default="epg-demo", help="output folder (default: ./epg-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not quality")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
