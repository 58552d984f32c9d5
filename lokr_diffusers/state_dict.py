"""Adapter state dicts in PEFT's key layout: `<prefix><module path>.lokr_w1` (no adapter name)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from . import functional as LF
from .layers import LoKrLayer
from .modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from .model import LoKrModel


def _strip(key: str, prefix: str) -> str:
    for p in (prefix, "base_model.model.", "model."):
        if p and key.startswith(p):
            return key[len(p):]
    return key


def assign_adapter_state_dict(model: LoKrModel, state_dict: dict[str, Tensor], adapter_name: str,
                              prefix: str) -> None:
    """Validate every key and shape first, then assign; on any error nothing changes."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {list(model.peft_config)}")
    modules = dict(model.model.named_modules())
    per_layer: dict[str, dict[str, Tensor]] = {}
    per_saved: dict[str, dict[str, Tensor]] = {}
    unused: list[str] = []
    for key, tensor in state_dict.items():
        path, _, leaf = _strip(key, prefix).rpartition(".")
        layer = modules.get(path)
        if isinstance(layer, LoKrLayer) and leaf in (*LF.FACTOR_NAMES, "dora_scale") and adapter_name in layer.plans:
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
    expected = {n for n, m in modules.items() if isinstance(m, LoKrLayer) and adapter_name in m.plans}
    missing = sorted(expected - set(per_layer))
    if missing:
        raise KeyError(f"{len(missing)} LoKr modules of adapter {adapter_name!r} get no tensors: {missing[:5]}")
    for path, tensors in per_layer.items():
        layer = modules[path]
        assert isinstance(layer, LoKrLayer)
        try:
            LF.plan_from_tensors(layer.weight_shape, {k: v for k, v in tensors.items() if k != "dora_scale"})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    for path, tensors in per_saved.items():
        want = {k: tuple(v.shape) for k, v in modules[path].modules_to_save[adapter_name].state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if want != got:
            raise ValueError(f"{path}: modules_to_save tensors {got} do not fit {want}")
    for path, tensors in per_layer.items():
        layer = modules[path]
        assert isinstance(layer, LoKrLayer)
        ref = next(iter(layer.factors(adapter_name).values()))
        moved = {n: t.detach().to(device=ref.device, dtype=ref.dtype).clone() for n, t in tensors.items()}
        dora = moved.pop("dora_scale", None)
        layer.set_adapter_tensors(adapter_name, moved, layer.scaling[adapter_name], r=layer.r[adapter_name],
                                  alpha=layer.alpha[adapter_name], requires_grad=ref.requires_grad, dora_scale=dora)
    for path, tensors in per_saved.items():
        wrapper = modules[path]
        assert isinstance(wrapper, ModulesToSaveWrapper)
        wrapper.modules_to_save[adapter_name].load_state_dict(tensors, strict=True)
