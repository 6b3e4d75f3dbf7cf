"""Stage 2b: ECT-style consistency fine-tuning with an auxiliary InfoNCE (epg-method.md §7).

    D_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, 250·ln σ, y)   (§3, "edm", shifted σ̃_min)
    Δ² = Σ_pixels (D_θ(x0 + tε, t) − D_sgθ(x0 + rε, r))²,   ℓ = Δ² / sqrt(sg(Δ²) + c²)
    L_aux = NT(W_φ(c_in(σ̃_min)·D_θ, σ̃_min), sg W_φ(c_in(σ̃_min)·x0, σ̃_min); τ_aux)
    L = mean_batch(w·ℓ + aux_weight·L_aux),   w = 1/(t − r) on shifted t, r.
With ``first_stage=0`` the first stage is the code's denoising warm-up: the target D_sgθ(x_r, r)
is replaced by x0, w = 1/(σ_i − σ_{i+1}) on a Karras grid, no L_aux.
"""

from __future__ import annotations

import math

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
from .infonce import info_nce

__all__ = ["ect_stage", "ect_r", "ConsistencyObjective"]


def ect_stage(step: int, stage_length: int = 100_000, first_stage: int = 1) -> int:
    """s = floor(step / stage_length) + first_stage: the code's ``delta`` is ``first_stage`` (1 as
    released; stage 0 is the denoising warm-up)."""
    return step // stage_length + first_stage


def ect_r(
    t: Tensor,
    step: int,
    stage_length: int = 100_000,
    q: float = 2.0,
    k: float = 8.0,
    b: float = 1.0,
    sigma_min: float = SIGMA_MIN,
    first_stage: int = 1,
) -> Tensor:
    """The ECT "sigmoid" mapping t → r at training step ``step`` (epg-method.md §7.2).

    s = floor(step / stage_length) + first_stage,
    r = max(t·(1 − q^(−s)·(1 + k·sigmoid(−b·t))), σ_min), t and r unshifted. Stage 1: r/t → 0.5
    for large t and r = σ_min for t ≲ 1; stage 7: r/t ≈ 0.96–0.99; stage 0: r = σ_min.
    """
    stage = ect_stage(step, stage_length, first_stage)
    ratio = 1.0 - q ** (-stage) * (1.0 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp(min=sigma_min)


class ConsistencyObjective:
    """Consistency loss with pseudo-Huber normalisation plus the perceptual InfoNCE (§7.3).

    Args:
        net: EPGViT F_θ, called as ``net(x_in, t_cond, y)``, in train mode (dropout 0.5 in the
            official run). The target D_sgθ(x_r, r) is the same ``net`` under ``no_grad``: the
            official target is a copy overwritten with the online weights every step (§7.1), so
            it equals the current online network.
        perceptual: frozen stage-1 RCMViT W_φ with its projector (``perceptual(x_in, t_cond) ->
            (z, h)``), in eval mode with requires_grad False (the Trainer's job); ``None`` turns
            the auxiliary term off, and so does ``aux_weight=0`` (W_φ is then not run).
        img_size: image side H (σ shift H/64).
        num_classes: class count (null class = num_classes); 0: unconditional (y=None).
        stage_length, P_mean, P_std, q, k, b: the t/r sampling of §7.2
            (t = max(exp(N(P_mean, P_std)), σ_min), r = ect_r(t, step)).
        c: pseudo-Huber constant, 0.06, not scaled with the image dimension (the code's value).
        aux_weight: weight of L_aux (1.0); tau_aux: its temperature (0.1).
        label_dropout: probability of the null label; the latest official consistency config
            uses 0.0, so it is off by default.
        first_stage: the stage of the first ``stage_length`` steps (the code's ``delta``): 1 as
            released; 0 turns them into the code's denoising warm-up ("stage 0", unreachable in
            the released config): target x0 instead of the stop-gradient network, weight
            1/(σ_i − σ_{i+1}) at the point of a ``denoise_grid_scales``-point unshifted Karras
            grid nearest to t (2560 in the code; t itself is not snapped), no auxiliary term.
            The ECT stages 1, 2, … follow it.
        match_dropout: save and restore the RNG around the online pass so the target pass sees
            the same dropout masks (True, as the official code). Set False when the net has no
            dropout to avoid the graph breaks described below.
        sigma_data, sigma_min: EDM constants (unshifted; σ̃_min = σ_min·H/64 in c_skip/c_out).

    Open points, decided as the code does: the perceptual network sees both D_θ and x0 at time
    σ̃_min (the paper writes t_n for the first); the weight 1/(t − r) uses *shifted* t and r.

    Dropout: the target pass reuses the online pass's dropout masks by saving the global RNG
    state (CPU and, for CUDA inputs, the current CUDA device's) before the online pass and
    restoring it before the target pass. Under ``torch.compile`` the RNG get/set calls break the
    graph (the two passes compile as separate graphs), and masks then match only if both passes
    draw their random numbers the same way (eager networks, or inductor with
    ``fallback_random=True``; on CPU, inductor was also seen to give matching masks). With
    drop = 0 the save/restore changes nothing (``match_dropout=False`` skips it).

    draw(...) keys (all per-sample):
        "t", "r" (B,) float32 shifted; "weight" (B,) float32 = 1/(t − r) (0 where t = r);
        "eps" (B, C, H, W) float32; "drop" (B,) bool label-dropout mask; with first_stage=0 also
        "denoise" (B,) bool, all True in stage 0, where "weight" is the grid's 1/(σ_i − σ_{i+1}).
    loss terms: "consistency" = mean(w·ℓ), "aux" = mean(L_aux) (unweighted; 0 when the term is
    off).
    """

    def __init__(
        self,
        net,
        perceptual,
        img_size: int,
        num_classes: int,
        stage_length: int = 100_000,
        P_mean: float = -0.4,
        P_std: float = 1.6,
        c: float = 0.06,
        aux_weight: float = 1.0,
        tau_aux: float = 0.1,
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        label_dropout: float = 0.0,
        match_dropout: bool = True,
        first_stage: int = 1,
        denoise_grid_scales: int = 2560,
    ):
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if stage_length <= 0:
            raise ValueError(f"stage_length must be positive, got {stage_length}")
        if first_stage not in (0, 1):
            raise ValueError(f"first_stage must be 0 (denoising warm-up) or 1, got {first_stage}")
        if denoise_grid_scales < 2:
            raise ValueError(f"denoise_grid_scales must be >= 2, got {denoise_grid_scales}")
        require_positive(P_std=P_std, c=c, tau_aux=tau_aux, sigma_data=sigma_data, sigma_min=sigma_min)
        if not (math.isfinite(q) and q > 1):  # q <= 1 puts every r at sigma_min: no consistency stages
            raise ValueError(f"q must be a finite number > 1, got {q}")
        require_fraction(label_dropout=label_dropout)
        require_finite(P_mean=P_mean, b=b)
        if not (aux_weight >= 0 and k >= 0):
            raise ValueError(f"aux_weight and k must be >= 0, got {aux_weight}, {k}")
        self.net = net
        self.perceptual = perceptual
        self.img_size = img_size
        self.shift = resolution_shift(img_size)
        self.num_classes = num_classes
        self.stage_length = stage_length
        self.P_mean, self.P_std = P_mean, P_std
        self.c = c
        self.aux_weight = aux_weight
        self.tau_aux = tau_aux
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_min_shifted = sigma_min * self.shift
        self.q, self.k, self.b = q, k, b
        self.label_dropout = label_dropout
        self.match_dropout = match_dropout
        self.first_stage = first_stage
        # Stage 0's weights: 1/(σ_i − σ_{i+1}) of the grid for i = 0..N−2, the code's nearest
        # index being clamped to N−2 there (stage 2a instead continues the formula past σ_min).
        grid = karras_sigmas(denoise_grid_scales, sigma_min, SIGMA_MAX, RHO)
        self.denoise_grid = WeightedGrid(grid[:-1], 1.0 / (grid[:-1] - grid[1:]))

    def stage(self, step: int) -> int:
        """The ECT stage of ``step`` (0: the denoising warm-up)."""
        return ect_stage(step, self.stage_length, self.first_stage)

    def draw(
        self,
        step: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        device: torch.device | str,
    ) -> dict[str, Tensor]:
        """All randomness of one step, in this order: ln t, ε, the label-dropout mask."""
        gen_device = generator.device
        log_t = torch.randn(batch_size, generator=generator, device=gen_device)
        eps = torch.randn((batch_size, *image_shape), generator=generator, device=gen_device)
        drop = torch.rand(batch_size, generator=generator, device=gen_device) < self.label_dropout
        t = (log_t.double() * self.P_std + self.P_mean).exp().clamp(min=self.sigma_min)
        r = ect_r(t, step, self.stage_length, self.q, self.k, self.b, self.sigma_min, self.first_stage)
        denoise = self.stage(step) == 0
        if denoise:  # the grid's weight at the point nearest to the unshifted t
            weight = self.denoise_grid.on(t.device)[1][self.denoise_grid.nearest(t)]
        t, r = t * self.shift, r * self.shift
        if not denoise:
            gap = t - r
            weight = torch.where(gap > 0, 1.0 / gap, torch.zeros_like(gap))
        draws = {
            "t": t.float().to(device),
            "r": r.float().to(device),
            "weight": weight.float().to(device),
            "eps": eps.to(device),
            "drop": drop.to(device),
        }
        if self.first_stage == 0:
            draws["denoise"] = torch.full((batch_size,), denoise, dtype=torch.bool, device=device)
        return draws

    def denoise(self, x0: Tensor, eps: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        """D_θ(x, σ) = c_skip·x + c_out·F_θ(c_in·x, 250·ln σ, y) at x = x0 + σ·ε, shifted σ (B,)."""
        B = x0.shape[0]
        x_in, _, c_skip, c_out, t_cond = ops.noise_precondition(
            x0, eps, sigma, self.sigma_data, self.sigma_min_shifted, "edm"
        )
        F = self.net(x_in, t_cond, y)
        x = x0 + sigma.view(B, 1, 1, 1).to(x0.dtype) * eps
        return c_skip.view(B, 1, 1, 1) * x + c_out.view(B, 1, 1, 1) * F.float()

    def perceptual_features(self, x: Tensor) -> Tensor:
        """Projector output z of the frozen W_φ for x seen at time σ̃_min."""
        B = x.shape[0]
        sigma = torch.full((B,), self.sigma_min_shifted, dtype=torch.float32, device=x.device)
        c_in, _, _, t_cond = ops.edm_scalings(sigma, self.sigma_data, self.sigma_min_shifted)
        z, _ = self.perceptual(x * c_in.view(B, 1, 1, 1).to(x.dtype), t_cond)
        return z

    @property
    def aux_on(self) -> bool:
        return self.perceptual is not None and self.aux_weight > 0

    def keys(self, batch: dict[str, Tensor], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """The auxiliary InfoNCE's keys, without gradient: W_φ's z of each clean image ("z"; none
        with the term off). W_φ runs in eval mode (the Trainer's), so each key depends on its own
        image only, and keys computed slice by slice are the whole batch's keys."""
        if not self.aux_on:
            return {}
        with torch.no_grad():
            return {"z": self.perceptual_features(batch["image"])}

    def loss(
        self, batch: dict[str, Tensor], draws: dict[str, Tensor], keys: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L and its terms for ``batch``. ``keys`` (from :meth:`keys`) may hold more rows than the
        batch, its own first: the extra rows are further negatives of L_aux (the Trainer passes a
        micro-batch the keys of its whole batch). Default: the batch's own keys."""
        x0 = batch["image"]
        if keys is None:
            keys = self.keys(batch, draws)
        t, r, weight = draws["t"], draws["r"], draws["weight"]
        denoise = draws.get("denoise")  # only with first_stage=0
        eps = draws["eps"].to(x0.dtype)
        y = None
        if self.num_classes > 0:
            y = batch["label"]
            y = torch.where(draws["drop"], torch.full_like(y, self.num_classes), y)
        # Same dropout masks in both passes: rewind the RNG to where the online pass started.
        if self.match_dropout:
            cpu_state = torch.get_rng_state()
            cuda_state = torch.cuda.get_rng_state(x0.device) if x0.is_cuda else None
        d_online = self.denoise(x0, eps, t, y)  # (B, C, H, W) float32
        if self.match_dropout:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x0.device)
        with torch.no_grad():
            d_target = self.denoise(x0, eps, r, y)
            if denoise is not None:
                # Stage 0 (denoising warm-up) replaces the target by the clean image. A select,
                # not a branch, so one compiled graph serves every stage; the target and W_φ
                # passes still run in stage 0, and are discarded.
                d_target = torch.where(denoise.view(-1, 1, 1, 1), x0.to(d_target.dtype), d_target)

        # w·Δ²/sqrt(sg(Δ²) + c²), Δ² the per-sample squared distance (§7.3).
        consistency = ops.pseudo_huber_loss(d_online, d_target, weight, self.c)  # (B,)

        if self.aux_on:
            q = self.perceptual_features(d_online.to(x0.dtype))
            aux = info_nce(q, keys["z"], self.tau_aux)  # (B,)
            if denoise is not None:
                aux = torch.where(denoise, 0.0, aux)  # none in stage 0
        else:
            aux = torch.zeros_like(consistency)

        loss = (consistency + self.aux_weight * aux).mean()
        return loss, {"consistency": consistency.mean(), "aux": aux.mean()}
