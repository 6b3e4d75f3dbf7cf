"""Triton kernels behind ``epg.ops``; this folder installs as the package ``epg_kernels``.

Plain launchers over tensors, one op family per module (``layer_norm``: LayerNorm and LayerNorm +
adaLN modulation; ``attention``: flash attention on packed qkv; ``patch_embed``: image → tokens
with the patch gather folded into the matrix product; ``residual``: the gated residual add
x + gate·y; ``infonce``: InfoNCE over L2-normalised queries and gathered keys, without storing the
(B, M) logits; ``precondition``: the network input c_in·(x0 + σ·ε) with its per-sample scalings,
and the stage-2 losses (weighted MSE, pseudo-Huber); each forward and backward). Each launcher has the signature and return convention of
the function of the same name in ``epg.reference``, which defines the math. The package knows
nothing of EPG models, autograd or ``torch.library``: the op layer wires these in.

The op layer reads these names:

* ``IMPLEMENTATIONS``: op name -> launcher; empty when Triton cannot be imported.
* ``SUPPORTS``: op name -> ``check(*args) -> reason | None`` for launchers that take only some
  inputs (dtypes, sizes); automatic backend choice skips a launcher whose check gives a reason.
* ``UNAVAILABLE_REASON``: why ``IMPLEMENTATIONS`` is empty, or ``None`` when Triton imported.

Importing this package never fails for lack of Triton. On a CPU-only machine the kernels run
only under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

from typing import Callable

IMPLEMENTATIONS: dict[str, Callable] = {}
SUPPORTS: dict[str, Callable[..., str | None]] = {}
UNAVAILABLE_REASON: str | None

try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install raising something else
    UNAVAILABLE_REASON = f"triton could not be imported: {type(exc).__name__}: {exc}"
else:
    UNAVAILABLE_REASON = None
    from .attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, attention, attention_backward
    from .infonce import declines as _info_nce_declines
    from .infonce import info_nce, info_nce_backward
    from .layer_norm import declines as _layer_norm_declines
    from .layer_norm import layer_norm, layer_norm_backward, ln_modulate, ln_modulate_backward
    from .patch_embed import declines as _patch_embed_declines
    from .patch_embed import patch_embed, patch_embed_backward
    from .precondition import declines as _precondition_declines
    from .precondition import (
        noise_precondition,
        noise_precondition_backward,
        pseudo_huber_loss,
        pseudo_huber_loss_backward,
        weighted_mse_loss,
        weighted_mse_loss_backward,
    )
    from .residual import gated_residual, gated_residual_backward

    IMPLEMENTATIONS.update(
        {
            "attention": attention,
            "attention_backward": attention_backward,
            "layer_norm": layer_norm,
            "layer_norm_backward": layer_norm_backward,
            "ln_modulate": ln_modulate,
            "ln_modulate_backward": ln_modulate_backward,
            "patch_embed": patch_embed,
            "patch_embed_backward": patch_embed_backward,
            "gated_residual": gated_residual,
            "gated_residual_backward": gated_residual_backward,
            "info_nce": info_nce,
            "info_nce_backward": info_nce_backward,
            "noise_precondition": noise_precondition,
            "noise_precondition_backward": noise_precondition_backward,
            "weighted_mse_loss": weighted_mse_loss,
            "weighted_mse_loss_backward": weighted_mse_loss_backward,
            "pseudo_huber_loss": pseudo_huber_loss,
            "pseudo_huber_loss_backward": pseudo_huber_loss_backward,
        }
    )


    def _attention_supports(qkv, num_heads, *rest) -> str | None:
        # Inputs the kernel declines (it would raise): automatic backend choice passes them on.
        if qkv.dtype not in SUPPORTED_DTYPES:
            return f"dtype {qkv.dtype} (the kernel takes {SUPPORTED_DTYPES})"
        if qkv.dim() == 3 and qkv.shape[-1] % (3 * num_heads) == 0:
            head_dim = qkv.shape[-1] // (3 * num_heads)
            if head_dim > MAX_HEAD_DIM:
                return f"head dim {head_dim} > {MAX_HEAD_DIM}"
        return None

    SUPPORTS.update(
        {
            "attention": _attention_supports,
            "attention_backward": lambda grad, qkv, num_heads: _attention_supports(qkv, num_heads),
            # Rows wider than the kernels hold in registers: the reference runs them.
            **{op: _layer_norm_declines for op in ("layer_norm", "ln_modulate")},
            **{f"{op}_backward": lambda grad, x, *rest: _layer_norm_declines(x)
               for op in ("layer_norm", "ln_modulate")},
            # float64 (no tl.dot path) and channel-less images: the reference runs them.
            "patch_embed": _patch_embed_declines,
            "patch_embed_backward": _patch_embed_declines,
            # float64, or q and k of different dtypes: the reference runs them.
            "info_nce": _info_nce_declines,
            "info_nce_backward": lambda grad, q, k, tau: _info_nce_declines(q, k),
            # float64 sigma (the kernel's scalar math is float32): the reference runs it.
            "noise_precondition": lambda x0, eps, sigma, *rest: _precondition_declines(sigma),
            "noise_precondition_backward": (
                lambda g, g_in, g_skip, g_out, g_t, x0, eps, sigma, *rest: _precondition_declines(sigma)
            ),
        }
    )

__all__ = ["IMPLEMENTATIONS", "SUPPORTS", "UNAVAILABLE_REASON"]
