"""Flow-matching training of FLUX.2 [klein] and Z-Image on tiny offline pipelines (tests/helpers/tiny_dit.py).

The pieces (training/flow_models.py) against the pipelines themselves: the prompt encoders equal the pipelines'
`encode_prompt`, and the velocity the loss trains equals the one the pipeline's own denoising step applies (one
Euler step of the pipeline, from given latents at a given sigma, read back: v = (x_after − x) / (σ_next − σ)). That
pins the latent space (Klein's patchify + BatchNorm normalisation), the token packing and position ids, the timestep
convention (Klein t / 1000, Z-Image 1 − σ) and the sign (Z-Image predicts x − ε).

The flow script end to end: family told from the folder, exact resume, the file reloads to the trained outputs, and
the loss on the training set (fixed noise and timesteps) falls.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers.flow_loss import check_trained_file, flow_args, image_batch
from helpers.flow_runs import check_exact_resume
from helpers.tiny_dit import make_flux2_klein_pipeline, make_zimage_pipeline, save_tiny_dit_pipeline

from lokr_diffusers import families
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.flow import encode_klein, encode_zimage, flow_loss
from lokr_diffusers.training.flow_models import FLOW_MODELS, flow_model
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import train

CAPTIONS = ("a photo of sks dog", "a red cat")  # a tuple: ZImagePipeline rewrites a prompt list in place
CPU = torch.device("cpu")
ARGS = SimpleNamespace(max_sequence_length=16, text_encoder_out_layers=(9, 18, 27), guidance_scale=3.5,
                       precondition_outputs=1)


def test_every_flow_family_has_its_piece() -> None:
    """A family trained by the flow script has a piece, and a piece belongs to such a family."""
    flow = {f.name for f in families.FAMILIES.values() if f.training is not None and f.training.script == "flow"}
    assert flow == set(FLOW_MODELS) == {"flux", "sd3", "flux2", "zimage", "chroma", "qwenimage", "qwenimage21",
                                        "lumina2", "hidream", "wan", "ltxvideo", "ltx2", "hunyuanvideo",
                                        "hunyuanvideo15"}
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


# ------------------------------------------------------------------------------------------- the flow script

def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out,
            "--checkpointing_steps", "2", "--max_sequence_length", "16", "--export_format", "none", *extra]


def _velocity(pipe, family: str, cond: object) -> torch.Tensor:
    """The transformer's velocity on fixed latents, timesteps and text conditioning."""
    shape = (2, 16, 8, 8) if family == "flux2" else (2, 4, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return flow_model(family).velocity(pipe, x, torch.tensor([300.0, 800.0]), cond, ARGS, CPU)


def _fixed_loss(pipe, family: str, batch: dict, prompts: dict) -> float:
    """The flow loss on the whole training set with fixed noise and timesteps (one generator; uniform weighting).
    `prompts`: the encoded captions, shared by pipelines whose text encoder is the same (no adapter there)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return flow_loss(pipe, scheduler, batch, flow_args(family, weighting_scheme="none"), family,
                         torch.Generator().manual_seed(0), torch.float32, CPU, prompts=prompts).item()


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_the_flow_script_trains_resumes_exactly_and_its_file_reloads(tmp_path, family: str) -> None:
    """The one flow script tells the family from the model folder, trains it (the loss on the training set falls),
    resumes from a checkpoint to the very same adapter, and its file loads back to the trained model's outputs."""
    model = save_tiny_dit_pipeline(str(tmp_path / "model"), family)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=32)
    out = str(tmp_path / "out")
    args = parse("t", True, _argv(model, data, out), "flow")
    result = train(args)
    assert (result.global_step, args.model_family, args.weighting_scheme, args.max_sequence_length) == \
        (4, family, "none", 16)
    assert {"checkpoint-2", "checkpoint-4", OURS_FILE, "README.md"} <= set(os.listdir(out))
    # resume from the step-2 checkpoint in a fresh output folder: the same final factors, bit for bit
    again = str(tmp_path / "again")
    check_exact_resume(out, again, _argv(model, data, again, "--resume_from_checkpoint", "latest"))
    # the trained model: the base with the step-4 checkpoint's factors (what training left in its layers)
    batch = image_batch(data)
    # its file, loaded into a fresh pipeline, gives the trained model's outputs and lowers the loss on the data
    check_trained_file(model, out, args, family, CAPTIONS, ARGS, batch, _velocity, _fixed_loss)


def test_the_flow_command_refuses_a_model_of_no_flow_family(tmp_path, capsys) -> None:
    """`lokr-diffusers-train-flow` (pyproject.toml) tells the family from model_index.json before loading anything:
    a UNet pipeline exits with code 2 and one line naming the families it trains; nothing is written."""
    from lokr_diffusers.training.run import flow_cli

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), encoding="utf-8") as fh:
        assert '\nlokr-diffusers-train-flow = "lokr_diffusers.training.run:flow_cli"\n' in fh.read()
    model = tmp_path / "sd"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                            '"unet": ["diffusers", "UNet2DConditionModel"]}')
    data = make_synthetic_dataset(str(tmp_path / "data"), n=2, size=32)
    with pytest.raises(SystemExit) as exit_:
        flow_cli(_argv(str(model), data, str(tmp_path / "out")))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "a StableDiffusionPipeline without transformer; give a pipeline of FLUX.1 / SD3.x / FLUX.2 / Z-Image" in err
    assert not (tmp_path / "out").exists()
