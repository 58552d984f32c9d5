"""Full-size architectures on the meta device (no memory, well under a second each): SD1.x / SD2.x / SDXL, and the
DiT families' variants (FLUX.1, SD3.5, FLUX.2 / Klein, Z-Image, Chroma, Lumina 2) with their text encoders. Used to
name and check modules when no pipeline is at hand (file conversion, inspect). Which family a model is of, and its
denoiser's class, are the family's record (lokr_diffusers/families/: `ModelFamily.variants`).

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
# Wan-AI/Wan2.1-T2V-14B (and each expert of Wan2.2-T2V-A14B / I2V-A14B): WanTransformer3DModel's own defaults, 40
# blocks of 40 heads x 128 = 5120, FFN 13824, UMT5 text features 4096. Wan2.1-I2V-14B adds the image
# cross-attention (CLIP features 1280, add_k/v_proj 5120 wide) and 36 input channels; Wan2.1-T2V-1.3B: 30 blocks of
# 12 heads (1536), FFN 8960; Wan2.2-TI2V-5B: 30 blocks of 24 heads (3072), FFN 14336, 48 latent channels. The
# parameter counts of these configs on the meta device are the published sizes (14.3 B, 16.4 B, 1.4 B, 5.0 B).
WAN21_T2V_14B: dict[str, Any] = {}
WAN21_I2V_14B: dict[str, Any] = {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
WAN21_T2V_1_3B: dict[str, Any] = {"num_layers": 30, "num_attention_heads": 12, "ffn_dim": 8960}
WAN22_TI2V_5B: dict[str, Any] = {"num_layers": 30, "num_attention_heads": 24, "ffn_dim": 14336, "in_channels": 48,
                                 "out_channels": 48}
# Lightricks/LTX-Video (0.9.x 2B): LTXVideoTransformer3DModel's own defaults (28 layers of 32 heads x 64 = 2048, T5
# features 4096, cross-attention 2048, 128 latent channels): 1.92 B parameters, the published 2B (the families
# research notes, build hints).
LTX_VIDEO_2B: dict[str, Any] = {}
# Lightricks/LTX-Video 13B (0.9.7 / 0.9.8): 48 layers of 32 heads x 128 = 4096, cross-attention 4096; read from a
# public loader embedding the transformer config (num_attention_heads 32, attention_head_dim 128,
# cross_attention_dim 4096, num_layers 48, caption_channels 4096) and matching the published size (13.04 B).
LTX_VIDEO_13B: dict[str, Any] = {"num_layers": 48, "attention_head_dim": 128, "cross_attention_dim": 4096}
# Lightricks/LTX-2: LTX2VideoTransformer3DModel's own defaults (48 layers; video 32 heads x 128 = 4096, audio
# 32 x 64 = 2048; connector features 3840): 18.88 B parameters, the published 19 B (the families research notes,
# build hints).
LTX_2: dict[str, Any] = {}
# Qwen/Qwen-Image: 60 blocks of 24 heads x 128 = 3072, Qwen2.5-VL-7B text features (3584), 2 x 2 patches of 16
# latent channels (64 in): QwenImageTransformer2DModel's own defaults (diffusers 0.42.1), which build the published
# 20.4 B parameters on the meta device (the families research notes). Written out so a changed default shows.
QWEN_IMAGE: dict[str, Any] = {
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16, "patch_size": 2,
}
# Qwen-Image 2.1: 32 blocks of 32 heads x 128 = 4096, Qwen3-VL text features (4096), SwiGLU of 3 x 4096:
# QwenImage21Transformer2DModel's own defaults (diffusers 0.42.1; 7.1 B parameters on the meta device, the published
# size not confirmed here).
QWEN_IMAGE_21: dict[str, Any] = {
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "context_in_dim": 4096, "in_channels": 64,
    "mlp_ratio": 3, "num_attention_heads": 32, "num_layers": 32, "out_channels": 64, "patch_size": 1,
}
# HiDream-ai/HiDream-I1-Full (Dev and Fast share the transformer's shape): 16 double + 32 single blocks of 20 heads
# x 128 = 2560, 4 routed experts (2 active), caption_channels (T5-XXL, Llama-3.1-8B) 4096 each: 16 + 32 Llama
# caption projections (one per block) and T5's, whatever llama_layers says (it is read in forward only), 2 x 2
# patches of 16 channels. Values from the families research notes (there from memory, not from the published
# config.json; supported by the 17.1 B parameters they build, the published size), the rest
# HiDreamImageTransformer2DModel's defaults.
HIDREAM_I1: dict[str, Any] = {
    "attention_head_dim": 128, "axes_dims_rope": (64, 32, 32), "caption_channels": [4096, 4096], "in_channels": 16,
    "llama_layers": list(range(48)), "max_resolution": (128, 128), "num_activated_experts": 2,
    "num_attention_heads": 20, "num_layers": 16, "num_routed_experts": 4, "num_single_layers": 32,
    "out_channels": 16, "patch_size": 2, "text_emb_dim": 2048,
}
# lodestones/Chroma1-HD: FLUX.1-schnell's 19 double + 38 single blocks, 24 heads x 128 = 3072, no guidance or
# pooled-text embedder; the approximator (64 input channels, 5 layers of 5120) gives every block's modulation.
# ChromaTransformer2DModel's defaults are these values, as are two copies in public code (a loader's embedded
# transformer config, a test's "Chroma1-HD signature"; out_channels 64 or None alike); built on meta: 8.90 B
# parameters, the published size. diffusers' converter hard-codes inner_dim 3072 and mlp_ratio 4 too.
CHROMA1_HD: dict[str, Any] = {
    "approximator_hidden_dim": 5120, "approximator_layers": 5, "approximator_num_channels": 64,
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "in_channels": 64, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
}
# Alpha-VLLM/Lumina-Image-2.0: 26 layers + 2 noise + 2 context refiners, hidden 2304 = 24 heads x 96, 8 key / value
# heads (diffusers' converter hard-codes the qkv split 2304 / 768 / 768), Gemma-2-2B features (2304 wide). The
# class defaults but cap_feat_dim; the transformer config.json as a public test embeds it (the same values); built
# on meta: 2.61 B parameters, the published size.
LUMINA_IMAGE_2: dict[str, Any] = {
    "axes_dim_rope": (32, 32, 32), "axes_lens": (300, 512, 512), "cap_feat_dim": 2304, "hidden_size": 2304,
    "in_channels": 16, "multiple_of": 256, "norm_eps": 1e-05, "num_attention_heads": 24, "num_kv_heads": 8,
    "num_layers": 26, "num_refiner_layers": 2, "patch_size": 2, "sample_size": 128,
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
    "wan2.1-t2v-14b": Variant("Wan2.1-T2V-14B", WAN21_T2V_14B, {}),
    "wan2.1-i2v-14b": Variant("Wan2.1-I2V-14B", WAN21_I2V_14B, {}),
    "wan2.1-t2v-1.3b": Variant("Wan2.1-T2V-1.3B", WAN21_T2V_1_3B, {}),
    "wan2.2-ti2v-5b": Variant("Wan2.2-TI2V-5B", WAN22_TI2V_5B, {}),
    "wan2.2-t2v-a14b": Variant("Wan2.2-T2V-A14B (each expert)", WAN21_T2V_14B, {}),
    "wan2.2-i2v-a14b": Variant("Wan2.2-I2V-A14B (each expert)", {"in_channels": 36}, {}),
    "ltx-video-2b": Variant("LTX-Video 2B", LTX_VIDEO_2B, {}),
    "ltx-video-13b": Variant("LTX-Video 13B", LTX_VIDEO_13B, {}),
    "ltx-2": Variant("LTX-2", LTX_2, {}),
    "qwen-image": Variant("Qwen-Image", QWEN_IMAGE, {}),
    "qwen-image-2.1": Variant("Qwen-Image 2.1", QWEN_IMAGE_21, {}),
    "hidream-i1": Variant("HiDream-I1", HIDREAM_I1, {}),
    "chroma1-hd": Variant("Chroma1-HD", CHROMA1_HD, {"text_encoder": ("T5EncoderModel", _T5_XXL)}),
    "lumina-image-2": Variant("Lumina-Image-2.0", LUMINA_IMAGE_2, {}),  # Gemma-2-2B left out, as FLUX.2-dev's encoder
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
