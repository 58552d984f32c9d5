"""A tiny HunyuanVideo 1.5 pipeline with random weights (offline, CPU, seconds): HunyuanVideo15Pipeline of a tiny
Qwen2.5-VL text model (Qwen2_5_VLTextModel, the class the pipeline takes: the language model without its vision
tower) behind a Qwen2-style byte-level tokenizer written here, ByT5's tokenizer (ByT5Tokenizer needs no files) and a
tiny T5EncoderModel for the quoted text, AutoencoderKLHunyuanVideo15 at its smallest, the tiny
HunyuanVideo15Transformer3DModel of tests/helpers/dit_models.py, a classifier-free-guidance guider and flow matching.

The prompt template (read, never copied, from diffusers 0.42.1's pipelines/hunyuan_video1_5/
pipeline_hunyuan_video1_5.py): the pipeline puts the prompt in a chat of its system message and the prompt
(`apply_chat_template`, generation prompt added) and drops a fixed 108 tokens (`prompt_template_encode_start_idx`) off
the front of the Qwen hidden states. The tokenizer here splits text as Qwen2's does (its pre-tokenizer pattern) and
holds every piece of that chat's head as one token (BPE with `ignore_merges`: a piece in the vocabulary is one token,
anything else its bytes), so the head is 108 tokens here too and the crop leaves the prompt's tokens alone.

Shapes: Qwen hidden 16 (its third-to-last hidden state, the pipeline's `num_hidden_layers_to_skip` 2) -> the
transformer's `text_embed_dim`; ByT5 d_model 8 -> `text_embed_2_dim`; the image embedding (zeros for text-to-video)
12 wide -> `image_embed_dim`. The VAE has 3 levels (4x spatial, 4x temporal: (B, 3, 1 + 4k, H, W) <->
(B, 4, 1 + k, H/4, W/4)); the transformer takes the latents, a condition latent and a mask channel: 4 + 4 + 1 = 9.
"""

from __future__ import annotations

import tempfile
from typing import Any

import regex
import torch
from diffusers import AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

from helpers.dit_models import tiny
from helpers.piece_tokenizer import write_piece_tokenizer
from helpers.tiny_dit import QWEN_CHAT_TEMPLATE, make_t5_encoder
from lokr_diffusers.tiny import WORDS

QWEN_HIDDEN = 16
BYT5_HIDDEN = 8
LATENT_CHANNELS = 4
CROP = 108  # the pipeline's prompt_template_encode_start_idx
# Qwen2's pre-tokenizer pattern (its tokenizer.json): contractions, words with one leading non-letter, single digits,
# punctuation runs, newlines, spaces
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
QWEN_SPECIAL: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def system_message() -> str:
    """The pipeline's system message, as its prompt encoder's default holds it."""
    import inspect

    return str(inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default)


def qwen_pieces(text: str) -> list[str]:
    """`text` split as Qwen2's tokenizer splits it: special tokens whole, the rest by QWEN2_SPLIT."""
    pieces: list[str] = []
    for part in regex.split("(" + "|".join(map(regex.escape, QWEN_SPECIAL)) + ")", text):
        pieces += [part] if part in QWEN_SPECIAL else regex.findall(QWEN2_SPLIT, part)
    return pieces


def chat_head() -> str:
    """The text the chat template writes before the prompt: the system turn and the user turn's opening."""
    return f"<|im_start|>system\n{system_message()}<|im_end|>\n<|im_start|>user\n"


CHAT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"  # after the prompt: its turn's end and the generation prompt


def write_qwen2_tokenizer_file(directory: str, words: tuple[str, ...] = WORDS) -> str:
    """tokenizer.json (the `tokenizers` format, written as JSON) of a Qwen2-style byte-level BPE: the 256 byte
    symbols, every piece of the chat around the prompt and each of `words` bare and after a space as one token
    (`ignore_merges`: no merges needed), then the special tokens; nothing added around a text (Qwen2 has no BOS)."""
    return write_piece_tokenizer(directory, [*qwen_pieces(chat_head() + CHAT_TAIL), *words, *(" " + w for w in words)],
                                 QWEN_SPECIAL, QWEN2_SPLIT, trim_offsets=False)


def make_qwen2_tokenizer(max_length: int = 2048) -> Any:
    """Qwen2-style tokenizer with a chat template of system / user turns: pad `<|endoftext|>`, eos `<|im_end|>`,
    padding on the right (the pipeline pads its chats to 1000 + 108 tokens)."""
    # Qwen2TokenizerFast would rebuild the tokenizer from a vocab and merges: the file is read as written, by the
    # generic class
    with tempfile.TemporaryDirectory(prefix="lokr_qwen2tok_") as d:
        return PreTrainedTokenizerFast.from_pretrained(
            write_qwen2_tokenizer_file(d), model_max_length=max_length, eos_token="<|im_end|>",
            pad_token="<|endoftext|>", additional_special_tokens=list(QWEN_SPECIAL[1:]), padding_side="right",
            chat_template=QWEN_CHAT_TEMPLATE)


def make_qwen25vl_text_encoder(tokenizer: Any, seed: int = 0) -> Qwen2_5_VLTextModel:
    """Qwen2.5-VL's language model at hidden 16: 3 layers (4 hidden states: the pipeline takes the third-to-last),
    2 query heads of 8 sharing one key / value head, multimodal rope sections (1, 1, 2) of the 4 rotary pairs."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, use_cache=False)
    return Qwen2_5_VLTextModel(config).eval()


def make_hunyuanvideo15_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo15:
    """3 levels of 8 channels, one layer each: the first two halve height, width and frames (4x both ways: the
    fewest levels a 4x temporal ratio takes), the last keeps them."""
    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo15(latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8),
                                       layers_per_block=1, spatial_compression_ratio=4,
                                       temporal_compression_ratio=4).eval()


def make_hunyuanvideo15_pipeline(seed: int = 0) -> HunyuanVideo15Pipeline:
    """HunyuanVideo-1.5-shaped: 2 double blocks and 1 token-refiner block of 2 heads x 8 (rope axes 2 + 2 + 4),
    Qwen text states 16, ByT5 states 8, image embedding 12, patch 1 x 1 x 1 over 4 + 4 + 1 input channels."""
    tokenizer = make_qwen2_tokenizer()
    tokenizer_2 = ByT5Tokenizer()
    text_encoder = make_qwen25vl_text_encoder(tokenizer, seed + 1)
    text_encoder_2 = make_t5_encoder(tokenizer_2, d_model=BYT5_HIDDEN, seed=seed + 2)
    vae = make_hunyuanvideo15_vae(seed + 3)
    transformer = tiny("hunyuanvideo15", seed)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe
