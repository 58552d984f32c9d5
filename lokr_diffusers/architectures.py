"""Full-size SD1.x / SD2.x / SDXL architectures on the meta device (no memory, no time), and which
base a pipeline is. Used to name and check modules when no pipeline is at hand (file conversion)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

BASES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
_UNET: dict[str, dict[str, Any]] = {
    "sd1": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 use_linear_projection=True),
}
_CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_OPENCLIP_H: dict[str, Any] = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, hidden_act="gelu")
_OPENCLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
CROSS_ATTENTION_DIM: dict[int, str] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# text-encoder widths that name a base (768 is CLIP-L: SD1's encoder and SDXL's first one alike)
TEXT_ENCODER_WIDTH: dict[int, str] = {1024: "sd2", 1280: "sdxl"}
BASE_NAMES: dict[str, str] = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd1/2": "SD1.x/SD2.x"}
BASE_MODEL_VERSION: dict[str, str] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def meta_components(base: str) -> dict[str, nn.Module]:
    """{unet, text_encoder[, text_encoder_2]} of a full-size base model, on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    with torch.device("meta"):
        unet = cast(nn.Module, UNet2DConditionModel(**_UNET[base]))  # mypy sees diffusers' lazy stub
        comps: dict[str, nn.Module] = {"unet": unet}
        if base == "sdxl":
            comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(**_CLIP_L))
            comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**_OPENCLIP_G))
        else:
            comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(**(_CLIP_L if base == "sd1" else _OPENCLIP_H)))
    return comps


def base_of(components: Mapping[str, nn.Module]) -> str:
    """"sd1" | "sd2" | "sdxl" for a pipeline's components: by cross-attention width, else (tiny
    test models) SDXL when there is a second text encoder, SD1 otherwise."""
    config = getattr(components.get("unet"), "config", None)
    dim = getattr(config, "cross_attention_dim", None)
    if isinstance(dim, int) and dim in CROSS_ATTENTION_DIM:
        return CROSS_ATTENTION_DIM[dim]
    return "sdxl" if "text_encoder_2" in components else "sd1"
