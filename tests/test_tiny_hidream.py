"""The tiny HiDream-I1 pipeline (tests/helpers/tiny_hidream.py): the same seed gives the same weights, it generates
offline in two steps, and LoKr adapters change what it generates: one added on the transformer's default targets,
and a file in HiDream's original names (its checkpoint's: the diffusers paths, under `diffusion_model.`) loaded
through diffusers' own `load_lora_weights`; each goes away again."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from helpers.dit_files import original_file
from helpers.tiny_hidream import make_hidream_pipeline
from torch import Tensor, nn

import lokr_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)


@functools.cache
def _built() -> Any:
    return make_hidream_pipeline()


def pipeline() -> Any:
    """A fresh copy of the seed-0 pipeline (built once)."""
    return copy.deepcopy(_built())


def generate(pipe: Any, output_type: str = "latent", prompt: str = "a photo of sks dog") -> Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).images


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    pipes: list[Any] = [_built(), make_hidream_pipeline(0), make_hidream_pipeline(1)]
    a, b, c = ({n: m.state_dict() for n, m in p.components.items() if isinstance(m, nn.Module)} for p in pipes)
    assert sorted(a) == ["text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "transformer", "vae"]
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        assert any(not torch.equal(a[name][k], c[name][k]) for k in a[name]), name


def test_generates_in_two_steps() -> None:
    pipe = _built()
    image = generate(pipe, "pt")
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    latent = generate(pipe)
    assert latent.shape == (1, 4, 16, 16) and torch.isfinite(latent).all()
    assert torch.equal(latent, generate(pipe)), "same generator, same latents"
    assert not torch.equal(latent, generate(pipe, prompt="a painting of a red cat")), "the prompt is used"


def test_add_lokr_on_the_default_targets_changes_the_image_and_disable_restores_it() -> None:
    pipe = pipeline()
    before = generate(pipe)
    config = lokr_diffusers.LoKrConfig(r=2, alpha=2, init_weights=False)
    adapted = lokr_diffusers.add_lokr(pipe, {"transformer": config}, adapter_name="x")
    assert adapted["transformer"] and all("_stream_blocks." in p for p in adapted["transformer"])
    assert not torch.allclose(generate(pipe), before)
    pipe.disable_lora()
    assert torch.equal(generate(pipe), before)
    pipe.enable_lora()
    assert not torch.allclose(generate(pipe), before)


def test_a_lokr_file_in_original_names_changes_the_image_and_unloads_exactly() -> None:
    pipe = pipeline()
    before = generate(pipe)
    sd, modules = original_file(pipe.transformer, "hidream", "comfyui", seed=7)
    assert "double_stream_blocks.0.block.ff_i.experts.1.w3" in modules and "caption_projection.2.linear" in modules
    pipe.load_lora_weights(sd, adapter_name="style")
    try:
        assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
        assert not torch.allclose(generate(pipe), before)
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), before)
