"""What formats/ needs to know of a module that already holds LoKr adapters, without importing the layers:
a protocol that `layers.LoKrLayer` satisfies (its base layer, the logical weight shape, the weight without
any adapter), and the two questions asked of any adaptable module through it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from . import quantized


@runtime_checkable
class AdaptedModule(Protocol):
    """A module holding LoKr adapters around `base_layer` (layers.LoKrLayer)."""

    base_layer: nn.Module
    weight_shape: tuple[int, ...]

    def base_weight(self) -> Tensor: ...


def logical_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight shape adapters are planned for: (out, in[, kh, kw]), a quantized weight's unpacked one."""
    if isinstance(module, AdaptedModule):
        return tuple(module.weight_shape)
    return quantized.logical_shape(module)


def base_weight(module: nn.Module) -> Tensor:
    """The weight without any LoKr adapter (a quantized one dequantized), detached."""
    if isinstance(module, AdaptedModule):
        return module.base_weight()
    if quantized.quantization_of(module) is not None:
        return quantized.dequantize(module)
    w = module.weight
    assert isinstance(w, Tensor)
    return w.detach()
