"""Turn a LoKr state dict into per-module load entries, checked against the pipeline, before any change.

Every key ends up in exactly one place: a LoKr entry, the plain-LoRA part (handed to diffusers),
the ignored list (an A1111 `.scale`, which ComfyUI ignores too), or the unmatched list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import functional as LF
from ..adaptable import AdaptedModule, base_weight, logical_shape
from ..config import LoKrConfig, pattern_value
from ..loaded import LoadedFile
from .fused import ROW_LEAVES, layer_rows, rows_from_tensors, split_dora
from .metadata import DORA_RULE_COMFYUI, DORA_RULE_KEY
from .names import FusedRef, ModuleRef, NameIndex, weight_of

logger = logging.getLogger(__name__)

LOKR_SUFFIXES: tuple[str, ...] = (*LF.FACTOR_NAMES, "lokr_t1", "alpha", "dora_scale", "scale", "lokr_scale",
                                  *ROW_LEAVES)
LORA_MARKERS: tuple[str, ...] = ("lora_down", "lora_up", "lora_mid", "lora_A", "lora_B")
PEFT_PREFIX = "base_model.model."
NUMBER_LEAVES: tuple[str, ...] = ("alpha", "scale", "lokr_scale")
# what each tensor must look like (factors of a Linear are 2-D; a conv's W2 and Tucker core carry the kernel)
EXPECTED_SHAPE: dict[str, tuple[int, int, str]] = {  # leaf: (min dims, max dims, in words)
    "lokr_w1": (2, 2, "2-D (out_l, in_m)"),
    "lokr_w1_a": (2, 2, "2-D (out_l, r)"),
    "lokr_w1_b": (2, 2, "2-D (r, in_m)"),
    "lokr_w2": (2, 4, "2-D (out_k, in_n), or 3-D/4-D (out_k, in_n, kh[, kw]) for a conv"),
    "lokr_w2_a": (2, 2, "2-D (out_k, r), or (r, out_k) beside lokr_t2"),
    "lokr_w2_b": (2, 2, "2-D (r, in_n), or (r, in_n·kh·kw) for a conv"),
    "lokr_t2": (3, 4, "3-D/4-D (r, r, kh[, kw])"),
    "lokr_t1": (3, 4, "3-D/4-D (r, r, kh[, kw])"),
    "dora_scale": (1, 4, "(out, 1[, 1, 1]) or (1, in[, 1, 1])"),
}


@dataclass
class LoadEntry:
    """One module's adapter, ready to put in place. For a fused original module (formats/fused.py) there is
    one entry per module holding its rows: `rows` says which, `plan` is the fused weight's, `origin` names
    the original, and the entries share one `factors` dict (the loader gives them one set of Parameters)."""

    ref: ModuleRef
    factors: dict[str, Tensor]
    scale: float
    plan: LF.LoKrPlan
    dora_scale: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)
    rows: LF.Rows | None = None
    origin: str | None = None


# Tensors of no module that trainers write beside the modules: musubi-tuner's networks/lokr.py saves the factor it
# was trained with as `lokr_factor` (int64, no module name); read past, as ComfyUI reads past it.
FILE_WIDE_KEYS = frozenset({"lokr_factor"})


@dataclass
class ParsedFile:
    entries: list[LoadEntry]
    lora: dict[str, Tensor]  # plain LoRA modules, for diffusers' own loader
    unmatched: list[str]  # keys no module of the pipeline takes
    ignored: list[str]  # keys read and deliberately not used
    layout: str
    rule: str  # how scales were read: "consumer" (alpha / rank), "peft" (alpha / r), "exact" (stored)


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, tensor name) for a LoKr key, also PEFT's in-memory `<m>.lokr_w1.<adapter>`."""
    module, _, leaf = key.rpartition(".")
    if leaf in LOKR_SUFFIXES:
        return module, leaf
    module2, _, leaf2 = module.rpartition(".")
    if leaf2 in LF.FACTOR_NAMES and module2:
        return module2, leaf2
    return None


def _is_lora_key(key: str) -> bool:
    return any(f".{m}." in key or key.endswith(f".{m}") for m in LORA_MARKERS)


def group_modules(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor],
                                                                 list[str]]:
    """({module: {tensor name: tensor}} for LoKr modules, {key: tensor} of LoRA modules, other keys)."""
    groups: dict[str, dict[str, Tensor]] = {}
    lora_modules: set[str] = set()
    other: list[str] = []
    for key, tensor in state_dict.items():
        if _is_lora_key(key):
            lora_modules.add(key.split(".lora_")[0])
            continue
        split = split_key(key)
        if split is None:
            other.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    lora = {k: v for k, v in state_dict.items() if _is_lora_key(k)}
    for module in list(groups):  # alpha / dora_scale of a LoRA module belong to the LoRA part
        if module in lora_modules:
            if any(leaf in LF.FACTOR_NAMES for leaf in groups[module]):
                raise ValueError(f"module {module} holds both LoKr and LoRA tensors; a file must give it one")
            for leaf, tensor in groups.pop(module).items():
                lora[f"{module}.{leaf}"] = tensor
    return groups, lora, other


def parse_file(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str], index: NameIndex,
               layout: str) -> ParsedFile:
    """`parse_loaded` for tensors and their file's metadata held apart (no PEFT config, no file to name)."""
    return parse_loaded(LoadedFile(state_dict, metadata, layout), index)


def parse_loaded(file: LoadedFile, index: NameIndex) -> ParsedFile:
    """Match, validate and scale every LoKr module of the file; raise on a module that does not fit.

    Every tensor is checked first (dtype, dimensions, NaN/Inf; ValueError/TypeError naming the key);
    a file with LoRA modules only is refused (see `check_holds_lokr`). Scales follow the producer's rule,
    with `file.peft_config` for PEFT modules without alpha tensors; `file.metadata` says whether a DoRA
    magnitude is written for ComfyUI's rule (`lokr_dora_rule`). Errors name `file.source`.
    """
    try:
        return _parse(file, index)
    except (ValueError, TypeError) as err:
        message = file.named(str(err))
        if message == str(err):
            raise
        raise type(err)(message) from None


def _parse(file: LoadedFile, index: NameIndex) -> ParsedFile:
    check_tensors(file.tensors)
    groups, lora, unmatched = group_modules(file.tensors)
    ignored: list[str] = [k for k in unmatched if k in FILE_WIDE_KEYS]
    unmatched = [k for k in unmatched if k not in FILE_WIDE_KEYS]
    _refuse_lora_only(groups, lora)
    peft_config = _peft_config(file)
    refs = _resolve_names(list(groups), index)
    entries: list[LoadEntry] = []
    for name, tensors in groups.items():
        keys = [f"{name}.{leaf}" for leaf in tensors]
        found = refs.get(name)
        factors = {k: v for k, v in tensors.items() if k in LF.FACTOR_NAMES}
        if found is None or not factors:
            unmatched += keys  # no such module, or an alpha / dora_scale with no factors
            continue
        if "scale" in tensors:
            ignored.append(f"{name}.scale")
        if isinstance(found, FusedRef):
            entries += _fused_entries(name, found, tensors, factors, index, peft_config, keys)
        else:
            entries.append(_entry(name, found, tensors, factors, index, peft_config, keys))
    _check_one_per_module(entries)
    _warn_non_positive_alpha(entries)
    if file.metadata.get(DORA_RULE_KEY) == DORA_RULE_COMFYUI:
        for e in entries:
            _undo_comfyui_dora(e, index)
    return ParsedFile(entries, lora, sorted(unmatched), ignored, file.layout, _rule(groups, peft_config))


def _rule(groups: Mapping[str, Mapping[str, Tensor]], peft_config: LoKrConfig | None) -> str:
    """How the file's scales are read: "exact" (lokr_scale), "peft" (adapter_config.json), "consumer" (alpha / rank)."""
    if any("lokr_scale" in t for t in groups.values()):
        return "exact"
    return "peft" if peft_config is not None and any("alpha" not in t for t in groups.values()) else "consumer"


def own_shape(factors: Mapping[str, Tensor]) -> tuple[int, ...]:
    """The weight shape a module's factors describe by themselves, (out_l·out_k, in_m·in_n[, kernel]), for a file
    read without a model. A conv's W2 stored flattened (w2_b (r, in_n·kh·kw)) reads as a Linear of in_n·kh·kw
    inputs: its plan has the same ranks. ValueError when W1 or W2 is missing."""
    f = factors
    if not ("lokr_w1" in f or {"lokr_w1_a", "lokr_w1_b"} <= f.keys()) or \
            not ("lokr_w2" in f or {"lokr_w2_a", "lokr_w2_b"} <= f.keys()):
        raise ValueError("needs W1 (lokr_w1, or lokr_w1_a and lokr_w1_b) and W2 (lokr_w2, or lokr_w2_a and lokr_w2_b)")
    out_l = int((f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"]).shape[0])
    in_m = int((f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_b"]).shape[-1])
    kernel: list[int] = []
    if "lokr_w2" in f:
        out_k, in_n, *kernel = (int(d) for d in f["lokr_w2"].shape)
    elif "lokr_t2" in f:  # Tucker: w2_a (r, out_k), w2_b (r, in_n), t2 (r, r, *kernel)
        out_k, in_n, kernel = int(f["lokr_w2_a"].shape[-1]), int(f["lokr_w2_b"].shape[-1]), list(f["lokr_t2"].shape[2:])
    else:  # w2_a (out_k, r), w2_b (r, in_n[·kh·kw])
        out_k, in_n = int(f["lokr_w2_a"].shape[0]), int(f["lokr_w2_b"].shape[-1])
    return (out_l * out_k, in_m * in_n, *kernel)


def parse_unplaced(file: LoadedFile) -> ParsedFile:
    """The file's LoKr modules read by themselves, for a file whose base model is unknown: plans from the
    tensors' own shapes (`own_shape`), scales by the producer's rule (`file.peft_config` for PEFT modules).
    Entries name the file's modules (ModuleRef("", module name)); keys of modules without factors are
    `unmatched`. ValueError names a module whose tensors do not fit together."""
    check_tensors(file.tensors)
    groups, lora, unmatched = group_modules(file.tensors)
    peft_config = _peft_config(file)
    entries: list[LoadEntry] = []
    for name, tensors in groups.items():
        factors = {k: v for k, v in tensors.items() if k in LF.FACTOR_NAMES}
        keys = [f"{name}.{leaf}" for leaf in tensors]
        if not factors:
            unmatched += keys
            continue
        try:
            plan = LF.plan_from_tensors(own_shape(factors), factors)
        except (ValueError, IndexError) as err:
            raise ValueError(f"{name}: {err}") from None
        scale, alpha = _scale(name, plan, tensors, name.removeprefix(PEFT_PREFIX), peft_config)
        entries.append(LoadEntry(ModuleRef("", name), factors, scale, plan, tensors.get("dora_scale"), alpha, keys))
    return ParsedFile(entries, lora, sorted(unmatched), [], file.layout, _rule(groups, peft_config))


def check_tensors(state_dict: Mapping[str, Tensor]) -> None:
    """Refuse, naming the key: non-tensors, LoKr tensors of a non-float dtype (an integer alpha is
    allowed: consumers read it as a number), factors of the wrong number of dimensions, an alpha /
    scale that is not one number, and NaN or Inf in any floating tensor (LoRA part included)."""
    for key, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{key}: holds a {type(t).__name__}, not a tensor")
        leaf = key.rpartition(".")[2]
        split = split_key(key)
        leaf = split[1] if split is not None else leaf
        lokr = split is not None and not _is_lora_key(key)
        integer_ok = leaf in (*NUMBER_LEAVES, *ROW_LEAVES) and not t.is_complex() and t.dtype != torch.bool
        if lokr and not torch.is_floating_point(t) and not integer_ok:
            raise TypeError(f"{key}: dtype {t.dtype} is not a floating-point type; LoKr tensors are float16, "
                            "bfloat16, float32 or float64 (the file is damaged or not a LoKr file)")
        if lokr and leaf in NUMBER_LEAVES and t.numel() != 1:
            raise ValueError(f"{key}: {leaf} must be one number (a 0-d tensor), got shape {tuple(t.shape)}")
        if lokr and leaf in EXPECTED_SHAPE:
            lo, hi, words = EXPECTED_SHAPE[leaf]
            if not lo <= t.dim() <= hi:
                raise ValueError(f"{key}: a {t.dim()}-D tensor of shape {tuple(t.shape)}; {leaf} must be {words}")
        finite = torch.isfinite(t.float() if t.element_size() == 1 else t) if torch.is_floating_point(t) else None
        if finite is not None and not bool(finite.all()):  # (fp8 has no isfinite of its own)
            bad = int((~finite).sum())
            raise ValueError(f"{key}: holds NaN or infinite values ({bad} of {t.numel()}); the file is damaged "
                             "(a diverged training run?) and would make NaN images")


def lora_module_count(lora: Mapping[str, Tensor]) -> int:
    """How many modules a plain-LoRA key set covers."""
    return len({k.split(".lora_")[0] for k in lora if ".lora_" in k})


def _refuse_lora_only(groups: Mapping[str, object], lora: Mapping[str, Tensor]) -> None:
    if not groups and lora:
        raise ValueError(f"this file holds no LoKr modules, only {lora_module_count(lora)} LoRA modules: "
                         "load it with pipe.load_lora_weights")


def check_holds_lokr(state_dict: Mapping[str, Tensor]) -> None:
    """ValueError when the file holds LoRA modules and no LoKr module (a LoRA given to
    `load_lokr_weights` must not load as an invisible adapter). `parse_file` calls it too."""
    groups, lora, _ = group_modules(state_dict)
    _refuse_lora_only(groups, lora)


def _warn_non_positive_alpha(entries: list[LoadEntry]) -> None:
    """alpha <= 0 means what ComfyUI and A1111 compute (alpha / rank, literally): 0 is no change,
    negative is the change reversed. Loaded so, with a warning."""
    odd = [(e.keys[0].rpartition(".")[0], e.alpha) for e in entries
           if e.alpha is not None and e.alpha <= 0 and e.scale <= 0]
    if odd:
        logger.warning("%d modules have alpha <= 0 (e.g. %s alpha %s): loaded as ComfyUI/A1111 do, scale = alpha / "
                       "rank (alpha 0: no effect; negative: the change is reversed)", len(odd), odd[0][0], odd[0][1])


def _resolve_names(names: list[str], index: NameIndex) -> dict[str, ModuleRef | FusedRef]:
    """Module name -> slot (or the slots of a fused original). PEFT names (`base_model.model.<path>`) carry
    no component: the one whose paths take every such name wins (unet, transformer, then the text encoders)."""
    out: dict[str, ModuleRef | FusedRef] = {}
    peft = [n for n in names if n.startswith(PEFT_PREFIX)]
    if peft:
        paths = [n[len(PEFT_PREFIX):] for n in peft]
        fits = [c for c, mods in index.modules.items() if all(p in mods for p in paths)]
        if fits:
            if len(fits) > 1:
                logger.warning("PEFT keys fit %s; loading into %s", fits, fits[0])
            out.update({n: ModuleRef(fits[0], p) for n, p in zip(peft, paths, strict=True)})
    for name in names:
        if name not in out and (hit := index.lookup(name)) is not None:
            out[name] = hit[1]
    return out


def _entry(name: str, ref: ModuleRef, tensors: dict[str, Tensor], factors: dict[str, Tensor], index: NameIndex,
           peft_config: LoKrConfig | None, keys: list[str]) -> LoadEntry:
    if "lokr_t1" in tensors:
        raise ValueError(f"{name}: lokr_t1 (a Tucker W1) is written by no known trainer and is not supported")
    if ref in index.unused:
        raise ValueError(f"{name} -> {ref.component}.{ref.path}: {index.unused[ref]}")
    module = index.modules[ref.component][ref.path]
    shape = logical_shape(module)
    rows = None
    if "lokr_rows" in tensors or "lokr_height" in tensors:  # a piece of a fused module, as we save it
        if "lokr_rows" not in tensors or "lokr_height" not in tensors:
            raise ValueError(f"{name}: lokr_rows and lokr_height go together")
        rows = rows_from_tensors(tensors["lokr_rows"], tensors["lokr_height"], name)
        if rows.out != shape[0]:
            raise ValueError(f"{name}: lokr_rows give {rows.out} rows; {ref.component}.{ref.path} has {shape[0]}")
    try:
        plan = LF.plan_from_tensors(shape if rows is None else (rows.height, *shape[1:]), factors)
        if "dora_scale" in tensors:
            LF.dora_on_output_axis(tensors["dora_scale"], shape)
    except (ValueError, IndexError) as err:
        raise ValueError(f"{name} -> {ref.component}.{ref.path}: {err}") from None
    scale, alpha = _scale(name, plan, tensors, ref.path, peft_config)
    return LoadEntry(ref, factors, scale, plan, tensors.get("dora_scale"), alpha, keys, rows=rows,
                     origin=index.origins.get(ref) if rows is not None else None)


def _fused_entries(name: str, ref: FusedRef, tensors: dict[str, Tensor], factors: dict[str, Tensor],
                   index: NameIndex, peft_config: LoKrConfig | None, keys: list[str]) -> list[LoadEntry]:
    """One entry per module holding rows of the fused original `ref` (formats/fused.py), sharing `factors`."""
    if "lokr_t1" in tensors:
        raise ValueError(f"{name}: lokr_t1 (a Tucker W1) is written by no known trainer and is not supported")
    target = ref.target
    shape = (target.out_features, target.in_features)
    where = f"{name} -> {ref.component}.{target.name} (rows of {', '.join(sorted({p.path for p in target.pieces}))})"
    try:
        plan = LF.plan_from_tensors(shape, factors)
        if "dora_scale" in tensors:
            LF.dora_on_output_axis(tensors["dora_scale"], shape)
    except (ValueError, IndexError) as err:
        raise ValueError(f"{where}: {err}") from None
    scale, alpha = _scale(name, plan, tensors, target.name, peft_config)
    rows = layer_rows(target)
    doras: dict[str, Tensor] = {}
    if "dora_scale" in tensors:
        modules = index.modules[ref.component]
        weights = {p: _base_weight(modules[p]) for p in rows}  # the weights without LoKr, for the input axis
        doras = split_dora(tensors["dora_scale"], target, rows, factors, scale, weights)
    return [LoadEntry(ModuleRef(ref.component, path), factors, scale, plan, doras.get(path), alpha, keys, rows=r,
                      origin=target.name) for path, r in rows.items()]


def _base_weight(module: nn.Module) -> Tensor:
    return module.base_weight() if isinstance(module, AdaptedModule) else weight_of(module).detach()


def _check_one_per_module(entries: list[LoadEntry]) -> None:
    """Two module names of one file that reach the same module (an original and a diffusers name, say)."""
    seen: dict[ModuleRef, LoadEntry] = {}
    for e in entries:
        other = seen.setdefault(e.ref, e)
        if other is not e:
            raise ValueError(f"{other.keys[0].rpartition('.')[0]} and {e.keys[0].rpartition('.')[0]} both reach "
                             f"{e.ref.component}.{e.ref.path}; a file must give each module one adapter")


def _scale(name: str, plan: LF.LoKrPlan, tensors: Mapping[str, Tensor], path: str,
           peft_config: LoKrConfig | None) -> tuple[float, float | None]:
    """(scale, alpha) of one file module, by its producer's rule (docs/formats.md §Scale rules)."""
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    # The file's own tensors win over any config or metadata: ComfyUI and A1111 read only the
    # tensors, so a file must mean the same here as there. lokr_scale (our lossless layout) is the
    # scale itself; an alpha tensor gives the consumers' alpha / rank; PEFT's adapter_config.json
    # (alpha / r with its patterns) only speaks for modules that carry neither.
    if "lokr_scale" in tensors:
        scale = float(tensors["lokr_scale"])
    elif alpha is not None:
        scale = LF.consumer_scale(plan, alpha)
        if peft_config is not None:
            _warn_if_config_disagrees(name, peft_config, path, scale)
    elif peft_config is not None:
        r = pattern_value(peft_config.rank_pattern, path, peft_config.r, "rank_pattern")
        a = pattern_value(peft_config.alpha_pattern, path, peft_config.alpha, "alpha_pattern")
        scale, alpha = LF.peft_scale(a, r), float(a)
    else:
        scale = LF.consumer_scale(plan, alpha)
    return scale, alpha


def _undo_comfyui_dora(e: LoadEntry, index: NameIndex) -> None:
    """Our ComfyUI export rescales an output-axis dora_scale for ComfyUI's rule (m' = m·‖W‖/‖W + ΔW‖,
    docs/formats.md §DoRA); reading it back takes the trained m from the module's own base weight. A swapped
    adaLN projection named by its diffusers path has it in the original's row order, as ComfyUI applies it
    after its (shift, scale) swap (docs/formats.md §Export of DiT adapters): its halves go back first."""
    module = index.modules[e.ref.component][e.ref.path]
    shape = logical_shape(module)
    if e.dora_scale is None or not LF.dora_on_output_axis(e.dora_scale, shape):
        return
    if e.ref in index.swapped and e.rows is None:
        e.dora_scale = e.dora_scale.roll(e.dora_scale.shape[0] // 2, 0)
    w = base_weight(module)
    if w.is_meta:
        raise ValueError(f"{e.ref.component}.{e.ref.path}: this file's output-axis dora_scale is written for "
                         "ComfyUI's rule (metadata lokr_dora_rule=comfyui); reading it back needs the base "
                         "model's weights: load it into a pipeline with pipe.load_lokr_weights")
    wide = {k: torch.promote_types(v.dtype, torch.float32) for k, v in e.factors.items()}  # as the loader keeps them
    factors = {k: v.to(device=w.device, dtype=wide[k]) for k, v in e.factors.items()}
    with torch.no_grad():
        base, adapted = LF.dora_row_norms(w, LF.delta_weight(factors, shape, e.scale, e.rows))
    ratio = (adapted.double() / base.double()).cpu().reshape(e.dora_scale.shape)
    e.dora_scale = (e.dora_scale.double() * ratio).to(e.dora_scale.dtype)


def _warn_if_config_disagrees(name: str, config: LoKrConfig, path: str, scale: float) -> None:
    r = pattern_value(config.rank_pattern, path, config.r, "rank_pattern")
    a = pattern_value(config.alpha_pattern, path, config.alpha, "alpha_pattern")
    if not math.isclose(LF.peft_scale(a, r), scale, rel_tol=1e-6):
        logger.warning("%s: its alpha tensor gives scale %.6g, adapter_config.json would give %.6g (alpha %s / r %s); "
                       "the file's own alpha tensor is used, as ComfyUI and A1111 use it", name, scale,
                       LF.peft_scale(a, r), a, r)


def _peft_config(file: LoadedFile) -> LoKrConfig | None:
    """The PEFT config read from the adapter_config.json beside the weights, if any."""
    if file.peft_config is None:
        return None
    where = file.config_path or "the PEFT config"
    data = dict(file.peft_config)
    if str(data.get("peft_type", "LOKR")).upper() != "LOKR":
        raise ValueError(f"{where}: is for peft_type {data.get('peft_type')!r}, not LOKR")
    try:
        return LoKrConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
