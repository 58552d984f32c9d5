"""Tiny, fully offline DiT pipelines (Flux.1, SD3, Flux.2 Klein, Z-Image) for tests and training runs.

Same idea as `tiny.py`: random weights, tiny configs, tokenizers written to a temporary directory from
code (no hub). Each pipeline keeps its real architecture's wiring (two or three text encoders, the
T5 / Qwen3 hidden size feeding the transformer's context input, packed 2x2 latent patches, flow-matching
scheduler) at a size that generates a 32x32 picture in a fraction of a second on a CPU.

Shapes (the joins the pipelines check or assume):

- Flux.1: CLIP-L pooled (32) -> `pooled_projection_dim`; T5 hidden (32) -> `joint_attention_dim`;
  VAE latent channels 4, packed 2x2 -> transformer `in_channels` 16.
- SD3: CLIP-L and CLIP-G penultimate states (32 + 32) zero-padded to the T5 hidden (64) ->
  `joint_attention_dim`; their projections (32 + 32) -> `pooled_projection_dim` 64.
- Flux.2 Klein: three Qwen3 hidden states (layers 9, 18, 27, the pipeline's default) stacked on the
  channel axis (3 x 16) -> `joint_attention_dim` 48; VAE latent channels 4, patchified -> `in_channels` 16.
- Z-Image: Qwen3's penultimate hidden state (16) -> `cap_feat_dim`; VAE latent channels 4 = `in_channels`
  (the transformer patchifies itself).

The VAEs have two blocks (downscale 2, not 8): a 32x32 picture is a 16x16 latent, 8x8 = 64 image tokens.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from lokr_diffusers.families import build_tiny
from lokr_diffusers.tiny import WORDS, _byte_symbols, make_text_encoder, make_tokenizer

Family = Literal["flux", "sd3", "flux2", "zimage"]  # the registry's names (lokr_diffusers/families/)
FAMILIES: tuple[Family, ...] = ("flux", "sd3", "flux2", "zimage")

# The hidden states Flux2KleinPipeline stacks by default (`text_encoder_out_layers`): the tiny Qwen3 is
# deep enough (27 layers, 28 hidden states) that the pipeline runs with its defaults.
KLEIN_TEXT_LAYERS: tuple[int, ...] = (9, 18, 27)
QWEN_HIDDEN = 16

# Qwen3's chat template cut to what the pipelines use: user turns, the generation prompt, and the empty
# thinking block Qwen3 writes when `enable_thinking=False` (Klein passes False, Z-Image True).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_SPECIAL: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


# Tokenizers ------------------------------------------------------------------------------------------

T5_SPECIAL: tuple[str, ...] = ("<pad>", "</s>", "<unk>")


def write_t5_tokenizer_file(directory: str, words: tuple[str, ...] = WORDS) -> str:
    """tokenizer.json of a SentencePiece-style Unigram model, written as JSON (the `tokenizers` format 1.0;
    no import of `tokenizers`, which is not a declared dependency): `<pad>`=0, `</s>`=1, `<unk>`=2 as in
    T5, `▁word` pieces for `words` (one token each), single characters (ASCII letters, digits,
    punctuation) for anything else, `</s>` appended. No sentinel `<extra_id_*>` tokens."""
    os.makedirs(directory, exist_ok=True)
    pieces = [[t, 0.0] for t in T5_SPECIAL] + [["▁", -2.0]] + [["▁" + w, -1.0] for w in words]
    pieces += [[c, -5.0] for c in string.ascii_letters + string.digits + string.punctuation]
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    seq, eos = {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(T5_SPECIAL)],
        "pre_tokenizer": metaspace, "decoder": metaspace,
        "post_processor": {
            "type": "TemplateProcessing", "single": [seq, eos],
            "pair": [seq, eos, {"Sequence": {"id": "B", "type_id": 0}}, eos],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
        },
        "model": {"type": "Unigram", "unk_id": 2, "vocab": pieces, "byte_fallback": False},
    }
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh, ensure_ascii=False)
    return directory


def make_t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """T5-style tokenizer (pad 0, eos 1, unk 2; vocabulary 108 with the default words)."""
    with tempfile.TemporaryDirectory(prefix="lokr_t5tok_") as d:
        return T5TokenizerFast.from_pretrained(write_t5_tokenizer_file(d), model_max_length=max_length,
                                               extra_ids=0, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def write_qwen_tokenizer_files(directory: str, words: tuple[str, ...] = WORDS,
                               special: tuple[str, ...] = QWEN_SPECIAL) -> str:
    """Byte-level BPE vocab.json + merges.txt as Qwen2 writes them: the 256 byte symbols, each word merged
    whole then with its leading space (`Ġ`, so " dog" is one token), then the `special` tokens (the chat's)."""
    os.makedirs(directory, exist_ok=True)
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges: list[str] = []

    def merge(a: str, b: str) -> str:
        if f"{a} {b}" not in merges:
            merges.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
        return a + b

    for word in words:
        whole = word[0]
        for c in word[1:]:
            whole = merge(whole, c)
        merge("Ġ", whole)
    for token in special:
        vocab[token] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return directory


def make_qwen_tokenizer(max_length: int = 512) -> Qwen2TokenizerFast:
    """Qwen2/Qwen3-style tokenizer with a chat template (both Qwen pipelines call `apply_chat_template`):
    pad `<|endoftext|>`, eos `<|im_end|>`, no unk (byte-level covers every input)."""
    with tempfile.TemporaryDirectory(prefix="lokr_qwentok_") as d:
        return Qwen2TokenizerFast.from_pretrained(
            write_qwen_tokenizer_files(d), model_max_length=max_length, eos_token="<|im_end|>",
            pad_token="<|endoftext|>", unk_token=None, additional_special_tokens=list(QWEN_SPECIAL[1:]),
            chat_template=QWEN_CHAT_TEMPLATE)


# Text encoders and VAEs ------------------------------------------------------------------------------

def make_t5_encoder(tokenizer: T5TokenizerFast, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """T5 v1.1-like encoder (gated GELU, 2 layers, 4 heads of 8): last hidden state (B, L, d_model)."""
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(cfg).eval()


def _qwen3_config(tokenizer: Qwen2TokenizerFast, layers: int) -> Qwen3Config:
    """Qwen3 at hidden 16: 2 query heads of 8 sharing 1 key/value head (grouped-query, as the real ones)."""
    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def make_qwen3_encoder(tokenizer: Qwen2TokenizerFast, layers: int = 2, seed: int = 0) -> Qwen3Model:
    """Qwen3 base model (Z-Image's text encoder class): hidden states (B, L, 16), `layers` + 1 of them."""
    torch.manual_seed(seed)
    return Qwen3Model(_qwen3_config(tokenizer, layers)).eval()


def make_qwen3_causal_lm(tokenizer: Qwen2TokenizerFast, layers: int = max(KLEIN_TEXT_LAYERS),
                         seed: int = 0) -> Qwen3ForCausalLM:
    """Qwen3 with its LM head (Flux.2 Klein's text encoder class), tied to the embedding as in Qwen3-4B."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(_qwen3_config(tokenizer, layers)).eval()


def _flow_vae(seed: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Flux/SD3-style AutoencoderKL (no quant convs, a shift as well as a scale) with 4 latent channels:
    (B, 3, H, W) <-> (B, 4, H/2, W/2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def _flux2_vae(seed: int) -> AutoencoderKLFlux2:
    """Flux.2's AutoencoderKL: 4 latent channels whose 2x2 patches (16 channels) are normalised by a
    BatchNorm's running statistics; (B, 3, H, W) <-> (B, 4, H/2, W/2)."""
    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux.1 / Flux.2's: the shift follows the image token count (the pipelines pass `mu`)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


# Pipelines -------------------------------------------------------------------------------------------

def make_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Flux.1-shaped (dev with `guidance_embeds`, schnell without): 2 double + 2 single blocks, 2 heads of
    8 (rope axes 2 + 2 + 4), CLIP-L-like pooled text (32) and T5 text states (32)."""
    tokenizer, tokenizer_2 = make_tokenizer(), make_t5_tokenizer()
    text_encoder = make_text_encoder(tokenizer, hidden=32, seed=seed)
    text_encoder_2 = make_t5_encoder(tokenizer_2, d_model=32, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        scheduler=_flux_scheduler(), vae=_flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd3_pipeline(seed: int = 0, t5: bool = True) -> StableDiffusion3Pipeline:
    """SD3.5-shaped: 3 joint blocks (the first with the dual attention of SD3.5-medium), RMS qk-norm,
    2 heads of 8, CLIP-L and CLIP-G with projections, T5 (hidden 64) or none (`t5=False`: the pipeline
    then feeds zeros of `joint_attention_dim` in its place, as SD3 allows)."""
    tokenizer, tokenizer_2, tokenizer_3 = make_tokenizer(), make_tokenizer(), make_t5_tokenizer()
    text_encoder = make_text_encoder(tokenizer, hidden=32, projection=True, seed=seed)
    text_encoder_2 = make_text_encoder(tokenizer_2, hidden=32, projection=True, seed=seed + 1)
    text_encoder_3 = make_t5_encoder(tokenizer_3, d_model=64, seed=seed + 2) if t5 else None
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, pos_embed_max_size=16,
        joint_attention_dim=64,  # T5 hidden; CLIP-L + CLIP-G hidden (64) are zero-padded to it
        pooled_projection_dim=64,  # CLIP-L + CLIP-G projections (32 + 32)
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3 if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_flux2_klein_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """Flux.2 Klein-shaped (4B layout): 2 double + 2 single blocks, 2 heads of 8 (four rope axes of 2), no
    guidance embedding (Klein's), a 27-layer Qwen3ForCausalLM whose hidden states 9, 18 and 27 are stacked
    into the text states (B, L, 48): the pipeline runs with its default `text_encoder_out_layers`.
    `is_distilled=False` (the base model's): guidance_scale > 1 runs classifier-free guidance. The call takes
    `image` first: pass the prompt by keyword, `pipe(prompt=...)`."""
    tokenizer = make_qwen_tokenizer()
    text_encoder = make_qwen3_causal_lm(tokenizer, layers=max(KLEIN_TEXT_LAYERS), seed=seed + 1)
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=len(KLEIN_TEXT_LAYERS) * QWEN_HIDDEN,
        timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    )
    pipe = Flux2KleinPipeline(scheduler=_flux_scheduler(), vae=_flux2_vae(seed), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """Z-Image-shaped: 2 main layers, 1 noise and 1 context refiner, dim 32 in 2 heads of 16 (rope axes
    4 + 6 + 6), a 2-layer Qwen3Model whose penultimate hidden state (16) is the caption feature."""
    tokenizer = make_qwen_tokenizer()
    text_encoder = make_qwen3_encoder(tokenizer, layers=2, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=QWEN_HIDDEN,
        axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],  # axis 0: caption tokens (up to 512) then the image
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = ZImagePipeline(scheduler=scheduler, vae=_flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_dit_pipeline(family: Family, seed: int = 0) -> DiffusionPipeline:
    """The tiny pipeline of `family` ("flux", "sd3", "flux2", "zimage") with its defaults: the builder its record
    names (`ModelFamily.tiny`, one of this module's)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    return build_tiny(family, seed)


def save_tiny_dit_pipeline(directory: str, family: Family, seed: int = 0) -> str:
    """Write a tiny DiT pipeline to `directory` (diffusers layout, safetensors) for
    `DiffusionPipeline.from_pretrained(directory)`, which needs no hub."""
    make_tiny_dit_pipeline(family, seed).save_pretrained(directory, safe_serialization=True)
    return directory
