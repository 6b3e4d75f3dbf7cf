"""InfoNCE (NT-Xent) over the global batch, as used by every EPG objective (epg-method.md §5.3).

``NT(q, k; τ)``: queries are local; keys are gathered from every rank (local block first, the other
ranks after it in rank order) and carry no gradient; for query i the positive is key i, and the
negatives are all other keys of the global batch:

    ℓ_i = logsumexp_j(q̂_i·k̂_j / τ) − q̂_i·k̂_i / τ,    q̂ = q/‖q‖, k̂ = k/‖k‖.

The positive stays in the denominator and there is no 2τ rescaling (unlike MoCo v3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import ops

__all__ = ["info_nce", "gather_keys"]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_keys(k: Tensor) -> Tensor:
    """Keys of the whole global batch with this rank's block first.

    Args: k (B, D), the local keys (every rank must hold the same B). Returns (W·B, D):
    [k of this rank, k of rank 0, 1, … (skipping this rank)], detached. Without a process group
    (or with one rank) it is ``k.detach()``. The local block is the local tensor itself (not its
    gathered copy), so the positive k_i lines up with query i exactly.
    """
    k = k.detach()
    rank, world = _world()
    if world == 1:
        return k
    B = k.shape[0]
    gathered = k.new_empty((world * B, *k.shape[1:]))
    # all_gather_single is the newer name of all_gather_into_tensor (same semantics).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, k.contiguous())
    return torch.cat([k, gathered[: rank * B], gathered[(rank + 1) * B :]], dim=0)


def info_nce(q: Tensor, k: Tensor, tau: float | Tensor) -> Tensor:
    """Per-sample InfoNCE loss with keys gathered over all ranks (epg-method.md §5.3).

    Args:
        q: (B, D) queries (gradients flow into them).
        k: (M, D) keys, M ≥ B, key i query i's positive; rows past B are further negatives (a
            micro-batch's queries against the keys of its whole batch); every rank must pass the
            same M. Stop-gradient: they are detached here whatever the caller passes.
        tau: temperature, a float or a 0-d tensor.
    Returns:
        (B,) float32: ℓ_i = logsumexp_j(q̂_i·k̂_j/τ) − q̂_i·k̂_i/τ over the W·M keys of all ranks,
        with q̂, k̂ the L2-normalised vectors. Normalisation and logits are computed in float32
        with autocast off (bf16 logits divided by τ = 0.1 lose too much).
    """
    if q.dim() != 2 or k.dim() != 2 or k.shape[1] != q.shape[1] or k.shape[0] < q.shape[0]:
        raise ValueError(
            f"info_nce: q must be (B, D) and k (M >= B, D), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    keys = gather_keys(k)  # (W·M, D), local block first: key i is query i's positive
    with torch.autocast(device_type=q.device.type, enabled=False):
        q_hat = F.normalize(q.float(), dim=1)
        k_hat = F.normalize(keys.float(), dim=1)
        # The fused op never materialises more than a tile of the (B, W·B) logits.
        return ops.info_nce(q_hat, k_hat, tau)
