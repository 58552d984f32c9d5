"""A tiny, fully offline Chroma pipeline (random weights, a T5 tokenizer written from code), built from
tests/helpers/tiny_dit.py's parts, for the tests only.

Shapes: T5 hidden (32) -> `joint_attention_dim`; VAE latent channels 4, packed 2x2 -> `in_channels` 16 (as FLUX.1's
tiny pipeline, less CLIP: Chroma has no pooled text input).
"""

from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from helpers.tiny_dit import _flow_vae, _flux_scheduler, make_t5_encoder, make_t5_tokenizer


def make_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    """Chroma-shaped: 2 double + 2 single blocks, 2 heads of 8 (rope axes 2 + 2 + 4), a 2-layer approximator of
    width 16 (its 8 input channels: 2 for the timestep, 2 for the guidance, 4 for the modulation index), T5 text
    states (32)."""
    tokenizer = make_t5_tokenizer()
    text_encoder = make_t5_encoder(tokenizer, d_model=32, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.d_model, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=2,
    )
    pipe = ChromaPipeline(scheduler=_flux_scheduler(), vae=_flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
