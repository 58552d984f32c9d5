"""`combine_lokr`: several LoKr (or LoRA) files of one model as one file (docs/tools.md §Combine adapters).

Summed: per module ΔW = Σ w_i · ΔW_i over the files that adapt it, re-expressed as one LoKr by the extractor's fit
(nearest.fit_change: a sum of Kronecker products is in general not one, so the error is measured and reported).
A LoRA file's ΔW is what diffusers loads from it onto the pipeline (files.lora_deltas, which needs `model`).
Lossless: the files kept as separate adapters of our own layout (`format="lokr_diffusers"`), each weight folded into
its adapter's scale; `load_lokr_weights` loads them all, active together.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..export import ExportJob, ExportModule, from_entries, layout_of, write
from ..formats.reader import ParsedFile
from ..logs import progress
from .extract import check_fit_args, export_module, module_report, write_fitted
from .files import entry_delta, holds_lora_only, lora_deltas, place, refuse_dora
from .nearest import BudgetTooSmall, fit_change
from .report import ModuleReport, Report, report_path

logger = logging.getLogger(__name__)

COMBINE_METADATA_KEY = "lokr_diffusers_combine"


def combine_lokr(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 weights: Sequence[float] | None = None, lossless: bool = False,
                 model: str | os.PathLike[str] | None = None, base: str | None = None, format: str = "comfyui",
                 factor: int | None = None, rank: int = 0, decompose_both: bool = False, tucker: bool = False,
                 budget_per_module: int | None = None, dtype: torch.dtype | str | None = None) -> Report:
    """Combine LoKr (or LoRA) files of one model into one file.

    Args:
        sources: the LoKr files (any layout this package reads, one adapter each) and LoRA files (any layout
            diffusers' `load_lora_weights` reads; they need `model`, and are summed only, not kept `lossless`).
        out: the file to write; a JSON report is written beside it (`<out>.json`).
        weights: one strength per file (default 1.0 each).
        lossless: keep the files as separate adapters in our own layout (format must be "lokr_diffusers");
            otherwise their weighted sum per module is fitted as one LoKr (`factor`, `rank`, `decompose_both`,
            `tucker`, `budget_per_module` as for `extract_lokr`) and written in `format`.
        model / base: the model the files are for, as `lokr_to_lora` takes them.
        dtype: the tensors' dtype in the file (default fp32; as read with `lossless`).

    Returns:
        The Report: per module the fit's error against the summed ΔW (0 for `lossless`) and parameters.
    """
    from ..convert import check_output_path

    if len(sources) < 2:
        raise ValueError("give at least two files to combine")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{len(sources)} files and weights {weights}: give one finite weight per file")
    if lossless and format != "lokr_diffusers":
        raise ValueError("lossless=True keeps several adapters, which only format='lokr_diffusers' holds")
    layout, factor = check_fit_args(format, factor, rank, None, budget_per_module)
    out = os.fspath(out)
    check_output_path(out, folder=layout.folder)
    is_lora = [holds_lora_only(s) for s in sources]
    loras = [s for s, lora in zip(sources, is_lora, strict=True) if lora]
    if loras and model is None:
        raise ValueError(f"{os.fspath(loras[0])} is a LoRA file, which diffusers reads onto the pipeline: give the "
                         "model's diffusers folder (model=, --model)")
    if loras and lossless:
        raise ValueError(f"{os.fspath(loras[0])} is a LoRA file: lossless keeps LoKr adapters only; combine without "
                         "lossless (the sum is fitted as one LoKr)")
    lokr = [s for s, lora in zip(sources, is_lora, strict=True) if not lora]
    placed = place(lokr, model, base)
    comps, family = placed.components, placed.family
    options: dict[str, object] = {"sources": [os.fspath(s) for s in sources], "weights": weights,
                                  "lossless": lossless, "factor": factor, "rank": rank,
                                  "budget_per_module": budget_per_module}
    report = Report("combine", out, family.name, options=options)
    if lossless:
        return _lossless(sources, placed.parsed, weights, comps, family.name, out, dtype, report)
    for src, parsed in zip(lokr, placed.parsed, strict=True):
        refuse_dora(src, parsed.entries, "DoRA does not add up (its magnitude normalises W + ΔW): combine with "
                    "lossless=True (--lossless), which keeps each file's adapter")
    lokr_weights = [w for w, lora in zip(weights, is_lora, strict=True) if not lora]
    deltas = _summed(placed.parsed, lokr_weights, comps)
    if loras:
        assert model is not None
        lora_weights = [w for w, lora in zip(weights, is_lora, strict=True) if lora]
        _add_lora(deltas, lora_deltas(model, loras), lora_weights, comps, loras)
    modules = []
    for (component, path), delta in progress(list(deltas.items()), desc="combining LoKr",
                                             work=sum(d.numel() for d in deltas.values()) * 16):
        if not torch.isfinite(delta).all():
            raise ValueError(f"{component}.{path}: the summed ΔW has NaN or inf values; nothing written")
        norm = float(delta.norm())
        if norm == 0:
            report.skipped_unchanged += 1
            continue
        try:
            fit = fit_change(delta, factor, rank, decompose_both, tucker, budget_per_module)
        except BudgetTooSmall as err:
            logger.warning("%s.%s left out: %s", component, path, err)
            report.skipped_budget.append(f"{component}.{path}")
            continue
        modules.append(export_module(component, path, fit))
        report.modules.append(module_report(component, path, fit, norm, None))
    if not modules:
        raise ValueError("the weighted files cancel out in every module: nothing to write")
    write_fitted(layout, modules, comps, family.name, out, dtype, report, COMBINE_METADATA_KEY)
    return report


def _summed(parsed: Sequence[ParsedFile], weights: Sequence[float], comps: dict[str, nn.Module]
            ) -> dict[tuple[str, str], Tensor]:
    """{(component, path): Σ w_i · ΔW_i} over the modules any file adapts, in the first file's order."""
    out: dict[tuple[str, str], Tensor] = {}
    for p, w in zip(parsed, weights, strict=True):
        for e in p.entries:
            key = (e.ref.component, e.ref.path)
            d = entry_delta(e, comps) * w
            out[key] = out[key] + d if key in out else d
    return out


def _add_lora(deltas: dict[tuple[str, str], Tensor], loras: Sequence[dict[tuple[str, str], Tensor]],
              weights: Sequence[float], comps: dict[str, nn.Module], sources: Sequence[str | os.PathLike[str]]) -> None:
    """Add each LoRA file's weighted ΔW to `deltas` in place, its shapes checked against the model's."""
    from ..formats.names import weight_of

    for src, lora, w in zip(sources, loras, weights, strict=True):
        for (component, path), d in lora.items():
            shape = tuple(weight_of(comps[component].get_submodule(path)).shape)
            if tuple(d.shape) != shape:
                raise ValueError(f"{os.fspath(src)}: {component}.{path} ΔW {tuple(d.shape)} for a weight of {shape}")
            key = (component, path)
            deltas[key] = deltas[key] + d * w if key in deltas else d * w


def _lossless(sources: Sequence[str | os.PathLike[str]], parsed: Sequence[ParsedFile], weights: Sequence[float],
              comps: dict[str, nn.Module],
              family: str, out: str, dtype: torch.dtype | str | None, report: Report) -> Report:
    """Each file as its own adapter (named by its file's stem), its weight folded into every module's scale."""
    from ..atomic import text_writer, write_files

    adapters: dict[str, list[ExportModule]] = {}
    for src, p, w in zip(sources, parsed, weights, strict=True):
        if w != 1.0:
            refuse_dora(src, p.entries, f"a DoRA adapter cannot take the weight {w:g} into its scale (DoRA's "
                        "magnitude normalises W + ΔW); give it weight 1")
        name = _unique(os.path.splitext(os.path.basename(os.fspath(src).rstrip("/\\")))[0], adapters)
        modules = [replace(m, scale=m.scale * w) for m in from_entries(p.entries, comps)]
        adapters[name] = modules
        for m in modules:
            n = sum(t.numel() for t in m.factors.values())
            report.modules.append(ModuleReport(m.component, f"{m.path} ({name})", (m.plan.out_l, m.plan.out_k,
                                               m.plan.in_m, m.plan.in_n), m.plan.rank2, m.plan.tucker, 0.0, n,
                                               0.0, None))
    layout = layout_of("lokr_diffusers")
    assert layout is not None
    write(layout, ExportJob(adapters, comps, family, out, dtype,
                            metadata={COMBINE_METADATA_KEY: json.dumps(report.summary())}))
    write_files({report_path(out): text_writer(report.to_json())})
    return report


def _unique(name: str, taken: dict[str, list[ExportModule]]) -> str:
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    return out
