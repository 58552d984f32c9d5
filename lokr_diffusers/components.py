"""A pipeline's adaptable components by name (`formats.names.COMPONENTS`), a LoKrModel-wrapped one seen as its
model: what the loader, the writers and diffusers' adapter methods act on."""

from __future__ import annotations

from typing import Any

from torch import nn

from .formats.names import COMPONENTS
from .model import LoKrModel


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's adaptable components by name (a LoKrModel-wrapped one counts as its model)."""
    out: dict[str, nn.Module] = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, LoKrModel):
            module = module.model
        if isinstance(module, nn.Module):
            out[name] = module
    return out
