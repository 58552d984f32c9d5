"""Adapter files read onto the model they are for, without weights: the components of a diffusers folder built from
its configs (`model`), or the full-size model the first file's names and shapes fit (convert.fit), each module's
ΔW rebuilt from a file's factors. LoRA files are read by diffusers itself onto the pipeline (`lora_deltas`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .. import families
from .. import functional as LF
from ..formats.names import build_index, weight_of
from ..formats.reader import LoadEntry, ParsedFile, check_holds_lokr, group_modules, parse_loaded
from ..formats.report import unmatched_message
from ..io import read_lokr_file
from ..loaded import LoadedFile
from ..loader import split_file
from .weights import FolderWeights


@dataclass(frozen=True)
class Placed:
    """Files parsed onto one model: its components (meta device), family, and per file its one adapter's parse."""

    components: dict[str, nn.Module]
    family: families.ModelFamily
    parsed: list[ParsedFile]


def read_one_adapter(src: str | os.PathLike[str]) -> LoadedFile:
    """A LoKr file (any layout) holding one adapter."""
    file = read_lokr_file(src)
    try:
        check_holds_lokr(file.tensors)
    except ValueError as err:
        raise ValueError(file.named(str(err))) from None
    parts = split_file(file)
    if len(parts) > 1:
        raise ValueError(f"{os.fspath(src)} holds {len(parts)} adapters ({sorted(map(str, parts))}); give files of "
                         "one adapter each")
    return next(iter(parts.values()))


def holds_lora_only(src: str | os.PathLike[str]) -> bool:
    """A file of LoRA modules and no LoKr module (diffusers reads it, not this package's reader)."""
    groups, lora, _ = group_modules(read_lokr_file(src).tensors)
    return bool(lora) and not groups


def lora_deltas(model: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]]
                ) -> list[dict[tuple[str, str], Tensor]]:
    """Per LoRA file {(component, path): ΔW in fp32} as diffusers applies it: the pipeline folder `model` loaded
    (with its weights: diffusers' loader needs the modules), the file loaded by `load_lora_weights` (its converters
    for every LoRA layout it knows) and each PEFT LoRA layer's `get_delta_weight`, its alpha / rank scale included.
    A DoRA module raises (its magnitude normalises W + ΔW: no sum of changes holds it)."""
    from diffusers import DiffusionPipeline

    from ..components import pipeline_components

    pipe = DiffusionPipeline.from_pretrained(os.fspath(model))
    out = []
    for i, src in enumerate(sources):
        name = f"combine_lora_{i}"
        pipe.load_lora_weights(os.fspath(src), adapter_name=name)
        deltas: dict[tuple[str, str], Tensor] = {}
        for component, module in pipeline_components(pipe).items():
            for path, layer in module.named_modules():
                # PEFT's LoRA layers, by what they hold (peft is diffusers' dependency for LoRA, not ours)
                lora_a = getattr(layer, "lora_A", None)
                if not isinstance(lora_a, nn.ModuleDict) or name not in lora_a or \
                        not hasattr(layer, "get_delta_weight"):
                    continue
                if getattr(layer, "use_dora", {}).get(name):
                    raise ValueError(f"{os.fspath(src)}: {component}.{path} has DoRA, which does not add up (its "
                                     "magnitude normalises W + ΔW)")
                deltas[(component, path)] = layer.get_delta_weight(name).detach().float()
        if not deltas:
            raise ValueError(f"{os.fspath(src)}: diffusers' load_lora_weights loaded no module of it onto {model}")
        pipe.delete_adapters(name)
        out.append(deltas)
    return out


def place(sources: Sequence[str | os.PathLike[str]], model: str | os.PathLike[str] | None = None,
          base: str | None = None) -> Placed:
    """Every file parsed onto the components of `model` (a diffusers folder), or of the full-size model the first
    file fits (`base` names the family); a key that fits no module raises, naming the file. No files: the
    components of `model`."""
    from ..convert import candidate_models, fit, parse_for_base

    files = [read_one_adapter(s) for s in sources]
    if model is not None:
        folder = FolderWeights(model, "model")
        comps = {c: folder.meta_model(c) for c in folder.components()}
        index = build_index(comps)
        parsed = []
        for src, file in zip(sources, files, strict=True):
            p = parse_loaded(file, index)
            if p.unmatched:
                raise ValueError(f"{os.fspath(src)} (against {os.fspath(model)}): "
                                 f"{unmatched_message(p.unmatched, file.tensors, comps)}")
            parsed.append(p)
    else:
        variant, comps, first = fit(files[0], candidate_models(files[0], base))
        parsed = [next(iter(first.values()))]
        for file in files[1:]:
            _, by_adapter = parse_for_base(file, variant)
            parsed.append(next(iter(by_adapter.values())))
    family = families.of_components(comps)
    if family is None:
        raise ValueError(f"{os.fspath(sources[0] if sources else model or '')}: the model it is for is of no family "
                         "this package knows")
    return Placed(comps, family, parsed)


def weight_shape(entry: LoadEntry, comps: Mapping[str, nn.Module]) -> tuple[int, ...]:
    return tuple(weight_of(comps[entry.ref.component].get_submodule(entry.ref.path)).shape)


def entry_delta(entry: LoadEntry, comps: Mapping[str, nn.Module]) -> Tensor:
    """The module's ΔW = scale · W1 ⊗ W2 in fp32 (its rows of a fused original's)."""
    factors = {k: v.float() for k, v in entry.factors.items()}
    return LF.delta_weight(factors, weight_shape(entry, comps), entry.scale, entry.rows)


def refuse_dora(src: str | os.PathLike[str], entries: Sequence[LoadEntry], why: str) -> None:
    """Raise naming the first DoRA module of `src`: `why` says what cannot hold it."""
    dora = [e for e in entries if e.dora_scale is not None]
    if dora:
        raise ValueError(f"{os.fspath(src)}: {len(dora)} modules have DoRA (e.g. {dora[0].ref.component}."
                         f"{dora[0].ref.path}); {why}")
