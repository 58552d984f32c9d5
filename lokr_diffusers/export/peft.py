"""PEFT's saved layout (`format="peft"`): a folder of `adapter_model.safetensors` (`base_model.model.<path>.lokr_*`)
and an `adapter_config.json` whose rank / alpha patterns make PEFT plan these very shapes and scales; one
sub-folder per component when several hold the adapter (docs/formats.md §Key layouts, §Export of DiT adapters).
A DiT adapter's row pieces are written per Linear where they lie on W1's block edges (pieces.consumer_modules)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import functional as LF
from ..atomic import Writer, safetensors_writer, text_writer, write_files
from .encode import cast
from .modules import ExportJob, ExportModule
from .pieces import consumer_modules


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


def save_sd(job: ExportJob) -> str:
    """The writer of the registry for the SD families."""
    return write_peft(job.modules, job.path, job.dtype, job.metadata)


def save_dit(job: ExportJob) -> str:
    """The writer of the registry for the DiT families: row pieces per Linear (refused off W1's block edges)."""
    return write_peft(consumer_modules(job.modules, job.components, job.base, "peft"), job.path, job.dtype,
                      job.metadata)
