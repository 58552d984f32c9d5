"""Flow-matching training of LTX-2 (video only) on the tiny offline pipeline (tests/helpers/tiny_ltx2.py;
`families.build_tiny("ltx2")`).

The piece (training/flow_video.py LTX2) against LTX2Pipeline itself: its prompts equal the pipeline's `encode_prompt`
through the pipeline's `connectors`; its latents the pipeline's own normalisation of the VAE's mean; its velocity the
one a denoising step of the pipeline applies when the step's video prediction is the modality-isolated one (the
pipeline's modality guidance at modality_scale 0: x0 + (0 − 1) · (x0 − x0_isolated) = x0_isolated, no classifier-free
guidance, no STG, no rescale), read back as tests/test_training_flow_video.py reads Wan's and LTX-Video's. The flow
script end to end on a folder of clips.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline
from helpers.flow_loss import check_trained_file, flow_args
from helpers.flow_runs import check_exact_resume, make_clip_folder, step_velocity
from helpers.tiny_ltx2 import REGISTERS
from safetensors.torch import load_file

from lokr_diffusers import families
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.checks import check_pipeline
from lokr_diffusers.training.clips import DreamBoothClipDataset, load_clip_folder
from lokr_diffusers.training.data import collate
from lokr_diffusers.training.errors import TrainingInputError
from lokr_diffusers.training.family import training_family
from lokr_diffusers.training.flow import flow_loss
from lokr_diffusers.training.flow_models import flow_model
from lokr_diffusers.training.flow_video import encode_ltx2
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import train

CAPTIONS = ["a photo of sks dog  ", "a red cat painting"]  # unequal lengths: the left padding shows; stripped
CPU = torch.device("cpu")
LENGTH = 2 * REGISTERS  # a multiple of the connectors' learnable registers
ARGS = SimpleNamespace(max_sequence_length=LENGTH, frame_rate=24.0)
PROMPT = "a photo of sks dog"


def _pipe_cond(pipe: LTX2Pipeline) -> tuple[torch.Tensor, ...]:
    """What LTX2Pipeline.__call__ hands the transformer for CAPTIONS without guidance: encode_prompt, then its
    connectors with the tokenizer's padding side."""
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=LENGTH,
                                          device=CPU)[:2]
        return pipe.connectors(embeds, mask, padding_side=pipe.tokenizer.padding_side)


def test_ltx2_trains_with_the_flow_script() -> None:
    training = families.get("ltx2").training
    assert training is not None and training.script == "flow" and training.text_encoders == ()
    assert (training.weighting_scheme, training.max_sequence_length) == ("none", 1024)
    model = flow_model("ltx2")
    assert (model.family, model.frames_factor, model.default_frames) == ("ltx2", 8, 121)


def test_ltx2_prompt_encoding_equals_the_pipelines() -> None:
    """Both streams' caption states and the mask, equal to the pipeline's; the caption left-padded even where the
    tokenizer was left padding on the right (the pipeline sets `left` before it encodes)."""
    pipe = families.build_tiny("ltx2")
    pipe.tokenizer.padding_side = "right"
    with torch.no_grad():
        ours = encode_ltx2(pipe, CAPTIONS, LENGTH, CPU)
    want = _pipe_cond(pipe)
    assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, want, strict=True))
    video, audio, mask = ours
    assert video.shape == audio.shape == (2, LENGTH, 16) and not torch.equal(video, audio)
    assert mask.shape == (2, LENGTH) and mask.sum(1).tolist() == [LENGTH, LENGTH]  # registers fill the padding


def _step_velocity(pipe: LTX2Pipeline, x: torch.Tensor, k: int, steps: int, **kw: object
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, t): the velocity the pipeline's step `k` (of `steps`) applies to video latents set to `x` (packed tokens)
    before it, and its timestep; the audio latents are the pipeline's own (the video prediction the step uses here
    does not read them)."""
    return step_velocity(pipe, x, k, steps, prompt=CAPTIONS, height=32, width=32, num_frames=5, frame_rate=24.0,
                         guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0,
                         guidance_rescale=0.0, audio_guidance_rescale=0.0, max_sequence_length=LENGTH,
                         generator=torch.Generator().manual_seed(0), **kw)


def test_the_ltx2_velocity_is_the_pipelines_video_only_step() -> None:
    """The piece's velocity on (B, C, F, h, w) latents equals the pipeline's step with the modality-isolated video
    prediction (modality_scale 0; the audio scale above 1 turns the isolation pass on): packing, rope positions at
    --frame_rate, timestep and sign as the pipeline's. The pipeline's ordinary step, whose video attends to its
    audio, differs: the audio stream is off in training, not ignored by the tiny model."""
    pipe = families.build_tiny("ltx2")
    model = flow_model("ltx2")
    x = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # 5 frames of 32 px
    packed = LTX2Pipeline._pack_latents(x)
    want, t = _step_velocity(pipe, packed, 1, 3, modality_scale=0.0, audio_modality_scale=2.0)
    assert 0 < t < 1000
    with torch.no_grad():
        ours = model.velocity(pipe, x, t.expand(2), model.encode(pipe, CAPTIONS, ARGS, CPU), ARGS, CPU)
    assert ours.shape == x.shape
    torch.testing.assert_close(LTX2Pipeline._pack_latents(ours), want, rtol=1e-4, atol=1e-5)
    joint, t_joint = _step_velocity(pipe, packed, 1, 3, modality_scale=1.0, audio_modality_scale=1.0)
    assert t_joint == t and (joint - want).abs().max() > 1e-3


def test_the_ltx2_latents_are_the_pipelines_normalised_vae_mean() -> None:
    """x = the pipeline's _normalize_latents of the VAE's mean (the tiny VAE's statistics are not 0 / 1); a 5-frame
    32 px clip is (B, 8, 3, 4, 4), the shape the velocity takes."""
    pipe = families.build_tiny("ltx2")
    vae = pipe.vae
    pixels = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = flow_model("ltx2").latents(vae, pixels, torch.Generator().manual_seed(0))
        mode = vae.encode(pixels).latent_dist.mode()
    want = LTX2Pipeline._normalize_latents(mode, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert ours.shape == (2, 8, 3, 4, 4) and torch.equal(ours, want) and not torch.equal(ours, mode)


def test_the_loss_reaches_only_the_video_streams_adapters(tmp_path) -> None:
    """One flow-loss backward: --lora_layers default puts LoKr on the video stream's attention and feed-forward
    only (Lightricks' video-only targets), and every one of them gets a gradient."""
    from lokr_diffusers import add_lokr, lokr_layers
    from lokr_diffusers.training.loop import ADAPTER, lokr_configs
    from lokr_diffusers.training.targets import denoiser_targets

    pipe = families.build_tiny("ltx2")
    args = flow_args("ltx2", weighting_scheme="none", frame_rate=24.0, max_sequence_length=LENGTH)
    options = parse("t", True, ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(tmp_path),
                                "--instance_prompt", PROMPT, "--output_dir", "o", "--rank", "2"], "flow")
    options.model_family = "ltx2"  # what the run sets once it has read the model folder
    add_lokr(pipe, lokr_configs(options, ["transformer"]), ADAPTER)
    paths = [p for p, _ in lokr_layers(pipe.transformer)]
    assert paths and not [p for p in paths if "audio" in p]
    options.lora_layers = "attn"
    assert denoiser_targets(options) == [f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v",
                                                                                        "to_out.0")]
    assert {p.split(".", 2)[2] for p in paths} == {f"{a}.{m}" for a in ("attn1", "attn2")
                                                  for m in ("to_q", "to_k", "to_v", "to_out.0")} | \
        {"ff.net.0.proj", "ff.net.2"}
    for _, layer in lokr_layers(pipe.transformer):  # a non-zero update everywhere, so every factor has a gradient
        for t in layer.factors(ADAPTER).values():
            torch.nn.init.normal_(t, std=0.1)
    batch = {"pixel_values": torch.rand(2, 3, 5, 32, 32) * 2 - 1, "caption": CAPTIONS}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    flow_loss(pipe, scheduler, batch, args, "ltx2", torch.Generator().manual_seed(0), torch.float32, CPU).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for _, layer in lokr_layers(pipe.transformer)
               for t in layer.factors(ADAPTER).values())


def test_a_caption_length_the_connectors_cannot_take_is_refused(tmp_path) -> None:
    """The connectors replace padding with their learnable registers in whole blocks: --max_sequence_length must be
    a multiple of them, told before the first step (the pipeline itself fails inside the connectors)."""
    pipe = families.build_tiny("ltx2")
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(tmp_path), "--instance_prompt", PROMPT,
            "--output_dir", "o", "--resolution", "32"]
    ltx2 = training_family("ltx2")
    check_pipeline(pipe, parse("t", True, [*argv, "--max_sequence_length", str(LENGTH)], "flow"), ltx2)
    with pytest.raises(TrainingInputError, match=f"--max_sequence_length 12: .* multiple of {REGISTERS} tokens.* 16"):
        check_pipeline(pipe, parse("t", True, [*argv, "--max_sequence_length", "12"], "flow"), ltx2)
    with pytest.raises(ValueError, match="divisible by the number of learnable registers"):
        encode_ltx2(pipe, CAPTIONS, 12, CPU)


# ---------------------------------------------------------------------------------------------- the flow script


def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt", PROMPT,
            "--resolution", "32", "--num_frames", "9", "--train_batch_size", "2", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out, "--checkpointing_steps", "2",
            "--max_sequence_length", str(LENGTH), "--frame_rate", "24", "--export_format", "none", *extra]


def _velocity(pipe, family: str, cond: object) -> torch.Tensor:
    x = torch.randn(2, 8, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return flow_model(family).velocity(pipe, x, torch.tensor([300.0, 800.0]), cond, ARGS, CPU)


def _fixed_loss(pipe, family: str, batch: dict, prompts: dict) -> float:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return flow_loss(pipe, scheduler, batch, flow_args(family, weighting_scheme="none", frame_rate=24.0,
                                                           max_sequence_length=LENGTH), family,
                         torch.Generator().manual_seed(0), torch.float32, CPU, prompts=prompts).item()


def test_the_flow_script_trains_ltx2_on_clips(tmp_path) -> None:
    """The flow script tells LTX-2 from the folder, reads 9-frame clips, trains 4 steps, resumes from a checkpoint to
    the very same adapter, writes a validation video and a ComfyUI file, and its file loads back to the trained
    model's outputs, which lower the loss on the training clips."""
    model = str(tmp_path / "model")
    families.build_tiny("ltx2").save_pretrained(model, safe_serialization=True)
    data = make_clip_folder(str(tmp_path / "data"), clips=2, frames=11, size=32)
    out = str(tmp_path / "out")
    # 2 validation steps: with LTX-2's shift_terminal one step (sigmas [1.0]) stretches to NaN in the scheduler
    argv = _argv(model, data, out, "--validation_prompt", "a dog", "--validation_steps", "2",
                 "--num_validation_images", "1")
    argv[argv.index("--export_format") + 1] = "comfyui"  # checked before the first step (checks.check_export)
    args = parse("t", True, argv, "flow")
    result = train(args)
    assert (result.global_step, args.model_family, args.num_frames, args.max_sequence_length) == (4, "ltx2", 9, LENGTH)
    assert {"checkpoint-2", "checkpoint-4", OURS_FILE, "README.md", "lokr_comfyui.safetensors"} <= set(os.listdir(out))
    comfy = load_file(os.path.join(out, "lokr_comfyui.safetensors"))  # LTX-2's original names, no audio module
    assert comfy and all(k.startswith("diffusion_model.transformer_blocks.") for k in comfy)
    assert not [k for k in comfy if "audio" in k]
    assert os.path.exists(os.path.join(out, "validation", "step_000004_0.gif"))
    again = str(tmp_path / "again")
    a = check_exact_resume(out, again, _argv(model, data, again, "--resume_from_checkpoint", "latest"))
    assert not [k for k in a if "audio" in k]
    ds = DreamBoothClipDataset(load_clip_folder(data), PROMPT, 9, resolution=32, center_crop=True)
    batch = collate([ds[i] for i in range(len(ds))])
    check_trained_file(model, out, args, "ltx2", CAPTIONS, ARGS, batch, _velocity, _fixed_loss)

