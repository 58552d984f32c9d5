"""Tiny, fully offline Stable Diffusion pipelines (SD1.x-like and SDXL-like) for the demo and tests.

Random weights, tiny configs, and a byte-level CLIP BPE tokenizer written to disk: no hub access.
Shapes keep the real architectures' structure (attention, ff, resnets, 3x3 convs, two text
encoders for SDXL) at a size that runs in well under a second on a CPU.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

WORDS: tuple[str, ...] = ("a", "photo", "of", "cat", "dog", "sks", "red", "blue", "painting", "style")


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: 256 printable symbols, one per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    order = printable + extra
    return [chr(c) for _, c in sorted(zip(order, codes, strict=True))]


def write_tokenizer_files(directory: str, words: tuple[str, ...] = WORDS) -> str:
    """vocab.json + merges.txt: bytes, bytes + `</w>`, merged `words`, then the special tokens
    last (as in CLIP, so argmax(input_ids) finds the end token)."""
    os.makedirs(directory, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[str] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1], *parts[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return directory


def make_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="lokr_tok_") as d:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(d), model_max_length=77)


def make_text_encoder(tokenizer: CLIPTokenizer, hidden: int = 32, projection: bool = False,
                      seed: int = 0) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5, hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def make_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.x-shaped: conv proj_in/proj_out, one CLIP text encoder (hidden 32)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tokenizer = make_tokenizer()
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(seed), scheduler=scheduler, tokenizer=tokenizer,
        text_encoder=make_text_encoder(tokenizer, seed=seed), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-shaped: linear proj_in/out, text_time embedding, CLIP-L-like and CLIP-G-like encoders."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + te2 projection_dim
        cross_attention_dim=64,  # te1 hidden + te2 hidden
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    tok, tok2 = make_tokenizer(), make_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=make_text_encoder(tok, seed=seed),
        text_encoder_2=make_text_encoder(tok2, projection=True, seed=seed + 1), tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(directory: str, sdxl: bool = False, seed: int = 0) -> str:
    """Write a tiny pipeline to `directory` (diffusers layout) for `from_pretrained(directory)`."""
    pipe = make_sdxl_pipeline(seed) if sdxl else make_sd_pipeline(seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
