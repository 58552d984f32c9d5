"""How fused adapters get into a layer's base weight and out again: one strategy per kind of weight.

- `PlainBase`: a float weight, written in place (fusing.FusedWeight keeps the copy without our
  adapters and what each was fused with).
- `QuantizedBase`: a quantized weight, never written: a fuse dequantizes, adds and requantizes into a
  new tensor, only when allowed, keeping the original aside (quantized.QuantizedFuse).

A layer holds one strategy (`LoKrLayer.base_strategy`); `pick` changes it only while nothing of ours is
in the weight, so the strategy that fused is the one that unfuses. Both answer the same calls; the
layer never reads their bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn

from .. import quantized
from ..fusing import Frozen, FusedWeight
from ..state import Pairs

Freeze = Callable[[str], Frozen]


def _weight(base: nn.Module) -> Tensor:
    return cast(Tensor, base.weight)


class PlainBase:
    """A plain float weight: fused adapters are folded into it in place."""

    def __init__(self) -> None:
        self.fused = FusedWeight()

    @property
    def error(self) -> float | None:
        return None  # exact: nothing is requantized

    @property
    def allowed(self) -> bool:
        return False

    def settle(self, anything_fused: bool) -> None:
        """After a commit (the quantized strategy forgets the permission to requantize)."""

    def check(self, base: nn.Module, where: str, old: Pairs, new: Pairs, freeze: Freeze, requantize: bool,
              safe: bool) -> None:
        """Raise what `move` would raise (with `safe`, non-finite weights); change nothing."""
        if safe:
            self.fused.check(_weight(base), old, new, freeze)

    def move(self, base: nn.Module, where: str, old: Pairs, new: Pairs, freeze: Freeze, keep_original: bool,
             requantize: bool) -> None:
        """Make the weight hold the fused list `new` (it held `old`)."""
        self.fused.move(_weight(base), old, new, freeze, keep_original)

    def without_fused(self, base: nn.Module, fused: Pairs) -> Tensor:
        """The weight without our fused adapters, detached (a tensor nobody else holds while anything is fused)."""
        w = _weight(base)
        return self.fused.recover(w, fused).clone() if fused else w.detach()

    def follow(self, fn: Any, base: nn.Module) -> None:
        """The layer moved (Module.to, offloading)."""
        self.fused.follow(_weight(base))


class QuantizedBase:
    """A quantized weight: fused adapters only by requantizing, into a new tensor (docs/adapters.md
    §Quantized base layers)."""

    def __init__(self) -> None:
        self.fused = quantized.QuantizedFuse()

    @property
    def error(self) -> float | None:
        """Max |dequantized weight − exact W + ΔW| left by the last requantizing fuse, while one holds."""
        return self.fused.error

    @property
    def allowed(self) -> bool:
        """The user allowed requantizing, and adapters are still fused (disable / enable / delete may
        requantize again)."""
        return self.fused.allowed

    def settle(self, anything_fused: bool) -> None:
        if not anything_fused:
            self.fused.allowed = False

    def check(self, base: nn.Module, where: str, old: Pairs, new: Pairs, freeze: Freeze, requantize: bool,
              safe: bool) -> None:
        self.fused.check(base, where, old, new, freeze, requantize, safe)

    def move(self, base: nn.Module, where: str, old: Pairs, new: Pairs, freeze: Freeze, keep_original: bool,
             requantize: bool) -> None:
        self.fused.move(base, where, old, new, freeze, keep_original, requantize)

    def without_fused(self, base: nn.Module, fused: Pairs) -> Tensor:
        """Dequantized, in the weight's compute precision."""
        return self.fused.current_base(base, bool(fused))

    def follow(self, fn: Any, base: nn.Module) -> None:
        self.fused.follow(fn)


BaseStrategy = PlainBase | QuantizedBase


def pick(current: BaseStrategy | None, base: nn.Module, fused: Pairs) -> BaseStrategy:
    """The strategy for `base`'s weight: `current` while it holds a fuse of ours, else the one the weight
    asks for now (it may have been quantized, or cast to fp8 storage, since the layer was made)."""
    if current is not None and fused:
        return current
    want = QuantizedBase if quantized.quantization_of(base) is not None else PlainBase
    return current if type(current) is want else want()
