"""The registry: every model family's record, in the order they are tried and listed (the SD UNets, then the DiT
families). A family is one module of data beside this one (sd.py, flux.py, ...), added to `FAMILIES` here."""

from __future__ import annotations

import importlib
from typing import Any

from . import (
    chroma,
    flux,
    flux2,
    hidream,
    hunyuanvideo,
    hunyuanvideo15,
    ltx,
    ltx2,
    lumina2,
    qwenimage,
    sd,
    sd3,
    wan,
    zimage,
)
from .record import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    *sd.FAMILIES, flux.FLUX, sd3.SD3, flux2.FLUX2, zimage.ZIMAGE, wan.WAN, ltx.LTXVIDEO, ltx2.LTX2,
    qwenimage.QWENIMAGE, qwenimage.QWENIMAGE21, hidream.HIDREAM, chroma.CHROMA, lumina2.LUMINA2,
    hunyuanvideo15.HUNYUANVIDEO15, hunyuanvideo.HUNYUANVIDEO,
)}
# every name the command line takes (--base): a family's own and its aliases
ALIASES: dict[str, str] = {alias: f.name for f in FAMILIES.values() for alias in (f.name, *f.aliases)}


def get(name: str) -> ModelFamily:
    """The family named `name` (its own name, not an alias); ValueError naming the known ones."""
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"unknown model family {name!r}; one of {tuple(FAMILIES)}")
    return family


def of_variant(variant: str) -> ModelFamily:
    """The family whose full-size models (architectures.VARIANTS) include `variant`."""
    for family in FAMILIES.values():
        if variant in (*family.variants, *family.subsumed):
            return family
    raise ValueError(f"no model family lists the full-size model {variant!r}")


def training_families(script: str) -> tuple[ModelFamily, ...]:
    """The families the training script `script` ("sd", "flow") trains, in registry order."""
    return tuple(f for f in FAMILIES.values() if f.training is not None and f.training.script == script)


def build_tiny(name: str, seed: int = 0) -> Any:
    """The family's tiny pipeline (`ModelFamily.tiny`), built by importing its builder now: a `helpers.` builder is
    the test suite's (tests/helpers/) and imports only where tests/ is on the path."""
    family = get(name)
    if family.tiny is None:
        raise ValueError(f"the {family.title} family has no tiny pipeline")
    module, _, function = family.tiny.partition(":")
    return getattr(importlib.import_module(module), function)(seed)
