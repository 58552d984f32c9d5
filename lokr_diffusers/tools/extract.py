"""`extract_lokr`: the LoKr nearest to the change between two diffusers folders of one model family, module by module,
written in any export format with its error report (docs/tools.md §Extract a LoKr from a fine-tune).

Per adapted module: ΔW = W_tuned − W_base in fp32 (each weight read alone from its safetensors file), the split and
rank chosen (nearest.choose), the factors fitted (nearest.nearest_lokr), the error measured. The file is written
by the export writers (export/registry.py) onto the components built on the meta device; its metadata and a JSON
beside it hold the report. Nothing is written when a module fails (shapes, NaN, a missing weight).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from .. import families
from ..atomic import text_writer, write_files
from ..config import LoKrConfig
from ..export import ExportJob, ExportModule, Layout, layout_of, write
from ..logs import progress
from ..targeting import is_target
from .nearest import BudgetTooSmall, Fit, fit_change
from .report import ModuleReport, Report, report_path
from .weights import FolderWeights, SingleFileWeights, open_weights

Weights = FolderWeights | SingleFileWeights

logger = logging.getLogger(__name__)

EXTRACT_METADATA_KEY = "lokr_diffusers_extract"  # the report's summary in the written file's metadata
PEFT_PLANNED = ("peft", "diffusers")  # layouts whose reader plans the split (LyCORIS' factor -1) from r alone


def extract_lokr(base: str | os.PathLike[str], tuned: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 format: str = "comfyui", components: Sequence[str] | None = None,
                 target_modules: list[str] | str | None = None, factor: int | None = None, rank: int = 0,
                 decompose_both: bool = False, tucker: bool = False, budget_per_module: int | None = None,
                 budget: int | None = None, min_rel_norm: float = 0.0,
                 dtype: torch.dtype | str | None = None, config: str | os.PathLike[str] | None = None) -> Report:
    """Extract a LoKr from a fine-tune: the nearest W1 ⊗ W2 to each module's change between `base` and `tuned`.

    Args:
        base, tuned: diffusers pipeline folders of one model (same components and shapes), or single-file checkpoints
            in the original layout (tools/weights.py: an SD UNet and CLIP-L, a DiT transformer's Linears).
        config: for a single-file checkpoint, a diffusers folder of the model with its configs (default: the other
            side when it is a folder, else the full-size model the file fits).
        out: the file to write (a folder for format="peft"); a JSON report is written beside it (`<out>.json`).
        format: "comfyui" (aliases kohya / a1111), "peft", "diffusers" or "lokr_diffusers".
        components: which components to compare (default: the denoiser and the text encoders the folder has).
        target_modules: PEFT's rule (a list of names or suffixes, or a regex); default every Linear / Conv.
        factor: the split factor for W1 (LyCORIS' `factor`); default: LyCORIS' (-1, nearest √dim) without a budget,
            the best of LyCORIS' usual splits with one. "peft" and "diffusers" files hold -1's split only.
        rank: W2's rank (0: full); W1's too with `decompose_both`; with a budget, the largest rank allowed.
        tucker: a conv's low-rank W2 as a Tucker core.
        budget_per_module / budget: the parameters one module / all modules may keep (the global one shared in
            proportion to each module's weight size); among the splits, the lowest error within it wins.
        min_rel_norm: skip modules with ‖ΔW‖ / ‖W_base‖ at or below this (unchanged ones are always skipped).
        dtype: the tensors' dtype in the file (default fp32).

    Returns:
        The Report (also in the file's metadata under "lokr_diffusers_extract", and in full in the JSON).
    """
    from ..convert import check_output_path

    layout, factor = check_fit_args(format, factor, rank, budget, budget_per_module)
    out = os.fspath(out)
    check_output_path(out, folder=layout.folder)
    if config is None:  # a single file beside a folder takes the folder's configs
        config = next((p for p in (base, tuned) if os.path.isdir(os.fspath(p))), None)
    a, b = open_weights(base, "base", config), open_weights(tuned, "tuned", config)
    models, family = _models(a, b, components)
    rule = LoKrConfig(target_modules=target_modules) if target_modules is not None else None
    targets = [(c, path, m) for c, model in models.items() for path, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and (rule is None or is_target(rule, path))]
    if not targets:
        raise ValueError(f"no Linear or Conv module of {sorted(models)} matches target_modules={target_modules!r}")
    total = sum(m.weight.numel() for _, _, m in targets)
    options: dict[str, object] = {"base": os.fspath(base), "tuned": os.fspath(tuned), "factor": factor, "rank": rank,
               "decompose_both": decompose_both, "tucker": tucker, "budget_per_module": budget_per_module,
               "budget": budget, "min_rel_norm": min_rel_norm}
    report = Report("extract", out, family.name, options=options)
    modules: list[ExportModule] = []
    for component, path, module in progress(targets, desc="extracting LoKr", work=total * 16):
        where = f"{component}.{path}"
        key = f"{path}.weight"
        wa, wb = a.tensor(component, key), b.tensor(component, key)
        if wa is None and wb is None:
            logger.debug("%s: no weight in either folder (tied or not saved), skipped", where)
            continue
        if wa is None or wb is None:
            raise ValueError(f"{where}: the weight is in {'tuned' if wa is None else 'base'} only")
        if wa.shape != wb.shape or wa.shape != module.weight.shape:
            raise ValueError(f"{where}: shapes differ: base {tuple(wa.shape)}, tuned {tuple(wb.shape)}, "
                             f"config {tuple(module.weight.shape)}")
        delta = wb.float() - wa.float()
        if not torch.isfinite(delta).all():
            raise ValueError(f"{where}: the change has NaN or inf values (a broken checkpoint?); nothing written")
        norm, base_norm = float(delta.norm()), float(wa.float().norm())
        rel = norm / base_norm if base_norm > 0 else math.inf
        if norm == 0 or rel <= min_rel_norm:
            report.skipped_unchanged += 1
            continue
        share = budget_per_module if budget is None else max(1, budget * module.weight.numel() // total)
        try:
            fit = fit_change(delta, factor, rank, decompose_both, tucker, share)
        except BudgetTooSmall as err:
            logger.warning("%s left out: %s", where, err)
            report.skipped_budget.append(where)
            continue
        modules.append(export_module(component, path, fit))
        report.modules.append(module_report(component, path, fit, norm, rel))
    if not modules:
        raise ValueError(f"no module changed between {base} and {tuned} (above min_rel_norm={min_rel_norm}): "
                         "nothing to extract")
    write_fitted(layout, modules, models, family.name, out, dtype, report, EXTRACT_METADATA_KEY)
    return report


def check_fit_args(format: str, factor: int | None, rank: int, budget: int | None, budget_per_module: int | None
                   ) -> tuple[Layout, int | None]:
    """(the layout `format` names, the factor to use) for a tool that fits LoKr modules; raises on bad values."""
    layout = layout_of(format)
    if layout is None:
        raise ValueError(f"format={format!r}: unknown; use one of comfyui, kohya, a1111, peft, diffusers, "
                         "lokr_diffusers")
    if rank < 0 or (budget is not None and budget <= 0) or (budget_per_module is not None and budget_per_module <= 0):
        raise ValueError("rank must be >= 0 and budgets positive")
    if budget is not None and budget_per_module is not None:
        raise ValueError("give budget or budget_per_module, not both")
    if layout.name in PEFT_PLANNED:  # PEFT plans a module's split itself, from LyCORIS' default factor
        if factor not in (None, -1):
            raise ValueError(f"format={format!r} holds LyCORIS' default split only (PEFT plans it): pass factor=-1 "
                             "(or leave it out), or write format='comfyui' / 'lokr_diffusers'")
        factor = -1
    return layout, factor


def export_module(component: str, path: str, fit: Fit) -> ExportModule:
    """A fitted module as the writers take it: scale 1 (alpha = the rank a consumer reads)."""
    r = fit.plan.rank or 1
    return ExportModule(component, path, fit.factors, 1.0, fit.plan, fit.plan.weight_shape, None, r, float(r))


def module_report(component: str, path: str, fit: Fit, norm: float, rel: float | None) -> ModuleReport:
    p = fit.plan
    return ModuleReport(component, path, (p.out_l, p.out_k, p.in_m, p.in_n), p.rank2, p.tucker, fit.error, fit.numel,
                        norm, rel)


def write_fitted(layout: Layout, modules: list[ExportModule], components: dict[str, nn.Module], family: str, out: str,
                 dtype: torch.dtype | str | None, report: Report, key: str) -> None:
    """Write the fitted modules in `layout`, the report's summary in the file's metadata under `key`, the whole
    report as JSON beside it."""
    write(layout, ExportJob({"default": modules}, components, family, out, dtype,
                            metadata={key: json.dumps(report.summary())}))
    write_files({report_path(out): text_writer(report.to_json())})
    logger.info("%s", report.table())


def _models(a: Weights, b: Weights, components: Sequence[str] | None
            ) -> tuple[dict[str, nn.Module], families.ModelFamily]:
    """The components to compare, built on meta from base's configs, and their family. Two folders must have the
    same components; with a single-file checkpoint, those both have (its UNet and text encoder). Each compared
    component must have the same tensor shapes in both."""
    have_a, have_b = a.components(), b.components()
    if isinstance(a, FolderWeights) and isinstance(b, FolderWeights) and have_a != have_b:
        raise ValueError(f"base and tuned differ in their components: {sorted(have_a.items())} against "
                         f"{sorted(have_b.items())}; extraction compares two checkpoints of one model")
    built = {c: a.meta_model(c) for c in have_a if c in have_b}
    family = families.of_components(built)
    if family is None:
        raise ValueError(f"{a.root}: a {a.pipeline_class}, which is of no model family this package knows (or "
                         f"{b.root} is of another model)")
    if components is None:
        names = [c for c in (family.denoiser, *family.text_encoders) if c in built]
    else:
        unknown = [c for c in components if c not in built]
        if unknown:
            raise ValueError(f"components {unknown}: not in both base and tuned (both have {sorted(built)})")
        names = list(components)
    for c in names:
        if _shapes(a.meta_model(c)) != _shapes(b.meta_model(c)):
            raise ValueError(f"{c}: base and tuned have different configs (other tensor shapes); extraction compares "
                             "two checkpoints of one model")
    return {c: built[c] for c in names}, family


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
