"""HunyuanVideo 1.5: HunyuanVideo15Transformer3DModel, a Qwen2.5-VL text encoder and ByT5, flow matching.

Original names (Tencent's 1.5 checkpoint; musubi-tuner's lora_hv_1_5 `lora_unet_` names), read, never copied, from
diffusers' repository script scripts/convert_hunyuan_video1_5_to_diffusers.py (huggingface/diffusers @ 38c42b4d,
convert_hyvideo15_transformer_to_diffusers): diffusers 0.42.1 has no single-file converter and no LoRA mixin for it,
so its pipelines take LoKr files through `pipe.load_lokr_weights` only. ComfyUI treats it as a HunyuanVideo
(comfy/supported_models.py: its renames apply, `aliases`); that its model keeps img_attn_q / _k / _v apart (the
renames leave them) is not verified: ComfyUI's HunyuanVideo double block is Flux's, with a fused img_attn.qkv.
"""

from __future__ import annotations

from .hunyuanvideo import COMFYUI_RENAMES, DOUBLE, REFINER, TXT_IN
from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import ADD_QKV, QKV, QKV_LEAVES, OriginalTable, blocks, top

# convert_hyvideo15_transformer_to_diffusers: time_in -> time_embed; txt_in as HunyuanVideo's (refiner qkv chunked in
# 3, its adaLN unswapped); byt5_in.fc1-3 -> context_embedder_2.linear_1-3; vision_in.proj.1 / .3 ->
# image_embedder.linear_1 / _2; double blocks' img_attn_q / _k / _v and txt_attn_q / _k / _v one Linear each (no
# fused qkv); no single blocks; final_layer.adaLN_modulation.1 swapped. fusable=False: fuse_qkv_projections() adds
# no to_qkv its processor calls. img_in.proj (x_embedder.proj) is a Conv3d, which no LoKr layer adapts: left out.
ORIGINALS = OriginalTable((
    *top((
        ("time_in.mlp.0", ("time_embed.timestep_embedder.linear_1",)),
        ("time_in.mlp.2", ("time_embed.timestep_embedder.linear_2",)),
        *TXT_IN,
        ("byt5_in.fc1", ("context_embedder_2.linear_1",)),
        ("byt5_in.fc2", ("context_embedder_2.linear_2",)),
        ("byt5_in.fc3", ("context_embedder_2.linear_3",)),
        ("vision_in.proj.1", ("image_embedder.linear_1",)),
        ("vision_in.proj.3", ("image_embedder.linear_2",)),
        ("final_layer.linear", ("proj_out",)),
    )),
    *top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *blocks("num_refiner_layers", "txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner"
            ".refiner_blocks", REFINER),
    *blocks("num_layers", "double_blocks", "transformer_blocks", (
        *((f"img_attn_{x}", (p,)) for x, p in zip("qkv", QKV, strict=True)),
        *((f"txt_attn_{x}", (p,)) for x, p in zip("qkv", ADD_QKV, strict=True)),
        *DOUBLE)),
), fusable=False, aliases=COMFYUI_RENAMES, comfyui_aliases=True)

_REFINER = r"context_embedder\.token_refiner\.refiner_blocks\.\d+\."
# musubi-tuner's lora_hv_1_5 targets the double blocks (MMDoubleStreamBlock), its default excludes `_in` modules
ROLES: dict[str, str] = {
    "attention": rf"transformer_blocks\.\d+\.attn\.({QKV_LEAVES}|to_out\.0|to_add_out)",
    "feed_forward": r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
    "norms": r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear|norm_out\.linear",
    "embedders": rf"context_embedder\.(proj_in|time_text_embed\..+)|{_REFINER}.+|context_embedder_2\..+"
                 r"|image_embedder\..+|time_embed\..+|proj_out",
}

HUNYUANVIDEO15 = ModelFamily(
    name="hunyuanvideo15", title="HunyuanVideo 1.5",
    pipelines=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
    denoiser="transformer", denoiser_class="HunyuanVideo15Transformer3DModel",
    text_encoders=("text_encoder", "text_encoder_2"),
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    variants=("hunyuanvideo-1.5",), prediction=("flow",),
    # its own names only: read before HunyuanVideo's sign (registry order), which its Tencent names also carry. A
    # file without these (no attention q / k / v, no ByT5 / vision / time embedders) is told HunyuanVideo
    detect=Detection(kind=(Sign(r"(img|txt)_attn_[qkv][._]|byt5_in|vision_in|context_embedder_2|"
                                r"(^|[._])time_embed[._]", "HunyuanVideo 1.5's separate q / k / v, ByT5 / vision "
                                "embedders"),)),
    # ss_base_model_version: musubi-tuner's architecture name (ARCHITECTURE_HUNYUAN_VIDEO_1_5_FULL)
    kohya=Kohya("hunyuan_video_1_5"), originals=ORIGINALS, roles=ROLES, comfyui_paths=(),
    tags=("hunyuan-video-1.5",), aliases=("hunyuan_video_1_5", "hyvideo15"),
    # the flow script (training/flow_video.py HunyuanVideo15, text to video): uniform timesteps over the scheduler's
    # shifted schedule (no weighting; as Wan's, LTX-Video's: the pipeline names none); its 1000 Qwen tokens
    # (HunyuanVideo15Pipeline.tokenizer_max_length, diffusers 0.42.1)
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=1000),
    tiny="helpers.tiny_hunyuanvideo15:make_hunyuanvideo15_pipeline",
)
