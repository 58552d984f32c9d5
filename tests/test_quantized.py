"""LoKr beside quantized base layers (docs/adapters.md §Quantized base layers).

Each quantizer that runs on the CPU: torchao int8 weight-only, GGUF (Q8_0 / Q4_0 packed by the `gguf`
package, in diffusers' GGUFLinear), fp8 storage (a plain fp8 weight, and diffusers' layerwise casting
applied before and after the adapter), bitsandbytes 4-bit / 8-bit (its CPU backend). References are
written here from the quantizers' own definitions, not from lokr_diffusers.quantized:

- dequantized W: torchao `qdata · scale` (its symmetric int8 layout), GGUF `gguf.quants.dequantize`
  (the gguf package's numpy reference, not diffusers' torch one the layer runs), fp8 `.float()`,
  bitsandbytes `dequantize_4bit` / `CB · SCB / 127` taken before the adapter exists;
- ΔW = scale · W1 ⊗ W2 from the factors (docs/formats.md §The math).

Tolerances: the unfused forward runs the same dequantized values in fp32 as the reference, so it
agrees to fp32 summation order (1e-5 relative to |x|·|W|), except GGUF: diffusers' GGUFLinear
dequantizes into the fp16 of its block scales (2^-11 relative, so 2^-10 · |x|·|W| with the sums'
rounding); the LoKr part adds in fp32 beside it. bitsandbytes' CPU kernels compute in
bf16 (4-bit) or quantize the activations to int8 (8-bit, LLM.int8), so there the bound is that
precision (see _BNB_BOUND). A requantizing fuse is checked element by element against half a
quantization step of the scheme (see _requant_bound), and the error it logs against the error
measured here.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers import quantized as Q
from lokr_diffusers.layers import LoKrLayer

OUT, IN = 32, 64  # GGUF blocks of 32 along IN; bitsandbytes' CPU packing wants OUT % 32 == 0


def _plain(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.mul_(4)  # |W| up to ~0.5, so fp8 rounding is well above fp32 noise
    return lin


# ----------------------------------------------------------------------------- quantized layers
def _torchao() -> nn.Module:
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(_plain())
    quantize_(holder, Int8WeightOnlyConfig())
    return holder[0]


def _gguf(type_name: str) -> nn.Module:
    gguf = pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    lin = _plain()
    qt = gguf.GGMLQuantizationType[type_name]
    packed = gguf.quants.quantize(lin.weight.detach().numpy(), qt)
    layer = GGUFLinear(IN, OUT, bias=True, compute_dtype=torch.float32)
    layer.weight = GGUFParameter(torch.from_numpy(packed), quant_type=qt)
    layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer


def _fp8() -> nn.Module:
    lin = _plain()
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    return lin


def _fp8_cast() -> nn.Module:
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting

    holder = nn.Sequential(_plain())
    apply_layerwise_casting(holder, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                            skip_modules_pattern=())
    return holder[0]


KINDS = {
    "torchao_int8": (_torchao, "torchao Int8Tensor"),
    "gguf_q8_0": (lambda: _gguf("Q8_0"), "GGUF Q8_0"),
    "gguf_q4_0": (lambda: _gguf("Q4_0"), "GGUF Q4_0"),
    "fp8": (_fp8, "fp8 storage (float8_e4m3fn)"),
    "fp8_cast_before": (_fp8_cast, "fp8 storage (float8_e4m3fn, cast up by diffusers layerwise casting)"),
    "fp8_cast_after": (_plain, "fp8 storage (float8_e4m3fn, cast up by diffusers layerwise casting)"),
}


def _reference_weight(kind: str, base: nn.Module) -> torch.Tensor:
    """The base weight as fp32, from the quantizer's own definition (see the module docstring)."""
    w = base.weight
    if kind == "torchao_int8":
        assert w.zero_point is None or not w.zero_point.any()  # symmetric: W = q · scale, one scale per row
        return w.qdata.float() * w.scale.float().reshape(OUT, -1).repeat_interleave(IN // w.block_size[1], 1)
    if kind.startswith("gguf"):
        import gguf

        raw = w.as_tensor().detach().numpy()
        return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(w.quant_type))).copy())
    return w.detach().float()


def _packed(base: nn.Module) -> list[torch.Tensor]:
    """Copies of the bytes that hold the quantized weight (for 'never written' checks)."""
    w = base.weight
    if type(w).__module__.startswith("torchao"):
        return [w.qdata.clone(), w.scale.clone()]
    if hasattr(w, "as_tensor"):
        return [w.as_tensor().detach().clone()]
    return [w.detach().view(torch.uint8).clone()]


def _delta(layer: LoKrLayer, adapter: str = "default") -> torch.Tensor:
    """ΔW = scale · W1 ⊗ W2, a low-rank factor as the product of its halves."""
    f = {k: v.detach().float() for k, v in layer.factors(adapter).items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return layer.scaling[adapter] * torch.kron(w1, w2)


def _bias(base: nn.Module) -> torch.Tensor:
    return base.bias.detach().float()


def _adapted(kind: str) -> tuple[nn.Sequential, LoKrModel, LoKrLayer, torch.Tensor]:
    """(model, LoKrModel, layer, reference W) with random factors (r=4, alpha=2: scale 0.5)."""
    make, _ = KINDS[kind]
    model = nn.Sequential(make())
    w_ref = None if kind == "fp8_cast_after" else _reference_weight(kind, model[0])
    lokr = LoKrModel(model, LoKrConfig(r=4, alpha=2, target_modules=["0"], init_weights=False))
    layer = model[0]
    assert isinstance(layer, LoKrLayer)
    if kind == "fp8_cast_after":  # the hook lands on the base layer inside the LoKr layer
        from diffusers.hooks.layerwise_casting import apply_layerwise_casting

        apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                skip_modules_pattern=())
        assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if "lokr" in n)
        w_ref = layer.base_layer.weight.detach().float()
    assert w_ref is not None
    return model, lokr, layer, w_ref


def _forward_rel(kind: str) -> float:
    """The base layer's own rounding against F.linear(x, W) in fp32 (module docstring)."""
    return 2.0 ** -10 if kind.startswith("gguf") else 1e-5


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


def _close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float = 1e-5) -> None:
    """|y − ref| ≤ rel · (|x| @ |W|ᵀ) + 1e-6 element by element: rounding relative to the sums' size."""
    bound = rel * (x.abs() @ w.abs().T) + 1e-6
    err = (y - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


# ------------------------------------------------------------------------------------- tests
def test_detection_of_plain_and_quantized_layers() -> None:
    assert Q.quantization_of(nn.Linear(4, 4)) is None
    assert Q.quantization_of(nn.Conv2d(2, 2, 3).half()) is None
    assert Q.quantization_of(_fp8()) == "fp8 storage (float8_e4m3fn)"
    assert Q.logical_shape(_fp8()) == (OUT, IN)


def test_detection_of_bitsandbytes_by_name_without_the_package() -> None:
    """bitsandbytes needs no import to be recognised: stand-ins with its class and module names."""
    params4 = type("Params4bit", (nn.Parameter,), {"__module__": "bitsandbytes.nn.modules"})
    int8 = type("Int8Params", (nn.Parameter,), {"__module__": "bitsandbytes.nn.modules"})
    linear8 = type("Linear8bitLt", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    lin = nn.Linear(IN, OUT)
    w4 = params4(torch.zeros(OUT * IN // 2, 1, dtype=torch.uint8), requires_grad=False)
    w4.quant_type = "nf4"
    lin.weight = w4
    assert Q.quantization_of(lin) == "bitsandbytes 4-bit (nf4)"
    assert Q.logical_shape(lin) == (OUT, IN)  # no quant state: the layer's features
    lin.weight = int8(torch.zeros(OUT, IN, dtype=torch.int8), requires_grad=False)
    assert Q.quantization_of(lin) == "bitsandbytes 8-bit"
    plain8 = linear8(IN, OUT)  # a weight that lost its class (FSDP does this): the layer's name says it
    plain8.weight = nn.Parameter(torch.zeros(OUT, IN, dtype=torch.int8), requires_grad=False)
    assert Q.quantization_of(plain8) == "bitsandbytes 8-bit"
    assert Q.requantize_refusal(plain8) is not None


@pytest.mark.parametrize("kind", list(KINDS))
def test_detected_with_logical_shape(kind: str) -> None:
    _, _, layer, _ = _adapted(kind)
    assert layer.quantization == KINDS[kind][1]
    assert layer.weight_shape == (OUT, IN)
    assert all(t.dtype == torch.float32 for t in layer.factors("default").values())


@pytest.mark.parametrize("mode", ["auto", "merged"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_is_dequantized_reference_plus_delta(kind: str, mode: str) -> None:
    model, lokr, layer, w_ref = _adapted(kind)
    lokr.set_forward_mode(mode)  # "merged" cannot apply to a quantized weight: it bypasses all the same
    packed = _packed(layer.base_layer)
    weight = layer.base_layer.weight
    x = _x()
    w_eff = w_ref + _delta(layer)
    ref = F.linear(x, w_eff, _bias(layer.base_layer))
    model.eval()
    with torch.no_grad():
        y_infer = model(x)
        y_again = model(x)  # no W + ΔW is kept for a quantized layer: the same path again
    _close(y_infer, ref, x, w_eff, _forward_rel(kind))
    torch.testing.assert_close(y_again, y_infer, rtol=0, atol=0)
    assert layer.kept.entry is None
    _close(model(x), ref, x, w_eff, _forward_rel(kind))  # with autograd on
    assert layer.base_layer.weight is weight
    assert all(torch.equal(a, b) for a, b in zip(_packed(layer.base_layer), packed, strict=True))


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_step_reaches_factors_and_never_the_packed_weight(kind: str) -> None:
    model, _, layer, w_ref = _adapted(kind)
    packed = _packed(layer.base_layer)
    factors = [p for n, p in model.named_parameters() if p.requires_grad]
    assert factors and all("lokr_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in factors]
    opt = torch.optim.SGD(factors, lr=0.1)
    x = _x().requires_grad_(True)
    target = torch.randn(3, 5, OUT, generator=torch.Generator().manual_seed(2))
    model.train()
    loss = (model(x) - target).square().mean()
    loss.backward()
    # the gradient of the loss with respect to ΔW is gᵀx; with W fixed, the reference gradient of x is g·(W + ΔW)
    g = 2 * (F.linear(x.detach(), w_ref + _delta(layer), _bias(layer.base_layer)) - target) / target.numel()
    w_eff = w_ref + _delta(layer)
    _close(x.grad, g @ w_eff, g.abs(), w_eff.T, rel=max(1e-4, 2 * _forward_rel(kind)))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, factors, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_packed(layer.base_layer), packed, strict=True))


@pytest.mark.parametrize("kind", list(KINDS))
def test_fuse_refuses_and_says_why(kind: str) -> None:
    _, lokr, layer, _ = _adapted(kind)
    packed, weight = _packed(layer.base_layer), layer.base_layer.weight
    with pytest.raises(Q.QuantizedWeightError) as err:
        lokr.merge_adapter()
    message = str(err.value)
    assert "into 0:" in message and KINDS[kind][1] in message and "requantize=True" in message
    with pytest.raises(Q.QuantizedWeightError):
        layer.merge()
    assert not layer.merged and layer.base_layer.weight is weight
    assert all(torch.equal(a, b) for a, b in zip(_packed(layer.base_layer), packed, strict=True))


def _requant_bound(kind: str, target: torch.Tensor) -> torch.Tensor:
    """Half a quantization step of each scheme at `target` (fp32), element by element, with margin
    for the fp16 block scales of GGUF."""
    if kind == "torchao_int8":  # symmetric per row: step = max|row| / 127.5
        return 0.5 * target.abs().amax(1, keepdim=True) / 127.5 * (1 + 1e-3) + 1e-7
    if kind.startswith("gguf"):
        blocks = target.abs().reshape(OUT, IN // 32, 32).amax(-1, keepdim=True)
        # Q8_0: d = max|x| / 127, round to nearest (fp16 d: + 127 · 2^-11 · d).
        # Q4_0: d = x_max / -8 over 16 levels, so the value of the other sign can be a whole step off.
        step = blocks / 127 * (0.5 + 127 * 2.0 ** -11) if kind == "gguf_q8_0" else blocks / 8 * (1 + 2.0 ** -9)
        return step.expand(OUT, IN // 32, 32).reshape(OUT, IN) + 1e-7
    # fp8 e4m3fn: 3 mantissa bits (half an ulp: 2^-4 relative), subnormal spacing 2^-9
    return target.abs() * 2.0 ** -4 + 2.0 ** -10


@pytest.mark.parametrize("kind", list(KINDS))
def test_requantize_fuse_within_the_schemes_precision_and_unfuse_puts_the_original_back(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    model, lokr, layer, w_ref = _adapted(kind)
    original, packed = layer.base_layer.weight, _packed(layer.base_layer)
    x = _x()
    target = w_ref + _delta(layer)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        lokr.merge_adapter(requantize=True)
    assert layer.merged and layer.base_layer.weight is not original
    assert layer.quantization == KINDS[kind][1]  # quantized again, with the same scheme
    new_w = _reference_weight("fp8" if kind == "fp8_cast_after" else kind, layer.base_layer)
    err = (new_w - target).abs()
    assert bool((err <= _requant_bound(kind, target)).all()), f"max requantization error {err.max():.3g}"
    assert layer.requantization_error == pytest.approx(float(err.max()), abs=1e-6)
    assert any("requantizing" in r.getMessage() and f"{layer.requantization_error:.3g}" in r.getMessage()
               for r in caplog.records)
    with torch.no_grad():  # fused: no bypass left
        _close(model(x), F.linear(x, new_w, _bias(layer.base_layer)), x, new_w, _forward_rel(kind))
    # the original packed weight was kept aside untouched, and comes back as it was
    assert all(torch.equal(a, b) for a, b in zip(_packed_of(original), packed, strict=True))
    lokr.unmerge_adapter()
    assert not layer.merged and layer.base_layer.weight is original
    assert all(torch.equal(a, b) for a, b in zip(_packed(layer.base_layer), packed, strict=True))
    with torch.no_grad():
        _close(model(x), F.linear(x, target, _bias(layer.base_layer)), x, target, _forward_rel(kind))


def _packed_of(w: torch.Tensor) -> list[torch.Tensor]:
    holder = nn.Module()
    holder.weight = w
    return _packed(holder)


def test_requantized_fuse_follows_disable_enable_and_delete() -> None:
    """Once allowed, the transitions that take adapters out and put them back requantize again."""
    _, lokr, layer, w_ref = _adapted("fp8")
    lokr.add_adapter("second", LoKrConfig(r=2, alpha=2, target_modules=["0"], init_weights=False))
    lokr.set_adapter(["default", "second"])
    original = layer.base_layer.weight
    lokr.merge_adapter(requantize=True)
    both = layer.base_layer.weight.detach().float()
    with lokr.disable_adapter():
        assert layer.base_layer.weight is original
    torch.testing.assert_close(layer.base_layer.weight.detach().float(), both, rtol=0, atol=0)
    lokr.delete_adapter("second")
    one = layer.base_layer.weight.detach().float()
    assert bool(((one - (w_ref + _delta(layer))).abs() <= _requant_bound("fp8", w_ref + _delta(layer))).all())
    lokr.unmerge_adapter()
    assert layer.base_layer.weight is original
    with pytest.raises(Q.QuantizedWeightError):  # unfused: the permission went with the fuse
        layer.merge()


def test_merge_and_unload_leaves_the_requantized_weight_and_unload_the_original() -> None:
    _, lokr, layer, w_ref = _adapted("torchao_int8")
    target = w_ref + _delta(layer)
    with pytest.raises(Q.QuantizedWeightError, match="requantize=True"):
        lokr.merge_and_unload()
    plain = lokr.merge_and_unload(requantize=True)
    base = plain[0]
    assert not isinstance(base, LoKrLayer) and Q.quantization_of(base) == "torchao Int8Tensor"
    err = (_reference_weight("torchao_int8", base) - target).abs()
    assert bool((err <= _requant_bound("torchao_int8", target)).all())
    model2, lokr2, layer2, _ = _adapted("gguf_q8_0")
    original, packed = layer2.base_layer.weight, _packed(layer2.base_layer)
    lokr2.merge_adapter(requantize=True)
    lokr2.unload()  # without merging: the fuse is taken out, the original quantized weight comes back
    assert model2[0].weight is original
    assert all(torch.equal(a, b) for a, b in zip(_packed(model2[0]), packed, strict=True))


def test_unfuse_refuses_when_someone_else_rewrote_the_quantized_weight() -> None:
    _, lokr, layer, _ = _adapted("fp8")
    lokr.merge_adapter(requantize=True)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.zeros(OUT, IN).to(torch.float8_e4m3fn))
    with pytest.raises(Q.QuantizedWeightError, match="changed since LoKr fused"):
        lokr.unmerge_adapter()


class _Int8Scaled(nn.Linear):
    """A quantizer LoKr does not know: int8 storage and a per-row scale, dequantized in forward."""

    def __init__(self) -> None:
        super().__init__(IN, OUT)
        w = _plain().weight.detach()
        self.register_buffer("scale", w.abs().amax(1, keepdim=True) / 127)
        self.weight = nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float() * self.scale, self.bias)


def test_unknown_packed_weight_runs_beside_and_refuses_any_fuse() -> None:
    model = nn.Sequential(_Int8Scaled())
    w_ref = model[0].weight.float() * model[0].scale
    lokr = LoKrModel(model, LoKrConfig(r=4, alpha=2, target_modules=["0"], init_weights=False))
    layer = model[0]
    assert layer.quantization == "a packed int8 weight"
    x = _x()
    w_eff = w_ref + _delta(layer)
    with torch.no_grad():
        _close(model(x), F.linear(x, w_eff, layer.base_layer.bias.detach()), x, w_eff)
    with pytest.raises(Q.QuantizedWeightError, match="requantize=True"):
        lokr.merge_adapter()
    with pytest.raises(Q.QuantizedWeightError, match="does not know how to requantize"):
        lokr.merge_adapter(requantize=True)
    assert not layer.merged


def test_pipeline_fuse_names_the_module_and_is_all_or_nothing() -> None:
    from lokr_diffusers import add_lokr, lokr_layers
    from lokr_diffusers.tiny import make_sd_pipeline

    pipe = make_sd_pipeline()
    add_lokr(pipe, {"unet": LoKrConfig(r=2, target_modules=["to_q", "to_k"], init_weights=False)}, "a")
    layers = dict(lokr_layers(pipe.unet))
    name = sorted(layers)[1]
    quant = layers[name]
    quant.base_layer.weight = nn.Parameter(quant.base_layer.weight.detach().to(torch.float8_e4m3fn),
                                           requires_grad=False)
    plain_before = {n: layer.weight.detach().clone() for n, layer in layers.items() if n != name}
    with pytest.raises(Q.QuantizedWeightError, match=f"unet.{name}"):
        pipe.fuse_lokr()
    assert not any(layer.merged for layer in layers.values())
    assert all(torch.equal(layers[n].weight, w) for n, w in plain_before.items())
    with pytest.raises(Q.QuantizedWeightError, match=f"unet.{name}"):
        pipe.fuse_lora(components=["unet"], adapter_names=["a"])  # diffusers' own method, on a LoKr adapter
    with pytest.raises(Q.QuantizedWeightError, match=name):
        pipe.unet.fuse_lora(adapter_names=["a"])  # the model-level method
    pipe.fuse_lokr(requantize=True)
    assert all(layer.merged for layer in layers.values())
    assert quant.base_layer.weight.dtype == torch.float8_e4m3fn
    pipe.unfuse_lokr()
    assert all(torch.equal(layers[n].weight, w) for n, w in plain_before.items())


def test_loader_wraps_subclasses_of_linear() -> None:
    gguf_layer = _gguf("Q8_0")
    from lokr_diffusers.layers import Linear
    from lokr_diffusers.loader import wrapper_for

    assert wrapper_for(gguf_layer) is Linear
    assert wrapper_for(nn.Linear(2, 2)) is Linear


def test_dora_beside_a_quantized_weight_matches_the_same_adapter_on_its_dequantized_weight() -> None:
    model, _, layer, w_ref = _adapted("gguf_q8_0")
    plain = nn.Linear(IN, OUT)
    with torch.no_grad():
        plain.weight.copy_(w_ref)
        plain.bias.copy_(_bias(layer.base_layer))
    twin = nn.Sequential(plain)
    LoKrModel(twin, LoKrConfig(r=4, alpha=2, target_modules=["0"], init_weights=False))
    factors = {k: v.detach().clone() for k, v in layer.factors("default").items()}
    dora = w_ref.norm(dim=1, keepdim=True) * 1.2
    for m in (model, twin):
        m[0].set_adapter_tensors("default", dict(factors), 0.5, dora_scale=dora.clone())
        m[0].set_adapter(["default"])
    x = _x()
    with torch.no_grad():  # the GGUF base op's fp16 rounding (module docstring), the rest in fp32
        got, want = model(x), twin(x)
        _close(got, want, x, w_ref + _delta(layer), _forward_rel("gguf_q8_0"))  # asserts
        plain_twin = torch.nn.functional.linear(x, w_ref + _delta(layer), _bias(layer.base_layer))
    assert not torch.allclose(want, plain_twin, rtol=1e-3, atol=1e-3)  # the DoRA magnitude changed the output


# ------------------------------------------------------------------------------- bitsandbytes
def _bnb(bits: int) -> tuple[nn.Module, torch.Tensor]:
    """A bitsandbytes layer quantized on the CPU, and its dequantized weight taken before any use."""
    bnb = pytest.importorskip("bitsandbytes")
    lin = _plain()
    try:
        if bits == 4:
            layer = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
        layer.load_state_dict(lin.state_dict())
        layer = layer.to("cpu")  # quantizes
        w = layer.weight
        if bits == 4:
            w_ref = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        else:
            w_ref = w.data.float() * w.SCB.float().view(-1, 1) / 127
        layer(torch.zeros(1, IN))  # the CPU backend is there
    except (RuntimeError, NotImplementedError, AttributeError) as err:
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {err}")
    return layer, w_ref


def _bnb_bound(bits: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The precision of bitsandbytes' CPU matmul against F.linear(x, dequantized W): 4-bit computes in
    bf16 (inputs and weights rounded to 8 bits: 2 · 2^-8 relative, doubled for accumulation); 8-bit
    (LLM.int8) rounds each row of x to int8 on its max (half a step: max|x_row| / 254 per element)."""
    if bits == 4:
        return 4 * 2.0 ** -8 * (x.abs() @ w.abs().T) + 1e-5
    return x.abs().amax(-1, keepdim=True) / 127 * w.abs().sum(1) + 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_runs_beside_trains_and_refuses_fuse(bits: int) -> None:
    base, w_ref = _bnb(bits)
    model = nn.Sequential(base)
    lokr = LoKrModel(model, LoKrConfig(r=4, alpha=2, target_modules=["0"], init_weights=False))
    layer = model[0]
    assert layer.quantization.startswith(f"bitsandbytes {bits}-bit")
    assert layer.weight_shape == (OUT, IN)
    x = _x()
    dw = _delta(layer)
    model.train()
    weight, packed = layer.base_layer.weight, layer.base_layer.weight.detach().clone()
    y = model(x)
    with torch.no_grad():  # LoKr adds exactly ΔW·x to what the bitsandbytes layer gives
        alone = base(x)
    _close(y.detach(), alone + x @ dw.T, x, dw.abs() + 1e-3)
    bound = _bnb_bound(bits, x, w_ref + dw)
    assert bool(((y.detach() - F.linear(x, w_ref + dw, base.bias.detach().float())).abs() <= bound).all())
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.factors("default").values())
    assert layer.base_layer.weight is weight and torch.equal(layer.base_layer.weight.detach(), packed)
    with pytest.raises(Q.QuantizedWeightError, match="requantize=True"):
        lokr.merge_adapter()
    with pytest.raises(Q.QuantizedWeightError, match="requantizing it is not implemented"):
        lokr.merge_adapter(requantize=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight.detach(), packed)
    if bits == 4:  # inference repacks the weight for bitsandbytes' CPU kernel; reading it back changes nothing
        model.eval()
        with torch.no_grad():
            first = model(x)
            deq = Q.dequantize(layer.base_layer)
            assert torch.equal(model(x), first) and torch.equal(Q.dequantize(layer.base_layer), deq)
        assert bool(((deq - w_ref).abs() <= w_ref.abs() * 2.0 ** -7 + 1e-6).all())  # scales kept in bf16
