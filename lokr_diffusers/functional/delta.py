"""The delta weight: W1 and W2 rebuilt from their stored parts (full, low-rank, Tucker), ΔW = scale ·
(W1 ⊗ W2) (`delta_weight`), added to a weight in one pass without the kron (`add_delta`), and adapters
applied to a weight in order (`adapt_weight`, `fold`), DoRA's included."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .dora import dora_weight
from .plan import Factors
from .rows import Rows, restrict_rows, row_blocks, take_rows, w2_rows


def rebuild_w1(f: Factors) -> Tensor:
    """W1 (out_l, in_m)."""
    if "lokr_w1" in f:
        return f["lokr_w1"]
    return f["lokr_w1_a"] @ f["lokr_w1_b"]


def rebuild_tucker(t2: Tensor, w2_a: Tensor, w2_b: Tensor) -> Tensor:
    """(r, r, *k), (r, out_k), (r, in_n) -> (out_k, in_n, *k)."""
    return torch.einsum("ij...,ip,jq->pq...", t2, w2_a, w2_b)


def rebuild_w2(f: Factors, out_k: int, in_n: int, kernel: Sequence[int]) -> Tensor:
    """W2 (out_k, in_n, *kernel)."""
    shape = (out_k, in_n, *kernel)
    if "lokr_w2" in f:
        return f["lokr_w2"].reshape(shape)
    if "lokr_t2" in f:
        t2 = f["lokr_t2"]
        t2 = t2.reshape(t2.shape[0], t2.shape[1], *kernel)  # PEFT's Conv1d core is (r, r, k, 1)
        return rebuild_tucker(t2, f["lokr_w2_a"], f["lokr_w2_b"])
    return (f["lokr_w2_a"] @ f["lokr_w2_b"].reshape(f["lokr_w2_b"].shape[0], -1)).reshape(shape)


def tucker_to_lowrank(t2: Tensor, w2_a: Tensor, w2_b: Tensor) -> tuple[Tensor, Tensor]:
    """A Tucker W2 as plain low-rank factors of the same rank, exactly: W2[p, (q,k)] =
    Σ_i w2_a[i, p] · (Σ_j t2[i, j, k] · w2_b[j, q]). Returns (w2_a' (out_k, r), w2_b' (r, in_n·prod(k)))."""
    b = torch.einsum("ij...,jq->iq...", t2, w2_b).reshape(t2.shape[0], -1)
    return w2_a.t().contiguous(), b.contiguous()


def make_kron(w1: Tensor, w2: Tensor) -> Tensor:
    """kron(W1, W2) with W1 unsqueezed to W2's rank: (out_l·out_k, in_m·in_n, *kernel)."""
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    return torch.kron(w1, w2.contiguous())  # kron of a non-contiguous tensor fails in torch


def delta_weight(f: Factors, weight_shape: Sequence[int], scale: float | Tensor = 1.0,
                 rows: Rows | None = None) -> Tensor:
    """ΔW = scale · W1 ⊗ W2, shaped like the layer's weight (out, in // groups, *kernel). With `rows`,
    the layer's rows of the fused ΔW: only W1's row blocks that cover them are built, then sliced."""
    if rows is not None:
        out_k = w2_rows(f)
        rb = row_blocks(rows, out_k)
        ext = delta_weight(restrict_rows(f, rb.blocks), (rb.rows * out_k, *weight_shape[1:]), scale)
        return take_rows(ext, rb.keep, 0)
    w1 = rebuild_w1(f)
    out_dim, in_dim, *kernel = weight_shape
    out_k, in_n = out_dim // w1.shape[0], in_dim // w1.shape[1]
    dw = make_kron(w1, rebuild_w2(f, out_k, in_n, kernel))
    return _times(dw, scale)


def _times(t: Tensor, scale: float | Tensor) -> Tensor:
    """t · scale; no op for the float 1 (a tensor scale, as under torch.compile, always multiplies:
    testing its value would be a data-dependent branch)."""
    return t * scale if isinstance(scale, Tensor) or scale != 1.0 else t


def add_delta(weight: Tensor, f: Factors, scale: float | Tensor = 1.0, inplace: bool = False,
              rows: Rows | None = None) -> Tensor:
    """weight + scale · W1 ⊗ W2 in one pass, without materialising the kron: W viewed as
    (out_l, out_k, in_m, in_n, *kernel) gets W1[i, :, j, :] · W2[:, p, :, q] by a broadcast addcmul.
    Falls back to delta_weight when shapes or dtypes do not allow the view. With `rows` on block
    edges, the same pass with W1's kept rows; otherwise ΔW of the kept blocks, sliced, then added."""
    if rows is not None:
        rb = row_blocks(rows, w2_rows(f))
        if rb.keep is None:
            return add_delta(weight, restrict_rows(f, rb.blocks), scale, inplace)
        delta = delta_weight(f, weight.shape, scale, rows).to(weight.dtype)
        return weight.add_(delta) if inplace else weight + delta
    w1 = rebuild_w1(f)
    out_dim, in_dim, *kernel = weight.shape
    out_l, in_m = w1.shape
    out_k, in_n = out_dim // out_l, in_dim // in_m
    w2 = rebuild_w2(f, out_k, in_n, kernel)
    if not weight.is_contiguous() or w1.dtype != weight.dtype or w2.dtype != weight.dtype:
        delta = delta_weight(f, weight.shape, scale).to(weight.dtype)
        return weight.add_(delta) if inplace else weight + delta
    ones = [1] * len(kernel)
    view = weight.view(out_l, out_k, in_m, in_n, *kernel)
    a = w1.reshape(out_l, 1, in_m, 1, *ones)
    b = w2.reshape(1, out_k, 1, in_n, *kernel)
    if isinstance(scale, Tensor):  # addcmul's value must be a number: scale the small factor instead
        a, scale = a * scale.to(a.dtype), 1.0
    if inplace:
        view.addcmul_(a, b, value=scale)
        return weight
    return torch.addcmul(view, a, b, value=scale).view(weight.shape)


def adapt_weight(weight: Tensor, f: Factors, scale: float | Tensor, dora_scale: Tensor | None = None,
                 strength: float | Tensor = 1.0, inplace: bool = False, rows: Rows | None = None) -> Tensor:
    """The weight after one adapter at `strength`: W + strength·scale·(W1 ⊗ W2), or for DoRA
    W + strength·(m·(W + ΔW)/‖W + ΔW‖ − W) with ΔW = scale·(W1 ⊗ W2), normalised in the wider of the
    two dtypes (fp16 weights are not normalised in fp16). In place only for the plain rule. `rows`:
    the layer holds those rows of the adapter's weight (its dora_scale is the layer's own)."""
    if dora_scale is None:
        return add_delta(weight, f, scale * strength, inplace=inplace, rows=rows)
    delta = delta_weight(f, weight.shape, scale, rows)
    dt = torch.promote_types(weight.dtype, delta.dtype)
    return dora_weight(weight.to(dt), delta.to(dt), dora_scale, strength).to(weight.dtype)


def fold(weight: Tensor, adapters: Sequence[tuple[Factors, float, Tensor | None, float, Rows | None]],
         inplace: bool = False) -> Tensor:
    """`weight` with (factors, scale, dora_scale, strength, rows) adapters applied in order by
    `adapt_weight` (order matters only for DoRA, which normalises the weight it is given). A new
    tensor, or with inplace=True `weight` itself where the rules allow (a DoRA step makes a new one)."""
    out = weight if inplace else weight.clone()
    for f, scale, dora, strength, rows in adapters:
        out = adapt_weight(out, f, scale, dora, strength, inplace=True, rows=rows)
    return out
