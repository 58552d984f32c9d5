"""The pipeline-aware injector: separate LoKr configs for the text encoder(s) and the UNet."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from .config import LoKrConfig
from .model import LoKrModel, lokr_layers

logger = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")


def _component(pipe: Any, name: str) -> nn.Module:
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
    UNet2DConditionModel), so the pipeline, offloading and saving keep working.
    All-or-nothing: if any component fails, the ones already done are rolled back.
    Returns {component: [adapted module names]}.
    """
    if not configs:
        raise ValueError("configs is empty: give at least one of " + ", ".join(COMPONENTS))
    modules = {name: _component(pipe, name) for name in configs}  # every name checked before any change
    done: list[tuple[LoKrModel, bool]] = []
    adapted: dict[str, list[str]] = {}
    try:
        for name, config in configs.items():
            fresh = not any(True for _ in lokr_layers(modules[name]))
            wrapper = LoKrModel(modules[name], None)
            adapted[name] = wrapper.inject_adapter(config, adapter_name)
            done.append((wrapper, fresh))
    except Exception:
        for wrapper, fresh in reversed(done):
            if fresh:
                wrapper.unload()
            else:
                wrapper.delete_adapter(adapter_name)
        raise
    logger.info("LoKr adapter %r added to %s", adapter_name, {k: len(v) for k, v in adapted.items()})
    return adapted
