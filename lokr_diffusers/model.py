"""LoKrModel: inject LoKr layers into a model (in place) and manage its adapters, PEFT-style.

    model = LoKrModel(unet, LoKrConfig(r=8, alpha=8, target_modules=["to_q", "to_v"]), "default")
    model.add_adapter("style", other_config); model.set_adapter(["default", "style"])
    with model.disable_adapter(): ...
    model.merge_adapter(); model.unmerge_adapter(); base = model.merge_and_unload()

Injection replaces each targeted nn.Linear / nn.Conv1d / nn.Conv2d by a LoKr layer wrapping it,
inside the wrapped model itself: the model keeps its class, so a pipeline component can be
injected without being wrapped (see `pipeline.add_lokr`). The adapter configs live on the model
(`_lokr_configs`), so a second LoKrModel over the same model sees them.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from torch import Tensor, nn

from . import commits, quantized, scaling, sharding
from . import functional as LF
from . import state as S
from .commits import commit_all
from .config import LoKrConfig
from .formats.fused import rows_to_tensors
from .layers import Conv1d, Conv2d, Linear, LoKrLayer, check_adapter_name
from .logs import progress
from .modules_to_save import ModulesToSaveWrapper
from .state_dict import assign_adapter_state_dict, shared_key
from .targeting import Target, default_target_modules, find_targets
from .transaction import all_or_nothing

logger = logging.getLogger(__name__)

CONFIGS_ATTR = "_lokr_configs"


def lokr_layers(model: nn.Module) -> Iterator[tuple[str, LoKrLayer]]:
    """(name, layer) for every LoKr layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoKrLayer):
            yield name, module


def registered_adapters(model: nn.Module) -> list[str]:
    """The LoKr adapters registered on the model (read only: a model never touched gets no registry)."""
    return list(model.__dict__.get(CONFIGS_ATTR) or ())


def adapter_configs(model: nn.Module) -> dict[str, LoKrConfig]:
    """The {adapter_name: LoKrConfig} registry kept on the model (created empty if absent)."""
    configs = model.__dict__.get(CONFIGS_ATTR)
    if configs is None:
        configs = {}
        model.__dict__[CONFIGS_ATTR] = configs  # a plain attribute, not a submodule or buffer
    return configs


ENABLED_ATTR = "_lokr_enabled"


def component_enabled(model: nn.Module) -> bool:
    """Whether LoKr is enabled on this component (layers added later follow it)."""
    return bool(model.__dict__.get(ENABLED_ATTR, True))


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Enable or disable every LoKr layer and modules_to_save copy of `model`; layers added to it
    later (a new adapter loaded while disabled) start in the same state."""
    changes = [(layer, S.enable(layer.state, enabled)) for _, layer in lokr_layers(model)]
    commit_all(changes)
    model.__dict__[ENABLED_ATTR] = bool(enabled)
    for _, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.enable_adapters(enabled)


def named_lokr_layers(target: nn.Module | Mapping[str, nn.Module]) -> list[tuple[str, LoKrLayer]]:
    """(name, layer) for every LoKr layer of one model (its module paths), or of several components
    ({component: model}, in that order: "component.path"), as the fuse path (commits.py) takes them.
    Under FSDP2, gathered blocks are resharded first, so that a fuse writes into the shards (sharding.py)."""
    sharding.reshard([target] if isinstance(target, nn.Module) else list(target.values()))
    if isinstance(target, nn.Module):
        return list(lokr_layers(target))
    return [(f"{c}.{path}", layer) for c, model in target.items() for path, layer in lokr_layers(model)]


def remove_layers(model: nn.Module, keep_merged: bool = False, only_empty: bool = False) -> int:
    """Put each LoKr layer's base layer back in its slot (and each modules_to_save original).

    keep_merged: leave fused adapters in the weights (diffusers' fuse-then-unload; also when they are
    disabled); otherwise take them out first. only_empty: only layers that hold no adapter any more.
    Returns how many were removed.
    """
    removed = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LoKrLayer, ModulesToSaveWrapper)):
            continue
        if only_empty and (not isinstance(module, LoKrLayer) or module.plans):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, LoKrLayer):
            module.commit(S.enable(module.state, True) if keep_merged else S.unfuse(module.state))
            module.forget_fuse()  # a fuse kept in the weights is not undone any more
            setattr(parent, child, module.base_layer)
        else:
            setattr(parent, child, module.unwrap(keep_merged))
        removed += 1
    if not only_empty:
        adapter_configs(model).clear()
        model.__dict__.pop(ENABLED_ATTR, None)
    return removed


class LoKrModel(nn.Module):
    """Low-Rank Kronecker product adapters on `model`.

    Args:
        model: the model to adapt (modified in place: its targeted layers become LoKr layers).
        config: the adapter's LoKrConfig; target_modules=None picks the model class's defaults.
        adapter_name: name of the adapter, default "default".
        (config=None wraps a model that already holds LoKr layers, to manage them.)

    Attribute access falls through to `model` (`.config`, `.dtype`, `.device`, ...), and so does
    `forward`, so a wrapped UNet or text encoder keeps working inside a diffusers pipeline.
    """

    prefix: str = "lokr_"
    layers_mapping: ClassVar[dict[type[nn.Module], type[LoKrLayer]]] = {
        nn.Conv2d: Conv2d, nn.Conv1d: Conv1d, nn.Linear: Linear,
    }

    def __init__(self, model: nn.Module, config: LoKrConfig | None, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        if config is not None:  # None: only manage the adapters the model already has
            self.inject_adapter(config, adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, LoKrConfig]:
        return adapter_configs(self.model)

    # ---------------------------------------------------------------------------------- injection
    def inject_adapter(self, config: LoKrConfig, adapter_name: str) -> list[str]:
        """Add `adapter_name` to every targeted module. All-or-nothing: on error the model is unchanged.

        Returns the names of the adapted modules.
        """
        check_adapter_name(adapter_name)
        if not isinstance(config, LoKrConfig):
            raise TypeError(f"config must be a LoKrConfig, got {type(config).__name__}")
        if adapter_name in self.peft_config or any(adapter_name in layer.plans for _, layer in lokr_layers(self.model)):
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete it first")
        config = copy.deepcopy(config)
        if config.target_modules is None:
            config.target_modules = default_target_modules(self.model)
        supported = (*self.layers_mapping, LoKrLayer)
        targets = find_targets(self.model, config, supported, skip=(LoKrLayer, ModulesToSaveWrapper))
        for t in targets:  # r and shapes are checked before anything is touched
            layer = self.model.get_submodule(t.name)
            shape = layer.weight_shape if isinstance(layer, LoKrLayer) else quantized.logical_shape(layer)
            LF.plan_lokr(shape, t.r, config.decompose_factor, config.decompose_both,
                         config.use_effective_conv2d, config.full_matrix)
        saved = self._resolve_modules_to_save(config)
        with all_or_nothing([self.model]):
            for t in progress(targets, desc=f"adding LoKr {adapter_name!r}"):
                parent, _, child = t.name.rpartition(".")
                parent_module = self.model.get_submodule(parent)
                self._create_and_replace(config, adapter_name, getattr(parent_module, child), child, parent_module, t)
            for name in saved:
                self._wrap_module_to_save(name, adapter_name)
        self.peft_config[adapter_name] = config
        scaling.install(self.model)
        if len(self.peft_config) == 1:
            self.set_adapter(adapter_name)
        else:
            self._mark_only_adapters_as_trainable()
        logger.info("LoKr adapter %r added to %d modules", adapter_name, len(targets))
        return [t.name for t in targets]

    def _create_and_replace(self, config: LoKrConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: Target) -> None:
        """Add the adapter to `target` (update_layer if it is already LoKr), else wrap and replace it.

        `current_key` carries the module's full name and its rank / alpha from the patterns.
        """
        if isinstance(target, LoKrLayer):
            target.update_layer(adapter_name, current_key.r, current_key.alpha, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key.r, current_key.alpha)
        setattr(parent, target_name, new_module)

    def _create_new_module(self, config: LoKrConfig, adapter_name: str, target: nn.Module, r: int,
                           alpha: float) -> LoKrLayer:
        for base_type, layer_type in self.layers_mapping.items():
            if type(target) is base_type or isinstance(target, base_type):
                layer = layer_type(target, adapter_name, config, r=r, alpha=alpha)
                layer.enable_adapters(component_enabled(self.model))
                return layer
        raise TypeError(f"LoKr cannot wrap {type(target).__name__}; supported: {list(self.layers_mapping)}")

    def _resolve_modules_to_save(self, config: LoKrConfig) -> list[str]:
        if not config.modules_to_save:
            return []
        names = [k for k, _ in self.model.named_modules()
                 if k and any(k == m or k.endswith("." + m) for m in config.modules_to_save)]
        missing = [m for m in config.modules_to_save if not any(k == m or k.endswith("." + m) for k in names)]
        if missing:
            raise ValueError(f"modules_to_save {missing} match no module of {type(self.model).__name__}")
        return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]

    def _wrap_module_to_save(self, name: str, adapter_name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        current = getattr(parent, child)
        if isinstance(current, ModulesToSaveWrapper):
            current.add(adapter_name)
        else:
            setattr(parent, child, ModulesToSaveWrapper(current, adapter_name))

    def add_adapter(self, adapter_name: str, config: LoKrConfig) -> None:
        """Add another adapter (inactive until `set_adapter`)."""
        self.inject_adapter(config, adapter_name)

    # ----------------------------------------------------------------------------- adapter control
    @property
    def active_adapters(self) -> list[str]:
        for _, layer in lokr_layers(self.model):
            return layer.active_adapters
        return []

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or several at once (their deltas add); only those become trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this model has {list(self.peft_config)}")
        for _, module in self.model.named_modules():
            if isinstance(module, (LoKrLayer, ModulesToSaveWrapper)):
                module.set_adapter(names)
        self._mark_only_adapters_as_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter everywhere; where it was fused, its delta leaves the weights and the
        other fused adapters stay fused at their strengths."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {list(self.peft_config)}")
        for _, module in self.model.named_modules():
            if isinstance(module, LoKrLayer) and adapter_name in module.plans:
                module.delete_adapter(adapter_name)
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                module.delete(adapter_name)
        del self.peft_config[adapter_name]

    def set_adapter_weight(self, adapter_name: str, weight: float) -> None:
        """A strength multiplier on top of the adapter's own scale (1.0 = as trained)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {list(self.peft_config)}")
        S.check_strength(weight, f"weight of adapter {adapter_name!r}")
        for _, layer in lokr_layers(self.model):
            if adapter_name in layer.plans:
                layer.set_adapter_weight(adapter_name, weight)

    def enable_adapter_layers(self) -> None:
        set_enabled(self.model, True)

    def disable_adapter_layers(self) -> None:
        """The base model's output (fused adapters are taken out of the weights until enabled again)."""
        set_enabled(self.model, False)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside this context; on exit every layer is as it was before."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def set_forward_mode(self, mode: str) -> None:
        """"auto" (cost model), "merged" (W + ΔW) or "bypass" (factors): the numbers agree."""
        if mode not in ("auto", "merged", "bypass"):
            raise ValueError(f"forward mode must be 'auto', 'merged' or 'bypass', got {mode!r}")
        for _, layer in lokr_layers(self.model):
            layer.forward_mode = mode  # type: ignore[assignment]

    def _mark_only_adapters_as_trainable(self) -> None:
        active = set(self.active_adapters)
        for name, p in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                p.requires_grad_(False)
        for _, module in self.model.named_modules():
            if isinstance(module, LoKrLayer):
                for a in module.plans:
                    trainable = a in active and not self.peft_config[a].inference_mode
                    for t in module.factors(a).values():
                        t.requires_grad_(trainable)
            elif isinstance(module, ModulesToSaveWrapper):
                for a, sub in module.modules_to_save.items():
                    sub.requires_grad_(a in active and not self.peft_config[a].inference_mode)

    # ------------------------------------------------------------------------------ merge / unload
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
                      requantize: bool = False) -> None:
        """Fold the active (or given) adapters into the base weights; `unmerge_adapter` restores them.
        With safe_merge, a non-finite result anywhere leaves every weight as it was. A quantized base
        weight refuses unless `requantize` (docs/adapters.md §Quantized base layers)."""
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.peft_config]
            if unknown:
                raise ValueError(f"unknown adapters {unknown}; this model has {list(self.peft_config)}")
        commits.fuse(named_lokr_layers(self.model), adapter_names, safe=safe_merge, requantize=requantize)

    def unmerge_adapter(self) -> None:
        commits.unfuse(named_lokr_layers(self.model))

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         requantize: bool = False) -> nn.Module:
        """Merge, remove every LoKr layer and return the plain model (quantized bases: `requantize`)."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names, requantize=requantize)

    def unload(self) -> nn.Module:
        """Remove every LoKr layer without merging and return the plain model."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None,
                requantize: bool = False) -> nn.Module:
        if merge:
            commits.fuse(named_lokr_layers(self.model), adapter_names, safe=safe_merge, keep_original=False,
                        requantize=requantize)
        remove_layers(self.model, keep_merged=merge)
        return self.model

    # --------------------------------------------------------------------------------- state dicts
    def get_adapter_state_dict(self, adapter_name: str = "default",
                               prefix: str = "base_model.model.") -> dict[str, Tensor]:
        """The adapter's tensors in PEFT's saved layout: `{prefix}{module}.lokr_w1` (no adapter name).

        The pieces of a fused module (layers holding rows of one adapter, docs/adapters.md §Row pieces) share
        their factors: they are written once, under the first piece; every piece writes its rows
        (`lokr_rows`, `lokr_height`), so that safetensors can save the dict and `set_adapter_state_dict`
        gives them back to the same pieces. Under FSDP2 each tensor is gathered whole (every process must call
        this: sharding.py)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {list(self.peft_config)}")
        sharding.reshard([self.model])  # a gathered FSDP unit's tensors are views of a buffer its reshard frees
        out: dict[str, Tensor] = {}
        holders: dict[tuple[int, ...], str] = {}  # the shared factor Parameters -> the piece that writes them
        for name, module in self.model.named_modules():
            if isinstance(module, LoKrLayer) and adapter_name in module.plans:
                tensors = module.adapter_tensors(adapter_name)
                rows = module.rows.get(adapter_name)
                if rows is not None:
                    tensors.update(rows_to_tensors(rows))
                    if holders.setdefault(shared_key(module, adapter_name), name) != name:
                        tensors = {k: v for k, v in tensors.items() if k not in LF.FACTOR_NAMES}
                for key, t in tensors.items():
                    out[f"{prefix}{name}.{key}"] = sharding.full(t)
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for key, t in module.modules_to_save[adapter_name].state_dict().items():
                    out[f"{prefix}{name}.{key}"] = sharding.full(t)
        return out

    def set_adapter_state_dict(self, state_dict: dict[str, Tensor], adapter_name: str = "default",
                               prefix: str = "base_model.model.") -> None:
        """Load tensors in PEFT's layout into an existing adapter. Shapes are read off the tensors
        (so PEFT's unswapped factorizations load too); every key must be used. All-or-nothing."""
        assign_adapter_state_dict(self, state_dict, adapter_name, prefix)

    # ------------------------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Write PEFT's one-line summary to stdout (this method's whole purpose is output)."""
        trainable, total = self.get_nb_trainable_parameters()
        sys.stdout.write(f"trainable params: {trainable:,d} || all params: {total:,d} || "
                         f"trainable%: {100 * trainable / max(total, 1):.4f}\n")

