"""A tiny, fully offline Lumina 2 pipeline (random weights, a Gemma-style tokenizer written from code) for the tests
only, built as tests/helpers/tiny_dit.py's.

Shapes: Gemma-2's penultimate hidden state (16) -> `cap_feat_dim`; Lumina2Pipeline assumes a VAE downscale of 8 (its
`vae_scale_factor` is fixed), so the VAE has four blocks: a 32x32 picture is a 4x4 latent, 2x2 patches.
"""

from __future__ import annotations

import json
import os
import string
import tempfile

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

from lokr_diffusers.tiny import WORDS

GEMMA_HIDDEN = 16
GEMMA_SPECIAL: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")  # Gemma's ids 0..3


def write_gemma_tokenizer_file(directory: str, words: tuple[str, ...] = WORDS) -> str:
    """tokenizer.json of a Unigram model with Gemma's special tokens (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3),
    `▁word` pieces for `words`, single characters for anything else, `<bos>` prepended (as Gemma's)."""
    os.makedirs(directory, exist_ok=True)
    pieces = [[t, 0.0] for t in GEMMA_SPECIAL] + [["▁", -2.0]] + [["▁" + w, -1.0] for w in words]
    pieces += [[c, -5.0] for c in string.ascii_letters + string.digits + string.punctuation]
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    seq, bos = {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(GEMMA_SPECIAL)],
        "pre_tokenizer": metaspace, "decoder": metaspace,
        "post_processor": {
            "type": "TemplateProcessing", "single": [bos, seq], "pair": [bos, seq, bos, {"Sequence": {"id": "B",
                                                                                                 "type_id": 0}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
        },
        "model": {"type": "Unigram", "unk_id": 3, "vocab": pieces, "byte_fallback": False},
    }
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh, ensure_ascii=False)
    return directory


def make_gemma_tokenizer(max_length: int = 512) -> GemmaTokenizerFast:
    with tempfile.TemporaryDirectory(prefix="lokr_gemmatok_") as d:
        return GemmaTokenizerFast.from_pretrained(write_gemma_tokenizer_file(d), model_max_length=max_length,
                                                  pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                                  unk_token="<unk>")


def make_gemma2_encoder(tokenizer: GemmaTokenizerFast, layers: int = 2, seed: int = 0) -> Gemma2Model:
    """Gemma-2 at hidden 16: 2 query heads of 8 sharing 1 key / value head (grouped-query, as Gemma-2-2B)."""
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=GEMMA_HIDDEN, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        use_cache=False,
    )
    return Gemma2Model(config).eval()


def _vae8(seed: int) -> AutoencoderKL:
    """Four blocks (downscale 8, as Lumina2Pipeline assumes), 4 latent channels: (B, 3, H, W) <-> (B, 4, H/8, W/8)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
        scaling_factor=0.3611, shift_factor=0.1159,
    )


def make_lumina2_pipeline(seed: int = 0) -> Lumina2Pipeline:
    """Lumina-2-shaped: 2 layers, 1 noise and 1 context refiner, hidden 24 in 3 heads of 8 sharing 1 key / value
    head (q 24 rows, k and v 8: unequal, as the real 2304 / 768 / 768), a 2-layer Gemma-2 (caption features 16)."""
    tokenizer = make_gemma_tokenizer()
    text_encoder = make_gemma2_encoder(tokenizer, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(1024, 64, 64),
        cap_feat_dim=GEMMA_HIDDEN,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=scheduler, vae=_vae8(seed), text_encoder=text_encoder,
                           tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
