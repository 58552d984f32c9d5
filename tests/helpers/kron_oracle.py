"""An independent reference for the nearest Kronecker product (Van Loan and Pitsianis): the rearranged matrix built
block by block with Python loops, and the optimum error from its singular values."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rearranged(delta: Tensor, out_l: int, in_m: int) -> Tensor:
    """Row (i, j) is the block ΔW[i·out_k:(i+1)·out_k, j·in_n:(j+1)·in_n] flattened (kernel included)."""
    out_k, in_n = delta.shape[0] // out_l, delta.shape[1] // in_m
    rows = []
    for i in range(out_l):
        for j in range(in_m):
            rows.append(delta[i * out_k:(i + 1) * out_k, j * in_n:(j + 1) * in_n].reshape(-1))
    return torch.stack(rows)


def optimum_error(delta: Tensor, out_l: int, in_m: int) -> float:
    """min over W1 (out_l, in_m), W2 of ‖ΔW − W1 ⊗ W2‖ / ‖ΔW‖: the singular values of the rearranged matrix after
    the first."""
    s = torch.linalg.svdvals(rearranged(delta.double(), out_l, in_m))
    return math.sqrt(float((s[1:] ** 2).sum())) / float(delta.double().norm())


def kron_weight(w1: Tensor, w2: Tensor) -> Tensor:
    """W1 ⊗ W2 for a Linear (2-D W2) or a conv (W2 (out_k, in_n, *k)), by loops over W1's entries."""
    out_k, in_n = w2.shape[:2]
    out = torch.zeros(w1.shape[0] * out_k, w1.shape[1] * in_n, *w2.shape[2:], dtype=w2.dtype)
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            out[i * out_k:(i + 1) * out_k, j * in_n:(j + 1) * in_n] = w1[i, j] * w2
    return out
