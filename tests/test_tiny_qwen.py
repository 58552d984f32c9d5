"""The tiny Qwen-Image pipeline (tests/helpers/tiny_qwen.py): it generates offline in two steps, the same seed
gives the same weights, and a LoKr file in Qwen-Image's original (= diffusers path) names, loaded through
diffusers' own `load_lora_weights`, changes what it generates and goes away again."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from helpers.dit_files import original_file
from helpers.tiny_qwen import make_qwenimage_pipeline
from torch import Tensor

import lokr_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)


@functools.cache
def pipeline() -> Any:
    return make_qwenimage_pipeline()


def outputs(pipe: Any) -> Tensor:
    return pipe(prompt="a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_generates_in_two_steps_and_seeds_fix_the_weights() -> None:
    out = outputs(pipeline())
    assert out.shape == (1, 64, 16) and torch.isfinite(out).all()
    again, other = make_qwenimage_pipeline(0), make_qwenimage_pipeline(1)
    w = pipeline().transformer.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(again.transformer.transformer_blocks[0].attn.to_q.weight, w)
    assert not torch.equal(other.transformer.transformer_blocks[0].attn.to_q.weight, w)
    assert torch.equal(again.text_encoder.model.language_model.embed_tokens.weight,
                       pipeline().text_encoder.model.language_model.embed_tokens.weight)


def test_a_lokr_file_changes_the_pipelines_output() -> None:
    pipe = pipeline()
    before = outputs(pipe)
    sd, _ = original_file(pipe.transformer, "qwenimage", "comfyui", seed=7)
    pipe.load_lora_weights(sd, adapter_name="style")
    try:
        assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
        assert not torch.allclose(outputs(pipe), before, rtol=1e-3)
    finally:
        pipe.unload_lokr_weights()
    torch.testing.assert_close(outputs(pipe), before, rtol=0, atol=0)


def test_add_lokr_defaults_on_the_transformer() -> None:
    """The default targets are the trainers': attention and MLPs, 2 blocks x 12 (to_q/k/v, to_out.0, add_q/k/v_proj,
    to_add_out, img_mlp and txt_mlp net.0.proj / net.2); modulations and embedders left out."""
    pipe = make_qwenimage_pipeline(2)
    before = outputs(pipe)
    config = lokr_diffusers.LoKrConfig(r=2, alpha=2, init_weights=False)
    adapted = lokr_diffusers.add_lokr(pipe, {"transformer": config}, adapter_name="x")
    assert len(adapted["transformer"]) == 2 * 12
    assert not any("_mod." in p or p in ("img_in", "txt_in", "proj_out") for p in adapted["transformer"])
    assert not torch.allclose(outputs(pipe), before)
