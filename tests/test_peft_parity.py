"""Parity of our LoKr layers with PEFT 0.21.2's LoKr and with LyCORIS 4.1.3's math.

For each case a small model is adapted twice from the same config: by PEFT (`init_weights=False`,
random factors) and by `lokr_diffusers.LoKrModel`. PEFT's tensors are copied into ours through
PEFT's saved state-dict layout, and both are run in fp32 eval mode. Ours must give PEFT's outputs
in each forward mode ("merged", "bypass", "auto"), and also the output of LyCORIS' rebuild
(`lycoris.functional.lokr.kron_weight`) applied to the same tensors and PEFT's per-layer scale.

Where PEFT deviates from LyCORIS (docs/formats.md §The math) we follow LyCORIS, and the tests say so:
- PEFT's `factorization` does not swap in the factor > 0 branch (64, 16 -> (16, 4), not (4, 16));
- PEFT's Conv1d Tucker core is (r, r, k, 1), LyCORIS' (r, r, k); ours plans the latter, loads both;
- PEFT's Conv1d with a full 3-D W2 calls torch.kron on a 2-D W1, which torch unsqueezes at the
  front, so its ΔW is a scrambled Kronecker product; there only the LyCORIS oracle applies.

Also checked: the planned tensor names and shapes (vs PEFT and LyCORIS' `weight_gen`), the state
dict round trip, rank/alpha patterns, two adapters active at once, and zero-delta initialisation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import peft
import pytest
import torch
from lycoris.functional import factorization as lycoris_factorization
from lycoris.functional.lokr import kron_weight, weight_gen
from peft.tuners.lokr.layer import LoKrLayer as PeftLoKrLayer
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import Tensor, nn

import lokr_diffusers
from lokr_diffusers.functional import FACTOR_NAMES

ATOL = 1e-5  # fp32, order-1 activations; rtol 0: the tolerance is absolute only
MODES = ("merged", "bypass", "auto")
PREFIX = "base_model.model."


class Stack(nn.Module):
    """Layers applied one after the other; module names are `layers.<i>`."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], list[nn.Module]]
    x_shape: tuple[int, ...]
    cfg: dict[str, Any] = field(default_factory=dict)
    peft_deviates: bool = False  # PEFT's ΔW is not the LyCORIS Kronecker product here


def _targets(n: int) -> list[str]:
    return [f"layers.{i}" for i in range(n)]


CASES: list[Case] = [
    Case("linear_64x96_lowrank", lambda: [nn.Linear(64, 96)], (3, 64), {"r": 2, "alpha": 3}),
    Case("linear_320_lowrank", lambda: [nn.Linear(320, 320)], (2, 5, 320), {"r": 4, "alpha": 2}),
    # r >= max(W2 dims) / 2: both factors full; PEFT (and ours, for configs) still scales alpha / r.
    Case("linear_64x96_bothfull", lambda: [nn.Linear(64, 96)], (3, 64), {"r": 16, "alpha": 8}),
    Case("linear_decompose_both", lambda: [nn.Linear(64, 96)], (3, 64), {"r": 2, "decompose_both": True}),
    # r exactly max/2 of a factor's dims makes that factor full: W1 (8, 8) full at r=4, W2 (12, 8) full at r=6.
    Case("linear_w1_rank_boundary", lambda: [nn.Linear(64, 96)], (3, 64), {"r": 4, "decompose_both": True}),
    Case("linear_w2_rank_boundary", lambda: [nn.Linear(64, 96)], (3, 64), {"r": 6, "alpha": 3}),
    Case("conv2d_w2_rank_boundary", lambda: [nn.Conv2d(32, 64, 3, padding=1)], (2, 32, 6, 6),
         {"r": 4, "alpha": 1, "use_effective_conv2d": True}),
    Case("linear_factor4", lambda: [nn.Linear(64, 96)], (3, 64), {"r": 2, "decompose_factor": 4}),
    Case("linear_factor4_decompose_both", lambda: [nn.Linear(320, 320)], (2, 320),
         {"r": 1, "decompose_factor": 4, "decompose_both": True, "alpha": 2}),
    Case("conv1d_k3_lowrank", lambda: [nn.Conv1d(16, 32, 3, padding=1)], (2, 16, 10), {"r": 2, "alpha": 1}),
    # PEFT: torch.kron(W1 2-D, W2 3-D) unsqueezes W1 at the front, not the end -> scrambled ΔW.
    Case("conv1d_k3_full", lambda: [nn.Conv1d(16, 32, 3, padding=1)], (2, 16, 10), {"r": 8, "alpha": 4},
         peft_deviates=True),
    Case("conv1d_k3_tucker", lambda: [nn.Conv1d(16, 32, 3, padding=1)], (2, 16, 10),
         {"r": 2, "alpha": 1, "use_effective_conv2d": True}),
    Case("conv2d_3x3_lowrank", lambda: [nn.Conv2d(32, 64, 3, padding=1)], (2, 32, 6, 6), {"r": 2, "alpha": 1}),
    Case("conv2d_3x3_full", lambda: [nn.Conv2d(32, 64, 3, padding=1)], (2, 32, 6, 6), {"r": 8, "alpha": 2}),
    Case("conv2d_3x3_stride2_dilation2", lambda: [nn.Conv2d(32, 64, 3, stride=2, padding=2, dilation=2)],
         (2, 32, 7, 7), {"r": 2, "alpha": 1}),
    Case("conv2d_1x1", lambda: [nn.Conv2d(32, 64, 1)], (2, 32, 5, 5), {"r": 2, "alpha": 1}),
    # 1x1: use_effective_conv2d is ignored by PEFT, LyCORIS and ours.
    Case("conv2d_1x1_tucker_ignored", lambda: [nn.Conv2d(32, 64, 1)], (2, 32, 5, 5),
         {"r": 2, "alpha": 1, "use_effective_conv2d": True}),
    Case("conv2d_groups2", lambda: [nn.Conv2d(32, 64, 3, padding=1, groups=2)], (2, 32, 6, 6), {"r": 2, "alpha": 1}),
    Case("conv2d_groups4", lambda: [nn.Conv2d(32, 64, 3, padding=1, groups=4)], (2, 32, 6, 6), {"r": 1, "alpha": 1}),
    Case("conv2d_3x3_tucker", lambda: [nn.Conv2d(32, 64, 3, padding=1)], (2, 32, 6, 6),
         {"r": 2, "alpha": 1, "use_effective_conv2d": True}),
    Case("conv2d_3x3_tucker_decompose_both", lambda: [nn.Conv2d(32, 64, 3, padding=1)], (2, 32, 6, 6),
         {"r": 1, "alpha": 1, "use_effective_conv2d": True, "decompose_both": True}),
    Case("conv2d_3x3_factor4", lambda: [nn.Conv2d(32, 64, 3, padding=1)], (2, 32, 6, 6),
         {"r": 2, "alpha": 1, "decompose_factor": 4}),
    Case("rank_alpha_pattern", lambda: [nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 96)], (3, 64),
         {"r": 2, "alpha": 2, "rank_pattern": {r"layers\.1": 16}, "alpha_pattern": {r"layers\.[12]": 1}}),
    Case("mixed_conv_linear_patterns", lambda: [nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 1)],
         (2, 16, 5, 5), {"r": 2, "alpha": 1, "rank_pattern": {r"layers\.1": 8}, "alpha_pattern": {r"layers\.0": 3}}),
]
CASE_IDS = [c.id for c in CASES]
# Tucker on Conv1d: PEFT's core is (r, r, k, 1), LyCORIS' and ours (r, r, k).
PEFT_T2_4D = {c.id for c in CASES if c.cfg.get("use_effective_conv2d") and isinstance(c.make()[0], nn.Conv1d)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ helpers
def _configs(n_layers: int, cfg: dict[str, Any]) -> tuple[peft.LoKrConfig, lokr_diffusers.LoKrConfig]:
    """The same arguments for PEFT and for ours (random factors unless cfg says otherwise)."""
    kwargs = {"target_modules": _targets(n_layers), "init_weights": False, **cfg}
    return peft.LoKrConfig(**copy.deepcopy(kwargs)), lokr_diffusers.LoKrConfig(**copy.deepcopy(kwargs))


def _build(case: Case, **overrides: Any) -> tuple[nn.Module, nn.Module, lokr_diffusers.LoKrModel, Tensor]:
    """(base, PEFT model, our model with its own freshly planned tensors, input), all in eval mode."""
    base = Stack(case.make()).eval()
    peft_cfg, ours_cfg = _configs(len(base.layers), {**case.cfg, **overrides})
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_cfg).eval()
    ours = lokr_diffusers.LoKrModel(copy.deepcopy(base), ours_cfg, "default").eval()
    return base, peft_model, ours, torch.randn(case.x_shape)


def _peft_sd(peft_model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    return peft.get_peft_model_state_dict(peft_model, adapter_name=adapter)


def _shapes(sd: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _peft_layers(peft_model: nn.Module) -> dict[str, PeftLoKrLayer]:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PeftLoKrLayer)}


@torch.no_grad()
def _lycoris_output(base: nn.Module, peft_model: nn.Module, adapters: Sequence[str], x: Tensor) -> Tensor:
    """The base model with W += LyCORIS' ΔW, rebuilt from PEFT's tensors at PEFT's per-layer scale."""
    ref = copy.deepcopy(base)
    for name, layer in _peft_layers(peft_model).items():
        weight = ref.get_submodule(name).weight
        for a in adapters:
            f = {n: getattr(layer, n)[a] for n in FACTOR_NAMES if a in getattr(layer, n)}
            dw = kron_weight(*(f.get(n) for n in FACTOR_NAMES), scale=layer.scaling[a], backend="torch")
            weight += dw.reshape(weight.shape)
    return ref(x)


@torch.no_grad()
def _assert_ours_matches(ours: lokr_diffusers.LoKrModel, x: Tensor, expected: Tensor, what: str) -> None:
    for mode in MODES:
        ours.set_forward_mode(mode)
        y = ours(x)
        torch.testing.assert_close(y, expected, atol=ATOL, rtol=0, msg=lambda m, mode=mode: f"{what}, {mode}: {m}")


def _assert_visible(y: Tensor, y_base: Tensor) -> None:
    """The adapter must move the output well beyond the tolerance, or parity would prove nothing."""
    assert (y - y_base).abs().max().item() > 1e3 * ATOL


def _lycoris_shapes(weight_shape: Sequence[int], r: int, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes LyCORIS' weight_gen plans, w2_b flattened to 2-D as in LyCORIS' saved files."""
    tensors = weight_gen(torch.empty(*weight_shape), r, tucker=cfg.get("use_effective_conv2d", False),
                         factor=cfg.get("decompose_factor", -1), decompose_both=cfg.get("decompose_both", False))
    out = {n: tuple(t.shape) for n, t in zip(FACTOR_NAMES, tensors, strict=True) if t is not None}
    if "lokr_w2_b" in out and "lokr_t2" not in out:
        out["lokr_w2_b"] = (out["lokr_w2_b"][0], math.prod(out["lokr_w2_b"][1:]))
    return out


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_peft_and_lycoris(case: Case) -> None:
    base, peft_model, ours, x = _build(case)
    ours.set_adapter_state_dict(_peft_sd(peft_model), "default")
    with torch.no_grad():
        y_base, y_peft = base(x), peft_model(x)
    y_lyco = _lycoris_output(base, peft_model, ["default"], x)
    _assert_visible(y_lyco, y_base)
    _assert_ours_matches(ours, x, y_lyco, "vs LyCORIS")
    if case.peft_deviates:  # documented PEFT deviation: make sure it is still there, then follow LyCORIS
        assert not torch.allclose(y_peft, y_lyco, atol=ATOL, rtol=0)
    else:
        _assert_ours_matches(ours, x, y_peft, "vs PEFT")


LINEAR_CASES = [c for c in CASES if all(isinstance(m, nn.Linear) for m in c.make()) and not c.peft_deviates]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.id for c in LINEAR_CASES])
@pytest.mark.parametrize("mode", ["bypass", "auto"])
def test_training_step_gradients_match_peft(case: Case, mode: str) -> None:
    """A forward + backward (input requiring grad, trainable factors) gives PEFT's output, input
    gradient and factor gradients: the Linear bypass runs as one autograd Function in training."""
    _, peft_model, ours, x = _build(case)
    ours.set_adapter_state_dict(_peft_sd(peft_model), "default")
    ours.set_forward_mode(mode)
    grads: dict[str, dict[str, Tensor]] = {}
    for name, model in (("peft", peft_model), ("ours", ours)):
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        y.square().sum().backward()
        lokr = {k.split("layers.", 1)[1]: t.grad for k, t in model.named_parameters() if ".lokr_" in k}
        assert lokr and all(g is not None for g in lokr.values()), name
        grads[name] = {"y": y.detach(), "x": cast(Tensor, xg.grad), **lokr}
    assert grads["ours"].keys() == grads["peft"].keys()
    for key, want in grads["peft"].items():
        torch.testing.assert_close(grads["ours"][key], want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_planned_state_dict_matches_peft_and_lycoris(case: Case) -> None:
    _, peft_model, ours, _ = _build(case)
    ours_shapes, peft_shapes = _shapes(ours.get_adapter_state_dict("default")), _shapes(_peft_sd(peft_model))
    assert ours_shapes.keys() == peft_shapes.keys()
    if case.id in PEFT_T2_4D:  # PEFT's Conv1d Tucker core carries a trailing 1
        t2 = [k for k in peft_shapes if k.endswith(".lokr_t2")]
        assert t2 and all(peft_shapes[k] == (*ours_shapes[k], 1) for k in t2)
        peft_shapes.update({k: ours_shapes[k] for k in t2})
    assert ours_shapes == peft_shapes
    for name, layer in _peft_layers(peft_model).items():
        want = _lycoris_shapes(layer.get_base_layer().weight.shape, layer.r["default"], case.cfg)
        got = {k.rpartition(".")[2]: s for k, s in ours_shapes.items() if k.startswith(f"{PREFIX}{name}.")}
        assert got == want, name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_round_trip(case: Case) -> None:
    _, peft_model, ours, _ = _build(case)
    sd = _peft_sd(peft_model)
    ours.set_adapter_state_dict(sd, "default")
    back = ours.get_adapter_state_dict("default")
    assert back.keys() == sd.keys()
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("case", [c for c in CASES if "pattern" in c.id], ids=lambda c: c.id)
def test_rank_alpha_patterns_match_peft(case: Case) -> None:
    _, peft_model, ours, _ = _build(case)
    ours_layers = dict(lokr_diffusers.lokr_layers(ours.model))
    peft_layers = _peft_layers(peft_model)
    assert ours_layers.keys() == peft_layers.keys()
    for name, p in peft_layers.items():
        o = ours_layers[name]
        assert (o.r["default"], o.alpha["default"]) == (p.r["default"], p.alpha["default"]), name
        assert o.scaling["default"] == pytest.approx(p.scaling["default"]), name
    assert len({p.r["default"] for p in peft_layers.values()}) > 1  # the patterns did something
    assert len({p.scaling["default"] for p in peft_layers.values()}) > 1


TWO_ADAPTERS: list[tuple[Case, dict[str, Any]]] = [
    (CASES[CASE_IDS.index("linear_64x96_lowrank")], {"r": 16, "alpha": 4, "decompose_both": True}),
    (CASES[CASE_IDS.index("linear_320_lowrank")], {"r": 2, "alpha": 1, "decompose_factor": 4}),
    (CASES[CASE_IDS.index("conv2d_3x3_lowrank")], {"r": 2, "alpha": 3, "use_effective_conv2d": True}),
    (CASES[CASE_IDS.index("conv1d_k3_tucker")], {"r": 1, "alpha": 2}),
    (CASES[CASE_IDS.index("rank_alpha_pattern")], {"r": 4, "alpha": 1, "rank_pattern": {r"layers\.0": 1}}),
]


@pytest.mark.parametrize(("case", "b_cfg"), TWO_ADAPTERS, ids=[c.id for c, _ in TWO_ADAPTERS])
def test_two_active_adapters_match_peft(case: Case, b_cfg: dict[str, Any]) -> None:
    base, peft_model, ours, x = _build(case)
    peft_b, ours_b = _configs(len(base.layers), b_cfg)
    peft_model.add_adapter("b", peft_b)
    peft_model.base_model.set_adapter(["default", "b"])
    ours.add_adapter("b", ours_b)
    ours.set_adapter(["default", "b"])
    for adapter in ("default", "b"):
        ours.set_adapter_state_dict(_peft_sd(peft_model, adapter), adapter)
    with torch.no_grad():
        y_base, y_peft = base(x), peft_model(x)
    y_lyco = _lycoris_output(base, peft_model, ["default", "b"], x)
    y_default_only = _lycoris_output(base, peft_model, ["default"], x)
    _assert_visible(y_lyco, y_default_only)  # "b" contributes
    _assert_visible(y_lyco, y_base)
    _assert_ours_matches(ours, x, y_peft, "two adapters vs PEFT")
    _assert_ours_matches(ours, x, y_lyco, "two adapters vs LyCORIS")


FACTORIZATIONS = [(64, 16), (64, 4), (64, -1), (96, 32), (320, -1), (320, 4), (127, -1), (768, -1), (1280, -1),
                  (3072, -1), (640, 8), (360, 16)]


@pytest.mark.parametrize(("dim", "factor"), FACTORIZATIONS, ids=[f"{d}_f{f}" for d, f in FACTORIZATIONS])
def test_factorization_follows_lycoris(dim: int, factor: int) -> None:
    ours = lokr_diffusers.factorization(dim, factor)
    assert ours == lycoris_factorization(dim, factor)
    assert ours[0] <= ours[1] and ours[0] * ours[1] == dim
    # PEFT differs only by not swapping in the factor > 0 branch
    assert tuple(sorted(peft_factorization(dim, factor))) == ours


def test_peft_unswapped_factorization_loads_and_matches() -> None:
    """Factor 16 on 64: PEFT plans W1 (16, 16) ⊗ W2 (4, 4); LyCORIS and ours W1 (4, 4) ⊗ W2 (16, 16)."""
    assert peft_factorization(64, 16) == (16, 4)
    assert lycoris_factorization(64, 16) == lokr_diffusers.factorization(64, 16) == (4, 16)
    case = Case("factor16", lambda: [nn.Linear(64, 64)], (3, 64), {"r": 2, "alpha": 1, "decompose_factor": 16})
    base, peft_model, ours, x = _build(case)
    ours_shapes = {k.rpartition(".")[2]: s for k, s in _shapes(ours.get_adapter_state_dict()).items()}
    assert ours_shapes == _lycoris_shapes((64, 64), 2, case.cfg)
    assert ours_shapes == {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16)}
    sd = _peft_sd(peft_model)
    assert {k.rpartition(".")[2]: s for k, s in _shapes(sd).items()} == {"lokr_w1": (16, 16), "lokr_w2": (4, 4)}
    ours.set_adapter_state_dict(sd, "default")  # shapes are taken from the tensors
    with torch.no_grad():
        y_base, y_peft = base(x), peft_model(x)
    _assert_visible(y_peft, y_base)
    _assert_ours_matches(ours, x, y_peft, "PEFT factorization")
    _assert_ours_matches(ours, x, _lycoris_output(base, peft_model, ["default"], x), "PEFT factorization vs LyCORIS")


INIT_CASES = [c for c in CASES if c.id in {"linear_64x96_lowrank", "linear_64x96_bothfull", "linear_decompose_both",
                                            "conv1d_k3_full", "conv2d_3x3_tucker", "conv2d_groups2",
                                            "conv2d_3x3_tucker_decompose_both"}]


@pytest.mark.parametrize("init", [True, "lycoris"], ids=["init_true", "init_lycoris"])
@pytest.mark.parametrize("case", INIT_CASES, ids=lambda c: c.id)
def test_init_gives_zero_delta(case: Case, init: bool | str) -> None:
    base, peft_model, ours, x = _build(case, init_weights=init)
    with torch.no_grad():
        y_base = base(x)
        assert torch.equal(peft_model(x), y_base)
        for mode in MODES:
            ours.set_forward_mode(mode)
            assert torch.equal(ours(x), y_base), mode


@pytest.mark.parametrize("case", INIT_CASES, ids=lambda c: c.id)
def test_random_init_changes_output(case: Case) -> None:
    base, peft_model, ours, x = _build(case, init_weights=False)
    with torch.no_grad():
        y_base = base(x)
        _assert_visible(peft_model(x), y_base)
        for mode in MODES:
            ours.set_forward_mode(mode)
            _assert_visible(ours(x), y_base)
