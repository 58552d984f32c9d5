"""LoKr layers: the two forward paths agree, merge / unmerge, init modes, dropout, several adapters.

References are computed from first principles here: base layer output + F.linear / F.convNd with
ΔW from `functional.delta_weight` (itself checked against an einsum reference in test_functional).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lokr_diffusers import LoKrConfig
from lokr_diffusers import functional as LF
from lokr_diffusers.layers import Conv1d, Conv2d, Linear, LoKrLayer
from lokr_diffusers.training.errors import AdapterFusedError

LAYERS = {  # id: (base layer factory, wrapper, input shape)
    "linear": (lambda: nn.Linear(48, 40), Linear, (2, 5, 48)),
    "conv1d_k3": (lambda: nn.Conv1d(24, 32, 3, padding=1), Conv1d, (2, 24, 13)),
    "conv2d_3x3_s2": (lambda: nn.Conv2d(32, 24, 3, stride=2, padding=1), Conv2d, (2, 32, 9, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(32, 48, 1), Conv2d, (2, 32, 6, 6)),
    "conv2d_groups": (lambda: nn.Conv2d(32, 48, 3, padding=1, groups=4), Conv2d, (2, 32, 7, 7)),
    "conv2d_reflect": (lambda: nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), Conv2d, (2, 16, 7, 7)),
}
CONFIGS = {
    "lowrank": dict(r=2, alpha=3.0),
    "full": dict(r=16, alpha=4.0),
    "both_tucker": dict(r=2, alpha=2.0, decompose_both=True, use_effective_conv2d=True),
    "factor4": dict(r=2, alpha=1.0, decompose_factor=4),
}


def _layer(kind: str, cfg: dict, init: bool | str = False, seed: int = 0) -> tuple[LoKrLayer, nn.Module, tuple]:
    make, wrapper, shape = LAYERS[kind]
    torch.manual_seed(seed)
    base = make()
    layer = wrapper(copy.deepcopy(base), "default", LoKrConfig(init_weights=init, **cfg))
    return layer, base, shape


def _reference(layer: LoKrLayer, base: nn.Module, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    dw = sum(layer.get_delta_weight(a) for a in adapters)
    if isinstance(base, nn.Linear):
        return base(x) + F.linear(x, dw)
    return base(x) + base._conv_forward(x, dw, None)


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("kind", list(LAYERS), ids=list(LAYERS))
@pytest.mark.parametrize("mode", ["merged", "bypass", "auto"])
def test_forward_paths_agree_with_reference(kind: str, cfg: str, mode: str) -> None:
    layer, base, shape = _layer(kind, CONFIGS[cfg])
    layer.forward_mode = mode
    x = torch.randn(shape)
    with torch.no_grad():
        out, ref, plain = layer(x), _reference(layer, base, x, ["default"]), base(x)
    assert (ref - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv2d_3x3_s2", "conv1d_k3"])
def test_gradients_agree_between_paths(kind: str) -> None:
    grads = {}
    for mode in ("merged", "bypass"):
        layer, _, shape = _layer(kind, CONFIGS["both_tucker"], seed=3)
        layer.forward_mode = mode
        torch.manual_seed(7)
        x = torch.randn(shape, requires_grad=True)
        layer(x).square().sum().backward()
        grads[mode] = {n: t.grad.clone() for n, t in layer.factors("default").items()} | {"x": x.grad.clone()}
    for name, g in grads["merged"].items():
        torch.testing.assert_close(grads["bypass"][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("cfg", ["lowrank", "full", "both_tucker"])
def test_compiled_bypass_training_step_equals_eager_merged(cfg: str) -> None:
    """Dynamo traces the Linear bypass Function whole (fullgraph) through forward and backward, and the
    compiled step gives the merged path's output and gradients."""
    layers = {}
    for mode in ("bypass", "merged"):
        layer, _, shape = _layer("linear", CONFIGS[cfg], seed=5)
        layer.forward_mode = mode
        layers[mode] = layer
    x = torch.randn(shape)
    grads = {}
    for mode, layer in layers.items():
        xg = x.clone().requires_grad_(True)
        run = torch.compile(layer, fullgraph=True, backend="aot_eager") if mode == "bypass" else layer
        out = run(xg)
        out.square().sum().backward()
        grads[mode] = {"out": out.detach(), "x": xg.grad} | {n: t.grad for n, t in layer.factors("default").items()}
    torch._dynamo.reset()
    for name, g in grads["merged"].items():
        torch.testing.assert_close(grads["bypass"][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_equals_unmerged_and_unmerge_restores_bits(kind: str) -> None:
    layer, _, shape = _layer(kind, CONFIGS["lowrank"])
    x = torch.randn(shape)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and layer.merged_adapters == ["default"]
        merged = layer(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.equal(layer.base_layer.weight, original)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)  # bit for bit
    assert not layer.merged


@pytest.mark.parametrize("kind", ["linear", "conv2d_3x3_s2"])
def test_training_through_a_fused_adapter_raises_adapter_fused_error(kind: str) -> None:
    """A fused adapter's factors no longer act on their own: a forward that would train them says so with the
    package's AdapterFusedError (a RuntimeError, naming the adapter), before any backward."""
    layer, _, shape = _layer(kind, CONFIGS["lowrank"])
    layer.merge()
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(AdapterFusedError, match=r"adapter 'default' is fused into the base weights.*unfuse it"):
        layer(torch.randn(shape))
    assert torch.equal(layer.base_layer.weight, weight)
    with torch.no_grad():  # inference through the fused adapter is fine
        layer(torch.randn(shape))


def test_safe_merge_refuses_non_finite() -> None:
    layer, _, _ = _layer("linear", CONFIGS["lowrank"])
    with torch.no_grad():
        layer.lokr_w1["default"][0, 0] = float("inf")
    original = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, original) and not layer.merged


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("init", "changes"), [(True, False), ("lycoris", False), (False, True)])
def test_init_weights(kind: str, init: bool | str, changes: bool) -> None:
    for cfg in CONFIGS.values():
        layer, base, shape = _layer(kind, cfg, init=init)
        x = torch.randn(shape)
        with torch.no_grad():
            same = torch.equal(layer(x), base(x)) if not changes else (layer(x) - base(x)).abs().max() < 1e-6
        assert same != changes


def test_two_adapters_add_and_weights_scale() -> None:
    layer, base, shape = _layer("conv2d_3x3_s2", CONFIGS["both_tucker"])
    layer.update_layer("b", 3, 6.0, LoKrConfig(r=3, alpha=6.0, init_weights=False))
    x = torch.randn(shape)
    layer.set_adapter(["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, base, x, ["default", "b"]), rtol=1e-5, atol=1e-5)
        layer.set_adapter_weight("b", 0.5)
        expected = _reference(layer, base, x, ["default", "b"])  # get_delta_weight includes the weight
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.set_adapter("b")
        torch.testing.assert_close(layer(x), _reference(layer, base, x, ["b"]), rtol=1e-5, atol=1e-5)
    assert layer.scaling["b"] == 2.0 and layer.effective_scale("b") == 1.0


def test_disable_returns_base_output() -> None:
    layer, base, shape = _layer("linear", CONFIGS["lowrank"])
    x = torch.randn(shape)
    layer.enable_adapters(False)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("mode", ["merged", "bypass"])
def test_rank_dropout_drops_output_rows_in_training_only(mode: str) -> None:
    layer, base, shape = _layer("linear", {**CONFIGS["lowrank"], "rank_dropout": 0.5})
    layer.forward_mode = mode
    x = torch.randn(shape)
    with torch.no_grad():
        full_delta = _reference(layer, base, x, ["default"]) - base(x)
        layer.eval()
        torch.testing.assert_close(layer(x) - base(x), full_delta, rtol=1e-5, atol=1e-5)
        layer.train()
        torch.manual_seed(0)
        delta = layer(x) - base(x)
    kept = (delta.abs() > 1e-7).flatten(0, -2).any(0)  # (out,): channels the mask kept
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(delta[..., kept], full_delta[..., kept], rtol=1e-4, atol=1e-5)
    # the same random mask, whichever path computes it
    other, _, _ = _layer("linear", {**CONFIGS["lowrank"], "rank_dropout": 0.5})
    other.forward_mode = "bypass" if mode == "merged" else "merged"
    other.train()
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(other(x) - base(x), delta, rtol=1e-4, atol=1e-5)


def test_rank_dropout_scale_rescales_kept_rows() -> None:
    layer, base, shape = _layer("linear", {**CONFIGS["lowrank"], "rank_dropout": 0.5, "rank_dropout_scale": True})
    x = torch.randn(shape)
    layer.train()
    torch.manual_seed(0)
    keep = (torch.rand(40) > 0.5).float()
    torch.manual_seed(0)
    with torch.no_grad():
        delta = layer(x) - base(x)
        full = layer.get_delta_weight("default")
    torch.testing.assert_close(delta, F.linear(x, full * (keep / keep.mean())[:, None]), rtol=1e-4, atol=1e-5)


def test_module_dropout_in_training_only() -> None:
    layer, base, shape = _layer("linear", {**CONFIGS["lowrank"], "module_dropout": 0.999})
    x = torch.randn(shape)
    with torch.no_grad():
        assert not torch.equal(layer.eval()(x), base(x))
        torch.manual_seed(0)
        assert torch.equal(layer.train()(x), base(x))


def test_set_adapter_tensors_reads_shapes_and_rejects_misfits() -> None:
    layer = Linear(nn.Linear(64, 64))
    plan = LF.plan_lokr((64, 64), 2, decompose_factor=16)  # (4, 16) x (4, 16)
    tensors = {n: torch.randn(s) for n, s in plan.shapes().items()}
    layer.set_adapter_tensors("x", tensors, scale=0.5)
    assert layer.plans["x"] == plan and layer.scaling["x"] == 0.5
    with pytest.raises(ValueError, match="does not fit"):
        layer.set_adapter_tensors("y", {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(16, 15)}, 1.0)
    assert "y" not in layer.plans


def test_fp16_base_with_fp32_adapter_under_autocast_free_cast() -> None:
    # Adapters may be kept in fp32 while the base runs in bf16 (mixed-precision training): bypass casts
    # the factors to the input's dtype, merged casts ΔW to the weight's dtype.
    layer, base, shape = _layer("linear", CONFIGS["lowrank"])
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    for mode in ("merged", "bypass"):
        layer.forward_mode = mode
        with torch.no_grad():
            out = layer(x)
        assert out.dtype == torch.bfloat16
        ref = _reference(layer, base, x.float(), ["default"])
        torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(("autocast", "weight_dtype", "uses_function"),
                         [(False, torch.float32, True), (True, torch.float32, False), (False, torch.bfloat16, False)])
def test_merged_training_function_only_where_it_is_not_slower(monkeypatch: pytest.MonkeyPatch, autocast: bool,
                                                              weight_dtype: torch.dtype, uses_function: bool) -> None:
    """The merged training Function runs in fp32; on the CPU in bf16 / fp16 (weights or autocast) the
    plain W + ΔW op runs (the Function's small batched matmuls are slower there); both give the same
    numbers (tests/test_functional_autograd.py)."""
    from lokr_diffusers import LoKrModel

    calls: list[int] = []
    real = LF.apply_merged_linear
    monkeypatch.setattr(LF, "apply_merged_linear", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    # 320 wide, W2 low-rank: where the Function runs in fp32 (a small weight with full factors may run plain
    # autograd in any dtype: tests/test_op_counts.py)
    model = LoKrModel(nn.Sequential(nn.Linear(320, 320)).to(weight_dtype),
                      LoKrConfig(r=4, alpha=4, target_modules=["0"], init_weights=False), "a")
    model.set_forward_mode("merged")
    x = torch.randn(2, 8, 320, dtype=weight_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().sum().backward()
    assert bool(calls) is uses_function


def test_peft_style_views_read_the_records_and_cannot_be_written() -> None:
    """`layer.r`, `.alpha`, `.scaling`, `.rows` read each adapter's record; writing through them would
    leave the traced scales and kept weights stale, so it is refused; `set_scale` is the way (a hotswap)."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(12, 8), "a", LoKrConfig(r=2, alpha=3, init_weights=False))
    x = torch.randn(3, 12)
    assert (layer.r["a"], layer.alpha["a"], layer.scaling["a"]) == (2, 3, 1.5)
    assert dict(layer.rows) == {} and "a" not in layer.rows and list(layer.plans) == ["a"]
    with pytest.raises(TypeError):
        layer.scaling["a"] = 3.0  # type: ignore[index]
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        layer.set_scale("a", 4.5)
        after = layer(x)
    base = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(after - base, (before - base) * 3, rtol=1e-5, atol=1e-6)
    assert (layer.scaling["a"], layer.alpha["a"]) == (4.5, 9.0)
