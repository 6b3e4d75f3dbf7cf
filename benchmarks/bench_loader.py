"""Data loading: images/s of the loaders and of stage 1's view augmentation.

In-memory and embedded data (the folder loaders, decoding PNG and JPEG with Pillow or DALI, are
in bench_folder_loader.py):

  in_memory       ``epg.data.loader.InMemoryLoader``, the Trainer's loader: a shuffled batch
                  gathered from host tensors and moved to the device. GPU: 256-px RGB float32
                  images to the GPU (the copy from pageable host memory is the cost); CPU: the
                  demo's 16-px digits.
  dataloader      ``torch.utils.data.DataLoader`` over ``epg.data.EmbeddedDigits`` items (the
                  per-item path, one process), CPU.
  stage1_views    ``epg.data.stage1_views``: both augmented views of a batch (random resized crop,
                  colour jitter, grayscale, blur, solarize, flip) on the batch's device. GPU:
                  256 px, batch 64; CPU: the demo's 16-px digits (batch 64) and 256 px (batch 8).

One timed call produces one batch (two views for stage1_views); images/s = batch / time.
The GPU rows are reported as not measured on a GPU until a GPU runs them.
"""

from __future__ import annotations

import pytest
import torch

from epg.data import EmbeddedDigits, ViewAugment, load_digits_tensors, stage1_views
from epg.data import view1_config, view2_config
from epg.data.loader import InMemoryLoader

from . import common

KIND = "loader"
# (device, loader, image side in pixels, channels, batch, quick)
CASES = (
    ("cuda", "in_memory", 256, 3, 64, True),
    ("cuda", "stage1_views", 256, 3, 64, True),
    ("cpu", "in_memory", 16, 1, 64, True),
    ("cpu", "dataloader", 16, 1, 64, False),
    ("cpu", "stage1_views", 16, 1, 64, True),
    ("cpu", "stage1_views", 256, 3, 8, False),
)


def _cases():
    for device, loader, image_size, channels, batch, quick in CASES:
        marks = [pytest.mark.gpu if device == "cuda" else pytest.mark.cpu]
        if quick:
            marks.append(pytest.mark.quick)
        yield pytest.param(device, loader, image_size, channels, batch, marks=marks,
                           id=f"{device}-{loader}-{image_size}px-B{batch}")  # fmt: skip


def _images(size: int, channels: int, n: int) -> torch.Tensor:
    """The demo's digits at 16 px; random images in [−1, 1] at other sizes (the loaders' cost
    does not depend on the pixel values)."""
    if size == 16 and channels == 1:
        return load_digits_tensors("train", image_size=16, channels=1)[0][:n]
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("device,loader,image_size,channels,batch", list(_cases()))
def test_loader(benchmark, device, loader, image_size, channels, batch):
    gpu = device == "cuda"
    common.require_time(20.0)
    dev = common.cuda_device() if gpu else torch.device("cpu")
    if loader == "in_memory":
        images = _images(image_size, channels, 8 * batch)
        data = {"image": images, "label": torch.zeros(images.shape[0], dtype=torch.int64)}
        source = InMemoryLoader(data, batch, device=dev)

        def one_batch():
            return next(source)
    elif loader == "dataloader":
        dataset = EmbeddedDigits("train", image_size=image_size, channels=channels)
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                              drop_last=True)  # fmt: skip
        state = {"it": iter(batches)}

        def one_batch():
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = iter(batches)
                return next(state["it"])
    elif loader == "stage1_views":
        images = _images(image_size, channels, batch).to(dev)
        aug1, aug2 = ViewAugment(view1_config()), ViewAugment(view2_config())
        g = torch.Generator(device=dev).manual_seed(0)

        def one_batch():
            return stage1_views(images, g, aug1, aug2)
    else:
        raise ValueError(loader)

    benchmark.group = f"{device} loader"
    benchmark.extra_info.update(
        kind=KIND, device=device, device_name=torch.cuda.get_device_name(dev) if gpu else "cpu",
        loader=loader, image_size=image_size, channels=channels, batch=batch,
    )  # fmt: skip
    rounds = common.rounds(20, 7) if gpu else common.rounds(10, 5)
    common.time_rounds(benchmark, one_batch, dev, rounds=rounds, warmup_rounds=2,
                       target_round_s=0.02 if gpu else 0.05)  # fmt: skip
