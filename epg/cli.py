"""The ``epg`` command line. The only module that parses arguments; nothing imports it."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

# The sampler names, without importing torch to build the parser (kept equal to
# epg.sampling.SAMPLERS by tests/test_generate.py).
_SAMPLERS = ("heun", "euler", "euler_ancestral", "euler_sde", "edm_sde", "consistency")


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
    for dist in ("triton", "numpy", "pillow", "safetensors", "nvidia-dali-cuda130", "flash-attn"):
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
    return {"versions": versions, "backends": backends, "backend_env": forced,
            "backend_env_problems": _backend.environment_problems(), "devices": devices}  # fmt: skip


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
    for problem in info["backend_env_problems"]:
        print(f"  PROBLEM (every other command refuses to start): {problem}")
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

    from .presets import load_yaml

    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            parsed.append((key.strip(), load_yaml(raw)))
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {pair}: the value is not valid YAML ({exc})") from exc
    return parsed


def _train_config(args: argparse.Namespace, mode_options: dict[str, Any]):
    from .presets import get_preset, read_config_file, set_option
    from .train import TrainConfig

    options: dict[str, Any] = get_preset(args.preset) if args.preset else {}
    mode = mode_options["mode"]
    if options.get("mode", mode) != mode:  # a diffusion recipe would train a consistency model
        raise ValueError(f"preset {args.preset} is a {options['mode']} recipe, not {mode}")
    if args.config:
        from_file = read_config_file(args.config)
        if from_file.get("mode", mode) != mode:  # as for a preset: its options are another mode's
            raise ValueError(f"{args.config} is a {from_file['mode']} config, not {mode}")
        options.update(from_file)
    for key, value in mode_options.items():
        if value is not None:
            options[key] = value
    sets = _parse_sets(args.set)
    flags = {"mode": f"epg {args.command}" + (f" --objective {mode}" if args.command == "finetune" else ""),
             "run_dir": "--run-dir", "encoder": "--encoder"}  # fmt: skip
    for key, value in sets:
        if mode_options.get(key) is not None and value != mode_options[key]:
            raise ValueError(f"--set {key}={value} contradicts {flags[key]} ({mode_options[key]})")
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


def _cmd_export(args: argparse.Namespace) -> int:
    from .train import export_checkpoint

    out, meta = export_checkpoint(args.checkpoint, args.out)
    network = "online encoder" if meta["mode"] == "pretrain" else "EMA network"
    print(f"exported the {network} of {meta['source']} ({meta['mode']} {meta['model']}, step {meta['step']}) to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(objective=args.objective, out_dir=args.out, seed=args.seed)
    if args.quick:
        cfg.stage1_steps, cfg.stage2_steps, cfg.samples_per_class = 20, 40, 10
    cfg.validate()  # before the folder is named or made
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


def _check_output(path: Path, folder: bool) -> None:
    """Refuse an output path that cannot be written, before any work: ``path`` is a folder to
    make or fill (``folder``) or a file to write, and the nearest existing folder on its way
    must take new files."""
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; the output needs a folder")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the output needs a file name")
    nearest = path if folder else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise NotADirectoryError(f"{nearest} is a file, not a folder: {path} cannot be written")
    # Write permission bits say nothing for root, nor for /proc or a read-only mount: try it.
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as exc:
        raise OSError(f"{path} cannot be written: creating a file in {nearest} fails "
                      f"({exc.strerror or exc})") from exc


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch.distributed as torch_dist

    from . import distributed
    from .generate import (
        GUIDANCE_SCALES,
        SampleSettings,
        check_resume,
        check_sampling,
        load_network,
        run_sampling,
        training_class_counts,
    )

    _check_output(Path(args.out), folder=True)  # before the network is read (and hashed)
    dist_info = distributed.setup(args.device)
    try:
        net, info = load_network(args.checkpoint, args.official, args.config, dist_info.device)
        conditional = net.config.num_classes > 0
        mode = args.mode or info.get("mode", "diffusion")
        guidance = args.guidance
        if guidance is None:
            released = GUIDANCE_SCALES.get(info.get("config") or "", 1.0)
            guidance = released if mode == "diffusion" and conditional else 1.0
        sampler = args.sampler or ("heun" if mode == "diffusion" else "consistency")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        steps = args.steps or (32 if sampler != "consistency" else 1)
        labels = args.labels if conditional else "none"
        class_counts = None
        if args.class_counts:
            if not conditional:
                raise ValueError("--class-counts: this network is unconditional (no class labels)")
            if labels != "random":
                raise ValueError("--class-counts goes with --labels random")
            # One scan (slow at ImageNet scale on a network file system), shared with every rank.
            counts = [training_class_counts(args.class_counts) if dist_info.is_main else None]
            if dist_info.distributed:
                torch_dist.broadcast_object_list(counts, src=0)
            class_counts = counts[0]
        convention = args.convention or info.get("convention", "imagenet")
        channels = net.config.in_channels
        if convention == "imagenet" and channels != 3:
            if args.convention:
                given = "--convention imagenet"
            elif "convention" in info:
                given = f"the convention {info['source']} records, imagenet,"
            else:
                given = f"{info['source']} records no convention, and the default, imagenet,"
            raise ValueError(f"{given} needs 3 channels; this network has {channels}: pass "
                             "--convention simple (or the convention it was trained with)")
        interval = (0.0, float("inf")) if args.no_interval else tuple(args.interval)
        settings = SampleSettings(
            num_images=args.num_images, mode=mode, sampler=sampler, steps=steps, guidance=guidance,
            guidance_interval=interval, trailing_zero=args.trailing_zero, clamp=not args.no_clamp,
            labels=labels, class_counts=class_counts, seed=args.seed, convention=convention,
            precision=args.precision, model=info["source"], weights=info["weights"],
        )  # fmt: skip
        # Before the banner, which would announce e.g. "0 images" or a guidance that does nothing,
        # and before the output folder is touched.
        check_sampling(net, settings, batch_size=args.batch_size, cuda_graph=args.cuda_graph)
        note = check_resume(args.out, settings, args.overwrite)
        if dist_info.is_main:
            print(f"epg sample: {settings.num_images} images, {sampler} ({steps} steps), guidance "
                  f"{guidance:g}, {mode} network from {info['source']}, {settings.precision} on "
                  f"{dist_info.device} x{dist_info.world_size} -> {Path(args.out).resolve()}")
            if "note" in info:
                print(f"note: {info['note']}")
            if note:
                print(note)
        summary = run_sampling(
            net, args.out, settings, batch_size=args.batch_size, rank=dist_info.rank,
            world_size=dist_info.world_size,
            barrier=torch_dist.barrier if dist_info.distributed else None,
            compile=args.compile, cuda_graph=args.cuda_graph, overwrite=args.overwrite,
            progress=not args.no_progress,
        )  # fmt: skip
        if dist_info.is_main:
            if summary["sampled_now_by_this_rank"] == 0:
                which = (f"all {settings.num_images} images" if dist_info.world_size == 1
                         else "rank 0's share of the images")  # the others report nothing
                print(f"nothing left to sample: {which} were there")
            else:
                rate = summary["images_per_s"]
                print(f"network passes per image: {summary['passes_per_image']}; "
                      f"{rate if rate is not None else '-'} images/s on rank 0")
            print(f"images:  {Path(args.out).resolve() / 'images'}\nnpz:     {summary['npz']}\n"
                  f"preview: {summary['preview']}")
    finally:
        distributed.teardown()
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    if args.quality is not None and args.format != "jpeg":  # PNG is lossless: it was ignored
        raise ValueError(f"--quality is for --format jpeg (PNG is lossless), got --quality {args.quality}")
    _check_output(Path(args.dst), folder=True)
    quality = 95 if args.quality is None else args.quality
    report = prepare(args.src, args.dst, args.resolution, workers=args.workers,
                     progress=not args.no_progress, format=args.format, quality=quality)  # fmt: skip
    print(report)
    if report.index_list is not None:
        print(f"index: {report.index_list}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write
    from .evaluation import evaluate, format_table, save_reference_statistics

    common = dict(weights=args.inception_weights, batch_size=args.batch_size, device=args.device,
                  progress=not args.no_progress)  # fmt: skip
    if (args.ref is None) == (args.save_ref is None):
        raise ValueError("give --ref REF.npz (evaluate SAMPLES against it) or --save-ref OUT.npz "
                         "(save SAMPLES' statistics as a reference)")
    if args.save_ref and args.json:  # it was never written
        raise ValueError("--json is where --ref writes the metrics; --save-ref computes none (it "
                         "saves SAMPLES' statistics to OUT.npz): leave --json out")
    # The output path is settled and checked before the Inception pass, not after it.
    samples = Path(args.samples).resolve()
    if args.save_ref:
        out = Path(args.save_ref)
    else:
        out = Path(args.json) if args.json else samples.with_name(samples.stem + "_metrics.json")
    inputs = [samples] + ([Path(args.ref).resolve()] if args.ref else [])
    if out.resolve() in inputs:
        raise ValueError(f"{out} is an input of this evaluation; writing there would overwrite it")
    _check_output(out, folder=False)
    if args.save_ref:
        saved = save_reference_statistics(args.samples, args.save_ref, **common)
        print(f"reference statistics of {saved['num_images']} images saved to {saved['path']}")
        return 0
    results = evaluate(args.samples, args.ref, **common)
    print(format_table(results))
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(f"metrics: {out}")
    return 0


# The options of epg.train.TrainConfig, named in the training commands' help. Written out here
# because every command builds the parser, and importing epg.train for it would cost each one
# 1.2 s; a test keeps the two in step.
TRAIN_OPTION_GROUPS = (
    ("what", ("mode", "model", "model_overrides.*", "data", "data_options.*", "run_dir", "encoder",
              "init", "perceptual", "perceptual_config")),
    ("steps and batch", ("steps", "batch_size", "grad_accum", "activation_checkpointing")),
    ("optimiser", ("lr", "betas", "weight_decay", "no_weight_decay", "lr_schedule", "warmup_steps",
                   "lr_milestones", "lr_factors", "grad_clip", "clip_after_warmup", "ema_decay",
                   "target_ema")),
    ("objective and data", ("objective.*", "augment.*")),
    ("running", ("compile", "precision", "device", "seed", "parallel", "global_randomness",
                 "resume", "progress", "max_bad_steps")),
    ("output", ("log_every", "ckpt_every", "keep_checkpoints", "preview_every")),
)  # fmt: skip
# Left out of the other stage's help: epg.train.UNUSED_OPTIONS (a test keeps them in step).
STAGE1_ONLY_OPTIONS = ("augment.*", "target_ema")
STAGE2_ONLY_OPTIONS = ("init", "encoder", "perceptual", "perceptual_config", "preview_every", "ema_decay")


class _NamesHelpFormatter(argparse.HelpFormatter):
    """Wraps paragraphs without breaking a name at its hyphen (diffusion-epg-xl-16)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = " ".join(text.split())
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _train_epilog(stage1: bool) -> str:
    from .presets import PRESETS

    presets = [name for name, preset in PRESETS.items() if (preset["mode"] == "pretrain") == stage1]
    other_stage = STAGE2_ONLY_OPTIONS if stage1 else STAGE1_ONLY_OPTIONS
    groups = "; ".join(f"{name}: {', '.join(key for key in keys if key not in other_stage)}"
                       for name, keys in TRAIN_OPTION_GROUPS)  # fmt: skip
    return (f"presets: {', '.join(presets)} (epg/presets.py). Options for --set KEY=VALUE "
            f"(epg.train.TrainConfig, defaults and meanings there; batch_size is the global batch) "
            f"— {groups}.")  # fmt: skip


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

    pre = sub.add_parser("pretrain", help="stage 1: self-supervised pre-training of the encoder",
                         epilog=_train_epilog(stage1=True), formatter_class=_NamesHelpFormatter)  # fmt: skip
    _add_train_options(pre)
    pre.set_defaults(func=_cmd_pretrain)

    fin = sub.add_parser("finetune", help="stage 2: diffusion or consistency fine-tuning",
                         epilog=_train_epilog(stage1=False), formatter_class=_NamesHelpFormatter)  # fmt: skip
    fin.add_argument("--objective", choices=("diffusion", "consistency"), required=True)
    fin.add_argument("--encoder", help="stage-1 checkpoint: an epg folder or an official RCM .pth")
    _add_train_options(fin)
    fin.set_defaults(func=_cmd_finetune)

    exp = sub.add_parser(
        "export", help="write a training checkpoint's network as an epg checkpoint folder (sample an unfinished run)",
        description="Write the network of a training checkpoint (the EMA network in stage 2, the online "
        "encoder in stage 1) as an epg checkpoint folder, as the run's final/ would hold it: "
        "`epg sample` and `epg finetune --encoder` read it.",
    )  # fmt: skip
    exp.add_argument("checkpoint", help="a checkpoints/step_N.pt file, or a run folder (its newest readable checkpoint)")
    exp.add_argument("--out", help="output folder (default: RUN/exports/step_N)")
    exp.set_defaults(func=_cmd_export)

    prep = sub.add_parser(
        "prepare", help="centre-crop an ImageNet-style folder to RES x RES PNGs (ADM preprocessing)",
        description="Resize (box-halving, then bicubic) and centre-crop every image of SRC/<class>/ "
        "into DST/<class>/<name>.png. Resumable; unreadable files are skipped and listed in "
        "DST/skipped.txt.",
    )
    prep.add_argument("src", help="raw image tree: one folder per class")
    prep.add_argument("dst", help="output folder")
    prep.add_argument("--resolution", type=int, default=256, help="output side (default 256)")
    prep.add_argument("--format", choices=("png", "jpeg"), default="png",
                      help="png: lossless, as the paper trained (default); jpeg: ~6x smaller, "
                      "what GPU decoders read fastest")
    prep.add_argument("--quality", type=int, help="JPEG quality, 1-95 (default 95; --format jpeg only)")
    prep.add_argument("--workers", type=int, help="processes (default: all CPUs)")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=_cmd_prepare)

    smp = sub.add_parser(
        "sample", help="sample images to PNGs + an ADM-layout .npz (epg or official checkpoints; torchrun)",
        description="Sample images from a stage-2 network. Resumable: rerun the same command to "
        "finish an interrupted run. Under torchrun each rank samples its own index range.",
    )
    smp.add_argument("checkpoint", nargs="?", help="an epg checkpoint folder (or a training run folder)")
    smp.add_argument("--official", metavar="PATH", help="a released .pth (or folder with nnet_ema.pth)")
    smp.add_argument("--config", help="the network config of --official (e.g. epg-xl-16, epg-l-32)")
    smp.add_argument("--out", required=True, help="output folder")
    smp.add_argument("--num-images", type=int, default=50_000, help="number of images (default 50000)")
    smp.add_argument("--mode", choices=("diffusion", "consistency"),
                     help="the network's output (default: recorded in the checkpoint; for --official the "
                     "released network's: consistency for epg-l-16, else diffusion)")
    smp.add_argument("--sampler", choices=sorted(_SAMPLERS),
                     help="default heun (diffusion) / consistency (consistency)")
    smp.add_argument("--steps", type=int,
                     help="grid points (default 32); for the consistency sampler, network evaluations (default 1)")
    smp.add_argument("--guidance", type=float,
                     help="CFG scale w >= 0 (default: 2.5 for epg-xl-16, 3.2 for epg-l-32, else 1; 0 or 1 = none)")
    interval = smp.add_mutually_exclusive_group()
    interval.add_argument("--interval", type=float, nargs=2, default=(0.19, 1.61), metavar=("LOW", "HIGH"),
                          help="guidance interval in unshifted sigma (default 0.19 1.61)")
    interval.add_argument("--no-interval", action="store_true", help="guide at every sigma")
    smp.add_argument("--trailing-zero", action="store_true", help="EDM grid ending in sigma=0")
    smp.add_argument("--no-clamp", action="store_true", help="do not clamp the denoised image to [-1, 1]")
    smp.add_argument("--labels", choices=("balanced", "random", "none"), default="balanced",
                     help="class labels: i mod K (default), i.i.d. (uniform, or see --class-counts), or "
                     "unconditional")
    smp.add_argument("--class-counts", metavar="DATA",
                     help="with --labels random: draw labels from the class frequencies of this training "
                     "image folder (root/<class>/<image>) or file list, as the released sampler does")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--convention", choices=("imagenet", "simple"),
                     help="the data normalisation to invert (default: from the checkpoint, else imagenet)")
    smp.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    smp.add_argument("--batch-size", type=int, default=100, help="images per batch and process")
    smp.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto, cuda when present)")
    smp.add_argument("--compile", action="store_true", help="torch.compile the network")
    smp.add_argument("--cuda-graph", action="store_true", help="replay the denoiser from CUDA graphs")
    smp.add_argument("--overwrite", action="store_true", help="discard what --out holds (images, archive, settings) and sample afresh")
    smp.add_argument("--no-progress", action="store_true")
    smp.set_defaults(func=_cmd_sample)

    ev = sub.add_parser(
        "evaluate", help="FID, sFID, Inception Score, precision, recall (ADM evaluator definitions)",
        description="Evaluate a sample batch against an ADM reference batch (e.g. "
        "VIRTUAL_imagenet256_labeled.npz). Needs the FID Inception weights as a local file "
        "(pt_inception-2015-12-05-6726825d.pth): --inception-weights or EPG_INCEPTION_WEIGHTS; "
        "nothing is downloaded.",
    )
    ev.add_argument("samples", help="samples .npz (arr_0 uint8 NHWC, as epg sample writes) or an image folder")
    ev.add_argument("--ref", help="reference .npz: ADM batch (images and/or mu/sigma statistics)")
    ev.add_argument("--save-ref", metavar="OUT.npz", help="instead: save SAMPLES' statistics as a reference")
    ev.add_argument("--inception-weights", metavar="PATH", help="pt_inception-2015-12-05-*.pth")
    ev.add_argument("--json", help="where to write the metrics (default: <samples>_metrics.json)")
    ev.add_argument("--batch-size", type=int, default=200)
    ev.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto, cuda when present)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    demo = sub.add_parser(
        "demo", help="both stages, sampling and a quality check on bundled digits (CPU, minutes)",
        description="Stage 1, stage 2, sampling and a digit classifier's verdict on scikit-learn's "
        "digits. The training recipes are the presets demo-pretrain, demo-diffusion and "
        "demo-consistency: `epg finetune --objective diffusion --preset demo-diffusion --encoder "
        "OUT/stage1/final --set steps=3000` reruns a stage on its own, longer.",
    )  # fmt: skip
    demo.add_argument("--objective", choices=("diffusion", "consistency"), default="diffusion")
    demo.add_argument("--out", default="epg-demo", help="output folder (default: ./epg-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not quality")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _run_command(argv)
    # A gloo worker under torchrun ends here (epg.distributed.end_process says why). The module
    # is imported only by the commands that can join a process group: torch stays unloaded
    # for --help.
    distributed = sys.modules.get("epg.distributed")
    if distributed is not None:
        distributed.end_process(code)
    return code


def _tracebacks_asked() -> bool:
    """EPG_TRACEBACK set to anything but empty, 0, false, no or off (any case)."""
    return os.environ.get("EPG_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def _run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "info":  # info shows the problems
            from ._backend import environment_problems

            if problems := environment_problems():
                raise ValueError("bad backend setting(s): " + "; ".join(problems))
        return args.func(args)
    except KeyboardInterrupt as exc:
        print(f"epg {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)  # the shell's code for a process a signal ended
    except Exception as exc:
        from ._backend import BackendUnavailableError
        from .data.folder import BadImageError

        # Bad input (files, shapes, options, images, a forced op backend that cannot run here),
        # and a training run stopped by non-finite steps (its message names the step, the loss
        # terms and the checkpoint): say what was wrong without a traceback, which
        # EPG_TRACEBACK=1 brings back. Anything else is a bug: its traceback stays. OSError:
        # unwritable, missing or misnamed paths, a full disk.
        bad_input = (ValueError, OSError, BadImageError, BackendUnavailableError)
        if args.command in ("pretrain", "finetune", "demo"):
            from .train import NonFiniteStop

            bad_input += (NonFiniteStop,)
        if _tracebacks_asked() or not isinstance(exc, bad_input):
            raise
        print(f"epg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
