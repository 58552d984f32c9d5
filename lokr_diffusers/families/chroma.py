"""Chroma (Chroma1-HD, ...): ChromaTransformer2DModel, a T5-XXL text encoder, flow matching. A FLUX.1-schnell
derivative: the same double / single stream blocks, no per-block modulation Linears (no img_mod / txt_mod /
modulation, no final adaLN): every block's modulation comes from one "distilled guidance" approximator MLP.

Original names (lodestones' checkpoints, ComfyUI's `comfy/ldm/chroma/`), read, never copied, from diffusers 0.42.1
`loaders/single_file_utils.py` convert_chroma_transformer_checkpoint_to_diffusers and ComfyUI (Comfy-Org/ComfyUI)
`comfy/model_base.py` (Chroma subclasses Flux there, commit 094c74c1), so `comfy/lora.py` model_lora_keys_unet's
Flux branch (commit ec93dcac) and `comfy/utils.py` flux_to_diffusers (commit b3be02d6) apply. tests/test_formats_dit.py
runs diffusers' converter.
"""

from __future__ import annotations

from .flux import COMFYUI_PATHS, DOUBLE_ATTN, FLUX1_MLP, STREAMS
from .flux import ROLES as FLUX_ROLES
from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import FLUX_NORMS, QKV, OriginalTable, RowName, blocks, top

# convert_chroma_transformer_checkpoint_to_diffusers (inner_dim 3072, mlp_ratio 4 hard-coded there): img_in ->
# x_embedder, txt_in -> context_embedder, final_layer.linear -> proj_out (no final adaLN, no swap anywhere);
# distilled_guidance_layer.in_proj / out_proj keep their names, its layers.{k}.in_layer / out_layer ->
# layers.{k}.linear_1 / linear_2 (k < approximator_layers); double blocks as FLUX.1's less img_mod / txt_mod: qkv
# chunked in 3 (q, k, v), proj, mlp.0 / mlp.2; single blocks linear1 split (inner, inner, inner, 4 * inner) ->
# to_q, to_k, to_v, proj_mlp, linear2 -> proj_out. ComfyUI (comfy/ldm/chroma/model.py, layers.py): the same names.
ORIGINALS = OriginalTable((
    *top((
        ("img_in", ("x_embedder",)),
        ("txt_in", ("context_embedder",)),
        ("final_layer.linear", ("proj_out",)),
        ("distilled_guidance_layer.in_proj", ("distilled_guidance_layer.in_proj",)),  # approximator_num_channels in
        ("distilled_guidance_layer.out_proj", ("distilled_guidance_layer.out_proj",)),  # -> inner_dim
    )),
    *blocks("approximator_layers", "distilled_guidance_layer.layers", "distilled_guidance_layer.layers", (
        ("in_layer", ("linear_1",)),  # approximator_hidden_dim square, a residual MLP
        ("out_layer", ("linear_2",)),
    )),
    *blocks("num_layers", "double_blocks", "transformer_blocks", (
        *DOUBLE_ATTN,
        ("img_mlp.0", ("ff.net.0.proj",)),
        ("img_mlp.2", ("ff.net.2",)),
        ("txt_mlp.0", ("ff_context.net.0.proj",)),
        ("txt_mlp.2", ("ff_context.net.2",)),
    )),
    *blocks("num_single_layers", "single_blocks", "single_transformer_blocks", (
        ("linear1", (*QKV, "proj_mlp")),
        ("linear2", ("proj_out",)),
    )),
), fusable=True, single_file=True, params=(
    *FLUX_NORMS, (r"distilled_guidance_layer\.norms\.(\d+)\.weight", r"distilled_guidance_layer.norms.\1.scale"),
), row_names=(  # FluxAttnProcessor: fuse_qkv_projections() makes to_qkv / to_added_qkv, used
    # ComfyUI model_lora_keys_unet (Flux models, Chroma among them): `<x>.linear1_qkv` = rows [0, 3 * hidden) of
    # linear1 (q, k, v), which diffusers' fuse_qkv_projections() makes one Linear (single blocks' attn.to_qkv).
    RowName("single_blocks.{i}.linear1_qkv", "single_blocks.{i}.linear1", 3, "num_single_layers"),
))

# The Linears by role: attention and feed-forward as FLUX.1's (its trainers target the same blocks); no adaLN
# projection in the blocks, so "norms" is the approximator, which computes every block's (shift, scale, gate).
ROLES: dict[str, str] = {
    "attention": FLUX_ROLES["attention"],
    "feed_forward": FLUX_ROLES["feed_forward"],
    "norms": r"distilled_guidance_layer\.(in_proj|out_proj|layers\.\d+\.linear_[12])",
    "embedders": r"x_embedder|context_embedder|proj_out",
}
# Chroma's own names: the approximator, in its original and diffusers spellings (its absent modulation is no
# evidence: a FLUX.1 file need not name modulations either)
CHROMA_ONLY = Sign(r"distilled_guidance_layer", "Chroma's distilled guidance approximator")

CHROMA = ModelFamily(
    name="chroma", title="Chroma", pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    denoiser="transformer", denoiser_class="ChromaTransformer2DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "tokenizer"), variants=("chroma1-hd",), prediction=("flow",),
    # a file of double / single blocks only (no approximator) fits FLUX.1 (and FLUX.2) as well: all are tried
    detect=Detection(kind=(CHROMA_ONLY, FLUX1_MLP, STREAMS)), originals=ORIGINALS, roles=ROLES,
    kohya=Kohya("chroma"),  # kohya sd-scripts library/flux_utils.py MODEL_VERSION_CHROMA
    # ComfyUI's Chroma is a Flux subclass: flux_to_diffusers' diffusers paths, of which Chroma has all but the
    # modulations and time_text_embed (the approximator has no diffusers name there: reached by its original)
    comfyui_paths=COMFYUI_PATHS, tags=("chroma",), tiny="helpers.tiny_chroma:make_chroma_pipeline",
    # no diffusers script trains Chroma: FLUX.1's (uniform σ, and ChromaPipeline's 512 T5 tokens)
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=512),
)
