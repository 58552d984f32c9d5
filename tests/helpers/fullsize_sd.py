"""Full-size SD1.5, SD2.1 and SDXL components on the meta device (no memory, no time), from their published
configs, written here independently of the package's own tables."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
OPENCLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280)


def meta_sd_components(base: str) -> dict[str, nn.Module]:
    """The UNet and text encoder(s) of a full-size "sd15" | "sd21" | "sdxl" on the meta device, from the
    published configs written above (not the package's own, lokr_diffusers/architectures.py)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}[base])
        if base == "sdxl":
            return {"unet": unet, "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_G))}
        te = CLIPTextModel(CLIPTextConfig(**(CLIP_L if base == "sd15" else OPENCLIP_H)))
        return {"unet": unet, "text_encoder": te}
