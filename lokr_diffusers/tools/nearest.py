"""The nearest LoKr to a weight change ΔW, for one module (Van Loan and Pitsianis, "Approximation with Kronecker
products", 1993).

ΔW (out_l·out_k, in_m·in_n, *k) rearranged as R (out_l·in_m, out_k·in_n·prod(k)), R[(i, j), (p, q, κ)] =
ΔW[i·out_k + p, j·in_n + q, κ], turns a Kronecker product into an outer product: ΔW = W1 ⊗ W2 exactly when
R = vec(W1) vec(W2)ᵀ, and ‖ΔW − W1 ⊗ W2‖_F = ‖R − vec(W1) vec(W2)ᵀ‖_F. So the best W1 ⊗ W2 in Frobenius norm is
R's top singular pair, σ₁ u₁ v₁ᵀ, with error² = ‖R‖² − σ₁². A low-rank W2 (or W1) is fitted by alternating least
squares from there: with W1 fixed, the best W2 of rank r is the rank-r SVD truncation of Rᵀ vec(W1) / ‖W1‖²
(reshaped as a matrix), and the other way round; each step lowers the error. A conv's W2 is LoKr's flattened
(out_k, in_n·prod(k)) matrix, or with `tucker` a Tucker core and two projections (HOSVD of the fitted W2).

The reported error is measured, not estimated: the factors are rebuilt by `functional.delta_weight` (the one copy
of the LoKr math) and compared with ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as LF

FULL_SVD_MAX = 256  # the smaller side of a matrix up to which the exact SVD runs; above, a seeded randomized one
ALS_STEPS = 12  # alternating steps for a low-rank factor; each lowers the error, most gain is in the first few


class BudgetTooSmall(ValueError):
    """No split of a module fits its parameter budget."""


@dataclass(frozen=True)
class Fit:
    """One module's LoKr: the factors (fp32, scale 1), their plan, the measured relative error ‖ΔW − ΔŴ‖ / ‖ΔW‖ and
    the stored parameter count."""

    factors: dict[str, Tensor]
    plan: LF.LoKrPlan
    error: float
    numel: int


def rearrange(delta: Tensor, out_l: int, in_m: int) -> Tensor:
    """ΔW (out, in, *k) -> R (out_l·in_m, out_k·in_n·prod(k)): ΔW = W1 ⊗ W2 exactly when R = vec(W1) vec(W2)ᵀ."""
    out, inn = delta.shape[:2]
    out_k, in_n = out // out_l, inn // in_m
    return delta.reshape(out_l, out_k, in_m, in_n, -1).permute(0, 2, 1, 3, 4).reshape(out_l * in_m, -1)


def top_pair(r: Tensor) -> tuple[float, Tensor, Tensor]:
    """R's top singular value and vectors (σ₁, u₁, v₁): exact SVD for a small R, randomized above FULL_SVD_MAX."""
    if min(r.shape) <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return float(s[0]), u[:, 0], vh[0]
    gen = torch.Generator(device=r.device).manual_seed(0)
    q = min(8, min(r.shape))
    u, s, v = seeded_svd_lowrank(r, q, gen)
    return float(s[0]), u[:, 0], v[:, 0]


def seeded_svd_lowrank(r: Tensor, q: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A randomized SVD with a seeded start (torch.svd_lowrank draws from the global generator)."""
    x = torch.randn(r.shape[1], q + 4, generator=gen, device=r.device, dtype=r.dtype)
    y = r @ x
    for _ in range(4):  # power iterations sharpen the top of the spectrum
        y = r @ (r.T @ torch.linalg.qr(y).Q)
    basis = torch.linalg.qr(y).Q  # (rows, q + 4)
    u, s, vh = torch.linalg.svd(basis.T @ r, full_matrices=False)
    return (basis @ u)[:, :q], s[:q], vh[:q].T


def truncate(m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` approximation of m as (a (rows, rank), b (rank, cols)), a @ b."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def low_rank_worth(rows: int, cols: int, rank: int) -> bool:
    """A rank-`rank` pair stores fewer numbers than the full matrix (otherwise the factor is kept full)."""
    return 0 < rank < min(rows, cols) and rank * (rows + cols) < rows * cols


def nearest_lokr(delta: Tensor, out_l: int, in_m: int, rank: int = 0, decompose_both: bool = False,
                 tucker: bool = False) -> Fit:
    """The LoKr nearest to `delta` (fp32, (out, in // groups, *kernel)) with W1 (out_l, in_m): W2 full, or of rank
    `rank` where that stores less (and W1 too with `decompose_both`); a conv's low-rank W2 as a Tucker core with
    `tucker`. Raises ValueError for a split that does not divide the weight."""
    out, inn, *kernel = delta.shape
    if out % out_l or inn % in_m:
        raise ValueError(f"W1 {out_l}x{in_m} does not divide the weight {tuple(delta.shape)}")
    out_k, in_n, kprod = out // out_l, inn // in_m, math.prod(kernel)
    r = rearrange(delta, out_l, in_m)  # (out_l·in_m, out_k·in_n·kprod)
    sigma, u, v = top_pair(r)
    root = math.sqrt(sigma)
    a, b = u * root, v * root  # vec(W1), vec(W2)
    low2 = low_rank_worth(out_k, in_n * kprod, rank)
    low1 = decompose_both and low_rank_worth(out_l, in_m, rank)
    if low1 or low2:
        a, b = _alternate(r, a, b, (out_l, in_m), (out_k, in_n * kprod), rank if low1 else 0, rank if low2 else 0)
    factors: dict[str, Tensor] = {}
    w1 = a.reshape(out_l, in_m)
    if low1:
        factors["lokr_w1_a"], factors["lokr_w1_b"] = truncate(w1, rank)
    else:
        factors["lokr_w1"] = w1.contiguous()
    w2 = b.reshape(out_k, in_n * kprod)
    use_tucker = tucker and low2 and any(k != 1 for k in kernel)
    if use_tucker:
        factors.update(_tucker(w2.reshape(out_k, in_n, *kernel), rank))
    elif low2:
        factors["lokr_w2_a"], factors["lokr_w2_b"] = truncate(w2, rank)
    else:
        factors["lokr_w2"] = w2.reshape(out_k, in_n, *kernel).contiguous()
    factors = {k: t.contiguous() for k, t in factors.items()}
    plan = LF.plan_from_tensors(delta.shape, factors)
    return Fit(factors, plan, relative_error(delta, factors), plan.numel())


def _alternate(r: Tensor, a: Tensor, b: Tensor, shape1: tuple[int, int], shape2: tuple[int, int], rank1: int,
               rank2: int) -> tuple[Tensor, Tensor]:
    """Alternating least squares for vec(W1) vec(W2)ᵀ ≈ R with W1 of rank ≤ rank1 and W2 of rank ≤ rank2 (0: full).
    With one factor fixed, ‖R − a bᵀ‖² = ‖a‖²·‖b − Rᵀa/‖a‖²‖² + const, so the best constrained b is the truncation of
    Rᵀa/‖a‖² (Frobenius norm: the SVD truncation is optimal); the other way round for a."""

    def fit(m: Tensor, shape: tuple[int, int], rank: int) -> Tensor:
        if rank == 0:
            return m
        x, y = truncate(m.reshape(shape), rank)
        return (x @ y).reshape(-1)

    b = fit(b, shape2, rank2)
    a = fit(a, shape1, rank1)
    for _ in range(ALS_STEPS):
        na = a.dot(a)
        if na == 0:
            break
        b = fit(r.T @ a / na, shape2, rank2)
        nb = b.dot(b)
        if nb == 0:
            break
        a = fit(r @ b / nb, shape1, rank1)
    return a, b


def _tucker(w2: Tensor, rank: int) -> dict[str, Tensor]:
    """W2 (out_k, in_n, *k) as LoKr's Tucker form of rank `rank` (HOSVD): lokr_w2_a (r, out_k) and lokr_w2_b
    (r, in_n) the top singular vectors of W2's first two unfoldings, lokr_t2 (r, r, *k) the core, W2 projected on
    them; rebuilt as einsum('ij...,ip,jq->pq...')."""
    out_k, in_n = w2.shape[:2]
    ua = torch.linalg.svd(w2.reshape(out_k, -1), full_matrices=False)[0][:, :rank]  # (out_k, r)
    ub = torch.linalg.svd(w2.transpose(0, 1).reshape(in_n, -1), full_matrices=False)[0][:, :rank]  # (in_n, r)
    core = torch.einsum("pq...,ip,jq->ij...", w2, ua.T, ub.T)
    return {"lokr_t2": core, "lokr_w2_a": ua.T, "lokr_w2_b": ub.T}


def relative_error(delta: Tensor, factors: LF.Factors) -> float:
    """‖ΔW − W1 ⊗ W2‖ / ‖ΔW‖ (0 for ΔW = 0 rebuilt as 0), the factors rebuilt by functional.delta_weight."""
    diff = (delta - LF.delta_weight(factors, delta.shape)).norm()
    norm = delta.norm()
    return float(diff / norm) if norm > 0 else float(diff > 0)


def candidate_splits(weight_shape: Sequence[int], factor: int | None) -> list[tuple[int, int]]:
    """(out_l, in_m) pairs to try: `factor`'s split alone when given, else the splits each of LyCORIS' usual factors
    gives both sides (one factor for both, as LyCORIS plans)."""
    out, inn = weight_shape[:2]
    if factor is not None:
        return [(LF.factorization(out, factor)[0], LF.factorization(inn, factor)[0])]
    pairs = [(LF.factorization(out, f)[0], LF.factorization(inn, f)[0]) for f in (-1, 4, 8, 16, 32)]
    return list(dict.fromkeys(pairs))


def rank_for_budget(plan_numel_w1: int, rows: int, cols: int, budget: int) -> int | None:
    """The largest rank of W2 (rows x cols) that keeps W1 (`plan_numel_w1` numbers) and W2 within `budget`: 0 for a
    full W2 that fits, None when even rank 1 does not fit."""
    if plan_numel_w1 + rows * cols <= budget:
        return 0
    rank = (budget - plan_numel_w1) // (rows + cols)
    return int(rank) if rank >= 1 else None


def choose(delta: Tensor, candidates: Sequence[tuple[int, int]], budget: int | None, rank: int,
           decompose_both: bool = False, tucker: bool = False) -> Fit:
    """The best fit among the splits `candidates`: with a parameter `budget`, each split at the largest W2 rank
    that fits it, the lowest measured error winning (ties: fewer parameters); without one, at `rank`. Raises
    ValueError when no split fits the budget."""
    fits: list[Fit] = []
    for out_l, in_m in candidates:
        out_k, cols = delta.shape[0] // out_l, delta.shape[1] // in_m * math.prod(delta.shape[2:])
        r = rank
        if budget is not None:
            found = rank_for_budget(out_l * in_m, out_k, cols, budget)
            if found is None:
                continue
            r = found if rank == 0 else (rank if found == 0 else min(found, rank))  # --rank caps the budget's
        fit = nearest_lokr(delta, out_l, in_m, r, decompose_both and budget is None, tucker)
        if budget is None or fit.numel <= budget:  # a Tucker core can outgrow the flat count
            fits.append(fit)
    if not fits:
        raise BudgetTooSmall(f"no LoKr split of a weight {tuple(delta.shape)} fits a budget of {budget} parameters "
                         f"(the smallest W1 alone needs {min(a * b for a, b in candidates)})")
    return min(fits, key=lambda f: (round(f.error, 9), f.numel))


def fit_change(delta: Tensor, factor: int | None = None, rank: int = 0, decompose_both: bool = False,
               tucker: bool = False, budget: int | None = None) -> Fit:
    """The LoKr for one module's change as the tools choose it: without a budget, the split of `factor` (default
    LyCORIS' -1; the lowest error alone would always pick the smallest W1, whose W2 is nearly the whole weight);
    with one, the best of LyCORIS' usual splits (or `factor`'s) within it."""
    split_factor = factor if factor is not None or budget is not None else -1
    return choose(delta, candidate_splits(delta.shape, split_factor), budget, rank, decompose_both, tucker)
