"""Training recipes as TrainConfig fields: the paper's (epg-method.md §5.5, §6.3, §7.4) and the demo's.

A preset is a starting point: a config file and ``--set key=value`` override any field. The
paper's recipes train on an ImageNet-style folder: they need ``--set data_options.path=DIR``.
"""

from __future__ import annotations

import functools
from typing import Any

_STAGE1 = dict(
    mode="pretrain", data="folder", steps=600_000, batch_size=1024, lr=6e-4, betas=(0.9, 0.95),
    weight_decay=0.03, no_weight_decay=(), lr_schedule="cosine", warmup_steps=10_000, grad_clip=0.0,
    target_ema=0.99, objective=dict(s0=20, s1=1280, tau_con=0.2, tau_rc=0.1),
)  # fmt: skip  (lr 6e-4 as scripts/pretrain.sh runs it; the config file says 2e-4; wd on all)
_DIFFUSION = dict(
    mode="diffusion", data="folder", steps=1_000_000, batch_size=1024, lr=1e-4, betas=(0.9, 0.999),
    weight_decay=0.01, lr_schedule="cosine", warmup_steps=10_000, grad_clip=0.5,
    clip_after_warmup=True, ema_decay=0.9999, objective=dict(label_dropout=0.1),
)  # fmt: skip
_CONSISTENCY = dict(
    mode="consistency", data="folder", steps=700_000, batch_size=1024, lr=1e-4, betas=(0.9, 0.99),
    weight_decay=0.03, lr_schedule="warmup-step", warmup_steps=10_000,
    lr_milestones=(400_000, 500_000), lr_factors=(0.3, 0.08), grad_clip=0.0, ema_decay=0.9999,
    model_overrides=dict(drop=0.5), objective=dict(stage_length=100_000, c=0.06),
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "pretrain-rcm-b-16": {**_STAGE1, "model": "rcm-b-16"},
    "pretrain-rcm-l-16": {**_STAGE1, "model": "rcm-l-16"},
    "diffusion-epg-xl-16": {**_DIFFUSION, "model": "epg-xl-16"},
    "diffusion-epg-xxl-16": {**_DIFFUSION, "model": "epg-xxl-16"},
    "diffusion-epg-g-16": {**_DIFFUSION, "model": "epg-g-16", "steps": 2_000_000},  # 1600 epochs
    "diffusion-epg-l-32": {**_DIFFUSION, "model": "epg-l-32"},  # length not published (§13.4)
    "consistency-epg-l-16": {**_CONSISTENCY, "model": "epg-l-16"},
}


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}


@functools.cache
def _yaml_loader():
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_float = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_float, list("-+0123456789."))
    return Loader


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-4`` as a number: PyYAML follows YAML 1.1, where
    a float needs a dot ("1.0e-4"), so a learning rate written the usual way became a string."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def read_config_file(path: str) -> dict[str, Any]:
    """A run config from a YAML (.yaml/.yml) or JSON file: a mapping of TrainConfig fields."""
    import json
    from pathlib import Path

    import yaml

    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"config file {path} is a folder")
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):  # the suffix picks the parser
        raise ValueError(f"config file {path}: name it .yaml, .yml or .json (the suffix picks the format)")
    try:
        text = p.read_text(encoding="utf-8")
        data = load_yaml(text) if suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of training options, got {type(data).__name__}")
    return data


def set_option(options: dict[str, Any], dotted_key: str, value: Any) -> None:
    """options["a"]["b"] = value for the key "a.b" (nested dicts are created as needed)."""
    *parents, last = dotted_key.split(".")
    node = options
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted_key}: {key} is not a mapping")
    node[last] = value
