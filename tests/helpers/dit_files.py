"""Files in the original layouts of the DiT families and the oracle of what ComfyUI makes of them.

The original weight of each module is the row blocks of diffusers' modules in the original's order (the tables
below, by hand from diffusers' single-file converters and ComfyUI's flux_to_diffusers / mmdit_to_diffusers /
z_image_to_diffusers; Chroma and Lumina 2 from convert_chroma_transformer_checkpoint_to_diffusers and
convert_lumina2_to_diffusers; the tiny sizes from tests/helpers/dit_models.py's configs); ComfyUI's rule is applied to
that whole weight (helpers.references.fused_consumer_weights) and the result is cut back and written into a copy
of the model. Nothing here asks the package for names, rows or ΔW.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ChromaPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    FluxPipeline,
    HiDreamImagePipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideoPipeline,
    LTX2Pipeline,
    LTXPipeline,
    Lumina2Pipeline,
    QwenImage21Pipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    WanImageToVideoPipeline,
    ZImagePipeline,
)
from torch import Tensor, nn

from helpers.dit_models import tiny
from helpers.references import consumer_weight, fused_consumer_weights

PIPELINES: dict[str, type] = {
    "flux": FluxPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux2": Flux2KleinPipeline,
    "zimage": ZImagePipeline,
    "wan": WanImageToVideoPipeline,
    "ltxvideo": LTXPipeline,
    "ltx2": LTX2Pipeline,
    "qwenimage": QwenImagePipeline,
    "qwenimage21": QwenImage21Pipeline,
    "hidream": HiDreamImagePipeline,
    "chroma": ChromaPipeline,
    "lumina2": Lumina2Pipeline,
    "hunyuanvideo": HunyuanVideoPipeline,
    "hunyuanvideo15": HunyuanVideo15Pipeline,
}
Blocks = list[tuple[str, int, int | None]]  # (diffusers path, first row, end row or None: all), in original order

# Flux.1 tiny: d = 16 (2 heads x 8), MLP 4d = 64; single blocks' linear1 = q, k, v, mlp (112 rows);
# final_layer.adaLN_modulation.1 is (shift, scale), diffusers' norm_out.linear (scale, shift).
FLUX: dict[str, Blocks] = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, None),
                                     ("transformer_blocks.0.attn.to_k", 0, None),
                                     ("transformer_blocks.0.attn.to_v", 0, None)],
    "double_blocks.1.txt_attn.qkv": [("transformer_blocks.1.attn.add_q_proj", 0, None),
                                     ("transformer_blocks.1.attn.add_k_proj", 0, None),
                                     ("transformer_blocks.1.attn.add_v_proj", 0, None)],
    "single_blocks.0.linear1": [("single_transformer_blocks.0.attn.to_q", 0, None),
                                ("single_transformer_blocks.0.attn.to_k", 0, None),
                                ("single_transformer_blocks.0.attn.to_v", 0, None),
                                ("single_transformer_blocks.0.proj_mlp", 0, None)],
    "single_blocks.1.linear2": [("single_transformer_blocks.1.proj_out", 0, None)],
    "double_blocks.0.img_mlp.0": [("transformer_blocks.0.ff.net.0.proj", 0, None)],
    "double_blocks.1.txt_mod.lin": [("transformer_blocks.1.norm1_context.linear", 0, None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 16, 32), ("norm_out.linear", 0, 16)],
}
# SD3 tiny: d = 16, 3 blocks, block 0 with attn2, block 2 context pre-only (its adaLN (shift, scale) swapped).
SD3: dict[str, Blocks] = {
    "joint_blocks.0.x_block.attn.qkv": [("transformer_blocks.0.attn.to_q", 0, None),
                                        ("transformer_blocks.0.attn.to_k", 0, None),
                                        ("transformer_blocks.0.attn.to_v", 0, None)],
    "joint_blocks.0.x_block.attn2.qkv": [("transformer_blocks.0.attn2.to_q", 0, None),
                                         ("transformer_blocks.0.attn2.to_k", 0, None),
                                         ("transformer_blocks.0.attn2.to_v", 0, None)],
    "joint_blocks.2.context_block.attn.qkv": [("transformer_blocks.2.attn.add_q_proj", 0, None),
                                              ("transformer_blocks.2.attn.add_k_proj", 0, None),
                                              ("transformer_blocks.2.attn.add_v_proj", 0, None)],
    "joint_blocks.2.context_block.adaLN_modulation.1": [("transformer_blocks.2.norm1_context.linear", 16, 32),
                                                        ("transformer_blocks.2.norm1_context.linear", 0, 16)],
    "joint_blocks.1.x_block.mlp.fc1": [("transformer_blocks.1.ff.net.0.proj", 0, None)],
    "context_embedder": [("context_embedder", 0, None)],
}
# Flux.2 Klein tiny: d = 16; single blocks are fused in diffusers too (linear1 = attn.to_qkv_mlp_proj).
FLUX2: dict[str, Blocks] = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, None),
                                     ("transformer_blocks.0.attn.to_k", 0, None),
                                     ("transformer_blocks.0.attn.to_v", 0, None)],
    "single_blocks.1.linear1": [("single_transformer_blocks.1.attn.to_qkv_mlp_proj", 0, None)],
    "double_blocks.1.txt_mlp.0": [("transformer_blocks.1.ff_context.linear_in", 0, None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 16, 32), ("norm_out.linear", 0, 16)],
}
# Z-Image tiny: dim 32.
ZIMAGE: dict[str, Blocks] = {
    "layers.0.attention.qkv": [("layers.0.attention.to_q", 0, None), ("layers.0.attention.to_k", 0, None),
                               ("layers.0.attention.to_v", 0, None)],
    "noise_refiner.0.attention.qkv": [("noise_refiner.0.attention.to_q", 0, None),
                                      ("noise_refiner.0.attention.to_k", 0, None),
                                      ("noise_refiner.0.attention.to_v", 0, None)],
    "layers.1.feed_forward.w1": [("layers.1.feed_forward.w1", 0, None)],
    "context_refiner.0.attention.out": [("context_refiner.0.attention.to_out.0", 0, None)],
    "x_embedder": [("all_x_embedder.2-1", 0, None)],
    "layers.1.adaLN_modulation.0": [("layers.1.adaLN_modulation.0", 0, None)],  # Z-Image's own (Lumina 2's is .1)
}
# Chroma tiny: d = 16 (2 heads x 8), MLP 4d = 64, as FLUX.1 less its modulations (single blocks' linear1 = q, k, v,
# mlp: 112 rows), plus the approximator (convert_chroma_transformer_checkpoint_to_diffusers).
CHROMA: dict[str, Blocks] = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, None),
                                     ("transformer_blocks.0.attn.to_k", 0, None),
                                     ("transformer_blocks.0.attn.to_v", 0, None)],
    "double_blocks.1.txt_attn.qkv": [("transformer_blocks.1.attn.add_q_proj", 0, None),
                                     ("transformer_blocks.1.attn.add_k_proj", 0, None),
                                     ("transformer_blocks.1.attn.add_v_proj", 0, None)],
    "single_blocks.0.linear1": [("single_transformer_blocks.0.attn.to_q", 0, None),
                                ("single_transformer_blocks.0.attn.to_k", 0, None),
                                ("single_transformer_blocks.0.attn.to_v", 0, None),
                                ("single_transformer_blocks.0.proj_mlp", 0, None)],
    "single_blocks.1.linear2": [("single_transformer_blocks.1.proj_out", 0, None)],
    "double_blocks.0.txt_mlp.2": [("transformer_blocks.0.ff_context.net.2", 0, None)],
    "distilled_guidance_layer.layers.1.in_layer": [("distilled_guidance_layer.layers.1.linear_1", 0, None)],
    "distilled_guidance_layer.in_proj": [("distilled_guidance_layer.in_proj", 0, None)],
    "txt_in": [("context_embedder", 0, None)],
}
# HunyuanVideo tiny: d = 20 (2 heads x 10), MLP 80, 2 double, 2 single, 1 refiner block (diffusers'
# convert_hunyuan_video_transformer_to_diffusers). Both spellings of the originals: Tencent's (img_attn_qkv,
# img_mlp.fc1, self_attn_qkv) and ComfyUI's internal one (txt_attn.qkv, img_mod.lin, modulation.lin, time_in.in_layer;
# comfy/supported_models.py HunyuanVideo.process_unet_state_dict).
HUNYUANVIDEO: dict[str, Blocks] = {
    "double_blocks.0.img_attn_qkv": [("transformer_blocks.0.attn.to_q", 0, None),
                                     ("transformer_blocks.0.attn.to_k", 0, None),
                                     ("transformer_blocks.0.attn.to_v", 0, None)],
    "double_blocks.1.txt_attn.qkv": [("transformer_blocks.1.attn.add_q_proj", 0, None),
                                     ("transformer_blocks.1.attn.add_k_proj", 0, None),
                                     ("transformer_blocks.1.attn.add_v_proj", 0, None)],
    "single_blocks.0.linear1": [("single_transformer_blocks.0.attn.to_q", 0, None),
                                ("single_transformer_blocks.0.attn.to_k", 0, None),
                                ("single_transformer_blocks.0.attn.to_v", 0, None),
                                ("single_transformer_blocks.0.proj_mlp", 0, None)],
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": [
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_q", 0, None),
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_k", 0, None),
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_v", 0, None)],
    "single_blocks.1.modulation.lin": [("single_transformer_blocks.1.norm.linear", 0, None)],
    "double_blocks.0.img_mlp.fc1": [("transformer_blocks.0.ff.net.0.proj", 0, None)],
    "double_blocks.1.img_mod.lin": [("transformer_blocks.1.norm1.linear", 0, None)],
    "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", 0, None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 20, 40), ("norm_out.linear", 0, 20)],
}
# Lumina 2 tiny: hidden 24 = 3 heads x 8, 1 key / value head: attention.qkv = q (24 rows), k (8), v (8)
# (convert_lumina2_to_diffusers); a block's adaLN_modulation.1 is norm1.linear, the final one norm_out.linear_1.
LUMINA2: dict[str, Blocks] = {
    "layers.0.attention.qkv": [("layers.0.attn.to_q", 0, None), ("layers.0.attn.to_k", 0, None),
                               ("layers.0.attn.to_v", 0, None)],
    "context_refiner.0.attention.qkv": [("context_refiner.0.attn.to_q", 0, None),
                                        ("context_refiner.0.attn.to_k", 0, None),
                                        ("context_refiner.0.attn.to_v", 0, None)],
    "noise_refiner.0.adaLN_modulation.1": [("noise_refiner.0.norm1.linear", 0, None)],
    "layers.1.feed_forward.w3": [("layers.1.feed_forward.linear_3", 0, None)],
    "layers.1.attention.out": [("layers.1.attn.to_out.0", 0, None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear_1", 0, None)],
    "cap_embedder.1": [("time_caption_embed.caption_embedder.1", 0, None)],
    "t_embedder.mlp.0": [("time_caption_embed.timestep_embedder.linear_1", 0, None)],
}
# Wan tiny (2.1 I2V-like): dim 24; renames only (convert_wan_transformer_to_diffusers), no fused weight, no swap.
WAN: dict[str, Blocks] = {
    "blocks.0.self_attn.q": [("blocks.0.attn1.to_q", 0, None)],
    "blocks.1.self_attn.o": [("blocks.1.attn1.to_out.0", 0, None)],
    "blocks.0.cross_attn.k": [("blocks.0.attn2.to_k", 0, None)],
    "blocks.1.cross_attn.v_img": [("blocks.1.attn2.add_v_proj", 0, None)],
    "blocks.0.ffn.0": [("blocks.0.ffn.net.0.proj", 0, None)],
    "time_projection.1": [("condition_embedder.time_proj", 0, None)],
    "head.head": [("proj_out", 0, None)],
    "img_emb.proj.1": [("condition_embedder.image_embedder.ff.net.0.proj", 0, None)],
}
# LTX-Video tiny: d = 16, 2 blocks, cross-attention 16, captions 8 wide. Lightricks' names are diffusers' but for
# the top-level renames of convert_ltx_transformer_checkpoint_to_diffusers: patchify_proj = proj_in, adaln_single.* =
# time_embed.* (adaLN-single: 6d rows, timestep MLP 256 -> d -> d); one Linear per original, no fused rows.
LTXVIDEO: dict[str, Blocks] = {
    "patchify_proj": [("proj_in", 0, None)],
    "adaln_single.linear": [("time_embed.linear", 0, None)],
    "adaln_single.emb.timestep_embedder.linear_1": [("time_embed.emb.timestep_embedder.linear_1", 0, None)],
    "transformer_blocks.0.attn1.to_q": [("transformer_blocks.0.attn1.to_q", 0, None)],
    "transformer_blocks.1.attn2.to_k": [("transformer_blocks.1.attn2.to_k", 0, None)],
    "transformer_blocks.1.ff.net.0.proj": [("transformer_blocks.1.ff.net.0.proj", 0, None)],
    "caption_projection.linear_1": [("caption_projection.linear_1", 0, None)],
    "proj_out": [("proj_out", 0, None)],
}
# LTX-2 tiny: video d = 16, audio d = 8, 1 block; convert_ltx2_transformer_to_diffusers' renames: audio_patchify_proj =
# audio_proj_in, audio_adaln_single.* = audio_time_embed.*, av_ca_<x>_adaln_single.* = av_cross_attn_<y>.*; the
# audio-video cross attentions (audio_to_video_attn: q from video 16 -> 8, out 8 -> 16) keep their names.
LTX2: dict[str, Blocks] = {
    "patchify_proj": [("proj_in", 0, None)],
    "audio_patchify_proj": [("audio_proj_in", 0, None)],
    "audio_adaln_single.emb.timestep_embedder.linear_2": [("audio_time_embed.emb.timestep_embedder.linear_2", 0, None)],
    "av_ca_a2v_gate_adaln_single.linear": [("av_cross_attn_video_a2v_gate.linear", 0, None)],
    "av_ca_audio_scale_shift_adaln_single.linear": [("av_cross_attn_audio_scale_shift.linear", 0, None)],
    "transformer_blocks.0.attn1.to_v": [("transformer_blocks.0.attn1.to_v", 0, None)],
    "transformer_blocks.0.audio_attn2.to_k": [("transformer_blocks.0.audio_attn2.to_k", 0, None)],
    "transformer_blocks.0.audio_to_video_attn.to_q": [("transformer_blocks.0.audio_to_video_attn.to_q", 0, None)],
    "transformer_blocks.0.video_to_audio_attn.to_out.0": [("transformer_blocks.0.video_to_audio_attn.to_out.0", 0,
                                                           None)],
    "transformer_blocks.0.audio_ff.net.0.proj": [("transformer_blocks.0.audio_ff.net.0.proj", 0, None)],
    "audio_caption_projection.linear_1": [("audio_caption_projection.linear_1", 0, None)],
    "audio_proj_out": [("audio_proj_out", 0, None)],
}
# Qwen-Image tiny: dim 32 (2 heads x 16); the original names are the diffusers paths (diffusers' single-file
# converter for the class is the identity; ComfyUI's qwen_image model the same names), no swap anywhere.
QWENIMAGE: dict[str, Blocks] = {
    "transformer_blocks.0.img_mod.1": [("transformer_blocks.0.img_mod.1", 0, None)],
    "transformer_blocks.1.attn.add_k_proj": [("transformer_blocks.1.attn.add_k_proj", 0, None)],
    "transformer_blocks.0.attn.to_out.0": [("transformer_blocks.0.attn.to_out.0", 0, None)],
    "transformer_blocks.0.txt_mlp.net.0.proj": [("transformer_blocks.0.txt_mlp.net.0.proj", 0, None)],
    "norm_out.linear": [("norm_out.linear", 0, None)],
    "img_in": [("img_in", 0, None)],
}
# Qwen-Image 2.1 tiny: dim 32, SwiGLU 3 x 32 = 96 rows per half; ComfyUI's img_mlp.gate_up is the gate's rows,
# then the up projection's (convert_qwen_image21_transformer_checkpoint_to_diffusers: chunk(2), gate first).
QWENIMAGE21: dict[str, Blocks] = {
    "transformer_blocks.0.img_mlp.gate_up": [("transformer_blocks.0.img_mlp.gate_layer", 0, None),
                                             ("transformer_blocks.0.img_mlp.proj", 0, None)],
    "transformer_blocks.1.img_mlp.gate_up": [("transformer_blocks.1.img_mlp.gate_layer", 0, None),
                                             ("transformer_blocks.1.img_mlp.proj", 0, None)],
    "transformer_blocks.1.attn.to_v": [("transformer_blocks.1.attn.to_v", 0, None)],
    "modulation.1": [("modulation.1", 0, None)],
    "txt_in.in_layer": [("txt_in.in_layer", 0, None)],
}
# HiDream-I1 tiny: dim 32 (4 heads x 8), 4 routed experts; the original names are the diffusers paths
# (convert_hidream_transformer_to_diffusers: the identity), attention outputs `to_out` / `to_out_t` plain Linears.
HIDREAM: dict[str, Blocks] = {
    "double_stream_blocks.0.block.attn1.to_q_t": [("double_stream_blocks.0.block.attn1.to_q_t", 0, None)],
    "double_stream_blocks.0.block.attn1.to_out": [("double_stream_blocks.0.block.attn1.to_out", 0, None)],
    "double_stream_blocks.0.block.ff_i.experts.1.w3": [("double_stream_blocks.0.block.ff_i.experts.1.w3", 0, None)],
    "single_stream_blocks.0.block.ff_i.shared_experts.w2": [
        ("single_stream_blocks.0.block.ff_i.shared_experts.w2", 0, None)],
    "single_stream_blocks.0.block.adaLN_modulation.1": [("single_stream_blocks.0.block.adaLN_modulation.1", 0, None)],
    "caption_projection.2.linear": [("caption_projection.2.linear", 0, None)],
    "x_embedder.proj": [("x_embedder.proj", 0, None)],
}
# HunyuanVideo 1.5 tiny: d = 16, 2 double blocks, 1 refiner block; q, k, v are originals of their own
# (tests/helpers/hunyuanvideo15_oracle.py: diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py).
HUNYUANVIDEO15: dict[str, Blocks] = {
    "double_blocks.0.img_attn_q": [("transformer_blocks.0.attn.to_q", 0, None)],
    "double_blocks.1.txt_attn_v": [("transformer_blocks.1.attn.add_v_proj", 0, None)],
    "txt_in.individual_token_refiner.blocks.0.self_attn.qkv": [
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_q", 0, None),
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_k", 0, None),
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_v", 0, None)],
    "double_blocks.0.img_mod.linear": [("transformer_blocks.0.norm1.linear", 0, None)],
    "double_blocks.1.txt_mlp.2": [("transformer_blocks.1.ff_context.net.2", 0, None)],
    "byt5_in.fc3": [("context_embedder_2.linear_3", 0, None)],
    "vision_in.proj.1": [("image_embedder.linear_1", 0, None)],
    "txt_in.t_embedder.in_layer": [("context_embedder.time_text_embed.timestep_embedder.linear_1", 0, None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 16, 32), ("norm_out.linear", 0, 16)],
}
ORIGINALS: dict[str, dict[str, Blocks]] = {
    "flux": FLUX, "sd3": SD3, "flux2": FLUX2, "zimage": ZIMAGE, "wan": WAN, "ltxvideo": LTXVIDEO, "ltx2": LTX2,
    "qwenimage": QWENIMAGE, "qwenimage21": QWENIMAGE21, "hidream": HIDREAM, "chroma": CHROMA, "lumina2": LUMINA2,
    "hunyuanvideo": HUNYUANVIDEO, "hunyuanvideo15": HUNYUANVIDEO15,
}
FAMILIES = tuple(ORIGINALS)
# The transformer block classes LyCORIS' wrapper (SimpleTuner's layout) is pointed at, per family
BLOCK_CLASSES: dict[str, list[str]] = {
    "flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
    "sd3": ["JointTransformerBlock"],
    "flux2": ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"],
    "zimage": ["ZImageTransformerBlock"],
    "wan": ["WanTransformerBlock"],
    "ltxvideo": ["LTXVideoTransformerBlock"],
    "ltx2": ["LTX2VideoTransformerBlock"],
    "qwenimage": ["QwenImageTransformerBlock"],
    "qwenimage21": ["QwenImage21TransformerBlock"],
    "hidream": ["HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock"],
    "chroma": ["ChromaTransformerBlock", "ChromaSingleTransformerBlock"],
    "lumina2": ["Lumina2TransformerBlock"],
    "hunyuanvideo": ["HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
                     "HunyuanVideoIndividualTokenRefinerBlock"],
    "hunyuanvideo15": ["HunyuanVideo15TransformerBlock", "HunyuanVideo15IndividualTokenRefinerBlock"],
}
ORIGINAL_LAYOUTS = {"comfyui": "diffusion_model.{p}", "kohya": "lora_unet_{u}"}
DIFFUSERS_LAYOUTS = {"aitoolkit": "diffusion_model.{p}", "lycoris": "lycoris_{u}", "diffusers": "transformer.{p}",
                     "onetrainer": "lora_transformer_{u}"}


def name_in(template: str, name: str) -> str:
    return template.format(p=name, u=name.replace(".", "_"))


class _NoProcessor:
    """Stands in for a processor a pipeline reads once when built (QwenImage21Pipeline: the length of its system
    prompt's tokens, the id of its image-pad token); never used to encode."""

    class tokenizer:  # an attribute of the processor, named as transformers names it
        @staticmethod
        def encode(text: str) -> list[int]:
            return [0]

    @staticmethod
    def apply_chat_template(*args: Any, **kwargs: Any) -> list[list[int]]:
        return [[0]]


def bare_pipeline(family: str, model: nn.Module | None = None, cls: type | None = None) -> Any:
    """The family's diffusers pipeline (or `cls`, another pipeline of the family's transformer, or of `model`'s
    class) around a tiny transformer (text encoders, VAE, image encoders and safety checker left out)."""
    cls = PIPELINES[family] if cls is None else cls
    kwargs: dict[str, Any] = {"scheduler": FlowMatchEulerDiscreteScheduler(),
                              "transformer": model if model is not None else tiny(family)}
    for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                 "tokenizer_3", "image_encoder", "feature_extractor", "audio_vae", "connectors", "vocoder",
                 "temporal_latent_upsampler", "text_encoder_4", "tokenizer_4", "processor", "controlnet", "guider",
                 "image_processor"):
        if name in cls.__init__.__code__.co_varnames:
            kwargs[name] = _NoProcessor() if name == "processor" and cls is QwenImage21Pipeline else None
    if cls.__name__.startswith("HunyuanVideo15"):  # its __init__ reads vae.config even when vae is None (0.42.1)
        kwargs["vae"] = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)
    if "safety_checker" in cls.__init__.__code__.co_varnames:  # Cosmos: None would import cosmos_guardrail
        kwargs["safety_checker"] = nn.Identity()
    return cls(**kwargs)


def rows_of(model: nn.Module, blocks: Blocks) -> list[tuple[nn.Linear, int, int]]:
    out = []
    for path, a, b in blocks:
        m = model.get_submodule(path)
        assert isinstance(m, nn.Linear)
        out.append((m, a, m.out_features if b is None else b))
    return out


def shape_of(model: nn.Module, blocks: Blocks) -> tuple[int, int]:
    rows = rows_of(model, blocks)
    return sum(b - a for _, a, b in rows), rows[0][0].in_features


def out_l_for(model: nn.Module, blocks: Blocks, aligned: bool) -> int:
    """W1's rows: on block edges (out_k divides every boundary between the blocks), or off them."""
    rows = rows_of(model, blocks)
    height = sum(b - a for _, a, b in rows)
    edges = [sum(b - a for _, a, b in rows[:i]) for i in range(1, len(rows))]
    if aligned:
        return height // math.gcd(height, *edges) if edges else 1
    for out_l in (8, 6, 4, 3, 2, 1):
        if height % out_l == 0 and any(e % (height // out_l) for e in edges):
            return out_l
    return 1  # a single block: no edge to miss


STYLES = ("w2 low-rank", "both low-rank", "both full", "no alpha")


def make_factors(out: int, in_: int, out_l: int, style: str, seed: int) -> dict[str, Tensor]:
    """LoKr tensors for an (out, in) weight, W1 (out_l, 4); alphas give scales other than 1."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    out_k, in_m = out // out_l, 4
    in_n = in_ // in_m
    f: dict[str, Tensor] = {}
    if style == "both low-rank":
        f.update(lokr_w1_a=r(out_l, 1), lokr_w1_b=r(1, in_m), lokr_w2_a=r(out_k, 2), lokr_w2_b=r(2, in_n),
                 alpha=torch.tensor(3.0))
    elif style == "both full":
        f.update(lokr_w1=r(out_l, in_m), lokr_w2=r(out_k, in_n), alpha=torch.tensor(5.0))  # alpha ignored
    else:
        f.update(lokr_w1=r(out_l, in_m), lokr_w2_a=r(out_k, 2), lokr_w2_b=r(2, in_n))
        if style != "no alpha":
            f["alpha"] = torch.tensor(3.0)
    return f


def original_file(model: nn.Module, family: str, layout: str, style: str = "w2 low-rank", aligned: bool = True,
                  seed: int = 0) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(state dict in an original layout, {original: its tensors}) for every module of ORIGINALS[family]."""
    modules: dict[str, dict[str, Tensor]] = {}
    names = dict(model.named_modules())
    for i, (original, blocks) in enumerate(ORIGINALS[family].items()):
        if any(p not in names for p, _, _ in blocks):
            continue  # a tiny model without that module (SD3 without dual attention)
        out, in_ = shape_of(model, blocks)
        modules[original] = make_factors(out, in_, out_l_for(model, blocks, aligned), style, seed + i)
    sd = {f"{name_in(ORIGINAL_LAYOUTS[layout], o)}.{k}": v for o, t in modules.items() for k, v in t.items()}
    return sd, modules


def comfyui_model(model: nn.Module, family: str, modules: dict[str, dict[str, Tensor]],
                  strength: float = 1.0) -> nn.Module:
    """A copy of `model` with ComfyUI's rule applied to each original module's weight (fp32 factors)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for original, tensors in modules.items():
            rows = rows_of(ref, ORIGINALS[family][original])
            new = fused_consumer_weights([m.weight[a:b].clone() for m, a, b in rows],
                                         {k: v.float() for k, v in tensors.items()}, strength)
            for (m, a, b), w in zip(rows, new, strict=True):
                m.weight[a:b] = w
    return ref


def per_module_model(model: nn.Module, modules: dict[str, dict[str, Tensor]], strength: float = 1.0) -> nn.Module:
    """A copy of `model` with ComfyUI's rule applied module by module ({diffusers path: tensors})."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path, tensors in modules.items():
            m = ref.get_submodule(path)
            m.weight.copy_(consumer_weight(m.weight, {k: v.float() for k, v in tensors.items()}, strength))
    return ref


def assert_close(got: Tensor, want: Tensor, rel: float = 1e-5) -> None:
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < rel, f"relative error {err:.2e}"


def flux_with_row_pieces(seed: int = 0, dora: bool = False) -> Any:
    """A tiny Flux.1 pipeline holding adapter "a" from a kohya file: fused originals as row pieces (DoRA on a qkv
    and on a linear1 with `dora`)."""
    pipe = bare_pipeline("flux")
    sd, _ = original_file(pipe.transformer, "flux", "kohya", aligned=False, seed=seed)
    if dora:
        sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.rand(48, 1) + 0.5
        sd["lora_unet_single_blocks_0_linear1.dora_scale"] = torch.rand(1, 16) + 0.5
    pipe.load_lokr_weights(sd, adapter_name="a")
    return pipe
