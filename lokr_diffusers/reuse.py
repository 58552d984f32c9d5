"""Reusing W + ΔW across calls at inference (the denoising loop), within a memory budget.

In a denoising loop the adapters do not change for 20-50 steps, so a LoKr layer keeps the adapted
weight it built and runs the bare op with it: the bare layer's cost per call. The kept weight is a
plain attribute of the layer (never in `state_dict()` or `save_pretrained()`), valid while the key
it was built under holds: the layer's state version (adapters, weights, enabled, fused), this call's
strengths (call scale included) and, for the base weight and every factor, its in-place version
counter, storage, dtype and device. So an optimizer step, a `copy_`, a dtype or device move, an
offloading hook swapping the storage, `set_adapters`, `disable_lokr`, fuse/unfuse: each shows in
the very next forward. Used only where it cannot be wrong or slow: no grad, eval mode, the layer
runs the op itself (no accelerate hook, no extra arguments), not while torch.compile traces, no
inference-mode tensors (they carry no version counter).

Memory: one weight-sized tensor per adapted layer, counted per device against a budget
(default 4 GiB per device; `set_budget(bytes)`, 0 turns reuse off, None lifts the limit). A layer
that would exceed it builds W + ΔW each call as before. Freed as soon as the layer's key changes, on
`train()`, on a dtype/device move, or with the layer. docs/performance.md §Reuse in the denoising loop.

Each layer owns one `Kept` (`layer.kept`): `entry`, the eager W + ΔW with its key, and `traced`, the
compiled one. Under torch.compile the key cannot be checked inside the graph, so a compiled layer keeps its
W + ΔW (`traced`, built and stored by the graph itself: Dynamo replays the attribute store) only
for adapters whose factors are frozen (trainable ones see in-place updates such as EMA copies) and
drops it on every commit, device/dtype move, `train()` / `eval()`, call-scale change,
`load_state_dict` and optimizer step (torch's global step hook), of every layer at once
(`forget_traced`): one layer dropping alone would be a new guard combination, a recompilation.
Dynamo then runs two graphs, one that builds and stores, one that reuses. Those weights are not
counted against the budget (a compiled graph cannot count); 0 still turns them off. Changing a
frozen factor's values in place by hand (not through `load_lokr_weights(hotswap=True)`,
`set_adapter_tensors` or an optimizer) needs `forget()` for a compiled model to see it.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence

from torch import Tensor

DEFAULT_BUDGET = 4 << 30
_budget: int | None = DEFAULT_BUDGET
_used: defaultdict[str, int] = defaultdict(int)
_lock = threading.Lock()


def set_budget(nbytes: int | None) -> None:
    """Bytes of kept weights allowed per device (0: no reuse, every kept weight dropped now; None: no
    limit). A new limit applies to new entries; kept ones stay until their layer changes."""
    global _budget
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"budget must be a number of bytes >= 0 or None, got {nbytes!r}")
    was, _budget = _budget, nbytes
    if nbytes == 0 and was != 0:
        forget()  # so that a layer's fast path needs no budget check: no entry exists while reuse is off


def budget() -> int | None:
    return _budget


def enabled() -> bool:
    return _budget != 0


def used(device: str | None = None) -> int:
    """Bytes kept now (on `device`, or on all devices)."""
    return _used[device] if device is not None else sum(_used.values())


def admit(t: Tensor) -> bool:
    """Count `t` against its device's budget if it fits (released when `t` is freed)."""
    nbytes, device = t.numel() * t.element_size(), str(t.device)
    with _lock:
        if _budget is not None and _used[device] + nbytes > _budget:
            return False
        _used[device] += nbytes
    weakref.finalize(t, _release, device, nbytes)
    return True


def _release(device: str, nbytes: int) -> None:
    with _lock:
        _used[device] -= nbytes


Stamps = tuple[tuple[int, int], ...]  # (in-place version, data_ptr) of each tensor W + ΔW was built from


class Entry:
    """A kept W + ΔW and the key it was built under: the layer's state version, the strengths, each
    tensor's stamp. `held`: those tensors, detached, so that no storage the stamps name can be freed
    and reused. `live`: the layer's own tensors when it was built for the layer's own strengths (its
    state version then stands for them: the layer's fast path compares stamps only), else None."""

    __slots__ = ("held", "live", "stamps", "strengths", "version", "weight")

    def __init__(self, version: int, strengths: tuple, stamps: Stamps, weight: Tensor, held: list[Tensor],
                 live: Sequence[Tensor] | None) -> None:
        self.version, self.strengths, self.stamps = version, strengths, stamps
        self.weight, self.held, self.live = weight, held, live


def stamps(tensors: Sequence[Tensor]) -> Stamps:
    """Raises RuntimeError for an inference-mode tensor (no version counter)."""
    return tuple([(t._version, t.data_ptr()) for t in tensors])


class Kept:
    """One layer's reused weights: `entry` (eager, its key checked on every use) and `traced` (stored by a
    compiled graph, dropped for all layers at once: `forget_traced`); and the layer's tensor list,
    looked up once per state version. A plain object (not slotted): compiled graphs store `traced`."""

    def __init__(self) -> None:
        self.entry: Entry | None = None
        self.traced: Tensor | None = None
        self.tensor_list: tuple[tuple, list[Tensor]] | None = None
        TRACED.kept.add(self)

    def drop(self) -> None:
        """The layer changed (state, dtype, device, train/eval): nothing kept holds."""
        self.entry = None
        self.tensor_list = None

    def tensors(self, key: tuple, collect: Callable[[], list[Tensor]]) -> list[Tensor]:
        """The tensors W + ΔW is built from, collected once per `key` (the layer's state version and the
        applied adapters)."""
        cached = self.tensor_list
        if cached is not None and cached[0] == key:
            return cached[1]
        tensors = collect()
        self.tensor_list = (key, tensors)
        return tensors

    def weight(self, version: int, strengths: tuple, tensors: list[Tensor], build: Callable[[], Tensor],
               own: bool) -> Tensor:
        """W + ΔW for these strengths: the kept one while its key holds, else `build()` (kept if the
        budget admits it). own: built for the layer's own strengths (the fast path may use it)."""
        try:
            now: Stamps | None = stamps(tensors)
        except RuntimeError:  # an inference-mode tensor: no version counter, nothing to key on
            now = None
        e = self.entry
        if e is not None and now is not None and e.version == version and e.strengths == strengths and \
                e.stamps == now:
            return e.weight
        self.entry = None
        w = build()
        if now is not None and admit(w):
            self.entry = Entry(version, strengths, now, w, [t.detach() for t in tensors], tensors if own else None)
        return w


class _Traced:

    """Every layer's `Kept`, and whether any holds a W + ΔW stored by a compiled graph now (set inside
    the graph, so that dropping them costs nothing while none does)."""

    def __init__(self) -> None:
        self.holding = False
        self.kept: weakref.WeakSet[Kept] = weakref.WeakSet()


TRACED = _Traced()
_hooked = False


def watch_optimizers() -> None:
    """Drop compiled graphs' kept weights after every optimizer step (an in-place change to base
    weights or factors); registered once, when the first LoKr layer is made."""
    global _hooked
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: forget_traced())
        _hooked = True


def forget_traced() -> None:
    """Drop every W + ΔW a compiled graph stored (all layers at once: see the module docstring)."""
    if TRACED.holding:
        for kept in list(TRACED.kept):
            kept.traced = None
        TRACED.holding = False


def forget() -> None:
    """Drop every kept W + ΔW, eager and compiled (after changing factor values by hand under
    torch.compile; eager reuse notices such changes by itself)."""
    forget_traced()
    for kept in list(TRACED.kept):
        kept.drop()
