"""The training scripts on 2 processes (torchrun, gloo on the CPU), sharded with --fsdp (FSDP2) and plain (DDP):
they train what one process trains with the same global batch (training/loop.py: N processes with A accumulation
steps == one process with N · A), write the same checkpoints and files, and resume exactly from a checkpoint
written by either.

The oracle is the one-process run of the same script (in this process, one thread as torchrun gives each
process). DDP equals it to the bit here; FSDP2 to float rounding (its reduce-scatter adds the processes'
gradients in buffers of its own), so the factors are compared to 1e-6.

The SDXL and DDP runs are marked slow (the default suite keeps FLUX.1's); CI runs them (`make test-distributed`).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers.launch import file_diff, losses, optimizer_diff, torchrun
from safetensors.torch import load_file

from lokr_diffusers.training.args import parse
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.run import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
TOL = 1e-6
FILES = ("pytorch_lokr_weights.safetensors", "lokr_comfyui.safetensors", "checkpoint-2/adapter.safetensors",
         "checkpoint-4/adapter.safetensors")


def _flux(tmp_path) -> tuple[str, list[str]]:
    from helpers.tiny_dit import save_tiny_dit_pipeline

    model = save_tiny_dit_pipeline(str(tmp_path / "model"), "flux")
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=32)
    return "train_dreambooth_lokr_flux.py", ["--pretrained_model_name_or_path", model, "--instance_data_dir", data,
                                             "--instance_prompt", "a photo of sks dog", "--resolution", "32",
                                             "--max_sequence_length", "16", "--learning_rate", "1e-2"]


def _sdxl(tmp_path) -> tuple[str, list[str]]:
    from lokr_diffusers.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(str(tmp_path / "model"), sdxl=True)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=64)
    return "train_dreambooth_lokr.py", ["--pretrained_model_name_or_path", model, "--instance_data_dir", data,
                                        "--instance_prompt", "a photo of sks dog", "--resolution", "64",
                                        "--learning_rate", "1e-3"]


COMMON = ["--train_batch_size", "1", "--max_train_steps", "4", "--rank", "4", "--seed", "0",
          "--checkpointing_steps", "2"]


def _one_process(script: str, argv: list[str], out: str) -> None:
    """The oracle: the same script's training in this process, one thread, 2 accumulation steps per step."""
    family = "flux" if "flux" in script else "sd"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(parse("t", True, [*argv, "--gradient_accumulation_steps", "2", "--output_dir", out], family))
    finally:
        torch.set_num_threads(threads)


def _same_run(run: str, oracle: str, files: tuple[str, ...] = FILES, tol: float = TOL) -> float:
    """`run` trained what `oracle` did: the loss of each step, every file and checkpoint, the optimizer's state.
    Returns the largest difference it found."""
    ours, ref = losses(run), losses(oracle)
    assert max(ours) == max(ref) and ours == pytest.approx({k: ref[k] for k in ours}, abs=tol)
    worst = max(abs(ours[k] - ref[k]) for k in ours)
    for name in files:
        diff = file_diff(os.path.join(run, name), os.path.join(oracle, name))
        assert diff <= tol, name
        worst = max(worst, diff)
    for step in (2, 4):
        if os.path.isdir(os.path.join(run, f"checkpoint-{step}")):
            diff = optimizer_diff(*(os.path.join(d, f"checkpoint-{step}", "optimizer.pt") for d in (run, oracle)))
            assert diff <= tol
            worst = max(worst, diff)
    return worst


# FLUX.1 with the memory savers a big model trains with, and validation images (under FSDP every process runs
# the denoiser for them, the main one writes them)
SAVERS = {"flux": ["--gradient_checkpointing", "--cache_latents", "--cache_text_embeddings", "--validation_prompt",
                   "a photo of sks dog", "--validation_steps", "2", "--num_validation_images", "1"], "sdxl": []}


@pytest.mark.parametrize("family", [_flux, pytest.param(_sdxl, marks=pytest.mark.slow)], ids=["flux", "sdxl"])
def test_fsdp_trains_saves_and_resumes_as_one_process(tmp_path, family) -> None:
    script, argv = family(tmp_path)
    savers = SAVERS["flux" if family is _flux else "sdxl"]
    argv = [*argv, *COMMON, *savers]
    oracle = str(tmp_path / "one")
    _one_process(script, argv, oracle)
    trained = load_file(os.path.join(oracle, "pytorch_lokr_weights.safetensors"))
    assert any(k.endswith("lokr_w2") and v.abs().max() > 0 for k, v in trained.items())  # w2 starts at zero
    sharded = str(tmp_path / "fsdp")
    torchrun(script, [*argv, "--fsdp", "--output_dir", sharded])
    _same_run(sharded, oracle)
    if savers:
        images = sorted(os.listdir(os.path.join(sharded, "validation")))  # after each epoch, as one process
        assert images == sorted(os.listdir(os.path.join(oracle, "validation"))) == ["step_000002.png",
                                                                                       "step_000004.png"]
    # resumed sharded from the one-process run's step-2 checkpoint (the checkpoints are the same files)
    again = tmp_path / "again"
    again.mkdir()
    os.symlink(os.path.join(oracle, "checkpoint-2"), again / "checkpoint-2")
    out = torchrun(script, [*argv, "--fsdp", "--output_dir", str(again), "--resume_from_checkpoint", "latest"])
    assert "resumed from" in out and "at step 2" in out
    _same_run(str(again), oracle, files=FILES[:2] + FILES[3:])


@pytest.mark.slow
def test_ddp_trains_as_one_process(tmp_path) -> None:
    """Without --fsdp the same launch is data-parallel (accelerate wraps the denoiser in DDP)."""
    script, argv = _flux(tmp_path)
    argv = [*argv, *COMMON]
    oracle = str(tmp_path / "one")
    _one_process(script, argv, oracle)
    ddp = str(tmp_path / "ddp")
    torchrun(script, [*argv, "--output_dir", ddp])
    assert _same_run(ddp, oracle) <= TOL  # losses, files, checkpoints and optimizer state as one process's


@pytest.mark.parametrize("extra, match", [
    ([], "this run is one process"),
    (["--train_text_encoder"], "leave out --train_text_encoder"),
    (["--base_precision", "fp8"], "give one of them"),
], ids=["one-process", "text-encoder", "quantized"])
def test_fsdp_refuses_what_it_cannot_shard(tmp_path, monkeypatch, capsys, extra: list[str], match: str) -> None:
    if extra:
        monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(tmp_path),
            "--instance_prompt", "x", "--output_dir", str(tmp_path / "out"), "--fsdp", *extra]
    with pytest.raises(SystemExit) as e:
        parse("t", True, argv, "flux")
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
