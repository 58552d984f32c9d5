"""The pipeline-aware injector: separate LoKr configs for the text encoder(s) and the UNet."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from .config import LoKrConfig
from .formats.names import COMPONENTS
from .loader import attach_call_scale
from .model import LoKrModel
from .transaction import all_or_nothing

logger = logging.getLogger(__name__)


def _component(pipe: Any, name: str) -> nn.Module:
    if name not in COMPONENTS:
        raise ValueError(f"add_lokr adapts the components {list(COMPONENTS)}, which the pipeline's LoKr methods "
                         f"manage; got {name!r} (for another module use LoKrModel(pipe.{name}, config) directly)")
    module = getattr(pipe, name, None)
    if module is None:
        have = [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
        raise ValueError(f"{type(pipe).__name__} has no component {name!r} (it has {have})")
    if isinstance(module, LoKrModel):
        return module.model
    if not isinstance(module, nn.Module):
        raise TypeError(f"pipeline component {name!r} is a {type(module).__name__}, not a torch module")
    return module


def add_lokr(pipe: Any, configs: Mapping[str, LoKrConfig], adapter_name: str = "default") -> dict[str, list[str]]:
    """Add adapter `adapter_name` to the pipeline's components, each with its own config.

    Example: `add_lokr(pipe, {"unet": cfg_unet, "text_encoder": cfg_te, "text_encoder_2": cfg_te})`.
    The components are adapted in place and keep their classes (pipe.unet stays a
    UNet2DConditionModel), so the pipeline, offloading and saving keep working. As with PEFT, the
    base parameters of each adapted component are frozen and the new adapter's are trainable.
    All-or-nothing: if any component fails, every component is exactly as before (modules,
    adapters, requires_grad flags). Returns {component: [adapted module names]}.
    """
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("configs must be a non-empty {component: LoKrConfig} dict, e.g. "
                         "{'unet': LoKrConfig(...), 'text_encoder': LoKrConfig(...)}")
    modules = {name: _component(pipe, name) for name in configs}  # every name checked before any change
    adapted: dict[str, list[str]] = {}
    with all_or_nothing(modules.values(), [pipe]):
        for name, config in configs.items():
            adapted[name] = LoKrModel(modules[name], None).inject_adapter(config, adapter_name)
        attach_call_scale(pipe, modules)
    logger.info("LoKr adapter %r added to %s", adapter_name, {k: len(v) for k, v in adapted.items()})
    return adapted
