"""The parts of an SD single-file checkpoint beside the UNet (formats/ldm.py) and CLIP-L (`clip_state_key`): the VAE
under `first_stage_model.` and OpenCLIP text encoders (SD2.x's, SDXL's second) in open_clip's own layout.

Original names, read (never copied) from diffusers 0.42.1 `loaders/single_file_utils.py` convert_ldm_vae_checkpoint
and convert_open_clip_checkpoint, the converters `from_single_file` runs (tests/test_sd_single_file.py runs them on
what these functions write):

- VAE: `down_blocks.i.resnets.j` is `down.i.block.j` (conv_shortcut: nin_shortcut), `downsamplers.0.conv` is
  `downsample.conv`, the mid block's resnets `mid.block_1` / `mid.block_2` and its attention `mid.attn_1` (norm, q,
  k, v, proj_out: 1x1 convs, so diffusers' Linear weights (C, C) are (C, C, 1, 1) there), conv_norm_out is norm_out,
  and the decoder's up blocks count the other way (diffusers' up_blocks.i is up.(n - 1 - i)).
- OpenCLIP: `transformer.resblocks.i` with attn.in_proj_weight / in_proj_bias (q, k, v rows in that order),
  attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj; token_embedding.weight, positional_embedding (a bare tensor),
  ln_final, and text_projection as (width, projection): the transpose of diffusers' Linear weight.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

VAE_PREFIX = "first_stage_model."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)")


def _vae_key(key: str, n_up: int) -> str:
    """The original name of one diffusers AutoencoderKL state key (n_up: its decoder's up blocks)."""
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := _VAE_ATTENTION.fullmatch(key):
        return f"{m[1]}.mid.attn_1.{_ATTENTION[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise ValueError(f"vae.{key}: no name in the original single-file layout")


def vae_state(vae: nn.Module, prefix: str = VAE_PREFIX) -> dict[str, Tensor]:
    """An AutoencoderKL's state under its original names (`prefix` + name); the mid attention's Linear weights as
    the original's 1x1 convs."""
    n_up = len(vae.config["up_block_types"])  # type: ignore[index]
    out: dict[str, Tensor] = {}
    for key, value in vae.state_dict().items():
        if value.dim() == 2 and _VAE_ATTENTION.fullmatch(key):  # q / k / v / proj_out weights (norms are 1-d)
            value = value[:, :, None, None]
        out[prefix + _vae_key(key, n_up)] = value.detach().contiguous()
    return out


_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_QKV = ("q", "k", "v")


def open_clip_keys(encoder: nn.Module, prefix: str) -> dict[str, tuple[str, int]]:
    """{the encoder's state key: (its open_clip key under `prefix`, the row where it starts there)}: q, k, v of a
    layer at rows 0, width, 2 · width of its `in_proj_weight` / `in_proj_bias`, everything else at row 0;
    `text_projection.weight` is `text_projection` transposed. position_ids (a buffer of indices) has no key. Raises
    for a key of no known place. Keys are the encoder's own (transformers 5's CLIPTextModel has no `text_model.`
    level, its ...WithProjection has)."""
    out: dict[str, tuple[str, int]] = {}
    for key, value in encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            out[key] = (prefix + "text_projection", 0)
        elif name in _CLIP_TOP:
            out[key] = (prefix + _CLIP_TOP[name], 0)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, module, leaf = m.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                out[key] = (f"{block}attn.in_proj_{leaf}", _QKV.index(qkv[1]) * value.shape[0])
            elif module in _CLIP_LAYER:
                out[key] = (f"{block}{_CLIP_LAYER[module]}.{leaf}", 0)
        if key not in out:
            raise ValueError(f"{type(encoder).__name__}.{key}: no name in open_clip's layout")
    return out


def open_clip_state(encoder: nn.Module, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIPTextModel / CLIPTextModelWithProjection in open_clip's layout under `prefix`
    (`open_clip_keys`): q, k, v joined into in_proj in that order, the projection transposed."""
    state = encoder.state_dict()
    parts: dict[str, list[tuple[int, Tensor]]] = {}
    for key, (original, row) in open_clip_keys(encoder, prefix).items():
        value = state[key].detach()
        parts.setdefault(original, []).append((row, value.T if original.endswith("text_projection") else value))
    return {k: torch.cat([v for _, v in sorted(p, key=lambda rv: rv[0])]).contiguous() for k, p in parts.items()}
