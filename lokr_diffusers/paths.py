"""Which of two equal computations a LoKr layer runs when it builds or applies its adapter within the
call (training, or inference where W + ΔW is not reused): "merged", one op with W + ΔW, or "bypass",
the factors applied to x. docs/performance.md §Choosing the path per device.

Two ways to choose, set per device type:
- "model": functional's cost model (`prefer_bypass`), calibrated on a 2-core CPU in fp32: the CPU's
  default;
- "measure": both paths timed once per (layer type, weight shape, factor layout, input shape, dtype,
  autocast, device, gradients) at first use, the faster one kept for the process, as
  `torch.backends.cudnn.benchmark` does: the default elsewhere (CUDA), where launch overhead more than
  arithmetic decides at the batch sizes people use and no constants calibrated on a CPU hold.

Measured choices can differ from run to run (like cudnn.benchmark's); the two paths agree in exact
arithmetic and within rounding in floating point. For bit-reproducible runs across processes use
`set_path_choice("model")` or a fixed `forward_mode` ("merged" / "bypass").
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Hashable

import torch

logger = logging.getLogger(__name__)

HOW = ("model", "measure")
DEFAULTS: dict[str, str] = {"cpu": "model", "meta": "model"}  # any other device type: "measure"
REPEATS = 3  # timed calls per path after one warm-up call each

_set: dict[str | None, str] = {}  # device type (None: all) -> how, set by set_path_choice
_measured: dict[Hashable, bool] = {}  # key -> bypass is faster
generation = 0  # bumped by set_path_choice: a layer's own cache of choices (layers/forward.py) is stale then


def set_path_choice(how: str | None, device_type: str | None = None) -> None:
    """How LoKr layers choose their path: "model" or "measure", for one device type ("cuda", "cpu",
    ...) or for all (None); how=None returns to the defaults (all device types when device_type is
    None). Measured choices made so far are forgotten."""
    global generation
    if how is not None and how not in HOW:
        raise ValueError(f"path choice must be one of {HOW} or None, got {how!r}")
    if how is None:
        if device_type is None:
            _set.clear()
        else:
            _set.pop(device_type, None)
    else:
        if device_type is None:
            _set.clear()
        _set[device_type] = how
    _measured.clear()
    generation += 1


def path_choice(device_type: str) -> str:
    """"model" or "measure" for this device type."""
    return _set.get(device_type) or _set.get(None) or DEFAULTS.get(device_type, "measure")


def measured(key: Hashable, measure: Callable[[], bool]) -> bool:
    """The cached choice for `key` (True: bypass), measured with `measure()` the first time."""
    hit = _measured.get(key)
    if hit is None:
        hit = _measured[key] = measure()
        logger.debug("path for %s: %s (measured)", key, "bypass" if hit else "merged")
    return hit


def bypass_is_faster(bypass: Callable[[], object], merged: Callable[[], object], device: torch.device) -> bool:
    """Time both (one warm-up call each, then REPEATS alternating calls, medians); True if bypass wins."""
    times: dict[str, list[float]] = {"bypass": [], "merged": []}
    runs = {"bypass": bypass, "merged": merged}
    for fn in runs.values():
        fn()
    for _ in range(REPEATS):
        for name, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["bypass"]) < statistics.median(times["merged"])


def can_measure(device: torch.device) -> bool:
    """Not while torch.compile traces or a CUDA graph is captured (timing would be meaningless or fail)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


def measure_paths(merged: Callable[[torch.Tensor], torch.Tensor], bypass: Callable[[torch.Tensor], torch.Tensor],
                 x: torch.Tensor, factors: list[torch.Tensor], needs_grad: bool, device: torch.device) -> bool:
    """Time one adapter's two paths on a layer's input x: `merged(x)` (the op with W + ΔW) and `bypass(x)`
    (the base op plus the factors applied to x); in training with backward to the factors that train
    (and x). Gradients are returned, never accumulated into .grad; the paths draw no random numbers
    (no rank dropout here). True: bypass wins."""
    xs = x.detach().requires_grad_(needs_grad and x.requires_grad)
    wanted = [t for t in factors if t.requires_grad]
    wanted += [xs] if xs.requires_grad else []

    def run(y: torch.Tensor) -> None:
        if needs_grad:
            torch.autograd.grad(y.float().sum(), wanted)

    # identity saved-tensor hooks on top: an active torch.utils.checkpoint must not see the timed
    # graphs (it counts the tensors a forward saves and compares them with its recomputation)
    with torch.enable_grad() if needs_grad else torch.no_grad(), \
            torch.autograd.graph.saved_tensors_hooks(_same, _same):
        return bypass_is_faster(lambda: run(bypass(xs)), lambda: run(merged(xs)), device)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t
