"""A tiny Qwen-Image 2.1 pipeline (random weights, offline, CPU, seconds): QwenImage21Pipeline around a tiny
QwenImage21Transformer2DModel (tests/helpers/dit_models.py's config: 16 latent channels in and out, text features
16), a tiny Qwen3-VL (Qwen3VLForConditionalGeneration: a 2-layer text model of hidden 16 = the transformer's
context_in_dim, a one-block vision tower the text prompts never reach), a Qwen3-VL processor around the byte-level
Qwen tokenizer of tests/helpers/tiny_dit.py with the vision tokens added, a tiny AutoencoderKLQwenImage21 (RGBA in,
16 latent channels, four 2x spatial downsamplings: the 16x the pipeline assumes, `vae_scale_factor = 16`) and flow
matching. Facts read, never copied, from diffusers 0.42.1's pipelines/qwenimage21/pipeline_qwenimage21.py.

The processor: transformers' Qwen3VLProcessor takes a video processor, and transformers' video processors need
torchvision (not a dependency here: without it Qwen3VLProcessor can be neither built nor loaded). `TinyQwen3VLProcessor`
is Qwen3VLProcessor without the video processor; its text path (the only one a text-to-image prompt takes: the chat
template, tokenizing, `mm_token_type_ids`) is Qwen3VLProcessor's own. A saved pipeline names this module for it, so
it loads where `helpers` imports (the tests).
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline
from transformers import Qwen2TokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from helpers.dit_models import tiny
from helpers.tiny_dit import QWEN_HIDDEN, QWEN_SPECIAL, write_qwen_tokenizer_files

LATENT_CHANNELS = 16  # the tiny transformer's in_channels: 2.1 takes latents unpatched
VISION_TOKENS: tuple[str, ...] = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen3-VL's chat template cut to what the pipeline uses: turns whose content is a string or a list of text / image
# parts (the pipeline tokenizes its system turn through it to count the tokens it drops), the generation prompt
QWEN3VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor with an image processor and a tokenizer, no video processor (module docstring)."""

    def __init__(self, image_processor: object = None, tokenizer: object = None, chat_template: str | None = None,
                 **kwargs: object) -> None:
        # Qwen3VLProcessor.__init__'s token attributes, then the processor's own init without the video processor
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)  # type: ignore[attr-defined]
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)  # type: ignore[attr-defined]
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)  # type: ignore
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)  # type: ignore


def make_qwen3vl_processor() -> TinyQwen3VLProcessor:
    """The byte-level Qwen tokenizer with the chat and vision special tokens (one token each), Qwen3-VL's chat
    template, and a Qwen2-VL image processor at Qwen3-VL's patch 16 (PIL backend: no torchvision)."""
    with tempfile.TemporaryDirectory(prefix="lokr_qwen3vl_") as d:
        tokenizer = Qwen2TokenizerFast.from_pretrained(
            write_qwen_tokenizer_files(d, special=QWEN_SPECIAL + VISION_TOKENS), model_max_length=4096,
            eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
            additional_special_tokens=[*QWEN_SPECIAL[1:], *VISION_TOKENS])
    images = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2)
    return TinyQwen3VLProcessor(images, tokenizer, chat_template=QWEN3VL_CHAT_TEMPLATE)


def make_qwen3vl_encoder(processor: TinyQwen3VLProcessor, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL at hidden 16: 2 text layers (2 query heads of 8, 1 key/value head; mrope sections 1 + 1 + 2 = 4 =
    half the head), a 1-block vision tower of width 16 (patch 16, 2x2 merge) without deepstack layers."""
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [1, 1, 2], "mrope_interleaved": True},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=QWEN_HIDDEN,
                           num_position_embeddings=16, deepstack_visual_indexes=[]),
        **ids)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def make_qwenimage21_vae(seed: int = 0) -> AutoencoderKLQwenImage21:
    """RGBA (4 channels) -> 16 latent channels at 1/16 the size (5 levels of width 8, one 2x downsampling between
    each), latents_mean / latents_std not 0 / 1 so that a piece that skips the normalisation is caught."""
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, False, False, False], in_channels=4, out_channels=4,
        latents_mean=[0.1 * (i - LATENT_CHANNELS / 2) for i in range(LATENT_CHANNELS)],
        latents_std=[0.5 + 0.1 * i for i in range(LATENT_CHANNELS)]).eval()


def make_qwenimage21_pipeline(seed: int = 0) -> QwenImage21Pipeline:
    """Qwen-Image-2.1-shaped: 2 single-stream blocks of dim 32 (2 heads x 16), text features 16 from the tiny
    Qwen3-VL's last decoder layer (the pipeline drops its system turn's tokens), latents 16 x H/16 x W/16."""
    processor = make_qwen3vl_processor()
    text_encoder = make_qwen3vl_encoder(processor, seed + 1)
    transformer = tiny("qwenimage21", seed)
    vae = make_qwenimage21_vae(seed)
    # a dynamic shift: the pipeline passes mu, from the image's token count, to set_timesteps
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
