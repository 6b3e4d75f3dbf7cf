"""EDM preconditioning around an EPG network: (x_σ, σ, y) → D(x_σ) (epg-method.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..schedules import SIGMA_DATA, SIGMA_MIN, resolution_shift
from .networks import EPGViT, RCMViT


class Denoiser(nn.Module):
    """D(x_σ, σ) from the raw network F(c_in·x_σ, 250·ln σ, y).

    mode "x0" (diffusion): D = F, the network predicts the clean image.
    mode "edm" (consistency): D = c_skip·x_σ + c_out·F with the shifted σ̃_min = σ_min·H/64 in
    c_skip and c_out, so D(x, σ̃_min) = x exactly.
    ``sigma`` is the *shifted* noise level actually in x_σ (x_σ = x0 + σ·ε): a float, a 0-d
    tensor, or one value per image.
    """

    def __init__(
        self,
        net: EPGViT,
        mode: str = "x0",
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
    ):
        super().__init__()
        if isinstance(net, RCMViT):
            raise TypeError("Denoiser needs a stage-2 network (EPGViT); this is a stage-1 encoder "
                            "(RCMViT, from `epg pretrain`): fine-tune it with `epg finetune --encoder`")  # fmt: skip
        if mode not in ("x0", "edm"):
            raise ValueError(f"mode must be 'x0' or 'edm', got {mode!r}")
        self.net = net
        self.mode = mode
        self.sigma_data = sigma_data
        self.shift = resolution_shift(net.config.img_size)
        self.sigma_min_shifted = sigma_min * self.shift

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_in, c_skip, c_out, t_cond), each (B,)."""
        return ops.edm_scalings(sigma, self.sigma_data, self.sigma_min_shifted, self.mode)

    def forward(self, x: Tensor, sigma: Tensor | float, y: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(B)
        if sigma.shape != (B,):
            raise ValueError(f"sigma must be a scalar or ({B},), got {tuple(sigma.shape)}")
        sigma = sigma.float()
        c_in, c_skip, c_out, t_cond = self.scalings(sigma)
        F = self.net(x * c_in.view(B, 1, 1, 1).to(x.dtype), t_cond, y)
        if self.mode == "x0":
            return F
        return c_skip.view(B, 1, 1, 1) * x + c_out.view(B, 1, 1, 1) * F
