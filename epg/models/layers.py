"""Transformer building blocks of the EPG networks, computed through ``epg.ops``.

Parameter names follow the official checkpoints (``norm1``, ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``skip_linear``, ``skip_norm``, ``adaLN_modulation.1`` ...), so their state dicts load
unchanged. Shapes: B batch, T tokens, D width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state-dict keys) through the fused op; float32 statistics."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (columns ordered Q, K, V × heads)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        out = ops.attention(self.qkv(x), self.num_heads)  # (B, T, D)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x += Attn(LN1(x)); x += MLP(LN2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """adaLN-Zero block with a U-ViT long skip from the encoder.

    x = skip_norm(skip_linear([x, skip])) when a skip is given; then with
    (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c)):
    x += gate1·Attn(LN1(x)·(1 + scale1) + shift1); x += gate2·MLP(LN2(x)·(1 + scale2) + shift2).
    The conditioning c has the *encoder* width.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cond_dim: int,
        mlp_ratio: float,
        qkv_bias: bool,
        skip_dim: int | None,
        drop: float = 0.0,
    ):
        super().__init__()
        if skip_dim is not None:
            self.skip_linear = nn.Linear(dim + skip_dim, dim)
            self.skip_norm = LayerNorm(dim)
        else:
            self.skip_linear = self.skip_norm = None
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this decoder block was built with a long skip and needs one")
            x = self.skip_norm(self.skip_linear(torch.cat([x, skip], dim=-1)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        n1, n2 = self.norm1, self.norm2
        x = ops.gated_residual(
            x, gate1, self.attn(ops.ln_modulate(x, n1.weight, n1.bias, shift1, scale1, n1.eps))
        )
        return ops.gated_residual(
            x, gate2, self.mlp(ops.ln_modulate(x, n2.weight, n2.bias, shift2, scale2, n2.eps))
        )


class PatchEmbed(nn.Module):
    """Holds the stride-p convolution (``proj``); the model runs it through ``ops.patch_embed``."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: Tensor, pos_embed: Tensor) -> Tensor:
        """img (B, C, H, W), pos_embed (N, D) → tokens (B, N, D)."""
        return ops.patch_embed(img, self.proj.weight, self.proj.bias, pos_embed)


def init_vit_weights(module: nn.Module, separate_qkv_bound: bool) -> None:
    """Xavier-uniform Linear weights with zero biases, LayerNorm (1, 0), and the patch conv as a
    Linear of fan-in C·p² and fan-out D. With ``separate_qkv_bound`` (stage-1 encoder), a fused
    qkv weight uses the bound of one D×D projection, as if Q, K and V were separate layers."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if separate_qkv_bound and name.endswith("attn.qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))
            nn.init.uniform_(w, -bound, bound)
            nn.init.zeros_(m.proj.bias)
