"""Adapter files for the merge and combine tests: a tiny pipeline's folder and LoKr files with other random
factors, and the reference of several files loaded and fused by this package's own fuse."""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline

from lokr_diffusers import LoKrConfig, families
from lokr_diffusers.pipeline import add_lokr


def lokr_files(root: str, family: str, n: int = 2) -> tuple[str, list[str]]:
    """(base folder, n LoKr files with other random factors and targets) for the family's tiny pipeline."""
    pipe = families.build_tiny(family)
    base = os.path.join(root, "base")
    pipe.save_pretrained(base)
    f = families.get(family)
    files = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LoKrConfig(r=2 + i, alpha=1 + i, init_weights=False)
        p = DiffusionPipeline.from_pretrained(base)
        comps = {f.denoiser: cfg}
        if i == 1 and f.originals is None:
            comps["text_encoder"] = cfg
        add_lokr(p, comps, "a")
        path = os.path.join(root, f"a{i}.safetensors")
        p.save_lokr_weights(path, adapter_name="a", format="comfyui")
        files.append(path)
    return base, files


def weights_of(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    out = {}
    for c in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, c, None)
        if isinstance(m, torch.nn.Module):
            out.update({f"{c}.{k.replace('.base_layer', '')}": v for k, v in m.state_dict().items()
                        if ".lokr_" not in k and ".lora_" not in k})
    return out


def fused_weights(base: str, files: list[str], scales: list[float]) -> dict[str, torch.Tensor]:
    """The reference: every file loaded by load_lokr_weights, set to its strength, fused by fuse_lokr."""
    pipe = DiffusionPipeline.from_pretrained(base)
    names = [pipe.load_lokr_weights(f, adapter_name=f"r{i}") for i, f in enumerate(files)]
    pipe.set_lokr_adapters(names, scales)
    pipe.fuse_lokr()
    return weights_of(pipe)
