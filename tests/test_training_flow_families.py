"""The flow-matching pieces of FLUX.2 [klein] and Z-Image (training/flow_models.py) against the pipelines themselves,
on tiny offline pipelines (tests/helpers/tiny_dit.py): the prompt encoders equal the pipelines' `encode_prompt`, and
the velocity the loss trains equals the one the pipeline's own denoising step applies (one Euler step of the
pipeline, from given latents at a given sigma, read back: v = (x_after − x) / (σ_next − σ)). That pins the latent
space (Klein's patchify + BatchNorm normalisation), the token packing and position ids, the timestep convention
(Klein t / 1000, Z-Image 1 − σ) and the sign (Z-Image predicts x − ε).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.tiny_dit import make_flux2_klein_pipeline, make_zimage_pipeline

from lokr_diffusers import families
from lokr_diffusers.training.flow import encode_klein, encode_zimage
from lokr_diffusers.training.flow_models import FLOW_MODELS, flow_model

CAPTIONS = ("a photo of sks dog", "a red cat")  # a tuple: ZImagePipeline rewrites a prompt list in place
CPU = torch.device("cpu")
ARGS = SimpleNamespace(max_sequence_length=16, text_encoder_out_layers=(9, 18, 27), guidance_scale=3.5,
                       precondition_outputs=1)


def test_every_flow_family_has_its_piece() -> None:
    """A family trained by the flow script has a piece, and a piece belongs to such a family."""
    flow = {f.name for f in families.FAMILIES.values() if f.training is not None and f.training.script == "flow"}
    assert flow == set(FLOW_MODELS) == {"flux", "sd3", "flux2", "zimage"}
    with pytest.raises(ValueError, match="no flow-matching training"):
        flow_model("sdxl")


def test_klein_prompt_encoding_equals_the_pipelines() -> None:
    pipe = make_flux2_klein_pipeline()
    embeds, ids = encode_klein(pipe, list(CAPTIONS), 16, CPU)
    want, want_ids = pipe.encode_prompt(list(CAPTIONS), device=CPU, max_sequence_length=16)
    torch.testing.assert_close(embeds, want, rtol=0, atol=0)
    assert torch.equal(ids, want_ids.to(ids.dtype)) and ids.shape == want_ids.shape


def test_zimage_prompt_encoding_equals_the_pipelines() -> None:
    pipe = make_zimage_pipeline()
    ours = encode_zimage(pipe, list(CAPTIONS), 16, CPU)
    want, _ = pipe.encode_prompt(list(CAPTIONS), device=CPU, do_classifier_free_guidance=False, max_sequence_length=16)
    assert len(ours) == len(want) == 2
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _pipeline_velocity(pipe, family: str, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, timestep): the velocity the pipeline's one denoising step applies to `x` (the piece's latent space) and the
    timestep it ran at (the scheduler shifts the sigma it is given)."""
    size = 32
    with torch.no_grad():
        if family == "flux2":  # the pipeline takes the patchified, normalised latents; returns them undone
            out = pipe(prompt=list(CAPTIONS), height=size, width=size, num_inference_steps=1, sigmas=[sigma],
                       guidance_scale=1.0, latents=x, output_type="latent", max_sequence_length=16).images
            b, c, h, w = out.shape
            out = out.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
            bn = pipe.vae.bn
            out = (out - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
                bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        else:
            out = pipe(prompt=list(CAPTIONS), height=size, width=size, num_inference_steps=1, sigmas=[sigma],
                       guidance_scale=0.0, latents=x, output_type="latent", max_sequence_length=16).images
    s = pipe.scheduler.sigmas
    return (out - x) / (s[1] - s[0]), pipe.scheduler.timesteps[:1]


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_the_velocity_is_the_pipelines(family: str) -> None:
    pipe = make_flux2_klein_pipeline() if family == "flux2" else make_zimage_pipeline()
    model = flow_model(family)
    shape = (2, 16, 8, 8) if family == "flux2" else (2, 4, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want, t = _pipeline_velocity(pipe, family, x, 0.6)
    with torch.no_grad():
        ours = model.velocity(pipe, x, t.expand(2), model.encode(pipe, list(CAPTIONS), ARGS, CPU), ARGS, CPU)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    # the piece's latents are the space the pipeline's latents live in: same shape for a 32 px image
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert model.latents(pipe.vae, pixels, torch.Generator()).shape == shape
