"""tests/helpers/tiny_chroma.py and tiny_lumina2.py: the tiny Chroma and Lumina 2 pipelines build deterministically
from their seed and generate offline in 2 steps with the pipelines' defaults, their prompts reaching the transformer
(as tests/test_tiny_dit.py checks for the other DiT families)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lokr_diffusers import families

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest

NAMES = ("chroma", "lumina2")
# output_type="latent": Chroma returns FLUX.1's packed tokens (64 of 2x2x4); Lumina 2 (B, 4, 4, 4) (VAE downscale 8)
LATENT_SHAPE = {"chroma": (1, 64, 16), "lumina2": (1, 4, 4, 4)}


@functools.cache
def pipeline(name: str) -> Any:
    return families.build_tiny(name)


def generate(pipe: Any, output_type: str, prompt: str = "a photo of sks dog") -> Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    a, b, c = ({k: m.state_dict() for k, m in families.build_tiny(name, seed).components.items()
                if isinstance(m, nn.Module)} for seed in (0, 0, 1))
    for component in a:
        assert all(torch.equal(a[component][k], b[component][k]) for k in a[component]), component
        assert any(not torch.equal(a[component][k], c[component][k]) for k in a[component]), component


@pytest.mark.parametrize("name", NAMES)
def test_generates_in_two_steps(name: str) -> None:
    pipe = pipeline(name)
    image = generate(pipe, "pt")
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    latent = generate(pipe, "latent")
    assert latent.shape == LATENT_SHAPE[name]
    assert torch.equal(latent, generate(pipe, "latent")), "same generator, same latents"
    assert not torch.equal(latent, generate(pipe, "latent", "a painting of a red cat")), "the prompt is used"
