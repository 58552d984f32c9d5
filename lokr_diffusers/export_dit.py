"""Export of adapters on the DiT pipelines (Flux.1, SD3 / SD3.5, Flux.2 / Klein, Z-Image) for ComfyUI, diffusers
and PEFT (docs/formats.md §Export of DiT adapters). export.save_lokr_weights sends these pipelines here.

ComfyUI (`format="comfyui"`), each transformer module by the first rule that applies:

- the row pieces of one original fused module (an adapter loaded from a file naming `qkv`, Flux.1's `linear1` or
  a swapped adaLN projection), all of them here: written ONCE as `diffusion_model.<original>` with the factors
  they share, the fused plan and its scale: the module as it was loaded;
- a module that is a whole original module by itself (a rename): `diffusion_model.<original>`;
- a module that is exactly the rows ComfyUI names by a key of their own (Flux.1's fused single-block to_qkv, rows
  [0, 3 · hidden) of linear1): `diffusion_model.single_blocks.N.linear1_qkv`;
- a module ComfyUI's key map names by its diffusers path (`COMFYUI_PATHS`: to_q / to_k / to_v, add_*_proj,
  attn2, proj_mlp, the swapped adaLN projections, SD3's patch embedding): `transformer.<path>`. ComfyUI applies
  it to that module's rows of its fused weight (an offset) or through its (shift, scale) swap, as diffusers
  computes it;
- anything else has no name ComfyUI loads: refused, naming it (strict), or left out with a warning.

Text encoders: `text_encoders.<clip_l | clip_g | t5xxl | qwen3_4b | qwen3_8b>.transformer.<path>` (ComfyUI's
generic names, comfy/lora.py model_lora_keys_clip). Scales: ComfyUI's alpha / rank (export.consumer_tensors).

diffusers (`format="diffusers"`): one file, `<component>.<path>.lokr_*` (PEFT's tensor names), the scale baked
into W1 and no alpha tensors (diffusers' loaders refuse keys that name neither lora nor lokr), and diffusers'
`lora_adapter_metadata` holding the transformer's LoKrConfig, so that PEFT plans these very shapes. A fused
original's pieces go back to the fused Linear diffusers' own Flux.2 LoKr loader targets (`<attention>.to_qkv`,
which it makes with `fuse_qkv_projections()`), or per Linear where they lie on W1's block edges. PEFT
(`format="peft"`): PEFT's folder, per Linear. What PEFT cannot hold (a fused original's rows off W1's block
edges, DoRA, a factorisation PEFT does not plan) is refused with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as LF
from .atomic import write_safetensors
from .export import (
    ExportModule,
    RowNorms,
    cast,
    check_comfyui_dora,
    consumer_tensors,
    to_peft,
    write_peft,
)
from .formats.dit import DitNameMap, Target, diffusers_fused_name, dit_name_map, family_of
from .formats.dit_tables import FAMILIES
from .formats.fused import layer_rows
from .formats.metadata import DORA_RULE_COMFYUI, DORA_RULE_KEY
from .formats.names import TEXT_ENCODERS
from .formats.text_encoders import CLIP, COMFY_CLIP, T5, kind_of

logger = logging.getLogger(__name__)

# The diffusers paths ComfyUI's model_lora_keys_unet (comfy/lora.py) names under `transformer.`, per family, as
# regexes: Flux.1 and Flux.2 (a Flux subclass in comfy/model_base.py) from comfy/utils.py flux_to_diffusers, SD3
# from mmdit_to_diffusers, Z-Image (model_base.Lumina2) from z_image_to_diffusers. Read there, not copied.
_BLOCK = r"transformer_blocks\.\d+\."
_ATTN = r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
_FLUX: tuple[str, ...] = (
    rf"{_BLOCK}{_ATTN}", rf"{_BLOCK}(norm1|norm1_context)\.linear",
    rf"{_BLOCK}(ff|ff_context)\.(net\.0\.proj|net\.2|linear_in|linear_out)",
    r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_qkv_mlp_proj|to_out)|proj_mlp|norm\.linear|proj_out)",
    r"x_embedder|context_embedder|proj_out|norm_out\.linear",
    r"time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12]",
)
COMFYUI_PATHS: dict[str, tuple[str, ...]] = {
    "flux": _FLUX,
    "flux2": _FLUX,
    "sd3": (rf"{_BLOCK}{_ATTN}", rf"{_BLOCK}attn2\.(to_q|to_k|to_v|to_out\.0)",
            rf"{_BLOCK}(norm1|norm1_context)\.linear", rf"{_BLOCK}(ff|ff_context)\.net\.(0\.proj|2)",
            r"context_embedder|pos_embed\.proj|norm_out\.linear|proj_out",
            r"time_text_embed\.(timestep|text)_embedder\.linear_[12]"),
    "zimage": (r"(layers|noise_refiner|context_refiner)\.\d+\."
               r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)",
               r"all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1|"
               r"t_embedder\.mlp\.[02]"),
}
ORIGINAL_PREFIX, PATH_PREFIX = "diffusion_model.", "transformer."
# ComfyUI's name of a Qwen3 text encoder by its width (comfy/text_encoders/flux.py, z_image.py): Qwen3-4B (Z-Image,
# Klein 4B), Qwen3-8B (Klein 9B). Another width gets the name without the wrapper, which ComfyUI maps as well.
COMFY_QWEN3: dict[int, str] = {2560: "qwen3_4b", 4096: "qwen3_8b"}
BASE_MODEL_VERSION: dict[str, str] = {"flux": "flux1", "sd3": "sd3", "flux2": "flux2", "zimage": "zimage"}
# diffusers 0.42.1 loads LoKr files (through PEFT) for these only: Flux2LoraLoaderMixin, ZImageLoraLoaderMixin
DIFFUSERS_LOKR: frozenset[str] = frozenset({"flux2", "zimage"})
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: {"<component>.<field>": ...}
# the LoKrConfig fields written to diffusers' metadata (diffusers calls LoKrConfig(**them))
PEFT_FIELDS: tuple[str, ...] = ("r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "decompose_both",
                                "decompose_factor", "use_effective_conv2d", "rank_dropout", "module_dropout",
                                "init_weights")
FAMILIES_FUSABLE: dict[str, bool] = {f.name: f.fusable for f in FAMILIES.values()}  # diffusers can fuse their qkv
_SEPARATE_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass
class Sorted:
    """A transformer's modules of one adapter: `groups`, every row piece of one original (in the original's row
    order); `partial`, pieces whose group is not all here; `singles`, modules holding their own weight."""

    groups: list[tuple[Target, list[ExportModule]]] = field(default_factory=list)
    partial: list[ExportModule] = field(default_factory=list)
    singles: list[ExportModule] = field(default_factory=list)


def dit_family(components: Mapping[str, nn.Module]) -> str | None:
    """"flux", "sd3", "flux2" or "zimage" for a pipeline with such a transformer, else None."""
    model = components.get("transformer")
    family = family_of(model) if model is not None else None
    return family.name if family is not None else None


def sort_modules(modules: list[ExportModule], nm: DitNameMap) -> Sorted:
    out = Sorted()
    pieces: dict[tuple[str | None, int | None], list[ExportModule]] = {}
    for m in modules:
        if m.rows is None:
            out.singles.append(m)
        else:
            pieces.setdefault((m.origin, m.shares), []).append(m)
    for (origin, _), group in pieces.items():
        target = nm.target(origin or "")
        if target is not None and {m.path: m.rows for m in group} == layer_rows(target):
            order = [p.path for p in target.pieces]
            out.groups.append((target, sorted(group, key=lambda m: order.index(m.path))))
        else:
            out.partial += group
    return out


# ------------------------------------------------------------------------------------ pieces
def _place(height: int, parts: list[tuple[LF.Rows, Tensor]]) -> Tensor:
    """(height,): each layer's values (in its own row order) put back at its rows of the fused weight."""
    out = torch.zeros(height, dtype=parts[0][1].dtype)
    for rows, values in parts:
        offset = 0
        for a, b in rows.pieces:
            out[a:b] = values[offset:offset + b - a]
            offset += b - a
    return out


@torch.no_grad()
def _input_axis_dora(pieces: list[ExportModule], transformer: nn.Module) -> Tensor:
    """The fused module's (1, in) magnitude m, from a piece's m_p = m · (‖W_p + ΔW_p‖ + eps) / (‖W + ΔW‖ + eps)
    (formats/fused.py split_dora, column norms), which needs the base weights."""
    eps = torch.finfo(torch.float32).eps
    col_sq: list[Tensor] = []
    for p in pieces:
        layer: Any = transformer.get_submodule(p.path)
        w = layer.base_weight()
        if w.is_meta:
            raise ValueError(f"{p.component}.{p.path}: its input-axis DoRA on the fused {p.origin} is put back "
                             "together from the base weights, which are on the meta device here")
        w = w.detach().to("cpu", torch.float64)
        f64 = {k: v.to(torch.float64) for k, v in p.factors.items()}
        adapted = w + LF.delta_weight(f64, tuple(w.shape), p.scale, p.rows)
        col_sq.append((adapted * adapted).sum(0))
    fused = torch.stack(col_sq).sum(0).sqrt()
    first = pieces[0].dora_scale
    assert first is not None
    m = first.double() * ((fused + eps) / (col_sq[0].sqrt() + eps)).reshape(first.shape)
    return m.to(first.dtype)


def fused_module(target: Target, pieces: list[ExportModule], path: str, transformer: nn.Module) -> ExportModule:
    """The adapter a group's pieces share, as one module of the original's (height, in): the factors and scale
    as loaded, DoRA put back together (output axis: each piece's rows; input axis: from the base weights)."""
    first = pieces[0]
    shape = (target.out_features, target.in_features)
    dora, norms = first.dora_scale, None
    if dora is not None and LF.dora_on_output_axis(dora, first.weight_shape):
        dora = _place(shape[0], [(p.rows, p.dora_scale.reshape(-1)) for p in pieces  # type: ignore[misc,union-attr]
                                 ]).reshape(-1, 1)
        if all(p.row_norms is not None for p in pieces):
            norms = RowNorms(_place(shape[0], [(p.rows, p.row_norms.base) for p in pieces]),  # type: ignore[misc,union-attr]
                             _place(shape[0], [(p.rows, p.row_norms.adapted) for p in pieces]))  # type: ignore[misc,union-attr]
    elif dora is not None:
        dora = _input_axis_dora(pieces, transformer)
    return replace(first, path=path, weight_shape=shape, dora_scale=dora, row_norms=norms, rows=None, origin=None,
                   shares=None)


def own_module(m: ExportModule) -> ExportModule | None:
    """A row piece as an adapter of its own layer where its rows lie on W1's block edges (its ΔW is then
    kron(W1's rows, W2), exact); None off them. A module without rows is itself."""
    if m.rows is None:
        return m
    blocks = LF.row_blocks(m.rows, m.plan.out_k)
    if blocks.keep is not None:
        return None
    factors = {k: v.clone() for k, v in LF.restrict_rows(m.factors, blocks.blocks).items()}  # no shared storage
    return replace(m, factors=factors, plan=replace(m.plan, out_l=blocks.rows), rows=None, origin=None, shares=None)


def _off_edges(m: ExportModule, fmt: str, why: str) -> str:
    return (f"{m.component}.{m.path} holds rows {m.rows.pieces if m.rows else ()} of the fused module {m.origin!r}, "
            f"off W1's block edges (blocks of {m.plan.out_k} rows, W2's height): {why}; export format 'comfyui' or "
            f"'lokr_diffusers' for it (format {fmt!r})")


# ---------------------------------------------------------------------------------- comfyui
def comfyui_path_name(path: str, nm: DitNameMap, family: str) -> str | None:
    """ComfyUI's name for the transformer module `path` held whole: its original's, where that original is the
    module itself, else ComfyUI's name for exactly its rows of an original (Flux.1's fused to_qkv:
    `single_blocks.N.linear1_qkv`), else the diffusers path where ComfyUI's key map has it, else None."""
    origin = nm.covering.get(path)
    if origin is not None and nm.originals[origin].is_rename:
        return ORIGINAL_PREFIX + origin
    row_name = nm.row_name_of(path)
    if row_name is not None:
        return ORIGINAL_PREFIX + row_name
    if any(re.fullmatch(p, path) for p in COMFYUI_PATHS[family]):
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
    if target is None or target.is_rename or {p.path for p in target.pieces} != {path}:
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
        units.append((ORIGINAL_PREFIX + target.name, fused_module(target, pieces, target.name, transformer), None))
    for m in dit.singles + dit.partial:
        own = own_module(m)
        name = comfyui_path_name(m.path, nm, family) if own is not None else None
        if own is None:
            missing.append(_off_edges(m, "comfyui", "ComfyUI has no name for part of a fused module's rows"))
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


def to_comfyui_dit(modules: list[ExportModule], components: Mapping[str, nn.Module], family: str,
                   keep_tucker: bool, strict: bool, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The ComfyUI file of a DiT pipeline's adapter (see the module docstring)."""
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
    ranks = [m.plan.rank for _, m, _ in units if m.plan.rank]
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"}),
                "ss_base_model_version": BASE_MODEL_VERSION[family], "ss_network_dim": str(max(ranks, default=1)),
                "ss_network_alpha": str(max((m.alpha for _, m, _ in units), default=1.0)), "ss_output_name": name}
    if out_axis:
        metadata[DORA_RULE_KEY] = DORA_RULE_COMFYUI
    return sd, metadata


# -------------------------------------------------------------------------------- diffusers / peft
def consumer_modules(modules: list[ExportModule], components: Mapping[str, nn.Module], family: str,
                     fmt: str) -> list[ExportModule]:
    """The modules as diffusers' paths hold them: a fused group on diffusers' fused qkv Linear (`diffusers` only,
    where FAMILIES says diffusers can fuse), else per Linear on W1's block edges; refused otherwise."""
    nm = dit_name_map(components["transformer"])
    dit = sort_modules([m for m in modules if m.component == "transformer"], nm)
    out = [m for m in modules if m.component != "transformer"] + dit.singles
    fused_names: list[str] = []
    for target, pieces in dit.groups:
        alias = diffusers_fused_name(target, nm.linears) if fmt == "diffusers" and FAMILIES_FUSABLE[family] else None
        if alias is not None:
            out.append(fused_module(target, pieces, alias, components["transformer"]))
            fused_names.append(alias)
            continue
        own = [own_module(p) for p in pieces]
        for p, o in zip(pieces, own, strict=True):
            if o is None:
                raise ValueError(_off_edges(p, fmt, "no diffusers Linear holds that module's rows and PEFT's LoKr on "
                                                    "one Linear cannot hold part of a Kronecker product's rows"))
        out += [o for o in own if o is not None]
    for p in dit.partial:
        own_p = own_module(p)
        if own_p is None:
            raise ValueError(_off_edges(p, fmt, "its other pieces are not in this adapter"))
        out.append(own_p)
    separate = [m.path for m in dit.singles if m.path.rpartition(".")[2] in _SEPARATE_QKV]
    if family in DIFFUSERS_LOKR and fused_names and separate:
        raise ValueError(f"this adapter has a fused qkv ({fused_names[0]}, as diffusers loads it: it fuses the "
                         f"model's projections first) and adapters on separate projections ({separate[0]}), which "
                         "diffusers' fused attention would no longer call; export format 'comfyui' or "
                         "'lokr_diffusers' instead")
    return out


def baked(m: ExportModule) -> ExportModule:
    """The module with its scale multiplied into W1 (lokr_w1, or w1_a), scale 1: no alpha needed."""
    key = "lokr_w1" if "lokr_w1" in m.factors else "lokr_w1_a"
    return replace(m, factors={**m.factors, key: m.factors[key] * m.scale}, scale=1.0)


def to_diffusers_dit(modules: list[ExportModule], family: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers' own serialisation of a PEFT LoKr adapter: `<component>.<path>.lokr_*`, scales baked into W1,
    each component's LoKrConfig in `lora_adapter_metadata` under `<component>.` (diffusers reads the
    transformer's)."""
    by_component: dict[str, list[ExportModule]] = {}
    for m in modules:
        by_component.setdefault(m.component, []).append(baked(m))
    sd: dict[str, Tensor] = {}
    config: dict[str, Any] = {}
    for component, ms in by_component.items():
        psd, peft_config = to_peft(ms)
        sd.update({f"{component}.{k.removeprefix('base_model.model.')}": v for k, v in psd.items()})
        config.update({f"{component}.{k}": peft_config[k] for k in PEFT_FIELDS})
    if family in DIFFUSERS_LOKR and set(by_component) - {"transformer"}:
        logger.warning("diffusers' load_lora_weights for %s loads the transformer's LoKr modules only; the text "
                       "encoders' (%s) are in the file for pipe.load_lokr_weights", family,
                       ", ".join(sorted(set(by_component) - {"transformer"})))
    return sd, {DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)}


# ------------------------------------------------------------------------------------- entry
def save_dit(components: Mapping[str, nn.Module], modules: list[ExportModule], path: str, fmt: str, family: str,
             dtype: torch.dtype | str | None, metadata: Mapping[str, str] | None, keep_tucker: bool,
             strict: bool) -> str:
    """export.save_lokr_weights for a DiT pipeline, in format "comfyui", "diffusers" or "peft"."""
    if fmt == "comfyui":
        stem = os.path.splitext(os.path.basename(path))[0]
        sd, meta = to_comfyui_dit(modules, components, family, keep_tucker, strict, stem)
        return write_safetensors(cast(sd, dtype), path, {**meta, **(metadata or {})})
    written = consumer_modules(modules, components, family, fmt)
    if fmt == "diffusers":
        sd, meta = to_diffusers_dit(written, family)
        return write_safetensors(cast(sd, dtype), path, {**meta, **(metadata or {})})
    return write_peft(written, path, dtype, metadata)
