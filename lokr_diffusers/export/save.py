"""`save_lokr_weights`: adapters of a pipeline (or of {component: model}) written in a consumer's layout through
the writer registry (registry.py). Everything is checked before anything is written; writes are all-or-nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import families
from ..components import pipeline_components
from ..families import ModelFamily
from .encode import resolve_dtype
from .modules import ExportJob, ExportModule, adapter_names, collect
from .registry import FORMAT_ALIASES, layout_of, write


def save_lokr_weights(source: Any, path: str | os.PathLike[str], adapter_name: str | list[str] = "default",
                      format: str = "comfyui", dtype: torch.dtype | str | None = None,
                      metadata: Mapping[str, str] | None = None, base: str | None = None,
                      keep_tucker: bool = False, strict: bool = True) -> str:
    """Write adapter(s) of a pipeline (or of {component: model}) to `path` in `format`.

    comfyui (alias kohya, a1111): one .safetensors; peft: a folder (one sub-folder per component
    when several hold the adapter); diffusers: one .safetensors; lokr_diffusers: one .safetensors,
    several adapters at once (a list, or "all"). Returns the path written.

    All-or-nothing: arguments are checked before anything is written, and a failed save (a full
    disk, a read-only folder, Ctrl-C) leaves every file and folder as it was, with no temporaries.
    Output-axis DoRA is written for ComfyUI's rule (ComfyUI reproduces the trained weight; A1111
    only applies input-axis DoRA). `keep_tucker=True` keeps Tucker cores (`lokr_t2`) instead of
    rewriting them as plain low-rank factors: such files fail to load in ComfyUI 0.3.64 (kron on a
    non-contiguous einsum result), so use it only for readers that take Tucker cores (LyCORIS, ours).

    Flux.1, SD3, Flux.2 / Klein and Z-Image pipelines (docs/formats.md §Export of DiT adapters): `base` may name
    the family ("flux", "sd3", "flux2", "zimage") and must then be the transformer's. A module ComfyUI has no name
    for is refused (`strict=False`: left out of the file, with a warning).
    """
    layout = layout_of(format)
    if layout is None:
        raise ValueError(f"format {format!r} is unknown; use one of {sorted(FORMAT_ALIASES)}")
    resolve_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path (str or os.PathLike), got {type(path).__name__}")
    _check_metadata(metadata)
    comps = dict(source) if isinstance(source, Mapping) else pipeline_components(source)

    def job(adapters: dict[str, list[ExportModule]], model: str) -> ExportJob:  # model: an SD base or DiT family
        return ExportJob(adapters, comps, model, os.fspath(path), dtype, dict(metadata or {}), keep_tucker, strict)

    if layout.several:
        names = _adapter_names(comps, adapter_name)
        return write(layout, job({a: collect(comps, a) for a in names}, _family(comps).name))
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name {adapter_name!r}: format {format!r} holds one adapter; pass its name "
                         "(several adapters go in one file with format='lokr_diffusers')")
    modules = collect(comps, adapter_name)
    return write(layout, job({adapter_name: modules}, _checked_family(comps, base)))


def _family(comps: Mapping[str, nn.Module]) -> ModelFamily:
    """The family of the components (families.of_components); text encoders alone are written as a file of the SD
    family whose text encoders they are (kohya's `lora_te` names)."""
    family = families.of_components(comps)
    if family is None:
        family = families.closest([f for f in families.FAMILIES.values() if f.originals is None], comps)[0]
    return family


def _checked_family(comps: Mapping[str, nn.Module], base: str | None) -> str:
    """The family to write for: a transformer's own, which `base`, if given, must be; for a UNet pipeline `base`
    if given (one of the families of its class: the UNet does not always tell, a tiny one never), else its own."""
    family = _family(comps)
    if base is None:
        return family.name
    if family.originals is not None and base != family.name:
        raise ValueError(f"base {base!r}: this pipeline's transformer is a {family.name} one; pass "
                         f"base={family.name!r} or None")
    siblings = sorted(f.name for f in families.FAMILIES.values() if f.denoiser_class == family.denoiser_class)
    if base not in siblings:
        raise ValueError(f"base {base!r}: one of {siblings} for a UNet pipeline")
    return base


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata[{k!r}]: safetensors metadata holds strings only, got {type(v).__name__}")


def _adapter_names(comps: Mapping[str, nn.Module], adapter_name: str | list[str]) -> list[str]:
    if adapter_name == "all":
        names = sorted(adapter_names(comps))
    else:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError(f"adapter_name {adapter_name!r}: no adapter to save")
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"adapter_name {adapter_name!r}: adapter names are strings")
    return names
