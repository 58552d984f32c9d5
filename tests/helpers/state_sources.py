"""Small sources shared by the adapter-state tests: a tiny SD1 pipeline with an even smaller UNet,
LoKr files with random factors (plain and DoRA modules, kohya layout, written by tests/helpers/writers.py)
and a diffusers LoRA file on modules where no LoKr source has DoRA."""

from __future__ import annotations

import functools

import torch
from diffusers import UNet2DConditionModel

from helpers.writers import write_adapter
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers
from lokr_diffusers.tiny import make_sd_pipeline

_MID = "mid_block.attentions.0.transformer_blocks.0."
UNET = [_MID + "attn1.to_q", _MID + "attn2.to_q", _MID + "ff.net.2", "mid_block.resnets.0.conv1"]
TE = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1"]
DORA = {"b": {"unet": {UNET[0]: "out"}, "text_encoder": {TE[0]: "in"}},  # never on a LoRA module
        "c": {"unet": {UNET[0]: "in", UNET[2]: "out"}, "text_encoder": {}}}
LORA_MODULES = {"unet": UNET[1], "text_encoder": TE[1]}  # plain in every LoKr source: sums commute
COMPS = ("unet", "text_encoder")


def base_pipe():
    """make_sd_pipeline's text encoder with an even smaller UNet (one cross-attention block each way,
    and the mid block): the state machine runs thousands of forwards."""
    pipe = make_sd_pipeline(0)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(32,), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32,
        norm_num_groups=8)
    return pipe


def _source(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A kohya-layout LoKr file with random factors (and DoRA where DORA says)."""
    pipe = base_pipe()
    rank = {"a": 1, "b": 2, "c": 4}[name]
    add_lokr(pipe, {"unet": LoKrConfig(r=rank, alpha=rank + 1, target_modules="|".join(map(_re, UNET)),
                                       init_weights=False, use_effective_conv2d=True),
                    "text_encoder": LoKrConfig(r=rank, alpha=2 * rank, target_modules="|".join(map(_re, TE)),
                                               init_weights=False, decompose_both=name == "c")}, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for comp in COMPS:
            for path, layer in lokr_layers(getattr(pipe, comp)):
                for t in layer.factors(name).values():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.4)
                axis = DORA.get(name, {}).get(comp, {}).get(path)
                if axis:
                    w = layer.weight.detach()
                    norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1)) if axis == "out" else \
                        w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
                    layer.set_adapter_tensors(name, layer.factors(name), layer.scaling[name], dora_scale=norm * 1.2)
    return write_adapter(pipe, name, "kohya", components=COMPS)


def _re(path: str) -> str:
    return path.replace(".", r"\.")


def _lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    base = base_pipe()
    out = {}
    for comp, path in LORA_MODULES.items():
        w = getattr(base, comp).get_submodule(path).weight
        prefix = "lora_unet_" if comp == "unet" else "lora_te_text_model_"
        name = prefix + path.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(3.0)
    return out


@functools.cache
def lokr_files() -> dict[str, dict[str, torch.Tensor]]:
    """{"a": plain, "b": DoRA on two modules, "c": DoRA on two others, decompose_both}."""
    return {name: _source(name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}


@functools.cache
def lora_file() -> dict[str, torch.Tensor]:
    return _lora()
