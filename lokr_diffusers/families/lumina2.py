"""Lumina 2 (Lumina-Image-2.0): Lumina2Transformer2DModel (the original is Alpha-VLLM's NextDiT, the model Z-Image
grew from), a Gemma-2 text encoder, flow matching.

Original names (Alpha-VLLM), read, never copied, from diffusers 0.42.1 `loaders/single_file_utils.py`
convert_lumina2_to_diffusers and `loaders/lora_conversion_utils.py` _convert_non_diffusers_lumina2_lora_to_diffusers
(the same names; qkv's lora_B split [2304, 768, 768]). tests/test_formats_dit.py runs diffusers' converter.

ComfyUI (Comfy-Org/ComfyUI `comfy/lora.py` model_lora_keys_unet, commit ec93dcac) runs Lumina 2 as the model
Z-Image also is (model_base.Lumina2) and maps diffusers names through `comfy/utils.py` z_image_to_diffusers (commit
b3be02d6): Z-Image's spellings (`layers.N.attention.to_q`, `feed_forward.w1`, `adaLN_modulation.0`) with equal
q / k / v heights, none of which is a Lumina2Transformer2DModel path, and Lumina 2's k / v are shorter (grouped-query
attention). So ComfyUI loads Lumina 2 files by their original names only: `diffusion_model.<original>` and
`lora_unet_<original>` (its generic keys for every weight of its model); `comfyui_paths` is empty.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training
from .tables import OriginalTable, Pairs, blocks, top
from .zimage import NEXTDIT

# convert_lumina2_to_diffusers: attention.qkv split [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
# (hard-coded 2304, 768, 768: 24 and 8 heads of 96) -> attn.to_q, to_k, to_v; attention.out -> attn.to_out.0;
# feed_forward.w1 / w2 / w3 -> feed_forward.linear_1 / linear_2 / linear_3; a block's adaLN_modulation.1 ->
# norm1.linear (no swap: diffusers' LuminaRMSNormZero chunks it in the original's order); context_refiner blocks
# have no adaLN. Top: t_embedder.mlp.0 / 2 -> time_caption_embed.timestep_embedder.linear_1 / 2, cap_embedder.1
# (.0 is an RMSNorm) -> time_caption_embed.caption_embedder.1, final_layer.adaLN_modulation.1 -> norm_out.linear_1
# (a scale only: no swap), final_layer.linear -> norm_out.linear_2, x_embedder keeps its name.
_ATTN_FF: Pairs = (
    ("attention.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),  # unequal heights: q 3 x k, v at full size
    ("attention.out", ("attn.to_out.0",)),
    ("feed_forward.w1", ("feed_forward.linear_1",)),
    ("feed_forward.w2", ("feed_forward.linear_2",)),
    ("feed_forward.w3", ("feed_forward.linear_3",)),
)
_ADALN: Pairs = (("adaLN_modulation.1", ("norm1.linear",)),)  # 4 * hidden rows: scale / gate of attention and MLP
# fusable=False: Lumina2Transformer2DModel has no fuse_qkv_projections (its processor calls to_q, to_k, to_v)
ORIGINALS = OriginalTable((
    *top((
        ("x_embedder", ("x_embedder",)),
        ("t_embedder.mlp.0", ("time_caption_embed.timestep_embedder.linear_1",)),
        ("t_embedder.mlp.2", ("time_caption_embed.timestep_embedder.linear_2",)),
        ("cap_embedder.1", ("time_caption_embed.caption_embedder.1",)),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear_1",)),
        ("final_layer.linear", ("norm_out.linear_2",)),
    )),
    *blocks("num_layers", "layers", "layers", (*_ATTN_FF, *_ADALN)),
    *blocks("num_refiner_layers", "noise_refiner", "noise_refiner", (*_ATTN_FF, *_ADALN)),
    *blocks("num_refiner_layers", "context_refiner", "context_refiner", _ATTN_FF),
), fusable=False, single_file=True, params_kept=True, params=(
    # convert_lumina2_to_diffusers: attention -> attn, q_norm / k_norm -> norm_q / norm_k, attention_norm1 / 2 ->
    # norm1.norm / norm2 (a context refiner's: norm1 / norm2), cap_embedder.0 -> the caption embedder's RMSNorm
    (r"(.+)\.attn\.norm_([qk])\.weight", r"\1.attention.\2_norm.weight"),
    (r"(layers|noise_refiner)\.(\d+)\.norm1\.norm\.weight", r"\1.\2.attention_norm1.weight"),
    (r"context_refiner\.(\d+)\.norm1\.weight", r"context_refiner.\1.attention_norm1.weight"),
    (r"(.+)\.norm2\.weight", r"\1.attention_norm2.weight"),
    (r"time_caption_embed\.caption_embedder\.0\.weight", "cap_embedder.0.weight"),
))

_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+\."
# the Linears by role, as the trainers target them (lokr_diffusers/families/flux.py says whose)
ROLES: dict[str, str] = {
    "attention": rf"{_BLOCKS}attn\.(to_q|to_k|to_v|to_out\.0)",
    "feed_forward": rf"{_BLOCKS}feed_forward\.linear_[123]",
    "norms": r"(layers|noise_refiner)\.\d+\.norm1\.linear|norm_out\.linear_1",
    "embedders": r"x_embedder|time_caption_embed\..+|norm_out\.linear_2",
}
# Lumina 2's own names: its diffusers spellings, and a block's adaLN as the original `adaLN_modulation.1` (Z-Image's
# is `.0`). An original-layout file of attention / feed-forward only fits Z-Image as well (NEXTDIT, shared).
LUMINA2_ONLY = Sign(r"time_caption_embed|feed_forward[._]linear_[123]|(layers|noise_refiner|context_refiner)[._]\d+"
                    r"[._](attn[._]|norm1[._]linear|adaLN_modulation[._]1)", "Lumina 2's adaLN / diffusers names")

LUMINA2 = ModelFamily(
    name="lumina2", title="Lumina 2", pipelines=("Lumina2Pipeline",), denoiser="transformer",
    denoiser_class="Lumina2Transformer2DModel", text_encoders=("text_encoder",),
    components=("transformer", "vae", "text_encoder", "tokenizer"), variants=("lumina-image-2",),
    prediction=("flow",), detect=Detection(kind=(LUMINA2_ONLY, NEXTDIT)), originals=ORIGINALS, roles=ROLES,
    kohya=Kohya("lumina2"),  # kohya sd-scripts library/lumina_util.py MODEL_VERSION_LUMINA_V2 (lumina_train_network)
    comfyui_paths=(),  # ComfyUI maps Z-Image's diffusers spellings here, not Lumina 2's (see the docstring)
    tags=("lumina2",), aliases=("lumina",), tiny="helpers.tiny_lumina2:make_lumina2_pipeline",
    # diffusers' train_dreambooth_lora_lumina2.py: uniform σ, 256 Gemma tokens, the transformer only
    training=Training("flow", (), weighting_scheme="none", max_sequence_length=256),
)
