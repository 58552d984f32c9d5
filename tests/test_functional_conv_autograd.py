"""functional.apply_bypass_conv (autograd.py `_ConvBypass`): the conv and a LoKr adapter's bypass as one autograd
Function, against the oracle of plain autograd over F.conv with W + ΔW built by functional.delta_weight
(the kron itself, independent of the vec trick): outputs and every gradient, for full, low-rank and
Tucker W2, full and low-rank W1, Conv1d and Conv2d, stride / dilation / padding, with and without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lokr_diffusers import functional as LF

CASES = [  # (weight shape, r, decompose_both, tucker, stride, padding, dilation)
    ((24, 20, 3, 3), 2, False, True, (1, 1), (1, 1), (1, 1)),  # Tucker W2
    ((24, 20, 3, 3), 2, False, True, (2, 2), (1, 1), (1, 1)),
    ((24, 20, 3, 3), 2, True, False, (1, 1), (2, 2), (2, 2)),  # low-rank W1 and W2 (kernel in w2_b)
    ((24, 20, 3, 3), 8, False, False, (1, 1), (0, 0), (1, 1)),  # both full
    ((24, 20, 1, 1), 2, False, False, (1, 1), (0, 0), (1, 1)),  # 1x1: low-rank W2
    ((24, 20, 3), 2, False, True, (1,), (1,), (1,)),  # Conv1d, Tucker
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("base_trains", [False, True])
def test_conv_bypass_function_matches_plain_autograd(case: tuple, bias: bool, base_trains: bool) -> None:
    shape, r, both, tucker, stride, padding, dilation = case
    g = torch.Generator().manual_seed(0)
    plan = LF.plan_lokr(shape, r, decompose_both=both, use_tucker=tucker)
    assert plan.tucker == tucker
    factors = {n: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for n, s in plan.shapes().items()}
    w = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(base_trains)
    b = torch.randn(shape[0], generator=g, dtype=torch.float64).requires_grad_(base_trains) if bias else None
    x = torch.randn(2, shape[1], *([9] * (len(shape) - 2)), generator=g, dtype=torch.float64, requires_grad=True)
    scale = 0.7
    op = F.conv1d if len(shape) == 3 else F.conv2d
    oracle = op(x, w + LF.delta_weight(factors, shape, scale), b, stride, padding, dilation)
    ours = LF.apply_bypass_conv(x, w, b, factors, plan, scale, stride, padding, dilation)
    torch.testing.assert_close(ours, oracle)
    gy = torch.randn(oracle.shape, generator=g, dtype=torch.float64)
    wanted = [x, *factors.values(), *([w] if base_trains else []), *([b] if base_trains and b is not None else [])]
    expected = torch.autograd.grad(oracle, wanted, gy)
    got = torch.autograd.grad(ours, wanted, gy)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e)


def test_conv_bypass_function_without_input_gradient() -> None:
    """Only the factors train (x and the base frozen): no dx is formed, the factors' gradients still match."""
    g = torch.Generator().manual_seed(1)
    shape = (24, 20, 3, 3)
    plan = LF.plan_lokr(shape, 2, use_tucker=True)
    factors = {n: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for n, s in plan.shapes().items()}
    w, x = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(1, 20, 6, 6, generator=g,
                                                                           dtype=torch.float64)
    oracle = F.conv2d(x, w + LF.delta_weight(factors, shape, 1.0), None, 1, 1)
    ours = LF.apply_bypass_conv(x, w, None, factors, plan, 1.0, (1, 1), (1, 1), (1, 1))
    for e, o in zip(torch.autograd.grad(oracle.square().sum(), list(factors.values())),
                    torch.autograd.grad(ours.square().sum(), list(factors.values())), strict=True):
        torch.testing.assert_close(o, e)


def test_conv_layer_in_channels_last_trains_as_contiguous() -> None:
    """A channels_last conv (weight and input) runs the plain ops (the Function's views need NCHW):
    the same output and gradients as the contiguous layer, which runs the Function."""
    from torch import nn

    from lokr_diffusers import LoKrConfig, LoKrModel

    torch.manual_seed(0)
    cfg = LoKrConfig(r=2, alpha=2, target_modules=["0"], init_weights=False, use_effective_conv2d=True)
    model = LoKrModel(nn.Sequential(nn.Conv2d(16, 24, 3, padding=1)), cfg, "a")
    model.set_forward_mode("bypass")
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        xi = x.detach().to(memory_format=fmt).requires_grad_()
        y = model(xi)
        factors = list(model.model[0].factors("a").values())
        results.append((y.detach(), *torch.autograd.grad(y.square().sum(), [xi, *factors])))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
