"""tests/helpers/tiny_dit.py: the tiny DiT pipelines build deterministically from their seed, generate
offline in 2 steps with the pipelines' own defaults (Klein's stacked Qwen3 layers 9/18/27 included),
their prompts reach the transformer, and one family goes through save_pretrained / from_pretrained."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.file_memory import misaligned, own_memory
from helpers.tiny_dit import (
    FAMILIES,
    Family,
    make_qwen_tokenizer,
    make_t5_tokenizer,
    make_tiny_dit_pipeline,
    save_tiny_dit_pipeline,
    write_t5_tokenizer_file,
)
from tokenizers import Tokenizer
from torch import Tensor, nn

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest

PROMPT = "a photo of sks dog"
# output_type="latent": Flux.1 returns its packed tokens (64 of 2x2x4), the others (B, 4, 16, 16)
LATENT_SHAPE = {"flux": (1, 64, 16), "sd3": (1, 4, 16, 16), "flux2": (1, 4, 16, 16),
                "zimage": (1, 4, 16, 16)}
PIPELINE_CLASS = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "flux2": "Flux2KleinPipeline",
                  "zimage": "ZImagePipeline"}


@functools.cache
def pipeline(family: Family) -> Any:
    return make_tiny_dit_pipeline(family)


def weights(pipe: Any) -> dict[str, dict[str, Tensor]]:
    return {name: c.state_dict() for name, c in pipe.components.items() if isinstance(c, nn.Module)}


def generate(pipe: Any, output_type: str, prompt: str = PROMPT) -> Tensor:
    out = pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, output_type=output_type,
               generator=torch.Generator().manual_seed(0))
    return out.images


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_other_seed_other_weights(family: Family) -> None:
    a, b, c = (weights(make_tiny_dit_pipeline(family, seed)) for seed in (0, 0, 1))
    assert type(pipeline(family)).__name__ == PIPELINE_CLASS[family]
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), (family, name)
        assert any(not torch.equal(a[name][k], c[name][k]) for k in a[name]), (family, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_in_two_steps(family: Family) -> None:
    pipe = pipeline(family)
    image = generate(pipe, "pt")
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    latent = generate(pipe, "latent")
    assert latent.shape == LATENT_SHAPE[family]
    assert torch.equal(latent, generate(pipe, "latent")), "same generator, same latents"
    assert not torch.equal(latent, generate(pipe, "latent", "a painting of a red cat")), "the prompt is used"


def test_t5_tokenizer() -> None:
    tok = make_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(PROMPT + ", Zq!").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁sks", "▁dog", ",", "▁", "Z", "q", "!", "</s>"]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT + ", Zq!"


def test_t5_tokenizer_file_is_the_tokenizers_format(tmp_path: object) -> None:
    backend = Tokenizer.from_file(os.path.join(write_t5_tokenizer_file(str(tmp_path)), "tokenizer.json"))
    assert backend.encode(PROMPT).ids == make_t5_tokenizer()(PROMPT).input_ids


def test_qwen_tokenizer_chat_template() -> None:
    tok = make_qwen_tokenizer()
    assert tok.convert_ids_to_tokens(tok(PROMPT).input_ids) == ["a", "Ġphoto", "Ġof", "Ġsks", "Ġdog"]
    messages = [{"role": "user", "content": PROMPT}]
    for thinking, tail in ((False, "<think>\n\n</think>\n\n"), (True, "")):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{tail}"
    tokens = tok.convert_ids_to_tokens(tok(text, padding="max_length", max_length=24).input_ids)
    assert tokens[0] == "<|im_start|>" and tokens.count("<|im_end|>") == 1
    assert tokens[-1] == tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_save_pretrained_round_trip(family: Family, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DiffusionPipeline.from_pretrained(save_tiny_dit_pipeline(str(tmp_path), family))
    loaded.set_progress_bar_config(disable=True)
    built = pipeline(family)
    assert type(loaded) is type(built)
    a, b = weights(built), weights(loaded)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    want = generate(built, "latent")
    if misaligned(loaded):  # weights that map the file: float rounding apart (tests/helpers/file_memory.py)
        torch.testing.assert_close(generate(loaded, "latent"), want)
    assert torch.equal(generate(own_memory(loaded), "latent"), want)
