"""Noise levels of EPG: the Karras grid and the resolution shift (epg-method.md §3).

Every σ the networks see (training noise, sampling grid, prior std, guidance interval, and σ_min
inside c_skip/c_out) is the unshifted σ times ``shift = H/64``; loss weights of the diffusion
objective and the stage-1 temperature schedule use the *unshifted* σ.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def resolution_shift(img_size: int) -> float:
    """The noise shift H/64: 4 at 256 px, 8 at 512 px."""
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return img_size / 64.0


def karras_sigmas(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The decreasing Karras grid σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,
    i = 0..n−1, so σ_0 = σ_max and σ_{n−1} = σ_min (no trailing zero). Unshifted."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + i / (n - 1) * (lo - hi)) ** rho).to(dtype)


def shifted_karras_sigmas(n: int, img_size: int, **kwargs) -> Tensor:
    """The Karras grid multiplied by the resolution shift H/64."""
    return karras_sigmas(n, **kwargs) * resolution_shift(img_size)


class WeightedGrid:
    """A fixed, decreasing σ grid with a loss weight per point (float64, built on the CPU),
    copied to each device once, with the released code's nearest-point lookup (``find_nearest``:
    the smallest absolute difference). Used by the diffusion objective's snapping and the
    consistency warm-up's weights."""

    def __init__(self, sigmas: Tensor, weights: Tensor):
        self.sigmas, self.weights = sigmas, weights
        self._copies: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(σ grid, weights) on ``device``."""
        if device not in self._copies:
            self._copies[device] = (self.sigmas.to(device), self.weights.to(device))
        return self._copies[device]

    def nearest(self, sigma: Tensor) -> Tensor:
        """Index of the grid point nearest to each σ of a (B,) tensor, on σ's device."""
        sigmas, _ = self.on(sigma.device)
        return (sigma.double()[:, None] - sigmas[None, :]).abs().argmin(dim=1)
