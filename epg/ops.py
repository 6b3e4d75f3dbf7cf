"""The public fused ops of epg: one ``torch.library`` custom op per fused operation of the model.

Every op ``epg::<op>`` has
  * an implementation chosen at run time by :mod:`epg._backend` (reference / triton / cuda);
  * a fake kernel, which is the reference itself run on fake tensors, so output shapes, dtypes and
    strides are those of the reference by construction (every backend must match them);
  * a registered autograd formula whose backward is the custom op ``epg::<op>_backward``, chosen
    the same way.
So ``torch.compile(fullgraph=True)`` traces through them without graph breaks, and
``torch.library.opcheck`` passes. The public functions below validate shapes (raising
``ValueError`` with the expected form) and call the custom ops; models call only these.

Shapes: B batch, T tokens, D width, H heads, Dh head dim, C channels, p patch size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _backend, reference
from ._backend import BackendUnavailableError, use_backend

__all__ = [
    "BackendUnavailableError",
    "use_backend",
    "layer_norm",
    "ln_modulate",
    "gated_residual",
    "attention",
    "patch_embed",
    "output_head",
    "timestep_embedding",
    "edm_scalings",
    "OPS",
]

#: The fused ops, by name (each also has a ``<name>_backward``).
OPS = (
    "layer_norm",
    "ln_modulate",
    "gated_residual",
    "attention",
    "patch_embed",
    "output_head",
    "timestep_embedding",
    "edm_scalings",
)


def _custom_op(name: str) -> Callable:
    """Register the decorated function as ``epg::<name>`` with the reference as its fake."""

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"epg::{name}", mutates_args=())(fn)
        op.register_fake(getattr(reference, name))
        return op

    return register


def _run(op: str, device_tensor: Tensor, *args):
    return _backend.pick(op, device_tensor.device, args)(*args)


def _check(condition: bool, message: Callable[[], str]) -> None:
    if not condition:
        raise ValueError(message())


# --- layer norm ---------------------------------------------------------------------------------


@_custom_op("layer_norm")
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return _run("layer_norm", x, x, weight, bias, eps)


@_custom_op("layer_norm_backward")
def _layer_norm_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _run("layer_norm_backward", x, grad, x, weight, eps)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _bias, ctx.eps = inputs
    ctx.save_for_backward(x, weight)


def _layer_norm_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    return (*_layer_norm_backward_op(grad, x, weight, ctx.eps), None)


_layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim, statistics in float32, result in x's dtype.

    Args: x (..., D); weight, bias (D,). Returns (..., D).
    """
    _check(
        weight.shape == (x.shape[-1],) and bias.shape == (x.shape[-1],),
        lambda: f"layer_norm: weight and bias must be ({x.shape[-1]},) for x {tuple(x.shape)}, "
        f"got {tuple(weight.shape)} and {tuple(bias.shape)}",
    )
    return _layer_norm_op(x, weight, bias, float(eps))


# --- layer norm with adaLN modulation -------------------------------------------------------------


@_custom_op("ln_modulate")
def _ln_modulate_op(
    x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> Tensor:
    return _run("ln_modulate", x, x, weight, bias, shift, scale, eps)


@_custom_op("ln_modulate_backward")
def _ln_modulate_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _run("ln_modulate_backward", x, grad, x, weight, bias, shift, scale, eps)


def _ln_modulate_setup(ctx, inputs, output):
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors)


def _ln_modulate_grad(ctx, grad):
    return (*_ln_modulate_backward_op(grad, *ctx.saved_tensors, ctx.eps), None)


_ln_modulate_op.register_autograd(_ln_modulate_grad, setup_context=_ln_modulate_setup)


def ln_modulate(
    x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-5
) -> Tensor:
    """adaLN: LN(x)·(1 + scale) + shift, with per-sample shift and scale broadcast over tokens.

    Args: x (B, T, D); weight, bias (D,) (the LayerNorm affine); shift, scale (B, D).
    Returns (B, T, D) in x's dtype (all arithmetic in float32).
    """
    _check(x.dim() == 3, lambda: f"ln_modulate: x must be (B, T, D), got {tuple(x.shape)}")
    B, _, D = x.shape
    _check(
        weight.shape == (D,) and bias.shape == (D,),
        lambda: f"ln_modulate: weight and bias must be ({D},), got {tuple(weight.shape)}, {tuple(bias.shape)}",
    )
    _check(
        shift.shape == (B, D) and scale.shape == (B, D),
        lambda: f"ln_modulate: shift and scale must be ({B}, {D}), got {tuple(shift.shape)}, {tuple(scale.shape)}",
    )
    return _ln_modulate_op(x, weight, bias, shift, scale, float(eps))


# --- gated residual ---------------------------------------------------------------------------


@_custom_op("gated_residual")
def _gated_residual_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return _run("gated_residual", x, x, gate, y)


@_custom_op("gated_residual_backward")
def _gated_residual_backward_op(grad: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return _run("gated_residual_backward", y, grad, gate, y)


def _gated_residual_setup(ctx, inputs, output):
    _x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_grad(ctx, grad):
    gate, y = ctx.saved_tensors
    return (grad, *_gated_residual_backward_op(grad, gate, y))


_gated_residual_op.register_autograd(_gated_residual_grad, setup_context=_gated_residual_setup)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate·y, the adaLN-Zero residual update with a per-sample gate broadcast over tokens.

    Args: x, y (B, T, D); gate (B, D). Returns (B, T, D) in x's dtype.
    """
    _check(
        x.dim() == 3 and y.shape == x.shape,
        lambda: f"gated_residual: x and y must be the same (B, T, D), got {tuple(x.shape)}, {tuple(y.shape)}",
    )
    _check(
        gate.shape == (x.shape[0], x.shape[2]),
        lambda: f"gated_residual: gate must be ({x.shape[0]}, {x.shape[2]}), got {tuple(gate.shape)}",
    )
    return _gated_residual_op(x, gate, y)


# --- attention ---------------------------------------------------------------------------------


@_custom_op("attention")
def _attention_op(qkv: Tensor, num_heads: int) -> Tensor:
    return _run("attention", qkv, qkv, num_heads)


@_custom_op("attention_backward")
def _attention_backward_op(grad: Tensor, qkv: Tensor, num_heads: int) -> Tensor:
    return _run("attention_backward", qkv, grad, qkv, num_heads)


def _attention_setup(ctx, inputs, output):
    qkv, ctx.num_heads = inputs
    ctx.save_for_backward(qkv)


def _attention_grad(ctx, grad):
    (qkv,) = ctx.saved_tensors
    return _attention_backward_op(grad, qkv, ctx.num_heads), None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Non-causal multi-head attention on the packed output of a fused qkv projection.

    Args: qkv (B, T, 3·H·Dh), columns ordered (3, H, Dh): Q of every head, then K, then V.
    Returns (B, T, H·Dh) = softmax(Q·Kᵀ/sqrt(Dh))·V per head, heads concatenated.
    """
    _check(qkv.dim() == 3, lambda: f"attention: qkv must be (B, T, 3·H·Dh), got {tuple(qkv.shape)}")
    _check(
        num_heads > 0 and qkv.shape[-1] % (3 * num_heads) == 0,
        lambda: f"attention: last dim {qkv.shape[-1]} is not 3·num_heads·head_dim for num_heads={num_heads}",
    )
    return _attention_op(qkv, int(num_heads))


# --- patch embedding ---------------------------------------------------------------------------


@_custom_op("patch_embed")
def _patch_embed_op(img: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    return _run("patch_embed", img, img, weight, bias, pos_embed)


@_custom_op("patch_embed_backward")
def _patch_embed_backward_op(
    grad: Tensor, img: Tensor, weight: Tensor, pos_embed: Tensor, need_img_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run("patch_embed_backward", img, grad, img, weight, pos_embed, need_img_grad)


def _patch_embed_setup(ctx, inputs, output):
    img, weight, _bias, pos_embed = inputs
    ctx.save_for_backward(img, weight, pos_embed)


def _patch_embed_grad(ctx, grad):
    img, weight, pos_embed = ctx.saved_tensors
    need_img_grad = ctx.needs_input_grad[0]
    grad_img, *rest = _patch_embed_backward_op(grad, img, weight, pos_embed, need_img_grad)
    return (grad_img if need_img_grad else None, *rest)


_patch_embed_op.register_autograd(_patch_embed_grad, setup_context=_patch_embed_setup)


def patch_embed(img: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    """Image → patch tokens: the stride-p convolution as tokens, + bias + positional embedding.

    Args: img (B, C, H, W) with H, W multiples of p; weight (D, C, p, p); bias (D,);
    pos_embed (N, D), N = (H/p)·(W/p), tokens row-major. Returns (B, N, D).
    """
    _check(img.dim() == 4, lambda: f"patch_embed: img must be (B, C, H, W), got {tuple(img.shape)}")
    D, C, p, p2 = weight.shape
    _, c_img, H, W = img.shape
    _check(
        p == p2 and c_img == C and H % p == 0 and W % p == 0,
        lambda: f"patch_embed: img {tuple(img.shape)} does not fit weight {tuple(weight.shape)} "
        f"(expected {C} channels and sides divisible by {p})",
    )
    n = (H // p) * (W // p)
    _check(
        bias.shape == (D,) and pos_embed.shape == (n, D),
        lambda: f"patch_embed: bias must be ({D},) and pos_embed ({n}, {D}), "
        f"got {tuple(bias.shape)}, {tuple(pos_embed.shape)}",
    )
    return _patch_embed_op(img, weight, bias, pos_embed)


# --- output head -------------------------------------------------------------------------------


@_custom_op("output_head")
def _output_head_op(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    weight: Tensor,
    bias: Tensor,
    patch_size: int,
    eps: float,
) -> Tensor:
    return _run("output_head", x, x, norm_weight, norm_bias, weight, bias, patch_size, eps)


@_custom_op("output_head_backward")
def _output_head_backward_op(
    grad: Tensor,
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    weight: Tensor,
    patch_size: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _run(
        "output_head_backward", x, grad, x, norm_weight, norm_bias, weight, patch_size, eps
    )


def _output_head_setup(ctx, inputs, output):
    x, norm_weight, norm_bias, weight, _bias, ctx.patch_size, ctx.eps = inputs
    ctx.save_for_backward(x, norm_weight, norm_bias, weight)


def _output_head_grad(ctx, grad):
    grads = _output_head_backward_op(grad, *ctx.saved_tensors, ctx.patch_size, ctx.eps)
    return (*grads, None, None)


_output_head_op.register_autograd(_output_head_grad, setup_context=_output_head_setup)


def output_head(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    weight: Tensor,
    bias: Tensor,
    patch_size: int,
    eps: float = 1e-5,
) -> Tensor:
    """Tokens → image: out_norm (LayerNorm) → linear → unpatchify with (p1, p2, c) features.

    Args: x (B, N, D) with N a square number of patch tokens; norm_weight, norm_bias (D,);
    weight (p·p·C, D); bias (p·p·C,). Returns (B, C, sqrt(N)·p, sqrt(N)·p).
    """
    _check(x.dim() == 3, lambda: f"output_head: x must be (B, N, D), got {tuple(x.shape)}")
    _, n, D = x.shape
    side = int(round(n**0.5))
    _check(side * side == n, lambda: f"output_head: token count {n} is not a square")
    _check(
        weight.dim() == 2 and weight.shape[1] == D and weight.shape[0] % (patch_size**2) == 0,
        lambda: f"output_head: weight must be (p·p·C, {D}) with p={patch_size}, got {tuple(weight.shape)}",
    )
    _check(
        norm_weight.shape == (D,) and norm_bias.shape == (D,) and bias.shape == weight.shape[:1],
        lambda: "output_head: norm_weight, norm_bias must be (D,) and bias (p·p·C,)",
    )
    return _output_head_op(x, norm_weight, norm_bias, weight, bias, int(patch_size), float(eps))


# --- timestep embedding ---------------------------------------------------------------------------


@_custom_op("timestep_embedding")
def _timestep_embedding_op(t: Tensor, dim: int) -> Tensor:
    return _run("timestep_embedding", t, t, dim)


@_custom_op("timestep_embedding_backward")
def _timestep_embedding_backward_op(grad: Tensor, t: Tensor, dim: int) -> Tensor:
    return _run("timestep_embedding_backward", t, grad, t, dim)


def _timestep_embedding_setup(ctx, inputs, output):
    t, ctx.dim = inputs
    ctx.save_for_backward(t)


def _timestep_embedding_grad(ctx, grad):
    (t,) = ctx.saved_tensors
    return _timestep_embedding_backward_op(grad, t, ctx.dim), None


_timestep_embedding_op.register_autograd(
    _timestep_embedding_grad, setup_context=_timestep_embedding_setup
)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal time embedding [cos(t·f), sin(t·f)] (cos first), f_k = 10000^(−2k/dim).

    Args: t (B,) float, the time conditioning value (EPG: 250·ln σ). Returns (B, dim), float32.
    """
    _check(t.dim() == 1, lambda: f"timestep_embedding: t must be (B,), got {tuple(t.shape)}")
    _check(t.is_floating_point(), lambda: f"timestep_embedding: t must be float, got {t.dtype}")
    return _timestep_embedding_op(t, int(dim))


# --- EDM scalings -----------------------------------------------------------------------------


@_custom_op("edm_scalings")
def _edm_scalings_op(
    sigma: Tensor, sigma_data: float, sigma_min: float, mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run("edm_scalings", sigma, sigma, sigma_data, sigma_min, mode)


@_custom_op("edm_scalings_backward")
def _edm_scalings_backward_op(
    grad_c_in: Tensor,
    grad_c_skip: Tensor,
    grad_c_out: Tensor,
    grad_t_cond: Tensor,
    sigma: Tensor,
    sigma_data: float,
    sigma_min: float,
    mode: str,
) -> Tensor:
    return _run(
        "edm_scalings_backward", sigma,
        grad_c_in, grad_c_skip, grad_c_out, grad_t_cond, sigma, sigma_data, sigma_min, mode,
    )  # fmt: skip


def _edm_scalings_setup(ctx, inputs, output):
    sigma, ctx.sigma_data, ctx.sigma_min, ctx.mode = inputs
    ctx.save_for_backward(sigma)


def _edm_scalings_grad(ctx, *grads):
    (sigma,) = ctx.saved_tensors
    grads = [torch.zeros_like(sigma) if g is None else g for g in grads]
    grad_sigma = _edm_scalings_backward_op(
        *grads, sigma, ctx.sigma_data, ctx.sigma_min, ctx.mode
    )
    return grad_sigma, None, None, None


_edm_scalings_op.register_autograd(_edm_scalings_grad, setup_context=_edm_scalings_setup)


def edm_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002, mode: str = "x0"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample EDM preconditioning (c_in, c_skip, c_out, t_cond) for shifted noise levels.

    c_in = 1/sqrt(σ² + σ_d²), t_cond = 250·ln σ; mode "x0" (diffusion, x0 prediction):
    c_skip = 0, c_out = 1; mode "edm" (consistency): c_skip = σ_d²/((σ − σ̃_min)² + σ_d²),
    c_out = (σ − σ̃_min)·σ_d/sqrt(σ² + σ_d²). Pass the *shifted* σ̃_min (σ_min·H/64).

    Args: sigma (B,) float32 or float64. Returns four (B,) tensors of sigma's dtype.
    """
    _check(sigma.dim() == 1, lambda: f"edm_scalings: sigma must be (B,), got {tuple(sigma.shape)}")
    _check(
        sigma.dtype in (torch.float32, torch.float64),
        lambda: f"edm_scalings: sigma must be float32 or float64, got {sigma.dtype}",
    )
    _check(
        mode in reference.EDM_MODES,
        lambda: f"edm_scalings: mode must be one of {reference.EDM_MODES}, got {mode!r}",
    )
    return _edm_scalings_op(sigma, float(sigma_data), float(sigma_min), mode)
