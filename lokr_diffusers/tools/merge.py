"""`merge_lokr`: adapters baked into a model for good, written as a diffusers folder (docs/tools.md §Merge adapters into
a model).

The pipeline is loaded from its folder, each file loaded as an adapter at its strength (LoKr files by this package,
LoRA files by diffusers, both through `load_lora_weights`), the LoKr ones fused without keeping the original weights
(`commits.fuse(keep_original=False)`: no second copy of each adapted weight) and the LoRA ones by diffusers'
`fuse_lora`, the adapter layers removed, and the pipeline saved with `save_pretrained` (diffusers' own format, which
`from_pretrained` loads). A quantized component is refused before anything is loaded unless `requantize`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .. import commits
from ..atomic import write_safetensors
from ..components import pipeline_components
from ..io import read_lokr_file
from ..model import lokr_layers

logger = logging.getLogger(__name__)


def quantized_components(folder: str) -> dict[str, str]:
    """{component: its quantizer} for the components whose config names a quantization (read before loading)."""
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        config = os.path.join(folder, name, "config.json")
        if not os.path.isfile(config):
            continue
        with open(config, encoding="utf-8") as fh:
            quant = json.load(fh).get("quantization_config")
        if quant:
            out[name] = str(quant.get("quant_method", "quantized")) if isinstance(quant, dict) else "quantized"
    return out


def merge_lokr(model: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
               scales: Sequence[float] | None = None, requantize: bool = False,
               single_file: str | os.PathLike[str] | None = None, **load_kwargs: Any) -> list[str]:
    """Bake `files` (LoKr or LoRA, any layout this package or diffusers reads) at `scales` (default 1.0 each) into
    the pipeline folder `model` and write it to the folder `out`. Returns the adapter names used.

    `requantize`: a quantized component (its config names a quantization) is fused by dequantize, add, requantize;
    without it such a model is refused. `single_file`: also write the merged model as one .safetensors file in the
    original layout (SD1.x / SD2.x / SDXL: `ldm_checkpoint`, the UNet, VAE and text encoders; the DiT families: the
    transformer under its authors' keys, bare, formats/dit_state.py). `load_kwargs` go to
    `DiffusionPipeline.from_pretrained` (e.g. torch_dtype).
    """
    import torch  # noqa: F401  (diffusers wants it imported first on some setups)
    from diffusers import DiffusionPipeline

    from ..convert import check_output_path
    from ..formats.dit_state import original_state_dict

    model, out = os.fspath(model), os.fspath(out)
    if not os.path.exists(model):
        raise FileNotFoundError(f"model (--model): no such file or folder: {model}")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"model (--model): {model} is not a diffusers pipeline folder (no model_index.json)")
    if os.path.abspath(out) == os.path.abspath(model):
        raise ValueError("out (--out) must differ from model (--model): the model's files are read while the merge "
                         "is written")
    if not files:
        raise ValueError("give at least one adapter file to merge")
    scales = [1.0] * len(files) if scales is None else list(scales)
    if len(scales) != len(files):
        raise ValueError(f"{len(files)} files and {len(scales)} scales: give one scale per file")
    check_output_path(out, folder=True)
    if single_file is not None:
        single_file = os.fspath(single_file)
        check_output_path(single_file)
        if not single_file.endswith(".safetensors"):
            raise ValueError(f"single_file (--single_file) {single_file}: give a .safetensors path")
    quantized = quantized_components(model)
    if quantized and not requantize:
        raise ValueError(f"{model}: {', '.join(f'{c} ({q})' for c, q in quantized.items())} quantized: merging "
                         "dequantizes, adds and quantizes again, with rounding error; pass requantize=True "
                         "(--requantize) to do it, or merge into the unquantized model")
    for f in files:  # a missing or bad file fails here, before the model is loaded
        read_lokr_file(f)
    pipe: Any = DiffusionPipeline.from_pretrained(model, **load_kwargs)
    held = single_file_components(pipe) if single_file is not None else ()  # raises for a family with no layout
    names = [f"merge_{i}" for i in range(len(files))]
    lokr: list[tuple[str, float]] = []
    lora: list[tuple[str, float]] = []
    for name, file, scale in zip(names, files, scales, strict=True):
        pipe.load_lora_weights(os.fspath(file), adapter_name=name)
        (lokr if _holds_lokr(pipe, name) else lora).append((name, scale))
    dropped = [c for c in pipeline_components(pipe) if held and c not in held and _adapts(pipe, c)]
    if dropped:
        raise ValueError(f"single_file (--single_file): the adapters change {', '.join(dropped)}, which the single "
                         f"file does not hold (it holds {', '.join(held)}); use the diffusers folder")
    if lokr:
        pipe.set_lokr_adapters([n for n, _ in lokr], [s for _, s in lokr])
        layers = [(f"{c}.{p}", layer) for c, m in pipeline_components(pipe).items() for p, layer in lokr_layers(m)]
        commits.fuse(layers, [n for n, _ in lokr], 1.0, keep_original=False, requantize=requantize,
                     desc="merging LoKr")
    if lora:
        pipe.set_adapters([n for n, _ in lora], [s for _, s in lora])
        pipe.fuse_lora(adapter_names=[n for n, _ in lora])
    pipe.unload_lora_weights()  # LoRA and LoKr layers out; the fused weights stay
    if single_file is not None:  # checked before the folder is written: a refusal leaves nothing behind
        sd = original_state_dict(pipe.transformer) if held == ("transformer",) else ldm_checkpoint(pipe)
    pipe.save_pretrained(out)
    if single_file is not None:
        write_safetensors(sd, single_file, {"format": "pt"})
    return names


def single_file_components(pipe: Any) -> tuple[str, ...]:
    """The components the single file holds: an SD pipeline's UNet, VAE and text encoders, a DiT's transformer. Raises
    for a model with no original single-file layout here. Call it before adapters are loaded (on the bare model's
    state keys)."""
    from .. import families
    from ..formats.dit_state import original_plan

    family = families.of_components(pipeline_components(pipe))
    if family is None:
        raise ValueError("single_file (--single_file): not a model of a known family; use the diffusers folder")
    if family.denoiser == "unet":
        return ("unet", "vae", "text_encoder", "text_encoder_2")
    original_plan(pipe.transformer)  # raises where the family has no single-file layout
    return ("transformer",)


def ldm_checkpoint(pipe: Any) -> dict[str, Tensor]:
    """An SD pipeline in the original single-file layout: the UNet (`model.diffusion_model.<ldm name>`,
    formats/ldm.py's map), the VAE (`first_stage_model.`), the CLIP-L text encoder (`cond_stage_model.transformer.`
    for SD1.x, `conditioner.embedders.0.transformer.` for SDXL) and the OpenCLIP one in open_clip's layout (SD2.x's
    `cond_stage_model.model.`, SDXL's second at `conditioner.embedders.1.model.`; formats/sd_single.py). Raises for
    another family."""
    from .. import families
    from ..formats.ldm import clip_state_key, ldm_state_keys
    from ..formats.sd_single import SD2_OPEN_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, open_clip_state, vae_state

    family = families.of_components(pipeline_components(pipe))
    if family is None or family.denoiser != "unet":
        raise ValueError(f"single_file (--single_file): the original single-file layout is written for the SD "
                         f"families (SD1.x, SD2.x, SDXL); this is {family.title if family else 'another model'}: "
                         "use the diffusers folder")
    state = pipe.unet.state_dict()
    names = ldm_state_keys(pipe.unet)
    missing = [k for k in state if k not in names]
    if missing:
        raise ValueError(f"single_file (--single_file): unet.{missing[0]} has no name in the original layout")
    out = {names[k]: v.detach().contiguous() for k, v in state.items()}
    if getattr(pipe, "vae", None) is not None:
        out.update(vae_state(pipe.vae))
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None and family.name == "sd2":
        out.update(open_clip_state(encoder, SD2_OPEN_CLIP_PREFIX))
    elif encoder is not None:
        prefix = "conditioner.embedders.0.transformer." if family.name == "sdxl" else "cond_stage_model.transformer."
        out.update({clip_state_key(k, prefix): v.detach().contiguous() for k, v in encoder.state_dict().items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(open_clip_state(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    return out


def _adapts(pipe: Any, component: str) -> bool:
    """Does any loaded LoKr or LoRA adapter change this component?"""
    model = getattr(pipe, component, None)
    if model is None:
        return False
    lora = getattr(pipe, "get_list_adapters", None)
    return any(True for _ in lokr_layers(model)) or bool(lora and lora().get(component))


def _holds_lokr(pipe: Any, name: str) -> bool:
    return any(name in layer.plans for m in pipeline_components(pipe).values() for _, layer in lokr_layers(m))
