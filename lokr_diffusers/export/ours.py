"""Our lossless layout (`format="lokr_diffusers"`; read by formats/ours.py): every adapter, its exact scale, r /
alpha, Tucker, DoRA as trained, and the row pieces of a fused module, for every family alike
(docs/formats.md §Key layouts, §DiT models)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor

from ..formats.fused import SHARED_KEY, rows_to_tensors
from ..formats.ours import OURS_FORMAT, OURS_PREFIX
from .encode import write_one
from .modules import ExportJob, ExportModule, configs_of


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
            "adapters": json.dumps({a: configs_of(ms) for a, ms in per_adapter.items()})}
    if shared:
        meta[SHARED_KEY] = json.dumps(shared)
    return sd, meta


def save(job: ExportJob) -> str:
    """The writer of the registry, every family alike."""
    sd, meta = to_ours(job.adapters)
    return write_one(job, sd, meta)
