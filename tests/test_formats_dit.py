"""lokr_diffusers.formats.dit: every Linear of the full-size DiT transformers named in every layout, and
the original (BFL / Stability / Tongyi) row order held to diffusers' own single-file converters.

Oracles: the expected names and row ranges below are written by hand from the converters' and
ComfyUI's facts (sources named in lokr_diffusers/families/), the fused sizes from the configs; the converters
themselves (convert_*_checkpoint_to_diffusers) split what our map concatenates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from diffusers import (
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import (
    convert_chroma_transformer_checkpoint_to_diffusers,
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_hidream_transformer_to_diffusers,
    convert_hunyuan_video_transformer_to_diffusers,
    convert_ltx2_transformer_to_diffusers,
    convert_ltx_transformer_checkpoint_to_diffusers,
    convert_lumina2_to_diffusers,
    convert_qwen_image21_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
    convert_wan_transformer_to_diffusers,
    convert_z_image_transformer_checkpoint_to_diffusers,
)
from helpers.dit_models import tiny
from helpers.fullsize_dit import FULL, meta_transformer
from helpers.hunyuanvideo15_oracle import convert_hyvideo15_linears
from torch import Tensor, nn

from lokr_diffusers.formats.dit import LAYOUTS, DitNameMap, dit_name_map

Converter = Callable[..., dict[str, Tensor]]


def _lumina2(checkpoint: dict[str, Tensor]) -> dict[str, Tensor]:
    """convert_lumina2_to_diffusers on a checkpoint without ComfyUI's `model.diffusion_model.` prefix: diffusers
    0.42.1 lists the keys before stripping it and then pops the stale ones (a KeyError on prefixed files)."""
    for key in [k for k in checkpoint if k.startswith("model.diffusion_model.")]:  # in place: the converter pops
        checkpoint[key.removeprefix("model.diffusion_model.")] = checkpoint.pop(key)
    return convert_lumina2_to_diffusers(checkpoint)


CONVERTERS: dict[type[nn.Module], Converter] = {
    FluxTransformer2DModel: convert_flux_transformer_checkpoint_to_diffusers,
    SD3Transformer2DModel: convert_sd3_transformer_checkpoint_to_diffusers,
    Flux2Transformer2DModel: convert_flux2_transformer_checkpoint_to_diffusers,
    ZImageTransformer2DModel: convert_z_image_transformer_checkpoint_to_diffusers,
    WanTransformer3DModel: convert_wan_transformer_to_diffusers,
    LTXVideoTransformer3DModel: convert_ltx_transformer_checkpoint_to_diffusers,
    LTX2VideoTransformer3DModel: convert_ltx2_transformer_to_diffusers,
    # Qwen-Image's converter is the lambda diffusers registers for the class (the identity); the others are named
    QwenImageTransformer2DModel: SINGLE_FILE_LOADABLE_CLASSES["QwenImageTransformer2DModel"]["checkpoint_mapping_fn"],
    QwenImage21Transformer2DModel: convert_qwen_image21_transformer_checkpoint_to_diffusers,
    HiDreamImageTransformer2DModel: convert_hidream_transformer_to_diffusers,
    ChromaTransformer2DModel: convert_chroma_transformer_checkpoint_to_diffusers,
    Lumina2Transformer2DModel: _lumina2,
    HunyuanVideoTransformer3DModel: convert_hunyuan_video_transformer_to_diffusers,
    # no diffusers converter: the hand table of diffusers' repository script (tests/helpers/hunyuanvideo15_oracle.py)
    HunyuanVideo15Transformer3DModel: convert_hyvideo15_linears,
}
POPPING = (FluxTransformer2DModel, SD3Transformer2DModel, ChromaTransformer2DModel, Lumina2Transformer2DModel)


@functools.cache
def name_map(name: str) -> DitNameMap:
    return dit_name_map(meta_transformer(name))


def linear_paths(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def hidden(model: nn.Module) -> int:
    c = model.config
    for key in ("dim", "hidden_size"):  # Z-Image, Lumina 2
        if key in c:
            return int(c[key])
    return int(c["num_attention_heads"] * c["attention_head_dim"])


# (a) ------------------------------------------------------------------------------------------------

# Original modules per model, counted by hand from the tables of the converters:
# Flux.1: 10 top (img_in, txt_in, time_in x2, vector_in x2, guidance_in x2, final_layer x2; schnell has
# no guidance_in), 10 per double block, 3 per single block. SD3.5: 7 top, 10 per block, 7 in the
# last (context pre-only: no context proj / mlp), 2 more (attn2 qkv, proj) per dual-attention block.
# Flux.2 Klein: 9 top (img_in, txt_in, time_in x2, 3 global modulations, final_layer x2), 8 per
# double, 2 per single block. Z-Image: 6 top, 6 per layer and noise refiner, 5 per context refiner.
# LTX-Video: 7 top (patchify_proj, adaln_single's 3, caption_projection's 2, proj_out), 10 per block (attn1 and attn2
# to_q/k/v/out.0, ff's 2). LTX-2: 26 top (2 patchify projections, 6 adaLN-singles of 3 (video, audio, the 4 av_ca_
# ones; LTX-2.0 has no prompt_adaln_single), 2 caption projections of 2, 2 output projections), 28 per block (6
# attentions of 4: attn1, attn2, audio_attn1, audio_attn2, audio_to_video_attn, video_to_audio_attn; ff, audio_ff).
# Chroma: 5 top (img_in, txt_in, final_layer.linear, the approximator's in_proj / out_proj), 2 per approximator
# layer, 8 per double block (FLUX.1's less img_mod / txt_mod), 2 per single block (no modulation). Lumina 2: 6 top
# (x_embedder, t_embedder x2, cap_embedder.1, final_layer x2), 6 per layer and noise refiner, 5 per context refiner.
ORIGINAL_COUNTS = {
    "flux1-dev": 10 + 10 * 19 + 3 * 38,
    "flux1-schnell": 8 + 10 * 19 + 3 * 38,
    "sd35-medium": 7 + 10 * 23 + 7 + 2 * 13,
    "sd35-large": 7 + 10 * 37 + 7,
    "flux2-klein-4b": 9 + 8 * 5 + 2 * 20,
    "flux2-klein-9b": 9 + 8 * 8 + 2 * 24,
    "zimage-turbo": 6 + 6 * 30 + 6 * 2 + 5 * 2,
    # Wan: 6 top (text_embedding x2, time_embedding x2, time_projection, head), 10 per block (self / cross attention
    # q, k, v, o, ffn x2); I2V adds img_emb x2 and the image keys / values (k_img, v_img) of each block.
    "wan2.1-t2v-14b": 6 + 10 * 40,
    "wan2.1-i2v-14b": 8 + 12 * 40,
    "wan2.1-t2v-1.3b": 6 + 10 * 30,
    "wan2.2-ti2v-5b": 6 + 10 * 30,
    "ltx-video-2b": 7 + 10 * 28,
    "ltx-video-13b": 7 + 10 * 48,
    "ltx-2": 26 + 28 * 48,
    # Qwen-Image: 6 top (time_text_embed linear_1/2, img_in, txt_in, norm_out.linear, proj_out), 14 per block
    # (img_mod.1, txt_mod.1, to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, img/txt_mlp net.0.proj and net.2).
    "qwen-image": 6 + 14 * 60,
    # Qwen-Image 2.1: 8 top (time_text_embed x2, img_in, txt_in in/out_layer, modulation.1, norm_out.linear,
    # proj_out), 6 per block (to_q/k/v, to_out.0, img_mlp.gate_up = gate_layer + proj, img_mlp.out).
    "qwen-image-2.1": 8 + 6 * 32,
    # HiDream-I1: 56 top (t_embedder x2, p_embedder x2, x_embedder.proj, 16 + 32 + 1 caption projections,
    # final_layer linear + adaLN), 27 per double block (adaLN, 8 attention, 3 shared + 4 x 3 routed experts, ff_t x3),
    # 20 per single block (adaLN, 4 attention, 15 experts).
    "hidream-i1": 56 + 27 * 16 + 20 * 32,
    "chroma1-hd": 5 + 2 * 5 + 8 * 19 + 2 * 38,
    "lumina-image-2": 6 + 6 * 26 + 6 * 2 + 5 * 2,
    # HunyuanVideo: 13 top (time_in x2, vector_in x2, guidance_in x2, txt_in's input / t / c embedders x5,
    # final_layer x2), 5 per refiner block, 10 per double, 3 per single block. 1.5: 14 top (time_in x2, txt_in x5,
    # byt5_in x3, vision_in x2, final_layer x2), 5 per refiner block, 14 per double block (q, k, v apart).
    "hunyuanvideo": 13 + 5 * 2 + 10 * 20 + 3 * 40,
    "hunyuanvideo-1.5": 14 + 5 * 2 + 14 * 54,
}


@pytest.mark.parametrize("name", FULL)
def test_every_linear_has_a_name_in_every_layout(name: str) -> None:
    model, nm = meta_transformer(name), name_map(name)
    assert len(nm.originals) == ORIGINAL_COUNTS[name]
    assert not nm.ambiguous
    linears = linear_paths(model)
    assert set(nm.linears) == set(linears)
    for path in linears:
        forms = nm.names_of(path)
        assert set(forms) == set(LAYOUTS), path
        for layout, module_name in forms.items():
            found = nm.lookup(module_name)
            assert found is not None, (layout, module_name)
            assert path in {p.path for p in found[1].pieces}, (layout, module_name, found)


# (layout name, expected target name, [(diffusers path, start, stop, src_start)]) per model, by hand
# from the converters (row sizes from the configs: Flux.1 3072, Klein 4B 3072, 9B 4096, SD3.5-medium
# 1536, large 2432, Z-Image 3840); None: the name must not resolve.
Expected = tuple[str, str | None, list[tuple[str, int, int, int]]]
SPOT: dict[str, list[Expected]] = {
    "flux1-dev": [
        ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", [
            ("transformer_blocks.0.attn.to_q", 0, 3072, 0), ("transformer_blocks.0.attn.to_k", 3072, 6144, 0),
            ("transformer_blocks.0.attn.to_v", 6144, 9216, 0)]),
        ("diffusion_model.double_blocks.18.txt_attn.qkv", "double_blocks.18.txt_attn.qkv", [
            ("transformer_blocks.18.attn.add_q_proj", 0, 3072, 0),
            ("transformer_blocks.18.attn.add_k_proj", 3072, 6144, 0),
            ("transformer_blocks.18.attn.add_v_proj", 6144, 9216, 0)]),
        ("diffusion_model.single_blocks.37.linear1", "single_blocks.37.linear1", [
            ("single_transformer_blocks.37.attn.to_q", 0, 3072, 0),
            ("single_transformer_blocks.37.attn.to_k", 3072, 6144, 0),
            ("single_transformer_blocks.37.attn.to_v", 6144, 9216, 0),
            ("single_transformer_blocks.37.proj_mlp", 9216, 21504, 0)]),
        ("lora_unet_single_blocks_0_linear2", "single_blocks.0.linear2",
         [("single_transformer_blocks.0.proj_out", 0, 3072, 0)]),
        # ComfyUI's own key for rows [0, 3 · hidden) of linear1 (comfy/lora.py model_lora_keys_unet); not kohya's
        ("diffusion_model.single_blocks.37.linear1_qkv", "single_blocks.37.linear1_qkv", [
            ("single_transformer_blocks.37.attn.to_q", 0, 3072, 0),
            ("single_transformer_blocks.37.attn.to_k", 3072, 6144, 0),
            ("single_transformer_blocks.37.attn.to_v", 6144, 9216, 0)]),
        ("lora_unet_single_blocks_0_linear1_qkv", None, []),
        ("lora_unet_single_blocks_5_modulation_lin", "single_blocks.5.modulation.lin",
         [("single_transformer_blocks.5.norm.linear", 0, 9216, 0)]),
        ("lora_unet_double_blocks_3_img_mod_lin", "double_blocks.3.img_mod.lin",
         [("transformer_blocks.3.norm1.linear", 0, 18432, 0)]),
        ("diffusion_model.double_blocks.3.txt_mlp.2", "double_blocks.3.txt_mlp.2",
         [("transformer_blocks.3.ff_context.net.2", 0, 3072, 0)]),
        ("lora_unet_final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1",
         [("norm_out.linear", 0, 3072, 3072), ("norm_out.linear", 3072, 6144, 0)]),
        ("lora_unet_guidance_in_out_layer", "guidance_in.out_layer",
         [("time_text_embed.guidance_embedder.linear_2", 0, 3072, 0)]),
        ("lora_unet_vector_in_in_layer", "vector_in.in_layer",
         [("time_text_embed.text_embedder.linear_1", 0, 3072, 0)]),
        ("diffusion_model.img_in", "img_in", [("x_embedder", 0, 3072, 0)]),
        ("transformer.single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_mlp",
         [("single_transformer_blocks.0.proj_mlp", 0, 12288, 0)]),
        ("lycoris_transformer_blocks_18_attn_add_q_proj", "transformer_blocks.18.attn.add_q_proj",
         [("transformer_blocks.18.attn.add_q_proj", 0, 3072, 0)]),
        ("diffusion_model.transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff.net.2",
         [("transformer_blocks.0.ff.net.2", 0, 3072, 0)]),
        ("transformer.norm_out.linear", "norm_out.linear", [("norm_out.linear", 0, 6144, 0)]),
        ("lora_unet_double_blocks_19_img_attn_qkv", None, []),
    ],
    "flux1-schnell": [("lora_unet_guidance_in_in_layer", None, []),
                      ("lora_unet_time_in_in_layer", "time_in.in_layer",
                       [("time_text_embed.timestep_embedder.linear_1", 0, 3072, 0)])],
    "sd35-medium": [
        ("lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv", [
            ("transformer_blocks.0.attn.to_q", 0, 1536, 0), ("transformer_blocks.0.attn.to_k", 1536, 3072, 0),
            ("transformer_blocks.0.attn.to_v", 3072, 4608, 0)]),
        ("lora_unet_joint_blocks_12_x_block_attn2_qkv", "joint_blocks.12.x_block.attn2.qkv", [
            ("transformer_blocks.12.attn2.to_q", 0, 1536, 0), ("transformer_blocks.12.attn2.to_k", 1536, 3072, 0),
            ("transformer_blocks.12.attn2.to_v", 3072, 4608, 0)]),
        ("diffusion_model.joint_blocks.12.x_block.adaLN_modulation.1", "joint_blocks.12.x_block.adaLN_modulation.1",
         [("transformer_blocks.12.norm1.linear", 0, 9 * 1536, 0)]),
        ("lora_unet_joint_blocks_13_x_block_attn2_qkv", None, []),
        ("diffusion_model.joint_blocks.22.context_block.adaLN_modulation.1",
         "joint_blocks.22.context_block.adaLN_modulation.1",
         [("transformer_blocks.22.norm1_context.linear", 0, 6 * 1536, 0)]),
        ("diffusion_model.joint_blocks.23.context_block.adaLN_modulation.1",
         "joint_blocks.23.context_block.adaLN_modulation.1",
         [("transformer_blocks.23.norm1_context.linear", 0, 1536, 1536),
          ("transformer_blocks.23.norm1_context.linear", 1536, 3072, 0)]),
        ("diffusion_model.joint_blocks.23.context_block.attn.proj", None, []),
        ("lora_unet_joint_blocks_23_context_block_mlp_fc1", None, []),
        ("lora_unet_joint_blocks_23_context_block_attn_qkv", "joint_blocks.23.context_block.attn.qkv", [
            ("transformer_blocks.23.attn.add_q_proj", 0, 1536, 0),
            ("transformer_blocks.23.attn.add_k_proj", 1536, 3072, 0),
            ("transformer_blocks.23.attn.add_v_proj", 3072, 4608, 0)]),
        ("lora_unet_joint_blocks_4_context_block_mlp_fc2", "joint_blocks.4.context_block.mlp.fc2",
         [("transformer_blocks.4.ff_context.net.2", 0, 1536, 0)]),
        ("lora_unet_y_embedder_mlp_0", "y_embedder.mlp.0", [("time_text_embed.text_embedder.linear_1", 0, 1536, 0)]),
        ("lora_unet_t_embedder_mlp_2", "t_embedder.mlp.2",
         [("time_text_embed.timestep_embedder.linear_2", 0, 1536, 0)]),
        ("diffusion_model.context_embedder", "context_embedder", [("context_embedder", 0, 1536, 0)]),
        ("lora_unet_final_layer_linear", "final_layer.linear", [("proj_out", 0, 64, 0)]),
    ],
    "sd35-large": [
        ("lora_unet_joint_blocks_37_x_block_mlp_fc2", "joint_blocks.37.x_block.mlp.fc2",
         [("transformer_blocks.37.ff.net.2", 0, 2432, 0)]),
        ("diffusion_model.joint_blocks.0.x_block.attn.proj", "joint_blocks.0.x_block.attn.proj",
         [("transformer_blocks.0.attn.to_out.0", 0, 2432, 0)]),
        ("lora_unet_joint_blocks_0_x_block_attn2_qkv", None, []),
    ],
    "flux2-klein-4b": [
        ("diffusion_model.single_blocks.19.linear1", "single_blocks.19.linear1",
         [("single_transformer_blocks.19.attn.to_qkv_mlp_proj", 0, 9 * 3072, 0)]),
        ("lora_unet_single_blocks_0_linear2", "single_blocks.0.linear2",
         [("single_transformer_blocks.0.attn.to_out", 0, 3072, 0)]),
        ("diffusion_model.double_stream_modulation_img.lin", "double_stream_modulation_img.lin",
         [("double_stream_modulation_img.linear", 0, 6 * 3072, 0)]),
        ("diffusion_model.single_stream_modulation.lin", "single_stream_modulation.lin",
         [("single_stream_modulation.linear", 0, 3 * 3072, 0)]),
        ("diffusion_model.double_blocks.4.img_mlp.0", "double_blocks.4.img_mlp.0",
         [("transformer_blocks.4.ff.linear_in", 0, 6 * 3072, 0)]),
        ("lora_unet_time_in_out_layer", "time_in.out_layer",
         [("time_guidance_embed.timestep_embedder.linear_2", 0, 3072, 0)]),
        ("diffusion_model.final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
         [("norm_out.linear", 0, 3072, 3072), ("norm_out.linear", 3072, 6144, 0)]),
        ("lora_unet_guidance_in_in_layer", None, []),
        ("lora_unet_double_blocks_3_img_mod_lin", None, []),
    ],
    "flux2-klein-9b": [
        ("lora_unet_double_blocks_7_txt_attn_qkv", "double_blocks.7.txt_attn.qkv", [
            ("transformer_blocks.7.attn.add_q_proj", 0, 4096, 0),
            ("transformer_blocks.7.attn.add_k_proj", 4096, 8192, 0),
            ("transformer_blocks.7.attn.add_v_proj", 8192, 12288, 0)]),
        ("diffusion_model.txt_in", "txt_in", [("context_embedder", 0, 4096, 0)]),
    ],
    "zimage-turbo": [
        ("diffusion_model.layers.29.attention.qkv", "layers.29.attention.qkv", [
            ("layers.29.attention.to_q", 0, 3840, 0), ("layers.29.attention.to_k", 3840, 7680, 0),
            ("layers.29.attention.to_v", 7680, 11520, 0)]),
        ("lora_unet_noise_refiner_1_attention_qkv", "noise_refiner.1.attention.qkv", [
            ("noise_refiner.1.attention.to_q", 0, 3840, 0), ("noise_refiner.1.attention.to_k", 3840, 7680, 0),
            ("noise_refiner.1.attention.to_v", 7680, 11520, 0)]),
        ("diffusion_model.layers.0.attention.out", "layers.0.attention.out",
         [("layers.0.attention.to_out.0", 0, 3840, 0)]),
        ("diffusion_model.x_embedder", "x_embedder", [("all_x_embedder.2-1", 0, 3840, 0)]),
        ("lora_unet_final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1",
         [("all_final_layer.2-1.adaLN_modulation.1", 0, 3840, 0)]),
        ("lora_unet_context_refiner_1_feed_forward_w2", "context_refiner.1.feed_forward.w2",
         [("context_refiner.1.feed_forward.w2", 0, 3840, 0)]),
        ("diffusion_model.layers.3.adaLN_modulation.0", "layers.3.adaLN_modulation.0",
         [("layers.3.adaLN_modulation.0", 0, 4 * 3840, 0)]),
        ("diffusion_model.context_refiner.0.adaLN_modulation.0", None, []),
        ("diffusion_model.all_x_embedder.2-1", "all_x_embedder.2-1", [("all_x_embedder.2-1", 0, 3840, 0)]),
        ("lycoris_all_final_layer_2-1_linear", "all_final_layer.2-1.linear",
         [("all_final_layer.2-1.linear", 0, 64, 0)]),
        ("transformer.cap_embedder.1", "cap_embedder.1", [("cap_embedder.1", 0, 3840, 0)]),
        ("lora_unet_cap_embedder_1", "cap_embedder.1", [("cap_embedder.1", 0, 3840, 0)]),
    ],
    # LTX-Video 2B: dim 2048 (32 x 64), adaLN-single 6 x dim, MLP 4 x dim; 13B: dim 4096
    "ltx-video-2b": [
        ("diffusion_model.patchify_proj", "patchify_proj", [("proj_in", 0, 2048, 0)]),
        ("lora_unet_adaln_single_linear", "adaln_single.linear", [("time_embed.linear", 0, 6 * 2048, 0)]),
        ("diffusion_model.adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1",
         [("time_embed.emb.timestep_embedder.linear_1", 0, 2048, 0)]),
        ("diffusion_model.transformer_blocks.27.attn2.to_k", "transformer_blocks.27.attn2.to_k",
         [("transformer_blocks.27.attn2.to_k", 0, 2048, 0)]),
        ("lora_unet_transformer_blocks_0_ff_net_0_proj", "transformer_blocks.0.ff.net.0.proj",
         [("transformer_blocks.0.ff.net.0.proj", 0, 4 * 2048, 0)]),
        ("diffusion_model.caption_projection.linear_1", "caption_projection.linear_1",
         [("caption_projection.linear_1", 0, 2048, 0)]),
        ("lora_unet_proj_out", "proj_out", [("proj_out", 0, 128, 0)]),
        ("diffusion_model.proj_in", "proj_in", [("proj_in", 0, 2048, 0)]),  # ai-toolkit's diffusers path
        ("lycoris_time_embed_linear", "time_embed.linear", [("time_embed.linear", 0, 6 * 2048, 0)]),
        ("lora_unet_transformer_blocks_28_attn1_to_q", None, []),
        ("lora_unet_time_embed_linear", None, []),  # kohya names the original (adaln_single)
    ],
    "ltx-video-13b": [
        ("diffusion_model.transformer_blocks.47.attn1.to_out.0", "transformer_blocks.47.attn1.to_out.0",
         [("transformer_blocks.47.attn1.to_out.0", 0, 4096, 0)]),
        ("diffusion_model.adaln_single.linear", "adaln_single.linear", [("time_embed.linear", 0, 6 * 4096, 0)]),
    ],
    # LTX-2: video dim 4096 (32 x 128), audio 2048 (32 x 64); adaLN-singles 6 x dim, the av_ca_ scale-shift ones
    # 4 x dim, the gates 1 x dim
    "ltx-2": [
        ("diffusion_model.audio_patchify_proj", "audio_patchify_proj", [("audio_proj_in", 0, 2048, 0)]),
        ("lora_unet_audio_adaln_single_linear", "audio_adaln_single.linear",
         [("audio_time_embed.linear", 0, 6 * 2048, 0)]),
        ("diffusion_model.av_ca_video_scale_shift_adaln_single.linear", "av_ca_video_scale_shift_adaln_single.linear",
         [("av_cross_attn_video_scale_shift.linear", 0, 4 * 4096, 0)]),
        ("diffusion_model.av_ca_a2v_gate_adaln_single.linear", "av_ca_a2v_gate_adaln_single.linear",
         [("av_cross_attn_video_a2v_gate.linear", 0, 4096, 0)]),
        ("lora_unet_av_ca_audio_scale_shift_adaln_single_emb_timestep_embedder_linear_2",
         "av_ca_audio_scale_shift_adaln_single.emb.timestep_embedder.linear_2",
         [("av_cross_attn_audio_scale_shift.emb.timestep_embedder.linear_2", 0, 2048, 0)]),
        ("diffusion_model.av_ca_v2a_gate_adaln_single.linear", "av_ca_v2a_gate_adaln_single.linear",
         [("av_cross_attn_audio_v2a_gate.linear", 0, 2048, 0)]),
        ("diffusion_model.transformer_blocks.47.audio_to_video_attn.to_out.0",
         "transformer_blocks.47.audio_to_video_attn.to_out.0",
         [("transformer_blocks.47.audio_to_video_attn.to_out.0", 0, 4096, 0)]),
        ("lora_unet_transformer_blocks_3_video_to_audio_attn_to_k", "transformer_blocks.3.video_to_audio_attn.to_k",
         [("transformer_blocks.3.video_to_audio_attn.to_k", 0, 2048, 0)]),
        ("diffusion_model.transformer_blocks.0.audio_ff.net.2", "transformer_blocks.0.audio_ff.net.2",
         [("transformer_blocks.0.audio_ff.net.2", 0, 2048, 0)]),
        ("diffusion_model.audio_caption_projection.linear_2", "audio_caption_projection.linear_2",
         [("audio_caption_projection.linear_2", 0, 2048, 0)]),
        ("transformer.av_cross_attn_audio_v2a_gate.linear", "av_cross_attn_audio_v2a_gate.linear",
         [("av_cross_attn_audio_v2a_gate.linear", 0, 2048, 0)]),
        ("diffusion_model.prompt_adaln_single.linear", None, []),  # LTX-2.3's; LTX-2.0 has none
        ("diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q", None, []),
    ],
    "qwen-image": [  # dim 3072 (24 x 128); the original names are the diffusers paths
        ("diffusion_model.transformer_blocks.59.attn.add_q_proj", "transformer_blocks.59.attn.add_q_proj",
         [("transformer_blocks.59.attn.add_q_proj", 0, 3072, 0)]),
        ("lora_unet_transformer_blocks_0_img_mod_1", "transformer_blocks.0.img_mod.1",
         [("transformer_blocks.0.img_mod.1", 0, 6 * 3072, 0)]),
        ("lycoris_transformer_blocks_3_txt_mlp_net_0_proj", "transformer_blocks.3.txt_mlp.net.0.proj",
         [("transformer_blocks.3.txt_mlp.net.0.proj", 0, 4 * 3072, 0)]),
        ("transformer.norm_out.linear", "norm_out.linear", [("norm_out.linear", 0, 2 * 3072, 0)]),
        ("diffusion_model.txt_in", "txt_in", [("txt_in", 0, 3072, 0)]),
        ("lora_unet_transformer_blocks_60_attn_to_q", None, []),
    ],
    "qwen-image-2.1": [  # dim 4096 (32 x 128), SwiGLU 3 x 4096 = 12288 rows per half
        ("diffusion_model.transformer_blocks.31.img_mlp.gate_up", "transformer_blocks.31.img_mlp.gate_up", [
            ("transformer_blocks.31.img_mlp.gate_layer", 0, 12288, 0),
            ("transformer_blocks.31.img_mlp.proj", 12288, 24576, 0)]),
        ("lora_unet_transformer_blocks_0_img_mlp_gate_up", "transformer_blocks.0.img_mlp.gate_up", [
            ("transformer_blocks.0.img_mlp.gate_layer", 0, 12288, 0),
            ("transformer_blocks.0.img_mlp.proj", 12288, 24576, 0)]),
        ("transformer.transformer_blocks.0.img_mlp.proj", "transformer_blocks.0.img_mlp.proj",
         [("transformer_blocks.0.img_mlp.proj", 0, 12288, 0)]),
        ("lycoris_transformer_blocks_2_img_mlp_gate_layer", "transformer_blocks.2.img_mlp.gate_layer",
         [("transformer_blocks.2.img_mlp.gate_layer", 0, 12288, 0)]),
        ("diffusion_model.transformer_blocks.5.img_mlp.out", "transformer_blocks.5.img_mlp.out",
         [("transformer_blocks.5.img_mlp.out", 0, 4096, 0)]),
        ("lora_unet_modulation_1", "modulation.1", [("modulation.1", 0, 4 * 4096, 0)]),
        ("diffusion_model.txt_in.in_layer", "txt_in.in_layer", [("txt_in.in_layer", 0, 4096, 0)]),
    ],
    "hidream-i1": [  # dim 2560 (20 x 128), experts' hidden 4 · dim · 2/3 rounded to 256: 6912
        ("diffusion_model.double_stream_blocks.15.block.attn1.to_out_t", "double_stream_blocks.15.block.attn1.to_out_t",
         [("double_stream_blocks.15.block.attn1.to_out_t", 0, 2560, 0)]),
        ("lora_unet_double_stream_blocks_0_block_adaLN_modulation_1", "double_stream_blocks.0.block.adaLN_modulation.1",
         [("double_stream_blocks.0.block.adaLN_modulation.1", 0, 12 * 2560, 0)]),
        ("lycoris_single_stream_blocks_31_block_ff_i_experts_3_w2", "single_stream_blocks.31.block.ff_i.experts.3.w2",
         [("single_stream_blocks.31.block.ff_i.experts.3.w2", 0, 2560, 0)]),
        ("diffusion_model.caption_projection.48.linear", "caption_projection.48.linear",
         [("caption_projection.48.linear", 0, 2560, 0)]),
        ("diffusion_model.caption_projection.49.linear", None, []),
        ("diffusion_model.single_stream_blocks.0.block.attn1.to_q_t", None, []),
        ("diffusion_model.double_stream_blocks.0.block.attn1.to_out.0", None, []),
        ("transformer.final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
         [("final_layer.adaLN_modulation.1", 0, 2 * 2560, 0)]),
    ],
    # Chroma1-HD: FLUX.1's blocks at 3072 (linear1: q, k, v, MLP 4 x 3072), no modulations, approximator 5120 wide
    "chroma1-hd": [
        ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", [
            ("transformer_blocks.0.attn.to_q", 0, 3072, 0), ("transformer_blocks.0.attn.to_k", 3072, 6144, 0),
            ("transformer_blocks.0.attn.to_v", 6144, 9216, 0)]),
        ("diffusion_model.single_blocks.37.linear1", "single_blocks.37.linear1", [
            ("single_transformer_blocks.37.attn.to_q", 0, 3072, 0),
            ("single_transformer_blocks.37.attn.to_k", 3072, 6144, 0),
            ("single_transformer_blocks.37.attn.to_v", 6144, 9216, 0),
            ("single_transformer_blocks.37.proj_mlp", 9216, 21504, 0)]),
        ("diffusion_model.single_blocks.37.linear1_qkv", "single_blocks.37.linear1_qkv", [
            ("single_transformer_blocks.37.attn.to_q", 0, 3072, 0),
            ("single_transformer_blocks.37.attn.to_k", 3072, 6144, 0),
            ("single_transformer_blocks.37.attn.to_v", 6144, 9216, 0)]),
        ("lora_unet_single_blocks_0_linear1_qkv", None, []),
        ("diffusion_model.double_blocks.18.txt_mlp.2", "double_blocks.18.txt_mlp.2",
         [("transformer_blocks.18.ff_context.net.2", 0, 3072, 0)]),
        ("diffusion_model.distilled_guidance_layer.layers.4.in_layer", "distilled_guidance_layer.layers.4.in_layer",
         [("distilled_guidance_layer.layers.4.linear_1", 0, 5120, 0)]),
        ("lora_unet_distilled_guidance_layer_out_proj", "distilled_guidance_layer.out_proj",
         [("distilled_guidance_layer.out_proj", 0, 3072, 0)]),
        ("diffusion_model.distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj",
         [("distilled_guidance_layer.in_proj", 0, 5120, 0)]),
        ("lycoris_distilled_guidance_layer_layers_0_linear_2", "distilled_guidance_layer.layers.0.linear_2",
         [("distilled_guidance_layer.layers.0.linear_2", 0, 5120, 0)]),
        ("lora_unet_distilled_guidance_layer_layers_5_in_layer", None, []),
        ("lora_unet_txt_in", "txt_in", [("context_embedder", 0, 3072, 0)]),
        ("diffusion_model.final_layer.linear", "final_layer.linear", [("proj_out", 0, 64, 0)]),
        ("diffusion_model.final_layer.adaLN_modulation.1", None, []),
        ("lora_unet_double_blocks_3_img_mod_lin", None, []),
        ("lora_unet_single_blocks_5_modulation_lin", None, []),
        ("lora_unet_guidance_in_in_layer", None, []),
        ("transformer.single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_mlp",
         [("single_transformer_blocks.0.proj_mlp", 0, 12288, 0)]),
        ("transformer.transformer_blocks.0.attn.to_added_qkv", "double_blocks.0.txt_attn.qkv", [
            ("transformer_blocks.0.attn.add_q_proj", 0, 3072, 0),
            ("transformer_blocks.0.attn.add_k_proj", 3072, 6144, 0),
            ("transformer_blocks.0.attn.add_v_proj", 6144, 9216, 0)]),
    ],
    # Lumina-Image-2.0: hidden 2304, q 24 heads x 96 = 2304 rows, k and v 8 x 96 = 768; MLP 9216; the adaLN
    # projections read a 1024-wide time embedding (norm1.linear 4 x 2304 rows)
    "lumina-image-2": [
        ("diffusion_model.layers.25.attention.qkv", "layers.25.attention.qkv", [
            ("layers.25.attn.to_q", 0, 2304, 0), ("layers.25.attn.to_k", 2304, 3072, 0),
            ("layers.25.attn.to_v", 3072, 3840, 0)]),
        ("lora_unet_context_refiner_1_attention_qkv", "context_refiner.1.attention.qkv", [
            ("context_refiner.1.attn.to_q", 0, 2304, 0), ("context_refiner.1.attn.to_k", 2304, 3072, 0),
            ("context_refiner.1.attn.to_v", 3072, 3840, 0)]),
        ("diffusion_model.noise_refiner.1.attention.out", "noise_refiner.1.attention.out",
         [("noise_refiner.1.attn.to_out.0", 0, 2304, 0)]),
        ("diffusion_model.noise_refiner.1.adaLN_modulation.1", "noise_refiner.1.adaLN_modulation.1",
         [("noise_refiner.1.norm1.linear", 0, 9216, 0)]),
        ("lora_unet_layers_0_adaLN_modulation_1", "layers.0.adaLN_modulation.1",
         [("layers.0.norm1.linear", 0, 9216, 0)]),
        ("diffusion_model.context_refiner.0.adaLN_modulation.1", None, []),
        ("lora_unet_layers_0_feed_forward_w1", "layers.0.feed_forward.w1",
         [("layers.0.feed_forward.linear_1", 0, 9216, 0)]),
        ("diffusion_model.layers.3.feed_forward.w2", "layers.3.feed_forward.w2",
         [("layers.3.feed_forward.linear_2", 0, 2304, 0)]),
        ("diffusion_model.final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
         [("norm_out.linear_1", 0, 2304, 0)]),
        ("lora_unet_final_layer_linear", "final_layer.linear", [("norm_out.linear_2", 0, 64, 0)]),
        ("lora_unet_cap_embedder_1", "cap_embedder.1", [("time_caption_embed.caption_embedder.1", 0, 2304, 0)]),
        ("diffusion_model.t_embedder.mlp.2", "t_embedder.mlp.2",
         [("time_caption_embed.timestep_embedder.linear_2", 0, 1024, 0)]),
        ("diffusion_model.x_embedder", "x_embedder", [("x_embedder", 0, 2304, 0)]),
        ("transformer.layers.0.attn.to_k", "layers.0.attn.to_k", [("layers.0.attn.to_k", 0, 768, 0)]),
        ("lycoris_noise_refiner_0_feed_forward_linear_3", "noise_refiner.0.feed_forward.linear_3",
         [("noise_refiner.0.feed_forward.linear_3", 0, 9216, 0)]),
        ("transformer.layers.0.attn.to_qkv", None, []),  # no fuse_qkv_projections: no fused name
        ("diffusion_model.layers.0.attention.to_q", None, []),  # Z-Image's spelling, no Lumina 2 name
        ("diffusion_model.layers.26.attention.qkv", None, []),
    ],
}


@pytest.mark.parametrize(("name", "case"), [(n, c) for n, cases in SPOT.items() for c in cases],
                         ids=lambda v: v if isinstance(v, str) else v[0])
def test_spot_names(name: str, case: Expected) -> None:
    module_name, target_name, pieces = case
    found = name_map(name).lookup(module_name)
    if target_name is None:
        assert found is None
        return
    assert found is not None
    target = found[1]
    assert target.name == target_name
    assert [(p.path, p.start, p.stop, p.src_start) for p in target.pieces] == pieces
    assert target.is_rename == (len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][3] == 0)


# (b) ------------------------------------------------------------------------------------------------

def expected_rows(name: str, original: str, d: int) -> int | None:
    """Rows of an original module made of several pieces, from the config; None for a 1:1 rename."""
    if original.endswith(".qkv") and name.startswith("lumina"):
        c = FULL[name][1]
        return d + 2 * (d // c["num_attention_heads"]) * c["num_kv_heads"]  # q, then k and v of the kv heads
    if original.endswith((".qkv", "_attn_qkv")):  # HunyuanVideo: img_attn_qkv, txt_attn_qkv, self_attn_qkv
        return 3 * d
    if original.endswith(".img_mlp.gate_up"):
        return 2 * 3 * d  # Qwen-Image 2.1's SwiGLU gate and up rows, mlp_ratio 3
    if original.endswith(".linear1") and name.startswith(("flux1", "chroma", "hunyuanvideo")):
        return 3 * d + 4 * d  # q, k, v + the MLP's input (mlp_ratio 4)
    if original == "final_layer.adaLN_modulation.1" and not name.startswith(("zimage", "hidream", "lumina")):
        return 2 * d  # (shift, scale) swapped (HiDream's converter is the identity, Z-Image's and Lumina 2's give a
        # scale only)
    if original.endswith("context_block.adaLN_modulation.1") and original.startswith(f"joint_blocks.{_last(name)}."):
        return 2 * d
    return None


def _last(name: str) -> int:
    return int(FULL[name][1]["num_layers"]) - 1


@pytest.mark.parametrize("name", FULL)
def test_fused_pieces_cover_the_rows_once(name: str) -> None:
    model, nm = meta_transformer(name), name_map(name)
    linears, d = linear_paths(model), hidden(model)
    seen: set[str] = set()
    for original, target in nm.originals.items():
        rows = expected_rows(name, original, d)
        assert (len(target.pieces) > 1) == (rows is not None), original
        if rows is not None:
            assert target.out_features == rows, original
        start = 0
        own: dict[str, list[tuple[int, int]]] = {}
        for piece in target.pieces:
            assert piece.start == start and piece.stop > piece.start, (original, piece)
            start = piece.stop
            assert linears[piece.path].in_features == target.in_features, (original, piece)
            own.setdefault(piece.path, []).append((piece.src_start, piece.src_start + piece.rows))
        for path, spans in own.items():  # each diffusers Linear's rows, once each
            end = 0
            for a, b in sorted(spans):
                assert a == end, (original, path, spans)
                end = b
            assert end == linears[path].out_features, (original, path)
            assert path not in seen, f"{path} is in two originals"
            seen.add(path)
    assert seen == set(linears)


# (c) ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FULL)
def test_underscored_names_are_unique(name: str) -> None:
    nm = name_map(name)
    kohya = {"lora_unet_" + o.replace(".", "_") for o in nm.originals}
    lycoris = {"lycoris_" + p.replace(".", "_") for p in nm.linears}
    assert len(kohya) == len(nm.originals)
    assert len(lycoris) == len(nm.linears)
    assert all(nm.lookup(k) is not None for k in kohya | lycoris)


# (d) ------------------------------------------------------------------------------------------------

def required_extras(model: nn.Module) -> dict[str, Tensor]:
    """Non-Linear keys the pop-based converters (Flux.1, SD3, Chroma) insist on, under their original names
    (read off the converters); values are never compared."""
    c, z = model.config, torch.zeros(1)
    out: dict[str, Tensor] = {}
    if isinstance(model, ChromaTransformer2DModel):
        out.update({f"distilled_guidance_layer.norms.{k}.scale": z for k in range(c["approximator_layers"])})
    if isinstance(model, (FluxTransformer2DModel, ChromaTransformer2DModel)):
        for n in ("query_norm", "key_norm"):
            out.update({f"double_blocks.{i}.{s}.norm.{n}.scale": z for i in range(c["num_layers"])
                        for s in ("img_attn", "txt_attn")})
            out.update({f"single_blocks.{i}.norm.{n}.scale": z for i in range(c["num_single_layers"])})
    if isinstance(model, SD3Transformer2DModel):
        out.update({"pos_embed": z, "x_embedder.proj.weight": z, "x_embedder.proj.bias": z})
        if c["qk_norm"]:
            for i in range(c["num_layers"]):
                for where in ["x_block.attn", "context_block.attn"] + (
                        ["x_block.attn2"] if i in c["dual_attention_layers"] else []):
                    out.update({f"joint_blocks.{i}.{where}.{ln}.weight": z for ln in ("ln_q", "ln_k")})
    return out


def original_checkpoint(nm: DitNameMap, tensors: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The original-layout checkpoint the map describes: each original's weight (and bias) is the rows
    of its pieces' diffusers tensors, concatenated in the map's order."""
    ckpt: dict[str, Tensor] = {}
    for original, target in nm.originals.items():
        for suffix in tensors[target.pieces[0].path]:
            ckpt[f"{original}.{suffix}"] = torch.cat(
                [tensors[p.path][suffix][p.src_start:p.src_start + p.rows] for p in target.pieces])
    return ckpt


def check_converter_splits_back(model: nn.Module, tensors: dict[str, dict[str, Tensor]]) -> None:
    """diffusers' converter turns our original-layout checkpoint back into exactly `tensors`."""
    nm = dit_name_map(model)
    ckpt = {**original_checkpoint(nm, tensors), **required_extras(model)}
    given = set(ckpt)
    converted = CONVERTERS[type(model)](ckpt)
    for path, params in tensors.items():
        for suffix, value in params.items():
            key = f"{path}.{suffix}"
            assert key in converted, key
            assert torch.equal(converted[key], value), key
    model_keys = set(model.state_dict())
    assert set(converted) <= model_keys, sorted(set(converted) - model_keys)[:5]  # nothing left unrenamed
    if isinstance(model, POPPING):
        assert not ckpt, f"the converter did not use {sorted(ckpt)[:5]} of {len(given)} keys"


def fingerprints(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """One column per Linear parameter, each row a distinct number: (out, 1) weights, (out,) biases.
    The converters only cut and reorder rows, so the columns show where every row went (full size, KBs)."""
    out: dict[str, dict[str, Tensor]] = {}
    n = 0
    for path, m in linear_paths(model).items():
        out[path] = {"weight": torch.arange(n, n + m.out_features, dtype=torch.float64)[:, None]}
        n += m.out_features
        if m.bias is not None:
            out[path]["bias"] = torch.arange(n, n + m.out_features, dtype=torch.float64) + 0.5
            n += m.out_features
    return out


@pytest.mark.parametrize("name", FULL)
def test_full_size_rows_go_where_diffusers_converter_puts_them(name: str) -> None:
    model = meta_transformer(name)
    check_converter_splits_back(model, fingerprints(model))


@pytest.mark.parametrize("name", ["sd35-medium", "sd35-large"])
def test_sd3_patch_embedding_conv_is_where_diffusers_converter_puts_x_embedder(name: str) -> None:
    """The original x_embedder.proj (a Conv2d, so no Linear table row) is diffusers' pos_embed.proj: the converter
    moves the original's weight there, and the map names pos_embed.proj by it in the comfyui and kohya layouts."""
    model, nm = meta_transformer(name), name_map(name)
    marker = torch.arange(7, dtype=torch.float64)
    ckpt = {**original_checkpoint(nm, fingerprints(model)), **required_extras(model), "x_embedder.proj.weight": marker}
    assert torch.equal(CONVERTERS[type(model)](ckpt)["pos_embed.proj.weight"], marker)
    conv = model.get_submodule("pos_embed.proj")
    assert isinstance(conv, nn.Conv2d)
    for module_name in ("diffusion_model.x_embedder.proj", "lora_unet_x_embedder_proj"):
        found = nm.lookup(module_name)
        assert found is not None, module_name
        assert found[1].name == "x_embedder.proj" and found[1].is_rename
        assert [(p.path, p.start, p.stop) for p in found[1].pieces] == [("pos_embed.proj", 0, conv.out_channels)]


def weights(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    return {p: {k: v.detach() for k, v in m.named_parameters()} for p, m in linear_paths(model).items()}


@pytest.mark.parametrize("name", ["sd3", "flux2", "zimage", "ltxvideo", "ltx2", "qwenimage", "qwenimage21", "hidream"])
def test_tiny_fused_weights_split_back_by_diffusers_converter(name: str) -> None:
    model = tiny(name)
    check_converter_splits_back(model, weights(model))


def test_tiny_flux_fused_weights_follow_the_documented_order() -> None:
    """Flux.1 at d = 16: linear1 rows are q, k, v then the MLP input (4d), qkv rows q, k, v, and the final
    adaLN (shift, scale) is diffusers' (scale, shift) (ComfyUI flux_to_diffusers, diffusers' converter)."""
    model = tiny("flux")
    w = weights(model)
    ckpt = original_checkpoint(dit_name_map(model), w)
    s, d = "single_transformer_blocks.1.", 16
    linear1 = ckpt["single_blocks.1.linear1.weight"]
    assert linear1.shape == (7 * d, d)
    for i, part in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
        assert torch.equal(linear1[i * d:(i + 1) * d], w[s + part]["weight"])
    assert torch.equal(linear1[3 * d:], w[s + "proj_mlp"]["weight"])
    qkv = ckpt["double_blocks.0.txt_attn.qkv.bias"]
    assert torch.equal(qkv, torch.cat([w[f"transformer_blocks.0.attn.add_{x}_proj"]["bias"] for x in "qkv"]))
    scale, shift = w["norm_out.linear"]["weight"].chunk(2)
    assert torch.equal(ckpt["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def test_tiny_chroma_fused_weights_follow_the_documented_order() -> None:
    """Chroma at d = 16 (convert_chroma_transformer_checkpoint_to_diffusers hard-codes 3072: checked by hand here,
    on the full-size model above): linear1 rows are q, k, v then the MLP input (4d), qkv rows q, k, v; the
    approximator's layers are linear_1 / linear_2; no adaLN anywhere (nothing swapped)."""
    model = tiny("chroma")
    w = weights(model)
    ckpt = original_checkpoint(dit_name_map(model), w)
    s, d = "single_transformer_blocks.1.", 16
    linear1 = ckpt["single_blocks.1.linear1.weight"]
    assert linear1.shape == (7 * d, d)
    for i, part in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
        assert torch.equal(linear1[i * d:(i + 1) * d], w[s + part]["weight"])
    assert torch.equal(linear1[3 * d:], w[s + "proj_mlp"]["weight"])
    qkv = ckpt["double_blocks.1.img_attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([w[f"transformer_blocks.1.attn.to_{x}"]["weight"] for x in "qkv"]))
    assert torch.equal(ckpt["distilled_guidance_layer.layers.1.out_layer.bias"],
                       w["distilled_guidance_layer.layers.1.linear_2"]["bias"])
    assert torch.equal(ckpt["final_layer.linear.weight"], w["proj_out"]["weight"])
    assert not any("adaLN" in k or "_mod" in k or "modulation" in k for k in ckpt)
    assert len({k.rsplit(".", 1)[0] for k in ckpt}) == 5 + 2 * 2 + 8 * 2 + 2 * 2


def test_tiny_lumina2_qkv_rows_are_unequal() -> None:
    """Lumina 2 at hidden 24, 3 heads and 1 key / value head of 8 (convert_lumina2_to_diffusers hard-codes the
    full size's 2304 / 768 / 768: checked by hand here): attention.qkv is q (24 rows), k (8), v (8); a block's
    adaLN_modulation.1 is norm1.linear and the final one norm_out.linear_1, in their own row order (no swap);
    context_refiner blocks have no adaLN."""
    model = tiny("lumina2")
    w = weights(model)
    nm = dit_name_map(model)
    ckpt = original_checkpoint(nm, w)
    for b in ("layers.1", "noise_refiner.0", "context_refiner.0"):
        qkv = ckpt[f"{b}.attention.qkv.weight"]
        assert qkv.shape == (24 + 8 + 8, 24)
        assert torch.equal(qkv[:24], w[f"{b}.attn.to_q"]["weight"])
        assert torch.equal(qkv[24:32], w[f"{b}.attn.to_k"]["weight"])
        assert torch.equal(qkv[32:], w[f"{b}.attn.to_v"]["weight"])
    assert torch.equal(ckpt["noise_refiner.0.adaLN_modulation.1.weight"], w["noise_refiner.0.norm1.linear"]["weight"])
    assert torch.equal(ckpt["final_layer.adaLN_modulation.1.weight"], w["norm_out.linear_1"]["weight"])
    assert torch.equal(ckpt["final_layer.linear.bias"], w["norm_out.linear_2"]["bias"])
    assert "context_refiner.0.adaLN_modulation.1" not in nm.originals
    assert all(len(t.pieces) == 1 for o, t in nm.originals.items() if not o.endswith(".qkv"))


@pytest.mark.parametrize("name", ["flux", "sd3", "flux2", "chroma"])
def test_diffusers_fused_projections_map_one_to_one(name: str) -> None:
    """After fuse_qkv_projections() a qkv original is the fused Linear itself, whose weight diffusers built
    by concatenating to_q, to_k, to_v: the same rows our unfused map gives the original."""
    model = tiny(name)
    before = original_checkpoint(dit_name_map(model), weights(model))
    model.fuse_qkv_projections()  # type: ignore[operator]
    nm = dit_name_map(model)
    fused = {o: t for o, t in nm.originals.items() if o.endswith(".qkv") or o.endswith(".linear1")}
    assert fused
    for original, target in fused.items():
        leaves = [p.path.rpartition(".")[2] for p in target.pieces]
        assert leaves in (["to_qkv"], ["to_added_qkv"], ["to_qkv", "proj_mlp"], ["to_qkv_mlp_proj"]), leaves
        w = torch.cat([model.get_submodule(p.path).weight[p.src_start:p.src_start + p.rows] for p in target.pieces])
        assert torch.equal(w, before[f"{original}.weight"]), original
    assert nm.unnamed and all(p.rpartition(".")[2] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                       "add_v_proj") for p in nm.unnamed)
    assert all(set(nm.names_of(p)) == set(LAYOUTS) for p in nm.linears if p not in nm.unnamed)


def test_wrapped_linears_keep_their_slot() -> None:
    """A LoKr / PEFT layer around a Linear is seen through: same path, its own Linears not listed."""

    class Wrapper(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base_layer, self.lora_A = base, nn.Linear(base.in_features, 2)

    model = tiny("flux2")
    before = dit_name_map(model)
    attn = model.get_submodule("transformer_blocks.0.attn")
    attn.to_k = Wrapper(attn.to_k)
    after = dit_name_map(model)
    assert after.linears == before.linears
    assert after.originals == before.originals


def test_other_models_are_refused() -> None:
    with pytest.raises(TypeError, match="not one of"):
        dit_name_map(nn.Linear(2, 2))
