"""The training scripts' memory savers (training/caches.py): --cache_latents, --cache_text_embeddings,
--offload_text_encoders and --gradient_checkpointing each give the loss sequence of the run without them (same seed,
within float tolerance), on tiny SD1.x, FLUX.1 and Wan pipelines; and each does what it says: the VAE / text encoders
run only before the first step when cached, the offload hooks move the encoders for each forward, the checkpointed
forward runs. The combinations they refuse are refused with a message naming them."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from helpers.flow_runs import check_exact_resume, make_clip_folder
from PIL import Image

from lokr_diffusers import families
from lokr_diffusers.training import caches
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.errors import TrainingInputError
from lokr_diffusers.training.run import train

TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel")


class Calls(Counter):
    """Counts of a run's VAE encodes ("vae"), text encoders' forwards ("text"), offload hooks' moves to the device
    ("offload_in") and checkpointed forwards (diffusers' "checkpoint", transformers' "text_checkpoint"), and of
    those made during steps (the same names with a "step:" prefix: counted once the first loss starts); `clear`
    before the next run."""

    def __init__(self) -> None:
        super().__init__()
        self.stepping = False

    def clear(self) -> None:
        super().clear()
        self.stepping = False


@pytest.fixture
def calls(monkeypatch) -> Iterator[Calls]:
    counts = state = Calls()

    def count(name: str) -> None:
        counts[name] += 1
        if state.stepping:
            counts["step:" + name] += 1

    for cls in (AutoencoderKL, AutoencoderKLWan):
        original = cls.encode

        def encode(self, *a, _original=original, **k):
            count("vae")
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, "encode", encode)

    def text_hook(module, args, output):
        if type(module).__name__ in TEXT_ENCODERS:
            count("text")

    handle = torch.nn.modules.module.register_module_forward_hook(text_hook)
    original_in = caches._Offloaded._in

    def offload_in(self, module, args):
        count("offload_in")
        return original_in(self, module, args)

    monkeypatch.setattr(caches._Offloaded, "_in", offload_in)
    original_checkpoint = torch.utils.checkpoint.checkpoint

    def checkpoint(*a, **k):
        count("checkpoint")
        return original_checkpoint(*a, **k)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)  # diffusers' models look it up per call
    import transformers.modeling_utils

    te_checkpoint = transformers.modeling_utils.checkpoint  # transformers' models bind it when enabled

    def text_checkpoint(*a, **k):
        count("text_checkpoint")
        return te_checkpoint(*a, **k)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", text_checkpoint)
    from lokr_diffusers.training import run

    for name in ("diffusion_loss", "flow_loss"):
        loss = getattr(run, name)

        def stepping(*a, _loss=loss, **k):
            state.stepping = True
            return _loss(*a, **k)

        monkeypatch.setattr(run, name, stepping)
    try:
        yield counts
    finally:
        handle.remove()


def _captioned(folder: str, n: int, size: int) -> str:
    """make_synthetic_dataset with a caption of its own per image."""
    make_synthetic_dataset(folder, n=n, size=size)
    lines = [json.dumps({"file_name": f"{k:04d}.png", "text": f"a photo of sks shape {'abcdefgh'[k]}"})
             for k in range(n)]
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return folder


def _run(argv: list[str], out: str, dreambooth: bool, family: str, *extra: str) -> list[float]:
    result = train(parse("t", dreambooth, [*argv, "--output_dir", out, *extra], family))
    with open(os.path.join(out, "loss.jsonl"), encoding="utf-8") as fh:  # the trainer's loss log: the same steps
        assert [json.loads(line)["loss"] for line in fh] == result.losses
    return result.losses


def _same(base: list[float], other: list[float]) -> None:
    assert len(other) == len(base)
    torch.testing.assert_close(torch.tensor(other), torch.tensor(base), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------- SD1.x

def _sd_argv(model: str, data: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2", "--rank", "4",
            "--seed", "0", "--checkpointing_steps", "0", "--export_format", "none"]


def test_sd_caches_and_offload_keep_the_losses(tiny_sd_dir: str, tmp_path, calls: Calls) -> None:
    """SD1.x text to image (4 images with captions of their own, batches of 2, 2 steps): cached latents with
    offloaded text encoders, and cached prompt batches, give the uncached run's losses; cached, the VAE and the text
    encoder run only before the first step; offloaded, the encoder is moved in for each forward."""
    argv = _sd_argv(tiny_sd_dir, _captioned(str(tmp_path / "data"), n=4, size=32))
    base = _run(argv, str(tmp_path / "base"), False, "sd")
    assert calls["step:vae"] == 2 and calls["step:text"] == 2  # one encode of each per step
    calls.clear()
    validation = ["--validation_prompt", "a photo of sks shape", "--validation_steps", "1",
                  "--num_validation_images", "1"]  # the VAE and the encoder back on the device for it
    _same(base, _run(argv, str(tmp_path / "latents"), False, "sd", "--cache_latents", "--offload_text_encoders",
                     *validation))
    assert calls["vae"] == 4 and calls["step:vae"] == 0  # each image once, before the first step
    assert calls["step:offload_in"] == calls["step:text"] > 2  # each step's forward, and validation's
    assert os.listdir(str(tmp_path / "latents" / "validation"))
    calls.clear()
    _same(base, _run(argv, str(tmp_path / "text"), False, "sd", "--cache_text_embeddings"))
    assert calls["text"] == 2 and calls["step:text"] == 0  # each caption batch of the run (one epoch), once


@pytest.mark.slow
def test_sd_gradient_checkpointing_keeps_the_losses_with_a_trained_text_encoder(tiny_sd_dir: str, tmp_path,
                                                                              calls: Calls) -> None:
    """--gradient_checkpointing on the UNet and the trained text encoder (non-reentrant: the encoder's adapters
    still get their gradients, so the losses match)."""
    argv = [*_sd_argv(tiny_sd_dir, _captioned(str(tmp_path / "data"), n=2, size=32)), "--train_text_encoder"]
    base = _run(argv, str(tmp_path / "base"), False, "sd")
    assert calls["checkpoint"] == calls["text_checkpoint"] == 0
    _same(base, _run(argv, str(tmp_path / "ckpt"), False, "sd", "--gradient_checkpointing"))
    assert calls["step:checkpoint"] > 0 and calls["step:text_checkpoint"] > 0  # the UNet's and the encoder's


# -------------------------------------------------------------------------------------------------- FLUX.1

def test_flux_memory_savers_keep_the_losses(tmp_path, calls: Calls) -> None:
    """FLUX.1 DreamBooth with prior preservation (the VAE sampled: the cached posterior is sampled with the step's
    generator): cached latents with offloaded encoders and checkpointing, and cached prompts, give the plain run's
    losses."""
    model = str(tmp_path / "model")
    families.build_tiny("flux").save_pretrained(model, safe_serialization=True)
    argv = ["--pretrained_model_name_or_path", model,
            "--instance_data_dir", make_synthetic_dataset(str(tmp_path / "inst"), n=2, size=32, seed=1),
            "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
            "--class_data_dir", make_synthetic_dataset(str(tmp_path / "cls"), n=3, size=32, seed=2),
            "--class_prompt", "a photo of dog", "--resolution", "32", "--train_batch_size", "1",
            "--max_train_steps", "2", "--learning_rate", "1e-2", "--rank", "4", "--seed", "0",
            "--checkpointing_steps", "0", "--max_sequence_length", "16", "--export_format", "none"]
    base = _run(argv, str(tmp_path / "base"), True, "flow")
    assert calls["checkpoint"] == 0
    calls.clear()
    _same(base, _run(argv, str(tmp_path / "latents"), True, "flow", "--cache_latents", "--offload_text_encoders",
                     "--gradient_checkpointing"))
    assert calls["vae"] == 6 and calls["step:vae"] == 0  # 3 items: an instance and a class image each
    # CLIP and T5 once each, moved in for it: the flow loss keeps a batch's encoding while no encoder trains
    assert calls["step:offload_in"] == calls["step:text"] == 2
    assert calls["step:checkpoint"] > 0
    calls.clear()
    _same(base, _run(argv, str(tmp_path / "text"), True, "flow", "--cache_text_embeddings"))
    assert calls["text"] == 2 and calls["step:text"] == 0  # one batch of captions (instance, class), 2 encoders


# ----------------------------------------------------------------------------------------------------- Wan

def _wan_argv(model: str, data: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks dog", "--resolution", "16", "--num_frames", "5", "--train_batch_size", "2",
            "--max_train_steps", "4", "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--center_crop",
            "--checkpointing_steps", "2", "--max_sequence_length", "16", "--export_format", "none"]


def test_wan_memory_savers_keep_the_losses(tmp_path, calls: Calls) -> None:
    """Wan on clips (the VAE's mode from the cached posterior), 4 epochs of one step: the savers together, and
    checkpointing, give the plain run's losses, and a cached run resumed from its step-2 checkpoint ends with the
    very same adapter (the caches are rebuilt the same)."""
    model = str(tmp_path / "model")
    families.build_tiny("wan").save_pretrained(model, safe_serialization=True)
    argv = _wan_argv(model, make_clip_folder(str(tmp_path / "data"), clips=2, frames=5, size=16))
    base = _run(argv, str(tmp_path / "base"), True, "flow")
    calls.clear()
    savers = ["--cache_latents", "--cache_text_embeddings", "--offload_text_encoders", "--gradient_checkpointing"]
    _same(base, _run(argv, str(tmp_path / "cached"), True, "flow", *savers))
    assert calls["vae"] == 2 and calls["step:vae"] == 0 and calls["step:text"] == 0
    assert calls["step:checkpoint"] > 0
    again = str(tmp_path / "again")
    check_exact_resume(str(tmp_path / "cached"), again, [*argv, *savers, "--output_dir", again,
                                                         "--resume_from_checkpoint", "latest"])


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("options, named", [
    (["--cache_text_embeddings", "--train_text_encoder"], "--cache_text_embeddings with --train_text_encoder"),
    (["--cache_latents", "--random_flip"], "--cache_latents with --random_flip")])
def test_the_combinations_refused_at_parsing(tmp_path, capsys, options: list[str], named: str) -> None:
    data = make_synthetic_dataset(str(tmp_path / "data"), n=1, size=8)
    with pytest.raises(SystemExit) as e:
        parse("t", False, ["--pretrained_model_name_or_path", "x", "--train_data_dir", data, *options])
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_cache_latents_refuses_an_image_cropped_at_random(tiny_sd_dir: str, tmp_path) -> None:
    """An image that is not square at --resolution is cropped at a random place each epoch: one cached latent
    cannot stand for it; refused naming it and --center_crop, before the output folder is made."""
    data = _captioned(str(tmp_path / "data"), n=2, size=32)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(os.path.join(data, "0001.png"))
    out = str(tmp_path / "out")
    with pytest.raises(TrainingInputError, match=r"0001\.png: it is not square.*--center_crop"):
        train(parse("t", False, [*_sd_argv(tiny_sd_dir, data), "--output_dir", out, "--cache_latents"]))
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------ every family's latents

# in the default suite: the families whose latents take another path than a plain encode (Klein's BatchNorm
# statistics, Qwen-Image 2.1's RGBA, LTX-Video's buffers, HunyuanVideo 1.5's one clip at a time); the rest with -m slow
# (FLUX.1 and Wan also train above)
DEFAULT_FAMILIES = ("flux2", "qwenimage21", "ltxvideo", "hunyuanvideo15")
FLOW_FAMILIES = [f if f in DEFAULT_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                 for f in ("flux", "sd3", "flux2", "zimage", "chroma", "qwenimage", "qwenimage21", "lumina2", "hidream",
                           "wan", "ltxvideo", "ltx2", "hunyuanvideo", "hunyuanvideo15")]


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_every_flow_familys_latents_from_the_cache_are_the_vaes(family: str) -> None:
    """The family's own latents (its VAE sampled or its mode taken with the step's generator, then normalised /
    packed) from the stand-in VAE holding each item's cached posterior equal those from the real VAE on the batch:
    every family's path, HunyuanVideo 1.5's clip-at-a-time encoding included."""
    from lokr_diffusers.training.flow_models import flow_model

    model, vae = flow_model(family), families.build_tiny(family).vae.eval()
    frames = getattr(model, "frames_factor", 0)
    shape = (2, 3, 1 + frames, 32, 32) if frames else (2, 3, 32, 32)
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = model.latents(vae, pixels, torch.Generator().manual_seed(5))
        posteriors = []
        for row in pixels:  # the cache pass: one item at a time, through the family's own latents
            recorder = caches._Recorder(vae)
            model.latents(recorder, row.unsqueeze(0), torch.Generator())
            posteriors.append(recorder.posterior)
        stand_in = caches.CachedVAE(vae, type(posteriors[0]), torch.device("cpu"))
        stand_in.set_batch(torch.cat([p.parameters for p in posteriors]))
        got = model.latents(stand_in, torch.zeros(2, 3, 1, 1), torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
