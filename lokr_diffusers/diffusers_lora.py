"""diffusers' own LoRA machinery, which the LoKr methods work beside: its LoRA adapters listed (`lora_adapters`),
LoKr layers stepped aside while diffusers or PEFT change the module tree (`layers_stepped_aside`), a mixed file's
plain-LoRA part handed to diffusers' loader (`load_lora_part`), and accelerate's offload hooks paused around a load
as diffusers' LoRA loader pauses them (`offloading_paused`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from . import patches
from .components import pipeline_components
from .formats.names import get_slot
from .layers import LoKrLayer
from .model import lokr_layers


def _peft_backend() -> bool:
    try:
        from diffusers.utils import USE_PEFT_BACKEND
    except ImportError:
        return False
    return bool(USE_PEFT_BACKEND)


def lora_adapters(pipe: Any) -> dict[str, list[str]]:
    """diffusers' own get_list_adapters (LoRA only), {} without the PEFT backend."""
    method = getattr(type(pipe), "get_list_adapters", None)
    if method is None or not _peft_backend():
        return {}
    return {c: list(names) for c, names in patches.original(method)(pipe).items()}


def lora_names(pipe: Any) -> list[str]:
    """Every LoRA adapter name of the pipeline, over its components."""
    return [n for names in lora_adapters(pipe).values() for n in names]


def load_lora_part(pipe: Any, lora: dict[str, Tensor], adapter_name: str) -> None:
    """Plain LoRA modules of a mixed file go to diffusers' own loader, under the same name."""
    method = getattr(type(pipe), "load_lora_weights", None)
    original = None if method is None else patches.original(method)  # diffusers' own, without our routing
    if original is None:
        raise ValueError(f"this file also holds {len(lora)} plain LoRA keys and {type(pipe).__name__} "
                         "has no diffusers LoRA loader")
    with layers_stepped_aside(pipe):
        try:
            original(pipe, lora, adapter_name=adapter_name)
        except Exception as err:  # diffusers' own message, under ours: the whole load is undone
            raise ValueError(f"the {len(lora)} plain LoRA keys of this file did not load in diffusers, so nothing "
                             f"was loaded: {type(err).__name__}: {err}") from err


@contextmanager
def layers_stepped_aside(pipe_or_model: Any) -> Iterator[None]:
    """Take LoKr layers out of their slots (base layers back) while another library changes the
    module tree (diffusers/PEFT LoRA cannot wrap a LoKr layer, and its unload would take any module
    with a `base_layer` for its own), then put each back around whatever its slot holds now: the
    base layer itself, or the base layer inside a new LoRA wrapper."""
    models = [pipe_or_model] if isinstance(pipe_or_model, nn.Module) else pipeline_components(pipe_or_model).values()
    saved: list[tuple[nn.Module, str, LoKrLayer]] = []
    for model in models:
        for path, layer in list(lokr_layers(model)):
            parent_name, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, layer.base_layer)
            saved.append((model, path.replace(".base_layer", ""), layer))
    try:
        yield
    finally:
        for model, logical, layer in saved:
            parent, attr = get_slot(model, logical)
            layer.base_layer = getattr(parent, attr)
            setattr(parent, attr, layer)


@contextmanager
def offloading_paused(pipe: Any) -> Iterator[None]:
    """Remove accelerate's offload hooks while modules change, and put them back (as diffusers'
    own LoRA loader does)."""
    try:
        from diffusers.loaders.lora_base import _func_optionally_disable_offloading
    except ImportError:  # another diffusers version: load without touching hooks
        yield
        return
    model_offload, sequential_offload, _ = _func_optionally_disable_offloading(pipe)
    device = getattr(pipe, "_offload_device", None)  # the device offloading was set up for
    try:
        yield
    finally:
        if model_offload:
            pipe.enable_model_cpu_offload(device=device)
        elif sequential_offload:
            pipe.enable_sequential_cpu_offload(device=device)
