"""lokr_diffusers.formats.ldm against diffusers' own ldm -> diffusers UNet checkpoint converter.

Oracle: write an ldm-named checkpoint through our map (one distinct empty tensor per parameter), run
`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint` on it, and require the UNet's exact
state_dict key set back, each key holding the very tensor we stored under its ldm name. The converter
only renames keys (no reshapes), so empty stand-in tensors are enough, and full-size UNets are built on
the meta device (SDXL would be ~10 GB in fp32).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch import nn

from lokr_diffusers.formats.ldm import diffusers_to_ldm, ldm_incompatibility, ldm_module_map

LDM_PREFIX = "model.diffusion_model."

SD15: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2, "sample_size": 64,
}
SD21: dict[str, Any] = {
    **SD15, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
    "sample_size": 96,
}
SDXL: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "layers_per_block": 2,
    "sample_size": 128,
}
# Small variants of the family, each exercising a branch the converter knows about.
_TINY: dict[str, Any] = {
    "block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 16, "cross_attention_dim": 32,
    "attention_head_dim": 4, "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "mid_resnet_only": {**_TINY, "mid_block_type": "UNetMidBlock2D"},
    "no_mid": {**_TINY, "mid_block_type": None},
    "class_projection": {**_TINY, "class_embed_type": "projection", "projection_class_embeddings_input_dim": 12},
    "class_timestep": {**_TINY, "class_embed_type": "timestep"},
    "num_class_embeds": {**_TINY, "num_class_embeds": 10},
}
FULL = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


@functools.cache
def unet(name: str) -> UNet2DConditionModel:
    if name == "tiny_sd":
        from lokr_diffusers.tiny import make_sd_pipeline

        return make_sd_pipeline().unet
    if name == "tiny_sdxl":
        from lokr_diffusers.tiny import make_sdxl_pipeline

        return make_sdxl_pipeline().unet
    with torch.device("meta"):  # instant, no memory: we only need names and the config
        return UNet2DConditionModel(**{**FULL, **VARIANTS}[name])


@functools.cache
def round_trip(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ldm checkpoint written through our map, what diffusers' converter makes of it)."""
    model = unet(name)
    mapping = ldm_module_map(model)
    checkpoint: dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        module, param = key.rsplit(".", 1)
        checkpoint[f"{LDM_PREFIX}{mapping[module]}.{param}"] = torch.empty(0)
    return checkpoint, convert_ldm_unet_checkpoint(checkpoint, model.config)


def param_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}


ALL = [*FULL, "tiny_sd", "tiny_sdxl", *VARIANTS]


@pytest.mark.parametrize("name", ALL)
def test_diffusers_converter_inverts_our_map(name: str) -> None:
    model = unet(name)
    checkpoint, converted = round_trip(name)
    ours = ldm_module_map(model)
    assert set(converted) == set(model.state_dict())
    for key, tensor in converted.items():  # each tensor comes back to the key it was written from
        module, param = key.rsplit(".", 1)
        assert tensor is checkpoint[f"{LDM_PREFIX}{ours[module]}.{param}"], key


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_module_mapped_one_to_one(name: str) -> None:
    model = unet(name)
    mapping = ldm_module_map(model)
    assert set(mapping) == param_modules(model)
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert layers <= set(mapping)
    assert len(set(mapping.values())) == len(mapping)
    assert all(diffusers_to_ldm(path, model.config) == ldm for path, ldm in mapping.items())


# (model, diffusers module, ldm module): written by hand from the ldm layout; each pair is confirmed
# by diffusers' converter below, not by our code. The converter reads an upsampler at either
# `output_blocks.n.1.conv` or `.2.conv`, so only these spot checks pin which one (ldm puts Upsample after
# the level's last ResBlock and SpatialTransformer; ComfyUI's unet_to_diffusers agrees).
SPOT_CHECKS = [
    ("sd15", "conv_in", "input_blocks.0.0"),
    ("sd15", "time_embedding.linear_1", "time_embed.0"),
    ("sd15", "time_embedding.linear_2", "time_embed.2"),
    ("sd15", "down_blocks.0.resnets.0.norm1", "input_blocks.1.0.in_layers.0"),
    ("sd15", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("sd15", "down_blocks.0.resnets.0.time_emb_proj", "input_blocks.1.0.emb_layers.1"),
    ("sd15", "down_blocks.0.resnets.1.norm2", "input_blocks.2.0.out_layers.0"),
    ("sd15", "down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
    ("sd15", "down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in"),
    ("sd15", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("sd15", "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("sd15", "down_blocks.2.attentions.1.norm", "input_blocks.8.1.norm"),
    ("sd15", "down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
    ("sd15", "mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
    ("sd15", "mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
    ("sd15", "mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("sd15", "up_blocks.0.resnets.2.conv_shortcut", "output_blocks.2.0.skip_connection"),
    ("sd15", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("sd15", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sd15", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
     "output_blocks.11.1.transformer_blocks.0.ff.net.2"),
    ("sd15", "conv_norm_out", "out.0"),
    ("sd15", "conv_out", "out.2"),
    ("sd21", "down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in"),
    ("sd21", "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "output_blocks.6.1.transformer_blocks.0.attn1.to_out.0"),
    ("sdxl", "add_embedding.linear_1", "label_emb.0.0"),
    ("sdxl", "add_embedding.linear_2", "label_emb.0.2"),
    ("sdxl", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
     "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("sdxl", "mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("sdxl", "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj",
     "output_blocks.5.1.transformer_blocks.1.ff.net.0.proj"),
    ("sdxl", "up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("tiny_sd", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("tiny_sd", "down_blocks.1.attentions.1.proj_out", "input_blocks.5.1.proj_out"),
    ("class_projection", "class_embedding.linear_1", "label_emb.0.0"),
    ("num_class_embeds", "class_embedding", "label_emb"),
    ("mid_resnet_only", "mid_block.resnets.0.conv2", "middle_block.0.out_layers.3"),
]


@pytest.mark.parametrize(("name", "diffusers_path", "ldm_path"), SPOT_CHECKS)
def test_spot_checks(name: str, diffusers_path: str, ldm_path: str) -> None:
    checkpoint, converted = round_trip(name)
    # The converter's view of the pair: what it read at the ldm name is what it writes at ours.
    param = "weight"
    assert converted[f"{diffusers_path}.{param}"] is checkpoint.get(f"{LDM_PREFIX}{ldm_path}.{param}")
    assert diffusers_to_ldm(diffusers_path, unet(name).config) == ldm_path


def test_layers_per_block_list() -> None:
    # The converter takes an int only; expected names worked out by hand from the ldm layout:
    # down level 0 = input 1 + op 2, level 1 = inputs 3, 4; up level 0 = outputs 0-2, level 1 = outputs 3, 4.
    with torch.device("meta"):
        model = UNet2DConditionModel(**{**_TINY, "layers_per_block": (1, 2)})
    mapping = ldm_module_map(model)
    assert set(mapping) == param_modules(model)
    assert len(set(mapping.values())) == len(mapping)
    assert mapping["down_blocks.0.downsamplers.0.conv"] == "input_blocks.2.0.op"
    assert mapping["down_blocks.1.resnets.1.conv1"] == "input_blocks.4.0.in_layers.2"
    assert mapping["up_blocks.0.resnets.2.conv1"] == "output_blocks.2.0.in_layers.2"
    assert mapping["up_blocks.1.attentions.1.proj_in"] == "output_blocks.4.1.proj_in"
    assert "up_blocks.1.attentions.2.proj_in" not in mapping and "up_blocks.0.upsamplers.0.conv" in mapping


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
         "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
        ("down_blocks.0.resnets.0.conv1.base_layer", "input_blocks.1.0.in_layers.2.base_layer"),  # below: kept
        ("down_blocks.0.resnets.0", "input_blocks.1.0"),
        ("down_blocks.0.resnets.0.nonlinearity", None),  # no ldm counterpart, no parameters
        ("down_blocks.0", None),
        ("mid_block", None),
        ("time_embedding.cond_proj", None),
        ("encoder_hid_proj", None),
        ("down_blocks.3.downsamplers.0.conv", None),  # the last level has no downsampler
        ("up_blocks.3.upsamplers.0.conv", None),
    ],
)
def test_diffusers_to_ldm_default_config(path: str, expected: str | None) -> None:
    assert diffusers_to_ldm(path, {}) == expected  # {}: UNet2DConditionModel's defaults, i.e. SD1.x


def test_unknown_block_type_is_refused() -> None:
    config = {**_TINY, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")}
    assert "SimpleCrossAttnDownBlock2D" in (ldm_incompatibility(config) or "")
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        diffusers_to_ldm("conv_in", config)
    assert ldm_incompatibility(SDXL) is None
