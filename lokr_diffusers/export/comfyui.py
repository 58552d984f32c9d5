"""The kohya / LyCORIS layout that ComfyUI and A1111 load (`format="comfyui"`, aliases kohya, a1111), for the SD
families and the DiT families (docs/formats.md §Portable export, §Export of DiT adapters, §Consumer limits).

SD1.x / SD2.x / SDXL: `lora_unet_` + the UNet path (ldm names for SDXL), `lora_te_` / `lora_te1_` / `lora_te2_` +
the text encoder's path with `text_model.`; OpenCLIP attention groups completed with ΔW = 0 modules (A1111).

Flux.1, SD3, Flux.2 / Klein, Z-Image, each transformer module by the first rule that applies:
- the row pieces of one original fused module, all of them here: written ONCE as `diffusion_model.<original>`
  with the factors they share, the fused plan and its scale (the module as it was loaded);
- a module that is a whole original module by itself (a rename): `diffusion_model.<original>`;
  `<original>` in ComfyUI's own spelling where the family's table has one (HunyuanVideo: `img_mod.lin`, not
  Tencent's `img_mod.linear`; DitNameMap.comfyui_name);
- a module that is exactly the rows ComfyUI names by a key of their own (Flux.1's fused single-block to_qkv, rows
  [0, 3 · hidden) of linear1): `diffusion_model.single_blocks.N.linear1_qkv`;
- a module ComfyUI's key map names by its diffusers path (its family's `comfyui_paths`): `transformer.<path>`,
  which ComfyUI applies to that module's rows of its fused weight (an offset) or through its (shift, scale) swap;
- anything else has no name ComfyUI loads: refused, naming it (strict), or left out with a warning.
Text encoders: `text_encoders.<clip_l | clip_g | t5xxl | qwen3_4b | qwen3_8b>.transformer.<path>`.

Scales: the consumer's alpha / rank (encode.consumer_tensors); output-axis DoRA for ComfyUI's rule, marked in
the metadata (formats/metadata.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import families
from .. import functional as LF
from ..formats.dit import DitNameMap, Target, dit_name_map
from ..formats.ldm import diffusers_to_ldm
from ..formats.metadata import DORA_RULE_COMFYUI, DORA_RULE_KEY
from ..formats.names import TEXT_ENCODERS
from ..formats.text_encoders import CLIP, COMFY_CLIP, T5, kind_of
from ..logs import warn_once
from .encode import consumer_tensors, on_output_axis, write_one
from .modules import ExportJob, ExportModule, collect
from .pieces import fused_module, off_edges, own_module, sort_modules

logger = logging.getLogger(__name__)

# A1111 applies OpenCLIP attention (SD2 te, SDXL te2) only when q, k, v and out of a layer are all there.
_ATTN = re.compile(r"^(.*\.self_attn\.)(q_proj|k_proj|v_proj|out_proj)$")
# Keys ComfyUI maps and A1111 cannot: A1111 runs SDXL's second text encoder as open_clip's, whose text_projection
# is a bare nn.Parameter, not a layer, so its key map (extensions-builtin/Lora/networks.py, from named_modules)
# has no entry and the module is dropped, logged at debug level only (docs/formats.md §Consumer limits).
A1111_UNMATCHED: tuple[str, ...] = ("lora_te2_text_projection",)
ORIGINAL_PREFIX, PATH_PREFIX = "diffusion_model.", "transformer."
# ComfyUI's name of a Qwen3 text encoder by its width (comfy/text_encoders/flux.py, z_image.py): Qwen3-4B (Z-Image,
# Klein 4B), Qwen3-8B (Klein 9B). Another width gets the name without the wrapper, which ComfyUI maps as well.
COMFY_QWEN3: dict[int, str] = {2560: "qwen3_4b", 4096: "qwen3_8b"}


def kohya_metadata(modules: list[ExportModule], version: str, name: str, out_axis: bool) -> dict[str, str]:
    """kohya's `ss_*` fields (A1111 filters by the base-model ones) and, with output-axis DoRA, our DoRA rule."""
    ranks = [m.plan.rank for m in modules if m.plan.rank]
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"}),
                "ss_base_model_version": version, "ss_network_dim": str(max(ranks, default=1)),
                "ss_network_alpha": str(max((m.alpha for m in modules), default=1.0)), "ss_output_name": name}
    if out_axis:
        metadata[DORA_RULE_KEY] = DORA_RULE_COMFYUI
    return metadata


def check_comfyui_dora(modules: list[ExportModule]) -> list[ExportModule]:
    """The output-axis DoRA modules; raises if one has no base-weight norms to rescale its dora_scale."""
    out_axis = [m for m in modules if on_output_axis(m)]
    blind = [m for m in out_axis if m.row_norms is None]
    if blind:
        raise ValueError(
            f"{len(blind)} modules have DoRA on the output axis (e.g. {blind[0].component}.{blind[0].path}): a "
            "ComfyUI file needs the base model's weights to rescale their dora_scale for ComfyUI's rule (it divides "
            "by the norm of the original weight, not of the adapted one), and none are available here (e.g. "
            "convert_lokr_file works without model weights). Load the file into a pipeline of its base model "
            "(pipe.load_lokr_weights(...)), then pipe.save_lokr_weights(path, format='comfyui'); or write "
            "format='lokr_diffusers' or 'diffusers', which keep DoRA as trained.")
    if out_axis:
        logger.warning(
            "%d modules have DoRA on the output axis (e.g. %s): their dora_scale is rescaled for ComfyUI's rule, "
            "so ComfyUI reproduces the trained weight; A1111 only applies input-axis DoRA, so these modules will "
            "differ in A1111 (and readers that use LyCORIS' rule, LyCORIS itself included, will read them "
            "differently too)", len(out_axis), f"{out_axis[0].component}.{out_axis[0].path}")
    return out_axis


# ----------------------------------------------------------------------------------------- SD families
def comfyui_module_name(component: str, path: str, unet_config: Any, base: str) -> str:
    """The most portable kohya name (docs/formats.md §Portable export): SDXL UNet by ldm names, SD1/SD2 UNet by
    diffusers paths (the family's `kohya.ldm_unet`); text encoders always with `text_model.`, `lora_te1_` /
    `lora_te2_` for a family of two."""
    family = families.get(base)
    if component == "unet":
        ldm = diffusers_to_ldm(path, unet_config) if family.kohya.ldm_unet else None
        return "lora_unet_" + (ldm or path).replace(".", "_")
    # transformers 5's CLIPTextModel lost the `text_model.` level; kohya names keep it (the
    # projection of CLIPTextModelWithProjection sits outside it, as in transformers 4)
    te = path if path.startswith(("text_model.", "text_projection")) else "text_model." + path
    two = len(family.text_encoders) > 1
    prefix = {"text_encoder": "lora_te1_" if two else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + te.replace(".", "_")


def _zero_module(weight_shape: tuple[int, ...]) -> dict[str, Tensor]:
    out_l, out_k = LF.factorization(weight_shape[0])
    in_m, in_n = LF.factorization(weight_shape[1])
    return {"lokr_w1": torch.zeros(out_l, in_m), "lokr_w2": torch.zeros(out_k, in_n, *weight_shape[2:])}


def to_comfyui(modules: list[ExportModule], base: str, unet_config: Any, keep_tucker: bool = False,
               name: str = "lokr") -> tuple[dict[str, Tensor], dict[str, str]]:
    """kohya / LyCORIS layout that ComfyUI loads as trained (A1111 too, except output-axis DoRA).
    `keep_tucker=True` keeps Tucker cores (`lokr_t2`): ComfyUI 0.3.64 fails on them (kron on a
    non-contiguous einsum result), so the default rewrites them as plain low-rank factors (exact)."""
    out_axis = check_comfyui_dora(modules)
    sd: dict[str, Tensor] = {}
    present = {(m.component, m.path): m for m in modules}
    for m in modules:
        key = comfyui_module_name(m.component, m.path, unet_config, base)
        sd.update({f"{key}.{k}": v for k, v in consumer_tensors(m, keep_tucker, comfyui=True).items()})
        if key in A1111_UNMATCHED:
            warn_once(logger, f"{key} ({m.component}.{m.path}) is written: ComfyUI applies it, A1111 cannot (its "
                              "SDXL second text encoder is open_clip's, where text_projection is a bare parameter, not "
                              "a layer), so in A1111 this module has no effect; leave text_projection out of the "
                              "target modules for a file that means the same in both")
    kohya = families.get(base).kohya
    openclip = set(kohya.openclip)
    for m in modules:  # complete OpenCLIP attention groups with ΔW = 0 modules
        match = _ATTN.match(m.path) if m.component in openclip else None
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj") if match else ():
            path = match.group(1) + proj  # type: ignore[union-attr]
            if (m.component, path) not in present:
                key = comfyui_module_name(m.component, path, unet_config, base)
                sd.update({f"{key}.{k}": v for k, v in _zero_module(m.weight_shape).items()})
                present[(m.component, path)] = m
    metadata = {**kohya_metadata(modules, kohya.model_version, name, bool(out_axis)), "ss_v2": str(kohya.v2)}
    return sd, metadata


def save_sd(job: ExportJob) -> str:
    """The writer of the registry for the SD families."""
    unet_config = getattr(job.components.get("unet"), "config", None)
    sd, meta = to_comfyui(job.modules, job.base, unet_config, job.keep_tucker, name=job.stem)
    return write_one(job, sd, meta)


# ---------------------------------------------------------------------------------------- DiT families
def comfyui_path_name(path: str, nm: DitNameMap, family: str) -> str | None:
    """ComfyUI's name for the transformer module `path` held whole: its original's (in ComfyUI's spelling,
    `DitNameMap.comfyui_name`: HunyuanVideo's internal Flux-style names), where that original is the
    module itself, else ComfyUI's name for exactly its rows of an original (Flux.1's fused to_qkv:
    `single_blocks.N.linear1_qkv`), else the diffusers path where ComfyUI's key map has it, else None."""
    origin = nm.covering.get(path)
    if origin is not None and nm.originals[origin].is_rename:
        return ORIGINAL_PREFIX + nm.comfyui_name(origin)
    row_name = nm.row_name_of(path)
    if row_name is not None:
        return ORIGINAL_PREFIX + row_name
    if any(re.fullmatch(p, path) for p in families.get(family).comfyui_paths):
        return PATH_PREFIX + path
    return None


def comfyui_te_name(component: str, path: str, model: nn.Module, kinds: Mapping[str, str]) -> str | None:
    """ComfyUI's generic name of a text-encoder module (None where ComfyUI's encoder has no such module)."""
    kind = kinds[component]
    if kind == CLIP:
        clips = [c for c in sorted(kinds) if kinds[c] == CLIP]
        if clips.index(component) >= len(COMFY_CLIP):
            return None
        te = path if path.startswith(("text_model.", "text_projection")) else "text_model." + path
        return f"text_encoders.{COMFY_CLIP[clips.index(component)]}.transformer.{te}"
    if kind == T5:
        return f"text_encoders.t5xxl.transformer.{path}"
    if hasattr(model, "lm_head") and not path.startswith("model."):
        return None  # Qwen3ForCausalLM's LM head: ComfyUI's encoder has none
    inner = path.removeprefix("model.")
    wrapper = COMFY_QWEN3.get(int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0))
    return f"text_encoders.{wrapper + '.' if wrapper else ''}transformer.model.{inner}"


def _original_rows(t: Tensor, target: Target) -> Tensor:
    """A one-Linear original's rows (a swapped adaLN projection) from the Linear's: ComfyUI applies dora_scale
    after its (shift, scale) swap, so an output-axis magnitude goes in the original's row order."""
    return torch.cat([t[p.src_start:p.src_start + p.rows] for p in target.pieces])


def _swapped(path: str, nm: DitNameMap) -> Target | None:
    """The original that is the Linear `path` in another row order (a swapped adaLN projection), or None."""
    origin = nm.covering.get(path)
    target = nm.originals[origin] if origin is not None else None
    if target is None or not target.is_swap or target.pieces[0].path != path:
        return None
    return target


def _comfyui_units(modules: list[ExportModule], components: Mapping[str, nn.Module], nm: DitNameMap,
                   family: str) -> tuple[list[tuple[str, ExportModule, Target | None]], list[str]]:
    """[(name, module as written, the swapped original whose row order its dora_scale takes)], [why each module
    left out is]."""
    transformer = components["transformer"]
    kinds = {c: kind_of(m) for c, m in components.items() if c in TEXT_ENCODERS}
    units: list[tuple[str, ExportModule, Target | None]] = []
    missing: list[str] = []
    dit = sort_modules([m for m in modules if m.component == "transformer"], nm)
    for target, pieces in dit.groups:
        units.append((ORIGINAL_PREFIX + nm.comfyui_name(target.name),
                      fused_module(target, pieces, target.name, transformer), None))
    for m in dit.singles + dit.partial:
        own = own_module(m)
        name = comfyui_path_name(m.path, nm, family) if own is not None else None
        if own is None:
            missing.append(off_edges(m, "comfyui", "ComfyUI has no name for part of a fused module's rows"))
        elif name is None:
            missing.append(f"transformer.{m.path}: ComfyUI's {family} key map has no name for this module")
        else:
            units.append((name, own, _swapped(m.path, nm) if name.startswith(PATH_PREFIX) else None))
    for m in modules:
        if m.component != "transformer":
            te_name = comfyui_te_name(m.component, m.path, components[m.component], kinds)
            if te_name is None:
                missing.append(f"{m.component}.{m.path}: ComfyUI's text encoder has no such module")
            else:
                units.append((te_name, m, None))
    return units, missing


def comfyui_unwritable(components: Mapping[str, nn.Module], adapter_name: str, family: str) -> list[str]:
    """Why each module of a DiT adapter would be left out of its ComfyUI file (empty: every module has a name):
    asked before training, so that a run that would end unable to write its file fails before its first step."""
    modules = collect(components, adapter_name)
    return _comfyui_units(modules, components, dit_name_map(components["transformer"]), family)[1]


def to_comfyui_dit(modules: list[ExportModule], components: Mapping[str, nn.Module], family: str,
                   keep_tucker: bool, strict: bool, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The ComfyUI file of a DiT adapter (see the module docstring)."""
    nm = dit_name_map(components["transformer"])
    units, missing = _comfyui_units(modules, components, nm, family)
    if missing and strict:
        raise ValueError(f"{len(missing)} modules cannot be written for ComfyUI: {'; '.join(missing[:5])}. Pass "
                         "strict=False to write the file without them, or save with format='lokr_diffusers'")
    if missing:
        logger.warning("the ComfyUI file leaves out %d modules: %s", len(missing), "; ".join(missing))
    if not units:
        raise ValueError("no module of this adapter has a name ComfyUI loads; nothing to write")
    out_axis = check_comfyui_dora([m for _, m, _ in units])
    sd: dict[str, Tensor] = {}
    for key, m, swapped in units:
        if any(k.startswith(key + ".") for k in sd):
            raise ValueError(f"two modules of this adapter would both be written as {key}")
        tensors = consumer_tensors(m, keep_tucker, comfyui=True)
        if swapped is not None and m.dora_scale is not None and LF.dora_on_output_axis(m.dora_scale, m.weight_shape):
            tensors["dora_scale"] = _original_rows(tensors["dora_scale"], swapped)
        sd.update({f"{key}.{k}": v for k, v in tensors.items()})
    return sd, kohya_metadata([m for _, m, _ in units], families.get(family).kohya.model_version, name, bool(out_axis))


def save_dit(job: ExportJob) -> str:
    """The writer of the registry for the DiT families."""
    sd, meta = to_comfyui_dit(job.modules, job.components, job.base, job.keep_tucker, job.strict, job.stem)
    return write_one(job, sd, meta)
