"""diffusers' own adapter methods, extended to LoKr adapters.

Mechanism: wrappers over diffusers' methods (installed by hooks.py through patches.py), not LoKr
layers posing as PEFT's. Each call splits the adapter names it is given into LoKr adapters (held by
our layers) and LoRA adapters (diffusers' PEFT layers), checks the whole call first, applies the
LoKr part with the same transitions as the explicit `pipe.*_lokr*` methods (state.py) and the LoRA
part with diffusers' own method, and undoes the LoKr part if diffusers raises. A name can be both: a
mixed file's LoRA modules are loaded by diffusers under the LoKr adapter's name. A pipeline without
LoKr adapters takes diffusers' path untouched; one without LoRA never needs PEFT.

While a pipeline-level method runs diffusers' code, the model-level wrappers it reaches
(`unet.set_adapters`, ...) call straight through (`patches.bypassed`): the pipeline level already
did the LoKr part. docs/adapters.md §diffusers' adapter methods lists what each method does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from torch import nn

from . import commits, diffusers_lora, loader, patches
from . import state as S
from . import weights as W
from .commits import commit_all
from .logs import pipeline_disable
from .model import lokr_layers, named_lokr_layers, registered_adapters, set_enabled

logger = logging.getLogger(__name__)
Method = Callable[..., Any]


# ------------------------------------------------------------------------------------- helpers
def _model_lora(model: nn.Module) -> list[str]:
    if not getattr(model, "_hf_peft_config_loaded", False):
        return []
    return list(getattr(model, "peft_config", {}) or {})


def _lokr_names(comps: Mapping[str, nn.Module]) -> list[str]:
    out: list[str] = []
    for model in comps.values():
        out += [n for n in registered_adapters(model) if n not in out]
    return out


def _as_list(names: str | Sequence[str], what: str) -> list[str]:
    out = [names] if isinstance(names, str) else list(names)
    if not all(isinstance(n, str) for n in out):
        raise TypeError(f"{what}: adapter names must be strings, got {out!r}")
    return out


def _split(names: list[str], lokr: Sequence[str], lora: Sequence[str]) -> tuple[list[str], list[str]]:
    """(LoKr names, LoRA names) among `names`; a name that is neither raises as diffusers does."""
    unknown = [n for n in names if n not in lokr and n not in lora]
    if unknown:
        present = sorted({*lokr, *lora})
        raise ValueError(f"Adapter name(s) {unknown} not in the list of present adapters: {present}.")
    return [n for n in names if n in lokr], [n for n in names if n in lora]


def _per_adapter(names: list[str], weights: Any) -> list[Any]:
    out = weights if isinstance(weights, list) else [weights] * len(names)
    if len(out) != len(names):
        raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of the weights {len(out)}")
    return out


def _components(pipe: Any, components: list[str] | None, comps: Mapping[str, nn.Module]) -> list[str]:
    """fuse_lora / unfuse_lora's `components`, checked as diffusers checks them."""
    out = list(components or [])
    if not out:
        raise ValueError("`components` cannot be an empty list.")
    loadable = list(getattr(pipe, "_lora_loadable_modules", comps))
    for c in out:
        if c not in loadable:
            raise ValueError(f"{c} is not found in self._lora_loadable_modules={loadable}.")
    return out


def _sync_merged(pipe: Any, deleted: Collection[str] = ()) -> None:
    """diffusers' `_merged_adapters` (what `pipe.fused_loras` lists), derived here only: what diffusers'
    own method left there for its LoRA adapters, less the `deleted` adapters, plus every LoKr adapter
    fused in any component."""
    lokr = {n for m in loader.pipeline_components(pipe).values() for _, layer in lokr_layers(m)
            for n in layer.merged_adapters}
    pipe._merged_adapters = (set(getattr(pipe, "_merged_adapters", set())) - set(deleted)) | lokr


def _selected(comps: Mapping[str, nn.Module], components: list[str]) -> dict[str, nn.Module]:
    """The components of a fuse_lora / unfuse_lora call that hold LoKr layers, in the call's order."""
    return {c: comps[c] for c in components if c in comps}


# -------------------------------------------------------------------------------- pipeline level
def get_list_adapters(original: Method) -> Method:
    @functools.wraps(original)
    def get_list_adapters(self: Any) -> dict[str, list[str]]:
        lokr = loader.get_list_lokr_adapters(self)
        if not lokr:
            return original(self)
        out = diffusers_lora.lora_adapters(self)
        for c, names in lokr.items():
            out[c] = [*out.get(c, []), *[n for n in names if n not in out.get(c, [])]]
        return out

    return patches.wraps(get_list_adapters, original)


def get_active_adapters(original: Method) -> Method:
    @functools.wraps(original)
    def get_active_adapters(self: Any) -> list[str]:
        lokr = loader.get_active_lokr_adapters(self)
        if not loader.get_list_lokr_adapters(self):
            return original(self)
        lora = original(self) if any(diffusers_lora.lora_adapters(self).values()) else []
        return [*lora, *[n for n in lokr if n not in lora]]

    return patches.wraps(get_active_adapters, original)


def set_adapters(original: Method) -> Method:
    @functools.wraps(original)
    def set_adapters(self: Any, adapter_names: str | list[str], adapter_weights: Any = None) -> Any:
        comps = loader.pipeline_components(self)
        lokr = _lokr_names(comps)
        if not lokr:
            return original(self, adapter_names, adapter_weights)
        names = _as_list(adapter_names, "set_adapters")
        weights = _per_adapter(names, adapter_weights)
        lora_lists = diffusers_lora.lora_adapters(self)
        ours, theirs = _split(names, lokr, [n for v in lora_lists.values() for n in v])
        kept = [(n, w) for n, w in zip(names, weights, strict=True) if n in ours]
        per_component = loader.component_weights([n for n, _ in kept], [_only(w, comps) for _, w in kept], comps)
        changes = loader.plan_set_adapters(comps, ours, per_component)

        def lora_part() -> Any:
            if not any(lora_lists.values()):
                return None
            if not theirs:  # diffusers' set_adapters cannot take an empty list: deactivate its layers here
                from diffusers.utils.peft_utils import set_weights_and_activate_adapters

                for c in lora_lists:
                    set_weights_and_activate_adapters(getattr(self, c), [], [])
                return None
            lora_weights = [w for n, w in zip(names, weights, strict=True) if n in theirs]
            with patches.bypassed():
                return original(self, theirs, lora_weights)

        return commit_all(changes, then=lora_part)

    return patches.wraps(set_adapters, original)


def _only(weight: Any, comps: Mapping[str, nn.Module]) -> Any:
    """A {component: value} weight without the components that hold no LoKr layer (diffusers warns
    about those and ignores them; loader.component_weights would refuse them)."""
    if isinstance(weight, Mapping):
        return {c: v for c, v in weight.items() if c in comps}
    return weight


def fuse_lora(original: Method) -> Method:
    @functools.wraps(original)
    def fuse_lora(self: Any, components: list[str] | None = None, lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        comps = loader.pipeline_components(self)
        lokr = _lokr_names(comps)
        if not lokr or patches.is_bypassed():
            return original(self, components, lora_scale, safe_fusing, adapter_names, **kwargs)
        requantize = bool(kwargs.pop("requantize", False))  # ours: quantized bases (quantized.py)
        components = _components(self, components, comps)
        scale = S.check_strength(lora_scale, "lora_scale")
        lora_lists = diffusers_lora.lora_adapters(self)
        if adapter_names is None:
            ours: list[str] | None = None
            theirs: list[str] | None = None
        else:
            ours, theirs = _split(_as_list(adapter_names, "fuse_lora"), lokr, [n for v in lora_lists.values()
                                                                                for n in v])

        def lora_part() -> Any:
            if theirs == [] or not any(lora_lists.values()):
                return None
            with patches.bypassed():
                return original(self, components, lora_scale, safe_fusing, theirs, **kwargs)

        layers = [] if ours == [] else named_lokr_layers(_selected(comps, components))
        result = commits.fuse(layers, ours, scale, safe=safe_fusing, requantize=requantize,
                              disable=pipeline_disable(self), then=lora_part)
        _sync_merged(self)
        return result

    return patches.wraps(fuse_lora, original)


def unfuse_lora(original: Method) -> Method:
    @functools.wraps(original)
    def unfuse_lora(self: Any, components: list[str] | None = None, **kwargs: Any) -> Any:
        comps = loader.pipeline_components(self)
        if not _lokr_names(comps) or patches.is_bypassed():
            return original(self, components, **kwargs)
        components = _components(self, components, comps)

        def lora_part() -> Any:
            with patches.bypassed():
                return original(self, components, **kwargs)

        result = commits.unfuse(named_lokr_layers(_selected(comps, components)), disable=pipeline_disable(self),
                                then=lora_part)
        _sync_merged(self)
        return result

    return patches.wraps(unfuse_lora, original)


def _pipeline_switch(enabled: bool) -> Callable[[Method], Method]:
    def make(original: Method) -> Method:
        @functools.wraps(original)
        def method(self: Any) -> Any:
            comps = loader.pipeline_components(self)
            if not _lokr_names(comps) or patches.is_bypassed():
                return original(self)
            result = None
            if any(diffusers_lora.lora_adapters(self).values()):
                with patches.bypassed():
                    result = original(self)
            for model in comps.values():
                set_enabled(model, enabled)
            return result

        return patches.wraps(method, original)

    return make


disable_lora = _pipeline_switch(False)
enable_lora = _pipeline_switch(True)


def delete_adapters(original: Method) -> Method:
    @functools.wraps(original)
    def delete_adapters(self: Any, adapter_names: str | list[str]) -> Any:
        comps = loader.pipeline_components(self)
        lokr = _lokr_names(comps)
        if not lokr or patches.is_bypassed():
            return original(self, adapter_names)
        names = _as_list(adapter_names, "delete_adapters")
        lora = [n for v in diffusers_lora.lora_adapters(self).values() for n in v]
        result = _delete(original, self, names, lokr, lora, lambda ours: loader.delete_lokr_adapters(self, ours))
        if getattr(self, "_merged_adapters", None):  # diffusers' delete leaves an empty mirror as it is
            _sync_merged(self, deleted=names)
        return result

    return patches.wraps(delete_adapters, original)


def unload_lora_weights(original: Method) -> Method:
    @functools.wraps(original)
    def unload_lora_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
        if patches.is_bypassed():
            return original(self, *args, **kwargs)
        comps = loader.pipeline_components(self)
        has_lokr = any(True for m in comps.values() for _ in lokr_layers(m)) or _lokr_names(comps)
        result = None
        if not has_lokr or any(diffusers_lora.lora_adapters(self).values()):
            with diffusers_lora.layers_stepped_aside(self), patches.bypassed():
                result = original(self, *args, **kwargs)
        if has_lokr:
            loader.unload_lokr_weights(self)
        else:  # LoRA only: still, nothing of a disable_lokr outlives the unload
            loader.forget_disabled(self)
        return result

    return patches.wraps(unload_lora_weights, original)


def set_lora_device(original: Method) -> Method:
    @functools.wraps(original)
    def set_lora_device(self: Any, adapter_names: list[str], device: Any) -> Any:
        comps = loader.pipeline_components(self)
        lokr = _lokr_names(comps)
        if not lokr or patches.is_bypassed():
            return original(self, adapter_names, device)
        names = _as_list(adapter_names, "set_lora_device")
        ours, theirs = _split(names, lokr, [n for v in diffusers_lora.lora_adapters(self).values() for n in v])
        result = None
        if theirs:
            with patches.bypassed():
                result = original(self, theirs, device)
        loader.set_lokr_device(self, ours, device)
        return result

    return patches.wraps(set_lora_device, original)


PIPELINE_METHODS: dict[str, Callable[[Method], Method]] = {
    "get_list_adapters": get_list_adapters,
    "get_active_adapters": get_active_adapters,
    "set_adapters": set_adapters,
    "fuse_lora": fuse_lora,
    "unfuse_lora": unfuse_lora,
    "disable_lora": disable_lora,
    "enable_lora": enable_lora,
    "delete_adapters": delete_adapters,
    "unload_lora_weights": unload_lora_weights,
    "set_lora_device": set_lora_device,
}


# ----------------------------------------------------------------------------------- model level
# diffusers' PeftAdapterMixin (unet.set_adapters, ...): the same split on one model. PEFT's methods
# raise "No adapter loaded" on a model without LoRA; then only the LoKr part runs.
def _model_call(original: Method, name: str, lokr_part: Callable[..., Any], *, needs_lora: bool = True) -> Method:
    @functools.wraps(original)
    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if patches.is_bypassed() or not registered_adapters(self):
            return original(self, *args, **kwargs)
        return lokr_part(self, original, *args, **kwargs)

    method.__name__ = name
    return patches.wraps(method, original)


def _model_set_adapters(model: nn.Module, original: Method, adapter_names: str | list[str],
                        weights: Any = None) -> Any:
    names = _as_list(adapter_names, "set_adapters")
    per = _per_adapter(names, weights)
    lora = _model_lora(model)
    ours, theirs = _split(names, registered_adapters(model), lora)
    specs = {n: W.expand(model, w, f"weights for {n!r}") for n, w in zip(names, per, strict=True) if n in ours}
    changes = loader.plan_set_adapters({"model": model}, ours, {"model": specs})

    def lora_part() -> Any:
        if not lora:
            return None
        with patches.bypassed():
            return original(model, theirs, [w for n, w in zip(names, per, strict=True) if n in theirs])

    return commit_all(changes, then=lora_part)


def _model_set_adapter(model: nn.Module, original: Method, adapter_name: str | list[str]) -> Any:
    names = _as_list(adapter_name, "set_adapter")
    lora = _model_lora(model)
    ours, theirs = _split(names, registered_adapters(model), lora)
    changes = [(layer, S.activate(layer.state, ours)) for _, layer in lokr_layers(model)]

    def lora_part() -> Any:
        if not lora:
            return None
        with patches.bypassed():
            return original(model, theirs)

    return commit_all(changes, then=lora_part)


def _model_switch(enabled: bool) -> Callable[..., Any]:
    def part(model: nn.Module, original: Method) -> Any:
        result = None
        if _model_lora(model):
            with patches.bypassed():
                result = original(model)
        set_enabled(model, enabled)
        return result

    return part


def _model_delete(model: nn.Module, original: Method, adapter_names: str | list[str]) -> Any:
    names = _as_list(adapter_names, "delete_adapters")
    return _delete(original, model, names, registered_adapters(model), _model_lora(model),
                   lambda ours: loader.delete_from_model(model, ours))


def _delete(original: Method, target: Any, names: list[str], lokr: Sequence[str], lora: Sequence[str],
            delete_lokr: Callable[[list[str]], None]) -> Any:
    """delete_adapters on a pipeline or a model: LoRA names through diffusers, then the LoKr ones."""
    ours, theirs = _split(names, lokr, lora)
    result = None
    if theirs:
        with patches.bypassed():
            result = original(target, theirs)
    if ours:
        delete_lokr(ours)
    return result


def _model_active(model: nn.Module, original: Method) -> Any:
    lora = list(_as_list(original(model), "active_adapters")) if _model_lora(model) else []
    return [*lora, *[n for n in loader.active_adapters(model) if n not in lora]]


def _model_fuse(model: nn.Module, original: Method, lora_scale: float = 1.0, safe_fusing: bool = False,
                adapter_names: list[str] | None = None) -> Any:
    lora = _model_lora(model)
    scale = S.check_strength(lora_scale, "lora_scale")
    ours: list[str] | None = None
    theirs: list[str] | None = None
    if adapter_names is not None:
        ours, theirs = _split(_as_list(adapter_names, "fuse_lora"), registered_adapters(model), lora)

    def lora_part() -> Any:
        if not lora or theirs == []:
            return None
        with patches.bypassed():
            return original(model, lora_scale, safe_fusing=safe_fusing, adapter_names=theirs)

    layers = [] if ours == [] else named_lokr_layers(model)  # a quantized base refuses, named
    return commits.fuse(layers, ours, scale, safe=safe_fusing, then=lora_part)


def _model_unfuse(model: nn.Module, original: Method) -> Any:
    def lora_part() -> Any:
        if not _model_lora(model):
            return None
        with patches.bypassed():
            return original(model)

    return commits.unfuse(named_lokr_layers(model), then=lora_part)


def _model_unload(model: nn.Module, original: Method) -> Any:
    result = None
    if _model_lora(model):
        with diffusers_lora.layers_stepped_aside(model), patches.bypassed():
            result = original(model)
    loader.unload_from_model(model)
    return result


MODEL_METHODS: dict[str, Callable[..., Any]] = {
    "set_adapters": _model_set_adapters,
    "set_adapter": _model_set_adapter,
    "disable_adapters": _model_switch(False),
    "enable_adapters": _model_switch(True),
    "disable_lora": _model_switch(False),
    "enable_lora": _model_switch(True),
    "delete_adapters": _model_delete,
    "active_adapters": _model_active,
    "fuse_lora": _model_fuse,
    "unfuse_lora": _model_unfuse,
    "unload_lora": _model_unload,
}


def model_method(name: str) -> Callable[[Method], Method]:
    return lambda original: _model_call(original, name, MODEL_METHODS[name])
