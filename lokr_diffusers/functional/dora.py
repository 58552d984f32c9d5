"""DoRA: the weight-decomposed rule, W'' = W + s·(m·(W + ΔW)/‖W + ΔW‖ − W), on either magnitude axis
(docs/formats.md §DoRA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def dora_on_output_axis(dora_scale: Tensor, weight_shape: Sequence[int]) -> bool:
    """DoRA's magnitude axis from dora_scale's shape: (out, 1[, 1, 1]) -> per output row (LyCORIS 4
    default), (1, in[, 1, 1]) -> per input column (A1111's axis). A 1-D vector of length out counts as rows."""
    if dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.shape[1] == weight_shape[1] != 1:
        return False
    if dora_scale.numel() != weight_shape[0]:
        raise ValueError(f"dora_scale {tuple(dora_scale.shape)} fits neither axis of weight {tuple(weight_shape)}")
    return True


def dora_weight(weight: Tensor, delta: Tensor, dora_scale: Tensor, strength: float | Tensor = 1.0) -> Tensor:
    """The DoRA-adapted weight W'' = W + s·(W' − W), W' = m · (W + ΔW) / (‖W + ΔW‖ + eps).

    The norm runs per output row or per input column, as dora_scale's shape says. This is the
    consumers' (ComfyUI / A1111) rule for a strength s; LyCORIS' own multiplier differs for s != 1
    (it scales only the magnitude step, not ΔW), at s = 1 they agree.
    """
    merged = weight + delta
    eps = torch.finfo(merged.dtype).eps
    if dora_on_output_axis(dora_scale, weight.shape):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (merged.dim() - 2))
    m = dora_scale.reshape(norm.shape).to(merged.dtype)
    adapted = merged * (m / (norm + eps))
    if isinstance(strength, Tensor) or strength != 1.0:
        return weight + strength * (adapted - weight)
    return adapted


def dora_row_norms(weight: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Per output row, shape (out,): (‖W‖ + eps as ComfyUI computes it, fp32; ‖W + ΔW‖ + eps as
    training computes it, in the wider dtype). ComfyUI divides an output-axis DoRA by the first where
    training divides by the second, so dora_scale · first / second is what a ComfyUI file must hold
    to give the trained weight at every strength (and a reader multiplies by the inverse)."""
    dt = torch.promote_types(weight.dtype, delta.dtype)
    merged = weight.to(dt) + delta.to(dt)
    adapted = merged.reshape(merged.shape[0], -1).norm(dim=1) + torch.finfo(dt).eps
    base = weight.float().reshape(weight.shape[0], -1).norm(dim=1) + torch.finfo(torch.float32).eps
    return base, adapted
