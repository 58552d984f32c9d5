"""The original-layout names of the DiT transformers' Linears, as data (the builder is formats/dit.py).

Each `Rule` says: the original module `original` (the name in the BFL / Stability / Tongyi checkpoint,
the one ComfyUI and kohya use) has as rows, in order, the rows of the diffusers Linears `parts`. One part
is a rename; several parts are a fused original weight (`qkv` = q, k, v rows; Flux.1's `linear1` = q, k,
v and the MLP's input rows). `swap` marks an adaLN projection whose two halves are (shift, scale) in the
original and (scale, shift) in diffusers: original rows [0, h) are diffusers rows [h, 2h) and back. A `RowName`
is a name ComfyUI gives to the first rows of an original (Flux.1's `single_blocks.N.linear1_qkv`).

Where the facts come from (read, never copied; each table names its sources):
- diffusers 0.42.1 `loaders/single_file_utils.py`: convert_flux_transformer_checkpoint_to_diffusers,
  convert_sd3_transformer_checkpoint_to_diffusers, convert_flux2_transformer_checkpoint_to_diffusers,
  convert_z_image_transformer_checkpoint_to_diffusers (original -> diffusers, row splits and swaps);
  `loaders/lora_conversion_utils.py`: _convert_kohya_flux_lora_to_diffusers (kohya `lora_unet_` names),
  _convert_non_diffusers_flux2_lokr_to_diffusers (Flux.2 BFL LoKr names).
- ComfyUI (Comfy-Org/ComfyUI): `comfy/utils.py` flux_to_diffusers, mmdit_to_diffusers,
  z_image_to_diffusers (commit b3be02d6), `comfy/lora.py` model_lora_keys_unet (commit ec93dcac).
The two agree on every name and row order below; tests/test_formats_dit.py runs diffusers' converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Only = Literal["all", "last", "not_last"]


@dataclass(frozen=True)
class Rule:
    """One original module and the diffusers Linears whose rows make it (templates over block index {i}).

    `blocks`: the config key giving how many blocks `{i}` runs over (None: a top-level module).
    `only`: restrict to the last block or the others (SD3's last block is "context pre-only").
    A rule whose parts are all missing from a model is skipped (no guidance embedder, SD3's last block
    without a context MLP, attn2 only in SD3.5's dual-attention blocks); some but not all is an error.
    """

    original: str
    parts: tuple[str, ...]
    swap: bool = False
    blocks: str | None = None
    only: Only = "all"


@dataclass(frozen=True)
class RowName:
    """A name ComfyUI's key map gives to the first rows of an original, which no checkpoint holds as a module:
    `name` is rows [0, `height` · in_features) of `original` (templates over the block index {i})."""

    name: str
    original: str
    height: int  # in units of the original's in_features (Flux.1: hidden_size)
    blocks: str  # the config key giving how many blocks {i} runs over


@dataclass(frozen=True)
class Family:
    """One transformer class's table. `fusable`: diffusers' `fuse_qkv_projections()` makes its attention
    processors use `to_qkv` / `to_added_qkv` instead of to_q/k/v (False for Z-Image: its processor
    always calls to_q, to_k, to_v). `convs`: (original, diffusers path) of the adaptable convs, each a plain
    rename (no rows to split, no swap); the rules above are Linears only. `row_names`: ComfyUI's names for rows of
    an original (RowName)."""

    name: str
    rules: tuple[Rule, ...]
    fusable: bool
    convs: tuple[tuple[str, str], ...] = ()
    row_names: tuple[RowName, ...] = ()


def _blocks(count_key: str, original: str, diffusers: str, pairs: tuple[tuple[str, tuple[str, ...]], ...],
            only: Only = "all", swap: bool = False) -> tuple[Rule, ...]:
    """Rules for one kind of block: `original.{i}.leaf` <- `diffusers.{i}.part`, for each (leaf, parts)."""
    return tuple(Rule(f"{original}.{{i}}.{leaf}", tuple(f"{diffusers}.{{i}}.{p}" for p in parts), swap,
                      count_key, only) for leaf, parts in pairs)


def _top(pairs: tuple[tuple[str, tuple[str, ...]], ...], swap: bool = False) -> tuple[Rule, ...]:
    return tuple(Rule(original, parts, swap) for original, parts in pairs)


QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
# a Flux.1 / Flux.2 double block's attention: the image and text streams' qkv and output projections
DOUBLE_ATTN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", QKV),
    ("txt_attn.qkv", ADD_QKV),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
)

# Flux.1 (FluxTransformer2DModel). convert_flux_transformer_checkpoint_to_diffusers: qkv chunked in 3
# (q, k, v); single_blocks linear1 split (inner, inner, inner, mlp_ratio * inner) -> to_q, to_k, to_v,
# proj_mlp; final_layer.adaLN_modulation.1 swap_scale_shift. ComfyUI flux_to_diffusers: the same rows
# (to_q at 0, to_k at hidden, to_v at 2 * hidden, proj_mlp at 3 * hidden of linear1) and the same swap.
FLUX = Family("flux", (
    *_top((
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
    *_top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *_blocks("num_layers", "double_blocks", "transformer_blocks", (
        ("img_mod.lin", ("norm1.linear",)),
        ("txt_mod.lin", ("norm1_context.linear",)),
        *DOUBLE_ATTN,
        ("img_mlp.0", ("ff.net.0.proj",)),
        ("img_mlp.2", ("ff.net.2",)),
        ("txt_mlp.0", ("ff_context.net.0.proj",)),
        ("txt_mlp.2", ("ff_context.net.2",)),
    )),
    *_blocks("num_single_layers", "single_blocks", "single_transformer_blocks", (
        ("modulation.lin", ("norm.linear",)),
        ("linear1", (*QKV, "proj_mlp")),
        ("linear2", ("proj_out",)),
    )),
), fusable=True, row_names=(
    # ComfyUI comfy/lora.py model_lora_keys_unet (Flux models): every `<x>.linear1.weight` also answers to
    # `<x>.linear1_qkv`, rows (0, 0, hidden_size * 3) of it: q, k, v, which diffusers' fuse_qkv_projections() puts in
    # one Linear (attn.to_qkv). Flux.2 has the key too (its model subclasses Flux), but there the rows are part of
    # one diffusers Linear (to_qkv_mlp_proj), which no LoKr on a diffusers module can hold: Flux.1 only.
    RowName("single_blocks.{i}.linear1_qkv", "single_blocks.{i}.linear1", 3, "num_single_layers"),
))

# Flux.2 / Klein (Flux2TransformerBlock). convert_flux2_transformer_checkpoint_to_diffusers: double-block
# qkv chunked in 3; single blocks already fused in diffusers (linear1 = attn.to_qkv_mlp_proj, linear2 =
# attn.to_out, 1:1); modulation is global (`double_stream_modulation_img.lin`, ...), not per block;
# final_layer.adaLN_modulation.1 swapped. _convert_non_diffusers_flux2_lokr_to_diffusers: the same names.
# ComfyUI flux_to_diffusers (Flux2 is a Flux subclass there) maps ff.linear_in/out and to_qkv_mlp_proj.
FLUX2 = Family("flux2", (
    *_top((
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
    *_top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *_blocks("num_layers", "double_blocks", "transformer_blocks", (
        *DOUBLE_ATTN,
        ("img_mlp.0", ("ff.linear_in",)),  # SwiGLU: one Linear of 2 * hidden rows in both layouts
        ("img_mlp.2", ("ff.linear_out",)),
        ("txt_mlp.0", ("ff_context.linear_in",)),
        ("txt_mlp.2", ("ff_context.linear_out",)),
    )),
    *_blocks("num_single_layers", "single_blocks", "single_transformer_blocks", (
        ("linear1", ("attn.to_qkv_mlp_proj",)),
        ("linear2", ("attn.to_out",)),
    )),
), fusable=True)

# SD3 / SD3.5 MMDiT (SD3Transformer2DModel). convert_sd3_transformer_checkpoint_to_diffusers: qkv
# chunked in 3; the last block's context_block has no attn.proj and no mlp (context pre-only) and its
# adaLN_modulation.1 is swapped (AdaLayerNormContinuous, 2 * dim rows), as is final_layer's; attn2
# (SD3.5-medium's dual attention) only in the blocks that have it. ComfyUI mmdit_to_diffusers: the same.
# x_embedder.proj (pos_embed.proj, the patch embedding) is a Conv2d: in `convs`, a rename (the converter's
# pos_embed.proj.weight = x_embedder.proj.weight; ComfyUI MMDIT_MAP_BASIC the same; kohya's lora_sd3.py trains it
# as lora_unet_x_embedder_proj when emb_dims asks for the embedders).
_SD3_BLOCK = (
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
SD3 = Family("sd3", (
    *_top((
        ("context_embedder", ("context_embedder",)),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        ("final_layer.linear", ("proj_out",)),
    )),
    *_top((("final_layer.adaLN_modulation.1", ("norm_out.linear",)),), swap=True),
    *_blocks("num_layers", "joint_blocks", "transformer_blocks", _SD3_BLOCK),
    *_blocks("num_layers", "joint_blocks", "transformer_blocks",
             (("context_block.adaLN_modulation.1", ("norm1_context.linear",)),), only="not_last"),
    *_blocks("num_layers", "joint_blocks", "transformer_blocks",
             (("context_block.adaLN_modulation.1", ("norm1_context.linear",)),), only="last", swap=True),
), fusable=True, convs=(("x_embedder.proj", "pos_embed.proj"),))

# Z-Image (ZImageTransformer2DModel; the original is Lumina-2's NextDiT). convert_z_image_transformer_
# checkpoint_to_diffusers: attention.qkv chunked in 3, attention.out -> attention.to_out.0,
# x_embedder -> all_x_embedder.2-1, final_layer -> all_final_layer.2-1 (no swap: its adaLN gives a scale
# only); everything else keeps its name. ComfyUI z_image_to_diffusers: the same, and only the "2-1"
# (patch 2, frame patch 1) embedder has an original name. context_refiner blocks have no adaLN.
_ZIMAGE_BLOCK = (
    ("attention.qkv", ("attention.to_q", "attention.to_k", "attention.to_v")),
    ("attention.out", ("attention.to_out.0",)),
    ("feed_forward.w1", ("feed_forward.w1",)),
    ("feed_forward.w2", ("feed_forward.w2",)),
    ("feed_forward.w3", ("feed_forward.w3",)),
    ("adaLN_modulation.0", ("adaLN_modulation.0",)),
)
ZIMAGE = Family("zimage", (
    *_top((
        ("x_embedder", ("all_x_embedder.2-1",)),
        ("final_layer.linear", ("all_final_layer.2-1.linear",)),
        ("final_layer.adaLN_modulation.1", ("all_final_layer.2-1.adaLN_modulation.1",)),
        ("t_embedder.mlp.0", ("t_embedder.mlp.0",)),
        ("t_embedder.mlp.2", ("t_embedder.mlp.2",)),
        ("cap_embedder.1", ("cap_embedder.1",)),
    )),
    *_blocks("n_layers", "layers", "layers", _ZIMAGE_BLOCK),
    *_blocks("n_refiner_layers", "noise_refiner", "noise_refiner", _ZIMAGE_BLOCK),
    *_blocks("n_refiner_layers", "context_refiner", "context_refiner", _ZIMAGE_BLOCK),
), fusable=False)

# diffusers class name -> family table.
FAMILIES: dict[str, Family] = {
    "FluxTransformer2DModel": FLUX,
    "Flux2Transformer2DModel": FLUX2,
    "SD3Transformer2DModel": SD3,
    "ZImageTransformer2DModel": ZIMAGE,
}

# What diffusers' Attention.fuse_projections() adds: (separate leaves, in row order) -> the fused Linear.
FUSED_BY_DIFFUSERS: dict[tuple[str, ...], str] = {
    ("to_q", "to_k", "to_v"): "to_qkv",
    ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv",
}
