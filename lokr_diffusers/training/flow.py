"""The flow-matching (rectified flow) training loss shared by every flow family (FLUX.1, SD3.x, FLUX.2 [klein],
Z-Image, Qwen-Image, Qwen-Image 2.1, Chroma, Lumina 2, HiDream-I1; the video families Wan, LTX-Video, LTX-2,
HunyuanVideo and HunyuanVideo 1.5, whose latents have a frame axis), as diffusers' train_dreambooth_lora_flux.py /
_sd3.py / _flux2_klein.py / _z_image.py / _qwen_image.py / _lumina2.py / _hidream.py compute it, with every random
draw from the step's generator (exact resume). What differs between the families (latents, prompts, the
transformer's call) is each family's piece in flow_models.py (flow_video.py for video).

Per micro-batch, x the family's latents of the images, ε ~ N(0, I):
    u ~ the --weighting_scheme density (uniform, logit-normal, mode), index = ⌊u · N⌋ into the
    scheduler's training schedule: timestep t and its (shifted) sigma σ
    x_σ = (1 − σ) · x + σ · ε                                       (the flow's straight path)
    v = the transformer's velocity for x_σ at t (the family's piece: packing, timestep convention, text)
    loss = mean over the example of w(σ) · (v − (ε − x))², w from the weighting scheme
           (SD3 with --precondition_outputs: (x_σ − σ · v − x)², as diffusers' SD3 script).
The prompt encoders repeat the pipelines' own `encode_prompt` through the (accelerate-prepared)
modules, so gradients reach trained text encoders (tests/test_training_flow*.py holds them equal).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .flow_models import encode_flux, encode_klein, encode_sd3, encode_zimage, flow_model

__all__ = ["WEIGHTING_SCHEMES", "encode_flux", "encode_klein", "encode_sd3", "encode_zimage", "flow_loss",
           "sample_sigmas"]
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
PROMPTS_KEPT = 16  # encoded caption sets flow_loss keeps (DreamBooth has one, two with prior preservation)


def sample_sigmas(scheduler: Any, batch: int, args: Any, g: torch.Generator,
                  timestep_range: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
    """(timesteps (B,), sigmas (B,)) drawn by the weighting scheme's density over the scheduler's
    training schedule (FlowMatchEulerDiscreteScheduler as loaded: its timesteps and shifted sigmas
    are index-aligned); with `timestep_range` (low, high), over the part of it with low <= t < high (the timesteps
    one expert of several denoises: Wan 2.2 A14B's)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(args.weighting_scheme, batch, logit_mean=args.logit_mean,
                                              logit_std=args.logit_std, mode_scale=args.mode_scale, generator=g)
    allowed = torch.arange(len(scheduler.timesteps))
    if timestep_range is not None:
        low, high = timestep_range
        allowed = allowed[(scheduler.timesteps >= low) & (scheduler.timesteps < high)]
        if not len(allowed):
            raise ValueError(f"no training timestep in [{low}, {high})")
    n = len(allowed)
    index = allowed[(u * n).long().clamp(0, n - 1)]
    return scheduler.timesteps[index], scheduler.sigmas[index]


def flow_loss(parts: Any, scheduler: Any, batch: dict[str, Any], args: Any, family: str, g: torch.Generator,
              weight_dtype: torch.dtype, device: torch.device, prior_weight: float | None = None,
              prompts: dict[tuple[str, ...], Any] | None = None) -> Tensor:
    """One micro-batch's flow-matching loss (module docstring). With prior_weight (DreamBooth prior
    preservation) the batch's second half is class images: loss + w · class loss. `prompts`: a cache of the
    encoded captions, by the batch's captions, for a run whose text encoders do not train (the same values as
    encoding them again: the encoders are deterministic; DreamBooth's one instance prompt is encoded once)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    model = flow_model(family)
    vae = parts.vae
    pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
    latents = model.latents(vae, pixels, g).to(weight_dtype)
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype).to(device)
    span = getattr(model, "timestep_range", None)  # the video families' (flow_video.py)
    timesteps, sigmas = sample_sigmas(scheduler, latents.shape[0], args, g, span(parts, args) if span else None)
    shape = (-1,) + (1,) * (latents.ndim - 1)  # (B, C, h, w) images, (B, C, F, h, w) clips
    timesteps, sigmas = timesteps.to(device), sigmas.to(device=device, dtype=latents.dtype).view(shape)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    captions = list(batch["caption"])
    if prompts is None:
        cond = model.encode(parts, captions, args, device)
    elif (cond := prompts.get(tuple(captions))) is None:
        with torch.no_grad():
            cond = model.encode(parts, captions, args, device)
        if len(prompts) < PROMPTS_KEPT:
            prompts[tuple(captions)] = cond
    pred = model.velocity(parts, noisy, timesteps, cond, args, device)
    pred, target = model.objective(pred, noisy, sigmas, latents, noise, args)
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas).float()
    per_example = (weighting * (pred.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)
    if prior_weight is None:
        return per_example.mean()
    instance, prior = per_example.chunk(2)
    return instance.mean() + prior_weight * prior.mean()
