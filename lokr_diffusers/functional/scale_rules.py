"""The scale rules: an adapter's scale from its producer's rule, and encoded for a consumer's
(docs/formats.md §Scale rules)."""

from __future__ import annotations

import math

from .plan import LoKrPlan


def peft_scale(alpha: float, r: int) -> float:
    """PEFT LoKrConfig: alpha / r, always (also when both factors are full)."""
    return float(alpha) / r


def lycoris_scale(alpha: float | None, r: int, both_full: bool, rs_lora: bool = False) -> float:
    """LyCORIS training: alpha / r (alpha / sqrt(r) with rs_lora); alpha None/0 -> r; both full -> 1."""
    if both_full:
        return 1.0
    a = float(r) if not alpha else float(alpha)
    return a / (math.sqrt(r) if rs_lora else r)


def consumer_scale(plan: LoKrPlan, alpha: float | None) -> float:
    """ComfyUI / A1111 / sd-scripts / diffusers: alpha / rank when an alpha exists and a factor is
    low-rank (rank = w2_b rows, else w1_b rows); 1.0 otherwise."""
    if alpha is None or plan.both_full:
        return 1.0
    return float(alpha) / plan.rank


def alpha_for_consumer(plan: LoKrPlan, scale: float) -> tuple[float | None, float]:
    """Encode `scale` for the consumer rule: returns (alpha to store, factor to bake into W1).

    Low-rank: alpha = scale · rank, W1 unchanged. Both full: no alpha is honoured, so W1 ·= scale.
    """
    if plan.both_full:
        return None, scale
    return scale * plan.rank, 1.0
