"""End to end: sampling images/s for Heun-32 with interval classifier-free guidance.

One timed call is ``epg.sampling.sample`` for one batch, as ``epg sample`` runs it: per-image
generators and prior noise, 32 Karras points (31 Heun steps: 62 conditional passes, and the 12
steps inside the guidance interval (0.19, 1.61]·H/64 add an unconditional half-batch each), clamp,
copy back to the host. The denoiser is ``epg.generate.make_denoiser``: the network under bf16
autocast on a GPU (float32 on a CPU), either eager or replayed from CUDA graphs
(``epg.sampling.CUDAGraphDenoiser``, one graph per batch shape, captured in the untimed first call).

Networks are freshly initialised: the cost of a pass does not depend on the weights. Guidance
scale 2.5 (EPG-XL/16 at 256 px). GPU: EPG-XL/16 at batch 8, 32 and 128 (quick: 32). CPU: the demo
network (``epg-digits``, batch 64) and ``epg-tiny`` (batch 8, quick), eager only (CUDA graphs need a
GPU). The GPU rows are reported as not measured on a GPU until one runs them.
Each row records the network passes per image and the FLOPs per sampled image (flops.py).
"""

from __future__ import annotations

import pytest
import torch

from epg import sampling
from epg.models import build, get_config

from . import common, flops

KIND = "sampling"
STEPS = 32
GUIDANCE = 2.5
GPU_MODEL, GPU_BATCHES, GPU_QUICK_BATCH = "epg-xl-16", (8, 32, 128), 32
CPU_CASES = (("epg-digits", 64, False), ("epg-tiny", 8, True))  # (model, batch, quick); eager
PATHS = ("eager", "cuda_graph")


def _cases():
    for batch in GPU_BATCHES:
        for path in PATHS:
            marks = [pytest.mark.gpu] + ([pytest.mark.quick] if batch == GPU_QUICK_BATCH else [])
            yield pytest.param("cuda", GPU_MODEL, path, batch, marks=marks,
                               id=f"cuda-{GPU_MODEL}-{path}-B{batch}")  # fmt: skip
    for model, batch, quick in CPU_CASES:
        marks = [pytest.mark.cpu] + ([pytest.mark.quick] if quick else [])
        yield pytest.param("cpu", model, "eager", batch, marks=marks,
                           id=f"cpu-{model}-eager-B{batch}")  # fmt: skip


class _PassCounter:
    """Counts the images that go through the network (cond + uncond halves)."""

    def __init__(self, fn):
        self.fn, self.images = fn, 0

    def __call__(self, x, sigma, y):
        self.images += x.shape[0]
        return self.fn(x, sigma, y)


@pytest.mark.parametrize("device,model,path,batch", list(_cases()))
def test_sampling(benchmark, device, model, path, batch):
    gpu = device == "cuda"
    common.require_time(30.0)  # ~10 s a case on a GPU (by its size); 30 s on 2 CPU cores
    try:
        from epg.generate import make_denoiser
    except ImportError as exc:
        pytest.skip(f"epg.generate.make_denoiser is not available in this revision ({exc})")
    dev = common.cuda_device() if gpu else torch.device("cpu")
    cfg = get_config(model)
    common.release_memory()
    torch.manual_seed(0)
    with dev:
        net = build(model).eval().requires_grad_(False)
    denoiser = _PassCounter(make_denoiser(net, "diffusion", precision="bf16" if gpu else "fp32",
                                          cuda_graph=path == "cuda_graph"))  # fmt: skip
    labels = sampling.class_labels(batch, cfg.num_classes) if cfg.num_classes else None

    def run():
        return sampling.sample(
            denoiser, labels, cfg.img_size, channels=cfg.in_channels, steps=STEPS,
            sampler="heun", guidance=GUIDANCE, null_class=net.null_class, seed=0,
            batch_size=batch, device=dev, progress=False,
        )  # fmt: skip

    run()  # captures the CUDA graphs on that path; warms the allocator and kernels on both
    common.sync(dev)
    passes_per_image = denoiser.images / batch
    benchmark.group = f"{device} sampling {model} B{batch}"
    benchmark.extra_info.update(
        kind=KIND, device=device, device_name=torch.cuda.get_device_name(dev) if gpu else "cpu",
        model=model, path=path, batch=batch, sampler=f"heun-{STEPS}", guidance=GUIDANCE,
        precision="bf16 autocast" if gpu else "float32", passes_per_image=passes_per_image,
        flops_per_image=passes_per_image * flops.forward_flops(cfg),
        peak_bf16_tflops=flops.peak_bf16_tflops(torch.cuda.get_device_name(dev)) if gpu else None,
    )  # fmt: skip
    rounds = common.rounds(5, 2) if gpu else common.rounds(3, 2)
    common.time_rounds(benchmark, run, dev, rounds=rounds, warmup_rounds=1)
    del denoiser, net
    common.release_memory()
