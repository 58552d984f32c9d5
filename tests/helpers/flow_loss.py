"""The flow-matching loss of the training scripts evaluated on a fixed batch (three fixed generators), for the
tests that train tiny Flux.1 / SD3 pipelines and check that the loss falls."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lokr_diffusers.training.data import CaptionedImageDataset, collate, load_image_folder
from lokr_diffusers.training.flow import flow_loss

CPU = torch.device("cpu")


def flow_args(family: str, **kw: object) -> SimpleNamespace:
    base = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                max_sequence_length=16, guidance_scale=3.5, precondition_outputs=1)
    return SimpleNamespace(**{**base, **kw})


def image_batch(folder: str, size: int = 32) -> dict:
    ds = CaptionedImageDataset(load_image_folder(folder), size, center_crop=True)
    return collate([ds[i] for i in range(len(ds))])


def eval_flow_loss(pipe, family: str, batch: dict, **kw: object) -> float:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return sum(flow_loss(pipe, scheduler, batch, flow_args(family, **kw), family,
                             torch.Generator().manual_seed(seed), torch.float32, CPU).item() for seed in range(3)) / 3


def with_checkpoint_factors(pipe: Any, args: Any, checkpoint: str) -> Any:
    """`pipe` (the base) with the adapter a training run had at `checkpoint` (its adapter.safetensors) put into
    freshly added LoKr layers on the transformer: what training left in its layers, to compare a saved file with."""
    from safetensors.torch import load_file

    from lokr_diffusers import add_lokr, lokr_layers
    from lokr_diffusers.training.loop import lokr_configs
    from lokr_diffusers.training.run import ADAPTER

    add_lokr(pipe, lokr_configs(args, ["transformer"]), ADAPTER)
    state = load_file(os.path.join(checkpoint, "adapter.safetensors"))
    layers = [(f"transformer.{path}.{k}", t) for path, layer in lokr_layers(pipe.transformer)
              for k, t in layer.factors(ADAPTER).items()]
    assert {k for k, _ in layers} == set(state)
    with torch.no_grad():
        for k, t in layers:
            t.copy_(state[k])
    return pipe


def check_trained_file(model: str, out: str, args: Any, family: str, captions: Any, piece_args: Any, batch: dict,
                       velocity: Any, fixed_loss: Any) -> None:
    """A flow run's file (`out`), loaded into a fresh pipeline of `model`, gives the outputs of the base with the
    run's step-4 checkpoint in its layers (`velocity(pipe, family, cond)`), not the base's, and lowers the flow loss
    on `batch` (`fixed_loss(pipe, family, batch, prompts)`, fixed noise and timesteps). The text encoders are the
    base's, so one conditioning `cond` serves all three."""
    from diffusers import DiffusionPipeline

    from lokr_diffusers.training.flow_models import flow_model
    from lokr_diffusers.training.output import OURS_FILE

    trained = DiffusionPipeline.from_pretrained(model)
    prompts: dict = {}
    base_loss = fixed_loss(trained, family, batch, prompts)
    cond = flow_model(family).encode(trained, list(captions), piece_args, CPU)
    base_velocity = velocity(trained, family, cond)
    with_checkpoint_factors(trained, args, os.path.join(out, "checkpoint-4"))
    loaded = DiffusionPipeline.from_pretrained(model)
    loaded.load_lokr_weights(os.path.join(out, OURS_FILE))
    assert set(loaded.get_list_lokr_adapters()) == {"transformer"}
    got = velocity(loaded, family, cond)
    torch.testing.assert_close(got, velocity(trained, family, cond), rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, base_velocity)
    assert fixed_loss(loaded, family, batch, prompts) < base_loss
