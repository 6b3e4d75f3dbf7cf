"""Training objectives of EPG (epg-method.md §5–7).

Each objective has ``draw(step, batch_size, image_shape, generator, device) -> dict`` (all the
randomness of one step except dropout, from the Trainer's generator; per-sample tensors lead with
the batch dim, per-batch ones are 0-d) and ``loss(batch, draws) -> (loss, terms)`` (a pure,
compile-traceable function of its inputs and the networks, which it calls only through forward).
"""

from .consistency import ConsistencyObjective, ect_r
from .diffusion import DiffusionObjective
from .infonce import gather_keys, info_nce
from .pretrain import (
    PretrainObjective,
    curriculum_grid_size,
    interpolated_tau,
    tau_max_schedule,
)

__all__ = [
    "info_nce", "gather_keys", "curriculum_grid_size", "tau_max_schedule", "interpolated_tau",
    "ect_r", "PretrainObjective", "DiffusionObjective", "ConsistencyObjective",
]  # fmt: skip
