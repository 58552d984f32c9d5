"""The LoKr math: the one copy in this package. Tensors in, tensors out; no nn.Module, no I/O.

A LoKr adapter on a layer with weight W of shape (out, in, *kernel) adds

    ΔW = scale · (W1 ⊗ W2)        W1: (out_l, in_m)    W2: (out_k, in_n, *kernel)

with out = out_l·out_k and in = in_m·in_n (for a grouped conv, in = in_channels // groups).
Each factor is stored either full or low-rank (see docs/formats.md §The math and `plan_lokr`):

    W1 = lokr_w1                       | lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_m)
    W2 = lokr_w2                       | lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n·prod(kernel))
       | Tucker: W2[p,q,...] = Σ_ij lokr_t2[i,j,...] · lokr_w2_a[i,p] · lokr_w2_b[j,q]
         with lokr_t2 (r, r, *kernel), lokr_w2_a (r, out_k) (transposed!), lokr_w2_b (r, in_n)

Factors travel as a mapping from those names ("lokr_w1", ...) to tensors; absent names are absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

FACTOR_NAMES: tuple[str, ...] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

Factors = Mapping[str, Tensor]


# --------------------------------------------------------------------------------------------- shapes
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n) with m·n == dimension and m <= n (LyCORIS' rule).

    factor > 0 dividing `dimension`: (factor, dimension // factor), swapped so that m <= n.
    Otherwise (factor < 0 = unlimited): walk divisors upward, keep the last pair with m <= n,
    m <= factor and m + n shrinking; factor=-1 gives the pair nearest sqrt(dimension).
    Examples: 320 -> (16, 20), 768 -> (24, 32), 127 -> (1, 127); factor=4: 320 -> (4, 80).
    """
    if dimension <= 0:
        raise ValueError(f"cannot factorize dimension {dimension}")
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


@dataclass(frozen=True)
class LoKrPlan:
    """Which factor is full, low-rank or Tucker, and every tensor's shape.

    rank1 / rank2 are the ranks of the low-rank W1 / W2 (0 when that factor is full).
    """

    out_l: int
    out_k: int
    in_m: int
    in_n: int
    kernel: tuple[int, ...]
    rank1: int
    rank2: int
    tucker: bool

    @property
    def w1_lowrank(self) -> bool:
        return self.rank1 > 0

    @property
    def w2_lowrank(self) -> bool:
        return self.rank2 > 0

    @property
    def both_full(self) -> bool:
        return not self.w1_lowrank and not self.w2_lowrank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_l * self.out_k, self.in_m * self.in_n, *self.kernel)

    @property
    def rank(self) -> int:
        """The rank a consumer reads (w2_b's rows if W2 is low-rank, else w1_b's), 0 if both full."""
        return self.rank2 or self.rank1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        k = self.kernel
        out: dict[str, tuple[int, ...]] = {}
        if self.w1_lowrank:
            out["lokr_w1_a"] = (self.out_l, self.rank1)
            out["lokr_w1_b"] = (self.rank1, self.in_m)
        else:
            out["lokr_w1"] = (self.out_l, self.in_m)
        r = self.rank2
        if not self.w2_lowrank:
            out["lokr_w2"] = (self.out_k, self.in_n, *k)
        elif self.tucker:
            out["lokr_t2"] = (r, r, *k)
            out["lokr_w2_a"] = (r, self.out_k)
            out["lokr_w2_b"] = (r, self.in_n)
        else:
            out["lokr_w2_a"] = (self.out_k, r)
            out["lokr_w2_b"] = (r, self.in_n * math.prod(k))
        return out

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())


def plan_lokr(
    weight_shape: Sequence[int],
    r: int,
    decompose_factor: int = -1,
    decompose_both: bool = False,
    use_tucker: bool = False,
    full_matrix: bool = False,
) -> LoKrPlan:
    """Plan a fresh adapter for a weight of shape (out, in // groups, *kernel), as LyCORIS 4.x does."""
    if r <= 0:
        raise ValueError(f"rank r must be a positive integer, got {r}")
    out_dim, in_dim, *kernel = (int(s) for s in weight_shape)
    out_l, out_k = factorization(out_dim, decompose_factor)
    in_m, in_n = factorization(in_dim, decompose_factor)
    w1_low = decompose_both and r < max(out_l, in_m) / 2 and not full_matrix
    w2_low = r < max(out_k, in_n) / 2 and not full_matrix
    tucker = use_tucker and w2_low and any(k != 1 for k in kernel)
    return LoKrPlan(out_l, out_k, in_m, in_n, tuple(kernel), r if w1_low else 0, r if w2_low else 0, tucker)


def plan_from_tensors(weight_shape: Sequence[int], factors: Factors) -> LoKrPlan:
    """Read the plan off stored tensors and check that they rebuild a weight of `weight_shape`.

    Accepts conv W2 stored flattened (lokr_w2 as (out_k, in_n·k)) or 4-D, and PEFT's Conv1d
    Tucker core (r, r, k, 1). Raises ValueError naming what does not fit.
    """
    out_dim, in_dim, *kernel = (int(s) for s in weight_shape)
    kernel_t, kprod = tuple(kernel), math.prod(kernel)
    unknown = set(factors) - set(FACTOR_NAMES)
    if unknown:
        raise ValueError(f"unknown LoKr tensors {sorted(unknown)}")
    if "lokr_w1" in factors:
        if {"lokr_w1_a", "lokr_w1_b"} & set(factors):
            raise ValueError("both lokr_w1 and lokr_w1_a/lokr_w1_b are present")
        out_l, in_m = _dims(factors["lokr_w1"], 2, "lokr_w1")
        rank1 = 0
    elif "lokr_w1_a" in factors and "lokr_w1_b" in factors:
        out_l, rank1 = _dims(factors["lokr_w1_a"], 2, "lokr_w1_a")
        rank1b, in_m = _dims(factors["lokr_w1_b"], 2, "lokr_w1_b")
        if rank1b != rank1:
            raise ValueError(f"lokr_w1_a rank {rank1} != lokr_w1_b rank {rank1b}")
    else:
        raise ValueError("missing W1: need lokr_w1, or lokr_w1_a and lokr_w1_b")
    if out_dim % out_l or in_dim % in_m:
        raise ValueError(f"W1 {out_l}x{in_m} does not divide the weight {tuple(weight_shape)}")
    out_k, in_n = out_dim // out_l, in_dim // in_m
    tucker = "lokr_t2" in factors
    if "lokr_w2" in factors:
        if {"lokr_w2_a", "lokr_w2_b", "lokr_t2"} & set(factors):
            raise ValueError("both lokr_w2 and lokr_w2_a/lokr_w2_b/lokr_t2 are present")
        w2 = factors["lokr_w2"]
        if w2.numel() != out_k * in_n * kprod or w2.shape[0] != out_k:
            raise ValueError(f"lokr_w2 {tuple(w2.shape)} does not fit W2 {(out_k, in_n, *kernel_t)}")
        rank2 = 0
    elif "lokr_w2_a" in factors and "lokr_w2_b" in factors:
        a, b = factors["lokr_w2_a"], factors["lokr_w2_b"]
        if tucker:
            t2 = factors["lokr_t2"]
            rank2 = t2.shape[0]
            want = {"lokr_w2_a": (rank2, out_k), "lokr_w2_b": (rank2, in_n)}
            if t2.dim() < 2 or t2.shape[1] != rank2 or t2.numel() != rank2 * rank2 * kprod:
                raise ValueError(f"lokr_t2 {tuple(t2.shape)} does not fit {(rank2, rank2, *kernel_t)}")
        else:
            rank2 = b.shape[0]
            want = {"lokr_w2_a": (out_k, rank2), "lokr_w2_b": (rank2, in_n * kprod)}
        for name, t in (("lokr_w2_a", a), ("lokr_w2_b", b)):
            if t.dim() < 2 or t.shape[0] != want[name][0] or t.numel() != math.prod(want[name]):
                raise ValueError(f"{name} {tuple(t.shape)} does not fit {want[name]} for weight {tuple(weight_shape)}")
    else:
        raise ValueError("missing W2: need lokr_w2, or lokr_w2_a and lokr_w2_b")
    return LoKrPlan(out_l, out_k, in_m, in_n, kernel_t, rank1, rank2, tucker)


def _dims(t: Tensor, ndim: int, name: str) -> tuple[int, ...]:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return tuple(t.shape)


# ------------------------------------------------------------------------------------- row pieces
@dataclass(frozen=True)
class Rows:
    """A layer that holds only some rows of the weight an adapter was made for: a fused original module
    (Flux's `qkv`, `linear1`) split over diffusers' separate Linears (docs/formats.md §DiT models).

    The adapter's kron(W1, W2) is the fused weight, `height` = out_l·out_k rows; the layer's weight is
    rows pieces[0] of it, then pieces[1], ... (one piece for a to_q of a fused qkv; two for an adaLN
    projection whose (shift, scale) halves are swapped between the layouts). Exact: no refactorisation.
    """

    pieces: tuple[tuple[int, int], ...]  # (start, stop) row ranges of the fused weight, in the layer's row order
    height: int

    def __post_init__(self) -> None:
        if not self.pieces or any(not 0 <= a < b <= self.height for a, b in self.pieces):
            raise ValueError(f"row pieces {self.pieces} must be non-empty ranges within 0..{self.height}")

    @property
    def out(self) -> int:
        """The layer's rows."""
        return sum(b - a for a, b in self.pieces)


@dataclass(frozen=True)
class RowBlocks:
    """How a `Rows` restriction is computed: block l of kron(W1, W2) is rows [l·out_k, (l+1)·out_k), one row
    of W1 times W2. `blocks` are the W1 row ranges [l0, l1) kept (l0 = start // out_k, l1 = ceil(stop / out_k)
    per piece, contiguous ranges merged); the result of the restricted factors has rows·out_k rows, of which
    `keep` (row ranges, in the layer's order) are the layer's, or all of them (None) when every piece
    starts and stops on a block edge."""

    blocks: tuple[tuple[int, int], ...]
    keep: tuple[tuple[int, int], ...] | None

    @property
    def rows(self) -> int:
        """W1 rows kept (the restricted out_l)."""
        return sum(b - a for a, b in self.blocks)


def row_blocks(rows: Rows, out_k: int) -> RowBlocks:
    """The W1 row blocks that cover `rows`, and the rows to keep of what they give (see RowBlocks)."""
    blocks: list[tuple[int, int]] = []
    keep: list[tuple[int, int]] = []
    offset, aligned = 0, True
    for a, b in rows.pieces:
        l0, l1 = a // out_k, -(-b // out_k)
        aligned = aligned and a % out_k == 0 and b % out_k == 0
        keep.append((offset + a - l0 * out_k, offset + b - l0 * out_k))
        offset += (l1 - l0) * out_k
        if blocks and blocks[-1][1] == l0:  # contiguous with the previous piece's blocks: one range
            blocks[-1] = (blocks[-1][0], l1)
        else:
            blocks.append((l0, l1))
    return RowBlocks(tuple(blocks), None if aligned else tuple(keep))


def w2_rows(f: Factors) -> int:
    """out_k, W2's rows, from the stored tensors (Tucker's w2_a is (r, out_k))."""
    if "lokr_w2" in f:
        return int(f["lokr_w2"].shape[0])
    return int(f["lokr_w2_a"].shape[1 if "lokr_t2" in f else 0])


def restrict_rows(f: Factors, blocks: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """The factors with W1 (or a low-rank W1's w1_a) cut to the rows `blocks`: their kron is those
    row blocks of the full one. A slice of a Parameter, so gradients reach the shared factor."""
    name = "lokr_w1" if "lokr_w1" in f else "lokr_w1_a"
    t = f[name]
    part = t[blocks[0][0]:blocks[0][1]] if len(blocks) == 1 else torch.cat([t[a:b] for a, b in blocks])
    return {**f, name: part}


def take_rows(t: Tensor, keep: Sequence[tuple[int, int]] | None, dim: int) -> Tensor:
    """The row ranges `keep` of `t` along `dim`, concatenated (t itself for None)."""
    if keep is None:
        return t
    parts = [t.narrow(dim, a, b - a) for a, b in keep]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def restricted_plan(plan: LoKrPlan, rows: Rows | None) -> LoKrPlan:
    """The plan of what a layer holding `rows` computes (out_l cut to the kept blocks): for the cost
    model and the vec trick; `plan` is the fused weight's."""
    if rows is None:
        return plan
    return replace(plan, out_l=row_blocks(rows, plan.out_k).rows)


def rows_aligned(rows: Rows, out_k: int) -> bool:
    """Every piece starts and stops on a W1 block edge: the layer's ΔW is itself a Kronecker product
    (W1's kept rows ⊗ W2), so every path of an unfused layer runs on the restricted factors."""
    return row_blocks(rows, out_k).keep is None


# ------------------------------------------------------------------------------------ rebuild ΔW
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


# ------------------------------------------------------------------------ apply without building ΔW
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
            return _apply_lokr_linear_fn(x, f, scale)
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


def _apply_lokr_linear_fn(x: Tensor, f: Factors, scale: float | Tensor) -> Tensor:
    """`_apply_lokr_linear` through `_LinearBypass` (for training: fewer ops, lean saved tensors;
    autocast as `_apply_cast` says)."""
    if isinstance(scale, Tensor):  # traced (torch.compile): the Function's scale must be a number
        return _apply_lokr_linear_fn(x, f, 1.0) * scale
    return _apply_cast(_LinearBypass, [x, None, None, *(f.get(n) for n in _LINEAR_NAMES)], scale)


def apply_bypass_linear(x: Tensor, weight: Tensor, bias: Tensor | None, f: Factors,
                        scale: float | Tensor, rows: Rows | None = None) -> Tensor:
    """F.linear(x, W, bias) + scale · ΔW x for training, as one autograd Function (`_LinearBypass`
    with the base op inside): the adapter's output is accumulated into the base output's buffer and
    its input gradient into the base's, so neither the forward nor the backward adds two full-size
    tensors. A tensor scale (torch.compile) multiplies W1's small factor first, as in
    `apply_merged_linear`. `rows` must lie on W1 block edges (`rows_aligned`): W1 is cut to them."""
    f = _aligned(f, rows)
    w1, w1_a, scale = _fold_scale(f, scale)
    return _apply_cast(_LinearBypass, [x, weight, bias, w1, w1_a, f.get("lokr_w1_b"), f.get("lokr_w2"),
                                       f.get("lokr_w2_a"), f.get("lokr_w2_b")], scale)


def _aligned(f: Factors, rows: Rows | None) -> Factors:
    """The factors cut to `rows`, which must lie on W1 block edges (ValueError otherwise)."""
    if rows is None:
        return f
    rb = row_blocks(rows, w2_rows(f))
    if rb.keep is not None:
        raise ValueError(f"row pieces {rows.pieces} do not lie on W1 block edges (out_k {w2_rows(f)}); "
                         "use apply_lokr(..., rows=) and the base op apart")
    return restrict_rows(f, rb.blocks)


def _fold_scale(f: Factors, scale: float | Tensor) -> tuple[Tensor | None, Tensor | None, float]:
    """(W1 or None, w1_a or None, the Function's scale): a tensor scale (its value must not be a
    number the graph guards on) multiplies W1's small factor, and the Function's scale is then 1."""
    w1, w1_a = f.get("lokr_w1"), f.get("lokr_w1_a")
    if not isinstance(scale, Tensor):
        return w1, w1_a, scale
    if w1 is not None:
        return w1 * scale.to(w1.dtype), w1_a, 1.0
    return w1, cast(Tensor, w1_a) * scale.to(cast(Tensor, w1_a).dtype), 1.0


def _apply_cast(function: type[torch.autograd.Function], tensors: list[Tensor | None], scale: float) -> Tensor:
    """function.apply(*tensors, scale); under autocast the tensors are cast first, as autocast would
    cast them for each matmul (floating tensors but float64), and the Function runs with autocast off,
    so its backward sees one dtype; the casts are recorded outside, so gradients come back in each
    tensor's own dtype."""
    device_type = cast(Tensor, tensors[0]).device.type
    if not torch.is_autocast_enabled(device_type):
        return cast(Tensor, function.apply(*tensors, scale))
    dt = torch.get_autocast_dtype(device_type)
    tensors = [t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
               for t in tensors]
    with torch.autocast(device_type, enabled=False):
        return cast(Tensor, function.apply(*tensors, scale))


def _halves(g: Tensor, a: Tensor | None, b: Tensor | None, need_a: bool, need_b: bool
            ) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of a (m, r) and b (r, n) from g = dL/d(a @ b) (m, n), those wanted only."""
    return (g @ cast(Tensor, b).t() if need_a else None, cast(Tensor, a).t() @ g if need_b else None)


_LINEAR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class _LinearBypass(torch.autograd.Function):
    """y = [x Wᵀ + b] + scale · flatten(W1 · X · W2ᵀ) per token, X (in_m, in_n) the token's input, as
    one node; the bracket only when W is given (`apply_bypass_linear`), else the adapter alone.

    Forward: A = X W2ᵀ (X w2_bᵀ for a low-rank W2) is one tall GEMM over all (token, input group)
    rows; W1 mixes the groups by one bmm against W1 expanded over the tokens (a stride-0 view, no
    copy); a low-rank W2 ends with a tall GEMM by w2_a. With W, the last product accumulates into
    the base output (baddbmm / addmm_), and backward the adapter's dx into the base's dx = g W.
    The scale rides on a tiny tensor, the W2 factor on the output side of A's GEMM (w2, or w2_a),
    so every other gradient carries it for free and that factor's own gradient takes it back
    through addmm's alpha. Saved: only what the wanted gradients read (`needs_input_grad`), never
    a weight-sized tensor but W itself when x wants a gradient. Backward is once-differentiable.
    Inputs are numbered as `_LinearMerged`'s: x, W, b, w1, w1_a, w1_b, w2, w2_a, w2_b.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, w1: Tensor | None,
                w1_a: Tensor | None, w1_b: Tensor | None, w2: Tensor | None, w2_a: Tensor | None,
                w2_b: Tensor | None, scale: float) -> Tensor:
        need = ctx.needs_input_grad
        lowrank1, lowrank2 = w1 is None, w2 is None
        w1f = cast(Tensor, w1_a) @ cast(Tensor, w1_b) if lowrank1 else cast(Tensor, w1)  # (out_l, in_m)
        out_l, in_m = w1f.shape
        first = cast(Tensor, w2_b if lowrank2 else w2)  # (c, in_n), c = r (low-rank W2) or out_k
        if not lowrank2 and scale != 1.0:
            first = first * scale
        c, in_n = first.shape
        tokens = x.numel() // (in_m * in_n)
        x2 = x.reshape(tokens * in_m, in_n)  # one row per (token, input group)
        a3 = (x2 @ first.t()).view(tokens, in_m, c)
        w1e = w1f.expand(tokens, out_l, in_m)
        base = None
        if weight is not None:  # F.linear's own kernel on the flattened rows: (T, out)
            xf = x2.view(tokens, in_m * in_n)
            base = xf @ weight.t() if bias is None else torch.addmm(bias, xf, weight.t())
        last = None
        if lowrank2:
            b3 = torch.bmm(w1e, a3)  # (T, out_l, r)
            last = cast(Tensor, w2_a) if scale == 1.0 else cast(Tensor, w2_a) * scale  # (out_k, r)
            b2 = b3.view(tokens * out_l, c)
            # (T·out_l, out_k): the rows of (T, out) in the same order, so the base buffer takes it
            y = b2 @ last.t() if base is None else base.view(tokens * out_l, -1).addmm_(b2, last.t())
        else:
            b2 = None
            y = torch.bmm(w1e, a3) if base is None else torch.baddbmm(base.view(tokens, out_l, c), w1e, a3)
        grad_w1 = need[3] or need[4] or need[5]
        grad_w2 = need[8] if lowrank2 else need[6]  # w2_b or w2: the factor next to X
        grad_a = need[0] or grad_w2  # these need dL/dA
        rescale = scale != 1.0 and (need[7] if lowrank2 else need[6])  # addmm's shape argument
        ctx.dims = (tokens, out_l, in_m, c, c if last is None else last.shape[0])  # ..., out_k
        ctx.lowrank, ctx.scale, ctx.x_shape = (lowrank1, lowrank2), scale, x.shape
        ctx.save_for_backward(
            x2 if grad_w2 or need[1] else None,  # dW2 = dAᵀ X; dW = gᵀ x
            first if need[0] or (rescale and not lowrank2) else None,  # dX = dA · W2
            a3 if grad_w1 else None,  # dW1 = Σ_t dB_t A_tᵀ
            w1e if grad_a else None,  # dA_t = W1ᵀ dB_t
            w1_a if lowrank1 and need[5] else None,
            w1_b if lowrank1 and need[4] else None,
            b2 if lowrank2 and need[7] else None,  # dw2_a = dYᵀ B, B as (T·out_l, r)
            last if lowrank2 and (grad_a or grad_w1 or rescale) else None,  # dB = dY · w2_a
            weight if need[0] else None,  # the base's dx = g W
        )
        return y.view(*x.shape[:-1], out_l * ctx.dims[4])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad
        x2, first, a3, w1e, w1_a, w1_b, b2, last, weight = ctx.saved_tensors
        tokens, out_l, in_m, c, out_k = ctx.dims
        lowrank1, lowrank2 = ctx.lowrank
        scale = ctx.scale
        gx = gw = gb = gw1 = gw1_a = gw1_b = gw2 = gw2_a = gw2_b = None
        gy = gy.contiguous()  # a loss like y.sum() sends a stride-0 grad: bmm on it is ~25x slower
        if need[1] or need[2] or weight is not None:
            g_flat = gy.view(tokens, out_l * out_k)
            gw = g_flat.t() @ x2.view(tokens, -1) if need[1] else None
            gb = g_flat.sum(0) if need[2] else None
            gx = g_flat @ weight if weight is not None else None  # (T, in): the base's dx
        if lowrank2:
            g2 = gy.view(tokens * out_l, out_k)
            if need[7]:  # dw2_a = scale · dYᵀ B
                gw2_a = g2.t() @ b2 if scale == 1.0 else torch.addmm(last, g2.t(), b2, beta=0, alpha=scale)
            if w1e is None and a3 is None:
                return gx, gw, gb, None, None, None, None, gw2_a, None, None
            gb3 = (g2 @ last).view(tokens, out_l, c)  # dL/dB
        else:
            gb3 = gy.view(tokens, out_l, c)
        if a3 is not None:  # dW1 = Σ_t dB_t A_tᵀ (the scale is in dB or in A already)
            g_w1 = torch.bmm(gb3, a3.transpose(1, 2)).sum(0)  # (out_l, in_m)
            if not lowrank1:
                gw1 = g_w1
            gw1_a, gw1_b = _halves(g_w1, w1_a, w1_b, need[4], need[5])
        if w1e is not None:
            ga = torch.bmm(w1e.transpose(1, 2), gb3).view(tokens * in_m, c)  # dL/dA
            if need[0]:  # dX = dA · W2, into the base's dx where there is one
                gx = (ga @ first if gx is None else gx.view(tokens * in_m, -1).addmm_(ga, first)).view(ctx.x_shape)
            if lowrank2 and need[8]:
                gw2_b = ga.t() @ x2
            elif not lowrank2 and need[6]:  # A = X (scale·w2)ᵀ: dw2 = scale · dAᵀ X
                gw2 = ga.t() @ x2 if scale == 1.0 else torch.addmm(first, ga.t(), x2, beta=0, alpha=scale)
        return gx, gw, gb, gw1, gw1_a, gw1_b, gw2, gw2_a, gw2_b, None


def apply_merged_linear(x: Tensor, weight: Tensor, bias: Tensor | None, f: Factors,
                        scale: float | Tensor, rows: Rows | None = None) -> Tensor:
    """F.linear(x, W + scale · W1 ⊗ W2, bias) for training, as one autograd Function (`_LinearMerged`).

    Forward builds W + ΔW in one pass (add_delta's addcmul view, no kron) and runs one linear;
    backward forms dx from that weight and the factors' gradients by the vec trick, never the
    full-size dL/d(W + ΔW) = gᵀx. W must be contiguous (the view). Under autocast the inputs are
    cast here, as autocast casts a linear's (floating tensors but float64), and the Function runs
    with autocast off; the casts are recorded outside, so gradients come back in each tensor's dtype.
    A tensor scale (torch.compile) multiplies W1's small factor before the Function (its value must
    not be a number the graph guards on), so the Function's own scale is then 1. `rows` must lie on
    W1 block edges (`rows_aligned`): the Function then runs on W1's kept rows."""
    f = _aligned(f, rows)
    w1, w1_a, scale = _fold_scale(f, scale)  # W + ΔW is not linear in the scale: fold it into W1's factor
    return _apply_cast(_LinearMerged, [x, weight, bias, w1, w1_a, f.get("lokr_w1_b"), f.get("lokr_w2"),
                                       f.get("lokr_w2_a"), f.get("lokr_w2_b")], scale)


class _LinearMerged(torch.autograd.Function):
    """y = x · (W + scale · W1 ⊗ W2)ᵀ + b as one node: the merged path in training.

    With X_t (in_m, in_n) a token's input and G_t (out_l, out_k) its output gradient, the factors'
    gradients need only small contractions (no (out, in) gᵀx):
        dW1 = scale · Σ_t G_t W2 X_tᵀ      C = G W2: one tall GEMM (T·out_l, out_k)·(out_k, in_n),
                                           then a bmm against Xᵀ summed over the tokens
        dW2 = scale · Σ_t G_tᵀ W1 X_t      B = W1 X_t: one bmm (W1 expanded, a view), then one GEMM
                                           contracting (token, out_l) rows
    and a low-rank factor takes its two halves from these by two small GEMMs. The scale rides in
    the GEMMs' alpha (beta = 0 with any tensor of the output's shape: its values are not read).
    dx = g · (W + ΔW), from the weight forward built: one GEMM, as the bare layer's backward.

    Saved, by `needs_input_grad`: W + ΔW only when x wants a gradient (one weight-sized tensor per
    layer, as PEFT keeps ΔW for its second linear and F.linear(x, W + ΔW) keeps W + ΔW; rebuilding
    it in backward instead would cost two more ops and a pass over the weight), x only when a
    factor or W wants a gradient, and the small factors.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor | None,
                w1_a: Tensor | None, w1_b: Tensor | None, w2: Tensor | None, w2_a: Tensor | None,
                w2_b: Tensor | None, scale: float) -> Tensor:
        need = ctx.needs_input_grad
        lowrank1, lowrank2 = w1 is None, w2 is None
        w1f = cast(Tensor, w1_a) @ cast(Tensor, w1_b) if lowrank1 else cast(Tensor, w1)  # (out_l, in_m)
        w2f = cast(Tensor, w2_a) @ cast(Tensor, w2_b) if lowrank2 else cast(Tensor, w2)  # (out_k, in_n)
        out_l, in_m = w1f.shape
        out_k, in_n = w2f.shape
        out_dim, in_dim = weight.shape
        # W viewed (out_l, out_k, in_m, in_n) + W1[l, m] · W2[k, n]: W2 as (out_k, 1, in_n) broadcasts
        # as (1, out_k, 1, in_n), one view fewer than spelling the leading 1 out
        w_eff = torch.addcmul(weight.view(out_l, out_k, in_m, in_n), w1f.view(out_l, 1, in_m, 1),
                              w2f.view(out_k, 1, in_n), value=scale).view(out_dim, in_dim)
        x2 = x.reshape(-1, in_dim)  # (T, in): a view unless x is strided
        # F.linear's own kernel for a >2-D input (addmm on the flattened rows): the same numbers
        y = x2 @ w_eff.t() if bias is None else torch.addmm(bias, x2, w_eff.t())
        grad_w1 = need[3] or need[4] or need[5]
        grad_w2 = need[6] or need[7] or need[8]
        ctx.dims = (out_l, in_m, out_k, in_n)
        ctx.lowrank, ctx.scale, ctx.x_shape = (lowrank1, lowrank2), scale, x.shape
        ctx.save_for_backward(
            w_eff if need[0] else None,  # dx = g (W + ΔW)
            x2 if need[1] or grad_w1 or grad_w2 else None,
            w1f if grad_w2 or (grad_w1 and scale != 1.0) else None,  # B = W1 X; baddbmm's shape argument
            w2f if grad_w1 or grad_w2 else None,  # C = G W2; addmm's shape argument
            w1_a if lowrank1 and need[5] else None,
            w1_b if lowrank1 and need[4] else None,
            w2_a if lowrank2 and need[8] else None,
            w2_b if lowrank2 and need[7] else None,
        )
        return y.view(*x.shape[:-1], out_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad
        w_eff, x2, w1f, w2f, w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        out_l, in_m, out_k, in_n = ctx.dims
        lowrank1, lowrank2 = ctx.lowrank
        scale = ctx.scale
        gx = gw = gb = gw1 = gw1_a = gw1_b = gw2 = gw2_a = gw2_b = None
        # no .contiguous(): every GEMM below takes gy through mm, which copes with the stride-0
        # gradient of a loss like y.sum(); the bmms run on tensors made here
        g2 = gy.reshape(-1, out_l * out_k)  # (T, out)
        if need[0]:
            gx = (g2 @ w_eff).view(ctx.x_shape)
        if need[1]:
            gw = g2.t() @ x2
        if need[2]:
            gb = g2.sum(0)
        grad_w1 = need[3] or need[4] or need[5]
        grad_w2 = need[6] or need[7] or need[8]
        if grad_w1 or grad_w2:
            tokens = x2.shape[0]
            gk = gy.reshape(tokens * out_l, out_k)  # one row per (token, output group)
            x3 = x2.view(tokens, in_m, in_n)
            if grad_w1:  # dW1 = scale · Σ_t (G_t W2) X_tᵀ
                c3 = (gk @ w2f).view(tokens, out_l, in_n)
                if scale == 1.0:
                    per_token = torch.bmm(c3, x3.transpose(1, 2))
                else:
                    per_token = torch.baddbmm(w1f, c3, x3.transpose(1, 2), beta=0, alpha=scale)
                g_w1 = per_token.sum(0)  # (out_l, in_m)
                if not lowrank1:
                    gw1 = g_w1
                gw1_a, gw1_b = _halves(g_w1, w1_a, w1_b, need[4], need[5])
            if grad_w2:  # dW2 = scale · Σ_(t, l) G[t, l]ᵀ (W1 X_t)[l]
                b2 = torch.bmm(w1f.expand(tokens, out_l, in_m), x3).view(tokens * out_l, in_n)
                g_w2 = gk.t() @ b2 if scale == 1.0 else torch.addmm(w2f, gk.t(), b2, beta=0, alpha=scale)
                if not lowrank2:
                    gw2 = g_w2
                gw2_a, gw2_b = _halves(g_w2, w2_a, w2_b, need[7], need[8])
        return gx, gw, gb, gw1, gw1_a, gw1_b, gw2, gw2_a, gw2_b, None


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


# --------------------------------------------------------------------------------- cost model
# Costs in "big-GEMM multiply-adds". The bypass runs skinny GEMMs/convs that are bound by memory,
# not arithmetic: each activation element they read or write costs about as much as MOVED
# multiply-adds, and a pass over a weight-sized tensor (kron, add, the kron's backward) about
# STREAMED. Calibrated on a 2-core CPU in fp32 with benchmarks/bench_layers.py, where the model
# picks the faster path at every SD1.5 / CLIP shape measured.
MOVED = 60
STREAMED = 20


def bypass_flops_and_traffic(plan: LoKrPlan, tokens: int, needs_grad: bool = False) -> tuple[int, int]:
    """(multiply-adds, activation elements read or written) of `apply_lokr` for `tokens` outputs
    (needs_grad: as `_LinearBypass` runs it)."""
    k = math.prod(plan.kernel)
    r = plan.rank2
    rows = tokens * plan.in_m  # each input group is multiplied / convolved on its own
    io = tokens * (plan.in_m * plan.in_n + 2 * plan.out_l * plan.out_k)  # read x, write y, add y
    if not plan.kernel and needs_grad:  # `_LinearBypass` with the base op: y accumulates in its buffer
        io = tokens * (plan.in_m * plan.in_n + plan.out_l * plan.out_k)
    if not plan.kernel and plan.w2_lowrank:  # linear: w2_b, the W1 mix, w2_a
        # without gradients W1 mixes as kron(W1, I_r) (r times the multiply-adds, one GEMM);
        # `_LinearBypass` mixes by a bmm against W1 expanded over the tokens
        mix = plan.in_m * plan.out_l * (1 if needs_grad else r)
        flops = tokens * r * (plan.in_m * plan.in_n + mix + plan.out_l * plan.out_k)
        return flops, io + tokens * r * (plan.in_m + plan.out_l)
    if not plan.w2_lowrank:
        flops, inner = rows * plan.out_k * plan.in_n * k, rows * plan.out_k
    elif plan.tucker:
        flops, inner = rows * r * (plan.in_n + r * k + plan.out_k), rows * (2 * r + plan.out_k)
    else:
        flops, inner = rows * r * (plan.in_n * k + plan.out_k), rows * (r + plan.out_k)
    return flops + tokens * plan.out_l * plan.in_m * plan.out_k, io + inner


def bypass_cost(plan: LoKrPlan, tokens: int, needs_grad: bool) -> float:
    """Extra cost of applying the factors to x (backward: about twice the forward again)."""
    flops, traffic = bypass_flops_and_traffic(plan, tokens, needs_grad)
    return (3 if needs_grad else 1) * (flops + MOVED * traffic)


def merged_cost(plan: LoKrPlan, tokens: int, needs_grad: bool) -> float:
    """Extra cost of one matmul with W + ΔW instead of W alone.

    Building ΔW and adding it to W: two passes over a weight-sized tensor. With gradients:
    - a conv forms dL/d(W+ΔW) = gᵀx (a full-size matmul the frozen base never pays) and reduces it
      back through the kron (about four more passes);
    - a linear layer runs `_LinearMerged`: dx costs what the bare layer's does, and the factors'
      gradients are the vec trick's small GEMMs, C = G W2 and B = W1 X (T·out_l·in_n·out_k and
      T·out_l·in_m·in_n multiply-adds, then as many again to contract them with X and G), bound by
      their traffic: g and x read twice, C and B written and read, the per-token (out_l, in_m)
      products written and summed.
    """
    numel = math.prod(plan.weight_shape)
    build = 2 * STREAMED * numel
    if not needs_grad:
        return build
    if plan.kernel:
        return tokens * numel + 6 * STREAMED * numel
    out_l, in_m, out_k, in_n = plan.out_l, plan.in_m, plan.out_k, plan.in_n
    flops = 2 * tokens * out_l * in_n * (out_k + in_m)
    traffic = tokens * (2 * out_l * out_k + 2 * in_m * in_n + 4 * out_l * in_n + 2 * out_l * in_m)
    return build + flops + MOVED * traffic


def prefer_bypass(plan: LoKrPlan, tokens: int, needs_grad: bool) -> bool:
    """True when applying the factors is cheaper than one matmul with W + ΔW."""
    return bypass_cost(plan, tokens, needs_grad) < merged_cost(plan, tokens, needs_grad)


# ----------------------------------------------------------------------------------------- DoRA
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


# ---------------------------------------------------------------------------------- scale rules
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
