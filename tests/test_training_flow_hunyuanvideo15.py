"""Flow-matching training of HunyuanVideo 1.5 (text to video) on its tiny offline pipeline
(tests/helpers/tiny_hunyuanvideo15.py; `families.build_tiny`).

The piece (training/flow_video.py HunyuanVideo15) against the pipeline itself: the prompt encoder equals
HunyuanVideo15Pipeline.encode_prompt (Qwen2.5-VL chat states and ByT5 states of quoted text, with their masks); the
velocity the loss trains equals the one a denoising step of the pipeline applies, its guider set to the conditional
prediction alone (the step's latents read before and after it: v = (x_after − x) / (σ_next − σ), so a wrong sign or
timestep convention fails); the latents equal the image-to-video pipeline's encoding of a one-frame clip. The flow
script end to end on a folder of clips: the family told from the folder, exact resume, the file reloads to
the trained outputs, the loss on the training set falls; --export_format comfyui refused before the first step.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
    HunyuanVideo15ImageToVideoPipeline,
)
from helpers.flow_loss import check_trained_file, flow_args
from helpers.flow_runs import check_exact_resume, make_clip_folder
from PIL import Image
from safetensors.torch import load_file

from lokr_diffusers import families
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.clips import DreamBoothClipDataset, load_clip_folder
from lokr_diffusers.training.data import collate
from lokr_diffusers.training.errors import TrainingInputError
from lokr_diffusers.training.flow import flow_loss
from lokr_diffusers.training.flow_models import flow_model
from lokr_diffusers.training.flow_video import encode_hunyuanvideo15
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import train

FAMILY = "hunyuanvideo15"
# quoted text (both quote styles, one repeated) goes to ByT5; a caption without quotes gets zeros there
CAPTIONS = ['a sign that says "sks" and “dog”', "a red cat"]
CPU = torch.device("cpu")
ARGS = SimpleNamespace(max_sequence_length=16)
PROMPT = "a photo of sks dog"
LATENTS = (2, 4, 2, 4, 4)  # 5 frames of 16 x 16 px: 2 latent frames of 4 x 4 (the tiny VAE's 4x, 4x)


def pipeline() -> HunyuanVideo15Pipeline:
    return families.build_tiny(FAMILY)


def test_hunyuanvideo15_trains_with_the_flow_script() -> None:
    """The record's defaults: uniform timesteps, the pipeline's 1000 Qwen tokens; the clips' frames as the
    pipeline's: 1 + 4k (the VAE's temporal ratio), 121 by default."""
    training = families.get(FAMILY).training
    assert training is not None and training.script == "flow" and training.text_encoders == ()
    assert (training.weighting_scheme, training.max_sequence_length) == ("none", 1000)
    pipe = pipeline()
    model = flow_model(FAMILY)
    assert training.max_sequence_length == pipe.tokenizer_max_length
    assert model.frames_factor == pipe.vae_scale_factor_temporal
    assert model.default_frames == inspect.signature(HunyuanVideo15Pipeline.__call__).parameters["num_frames"].default


def test_the_prompt_encoding_equals_the_pipelines() -> None:
    """At the pipeline's own length (1000 Qwen tokens after its 108-token chat head, 256 ByT5 bytes)."""
    pipe = pipeline()
    want = pipe.encode_prompt(CAPTIONS, device=CPU, batch_size=2)
    ours = encode_hunyuanvideo15(pipe, CAPTIONS, 1000, CPU)
    assert [t.shape for t in ours] == [(2, 1000, 16), (2, 1000), (2, 256, 8), (2, 256)]
    for a, b in zip(ours, want, strict=True):
        assert torch.equal(a.to(b.dtype), b)
    # the chat head is cut off exactly: each caption's first token is its own (the tiny tokenizer's 108-token head)
    assert ours[1][:, 0].tolist() == [1, 1] and pipe.prompt_template_encode_start_idx == 108
    # the quoted text reached ByT5; the caption without quotes has zero states and an empty mask
    assert ours[3][0].sum() > 0 and ours[2][0].abs().sum() > 0
    assert not ours[3][1].any() and not ours[2][1].any()


def _step_velocity(pipe, x: torch.Tensor, k: int, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents before step `k`, the velocity that step applies to them, its timestep), read around the pipeline's
    scheduler step (HunyuanVideo15Pipeline has no step callback): v = (x_after − x_before) / (σ_next − σ)."""
    seen: dict = {}
    step = pipe.scheduler.step

    def spy(model_output, timestep, sample, **kw):
        out = step(model_output, timestep, sample, **kw)
        if len(seen) == 0 and pipe.scheduler.step_index == k + 1:
            seen.update(before=sample.clone(), after=out[0].clone(), t=timestep)
        return out

    pipe.scheduler.step = spy
    try:
        with torch.no_grad():
            pipe(prompt=CAPTIONS, num_inference_steps=steps, latents=x.clone(), num_frames=5, height=16, width=16,
                 output_type="latent")
    finally:
        del pipe.scheduler.step
    s = pipe.scheduler.sigmas
    return seen["before"], (seen["after"] - seen["before"]) / (s[k + 1] - s[k]), seen["t"]


def test_the_velocity_is_the_pipelines() -> None:
    """Step 1 of 2 (σ 0.5, t ≈ 833 with the scheduler's shift 5): the guider at scale 1 gives the conditional
    prediction alone, which the piece's velocity equals. The pipeline's Qwen length (its tokenizer_max_length, 1000)
    set to 16 on both sides: the encoders are held equal at 1000 above."""
    pipe = pipeline()
    pipe.guider = ClassifierFreeGuidance(guidance_scale=1.0)
    pipe.tokenizer_max_length = ARGS.max_sequence_length
    model = flow_model(FAMILY)
    x = torch.randn(LATENTS, generator=torch.Generator().manual_seed(0))
    before, want, t = _step_velocity(pipe, x, 1, 2)
    assert 800 < float(t) < 900
    args = ARGS
    with torch.no_grad():
        ours = model.velocity(pipe, before, t.expand(2), model.encode(pipe, CAPTIONS, args, CPU), args, CPU)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_the_latents_are_the_image_to_video_pipelines_encoding() -> None:
    """A one-frame clip's latents equal HunyuanVideo15ImageToVideoPipeline's latents of that image (the VAE's mode
    times its scaling factor); a 5-frame clip's have the T2V pipeline's latent shape."""
    pipe = pipeline()
    model = flow_model(FAMILY)
    g = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy())
    with torch.no_grad():
        want = HunyuanVideo15ImageToVideoPipeline._get_image_latents(pipe.vae, pipe.video_processor, image, 16, 16, CPU)
        pixels = pipe.video_processor.preprocess(image, height=16, width=16).unsqueeze(2)
        torch.testing.assert_close(model.latents(pipe.vae, pixels, torch.Generator()), want, rtol=0, atol=0)
        clip = torch.rand(2, 3, 5, 16, 16, generator=g) * 2 - 1
        assert model.latents(pipe.vae, clip, torch.Generator()).shape == LATENTS


# ---------------------------------------------------------------------------------------------- the flow script

def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt", PROMPT,
            "--resolution", "16", "--num_frames", "5", "--train_batch_size", "2", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out, "--checkpointing_steps",
            "2", "--max_sequence_length", "16", *extra]


def _velocity(pipe, family: str, cond: object) -> torch.Tensor:
    x = torch.randn(LATENTS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return flow_model(family).velocity(pipe, x, torch.tensor([300.0, 800.0]), cond, ARGS, CPU)


def _fixed_loss(pipe, family: str, batch: dict, prompts: dict) -> float:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return flow_loss(pipe, scheduler, batch, flow_args(family, weighting_scheme="none"), family,
                         torch.Generator().manual_seed(0), torch.float32, CPU, prompts=prompts).item()


def test_the_flow_script_trains_hunyuanvideo15_on_clips(tmp_path) -> None:
    """The flow script tells HunyuanVideo 1.5 from the folder, reads the clips, trains (a validation video through
    the pipeline), resumes from a checkpoint to the very same adapter, and its file loads back to the trained
    model's outputs, which lower the loss on the training clips."""
    model = str(tmp_path / "model")
    pipeline().save_pretrained(model, safe_serialization=True)
    data = make_clip_folder(str(tmp_path / "data"), clips=2, frames=7, size=16)
    out = str(tmp_path / "out")
    argv = _argv(model, data, out, "--export_format", "comfyui", "--validation_prompt", 'a "sks" dog',
                 "--validation_steps", "1", "--num_validation_images", "1")
    args = parse("t", True, argv, "flow")
    result = train(args)
    assert (result.global_step, args.model_family, args.num_frames, args.max_sequence_length,
            args.weighting_scheme) == (4, FAMILY, 5, 16, "none")
    assert {"checkpoint-2", "checkpoint-4", OURS_FILE, "README.md"} <= set(os.listdir(out))
    # the default targets (the double blocks) have ComfyUI names: Tencent's, every adapted module written
    comfy = {k.rsplit(".", 1)[0] for k in load_file(os.path.join(out, "lokr_comfyui.safetensors"))}
    ours = {k.rsplit(".", 1)[0] for k in load_file(os.path.join(out, OURS_FILE))}
    assert len(comfy) == len(ours) == 24 and all(k.startswith("diffusion_model.double_blocks.") for k in comfy)
    with Image.open(os.path.join(out, "validation", "step_000004_0.gif")) as gif:
        assert gif.n_frames == 5 and gif.size == (16, 16)
    again = str(tmp_path / "again")
    check_exact_resume(out, again, _argv(model, data, again, "--export_format", "none", "--resume_from_checkpoint",
                                         "latest"))
    ds = DreamBoothClipDataset(load_clip_folder(data), PROMPT, 5, resolution=16, center_crop=True)
    batch = collate([ds[i] for i in range(len(ds))])
    check_trained_file(model, out, args, FAMILY, CAPTIONS, ARGS, batch, _velocity, _fixed_loss)


def test_an_export_comfyui_of_the_token_refiners_qkv_is_refused_before_the_first_step(tmp_path) -> None:
    """--lora_layers attn also takes the token refiner's to_q / to_k / to_v, which one by one have no ComfyUI name
    (rows of one original self_attn_qkv): --export_format comfyui is refused before training, nothing written. (The
    default targets, the double blocks, export: the end-to-end test above.)"""
    model = str(tmp_path / "model")
    pipeline().save_pretrained(model, safe_serialization=True)
    data = make_clip_folder(str(tmp_path / "data"), clips=1, frames=5, size=16)
    out = str(tmp_path / "out")
    with pytest.raises(TrainingInputError, match=r"--export_format comfyui: 3 of the adapter's modules .*"
                                                 r"token_refiner\.refiner_blocks\.0\.attn\.to_[qkv]"):
        train(parse("t", True, _argv(model, data, out, "--export_format", "comfyui", "--lora_layers", "attn"),
                    "flow"))
    assert not os.path.exists(out) or not os.listdir(out)
