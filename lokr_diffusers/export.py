"""Write a LoKr adapter for its consumers: ComfyUI / A1111 (kohya layout), PEFT, diffusers, and our
own lossless layout. Each writer encodes every layer's scale so that its consumer's rule gives it
back exactly (docs/formats.md §Scale rules, §Portable export), and output-axis DoRA so that ComfyUI's
rule gives back the trained weight (docs/formats.md §DoRA). Writes are all-or-nothing (atomic.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as LF
from .architectures import BASE_MODEL_VERSION, base_of
from .atomic import Writer, safetensors_writer, text_writer, write_files, write_safetensors
from .components import pipeline_components
from .formats.fused import SHARED_KEY, rows_to_tensors
from .formats.ldm import diffusers_to_ldm
from .formats.metadata import DORA_RULE_COMFYUI, DORA_RULE_KEY
from .formats.ours import OURS_FORMAT, OURS_PREFIX
from .logs import progress, warn_once
from .model import lokr_layers

logger = logging.getLogger(__name__)

FORMAT_ALIASES: dict[str, str] = {"comfyui": "comfyui", "kohya": "comfyui", "a1111": "comfyui", "peft": "peft",
                                  "diffusers": "diffusers", "lokr_diffusers": "lokr_diffusers"}
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# A1111 applies OpenCLIP attention (SD2 te, SDXL te2) only when q, k, v and out of a layer are all there.
_ATTN = re.compile(r"^(.*\.self_attn\.)(q_proj|k_proj|v_proj|out_proj)$")
# Keys ComfyUI maps and A1111 cannot: A1111 runs SDXL's second text encoder as open_clip's, whose text_projection
# is a bare nn.Parameter, not a layer, so its key map (extensions-builtin/Lora/networks.py, from named_modules)
# has no entry and the module is dropped, logged at debug level only (docs/formats.md §Consumer limits).
A1111_UNMATCHED: tuple[str, ...] = ("lora_te2_text_projection",)


@dataclass(frozen=True)
class RowNorms:
    """Per output row (shape (out,)): `base` = ‖W‖ + eps as ComfyUI computes it (fp32, eps of fp32), and
    `adapted` = ‖W + ΔW‖ + eps as training computed it (eps of that dtype). W is the base weight without
    fused adapters, ΔW the adapter's own delta at strength 1."""

    base: Tensor
    adapted: Tensor


@dataclass
class ExportModule:
    """One module of one adapter, independent of any layout. `row_norms` is needed only to write
    output-axis DoRA for ComfyUI (None where no base weight is at hand, e.g. convert_lokr_file)."""

    component: str
    path: str
    factors: dict[str, Tensor]
    scale: float
    plan: LF.LoKrPlan
    weight_shape: tuple[int, ...]
    dora_scale: Tensor | None
    r: int
    alpha: float
    row_norms: RowNorms | None = None
    rows: LF.Rows | None = None  # the layer holds these rows of the adapter's fused weight (plan is the fused one)
    origin: str | None = None  # the fused original module's name
    shares: int | None = None  # storage of the factors, the same for the pieces of one fused module


def collect(components: Mapping[str, nn.Module], adapter_name: str) -> list[ExportModule]:
    """Every module holding `adapter_name`, tensors detached on the CPU."""
    out: list[ExportModule] = []
    held = [(c, path, layer) for c, model in components.items() for path, layer in lokr_layers(model)
            if adapter_name in layer.plans]
    for component, path, layer in progress(held, desc=f"exporting LoKr {adapter_name!r}"):
        dora = layer.dora_scale[adapter_name].detach().cpu() if adapter_name in layer.dora_scale else None
        norms = _row_norms(layer, adapter_name) if dora is not None and \
            LF.dora_on_output_axis(dora, layer.weight_shape) else None
        factors = layer.factors(adapter_name)
        rows = layer.rows.get(adapter_name)
        out.append(ExportModule(
            component, path.replace(".base_layer", ""),
            {k: v.detach().cpu() for k, v in factors.items()}, layer.scaling[adapter_name],
            layer.plans[adapter_name], layer.weight_shape, dora, layer.r[adapter_name],
            layer.alpha[adapter_name], norms, rows, layer.origins.get(adapter_name),
            next(iter(factors.values())).data_ptr() if rows is not None else None))
    if not out:
        have = sorted({a for m in components.values() for _, la in lokr_layers(m) for a in la.plans})
        raise ValueError(f"adapter_name {adapter_name!r}: no LoKr adapter of that name here (adapters: {have})")
    return out


@torch.no_grad()
def _row_norms(layer: Any, adapter_name: str) -> RowNorms | None:
    """RowNorms of one layer, computed as the layer's DoRA forward does (None on the meta device)."""
    w = layer.base_weight()
    if w.is_meta:
        return None
    delta = LF.delta_weight(layer.factors(adapter_name), layer.weight_shape, layer.scaling[adapter_name],
                            layer.rows.get(adapter_name))
    base, adapted = LF.dora_row_norms(w, delta)
    return RowNorms(base.cpu(), adapted.cpu())


# -------------------------------------------------------------------------------------- comfyui
def comfyui_module_name(component: str, path: str, unet_config: Any, base: str) -> str:
    """The most portable kohya name (docs/formats.md §Portable export): SDXL UNet by ldm names, SD1/SD2 UNet by
    diffusers paths; text encoders always with `text_model.`."""
    if component == "unet":
        ldm = diffusers_to_ldm(path, unet_config) if base == "sdxl" else None
        return "lora_unet_" + (ldm or path).replace(".", "_")
    # transformers 5's CLIPTextModel lost the `text_model.` level; kohya names keep it (the
    # projection of CLIPTextModelWithProjection sits outside it, as in transformers 4)
    te = path if path.startswith(("text_model.", "text_projection")) else "text_model." + path
    prefix = {"text_encoder": "lora_te1_" if base == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + te.replace(".", "_")


def expand_tucker(f: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The factors with a Tucker W2 rewritten as plain low-rank ones of the same rank (exact)."""
    out = {k: v for k, v in f.items() if k not in ("lokr_t2", "lokr_w2_a", "lokr_w2_b")}
    out["lokr_w2_a"], out["lokr_w2_b"] = LF.tucker_to_lowrank(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    return out


def consumer_tensors(m: ExportModule, keep_tucker: bool, comfyui: bool = False) -> dict[str, Tensor]:
    f = dict(m.factors)
    if "lokr_t2" in f and not keep_tucker:
        f = expand_tucker(f)
    alpha, w1_factor = LF.alpha_for_consumer(m.plan, m.scale)
    if w1_factor != 1.0:  # both factors full: consumers ignore alpha, the scale goes into W1
        f["lokr_w1"] = f["lokr_w1"] * w1_factor
    # Both full: ComfyUI/A1111 ignore alpha, but LyCORIS' loader crashes on a module without one
    f["alpha"] = torch.tensor(float(alpha if alpha is not None else m.r))
    if m.dora_scale is not None:
        f["dora_scale"] = _comfyui_dora(m) if comfyui else m.dora_scale
    return f


def _on_output_axis(m: ExportModule) -> bool:
    return m.dora_scale is not None and LF.dora_on_output_axis(m.dora_scale, m.weight_shape)


def _comfyui_dora(m: ExportModule) -> Tensor:
    """dora_scale for ComfyUI's rule. Trained (LyCORIS): W' = m · (W + ΔW) / (‖W + ΔW‖ + eps) per row.
    ComfyUI on the output axis: W' = m' · (W + ΔW) / (‖W‖ + eps); so m' = m · (‖W‖ + eps) / (‖W + ΔW‖ + eps)
    gives the trained W', and W + s·(W' − W) at every strength s. The input axis is the same in both."""
    assert m.dora_scale is not None
    if not _on_output_axis(m):
        return m.dora_scale
    assert m.row_norms is not None  # to_comfyui refuses modules without them
    ratio = m.row_norms.base.double() / m.row_norms.adapted.double()  # (out,)
    row = (-1, *[1] * (len(m.weight_shape) - 1))  # (out, 1[, 1, 1]): a 1-D one broadcasts wrongly in ComfyUI
    return (m.dora_scale.double().reshape(row) * ratio.reshape(row)).to(m.dora_scale.dtype)


def check_comfyui_dora(modules: list[ExportModule]) -> list[ExportModule]:
    """The output-axis DoRA modules; raises if one has no base-weight norms to rescale its dora_scale."""
    out_axis = [m for m in modules if _on_output_axis(m)]
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
    openclip = {"text_encoder_2"} if base == "sdxl" else ({"text_encoder"} if base == "sd2" else set())
    for m in modules:  # complete OpenCLIP attention groups with ΔW = 0 modules
        match = _ATTN.match(m.path) if m.component in openclip else None
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj") if match else ():
            path = match.group(1) + proj  # type: ignore[union-attr]
            if (m.component, path) not in present:
                key = comfyui_module_name(m.component, path, unet_config, base)
                sd.update({f"{key}.{k}": v for k, v in _zero_module(m.weight_shape).items()})
                present[(m.component, path)] = m
    ranks = [m.plan.rank for m in modules if m.plan.rank]
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": "lokr"}),
        "ss_base_model_version": BASE_MODEL_VERSION[base],
        "ss_v2": str(base == "sd2"),
        "ss_network_dim": str(max(ranks, default=1)),
        "ss_network_alpha": str(max((m.alpha for m in modules), default=1.0)),
        "ss_output_name": name,
    }
    if out_axis:
        metadata[DORA_RULE_KEY] = DORA_RULE_COMFYUI
    return sd, metadata


# ----------------------------------------------------------------------------------------- peft
def to_peft(modules: list[ExportModule]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """PEFT's saved layout for ONE component: `base_model.model.<path>.lokr_*` and an
    adapter_config.json whose rank/alpha patterns make PEFT plan these very shapes and scales."""
    both = any(m.plan.w1_lowrank for m in modules)
    tucker = any(m.plan.tucker for m in modules)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    sd: dict[str, Tensor] = {}
    for m in modules:
        r = m.plan.rank2 or m.plan.rank1 or max(m.plan.out_l, m.plan.in_m, m.plan.out_k, m.plan.in_n)
        want = LF.plan_lokr(m.weight_shape, r, -1, both, tucker)
        if want != m.plan:
            raise ValueError(f"{m.component}.{m.path}: PEFT would plan {want.shapes()} for this module, it holds "
                             f"{m.plan.shapes()}; export format='comfyui' or 'lokr_diffusers' instead")
        key = "^" + re.escape(m.path)  # anchored: PEFT matches (.*\.)?(key)$, and `proj_out` ends other paths
        rank_pattern[key], alpha_pattern[key] = r, m.scale * r  # PEFT: scale = alpha / r, always
        for k, v in m.factors.items():
            if k == "lokr_t2" and len(m.weight_shape) == 3:
                v = v.unsqueeze(-1)  # PEFT keeps a Conv1d Tucker core as (r, r, k, 1)
            sd[f"base_model.model.{m.path}.{k}"] = v
        if m.dora_scale is not None:
            raise ValueError(f"{m.path}: PEFT's LoKr has no DoRA; export format='comfyui' instead")
    r0 = max(set(rank_pattern.values()), key=list(rank_pattern.values()).count)
    config = {"peft_type": "LOKR", "r": r0, "alpha": r0, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "target_modules": sorted(m.path for m in modules), "decompose_both": both, "decompose_factor": -1,
              "use_effective_conv2d": tucker, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
              "inference_mode": True, "task_type": None, "base_model_name_or_path": None}
    return sd, config


# --------------------------------------------------------------------------------- diffusers / ours
def to_diffusers(modules: list[ExportModule]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers' single-file layout (`unet.` / `text_encoder.` keys), alphas for the consumer rule."""
    sd: dict[str, Tensor] = {}
    for m in modules:
        sd.update({f"{m.component}.{m.path}.{k}": v for k, v in consumer_tensors(m, keep_tucker=True).items()})
    return sd, {"lokr_adapter_metadata": json.dumps(_configs(modules))}


def to_ours(per_adapter: Mapping[str, list[ExportModule]]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Lossless: every adapter, its exact scale (`lokr_scale`, fp32 0-d), r / alpha, Tucker, DoRA, and the
    row pieces of a fused module: each piece's rows, the shared factors written once (formats/fused.py)."""
    sd: dict[str, Tensor] = {}
    shared: dict[str, str] = {}
    for adapter, modules in per_adapter.items():
        holders: dict[tuple[str, str, int | None], str] = {}  # (component, original, storage) -> its holder
        for m in modules:
            key = f"{OURS_PREFIX}{adapter}.{m.component}.{m.path}"
            if m.rows is not None:
                sd.update({f"{key}.{k}": v for k, v in rows_to_tensors(m.rows).items()})
                holder = holders.setdefault((m.component, m.origin or m.path, m.shares), f"{m.component}.{m.path}")
                if holder != f"{m.component}.{m.path}":
                    shared[f"{adapter}.{m.component}.{m.path}"] = holder
            if f"{adapter}.{m.component}.{m.path}" not in shared:
                sd.update({f"{key}.{k}": v for k, v in m.factors.items()})
            sd[f"{key}.lokr_scale"] = torch.tensor(m.scale, dtype=torch.float64)
            sd[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float64)
            if m.dora_scale is not None:
                sd[f"{key}.dora_scale"] = m.dora_scale
    meta = {"format": OURS_FORMAT, "format_version": "1",
            "adapters": json.dumps({a: _configs(ms) for a, ms in per_adapter.items()})}
    if shared:
        meta[SHARED_KEY] = json.dumps(shared)
    return sd, meta


def refuse_rows(modules: list[ExportModule], fmt: str) -> None:
    """The consumer layouts have no form yet for an adapter held as rows of a fused original module (a
    DiT file's `qkv` split over to_q / to_k / to_v): say so instead of writing a file that means otherwise."""
    pieces = [m for m in modules if m.rows is not None]
    if pieces:
        m = pieces[0]
        raise ValueError(f"{m.component}.{m.path} holds rows {m.rows.pieces if m.rows else ()} of the fused module "
                         f"{m.origin!r} ({len(pieces)} such modules): format {fmt!r} cannot write them yet; "
                         "save it with format='lokr_diffusers' (or pipe.save_pretrained), which keeps them")


def _configs(modules: list[ExportModule]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in modules:
        c = out.setdefault(m.component, {"target_modules": [], "rank_pattern": {}, "alpha_pattern": {}})
        c["target_modules"].append(m.path)
        c["rank_pattern"][m.path], c["alpha_pattern"][m.path] = m.r, m.alpha
    return out


# -------------------------------------------------------------------------------------- writing
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """"fp16" | "bf16" | "fp32" | a floating torch dtype | None (keep); anything else is refused."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, a floating torch dtype or None, got {dtype!r}")


def cast(sd: Mapping[str, Tensor], dtype: torch.dtype | str | None) -> dict[str, Tensor]:
    """Floating tensors to `dtype` (alpha and scales too, as LyCORIS does; our lokr_scale stays fp64)."""
    dt = resolve_dtype(dtype)
    if dt is None:
        return dict(sd)
    return {k: v if k.endswith(".lokr_scale") else v.to(dt) for k, v in sd.items()}


def save_lokr_weights(source: Any, path: str | os.PathLike[str], adapter_name: str | list[str] = "default",
                      format: str = "comfyui", dtype: torch.dtype | str | None = None,
                      metadata: Mapping[str, str] | None = None, base: str | None = None,
                      keep_tucker: bool = False, strict: bool = True) -> str:
    """Write adapter(s) of a pipeline (or of {component: model}) to `path` in `format`.

    comfyui (alias kohya, a1111): one .safetensors; peft: a folder (one sub-folder per component
    when several hold the adapter); diffusers: one .safetensors; lokr_diffusers: one .safetensors,
    several adapters at once (a list, or "all"). Returns the path written.

    All-or-nothing: arguments are checked before anything is written, and a failed save (a full
    disk, a read-only folder, Ctrl-C) leaves every file and folder as it was, with no temporaries.
    Output-axis DoRA is written for ComfyUI's rule (ComfyUI reproduces the trained weight; A1111
    only applies input-axis DoRA). `keep_tucker=True` keeps Tucker cores (`lokr_t2`) instead of
    rewriting them as plain low-rank factors: such files fail to load in ComfyUI 0.3.64 (kron on a
    non-contiguous einsum result), so use it only for readers that take Tucker cores (LyCORIS, ours).

    Flux.1, SD3, Flux.2 / Klein and Z-Image pipelines (export_dit.py, docs/formats.md §Export of DiT adapters):
    `base` may name the family ("flux", "sd3", "flux2", "zimage") and must then be the transformer's. A module
    ComfyUI has no name for is refused (`strict=False`: left out of the file, with a warning).
    """
    fmt = FORMAT_ALIASES.get(format) if isinstance(format, str) else None
    if fmt is None:
        raise ValueError(f"format {format!r} is unknown; use one of {sorted(FORMAT_ALIASES)}")
    resolve_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path (str or os.PathLike), got {type(path).__name__}")
    _check_metadata(metadata)
    comps = dict(source) if isinstance(source, Mapping) else pipeline_components(source)
    path = os.fspath(path)
    if fmt == OURS_FORMAT:
        names = _adapter_names(comps, adapter_name)
        sd, meta = to_ours({a: collect(comps, a) for a in names})
        return write_safetensors(cast(sd, dtype), path, {**meta, **(metadata or {})})
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name {adapter_name!r}: format {format!r} holds one adapter; pass its name "
                         "(several adapters go in one file with format='lokr_diffusers')")
    modules = collect(comps, adapter_name)
    family = _dit_family(comps, base)
    if family is not None:
        from .export_dit import save_dit

        return save_dit(comps, modules, path, fmt, family, dtype, metadata, keep_tucker, strict)
    refuse_rows(modules, fmt)
    if fmt == "comfyui":
        base = base or base_of(comps)
        unet_config = getattr(comps.get("unet"), "config", None)
        stem = os.path.splitext(os.path.basename(path))[0]
        sd, meta = to_comfyui(modules, base, unet_config, keep_tucker, name=stem)
        return write_safetensors(cast(sd, dtype), path, {**meta, **(metadata or {})})
    if fmt == "diffusers":
        sd, meta = to_diffusers(modules)
        return write_safetensors(cast(sd, dtype), path, {**meta, **(metadata or {})})
    return write_peft(modules, path, dtype, metadata)


def _dit_family(comps: Mapping[str, nn.Module], base: str | None) -> str | None:
    """The DiT family of the pipeline's transformer (None for a UNet pipeline); `base`, if given, must agree."""
    from .export_dit import dit_family

    family = dit_family(comps)
    if base is not None and family is not None and base != family:
        raise ValueError(f"base {base!r}: this pipeline's transformer is a {family} one; pass base={family!r} or None")
    if base is not None and family is None and base not in BASE_MODEL_VERSION:
        raise ValueError(f"base {base!r}: one of {sorted(BASE_MODEL_VERSION)} for a UNet pipeline")
    return family


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata[{k!r}]: safetensors metadata holds strings only, got {type(v).__name__}")


def _adapter_names(comps: Mapping[str, nn.Module], adapter_name: str | list[str]) -> list[str]:
    if adapter_name == "all":
        names = sorted({a for m in comps.values() for _, la in lokr_layers(m) for a in la.plans})
    else:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError(f"adapter_name {adapter_name!r}: no adapter to save")
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"adapter_name {adapter_name!r}: adapter names are strings")
    return names


def write_peft(modules: list[ExportModule], path: str, dtype: torch.dtype | str | None,
               metadata: Mapping[str, str] | None) -> str:
    """PEFT folder(s): `path` itself for one component, `path/<component>` for several. Folders that do
    not exist are created (and removed again if the save fails)."""
    by_component: dict[str, list[ExportModule]] = {}
    for m in modules:
        by_component.setdefault(m.component, []).append(m)
    written = {c: to_peft(ms) for c, ms in by_component.items()}  # every component checked before writing
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"format 'peft' writes a folder and {path} is an existing file; give a folder path")
    files: dict[str, Writer] = {}
    for component, (sd, config) in written.items():
        folder = path if len(written) == 1 else os.path.join(path, component)
        files[os.path.join(folder, "adapter_model.safetensors")] = safetensors_writer(cast(sd, dtype),
                                                                                     dict(metadata or {}))
        files[os.path.join(folder, "adapter_config.json")] = text_writer(json.dumps(config, indent=2,
                                                                                    sort_keys=True))
    write_files(files, make_dirs=True)
    return path
