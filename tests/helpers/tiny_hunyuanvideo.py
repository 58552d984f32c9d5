"""A tiny HunyuanVideo pipeline with random weights (offline, CPU, seconds): HunyuanVideoPipeline of a tiny Llama
(LlamaModel, the LLaVA-Llama-3 text encoder's class) behind a Llama-3-style byte-level tokenizer written here, CLIP-L's
tokenizer and a tiny CLIPTextModel (tokenizer_2 / text_encoder_2: the pooled vector), AutoencoderKLHunyuanVideo at its
smallest, a 2 + 2-block HunyuanVideoTransformer3DModel and flow matching.

The prompt template: the pipeline wraps the prompt in its DEFAULT_PROMPT_TEMPLATE (a Llama-3 chat header with a
system prompt) and drops a fixed 95 tokens (`crop_start`) off the front of the Llama's hidden states. The tokenizer
here splits text as Llama 3's does (its pre-tokenizer pattern) and holds every piece of that template as one token
(BPE with `ignore_merges`: a piece in the vocabulary is one token, anything else its bytes), so the template's head
is 95 tokens here too, `<|begin_of_text|>` included, and the crop leaves the prompt's tokens alone.

Shapes: Llama hidden 16 (its third-to-last hidden state, the pipeline's default) -> transformer `text_embed_dim`;
CLIP pooled 32 -> `pooled_projection_dim`; the VAE has 3 levels (2x spatial, 4x temporal: (B, 3, 1 + 4k, H, W) <->
(B, 4, 1 + k, H/2, W/2)), so 5 frames of 16 x 16 are 2 latent frames of 8 x 8, 128 tokens.
"""

from __future__ import annotations

import tempfile
from typing import Any

import regex
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import AutoencoderKLHunyuanVideo
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE, HunyuanVideoPipeline
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from helpers.piece_tokenizer import write_piece_tokenizer
from lokr_diffusers.tiny import WORDS, make_text_encoder, make_tokenizer

LLAMA_HIDDEN = 16
LATENT_CHANNELS = 4
# Llama 3's pre-tokenizer pattern (its tokenizer.json): contractions, words with one leading non-letter, up to 3
# digits, punctuation runs, newlines, spaces
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_SPECIAL: tuple[str, ...] = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                  "<|eot_id|>")


def llama_pieces(text: str) -> list[str]:
    """`text` split as Llama 3's tokenizer splits it: special tokens whole, the rest by LLAMA3_SPLIT."""
    pieces: list[str] = []
    for part in regex.split("(" + "|".join(map(regex.escape, LLAMA_SPECIAL)) + ")", text):
        pieces += [part] if part in LLAMA_SPECIAL else regex.findall(LLAMA3_SPLIT, part)
    return pieces


def write_llama_tokenizer_file(directory: str, words: tuple[str, ...] = WORDS) -> str:
    """tokenizer.json (the `tokenizers` format, written as JSON) of a Llama-3-style byte-level BPE: the 256 byte
    symbols, every piece of HunyuanVideo's prompt template and each of `words` bare and after a space as one token
    (`ignore_merges`: no merges needed), then the special tokens; `<|begin_of_text|>` put in front of every text."""
    template = str(DEFAULT_PROMPT_TEMPLATE["template"])
    return write_piece_tokenizer(directory, [*llama_pieces(template), *words, *(" " + w for w in words)],
                                 LLAMA_SPECIAL, LLAMA3_SPLIT, bos="<|begin_of_text|>")


def make_llama_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Llama-3-style tokenizer: bos `<|begin_of_text|>`, eos and pad `<|end_of_text|>`, padding on the right."""
    with tempfile.TemporaryDirectory(prefix="lokr_llamatok_") as d:
        return PreTrainedTokenizerFast.from_pretrained(
            write_llama_tokenizer_file(d), model_max_length=max_length, bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", padding_side="right")


def llama_config(tokenizer: PreTrainedTokenizerFast, layers: int) -> LlamaConfig:
    """Llama at hidden 16: 2 query heads of 8 sharing one key / value head (grouped-query, as Llama 3's)."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLAMA_HIDDEN, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5,
        use_cache=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def make_llama_encoder(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaModel:
    """LlamaModel of 3 layers (4 hidden states: the pipeline takes the third-to-last)."""
    torch.manual_seed(seed)
    return LlamaModel(llama_config(tokenizer, layers=3)).eval()


def make_hunyuanvideo_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo:
    """3 levels of 8 channels, one layer each, no mid-block attention: the first level halves height and width and
    (with the second) halves the frames twice, the fewest levels a 4x temporal ratio takes."""
    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=2, temporal_compression_ratio=4,
        mid_block_add_attention=False).eval()


def make_hunyuanvideo_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """HunyuanVideo-shaped: 2 double + 2 single blocks and 1 token-refiner block of 2 heads x 10 (rope axes
    2 + 4 + 4), the guidance embedder (HunyuanVideo's guidance-distilled model), Llama text states 16, CLIP pooled 32,
    patch 1 x 1 x 1 over 4 latent channels."""
    # the pipeline's hints name LlamaTokenizerFast, which (transformers 5's LlamaTokenizer) would rebuild the
    # tokenizer as Llama 2's SentencePiece one: the Llama-3-style file is read as written, by the generic class
    tokenizer: Any = make_llama_tokenizer()
    tokenizer_2 = make_tokenizer()
    text_encoder = make_llama_encoder(tokenizer, seed=seed + 1)
    text_encoder_2: Any = make_text_encoder(tokenizer_2, hidden=32, seed=seed + 2)  # a CLIPTextModel
    vae = make_hunyuanvideo_vae(seed + 3)
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=10,
        num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=LLAMA_HIDDEN, pooled_projection_dim=text_encoder_2.config.hidden_size,
        rope_axes_dim=(2, 4, 4)).eval()
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                                tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe
