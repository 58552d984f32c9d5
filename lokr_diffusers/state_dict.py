"""Adapter state dicts in PEFT's key layout: `<prefix><module path>.lokr_w1` (no adapter name)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import functional as LF
from . import sharding
from .formats.fused import ROW_LEAVES, rows_from_tensors
from .layers import LoKrLayer
from .modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from .model import LoKrModel


def shared_key(layer: LoKrLayer, adapter_name: str) -> tuple[int, ...]:
    """The identity of an adapter's factor Parameters on a layer: equal for the pieces of one fused module."""
    return tuple(id(t) for t in layer.factors(adapter_name).values())


def _strip(key: str, prefix: str) -> str:
    for p in (prefix, "base_model.model.", "model."):
        if p and key.startswith(p):
            return key[len(p):]
    return key


def assign_adapter_state_dict(model: LoKrModel, state_dict: dict[str, Tensor], adapter_name: str,
                              prefix: str) -> None:
    """Validate every key and shape first, then assign; on any error nothing changes. The pieces of a fused
    module (layers holding rows, sharing their factors) take the factors written under any one of them,
    and keep sharing them."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {list(model.peft_config)}")
    sharding.reshard([model.model])  # under FSDP2: the tensors go into the shards (_assign_sharded)
    modules = dict(model.model.named_modules())
    per_layer: dict[str, dict[str, Tensor]] = {}
    per_saved: dict[str, dict[str, Tensor]] = {}
    unused: list[str] = []
    for key, tensor in state_dict.items():
        path, _, leaf = _strip(key, prefix).rpartition(".")
        layer = modules.get(path)
        if isinstance(layer, LoKrLayer) and leaf in LEAVES and adapter_name in layer.plans:
            per_layer.setdefault(path, {})[leaf] = tensor
            continue
        owner = next((p for p, m in modules.items() if isinstance(m, ModulesToSaveWrapper)
                      and _strip(key, prefix).startswith(p + ".")), None)
        if owner is not None:
            per_saved.setdefault(owner, {})[_strip(key, prefix)[len(owner) + 1:]] = tensor
            continue
        unused.append(key)
    if unused:
        raise KeyError(f"{len(unused)} keys match no LoKr module of adapter {adapter_name!r}: {unused[:5]}")
    layers = {n: m for n, m in modules.items() if isinstance(m, LoKrLayer) and adapter_name in m.plans}
    groups: dict[tuple[int, ...], list[str]] = {}  # shared factors -> the pieces holding them (one each else)
    for n, layer in layers.items():
        groups.setdefault(shared_key(layer, adapter_name) if adapter_name in layer.rows else (id(layer),), []).append(n)
    factors: dict[tuple[int, ...], dict[str, Tensor]] = {}
    missing = []
    for gk, paths in groups.items():
        given = [p for p in paths if any(k in LF.FACTOR_NAMES for k in per_layer.get(p, {}))]
        if not given:
            missing.append(paths[0] if len(paths) == 1 else f"{paths[0]} (and the pieces sharing its factors)")
            continue
        factors[gk] = {k: v for k, v in per_layer[given[0]].items() if k in LF.FACTOR_NAMES}
    if missing:
        raise KeyError(f"{len(missing)} LoKr modules of adapter {adapter_name!r} get no tensors: {missing[:5]}")
    for gk, paths in groups.items():
        for p in paths:
            _check_layer(p, layers[p], adapter_name, factors[gk], per_layer.get(p, {}))
    for path, tensors in per_saved.items():
        want = {k: tuple(v.shape) for k, v in modules[path].modules_to_save[adapter_name].state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if want != got:
            raise ValueError(f"{path}: modules_to_save tensors {got} do not fit {want}")
    if any(sharding.is_sharded(t) for layer in layers.values() for t in layer.adapter_tensors(adapter_name).values()):
        _assign_sharded(layers, adapter_name, factors, groups, per_layer)
    else:
        _assign(layers, adapter_name, factors, groups, per_layer)
    for path, tensors in per_saved.items():
        wrapper = modules[path]
        assert isinstance(wrapper, ModulesToSaveWrapper)
        wrapper.modules_to_save[adapter_name].load_state_dict(tensors, strict=True)


def _assign(layers: dict[str, LoKrLayer], adapter_name: str, factors: dict[tuple[int, ...], dict[str, Tensor]],
            groups: dict[tuple[int, ...], list[str]], per_layer: dict[str, dict[str, Tensor]]) -> None:
    """New Parameters for the checked tensors (shapes read off them)."""
    for gk, paths in groups.items():
        first = layers[paths[0]]
        ref = next(iter(first.factors(adapter_name).values()))
        params = {n: nn.Parameter(t.detach().to(device=ref.device, dtype=ref.dtype).clone(),
                                  requires_grad=ref.requires_grad) for n, t in factors[gk].items()}
        for p in paths:  # one set of Parameters for the pieces of a fused module
            layer = layers[p]
            dora = per_layer.get(p, {}).get("dora_scale")
            dora = dora.detach().to(device=ref.device, dtype=ref.dtype).clone() if dora is not None else None
            layer.set_adapter_tensors(adapter_name, dict(params), layer.scaling[adapter_name], r=layer.r[adapter_name],
                                      alpha=layer.alpha[adapter_name], requires_grad=ref.requires_grad,
                                      dora_scale=dora, rows=layer.rows.get(adapter_name),
                                      origin=layer.origins.get(adapter_name))


def _assign_sharded(layers: dict[str, LoKrLayer], adapter_name: str,
                    factors: dict[tuple[int, ...], dict[str, Tensor]], groups: dict[tuple[int, ...], list[str]],
                    per_layer: dict[str, dict[str, Tensor]]) -> None:
    """Under FSDP2 (sharding.py): the tensors go into the existing sharded Parameters in place, each process
    its own rows (FSDP and the optimizer hold those Parameters); so the tensors must have the layers' shapes."""
    writes: list[tuple[Tensor, Tensor]] = []
    for gk, paths in groups.items():
        for p in paths:
            layer = layers[p]
            have = layer.adapter_tensors(adapter_name)
            own = per_layer.get(p, {})
            given = {**factors[gk], **({"dora_scale": own["dora_scale"]} if "dora_scale" in own else {})}
            shapes = {k: tuple(v.shape) for k, v in given.items()}
            if shapes != {k: tuple(v.shape) for k, v in have.items()}:
                raise ValueError(f"{p}: under FSDP the adapter's tensors are written into its sharded parameters, so "
                                 f"they must keep their shapes {({k: tuple(v.shape) for k, v in have.items()})}, got "
                                 f"{shapes}; load this state dict into the unsharded model, then shard it")
            writes += [(have[k], v) for k, v in given.items()]
    for param, value in writes:
        sharding.write_shard(param, value.to(param.device))


LEAVES = (*LF.FACTOR_NAMES, "dora_scale", *ROW_LEAVES)


def _check_layer(path: str, layer: LoKrLayer, adapter_name: str, factors: dict[str, Tensor],
                 own: dict[str, Tensor]) -> None:
    """The factors (its own or a sharing piece's) fit the layer; its rows, if given, are the layer's."""
    rows = layer.rows.get(adapter_name)
    if "lokr_rows" in own and rows is None:
        raise ValueError(f"{path}: the state dict gives row pieces for a layer that holds the whole adapter")
    if rows is not None and "lokr_rows" in own and \
            rows_from_tensors(own["lokr_rows"], own.get("lokr_height", torch.tensor(-1)), path) != rows:
        raise ValueError(f"{path}: the state dict's lokr_rows are not this layer's {rows.pieces} of {rows.height}")
    shape = layer.weight_shape if rows is None else (rows.height, *layer.weight_shape[1:])
    try:
        LF.plan_from_tensors(shape, factors)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
