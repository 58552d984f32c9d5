"""tests/helpers/tiny_ltx.py: the tiny LTX-Video pipeline builds deterministically from its seed, generates a video
offline in 2 steps, and its prompt reaches the transformer; a LoKr loaded in LTX-Video's original names changes it."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from helpers.dit_files import original_file
from helpers.tiny_ltx import make_ltxvideo_pipeline
from torch import Tensor, nn

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


@functools.cache
def pipeline() -> Any:
    return make_ltxvideo_pipeline()


def generate(pipe: Any, output_type: str, prompt: str = "a photo of sks dog") -> Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, num_frames=9, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).frames


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = ({n: m.state_dict() for n, m in make_ltxvideo_pipeline(s).components.items()
                if isinstance(m, nn.Module)} for s in (0, 0, 1))
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        assert any(not torch.equal(a[name][k], c[name][k]) for k in a[name]), name


def test_generates_a_video_in_two_steps() -> None:
    pipe = pipeline()
    video = generate(pipe, "pt")
    assert video.shape == (1, 9, 3, 32, 32)  # 9 frames: 1 + 2 x 4, the VAE's 2x temporal compression
    assert torch.isfinite(video).all() and video.min() >= 0 and video.max() <= 1
    latent = generate(pipe, "latent")
    assert latent.shape == (1, 5 * 4 * 4, 8)  # packed tokens: 5 latent frames of 4 x 4, 8 channels
    assert torch.equal(latent, generate(pipe, "latent")), "same generator, same latents"
    assert not torch.equal(latent, generate(pipe, "latent", "a painting of a red cat")), "the prompt is used"


def test_a_lokr_in_original_names_changes_the_video() -> None:
    pipe = make_ltxvideo_pipeline()
    before = generate(pipe, "latent")
    sd, _ = original_file(pipe.transformer, "ltxvideo", "comfyui", seed=7)
    pipe.load_lora_weights(sd, adapter_name="style")
    assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
    assert not torch.allclose(generate(pipe, "latent"), before)
    pipe.unload_lokr_weights()
    assert torch.equal(generate(pipe, "latent"), before)
