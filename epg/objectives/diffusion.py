"""Stage 2a: x0-prediction diffusion fine-tuning (epg-method.md §6.2).

    L = mean_{B,C,H,W}[ w(i)·(x̂0 − x0)² ],   x̂0 = F_θ(c_in(σ)·(x0 + σ·ε), 250·ln σ, y),

with ln σ_i ~ N(P_mean, P_std) snapped to a Karras grid, σ = σ_i·H/64, and the iCT/ECT-style weight
w(i) = 1/(σ_i − σ_{i+1}) ≈ 125.3·σ_i^(−6/7) on the unshifted grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..schedules import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    WeightedGrid,
    karras_sigmas,
    resolution_shift,
)
from .checks import require_finite, require_fraction, require_positive

__all__ = ["DiffusionObjective"]


class DiffusionObjective:
    """Weighted x0-MSE with lognormal σ snapped to a fixed Karras grid (epg-method.md §6.2).

    Args:
        net: EPGViT, called as ``net(x_in, t_cond, y) -> x̂0 (B, C, H, W)``.
        img_size: image side H (σ shift H/64).
        num_classes: class count; label ``num_classes`` is the null class. 0: unconditional
            (the net is called with ``y=None`` and the batch needs no "label").
        P_mean, P_std: ln σ ~ N(P_mean, P_std), unshifted.
        grid_scales: points of the Karras snapping grid (1280, spec §6.2: σ_0 = σ_max …
            σ_1279 = σ_min). Snapping is to the nearest grid point by absolute σ difference. The
            weight's neighbour σ_{i+1} is the Karras formula at i + 1, as the released code
            evaluates it: for the last point that is the formula at i = 1280, just below σ_min
            (0.00196), not a grid point.
        label_dropout: probability of replacing a label by the null class (0.1, for CFG).
        sigma_data, sigma_min, sigma_max, rho: EDM/Karras constants (unshifted).
        weighting: "delta" (the paper's w(i) = 1/(σ_i − σ_{i+1})) or "uniform" (w = 1, plain x0
            MSE, which puts far more of the gradient on high noise levels: `epg demo` uses it to
            learn in a few hundred CPU steps what the paper's weighting learns in 1M).

    draw(...) keys (all per-sample):
        "sigma" (B,) float32 shifted σ_i·H/64; "weight" (B,) float32 w(i) on the unshifted grid
        (0 where σ_i = σ_{i+1}); "eps" (B, C, H, W) float32; "drop" (B,) bool label-dropout mask.
    loss terms: "diffusion" (the loss itself).
    """

    def __init__(
        self,
        net,
        img_size: int,
        num_classes: int,
        P_mean: float = -1.2,
        P_std: float = 1.6,
        grid_scales: int = 1280,
        label_dropout: float = 0.1,
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
        weighting: str = "delta",
    ):
        if weighting not in ("delta", "uniform"):
            raise ValueError(f"weighting must be 'delta' or 'uniform', got {weighting!r}")
        self.weighting = weighting
        if grid_scales < 2:
            raise ValueError(f"grid_scales must be >= 2, got {grid_scales}")
        require_fraction(label_dropout=label_dropout)
        require_positive(P_std=P_std, sigma_data=sigma_data, rho=rho)
        require_finite(P_mean=P_mean)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.net = net
        self.img_size = img_size
        self.shift = resolution_shift(img_size)
        self.num_classes = num_classes
        self.P_mean, self.P_std = P_mean, P_std
        self.grid_scales = grid_scales
        self.label_dropout = label_dropout
        self.sigma_data = sigma_data
        self.sigma_min_shifted = sigma_min * self.shift
        self.sigmas = karras_sigmas(grid_scales, sigma_min, sigma_max, rho)  # float64, CPU
        # σ_{i+1} for i = 0..N−1: the formula continued one index past σ_min for the last point.
        step = (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)) / (grid_scales - 1)
        beyond = (sigma_min ** (1 / rho) + step) ** rho
        gaps = self.sigmas - torch.cat([self.sigmas[1:], self.sigmas.new_tensor([beyond])])
        self.weights = torch.where(gaps > 0, 1.0 / gaps, torch.zeros_like(gaps))  # (grid_scales,)
        self.grid = WeightedGrid(self.sigmas, self.weights)

    def grid_weights(self) -> tuple[Tensor, Tensor]:
        """(σ_i, w(i)) for every index a draw can take, i = 0..grid_scales−1; unshifted, float64."""
        return self.sigmas.clone(), self.weights.clone()

    def snap(self, sigma: Tensor) -> Tensor:
        """Index of the grid point nearest to each unshifted σ."""
        return self.grid.nearest(sigma)

    def draw(
        self,
        step: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        device: torch.device | str,
    ) -> dict[str, Tensor]:
        """All randomness of one step, in this order: ln σ, ε, the label-dropout mask.
        ``step`` is unused (no curriculum in stage 2a)."""
        gen_device = generator.device
        log_sigma = torch.randn(batch_size, generator=generator, device=gen_device)
        eps = torch.randn((batch_size, *image_shape), generator=generator, device=gen_device)
        drop = torch.rand(batch_size, generator=generator, device=gen_device) < self.label_dropout
        index = self.snap((log_sigma.double() * self.P_std + self.P_mean).exp())
        sigmas, weights = self.grid.on(gen_device)
        sigma, weight = sigmas[index] * self.shift, weights[index]
        if self.weighting == "uniform":
            weight = torch.ones_like(weight)
        return {
            "sigma": sigma.float().to(device),
            "weight": weight.float().to(device),
            "eps": eps.to(device),
            "drop": drop.to(device),
        }

    def labels(self, batch: dict[str, Tensor], drop: Tensor) -> Tensor | None:
        """The conditioning labels: the batch's, with dropped ones set to the null class."""
        if self.num_classes == 0:
            return None
        y = batch["label"]
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def loss(
        self, batch: dict[str, Tensor], draws: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch["image"]
        sigma, weight = draws["sigma"], draws["weight"]
        # One pass each: c_in·(x0 + σ·ε) with the scalings, then the per-sample weighted MSE.
        x_in, _, _, _, t_cond = ops.noise_precondition(
            x0, draws["eps"].to(x0.dtype), sigma, self.sigma_data, self.sigma_min_shifted, "x0"
        )
        x0_hat = self.net(x_in, t_cond, self.labels(batch, draws["drop"]))
        loss = ops.weighted_mse_loss(x0_hat, x0, weight).mean()  # = mean over B, C, H, W of w·(x̂0 − x0)²
        return loss, {"diffusion": loss}
