"""Applying ΔW without building it (the vec trick): `apply_lokr` gives ΔW·x for a Linear, Conv1d or
Conv2d from the factors alone; with a gradient wanted, the Linear case runs as the autograd Function
of `autograd.py` (docs/performance.md §How it computes)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import linear_bypass_fn
from .delta import rebuild_w1
from .plan import Factors, LoKrPlan
from .rows import Rows, restrict_rows, row_blocks, take_rows


@dataclass(frozen=True)
class ConvArgs:
    """What a conv layer passes to F.convNd besides the weight (groups must be 1 for bypass)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]


def apply_lokr(x: Tensor, f: Factors, plan: LoKrPlan, scale: float | Tensor, conv: ConvArgs | None = None,
               rows: Rows | None = None) -> Tensor:
    """ΔW·x without building ΔW (the vec trick): returns the adapter's output only.

    `rows` (plan is then the fused weight's): W1 cut to the row blocks covering the layer's rows, the
    usual trick on those, and the (blocks·out_k) outputs sliced to the layer's rows: as cheap as an
    unfused layer of that height.

    Linear: x (..., in_m·in_n) -> X (..., in_m, in_n); ΔW x = scale · flatten(W1 · X · W2ᵀ).
    Conv: the in_m channel groups fold into the batch, W2 (or w2_b, t2, w2_a) convolves each,
    then W1 mixes the groups: x (B, in_m·in_n, *S) -> (B, out_l·out_k, *S').
    With a gradient wanted (grad mode on, x or a factor requiring grad) the Linear case runs as one
    autograd Function (`_LinearBypass`); otherwise, and for convs, as plain ops.
    """
    if rows is not None:
        rb = row_blocks(rows, plan.out_k)
        y = apply_lokr(x, restrict_rows(f, rb.blocks), replace(plan, out_l=rb.rows), scale, conv)
        return take_rows(y, rb.keep, -1 if conv is None else 1)
    if conv is None:
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in f.values())):
            return linear_bypass_fn(x, f, scale)
        return _apply_lokr_linear(x, f, plan, rebuild_w1(f), scale)
    return _apply_lokr_conv(x, f, plan, rebuild_w1(f), scale, conv)


def _apply_lokr_linear(x: Tensor, f: Factors, plan: LoKrPlan, w1: Tensor, scale: float | Tensor) -> Tensor:
    lead, tokens = x.shape[:-1], x.numel() // (plan.in_m * plan.in_n)
    x2 = x.reshape(tokens * plan.in_m, plan.in_n)  # one row per (token, input group)
    if plan.w2_lowrank:
        # Three tall GEMMs, no transposed copies: W1 mixes the groups while the rank index rides
        # along, as kron(W1, I_r); w2_a's rows then land in the output's own (out_l, out_k) order.
        r = plan.rank2
        h = x2 @ f["lokr_w2_b"].t()  # (T·in_m, r)
        eye = torch.eye(r, dtype=w1.dtype, device=w1.device)
        h = h.reshape(tokens, plan.in_m * r) @ torch.kron(w1, eye).t()  # (T, out_l·r)
        y = h.reshape(tokens * plan.out_l, r) @ f["lokr_w2_a"].t()  # (T·out_l, out_k)
    else:
        h = (x2 @ f["lokr_w2"].t()).reshape(tokens, plan.in_m, plan.out_k)  # (T, in_m, out_k)
        y = torch.matmul(w1, h)  # (T, out_l, out_k)
    return y.reshape(*lead, plan.out_l * plan.out_k) * scale


def _apply_lokr_conv(x: Tensor, f: Factors, plan: LoKrPlan, w1: Tensor, scale: float | Tensor,
                     conv: ConvArgs) -> Tensor:
    nd = len(plan.kernel)
    op: Any = F.conv1d if nd == 1 else F.conv2d  # Any: torch's overloads split str / tuple padding
    ones = (1,) * nd
    batch, _, *spatial = x.shape
    xg = x.reshape(batch * plan.in_m, plan.in_n, *spatial)  # (B·in_m, in_n, *S)
    kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    if not plan.w2_lowrank:
        h = op(xg, f["lokr_w2"].reshape(plan.out_k, plan.in_n, *plan.kernel), **kw)
    elif plan.tucker:
        r = plan.rank2
        h = op(xg, f["lokr_w2_b"].reshape(r, plan.in_n, *ones))  # (B·in_m, r, *S)
        h = op(h, f["lokr_t2"].reshape(r, r, *plan.kernel), **kw)  # core: t2[i, j] maps j -> i
        h = op(h, f["lokr_w2_a"].t().reshape(plan.out_k, r, *ones))  # (B·in_m, out_k, *S')
    else:
        r = plan.rank2
        h = op(xg, f["lokr_w2_b"].reshape(r, plan.in_n, *plan.kernel), **kw)
        h = op(h, f["lokr_w2_a"].reshape(plan.out_k, r, *ones))
    out_spatial = h.shape[2:]
    h = h.reshape(batch, plan.in_m, -1)  # (B, in_m, out_k·S')
    y = torch.matmul(w1, h)  # (B, out_l, out_k·S')
    return y.reshape(batch, plan.out_l * plan.out_k, *out_spatial) * scale
