"""Stage-1 view augmentations (epg-method.md §2), batched on tensors, CPU or CUDA.

The pre-training loss compares two views of each image, made with the asymmetric MoCo-v3/BYOL
recipe: RandomResizedCrop → ColorJitter (w.p. 0.8) → RandomGrayscale (0.2) → GaussianBlur
(w.p. 1.0 for view 1, 0.1 for view 2) → Solarize (view 2 only, w.p. 0.2) → horizontal flip.
Here each step works on a whole batch ``(B, C, H, W)`` with per-sample random parameters, so the
views can be made on the GPU next to the training step instead of in PIL worker processes.

Images come in and go out in the *normalised* convention of the data (§2):

* ``"simple"``: ``x = 2·x01 − 1``;
* ``"imagenet"``: ``x = (x01 − mean) / (2·std)`` per channel, ImageNet mean/std.

Photometric steps (jitter, grayscale, blur, solarize) run in ``[0, 1]`` and clamp there like
torchvision does; crop and flip are exact in either space. A sample that no photometric step
touched is returned bit for bit (no round trip through ``[0, 1]``).

Randomness: every parameter is drawn from the ``torch.Generator`` passed in, on the generator's
device, a fixed number of draws per call whatever the probabilities are. A CPU generator gives
the same views for CPU and CUDA images (up to kernel rounding); a generator on the images' device
avoids the small host→device copy.

One-channel images (digits): saturation, hue and grayscale are identities on gray images, so only
brightness and contrast act; the jitter order is still drawn per sample.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import IMAGENET_MEAN, IMAGENET_STD  # one copy of the §2 statistics

CONVENTIONS = ("simple", "imagenet")
# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale (and PIL's "L") use.
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------------------------
# Normalisation conventions
# ---------------------------------------------------------------------------------------------


def _channel_stats(convention: str, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) shaped (1, C, 1, 1) such that x = (x01 − mean) / (2·std)."""
    if convention == "simple":  # x = 2·x01 − 1 = (x01 − 0.5) / (2·0.25)
        mean, std = [0.5] * channels, [0.25] * channels
    elif convention == "imagenet":
        if channels == 3:
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        elif channels == 1:
            # One gray channel: the luma-weighted ImageNet statistics would be an invention; the
            # convention is defined for RGB only.
            raise ValueError("the 'imagenet' convention needs 3 channels; use 'simple' for gray")
        else:
            raise ValueError(f"the 'imagenet' convention needs 3 channels, got {channels}")
    else:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    kw = {"dtype": like.dtype, "device": like.device}
    return (
        torch.tensor(mean, **kw).view(1, channels, 1, 1),
        torch.tensor(std, **kw).view(1, channels, 1, 1),
    )


def to_unit(x: Tensor, convention: str = "simple") -> Tensor:
    """Normalised images (B, C, H, W) → x01 in [0, 1] (no clamping): x01 = x·2·std + mean."""
    mean, std = _channel_stats(convention, x.shape[-3], x)
    return x * (2 * std) + mean


def from_unit(x01: Tensor, convention: str = "simple") -> Tensor:
    """x01 (B, C, H, W) in [0, 1] → normalised images: x = (x01 − mean) / (2·std)."""
    mean, std = _channel_stats(convention, x01.shape[-3], x01)
    return (x01 - mean) / (2 * std)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewAugmentConfig:
    """Parameters of one view's augmentation chain; defaults are view 1 of §2 at full scale."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the crop, U[lo, hi]
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect w/h, log-uniform
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor ~ U[max(0, 1 − b), 1 + b]
    contrast: float = 0.4  # factor ~ U[max(0, 1 − c), 1 + c]
    saturation: float = 0.2  # factor ~ U[max(0, 1 − s), 1 + s]
    hue: float = 0.1  # shift ~ U[−h, h] turns of the hue circle, h ≤ 0.5
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # σ in pixels, U[lo, hi]
    blur_kernel_size: int | None = None  # None: odd size ≈ 10% of the image side, at least 3
    solarize_p: float = 0.0
    solarize_threshold: float = 128 / 255  # in [0, 1]; PIL inverts pixels ≥ 128
    flip_p: float = 0.5
    convention: str = "simple"

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):  # lists from YAML/JSON configs
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0 and hue in [0, 0.5]")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        k = self.blur_kernel_size
        if k is not None and (k < 1 or k % 2 == 0):
            raise ValueError(f"blur_kernel_size must be odd and positive, got {k}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")


def view1_config(**overrides) -> ViewAugmentConfig:
    """View 1 of §2: blur w.p. 1.0, no solarize. Keyword arguments override fields."""
    return dataclasses.replace(ViewAugmentConfig(blur_p=1.0, solarize_p=0.0), **overrides)


def view2_config(**overrides) -> ViewAugmentConfig:
    """View 2 of §2: blur w.p. 0.1, solarize w.p. 0.2. Keyword arguments override fields."""
    return dataclasses.replace(ViewAugmentConfig(blur_p=0.1, solarize_p=0.2), **overrides)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel size ≈ 10% of the image side, at least 3 (23 at 224 px, 27 at 256, 3 at 16)."""
    k = max(3, round(0.1 * image_size))
    return k if k % 2 == 1 else k + 1


# ---------------------------------------------------------------------------------------------
# The individual steps (each on a batch, per-sample parameters already drawn)
# ---------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return lo + (hi - lo) * u


def random_resized_crop(
    x: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """torchvision's RandomResizedCrop, per sample, resized back to the input size.

    Box choice as torchvision: up to ``attempts`` tries of area ~ U[scale]·H·W and log-uniform
    aspect ratio, rounded to whole pixels, the first that fits wins, at a uniform integer
    position; if none fits, the largest centred box with the ratio clamped to the range. The box
    is resampled bilinearly (the crop is never larger than the output, so no antialias filter is
    needed). A box that is the whole image returns the sample unchanged.
    """
    B, _, H, W = x.shape
    g = generator
    area = H * W * _uniform(B * attempts, *scale, g).view(B, attempts)
    log_r = _uniform(B * attempts, math.log(ratio[0]), math.log(ratio[1]), g).view(B, attempts)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * r))
    h = torch.round(torch.sqrt(area / r))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # first True (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    any_fit = fits.any(dim=1)
    # Fallback: centre crop of the whole image with the ratio clamped into range.
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(H * ratio[1]), H
    else:
        fw, fh = W, H
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u_i, u_j = _uniform(B, 0, 1, g), _uniform(B, 0, 1, g)
    i = torch.floor(u_i * (H - h + 1)).clamp(max=H - h)  # top, uniform in {0..H−h}
    j = torch.floor(u_j * (W - w + 1)).clamp(max=W - w)  # left
    i = torch.where(any_fit, i, torch.full_like(i, (H - fh) // 2))
    j = torch.where(any_fit, j, torch.full_like(j, (W - fw) // 2))

    # Affine map from output coordinates to the box, in grid_sample's normalised coordinates
    # (align_corners=False: pixel k's centre is at (2k + 1)/size − 1).
    theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=w.device)
    theta[:, 0, 0] = w / W
    theta[:, 0, 2] = (2 * j + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * i + h) / H - 1
    full = ((w == W) & (h == H)).to(x.device)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(full.view(B, 1, 1, 1), x, out)


def _gray(x01: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of (B, C, H, W) images in [0, 1]; the image itself when C == 1."""
    if x01.shape[1] == 1:
        return x01
    r, g, b = x01.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _adjust_brightness(x01: Tensor, factor: Tensor) -> Tensor:
    return (x01 * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def _adjust_contrast(x01: Tensor, factor: Tensor) -> Tensor:
    mean = _gray(x01).mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x01 + (1 - f) * mean).clamp(0, 1)


def _adjust_saturation(x01: Tensor, factor: Tensor) -> Tensor:
    if x01.shape[1] == 1:
        return x01
    f = factor.view(-1, 1, 1, 1)
    return (f * x01 + (1 - f) * _gray(x01)).clamp(0, 1)


def _adjust_hue(x01: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` turns (RGB → HSV → RGB), as torchvision's adjust_hue."""
    if x01.shape[1] == 1:
        return x01
    r, g, b = x01.unbind(1)
    maxc, _ = x01.max(dim=1)
    minc, _ = x01.min(dim=1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV → RGB with the continuous form c_k = v − v·s·clamp(min(k', 4 − k'), 0, 1).
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1).clamp(0, 1)


def _blur_1d(planes: Tensor, kernel: Tensor, dim: int) -> Tensor:
    """Convolve (1, P, H, W) planes along ``dim`` (2 or 3) with one kernel row per plane (P, K).

    Reflect padding as torchvision's gaussian_blur; reflection needs pad < size, so on images
    smaller than the kernel the kernel is cut to the image and renormalised.
    """
    size = planes.shape[dim]
    half = kernel.shape[1] // 2
    pad = min(half, size - 1)
    k = kernel[:, half - pad : half + pad + 1]
    k = k / k.sum(dim=1, keepdim=True)
    if dim == 3:
        padded = F.pad(planes, (pad, pad, 0, 0), mode="reflect") if pad else planes
        weight = k[:, None, None, :]
    else:
        padded = F.pad(planes, (0, 0, pad, pad), mode="reflect") if pad else planes
        weight = k[:, None, :, None]
    return F.conv2d(padded, weight, groups=planes.shape[1])


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with one σ per sample (B,), kernel sums to 1."""
    B, C, H, W = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).float()) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).to(x.dtype).repeat_interleave(C, dim=0)  # (B·C, K)
    planes = x.reshape(1, B * C, H, W)
    planes = _blur_1d(_blur_1d(planes, k, 3), k, 2)
    return planes.view(B, C, H, W)


# ---------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------


class ViewAugment:
    """One view's augmentation chain: ``ViewAugment(config)(images, generator) -> images``.

    ``images``: (B, C, H, W) float, normalised with ``config.convention``; returns the same
    shape, dtype and device. Deterministic given the generator's state.
    """

    def __init__(self, config: ViewAugmentConfig | None = None):
        self.config = config if config is not None else ViewAugmentConfig()

    def __repr__(self) -> str:
        return f"ViewAugment({self.config})"

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        cfg = self.config
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be float (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        B, C, H, W = images.shape
        g = generator
        dev = images.device

        def coin(p: float) -> Tensor:  # one draw per sample, always consumed
            return (_uniform(B, 0, 1, g) < p).to(dev)

        # Draw every parameter up front: a fixed number of draws per call.
        do_jitter = coin(cfg.jitter_p)
        order = torch.argsort(torch.rand(B, 4, generator=g, device=g.device), dim=1).to(dev)
        fb = _uniform(B, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g).to(dev)
        fc = _uniform(B, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g).to(dev)
        fs = _uniform(B, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, g).to(dev)
        fh = _uniform(B, -cfg.hue, cfg.hue, g).to(dev)
        do_gray = coin(cfg.grayscale_p)
        do_blur = coin(cfg.blur_p)
        sigma = _uniform(B, *cfg.blur_sigma, g).to(dev)
        do_solarize = coin(cfg.solarize_p)
        do_flip = coin(cfg.flip_p)

        x = random_resized_crop(images, g, cfg.crop_scale, cfg.crop_ratio)

        touched = do_jitter | do_blur | do_solarize
        if C == 3:
            touched = touched | do_gray
        if bool(touched.any()):
            u = to_unit(x, cfg.convention)
            if bool(do_jitter.any()):
                # torchvision applies the four adjustments in a random order per call.
                adjust = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
                params = (fb, fc, fs, fh)
                for slot in range(4):
                    for op in range(4):
                        idx = torch.nonzero(do_jitter & (order[:, slot] == op)).squeeze(1)
                        if idx.numel():
                            u[idx] = adjust[op](u[idx], params[op][idx].to(u.dtype))
            if C == 3 and bool(do_gray.any()):
                idx = torch.nonzero(do_gray).squeeze(1)
                u[idx] = _gray(u[idx]).expand(-1, 3, -1, -1)
            if bool(do_blur.any()):
                idx = torch.nonzero(do_blur).squeeze(1)
                k = cfg.blur_kernel_size or blur_kernel_size(min(H, W))
                u[idx] = _gaussian_blur(u[idx], sigma[idx], k)
            if bool(do_solarize.any()):
                idx = torch.nonzero(do_solarize).squeeze(1)
                v = u[idx]
                u[idx] = torch.where(v >= cfg.solarize_threshold, 1 - v, v)
            x = torch.where(touched.view(B, 1, 1, 1), from_unit(u, cfg.convention), x)

        return torch.where(do_flip.view(B, 1, 1, 1), x.flip(-1), x)


def stage1_views(
    images: Tensor, generator: torch.Generator, aug1: ViewAugment, aug2: ViewAugment
) -> tuple[Tensor, Tensor]:
    """The two stage-1 views (y1, y2) of a batch, drawn from one generator (view 1 first)."""
    return aug1(images, generator), aug2(images, generator)
