"""What `import lokr_diffusers` attaches to diffusers, and how to take it off again.

Nothing is imported or changed on `import lokr_diffusers` itself: `attach()` asks patches.py to run
each step below when diffusers imports the module concerned (at once if it already has). Every change
goes through the patch registry, so `detach()` undoes all of it and `attach()` twice is once.

- `diffusers.pipelines.pipeline_utils`: `DiffusionPipeline` gains the `*_lokr*` methods and
  `save_lokr_weights`; its `save_pretrained` writes plain components plus the unfused LoKr
  adapters (saving.py).
- `diffusers.loaders.lora_pipeline`: the SD / SDXL / Flux.1 / SD3 / Flux.2 / Z-Image LoRA loader mixins'
  `load_lora_weights` routes LoKr files to `load_lokr_weights` (and gives LoRA files a name no LoKr
  adapter uses); a mixin's own `unload_lora_weights` (Flux) also unloads LoKr.
- `diffusers.loaders.lora_base`: `LoraBaseMixin`'s adapter methods (set_adapters, fuse_lora, ...)
  act on LoKr adapters too (diffusers_api.py).
- `diffusers.loaders.peft`: the same for models: `unet.set_adapters`, `disable_adapters`, ...
- `diffusers.utils.logging`: `set_verbosity` also sets the `lokr_diffusers` loggers' level (logs.py).

A pipeline class whose adapters get a per-call scale also gets its `encode_prompt` wrapped
(scaling.py), through the same registry.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import patches

if TYPE_CHECKING:
    from .loaded import LoadedFile

logger = logging.getLogger(__name__)

PIPELINE_METHODS = ("load_lokr_weights", "set_lokr_adapters", "fuse_lokr", "unfuse_lokr", "enable_lokr",
                    "disable_lokr", "delete_lokr_adapters", "unload_lokr_weights", "get_list_lokr_adapters",
                    "get_active_lokr_adapters", "set_lokr_device", "save_lokr_weights")


# Every LoRA loader mixin's load_lora_weights sends LoKr files to load_lokr_weights (diffusers reads LoKr itself
# only for Flux.2 and Z-Image, through PEFT, Linear-only, without the original layouts' fused modules; elsewhere
# it refuses them), LoRA files to diffusers.


def is_lokr_state_dict(state_dict: dict[str, Any]) -> bool:
    from .formats.reader import group_modules

    return bool(group_modules(state_dict)[0])


def _read_lokr(source: Any, kwargs: dict[str, Any]) -> LoadedFile | None:
    """The file, whole, if `source` is a LoKr file we can read, else None (diffusers judges the rest)."""
    from .io import InvalidFileError, looks_local, read_lokr_file

    try:
        file = read_lokr_file(source, kwargs.get("weight_name"), kwargs.get("subfolder"))
    except InvalidFileError:  # a damaged file: say so, whoever would have read it
        raise
    except FileNotFoundError:
        if isinstance(source, (str, os.PathLike)) and looks_local(os.fspath(source)):
            raise  # a local path that does not exist is not a hub repo id
        return None
    except (OSError, ValueError, TypeError):  # not ours to judge: diffusers reports its own way
        return None
    return file if file.tensors and is_lokr_state_dict(dict(file.tensors)) else None


def _routing(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_lora_weights(self: Any, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs: Any) -> Any:
        from . import diffusers_lora, loader

        source = pretrained_model_name_or_path_or_dict
        file = _read_lokr(source, kwargs)
        if file is not None:  # carried whole: its metadata and PEFT config say how to read its tensors
            logger.info("load_lora_weights: a LoKr file, loading it with lokr_diffusers")
            keep = {k: v for k, v in kwargs.items() if k in ("strict", "load_into_transformer_2")}
            return loader.load_lokr_weights(self, file, adapter_name=adapter_name, hotswap=hotswap, **keep)
        lokr = loader.get_list_lokr_adapters(self)
        if adapter_name is None and lokr and not hotswap:  # diffusers would count only its own adapters
            taken = {n for names in (*lokr.values(), *diffusers_lora.lora_adapters(self).values()) for n in names}
            adapter_name = loader.default_name(taken)
        with diffusers_lora.layers_stepped_aside(self):
            return original(self, source, adapter_name=adapter_name, hotswap=hotswap, **kwargs)

    return patches.wraps(load_lora_weights, original)


def _method(name: str) -> Callable[..., Any]:
    """The pipeline method `name`, importing its module only when it is called."""
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        from . import export, loader

        fn = export.save_lokr_weights if name == "save_lokr_weights" else getattr(loader, name)
        return fn(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def _replace(new: Callable[..., Any], current: Any) -> Callable[..., Any]:
    return new


def _on_pipeline_utils(module: ModuleType) -> None:
    from . import compat, saving

    compat.check_diffusers_version()  # a warning, once, for a diffusers version not known to work
    pipeline = module.DiffusionPipeline
    for name in PIPELINE_METHODS:
        patches.patch(pipeline, name, functools.partial(_replace, _method(name)))
    patches.patch(pipeline, "save_pretrained", saving.wrap)


def _on_lora_pipeline(module: ModuleType) -> None:
    from .diffusers_api import unload_lora_weights

    for name in dir(module):
        cls = getattr(module, name)
        if not (isinstance(cls, type) and name.endswith("LoraLoaderMixin") and cls.__module__ == module.__name__):
            continue
        if "load_lora_weights" in cls.__dict__:
            patches.patch(cls, "load_lora_weights", _routing)
        if "unload_lora_weights" in cls.__dict__:  # e.g. Flux's own; LoraBaseMixin's is patched below
            patches.patch(cls, "unload_lora_weights", unload_lora_weights)


def _on_lora_base(module: ModuleType) -> None:
    from .diffusers_api import PIPELINE_METHODS as WRAPPERS

    for name, make in WRAPPERS.items():
        if hasattr(module.LoraBaseMixin, name):
            patches.patch(module.LoraBaseMixin, name, make)


def _on_peft(module: ModuleType) -> None:
    from .diffusers_api import MODEL_METHODS, model_method

    for name in MODEL_METHODS:
        if hasattr(module.PeftAdapterMixin, name):
            patches.patch(module.PeftAdapterMixin, name, model_method(name))


def _on_logging(module: ModuleType) -> None:
    from . import logs

    def make(original: Callable[[int], None]) -> Callable[[int], None]:
        @functools.wraps(original)
        def set_verbosity(verbosity: int) -> None:
            original(verbosity)
            logs.follow_diffusers(verbosity)

        return patches.wraps(set_verbosity, original)

    # the set_verbosity_* helpers call the module-level name, so one patch covers them all
    patches.patch(module, "set_verbosity", make)
    logs.follow_diffusers(module.get_verbosity())


STEPS: dict[str, Callable[[ModuleType], None]] = {
    "diffusers.utils.logging": _on_logging,
    "diffusers.pipelines.pipeline_utils": _on_pipeline_utils,
    "diffusers.loaders.lora_base": _on_lora_base,
    "diffusers.loaders.lora_pipeline": _on_lora_pipeline,
    "diffusers.loaders.peft": _on_peft,
}


def attach() -> None:
    """Attach to diffusers now or whenever it is imported (idempotent)."""
    for module, step in STEPS.items():
        patches.when_imported(module, step)


def detach() -> list[str]:
    """Undo everything `attach` changed in diffusers' classes and modules, and forget the steps not
    yet run. Adapters already loaded stay in their models (unload them first to remove them).
    Returns what was restored ('Owner.name')."""
    restored = patches.patched()
    patches.restore()
    return restored
