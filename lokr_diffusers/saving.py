"""`pipe.save_pretrained()` with LoKr adapters in the pipeline: a folder that loads again.

diffusers saves each component by its class: a `LoKrModel` wrapper (the form
`pipe.unet = LoKrModel(pipe.unet, config)`) has no diffusers save method and was silently dropped,
and a component with LoKr layers inside would save `base_layer.weight` keys its class cannot load.
So for the save every component is its plain self: LoKrModel components are swapped for the model
they wrap and LoKr layers step aside (base layers back in their slots). The weights saved are what
the base layers hold: adapters the user fused are in them; every adapter part that is not fused is
written beside, as `lokr_adapters.safetensors` (our lossless layout, all adapters), which
`pipe.load_lokr_weights(folder, weight_name="lokr_adapters.safetensors")` loads back.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import export, patches
from .atomic import write_safetensors
from .components import pipeline_components
from .diffusers_lora import layers_stepped_aside
from .model import LoKrModel, lokr_layers

logger = logging.getLogger(__name__)

ADAPTERS_FILE = "lokr_adapters.safetensors"


def unfused_modules(pipe: Any) -> dict[str, list[export.ExportModule]]:
    """{adapter: its modules} for every adapter part not fused into the weights."""
    comps = pipeline_components(pipe)
    layers = {(c, path.replace(".base_layer", "")): layer for c, m in comps.items() for path, layer in lokr_layers(m)}
    names = sorted({a for layer in layers.values() for a in layer.plans})
    out: dict[str, list[export.ExportModule]] = {}
    for a in names:
        kept = [m for m in export.collect(comps, a) if a not in layers[(m.component, m.path)].state.physical_names()]
        if kept:
            out[a] = kept
    return out


@contextmanager
def plain_components(pipe: Any) -> Iterator[None]:
    """Inside the block, every component is a plain diffusers / transformers model."""
    wrapped = {name: getattr(pipe, name) for name in pipeline_components(pipe)
               if isinstance(getattr(pipe, name, None), LoKrModel)}
    entries = {name: pipe.config[name] for name in wrapped}
    try:
        for name, wrapper in wrapped.items():
            setattr(pipe, name, wrapper.model)  # diffusers records the model's own class in the config
        with layers_stepped_aside(pipe):
            yield
    finally:
        for name, wrapper in wrapped.items():
            object.__setattr__(pipe, name, wrapper)
            pipe.register_to_config(**{name: entries[name]})


def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    """diffusers' DiffusionPipeline.save_pretrained, made LoKr-aware (see the module docstring)."""

    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        comps = pipeline_components(self)
        if not any(True for m in comps.values() for _ in lokr_layers(m)) and \
                not any(isinstance(getattr(self, c, None), LoKrModel) for c in comps):
            return original(self, save_directory, *args, **kwargs)
        side = unfused_modules(self)
        with plain_components(self):
            result = original(self, save_directory, *args, **kwargs)
        if side:
            sd, meta = export.to_ours(side)
            path = os.path.join(os.fspath(save_directory), ADAPTERS_FILE)
            write_safetensors(sd, path, meta)
            logger.info("saved LoKr adapters %s beside the pipeline: pipe.load_lokr_weights(%r, weight_name=%r)",
                        list(side), os.fspath(save_directory), ADAPTERS_FILE)
        return result

    return patches.wraps(save_pretrained, original)

