"""Adapter weights as diffusers' `set_adapters` accepts them, resolved per layer.

One adapter's weight on one component is a number, or a dict: for a UNet, diffusers' per-block form
(`{"down": 0.5, "mid": 1.0, "up": {"block_1": [0.2, 0.4, 0.6]}}`), which diffusers' own expansion
turns into {module prefix: weight}; for any component, {module-name substring: weight}. A layer
takes the first entry whose key occurs in its module name, else its transformer block's entry
(`down_blocks.1.attentions.0`), else 1.0: the rule diffusers applies to LoRA layers, so LoKr and
LoRA layers of one module get the same weight (docs/adapters.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from . import state as S

logger = logging.getLogger(__name__)

Spec = float | dict[str, float]  # one adapter's weight on one component, after expansion


def expand(model: nn.Module, value: Any, what: str) -> Spec:
    """A number (checked) or a dict of per-module weights for this component (UNet block dicts
    expanded as diffusers does)."""
    if value is None:
        return 1.0
    if not isinstance(value, Mapping):
        return S.check_strength(value, what)
    expanded: Any = value
    try:
        from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING
    except ImportError:  # another diffusers version: block dicts are taken as module substrings
        pass
    else:
        expand_fn: Any = _SET_ADAPTER_SCALE_FN_MAPPING[type(model).__name__]
        expanded = expand_fn(model, [dict(value)])[0]
    if not isinstance(expanded, Mapping):
        return S.check_strength(expanded, what)
    out: dict[str, float] = {}
    for key, w in expanded.items():
        if not isinstance(key, str) or isinstance(w, (Mapping, list, tuple)):
            raise ValueError(f"{what}: block weights for {type(model).__name__} must be "
                             f"{{'down'|'mid'|'up': number or per-block dict}}; got {dict(value)!r}")
        out[key] = S.check_strength(w, f"{what}[{key!r}]")
    return out


def for_layer(spec: Spec, module_name: str) -> float:
    """The weight of one layer (module_name: its path in the component) under `spec`."""
    if not isinstance(spec, dict):
        return spec
    for key, w in spec.items():
        if key in module_name:
            return w
    parts = module_name.split(".")
    if len(parts) >= 4:
        return spec.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
    return 1.0


def is_negative(spec: Spec) -> bool:
    return any(w < 0 for w in spec.values()) if isinstance(spec, dict) else spec < 0
