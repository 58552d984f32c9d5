"""Parity with LyCORIS 4.1.3's LoKr module (`lycoris.modules.lokr.LokrModule`), layer by layer.

LyCORIS is the producer most LoKr files come from, so for each case below (Linear / Conv1d /
Conv2d, default and explicit factors, decompose_both, Tucker, full_matrix, small and large rank,
alpha None/0) we build a LyCORIS module, randomise its factors (it initialises so that ΔW = 0),
give the same tensors and LyCORIS' scale to our layer, and compare:

- planned shapes: `functional.plan_lokr(...).shapes()` == LyCORIS' parameter shapes;
- scale rules: `lycoris_scale` == lyc.scale, and the consumer rule applied to the alpha LyCORIS
  saves (`consumer_scale`) gives the same scale back (docs/formats.md §Scale rules);
- ΔW: `functional.delta_weight` == `lyc.get_weight(lyc.shape)` (which applies scale once; its
  merge_to / get_diff_weight apply it twice, docs/formats.md §What the others do, §Oracles in tests,
  so they are not used);
- forward: our layer in "merged", "bypass" and "auto" mode == LyCORIS' rebuild and bypass forward.

All in fp32 with atol 1e-5; every case also checks that ΔW changes the output by a clear margin.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from lycoris.modules.lokr import LokrModule
from torch import Tensor, nn

from lokr_diffusers import functional as LF
from lokr_diffusers.layers import Conv1d, Conv2d, Linear, LoKrLayer

ATOL = 1e-5
INIT_STD = 0.2  # std of the random factors: ΔW clearly non-zero, outputs O(1)
MIN_EFFECT = 100 * ATOL  # ΔW must move the output (and ΔW itself must reach) at least this much
SKIP = {"alpha", "dora_scale"}


@dataclass(frozen=True)
class Case:
    """One LoKr configuration: the base layer (kind, in, out, kernel, stride, padding) and LyCORIS' args."""

    id: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    cin: int
    cout: int
    r: int
    alpha: float | None = 1.0
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    full_matrix: bool = False
    rs_lora: bool = False


CASES: list[Case] = [
    Case("linear_320_default", "linear", 320, 320, r=4, alpha=2.0),
    Case("linear_768_3072", "linear", 768, 3072, r=8, alpha=4.0),
    Case("linear_64_96", "linear", 64, 96, r=4, alpha=1.0),
    Case("linear_127_prime", "linear", 127, 64, r=4, alpha=2.0),
    Case("linear_decompose_both", "linear", 320, 320, r=2, alpha=1.0, decompose_both=True),
    Case("linear_decompose_both_w1_full", "linear", 320, 320, r=8, alpha=4.0, decompose_both=True),
    Case("linear_full_matrix", "linear", 320, 320, r=4, alpha=2.0, full_matrix=True),
    Case("linear_factor4", "linear", 320, 320, r=4, alpha=1.0, factor=4),
    Case("linear_factor8", "linear", 320, 640, r=4, alpha=3.0, factor=8),
    Case("linear_factor3_not_dividing", "linear", 320, 96, r=2, alpha=1.0, factor=3),
    Case("linear_small_r1", "linear", 320, 320, r=1, alpha=0.5),
    Case("linear_large_r_both_full", "linear", 64, 96, r=8, alpha=3.0),
    Case("linear_large_r_both_full_decompose_both", "linear", 64, 96, r=8, alpha=3.0, decompose_both=True),
    Case("linear_alpha_none", "linear", 320, 320, r=4, alpha=None),
    Case("linear_alpha_zero", "linear", 320, 320, r=4, alpha=0.0),
    Case("linear_rs_lora", "linear", 320, 320, r=4, alpha=2.0, rs_lora=True),
    Case("conv2d_3x3_default", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, padding=1),
    Case("conv2d_3x3_tucker", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, padding=1, use_tucker=True),
    Case("conv2d_1x1_tucker_ignored", "conv2d", 32, 64, r=2, alpha=1.0, use_tucker=True),
    Case("conv2d_1x1_default", "conv2d", 64, 32, r=2, alpha=2.0),
    Case("conv2d_3x3_stride2_pad1", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, stride=2, padding=1),
    Case("conv2d_3x3_stride2_pad1_tucker", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, stride=2, padding=1,
         use_tucker=True),
    Case("conv2d_3x3_dilation2", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, padding=2, dilation=2),
    Case("conv2d_3x3_decompose_both", "conv2d", 64, 64, r=2, alpha=1.0, kernel=3, padding=1, decompose_both=True),
    Case("conv2d_3x3_decompose_both_tucker", "conv2d", 64, 64, r=2, alpha=1.0, kernel=3, padding=1,
         decompose_both=True, use_tucker=True),
    Case("conv2d_3x3_full_matrix", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, padding=1, full_matrix=True),
    Case("conv2d_3x3_factor4", "conv2d", 32, 64, r=2, alpha=1.0, kernel=3, padding=1, factor=4),
    Case("conv2d_3x3_factor8_tucker", "conv2d", 64, 64, r=2, alpha=1.0, kernel=3, padding=1, factor=8,
         use_tucker=True),
    Case("conv2d_3x3_large_r_both_full", "conv2d", 32, 64, r=8, alpha=3.0, kernel=3, padding=1),
    Case("conv2d_3x3_tucker_large_r", "conv2d", 32, 64, r=8, alpha=3.0, kernel=3, padding=1, use_tucker=True),
    Case("conv2d_3x3_alpha_none", "conv2d", 32, 64, r=2, alpha=None, kernel=3, padding=1),
    Case("conv1d_k3", "conv1d", 32, 64, r=2, alpha=1.0, kernel=3, padding=1),
    Case("conv1d_k3_tucker", "conv1d", 32, 64, r=2, alpha=1.0, kernel=3, padding=1, use_tucker=True),
    Case("conv1d_k3_stride2", "conv1d", 32, 64, r=2, alpha=1.0, kernel=3, stride=2),
    Case("conv1d_k3_large_r", "conv1d", 32, 64, r=8, alpha=3.0, kernel=3, padding=1),
]
CASE_IDS = [c.id for c in CASES]
LAYER_TYPES: dict[str, type[LoKrLayer]] = {"linear": Linear, "conv1d": Conv1d, "conv2d": Conv2d}


def make_base(case: Case) -> nn.Module:
    torch.manual_seed(0)
    if case.kind == "linear":
        return nn.Linear(case.cin, case.cout)
    conv = nn.Conv1d if case.kind == "conv1d" else nn.Conv2d
    return conv(case.cin, case.cout, case.kernel, stride=case.stride, padding=case.padding, dilation=case.dilation)


def make_input(case: Case) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = {"linear": (2, 7, case.cin), "conv1d": (2, case.cin, 9), "conv2d": (2, case.cin, 9, 9)}[case.kind]
    return torch.randn(shape, generator=gen)


def make_lycoris(case: Case, base: nn.Module, bypass_mode: bool = False) -> LokrModule:
    """A LyCORIS LoKr module on `base` (forward patched via apply_to), with random factors."""
    lyc = LokrModule("lyc", base, 1.0, case.r, case.alpha, use_tucker=case.use_tucker,
                     decompose_both=case.decompose_both, factor=case.factor, full_matrix=case.full_matrix,
                     bypass_mode=bypass_mode, rs_lora=case.rs_lora)
    lyc.apply_to()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lyc.named_parameters():
            if name not in SKIP:
                p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
    return lyc.eval()


def lycoris_factors(lyc: LokrModule) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in lyc.custom_state_dict().items() if k not in SKIP}


@dataclass(frozen=True)
class Reference:
    """LyCORIS' side of a case, computed once: its module, factors, and outputs on `x`."""

    lyc: LokrModule
    plain: nn.Module  # an untouched copy of the base layer
    factors: dict[str, Tensor]
    x: Tensor
    base_out: Tensor
    out: Tensor


@functools.cache
def reference(case: Case, bypass_mode: bool = False) -> Reference:
    base = make_base(case)
    plain = copy.deepcopy(base)
    lyc = make_lycoris(case, base, bypass_mode)
    x = make_input(case)
    with torch.no_grad():
        return Reference(lyc, plain, lycoris_factors(lyc), x, plain(x), lyc(x))


def make_layer(case: Case, plain: nn.Module, factors: dict[str, Tensor], scale: float) -> LoKrLayer:
    """Our layer around a copy of `plain`, holding LyCORIS' tensors and scale as adapter "default"."""
    layer = LAYER_TYPES[case.kind](copy.deepcopy(plain))
    layer.set_adapter_tensors("default", {k: v.clone() for k, v in factors.items()}, scale=scale)
    layer.set_adapter("default")
    return layer.eval()


def weight_shape(case: Case) -> tuple[int, ...]:
    kernel = () if case.kind == "linear" else (case.kernel,) * (1 if case.kind == "conv1d" else 2)
    return (case.cout, case.cin, *kernel)


# ------------------------------------------------------------------------------------------ tests
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_planned_shapes_match_lycoris(case: Case) -> None:
    ref = reference(case)
    theirs = {k: tuple(v.shape) for k, v in ref.factors.items()}
    plan = LF.plan_lokr(weight_shape(case), case.r, case.factor, case.decompose_both, case.use_tucker,
                        case.full_matrix)
    assert plan.shapes() == theirs
    assert (plan.w1_lowrank, plan.w2_lowrank) == (not ref.lyc.use_w1, not ref.lyc.use_w2)
    assert plan.tucker == (ref.lyc.tucker and not ref.lyc.use_w2)
    assert LF.plan_from_tensors(weight_shape(case), ref.factors) == plan


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scale_rules_match_lycoris(case: Case) -> None:
    lyc = reference(case).lyc
    plan = LF.plan_from_tensors(weight_shape(case), reference(case).factors)
    assert LF.lycoris_scale(case.alpha, case.r, plan.both_full, rs_lora=case.rs_lora) == pytest.approx(lyc.scale)
    assert LF.consumer_scale(plan, alpha=float(lyc.alpha)) == pytest.approx(lyc.scale)
    if plan.both_full or not case.alpha:
        assert lyc.scale == pytest.approx(1.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_delta_weight_matches_get_weight(case: Case) -> None:
    ref = reference(case)
    with torch.no_grad():
        theirs = ref.lyc.get_weight(ref.lyc.shape)
        ours = LF.delta_weight(ref.factors, weight_shape(case), ref.lyc.scale)
    assert ours.shape == theirs.shape == weight_shape(case)
    assert theirs.abs().max() > MIN_EFFECT
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("our_mode", ["merged", "bypass", "auto"])
@pytest.mark.parametrize("lyc_bypass", [False, True], ids=["lyc_rebuild", "lyc_bypass"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_lycoris(case: Case, lyc_bypass: bool, our_mode: str) -> None:
    ref = reference(case, lyc_bypass)
    layer = make_layer(case, ref.plain, ref.factors, ref.lyc.scale)
    layer.forward_mode = our_mode
    with torch.no_grad():
        ours = layer(ref.x)
    assert (ref.out - ref.base_out).abs().max() > MIN_EFFECT
    assert ours.shape == ref.out.shape
    torch.testing.assert_close(ours, ref.out, atol=ATOL, rtol=0)


STRENGTH_CASES = [c for c in CASES if c.id in {"linear_320_default", "linear_large_r_both_full", "conv2d_3x3_tucker",
                                               "conv1d_k3"}]


@pytest.mark.parametrize("our_mode", ["merged", "bypass"])
@pytest.mark.parametrize("case", STRENGTH_CASES, ids=lambda c: c.id)
def test_strength_matches_lycoris_multiplier(case: Case, our_mode: str) -> None:
    """Our per-adapter strength plays LyCORIS' multiplier: ΔW x is scaled linearly."""
    base = make_base(case)
    plain = copy.deepcopy(base)
    lyc = make_lycoris(case, base, bypass_mode=our_mode == "bypass")
    lyc.multiplier = 0.5
    layer = make_layer(case, plain, lycoris_factors(lyc), lyc.scale)
    layer.set_adapter_weight("default", 0.5)
    layer.forward_mode = our_mode
    x = make_input(case)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lyc(x), atol=ATOL, rtol=0)
