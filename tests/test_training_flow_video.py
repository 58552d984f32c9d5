"""Flow-matching training of the video families, Wan, LTX-Video and HunyuanVideo, on tiny offline pipelines
(tests/helpers/tiny_video.py, tiny_ltx.py, tiny_hunyuanvideo.py; `families.build_tiny`).

The pieces (training/flow_video.py) against the pipelines themselves: the prompt encoders equal the pipelines'
`encode_prompt`, and the velocity the loss trains equals the one a denoising step of the pipeline applies (the latents
set to x before the step, read back after it: v = (x_after − x) / (σ_next − σ)), for both experts of Wan 2.2 A14B, of
which `transformer` trains on its own timesteps only. The clip reader against frames the test writes (PNG frame
folders, an animated GIF). The flow script end to end on a folder of clips: the family told from the folder, exact
resume, the file reloads to the trained outputs, the loss on the training set falls.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LTXPipeline
from helpers.flow_loss import check_trained_file, flow_args
from helpers.flow_runs import COLOURS, check_exact_resume, clip_frames, make_clip_folder, step_velocity
from helpers.tiny_video import make_wan_pipeline
from PIL import Image
from safetensors.torch import load_file

from lokr_diffusers import families
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.pipeline import add_lokr
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.clips import (
    DreamBoothClipDataset,
    check_clips,
    load_clip_folder,
    read_frames,
    transform_clip,
)
from lokr_diffusers.training.data import ImageTransform, collate
from lokr_diffusers.training.errors import TrainingInputError
from lokr_diffusers.training.family import training_family
from lokr_diffusers.training.flow import flow_loss, sample_sigmas
from lokr_diffusers.training.flow_models import flow_model
from lokr_diffusers.training.flow_video import encode_hunyuanvideo, encode_ltx, encode_wan
from lokr_diffusers.training.loop import ADAPTER, lokr_configs
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import _denoiser, train

CAPTIONS = ["a photo of  sks dog &amp; cat", "a red cat"]  # Wan cleans HTML entities and whitespace runs
CPU = torch.device("cpu")
ARGS = SimpleNamespace(max_sequence_length=16, frame_rate=25.0)
PROMPT = "a photo of sks dog"


def test_the_video_families_train_with_the_flow_script() -> None:
    for name, length in (("wan", 512), ("ltxvideo", 128), ("hunyuanvideo", 256)):
        training = families.get(name).training
        assert training is not None and training.script == "flow" and training.text_encoders == ()
        assert (training.weighting_scheme, training.max_sequence_length) == ("none", length)
        assert flow_model(name).family == name


def test_wan_prompt_encoding_equals_the_pipelines() -> None:
    pipe = families.build_tiny("wan")
    want = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=16, device=CPU)[0]
    ours = encode_wan(pipe, CAPTIONS, 16, CPU)
    assert torch.equal(ours, want) and ours.shape == (2, 16, 16)


def test_ltx_prompt_encoding_equals_the_pipelines() -> None:
    pipe = families.build_tiny("ltxvideo")
    want, want_mask = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=16,
                                         device=CPU)[:2]
    ours, mask = encode_ltx(pipe, CAPTIONS, 16, CPU)
    assert torch.equal(ours, want) and torch.equal(mask, want_mask)


def _step_velocity(pipe, x: torch.Tensor, k: int, steps: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, t): the velocity the pipeline's denoising step `k` (of `steps`) applies to latents set to `x` (the
    pipeline's own latent layout) and its timestep, for CAPTIONS (no guidance unless `kw` asks)."""
    kw.setdefault("guidance_scale", 1.0)
    return step_velocity(pipe, x, k, steps, prompt=CAPTIONS, max_sequence_length=16, **kw)


def test_the_wan_velocity_is_the_pipelines_for_both_experts() -> None:
    """Wan 2.2 A14B (tiny): step 0 (t = 1000) runs the high-noise `transformer`, step 1 (t ≈ 751 < 875) the low-noise
    `transformer_2`; the piece's velocity through either equals the pipeline's step. Its latents: (B, C, F, h, w)."""
    pipe = make_wan_pipeline(0, experts=2)
    model = flow_model("wan")
    x = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.encode(pipe, CAPTIONS, ARGS, CPU)
    for k, expert in ((0, "transformer"), (1, "transformer_2")):
        want, t = _step_velocity(pipe, x, k, 3, height=16, width=16, num_frames=5)
        assert (t >= 875) == (expert == "transformer")
        parts = SimpleNamespace(vae=pipe.vae, config=pipe.config, transformer=getattr(pipe, expert))
        with torch.no_grad():
            ours = model.velocity(parts, x, t.expand(2), cond, ARGS, CPU)
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    pixels = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert model.latents(pipe.vae, pixels, torch.Generator()).shape == x.shape


def test_the_high_noise_expert_trains_on_its_own_timesteps() -> None:
    """With two experts, `transformer` trains on t >= boundary_ratio * 1000 only; one expert: the whole schedule."""
    two = make_wan_pipeline(0, experts=2)
    model = flow_model("wan")
    assert model.timestep_range(two, ARGS) == (875.0, float("inf"))
    assert model.timestep_range(families.build_tiny("wan"), ARGS) is None
    assert model.timestep_range(two, SimpleNamespace(train_transformer_2=True)) == (0.0, 875.0)
    with pytest.raises(TrainingInputError, match="--train_transformer_2: m has no second expert"):
        _denoiser(SimpleNamespace(train_transformer_2=True, pretrained_model_name_or_path="m"),
                  families.build_tiny("wan"), training_family("wan"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(two.scheduler.config)
    t, sigmas = sample_sigmas(scheduler, 4096, flow_args("wan", weighting_scheme="none"),
                              torch.Generator().manual_seed(0), model.timestep_range(two, ARGS))
    assert t.min() >= 875 and t.max() == scheduler.timesteps[0]
    index = (scheduler.timesteps[None] == t[:, None]).float().argmax(1)
    assert torch.equal(scheduler.sigmas[index], sigmas)


def test_the_ltx_velocity_is_the_pipelines() -> None:
    pipe = families.build_tiny("ltxvideo")
    model = flow_model("ltxvideo")
    x = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # 5 frames of 32 px
    want, t = _step_velocity(pipe, LTXPipeline._pack_latents(x), 1, 3, height=32, width=32, num_frames=5)
    with torch.no_grad():
        ours = model.velocity(pipe, x, t.expand(2), model.encode(pipe, CAPTIONS, ARGS, CPU), ARGS, CPU)
    torch.testing.assert_close(LTXPipeline._pack_latents(ours), want, rtol=1e-4, atol=1e-5)
    pixels = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert model.latents(pipe.vae, pixels, torch.Generator()).shape == x.shape


def test_hunyuanvideo_prompt_encoding_equals_the_pipelines() -> None:
    """The Llama states of the templated captions past the template's 95-token head, their mask, CLIP's pooled."""
    pipe = families.build_tiny("hunyuanvideo")
    states, mask, pooled = encode_hunyuanvideo(pipe, CAPTIONS, 16, CPU)
    want, want_pooled, want_mask = pipe.encode_prompt(CAPTIONS, device=CPU, max_sequence_length=16)
    assert torch.equal(states, want) and torch.equal(mask, want_mask) and torch.equal(pooled, want_pooled)
    assert states.shape[1] == 16 and 0 < int(mask.sum(1).min()) < 16  # the shorter caption padded


@pytest.mark.parametrize("guidance", [None, 2.5], ids=["default", "given"])
def test_the_hunyuanvideo_velocity_is_the_pipelines(guidance: float | None) -> None:
    """The embedded guidance: --guidance_scale (default 1, musubi-tuner's) times 1000, as the pipeline feeds it."""
    pipe = families.build_tiny("hunyuanvideo")
    model = flow_model("hunyuanvideo")
    x = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))  # 5 frames of 16 px
    want, t = _step_velocity(pipe, x, 1, 3, height=16, width=16, num_frames=5, guidance_scale=guidance or 1.0)
    args = SimpleNamespace(max_sequence_length=16, guidance_scale=guidance)
    with torch.no_grad():
        ours = model.velocity(pipe, x, t.expand(2), model.encode(pipe, CAPTIONS, args, CPU), args, CPU)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    pixels = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert model.latents(pipe.vae, pixels, torch.Generator()).shape == x.shape


# ------------------------------------------------------------------------------------------------------ clips

def _pixels(im: Image.Image) -> bytes:
    return im.convert("RGB").tobytes()


def test_the_clip_reader_reads_frame_folders_and_gifs(tmp_path) -> None:
    folder = make_clip_folder(str(tmp_path / "data"), clips=1, frames=6)
    gif = clip_frames(7, shift=2)
    gif[0].save(tmp_path / "data" / "moving.gif", save_all=True, append_images=gif[1:], duration=40, loop=0)
    (tmp_path / "data" / "moving.txt").write_text("a moving square")
    pairs = load_clip_folder(folder, argument="--instance_data_dir")
    assert [(os.path.relpath(p, folder), c) for p, c in pairs] == [("clip0", "clip 0"),
                                                                   ("moving.gif", "a moving square")]
    written = clip_frames(6, shift=0)
    assert [_pixels(f) for f in read_frames(pairs[0][0])] == [_pixels(f) for f in written]
    assert [_pixels(f) for f in read_frames(pairs[0][0], 2, 3)] == [_pixels(f) for f in written[2:5]]
    assert [_pixels(f) for f in read_frames(pairs[1][0])] == [_pixels(f) for f in gif]
    # up front: a clip shorter than --num_frames is skipped, one left is enough; none left is an error
    assert check_clips(pairs, 7, "--instance_data_dir") == pairs[1:]
    with pytest.raises(TrainingInputError, match="none of the 2 clip"):
        check_clips(pairs, 9, "--instance_data_dir")


def write_video(path: str, frames: list[Image.Image], fps: int = 8) -> str:
    """An MPEG-4 video of `frames` written with PyAV (the test extra installs it)."""
    import av
    import numpy as np

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for im in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(im.convert("RGB")), format="rgb24")))
        container.mux(stream.encode())
    return path


def test_a_video_file_is_read_with_pyav(tmp_path) -> None:
    """A video file's frames, decoded by PyAV, are the frames written (a lossy codec: colours within a few levels),
    counted and windowed as a frame folder's; a clip too short for --num_frames is skipped by name."""
    import numpy as np

    folder = tmp_path / "data"
    folder.mkdir()
    frames = [Image.new("RGB", (32, 32), c) for c in COLOURS[:6]]
    write_video(str(folder / "clip.mp4"), frames)
    write_video(str(folder / "short.mp4"), frames[:2])
    (folder / "clip.txt").write_text("a video of sks dog")
    pairs = load_clip_folder(str(folder))
    assert dict(pairs)[str(folder / "clip.mp4")] == "a video of sks dog"
    got = read_frames(str(folder / "clip.mp4"), start=1, count=4)
    assert len(got) == 4 and all(im.size == (32, 32) and im.mode == "RGB" for im in got)
    for im, want in zip(got, COLOURS[1:5], strict=True):
        assert np.abs(np.asarray(im, dtype=np.int16).mean((0, 1)) - np.asarray(want)).max() < 12
    assert check_clips(pairs, 5, "--instance_data_dir") == [(str(folder / "clip.mp4"), "a video of sks dog")]


def test_a_video_file_without_pyav_is_refused_naming_it(tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    pairs = load_clip_folder(str(folder))
    with pytest.raises(TrainingInputError, match=r"PyAV: `pip install av`"):
        check_clips(pairs, 1, "--instance_data_dir")


def test_every_frame_of_a_clip_gets_the_same_crop_and_flip(tmp_path) -> None:
    """The window and the crop / flip are the image transform's, alike on every frame; center_crop takes the middle
    window; the same generator gives the same clip (exact resume)."""
    folder = make_clip_folder(str(tmp_path / "data"), clips=1, frames=9)
    clip = os.path.join(folder, "clip0")
    centre = transform_clip(clip, 5, ImageTransform(16, center_crop=True), torch.Generator().manual_seed(0))
    frames = clip_frames(9)
    want = [ImageTransform(16, center_crop=True)(f).pixel_values for f in frames[2:7]]
    assert centre["pixel_values"].shape == (3, 5, 16, 16)
    assert torch.equal(centre["pixel_values"], torch.stack(want, dim=1))
    random = ImageTransform(16, random_flip=True)
    a = transform_clip(clip, 5, random, torch.Generator().manual_seed(3))
    b = transform_clip(clip, 5, random, torch.Generator().manual_seed(3))
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    # one crop and flip for all frames: a clip of one picture repeated comes out as one picture repeated
    still = tmp_path / "still"
    still.mkdir()
    for k in range(6):
        frames[4].save(still / f"{k}.png")
    for seed in range(4):
        out = transform_clip(str(still), 5, random, torch.Generator().manual_seed(seed))["pixel_values"]
        assert all(torch.equal(out[:, j], out[:, 0]) for j in range(5))


# ---------------------------------------------------------------------------------------------- the flow script

SIZES = {"wan": (16, 5, (2, 4, 5, 8, 8)), "ltxvideo": (32, 9, (2, 8, 5, 4, 4)),  # resolution, frames, latents
         "hunyuanvideo": (16, 5, (2, 4, 2, 8, 8))}


def _argv(model: str, data: str, out: str, family: str, *extra: str) -> list[str]:
    resolution, frames, _ = SIZES[family]
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt", PROMPT,
            "--resolution", str(resolution), "--num_frames", str(frames), "--train_batch_size", "2",
            "--max_train_steps", "4", "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out,
            "--checkpointing_steps", "2", "--max_sequence_length", "16", "--export_format", "none", *extra]


def _velocity(pipe, family: str, cond: object) -> torch.Tensor:
    x = torch.randn(SIZES[family][2], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return flow_model(family).velocity(pipe, x, torch.tensor([300.0, 800.0]), cond, ARGS, CPU)


def _fixed_loss(pipe, family: str, batch: dict, prompts: dict) -> float:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return flow_loss(pipe, scheduler, batch, flow_args(family, weighting_scheme="none", frame_rate=25.0), family,
                         torch.Generator().manual_seed(0), torch.float32, CPU, prompts=prompts).item()


@pytest.mark.parametrize("family", ["wan", "ltxvideo", "hunyuanvideo"])
def test_the_flow_script_trains_a_video_family_on_clips(tmp_path, family: str, caplog) -> None:
    """The flow script tells the video family from the folder, reads the clips (--num_frames fitted to the VAE:
    6 -> 5 for Wan), trains, resumes from a checkpoint to the very same adapter, and its file loads back to the
    trained model's outputs, which lower the loss on the training clips."""
    model = str(tmp_path / "model")
    families.build_tiny(family).save_pretrained(model, safe_serialization=True)
    resolution, frames, _ = SIZES[family]
    data = make_clip_folder(str(tmp_path / "data"), clips=2, frames=frames + 2, size=resolution)
    out = str(tmp_path / "out")
    argv = _argv(model, data, out, family)
    if family == "wan":  # a count the VAE does not take is rounded down, with a warning
        argv[argv.index("--num_frames") + 1] = str(frames + 1)
    argv += ["--validation_prompt", "a dog", "--validation_steps", "1", "--num_validation_images", "1"]
    args = parse("t", True, argv, "flow")
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers.training.clips"):
        result = train(args)
    assert (result.global_step, args.model_family, args.num_frames, args.max_sequence_length) == \
        (4, family, frames, 16)
    assert (family != "wan") or "training on 5" in caplog.text
    assert {"checkpoint-2", "checkpoint-4", OURS_FILE, "README.md"} <= set(os.listdir(out))
    with Image.open(os.path.join(out, "validation", "step_000004_0.gif")) as gif:  # the validation video (the tiny
        assert gif.n_frames > 1 and gif.size == (resolution, resolution)  # Wan VAE decodes 5 latent frames to 6)
    again = str(tmp_path / "again")
    check_exact_resume(out, again, _argv(model, data, again, family, "--resume_from_checkpoint", "latest"))
    # the trained model: the base with the step-4 checkpoint's factors
    ds = DreamBoothClipDataset(load_clip_folder(data), PROMPT, frames, resolution=resolution, center_crop=True)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (2, 3, frames, resolution, resolution)
    # its file, loaded into a fresh pipeline, gives the trained model's outputs and lowers the loss on the data
    check_trained_file(model, out, args, family, CAPTIONS, ARGS, batch, _velocity, _fixed_loss)


@pytest.mark.slow
def test_the_flow_script_trains_wan_2_2s_low_noise_expert(tmp_path) -> None:
    """--train_transformer_2: the adapter goes on the low-noise expert only, and its file (a `transformer` file, as
    diffusers writes an expert's) loads into transformer_2 with load_into_transformer_2=True to the trained outputs."""
    model = str(tmp_path / "model")
    make_wan_pipeline(0, experts=2).save_pretrained(model, safe_serialization=True)
    data = make_clip_folder(str(tmp_path / "data"), clips=2, frames=5, size=16)
    out = str(tmp_path / "out")
    argv = _argv(model, data, out, "wan", "--train_transformer_2")
    argv[argv.index("--max_train_steps") + 1] = "2"
    args = parse("t", True, argv, "flow")
    assert train(args).global_step == 2
    state = load_file(os.path.join(out, "checkpoint-2", "adapter.safetensors"))
    assert state and all(k.startswith("transformer_2.") for k in state)
    trained = DiffusionPipeline.from_pretrained(model)
    add_lokr(trained, lokr_configs(args, ["transformer_2"]), ADAPTER)
    with torch.no_grad():
        for path, layer in lokr_layers(trained.transformer_2):
            for k, t in layer.factors(ADAPTER).items():
                t.copy_(state[f"transformer_2.{path}.{k}"])
    loaded = DiffusionPipeline.from_pretrained(model)
    loaded.load_lokr_weights(os.path.join(out, OURS_FILE), load_into_transformer_2=True)
    assert not list(lokr_layers(loaded.transformer)) and list(lokr_layers(loaded.transformer_2))
    cond = flow_model("wan").encode(loaded, CAPTIONS, ARGS, CPU)
    low = [SimpleNamespace(transformer=p.transformer_2) for p in (loaded, trained)]
    torch.testing.assert_close(_velocity(low[0], "wan", cond), _velocity(low[1], "wan", cond), rtol=1e-5, atol=1e-6)
    base = DiffusionPipeline.from_pretrained(model)
    assert not torch.equal(_velocity(low[0], "wan", cond), _velocity(SimpleNamespace(transformer=base.transformer_2),
                                                                   "wan", cond))
    with open(os.path.join(out, "README.md"), encoding="utf-8") as fh:
        assert "load_into_transformer_2=True" in fh.read()
