"""The nearest LoKr to a weight change, one module (lokr_diffusers/tools/nearest.py), against an independent
reference (tests/helpers/kron_oracle.py: the rearranged matrix built block by block, its singular values)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.kron_oracle import kron_weight, optimum_error, rearranged

from lokr_diffusers.functional import delta_weight
from lokr_diffusers.tools import candidate_splits, choose, nearest_lokr
from lokr_diffusers.tools.nearest import FULL_SVD_MAX


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape,split", [((64, 48), (8, 6)), ((40, 24, 3, 3), (4, 4)), ((30, 20, 3), (5, 2))],
                         ids=["linear", "conv2d", "conv1d"])
def test_an_exact_kronecker_product_is_recovered(shape: tuple[int, ...], split: tuple[int, int]) -> None:
    g = _gen()
    w1 = torch.randn(*split, generator=g)
    w2 = torch.randn(shape[0] // split[0], shape[1] // split[1], *shape[2:], generator=g)
    delta = kron_weight(w1, w2)
    fit = nearest_lokr(delta, *split)
    assert fit.error < 1e-5
    assert torch.allclose(delta_weight(fit.factors, delta.shape), delta, atol=1e-5 * delta.abs().max())
    assert set(fit.factors) == {"lokr_w1", "lokr_w2"}


def test_an_exact_low_rank_w2_is_recovered_at_its_rank_and_as_tucker() -> None:
    g = _gen(1)
    w1 = torch.randn(4, 4, generator=g)
    w2 = (torch.randn(20, 3, generator=g) @ torch.randn(3, 16 * 9, generator=g)).reshape(20, 16, 3, 3)
    delta = kron_weight(w1, w2)
    fit = nearest_lokr(delta, 4, 4, rank=3)
    assert fit.error < 1e-5 and fit.plan.rank2 == 3 and not fit.plan.tucker
    assert fit.numel == 16 + 3 * (20 + 16 * 9)
    # Tucker of rank 3 holds this W2 exactly only if its mode ranks are <= 3: build one that is
    core = torch.randn(3, 3, 3, 3, generator=g)
    a, b = torch.randn(3, 20, generator=g), torch.randn(3, 16, generator=g)
    w2t = torch.einsum("ijkl,ip,jq->pqkl", core, a, b)
    fit = nearest_lokr(kron_weight(w1, w2t), 4, 4, rank=3, tucker=True)
    assert fit.plan.tucker and fit.error < 1e-5


@pytest.mark.parametrize("shape,split", [((96, 64), (8, 8)), ((64, 32, 3, 3), (8, 4)), ((48, 48), (1, 48))])
def test_a_random_change_gets_the_optimum_error(shape: tuple[int, ...], split: tuple[int, int]) -> None:
    """Full W2: the measured error equals the optimum from the rearranged matrix's singular values."""
    delta = torch.randn(*shape, generator=_gen(2))
    fit = nearest_lokr(delta, *split)
    want = optimum_error(delta, *split)
    assert fit.error == pytest.approx(want, rel=1e-2)
    assert fit.error == pytest.approx(want, rel=1e-4)  # in fact to rounding


def test_the_randomized_svd_reaches_the_optimum_on_a_large_module() -> None:
    """Above FULL_SVD_MAX the top pair comes from a randomized SVD: still the optimum within 1 % (a change with a
    dominant Kronecker part plus noise, as a fine-tune's is, and pure noise)."""
    side = math.isqrt(FULL_SVD_MAX) + 1  # R is (side², side²)
    out_l = in_m = side
    g = _gen(3)
    w1, w2 = torch.randn(side, side, generator=g), torch.randn(side, side, generator=g)
    for noise in (0.01, 1.0):
        delta = kron_weight(w1, w2) + noise * torch.randn(side * side, side * side, generator=g)
        assert min(rearranged(delta, out_l, in_m).shape) > FULL_SVD_MAX
        fit = nearest_lokr(delta, out_l, in_m)
        assert fit.error == pytest.approx(optimum_error(delta, out_l, in_m), rel=1e-2)


def test_a_low_rank_fit_is_no_worse_than_truncating_the_best_full_fit() -> None:
    """Rank r: between the unconstrained optimum and the simple route (best W1 ⊗ W2, then W2 truncated by SVD),
    computed here independently."""
    delta = torch.randn(64, 64, generator=_gen(4)) + kron_weight(torch.randn(4, 4), torch.randn(16, 16))
    fit = nearest_lokr(delta, 4, 4, rank=4)
    r = rearranged(delta.double(), 4, 4)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    w1, w2 = (u[:, 0] * s[0]).reshape(4, 4), vh[0].reshape(16, 16)
    uu, ss, vv = torch.linalg.svd(w2)
    simple = kron_weight(w1, (uu[:, :4] * ss[:4]) @ vv[:4])
    simple_err = float((delta.double() - simple).norm() / delta.double().norm())
    assert optimum_error(delta, 4, 4) <= fit.error + 1e-6
    assert fit.error <= simple_err + 1e-6
    assert fit.plan.rank2 == 4


def test_the_budget_picks_the_split_with_the_lowest_error_and_keeps_to_it() -> None:
    """A change that is exactly W1 ⊗ W2 for a (4, 4) split is found among the candidates by error; every fit stays
    within the budget; a budget below every split's W1 is refused."""
    g = _gen(5)
    delta = kron_weight(torch.randn(4, 4, generator=g), torch.randn(80, 80, generator=g))  # (320, 320)
    cands = candidate_splits(delta.shape, None)
    assert (4, 4) in cands and len(cands) > 2
    fit = choose(delta, cands, budget=16 + 80 * 80, rank=0)
    assert (fit.plan.out_l, fit.plan.in_m) == (4, 4) and fit.error < 1e-5
    tight = choose(delta, cands, budget=2000, rank=0)
    assert tight.numel <= 2000
    # the lowest error of those that fit, by the oracle: no candidate split at its budget rank does better
    for out_l, in_m in cands:
        assert tight.error <= optimum_error(delta, out_l, in_m) + 1e-6 or \
            out_l * in_m + (320 // out_l) * (320 // in_m) > 2000
    with pytest.raises(ValueError, match="fits a budget"):
        choose(delta, cands, budget=3, rank=0)


def test_decompose_both_and_rank_caps() -> None:
    delta = torch.randn(256, 256, generator=_gen(6))
    fit = nearest_lokr(delta, 16, 16, rank=4, decompose_both=True)
    assert fit.plan.rank1 == 4 and fit.plan.rank2 == 4
    assert fit.numel == 4 * 32 + 4 * 32
    assert math.isfinite(fit.error) and fit.error <= 1.0 + 1e-6
    full = nearest_lokr(delta, 16, 16, rank=16)  # rank 16 of a 16 x 16 W2: kept full
    assert full.plan.rank2 == 0


def test_a_split_that_does_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        nearest_lokr(torch.randn(10, 10), 3, 2)
