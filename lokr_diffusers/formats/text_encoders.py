"""The names a LoKr file gives text-encoder modules, per tool, built forward from the module's own path.

A text encoder is one of three kinds, told by its class: CLIP (`CLIPTextModel[WithProjection]`, CLIP-L /
CLIP-G / OpenCLIP), T5 (`T5EncoderModel`, Flux.1's text_encoder_2, SD3's text_encoder_3) or a decoder LLM
(`Qwen3Model` / `Qwen3ForCausalLM` for Z-Image and Flux.2 Klein, Mistral for Flux.2 dev). With `u(x)` =
x with dots turned into underscores and `p` the module's path in the transformers model:

- CLIP: kohya lora_te_ and lora_te1_ with one CLIP encoder, else lora_te1_ (first) / lora_te2_ (second), +
  u(text_model.p); comfyui text_encoders.{clip_l | clip_g}.transformer.{text_model.p};
- T5: kohya lora_te{i}_ + u(p), i = 1 + the number of CLIP encoders (i = 2 also as lora_te3_); comfyui
  text_encoders.t5xxl.transformer.{p} and text_encoders.transformer.{p};
- LLM: kohya lora_te_ + u(p'), p' = p without a leading `model.`; comfyui
  text_encoders.{qwen3_4b | qwen3_8b}.transformer.model.{p'} and text_encoders.transformer.model.{p'};

plus the diffusers / PEFT form `<component>.<p>` for every kind. Sources (read, not copied):
- kohya sd-scripts `networks/lora_flux.py` (LORA_PREFIX_TEXT_ENCODER_CLIP = lora_te1, _T5 = lora_te3, "make
  ComfyUI compatible"), `networks/lora_sd3.py` (CLIP-L lora_te1, CLIP-G lora_te2, T5 lora_te3); an early
  lora_flux wrote T5 as lora_te2;
- ComfyUI `comfy/lora.py` model_lora_keys_clip: lora_te_ / lora_te1_ for clip_l; lora_te2_ for clip_g beside
  clip_l; T5 at 1 + (clip_g) + (clip_l), and OneTrainer's Flux lora_te2_ beside lora_te3_; a single
  llama-architecture encoder as lora_te_ + its path under `<name>.transformer.model.`; the generic
  `text_encoders.<state-dict name>` and the same without the `<name>.` wrapper (not for clip_*).
- SimpleTuner's LyCORIS (`lycoris_`) and ai-toolkit train the transformer only: no text-encoder names.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

CLIP, T5, LLM = "clip", "t5", "llm"
COMFY_CLIP: tuple[str, ...] = ("clip_l", "clip_g")  # the first and second CLIP encoder of a pipeline
COMFY_LLM: tuple[str, ...] = ("qwen3_4b", "qwen3_8b")  # ComfyUI's names of the Qwen3 encoders (Z-Image, Klein)


def kind_of(model: nn.Module) -> str:
    """"clip", "t5" or "llm" (any other transformers text model) from the class name."""
    name = type(model).__name__
    if name.startswith("CLIP"):
        return CLIP
    if name.startswith(("T5", "UMT5", "MT5")):
        return T5
    return LLM


def _u(path: str) -> str:
    return path.replace(".", "_")


def _clip_paths(path: str) -> tuple[str, ...]:
    """A CLIP path with and without the `text_model.` level (with it first): transformers 5 dropped it
    from CLIPTextModel, files made before or after differ (the projection of CLIPTextModelWithProjection
    sits outside it; both forms are kept for it too, as files write either)."""
    if path.startswith("text_model."):
        return path, path[len("text_model."):]
    return "text_model." + path, path


def kohya_prefixes(component: str, kind: str, kinds: Mapping[str, str]) -> tuple[str, ...]:
    """The `lora_te*_` prefixes tools write for this encoder, given every encoder's kind ({component: kind})."""
    clips = [c for c in sorted(kinds) if kinds[c] == CLIP]
    if kind == CLIP:
        if len(clips) == 1:
            return ("lora_te_", "lora_te1_")
        return (f"lora_te{clips.index(component) + 1}_",)
    if kind == T5:
        i = 1 + len(clips)
        return (f"lora_te{i}_", "lora_te3_") if i == 2 else (f"lora_te{i}_",)
    return ("lora_te_",)


def te_forms(component: str, path: str, kind: str, kinds: Mapping[str, str]) -> list[tuple[str, str]]:
    """(layout, module name) pairs under which a file may name the encoder module `path`."""
    forms: list[tuple[str, str]] = []
    prefixes = kohya_prefixes(component, kind, kinds)
    if kind == CLIP:
        clips = [c for c in sorted(kinds) if kinds[c] == CLIP]
        comfy = COMFY_CLIP[clips.index(component)] if clips.index(component) < len(COMFY_CLIP) else None
        for p in _clip_paths(path):
            forms += [("kohya", pre + _u(p)) for pre in prefixes]
            forms.append(("diffusers", f"{component}.{p}"))
            if comfy is not None:
                forms.append(("comfyui", f"text_encoders.{comfy}.transformer.{p}"))
        return forms
    forms.append(("diffusers", f"{component}.{path}"))
    if kind == T5:
        forms += [("kohya", pre + _u(path)) for pre in prefixes]
        forms += [("comfyui", f"text_encoders.t5xxl.transformer.{path}"),
                  ("comfyui", f"text_encoders.transformer.{path}")]
        return forms
    inner = path[len("model."):] if path.startswith("model.") else path  # Qwen3ForCausalLM vs Qwen3Model
    forms += [("kohya", pre + _u(inner)) for pre in prefixes]
    forms += [("comfyui", f"text_encoders.{name}.transformer.model.{inner}") for name in COMFY_LLM]
    forms.append(("comfyui", f"text_encoders.transformer.model.{inner}"))
    return forms
