"""LTX-Video (0.9.x, 2B and 13B): LTXVideoTransformer3DModel, a T5-XXL text encoder, flow matching.

Original names (Lightricks' checkpoints: PixArt-style `adaln_single`, `patchify_proj`), read, never copied, from
diffusers 0.42.1 `loaders/single_file_utils.py` convert_ltx_transformer_checkpoint_to_diffusers and
`loaders/lora_conversion_utils.py` _convert_non_diffusers_ltxv_lora_to_diffusers, and ComfyUI (Comfy-Org/ComfyUI)
`comfy/lora.py` model_lora_keys_unet (commit ec93dcac, the LTXV / LTXAV branch). The converter renames two top-level
modules and keeps every other Linear's name; tests/test_formats_dit.py runs it.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable, Pairs, top

# An AdaLayerNormSingle (PixArt's adaLN-single): a timestep MLP (linear_1: 256 -> dim, linear_2: dim -> dim) and the
# shared modulation projection `linear` (dim -> 6·dim in LTX-Video; 6 or 9·dim, 4·dim, 2·dim, dim in LTX-2). The
# original checkpoints and diffusers hold the same three Linears under another prefix.
ADALN_LEAVES = ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")


def adaln(original: str, diffusers: str) -> Pairs:
    """The three Linears of one adaLN-single, `original.<leaf>` <- `diffusers.<leaf>` (a prefix rename)."""
    return tuple((f"{original}.{leaf}", (f"{diffusers}.{leaf}",)) for leaf in ADALN_LEAVES)


# convert_ltx_transformer_checkpoint_to_diffusers: `patchify_proj` -> `proj_in` (in_channels -> dim), `adaln_single`
# -> `time_embed` (a prefix; q_norm / k_norm -> norm_q / norm_k are RMSNorms, no Linear); everything else keeps its
# name: caption_projection.linear_1/2, transformer_blocks.{i}.attn1/attn2.to_q/to_k/to_v/to_out.0, ff.net.0.proj,
# ff.net.2, proj_out (same_names). No fused original, no swap, no conv. fusable=False: fuse_qkv_projections() adds
# attn1/attn2.to_qkv, but LTXVideoAttnProcessor always calls to_q, to_k, to_v.
ORIGINALS = OriginalTable(top((
    ("patchify_proj", ("proj_in",)),
    *adaln("adaln_single", "time_embed"),
)), fusable=False, same_names=True, single_file=True, params_kept=True,
    params=((r"(.+)\.norm_([qk])\.weight", r"\1.\2_norm.weight"),))  # the converter's q_norm / k_norm -> norm_q / k

_BLOCK = r"transformer_blocks\.\d+\."
# The Linears by role, as the trainers target them (LTX-Video-Trainer and diffusers' LoRA scripts: to_q, to_k, to_v,
# to_out.0 of both attentions; the feed-forward on request in most, here by default as for the other DiTs).
ROLES: dict[str, str] = {
    "attention": rf"{_BLOCK}attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "feed_forward": rf"{_BLOCK}ff\.net\.(0\.proj|2)",
    "norms": r"time_embed\.linear",  # the adaLN-single projection; the blocks' modulation is a Parameter table
    "embedders": r"proj_in|proj_out|caption_projection\.linear_[12]|time_embed\.emb\.timestep_embedder\.linear_[12]",
}

# Files of LTX-Video and LTX-2 share these names (both keep PixArt's names; attn1 / attn2 directly under top-level
# transformer_blocks: a UNet's transformer_blocks sit under down_blocks / up_blocks, CogVideoX and Mochi are no
# family here). Anchored at a key's start: `^<prefix>?transformer_blocks`.
_PREFIX = r"^(diffusion_model\.|transformer\.|lora_unet_|lycoris_|lora_transformer_)?"
LTX_NAMES = Sign(rf"{_PREFIX}(transformer_blocks[._]\d+[._]attn1[._]|adaln_single[._]|patchify_proj|"
                 r"caption_projection[._]linear_[12])", "LTX's PixArt-style blocks / adaLN-single")

LTXVIDEO = ModelFamily(
    name="ltxvideo", title="LTX-Video",
    pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline", "LTXI2VLongMultiPromptPipeline"),
    denoiser="transformer", denoiser_class="LTXVideoTransformer3DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "tokenizer"), variants=("ltx-video-2b", "ltx-video-13b"),
    prediction=("flow",), detect=Detection(kind=(LTX_NAMES,)),
    kohya=Kohya("ltxv"),  # no trainer writes kohya metadata for LTX-Video: our choice
    originals=ORIGINALS, roles=ROLES,
    # the flow script (training/flow_video.py): the transformer only (T5-XXL stays frozen), uniform timesteps over the
    # shifted schedule, the LTXPipeline's 128 T5 tokens
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=128),
    comfyui_paths=(),  # ComfyUI's LTXV branch maps plain original names (no prefix), no diffusers paths
    tags=("ltx-video",), aliases=("ltxv",), tiny="helpers.tiny_ltx:make_ltxvideo_pipeline",
)
