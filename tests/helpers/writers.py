"""Test-side writers: a pipeline's LoKr adapter written out in each key layout of docs/formats.md §Key layouts.

Written here from the layout tables, independently of the package's reader, so that loading what
these write checks the reader's name maps and scale rules. Scales are encoded for the consumer rule
(alpha = scale · rank; both factors full: scale baked into W1, no alpha).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lokr_diffusers import lokr_layers
from lokr_diffusers.formats.ldm import diffusers_to_ldm

LAYOUTS = ("kohya", "kohya_ldm", "diffusers", "comfyui", "lycoris")


def _te_path(path: str) -> str:
    return path if path.startswith("text_model.") else "text_model." + path


def module_name(layout: str, component: str, path: str, unet_config, sdxl: bool) -> str | None:
    """The module's name in `layout`, or None where that layout has no name for it."""
    kohya_te = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    if component == "unet":
        if layout == "kohya":
            return "lora_unet_" + path.replace(".", "_")
        if layout == "lycoris":
            return "lycoris_" + path.replace(".", "_")
        if layout == "diffusers":
            return "unet." + path
        ldm = diffusers_to_ldm(path, unet_config)
        if ldm is None:
            return None
        return ("lora_unet_" + ldm.replace(".", "_")) if layout == "kohya_ldm" else "diffusion_model." + ldm
    if layout in ("kohya", "kohya_ldm"):
        return kohya_te[component] + _te_path(path).replace(".", "_")
    if layout == "diffusers":
        return f"{component}.{path}"
    if layout == "comfyui":
        clip = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}[component]
        return f"text_encoders.{clip}.transformer.{_te_path(path)}"
    return None  # SimpleTuner's lycoris_ prefix names UNet modules only


def write_adapter(pipe, adapter: str, layout: str, components=("unet", "text_encoder", "text_encoder_2")
                  ) -> dict[str, Tensor]:
    """{key: tensor} of `adapter` as `layout` would store it (consumer-rule scale encoding)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    out: dict[str, Tensor] = {}
    for component in components:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for path, layer in lokr_layers(model):
            name = module_name(layout, component, path.replace(".base_layer", ""), pipe.unet.config, sdxl)
            if name is None or adapter not in layer.plans:
                continue
            tensors = {k: v.detach().clone() for k, v in layer.adapter_tensors(adapter).items()}
            plan, scale = layer.plans[adapter], layer.scaling[adapter]
            if plan.both_full:  # consumers ignore alpha here: bake the scale into W1
                tensors["lokr_w1"] = tensors["lokr_w1"] * scale
            else:
                tensors["alpha"] = torch.tensor(scale * (plan.rank2 or plan.rank1))
            out.update({f"{name}.{k}": v for k, v in tensors.items()})
    return out
