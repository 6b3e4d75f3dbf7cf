"""EPG networks, their named configs, and the EDM denoiser wrapper.

``build(name, **overrides)`` returns a freshly initialised network: ``EPGViT`` for the generative
configs (``epg-*``), ``RCMViT`` for the stage-1 encoders (``rcm-*``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .configs import (
    CONFIGS,
    EPGConfig,
    RCMConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_config,
)
from .denoiser import Denoiser
from .networks import EPGViT, RCMViT

__all__ = [
    "CONFIGS", "EPGConfig", "RCMConfig", "EPGViT", "RCMViT", "Denoiser",
    "build", "build_from_config", "get_config", "apply_overrides", "config_from_dict",
    "config_to_dict", "count_parameters",
]  # fmt: skip


def build_from_config(config: EPGConfig | RCMConfig) -> EPGViT | RCMViT:
    if isinstance(config, EPGConfig):
        return EPGViT(config)
    if isinstance(config, RCMConfig):
        return RCMViT(config)
    raise TypeError(f"expected EPGConfig or RCMConfig, got {type(config).__name__}")


def build(name: str, **overrides: Any) -> EPGViT | RCMViT:
    """Build the named network (see ``CONFIGS``) with any architectural field overridden.

    Builds on the current default device, so ``with torch.device("meta"): build(...)`` makes a
    parameter-free skeleton (e.g. to count parameters of EPG-G).
    """
    return build_from_config(get_config(name, **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
