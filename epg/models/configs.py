"""Named configurations of the EPG networks (epg-method.md §4.4) as dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class _ViTShape:
    img_size: int = 256  # square input side in pixels
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768  # encoder width D_enc
    depth: int = 12  # encoder blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def validate(self) -> None:
        # Positivity first: a zero patch_size or num_heads would otherwise surface as a
        # ZeroDivisionError from the divisibility checks below.
        self._require_positive("img_size", "patch_size", "in_channels", "embed_dim", "depth",
                               "num_heads", "mlp_ratio")  # fmt: skip
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class EPGConfig(_ViTShape):
    """The generative network (stage 2): encoder + adaLN decoder with long skips."""

    kind: ClassVar[str] = "epg"
    decoder_embed_dim: int = 1584
    decoder_depth: int = 12
    decoder_num_heads: int = 22
    num_classes: int = 1000  # class `num_classes` is the null (unconditional) class; 0: none
    drop: float = 0.0  # dropout on the decoder attention output projection (0.5 for CM tuning)

    def validate(self) -> None:
        super().validate()
        self._require_positive("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if self.num_classes < 0 or not 0.0 <= self.drop < 1.0:
            raise ValueError("num_classes must be >= 0 and drop in [0, 1)")


@dataclass(frozen=True)
class RCMConfig(_ViTShape):
    """The stage-1 encoder with its projection head.

    proj_output_dim: 768 as ``scripts/pretrain.sh`` of the official code runs it (its config file
    says 256; epg-method.md §13 open question 2) — override to match a checkpoint.
    """

    kind: ClassVar[str] = "rcm"
    proj_hidden_dim: int = 4096
    proj_output_dim: int = 768
    proj_layers: int = 3

    def validate(self) -> None:
        super().validate()
        if self.proj_layers < 1:
            raise ValueError(f"proj_layers must be >= 1, got {self.proj_layers}")
        self._require_positive("proj_hidden_dim", "proj_output_dim")


_ENC_B = dict(embed_dim=768, depth=12, num_heads=12)
_ENC_L = dict(embed_dim=1024, depth=16, num_heads=16)

CONFIGS: dict[str, EPGConfig | RCMConfig] = {
    "epg-l-16": EPGConfig(
        **_ENC_L, decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16
    ),
    "epg-xl-16": EPGConfig(
        **_ENC_B, decoder_embed_dim=1584, decoder_depth=12, decoder_num_heads=22
    ),
    "epg-xxl-16": EPGConfig(
        **_ENC_B, decoder_embed_dim=1920, decoder_depth=12, decoder_num_heads=16
    ),
    "epg-g-16": EPGConfig(
        **_ENC_B, decoder_embed_dim=2688, decoder_depth=12, decoder_num_heads=21
    ),
    "epg-l-32": EPGConfig(
        img_size=512, patch_size=32, **_ENC_L,
        decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
    ),  # fmt: skip
    "rcm-b-16": RCMConfig(**_ENC_B),
    "rcm-l-16": RCMConfig(**_ENC_L),
    # The stage-1 encoder EPG-L/32 needs at 512 px. Not a released config: the releases list
    # "RCM-B (IN-512)", whose 768 width does not fit EPG-L/32's 1024-wide encoder (epg-method.md
    # §13 open question 3), so this is the L encoder at EPG-L/32's image and patch size.
    "rcm-l-32": RCMConfig(img_size=512, patch_size=32, **_ENC_L),
    # Tiny networks that train on a CPU in seconds; the decoder is wider than the encoder so
    # encoder_to_decoder is exercised, as in EPG-XL.
    "epg-tiny": EPGConfig(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4, num_classes=10,
    ),  # fmt: skip
    # The networks of `epg demo`: 16-px grayscale digits, 16 patch tokens, about 2M parameters.
    "epg-digits": EPGConfig(
        img_size=16, patch_size=4, in_channels=1, embed_dim=128, depth=4, num_heads=4,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4, num_classes=10,
    ),  # fmt: skip
    "rcm-digits": RCMConfig(
        img_size=16, patch_size=4, in_channels=1, embed_dim=128, depth=4, num_heads=4,
        proj_hidden_dim=256, proj_output_dim=128,
    ),  # fmt: skip
    "rcm-tiny": RCMConfig(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
        proj_hidden_dim=128, proj_output_dim=32,
    ),  # fmt: skip
}


def get_config(name: str, **overrides: Any) -> EPGConfig | RCMConfig:
    """The named config with ``overrides`` applied (any architectural field)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    return apply_overrides(CONFIGS[name], **overrides)


def apply_overrides(config: EPGConfig | RCMConfig, **overrides: Any) -> EPGConfig | RCMConfig:
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for {type(config).__name__}; valid: {sorted(fields)}"
        )
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return config


def config_to_dict(config: EPGConfig | RCMConfig) -> dict[str, Any]:
    return {"kind": config.kind, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> EPGConfig | RCMConfig:
    data = dict(data)
    kind = data.pop("kind", None)
    classes = {"epg": EPGConfig, "rcm": RCMConfig}
    if kind not in classes:
        raise ValueError(f"config kind must be one of {sorted(classes)}, got {kind!r}")
    return apply_overrides(classes[kind](), **data)
