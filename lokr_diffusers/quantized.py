"""Quantized base layers: which quantizer holds a layer's weight, that weight as floats, and the
explicit dequantize -> add -> requantize fuse (docs/adapters.md §Quantized base layers).

A LoKr layer over a quantized base never writes into the packed weight: the base layer runs itself
(it dequantizes) and the factors are applied to x beside it (the bypass path). Fusing refuses unless
asked to requantize; then the weight is dequantized, the adapters folded in, and the result quantized
again with the same scheme, a new tensor put in the layer's slot while the original packed weight is
kept aside untouched, so that unfusing puts it back exactly.

Recognised without importing an optional package (by the class and module names of the weight and
the layer, and the weight's dtype):

| kind | weight | dequantize | requantize |
|---|---|---|---|
| bitsandbytes 4-bit | `Params4bit` (`Linear4bit`) | `dequantize_4bit` | refused (module-level quant state) |
| bitsandbytes 8-bit | `Int8Params` (`Linear8bitLt`) | CB · SCB / 127 | refused (module-level matmul state) |
| torchao | a torchao tensor subclass (`Int8Tensor`, `AffineQuantizedTensor`, ...) | `.dequantize()` | `Int8Tensor` |
| GGUF | diffusers' `GGUFParameter` (`GGUFLinear`) | `dequantize_gguf_tensor` | types `gguf` quantizes in Python |
| fp8 storage | dtype float8_* (plain, or diffusers' layerwise casting) | `.to(dtype)` | round to nearest, saturating |
| packed (other) | any other weight whose dtype is not floating point | refused | refused |
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from .fusing import Frozen, FusedWeight, fingerprint
from .state import Pairs

logger = logging.getLogger(__name__)

FP8: tuple[torch.dtype, ...] = tuple(getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))
_WIDE = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
_BNB_LAYERS = {"Linear4bit": "bnb4", "LinearNF4": "bnb4", "LinearFP4": "bnb4", "Linear8bitLt": "bnb8"}


class QuantizedWeightError(ValueError):
    """A fuse (or unfuse) that would write into a quantized weight and was not allowed or cannot be done."""


def _kind(layer: nn.Module, weight: Tensor | None = None) -> tuple[str, str] | None:
    """(kind, words) for a quantized layer (or for `weight` in that layer's place), else None. Kept
    cheap for plain layers: one type check."""
    w = weight if weight is not None else layer._parameters.get("weight")
    if w is None:
        w = getattr(layer, "weight", None)
    if not isinstance(w, Tensor):
        return None
    t = type(w)
    if t is nn.Parameter or t is Tensor:
        if w.dtype in _WIDE:  # the common case, one set lookup (forward asks on every call)
            return None
        if w.dtype in FP8:
            return "fp8", _fp8_words(layer, w)
        if w.dtype.is_floating_point:
            return None
        bnb = _BNB_LAYERS.get(type(layer).__name__)
        if bnb is not None:
            return bnb, "bitsandbytes " + ("4-bit" if bnb == "bnb4" else "8-bit")
        return "packed", f"a packed {str(w.dtype).removeprefix('torch.')} weight"
    name, module = t.__name__, t.__module__
    if name == "Params4bit" or (module.startswith("bitsandbytes") and "4" in name):
        return "bnb4", f"bitsandbytes 4-bit ({getattr(w, 'quant_type', '?')})"
    if name == "Int8Params" or module.startswith("bitsandbytes"):
        return "bnb8", "bitsandbytes 8-bit"
    if name == "GGUFParameter" or module.startswith("diffusers.quantizers.gguf"):
        return "gguf", f"GGUF {_gguf_type_name(getattr(w, 'quant_type', None))}"
    if module.startswith("torchao"):
        return "torchao", f"torchao {name}"
    if w.dtype in FP8:
        return "fp8", _fp8_words(layer, w)
    if not w.dtype.is_floating_point:
        return "packed", f"a packed {str(w.dtype).removeprefix('torch.')} weight ({module}.{name})"
    return None


def quantization_of(layer: nn.Module) -> str | None:
    """What quantizes `layer`'s weight, in words ("GGUF Q8_0", "torchao Int8Tensor", "fp8 storage
    (float8_e4m3fn)", "bitsandbytes 4-bit (nf4)", ...), or None for a plain floating-point weight."""
    kind = _kind(layer)
    return None if kind is None else kind[1]


def _fp8_words(layer: nn.Module, w: Tensor) -> str:
    dtype = str(w.dtype).removeprefix("torch.")
    hooks = getattr(getattr(layer, "_diffusers_hook", None), "hooks", None)
    casting = isinstance(hooks, dict) and "layerwise_casting" in hooks
    return f"fp8 storage ({dtype}{', cast up by diffusers layerwise casting' if casting else ''})"


def _optional(name: str) -> Any:
    """An optional quantizer package, imported by name: it is reached only for a weight of its kind,
    whose existence means the package is installed and loaded already (not a dependency of ours)."""
    return importlib.import_module(name)


def _gguf_type_name(quant_type: Any) -> str:
    try:
        return str(_optional("gguf").GGMLQuantizationType(int(quant_type)).name)
    except Exception:  # no gguf package, or an unknown number
        return str(quant_type)


def logical_shape(layer: nn.Module) -> tuple[int, ...]:
    """The shape the weight stands for ((out, in[, k...])), not the shape of its packed storage."""
    w = layer.weight
    assert isinstance(w, Tensor)
    kind = _kind(layer)
    quant_shape = getattr(w, "quant_shape", None)
    if kind is not None and kind[0] == "gguf" and quant_shape is not None:
        return tuple(int(s) for s in quant_shape)
    if kind is not None and kind[0] == "bnb4":
        state = getattr(w, "quant_state", None) or getattr(layer, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            return tuple(int(s) for s in state.shape)
        return int(layer.out_features), int(layer.in_features)  # type: ignore[arg-type]
    return tuple(w.shape)


def dequantize(layer: nn.Module, weight: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """`weight` (default: the layer's) as a plain tensor of `dtype` in its logical shape, detached.
    The layer is needed besides the weight where the quantizer keeps state on it (bitsandbytes 8-bit)."""
    w = layer.weight if weight is None else weight
    assert isinstance(w, Tensor)
    kind = _kind(layer, weight)
    with torch.no_grad():
        if kind is None or kind[0] == "fp8":
            return w.detach().to(dtype)
        if kind[0] == "torchao":
            if not hasattr(w, "dequantize"):
                raise QuantizedWeightError(f"{kind[1]} has no dequantize(); LoKr cannot read it as floats")
            return w.dequantize().to(dtype)
        if kind[0] == "gguf":
            return _dequantize_gguf(w, dtype)
        if kind[0] == "bnb4":
            bnb_f = _optional("bitsandbytes.functional")
            state: Any = getattr(w, "quant_state", None) or getattr(layer, "quant_state", None)
            data = w.data
            if getattr(state, "packing_format_for_cpu", False):
                data, state = _unpack_bnb_cpu(bnb_f, data, state)
            return bnb_f.dequantize_4bit(data, state).to(dtype)
        if kind[0] == "bnb8":
            if w.dtype.is_floating_point:  # has_fp16_weights: not packed
                return w.detach().to(dtype)
            scb = getattr(w, "SCB", None)
            if scb is None:  # moved to the module's matmul state by its first forward
                scb = getattr(getattr(layer, "state", None), "SCB", None)
            if scb is None:
                raise QuantizedWeightError("bitsandbytes 8-bit weight without its row scales (SCB)")
            return (w.data.to(torch.float32) * (scb.to(torch.float32).view(-1, 1) / 127.0)).to(dtype)
    raise QuantizedWeightError(f"LoKr cannot dequantize {kind[1]}")


def _dequantize_gguf(w: Any, dtype: torch.dtype) -> Tensor:
    """diffusers' GGUF block dequantizers, asked for fp32 (its `dequantize_gguf_tensor`, which GGUFLinear
    runs, leaves the result in the fp16 of the block scales: 2^-11 relative rounding)."""
    from diffusers.quantizers.gguf import utils as gguf_utils

    block, type_size = gguf_utils.GGML_QUANT_SIZES[w.quant_type]
    raw = w.as_tensor().detach().view(torch.uint8)
    shape = (*raw.shape[:-1], raw.shape[-1] // type_size * block)
    try:
        out = gguf_utils.dequantize_functions[w.quant_type](raw.reshape(-1, type_size), block, type_size,
                                                            dtype=torch.float32)
    except (KeyError, TypeError):  # a type or version without the dtype argument: diffusers' own path
        return gguf_utils.dequantize_gguf_tensor(w.detach()).to(dtype)
    return out.reshape(shape).to(dtype)


def _unpack_bnb_cpu(bnb_f: Any, data: Tensor, state: Any) -> tuple[Tensor, Any]:
    """bitsandbytes' 4-bit CPU kernel repacks a weight on its first inference call (nibbles
    interleaved, absmax as bf16, transposed). Its inverse helper edits the state in place and
    requantizes absmax; here it runs on a copy told not to, and absmax is read back as it is used."""
    packed_absmax = state.absmax
    copied = copy.copy(state)
    copied.original_nested = False
    data, copied = bnb_f._convert_weight_packed_for_cpu_inverse(data, copied)
    copied.absmax = packed_absmax.T.reshape(-1).to(torch.float32)
    copied.nested = False
    return data, copied


def requantize_refusal(layer: nn.Module) -> str | None:
    """Why `layer`'s weight cannot be requantized here, or None when it can."""
    kind = _kind(layer)
    if kind is None:
        return None
    k, words = kind
    if k == "fp8":
        return None
    if k == "torchao":
        w = layer.weight
        if type(w).__name__ != "Int8Tensor":
            return f"requantizing is implemented for torchao's Int8Tensor only, not {type(w).__name__}"
        if any(getattr(w, n, None) is not None for n in ("act_quant_scale", "act_pre_scale")):
            return "requantizing a torchao Int8Tensor with static activation scales is not implemented"
        return None
    if k == "gguf":
        try:
            gguf = _optional("gguf")
            qt = gguf.GGMLQuantizationType(int(getattr(layer.weight, "quant_type")))  # noqa: B009
            gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qt][0]), dtype=np.float32), qt)
        except ImportError:
            return "the `gguf` package is not installed (pip install gguf)"
        except NotImplementedError:
            return f"the gguf package cannot quantize {words} in Python"
        return None
    if k in ("bnb4", "bnb8"):
        return (f"{words} keeps quantization state on the module as well as on the weight; requantizing it "
                "is not implemented")
    return f"LoKr does not know how to requantize {words}"


def requantized(layer: nn.Module, like: Tensor, target: Tensor) -> Tensor:
    """A new weight for `layer` holding `target` (floats, logical shape) quantized with the scheme of
    `like` (its original weight). `like` itself is not touched."""
    kind = _kind(layer, like)
    assert kind is not None
    with torch.no_grad():
        if kind[0] == "fp8":
            top = torch.finfo(like.dtype).max
            return nn.Parameter(target.clamp(-top, top).to(device=like.device, dtype=like.dtype), requires_grad=False)
        if kind[0] == "torchao":
            return nn.Parameter(_int8_tensor(like, target), requires_grad=False)
        if kind[0] == "gguf":
            gguf = _optional("gguf")
            quant_type: Any = getattr(like, "quant_type")  # noqa: B009
            packed = gguf.quants.quantize(target.detach().to("cpu", torch.float32).numpy(),
                                          gguf.GGMLQuantizationType(int(quant_type)))
            data = torch.from_numpy(packed.copy()).to(like.device)
            gguf_parameter: Any = type(like)  # diffusers' GGUFParameter(data, quant_type=...)
            return cast(Tensor, gguf_parameter(data, quant_type=quant_type))
    raise QuantizedWeightError(requantize_refusal(layer) or f"cannot requantize {kind[1]}")


def _int8_tensor(like: Any, target: Tensor) -> Tensor:
    """torchao's Int8Tensor of `target` with `like`'s granularity, mapping and activation settings."""
    granularities = _optional("torchao.quantization.granularity")
    mapping_types = _optional("torchao.quantization.quant_primitives").MappingType
    block, shape = list(like.block_size), list(like.shape)
    if block == shape:
        granularity: Any = granularities.PerTensor()
    elif all(b == 1 for b in block[:-1]) and block[-1] == shape[-1]:
        granularity = granularities.PerRow()
    elif all(b == 1 for b in block[:-1]):
        granularity = granularities.PerGroup(block[-1])
    else:
        raise QuantizedWeightError(f"torchao Int8Tensor with block size {block}: no matching granularity")
    zero = like.zero_point
    mapping = mapping_types.SYMMETRIC if zero is None or not bool(zero.any()) else mapping_types.ASYMMETRIC
    return type(like).from_hp(target.to(device=like.device, dtype=like.dtype), granularity, mapping_type=mapping,
                              act_quant_kwargs=like.act_quant_kwargs, reduce_range=like.reduce_range)


def _set_weight(layer: nn.Module, weight: Tensor) -> None:
    if not isinstance(weight, nn.Parameter):
        weight = nn.Parameter(weight, requires_grad=False)
    layer._parameters["weight"] = weight


def refusal(words: str, where: str) -> str:
    return (f"LoKr will not fuse into {where}: its weight is quantized ({words}), and adding ΔW to packed "
            "data would corrupt it. The adapter keeps working unfused, beside the layer. To fuse anyway pass "
            "requantize=True (pipe.fuse_lokr(..., requantize=True), model.merge_adapter(requantize=True)): the "
            "weight is dequantized, ΔW added and the result quantized again with the same scheme, which adds "
            "rounding error (logged); unfusing puts the original quantized weight back exactly")


@dataclass
class QuantizedFuse:
    """What a LoKr layer over a quantized base fused by requantizing: the original weight, kept aside
    untouched and put back on unfuse; a fingerprint of the weight written (dequantized), to see whether
    anything replaced it since; what each fused adapter was fused with; and whether the user allowed
    requantizing (kept while adapters stay fused, so disable / enable / delete can requantize again)."""

    original: Tensor | None = None
    written: Tensor | None = None
    frozen: dict[str, Frozen] = field(default_factory=dict)
    allowed: bool = False
    error: float | None = None  # max |dequantized new weight − exact target| of the last requantize

    def follow(self, fn: Callable[[Tensor], Tensor]) -> None:
        """The layer moved (Module.to, offloading): the original kept aside moves with it."""
        if self.original is not None:
            self.original = fn(self.original)

    def current_base(self, layer: nn.Module, fused: bool) -> Tensor:
        """The weight without our fused adapters, as floats of the weight's compute precision."""
        w = self.original if fused and self.original is not None else None
        return dequantize(layer, w, _float_dtype(layer, w))

    def check(self, layer: nn.Module, where: str, old: Pairs, pairs: Pairs, freeze: Callable[[str], Frozen],
              requantize: bool, safe: bool = False) -> None:
        """Raise what `move` would raise, before anything changes (no non-finite check unless `safe`)."""
        kind = _kind(layer)
        if pairs and kind is not None:
            if not (requantize or self.allowed):
                raise QuantizedWeightError(refusal(kind[1], where))
            reason = requantize_refusal(layer)
            if reason is not None:
                raise QuantizedWeightError(f"cannot fuse LoKr into {where} ({kind[1]}): {reason}")
        if old and self.original is None:
            raise QuantizedWeightError(f"{where} was fused with keep_original=False and cannot be unfused")
        if old:
            self._check_untouched(layer, where)
        if safe and pairs:
            _, target = self._target(layer, old, pairs, freeze)
            if not torch.isfinite(target).all():
                raise ValueError(f"fusing adapters {[a for a, _ in pairs]} into {where} gives non-finite weights; "
                                 "nothing was fused")

    def _check_untouched(self, layer: nn.Module, where: str) -> None:
        w = layer.weight
        assert isinstance(w, Tensor)
        if self.written is None or \
                not torch.equal(fingerprint(dequantize(layer)).to(self.written.device), self.written):
            raise QuantizedWeightError(f"the quantized weight of {where} changed since LoKr fused into it "
                                       "(something else wrote it); unfusing would discard that change, so "
                                       "nothing was changed")

    def _target(self, layer: nn.Module, old: Pairs, pairs: Pairs,
                freeze: Callable[[str], Frozen]) -> tuple[dict[str, Frozen], Tensor]:
        original = self.original if old else layer.weight
        assert isinstance(original, Tensor)
        frozen = {a: self.frozen.get(a) or freeze(a) for a, _ in pairs}
        base = dequantize(layer, original if old else None, torch.float32)
        return frozen, FusedWeight.fold(base, pairs, frozen)

    @torch.no_grad()
    def move(self, layer: nn.Module, where: str, old: Pairs, pairs: Pairs, freeze: Callable[[str], Frozen],
             keep_original: bool, requantize: bool) -> None:
        """Make `layer`'s weight hold the fused list `pairs` (it held `old`)."""
        self.check(layer, where, old, pairs, freeze, requantize)
        original = self.original if old else layer.weight
        assert isinstance(original, Tensor)
        if not pairs:
            _set_weight(layer, original)
            self.original = self.written = self.error = None
            self.frozen = {}
            return
        frozen, target = self._target(layer, old, pairs, freeze)
        new = requantized(layer, original, target)
        _set_weight(layer, new)
        got = dequantize(layer)
        self.error = float((got - target).abs().max()) if target.numel() else 0.0
        logger.info("requantized %s (%s) with LoKr adapters %s fused: max abs error %.3g (weight max abs %.3g)",
                    where, quantization_of(layer), [a for a, _ in pairs], self.error,
                    float(target.abs().max()) if target.numel() else 0.0)
        self.original = original if keep_original else None
        self.written = fingerprint(got)
        self.frozen = frozen
        self.allowed = True


def _float_dtype(layer: nn.Module, weight: Tensor | None) -> torch.dtype:
    w = layer.weight if weight is None else weight
    assert isinstance(w, Tensor)
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32
