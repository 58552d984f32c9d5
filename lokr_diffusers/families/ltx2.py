"""LTX-2 (audio + video): LTX2VideoTransformer3DModel, a Gemma-3 text encoder whose features pass through the
pipeline's `connectors` (LTX2TextConnectors), flow matching.

Original names (Lightricks' LTX-2 checkpoints), read, never copied, from diffusers 0.42.1
`loaders/single_file_utils.py` convert_ltx2_transformer_to_diffusers and `loaders/lora_conversion_utils.py`
_convert_non_diffusers_ltx2_lora_to_diffusers, and ComfyUI (Comfy-Org/ComfyUI) `comfy/lora.py` model_lora_keys_unet
(commit ec93dcac, the LTXV / LTXAV branch). The converter renames the top-level input projections and adaLN-singles
and keeps every other Linear's name; tests/test_formats_dit.py runs it.

Not the transformer's: `video_embeddings_connector` / `audio_embeddings_connector` (dropped by the converter) and a
LoRA file's `text_embedding_projection.` modules (diffusers' LoRA converter sends them to the `connectors`
component); lokr_diffusers adapts no connectors, so such keys are reported as not loaded (formats/report.py).
"""

from __future__ import annotations

from .ltx import LTX_NAMES, adaln
from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable, top

# convert_ltx2_transformer_to_diffusers (prefix renames; the rest, caption_projection, audio_caption_projection,
# proj_out, audio_proj_out and every block module, keeps its name: same_names):
#   patchify_proj / audio_patchify_proj -> proj_in / audio_proj_in
#   adaln_single. / audio_adaln_single. -> time_embed. / audio_time_embed. (keys starting so only)
#   av_ca_video_scale_shift_adaln_single -> av_cross_attn_video_scale_shift, av_ca_a2v_gate_adaln_single ->
#   av_cross_attn_video_a2v_gate, av_ca_audio_scale_shift_adaln_single -> av_cross_attn_audio_scale_shift,
#   av_ca_v2a_gate_adaln_single -> av_cross_attn_audio_v2a_gate
# _convert_non_diffusers_ltx2_lora_to_diffusers: the same, and LTX-2.3's prompt_adaln_single / audio_prompt_adaln_single
# -> prompt_adaln / audio_prompt_adaln (modules only a model with cross_attn_mod has; a rule is skipped where the
# model has none). No fused original, no swap, no conv. fusable=False: fuse_qkv_projections() fails where the audio
# and video widths differ, and LTX2AudioVideoAttnProcessor calls to_q, to_k, to_v.
ORIGINALS = OriginalTable(top((
    ("patchify_proj", ("proj_in",)),
    ("audio_patchify_proj", ("audio_proj_in",)),
    *adaln("adaln_single", "time_embed"),
    *adaln("audio_adaln_single", "audio_time_embed"),
    *adaln("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
    *adaln("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
    *adaln("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
    *adaln("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
    *adaln("prompt_adaln_single", "prompt_adaln"),
    *adaln("audio_prompt_adaln_single", "audio_prompt_adaln"),
)), fusable=False, same_names=True, single_file=True, params_kept=True, params=(
    (r"(.+)\.norm_([qk])\.weight", r"\1.\2_norm.weight"),  # the converter's q_norm / k_norm -> norm_q / norm_k
    (r"(.+)\.video_a2v_cross_attn_scale_shift_table", r"\1.scale_shift_table_a2v_ca_video"),
    (r"(.+)\.audio_a2v_cross_attn_scale_shift_table", r"\1.scale_shift_table_a2v_ca_audio"),
))

_BLOCK = r"transformer_blocks\.\d+\."
_ADALN = r"(audio_)?time_embed|av_cross_attn_(video_scale_shift|video_a2v_gate|audio_scale_shift|audio_v2a_gate)|" \
         r"(audio_)?prompt_adaln"
# The Linears by role (both streams; the trainers target the attention projections, the feed-forward on request).
# LTX-2.3's attention gates (to_gate_logits) are left to explicit targets.
ROLES: dict[str, str] = {
    "attention": rf"{_BLOCK}(attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn)\."
                 r"(to_q|to_k|to_v|to_out\.0)",
    "feed_forward": rf"{_BLOCK}(ff|audio_ff)\.net\.(0\.proj|2)",
    "norms": rf"({_ADALN})\.linear",
    "embedders": rf"(audio_)?(proj_in|proj_out)|(audio_)?caption_projection\.linear_[12]"
                 rf"|({_ADALN})\.emb\.timestep_embedder\.linear_[12]",
}

# Names only LTX-2 files have: the audio stream and the audio-video cross attention, in either spelling.
LTX2_ONLY = Sign(r"audio_(attn1|attn2|ff|patchify_proj|proj_in|proj_out|adaln_single|time_embed|caption_projection)|"
                 r"audio_to_video_attn|video_to_audio_attn|av_ca_|av_cross_attn_", "LTX-2's audio stream")

LTX2 = ModelFamily(
    name="ltx2", title="LTX-2",
    pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline",
               "LTX2HDRPipeline", "LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline"),
    denoiser="transformer", denoiser_class="LTX2VideoTransformer3DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "vocoder"),
    variants=("ltx-2",), prediction=("flow",), detect=Detection(kind=(LTX2_ONLY, LTX_NAMES)),
    kohya=Kohya("ltx2"),  # no trainer writes kohya metadata for LTX-2: our choice
    originals=ORIGINALS, roles=ROLES,
    comfyui_paths=(),  # ComfyUI's LTXAV branch maps plain original names (no prefix), no diffusers paths
    tags=("ltx-2",), tiny="helpers.tiny_ltx2:make_ltx2_pipeline",
    # video only, as Lightricks' trainer trains clips without audio (training/flow_video.py); uniform timesteps as
    # LTX-Video's (ltx-trainer's shifted logit-normal sampler is not one of --weighting_scheme's); captions of 1024
    # Gemma tokens, LTX2Pipeline's max_sequence_length
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=1024),
    # LTX2LoraLoaderMixin also loads the `connectors` component (LTX2TextConnectors): `text_embedding_projection.`
    # (Lightricks' name, _convert_non_diffusers_ltx2_lora_to_diffusers) or `connectors.` (diffusers') keys, and the
    # original checkpoint's `video_/audio_embeddings_connector` (dropped by convert_ltx2_transformer_to_diffusers)
    not_adapted=(Sign(r"^(text_embedding_projection|connectors)\.|(video|audio)_embeddings_connector",
                      "LTX-2's text connectors, the pipeline's `connectors` component"),),
)
