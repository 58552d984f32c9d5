"""The training scripts' loop end to end on tiny SD1.x / SDXL pipelines (CPU, a few steps); the demo's
tests are in test_demo.py.

"Loss goes down" is measured deterministically: the denoising loss on the fixed training set with
fixed noise and timesteps, for the base pipeline and for a fresh pipeline that loads the trained file.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from lokr_diffusers.training.args import parse
from lokr_diffusers.training.data import CaptionedImageDataset, collate, load_image_folder, make_synthetic_dataset
from lokr_diffusers.training.loop import diffusion_loss
from lokr_diffusers.training.run import train


def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "10", "--learning_rate", "3e-3", "--rank", "4",
            "--use_effective_conv2d", "--unet_target_modules", "full", "--train_text_encoder", "--te_rank", "2",
            "--seed", "0", "--output_dir", out, "--checkpointing_steps", "5", *extra]


def _eval_loss(pipe, data: str, sdxl: bool) -> float:
    from types import SimpleNamespace

    ds = CaptionedImageDataset(load_image_folder(data), 64, center_crop=True)
    batch = collate([ds[i] for i in range(len(ds))])
    args = SimpleNamespace(noise_offset=0.0, snr_gamma=None, resolution=64)
    total = 0.0
    with torch.no_grad():
        for seed in range(3):
            total += diffusion_loss(pipe, _ddpm(pipe), batch, args, sdxl, torch.Generator().manual_seed(seed),
                                    torch.float32, torch.device("cpu")).item()
    return total / 3


def _ddpm(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_text_to_image_trains_and_the_files_load(tiny_sd_dir: str, tiny_sdxl_dir: str, tmp_path, sdxl: bool) -> None:
    model = tiny_sdxl_dir if sdxl else tiny_sd_dir
    data = make_synthetic_dataset(str(tmp_path / "data"), n=6, size=64)
    out = str(tmp_path / "out")
    result = train(parse("t", dreambooth=False, argv=_argv(model, data, out, "--validation_prompt",
                                                            "a photo of sks shape", "--validation_steps", "2",
                                                            "--num_validation_images", "1")))
    assert result.global_step == 10 and len(result.losses) == 10
    assert {"README.md", "checkpoint-10", "checkpoint-5", "loss.jsonl", "lokr_comfyui.safetensors",
            "pytorch_lokr_weights.safetensors", "validation"} <= set(os.listdir(out))
    assert os.listdir(os.path.join(out, "validation"))
    with open(os.path.join(out, "loss.jsonl"), encoding="utf-8") as fh:
        assert [json.loads(line)["step"] for line in fh] == list(range(1, 11))
    base = DiffusionPipeline.from_pretrained(model)
    before = _eval_loss(base, data, sdxl)
    for name in ("pytorch_lokr_weights.safetensors", "lokr_comfyui.safetensors"):
        pipe = DiffusionPipeline.from_pretrained(model)
        pipe.load_lokr_weights(os.path.join(out, name))
        after = _eval_loss(pipe, data, sdxl)
        assert after < before, (name, before, after)  # trained on this set: its loss went down
        assert set(pipe.get_list_lokr_adapters()) == ({"unet", "text_encoder", "text_encoder_2"} if sdxl
                                                        else {"unet", "text_encoder"})
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "lokr" in card.lower() and "load_lokr_weights" in card


def test_dreambooth_with_prior_preservation(tiny_sd_dir: str, tmp_path) -> None:
    inst = make_synthetic_dataset(str(tmp_path / "inst"), n=3, size=64, seed=1)
    cls = make_synthetic_dataset(str(tmp_path / "cls"), n=4, size=64, seed=2)
    out = str(tmp_path / "db")
    argv = ["--pretrained_model_name_or_path", tiny_sd_dir, "--instance_data_dir", inst, "--instance_prompt",
            "a photo of sks shape", "--with_prior_preservation", "--class_data_dir", cls, "--class_prompt",
            "a photo of shape", "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "4",
            "--rank", "4", "--output_dir", out, "--checkpointing_steps", "0", "--export_format", "peft"]
    result = train(parse("db", dreambooth=True, argv=argv))
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors = load_file(os.path.join(out, "pytorch_lokr_weights.safetensors"))
    assert any(k.endswith("lokr_w1") and v.abs().sum() > 0 for k, v in tensors.items())  # W1 left zero init
    assert os.path.isfile(os.path.join(out, "lokr_peft", "adapter_config.json"))


@pytest.mark.parametrize("sdxl, precision", [(False, "fp8"), pytest.param(True, "int8", marks=pytest.mark.slow),
                                             pytest.param(False, "nf4", marks=pytest.mark.slow)],
                         ids=["sd1-fp8", "sdxl-int8", "sd1-nf4"])
def test_the_unet_trains_beside_a_quantized_base(tiny_sd_dir: str, tiny_sdxl_dir: str, tmp_path, sdxl: bool,
                                                  precision: str, caplog) -> None:
    """--base_precision in the UNet scripts: the UNet's Linears quantized (its convs keep their dtype), LoKr trains
    beside them, and the file lowers the loss of the unquantized pipeline on the training set."""
    import logging

    model = tiny_sdxl_dir if sdxl else tiny_sd_dir
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=64)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="lokr_diffusers.training.base_precision"):
        result = train(parse("t", dreambooth=False, argv=_argv(model, data, out, "--max_train_steps", "6",
                                                                "--base_precision", precision)))
    assert result.global_step == 6 and f"--base_precision {precision}: the unet's weights" in caplog.text
    before = _eval_loss(DiffusionPipeline.from_pretrained(model), data, sdxl)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lokr_weights(os.path.join(out, "pytorch_lokr_weights.safetensors"))
    assert _eval_loss(pipe, data, sdxl) < before
