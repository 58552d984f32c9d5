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
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict

from torch import Tensor

DEFAULT_BUDGET = 4 << 30
_budget: int | None = DEFAULT_BUDGET
_used: defaultdict[str, int] = defaultdict(int)
_lock = threading.Lock()


def set_budget(nbytes: int | None) -> None:
    """Bytes of kept weights allowed per device (0: no reuse; None: no limit). Applies to new
    entries; kept ones stay until their layer changes."""
    global _budget
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"budget must be a number of bytes >= 0 or None, got {nbytes!r}")
    _budget = nbytes


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
