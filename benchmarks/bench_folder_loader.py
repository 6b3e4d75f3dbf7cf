"""Folder loaders: images/s of the portable (Pillow) and DALI loaders on a prepared 256-px tree.

A generated tree (once per session, in a temporary folder): 64 images of 256², 4 classes, each a
randomly placed, randomly scaled crop of scikit-learn's two sample photos (natural content, so
the JPEG sizes are realistic), written as ``epg prepare`` writes them: PNG with
``compress_level=0`` and JPEG at quality 95.

Pipelines:

  stage2   the loader's batch: decode, centre crop (a no-op on prepared images), the scheduled
           flip, normalisation (``"imagenet"``) — what diffusion and consistency training read.
  stage1   the same batch plus both augmented views (``ViewAugment`` view 1 and view 2 from one
           generator, on the batch's device), as ``Trainer._batch`` does in pre-training.

Loaders: ``portable`` (a DataLoader with ``workers`` processes decoding with Pillow),
``dali_cpu`` (DALI with ``decoder="cpu"``, ``threads`` threads) and, on a GPU, ``dali_mixed``
(nvJPEG on the GPU for JPEG; PNG is decoded on host threads even there) and ``portable`` to the
GPU (pinned memory). The ``loader`` field of a row reads ``<loader> <pipeline> <format>``.

One timed call produces one batch; images/s = batch / time per batch, in the steady state of the
loader's prefetching (warm-up calls start the workers or build the pipeline first).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from . import common

KIND = "loader"
SIDE = 256
NUM_IMAGES = 64
NUM_CLASSES = 4
# (device, loader, pipeline, format, batch, quick); on the CPU stage 1 uses batch 8: its views
# cost about 60 ms per 256-px image there, and the CPU subset should stay under a minute.
CASES = tuple(
    (device, loader, pipeline, fmt, batch if device == "cuda" or pipeline == "stage2" else 8, quick)
    for device, loader, batch, quick in (
        ("cpu", "portable", 16, False),
        ("cpu", "dali_cpu", 16, False),
        ("cuda", "portable", 64, False),
        ("cuda", "dali_mixed", 64, True),
    )
    for pipeline in ("stage2", "stage1")
    for fmt in ("jpeg", "png")
)
CPU_WORKERS = 2  # processes (portable) or threads (DALI); this project's CPU machine has 2 cores


def _cases():
    for device, loader, pipeline, fmt, batch, quick in CASES:
        marks = [pytest.mark.gpu if device == "cuda" else pytest.mark.cpu]
        if quick:
            marks.append(pytest.mark.quick)
        label = f"{loader} {pipeline} {fmt}"
        yield pytest.param(device, label, SIDE, 3, batch, marks=marks,
                           id=f"{device}-{loader}-{pipeline}-{fmt}-{SIDE}px-B{batch}")  # fmt: skip


@pytest.fixture(scope="session")
def folder_trees(tmp_path_factory) -> dict[str, str]:
    """{"png": root, "jpeg": root}: the same 64 natural-looking 256² images in both formats."""
    from PIL import Image

    from epg.data.embedded import sample_jpeg_paths

    photos = [Image.open(p).convert("RGB") for p in sample_jpeg_paths()]
    base = tmp_path_factory.mktemp("folder_loader_bench")
    rng = np.random.default_rng(0)
    roots = {fmt: base / fmt for fmt in ("png", "jpeg")}
    for k in range(NUM_IMAGES):
        photo = photos[k % len(photos)]
        side = int(rng.integers(SIDE, min(photo.size) + 1))  # crop side: 256..427 px
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        tile = photo.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.BICUBIC)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
        cls = f"n{k % NUM_CLASSES:08d}"
        for fmt, root in roots.items():
            os.makedirs(root / cls, exist_ok=True)
            if fmt == "png":
                tile.save(root / cls / f"{k:04d}.png", format="PNG", compress_level=0)
            else:
                tile.save(root / cls / f"{k:04d}.jpg", format="JPEG", quality=95)
    return {fmt: str(root) for fmt, root in roots.items()}


def _loader(name: str, root: str, batch: int, dev: torch.device):
    options = dict(device=dev, convention="imagenet", seed=0)
    if name == "portable":
        from epg.data.portable import PortableLoader

        return PortableLoader(root, SIDE, batch, num_workers=CPU_WORKERS, **options)
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    from epg.data.dali import DaliLoader

    decoder = "mixed" if name == "dali_mixed" else "cpu"
    threads = CPU_WORKERS if dev.type == "cpu" else 8
    return DaliLoader(root, SIDE, batch, decoder=decoder, num_threads=threads, **options)


@pytest.mark.parametrize("device,loader,image_size,channels,batch", list(_cases()))
def test_folder_loader(benchmark, request, device, loader, image_size, channels, batch):
    from epg.data import ViewAugment, view1_config, view2_config

    gpu = device == "cuda"
    common.require_time(20.0)
    dev = common.cuda_device() if gpu else torch.device("cpu")
    name, pipeline, fmt = loader.split()
    if name != "portable":  # before the image folders are written (seconds) for nothing
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (epg[dali])")
    source = _loader(name, request.getfixturevalue("folder_trees")[fmt], batch, dev)
    if pipeline == "stage1":
        aug1 = ViewAugment(view1_config(convention="imagenet"))
        aug2 = ViewAugment(view2_config(convention="imagenet"))
        g = torch.Generator(device=dev).manual_seed(0)

        def one_batch():
            image = next(source)["image"]
            return image, aug1(image, g), aug2(image, g)
    else:

        def one_batch():
            return next(source)

    benchmark.group = f"{device} folder loader"
    benchmark.extra_info.update(
        kind=KIND, device=device, device_name=torch.cuda.get_device_name(dev) if gpu else "cpu",
        loader=loader, image_size=image_size, channels=channels, batch=batch, format=fmt,
        pipeline=pipeline, workers=CPU_WORKERS if not gpu or name == "portable" else 8,
        images_in_tree=NUM_IMAGES,
    )  # fmt: skip
    # CPU stage 1: one batch per round, few rounds (see CASES).
    if gpu:
        rounds, target = common.rounds(10, 5), 0.1
    elif pipeline == "stage1":
        rounds, target = common.rounds(3, 2), 0.0
    else:
        rounds, target = common.rounds(5, 3), 0.2
    try:
        common.time_rounds(benchmark, one_batch, dev, rounds=rounds, warmup_rounds=1,
                           target_round_s=target)
    finally:
        source.close()
