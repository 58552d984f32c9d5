"""A tiny Qwen-Image pipeline (random weights, offline, CPU, seconds): QwenImagePipeline around a tiny
QwenImageTransformer2DModel (tests/helpers/dit_models.py's config), a tiny Qwen2.5-VL text encoder (hidden 16 =
the transformer's joint_attention_dim; a one-block vision tower the text prompts never reach), the byte-level Qwen
tokenizer of tests/helpers/tiny_dit.py, a tiny AutoencoderKLQwenImage (4 latent channels, one 2x spatial
downsampling: packed 2x2 latent patches give the transformer's 16 input channels) and flow matching.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from helpers.dit_models import tiny
from helpers.tiny_dit import QWEN_HIDDEN, make_qwen_tokenizer

LATENT_CHANNELS = 4


def make_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image-shaped: 2 blocks of dim 32 (2 heads x 16), text features 16 from the last hidden state of a
    2-layer Qwen2.5-VL (the pipeline drops its 34 system-prompt tokens)."""
    tokenizer = make_qwen_tokenizer(max_length=1024)
    torch.manual_seed(seed + 1)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, max_position_embeddings=2048),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_HIDDEN,
                           fullatt_block_indexes=[0]),
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = tiny("qwenimage", seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.0] * LATENT_CHANNELS,
                                 latents_std=[1.0] * LATENT_CHANNELS).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
