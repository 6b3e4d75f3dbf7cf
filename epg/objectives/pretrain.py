"""Stage 1: self-supervised pre-training of the RCMViT encoder (epg-method.md §5).

Two InfoNCE terms per image:
  * contrastive (§5.3.1): L_con = NT(z_θ(v1), sg z_θ⁻(v2); τ_con) + NT(z_θ(v2), sg z_θ⁻(v1); τ_con),
    v = view + σ̃_min·ε seen at time σ̃_min, θ⁻ the EMA target network;
  * representation consistency (§5.3.2):
    L_rc = NT(h_θ(x + σ_n ε, σ_n), sg h_θ(x + σ_{n+1} ε, σ_{n+1}); τ_rc),
    with the key from the *online* network under stop-gradient (as the released code; the EMA
    target with ``rc_key="target"``, §13.9), and one grid index n per step drawn from the
    curriculum grid of N(k) points (§5.2).
Total: L = mean_batch(L_con + L_rc).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops
from ..schedules import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, karras_sigmas, resolution_shift
from .checks import require_positive
from .infonce import info_nce

__all__ = [
    "curriculum_grid_size",
    "tau_max_schedule",
    "interpolated_tau",
    "PretrainObjective",
    "TAU_SCHEDULES",
    "RC_KEYS",
]

TAU_SCHEDULES = ("constant", "interpolated")
RC_KEYS = ("online", "target")


def curriculum_grid_size(
    step: int, s0: int = 20, s1: int = 1280, total_steps: int = 600_000
) -> int:
    """Number of Karras grid points N(k) at training step k (epg-method.md §5.2).

    K' = ceil(K / log2(ceil(s1/s0) + 1)), N(k) = min(s0·2^ceil(k/K'), s1) + 1.
    With s0 = 20, s1 = 1280, K = 600,000: K' = 99,629 and N = 21 (k = 0 only), 41, 81, 161,
    321, 641, 1281.
    """
    if step < 0 or total_steps <= 0 or not 0 < s0 <= s1:
        raise ValueError(
            f"need step >= 0, total_steps > 0 and 0 < s0 <= s1, "
            f"got {step}, {total_steps}, {s0}, {s1}"
        )
    k_prime = math.ceil(total_steps / math.log2(math.ceil(s1 / s0) + 1))
    doublings = -(-step // k_prime)  # ceil(k / K') in integers
    doublings = min(doublings, s1.bit_length())  # s0·2^d ≥ s1 from here on; keeps the int small
    return min(s0 * 2**doublings, s1) + 1


def tau_max_schedule(
    step: int, total_steps: int, tau_start: float = 0.2, tau_end: float = 0.1
) -> float:
    """The "cosine_tau" schedule of τ_max (epg-method.md §5.4).

    τ_max(k) = τ_end·cos(π/2·(1.5k/K + 1)) + τ_start for k ≤ K/1.5, else τ_end: τ_max falls from
    τ_start to τ_start − τ_end over the first 2/3 of training (continuous iff τ_start = 2·τ_end,
    as with the defaults 0.2 → 0.1).
    """
    if step <= total_steps / 1.5:
        return tau_end * math.cos(math.pi / 2 * (1.5 * step / total_steps + 1)) + tau_start
    return tau_end


def interpolated_tau(
    sigma: float | Tensor,
    tau_max: float,
    tau_min: float = 0.1,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> float | Tensor:
    """τ(σ) = (σ − σ_min)/(σ_max − σ_min)·τ_max + (σ_max − σ)/(σ_max − σ_min)·τ_min
    (epg-method.md §5.4), σ the *unshifted* noise level: τ_min at σ_min, τ_max at σ_max."""
    span = sigma_max - sigma_min
    return (sigma - sigma_min) / span * tau_max + (sigma_max - sigma) / span * tau_min


class PretrainObjective:
    """Stage-1 loss L = mean(L_con + L_rc) (epg-method.md §5.2–5.4).

    Args:
        online: RCMViT θ (called as ``online(x_in, t_cond) -> (z, h)``), in train mode.
        target: RCMViT θ⁻, the EMA copy (the Trainer keeps it in eval mode and updates it).
        img_size: image side H; every σ is multiplied by H/64 (§3).
        sigma_data, sigma_min, sigma_max, rho: the EDM/Karras constants (unshifted).
        s0, s1, total_steps: the grid curriculum N(k) (§5.2).
        tau_con: temperature of the contrastive term (0.2).
        tau_rc: temperature of the consistency term with ``tau_schedule="constant"`` (the code's
            config: 0.1), and τ_min of the ``"interpolated"`` schedule.
        tau_schedule: ``"constant"`` (official config) or ``"interpolated"``: τ(σ_n) between
            τ_rc at σ_min and τ_max(k) (cosine from tau_start to tau_start − tau_end over the
            first 2/3 of total_steps) at σ_max. The paper's exact τ schedule is an open question
            (§13.1); "interpolated" with 0.2 → 0.1 is the spec's best guess.
        rc_key: the network whose h at σ_{n+1} is the consistency key (under stop-gradient):
            ``"online"`` θ, as the released code does, or ``"target"`` θ⁻. Which one the paper
            used is an open question (§13.9: its Fig. 2 calls θ⁻ the EMA of θ, without saying
            which branches use it).

    draw(...) keys:
        "n" () int64 grid index ~ U{0..N(step)−2}, shared by the batch;
        "sigma_n", "sigma_n1" () float32, shifted grid σ_n·H/64 and σ_{n+1}·H/64 (σ_n > σ_{n+1});
        "tau_rc" () float32;
        "eps" (B, C, H, W) float32, one ε per image shared by all its noisy inputs.
    loss terms: "contrastive" = mean L_con, "consistency" = mean L_rc.

    The online network runs four times per batch (v1, v2, x_n with gradient; x_{n+1} under
    no_grad), the target twice under no_grad. The official target runs in eval mode, so its
    projector BatchNorms use running statistics that the parameter-only EMA never updates (§5.1);
    that is the Trainer's choice, not this class's. ``draw`` reads n back to the host to look up
    the grid (one tiny synchronisation when the generator lives on a GPU).
    """

    def __init__(
        self,
        online,
        target,
        img_size: int,
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
        s0: int = 20,
        s1: int = 1280,
        total_steps: int = 600_000,
        tau_con: float = 0.2,
        tau_rc: float = 0.1,
        tau_schedule: str = "constant",
        tau_start: float = 0.2,
        tau_end: float = 0.1,
        rc_key: str = "online",
    ):
        if tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {tau_schedule!r}")
        if rc_key not in RC_KEYS:
            raise ValueError(f"rc_key must be one of {RC_KEYS}, got {rc_key!r}")
        require_positive(sigma_data=sigma_data, rho=rho, tau_con=tau_con, tau_rc=tau_rc, tau_start=tau_start,
                         tau_end=tau_end, s0=s0, total_steps=total_steps)  # fmt: skip
        karras_sigmas(2, sigma_min, sigma_max, rho)  # 0 < sigma_min < sigma_max, checked here and not at a step
        if s1 < s0:
            raise ValueError(f"need s0 <= s1 (the curriculum's first and last grid sizes), got {s0}, {s1}")
        self.online = online
        self.target = target
        self.img_size = img_size
        self.shift = resolution_shift(img_size)
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.sigma_min_shifted = sigma_min * self.shift
        self.s0, self.s1, self.total_steps = s0, s1, total_steps
        self.tau_con = tau_con
        self.tau_rc = tau_rc
        self.tau_schedule = tau_schedule
        self.tau_start, self.tau_end = tau_start, tau_end
        self.rc_key = rc_key
        self._grids: dict[int, Tensor] = {}

    def grid(self, n_points: int) -> Tensor:
        """The unshifted Karras grid of ``n_points`` (float64, CPU), cached."""
        if n_points not in self._grids:
            self._grids[n_points] = karras_sigmas(
                n_points, self.sigma_min, self.sigma_max, self.rho
            )
        return self._grids[n_points]

    def tau_for(self, step: int, sigma_n: float) -> float:
        """τ_rc at ``step`` for the unshifted σ_n."""
        if self.tau_schedule == "constant":
            return self.tau_rc
        tau_max = tau_max_schedule(step, self.total_steps, self.tau_start, self.tau_end)
        return interpolated_tau(sigma_n, tau_max, self.tau_rc, self.sigma_min, self.sigma_max)

    def draw(
        self,
        step: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        device: torch.device | str,
    ) -> dict[str, Tensor]:
        """All randomness of one step, in this order: the grid index n, then ε."""
        gen_device = generator.device
        n_points = curriculum_grid_size(step, self.s0, self.s1, self.total_steps)
        n = torch.randint(0, n_points - 1, (), generator=generator, device=gen_device)
        eps = torch.randn((batch_size, *image_shape), generator=generator, device=gen_device)
        # The grid lives on the CPU; n is read back there (draw is outside the compiled loss).
        i = int(n)
        grid = self.grid(n_points)
        sigma_n, sigma_n1 = float(grid[i]), float(grid[i + 1])
        scalar = dict(dtype=torch.float32, device=device)
        return {
            "n": n.to(device),
            "sigma_n": torch.tensor(sigma_n * self.shift, **scalar),
            "sigma_n1": torch.tensor(sigma_n1 * self.shift, **scalar),
            "tau_rc": torch.tensor(self.tau_for(step, sigma_n), **scalar),
            "eps": eps.to(device),
        }

    def _inputs(self, x: Tensor, sigma: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Network inputs (c_in·(x + σ·ε), 250·ln σ) for a per-batch 0-d shifted σ."""
        B = x.shape[0]
        sigma_b = sigma.reshape(1).expand(B).contiguous().float()  # (B,)
        c_in, _, _, t_cond = ops.edm_scalings(sigma_b, self.sigma_data, self.sigma_min_shifted)
        x_in = (x + sigma.to(x.dtype) * eps) * c_in.view(B, 1, 1, 1).to(x.dtype)
        return x_in, t_cond

    def keys(self, batch: dict[str, Tensor], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """The InfoNCE keys of every sample, without gradient: the target's z of both views
        ("z1", "z2") and the ``rc_key`` network's h at σ_{n+1} ("h_n1").

        Each key depends on its own sample only: h comes before the projector's BatchNorm, and
        the target runs in eval mode (the Trainer's; its BatchNorms then use running
        statistics). So keys computed slice by slice are the whole batch's keys, which is how
        the Trainer gives every micro-batch the negatives of the whole batch. The online call
        still updates the projector BatchNorms' running statistics, as each of its calls does.
        """
        return {**self._contrastive_keys(batch, draws), "h_n1": self._consistency_key(batch, draws)}

    def _contrastive_keys(self, batch: dict[str, Tensor], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        eps, sigma_min = draws["eps"].to(batch["image"].dtype), self._sigma_min(batch)
        with torch.no_grad():
            z1, _ = self.target(*self._inputs(batch["view1"], sigma_min, eps))
            z2, _ = self.target(*self._inputs(batch["view2"], sigma_min, eps))
        return {"z1": z1, "z2": z2}

    def _consistency_key(self, batch: dict[str, Tensor], draws: dict[str, Tensor]) -> Tensor:
        """The less noisy consistency key: the ``rc_key`` network's h at σ_{n+1}, under stop-gradient."""
        x = batch["image"]
        net = self.online if self.rc_key == "online" else self.target
        with torch.no_grad():
            _, h_n1 = net(*self._inputs(x, draws["sigma_n1"], draws["eps"].to(x.dtype)))
        return h_n1

    def _sigma_min(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.full((), self.sigma_min_shifted, device=batch["image"].device)

    def loss(
        self, batch: dict[str, Tensor], draws: dict[str, Tensor], keys: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L and its terms for ``batch``. ``keys`` (from :meth:`keys`) may hold more rows than the
        batch, its own first: the extra rows are further negatives (the Trainer passes a
        micro-batch the keys of its whole batch). Default: the batch's own keys."""
        x, view1, view2 = batch["image"], batch["view1"], batch["view2"]
        eps = draws["eps"].to(x.dtype)
        sigma_min = self._sigma_min(batch)
        own_keys = keys is None
        if own_keys:
            keys = self._contrastive_keys(batch, draws)

        # Contrastive term on nearly clean views at time σ̃_min. Each view is a separate call
        # (as in the official code): the projector's BatchNorm computes batch statistics per
        # call, so batching v1 and v2 together would change the statistics and the loss.
        z1, _ = self.online(*self._inputs(view1, sigma_min, eps))
        z2, _ = self.online(*self._inputs(view2, sigma_min, eps))
        contrastive = info_nce(z1, keys["z2"], self.tau_con) + info_nce(z2, keys["z1"], self.tau_con)  # (B,)

        # Representation consistency between adjacent grid points, same ε. With its own keys the
        # key pass comes last, the official order of the online network's calls, which the
        # projector's running statistics (updated by every call) follow.
        _, h_n = self.online(*self._inputs(x, draws["sigma_n"], eps))
        h_n1 = self._consistency_key(batch, draws) if own_keys else keys["h_n1"]
        consistency = info_nce(h_n, h_n1, draws["tau_rc"])  # (B,)

        loss = (contrastive + consistency).mean()
        return loss, {"contrastive": contrastive.mean(), "consistency": consistency.mean()}
