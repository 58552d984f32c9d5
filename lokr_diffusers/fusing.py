"""What a layer's base weight holds for a list of fused adapters, and the weight without them.

A layer's fused adapters live in its base weight (docs/adapters.md: W_phys = fold(W, fused)). To change
that list, the weight without our adapters is needed: a copy of it is taken at the first fuse (where it
lives: below), and each fused adapter keeps the tensors it was fused with (`Frozen`: the factors only,
small), so the fused weight can be rebuilt exactly. If something else changed the weight since (a LoRA
fused by diffusers after us), that change is kept: W = copy + (weight now − what we wrote). Whether it
changed is first asked of a fingerprint of what we wrote (each output row times a fixed random vector:
one read of the weight, any change to a row moves its number); only a different fingerprint pays for
rebuilding what we wrote and comparing it exactly.

Where the copy lives: on the CPU for CPU weights. For weights on an accelerator, on the device itself
while reuse.py's per-device budget admits it (no transfer, no host sync: what makes fuse / unfuse
cheap on a GPU), else in pinned host memory filled by a non-blocking copy (an event marks when it is
complete; it is waited for before the copy is read). docs/performance.md §Fuse and unfuse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import functional as LF
from . import reuse
from .state import Pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frozen:
    """A fused adapter's tensors and scale as they were at the fuse."""

    factors: dict[str, Tensor]
    scale: float
    dora: Tensor | None
    rows: LF.Rows | None = None  # the layer's rows of the adapter's (fused) weight

    def on(self, device: torch.device, strength: float) -> tuple[dict[str, Tensor], float, Tensor | None, float,
                                                                 LF.Rows | None]:
        """What functional.fold takes for this adapter at `strength`, on `device`."""
        dora = None if self.dora is None else self.dora.to(device)
        return {k: v.to(device) for k, v in self.factors.items()}, self.scale, dora, strength, self.rows


@dataclass
class FusedWeight:
    """The copy of the weight without our fused adapters (None when nothing is fused, or after a fuse
    with keep_original=False) and what each fused adapter was fused with."""

    base: Tensor | None = None
    frozen: dict[str, Frozen] = field(default_factory=dict)
    written: Tensor | None = None  # fingerprint of the weight as we last wrote it, (out,)
    ready: Any = None  # a CUDA event recorded after a non-blocking copy into pinned `base`

    def keep(self, weight: Tensor, copy: bool = True) -> None:
        """Take `weight` (detached) as the copy without our adapters (copy=False: it is already one
        nobody else holds)."""
        self.base, self.ready = _saved(weight.detach(), copy)

    def follow(self, weight: Tensor) -> None:
        """The weight moved devices (Module.to, model offloading): a device copy leaves the device it
        was kept on, so that offloading frees it too (to the CPU when the weight left the device)."""
        base = self.base
        if base is not None and base.device.type != "cpu" and base.device != weight.device:
            self.base, self.ready = self._base().to(weight.device), None

    def _base(self) -> Tensor:
        if self.base is None:
            raise RuntimeError("this layer was fused with keep_original=False and cannot be unfused")
        if self.ready is not None:
            self.ready.synchronize()  # the non-blocking device-to-host copy is complete
            self.ready = None
        return self.base

    @staticmethod
    def fold(base: Tensor, pairs: Pairs, frozen: dict[str, Frozen], inplace: bool = False) -> Tensor:
        """`base` with the adapters `pairs` applied in order: the one way fused weights are made."""
        return LF.fold(base, [frozen[a].on(base.device, s) for a, s in pairs], inplace=inplace)

    def recover(self, weight: Tensor, pairs: Pairs) -> Tensor:
        """The weight without our fused `pairs` (may be the saved copy itself: do not modify it)."""
        w = weight.detach()
        base = self._base().to(device=w.device, dtype=w.dtype)
        if self.written is not None and torch.equal(fingerprint(w), self.written):
            return base  # untouched since we wrote it
        after = self.fold(base, pairs, self.frozen)
        if not torch.equal(after, w):
            logger.debug("weight changed since the fuse; keeping the foreign change")
            base = base + (w - after)
        return base

    def target(self, weight: Tensor, old: Pairs, pairs: Pairs,
               freeze: Callable[[str], Frozen]) -> tuple[Tensor, Tensor, dict[str, Frozen]]:
        """(weight without our adapters, weight with `pairs` fused, what each is fused with)."""
        frozen = {a: self.frozen.get(a) or freeze(a) for a, _ in pairs}
        base = self.recover(weight, old) if old else weight.detach()
        return base, (self.fold(base, pairs, frozen) if pairs else base), frozen

    @torch.no_grad()
    def check(self, weight: Tensor, old: Pairs, pairs: Pairs, freeze: Callable[[str], Frozen]) -> None:
        """Raise if fusing `pairs` (instead of `old`) gives non-finite weights; change nothing."""
        _, target, _ = self.target(weight, old, pairs, freeze)
        _check_finite(target, old, pairs)

    @torch.no_grad()
    def move(self, weight: Tensor, old: Pairs, pairs: Pairs, freeze: Callable[[str], Frozen],
             keep_original: bool) -> None:
        """Rebuild `weight` in place for the fused list `pairs` (it held `old`); non-finite weights are
        checked before (`check`)."""
        if not old:  # the first fuse: keep the copy, then fold into the weight itself
            frozen = {a: freeze(a) for a, _ in pairs}
            if keep_original:
                self.keep(weight)
            else:
                self.base = self.ready = None
            target = self.fold(weight.data, pairs, frozen, inplace=True)
        else:
            base, target, frozen = self.target(weight, old, pairs, freeze)
            if pairs and keep_original:
                # `base` is our saved copy (recover returns it), or a new tensor made from it
                if base is not self.base:  # else it is our saved copy already, kept as it is
                    self.keep(base, copy=False)
            else:
                self.base = self.ready = None
        if target is not weight.data:
            weight.data.copy_(target)
        self.frozen = frozen
        self.written = fingerprint(weight.detach()) if pairs else None


def _saved(w: Tensor, copy: bool) -> tuple[Tensor, Any]:
    """(the copy of `w` to keep, a CUDA event to wait for before reading it, or None)."""
    kept = w.clone() if copy else w
    if w.device.type == "cpu" or reuse.admit(kept):  # a device copy within the budget: no transfer, no sync
        return kept, None
    del kept
    try:
        host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
    except RuntimeError:  # no pinned memory on this machine: a plain (synchronous) copy
        return w.to("cpu", copy=True), None
    host.copy_(w, non_blocking=True)
    ready = None
    if w.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return host, ready


_PROBES: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def _probe(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The fixed random vector of length n on this device and dtype: made once (no host-to-device
    copy per layer and fuse)."""
    key = (n, device, dtype)
    probe = _PROBES.get(key)
    if probe is None:
        probe = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        if len(_PROBES) < 256:
            _PROBES[key] = probe
    return probe


def fingerprint(w: Tensor) -> Tensor:
    """(out,): each output row of `w` times one fixed random vector (a matrix-vector product)."""
    rows = w.reshape(w.shape[0], -1)
    return rows @ _probe(rows.shape[1], rows.device, rows.dtype)


def _check_finite(target: Tensor, old: Pairs, pairs: Pairs) -> None:
    if not torch.isfinite(target).all():
        names = [a for a, _ in pairs if a not in dict(old)]
        raise ValueError(f"fusing adapters {names} gives non-finite weights; nothing was fused")
