"""Embedded data that ships inside scikit-learn: the handwritten digits and two sample JPEGs.

The demo and the tests need real images without a download. scikit-learn carries the UCI
handwritten digits (1,797 gray 8×8 images, integer values 0..16, 10 classes, ~180 per class) and
two 427×640 photographs (``china.jpg``, ``flower.jpg``) in its package data.

Digits as model input (:func:`load_digits_tensors`):

* values become x01 = value / 16 and are normalised with the ``"simple"`` convention of §2,
  x = 2·x01 − 1 ∈ [−1, 1]. The ``"imagenet"`` convention (per-channel ImageNet mean/std) is
  not used: it describes the colour statistics of photographs, not of gray digits on a black
  background, and it is defined for RGB only.
* 8×8 is upscaled to ``image_size`` with bilinear interpolation (``align_corners=False``,
  no antialias filter, which only matters when shrinking). Bilinear weights are convex, so the
  result stays inside [−1, 1] and constant regions stay exact; bicubic would overshoot the range
  at the sharp stroke edges, and nearest would give blocky 2×2 pixel steps whose high-frequency
  edges are an artefact of the upscale the model would have to learn.
* ``channels=3`` repeats the gray channel (for networks built for RGB).
* the train/test split is stratified by class: in each class a seeded permutation puts
  ``round(test_fraction · n_class)`` images into test and the rest into train. Train and test
  are disjoint and together are ``"all"``; with the defaults, 1,438 train and 359 test images.
"""

from __future__ import annotations

import functools
import math
import os
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .augment import to_unit

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
DIGITS_MAX = 16.0  # the digits' integer values run 0..16


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float32 in 0..16, labels (1797,) int64), read once per process."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.ascontiguousarray(bunch.images, dtype=np.float32)
    labels = np.ascontiguousarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=16)
def _split_indices(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of a class-stratified split, deterministic given the seed."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    _, labels = _raw_digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    train_idx.setflags(write=False)
    test_idx.setflags(write=False)
    return train_idx, test_idx


def load_digits_tensors(
    split: str = "train",
    image_size: int = 16,
    channels: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as normalised image tensors.

    Args:
        split: ``"train"``, ``"test"`` (stratified, disjoint, see the module docstring) or
            ``"all"`` (all 1,797 in scikit-learn's order).
        image_size: output side in pixels (≥ 8); 8 keeps the original pixels.
        channels: 1 (gray) or 3 (gray repeated).
        test_fraction: fraction of each class that goes to test.
        seed: seed of the split's permutation.

    Returns:
        images: (N, channels, image_size, image_size) float32 in [−1, 1], x = 2·value/16 − 1;
        labels: (N,) int64 in 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    raw, labels = _raw_digits()
    if split == "all":
        idx = np.arange(len(labels))
    else:
        train_idx, test_idx = _split_indices(float(test_fraction), int(seed))
        idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(raw[idx]).unsqueeze(1) * (2.0 / DIGITS_MAX) - 1.0  # (N, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False
        )
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(labels[idx].copy())


class EmbeddedDigits(Dataset):
    """In-memory digits dataset; items are ``{"image": (C, H, W) float32, "label": int64 0-d}``.

    ``.tensors`` is the pair (images (N, C, H, W), labels (N,)) for batching by indexing, which on
    2 CPU cores is far faster than a DataLoader over items.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 16,
        channels: int = 1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ):
        self.split, self.image_size, self.channels = split, image_size, channels
        self.num_classes = NUM_CLASSES
        self.tensors = load_digits_tensors(split, image_size, channels, test_fraction, seed)

    def __len__(self) -> int:
        return self.tensors[1].shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.tensors[0][index], "label": self.tensors[1][index]}


def to_uint8(images: Tensor, convention: str = "simple") -> np.ndarray:
    """Normalised images → uint8 for saving.

    Args:
        images: (N, C, H, W) or (C, H, W) float tensor, any device, normalised with
            ``convention`` (``"simple"``: x = 2·x01 − 1; ``"imagenet"``: §2, 3 channels).
    Returns:
        numpy uint8, (N, H, W, C) or (H, W, C): round(clamp(x01, 0, 1)·255), computed as
        floor(x01·255 + 0.5). With ``"simple"``, clamping x to [−1, 1] is clamping x01 to [0, 1].
    """
    x = images.detach().to("cpu", torch.float32)
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W) or (C, H, W), got {tuple(images.shape)}")
    x01 = to_unit(x, convention).clamp(0.0, 1.0)
    out = torch.floor(x01 * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    out = out.numpy()
    return out[0] if single else out


def make_grid_png(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    padding: int = 2,
    scale: int = 1,
    convention: str = "simple",
) -> tuple[int, int]:
    """Write a grid of images as one PNG (Pillow): gray ("L") for 1 channel, else RGB.

    Args:
        images: (N, C, H, W) normalised images, C in {1, 3}.
        path: output file; parent folders are created.
        nrow: images per row (the last row may be partly empty).
        padding: black pixels between and around images (in output pixels).
        scale: integer nearest-neighbour magnification of each image (16-px digits are small).
    Returns:
        (width, height) of the PNG: cols·(W·scale + padding) + padding by
        rows·(H·scale + padding) + padding, with cols = min(nrow, N), rows = ceil(N / nrow).
    """
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be (N, 1|3, H, W) with N > 0, got {tuple(images.shape)}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow, scale >= 1 and padding >= 0, got {nrow}, {scale}, {padding}")
    tiles = to_uint8(images, convention)  # (N, H, W, C)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = tiles.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for k in range(n):
        top = padding + (k // nrow) * (h + padding)
        left = padding + (k % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = tiles[k]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)  # uint8: "L" or "RGB"
    image.save(path, format="PNG")
    return image.size


def sample_jpeg_paths() -> list[str]:
    """Paths of scikit-learn's bundled sample JPEGs [china.jpg, flower.jpg] (427×640 RGB)."""
    folder = resources.files("sklearn.datasets") / "images"
    paths = [str(folder / name) for name in ("china.jpg", "flower.jpg")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"scikit-learn's sample images are missing: {missing}")
    return paths
