"""Tensors as a consumer reads them (docs/formats.md §Scale rules, §Portable export, §DoRA): each module's scale
encoded for the consumer's alpha / rank rule, Tucker cores rewritten as plain low-rank factors, output-axis DoRA
rescaled for ComfyUI's rule; the dtype a file is written in, and the one-file write every single-file layout
ends with (all-or-nothing: atomic.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import functional as LF
from ..atomic import write_safetensors
from .modules import ExportJob, ExportModule

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def expand_tucker(f: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The factors with a Tucker W2 rewritten as plain low-rank ones of the same rank (exact)."""
    out = {k: v for k, v in f.items() if k not in ("lokr_t2", "lokr_w2_a", "lokr_w2_b")}
    out["lokr_w2_a"], out["lokr_w2_b"] = LF.tucker_to_lowrank(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    return out


def consumer_tensors(m: ExportModule, keep_tucker: bool, comfyui: bool = False) -> dict[str, Tensor]:
    """A module's tensors for a consumer's rule: an alpha giving its scale (baked into W1 where both factors are
    full), Tucker rewritten unless `keep_tucker`, DoRA as trained or (`comfyui`) for ComfyUI's rule."""
    f = dict(m.factors)
    if "lokr_t2" in f and not keep_tucker:
        f = expand_tucker(f)
    alpha, w1_factor = LF.alpha_for_consumer(m.plan, m.scale)
    if w1_factor != 1.0:  # both factors full: consumers ignore alpha, the scale goes into W1
        f["lokr_w1"] = f["lokr_w1"] * w1_factor
    # Both full: ComfyUI/A1111 ignore alpha, but LyCORIS' loader crashes on a module without one
    f["alpha"] = torch.tensor(float(alpha if alpha is not None else m.r))
    if m.dora_scale is not None:
        f["dora_scale"] = comfyui_dora(m) if comfyui else m.dora_scale
    return f


def on_output_axis(m: ExportModule) -> bool:
    """Has the module DoRA on the output axis (one magnitude per row)?"""
    return m.dora_scale is not None and LF.dora_on_output_axis(m.dora_scale, m.weight_shape)


def comfyui_dora(m: ExportModule) -> Tensor:
    """dora_scale for ComfyUI's rule. Trained (LyCORIS): W' = m · (W + ΔW) / (‖W + ΔW‖ + eps) per row.
    ComfyUI on the output axis: W' = m' · (W + ΔW) / (‖W‖ + eps); so m' = m · (‖W‖ + eps) / (‖W + ΔW‖ + eps)
    gives the trained W', and W + s·(W' − W) at every strength s. The input axis is the same in both."""
    assert m.dora_scale is not None
    if not on_output_axis(m):
        return m.dora_scale
    assert m.row_norms is not None  # the ComfyUI writers refuse modules without them (comfyui.check_comfyui_dora)
    ratio = m.row_norms.base.double() / m.row_norms.adapted.double()  # (out,)
    row = (-1, *[1] * (len(m.weight_shape) - 1))  # (out, 1[, 1, 1]): a 1-D one broadcasts wrongly in ComfyUI
    return (m.dora_scale.double().reshape(row) * ratio.reshape(row)).to(m.dora_scale.dtype)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """"fp16" | "bf16" | "fp32" | a floating torch dtype | None (keep); anything else is refused."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, a floating torch dtype or None, got {dtype!r}")


def cast(sd: Mapping[str, Tensor], dtype: torch.dtype | str | None) -> dict[str, Tensor]:
    """Floating tensors to `dtype` (alpha and scales too, as LyCORIS does; our lokr_scale stays fp64)."""
    dt = resolve_dtype(dtype)
    if dt is None:
        return dict(sd)
    return {k: v if k.endswith(".lokr_scale") else v.to(dt) for k, v in sd.items()}


def write_one(job: ExportJob, sd: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """`sd` in the job's dtype to the job's one .safetensors file; the caller's metadata over the writer's."""
    return write_safetensors(cast(sd, job.dtype), job.path, {**metadata, **job.metadata})
