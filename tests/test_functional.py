"""The LoKr math against independent references written here from docs/formats.md §The math, §Scale rules.

- ΔW: kron written as an einsum over explicit indices (ΔW[(i,p),(j,q)] = W1[i,j]·W2[p,q]).
- Tucker: W2[p,q] = Σ_ij t2[i,j]·w2_a[i,p]·w2_b[j,q], by explicit loops.
- apply_lokr (no ΔW built) against F.linear / F.convNd with the rebuilt ΔW.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lokr_diffusers import functional as LF


@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [(64, -1, (8, 8)), (320, -1, (16, 20)), (640, -1, (20, 32)), (768, -1, (24, 32)), (1280, -1, (32, 40)),
     (3072, -1, (48, 64)), (127, -1, (1, 127)), (64, 4, (4, 16)), (320, 4, (4, 80)), (64, 16, (4, 16)),
     (128, 8, (8, 16)), (250, 8, (5, 50)), (360, 16, (15, 24))],
)
def test_factorization_examples(dim: int, factor: int, expected: tuple[int, int]) -> None:
    # values from docs/formats.md §The math; (64, 16) is the swapped case. (LyCORIS' docstring table says
    # 360, 16 -> (12, 30), but its code walks to (15, 24): the code is what files were made with.)
    assert LF.factorization(dim, factor) == expected


def test_factorization_equals_lycoris() -> None:
    general = pytest.importorskip("lycoris.functional.general")
    for dim in range(1, 2049):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert LF.factorization(dim, factor) == general.factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("dim", [1, 2, 7, 12, 96, 320, 1024, 2560, 4096])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16])
def test_factorization_properties(dim: int, factor: int) -> None:
    m, n = LF.factorization(dim, factor)
    assert m * n == dim and m <= n


def _ref_kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out_l, in_m = w1.shape
    out_k, in_n, *k = w2.shape
    return torch.einsum("ij,pq...->ipjq...", w1, w2).reshape(out_l * out_k, in_m * in_n, *k)


def _ref_tucker(t2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r = t2.shape[0]
    out = torch.zeros(a.shape[1], b.shape[1], *t2.shape[2:], dtype=t2.dtype)
    for i in range(r):
        for j in range(r):
            out += t2[i, j][None, None] * (a[i][:, None] * b[j][None, :]).reshape(a.shape[1], b.shape[1],
                                                                              *([1] * (t2.dim() - 2)))
    return out


def _random_factors(plan: LF.LoKrPlan, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) * 0.3 for n, s in plan.shapes().items()}


CASES = [  # weight shape, r, factor, decompose_both, tucker, full_matrix
    ((96, 64), 4, -1, False, False, False),
    ((320, 320), 8, -1, True, False, False),
    ((3072, 768), 8, -1, False, False, False),
    ((64, 64), 8, 4, True, False, False),
    ((64, 64), 16, -1, False, False, False),  # r >= max/2: W2 full
    ((48, 32), 4, -1, False, False, True),
    ((64, 32, 3, 3), 4, -1, False, False, False),
    ((64, 32, 3, 3), 2, -1, True, True, False),
    ((64, 32, 1, 1), 2, -1, False, True, False),  # 1x1: Tucker never used
    ((40, 30, 3), 2, -1, False, True, False),  # Conv1d Tucker
    ((40, 30, 5), 2, 4, False, False, False),
    ((64, 16, 3, 3), 2, 8, False, False, False),  # grouped conv: in = in_channels // groups
]


@pytest.mark.parametrize(("shape", "r", "factor", "both", "tucker", "full"), CASES)
def test_delta_weight_matches_reference(shape, r, factor, both, tucker, full) -> None:
    plan = LF.plan_lokr(shape, r, factor, both, tucker, full)
    assert plan.weight_shape == shape
    assert LF.plan_from_tensors(shape, _random_factors(plan)) == plan
    f = _random_factors(plan)
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = _ref_tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(plan.out_k, plan.in_n, *plan.kernel)
    expected = 0.7 * _ref_kron(w1, w2)
    torch.testing.assert_close(LF.delta_weight(f, shape, 0.7), expected, rtol=1e-12, atol=1e-12)
    assert plan.tucker == (tucker and any(k != 1 for k in shape[2:]) and plan.w2_lowrank)


@pytest.mark.parametrize(("shape", "r", "factor", "both", "tucker", "full"), CASES)
@pytest.mark.parametrize("conv_kw", [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=0, dilation=2)])
def test_apply_without_building_equals_rebuilt(shape, r, factor, both, tucker, full, conv_kw) -> None:
    plan = LF.plan_lokr(shape, r, factor, both, tucker, full)
    f = _random_factors(plan, seed=1)
    dw = LF.delta_weight(f, shape, 0.5)
    g = torch.Generator().manual_seed(2)
    if len(shape) == 2:
        x = torch.randn(2, 5, shape[1], generator=g, dtype=torch.float64)
        expected, conv = F.linear(x, dw), None
    else:
        spatial = (11,) * (len(shape) - 2)
        x = torch.randn(2, shape[1], *spatial, generator=g, dtype=torch.float64)
        op = F.conv1d if len(shape) == 3 else F.conv2d
        expected = op(x, dw, **conv_kw)
        nd = len(shape) - 2
        conv = LF.ConvArgs(stride=(conv_kw["stride"],) * nd, padding=(conv_kw["padding"],) * nd,
                           dilation=(conv_kw["dilation"],) * nd)
    got = LF.apply_lokr(x, f, plan, 0.5, conv)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_plan_rules_follow_lycoris_thresholds() -> None:
    # W2 low-rank iff r < max(out_k, in_n) / 2; W1 low-rank iff decompose_both and r < max(out_l, in_m) / 2
    p = LF.plan_lokr((320, 320), 8)  # (16, 20) x (16, 20)
    assert (p.w1_lowrank, p.w2_lowrank) == (False, True)
    assert LF.plan_lokr((320, 320), 10).w2_lowrank is False  # 10 >= 20 / 2
    assert LF.plan_lokr((320, 320), 7, decompose_both=True).w1_lowrank is True  # 7 < 16 / 2
    assert LF.plan_lokr((320, 320), 8, decompose_both=True).w1_lowrank is False  # 8 == 16 / 2
    assert LF.plan_lokr((320, 320), 2, full_matrix=True).both_full
    with pytest.raises(ValueError, match="positive"):
        LF.plan_lokr((8, 8), 0)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"lokr_w2": torch.zeros(4, 4)}, "missing W1"),
        ({"lokr_w1": torch.zeros(4, 4)}, "missing W2"),
        ({"lokr_w1": torch.zeros(3, 4), "lokr_w2": torch.zeros(4, 4)}, "does not divide"),
        ({"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(4, 5)}, "does not fit"),
        ({"lokr_w1": torch.zeros(4, 4), "lokr_w2_a": torch.zeros(4, 2), "lokr_w2_b": torch.zeros(3, 4)},
         "does not fit"),
        ({"lokr_w1_a": torch.zeros(4, 2), "lokr_w1_b": torch.zeros(3, 4), "lokr_w2": torch.zeros(4, 4)}, "rank"),
        ({"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(4, 4), "lokr_w3": torch.zeros(1)}, "unknown"),
    ],
)
def test_plan_from_tensors_rejects_bad_shapes(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LF.plan_from_tensors((16, 16), tensors)


def test_scale_rules() -> None:
    low = LF.plan_lokr((320, 320), 8)
    full = LF.plan_lokr((64, 64), 8)  # (8,8)x(8,8): r >= 4, both full
    assert full.both_full
    assert LF.peft_scale(16, 8) == 2.0 and LF.peft_scale(16, 8) == LF.peft_scale(16.0, 8)
    assert LF.lycoris_scale(16, 8, both_full=False) == 2.0
    assert LF.lycoris_scale(16, 8, both_full=True) == 1.0
    assert LF.lycoris_scale(None, 8, both_full=False) == 1.0 and LF.lycoris_scale(0, 8, False) == 1.0
    assert LF.lycoris_scale(16, 16, both_full=False, rs_lora=True) == 16 / math.sqrt(16)
    assert LF.consumer_scale(low, 4.0) == 0.5
    assert LF.consumer_scale(low, None) == 1.0
    assert LF.consumer_scale(full, 4.0) == 1.0  # alpha ignored when both factors are full
    both = LF.plan_lokr((320, 320), 4, decompose_both=True, full_matrix=False)
    only_w1 = LF.LoKrPlan(16, 20, 16, 20, (), rank1=4, rank2=0, tucker=False)
    assert LF.consumer_scale(both, 2.0) == 0.5 and LF.consumer_scale(only_w1, 2.0) == 0.5  # w1_b rank when W2 full


@pytest.mark.parametrize("plan", [LF.plan_lokr((320, 320), 8), LF.plan_lokr((64, 64), 8),
                                  LF.plan_lokr((64, 32, 3, 3), 2, decompose_both=True, use_tucker=True)])
@pytest.mark.parametrize("scale", [0.25, 1.0, 4.0])
def test_alpha_for_consumer_round_trips(plan: LF.LoKrPlan, scale: float) -> None:
    alpha, w1_factor = LF.alpha_for_consumer(plan, scale)
    assert LF.consumer_scale(plan, alpha) * w1_factor == pytest.approx(scale, rel=1e-12)
    assert (alpha is None) == plan.both_full


@pytest.mark.parametrize(
    ("shape", "tokens", "needs_grad", "bypass"),
    [  # what benchmarks/bench_layers.py measured faster on a 2-core CPU (SD1.5 / CLIP-L shapes, r=8)
        ((320, 320), 8192, False, False),
        # training: the bypass Function with the base op inside it (no full-size sums) is as fast or
        # faster at every Linear shape measured (attn 320: 1.57 against 1.62 merged, ff 320->2560: 1.22
        # against 1.64)
        ((320, 320), 8192, True, True),
        ((2560, 320), 8192, True, True),
        ((1280, 1280), 512, False, False),
        ((1280, 1280), 512, True, True),  # few tokens, big ΔW: factors win in training
        ((3072, 768), 154, True, True),
        ((320, 320, 3, 3), 2048, False, False),
        ((320, 320, 3, 3), 2048, True, True),
        ((1280, 1280), 1, False, True),  # a single token: building ΔW costs more than using it
    ],
)
def test_cost_model_choices(shape: tuple[int, ...], tokens: int, needs_grad: bool, bypass: bool) -> None:
    plan = LF.plan_lokr(shape, 8, use_tucker=True)
    assert LF.prefer_bypass(plan, tokens, needs_grad) is bypass


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (40, 30, 5)])
def test_tucker_to_lowrank_is_exact(shape: tuple[int, ...]) -> None:
    plan = LF.plan_lokr(shape, 2, use_tucker=True)
    assert plan.tucker
    f = _random_factors(plan, seed=4)
    a, b = LF.tucker_to_lowrank(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    plain = {"lokr_w1": f["lokr_w1"], "lokr_w2_a": a, "lokr_w2_b": b}
    assert LF.plan_from_tensors(shape, plain).rank2 == plan.rank2 and not LF.plan_from_tensors(shape, plain).tucker
    torch.testing.assert_close(LF.delta_weight(plain, shape), LF.delta_weight(f, shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "r", "factor", "both", "tucker", "full"), CASES)
def test_add_delta_equals_weight_plus_kron(shape, r, factor, both, tucker, full) -> None:
    plan = LF.plan_lokr(shape, r, factor, both, tucker, full)
    f = _random_factors(plan, seed=5)
    w = torch.randn(shape, dtype=torch.float64)
    expected = w + LF.delta_weight(f, shape, 0.3)
    torch.testing.assert_close(LF.add_delta(w, f, 0.3), expected, rtol=1e-12, atol=1e-12)
    w2 = w.clone()
    assert LF.add_delta(w2, f, 0.3, inplace=True) is w2
    torch.testing.assert_close(w2, expected, rtol=1e-12, atol=1e-12)


def test_cost_model_takes_merged_for_a_launch_bound_linear_in_training() -> None:
    """Linear(64, 64) at r = 8 over 16 tokens (bench_proxy's layer), in training: both paths cost about
    their launches, and merged runs one aten op fewer (tests/test_reuse.py's counts), measured 1-8% faster;
    at SD1.5's attention (320 wide, 8192 tokens) and text (77 tokens) shapes the arithmetic decides: bypass."""
    assert not LF.prefer_bypass(LF.plan_lokr((64, 64), 8), 16, True)
    assert LF.prefer_bypass(LF.plan_lokr((320, 320), 8), 8192, True)
    assert LF.prefer_bypass(LF.plan_lokr((768, 768), 8), 77, True)
