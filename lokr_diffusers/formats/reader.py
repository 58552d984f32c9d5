"""Turn a LoKr state dict into per-module load entries, checked against the pipeline, before any change.

Every key ends up in exactly one place: a LoKr entry, the plain-LoRA part (handed to diffusers),
the ignored list (an A1111 `.scale`, which ComfyUI ignores too), or the unmatched list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import functional as LF
from ..config import LoKrConfig
from ..io import PEFT_CONFIG_KEY
from ..layers import LoKrLayer
from ..targeting import pattern_value
from .names import ModuleRef, NameIndex, weight_of

logger = logging.getLogger(__name__)

LOKR_SUFFIXES: tuple[str, ...] = (*LF.FACTOR_NAMES, "lokr_t1", "alpha", "dora_scale", "scale", "lokr_scale")
LORA_MARKERS: tuple[str, ...] = ("lora_down", "lora_up", "lora_mid", "lora_A", "lora_B")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoadEntry:
    """One module's adapter, ready to put in place."""

    ref: ModuleRef
    factors: dict[str, Tensor]
    scale: float
    plan: LF.LoKrPlan
    dora_scale: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


@dataclass
class ParsedFile:
    entries: list[LoadEntry]
    lora: dict[str, Tensor]  # plain LoRA modules, for diffusers' own loader
    unmatched: list[str]  # keys no module of the pipeline takes
    ignored: list[str]  # keys read and deliberately not used
    layout: str
    rule: str  # how scales were read: "consumer" (alpha / rank), "peft" (alpha / r), "exact" (stored)


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, tensor name) for a LoKr key, also PEFT's in-memory `<m>.lokr_w1.<adapter>`."""
    module, _, leaf = key.rpartition(".")
    if leaf in LOKR_SUFFIXES:
        return module, leaf
    module2, _, leaf2 = module.rpartition(".")
    if leaf2 in LF.FACTOR_NAMES and module2:
        return module2, leaf2
    return None


def _is_lora_key(key: str) -> bool:
    return any(f".{m}." in key or key.endswith(f".{m}") for m in LORA_MARKERS)


def group_modules(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor],
                                                                 list[str]]:
    """({module: {tensor name: tensor}} for LoKr modules, {key: tensor} of LoRA modules, other keys)."""
    groups: dict[str, dict[str, Tensor]] = {}
    lora_modules: set[str] = set()
    other: list[str] = []
    for key, tensor in state_dict.items():
        if _is_lora_key(key):
            lora_modules.add(key.split(".lora_")[0])
            continue
        split = split_key(key)
        if split is None:
            other.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    lora = {k: v for k, v in state_dict.items() if _is_lora_key(k)}
    for module in list(groups):  # alpha / dora_scale of a LoRA module belong to the LoRA part
        if module in lora_modules:
            if any(leaf in LF.FACTOR_NAMES for leaf in groups[module]):
                raise ValueError(f"module {module} holds both LoKr and LoRA tensors; a file must give it one")
            for leaf, tensor in groups.pop(module).items():
                lora[f"{module}.{leaf}"] = tensor
    return groups, lora, other


def parse_file(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str], index: NameIndex,
               layout: str) -> ParsedFile:
    """Match, validate and scale every LoKr module of the file; raise on a module that does not fit."""
    groups, lora, unmatched = group_modules(state_dict)
    peft_config = _peft_config(metadata)
    refs = _resolve_names(list(groups), index)
    entries: list[LoadEntry] = []
    ignored: list[str] = []
    for name, tensors in groups.items():
        keys = [f"{name}.{leaf}" for leaf in tensors]
        found = refs.get(name)
        factors = {k: v for k, v in tensors.items() if k in LF.FACTOR_NAMES}
        if found is None or not factors:
            unmatched += keys  # no such module, or an alpha / dora_scale with no factors
            continue
        if "scale" in tensors:
            ignored.append(f"{name}.scale")
        entries.append(_entry(name, found, tensors, factors, index, peft_config, keys))
    rule = "exact" if any("lokr_scale" in t for t in groups.values()) else \
        "peft" if peft_config is not None else "consumer"
    return ParsedFile(entries, lora, sorted(unmatched), ignored, layout, rule)


def _resolve_names(names: list[str], index: NameIndex) -> dict[str, ModuleRef]:
    """Module name -> slot. PEFT names (`base_model.model.<path>`) carry no component: the one whose
    paths take every such name wins (unet, then the text encoders)."""
    out: dict[str, ModuleRef] = {}
    peft = [n for n in names if n.startswith(PEFT_PREFIX)]
    if peft:
        paths = [n[len(PEFT_PREFIX):] for n in peft]
        fits = [c for c, mods in index.modules.items() if all(p in mods for p in paths)]
        if fits:
            if len(fits) > 1:
                logger.warning("PEFT keys fit %s; loading into %s", fits, fits[0])
            out.update({n: ModuleRef(fits[0], p) for n, p in zip(peft, paths, strict=True)})
    for name in names:
        if name not in out and (hit := index.lookup(name)) is not None:
            out[name] = hit[1]
    return out


def _entry(name: str, ref: ModuleRef, tensors: dict[str, Tensor], factors: dict[str, Tensor], index: NameIndex,
           peft_config: LoKrConfig | None, keys: list[str]) -> LoadEntry:
    if "lokr_t1" in tensors:
        raise ValueError(f"{name}: lokr_t1 (a Tucker W1) is written by no known trainer and is not supported")
    for leaf, t in tensors.items():
        if not torch.is_floating_point(t):
            raise TypeError(f"{name}.{leaf}: dtype {t.dtype} is not floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}.{leaf}: holds NaN or infinite values")
    module = index.modules[ref.component][ref.path]
    shape = module.weight_shape if isinstance(module, LoKrLayer) else tuple(weight_of(module).shape)
    try:
        plan = LF.plan_from_tensors(shape, factors)
        if "dora_scale" in tensors:
            LF.dora_on_output_axis(tensors["dora_scale"], shape)
    except ValueError as err:
        raise ValueError(f"{name} -> {ref.component}.{ref.path}: {err}") from None
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if "lokr_scale" in tensors:  # our own layout stores the scale itself
        scale = float(tensors["lokr_scale"])
    elif peft_config is not None:
        r = pattern_value(peft_config.rank_pattern, ref.path, peft_config.r)
        a = pattern_value(peft_config.alpha_pattern, ref.path, peft_config.alpha)
        scale, alpha = LF.peft_scale(a, r), float(a)
    else:
        scale = LF.consumer_scale(plan, alpha)
    return LoadEntry(ref, factors, scale, plan, tensors.get("dora_scale"), alpha, keys)


def _peft_config(metadata: Mapping[str, str]) -> LoKrConfig | None:
    raw = metadata.get(PEFT_CONFIG_KEY)
    if raw is None:
        return None
    data = json.loads(raw)
    if str(data.get("peft_type", "LOKR")).upper() != "LOKR":
        raise ValueError(f"adapter_config.json is for peft_type {data.get('peft_type')!r}, not LOKR")
    return LoKrConfig.from_dict(data)
