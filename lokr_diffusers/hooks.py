"""Attach the LoKr methods to diffusers pipelines, and route LoKr files given to `load_lora_weights`.

Done once on `import lokr_diffusers`. Methods go on `DiffusionPipeline`, so every pipeline with a
unet / text_encoder(s) (txt2img, img2img, inpaint, ControlNet, SDXL variants) has them; each method
works on whichever of those components the pipeline holds.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from . import export, loader, saving
from .formats.reader import group_modules
from .io import InvalidFileError, lokr_state_dict, looks_local

logger = logging.getLogger(__name__)

METHODS: dict[str, Callable[..., Any]] = {
    "load_lokr_weights": loader.load_lokr_weights,
    "set_lokr_adapters": loader.set_lokr_adapters,
    "fuse_lokr": loader.fuse_lokr,
    "unfuse_lokr": loader.unfuse_lokr,
    "enable_lokr": loader.enable_lokr,
    "disable_lokr": loader.disable_lokr,
    "delete_lokr_adapters": loader.delete_lokr_adapters,
    "unload_lokr_weights": loader.unload_lokr_weights,
    "get_list_lokr_adapters": loader.get_list_lokr_adapters,
    "get_active_lokr_adapters": loader.get_active_lokr_adapters,
    "save_lokr_weights": export.save_lokr_weights,
}
_ORIGINAL = "_lokr_diffusers_original_load_lora_weights"


def is_lokr_state_dict(state_dict: dict[str, Any]) -> bool:
    return bool(group_modules(state_dict)[0])


def _routing(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_lora_weights(self: Any, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None,
                          **kwargs: Any) -> Any:
        source = pretrained_model_name_or_path_or_dict
        try:
            state_dict, _, _ = lokr_state_dict(source, kwargs.get("weight_name"), kwargs.get("subfolder"))
        except InvalidFileError:  # a damaged file: say so, whoever would have read it
            raise
        except FileNotFoundError:
            if isinstance(source, (str, os.PathLike)) and looks_local(os.fspath(source)):
                raise  # a local path that does not exist is not a hub repo id
            state_dict = {}
        except (OSError, ValueError, TypeError):  # not ours to judge: diffusers reports its own way
            state_dict = {}
        if state_dict and is_lokr_state_dict(state_dict):
            logger.info("load_lora_weights: a LoKr file, loading it with lokr_diffusers")
            keep = {k: v for k, v in kwargs.items() if k in ("weight_name", "subfolder", "strict")}
            return loader.load_lokr_weights(self, state_dict, adapter_name=adapter_name, **keep)
        with loader.layers_stepped_aside(self):
            return original(self, pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    setattr(load_lora_weights, _ORIGINAL, original)
    return load_lora_weights


def _stepping_aside(original: Callable[..., Any]) -> Callable[..., Any]:
    """diffusers' LoRA unloading walks every module with a `base_layer` as if it were PEFT's: let it
    see only its own layers (LoKr layers step aside and come back around what is left)."""
    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        with loader.layers_stepped_aside(self):
            return original(self, *args, **kwargs)

    setattr(method, _ORIGINAL, original)
    return method


def original_load_lora_weights(pipe: Any) -> Callable[..., Any] | None:
    """diffusers' own load_lora_weights of this pipeline's class (without our routing), if any."""
    method = getattr(type(pipe), "load_lora_weights", None)
    if method is None:
        return None
    return getattr(method, _ORIGINAL, method)


def attach() -> None:
    """Add the methods to DiffusionPipeline and wrap every LoRA loader mixin's load_lora_weights."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders import lora_pipeline

    for name, fn in METHODS.items():
        setattr(DiffusionPipeline, name, fn)
    saving.attach()
    for mixin_name in ("StableDiffusionLoraLoaderMixin", "StableDiffusionXLLoraLoaderMixin"):
        mixin = getattr(lora_pipeline, mixin_name, None)
        method = getattr(mixin, "load_lora_weights", None)
        if mixin is not None and method is not None and not hasattr(method, _ORIGINAL):
            mixin.load_lora_weights = _routing(method)
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    for owner, name in ((LoraBaseMixin, "unload_lora_weights"), (PeftAdapterMixin, "unload_lora")):
        method = getattr(owner, name, None)
        if method is not None and not hasattr(method, _ORIGINAL):
            setattr(owner, name, _stepping_aside(method))
