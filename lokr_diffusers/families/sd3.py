"""SD3 / SD3.5 (medium, large): the MMDiT SD3Transformer2DModel, CLIP-L, CLIP-G and T5-XXL (optional), flow
matching.

Original names (Stability: `joint_blocks`), read, never copied, from diffusers 0.42.1 `loaders/single_file_utils.py`
convert_sd3_transformer_checkpoint_to_diffusers and ComfyUI (Comfy-Org/ComfyUI) `comfy/utils.py` mmdit_to_diffusers
(commit b3be02d6), `comfy/lora.py` model_lora_keys_unet (commit ec93dcac). The two agree on every name and row
order; tests/test_formats_dit.py runs diffusers' converters.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import ADD_QKV, BLOCK, DIT_ATTN, QKV, QKV_LEAVES, OriginalTable, Pairs, blocks, top

# convert_sd3_transformer_checkpoint_to_diffusers: qkv chunked in 3; the last block's context_block has no attn.proj
# and no mlp (context pre-only) and its adaLN_modulation.1 is swapped (AdaLayerNormContinuous, 2 * dim rows), as is
# final_layer's; attn2 (SD3.5-medium's dual attention) only in the blocks that have it. ComfyUI mmdit_to_diffusers:
# the same. x_embedder.proj (pos_embed.proj, the patch embedding) is a Conv2d: in `convs`, a rename (the converter's
# pos_embed.proj.weight = x_embedder.proj.weight; ComfyUI MMDIT_MAP_BASIC the same; kohya's lora_sd3.py trains it
# as lora_unet_x_embedder_proj when emb_dims asks for the embedders).
_JOINT_BLOCK: Pairs = (
    ("x_block.attn.qkv", QKV),
    ("context_block.attn.qkv", ADD_QKV),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),  # 6 or 9 (dual attention) chunks, same order
)
_CONTEXT_ADALN: Pairs = (("context_block.adaLN_modulation.1", ("norm1_context.linear",)),)
ORIGINALS = OriginalTable((
    *top((
        ("context_embedder", ("context_embedder",)),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        ("final_layer.linear", ("proj_out",)),
    )),
    *top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *blocks("num_layers", "joint_blocks", "transformer_blocks", _JOINT_BLOCK),
    *blocks("num_layers", "joint_blocks", "transformer_blocks", _CONTEXT_ADALN, only="not_last"),
    *blocks("num_layers", "joint_blocks", "transformer_blocks", _CONTEXT_ADALN, only="last", swap=True),
), fusable=True, convs=(("x_embedder.proj", "pos_embed.proj"),), single_file=True, params=(
    # convert_sd3_transformer_checkpoint_to_diffusers: the patch grid's positions, and the q / k RMSNorms (SD3.5)
    ("pos_embed\\.pos_embed", "pos_embed"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.weight", r"joint_blocks.\1.x_block.attn.ln_\2.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.weight", r"joint_blocks.\1.context_block.attn.ln_\2.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"joint_blocks.\1.x_block.attn2.ln_\2.weight"),
))

# the Linears by role, as the trainers target them (lokr_diffusers/families/flux.py says whose)
ROLES: dict[str, str] = {
    "attention": rf"transformer_blocks\.\d+\.(attn|attn2)\.({QKV_LEAVES}|to_out\.0|to_add_out)",
    "feed_forward": r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
    "norms": r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear|norm_out\.linear",
    "embedders": r"context_embedder|time_text_embed\..+|proj_out|pos_embed\.proj",
}
# ComfyUI's model_lora_keys_unet names under `transformer.`, from comfy/utils.py mmdit_to_diffusers
COMFYUI_PATHS: tuple[str, ...] = (
    rf"{BLOCK}{DIT_ATTN}", rf"{BLOCK}attn2\.(to_q|to_k|to_v|to_out\.0)",
    rf"{BLOCK}(norm1|norm1_context)\.linear", rf"{BLOCK}(ff|ff_context)\.net\.(0\.proj|2)",
    r"context_embedder|pos_embed\.proj|norm_out\.linear|proj_out",
    r"time_text_embed\.(timestep|text)_embedder\.linear_[12]",
)

SD3 = ModelFamily(
    name="sd3", title="SD3.x", pipelines=("StableDiffusion3Pipeline",), denoiser="transformer",
    denoiser_class="SD3Transformer2DModel", text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),  # T5 optional
    variants=("sd35-medium", "sd35-large"), prediction=("flow",),
    detect=Detection(kind=(Sign(r"joint_blocks|x_block|context_block|y_embedder", "MMDiT joint blocks"),)),
    kohya=Kohya("sd3"), originals=ORIGINALS, roles=ROLES, comfyui_paths=COMFYUI_PATHS,
    # diffusers' SD3 script trains both CLIPs with --train_text_encoder
    training=Training("flow", ("text_encoder", "text_encoder_2"), weighting_scheme="logit_normal",
                      max_sequence_length=77),
    tags=("sd3",), aliases=("sd35",), tiny="helpers.tiny_dit:make_sd3_pipeline",
)
