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
        if _VAE_ATTENTION.fullmatch(key) and key.endswith(".weight") and value.dim() == 2 and "group_norm" not in key:
            value = value[:, :, None, None]
        out[prefix + _vae_key(key, n_up)] = value.detach().contiguous()
    return out


_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_state(encoder: nn.Module, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIPTextModel / CLIPTextModelWithProjection in open_clip's layout under `prefix`: q, k, v
    joined into in_proj, the projection transposed. Every state key is placed (position_ids, a buffer of indices, is
    not a weight and is left out) or this raises."""
    state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v.detach()
             for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}  # transformers 5's
    # CLIPTextModel has no `text_model.` level (its ...WithProjection has): one spelling here
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        return state.pop(key)

    out[prefix + "token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    for leaf in ("weight", "bias"):
        out[prefix + f"ln_final.{leaf}"] = take(f"text_model.final_layer_norm.{leaf}")
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = take("text_projection.weight").T
    layers: int = getattr(encoder, "config").num_hidden_layers  # noqa: B009  (transformers config, untyped)
    for i in range(layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{leaf}"] = torch.cat(
                [take(f"{ours}self_attn.{p}_proj.{leaf}") for p in ("q", "k", "v")])
            for name, original in _CLIP_LAYER.items():
                out[theirs + f"{original}.{leaf}"] = take(f"{ours}{name}.{leaf}")
    if state:
        raise ValueError(f"{type(encoder).__name__}: {sorted(state)[:3]} have no name in open_clip's layout")
    return {k: v.contiguous() for k, v in out.items()}
