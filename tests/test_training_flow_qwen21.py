"""Flow-matching training of Qwen-Image 2.1 on its tiny offline pipeline (tests/helpers/tiny_qwen21.py, the builder
its record names), as tests/test_training_flow_images.py does Chroma, Qwen-Image and Lumina 2.

The piece (training/flow_models.py `QwenImage21`) against QwenImage21Pipeline itself: the prompt encoder equals the
pipeline's `encode_prompt` (its raw template, left padding, the system turn's tokens dropped, the last decoder
layer read before the final norm, the mask None when nothing is padded, the image slots); the latents equal the
pipeline's own image encoding (`_encode_vae_image` of the image made RGBA); and the velocity the loss trains equals
the one the pipeline's own denoising step applies (one Euler step from given latents at a given sigma, read back:
v = (x_after − x) / (σ_next − σ)), on a 64 x 96 image (4 x 6 latent tokens, not square): that pins the token order,
img_shapes, the image slots, the timestep convention (t / 1000) and the sign.

The flow script end to end: the family told from the folder (Qwen-Image and Qwen-Image 2.1 are two records
of the one script), exact resume, the ComfyUI file written, the file reloads to the trained outputs.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers.flow_loss import check_trained_file, flow_args, image_batch
from helpers.flow_runs import check_exact_resume
from PIL import Image
from safetensors.torch import load_file

from lokr_diffusers import add_lokr, families, lokr_layers
from lokr_diffusers.export import save_lokr_weights
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.checks import check_export, check_pipeline
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.errors import TrainingInputError
from lokr_diffusers.training.family import member, training_family
from lokr_diffusers.training.flow import flow_loss
from lokr_diffusers.training.flow_models import encode_qwenimage21, flow_model
from lokr_diffusers.training.loop import lokr_configs
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import ADAPTER, train

FAMILY = "qwenimage21"
CAPTIONS = ("a photo of sks dog", "a red cat")  # unequal lengths: the mask has padding to keep out
CPU = torch.device("cpu")
LENGTH = 64  # --max_sequence_length in these runs (no caption here is that long)
HEIGHT, WIDTH = 64, 96  # pixels: 4 x 6 latent tokens (the tiny VAE's 16x), 6 image slots of 2 x 2
SHAPE = (2, 16, HEIGHT // 16, WIDTH // 16)


@pytest.fixture(scope="module")
def pipe():
    return families.build_tiny(FAMILY)


def test_qwenimage21_trains_with_the_flow_script_and_is_told_from_its_folder() -> None:
    training = families.get(FAMILY).training
    assert training is not None and (training.script, training.text_encoders, training.weighting_scheme,
                                     training.max_sequence_length) == ("flow", (), "none", 512)
    assert flow_model(FAMILY).family == FAMILY
    flow = training_family("flow")
    assert {"qwenimage", FAMILY} <= set(flow.members)

    def told(pipeline: str, transformer: str) -> str | None:
        found = member(flow, {"_class_name": pipeline, "transformer": ["diffusers", transformer]})
        return found.name if found is not None else None

    assert told("QwenImage21Pipeline", "QwenImage21Transformer2DModel") == FAMILY
    assert told("QwenImagePipeline", "QwenImageTransformer2DModel") == "qwenimage"
    assert told("SomeOtherPipeline", "QwenImage21Transformer2DModel") == FAMILY  # by the denoiser's class


def test_the_prompt_encoding_equals_the_pipelines(pipe) -> None:
    cases = ((list(CAPTIONS), LENGTH), ([CAPTIONS[0]] * 2, LENGTH), (["", CAPTIONS[1]], LENGTH))
    for captions, length in cases:
        embeds, mask, image = encode_qwenimage21(pipe, captions, length, CPU)
        want, want_mask, want_image = pipe.encode_prompt(captions, device=CPU)
        torch.testing.assert_close(embeds, want, rtol=0, atol=0)
        assert (mask is None) == (want_mask is None)  # None: no caption padded
        assert mask is None or torch.equal(mask, want_mask)
        assert torch.equal(image, want_image) and not image.any()
    # cut at --max_sequence_length: the pipeline's states and masks cut there (it never cuts itself)
    embeds, mask, image = encode_qwenimage21(pipe, list(CAPTIONS), 4, CPU)
    want, want_mask, want_image = pipe.encode_prompt(list(CAPTIONS), device=CPU)
    torch.testing.assert_close(embeds, want[:, :4], rtol=0, atol=0)
    assert mask is None and want_mask is not None  # both captions are longer than 4 tokens
    assert torch.equal(image, want_image[:, :4])


def _pipeline_velocity(pipe, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, timestep): the velocity the pipeline's one denoising step applies to `x` (B, C, h, w) and the timestep it
    ran at (the scheduler shifts the sigma it is given). No guidance (true_cfg_scale 1): the conditional
    prediction. The pipeline's latents are (B, h · w, C) tokens, row-major."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(1, 2)
    with torch.no_grad():
        out = pipe(prompt=list(CAPTIONS), height=h * 16, width=w * 16, num_inference_steps=1, sigmas=[sigma],
                   output_type="latent", latents=tokens).images
    out = out.transpose(1, 2).reshape(b, c, h, w)
    s = pipe.scheduler.sigmas
    return (out - x) / (s[1] - s[0]), pipe.scheduler.timesteps[:1]


def test_the_velocity_is_the_pipelines(pipe) -> None:
    model = flow_model(FAMILY)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    want, t = _pipeline_velocity(pipe, x, 0.6)
    args = SimpleNamespace(max_sequence_length=LENGTH)
    cond = model.encode(pipe, list(CAPTIONS), args, CPU)
    assert cond[1] is not None  # the captions' padding masked
    with torch.no_grad():
        ours = model.velocity(pipe, x, t.expand(2), cond, args, CPU)
        # what the comparison tells apart: another timestep, the image read column-major, the opposite sign
        other_t = model.velocity(pipe, x, t.expand(2) * 0.5, cond, args, CPU)
        transposed = model.velocity(pipe, x.transpose(2, 3), t.expand(2), cond, args, CPU).transpose(2, 3)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    for wrong in (other_t, transposed, -ours):
        assert (wrong - want).abs().max() > 1e-2


def test_the_latents_are_the_pipelines_image_latents(pipe) -> None:
    """The piece's latents of an RGB image are the pipeline's own encoding of it (made RGBA, opaque): the VAE's
    mode, normalised by latents_mean / latents_std."""
    rgb = np.random.default_rng(1).integers(0, 256, (2, HEIGHT, WIDTH, 3), dtype=np.uint8)
    images = [Image.fromarray(a) for a in rgb]
    rgba = torch.cat([pipe.image_processor.preprocess(i.convert("RGBA")) for i in images])  # (2, 4, H, W)
    with torch.no_grad():
        want = pipe._encode_vae_image(rgba.unsqueeze(2), generator=None).squeeze(2)
        pixels = torch.cat([pipe.image_processor.preprocess(i) for i in images])  # (2, 3, H, W) in [-1, 1]
        ours = flow_model(FAMILY).latents(pipe.vae, pixels, torch.Generator().manual_seed(0))
    assert ours.shape == want.shape == SHAPE
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def _args(tmp_path, *extra: str) -> SimpleNamespace:
    return parse("t", True, ["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(tmp_path),
                             "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path), *extra],
                 "flow")


def test_the_resolution_takes_whole_image_slots_and_comfyui_names_every_module(pipe, tmp_path) -> None:
    """--resolution: a multiple of 32 (16x VAE, 2 x 2 latent tokens to an image slot). --export_format comfyui (the
    default) can write every module of the default targets: checked before the first step, then written."""
    family = training_family(FAMILY)
    pipe.save_config(str(tmp_path))  # model_index.json: what --pretrained_model_name_or_path is checked for
    check_pipeline(pipe, _args(tmp_path, "--resolution", "64"), family)
    with pytest.raises(TrainingInputError, match=r"--resolution 48: .* multiple of 32"):
        check_pipeline(pipe, _args(tmp_path, "--resolution", "48"), family)
    args = _args(tmp_path, "--rank", "4")
    args.model_family = FAMILY
    piece = families.build_tiny(FAMILY)
    add_lokr(piece, lokr_configs(args, ["transformer"]), ADAPTER)
    check_export(piece, args, family, ADAPTER)
    path = save_lokr_weights(piece, str(tmp_path / "comfy.safetensors"), format="comfyui", base=FAMILY)
    written = {k.rsplit(".", 1)[0] for k in load_file(path)}
    layers = [p for p, _ in lokr_layers(piece.transformer)]
    assert len(written) == len(layers) and any(p.endswith("img_mlp.gate_layer") for p in layers)


# ------------------------------------------------------------------------------------------- the flow script

def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out,
            "--checkpointing_steps", "2", "--max_sequence_length", str(LENGTH), *extra]


def _velocity(pipe, family: str, cond: object) -> torch.Tensor:
    """The transformer's velocity on fixed latents (a 32 px image's), timesteps and text conditioning."""
    x = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return flow_model(family).velocity(pipe, x, torch.tensor([300.0, 800.0]), cond,
                                           SimpleNamespace(max_sequence_length=LENGTH), CPU)


def _fixed_loss(pipe, family: str, batch: dict, prompts: dict) -> float:
    """The flow loss on the whole training set with fixed noise and timesteps (one generator; uniform weighting)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        args = flow_args(family, weighting_scheme="none", max_sequence_length=LENGTH)
        return flow_loss(pipe, scheduler, batch, args, family, torch.Generator().manual_seed(0), torch.float32, CPU,
                         prompts=prompts).item()


def test_the_flow_script_trains_resumes_exactly_and_its_file_reloads(tmp_path) -> None:
    """The one flow script tells Qwen-Image 2.1 from the model folder, trains it (the loss on the training set
    falls), resumes from a checkpoint to the very same adapter, writes its ComfyUI file, and its file loads back
    to the trained model's outputs."""
    model = str(tmp_path / "model")
    families.build_tiny(FAMILY).save_pretrained(model, safe_serialization=True)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=32)
    out = str(tmp_path / "out")
    args = parse("t", True, _argv(model, data, out, "--export_format", "comfyui"), "flow")
    result = train(args)
    assert (result.global_step, args.model_family, args.weighting_scheme, args.max_sequence_length) == \
        (4, FAMILY, "none", LENGTH)
    assert {"checkpoint-2", "checkpoint-4", OURS_FILE, "README.md", "lokr_comfyui.safetensors"} <= \
        set(os.listdir(out))
    # resume from the step-2 checkpoint in a fresh output folder: the same final factors, bit for bit
    again = str(tmp_path / "again")
    check_exact_resume(out, again, _argv(model, data, again, "--export_format", "none", "--resume_from_checkpoint",
                                         "latest"))
    check_trained_file(model, out, args, FAMILY, CAPTIONS, SimpleNamespace(max_sequence_length=LENGTH),
                       image_batch(data), _velocity, _fixed_loss)
