"""--base_precision: the frozen denoiser (and the text encoders that do not train) quantized before LoKr is added,
so that a big model's base fits where its bf16 weights would not (FLUX.1 12B, Qwen-Image 20B, Wan 14B, HiDream 17B).
The LoKr factors train in fp32 beside the quantized layers: a LoKr layer over a quantized base never writes into it
and applies its factors to x beside the base (lokr_diffusers/quantized.py, the bypass path), so the trained file
holds factors only and loads exactly onto the unquantized base.

    none   each Linear weight in the run's dtype (--mixed_precision: bf16, fp16, or fp32 without it)
    fp8    float8_e4m3fn storage, cast up to the run's dtype at each layer call (diffusers' layerwise casting,
           which keeps its norms and embeddings as they are); needs nothing more
    int8   int8 per output row with one scale each (torchao's Int8WeightOnlyConfig); needs torchao
    nf4    4-bit NormalFloat in blocks of 64 with a scale each (bitsandbytes' Linear4bit, computing in the run's
           dtype); needs bitsandbytes
int8 and nf4 leave the model's `_keep_in_fp32_modules` as they are, as diffusers' own quantizers do.

The log says each model's weight bytes before and after.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

from .errors import TrainingInputError

logger = logging.getLogger(__name__)

BASE_PRECISIONS = ("none", "fp8", "int8", "nf4")
_PACKAGES = {"int8": "torchao", "nf4": "bitsandbytes"}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (a torchao tensor: its int8 data and scales)."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        inner = [getattr(t, n) for n in ("qdata", "scale") if isinstance(getattr(t, n, None), torch.Tensor)]
        total += sum(i.nbytes for i in inner) if inner else t.nbytes
    return total


def check_base_precision(precision: str) -> None:
    """The package the precision needs is importable (TrainingInputError naming it, before anything loads)."""
    package = _PACKAGES.get(precision)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise TrainingInputError(f"--base_precision {precision} needs {package}: `pip install {package}` (or "
                                 f"lokr-diffusers[quant])") from e


def _fp8(model: nn.Module, compute_dtype: torch.dtype) -> None:
    enable = getattr(model, "enable_layerwise_casting", None)  # a diffusers model: its own modules to skip
    if callable(enable):
        enable(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
        return
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting

    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def _kept(model: nn.Module) -> Any:
    """fqn -> whether the model keeps that module unquantized: under one of its `_keep_in_fp32_modules` (diffusers'
    quantizers leave those out too; Wan's time embedder casts the timestep to its weights' dtype)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return lambda fqn: bool(keep & set(fqn.split(".")))


def _int8(model: nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    kept = _kept(model)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not kept(fqn))


def _nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    import bitsandbytes as bnb

    kept = _kept(model)
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or kept(f"{path}.{name}"):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
            layer.load_state_dict(child.state_dict())
            setattr(parent, name, layer.to(device))  # the move quantizes (on the CPU too)
            del child


def quantize_base(model: nn.Module, precision: str, compute_dtype: torch.dtype, device: torch.device,
                  what: str = "denoiser") -> tuple[int, int]:
    """Quantize the frozen `model` in place as `precision` says (the module docstring); (bytes before, after)."""
    before = weight_bytes(model)
    if precision == "none":
        return before, before
    check_base_precision(precision)
    if precision == "fp8":
        _fp8(model, compute_dtype)
    elif precision == "int8":
        _int8(model)
    elif precision == "nf4":
        _nf4(model, compute_dtype, device)
    else:
        raise ValueError(f"base precision {precision!r}: one of {BASE_PRECISIONS}")
    model.requires_grad_(False)
    after = weight_bytes(model)
    logger.info("--base_precision %s: the %s's weights %.1f MB -> %.1f MB (%.2fx)", precision, what, before / 2**20,
                after / 2**20, after / before)
    return before, after


def base_precision_args(a: Any) -> None:
    """The argument, for args.py."""
    a("--base_precision", choices=BASE_PRECISIONS, default="none",
      help="quantize the frozen denoiser to train LoKr beside it: fp8 (storage, diffusers' layerwise casting), int8 "
           "(torchao), nf4 (bitsandbytes); none: the --mixed_precision dtype (bf16 on GPUs). The factors train in "
           "fp32 and the files load onto the unquantized model")
