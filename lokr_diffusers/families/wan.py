"""Wan 2.1 / 2.2 (T2V, I2V, TI2V; 1.3B, 5B, 14B): WanTransformer3DModel, a UMT5 text encoder, flow matching. Wan 2.2
A14B has two experts of one class: `transformer` (high noise) and `transformer_2` (low noise), one file each.

Original names (Wan-AI's checkpoints: `blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`, `head.head`), read, never
copied, from diffusers 0.42.1 `loaders/single_file_utils.py` convert_wan_transformer_to_diffusers and
`loaders/lora_conversion_utils.py` _convert_non_diffusers_wan_lora_to_diffusers (`diffusion_model.` names) and
_convert_musubi_wan_lora_to_diffusers (musubi-tuner's `lora_unet_` names). ComfyUI (Comfy-Org/ComfyUI
`comfy/ldm/wan/model.py`, `comfy/lora.py` model_lora_keys_unet @ ec93dcac) keeps the original names and has no map
from diffusers' names for Wan: it loads `diffusion_model.<original>` and `lora_unet_<original>` only.
tests/test_formats_dit.py runs diffusers' converter on the full-size models.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable, Pairs, blocks, top

# convert_wan_transformer_to_diffusers: plain renames, no fused weight, no swap (time_projection.1 keeps its
# (shift, scale, gate, ...) rows: diffusers' scale_shift_table order is the original's). k_img / v_img exist in
# Wan 2.1 I2V / FLF2V only (image cross-attention); img_emb likewise.
_BLOCK: Pairs = (
    ("self_attn.q", ("attn1.to_q",)),
    ("self_attn.k", ("attn1.to_k",)),
    ("self_attn.v", ("attn1.to_v",)),
    ("self_attn.o", ("attn1.to_out.0",)),
    ("cross_attn.q", ("attn2.to_q",)),
    ("cross_attn.k", ("attn2.to_k",)),
    ("cross_attn.v", ("attn2.to_v",)),
    ("cross_attn.o", ("attn2.to_out.0",)),
    ("cross_attn.k_img", ("attn2.add_k_proj",)),
    ("cross_attn.v_img", ("attn2.add_v_proj",)),
    ("ffn.0", ("ffn.net.0.proj",)),
    ("ffn.2", ("ffn.net.2",)),
)
# fusable: WanAttnProcessor calls the Linears fuse_qkv_projections() makes (attn1.to_qkv, attn2.to_kv and
# attn2.to_added_kv), so an original naming q / k / v reaches their rows there (formats/dit.py _fused_source).
# The Conv3d patch embedding is not adaptable (Linear / Conv1d / Conv2d only; the trainers leave it out too).
ORIGINALS = OriginalTable((
    *top((
        ("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
        ("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
        ("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
        ("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
        ("time_projection.1", ("condition_embedder.time_proj",)),
        ("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
        ("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
        ("head.head", ("proj_out",)),
    )),
    *blocks("num_layers", "blocks", "blocks", _BLOCK),
), fusable=True, single_file=True, params_kept=True, params=(
    # convert_wan_transformer_to_diffusers: self_attn / cross_attn -> attn1 / attn2, the affine cross-attention norm
    # norm3 -> norm2, modulation -> scale_shift_table, img_emb.proj.0 / .4 -> the image embedder's norm1 / norm2;
    # patch_embedding (a Conv3d) keeps its name
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    ("scale_shift_table", "head.modulation"),
    (r"condition_embedder\.image_embedder\.norm1\.(weight|bias)", r"img_emb.proj.0.\1"),
    (r"condition_embedder\.image_embedder\.norm2\.(weight|bias)", r"img_emb.proj.4.\1"),
))

_ATTN = r"blocks\.\d+\.attn[12]\."
# the Linears by role, as the trainers target them: musubi-tuner's WanAttentionBlock Linears (patch / text / time
# embeddings, time projection, norms and head excluded by default), SimpleTuner's and ai-toolkit's to_q / to_k /
# to_v / to_out.0 / ffn
ROLES: dict[str, str] = {
    "attention": _ATTN + r"(to_q|to_k|to_v|to_qkv|to_kv|to_out\.0|add_k_proj|add_v_proj|to_added_kv)",
    "feed_forward": r"blocks\.\d+\.ffn\.net\.(0\.proj|2)",
    "norms": r"condition_embedder\.time_proj",
    "embedders": r"condition_embedder\.(text_embedder|time_embedder)\.linear_[12]"
                 r"|condition_embedder\.image_embedder\.ff\.net\.(0\.proj|2)|proj_out",
}

WAN = ModelFamily(
    name="wan", title="Wan", denoiser="transformer", denoiser_class="WanTransformer3DModel",
    pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    text_encoders=("text_encoder",), components=("transformer", "vae", "text_encoder", "tokenizer"),
    variants=("wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"), prediction=("flow",),
    detect=Detection(kind=(Sign(r"self_attn[._][qkvo]\.|cross_attn[._](q|k|v|o|k_img|v_img)\.|"
                                r"(?<!transformer[._])blocks[._]\d+[._](attn[12]|ffn)[._]|head[._]head|"
                                r"time_projection|(text|time)_embedding[._][02]|condition_embedder",
                                "Wan's attention / embedders"),)),
    kohya=Kohya("wan"), originals=ORIGINALS, roles=ROLES,
    # the flow script (training/flow_video.py): the transformer only (UMT5 stays frozen), uniform timesteps over the
    # shifted schedule (diffusers has no Wan training script to follow), the WanPipeline's 512 UMT5 tokens
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=512),
    comfyui_paths=(),  # ComfyUI maps no diffusers name for Wan: an adapter is written under its original names only
    tags=("wan", "text-to-video"), tiny="helpers.tiny_video:make_wan_pipeline",
    subsumed=("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"),  # each expert has 2.1 T2V 14B's Linears
)
