"""The LoKr math against independent references written here from docs/formats.md §The math, §Scale rules.

- ΔW: kron written as an einsum over explicit indices (ΔW[(i,p),(j,q)] = W1[i,j]·W2[p,q]).
- Tucker: W2[p,q] = Σ_ij t2[i,j]·w2_a[i,p]·w2_b[j,q], by explicit loops.
- apply_lokr (no ΔW built) against F.linear / F.convNd with the rebuilt ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lokr_diffusers import functional as LF
from lokr_diffusers.functional.autograd import _LinearBypass
from lokr_diffusers.functional.bypass import _apply_lokr_linear


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


# ------------------------------------------------- the Linear bypass in training (one autograd Function)
# Every factor combination (W1 full / low-rank x W2 full / low-rank), by hand so that W1 low-rank with W2
# full is there too (plan_lokr never makes it); small dims, unequal, so no axis can stand for another.
LINEAR_PLANS = {
    "full_full": LF.LoKrPlan(3, 4, 2, 5, (), rank1=0, rank2=0, tucker=False),
    "full_low": LF.LoKrPlan(3, 4, 2, 5, (), rank1=0, rank2=2, tucker=False),
    "low_full": LF.LoKrPlan(3, 4, 2, 5, (), rank1=2, rank2=0, tucker=False),
    "low_low": LF.LoKrPlan(3, 4, 2, 5, (), rank1=1, rank2=3, tucker=False),
}
LEADS = [(3,), (2, 3), (2, 1, 4)]


def _linear_case(plan: LF.LoKrPlan, lead: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    f = {n: torch.randn(s, generator=g, dtype=dtype) for n, s in plan.shapes().items()}
    return torch.randn(*lead, plan.in_m * plan.in_n, generator=g, dtype=dtype), f


def _frozen_sets(plan: LF.LoKrPlan) -> list[tuple[str, ...]]:
    """Nothing frozen, each factor frozen alone, every factor frozen but one, every factor frozen."""
    names = tuple(plan.shapes())
    return [(), *((n,) for n in names), *(tuple(m for m in names if m != n) for n in names), names]


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_linear_bypass_function_gradcheck(kind: str, lead: tuple[int, ...], scale: float) -> None:
    plan = LINEAR_PLANS[kind]
    x0, f0 = _linear_case(plan, lead)
    names = list(f0)

    def fn(x: torch.Tensor, *ts: torch.Tensor) -> torch.Tensor:
        y = LF.apply_lokr(x, dict(zip(names, ts, strict=True)), plan, scale)
        assert type(y.grad_fn).__name__ == "_LinearBypassBackward"  # the Function, not the plain ops
        return y

    for frozen in _frozen_sets(plan):
        for x_grad in (True, False):
            if not x_grad and len(frozen) == len(f0):
                continue  # nothing needs a gradient: the plain path runs
            x = x0.clone().requires_grad_(x_grad)
            f = {n: t.clone().requires_grad_(n not in frozen) for n, t in f0.items()}
            assert torch.autograd.gradcheck(fn, (x, *f.values())), (frozen, x_grad)


def test_linear_bypass_function_takes_a_non_contiguous_or_empty_input() -> None:
    plan = LINEAR_PLANS["low_low"]
    _, f = _linear_case(plan, (1,))
    f = {n: t.requires_grad_() for n, t in f.items()}
    x = torch.randn(plan.in_m * plan.in_n, 7, dtype=torch.float64).t().requires_grad_()  # (7, in), strided
    assert not x.is_contiguous()
    assert torch.autograd.gradcheck(lambda x, *ts: LF.apply_lokr(x, dict(zip(f, ts, strict=True)), plan, 0.3),
                                    (x, *f.values()))
    empty = torch.randn(0, plan.in_m * plan.in_n, dtype=torch.float64, requires_grad=True)
    y = LF.apply_lokr(empty, f, plan, 0.3)
    y.sum().backward()
    assert y.shape == (0, plan.out_l * plan.out_k) and empty.grad is not None and empty.grad.shape == empty.shape
    assert all(t.grad is not None and not t.grad.any() for t in f.values())


def _assert_same_values(got: dict, want: dict, frozen: tuple[str, ...]) -> None:
    """Every value and gradient equal (1e-5); a gradient absent in `want` (frozen) absent in `got` too."""
    for name, value in want.items():
        if value is None:
            assert got[name] is None, (name, frozen)  # a frozen factor gets no gradient
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=f"{name} {frozen}")


def _plain(x: torch.Tensor, f: dict[str, torch.Tensor], plan: LF.LoKrPlan, scale: float) -> torch.Tensor:
    """The no-grad path's ops, differentiated by autograd op by op."""
    return _apply_lokr_linear(x, f, plan, LF.rebuild_w1(f), scale)


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_linear_bypass_function_equals_plain_path(kind: str, lead: tuple[int, ...], scale: float) -> None:
    plan = LINEAR_PLANS[kind]
    x0, f0 = _linear_case(plan, lead, torch.float32, seed=3)
    gy = torch.randn(*lead, plan.out_l * plan.out_k, generator=torch.Generator().manual_seed(4))
    for frozen in _frozen_sets(plan)[:-1]:
        got, want = {}, {}
        for path, out in (("fn", got), ("plain", want)):
            x = x0.clone().requires_grad_(True)
            f = {n: t.clone().requires_grad_(n not in frozen) for n, t in f0.items()}
            y = LF.apply_lokr(x, f, plan, scale) if path == "fn" else _plain(x, f, plan, scale)
            y.backward(gy)
            out.update({"y": y.detach(), "x": x.grad}, **{n: t.grad for n, t in f.items()})
        assert got.keys() == want.keys()
        _assert_same_values(got, want, frozen)


def _saved_bytes(fn: Callable[[], torch.Tensor], keep: list[torch.Tensor]) -> int:
    """Bytes of the storages autograd saves while `fn` runs, other than those of `keep` (the inputs)."""
    held = {t.untyped_storage().data_ptr() for t in keep}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in held:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
def test_linear_bypass_function_saves_only_what_backward_needs(kind: str) -> None:
    plan = LINEAR_PLANS[kind]
    x0, f0 = _linear_case(plan, (64,), torch.float32)
    factor_bytes = sum(t.numel() * 4 for t in f0.values())
    a_bytes = 64 * plan.in_m * (plan.rank2 or plan.out_k) * 4  # A = X W2ᵀ, (T, in_m, r or out_k)
    assert a_bytes > 4 * factor_bytes

    def run(x_grad: bool, trainable: tuple[str, ...], scale: float = 0.5) -> int:
        x = x0.clone().requires_grad_(x_grad)
        f = {n: t.clone().requires_grad_(n in trainable) for n, t in f0.items()}
        return _saved_bytes(lambda: LF.apply_lokr(x, f, plan, scale), [x, *f.values()])

    names = tuple(f0)
    w1_names = tuple(n for n in names if n.startswith("lokr_w1"))
    assert run(True, names) >= a_bytes  # W1's gradient reads A (the counter sees intermediates)
    assert run(True, ()) <= factor_bytes  # only x trains: no activation-sized tensor kept
    assert run(False, tuple(n for n in names if n not in w1_names and n != "lokr_w2_a")) <= factor_bytes


def test_apply_lokr_runs_the_plain_path_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = LINEAR_PLANS["low_low"]
    x, f = _linear_case(plan, (2, 3))
    f = {n: t.requires_grad_() for n, t in f.items()}
    want = _plain(x, f, plan, 0.5).detach()

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the Function ran without gradients")

    monkeypatch.setattr(_LinearBypass, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(LF.apply_lokr(x, f, plan, 0.5), want, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(LF.apply_lokr(x, f, plan, 0.5), want, rtol=0, atol=0)
    frozen = {n: t.detach() for n, t in f.items()}
    torch.testing.assert_close(LF.apply_lokr(x, frozen, plan, 0.5), want, rtol=0, atol=0)  # nothing to train
    with pytest.raises(AssertionError, match="without gradients"):
        LF.apply_lokr(x, f, plan, 0.5)  # the counter-check: with a gradient wanted, the Function runs


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
def test_linear_bypass_function_under_bf16_autocast_matches_plain_path(kind: str) -> None:
    """On CPU, autocast runs the plain path's matmuls in bf16: the Function does too, and hands back
    gradients in the factors' and x's own dtype (fp32)."""
    plan = LINEAR_PLANS[kind]
    x0, f0 = _linear_case(plan, (4, 3), torch.float32, seed=6)
    results = {}
    for path in ("fn", "plain"):
        x = x0.clone().requires_grad_(True)
        f = {n: t.clone().requires_grad_(True) for n, t in f0.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = LF.apply_lokr(x, f, plan, 0.7) if path == "fn" else _plain(x, f, plan, 0.7)
        y.float().square().sum().backward()
        results[path] = {"y": y, "x": x.grad, **{n: t.grad for n, t in f.items()}}
    assert_bf16_close(results)


def assert_bf16_close(results: dict[str, dict[str, torch.Tensor]]) -> None:
    """The Function's output and gradients ("fn") against plain autograd's ("plain") under bf16 autocast:
    the same dtypes, the same values within bf16 rounding."""
    for name, want in results["plain"].items():
        got = results["fn"][name]
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item(),
                                   msg=name)


# ------------------------------------------------------------- the merged Linear Function (training)
def _merged_case(plan: LF.LoKrPlan, lead: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """x, W (out, in), bias (out,) and factors for `plan`."""
    x, f = _linear_case(plan, lead, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    out_dim, in_dim = plan.weight_shape
    return x, torch.randn(out_dim, in_dim, generator=g, dtype=dtype), torch.randn(out_dim, generator=g,
                                                                                 dtype=dtype), f


def _merged_plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, f: dict[str, torch.Tensor],
                  scale: float | torch.Tensor) -> torch.Tensor:
    """The merged path as plain autograd ops: W + ΔW by add_delta, then F.linear."""
    return torch.nn.functional.linear(x, LF.add_delta(w, f, scale), b)


# the two training Functions that run the base op too: (function, its autograd node's name)
JOINT = {"merged": (LF.apply_merged_linear, "_LinearMergedBackward"),
         "bypass": (LF.apply_bypass_linear, "_LinearBypassBackward")}


@pytest.mark.parametrize("joint", list(JOINT))
@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_linear_joint_function_gradcheck(joint: str, kind: str, lead: tuple[int, ...], scale: float) -> None:
    plan = LINEAR_PLANS[kind]
    x0, w0, b0, f0 = _merged_case(plan, lead)
    names = list(f0)
    apply, node = JOINT[joint]

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *ts: torch.Tensor) -> torch.Tensor:
        y = apply(x, w, b, dict(zip(names, ts, strict=True)), scale)
        assert type(y.grad_fn).__name__ == node
        return y

    cases = 0
    for i, frozen in enumerate(_frozen_sets(plan)):
        for x_grad in (True, False):
            # the bias: absent, frozen or trainable, in turn; the base weight trains in one case in four
            bias_mode, w_grad = (i + x_grad) % 3, (i + x_grad) % 4 == 0
            if not x_grad and not w_grad and bias_mode != 2 and len(frozen) == len(f0):
                continue  # nothing needs a gradient
            x = x0.clone().requires_grad_(x_grad)
            w = w0.clone().requires_grad_(w_grad)
            b = None if bias_mode == 0 else b0.clone().requires_grad_(bias_mode == 2)
            f = {n: t.clone().requires_grad_(n not in frozen) for n, t in f0.items()}
            assert torch.autograd.gradcheck(fn, (x, w, b, *f.values())), (frozen, x_grad, bias_mode, w_grad)
            cases += 1
    assert cases >= 2 * len(f0)


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_linear_merged_function_equals_plain_path(kind: str, lead: tuple[int, ...], scale: float) -> None:
    plan = LINEAR_PLANS[kind]
    x0, w0, b0, f0 = _merged_case(plan, lead, torch.float32, seed=3)
    gy = torch.randn(*lead, plan.out_l * plan.out_k, generator=torch.Generator().manual_seed(4))
    for frozen in _frozen_sets(plan)[:-1]:
        got, want = {}, {}
        for path, out in (("fn", got), ("plain", want)):
            x = x0.clone().requires_grad_(True)
            f = {n: t.clone().requires_grad_(n not in frozen) for n, t in f0.items()}
            run = LF.apply_merged_linear if path == "fn" else _merged_plain
            y = run(x, w0, b0, f, scale)
            y.backward(gy)
            out.update({"y": y.detach(), "x": x.grad}, **{n: t.grad for n, t in f.items()})
        assert got.keys() == want.keys()
        torch.testing.assert_close(got["y"], want["y"], rtol=0, atol=0)  # the same W + ΔW and kernel
        _assert_same_values(got, want, frozen)


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_linear_bypass_with_base_equals_base_plus_plain_path(kind: str, lead: tuple[int, ...], scale: float) -> None:
    """apply_bypass_linear = F.linear(x, W, b) + the no-grad path's ops, values and every gradient."""
    plan = LINEAR_PLANS[kind]
    x0, w0, b0, f0 = _merged_case(plan, lead, torch.float32, seed=3)
    gy = torch.randn(*lead, plan.out_l * plan.out_k, generator=torch.Generator().manual_seed(4))
    for frozen in _frozen_sets(plan):
        got, want = {}, {}
        for path, out in (("fn", got), ("plain", want)):
            x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
            f = {n: t.clone().requires_grad_(n not in frozen) for n, t in f0.items()}
            y = LF.apply_bypass_linear(x, w, b, f, scale) if path == "fn" else \
                torch.nn.functional.linear(x, w, b) + _plain(x, f, plan, scale)
            y.backward(gy)
            out.update({"y": y.detach(), "x": x.grad, "w": w.grad, "b": b.grad}, **{n: t.grad for n, t in f.items()})
        _assert_same_values(got, want, frozen)


@pytest.mark.parametrize("joint", list(JOINT))
@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
def test_linear_joint_function_under_bf16_autocast_matches_plain_path(joint: str, kind: str) -> None:
    """Under CPU autocast the Function runs in bf16, as F.linear would, and hands back gradients in
    each tensor's own dtype (fp32)."""
    plan = LINEAR_PLANS[kind]
    x0, w0, b0, f0 = _merged_case(plan, (4, 3), torch.float32, seed=6)
    results = {}
    for path in ("fn", "plain"):
        x = x0.clone().requires_grad_(True)
        f = {n: t.clone().requires_grad_(True) for n, t in f0.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run = JOINT[joint][0] if path == "fn" else _merged_plain
            y = run(x, w0, b0, f, 0.7)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        results[path] = {"y": y, "x": x.grad, **{n: t.grad for n, t in f.items()}}
    assert_bf16_close(results)


@pytest.mark.parametrize("kind", list(LINEAR_PLANS))
def test_linear_merged_function_saves_a_weight_sized_tensor_only_for_dx(kind: str) -> None:
    plan = LINEAR_PLANS[kind]
    x0, w0, b0, f0 = _merged_case(plan, (64,), torch.float32)
    factor_bytes = sum(t.numel() * 4 for t in f0.values())
    w_bytes = w0.numel() * 4
    assert w_bytes > 2 * factor_bytes

    def run(x_grad: bool, trainable: bool) -> int:
        x = x0.clone().requires_grad_(x_grad)
        f = {n: t.clone().requires_grad_(trainable) for n, t in f0.items()}
        return _saved_bytes(lambda: LF.apply_merged_linear(x, w0, b0, f, 0.5), [x, w0, b0, *f.values()])

    assert w_bytes <= run(True, True) <= w_bytes + 2 * factor_bytes  # W + ΔW for dx, W1 and W2 rebuilt
    assert run(False, True) <= 2 * factor_bytes  # factors only: x (an input) and small tensors
    assert run(True, False) == w_bytes  # only x trains: W + ΔW alone


@pytest.mark.parametrize("joint", list(JOINT))
def test_linear_joint_function_compiles_fullgraph_with_a_tensor_scale(joint: str) -> None:
    """torch.compile(fullgraph, aot_eager) of the Function with a traced tensor scale (as a compiled
    layer passes it): output and gradients equal eager's plain path."""
    plan = LINEAR_PLANS["low_low"]
    x0, w0, b0, f0 = _merged_case(plan, (2, 3), torch.float32, seed=8)
    scale = torch.tensor(0.6)
    torch._dynamo.reset()
    compiled = torch.compile(JOINT[joint][0], fullgraph=True, backend="aot_eager")
    results = {}
    for path in ("compiled", "plain"):
        x = x0.clone().requires_grad_(True)
        f = {n: t.clone().requires_grad_(True) for n, t in f0.items()}
        y = (compiled if path == "compiled" else _merged_plain)(x, w0, b0, f, scale)
        y.square().sum().backward()
        results[path] = {"y": y.detach(), "x": x.grad, **{n: t.grad for n, t in f.items()}}
    torch._dynamo.reset()
    for name, want in results["plain"].items():
        torch.testing.assert_close(results["compiled"][name], want, rtol=1e-5, atol=1e-5, msg=name)
