"""Full-size DiT transformers on the meta device (no memory, well under a second each).

The dicts are the published `transformer/config.json` values (keys the class does not take, such as
`_class_name` and `_diffusers_version`, left out). The Hugging Face files themselves cannot be fetched
from here; each value was read from several independent copies of those files in public code (loaders
that embed the config to skip the download) and, for FLUX.1, from diffusers' own converter
(convert_flux_transformer_checkpoint_to_diffusers hard-codes inner_dim 3072 and mlp_ratio 4).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)
from torch import nn

# black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128 = 3072, guidance embedder.
FLUX1_DEV: dict[str, Any] = {
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
# black-forest-labs/FLUX.1-schnell: the same without the guidance embedder.
FLUX1_SCHNELL: dict[str, Any] = {**FLUX1_DEV, "guidance_embeds": False}

# stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 blocks of 24 heads x 64 = 1536; blocks 0-12 have
# the second (self-)attention attn2; RMS qk-norm.
SD35_MEDIUM: dict[str, Any] = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": tuple(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-large: 38 blocks of 38 heads x 64 = 2432, no dual attention. (Its
# config.json has no `dual_attention_layers` key; the class default () is the same.)
SD35_LARGE: dict[str, Any] = {
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
}

# black-forest-labs/FLUX.2-klein-4B: 5 double + 20 single blocks, 24 heads x 128 = 3072, Qwen3-4B text
# features (3 layers x 2560 = 7680), no guidance embedder (the distilled and base Klein alike).
FLUX2_KLEIN_4B: dict[str, Any] = {
    "attention_head_dim": 128, "axes_dims_rope": (32, 32, 32, 32), "eps": 1e-6, "guidance_embeds": False,
    "in_channels": 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0, "num_attention_heads": 24,
    "num_layers": 5, "num_single_layers": 20, "out_channels": None, "patch_size": 1, "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
# black-forest-labs/FLUX.2-klein-9B: 8 double + 24 single blocks, 32 heads x 128 = 4096, Qwen3-8B
# (3 x 4096 = 12288).
FLUX2_KLEIN_9B: dict[str, Any] = {
    **FLUX2_KLEIN_4B, "joint_attention_dim": 12288, "num_attention_heads": 32, "num_layers": 8,
    "num_single_layers": 24,
}

# Tongyi-MAI/Z-Image-Turbo: 30 layers + 2 noise + 2 context refiners, dim 3840 = 30 heads x 128.
ZIMAGE_TURBO: dict[str, Any] = {
    "all_f_patch_size": (1,), "all_patch_size": (2,), "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
    "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}

FULL: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "flux1-dev": (FluxTransformer2DModel, FLUX1_DEV),
    "flux1-schnell": (FluxTransformer2DModel, FLUX1_SCHNELL),
    "sd35-medium": (SD3Transformer2DModel, SD35_MEDIUM),
    "sd35-large": (SD3Transformer2DModel, SD35_LARGE),
    "flux2-klein-4b": (Flux2Transformer2DModel, FLUX2_KLEIN_4B),
    "flux2-klein-9b": (Flux2Transformer2DModel, FLUX2_KLEIN_9B),
    "zimage-turbo": (ZImageTransformer2DModel, ZIMAGE_TURBO),
}


@functools.cache
def meta_transformer(name: str) -> nn.Module:
    """The full-size transformer `name` (a key of FULL) on the meta device."""
    cls, config = FULL[name]
    with torch.device("meta"):
        return cls(**config)
