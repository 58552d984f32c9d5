"""Full-size LoKr files without full-size weights: factors planned from meta-device shapes."""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.writers import module_name
from lokr_diffusers import functional as LF
from lokr_diffusers.architectures import meta_components
from lokr_diffusers.formats.names import iter_adaptable


def full_size_file(base: str, layout: str = "kohya", r: int = 4, alpha: float = 2.0, every: int = 1,
                   seed: int = 0) -> dict[str, Tensor]:
    """Random LoKr factors (Tucker on 3x3 convs) for every `every`-th Linear/Conv of a base model."""
    g = torch.Generator().manual_seed(seed)
    comps = meta_components(base)
    sd: dict[str, Tensor] = {}
    for component, model in comps.items():
        for i, (path, module) in enumerate(iter_adaptable(model)):
            if i % every:
                continue
            name = module_name(layout, component, path, comps["unet"].config, base == "sdxl")
            if name is None:
                continue
            plan = LF.plan_lokr(tuple(module.weight.shape), r, use_tucker=True)
            for k, shape in plan.shapes().items():
                sd[f"{name}.{k}"] = torch.randn(shape, generator=g) * 0.1
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd
