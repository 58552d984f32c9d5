"""What the training scripts adapt: the UNet presets of --unet_target_modules, the CLIP text encoders'
targets, the transformer presets of --lora_layers, and the targets an argument list names. Below args.py
(which offers them as choices) and checks.py (which checks them)."""

from __future__ import annotations

from typing import Any

UNET_PRESETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-ff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "full": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
             "conv1", "conv2", "conv_shortcut", "time_emb_proj"],
}
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# Flux.1 / SD3 transformer targets (diffusers' --lora_layers names). "default": what the trainers target
# for the model (targeting.dit_target_modules: attention incl. the context projections, feed-forward,
# Flux's single blocks), as LoKrConfig(target_modules=None) gives; "attn": the attention projections only.
TRANSFORMER_PRESETS: dict[str, list[str] | None] = {
    "default": None,
    "attn": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"],
}


def unet_targets(value: str) -> list[str]:
    return UNET_PRESETS[value] if value in UNET_PRESETS else [t.strip() for t in value.split(",") if t.strip()]


def denoiser_targets(args: Any) -> list[str] | None:
    """The denoiser's target modules: --unet_target_modules (SD) or --lora_layers (a flow family; None: the
    model's defaults; `attn` and `default` for the family the model is of, args.model_family, once the model is
    known, where its piece names its own)."""
    if getattr(args, "family", "sd") == "sd":
        return unet_targets(args.unet_target_modules)
    value = args.lora_layers
    if value in ("attn", "default") and getattr(args, "model_family", None):  # a family's own presets
        from .flow_models import FLOW_MODELS

        piece = FLOW_MODELS.get(args.model_family)
        own = (piece.attention if value == "attn" else piece.targets) if piece is not None else ()
        if own:  # attention of other names; LTX-2: its video stream only (trained without audio)
            return list(own)
    return TRANSFORMER_PRESETS[value] if value in TRANSFORMER_PRESETS else \
        [t.strip() for t in value.split(",") if t.strip()]
