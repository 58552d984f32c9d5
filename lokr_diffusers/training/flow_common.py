"""What the flow-matching pieces of every family share (flow_models.py for the image families, flow_video.py for the
video ones): the `FlowModel` interface each piece fills, a model's config through a training wrapper, the guidance a
guidance-distilled transformer embeds, the latents' normalisations and FLUX.1's 2x2 packing."""

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


def shift_scale(vae: Any, latents: Tensor) -> Tensor:
    """(x − the VAE's shift_factor (0 without one)) · its scaling_factor."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def pack_2x2(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 · w/2, 4C): 2x2 patches, row-major, each (C, 2, 2) flattened (FLUX.1's packing)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, h: int, w: int) -> Tensor:
    """pack_2x2 undone: (B, h/2 · w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FlowModel:
    """How flow matching trains one family (the module docstring). `family`: its registry name; `pipelines`: the
    pipeline classes whose prompt encoding `encode` repeats (empty: every pipeline of the family)."""

    family: str = ""
    pipelines: tuple[str, ...] = ()
    attention: tuple[str, ...] = ()  # --lora_layers attn for this family (empty: targets.TRANSFORMER_PRESETS')
    guidance = 3.5  # --guidance_scale's default for a guidance-distilled model (diffusers' FLUX.1 script's)

    missing_hint: str = ""  # what to pass for the components a model folder of the family may leave out

    def supplies(self, args: Any) -> set[str]:
        """The components `load_components` gives for these arguments (checked for before anything loads)."""
        return set()

    def load_components(self, args: Any) -> dict[str, Any]:
        """Components to load the pipeline with (DiffusionPipeline.from_pretrained's keyword arguments) in place of
        the model folder's (most families: none)."""
        return {}

    targets: tuple[str, ...] = ()  # --lora_layers default for this family (empty: the model's defaults)
    latent_multiple: int = 1  # the latents' sides must be multiples of this (checks.check_pipeline's --resolution)

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        """x (B, C, h, w): the images in the space the flow is drawn in."""
        return shift_scale(vae, vae.encode(pixels).latent_dist.sample(generator=g))

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        """The transformer's text conditioning for `captions`, through the (prepared) text encoders in `parts`."""
        raise NotImplementedError

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        """The transformer's v ≈ ε − x (B, C, h, w) for x_σ = `noisy` at the scheduler's `timesteps` (σ · 1000)."""
        raise NotImplementedError

    def objective(self, pred: Tensor, noisy: Tensor, sigmas: Tensor, latents: Tensor, noise: Tensor,
                  args: Any) -> tuple[Tensor, Tensor]:
        """(what the loss compares, with what): the velocity and ε − x."""
        return pred, noise - latents
