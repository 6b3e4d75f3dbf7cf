"""Plain PyTorch reference of every fused op: the definition of correct, and the CPU path.

Each op ``<op>`` has a forward ``<op>(...)`` and a backward ``<op>_backward(grad(s), inputs...)``
that returns the gradients of the tensor inputs. The backward recomputes what it needs from the
inputs (nothing is saved between the two), so any backend's forward can pair with any backend's
backward. Every function depends on torch alone, works for float64, and returns fresh contiguous
tensors that never alias an input (a requirement of ``torch.library`` custom ops).

Normalisation statistics and modulation are computed in float32 (or float64 when the input is
float64) and cast back once, as the official EPG LayerNorm does.

Shapes: B batch, T tokens, D width, H heads, Dh head dim, C channels, p patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_to(grad: Tensor, dims: tuple[int, ...]) -> Tensor:
    return grad.sum(dim=dims) if dims else grad


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (x_hat, rstd) over the last dim, in the compute dtype."""
    xf = x.to(_compute_dtype(x))
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (xf - mean) * rstd, rstd


def _normalize_backward(grad_xhat: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """d loss / d x given d loss / d x_hat for x_hat = (x - mean) * rstd."""
    return rstd * (
        grad_xhat
        - grad_xhat.mean(dim=-1, keepdim=True)
        - x_hat * (grad_xhat * x_hat).mean(dim=-1, keepdim=True)
    )


# --- layer norm -------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """y = (x − mean) / sqrt(var + eps) · weight + bias over the last dim. x (..., D)."""
    x_hat, _ = _normalize(x, eps)
    ct = x_hat.dtype
    return (x_hat * weight.to(ct) + bias.to(ct)).to(x.dtype).contiguous()


def layer_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias)."""
    x_hat, rstd = _normalize(x, eps)
    g = grad.to(x_hat.dtype)
    lead = tuple(range(x.dim() - 1))
    grad_x = _normalize_backward(g * weight.to(g.dtype), x_hat, rstd)
    return (
        grad_x.to(x.dtype).contiguous(),
        _reduce_to(g * x_hat, lead).to(weight.dtype),
        _reduce_to(g, lead).to(weight.dtype),
    )


# --- layer norm with adaLN modulation -----------------------------------------------------------


def ln_modulate(
    x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> Tensor:
    """LN(x)·(1 + scale) + shift; x (B, T, D), shift and scale (B, D) broadcast over tokens."""
    x_hat, _ = _normalize(x, eps)
    ct = x_hat.dtype
    y = x_hat * weight.to(ct) + bias.to(ct)
    out = y * (1 + scale.to(ct)[:, None]) + shift.to(ct)[:, None]
    return out.to(x.dtype).contiguous()


def ln_modulate_backward(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias, grad_shift, grad_scale)."""
    x_hat, rstd = _normalize(x, eps)
    ct = x_hat.dtype
    g = grad.to(ct)
    y = x_hat * weight.to(ct) + bias.to(ct)
    grad_y = g * (1 + scale.to(ct)[:, None])
    grad_x = _normalize_backward(grad_y * weight.to(ct), x_hat, rstd)
    return (
        grad_x.to(x.dtype).contiguous(),
        (grad_y * x_hat).sum(dim=(0, 1)).to(weight.dtype),
        grad_y.sum(dim=(0, 1)).to(bias.dtype),
        g.sum(dim=1).to(shift.dtype),
        (g * y).sum(dim=1).to(scale.dtype),
    )


# --- gated residual --------------------------------------------------------------------------


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate·y; x and y (B, T, D), gate (B, D) broadcast over tokens. Result in x's dtype."""
    ct = _compute_dtype(x)
    return (x.to(ct) + gate.to(ct)[:, None] * y.to(ct)).to(x.dtype).contiguous()


def gated_residual_backward(grad: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (grad_gate, grad_y); grad_x is ``grad`` itself."""
    ct = _compute_dtype(grad)
    g = grad.to(ct)
    grad_gate = (g * y.to(ct)).sum(dim=1)
    grad_y = g * gate.to(ct)[:, None]
    return grad_gate.to(gate.dtype), grad_y.to(y.dtype).contiguous()


# --- attention on packed qkv ------------------------------------------------------------------


def _split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, 3·H·Dh) with columns ordered (3, H, Dh) → three (B, H, T, Dh) views."""
    B, T, three_d = qkv.shape
    head_dim = three_d // (3 * num_heads)
    q, k, v = qkv.reshape(B, T, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """softmax(Q·Kᵀ/sqrt(Dh))·V per head, non-causal. qkv (B, T, 3·H·Dh) → (B, T, H·Dh)."""
    q, k, v = _split_qkv(qkv, num_heads)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
    B, H, T, Dh = out.shape
    return out.transpose(1, 2).reshape(B, T, H * Dh).contiguous()


def attention_backward(grad: Tensor, qkv: Tensor, num_heads: int) -> Tensor:
    """Returns grad_qkv (B, T, 3·H·Dh), recomputing the probabilities in float32/64."""
    ct = _compute_dtype(qkv)
    q, k, v = (t.to(ct) for t in _split_qkv(qkv, num_heads))
    B, H, T, Dh = q.shape
    scale = Dh**-0.5
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (B, H, T, T)
    grad_o = grad.to(ct).reshape(B, T, H, Dh).transpose(1, 2)
    grad_v = p.transpose(-1, -2) @ grad_o
    grad_p = grad_o @ v.transpose(-1, -2)
    grad_s = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))
    grad_q = (grad_s @ k) * scale
    grad_k = (grad_s.transpose(-1, -2) @ q) * scale
    grad_qkv = torch.stack((grad_q, grad_k, grad_v), dim=0).permute(1, 3, 0, 2, 4)
    return grad_qkv.reshape(B, T, 3 * H * Dh).to(qkv.dtype).contiguous()


# --- patch embedding and output head ---------------------------------------------------------


def patchify(img: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) → (B, N, C·p·p), tokens row-major, features in (c, p1, p2) order (Conv2d's)."""
    B, C, H, W = img.shape
    p = patch_size
    h, w = H // p, W // p
    return img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)


def unpatchify_conv_order(patches: Tensor, patch_size: int, channels: int, h: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    B, N, _ = patches.shape
    p, w = patch_size, N // h
    x = patches.reshape(B, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, h * p, w * p)


def patch_embed(img: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    """Conv2d(kernel = stride = p) as tokens, + bias + positional embedding.

    img (B, C, H, W), weight (D, C, p, p), bias (D,), pos_embed (N, D) → (B, N, D), N = HW/p².
    """
    p = weight.shape[-1]
    tokens = F.conv2d(img, weight, bias, stride=p).flatten(2).transpose(1, 2)
    return (tokens + pos_embed).contiguous()


def patch_embed_backward(
    grad: Tensor, img: Tensor, weight: Tensor, pos_embed: Tensor, need_img_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_img, grad_weight, grad_bias, grad_pos_embed); grad_img is an empty tensor
    when ``need_img_grad`` is False (the image is data, not a parameter, in training)."""
    ct = _compute_dtype(grad)
    D, C, p, _ = weight.shape
    g = grad.to(ct)  # (B, N, D)
    w_flat = weight.to(ct).reshape(D, C * p * p)
    patches = patchify(img.to(ct), p)
    grad_w = torch.einsum("bnd,bnk->dk", g, patches).reshape(weight.shape)
    if need_img_grad:
        grad_img = unpatchify_conv_order(g @ w_flat, p, C, img.shape[2] // p).to(img.dtype)
    else:
        grad_img = img.new_empty(0)
    return (
        grad_img.contiguous(),
        grad_w.to(weight.dtype).contiguous(),
        g.sum(dim=(0, 1)).to(weight.dtype),
        g.sum(dim=0).to(pos_embed.dtype),
    )


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, N, p·p·C) with features in (p1, p2, c) order, N = h·w square → (B, C, h·p, w·p)."""
    B, N, _ = tokens.shape
    h = math.isqrt(N)
    p = patch_size
    x = tokens.reshape(B, h, h, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * p, h * p)


def patchify_output_order(img: Tensor, patch_size: int) -> Tensor:
    """Inverse of :func:`unpatchify`: (B, C, H, W) → (B, N, p·p·C) in (p1, p2, c) order."""
    B, C, H, W = img.shape
    p = patch_size
    x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def output_head(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    weight: Tensor,
    bias: Tensor,
    patch_size: int,
    eps: float,
) -> Tensor:
    """out_norm → linear → unpatchify. x (B, N, D), N a square; weight (p·p·C, D) → (B, C, H, W)."""
    x_norm = layer_norm(x, norm_weight, norm_bias, eps)
    out = F.linear(x_norm, weight, bias)
    channels = weight.shape[0] // (patch_size * patch_size)
    return unpatchify(out, patch_size, channels).contiguous()


def output_head_backward(
    grad: Tensor,
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    weight: Tensor,
    patch_size: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias)."""
    ct = _compute_dtype(grad)
    g = patchify_output_order(grad.to(ct), patch_size)  # (B, N, p·p·C)
    x_norm = layer_norm(x, norm_weight, norm_bias, eps).to(ct)
    grad_w = torch.einsum("bnk,bnd->kd", g, x_norm)
    grad_x_norm = g @ weight.to(ct)
    grad_x, grad_nw, grad_nb = layer_norm_backward(grad_x_norm, x, norm_weight, eps)
    return (
        grad_x,
        grad_nw,
        grad_nb,
        grad_w.to(weight.dtype).contiguous(),
        g.sum(dim=(0, 1)).to(weight.dtype),
    )


# --- time embedding ---------------------------------------------------------------------------


def _frequencies(dim: int, t: Tensor) -> Tensor:
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=_compute_dtype(t))
    return torch.exp(-math.log(10000.0) * k / half)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [cos(t·f_k), sin(t·f_k)] (cos first), f_k = 10000^(−k/(dim/2)).

    t (B,) → (B, dim) in float32 (float64 for float64 t); an odd dim gets a zero last column.
    """
    freqs = _frequencies(dim, t)
    args = t.to(freqs.dtype)[:, None] * freqs[None]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.contiguous()


def timestep_embedding_backward(grad: Tensor, t: Tensor, dim: int) -> Tensor:
    """Returns grad_t (B,)."""
    freqs = _frequencies(dim, t)
    half = freqs.shape[0]
    args = t.to(freqs.dtype)[:, None] * freqs[None]
    g = grad.to(freqs.dtype)
    grad_t = (-g[:, :half] * torch.sin(args) + g[:, half : 2 * half] * torch.cos(args)) @ freqs
    return grad_t.to(t.dtype)


# --- EDM preconditioning scalings -------------------------------------------------------------

EDM_MODES = ("x0", "edm")


def edm_scalings(
    sigma: Tensor, sigma_data: float, sigma_min: float, mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (c_in, c_skip, c_out, t_cond) for the (already shifted) noise levels ``sigma``.

    c_in = 1/sqrt(σ² + σ_d²); t_cond = 250·ln(σ + 1e-44);
    mode "x0": c_skip = 0, c_out = 1 (the network predicts x0 directly);
    mode "edm": c_skip = σ_d²/((σ − σ̃_min)² + σ_d²), c_out = (σ − σ̃_min)·σ_d/sqrt(σ² + σ_d²),
    so that D(x, σ̃_min) = x exactly (consistency boundary condition).
    """
    if mode not in EDM_MODES:
        raise ValueError(f"edm_scalings: mode must be one of {EDM_MODES}, got {mode!r}")
    s = sigma
    sd2 = sigma_data * sigma_data
    c_in = torch.rsqrt(s * s + sd2)
    # 1e-44 underflows to a float32 denormal; adding it in float64 keeps ln(0) finite everywhere.
    t_cond = (250.0 * torch.log(s.double() + 1e-44)).to(s.dtype)
    if mode == "x0":
        c_skip, c_out = torch.zeros_like(s), torch.ones_like(s)
    else:
        d = s - sigma_min
        c_skip = sd2 / (d * d + sd2)
        c_out = d * sigma_data * c_in
    return c_in.contiguous(), c_skip.contiguous(), c_out.contiguous(), t_cond.contiguous()


def edm_scalings_backward(
    grad_c_in: Tensor,
    grad_c_skip: Tensor,
    grad_c_out: Tensor,
    grad_t_cond: Tensor,
    sigma: Tensor,
    sigma_data: float,
    sigma_min: float,
    mode: str,
) -> Tensor:
    """Returns grad_sigma (B,)."""
    s = sigma
    sd2 = sigma_data * sigma_data
    c_in = torch.rsqrt(s * s + sd2)
    grad = grad_c_in * (-s * c_in**3) + grad_t_cond * (250.0 / (s + 1e-44))
    if mode == "edm":
        d = s - sigma_min
        grad = grad + grad_c_skip * (-2.0 * sd2 * d / (d * d + sd2) ** 2)
        grad = grad + grad_c_out * sigma_data * (c_in - d * s * c_in**3)
    return grad.to(sigma.dtype).contiguous()
