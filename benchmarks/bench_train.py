"""End to end: training-step images/s and MFU for the three training modes, four paths each.

A step is ``epg.train.Trainer.train_step()`` as a run executes it: the batch from the in-memory
loader (images already on the device), the objective's random draws, forward, loss, backward,
gradient clipping (where the recipe clips), AdamW (fused on CUDA), the EMA update and the step's
single host synchronisation; stage 1 also builds its two augmented views on the device. The
recipes are the paper presets (``epg.presets``) with the batch size overridden.

Paths (labelled in report.py):
  eager_ref      plain PyTorch: ``epg.ops`` replaced by the reference math
                 (``common.plain_pytorch_ops``; attention is SDPA), eager
  compiled_ref   the same with the Trainer's ``torch.compile`` of the loss
  eager_epg      epg's ops (automatic backend choice), eager
  compiled_epg   epg's ops with ``torch.compile`` (the Trainer's default)

GPU cases (bf16 autocast, 256 px, per-GPU batch 128 as the paper's 1024 on 8 GPUs): stage 1
RCM-B/16, diffusion EPG-XL/16, consistency EPG-L/16 with the RCM-L/16 perceptual network (a
randomly initialised stage-1 checkpoint, written once per run). The quick subset is diffusion
EPG-XL/16 at batch 64. CPU cases (float32): the tiny and demo configs.

On a GPU a case also records the peak memory allocated by torch over its timed steps
(``peak_memory_gib``: weights, optimiser state, activations), which report.py prints.

MFU = images/s × ``flops.train_step_flops`` / the device's dense bf16 peak
(``flops.PEAK_BF16_TFLOPS``, by device name); FLOPs are matmul multiply-adds × 2 with
attention's Q·Kᵀ and P·V included and backward = 2 × forward (see flops.py). No GPU figure
exists until a GPU run: the GPU rows are listed as not measured on a GPU until then.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from epg.models import build, get_config
from epg.presets import get_preset
from epg.train import TrainConfig, Trainer

from . import common, flops

KIND = "train"
PRESETS = {
    "pretrain": "pretrain-rcm-b-16",
    "diffusion": "diffusion-epg-xl-16",
    "consistency": "consistency-epg-l-16",
}
# (mode, model, perceptual network for consistency)
GPU_MODELS = (
    ("pretrain", "rcm-b-16", None),
    ("diffusion", "epg-xl-16", None),
    ("consistency", "epg-l-16", "rcm-l-16"),
)
GPU_BATCH, GPU_QUICK_BATCH = 128, 64
CPU_MODELS = (
    ("diffusion", "epg-tiny", None),
    ("diffusion", "epg-digits", None),
    ("pretrain", "rcm-digits", None),
    ("consistency", "epg-digits", "rcm-digits"),
)
CPU_BATCH, CPU_QUICK_BATCH = 64, 16
# Compiled paths run after every other case (conftest.py), so a time budget reaches them last.
PATH_ORDER = ("eager_ref", "eager_epg", "compiled_epg", "compiled_ref")
# Seconds a case needs at most (gpu_check.sh budget): compiling a paper-size step is the cost.
COST_S = {("cuda", False): 30.0, ("cuda", True): 200.0, ("cpu", False): 30.0, ("cpu", True): 240.0}


def _cases():
    for mode, model, perceptual in GPU_MODELS:
        for path in PATH_ORDER:
            yield pytest.param("cuda", mode, model, path, GPU_BATCH, marks=[pytest.mark.gpu],
                               id=f"cuda-{mode}-{model}-{path}-B{GPU_BATCH}")  # fmt: skip
    for path in PATH_ORDER:
        yield pytest.param("cuda", "diffusion", "epg-xl-16", path, GPU_QUICK_BATCH,
                           marks=[pytest.mark.gpu, pytest.mark.quick],
                           id=f"cuda-diffusion-epg-xl-16-{path}-B{GPU_QUICK_BATCH}")  # fmt: skip
    for mode, model, perceptual in CPU_MODELS:
        for path in PATH_ORDER:
            yield pytest.param("cpu", mode, model, path, CPU_BATCH, marks=[pytest.mark.cpu],
                               id=f"cpu-{mode}-{model}-{path}-B{CPU_BATCH}")  # fmt: skip
    for path in ("eager_ref", "eager_epg"):
        yield pytest.param("cpu", "diffusion", "epg-tiny", path, CPU_QUICK_BATCH,
                           marks=[pytest.mark.cpu, pytest.mark.quick],
                           id=f"cpu-diffusion-epg-tiny-{path}-B{CPU_QUICK_BATCH}")  # fmt: skip


def _perceptual_name(mode: str, model: str) -> str | None:
    for models in (GPU_MODELS, CPU_MODELS):
        for m, name, perceptual in models:
            if (m, name) == (mode, model):
                return perceptual if mode == "consistency" else None
    return None


_STAGE1_CHECKPOINTS: dict[str, str] = {}


def _stage1_checkpoint(name: str, tmp_path_factory) -> str:
    """A randomly initialised stage-1 network saved as an epg checkpoint (encoder + perceptual
    network of the consistency step; its values do not change the step's cost)."""
    if name not in _STAGE1_CHECKPOINTS:
        from epg import checkpoint

        folder = tmp_path_factory.mktemp(f"stage1-{name}")
        torch.manual_seed(0)
        checkpoint.save(build(name), folder)
        _STAGE1_CHECKPOINTS[name] = str(folder)
    return _STAGE1_CHECKPOINTS[name]


def train_config(mode: str, model: str, path: str, batch: int, device: str, run_dir: str,
                 encoder: str | None = None) -> TrainConfig:  # fmt: skip
    """The paper recipe of ``mode`` for ``model`` with the benchmark's batch, path and device."""
    options = get_preset(PRESETS[mode])
    options.update(
        model=model, batch_size=batch, compile=path.startswith("compiled"),
        precision="bf16" if device == "cuda" else "fp32", device=device, run_dir=run_dir,
        resume="none", progress=False, encoder=encoder,
    )  # fmt: skip
    return TrainConfig(**options)


def synthetic_data(model: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """2·batch random images in [−1, 1] with labels, already on the device."""
    cfg = get_config(model)
    g = torch.Generator().manual_seed(0)
    n = 2 * batch
    images = torch.rand(n, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g) * 2 - 1
    labels = torch.randint(0, max(1, getattr(cfg, "num_classes", 10)), (n,), generator=g)
    return {"image": images.to(device), "label": labels.to(device)}


@pytest.mark.parametrize("device,mode,model,path,batch", list(_cases()))
def test_train_step(benchmark, tmp_path_factory, device, mode, model, path, batch):
    gpu = device == "cuda"
    compiled = path.startswith("compiled")
    common.require_time(COST_S[(device, compiled)])
    dev = common.cuda_device() if gpu else torch.device("cpu")
    perceptual = _perceptual_name(mode, model)
    encoder = _stage1_checkpoint(perceptual, tmp_path_factory) if perceptual else None
    run_dir = str(tmp_path_factory.mktemp("run"))
    cfg = train_config(mode, model, path, batch, device, run_dir, encoder)
    plain = path.endswith("_ref")
    net_cfg = get_config(model)
    peak = flops.peak_bf16_tflops(torch.cuda.get_device_name(dev)) if gpu else None
    benchmark.group = f"{device} train {mode} {model} B{batch}"
    benchmark.extra_info.update(
        kind=KIND, device=device, device_name=torch.cuda.get_device_name(dev) if gpu else "cpu",
        mode=mode, model=model, path=path, batch=batch,
        precision="bf16 autocast" if gpu else "float32", perceptual=perceptual,
        flops_per_image=flops.train_step_flops(
            mode, net_cfg, get_config(perceptual) if perceptual else None),
        peak_bf16_tflops=peak,
    )  # fmt: skip

    common.release_memory()
    with common.plain_pytorch_ops() if plain else contextlib.nullcontext():
        trainer = Trainer(cfg, data=synthetic_data(model, batch, dev))
        try:
            start = time.perf_counter()
            trainer.train_step()  # compiles on the compiled paths
            common.sync(dev)
            benchmark.extra_info["first_step_s"] = time.perf_counter() - start
            rounds = common.rounds(10, 5) if gpu else common.rounds(5, 3)
            if gpu:
                torch.cuda.reset_peak_memory_stats(dev)
            common.time_rounds(benchmark, trainer.train_step, dev, rounds=rounds, warmup_rounds=2)
            if gpu:  # what a step needs on top of nothing: weights, optimiser state, activations
                benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        finally:
            del trainer
            common.release_memory()
