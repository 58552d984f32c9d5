"""What differs between the model families the training scripts train: which component denoises, which
must be there, which text encoders --train_text_encoder trains, and the loss (loop.diffusion_loss for
the UNet's noise / v prediction, flow.flow_loss for Flux.1 and SD3.x's flow matching)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str  # the component that carries the main adapter
    required: tuple[str, ...]  # components the pipeline must have
    text_encoders: tuple[str, ...]  # trained with --train_text_encoder (those the pipeline has)
    label: str  # for messages: what --pretrained_model_name_or_path must be


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", "unet", ("unet", "vae", "text_encoder", "tokenizer"), ("text_encoder", "text_encoder_2"),
                 "a Stable Diffusion 1.x/2.x or XL pipeline"),
    # diffusers' Flux script trains CLIP only, never T5 (text_encoder_2); its SD3 script both CLIPs
    "flux": Family("flux", "transformer", ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                           "tokenizer_2"), ("text_encoder",), "a FLUX.1 pipeline (FluxPipeline)"),
    "sd3": Family("sd3", "transformer", ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                         "tokenizer_2"), ("text_encoder", "text_encoder_2"),
                  "a Stable Diffusion 3.x pipeline (StableDiffusion3Pipeline)"),
}
# every component a training run may move to its device and dtype
MOVED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
