"""Tiny DiT transformers with random weights, and inputs for their forward (offline, CPU, well under a second).

The configs are the smallest the classes accept; the shapes of each forward's inputs are read off
each class's forward signature. Used by tests/test_formats_dit.py and the DiT loader tests.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
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
    # Wan 2.1 I2V-like (image cross-attention: add_k_proj / add_v_proj, the image embedder): 2 heads x 12 = 24
    "wan": (WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=16,
        added_kv_proj_dim=24)),
    "ltxvideo": (LTXVideoTransformer3DModel, dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=8)),
    # video 2 x 8 = 16 wide, audio 2 x 4 = 8: the audio-video cross attentions map between the two widths
    "ltx2": (LTX2VideoTransformer3DModel, dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1, caption_channels=8)),
    "qwenimage": (QwenImageTransformer2DModel, dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4))),
    "qwenimage21": (QwenImage21Transformer2DModel, dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=3, axes_dims_rope=(8, 4, 4))),
    # 4 routed experts, 2 active; rope over 3 axes (its forward's ids have 3), summing to the head dim 8
    "hidream": (HiDreamImageTransformer2DModel, dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1))),
    # Chroma's converter hard-codes inner_dim 3072 (and Lumina 2's its qkv split): their tiny models are checked apart
    "chroma": (ChromaTransformer2DModel, dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=2)),
    "lumina2": (Lumina2Transformer2DModel, dict(  # 3 heads, 1 key / value head of 8: q 24 rows, k and v 8
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(10, 10, 10),
        cap_feat_dim=8)),
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
    if name == "chroma":
        return dict(hidden_states=r(1, 4, 4), encoder_hidden_states=r(1, 3, 12), timestep=t,
                    img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3))
    if name == "lumina2":
        return dict(hidden_states=r(1, 4, 4, 4), timestep=t, encoder_hidden_states=r(1, 3, 8),
                    encoder_attention_mask=torch.ones(1, 3, dtype=torch.bool))
    if name == "sd3":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 12), pooled_projections=r(1, 10),
                    timestep=t)
    if name == "wan":  # latents (batch, channels, frames, height, width): 1 x 2 x 2 patches; 2 image tokens
        return dict(hidden_states=r(1, 4, 1, 4, 4), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 3, 16),
                    encoder_hidden_states_image=r(1, 2, 16))
    if name == "ltxvideo":  # 2 frames of 2 x 2 latent patches (8 channels), 3 caption tokens of 8 features
        return dict(hidden_states=r(1, 8, 8), encoder_hidden_states=r(1, 3, 8), timestep=torch.tensor([500]),
                    encoder_attention_mask=torch.ones(1, 3), num_frames=2, height=2, width=2)
    if name == "ltx2":  # the same video, 3 audio latent frames (4 channels); the captions for both streams
        return dict(hidden_states=r(1, 8, 8), audio_hidden_states=r(1, 3, 4), encoder_hidden_states=r(1, 3, 8),
                    audio_encoder_hidden_states=r(1, 3, 8), timestep=torch.tensor([500.0]), num_frames=2, height=2,
                    width=2, audio_num_frames=3)
    if name == "qwenimage":  # 2 x 2 latent tokens of 2 x 2 patches of 4 channels
        return dict(hidden_states=r(1, 4, 16), encoder_hidden_states=r(1, 3, 16),
                    encoder_hidden_states_mask=torch.ones(1, 3), timestep=t, img_shapes=[(1, 2, 2)])
    if name == "qwenimage21":  # 3 text tokens, then the image slot that stands for the 2 x 2 latent tokens
        img_mask = torch.tensor([[False, False, False, True]])
        return dict(hidden_states=r(1, 4, 16), encoder_hidden_states=r(1, 3, 16), timestep=t, img_shapes=[[(1, 2, 2)]],
                    img_mask=img_mask)
    if name == "hidream":  # Llama features: (len(llama_layers), batch, tokens, caption_channels[1])
        return dict(hidden_states=r(1, 4, 8, 8), timesteps=torch.tensor([500]), encoder_hidden_states_t5=r(1, 3, 8),
                    encoder_hidden_states_llama3=r(2, 1, 3, 4), pooled_embeds=r(1, 8))
    if name == "hunyuanvideo":  # (batch, channels, frames, height, width) latents; 3 text tokens
        return dict(hidden_states=r(1, 4, 1, 2, 2), timestep=t, encoder_hidden_states=r(1, 3, 16),
                    encoder_attention_mask=torch.ones(1, 3), pooled_projections=r(1, 8), guidance=torch.tensor([3.0]))
    if name == "hunyuanvideo15":  # + ByT5 tokens and an image embedding
        return dict(hidden_states=r(1, 9, 1, 2, 2), timestep=t, encoder_hidden_states=r(1, 3, 16),
                    encoder_attention_mask=torch.ones(1, 3), encoder_hidden_states_2=r(1, 2, 8),
                    encoder_attention_mask_2=torch.ones(1, 2), image_embeds=r(1, 2, 12))
    return dict(x=[r(4, 1, 4, 4)], t=t, cap_feats=[r(3, 12)])


def run(model: nn.Module, name: str, **extra: Any) -> Tensor:
    """One forward; the output as one tensor (LTX-2: its video and audio outputs, flattened and joined)."""
    with torch.no_grad():
        outs = model(**inputs(name), return_dict=False, **extra)
    if name == "ltx2":
        return torch.cat([o.flatten() for o in outs])
    out = outs[0]
    return torch.stack(out) if isinstance(out, list) else out
