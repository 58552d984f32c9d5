"""Full-size architectures on the meta device (no memory, well under a second each): SD1.x / SD2.x / SDXL, and the
DiT families' variants (FLUX.1, SD3.5, FLUX.2 / Klein, Z-Image) with their text encoders. Used to name and check
modules when no pipeline is at hand (file conversion, inspect). Which family a model is of, and its denoiser's
class, are the family's record (lokr_diffusers/families/: `ModelFamily.variants`).

The DiT values are the published `config.json` ones of each model's transformer and text encoders (keys the classes
do not take left out). The Hugging Face files cannot be fetched from here; each value was read from several
independent copies of those files in public code (loaders that embed the config to skip the download) and, for
FLUX.1, from diffusers' own converter (convert_flux_transformer_checkpoint_to_diffusers hard-codes inner_dim 3072
and mlp_ratio 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import families

# The UNets: what differs from UNet2DConditionModel's defaults (SD1.x's block layout).
SD1_UNET: dict[str, Any] = dict(cross_attention_dim=768, attention_head_dim=8)
SD2_UNET: dict[str, Any] = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True)
SDXL_UNET: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True)
_CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_OPENCLIP_H: dict[str, Any] = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, hidden_act="gelu")
_OPENCLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, projection_dim=1280, hidden_act="gelu")

# ------------------------------------------------------------------------------------------ DiT families
# black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128 = 3072, guidance embedder.
FLUX1_DEV: dict[str, Any] = {
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
# black-forest-labs/FLUX.1-schnell: the same without the guidance embedder.
FLUX1_SCHNELL: dict[str, Any] = {**FLUX1_DEV, "guidance_embeds": False}
# stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 blocks of 24 heads x 64 = 1536; blocks 0-12 have the
# second (self-)attention attn2; RMS qk-norm. (SD3-medium's modules are these without attn2.)
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
# black-forest-labs/FLUX.2-dev: 8 double + 48 single blocks, 48 heads x 128 = 6144, Mistral-3 text features
# (3 x 5120 = 15360), guidance embedder: Flux2Transformer2DModel's own defaults.
FLUX2_DEV: dict[str, Any] = {**FLUX2_KLEIN_4B, "guidance_embeds": True, "joint_attention_dim": 15360,
                             "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48}
# Tongyi-MAI/Z-Image-Turbo: 30 layers + 2 noise + 2 context refiners, dim 3840 = 30 heads x 128.
ZIMAGE_TURBO: dict[str, Any] = {
    "all_f_patch_size": (1,), "all_patch_size": (2,), "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
    "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}
# hunyuanvideo-community/HunyuanVideo: HunyuanVideoTransformer3DModel's own defaults (20 double + 40 single blocks,
# 24 heads x 128 = 3072, 2 refiner blocks, Llama text features 4096, CLIP-L pooled 768, guidance embedder): 12.82 B
# parameters on the meta device, the published 13 B (the config.json itself not read here).
HUNYUANVIDEO: dict[str, Any] = {}
# tencent/HunyuanVideo-1.5 (diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py TRANSFORMER_CONFIGS, 480p /
# 720p alike): HunyuanVideo15Transformer3DModel's defaults (54 double blocks, 16 heads x 128 = 2048, in 65, out 32,
# Qwen2.5-VL text 3584, ByT5 1472, SigLIP 1152): 8.33 B parameters, the published 8.3 B.
HUNYUANVIDEO15: dict[str, Any] = {}
# Text encoders: T5 v1.1 XXL (FLUX.1, SD3), Qwen3-4B (Z-Image, Klein 4B), Qwen3-8B (Klein 9B); SD3's CLIP-L has a
# 768-wide projection. FLUX.2-dev's Mistral-3 (24B, with a vision tower) is left out: its files train the
# transformer, and a text-encoder key of one is reported as matching nothing.
_T5_XXL: dict[str, Any] = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                               feed_forward_proj="gated-gelu", is_encoder_decoder=False)
_QWEN3_4B: dict[str, Any] = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
_QWEN3_8B: dict[str, Any] = {**_QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288,
                             "tie_word_embeddings": False}


@dataclass(frozen=True)
class Variant:
    """One full-size model: its name in words, its denoiser's config (the class is its family's `denoiser_class`)
    and {component: (text-encoder class (transformers), its config)}."""

    title: str
    config: dict[str, Any]
    encoders: dict[str, tuple[str, dict[str, Any]]]


_FLUX1_TE: dict[str, tuple[str, dict[str, Any]]] = {"text_encoder": ("CLIPTextModel", _CLIP_L),
                                                    "text_encoder_2": ("T5EncoderModel", _T5_XXL)}
_SD3_TE: dict[str, tuple[str, dict[str, Any]]] = {
    "text_encoder": ("CLIPTextModelWithProjection", {**_CLIP_L, "projection_dim": 768}),
    "text_encoder_2": ("CLIPTextModelWithProjection", _OPENCLIP_G), "text_encoder_3": ("T5EncoderModel", _T5_XXL)}
# keyed by model name (an SD base's one full-size model is named as its family)
SD_VARIANTS: dict[str, Variant] = {
    "sd1": Variant(families.get("sd1").title, SD1_UNET, {"text_encoder": ("CLIPTextModel", _CLIP_L)}),
    "sd2": Variant(families.get("sd2").title, SD2_UNET, {"text_encoder": ("CLIPTextModel", _OPENCLIP_H)}),
    "sdxl": Variant(families.get("sdxl").title, SDXL_UNET, {
        "text_encoder": ("CLIPTextModel", _CLIP_L), "text_encoder_2": ("CLIPTextModelWithProjection", _OPENCLIP_G)}),
}
DIT_VARIANTS: dict[str, Variant] = {
    "flux1-dev": Variant("FLUX.1-dev", FLUX1_DEV, _FLUX1_TE),
    "flux1-schnell": Variant("FLUX.1-schnell", FLUX1_SCHNELL, _FLUX1_TE),
    "sd35-medium": Variant("SD3.5 Medium", SD35_MEDIUM, _SD3_TE),
    "sd35-large": Variant("SD3.5 Large", SD35_LARGE, _SD3_TE),
    "flux2-klein-4b": Variant("FLUX.2 [klein] 4B", FLUX2_KLEIN_4B, {"text_encoder": ("Qwen3ForCausalLM", _QWEN3_4B)}),
    "flux2-klein-9b": Variant("FLUX.2 [klein] 9B", FLUX2_KLEIN_9B, {"text_encoder": ("Qwen3ForCausalLM", _QWEN3_8B)}),
    "flux2-dev": Variant("FLUX.2 [dev]", FLUX2_DEV, {}),
    "zimage-turbo": Variant("Z-Image-Turbo", ZIMAGE_TURBO, {"text_encoder": ("Qwen3Model", _QWEN3_4B)}),
    "hunyuanvideo": Variant("HunyuanVideo", HUNYUANVIDEO, {}),
    "hunyuanvideo-1.5": Variant("HunyuanVideo 1.5", HUNYUANVIDEO15, {}),
}
VARIANTS: dict[str, Variant] = {**SD_VARIANTS, **DIT_VARIANTS}
MODEL_NAMES: dict[str, str] = {name: v.title for name, v in VARIANTS.items()}


def meta_components(variant: str) -> dict[str, nn.Module]:
    """{denoiser ("unet" or "transformer"), text encoders} of a full-size model (a key of VARIANTS: an SD base or a
    DiT variant) on the meta device."""
    import diffusers
    import transformers

    if variant not in VARIANTS:
        raise ValueError(f"base must be one of {tuple(SD_VARIANTS)} or a DiT variant {tuple(DIT_VARIANTS)}, "
                         f"got {variant!r}")
    v, family = VARIANTS[variant], families.of_variant(variant)
    with torch.device("meta"):
        comps: dict[str, nn.Module] = {family.denoiser: getattr(diffusers, family.denoiser_class)(**v.config)}
        for component, (te_cls, te_config) in v.encoders.items():
            model_cls = getattr(transformers, te_cls)
            comps[component] = model_cls(model_cls.config_class(**te_config))
    return comps
