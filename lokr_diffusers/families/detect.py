"""Which family: of a denoiser model, of a pipeline's components, of a file's module names. Each question is asked
here and answered from the records' data (`ModelFamily.denoiser_class`, `Detection`); nothing else in the package
keeps a rule of its own. The base among the families of one denoiser class, read off a file's factor shapes,
needs the LoKr key layout: formats/report.py applies those signs (`Detection.base`).

Models are read by duck typing (their class's MRO names and `config`): nothing here imports torch or diffusers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .record import ModelFamily, Sign
from .registry import FAMILIES


def _fits_config(family: ModelFamily, model: Any) -> bool:
    config = getattr(model, "config", None)
    return all(getattr(config, key, None) == value for key, value in family.detect.config.items())


def _by_denoiser(model: Any, component: str | None = None) -> list[ModelFamily]:
    """The families whose denoiser class is the model's (its nearest class in the MRO that any family names) and
    whose config values it has; all of that class's when none has them (a model of another size)."""
    for cls in type(model).__mro__:
        found = [f for f in FAMILIES.values()
                 if f.denoiser_class == cls.__name__ and component in (None, f.denoiser)]
        if found:
            return [f for f in found if _fits_config(f, model)] or found
    return []


def _text_encoders(components: Mapping[str, Any]) -> set[str]:
    every = {te for f in FAMILIES.values() for te in f.text_encoders}
    return {c for c, m in components.items() if c in every and m is not None}


def closest(families: Iterable[ModelFamily], components: Mapping[str, Any]) -> tuple[ModelFamily, ...]:
    """Those of `families` whose text encoders are the components' most nearly: fewest of the components' missing,
    then fewest of their own absent (a tiny SD pipeline with one encoder is SD1.x or SD2.x, with two SDXL)."""
    present = _text_encoders(components)
    ranked = [((len(present - set(f.text_encoders)), len(set(f.text_encoders) - present)), f) for f in families]
    best = min((rank for rank, _ in ranked), default=None)
    return tuple(f for rank, f in ranked if rank == best)


def of_model(model: Any) -> ModelFamily | None:
    """The family of a denoiser (a UNet or a transformer; subclasses count), None for any other model. Families that
    share a class and whose config values the model does not have (a tiny UNet) give the first of them: they share
    everything read off the model alone (original-name tables, default targets)."""
    found = _by_denoiser(model)
    return found[0] if found else None


def candidates(components: Mapping[str, Any]) -> tuple[ModelFamily, ...]:
    """Every family a pipeline's components ({"unet" or "transformer": ..., "text_encoder": ...}) can be: by the
    denoiser's class and config, then by the text encoders (`closest`); () without a denoiser a family names."""
    for component in dict.fromkeys(f.denoiser for f in FAMILIES.values()):
        model = components.get(component)
        found = _by_denoiser(model, component) if model is not None else []
        if found:
            return closest(found, components)
    return ()


def of_components(components: Mapping[str, Any]) -> ModelFamily | None:
    """The family of a pipeline's components: the first of `candidates` (SD1.x for a tiny one-encoder UNet)."""
    found = candidates(components)
    return found[0] if found else None


def signs(kind: str) -> list[tuple[Sign, tuple[str, ...]]]:
    """(sign, the families holding it) for every sign of `Detection.<kind>` ("kind" or "base"), each once, in
    registry order."""
    holders: dict[Sign, list[str]] = {}
    for family in FAMILIES.values():
        for sign in getattr(family.detect, kind):
            holders.setdefault(sign, []).append(family.name)
    return [(sign, tuple(names)) for sign, names in holders.items()]


@functools.cache
def _kind_signs() -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
    # the most specific first: a sign naming one family is read before one naming several
    ordered = sorted(signs("kind"), key=lambda item: len(item[1]))
    return [(re.compile(s.pattern), s.words, frozenset(names)) for s, names in ordered]


def of_file(keys: Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
    """(the families a file can be for by its module names, in registry order; the evidence, in words). Each sign
    found narrows the candidates, unless it would leave none; every family when no name says anything. FLUX.1 and
    FLUX.2 share most original names: a file may fit both."""
    names: Sequence[str] = list(keys)
    left = frozenset(FAMILIES)
    evidence: list[str] = []
    for pattern, words, holders in _kind_signs():
        hit = next((k for k in names if pattern.search(k)), None)
        if hit is not None and left & holders:
            left &= holders
            evidence.append(f"{words} ({hit.rpartition('.')[0] or hit})")
    return tuple(f for f in FAMILIES if f in left), evidence
