"""Errors raised below the training package that callers may want to catch by class. A leaf: it imports
nothing from the package, so `layers/` can raise them without importing `training/`."""

from __future__ import annotations


class AdapterFusedError(RuntimeError):
    """The adapter being trained is fused into the base weights: its factors no longer act on their own.

    Raised by a LoKr layer's forward when gradients would reach a fused adapter's factors, and by the
    training scripts' checks (`training.checks.check_not_fused`) before any step."""
