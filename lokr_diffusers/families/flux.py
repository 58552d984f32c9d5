"""FLUX.1 (dev, schnell): FluxTransformer2DModel, CLIP-L and T5-XXL, flow matching.

Original names (BFL: `double_blocks`, `single_blocks`), read, never copied, from diffusers 0.42.1
`loaders/single_file_utils.py` convert_flux_transformer_checkpoint_to_diffusers and `loaders/lora_conversion_utils.py`
_convert_kohya_flux_lora_to_diffusers (kohya `lora_unet_` names), and ComfyUI (Comfy-Org/ComfyUI) `comfy/utils.py`
flux_to_diffusers (commit b3be02d6), `comfy/lora.py` model_lora_keys_unet (commit ec93dcac). The two agree on every
name and row order; tests/test_formats_dit.py runs diffusers' converters.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import ADD_QKV, BLOCK, DIT_ATTN, FLUX_NORMS, QKV, QKV_LEAVES, OriginalTable, Pairs, RowName, blocks, top

# a Flux.1 / Flux.2 double block's attention: the image and text streams' qkv and output projections
DOUBLE_ATTN: Pairs = (
    ("img_attn.qkv", QKV),
    ("txt_attn.qkv", ADD_QKV),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
)

# convert_flux_transformer_checkpoint_to_diffusers: qkv chunked in 3 (q, k, v); single_blocks linear1 split (inner,
# inner, inner, mlp_ratio * inner) -> to_q, to_k, to_v, proj_mlp; final_layer.adaLN_modulation.1 swap_scale_shift.
# ComfyUI flux_to_diffusers: the same rows (to_q at 0, to_k at hidden, to_v at 2 * hidden, proj_mlp at 3 * hidden of
# linear1) and the same swap.
ORIGINALS = OriginalTable((
    *top((
        ("img_in", ("x_embedder",)),
        ("txt_in", ("context_embedder",)),
        ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),  # FLUX.1-dev only
        ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ("final_layer.linear", ("proj_out",)),
    )),
    *top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *blocks("num_layers", "double_blocks", "transformer_blocks", (
        ("img_mod.lin", ("norm1.linear",)),
        ("txt_mod.lin", ("norm1_context.linear",)),
        *DOUBLE_ATTN,
        ("img_mlp.0", ("ff.net.0.proj",)),
        ("img_mlp.2", ("ff.net.2",)),
        ("txt_mlp.0", ("ff_context.net.0.proj",)),
        ("txt_mlp.2", ("ff_context.net.2",)),
    )),
    *blocks("num_single_layers", "single_blocks", "single_transformer_blocks", (
        ("modulation.lin", ("norm.linear",)),
        ("linear1", (*QKV, "proj_mlp")),
        ("linear2", ("proj_out",)),
    )),
), fusable=True, params=FLUX_NORMS, single_file=True, row_names=(
    # ComfyUI comfy/lora.py model_lora_keys_unet (Flux models): every `<x>.linear1.weight` also answers to
    # `<x>.linear1_qkv`, rows (0, 0, hidden_size * 3) of it: q, k, v, which diffusers' fuse_qkv_projections() puts in
    # one Linear (attn.to_qkv). Flux.2 has the key too (its model subclasses Flux), but there the rows are part of
    # one diffusers Linear (to_qkv_mlp_proj), which no LoKr on a diffusers module can hold: Flux.1 only.
    RowName("single_blocks.{i}.linear1_qkv", "single_blocks.{i}.linear1", 3, "num_single_layers"),
))

# The Linears by role (full diffusers paths), as the trainers target them: kohya (double / single stream blocks;
# modulation excluded by default), SimpleTuner and diffusers' training scripts (to_q/k/v, to_out.0, add_*_proj,
# to_add_out, ff, ff_context, proj_mlp / proj_out of single blocks). After fuse_qkv_projections(), to_qkv /
# to_added_qkv replace to_q/k/v.
ROLES: dict[str, str] = {
    "attention": rf"(single_)?transformer_blocks\.\d+\.attn\.({QKV_LEAVES}|to_out\.0|to_add_out)",
    "feed_forward": r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
                    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
    "norms": r"(single_)?transformer_blocks\.\d+\.(norm1|norm1_context|norm)\.linear|norm_out\.linear",
    "embedders": r"x_embedder|context_embedder|time_text_embed\..+|proj_out",
}

# The diffusers paths ComfyUI's model_lora_keys_unet names under `transformer.`: Flux.1 and Flux.2 (a Flux subclass
# in comfy/model_base.py) from comfy/utils.py flux_to_diffusers. Read there, not copied.
COMFYUI_PATHS: tuple[str, ...] = (
    rf"{BLOCK}{DIT_ATTN}", rf"{BLOCK}(norm1|norm1_context)\.linear",
    rf"{BLOCK}(ff|ff_context)\.(net\.0\.proj|net\.2|linear_in|linear_out)",
    r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_qkv_mlp_proj|to_out)|proj_mlp|norm\.linear|proj_out)",
    r"x_embedder|context_embedder|proj_out|norm_out\.linear",
    r"time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12]",
)

# FLUX.1 and FLUX.2 share most original names: a file of double / single blocks alone may be either
STREAMS = Sign(r"double_blocks|single_blocks|single_transformer_blocks", "double / single stream blocks")
FLUX1_ONLY = Sign(r"(img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation|vector_in|"
                  r"single_transformer_blocks[._]\d+[._]norm[._]linear", "FLUX.1's modulation")
# a single block's MLP input as its own Linear (diffusers' FLUX.1 spelling; FLUX.2 fuses it): Chroma's too
FLUX1_MLP = Sign(r"single_transformer_blocks[._]\d+[._]proj_mlp", "FLUX.1's single-block MLP")

FLUX = ModelFamily(
    name="flux", title="FLUX.1", pipelines=("FluxPipeline",), denoiser="transformer",
    denoiser_class="FluxTransformer2DModel", text_encoders=("text_encoder", "text_encoder_2"),
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    variants=("flux1-dev",), prediction=("flow",), detect=Detection(kind=(FLUX1_ONLY, FLUX1_MLP, STREAMS)),
    kohya=Kohya("flux1"), originals=ORIGINALS,
    roles=ROLES, comfyui_paths=COMFYUI_PATHS,
    # diffusers' Flux script trains CLIP only, never T5 (text_encoder_2)
    training=Training("flow", ("text_encoder",), weighting_scheme="none", max_sequence_length=512),
    tags=("flux",), aliases=("flux1",), tiny="helpers.tiny_dit:make_flux_pipeline",
    subsumed=("flux1-schnell",),  # its modules are dev's less the guidance embedder: its files fit dev
)
