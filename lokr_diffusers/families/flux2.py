"""FLUX.2 ([dev]) and FLUX.2 [klein] (4B, 9B): Flux2Transformer2DModel, a Qwen3 (Klein) or Mistral-3 ([dev]) text
encoder, flow matching.

Original names (BFL, as FLUX.1's: `double_blocks`, `single_blocks`), read, never copied, from diffusers 0.42.1
`loaders/single_file_utils.py` convert_flux2_transformer_checkpoint_to_diffusers and `loaders/lora_conversion_utils.py`
_convert_non_diffusers_flux2_lokr_to_diffusers (BFL LoKr names), and ComfyUI (Comfy-Org/ComfyUI) `comfy/utils.py`
flux_to_diffusers (Flux2 is a Flux subclass there; commit b3be02d6). They agree on every name and row order;
tests/test_formats_dit.py runs diffusers' converters.
"""

from __future__ import annotations

from .flux import COMFYUI_PATHS, DOUBLE_ATTN, STREAMS
from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import FLUX_NORMS, QKV_LEAVES, OriginalTable, blocks, top

# convert_flux2_transformer_checkpoint_to_diffusers: double-block qkv chunked in 3; single blocks already fused in
# diffusers (linear1 = attn.to_qkv_mlp_proj, linear2 = attn.to_out, 1:1); modulation is global
# (`double_stream_modulation_img.lin`, ...), not per block; final_layer.adaLN_modulation.1 swapped.
# _convert_non_diffusers_flux2_lokr_to_diffusers: the same names. ComfyUI flux_to_diffusers maps ff.linear_in/out and
# to_qkv_mlp_proj.
ORIGINALS = OriginalTable((
    *top((
        ("img_in", ("x_embedder",)),
        ("txt_in", ("context_embedder",)),
        ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
        ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
        ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),  # not in Klein
        ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
        ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
        ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
        ("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
        ("final_layer.linear", ("proj_out",)),
    )),
    *top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *blocks("num_layers", "double_blocks", "transformer_blocks", (
        *DOUBLE_ATTN,
        ("img_mlp.0", ("ff.linear_in",)),  # SwiGLU: one Linear of 2 * hidden rows in both layouts
        ("img_mlp.2", ("ff.linear_out",)),
        ("txt_mlp.0", ("ff_context.linear_in",)),
        ("txt_mlp.2", ("ff_context.linear_out",)),
    )),
    *blocks("num_single_layers", "single_blocks", "single_transformer_blocks", (
        ("linear1", ("attn.to_qkv_mlp_proj",)),
        ("linear2", ("attn.to_out",)),
    )),
), fusable=True, params=FLUX_NORMS, single_file=True)

# the Linears by role, as the trainers target them (lokr_diffusers/families/flux.py says whose)
ROLES: dict[str, str] = {
    "attention": rf"transformer_blocks\.\d+\.attn\.({QKV_LEAVES}|to_out\.0|to_add_out)"
                 r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
    "feed_forward": r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)",
    "norms": r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"
             r"|norm_out\.linear",
    "embedders": r"x_embedder|context_embedder|time_guidance_embed\..+|proj_out",
}
FLUX2_ONLY = Sign(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj|ff(_context)?[._]linear_in|"
                  r"time_guidance_embed", "FLUX.2's global modulation / fused single blocks")

FLUX2 = ModelFamily(
    name="flux2", title="FLUX.2", pipelines=("Flux2Pipeline", "Flux2KleinPipeline"), denoiser="transformer",
    denoiser_class="Flux2Transformer2DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "tokenizer"),
    variants=("flux2-klein-4b", "flux2-klein-9b", "flux2-dev"), prediction=("flow",),
    detect=Detection(kind=(FLUX2_ONLY, STREAMS)), kohya=Kohya("flux2"), originals=ORIGINALS, roles=ROLES,
    comfyui_paths=COMFYUI_PATHS,  # ComfyUI's Flux2 model subclasses its Flux: one key map
    # diffusers 0.42.1 loads LoKr files (through PEFT) for Flux2LoraLoaderMixin
    diffusers_lokr=True,
    # diffusers' Klein script (train_dreambooth_lora_flux2_klein.py) trains the transformer only; FLUX.2 [dev]'s
    # Mistral prompts are not encoded by the flow script (training/flow_models.py: Klein's Qwen3 only)
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=512),
    tags=("flux2",), aliases=("klein",), tiny="helpers.tiny_dit:make_flux2_klein_pipeline",
)
