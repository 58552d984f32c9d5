"""What the flow-matching pieces of every family share (flow_models.py for the image families, flow_video.py for the
video ones): a model's config through a training wrapper, the guidance a guidance-distilled transformer embeds,
and the per-channel normalisation of latents."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def model_config(model: Any) -> Any:
    """The model's config through an accelerate / DDP wrapper (`.module`)."""
    return getattr(model, "module", model).config


def guidance_tensor(piece: Any, parts: Any, args: Any, batch: int, device: torch.device, scale: float = 1.0
                    ) -> Tensor | None:
    """(B,) --guidance_scale (the family piece's `guidance` when not given) · `scale` for a transformer that embeds
    the guidance (config.guidance_embeds); None for one that does not."""
    if not getattr(model_config(parts.transformer), "guidance_embeds", False):
        return None
    value = args.guidance_scale if getattr(args, "guidance_scale", None) is not None else piece.guidance
    return torch.full((batch,), value * scale, device=device)


def normalise(x: Tensor, mean: Any, std: Any, scale: float = 1.0) -> Tensor:
    """(x − mean) · scale / std per channel of latents x (B, C, ...): `mean` / `std` the C per-channel statistics (a
    VAE config's lists or its buffers)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = torch.as_tensor(mean).view(shape).to(x)
    std = torch.as_tensor(std).view(shape).to(x)
    return (x - mean) * scale / std
