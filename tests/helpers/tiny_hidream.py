"""A tiny HiDream-I1 pipeline with random weights (offline, CPU, seconds): HiDreamImagePipeline of two tiny CLIP text
encoders with projections (CLIP-L, CLIP-G: their projected pooled vectors, joined, are the pooled input), a tiny T5
encoder (tests/helpers/tiny_dit.py), a tiny LlamaForCausalLM behind the Llama-3-style tokenizer of
tests/helpers/tiny_hunyuanvideo.py, a Flux-style AutoencoderKL, flow matching and a one double + one single block
HiDreamImageTransformer2DModel (4 routed experts, 2 active).

Shapes: CLIP projections 8 + 8 -> transformer `text_emb_dim` 16; T5 hidden 16 and Llama hidden 16 ->
`caption_channels`; the Llama's 2 layers' hidden states (the pipeline stacks all but the embeddings) feed the two
blocks (`llama_layers` 0, 1). The pipeline always rescales the picture to the area of its `default_sample_size`
(128 latent pixels a side, HiDream's 1024 px): the tiny pipeline's is 16, so it makes 32 x 32 pictures (a 16 x 16
latent of 4 channels, 2 x 2 patches: 64 image tokens). The CLIP encoders have 128 positions: the pipeline pads
their prompts to 128 tokens (HiDream's CLIPs are long-context ones).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_hidream_image import HiDreamImageTransformer2DModel
from diffusers.pipelines.hidream_image.pipeline_hidream_image import HiDreamImagePipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, LlamaForCausalLM

from helpers.tiny_dit import make_t5_encoder, make_t5_tokenizer
from helpers.tiny_hunyuanvideo import LLAMA_HIDDEN, llama_config, make_llama_tokenizer
from lokr_diffusers.tiny import write_tokenizer_files

TEXT_LENGTH = 128  # the pipeline's max_sequence_length: every tokenizer pads to it
CLIP_PROJECTION = 8
LATENT_CHANNELS = 4
SAMPLE_SIZE = 16  # latent pixels a side


def make_clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="lokr_tok_") as d:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(d), model_max_length=TEXT_LENGTH)


def make_clip_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """CLIP text model, hidden 16 in 2 heads, 2 layers, 128 positions, projection 8."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=TEXT_LENGTH, projection_dim=CLIP_PROJECTION, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    return CLIPTextModelWithProjection(config).eval()


def make_hidream_pipeline(seed: int = 0) -> HiDreamImagePipeline:
    """HiDream-I1-shaped: 1 double-stream and 1 single-stream block of 4 heads x 8 (rope axes 4 + 2 + 2), a sparse
    MoE of 4 routed experts (2 active) and a shared one, 2 x 2 patches over 4 latent channels."""
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_clip_tokenizer()
    tokenizer_3 = make_t5_tokenizer(max_length=TEXT_LENGTH)
    tokenizer_4: Any = make_llama_tokenizer(max_length=TEXT_LENGTH)  # HiDream's hint: PreTrainedTokenizerFast
    text_encoder = make_clip_encoder(tokenizer, seed + 1)
    text_encoder_2 = make_clip_encoder(tokenizer_2, seed + 2)
    text_encoder_3 = make_t5_encoder(tokenizer_3, d_model=16, seed=seed + 3)
    llama = llama_config(tokenizer_4, layers=2)
    llama._attn_implementation = "eager"  # the pipeline asks for the attentions, which sdpa does not give
    torch.manual_seed(seed + 4)
    text_encoder_4 = LlamaForCausalLM(llama).eval()
    torch.manual_seed(seed + 5)
    vae = AutoencoderKL(  # Flux's kind (HiDream's VAE): no quant convs, a shift as well as a scale
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()
    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_channels=[text_encoder_3.config.d_model, LLAMA_HIDDEN],
        text_emb_dim=2 * CLIP_PROJECTION, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
        max_resolution=(SAMPLE_SIZE, SAMPLE_SIZE), llama_layers=[0, 1]).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3, text_encoder_4=text_encoder_4, tokenizer_4=tokenizer_4, transformer=transformer)
    pipe.default_sample_size = SAMPLE_SIZE  # the pipeline rescales every picture to this area (HiDream's: 128)
    pipe.set_progress_bar_config(disable=True)
    return pipe
