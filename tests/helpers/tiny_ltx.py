"""A tiny LTX-Video pipeline with random weights (offline, CPU): LTXPipeline of a T5 text encoder (the offline
tokenizer of tests/helpers/tiny_dit.py), a 2-level AutoencoderKLLTXVideo, a 2-block LTXVideoTransformer3DModel and
FlowMatchEulerDiscreteScheduler. It generates a 9-frame 32 x 32 video in 2 steps in well under a second."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

from helpers.tiny_dit import make_t5_encoder, make_t5_tokenizer

LATENT_CHANNELS = 8


def _ltx_vae(seed: int) -> AutoencoderKLLTXVideo:
    """Patch 4 then one spatio-temporal downscale: 8x spatial, 2x temporal (frames 1 + 2k -> 1 + k latents)."""
    torch.manual_seed(seed)
    return AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS, block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
        down_block_types=("LTXVideoDownBlock3D", "LTXVideoDownBlock3D"), layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
        downsample_type=("conv", "conv"), upsample_residual=(False, False), upsample_factor=(1, 1),
        patch_size=4, patch_size_t=1).eval()


def make_ltxvideo_pipeline(seed: int = 0) -> LTXPipeline:
    """LTX-Video-shaped: 2 blocks of 2 heads x 8, T5 features of 32 (caption_projection 32 -> 16), 8 latent
    channels, patch 1 (the VAE patchifies)."""
    tokenizer = make_t5_tokenizer(max_length=128)
    text_encoder = make_t5_encoder(tokenizer, d_model=32, seed=seed + 1)
    vae = _ltx_vae(seed + 2)
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
        caption_channels=text_encoder.config.d_model)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
