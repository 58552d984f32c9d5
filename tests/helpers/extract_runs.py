"""Folders for extraction tests: a tiny pipeline saved as BASE, and as TUNED with a known LoKr fused into it (or
a given change made to its weights)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline

from lokr_diffusers import LoKrConfig, families
from lokr_diffusers.pipeline import add_lokr


def base_and_tuned(root: str, family: str, config: LoKrConfig | None = None,
                   change: Callable[[DiffusionPipeline], None] | None = None) -> tuple[str, str]:
    """(base folder, tuned folder) under `root`: the family's tiny pipeline, and the same with `config`'s LoKr
    (random factors, seed 0) fused into its denoiser, or with `change` applied to it."""
    pipe = families.build_tiny(family)
    base, tuned = os.path.join(root, "base"), os.path.join(root, "tuned")
    pipe.save_pretrained(base)
    torch.manual_seed(0)
    if config is not None:
        add_lokr(pipe, {families.get(family).denoiser: config}, "known")
        pipe.fuse_lokr()
        pipe.unload_lokr_weights()
    if change is not None:
        with torch.no_grad():
            change(pipe)
    pipe.save_pretrained(tuned)
    return base, tuned


def component_weights(folder: str, component: str) -> dict[str, torch.Tensor]:
    """A saved pipeline's component state dict."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in getattr(pipe, component).state_dict().items()}


def ldm_checkpoint(folder: str, path: str) -> str:
    """An SD pipeline folder as one single-file checkpoint in the original layout (UNet, VAE, text encoders),
    as `merge --single_file` writes it (lokr_diffusers.tools.merge.ldm_checkpoint), written to `path`; tests check the
    file against diffusers' own converters."""
    from safetensors.torch import save_file

    from lokr_diffusers.tools.merge import ldm_checkpoint as original_layout

    save_file(original_layout(DiffusionPipeline.from_pretrained(folder)), path)
    return path


def original_linears(folder: str, path: str, prefix: str = "") -> str:
    """A DiT pipeline folder's transformer under its original names (a fused original such as Flux.1's `qkv` made of
    the diffusers Linears' rows), as a single-file checkpoint holds it, written to `path` by formats/dit_state.py
    (which tests/test_dit_single_file.py checks against diffusers' own converters)."""
    from safetensors.torch import save_file

    from lokr_diffusers.formats.dit_state import original_state_dict

    state = original_state_dict(DiffusionPipeline.from_pretrained(folder).transformer)
    save_file({prefix + k: v for k, v in state.items()}, path)
    return path
