"""Z-Image (Turbo): ZImageTransformer2DModel (the original is Lumina-2's NextDiT), a Qwen3 text encoder, flow
matching.

Original names (Tongyi), read, never copied, from diffusers 0.42.1 `loaders/single_file_utils.py`
convert_z_image_transformer_checkpoint_to_diffusers and ComfyUI (Comfy-Org/ComfyUI) `comfy/utils.py`
z_image_to_diffusers (commit b3be02d6). The two agree on every name and row order; tests/test_formats_dit.py runs
diffusers' converters.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable, Pairs, blocks, top

# convert_z_image_transformer_checkpoint_to_diffusers: attention.qkv chunked in 3, attention.out ->
# attention.to_out.0, x_embedder -> all_x_embedder.2-1, final_layer -> all_final_layer.2-1 (no swap: its adaLN gives
# a scale only); everything else keeps its name. ComfyUI z_image_to_diffusers: the same, and only the "2-1" (patch 2,
# frame patch 1) embedder has an original name. context_refiner blocks have no adaLN.
_BLOCK: Pairs = (
    ("attention.qkv", ("attention.to_q", "attention.to_k", "attention.to_v")),
    ("attention.out", ("attention.to_out.0",)),
    ("feed_forward.w1", ("feed_forward.w1",)),
    ("feed_forward.w2", ("feed_forward.w2",)),
    ("feed_forward.w3", ("feed_forward.w3",)),
    ("adaLN_modulation.0", ("adaLN_modulation.0",)),
)
# fusable=False: its attention processor always calls to_q, to_k, to_v
ORIGINALS = OriginalTable((
    *top((
        ("x_embedder", ("all_x_embedder.2-1",)),
        ("final_layer.linear", ("all_final_layer.2-1.linear",)),
        ("final_layer.adaLN_modulation.1", ("all_final_layer.2-1.adaLN_modulation.1",)),
        ("t_embedder.mlp.0", ("t_embedder.mlp.0",)),
        ("t_embedder.mlp.2", ("t_embedder.mlp.2",)),
        ("cap_embedder.1", ("cap_embedder.1",)),
    )),
    *blocks("n_layers", "layers", "layers", _BLOCK),
    *blocks("n_refiner_layers", "noise_refiner", "noise_refiner", _BLOCK),
    *blocks("n_refiner_layers", "context_refiner", "context_refiner", _BLOCK),
), fusable=False, single_file=True, params_kept=True, params=(
    # convert_z_image_transformer_checkpoint_to_diffusers renames the q / k norms; the other norms, the pad tokens and
    # cap_embedder.0 (an RMSNorm) keep their names
    (r"(.+)\.attention\.norm_([qk])\.weight", r"\1.attention.\2_norm.weight"),
))

# the Linears by role, as the trainers target them (lokr_diffusers/families/flux.py says whose)
ROLES: dict[str, str] = {
    "attention": r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(to_q|to_k|to_v|to_out\.0)",
    "feed_forward": r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.(w1|w2|w3)",
    "norms": r"(layers|noise_refiner)\.\d+\.adaLN_modulation\.0|all_final_layer\..+\.adaLN_modulation\.1",
    "embedders": r"all_x_embedder\..+|cap_embedder\.1|t_embedder\.mlp\.(0|2)|all_final_layer\..+\.linear",
}
# ComfyUI's model_lora_keys_unet names under `transformer.` (model_base.Lumina2), from z_image_to_diffusers
COMFYUI_PATHS: tuple[str, ...] = (
    r"(layers|noise_refiner|context_refiner)\.\d+\."
    r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)",
    r"all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1|t_embedder\.mlp\.[02]",
)

# NextDiT's original names, Z-Image's and Lumina 2's alike (Lumina 2's diffusers paths keep the refiners' names)
NEXTDIT = Sign(r"noise_refiner|context_refiner|feed_forward[._]w[123]|cap_embedder|layers[._]\d+[._]attention[._]"
               r"(qkv|out)", "NextDiT refiners / attention / feed-forward")
# Z-Image's own: its patch-size-keyed embedder / final layer, its blocks' adaLN (Lumina 2's is adaLN_modulation.1),
# its diffusers attention spelling (Lumina 2's is attn.to_q)
ZIMAGE_ONLY = Sign(r"all_x_embedder|all_final_layer|adaLN_modulation[._]0|attention[._]to_(q|k|v|out)",
                   "Z-Image's embedders / adaLN / attention")

ZIMAGE = ModelFamily(
    name="zimage", title="Z-Image", pipelines=("ZImagePipeline",), denoiser="transformer",
    denoiser_class="ZImageTransformer2DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "tokenizer"), variants=("zimage-turbo",), prediction=("flow",),
    detect=Detection(kind=(ZIMAGE_ONLY, NEXTDIT)),
    kohya=Kohya("zimage"), originals=ORIGINALS, roles=ROLES, comfyui_paths=COMFYUI_PATHS,
    # diffusers 0.42.1 loads LoKr files (through PEFT) for ZImageLoraLoaderMixin
    diffusers_lokr=True,
    # diffusers' Z-Image script (train_dreambooth_lora_z_image.py) trains the transformer only
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=512),
    tags=("z-image",), tiny="helpers.tiny_dit:make_zimage_pipeline",
)
