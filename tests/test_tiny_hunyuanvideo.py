"""The tiny HunyuanVideo pipeline (tests/helpers/tiny_hunyuanvideo.py): the same seed gives the same weights, it
generates a video offline in two steps, its prompt template's head is the 95 tokens the pipeline crops, and LoKr
adapters change what it generates: one added on the transformer's default targets, and a file in Tencent's original
names loaded through diffusers' own `load_lora_weights`; each goes away again."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from helpers.dit_files import original_file
from helpers.tiny_hunyuanvideo import make_hunyuanvideo_pipeline
from torch import Tensor, nn

import lokr_diffusers
from lokr_diffusers.families.hunyuanvideo import COMFYUI_RENAMES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)


@functools.cache
def _built() -> Any:
    return make_hunyuanvideo_pipeline()


def pipeline() -> Any:
    """A fresh copy of the seed-0 pipeline (built once)."""
    return copy.deepcopy(_built())


def generate(pipe: Any, output_type: str = "latent", prompt: str = "a photo of sks dog") -> Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, height=16, width=16, num_frames=5, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).frames


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    pipes: list[Any] = [_built(), make_hunyuanvideo_pipeline(0), make_hunyuanvideo_pipeline(1)]
    a, b, c = ({n: m.state_dict() for n, m in p.components.items() if isinstance(m, nn.Module)} for p in pipes)
    assert sorted(a) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        assert any(not torch.equal(a[name][k], c[name][k]) for k in a[name]), name


def test_the_prompt_templates_head_is_the_95_tokens_the_pipeline_crops() -> None:
    tokenizer = _built().tokenizer
    template = str(DEFAULT_PROMPT_TEMPLATE["template"])
    assert len(tokenizer(template.split("{}")[0]).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    ids = tokenizer(template.format("a photo of sks dog")).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[95:]) == ["a", "Ġphoto", "Ġof", "Ġsks", "Ġdog", "<|eot_id|>"]


def test_generates_a_video_in_two_steps() -> None:
    pipe = _built()
    video = generate(pipe, "pt")
    assert video.shape == (1, 5, 3, 16, 16)  # 5 frames: 1 + 4 x 1, the VAE's 4x temporal compression
    assert torch.isfinite(video).all() and video.min() >= 0 and video.max() <= 1
    latent = generate(pipe)
    assert latent.shape == (1, 4, 2, 8, 8) and torch.isfinite(latent).all()  # 2 latent frames of 8 x 8
    assert torch.equal(latent, generate(pipe)), "same generator, same latents"
    assert not torch.equal(latent, generate(pipe, prompt="a painting of a red cat")), "the prompt is used"


def test_add_lokr_on_the_default_targets_changes_the_video_and_disable_restores_it() -> None:
    pipe = pipeline()
    before = generate(pipe)
    config = lokr_diffusers.LoKrConfig(r=2, alpha=2, init_weights=False)
    adapted = lokr_diffusers.add_lokr(pipe, {"transformer": config}, adapter_name="x")
    assert adapted["transformer"] and all("transformer_blocks." in p for p in adapted["transformer"])
    assert not torch.allclose(generate(pipe), before)
    pipe.disable_lora()
    assert torch.equal(generate(pipe), before)
    pipe.enable_lora()
    assert not torch.allclose(generate(pipe), before)


def tencent_file(transformer: nn.Module) -> dict[str, Tensor]:
    """A LoKr file in Tencent's names (`diffusion_model.double_blocks.0.img_attn_qkv.lokr_w1`, ...): the modules of
    tests/helpers/dit_files.py's HunyuanVideo table spelled Tencent's way (ComfyUI's renamed spellings left out)."""
    sd, modules = original_file(transformer, "hunyuanvideo", "comfyui", seed=7)
    comfyui = [new for _, new in COMFYUI_RENAMES]
    tencent = [o for o in modules if not any(new in o + "." for new in comfyui)]
    assert {"double_blocks.0.img_attn_qkv", "single_blocks.0.linear1",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv"} <= set(tencent)
    return {k: v for k, v in sd.items() if any(k.startswith(f"diffusion_model.{o}.") for o in tencent)}


def test_a_lokr_file_in_tencents_names_changes_the_video_and_unloads_exactly() -> None:
    pipe = pipeline()
    before = generate(pipe)
    pipe.load_lora_weights(tencent_file(pipe.transformer), adapter_name="style")
    try:
        assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
        assert not torch.allclose(generate(pipe), before)
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), before)
