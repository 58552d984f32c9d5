"""Name map from diffusers' UNet2DConditionModel module paths to the original ("ldm" / "sgm") ones.

CompVis / Stability checkpoints, kohya sd-scripts (SDXL, sometimes SD1.x) and ComfyUI name UNet modules
by the original layout, e.g. diffusers `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` is
ldm `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (kohya: `lora_unet_input_blocks_4_1_..._to_q`).

The map only goes forward, from the model's own module names: incoming names are looked up in it, never
parsed back (module names contain `_`, so `lora_unet_..._to_q` cannot be split reliably).

How the original layout numbers things (one level = one entry of block_out_channels):
- `input_blocks.0.0` is conv_in; then per down level, per layer j: `input_blocks.n.0` the resnet and
  `input_blocks.n.1` the spatial transformer (if the level has attention), then, on every level but the
  last, one more `input_blocks.n.0.op`: the downsampling conv.
- `middle_block.0` / `.1` / `.2`: resnet, transformer, resnet (diffusers resnets.k -> 2k, attentions.k -> 2k+1).
- `output_blocks` mirror the down path with one extra layer per level (diffusers uses the reversed
  layers_per_block + 1); the upsampling conv sits in the level's last layer at `.1.conv`, or `.2.conv`
  when that layer has a transformer at `.1`.
- Inside a transformer every name is the same in both layouts; inside a resnet the leaves are renamed
  (RESNET_RENAMES).
The block structure is computed from the config, so it holds for SD1.x, SD2.x, SDXL and any
UNet2DConditionModel made of the same block types (tiny test UNets included).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

# Leaves of a diffusers ResnetBlock2D -> ldm ResBlock (in_layers / emb_layers / out_layers are
# nn.Sequential in ldm: norm, SiLU, conv | SiLU, linear | norm, SiLU, dropout, conv).
RESNET_RENAMES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Top-level modules that exist in every UNet of the family.
TOP_LEVEL: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# ldm has one `label_emb` (nn.Sequential(nn.Sequential(linear, SiLU, linear))) for the class / SDXL
# "text_time" conditioning; diffusers splits it into class_embedding or add_embedding.
LABEL_EMB: dict[str, str] = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}

# Block types whose ldm layout is known -> whether the block has attentions (spatial transformers).
DOWN_BLOCKS: dict[str, bool] = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCKS: dict[str, bool] = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# Mid block type -> (number of resnets, number of attentions), as UNet2DConditionModel builds them.
MID_BLOCKS: dict[str | None, tuple[int, int]] = {
    "UNetMidBlock2DCrossAttn": (2, 1),
    "UNetMidBlock2D": (1, 0),  # built with num_layers=0, add_attention=False
    None: (0, 0),
}

# UNet2DConditionModel's defaults, so a partial config dict means what it means to diffusers.
_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
}


@dataclass(frozen=True)
class _Target:
    """Where a diffusers module prefix lands in ldm; `resnet`: the next path component is a resnet leaf."""

    ldm: str
    resnet: bool = False


def _get(config: Mapping[str, Any], key: str) -> Any:
    return config.get(key, _DEFAULTS[key])


def ldm_incompatibility(config: Mapping[str, Any]) -> str | None:
    """Why this UNet config has no ldm layout we know (a sentence), or None when it has one."""
    down, up = list(_get(config, "down_block_types")), list(_get(config, "up_block_types"))
    unknown = [t for t in down if t not in DOWN_BLOCKS] + [t for t in up if t not in UP_BLOCKS]
    if unknown:
        return f"block types {sorted(set(unknown))} have no known ldm layout (known: {[*DOWN_BLOCKS, *UP_BLOCKS]})"
    if _get(config, "mid_block_type") not in MID_BLOCKS:
        return f"mid_block_type {_get(config, 'mid_block_type')!r} has no known ldm layout"
    if len(down) != len(up):
        return f"{len(down)} down blocks but {len(up)} up blocks"
    if config.get("dual_cross_attention"):
        return "dual_cross_attention has no ldm counterpart"
    return None


def _layers_per_block(config: Mapping[str, Any], n_levels: int) -> list[int]:
    layers = _get(config, "layers_per_block")
    return [int(layers)] * n_levels if isinstance(layers, int) else [int(n) for n in layers]


def _down_table(config: Mapping[str, Any]) -> dict[str, _Target]:
    down_types = list(_get(config, "down_block_types"))
    layers = _layers_per_block(config, len(down_types))
    table: dict[str, _Target] = {}
    n = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = _Target(f"input_blocks.{n}.0", resnet=True)
            if DOWN_BLOCKS[block_type]:
                table[f"down_blocks.{i}.attentions.{j}"] = _Target(f"input_blocks.{n}.1")
            n += 1
        if i < len(down_types) - 1:  # diffusers: add_downsample = not is_final_block
            table[f"down_blocks.{i}.downsamplers.0.conv"] = _Target(f"input_blocks.{n}.0.op")
            n += 1
    return table


def _up_table(config: Mapping[str, Any]) -> dict[str, _Target]:
    up_types = list(_get(config, "up_block_types"))
    # Up level i mirrors down level (len - 1 - i) and has one layer more (it also eats the skip of
    # the level's downsampler / conv_in).
    layers = [n + 1 for n in reversed(_layers_per_block(config, len(up_types)))]
    table: dict[str, _Target] = {}
    n = 0
    for i, block_type in enumerate(up_types):
        has_attn = UP_BLOCKS[block_type]
        for j in range(layers[i]):
            table[f"up_blocks.{i}.resnets.{j}"] = _Target(f"output_blocks.{n}.0", resnet=True)
            if has_attn:
                table[f"up_blocks.{i}.attentions.{j}"] = _Target(f"output_blocks.{n}.1")
            n += 1
        if i < len(up_types) - 1:  # the upsampler joins the level's last layer, after its transformer
            table[f"up_blocks.{i}.upsamplers.0.conv"] = _Target(f"output_blocks.{n - 1}.{2 if has_attn else 1}.conv")
    return table


def _embedding_table(config: Mapping[str, Any]) -> dict[str, _Target]:
    table: dict[str, _Target] = {}
    text_time = _get(config, "addition_embed_type") == "text_time"
    if text_time:  # SDXL
        table.update({f"add_embedding.{k}": _Target(v) for k, v in LABEL_EMB.items()})
    class_type = _get(config, "class_embed_type")
    # Both would claim ldm's one label_emb; text_time wins, as no ldm UNet has both.
    if class_type in ("timestep", "projection") and not text_time:
        table.update({f"class_embedding.{k}": _Target(v) for k, v in LABEL_EMB.items()})
    elif class_type is None and _get(config, "num_class_embeds") is not None and not text_time:
        table["class_embedding"] = _Target("label_emb")  # nn.Embedding in both (SD x4 upscaler)
    return table


def _prefix_table(config: Mapping[str, Any]) -> dict[str, _Target]:
    """{diffusers module prefix: ldm target}; below a prefix, names are kept (resnets: leaf renamed)."""
    reason = ldm_incompatibility(config)
    if reason is not None:
        raise ValueError(f"UNet config has no ldm name map: {reason}")
    table = {k: _Target(v) for k, v in TOP_LEVEL.items()}
    table.update(_down_table(config))
    n_resnets, n_attentions = MID_BLOCKS[_get(config, "mid_block_type")]
    for k in range(n_resnets):
        table[f"mid_block.resnets.{k}"] = _Target(f"middle_block.{2 * k}", resnet=True)
    for k in range(n_attentions):
        table[f"mid_block.attentions.{k}"] = _Target(f"middle_block.{2 * k + 1}")
    table.update(_up_table(config))
    table.update(_embedding_table(config))
    return table


def _lookup(path: str, table: Mapping[str, _Target]) -> str | None:
    # Our own module path: splitting it on "." is safe (no `_` guessing); longest known prefix wins.
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        target = table.get(".".join(parts[:n]))
        if target is None:
            continue
        tail = parts[n:]
        if target.resnet and tail:
            if tail[0] not in RESNET_RENAMES:
                return None  # e.g. a resnet part with no parameters and no ldm name
            tail = [RESNET_RENAMES[tail[0]], *tail[1:]]
        return ".".join([target.ldm, *tail])
    return None


def diffusers_to_ldm(path: str, config: Mapping[str, Any]) -> str | None:
    """The ldm module path for a diffusers UNet2DConditionModel module path, or None if it has none.

    Args:
        path: a module path as `unet.named_modules()` gives it, e.g.
            `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
        config: the UNet's config (`unet.config`, or a dict; missing keys take diffusers' defaults).
    Returns:
        e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q`. Names below a mapped module are
        kept (`...to_q.base_layer` -> `...to_q.base_layer`). None for modules with no ldm counterpart
        (`time_embedding.cond_proj`, `encoder_hid_proj`, containers such as `down_blocks.0`).
    Raises:
        ValueError: the config uses block types with no known ldm layout (see `ldm_incompatibility`).
    """
    return _lookup(path, _prefix_table(config))


def ldm_module_map(unet: nn.Module) -> dict[str, str]:
    """{diffusers module path: ldm module path} for every module of `unet` that holds parameters itself.

    `unet` is a UNet2DConditionModel (anything with `.config` and diffusers' module names). Modules with
    parameters but no ldm counterpart are left out and logged at debug level. Raises ValueError as
    `diffusers_to_ldm` does.
    """
    config = getattr(unet, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"{type(unet).__name__} has no diffusers config mapping; expected a UNet2DConditionModel")
    table = _prefix_table(config)
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for name, module in unet.named_modules():
        if not name or next(module.parameters(recurse=False), None) is None:
            continue
        ldm = _lookup(name, table)
        if ldm is None:
            unmapped.append(name)
        else:
            mapping[name] = ldm
    if unmapped:
        logger.debug("%d UNet modules have no ldm name: %s", len(unmapped), unmapped)
    if len(set(mapping.values())) != len(mapping):  # the tables are built to be injective; guard anyway
        raise RuntimeError("ldm name map is not one-to-one; this is a bug in lokr_diffusers.formats.ldm")
    return mapping


LDM_UNET_PREFIX = "model.diffusion_model."  # the UNet's tensors in an SD single-file checkpoint


def ldm_state_keys(unet: nn.Module, prefix: str = LDM_UNET_PREFIX) -> dict[str, str]:
    """{state-dict key: the key of the same tensor in an original single-file checkpoint} for every tensor of a
    module with an ldm name (`ldm_module_map`), e.g. `conv_in.weight` ->
    `model.diffusion_model.input_blocks.0.0.weight`."""
    names = ldm_module_map(unet)
    out: dict[str, str] = {}
    for key in unet.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in names:
            out[key] = f"{prefix}{names[module]}.{leaf}"
    return out


def clip_state_key(key: str, prefix: str) -> str:
    """A CLIP text encoder's state-dict key in an original checkpoint under `prefix` (`cond_stage_model.transformer.`,
    `conditioner.embedders.0.transformer.`): transformers 4's names, with the `text_model.` level that transformers 5
    dropped from CLIPTextModel."""
    return prefix + (key if key.startswith(("text_model.", "text_projection")) else "text_model." + key)

