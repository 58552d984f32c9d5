"""The Flux.1 / SD3 training scripts end to end on tiny offline pipelines: train, resume exactly, load."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.flow_loss import eval_flow_loss, image_batch
from helpers.tiny_dit import save_tiny_dit_pipeline
from safetensors.torch import load_file

from lokr_diffusers.training.args import parse
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.run import train


def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "6",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out,
            "--checkpointing_steps", "3", "--max_sequence_length", "16", *extra]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_script_trains_resumes_exactly_and_its_files_load(tmp_path, family: str) -> None:
    model = save_tiny_dit_pipeline(str(tmp_path / "model"), family)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=32)
    out = str(tmp_path / "out")
    result = train(parse("t", True, _argv(model, data, out, "--train_text_encoder", "--te_rank", "2"), family))
    assert result.global_step == 6
    assert {"checkpoint-3", "checkpoint-6", "pytorch_lokr_weights.safetensors", "README.md"} <= set(os.listdir(out))
    # resume from the step-3 checkpoint in a fresh output folder: the same final factors, bit for bit
    again = str(tmp_path / "again")
    os.makedirs(again)
    os.symlink(os.path.join(out, "checkpoint-3"), os.path.join(again, "checkpoint-3"))
    resumed = train(parse("t", True, _argv(model, data, again, "--train_text_encoder", "--te_rank", "2",
                                           "--resume_from_checkpoint", "latest"), family))
    assert resumed.global_step == 6
    a, b = (load_file(os.path.join(d, "pytorch_lokr_weights.safetensors")) for d in (out, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trained file lowers the loss on the training set, loaded into a fresh pipeline
    batch = image_batch(data)
    base = DiffusionPipeline.from_pretrained(model)
    before = eval_flow_loss(base, family, batch, weighting_scheme="none" if family == "flux" else "logit_normal")
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lokr_weights(os.path.join(out, "pytorch_lokr_weights.safetensors"))
    assert set(pipe.get_list_lokr_adapters()) == ({"transformer", "text_encoder"} if family == "flux" else
                                                   {"transformer", "text_encoder", "text_encoder_2"})
    after = eval_flow_loss(pipe, family, batch, weighting_scheme="none" if family == "flux" else "logit_normal")
    assert after < before
