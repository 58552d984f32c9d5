"""LoKr on diffusers pipelines: load, weight, fuse, disable, delete and unload adapters by name.

These functions take the pipeline first and are attached to `DiffusionPipeline` as methods on
`import lokr_diffusers` (see `attach`). A pipeline's LoKr adapters live in its components (unet,
text_encoder, text_encoder_2), in place: the components keep their classes. What a load does beside diffusers' own
LoRA machinery (a mixed file's LoRA part, offload hooks) is diffusers_lora.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from . import commits, scaling
from . import functional as LF
from . import state as S
from . import weights as W
from .commits import commit_all
from .components import pipeline_components
from .config import LoKrConfig
from .diffusers_lora import load_lora_part, lora_names, offloading_paused
from .formats.names import COMPONENTS, build_index, get_slot
from .formats.ours import split_adapters
from .formats.reader import LoadEntry, ParsedFile, parse_loaded
from .formats.report import base_hint, unmatched_message
from .io import detect_layout, read_lokr_file
from .layers import Conv1d, Conv2d, Linear, LoKrLayer, check_adapter_name
from .loaded import LoadedFile
from .logs import pipeline_disable, progress, warn_once
from .model import (
    ENABLED_ATTR,
    adapter_configs,
    component_enabled,
    lokr_layers,
    named_lokr_layers,
    registered_adapters,
    remove_layers,
    set_enabled,
)
from .transaction import all_or_nothing

logger = logging.getLogger(__name__)

WRAPPERS: dict[type[nn.Module], type[LoKrLayer]] = {nn.Linear: Linear, nn.Conv1d: Conv1d, nn.Conv2d: Conv2d}


def wrapper_for(module: nn.Module) -> type[LoKrLayer]:
    """The LoKr layer class for a module: by its type, or a base type of it (diffusers' GGUFLinear and
    bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses)."""
    found = WRAPPERS.get(type(module))
    if found is None:
        found = next(w for t, w in WRAPPERS.items() if isinstance(module, t))
    return found
PathOrDict = str | os.PathLike[str] | dict[str, Tensor] | LoadedFile
AdapterWeight = float | Mapping[str, Any]


# ------------------------------------------------------------------------------------------- load
def load_lokr_weights(pipe: Any, pretrained_model_name_or_path_or_dict: PathOrDict, adapter_name: str | None = None,
                      weight_name: str | None = None, strict: bool = True, hotswap: bool = False,
                      **kwargs: Any) -> str | list[str]:
    """Load a LoKr file of any known layout into the pipeline as adapter `adapter_name`.

    Args:
        pretrained_model_name_or_path_or_dict: a .safetensors file, a folder (PEFT layout or one
            .safetensors), a hub repo id, a state dict, or a LoadedFile (`io.read_lokr_file`).
        adapter_name: default "default_N", unique.
        weight_name: the file inside a folder or repo.
        strict: unmatched keys raise (default); False warns and loads the rest.
        hotswap: replace the tensors of the loaded adapter `adapter_name` in place by the file's
            (same modules, same shapes; diffusers' `hotswap=True`): a compiled model sees new values,
            no new parameters.
        kwargs: `load_into_transformer_2=True` loads the file's transformer modules into `transformer_2` (Wan 2.2
            A14B's low-noise expert; one file per expert, as diffusers' WanLoraLoaderMixin), `subfolder` and hub
            arguments (revision, token, cache_dir, ...).
    Returns the adapter name (the names, for a file of ours holding several). On any error the
    pipeline is exactly as before.
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    subfolder = kwargs.pop("subfolder", None)
    into_2 = bool(kwargs.pop("load_into_transformer_2", False))
    file = read_lokr_file(pretrained_model_name_or_path_or_dict, weight_name, subfolder, **kwargs)
    comps = loading_components(pipe, into_2)
    other = [m for c, m in pipeline_components(pipe).items() if m not in comps.values()]  # the other expert
    names_in_use = [*lora_names(pipe), *(n for m in other for n in registered_adapters(m))]
    plans = _plan_load(file, comps, adapter_name, strict, names_in_use, hotswap)
    if hotswap:
        name, parsed = plans[0]
        _hotswap(comps, parsed.entries, name)
        logger.info("hot-swapped LoKr %r: %d modules", name, len(parsed.entries))
        return name
    with offloading_paused(pipe), all_or_nothing(comps.values(), [pipe]):
        for name, parsed in plans:
            _inject(comps, parsed.entries, name, pipeline_disable(pipe))
            if parsed.lora:
                load_lora_part(pipe, parsed.lora, name)
        attach_call_scale(pipe, comps)
    for name, parsed in plans:
        logger.info("loaded LoKr %r: %d modules (%s layout, %s scale rule)", name, len(parsed.entries),
                    parsed.layout, parsed.rule)
    return plans[0][0] if len(plans) == 1 else [n for n, _ in plans]


def loading_components(pipe: Any, into_transformer_2: bool = False) -> dict[str, nn.Module]:
    """The components a file loads into, by the names its keys use: the second expert `transformer_2` stands in
    the `transformer` slot when asked for (diffusers' load_into_transformer_2), and is left out otherwise (its
    modules have the first expert's names)."""
    comps = pipeline_components(pipe)
    second = comps.pop("transformer_2", None)
    if into_transformer_2:
        if second is None:
            raise ValueError(f"load_into_transformer_2=True, but {type(pipe).__name__} has no transformer_2")
        comps["transformer"] = second
    if not comps:
        raise ValueError(f"{type(pipe).__name__} has none of the components {COMPONENTS} that LoKr adapts")
    return comps


def _plan_load(file: LoadedFile, comps: dict[str, nn.Module], adapter_name: str | None, strict: bool,
               lora_names: Sequence[str] = (), hotswap: bool = False) -> list[tuple[str, ParsedFile]]:
    """Name, parse and check every adapter of the file against the pipeline; nothing changes here."""
    groups = split_file(file)
    if len(groups) > 1 and (adapter_name is not None or hotswap):
        raise ValueError(f"this file holds {len(groups)} adapters {list(groups)}; load it without adapter_name "
                         "and hotswap")
    index = build_index(comps)
    lokr = {n for m in comps.values() for n in registered_adapters(m)}
    taken = lokr | set(lora_names)
    if hotswap and adapter_name not in lokr:
        raise ValueError(f"hotswap=True replaces a loaded LoKr adapter: pass its adapter_name (loaded: "
                         f"{sorted(lokr)})")
    plans: list[tuple[str, ParsedFile]] = []
    for stored_name, part in groups.items():
        name = adapter_name or stored_name or default_name(taken)
        if name in taken and not hotswap:
            what = "a LoRA adapter" if name in lora_names else "an adapter"
            raise ValueError(f"{what} named {name!r} is already loaded; pick another adapter_name or delete it "
                             "first")
        taken.add(name)
        try:
            parsed = parse_loaded(part, index)
        except ValueError as err:
            raise ValueError(f"{err}.{base_hint(part.tensors, comps)}") from None
        _report(parsed, part.tensors, comps, strict)
        if not parsed.entries:
            what = f"only {len(parsed.lora)} plain LoRA keys: load it with pipe.load_lora_weights" if parsed.lora \
                else f"{len(part.tensors)} keys, layout {file.layout}"
            raise ValueError(f"no LoKr modules in this file ({what})")
        plans.append((name, parsed))
    return plans


def attach_call_scale(pipe: Any, comps: Mapping[str, nn.Module]) -> None:
    """diffusers' per-call scale reaches the LoKr layers of these components (scaling.py)."""
    for model in comps.values():
        scaling.install(model)
    scaling.wrap_encode_prompt(pipe)


def split_file(file: LoadedFile) -> dict[str | None, LoadedFile]:
    """{adapter name: its part of the file} for our multi-adapter layout (formats/ours.py, told by the
    keys), else {None: the file}. Each part keeps the file's metadata, source and config."""
    groups = split_adapters(file.tensors, file.metadata, file.path)
    if None in groups:
        return {None: file}
    return {name: replace(file, tensors=sd, layout=detect_layout(sd)) for name, sd in groups.items()}


def default_name(taken: set[str] | Sequence[str]) -> str:
    """diffusers' naming ("default_<number of adapters>"), skipping names in use by LoKr or LoRA."""
    i = len(taken)
    while f"default_{i}" in taken:
        i += 1
    return f"default_{i}"


def _report(parsed: ParsedFile, state_dict: Mapping[str, Tensor], comps: Mapping[str, nn.Module],
            strict: bool) -> None:
    if parsed.ignored:
        logger.warning("ignored %d `.scale` keys (ComfyUI ignores them too): %s", len(parsed.ignored),
                       parsed.ignored[:3])
    if parsed.unmatched:
        message = unmatched_message(parsed.unmatched, state_dict, comps)
        if strict:
            raise ValueError(message + " (strict=False loads the rest)")
        logger.warning(message)


def _inject(comps: Mapping[str, nn.Module], entries: Sequence[LoadEntry], adapter_name: str,
            disable: bool | None = None) -> None:
    """Put every entry in place, register the adapter and activate it beside the active ones (the
    caller rolls back on error)."""
    shared: dict[tuple[int, ...], dict[str, Tensor]] = {}  # the file's tensors -> Parameters (a fused module's pieces)
    for e in progress(entries, desc=f"loading LoKr {adapter_name!r}", disable=disable):
        parent, attr = get_slot(comps[e.ref.component], e.ref.path)
        current = getattr(parent, attr)
        if isinstance(current, LoKrLayer):
            layer = current
        else:
            layer = wrapper_for(current)(current)
            layer.enable_adapters(component_enabled(comps[e.ref.component]))
        w = layer.weight
        dtype = w.dtype if w.dtype == torch.float64 else torch.float32  # factors in fp32 at least
        key = tuple(id(t) for t in e.factors.values())
        tensors = shared.get(key) if e.rows is not None else None
        if tensors is None or any(t.device != w.device for t in tensors.values()):
            # copies: the layer must never share storage with the caller's state dict; Parameters, so that
            # the pieces of a fused module (formats/fused.py) register the same ones (one set of factors)
            tensors = {k: nn.Parameter(v.to(device=w.device, dtype=dtype, copy=True), requires_grad=False)
                       for k, v in e.factors.items()}
            shared[key] = tensors
        dora = e.dora_scale.to(device=w.device, dtype=dtype, copy=True) if e.dora_scale is not None else None
        layer.set_adapter_tensors(adapter_name, dict(tensors), e.scale, r=e.plan.rank or None, alpha=e.alpha,
                                  dora_scale=dora, rows=e.rows, origin=e.origin)
        if layer is not current:
            setattr(parent, attr, layer)
    for name, model in comps.items():
        paths = [e.ref.path for e in entries if e.ref.component == name]
        if not paths:
            continue
        ranks = [e.plan.rank for e in entries if e.ref.component == name and e.plan.rank]
        adapter_configs(model)[adapter_name] = LoKrConfig(r=max(ranks, default=1), target_modules=paths,
                                                          inference_mode=True)
        active = [*active_adapters(model), adapter_name]
        for _, layer in lokr_layers(model):
            layer.set_adapter(active)


def _hotswap(comps: Mapping[str, nn.Module], entries: Sequence[LoadEntry], adapter_name: str) -> None:
    """Copy the file's tensors into the loaded adapter's, in place. Checked first: the file covers
    exactly the adapter's modules, each tensor matches in name and shape, nothing is fused."""
    held = {(c, path.replace(".base_layer", "")) for c, m in comps.items() for path, layer in lokr_layers(m)
            if adapter_name in layer.plans}
    given = {(e.ref.component, e.ref.path) for e in entries}
    if held != given:
        extra, missing = sorted(given - held)[:3], sorted(held - given)[:3]
        raise ValueError(f"hotswap of {adapter_name!r} needs a file for the same modules: the file adds {extra} and "
                         f"lacks {missing} (a different set of modules cannot be swapped in place; load it as a new "
                         "adapter)")
    plan: list[tuple[LoKrLayer, LoadEntry]] = []
    for e in entries:
        parent, attr = get_slot(comps[e.ref.component], e.ref.path)
        layer = getattr(parent, attr)
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is fused; unfuse it before a hotswap")
        now = layer.adapter_tensors(adapter_name)
        new = {**e.factors, **({"dora_scale": e.dora_scale} if e.dora_scale is not None else {})}
        shapes_now = {k: tuple(v.shape) for k, v in now.items()}
        shapes_new = {k: tuple(v.shape) for k, v in new.items()}
        if shapes_now != shapes_new:
            raise ValueError(f"hotswap of {adapter_name!r}: {e.ref.component}.{e.ref.path} holds {shapes_now}, the "
                             f"file {shapes_new}; LoKr tensors can only be swapped in place at equal shapes")
        plan.append((layer, e))
    with torch.no_grad():
        for layer, e in plan:
            new = {**e.factors, **({"dora_scale": e.dora_scale} if e.dora_scale is not None else {})}
            for k, t in layer.adapter_tensors(adapter_name).items():
                t.copy_(new[k])
            layer.set_scale(adapter_name, e.scale, e.alpha)  # bumps the version: anything cached is rebuilt


# ------------------------------------------------------------------------------------ adapters
# Every function below is a transition of the layers' states (state.py, docs/adapters.md): the
# arguments are checked and every layer's new state is computed before any layer changes.
def active_adapters(model: nn.Module) -> list[str]:
    """The component's active adapters, in activation order."""
    out: list[str] = []
    for _, layer in lokr_layers(model):
        out += [a for a in layer.active_adapters if a not in out]
    return out


def get_list_lokr_adapters(pipe: Any) -> dict[str, list[str]]:
    """{component: [adapter names]} for the components holding LoKr adapters."""
    return {c: registered_adapters(m) for c, m in pipeline_components(pipe).items() if registered_adapters(m)}


def get_active_lokr_adapters(pipe: Any) -> list[str]:
    out: list[str] = []
    for model in pipeline_components(pipe).values():
        out += [a for a in active_adapters(model) if a not in out]
    return out


def _names(adapter_names: str | Sequence[str], comps: Mapping[str, nn.Module], what: str) -> list[str]:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what}: adapter names must be strings, got {names!r}")
    known = {n for m in comps.values() for n in registered_adapters(m)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown LoKr adapters {unknown}; loaded: {sorted(known)}")
    return names


def component_weights(names: list[str], adapter_weights: Any, comps: Mapping[str, nn.Module]
                       ) -> dict[str, dict[str, W.Spec]]:
    """{component: {adapter: weight spec}} from one value, a {component: value} dict, or a list of
    either (one per adapter); a value is a number or per-block / per-module weights (weights.py); a
    component missing from a dict gets 1.0. Every value is checked."""
    if adapter_weights is None or isinstance(adapter_weights, (int, float, Mapping)):
        weights: list[Any] = [adapter_weights] * len(names)
    elif isinstance(adapter_weights, (list, tuple)):
        weights = list(adapter_weights)
    else:
        raise TypeError(f"adapter_weights must be a number, a {{component: number}} dict or a list of them, "
                        f"got {type(adapter_weights).__name__}")
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} adapter_weights")
    out: dict[str, dict[str, W.Spec]] = {c: {} for c in comps}
    for n, w in zip(names, weights, strict=True):
        if isinstance(w, Mapping):
            unknown = [c for c in w if c not in comps]
            if unknown:
                raise ValueError(f"adapter_weights for {n!r} name components {unknown}; "
                                 f"this pipeline has {list(comps)}")
            for c, model in comps.items():
                out[c][n] = W.expand(model, w.get(c), f"adapter_weights[{n!r}][{c!r}]")
        else:
            for c, model in comps.items():
                out[c][n] = W.expand(model, w, f"adapter_weights for {n!r}")
    negative = sorted({n for per in out.values() for n, spec in per.items() if W.is_negative(spec)})
    if negative:
        warn_once(logger, f"negative weights for adapters {negative}: they are subtracted, as ComfyUI and A1111 do "
                          "with a negative strength")
    return out


def plan_set_adapters(comps: Mapping[str, nn.Module], names: list[str],
                      per_component: Mapping[str, Mapping[str, W.Spec]]) -> list[tuple[LoKrLayer, S.LayerState]]:
    """Every layer's new state when only `names` are active, at these weights (nothing changes)."""
    changes = []
    for c, model in comps.items():
        for path, layer in lokr_layers(model):
            new = S.activate(layer.state, names)
            for n, spec in per_component.get(c, {}).items():
                if n in layer.plans:
                    new = S.set_weight(new, n, W.for_layer(spec, path))
            changes.append((layer, new))
    return changes


def set_lokr_adapters(pipe: Any, adapter_names: str | list[str],
                      adapter_weights: AdapterWeight | Sequence[AdapterWeight] | None = None) -> None:
    """Activate these adapters (only these) with strengths: per adapter one number, or a
    {component: number or per-block dict} dict (diffusers' forms, weights.py), or one for all; a
    component missing from a dict gets 1.0. Fused adapters keep the strength they were fused at
    until unfused."""
    comps = pipeline_components(pipe)
    names = _names(adapter_names, comps, "set_lokr_adapters")
    commit_all(plan_set_adapters(comps, names, component_weights(names, adapter_weights, comps)))


def fuse_lokr(pipe: Any, lokr_scale: float = 1.0, components: Sequence[str] | None = None,
              adapter_names: list[str] | None = None, safe_fusing: bool = False, requantize: bool = False) -> None:
    """Fuse the active (or given) adapters into the weights at lokr_scale · their weight.
    `unfuse_lokr` restores the original weights bit for bit. All-or-nothing: an adapter already
    fused at another strength, or (safe_fusing) a non-finite weight anywhere, changes nothing.
    A quantized weight (GGUF, torchao, bitsandbytes, fp8 storage) refuses unless `requantize`:
    dequantize, add, quantize again, with rounding error (docs/adapters.md §Quantized base layers)."""
    lokr_scale = S.check_strength(lokr_scale, "lokr_scale")
    if lokr_scale < 0:
        warn_once(logger, f"lokr_scale {lokr_scale:g} is negative: the adapters are subtracted from the weights")
    selected = _selected(pipe, components)
    if adapter_names is not None:
        adapter_names = _names(adapter_names, pipeline_components(pipe), "fuse_lokr")
    commits.fuse(named_lokr_layers(selected), adapter_names, lokr_scale, safe=safe_fusing, requantize=requantize,
                 disable=pipeline_disable(pipe))
    logger.info("fused LoKr adapters into %s", list(selected))


def unfuse_lokr(pipe: Any, components: Sequence[str] | None = None) -> None:
    """Take every fused adapter out of the weights of these (default: all) components."""
    commits.unfuse(named_lokr_layers(_selected(pipe, components)), disable=pipeline_disable(pipe))


def enable_lokr(pipe: Any) -> None:
    for model in pipeline_components(pipe).values():
        set_enabled(model, True)


def disable_lokr(pipe: Any) -> None:
    """The pipeline computes without LoKr (fused adapters leave the weights) until enable_lokr."""
    for model in pipeline_components(pipe).values():
        set_enabled(model, False)


def delete_lokr_adapters(pipe: Any, adapter_names: str | list[str]) -> None:
    """Remove adapters everywhere; a fused one leaves the weights (the others stay fused at their
    strengths); a layer left with none gives its slot back to the base layer."""
    comps = pipeline_components(pipe)
    names = _names(adapter_names, comps, "delete_lokr_adapters")
    for model in comps.values():
        delete_from_model(model, names)


def delete_from_model(model: nn.Module, names: Sequence[str]) -> None:
    registry = adapter_configs(model)
    for _, layer in lokr_layers(model):
        for n in names:
            if n in layer.plans:
                layer.delete_adapter(n)
    for n in names:
        registry.pop(n, None)
    remove_layers(model, only_empty=True)


def unload_lokr_weights(pipe: Any) -> None:
    """Remove every LoKr layer. Fused adapters stay in the weights (as diffusers' unload_lora_weights
    after fuse_lora); otherwise the components are exactly as before loading."""
    for model in pipeline_components(pipe).values():
        unload_from_model(model)


def forget_disabled(pipe: Any) -> None:
    """Drop a `disable_lokr` left on components that hold no LoKr layer (diffusers' unload_lora_weights of a
    pipeline with LoRA only): LoKr loaded after an unload starts enabled, as a fresh pipeline's would."""
    for model in pipeline_components(pipe).values():
        model.__dict__.pop(ENABLED_ATTR, None)


def unload_from_model(model: nn.Module) -> None:
    remove_layers(model, keep_merged=True)
    scaling.uninstall(model)


def set_lokr_device(pipe: Any, adapter_names: str | list[str], device: torch.device | str | int) -> None:
    """Move these adapters' tensors to `device` (diffusers' set_lora_device): e.g. park adapters not
    in use on the CPU. A layer whose active adapter sits on another device than its input fails in
    forward, as with LoRA; move it back before use. Fused adapters are in the weights already."""
    comps = pipeline_components(pipe)
    names = _names(adapter_names, comps, "set_lokr_device")
    for model in comps.values():
        for _, layer in lokr_layers(model):
            for n in names:
                for store in (*(getattr(layer, f) for f in LF.FACTOR_NAMES), layer.dora_scale):
                    if n in store:
                        p = store[n]
                        moved = p.data.to(device)
                        if torch._has_compatible_shallow_copy_type(p.data, moved):
                            p.data = moved  # the same Parameter: an optimizer holding it keeps it
                        else:  # e.g. to or from "meta"
                            store[n] = nn.Parameter(moved, requires_grad=p.requires_grad)
            layer.commit(layer.state)  # same state, new version: what a forward kept is rebuilt


def _selected(pipe: Any, names: Sequence[str] | None) -> dict[str, nn.Module]:
    comps = pipeline_components(pipe)
    if names is None:
        return comps
    if isinstance(names, str):
        names = [names]
    missing = [n for n in names if n not in comps]
    if missing:
        raise ValueError(f"unknown components {missing}; this pipeline has {list(comps)}")
    return {n: comps[n] for n in names}
