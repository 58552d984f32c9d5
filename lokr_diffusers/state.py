"""The adapter state of one LoKr layer, and every operation as a transition of it (docs/adapters.md).

A layer's state says exactly what it computes. With W the base weight without any LoKr:

    W_phys = fold(W, fused)      if enabled, else W      (what base_layer.weight holds)
    y      = op(x, fold(W_phys, applied · c))            (what forward returns)
    applied = [(a, weight_a) for a in active if a is not fused]    ([] when disabled)

fold(W, [(a, s), ...]) applies adapters in order: W + s·scale_a·ΔW_a for a plain adapter, the DoRA
rule W + s·(m·(W + ΔW)/‖W + ΔW‖ − W) for a DoRA one (it normalises the weight it is given, so order
matters only there). c is the call scale diffusers passes as cross_attention_kwargs={"scale": c}.
A fused adapter keeps the strength it was fused at until it is unfused or deleted.

This module is pure: states in, states out, no tensors. `layers.LoKrLayer` holds one `LayerState`
and makes the weights follow it (`LoKrLayer.commit`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

Pairs = tuple[tuple[str, float], ...]


def check_strength(value: object, what: str) -> float:
    """A finite float, or a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class LayerState:
    """Loaded adapters (load order), the active ones (activation order), each adapter's user weight,
    whether adapters are enabled, and the adapters fused into the weight with their strengths."""

    adapters: tuple[str, ...] = ()
    active: tuple[str, ...] = ()
    weights: Mapping[str, float] = field(default_factory=dict)
    enabled: bool = True
    fused: Pairs = ()

    @property
    def fused_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.fused)

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)

    def applied(self) -> Pairs:
        """(adapter, strength) applied by forward on top of the physical weight, in order."""
        if not self.enabled:
            return ()
        fused = self.fused_names
        return tuple((a, self.weight(a)) for a in self.active if a not in fused)

    def physical(self) -> Pairs:
        """(adapter, strength) folded into base_layer.weight, in order."""
        return self.fused if self.enabled else ()

    def physical_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.physical())


# ---------------------------------------------------------------------------------- transitions
def add(state: LayerState, name: str) -> LayerState:
    """A new adapter: loaded, inactive, weight 1.0. Re-adding a loaded one keeps its place."""
    if name in state.adapters:
        if name in state.fused_names:
            raise ValueError(f"adapter {name!r} is fused; unfuse it before replacing its tensors")
        return state
    return replace(state, adapters=(*state.adapters, name))


def remove(state: LayerState, name: str) -> LayerState:
    """Delete an adapter: gone from every list; if it was fused, its delta leaves the weight."""
    weights = {a: w for a, w in state.weights.items() if a != name}
    return replace(state, adapters=tuple(a for a in state.adapters if a != name),
                   active=tuple(a for a in state.active if a != name), weights=weights,
                   fused=tuple((a, s) for a, s in state.fused if a != name))


def activate(state: LayerState, names: Iterable[str]) -> LayerState:
    """Exactly these adapters (those loaded here) become active, in this order."""
    wanted: list[str] = []
    for n in names:
        if n in state.adapters and n not in wanted:
            wanted.append(n)
    return replace(state, active=tuple(wanted))


def set_weight(state: LayerState, name: str, weight: float) -> LayerState:
    """The user strength of one adapter. A fused adapter keeps the strength it was fused at."""
    w = check_strength(weight, f"weight of adapter {name!r}")
    return replace(state, weights={**state.weights, name: w})


def enable(state: LayerState, enabled: bool) -> LayerState:
    return replace(state, enabled=bool(enabled))


def fuse(state: LayerState, names: Iterable[str] | None = None, scale: float = 1.0) -> LayerState:
    """Fuse these (default: the active) adapters at strength scale · weight. Already fused at that
    strength: nothing to do; at another strength: a ValueError (unfuse first)."""
    scale = check_strength(scale, "fuse scale")
    fused = dict(state.fused)
    new = list(state.fused)
    for a in state.active if names is None else names:
        if a not in state.adapters:
            continue
        strength = scale * state.weight(a)
        if a in fused:
            if fused[a] != strength:
                raise ValueError(f"adapter {a!r} is already fused at strength {fused[a]:g}; "
                                 f"unfuse before fusing it at {strength:g}")
            continue
        new.append((a, strength))
        fused[a] = strength
    return replace(state, fused=tuple(new))


def unfuse(state: LayerState) -> LayerState:
    return replace(state, fused=())
