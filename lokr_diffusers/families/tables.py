"""The shape of a family's original-name table: which original (BFL / Stability / Tongyi) module is made of which
diffusers Linears' rows. The tables themselves are data in each family's module; formats/dit.py builds a model's
name map from them.

Each `Rule` says: the original module `original` (the name in the original checkpoint, the one ComfyUI and kohya
use) has as rows, in order, the rows of the diffusers Linears `parts`. One part is a rename; several parts are a
fused original weight (`qkv` = q, k, v rows; Flux.1's `linear1` = q, k, v and the MLP's input rows). `swap` marks an
adaLN projection whose two halves are (shift, scale) in the original and (scale, shift) in diffusers: original rows
[0, h) are diffusers rows [h, 2h) and back. A `RowName` is a name ComfyUI gives to the first rows of an original
(Flux.1's `single_blocks.N.linear1_qkv`). `aliases` give every original a second spelling (HunyuanVideo's: Tencent's
checkpoint names and ComfyUI's internal Flux-style ones), `alias_of` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Only = Literal["all", "last", "not_last"]
Pairs = tuple[tuple[str, tuple[str, ...]], ...]  # (original leaf, its diffusers parts)


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
class OriginalTable:
    """One transformer class's original names. `fusable`: diffusers' `fuse_qkv_projections()` makes its attention
    processors use `to_qkv` / `to_added_qkv` instead of to_q/k/v (False for Z-Image: its processor always calls
    to_q, to_k, to_v). `convs`: (original, diffusers path) of the adaptable convs, each a plain rename (no rows to
    split, no swap); the rules are Linears only. `row_names`: ComfyUI's names for rows of an original.
    `same_names`: the original checkpoint keeps diffusers' names (Qwen-Image, HiDream, most of LTX-Video): every Linear
    no rule covers is an original of its own path (diffusers' single-file converter for it is the identity there).
    `aliases`: (old, new) substring renames, applied in order to `original + "."`, that spell every original a
    second way (HunyuanVideo: Tencent's `double_blocks.0.img_mod.linear` is ComfyUI's `double_blocks.0.img_mod.lin`);
    the alias names the same rows in the original layouts only (never `covering`, which keeps the rules' names).
    `comfyui_aliases`: the aliases are ComfyUI's internal names, the ones its generic key map loads, so
    format="comfyui" writes them instead of the rules' names.

    The rest of the state, for a whole single-file checkpoint (formats/dit_state.py): `params` are (diffusers key
    regex, original key template) for the tensors that are no rule's Linear nor conv (a norm's scale, a learned
    table), the first full match renaming (`\\1`: its groups); `params_kept`: any other such tensor keeps its
    diffusers key. `single_file`: these tables name the whole state, and diffusers' `from_single_file` reads the
    original layout back (its converter for the class); False where diffusers has no converter or the tables do not
    cover the whole state (no single file is written then)."""

    rules: tuple[Rule, ...]
    fusable: bool
    convs: tuple[tuple[str, str], ...] = ()
    row_names: tuple[RowName, ...] = ()
    same_names: bool = False
    aliases: tuple[tuple[str, str], ...] = ()
    comfyui_aliases: bool = False
    params: tuple[tuple[str, str], ...] = ()
    params_kept: bool = False
    single_file: bool = False


def alias_of(table: OriginalTable, original: str) -> str | None:
    """The table's other spelling of `original` (its `aliases` applied), None where the renames change nothing.
    The renames read `original + "."` so that a pattern may end at a name's end as at a dot (`mlp.fc1.`)."""
    name = original + "."
    for old, new in table.aliases:
        name = name.replace(old, new)
    return name[:-1] if name[:-1] != original else None


def blocks(count_key: str, original: str, diffusers: str, pairs: Pairs, only: Only = "all",
           swap: bool = False) -> tuple[Rule, ...]:
    """Rules for one kind of block: `original.{i}.leaf` <- `diffusers.{i}.part`, for each (leaf, parts)."""
    return tuple(Rule(f"{original}.{{i}}.{leaf}", tuple(f"{diffusers}.{{i}}.{p}" for p in parts), swap,
                      count_key, only) for leaf, parts in pairs)


def top(pairs: Pairs, swap: bool = False) -> tuple[Rule, ...]:
    """Rules for top-level modules (no block index)."""
    return tuple(Rule(original, parts, swap) for original, parts in pairs)


# The q / k RMSNorm scales of Flux.1-style double and single blocks (FLUX.1, FLUX.2, Chroma), original <- diffusers
# (convert_flux_transformer_checkpoint_to_diffusers and its FLUX.2 / Chroma twins pop these names)
FLUX_NORMS: tuple[tuple[str, str], ...] = (
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
)

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

# regex fragments of diffusers' attention paths, for the families' roles and ComfyUI paths
QKV_LEAVES = r"to_q|to_k|to_v|to_qkv|add_q_proj|add_k_proj|add_v_proj|to_added_qkv"  # to_qkv: after fusing
BLOCK = r"transformer_blocks\.\d+\."
DIT_ATTN = r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
