"""The public fused ops of epg: one ``torch.library`` custom op per fused operation of the model.

Every op ``epg::<op>`` has
  * an implementation chosen at run time by :mod:`epg._backend` (reference / triton / cuda);
  * a fake kernel, which is the reference itself run on fake tensors, so output shapes, dtypes and
    strides are those of the reference by construction (every backend must match them);
  * a registered autograd formula whose backward is the custom op ``epg::<op>_backward``, chosen
    the same way (patchify_hwc / unpatchify_hwc use each other; normalize_images and to_uint8
    are not differentiable).
So ``torch.compile(fullgraph=True)`` traces through them without graph breaks, and
``torch.library.opcheck`` passes. The public functions below validate shapes (raising
``ValueError`` with the expected form) and call the custom ops; models call only these.

One shortcut: the network's ops (``NETWORK_OPS``) called on a non-CUDA tensor with no backend
forced call the reference forward directly and let autograd record it, because the custom op
would run the reference there anyway and only adds cost: its dispatch, and a backward that
recomputes what autograd keeps (the attention backward recomputes the probabilities where
PyTorch's SDPA backward reads its saved log-sum-exp). Measured on the digits demo's stage-2 step
(2 CPU cores): ~10% less time eagerly. Under ``torch.compile`` the same holds, so inductor sees
and fuses the reference math instead of opaque calls; the choice is made when the function is
traced and guarded (``use_backend`` and the ``EPG_BACKEND`` variables, set or unset), so forcing
a backend later recompiles. (Where dynamo cannot trace that choice, torch 2.11 for one, compiled
code keeps the custom ops: :func:`epg._backend.choice_traceable`.) The gradient of each of these
reference forwards is its ``<op>_backward`` (tested); on CUDA, or with ``EPG_BACKEND=reference``
(or :func:`use_backend`) the custom op runs as described above. Autograd keeps more tensors for
the backward than the custom op (~6% more saved activations for the demo network at batch 64),
and an activation-checkpointed region must see the same forced backends in its forward and its
recomputation (the two paths save different tensors; ``torch.utils.checkpoint`` rejects that:
the networks' checkpointing re-enters the forward's forces, ``epg.models.networks._recomputed``).

Shapes: B batch, T tokens, D width, H heads, Dh head dim, C channels, p patch size.
"""

from __future__ import annotations

import functools
import inspect
import math
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
    "noise_precondition",
    "weighted_mse_loss",
    "pseudo_huber_loss",
    "normalize_images",
    "to_uint8",
    "patchify_hwc",
    "unpatchify_hwc",
    "info_nce",
    "OPS",
    "NETWORK_OPS",
]

#: The ops of the networks, which unforced CPU calls run as the reference itself (module docstring).
NETWORK_OPS = (
    "layer_norm",
    "ln_modulate",
    "gated_residual",
    "attention",
    "patch_embed",
    "output_head",
    "timestep_embedding",
)
#: The fused ops, by name. Each differentiable op has a ``<name>_backward`` op, except the
#: patch layout pair (each is the other's gradient); normalize_images and to_uint8 have no
#: gradient (integer input / output).
OPS = (
    *NETWORK_OPS,
    "edm_scalings",
    "noise_precondition",
    "weighted_mse_loss",
    "pseudo_huber_loss",
    "normalize_images",
    "to_uint8",
    "patchify_hwc",
    "unpatchify_hwc",
    "info_nce",
)


def _custom_op(name: str) -> Callable:
    """Register the decorated function as ``epg::<name>`` with the reference as its fake."""

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"epg::{name}", mutates_args=())(fn)
        op.register_fake(getattr(reference, name))
        return op

    return register


def _register_autograd(op, grad: Callable, setup: Callable) -> None:
    """``op.register_autograd(grad, setup_context=setup)``, with the backward running under the
    backends forced when the forward ran (autograd may run it on another thread)."""

    def setup_context(ctx, inputs, output):
        ctx.epg_forced = _backend.forced_state()
        setup(ctx, inputs, output)

    def backward(ctx, *grads):
        with _backend.forced_as(ctx.epg_forced):
            return grad(ctx, *grads)

    op.register_autograd(backward, setup_context=setup_context)


def _run(op: str, device_tensor: Tensor, *args):
    return _backend.pick(op, device_tensor.device, args)(*args)


def _network_op(op, name: str, device_tensor: Tensor, *args):
    """``op(*args)``, or the reference ``name`` called directly (see the module's docstring)."""
    if (
        device_tensor.device.type != "cuda"
        and (not torch.compiler.is_compiling() or _backend.choice_traceable())
        and not _backend.is_forced(name)
    ):
        return getattr(reference, name)(*args)
    return op(*args)


def _check(condition: bool, message: Callable[[], str]) -> None:
    if not condition:
        raise ValueError(message())


def _tensor_arguments(fn: Callable) -> Callable:
    """``fn`` with the AttributeError of a number or a list given for one of its tensor
    arguments ("'float' object has no attribute 'shape'") turned into a TypeError naming the
    argument; free until it fires (a try block)."""
    signature = inspect.signature(fn)
    tensors = [name for name, p in signature.parameters.items() if p.annotation == "Tensor"]

    @functools.wraps(fn)
    def op(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttributeError:
            given = signature.bind(*args, **kwargs).arguments
            for name in tensors:
                if name in given and not isinstance(given[name], Tensor):
                    raise TypeError(f"{fn.__name__}: {name} must be a tensor, got "
                                    f"{type(given[name]).__name__}") from None  # fmt: skip
            raise

    return op


def _check_tensor(name: str, arg: str, t: object, what: str) -> None:
    """A TypeError naming ``arg`` for a number where a tensor is due (else: 'no attribute dim')."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {arg} must be a {what} tensor, got {type(t).__name__}")


#: dtypes of the activations and images the ops take (data in float32/64, network outputs in
#: bf16/fp16 under autocast).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_float(name: str, arg: str, t: Tensor) -> None:
    _check(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name}: {arg} must be float32, float64, bfloat16 or float16, got {t.dtype}",
    )


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


_register_autograd(_layer_norm_op, _layer_norm_grad, _layer_norm_setup)


@_tensor_arguments
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim, statistics in float32, result in x's dtype.

    Args: x (..., D); weight, bias (D,). Returns (..., D).
    """
    _check(x.dim() >= 1, lambda: "layer_norm: x must be (..., D), got a 0-d tensor")
    _check_float("layer_norm", "x", x)
    _check(
        weight.shape == (x.shape[-1],) and bias.shape == (x.shape[-1],),
        lambda: f"layer_norm: weight and bias must be ({x.shape[-1]},) for x {tuple(x.shape)}, "
        f"got {tuple(weight.shape)} and {tuple(bias.shape)}",
    )
    return _network_op(_layer_norm_op, "layer_norm", x, x, weight, bias, float(eps))


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


_register_autograd(_ln_modulate_op, _ln_modulate_grad, _ln_modulate_setup)


@_tensor_arguments
def ln_modulate(
    x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-5
) -> Tensor:
    """adaLN: LN(x)·(1 + scale) + shift, with per-sample shift and scale broadcast over tokens.

    Args: x (B, T, D); weight, bias (D,) (the LayerNorm affine); shift, scale (B, D).
    Returns (B, T, D) in x's dtype (all arithmetic in float32).
    """
    _check(x.dim() == 3, lambda: f"ln_modulate: x must be (B, T, D), got {tuple(x.shape)}")
    _check_float("ln_modulate", "x", x)
    B, _, D = x.shape
    _check(
        weight.shape == (D,) and bias.shape == (D,),
        lambda: f"ln_modulate: weight and bias must be ({D},), got {tuple(weight.shape)}, {tuple(bias.shape)}",
    )
    _check(
        shift.shape == (B, D) and scale.shape == (B, D),
        lambda: f"ln_modulate: shift and scale must be ({B}, {D}), got {tuple(shift.shape)}, {tuple(scale.shape)}",
    )
    return _network_op(
        _ln_modulate_op, "ln_modulate", x, x, weight, bias, shift, scale, float(eps)
    )


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


_register_autograd(_gated_residual_op, _gated_residual_grad, _gated_residual_setup)


@_tensor_arguments
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
    _check_float("gated_residual", "x", x)
    return _network_op(_gated_residual_op, "gated_residual", x, x, gate, y)


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


_register_autograd(_attention_op, _attention_grad, _attention_setup)


@_tensor_arguments
def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Non-causal multi-head attention on the packed output of a fused qkv projection.

    Args: qkv (B, T, 3·H·Dh), columns ordered (3, H, Dh): Q of every head, then K, then V.
    Returns (B, T, H·Dh) = softmax(Q·Kᵀ/sqrt(Dh))·V per head, heads concatenated.
    """
    _check(qkv.dim() == 3, lambda: f"attention: qkv must be (B, T, 3·H·Dh), got {tuple(qkv.shape)}")
    _check_float("attention", "qkv", qkv)
    _check(
        num_heads > 0 and qkv.shape[-1] % (3 * num_heads) == 0,
        lambda: f"attention: last dim {qkv.shape[-1]} is not 3·num_heads·head_dim for num_heads={num_heads}",
    )
    return _network_op(_attention_op, "attention", qkv, qkv, int(num_heads))


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


_register_autograd(_patch_embed_op, _patch_embed_grad, _patch_embed_setup)


def _autocast_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as autocast hands them to the PyTorch matrix product an op replaces: inside
    an autocast region of their device, the floating ones but float64 in the autocast dtype;
    elsewhere unchanged. Custom ops are not autocast, so a kernel would otherwise multiply the
    float32 data image by the float32 weights where conv2d multiplies in bf16/fp16."""
    device_type = tensors[0].device.type
    # (a fixed list: torch 2.11's dynamo cannot trace torch.amp.is_autocast_available)
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


@_tensor_arguments
def patch_embed(img: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    """Image → patch tokens: the stride-p convolution as tokens, + bias + positional embedding.

    Args: img (B, C, H, W) with H, W multiples of p; weight (D, C, p, p); bias (D,);
    pos_embed (N, D), N = (H/p)·(W/p), tokens row-major. Returns (B, N, D), in img's dtype
    promoted with pos_embed's. Under ``torch.autocast`` img, weight and bias are cast to the
    autocast dtype first, as autocast casts conv2d's operands (pos_embed is added unrounded, so
    float32 tokens come out of a float32 table, as conv2d + pos_embed gives them).
    """
    _check(img.dim() == 4, lambda: f"patch_embed: img must be (B, C, H, W), got {tuple(img.shape)}")
    _check_float("patch_embed", "img", img)
    _check(
        weight.dim() == 4,
        lambda: f"patch_embed: weight must be (D, C, p, p), got {tuple(weight.shape)}",
    )
    D, C, p, p2 = weight.shape
    _, c_img, H, W = img.shape
    _check(
        p == p2 and c_img == C and H % p == 0 and W % p == 0,
        lambda: f"patch_embed: img {tuple(img.shape)} does not fit weight {tuple(weight.shape)} "
        f"(expected {C} channels and sides divisible by {p})"
        + (": it looks like (B, H, W, C), pass img.permute(0, 3, 1, 2)" if W == C != c_img else ""),
    )
    n = (H // p) * (W // p)
    _check(
        bias.shape == (D,) and pos_embed.shape == (n, D),
        lambda: f"patch_embed: bias must be ({D},) and pos_embed ({n}, {D}), "
        f"got {tuple(bias.shape)}, {tuple(pos_embed.shape)}",
    )
    img, weight, bias = _autocast_operands(img, weight, bias)
    return _network_op(_patch_embed_op, "patch_embed", img, img, weight, bias, pos_embed)


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


_register_autograd(_output_head_op, _output_head_grad, _output_head_setup)


@_tensor_arguments
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
    _check_float("output_head", "x", x)
    _check(patch_size >= 1, lambda: f"output_head: patch_size must be >= 1, got {patch_size}")
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
    return _network_op(
        _output_head_op, "output_head", x,
        x, norm_weight, norm_bias, weight, bias, int(patch_size), float(eps),
    )  # fmt: skip


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


_register_autograd(_timestep_embedding_op, _timestep_embedding_grad, _timestep_embedding_setup)


@_tensor_arguments
def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal time embedding [cos(t·f), sin(t·f)] (cos first), f_k = 10000^(−2k/dim).

    Args: t (B,) float, the time conditioning value (EPG: 250·ln σ). Returns (B, dim), float32.
    """
    _check_tensor("timestep_embedding", "t", t, "(B,) float")
    _check(t.dim() == 1, lambda: f"timestep_embedding: t must be (B,), got {tuple(t.shape)}")
    _check(t.is_floating_point(), lambda: f"timestep_embedding: t must be float, got {t.dtype}")
    _check(
        dim >= 2,
        lambda: f"timestep_embedding: dim must be >= 2 (a cos and a sin column; an odd dim adds "
        f"a zero column), got {dim}",
    )
    return _network_op(_timestep_embedding_op, "timestep_embedding", t, t, int(dim))


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


_register_autograd(_edm_scalings_op, _edm_scalings_grad, _edm_scalings_setup)


@_tensor_arguments
def edm_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002, mode: str = "x0"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample EDM preconditioning (c_in, c_skip, c_out, t_cond) for shifted noise levels.

    c_in = 1/sqrt(σ² + σ_d²), t_cond = 250·ln σ; mode "x0" (diffusion, x0 prediction):
    c_skip = 0, c_out = 1; mode "edm" (consistency): c_skip = σ_d²/((σ − σ̃_min)² + σ_d²),
    c_out = (σ − σ̃_min)·σ_d/sqrt(σ² + σ_d²). Pass the *shifted* σ̃_min (σ_min·H/64).

    Args: sigma (B,) float32 or float64. Returns four (B,) tensors of sigma's dtype.
    """
    _check_tensor("edm_scalings", "sigma", sigma, "(B,) float32 or float64")
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


# --- stage-2 ops: preconditioning, losses, image conversion, patch layout -------------------------
#
# On CUDA tensors these run the epg._C kernels (csrc/<op>_cuda.cu), on CPU tensors the reference
# (their C++ twins when the cuda backend is forced). Only a GPU can confirm the CUDA kernels'
# values on the device and their bandwidth: tests/test_extension_ops.py -m cuda.

# --- shared validation of the image-sized ops ------------------------------------------------------

MAX_IMAGE_CHANNELS = 16


def _check_per_sample(name: str, arg: str, t: Tensor, like: Tensor) -> None:
    B = like.shape[0]
    _check_tensor(name, arg, t, f"({B},)")
    _check(
        t.dim() == 1 and t.shape[0] == B,
        lambda: f"{name}: {arg} must be ({B},) for a batch of {B}, got {tuple(t.shape)}",
    )
    _check(
        t.device == like.device,
        lambda: f"{name}: {arg} must be on {like.device} like the images, got {t.device}",
    )


# --- noise preconditioning ------------------------------------------------------------------------


@_custom_op("noise_precondition")
def _noise_precondition_op(
    x0: Tensor, eps: Tensor, sigma: Tensor, sigma_data: float, sigma_min: float, mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _run("noise_precondition", x0, x0, eps, sigma, sigma_data, sigma_min, mode)


@_custom_op("noise_precondition_backward")
def _noise_precondition_backward_op(
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
    return _run(
        "noise_precondition_backward", x0,
        grad_x_in, grad_c_in, grad_c_skip, grad_c_out, grad_t_cond,
        x0, eps, sigma, sigma_data, sigma_min, mode,
    )  # fmt: skip


def _noise_precondition_setup(ctx, inputs, output):
    x0, eps, sigma, ctx.sigma_data, ctx.sigma_min, ctx.mode = inputs
    ctx.save_for_backward(x0, eps, sigma)


def _noise_precondition_grad(ctx, grad_x_in, *grad_scalings):
    x0, eps, sigma = ctx.saved_tensors
    grad_x_in = torch.zeros_like(x0) if grad_x_in is None else grad_x_in
    grad_scalings = [torch.zeros_like(sigma) if g is None else g for g in grad_scalings]
    grads = _noise_precondition_backward_op(
        grad_x_in, *grad_scalings, x0, eps, sigma, ctx.sigma_data, ctx.sigma_min, ctx.mode
    )
    return (*grads, None, None, None)


_register_autograd(_noise_precondition_op, _noise_precondition_grad, _noise_precondition_setup)


@_tensor_arguments
def noise_precondition(
    x0: Tensor,
    eps: Tensor,
    sigma: Tensor,
    sigma_data: float = 0.5,
    sigma_min: float = 0.002,
    mode: str = "x0",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The network input of a training step and its scalings, in one pass over the images.

    x_in = c_in(σ)·(x0 + σ·ε) per sample (§3, §6.2, §7.3), plus (c_in, c_skip, c_out, t_cond) of
    :func:`edm_scalings` for the same σ and mode. Pass the *shifted* σ and σ̃_min (σ_min·H/64).

    Args: x0, eps (B, …) of one dtype (float32/64, bfloat16, float16); sigma (B,) float32 or
    float64. Returns (x_in (B, …) in x0's dtype, then four (B,) tensors in sigma's dtype).
    Differentiable in x0, eps and sigma.
    """
    name = "noise_precondition"
    _check(x0.dim() >= 1, lambda: f"{name}: x0 must be (B, ...), got a 0-d tensor")
    _check_float(name, "x0", x0)
    _check(
        eps.shape == x0.shape and eps.dtype == x0.dtype and eps.device == x0.device,
        lambda: f"{name}: eps must match x0 {tuple(x0.shape)} {x0.dtype} on {x0.device}, "
        f"got {tuple(eps.shape)} {eps.dtype} on {eps.device}",
    )
    _check_per_sample(name, "sigma", sigma, x0)
    _check(
        sigma.dtype in (torch.float32, torch.float64),
        lambda: f"{name}: sigma must be float32 or float64, got {sigma.dtype}",
    )
    _check(
        mode in reference.EDM_MODES,
        lambda: f"{name}: mode must be one of {reference.EDM_MODES}, got {mode!r}",
    )
    return _noise_precondition_op(x0, eps, sigma, float(sigma_data), float(sigma_min), mode)


# --- per-sample losses -----------------------------------------------------------------------------


def _check_loss_args(name: str, pred: Tensor, target: Tensor, weight: Tensor) -> None:
    _check(pred.dim() >= 1, lambda: f"{name}: pred must be (B, ...), got a 0-d tensor")
    _check_float(name, "pred", pred)
    low = (torch.bfloat16, torch.float16)
    _check(
        target.shape == pred.shape and target.device == pred.device,
        lambda: f"{name}: target must have pred's shape {tuple(pred.shape)} on {pred.device}, "
        f"got {tuple(target.shape)} on {target.device}",
    )
    _check(
        target.dtype == pred.dtype or (pred.dtype in low and target.dtype == torch.float32),
        lambda: f"{name}: target must have pred's dtype {pred.dtype} (or float32 for a "
        f"bfloat16/float16 pred), got {target.dtype}",
    )
    _check_per_sample(name, "weight", weight, pred)
    _check_float(name, "weight", weight)


@_custom_op("weighted_mse_loss")
def _weighted_mse_loss_op(pred: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return _run("weighted_mse_loss", pred, pred, target, weight)


@_custom_op("weighted_mse_loss_backward")
def _weighted_mse_loss_backward_op(
    grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor
) -> Tensor:
    return _run("weighted_mse_loss_backward", pred, grad, pred, target, weight)


def _loss_setup(ctx, inputs, output):
    pred, target, weight, *rest = inputs
    ctx.c = rest[0] if rest else None
    _, stat = output
    ctx.mark_non_differentiable(stat)  # the statistic is returned for logging and the weight grad
    ctx.save_for_backward(pred, target, weight, stat)


def _loss_grads(ctx, grad_pred: Tensor | None, grad: Tensor, weight_factor: Tensor):
    """(grad_pred, grad_target, grad_weight) from d loss / d pred and d loss / d weight."""
    _, target, weight, _ = ctx.saved_tensors
    grad_target = None
    if grad_pred is not None and ctx.needs_input_grad[1]:
        grad_target = grad_pred.neg().to(target.dtype)
    grad_weight = None
    if ctx.needs_input_grad[2]:
        grad_weight = (grad.to(weight_factor.dtype) * weight_factor).to(weight.dtype)
    return grad_pred if ctx.needs_input_grad[0] else None, grad_target, grad_weight


def _weighted_mse_loss_grad(ctx, grad, _grad_mse):
    pred, target, weight, mse = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_pred = _weighted_mse_loss_backward_op(grad, pred, target, weight)
    return _loss_grads(ctx, grad_pred, grad, mse)


_register_autograd(_weighted_mse_loss_op, _weighted_mse_loss_grad, _loss_setup)


@_tensor_arguments
def weighted_mse_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Per-sample weighted MSE: loss_b = weight_b · mean over sample b of (pred − target)².

    The stage-2a diffusion loss (§6.2) is ``weighted_mse_loss(x̂0, x0, w).mean()``, equal to
    mean_{B,C,H,W}[w·(x̂0 − x0)²]. One read of pred and target forward, one backward.

    Args: pred (B, …) float32/64, bfloat16 or float16; target of pred's shape and dtype, or
    float32 for a bfloat16/float16 pred; weight (B,). Returns (B,) float32 (float64 for a
    float64 pred). Differentiable in pred, target and weight.
    """
    _check_loss_args("weighted_mse_loss", pred, target, weight)
    return _weighted_mse_loss_op(pred, target, weight)[0]


@_custom_op("pseudo_huber_loss")
def _pseudo_huber_loss_op(
    pred: Tensor, target: Tensor, weight: Tensor, c: float
) -> tuple[Tensor, Tensor]:
    return _run("pseudo_huber_loss", pred, pred, target, weight, c)


@_custom_op("pseudo_huber_loss_backward")
def _pseudo_huber_loss_backward_op(
    grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor, sqsum: Tensor, c: float
) -> Tensor:
    return _run("pseudo_huber_loss_backward", pred, grad, pred, target, weight, sqsum, c)


def _pseudo_huber_loss_grad(ctx, grad, _grad_sqsum):
    pred, target, weight, sqsum = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_pred = _pseudo_huber_loss_backward_op(grad, pred, target, weight, sqsum, ctx.c)
    grads = _loss_grads(ctx, grad_pred, grad, sqsum / torch.sqrt(sqsum + ctx.c * ctx.c))
    return (*grads, None)


_register_autograd(_pseudo_huber_loss_op, _pseudo_huber_loss_grad, _loss_setup)


@_tensor_arguments
def pseudo_huber_loss(pred: Tensor, target: Tensor, weight: Tensor, c: float = 0.06) -> Tensor:
    """The consistency loss of stage 2b (§7.3) per sample: with S_b = Σ over sample b of
    (pred − target)², loss_b = weight_b · S_b / sqrt(sg(S_b) + c²).

    pred = D_θ(x_t, t) and target = D_sgθ(x_r, r) are the two EDM-parameterised outputs,
    weight = 1/(t − r) on shifted t, r (0 where t = r), c = 0.06 (not scaled with the image
    size). The normaliser is under stop-gradient as in the official code, so the gradient is
    d loss_b / d pred = weight_b·2·(pred − target)/sqrt(S_b + c²), twice that of
    weight·(sqrt(S + c²) − c); the value is S/sqrt(S + c²), not the pseudo-Huber distance.

    Args: as :func:`weighted_mse_loss`, plus c > 0. Returns (B,) float32 (float64 for a
    float64 pred). Differentiable in pred, target and weight.
    """
    _check_loss_args("pseudo_huber_loss", pred, target, weight)
    _check(
        math.isfinite(c) and c > 0, lambda: f"pseudo_huber_loss: c must be a finite number > 0, got {c}"
    )
    return _pseudo_huber_loss_op(pred, target, weight, float(c))[0]


# --- image conversion -----------------------------------------------------------------------------


@_custom_op("normalize_images")
def _normalize_images_op(
    images: Tensor, flip: Tensor | None, mean: list[float], std: list[float], dtype: torch.dtype
) -> Tensor:
    return _run("normalize_images", images, images, flip, mean, std, dtype)


@_tensor_arguments
def normalize_images(
    images: Tensor, convention: str, flip: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A decoded uint8 batch → normalised network images, with per-sample horizontal flips.

    x = (u/255 − mean)/std per channel in the data convention of §2: ``"imagenet"``
    (x01 − mean)/(2·std) with the ImageNet statistics (3 channels), ``"simple"`` 2·x01 − 1.
    One pass: reads the uint8 NHWC batch once, writes the NCHW result once.

    Args: images uint8 (B, H, W, C) as a decoder delivers it, 1 ≤ C ≤ 16; convention;
    flip None or bool (B,) (True: mirror that sample left-right); dtype of the result
    (float32/64, bfloat16, float16; computed in float32, float64 for float64).
    Returns (B, C, H, W). Not differentiable.
    """
    name = "normalize_images"
    _check(
        images.dim() == 4 and images.dtype == torch.uint8,
        lambda: f"{name}: images must be uint8 (B, H, W, C), got {images.dtype} {tuple(images.shape)}",
    )
    C = images.shape[3]
    _check(
        images.shape[1] not in (1, 3) or C in (1, 3),
        lambda: f"{name}: images must be uint8 (B, H, W, C), got {tuple(images.shape)}, which "
        "looks like (B, C, H, W): pass images.permute(0, 2, 3, 1)",
    )
    _check(
        1 <= C <= MAX_IMAGE_CHANNELS,
        lambda: f"{name}: images must be (B, H, W, C) with 1 <= C <= {MAX_IMAGE_CHANNELS}, "
        f"got {tuple(images.shape)}",
    )
    if flip is not None:
        _check_per_sample(name, "flip", flip, images)
        _check(flip.dtype == torch.bool, lambda: f"{name}: flip must be bool, got {flip.dtype}")
    _check(
        dtype in FLOAT_DTYPES,
        lambda: f"{name}: dtype must be float32, float64, bfloat16 or float16, got {dtype}",
    )
    mean, std = reference.normalization_stats(convention, C)
    return _normalize_images_op(images, flip, mean, std, dtype)


@_custom_op("to_uint8")
def _to_uint8_op(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    return _run("to_uint8", images, images, mean, std)


@_tensor_arguments
def to_uint8(images: Tensor, convention: str) -> Tensor:
    """Normalised images → uint8 for saving: the inverse of :func:`normalize_images`.

    u = floor(clamp(x01, 0, 1)·255 + 0.5) with x01 = x·std + mean per channel of the
    convention (NaN → 0): round half up, as the official PNG writer and
    :func:`epg.data.embedded.to_uint8`. Computed in float32 (float64 for float64 images).

    Args: images (B, C, H, W) float32/64, bfloat16 or float16, 1 ≤ C ≤ 16; convention
    ("imagenet" or "simple"). Returns uint8 (B, H, W, C) on the images' device.
    """
    name = "to_uint8"
    _check(images.dim() == 4, lambda: f"{name}: images must be (B, C, H, W), got {tuple(images.shape)}")
    _check_float(name, "images", images)
    C = images.shape[1]
    _check(
        images.shape[3] not in (1, 3) or C in (1, 3),
        lambda: f"{name}: images must be (B, C, H, W), got {tuple(images.shape)}, which looks "
        "like (B, H, W, C): pass images.permute(0, 3, 1, 2)",
    )
    _check(
        1 <= C <= MAX_IMAGE_CHANNELS,
        lambda: f"{name}: images must be (B, C, H, W) with 1 <= C <= {MAX_IMAGE_CHANNELS}, "
        f"got {tuple(images.shape)}",
    )
    mean, std = reference.normalization_stats(convention, C)
    return _to_uint8_op(images.detach(), mean, std)


# --- patch layout of the tokens -------------------------------------------------------------------


@_custom_op("patchify_hwc")
def _patchify_hwc_op(img: Tensor, patch_size: int) -> Tensor:
    return _run("patchify_hwc", img, img, patch_size)


@_custom_op("unpatchify_hwc")
def _unpatchify_hwc_op(tokens: Tensor, patch_size: int, height: int) -> Tensor:
    return _run("unpatchify_hwc", tokens, tokens, patch_size, height)


def _patchify_hwc_setup(ctx, inputs, output):
    img, ctx.patch_size = inputs
    ctx.height = img.shape[2]


def _patchify_hwc_grad(ctx, grad):
    return _unpatchify_hwc_op(grad, ctx.patch_size, ctx.height), None


def _unpatchify_hwc_setup(ctx, inputs, output):
    _, ctx.patch_size, _ = inputs


def _unpatchify_hwc_grad(ctx, grad):
    return _patchify_hwc_op(grad, ctx.patch_size), None, None


_register_autograd(_patchify_hwc_op, _patchify_hwc_grad, _patchify_hwc_setup)
_register_autograd(_unpatchify_hwc_op, _unpatchify_hwc_grad, _unpatchify_hwc_setup)


def _check_element_size(name: str, arg: str, t: Tensor) -> None:
    _check(
        t.element_size() in (1, 2, 4, 8),
        lambda: f"{name}: {arg} must have 1, 2, 4 or 8 bytes per element, got {t.dtype}",
    )


@_tensor_arguments
def patchify_hwc(img: Tensor, patch_size: int) -> Tensor:
    """Image → patch tokens in the model's output layout: features in (p1, p2, c) order.

    Args: img (B, C, H, W), H and W multiples of p, any dtype of 1/2/4/8 bytes.
    Returns (B, N, p·p·C), N = (H/p)·(W/p) patches row-major. The inverse (and gradient) of
    :func:`unpatchify_hwc`. (:func:`patch_embed` gathers in Conv2d's (c, p1, p2) order instead.)
    """
    name = "patchify_hwc"
    _check(patch_size >= 1, lambda: f"{name}: patch_size must be >= 1, got {patch_size}")
    _check(
        img.dim() == 4 and img.shape[2] % patch_size == 0 and img.shape[3] % patch_size == 0,
        lambda: f"{name}: img must be (B, C, H, W) with H and W multiples of {patch_size}, "
        f"got {tuple(img.shape)}",
    )
    _check_element_size(name, "img", img)
    return _patchify_hwc_op(img, int(patch_size))


@_tensor_arguments
def unpatchify_hwc(tokens: Tensor, patch_size: int, height: int | None = None) -> Tensor:
    """Patch tokens with (p1, p2, c) features → image, as the EPG output head does.

    Args: tokens (B, N, p·p·C), any dtype of 1/2/4/8 bytes; height of the image in pixels
    (None: a square image, N must be a square number). Returns (B, C, height, N·p²/height).
    The inverse (and gradient) of :func:`patchify_hwc`.
    """
    name = "unpatchify_hwc"
    p = patch_size
    _check(p >= 1, lambda: f"{name}: patch_size must be >= 1, got {p}")
    _check(
        tokens.dim() == 3 and tokens.shape[2] >= p * p and tokens.shape[2] % (p * p) == 0,
        lambda: f"{name}: tokens must be (B, N, p·p·C) with p·p = {p * p} dividing the last dim, "
        f"got {tuple(tokens.shape)}",
    )
    _check_element_size(name, "tokens", tokens)
    n = tokens.shape[1]
    if height is None:
        side = math.isqrt(n)
        _check(side * side == n, lambda: f"{name}: token count {n} is not a square; pass height")
        height = side * p
    _check(
        height >= p and height % p == 0 and n % (height // p) == 0,
        lambda: f"{name}: height must be a multiple of {p} with height/{p} dividing N = {n}, "
        f"got {height}",
    )
    return _unpatchify_hwc_op(tokens, int(p), int(height))


# --- InfoNCE -------------------------------------------------------------------------------------


@_custom_op("info_nce")
def _info_nce_op(q: Tensor, k: Tensor, tau: float) -> Tensor:
    return _run("info_nce", q, q, k, tau)


@_custom_op("info_nce_backward")
def _info_nce_backward_op(grad: Tensor, q: Tensor, k: Tensor, tau: float) -> Tensor:
    return _run("info_nce_backward", q, grad, q, k, tau)


def _info_nce_setup(ctx, inputs, output):
    q, k, ctx.tau = inputs
    ctx.save_for_backward(q, k)


def _info_nce_grad(ctx, grad):
    q, k = ctx.saved_tensors
    return _info_nce_backward_op(grad, q, k, ctx.tau), None, None


_register_autograd(_info_nce_op, _info_nce_grad, _info_nce_setup)


@_tensor_arguments
def info_nce(q: Tensor, k: Tensor, tau: float | Tensor) -> Tensor:
    """InfoNCE of L2-normalised queries q (B, D) against keys k (M ≥ B, D), key i being query i's
    positive (§5.3): loss_i = logsumexp_j(q_i·k_j/τ) − q_i·k_i/τ, (B,) float32.

    No gradient reaches k (the keys are a stop-gradient target). The Triton kernel never holds
    more than a tile of the (B, M) logits. A tensor τ (a per-step schedule value kept on the
    device, so compiled steps do not recompile) is folded into q as q/τ with τ = 1 for the op.
    """
    _check(
        q.dim() == 2 and k.dim() == 2 and k.shape[1] == q.shape[1] and k.shape[0] >= q.shape[0],
        lambda: f"info_nce: q must be (B, D) and k (M >= B, D), got {tuple(q.shape)}, {tuple(k.shape)}",
    )
    _check(q.dtype == k.dtype, lambda: f"info_nce: q and k must share a dtype, got {q.dtype}, {k.dtype}")
    _check_float("info_nce", "q", q)
    if isinstance(tau, Tensor):
        _check(
            tau.numel() == 1,
            lambda: f"info_nce: a tensor tau must hold one value, got shape {tuple(tau.shape)}",
        )
        # Its value is read only where that is free: a CUDA tau would sync the device, and under
        # torch.compile reading it would break the graph. Those go unchecked.
        if tau.device.type == "cpu" and not torch.compiler.is_compiling():
            _check(bool(tau > 0), lambda: f"info_nce: tau must be positive, got {tau.item()}")
        q, tau = q / tau.to(q.dtype), 1.0
    _check(tau > 0, lambda: f"info_nce: tau must be positive, got {tau}")
    return _info_nce_op(q, k.detach(), float(tau))
