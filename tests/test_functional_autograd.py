"""The training Functions of the LoKr math (lokr_diffusers/functional/autograd.py) against the plain autograd ops
and torch.autograd.gradcheck: the Linear bypass as one Function (`_LinearBypass`), the merged Linear Function, and
the base op with the adapter as one node; their saved tensors and bf16 autocast."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lokr_diffusers import functional as LF
from lokr_diffusers.functional.autograd import _LinearBypass
from lokr_diffusers.functional.bypass import _apply_lokr_linear

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
