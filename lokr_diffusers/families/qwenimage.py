"""Qwen-Image (QwenImageTransformer2DModel, a Qwen2.5-VL text encoder) and Qwen-Image 2.1
(QwenImage21Transformer2DModel, a Qwen3-VL text encoder): two records, since the denoiser classes differ; both flow
matching, both loaded by diffusers' QwenImageLoraLoaderMixin.

Original names: Qwen released in diffusers' layout, so the original names are the diffusers paths. Read, never
copied, from diffusers 0.42.1 `loaders/single_file_model.py` SINGLE_FILE_LOADABLE_CLASSES (QwenImage's converter is
`lambda checkpoint, **kwargs: checkpoint`, the identity), `loaders/single_file_utils.py`
convert_qwen_image21_transformer_checkpoint_to_diffusers (identity but for ComfyUI's fused SwiGLU input
`img_mlp.gate_up`), and ComfyUI (Comfy-Org/ComfyUI) `comfy/lora.py` model_lora_keys_unet, QwenImage branch (commit
ec93dcac): every `diffusion_model.<name>` also answers to `<name>`, `transformer.<name>` and `lycoris_<name _>`.
tests/test_formats_dit.py runs diffusers' converters.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable, blocks

# Qwen-Image: every Linear keeps its diffusers path (the identity converter). fusable=False: its
# fuse_qkv_projections() adds no Linear (fused_projections stays False), so to_q/k/v are always called.
ORIGINALS = OriginalTable((), fusable=False, same_names=True, params_kept=True, single_file=True)

# Qwen-Image 2.1: convert_qwen_image21_transformer_checkpoint_to_diffusers chunks `transformer_blocks.N.img_mlp.gate_up`
# (2 · mlp_ratio · dim rows) in 2 along the rows: the gate's rows first (-> img_mlp.gate_layer), then the up
# projection's (-> img_mlp.proj); every other key is only stripped of `model.diffusion_model.`. fusable=False: the
# class makes attn.to_qkv on fusing, but its processor always calls to_q, to_k, to_v.
ORIGINALS_21 = OriginalTable(
    blocks("num_layers", "transformer_blocks", "transformer_blocks",
           (("img_mlp.gate_up", ("img_mlp.gate_layer", "img_mlp.proj")),)),
    fusable=False, same_names=True, params_kept=True, single_file=True)

_BLOCK = r"transformer_blocks\.\d+\."
# The Linears by role, as the trainers target them: musubi-tuner's lora_qwen_image (the blocks' Linears,
# `_mod_` excluded by default), ai-toolkit and SimpleTuner (attention and MLPs by diffusers path).
ROLES: dict[str, str] = {
    "attention": rf"{_BLOCK}attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
    "feed_forward": rf"{_BLOCK}(img_mlp|txt_mlp)\.net\.(0\.proj|2)",
    "norms": rf"{_BLOCK}(img_mod|txt_mod)\.1|norm_out\.linear",
    "embedders": r"img_in|txt_in|time_text_embed\.timestep_embedder\.linear_[12]|proj_out",
}
ROLES_21: dict[str, str] = {
    "attention": rf"{_BLOCK}attn\.(to_q|to_k|to_v|to_out\.0)",
    "feed_forward": rf"{_BLOCK}img_mlp\.(gate_layer|proj|out)",
    "norms": r"modulation\.1|norm_out\.linear",  # one global modulation, not one per block
    "embedders": r"img_in|txt_in\.(in_layer|out_layer)|time_text_embed\.timestep_embedder\.linear_[12]|proj_out",
}
# ComfyUI's key map names `transformer.<its module name>` for every weight of its model, and its names are these
# diffusers paths: every Linear of the model (for 2.1, gate_layer / proj are the halves of its gate_up, CL).
COMFYUI_PATHS: tuple[str, ...] = tuple(ROLES.values())
COMFYUI_PATHS_21: tuple[str, ...] = tuple(ROLES_21.values())

# Module names no other family's files carry: Qwen-Image's per-block modulations and MLPs (`img_mod.1`,
# `img_mlp.net.0.proj`; FLUX.1's are `img_mod.lin` / `img_mlp.0`, HunyuanVideo's `img_mod.linear` / `img_mlp.fc1`),
# Qwen-Image 2.1's SwiGLU (`img_mlp.gate_up` / `gate_layer`) and text input (`txt_in.in_layer`).
QWEN_SIGN = Sign(r"(img|txt)_mod[._]1([._]|$)|(img|txt)_mlp[._]net[._]", "Qwen-Image's per-block modulation / MLP")
QWEN21_SIGN = Sign(r"img_mlp[._](gate_up|gate_layer)|txt_in[._](in|out)_layer", "Qwen-Image 2.1's SwiGLU / text input")

QWENIMAGE = ModelFamily(
    name="qwenimage", title="Qwen-Image",
    pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
               "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline", "QwenImageLayeredPipeline",
               "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline"),
    denoiser="transformer", denoiser_class="QwenImageTransformer2DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "tokenizer"), variants=("qwen-image",), prediction=("flow",),
    detect=Detection(kind=(QWEN_SIGN,)),
    kohya=Kohya("qwen_image"),  # musubi-tuner's ARCHITECTURE_QWEN_IMAGE_FULL, its ss_base_model_version
    originals=ORIGINALS, roles=ROLES, comfyui_paths=COMFYUI_PATHS, tags=("qwen-image",), aliases=("qwen",),
    tiny="helpers.tiny_qwen:make_qwenimage_pipeline",
    # diffusers' train_dreambooth_lora_qwen_image.py: uniform σ, 512 tokens, the transformer only
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=512),
)
QWENIMAGE21 = ModelFamily(
    name="qwenimage21", title="Qwen-Image 2.1", pipelines=("QwenImage21Pipeline",), denoiser="transformer",
    denoiser_class="QwenImage21Transformer2DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "processor"), variants=("qwen-image-2.1",), prediction=("flow",),
    detect=Detection(kind=(QWEN21_SIGN,)),
    kohya=Kohya("qwen_image_21"),  # no trainer's spelling read: Qwen-Image's with the version
    originals=ORIGINALS_21, roles=ROLES_21, comfyui_paths=COMFYUI_PATHS_21, tags=("qwen-image",),
    aliases=("qwen21",), tiny="helpers.tiny_qwen21:make_qwenimage21_pipeline",
    # diffusers has no Qwen-Image 2.1 training script: Qwen-Image's (train_dreambooth_lora_qwen_image.py: uniform σ,
    # 512 tokens, the transformer only); QwenImage21Pipeline itself does not cut the caption
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=512),
)
