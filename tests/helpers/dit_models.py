"""Tiny DiT transformers with random weights, and inputs for their forward (offline, CPU, well under a second).

The configs are the smallest the four classes accept; the shapes of each forward's inputs are read off
each class's forward signature. Used by tests/test_formats_dit.py and the DiT loader tests.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)
from torch import Tensor, nn

TINY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "sd3": (SD3Transformer2DModel, dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")),
    "flux2": (Flux2Transformer2DModel, dict(
        in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True)),
    "zimage": (ZImageTransformer2DModel, dict(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=12,
        axes_dims=[4, 6, 6], axes_lens=[64, 64, 64])),
    # Flux.1's converter hard-codes inner_dim 3072 and mlp_ratio 4: its tiny model is checked apart.
    "flux": (FluxTransformer2DModel, dict(
        in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4))),
    # HunyuanVideo's converter hard-codes hidden 3072: its tiny model's row order is checked by hand
    "hunyuanvideo": (HunyuanVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))),
    # its ByT5 embedder (context_embedder_2) is 2048 wide whatever the config: 4.3 M parameters
    "hunyuanvideo15": (HunyuanVideo15Transformer3DModel, dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4))),
}


def tiny(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """The tiny transformer `name` (a key of TINY) with random weights, fp32, eval mode."""
    cls, config = TINY[name]
    torch.manual_seed(seed)
    model = cls(**{**config, **overrides})
    with torch.no_grad():  # some layers start at zero (adaLN, final projections): give every weight a value
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def inputs(name: str, seed: int = 1) -> dict[str, Any]:
    """Keyword arguments for one forward of the tiny transformer `name` (batch 1, a few tokens)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    t = torch.tensor([0.5])
    if name == "flux":
        return dict(hidden_states=r(1, 4, 8), encoder_hidden_states=r(1, 3, 12), pooled_projections=r(1, 10),
                    timestep=t, img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.0]))
    if name == "flux2":
        return dict(hidden_states=r(1, 4, 8), encoder_hidden_states=r(1, 3, 12), timestep=t,
                    img_ids=torch.zeros(1, 4, 4), txt_ids=torch.zeros(1, 3, 4), guidance=torch.tensor([3.0]))
    if name == "sd3":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 12), pooled_projections=r(1, 10),
                    timestep=t)
    if name == "hunyuanvideo":  # (batch, channels, frames, height, width) latents; 3 text tokens
        return dict(hidden_states=r(1, 4, 1, 2, 2), timestep=t, encoder_hidden_states=r(1, 3, 16),
                    encoder_attention_mask=torch.ones(1, 3), pooled_projections=r(1, 8), guidance=torch.tensor([3.0]))
    if name == "hunyuanvideo15":  # + ByT5 tokens and an image embedding
        return dict(hidden_states=r(1, 9, 1, 2, 2), timestep=t, encoder_hidden_states=r(1, 3, 16),
                    encoder_attention_mask=torch.ones(1, 3), encoder_hidden_states_2=r(1, 2, 8),
                    encoder_attention_mask_2=torch.ones(1, 2), image_embeds=r(1, 2, 12))
    return dict(x=[r(4, 1, 4, 4)], t=t, cap_feats=[r(3, 12)])


def run(model: nn.Module, name: str, **extra: Any) -> Tensor:
    """One forward; the output as one tensor."""
    with torch.no_grad():
        out = model(**inputs(name), return_dict=False, **extra)[0]
    return torch.stack(out) if isinstance(out, list) else out
