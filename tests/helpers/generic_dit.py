"""Tiny diffusers transformers that no model family names (CogView4, Sana, Mochi, Cosmos), their inputs and their
pipelines: the generic floor's fixtures (any diffusers model loads the diffusers-path layouts, and its attention /
feed-forward Linears are the default targets). Configs are the smallest the classes accept; random weights."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from torch import Tensor, nn

from helpers.dit_files import bare_pipeline

# name: (transformer class, config, its block class (LyCORIS' TARGET_REPLACE_MODULE), a pipeline class of diffusers)
GENERIC: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "cogview4": ("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=16),
        "CogView4TransformerBlock", "CogView4Pipeline"),
    "sana": ("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8), "SanaTransformerBlock", "SanaPipeline"),
    "mochi": ("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16),
        "MochiTransformerBlock", "MochiPipeline"),
    "cosmos": ("CosmosTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=False), "CosmosTransformerBlock", "Cosmos2TextToImagePipeline"),
}


def generic_model(name: str, seed: int = 0) -> nn.Module:
    """The tiny transformer `name`, every weight given a value (some start at zero), fp32, eval mode."""
    cls, config, _, _ = GENERIC[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls)(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def generic_inputs(name: str, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    t = torch.tensor([500.0])
    if name == "cogview4":
        size = torch.tensor([[64.0, 64.0]])
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 16), timestep=t, original_size=size,
                    target_size=size, crop_coords=torch.zeros(1, 2))
    if name == "sana":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 16), timestep=t)
    if name == "mochi":
        return dict(hidden_states=r(1, 4, 2, 4, 4), encoder_hidden_states=r(1, 3, 16), timestep=t,
                    encoder_attention_mask=torch.ones(1, 3, dtype=torch.bool))
    return dict(hidden_states=r(1, 4, 2, 8, 8), timestep=t, encoder_hidden_states=r(1, 3, 16))


def generic_run(model: nn.Module, name: str) -> Tensor:
    with torch.no_grad():
        return model(**generic_inputs(name), return_dict=False)[0]  # type: ignore[no-any-return]


def generic_pipeline(name: str, model: nn.Module | None = None) -> Any:
    """diffusers' pipeline for the class around the tiny transformer (text encoder, VAE left out)."""
    return bare_pipeline(name, model if model is not None else generic_model(name),
                         cls=getattr(diffusers, GENERIC[name][3]))
