"""Plain-words reports on files that do not fit: unmatched keys, and which base model a file is for."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from ..architectures import CROSS_ATTENTION_DIM

BASES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_SDXL_NAMES = re.compile(r"lora_te2_|text_encoder_2\.|clip_g|label_emb|add_embedding|transformer_blocks[._][1-9]\b")
_SD12_NAMES = re.compile(r"down_blocks[._]0[._]attentions|input_blocks[._]1[._]1[._]|down_blocks[._]3[._]")


def guess_file_base(keys: Sequence[str]) -> str | None:
    """"sdxl", "sd1/2" or None, from module names alone (SDXL has a second text encoder, label_emb
    and deep transformer stacks; SD1/SD2 have attention in the first down block and a fourth one)."""
    joined = "\n".join(keys)
    if _SDXL_NAMES.search(joined):
        return "sdxl"
    if _SD12_NAMES.search(joined):
        return "sd1/2"
    return None


def pipeline_base(comps: Mapping[str, nn.Module]) -> str | None:
    unet = comps.get("unet")
    dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return CROSS_ATTENTION_DIM.get(dim) if isinstance(dim, int) else None


def base_hint(keys: Sequence[str], comps: Mapping[str, nn.Module]) -> str:
    """A sentence saying the file is for another base model, or '' when nothing says so."""
    file_base, pipe_base = guess_file_base(keys), pipeline_base(comps)
    if file_base is None or pipe_base is None:
        return ""
    if file_base == "sdxl" and pipe_base != "sdxl":
        return f" This file looks like an SDXL LoKr; the pipeline is {BASES[pipe_base]}."
    if file_base == "sd1/2" and pipe_base == "sdxl":
        return " This file looks like an SD1.x/SD2.x LoKr; the pipeline is SDXL."
    return ""


def unmatched_message(unmatched: Sequence[str], all_keys: Sequence[str], comps: Mapping[str, nn.Module]) -> str:
    shown = ", ".join(unmatched[:5])
    more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
    return (f"{len(unmatched)} of {len(all_keys)} keys match no module of the pipeline's "
            f"{', '.join(comps)}: {shown}{more}.{base_hint(all_keys, comps)}")
