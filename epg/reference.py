"""Plain PyTorch reference of every fused op: the definition of correct, and the CPU path.

Each op ``<op>`` has a forward ``<op>(...)`` and a backward ``<op>_backward(grad(s), inputs...)``
that returns the gradients of the tensor inputs. The backward recomputes what it needs from the
inputs (nothing is saved between the two), so any backend's forward can pair with any backend's
backward. Exceptions: the per-sample loss backwards also take the forward's per-sample statistic
(a value every backend's forward returns alike); patchify_hwc / unpatchify_hwc are each other's
gradient; normalize_images / to_uint8 (integer input / output) have none. Every function
depends on torch alone, works for float64, and returns fresh contiguous tensors that never alias
an input (a requirement of ``torch.library`` custom ops).

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


def _layer_norm_stats(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(LN(x)·weight + bias, mean, rstd) over the last dim, in the compute dtype.

    PyTorch's own fused LayerNorm (``torch.native_layer_norm``): the same statistics as the
    textbook (x − mean)·rsqrt(var + eps) with the biased variance, in one pass rather than the
    dozen elementwise passes the formula takes written out (on the CPU, where this module is the
    path every op takes, the written-out ones were ~16% of the demo's stage-2 step, ~8% now)."""
    ct = _compute_dtype(x)
    b = None if bias is None else bias.to(ct)
    return torch.native_layer_norm(x.to(ct), (x.shape[-1],), weight.to(ct), b, eps)


def _layer_norm_input_grads(
    grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """(d loss / d x, d loss / d weight) of y = LN(x)·weight + b given d loss / d y, everything
    in the compute dtype: PyTorch's own LayerNorm backward, i.e.
    dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)) and dw = Σ g·x̂ over the leading dims."""
    grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
        grad, x.to(grad.dtype), (x.shape[-1],), mean, rstd, weight.to(grad.dtype), None, [True, True, False]
    )
    return grad_x, grad_w


# --- layer norm -------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """y = (x − mean) / sqrt(var + eps) · weight + bias over the last dim. x (..., D)."""
    y, _, _ = _layer_norm_stats(x, weight, bias, eps)
    return y.to(x.dtype).contiguous()


def layer_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias)."""
    xc = x.to(_compute_dtype(x))  # once: the statistics and the input grads both read it
    _, mean, rstd = _layer_norm_stats(xc, weight, None, eps)
    g = grad.to(mean.dtype)
    grad_x, grad_w = _layer_norm_input_grads(g, xc, weight, mean, rstd)
    lead = tuple(range(x.dim() - 1))
    return (
        grad_x.to(x.dtype).contiguous(),
        grad_w.to(weight.dtype),
        _reduce_to(g, lead).to(weight.dtype),
    )


# --- layer norm with adaLN modulation -----------------------------------------------------------


def ln_modulate(
    x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> Tensor:
    """LN(x)·(1 + scale) + shift; x (B, T, D), shift and scale (B, D) broadcast over tokens."""
    y, _, _ = _layer_norm_stats(x, weight, bias, eps)
    ct = y.dtype
    out = y * (1 + scale.to(ct)[:, None]) + shift.to(ct)[:, None]
    return out.to(x.dtype).contiguous()


def ln_modulate_backward(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias, grad_shift, grad_scale)."""
    xc = x.to(_compute_dtype(x))  # once: the statistics and the input grads both read it
    y, mean, rstd = _layer_norm_stats(xc, weight, bias, eps)
    ct = y.dtype
    g = grad.to(ct)
    grad_y = g * (1 + scale.to(ct)[:, None])
    grad_x, grad_w = _layer_norm_input_grads(grad_y, xc, weight, mean, rstd)
    return (
        grad_x.to(x.dtype).contiguous(),
        grad_w.to(weight.dtype),
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


# --- noise preconditioning (network input and scalings in one op) -----------------------------


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """(B,) → (B, 1, …, 1) broadcasting over the non-batch dims of ``like``."""
    return v.reshape((v.shape[0],) + (1,) * (like.dim() - 1))


def noise_precondition(
    x0: Tensor, eps: Tensor, sigma: Tensor, sigma_data: float, sigma_min: float, mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Network input and per-sample scalings of a training step, (x_in, c_in, c_skip, c_out, t_cond).

    x_in = c_in(σ)·(x0 + σ·ε) per sample, in x0's dtype (arithmetic in float32, float64 for
    float64 x0; σ and c_in are taken in sigma's dtype first, as in :func:`edm_scalings`, which
    gives the four (B,) scalings). x0, eps (B, …) of one dtype; sigma (B,), shifted noise levels.
    """
    c_in, c_skip, c_out, t_cond = edm_scalings(sigma, sigma_data, sigma_min, mode)
    ct = _compute_dtype(x0)
    s, ci = _per_sample(sigma.to(ct), x0), _per_sample(c_in.to(ct), x0)
    x_in = ((x0.to(ct) + s * eps.to(ct)) * ci).to(x0.dtype)
    return x_in.contiguous(), c_in, c_skip, c_out, t_cond


def noise_precondition_backward(
    grad_x_in: Tensor,
    grad_c_in: Tensor,
    grad_c_skip: Tensor,
    grad_c_out: Tensor,
    grad_t_cond: Tensor,
    x0: Tensor,
    eps: Tensor,
    sigma: Tensor,
    sigma_data: float,
    sigma_min: float,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x0, grad_eps, grad_sigma)."""
    ct = _compute_dtype(x0)
    c_in = edm_scalings(sigma, sigma_data, sigma_min, mode)[0]
    s, ci = _per_sample(sigma.to(ct), x0), _per_sample(c_in.to(ct), x0)
    g = grad_x_in.to(ct)
    grad_x0 = g * ci
    grad_eps = grad_x0 * s
    dims = tuple(range(1, x0.dim()))
    x_sigma = x0.to(ct) + s * eps.to(ct)
    # x_in depends on σ directly (σ·ε) and through c_in(σ).
    grad_sigma_direct = _reduce_to(grad_x0 * eps.to(ct), dims).to(sigma.dtype)
    grad_c_in_total = grad_c_in + _reduce_to(g * x_sigma, dims).to(sigma.dtype)
    grad_sigma = edm_scalings_backward(
        grad_c_in_total, grad_c_skip, grad_c_out, grad_t_cond, sigma, sigma_data, sigma_min, mode
    )
    return (
        grad_x0.to(x0.dtype).contiguous(),
        grad_eps.to(eps.dtype).contiguous(),
        (grad_sigma + grad_sigma_direct).contiguous(),
    )


# --- per-sample losses of stage 2 --------------------------------------------------------------


def _squared_sum(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, int]:
    """(pred − target in the compute dtype, S = Σ over each sample of its square (B,), M)."""
    ct = _compute_dtype(pred)
    d = pred.to(ct) - target.to(ct)
    M = math.prod(pred.shape[1:])
    return d, d.square().reshape(pred.shape[0], M).sum(dim=1), M


def weighted_mse_loss(pred: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample weighted MSE, (loss, mse): mse_b = mean over sample b of (pred − target)²,
    loss_b = weight_b·mse_b. The diffusion loss (§6.2) is ``loss.mean()``.

    pred, target (B, …); weight (B,). Results (B,) in float32 (float64 for a float64 pred).
    """
    ct = _compute_dtype(pred)
    _, S, M = _squared_sum(pred, target)
    mse = S / M
    return (weight.to(ct) * mse).contiguous(), mse.contiguous()


def weighted_mse_loss_backward(grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Returns grad_pred = grad_b·weight_b·2·(pred − target)/M in pred's dtype (the gradients of
    target and weight follow from it and from the forward's mse, see epg.ops)."""
    ct = _compute_dtype(pred)
    d, M = pred.to(ct) - target.to(ct), math.prod(pred.shape[1:])
    factor = grad.to(ct) * weight.to(ct) * 2 / M
    return (_per_sample(factor, pred) * d).to(pred.dtype).contiguous()


def pseudo_huber_loss(
    pred: Tensor, target: Tensor, weight: Tensor, c: float
) -> tuple[Tensor, Tensor]:
    """The consistency loss of §7.3 per sample, (loss, sqsum): S_b = Σ over sample b of
    (pred − target)², loss_b = weight_b·S_b/sqrt(S_b + c²).

    pred, target (B, …) (the online and target EDM outputs); weight (B,) = 1/(t − r).
    Results (B,) in float32 (float64 for a float64 pred).
    """
    ct = _compute_dtype(pred)
    _, S, _ = _squared_sum(pred, target)
    return (weight.to(ct) * S / torch.sqrt(S + c * c)).contiguous(), S.contiguous()


def pseudo_huber_loss_backward(
    grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor, sqsum: Tensor, c: float
) -> Tensor:
    """Returns grad_pred = grad_b·weight_b·2·(pred − target)/sqrt(S_b + c²): the normaliser is
    under stop-gradient, as in the official code (the gradient is twice that of
    weight·(sqrt(S + c²) − c)). ``sqsum`` is the forward's S."""
    ct = _compute_dtype(pred)
    d = pred.to(ct) - target.to(ct)
    factor = grad.to(ct) * weight.to(ct) * 2 / torch.sqrt(sqsum.to(ct) + c * c)
    return (_per_sample(factor, pred) * d).to(pred.dtype).contiguous()


# --- InfoNCE over normalised queries and gathered keys ---------------------------------------------


def info_nce(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """Per-query InfoNCE on L2-normalised q (B, D) and keys k (M ≥ B, D), key i the positive of
    query i (the local block first): loss_i = logsumexp_j(q_i·k_j/τ) − q_i·k_i/τ, (B,) float32
    (float64 for float64 q). Keys carry no gradient."""
    ct = _compute_dtype(q)
    logits = q.to(ct) @ k.to(ct).T / tau  # (B, M)
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).contiguous()


def info_nce_backward(grad: Tensor, q: Tensor, k: Tensor, tau: float) -> Tensor:
    """grad_q = grad_i/τ·(Σ_j p_ij·k_j − k_i), p = softmax_j(q_i·k_j/τ); in q's dtype."""
    ct = _compute_dtype(q)
    kc = k.to(ct)
    p = torch.softmax(q.to(ct) @ kc.T / tau, dim=1)
    grad_q = grad.to(ct)[:, None] / tau * (p @ kc - kc[: q.shape[0]])
    return grad_q.to(q.dtype).contiguous()


# --- image conversion: decoder uint8 ↔ normalised network images ----------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("simple", "imagenet")


def normalization_stats(convention: str, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) per channel with x = (x01 − mean)/std for an EPG convention (§2).

    "simple": x = 2·x01 − 1 (mean 0.5, std 0.5, any channel count); "imagenet": ImageNet
    statistics rescaled to std 0.5, x = (x01 − mean)/(2·std_imagenet) (3 channels).
    """
    if convention == "simple":
        return [0.5] * channels, [0.5] * channels
    if convention == "imagenet":
        if channels != 3:
            raise ValueError(f"the 'imagenet' convention needs 3 channels, got {channels}")
        return list(IMAGENET_MEAN), [2.0 * s for s in IMAGENET_STD]
    raise ValueError(f"convention must be one of {NORMALIZATIONS}, got {convention!r}")


def normalize_images(
    images: Tensor, flip: Tensor | None, mean: list[float], std: list[float], dtype: torch.dtype
) -> Tensor:
    """uint8 (B, H, W, C) → (B, C, H, W) of ``dtype``: x = (u/255 − mean[c])/std[c], each sample
    mirrored left-right where ``flip`` (bool (B,), or None) is set. Arithmetic in float32
    (float64 for a float64 result), rounded to ``dtype`` once."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    # Converted straight into NCHW order: the arithmetic below then runs on contiguous memory.
    x = images.permute(0, 3, 1, 2).to(ct, memory_format=torch.contiguous_format)
    if flip is not None:
        x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
    m = x.new_tensor(mean).reshape(1, -1, 1, 1)
    s = x.new_tensor(std).reshape(1, -1, 1, 1)
    return ((x / 255 - m) / s).to(dtype).contiguous()


def to_uint8(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Inverse of :func:`normalize_images` for saving: (B, C, H, W) → uint8 (B, H, W, C),
    u = floor(clamp(x·std[c] + mean[c], 0, 1)·255 + 0.5) with NaN → 0 (round half up, as
    the official PNG writer). Arithmetic in float32 (float64 for float64 images)."""
    ct = _compute_dtype(images)
    m = images.new_tensor(mean, dtype=ct).reshape(1, -1, 1, 1)
    s = images.new_tensor(std, dtype=ct).reshape(1, -1, 1, 1)
    x01 = torch.nan_to_num(images.to(ct) * s + m, nan=0.0).clamp(0.0, 1.0)
    return torch.floor(x01 * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --- patch layout of the model's tokens: features in (p1, p2, c) order ----------------------------


def patchify_hwc(img: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) → (B, N, p·p·C), N = (H/p)·(W/p) row-major patches, features in (p1, p2, c)
    order: the token layout of the EPG output head (unlike :func:`patchify`, Conv2d's order).
    Always a fresh tensor."""
    B, C, H, W = img.shape
    p = patch_size
    h, w = H // p, W // p
    out = img.new_empty((B, h * w, p * p * C))
    out.view(B, h, w, p, p, C).copy_(img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1))
    return out


def unpatchify_hwc(tokens: Tensor, patch_size: int, height: int) -> Tensor:
    """Inverse of :func:`patchify_hwc`: (B, N, p·p·C) → (B, C, height, N·p²/height)."""
    B, N, D = tokens.shape
    p = patch_size
    C, h = D // (p * p), height // p
    w = N // h
    out = tokens.new_empty((B, C, h * p, w * p))
    out.view(B, C, h, p, w, p).copy_(tokens.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4))
    return out
