"""A tiny LTX-2 pipeline with random weights (offline, CPU, about a second to build): LTX2Pipeline of a tiny Gemma-3
(Gemma3ForConditionalGeneration, the class the pipeline's hints name, with a one-layer SigLIP vision tower it never
runs for text) behind the tests' offline Gemma tokenizer (tests/helpers/tiny_lumina2.py), LTX2TextConnectors, a
2-level AutoencoderKLLTX2Video, AutoencoderKLLTX2Audio and LTX2Vocoder at their smallest, tests/helpers/dit_models.py's
tiny LTX2VideoTransformer3DModel and FlowMatchEulerDiscreteScheduler with LTX-2's dynamic shifting.

Shapes, read, never copied, from diffusers 0.42.1's pipelines/ltx2/pipeline_ltx2.py and connectors.py:
  - Gemma-3 hidden 16, 2 layers: the pipeline stacks its 3 hidden states (embeddings + 2 layers) into (B, L, 16 · 3);
    the connectors project them to 16 (`caption_channels` · `text_proj_in_factor` -> `caption_channels`), run a
    2 x 8 (= 16) wide connector per stream over L tokens (L a multiple of their 8 learnable registers) and hand the
    transformer (B, L, 16) for each stream: its `caption_channels` is 16.
  - video: patch 4 then one spatio-temporal downscale (32x spatial is what the pipeline asks of height and width;
    here 8x, 2x temporal): 8 latent channels, (B, 3, 1 + 2k, H, W) <-> (B, 8, 1 + k, H/8, W/8).
  - audio: 2 latent channels x 8 mel bins / 4 = 2 latent bins, packed (B, L, 2 · 2 = 4) = the transformer's
    `audio_in_channels`; the audio VAE's latents_mean / latents_std (its `base_channels` long) apply to those packed
    4 features, so `base_channels` is 4. 16 kHz, hop 160: 25 latent audio frames a second.
  - vocoder: the decoded mel (B, 2, T, 8) flattened to 16 channels, upsampled 4x to a stereo waveform.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2Pipeline,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizerFast, SiglipVisionConfig

from helpers.dit_models import tiny
from helpers.tiny_lumina2 import make_gemma_tokenizer

GEMMA_HIDDEN = 16
GEMMA_LAYERS = 2
LATENT_CHANNELS = 8
REGISTERS = 8  # the connectors' learnable registers: max_sequence_length must be a multiple


def make_gemma3_tokenizer(max_length: int = 1024) -> GemmaTokenizerFast:
    """The offline Gemma tokenizer, padding on the left (as LTX2Pipeline sets it before encoding)."""
    tokenizer = make_gemma_tokenizer(max_length)
    tokenizer.padding_side = "left"
    return tokenizer


def make_gemma3_encoder(tokenizer: GemmaTokenizerFast, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Gemma-3 at hidden 16 (2 query heads of 8 sharing 1 key / value head), 2 layers, one sliding and one full
    attention as Gemma-3 alternates them; a SigLIP tower of 1 layer over 16 x 16 images (4 x 4 patches pooled to 4
    image tokens)."""
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=GEMMA_HIDDEN, intermediate_size=32,
                num_hidden_layers=GEMMA_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=2048, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, use_cache=False)
    vision = SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).eval()


def make_connectors(seed: int = 0) -> LTX2TextConnectors:
    """LTX-2.0's connectors (one shared projection, masked mean / range normalisation) at width 16."""
    torch.manual_seed(seed)
    return LTX2TextConnectors(
        caption_channels=GEMMA_HIDDEN, text_proj_in_factor=GEMMA_LAYERS + 1, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=REGISTERS, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=REGISTERS, connector_rope_base_seq_len=64).eval()


def make_ltx2_video_vae(seed: int = 0) -> AutoencoderKLLTX2Video:
    """Patch 4 then one spatio-temporal downscale: 8x spatial, 2x temporal (frames 1 + 2k -> 1 + k latents); per-channel
    latent statistics other than 0 / 1, so that a latent normalisation left out or inverted shows."""
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        latent_channels=LATENT_CHANNELS, block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
        down_block_types=("LTX2VideoDownBlock3D", "LTX2VideoDownBlock3D"), layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
        downsample_type=("spatiotemporal", "spatial"), upsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=4, patch_size_t=1).eval()
    with torch.no_grad():
        vae.latents_mean.copy_(torch.randn(LATENT_CHANNELS) * 0.1)
        vae.latents_std.copy_(0.5 + torch.rand(LATENT_CHANNELS))
    return vae


def make_ltx2_audio_vae(seed: int = 0) -> AutoencoderKLLTX2Audio:
    """Stereo mel of 8 bins -> 2 latent channels x 2 bins (4x down in time and frequency, the class's fixed ratio)."""
    torch.manual_seed(seed)
    return AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1,
                                  in_channels=2, latent_channels=2, mel_bins=8).eval()


def make_ltx2_vocoder(seed: int = 0) -> LTX2Vocoder:
    torch.manual_seed(seed)
    return LTX2Vocoder(in_channels=16, hidden_channels=8, out_channels=2, upsample_kernel_sizes=[4, 4],
                       upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1]],
                       output_sampling_rate=640).eval()


def make_ltx2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """LTX-2's scheduler settings: resolution-dependent shift (mu from the token count, 0.95 at 1024 tokens to 2.05 at
    4096) stretched to a terminal sigma of 0.1."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                           base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)


def make_ltx2_pipeline(seed: int = 0) -> LTX2Pipeline:
    """LTX-2-shaped (LTX-2.0: no per-modality projections, no prompt adaLN): the whole pipeline at its smallest."""
    tokenizer: Any = make_gemma3_tokenizer()
    text_encoder = make_gemma3_encoder(tokenizer, seed + 1)
    transformer = tiny("ltx2", seed, caption_channels=GEMMA_HIDDEN, num_layers=2)
    pipe = LTX2Pipeline(scheduler=make_ltx2_scheduler(), vae=make_ltx2_video_vae(seed + 2),
                        audio_vae=make_ltx2_audio_vae(seed + 3), text_encoder=text_encoder, tokenizer=tokenizer,
                        connectors=make_connectors(seed + 4), transformer=transformer,
                        vocoder=make_ltx2_vocoder(seed + 5))
    pipe.set_progress_bar_config(disable=True)
    return pipe
