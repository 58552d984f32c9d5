"""HiDream-I1 (full, dev, fast): HiDreamImageTransformer2DModel, a sparse-MoE DiT of double- and single-stream
blocks; CLIP-L, CLIP-G, T5-XXL and Llama-3.1-8B text encoders; flow matching.

Original names: HiDream's checkpoint keeps diffusers' names. Read, never copied, from diffusers 0.42.1
`loaders/single_file_utils.py` convert_hidream_transformer_to_diffusers (the identity once `model.diffusion_model.`
is stripped), `loaders/lora_conversion_utils.py` _convert_non_diffusers_hidream_lora_to_diffusers (strips
`diffusion_model.`, adds `transformer.`), and ComfyUI (Comfy-Org/ComfyUI) `comfy/ldm/hidream/model.py` (the same
module names) and `comfy/lora.py` model_lora_keys_unet, HiDream branch (commit ec93dcac): every
`diffusion_model.<name>` also answers to `transformer.<name>` and `lycoris_<name _>`. tests/test_formats_dit.py runs
diffusers' converter.

The Linears (tiny and full-size models listed): per block `block.adaLN_modulation.1` (12 · dim rows in a double
block, 6 · dim in a single one), attention `attn1.to_q/to_k/to_v/to_out` (a plain Linear, not diffusers' usual
`to_out.0`) and, in double blocks, the text stream's `attn1.to_q_t/to_k_t/to_v_t/to_out_t`; the image MoE
`ff_i.shared_experts.w1/w2/w3` and `ff_i.experts.{e}.w1/w2/w3` (its router `ff_i.gate` is a Parameter, no Linear),
the text SwiGLU `ff_t.w1/w2/w3` in double blocks. Top level: `t_embedder.timestep_embedder.linear_1/2`,
`p_embedder.pooled_embedder.linear_1/2`, `x_embedder.proj` (a Linear over patches), `caption_projection.{k}.linear`
(num_layers + num_single_layers + 1 of them: one per block and one for T5), `final_layer.linear`,
`final_layer.adaLN_modulation.1`. No convs, no swapped rows.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable

# every Linear keeps its diffusers path (the identity converter). fusable=False: HiDream's attention has no
# fuse_qkv_projections.
ORIGINALS = OriginalTable((), fusable=False, same_names=True, params_kept=True, single_file=True)

_BLOCK = r"(double|single)_stream_blocks\.\d+\.block\."
# The Linears by role, as the trainers target them (ai-toolkit's hidream_model and SimpleTuner: attention and the
# feed-forward experts by diffusers path).
ROLES: dict[str, str] = {
    "attention": rf"{_BLOCK}attn1\.(to_q|to_k|to_v|to_out)(_t)?",
    "feed_forward": rf"{_BLOCK}(ff_i\.(shared_experts|experts\.\d+)|ff_t)\.w[123]",
    "norms": rf"{_BLOCK}adaLN_modulation\.1|final_layer\.adaLN_modulation\.1",
    "embedders": r"t_embedder\.timestep_embedder\.linear_[12]|p_embedder\.pooled_embedder\.linear_[12]"
                 r"|x_embedder\.proj|caption_projection\.\d+\.linear|final_layer\.linear",
}
# ComfyUI's key map names `transformer.<its module name>` for every weight of its model, and its names are these
# diffusers paths: every Linear of the model.
COMFYUI_PATHS: tuple[str, ...] = tuple(ROLES.values())

HIDREAM = ModelFamily(
    name="hidream", title="HiDream-I1", pipelines=("HiDreamImagePipeline",), denoiser="transformer",
    denoiser_class="HiDreamImageTransformer2DModel",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"),
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                "tokenizer_3", "text_encoder_4", "tokenizer_4"),
    variants=("hidream-i1",), prediction=("flow",),
    # the double / single stream blocks' names (FLUX.2's global modulations are `double_stream_modulation_*`)
    detect=Detection(kind=(Sign(r"(double|single)_stream_blocks[._]\d+[._]block|caption_projection[._]\d+[._]linear",
                                "HiDream's stream blocks / caption projections"),)),
    kohya=Kohya("hidream"),  # no trainer's spelling read: the family's name
    originals=ORIGINALS, roles=ROLES, comfyui_paths=COMFYUI_PATHS, tags=("hidream",),
    tiny="helpers.tiny_hidream:make_hidream_pipeline",
    # diffusers' train_dreambooth_lora_hidream.py: uniform σ, 128 tokens, the transformer only
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=128),
)
