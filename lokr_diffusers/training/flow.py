"""Flow-matching (rectified flow) training loss for Flux.1 and SD3.x, as diffusers' train_dreambooth_lora_flux.py
and train_dreambooth_lora_sd3.py compute it, with every random draw from the step's generator (exact resume).

Per micro-batch, x the VAE latents ((latent - shift_factor) · scaling_factor), ε ~ N(0, I):
    u ~ the --weighting_scheme density (uniform, logit-normal, mode), index = ⌊u · N⌋ into the
    scheduler's training schedule: timestep t and its (shifted) sigma σ
    x_σ = (1 − σ) · x + σ · ε                                       (the flow's straight path)
    Flux: the transformer sees x_σ packed into 2x2 patches, t / 1000, the guidance scale when the
          model embeds guidance (FLUX.1-dev), the T5 sequence, CLIP's pooled vector; target ε − x
    SD3:  the transformer sees x_σ, t, CLIP-L + CLIP-G (+ T5, or zeros without it) and the pooled
          vectors; with --precondition_outputs the prediction becomes x̂ = x_σ − σ · v and the target x
    loss = mean over the example of w(σ) · (prediction − target)², w from the weighting scheme.
The prompt encoders repeat the pipelines' own `encode_prompt` through the (accelerate-prepared)
modules, so gradients reach trained text encoders (tests/test_training_flow.py holds them equal).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def _ids(tokenizer: Any, captions: list[str], length: int, device: torch.device) -> Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_flux(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(T5 sequence (B, L, D_t5), CLIP pooled (B, D_clip), text ids (L, 3) zeros), as FluxPipeline."""
    pooled = parts.text_encoder(_ids(parts.tokenizer, captions, parts.tokenizer.model_max_length, device),
                                output_hidden_states=False).pooler_output
    embeds = parts.text_encoder_2(_ids(parts.tokenizer_2, captions, max_sequence_length, device),
                                  output_hidden_states=False)[0]
    return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)


def encode_sd3(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device,
               joint_attention_dim: int) -> tuple[Tensor, Tensor]:
    """(sequence (B, 77 + L, D), pooled (B, P_l + P_g)), as StableDiffusion3Pipeline: CLIP-L and CLIP-G
    penultimate hidden states side by side, zero-padded to T5's width, then the T5 sequence (zeros
    (B, L, joint_attention_dim) without T5)."""
    clip, pooled = [], []
    for tok, te in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        out = te(_ids(tok, captions, tok.model_max_length, device), output_hidden_states=True)
        pooled.append(out[0])  # CLIPTextModelWithProjection: the projected pooled vector
        clip.append(out.hidden_states[-2])
    clip_embeds = torch.cat(clip, dim=-1)
    if getattr(parts, "text_encoder_3", None) is None:
        t5 = torch.zeros(len(captions), max_sequence_length, joint_attention_dim, device=device,
                         dtype=clip_embeds.dtype)
    else:
        t5 = parts.text_encoder_3(_ids(parts.tokenizer_3, captions, max_sequence_length, device))[0]
    clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5.to(clip_embeds.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def sample_sigmas(scheduler: Any, batch: int, args: Any, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(timesteps (B,), sigmas (B,)) drawn by the weighting scheme's density over the scheduler's
    training schedule (FlowMatchEulerDiscreteScheduler as loaded: its timesteps and shifted sigmas
    are index-aligned)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(args.weighting_scheme, batch, logit_mean=args.logit_mean,
                                              logit_std=args.logit_std, mode_scale=args.mode_scale, generator=g)
    n = len(scheduler.timesteps)
    index = (u * n).long().clamp(0, n - 1)
    return scheduler.timesteps[index], scheduler.sigmas[index]


def flow_loss(parts: Any, scheduler: Any, batch: dict[str, Any], args: Any, family: str, g: torch.Generator,
              weight_dtype: torch.dtype, device: torch.device, prior_weight: float | None = None) -> Tensor:
    """One micro-batch's flow-matching loss (module docstring). With prior_weight (DreamBooth prior
    preservation) the batch's second half is class images: loss + w · class loss."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    vae = parts.vae
    pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=g)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = ((latents - shift) * vae.config.scaling_factor).to(weight_dtype)
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype).to(device)
    timesteps, sigmas = sample_sigmas(scheduler, latents.shape[0], args, g)
    timesteps, sigmas = timesteps.to(device), sigmas.to(device=device, dtype=latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    transformer = parts.transformer
    config = _config(transformer)
    if family == "flux":
        pred = _flux_prediction(parts, transformer, config, noisy, timesteps, batch["caption"], args, device)
        target = noise - latents
    else:
        embeds, pooled = encode_sd3(parts, batch["caption"], args.max_sequence_length, device,
                                    config.joint_attention_dim)
        pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds.to(weight_dtype),
                           pooled_projections=pooled.to(weight_dtype), return_dict=False)[0]
        if args.precondition_outputs:
            pred, target = noisy - sigmas * pred, latents
        else:
            target = noise - latents
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas).float()
    per_example = (weighting * (pred.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)
    if prior_weight is None:
        return per_example.mean()
    instance, prior = per_example.chunk(2)
    return instance.mean() + prior_weight * prior.mean()


def _config(model: Any) -> Any:
    """The model's config through an accelerate / DDP wrapper."""
    return getattr(model, "module", model).config


def _flux_prediction(parts: Any, transformer: Any, config: Any, noisy: Tensor, timesteps: Tensor,
                     captions: list[str], args: Any, device: torch.device) -> Tensor:
    """The transformer's velocity for the (B, C, h, w) latents, through FluxPipeline's 2x2 packing."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    embeds, pooled, text_ids = encode_flux(parts, captions, args.max_sequence_length, device)
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # (B, h/2 · w/2, 4C)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, noisy.dtype)
    guidance = torch.full((b,), args.guidance_scale, device=device) if config.guidance_embeds else None
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled.to(noisy.dtype), encoder_hidden_states=embeds.to(noisy.dtype),
                       txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    return FluxPipeline._unpack_latents(pred, h * vae_scale, w * vae_scale, vae_scale)
