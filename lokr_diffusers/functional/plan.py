"""The shape plan: how a weight of shape (out, in // groups, *kernel) splits into W1 ⊗ W2, and which
factor is stored full, low-rank or Tucker (`LoKrPlan`), planned for a fresh adapter (`plan_lokr`, with
`factorization`) or read off stored tensors (`plan_from_tensors`). The math is in the package's docstring
and docs/formats.md §The math.

Factors travel as a mapping from the names in FACTOR_NAMES ("lokr_w1", ...) to tensors; absent names are absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

FACTOR_NAMES: tuple[str, ...] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

Factors = Mapping[str, Tensor]


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
