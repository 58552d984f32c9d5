"""HunyuanVideo: HunyuanVideoTransformer3DModel, a Llama (LLaVA) text encoder and CLIP-L, flow matching.

Original names (Tencent's checkpoint; musubi-tuner's `lora_unet_` names), read, never copied, from diffusers 0.42.1
`loaders/single_file_utils.py` convert_hunyuan_video_transformer_to_diffusers. ComfyUI (Comfy-Org/ComfyUI) renames
them on load into Flux-style internal names (`comfy/supported_models.py` HunyuanVideo.process_unet_state_dict,
mirror @ a125cd84), which its generic key map (`comfy/lora.py` model_lora_keys_unet) takes as `diffusion_model.<x>`
and `lora_unet_<x>`; its HunyuanVideo branch also takes `diffusion_model.` + a partly reversed spelling. Both
spellings load here (`ALIASES`); format="comfyui" writes ComfyUI's. tests/test_formats_dit.py runs the converter.

HunyuanVideoFramepackTransformer3DModel is another class (not a subclass): its checkpoints keep diffusers' names
(lllyasviel's FramePack, musubi's lora_framepack), so the generic floor (targeting.py) serves it.
"""

from __future__ import annotations

from .flux import FLUX1_ONLY
from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import ADD_QKV, QKV, QKV_LEAVES, OriginalTable, Pairs, blocks, top

# The token refiner (txt_in) of HunyuanVideo and HunyuanVideo 1.5: self_attn_qkv chunked in 3 (q, k, v);
# adaLN_modulation.1 -> norm_out.linear unswapped (its two halves are gates, not (shift, scale)).
REFINER: Pairs = (
    ("self_attn_qkv", QKV),
    ("self_attn_proj", ("attn.to_out.0",)),
    ("mlp.fc1", ("ff.net.0.proj",)),
    ("mlp.fc2", ("ff.net.2",)),
    ("adaLN_modulation.1", ("norm_out.linear",)),
)
TXT_IN: Pairs = (
    ("txt_in.input_embedder", ("context_embedder.proj_in",)),
    ("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    ("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    ("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    ("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
)
# a double block's leaves shared with 1.5 (which has img/txt_attn_q, _k, _v apart)
DOUBLE: Pairs = (
    ("img_mod.linear", ("norm1.linear",)),  # 6 chunks, same order: no swap
    ("txt_mod.linear", ("norm1_context.linear",)),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("img_mlp.fc1", ("ff.net.0.proj",)),
    ("img_mlp.fc2", ("ff.net.2",)),
    ("txt_mlp.fc1", ("ff_context.net.0.proj",)),
    ("txt_mlp.fc2", ("ff_context.net.2",)),
)
# ComfyUI's renames, in its order, of Tencent's names (process_unet_state_dict; read on `name + "."`)
COMFYUI_RENAMES: tuple[tuple[str, str], ...] = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
    ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."),
)

# convert_hunyuan_video_transformer_to_diffusers: img_attn_qkv / txt_attn_qkv chunked in 3; single_blocks linear1
# split (hidden, hidden, hidden, rest) -> to_q, to_k, to_v, proj_mlp (the converter hard-codes hidden 3072);
# final_layer.adaLN_modulation.1 swapped (shift, scale) -> (scale, shift). fusable=False: fuse_qkv_projections()
# leaves fused_projections False and adds no to_qkv (its processor always calls to_q, to_k, to_v). img_in.proj
# (x_embedder.proj) is a Conv3d, which no LoKr layer adapts (Linear / Conv1d / Conv2d only): left out.
ORIGINALS = OriginalTable((
    *top((
        ("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        ("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        ("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
        ("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
        *TXT_IN,
        ("final_layer.linear", ("proj_out",)),
    )),
    *top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *blocks("num_refiner_layers", "txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner"
            ".refiner_blocks", REFINER),
    *blocks("num_layers", "double_blocks", "transformer_blocks", (
        ("img_attn_qkv", QKV), ("txt_attn_qkv", ADD_QKV), *DOUBLE)),
    *blocks("num_single_layers", "single_blocks", "single_transformer_blocks", (
        ("linear1", (*QKV, "proj_mlp")),
        ("linear2", ("proj_out",)),
        ("modulation.linear", ("norm.linear",)),
    )),
), fusable=False, aliases=COMFYUI_RENAMES, comfyui_aliases=True, single_file=True, params=(
    # convert_hunyuan_video_transformer_to_diffusers (Tencent's names): the q / k norms, the token refiner's
    # LayerNorms and the patch embedding (a Conv3d)
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.weight", r"double_blocks.\1.img_attn_\2_norm.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.weight", r"double_blocks.\1.txt_attn_\2_norm.weight"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_([qk])\.weight", r"single_blocks.\1.\2_norm.weight"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(norm[12]\.(weight|bias))",
     r"txt_in.individual_token_refiner.blocks.\1.\2"),
    (r"x_embedder\.proj\.(weight|bias)", r"img_in.proj.\1"),
))

# The Linears by role: musubi-tuner targets the double / single blocks' Linears less img_mod / txt_mod / modulation
# (network_arch); diffusers-style trainers attention and feed-forward.
_BLOCKS = r"(single_)?transformer_blocks\.\d+\."
_REFINER = r"context_embedder\.token_refiner\.refiner_blocks\.\d+\."
ROLES: dict[str, str] = {
    "attention": rf"{_BLOCKS}attn\.({QKV_LEAVES}|to_out\.0|to_add_out)",
    "feed_forward": r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
                    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
    "norms": rf"{_BLOCKS}(norm1|norm1_context|norm)\.linear|norm_out\.linear",
    "embedders": rf"context_embedder\.(proj_in|time_text_embed\..+)|{_REFINER}.+|time_text_embed\..+|proj_out",
}
# Tencent's spelling (its checkpoint, musubi-tuner) and diffusers' refiner path, which no FLUX model has. Files are
# told by the first sign of fewest holders (detect.of_file): this sign names HunyuanVideo alone, so it is read before
# FLUX.1's, which HunyuanVideo holds too (ComfyUI's spelling of its blocks and vector_in are FLUX.1's names); 1.5's
# files carry names of this sign too, so its record comes first in the registry and its own sign is read first.
TENCENT = Sign(r"individual_token_refiner|token_refiner|(img|txt)_mod[._]linear|(img|txt)_mlp[._]fc[12]|"
               r"txt_in[._](t|c)_embedder|(time|guidance)_in[._]mlp|single_blocks[._]\d+[._]modulation[._]linear",
               "HunyuanVideo's token refiner / Tencent names")

HUNYUANVIDEO = ModelFamily(
    name="hunyuanvideo", title="HunyuanVideo",
    pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"),
    denoiser="transformer", denoiser_class="HunyuanVideoTransformer3DModel",
    text_encoders=("text_encoder", "text_encoder_2"),
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    variants=("hunyuanvideo",), prediction=("flow",),
    # FLUX.1's sign too: ComfyUI's spelling of its modulations and vector_in is FLUX.1's. A file of double / single
    # blocks in ComfyUI's spelling alone is told FLUX.1 (its names are; only the block counts differ)
    detect=Detection(kind=(TENCENT, FLUX1_ONLY)),
    # ss_base_model_version: musubi-tuner's architecture name (dataset/architectures.py ARCHITECTURE_HUNYUAN_VIDEO_FULL)
    kohya=Kohya("hunyuan_video"), originals=ORIGINALS, roles=ROLES, comfyui_paths=(),
    tags=("hunyuan-video",), aliases=("hunyuan_video", "hyvideo"),
    tiny="helpers.tiny_hunyuanvideo:make_hunyuanvideo_pipeline",
    # the flow script (training/flow_video.py): the transformer only, uniform timesteps over the shifted schedule
    # (diffusers has no HunyuanVideo script), the pipeline's 256 Llama tokens
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=256),
)
