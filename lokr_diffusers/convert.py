"""Convert a LoKr file between layouts without a pipeline: names and shapes are checked against the
full-size base architecture built on the meta device."""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import Tensor, nn

from . import export
from .architectures import BASES, CROSS_ATTENTION_DIM, meta_components
from .formats.names import build_index, weight_of
from .formats.reader import LoadEntry, parse_file
from .formats.report import guess_file_base
from .io import detect_layout, lokr_state_dict
from .loader import split_adapters

logger = logging.getLogger(__name__)

_TO_K = re.compile(r"attn2[._]to_k")


def guess_base(state_dict: dict[str, Tensor]) -> str | None:
    """"sd1" | "sd2" | "sdxl" from names, then the cross-attention width read off an attn2.to_k's factors."""
    names = list(state_dict)
    if guess_file_base(names) == "sdxl":
        return "sdxl"
    for key in names:
        if _TO_K.search(key) and key.endswith((".lokr_w1", ".lokr_w1_b")):
            module = key.rsplit(".", 1)[0]
            in_m = state_dict[key].shape[-1]
            w2 = state_dict.get(f"{module}.lokr_w2_b", state_dict.get(f"{module}.lokr_w2"))
            if w2 is not None and w2.dim() == 2:
                return CROSS_ATTENTION_DIM.get(in_m * w2.shape[-1])
    return None


def _modules(entries: list[LoadEntry], comps: dict[str, nn.Module]) -> list[export.ExportModule]:
    out = []
    for e in entries:
        module = comps[e.ref.component].get_submodule(e.ref.path)
        r = e.plan.rank or 1
        out.append(export.ExportModule(e.ref.component, e.ref.path, dict(e.factors), e.scale, e.plan,
                                       tuple(weight_of(module).shape), e.dora_scale, r,
                                       e.alpha if e.alpha is not None else e.scale * r))
    return out


def convert_lokr_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str = "comfyui",
                      base: str | None = None, dtype: torch.dtype | str | None = None, strict: bool = True) -> str:
    """Read `src` (any layout we load) and write it to `dst` in format `to` for base `base`
    ("sd1" | "sd2" | "sdxl", guessed from the file when None)."""
    state_dict, metadata, layout = lokr_state_dict(src)
    base = base or guess_base(state_dict)
    if base not in BASES:
        raise ValueError(f"cannot tell which base model {src} is for; pass base= one of {BASES}")
    comps = meta_components(base)
    index = build_index(comps)
    per_adapter: dict[str, list[export.ExportModule]] = {}
    for name, sd in split_adapters(state_dict, metadata).items():
        parsed = parse_file(sd, metadata, index, detect_layout(sd) if name else layout)
        if parsed.unmatched and strict:
            raise ValueError(f"{len(parsed.unmatched)} keys match no module of a {base} model: {parsed.unmatched[:5]}")
        if parsed.lora:
            logger.warning("%d plain LoRA keys are not converted", len(parsed.lora))
        per_adapter[name or "default"] = _modules(parsed.entries, comps)
    fmt = export.FORMAT_ALIASES.get(to)
    if fmt is None:
        raise ValueError(f"unknown format {to!r}; use one of {sorted(export.FORMAT_ALIASES)}")
    dst = os.fspath(dst)
    if fmt == export.OURS_FORMAT:
        sd_out, meta = export.to_ours(per_adapter)
        return export.write_safetensors(export.cast(sd_out, dtype), dst, meta)
    if len(per_adapter) > 1:
        raise ValueError(f"{src} holds {len(per_adapter)} adapters; format {to!r} holds one")
    modules = next(iter(per_adapter.values()))
    if fmt == "comfyui":
        stem = os.path.splitext(os.path.basename(dst))[0]
        sd_out, meta = export.to_comfyui(modules, base, comps["unet"].config, name=stem)
    elif fmt == "diffusers":
        sd_out, meta = export.to_diffusers(modules)
    else:
        return export.write_peft(modules, dst, dtype, None)
    return export.write_safetensors(export.cast(sd_out, dtype), dst, meta)
