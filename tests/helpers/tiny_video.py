"""Tiny video pipelines with random weights, offline: Wan (one expert, or Wan 2.2 A14B's two). The text encoder is a
UMT5 encoder (Wan's class) behind the tests' T5 tokenizer; the VAE is AutoencoderKLWan at its smallest (4 latent
channels, 2x spatial, no temporal downsampling: (B, 3, F, H, W) <-> (B, 4, F, H/2, W/2))."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from helpers.tiny_dit import make_t5_tokenizer

TEXT_DIM = 16


def _umt5(vocab: int, pad: int, eos: int, seed: int) -> UMT5EncoderModel:
    """UMT5 encoder (per-layer relative attention, gated GELU), 2 layers of 2 heads x 8: (B, L, 16)."""
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=pad,
                     eos_token_id=eos)
    return UMT5EncoderModel(cfg).eval()


def _wan_vae(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=1,
                            scale_factor_spatial=2)


def make_wan_transformer(seed: int) -> WanTransformer3DModel:
    """Wan T2V at 2 blocks of 2 heads x 12 (24), FFN 32, patches 1 x 2 x 2."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def make_wan_pipeline(seed: int = 0, experts: int = 1) -> WanPipeline:
    """Wan text-to-video; `experts=2`: Wan 2.2 A14B's high-noise `transformer` and low-noise `transformer_2`
    (switching at boundary_ratio 0.875, Wan 2.2 T2V's: of two steps, the first runs the one, the second the other)."""
    tokenizer = make_t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=_umt5(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed),
        vae=_wan_vae(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=make_wan_transformer(seed), transformer_2=make_wan_transformer(seed + 1) if experts == 2 else None,
        boundary_ratio=0.875 if experts == 2 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
