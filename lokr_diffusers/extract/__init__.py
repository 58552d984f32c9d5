"""Extraction: the LoKr nearest to a weight change, module by module (`nearest.py`), read lazily from two models
(`weights.py`), written in any export format with its error report (`run.py`)."""

from __future__ import annotations

from .nearest import Fit, candidate_splits, choose, nearest_lokr, relative_error

__all__ = ["Fit", "candidate_splits", "choose", "nearest_lokr", "relative_error"]
