"""What every writer takes: one `ExportModule` per adapted module, independent of any layout, collected from a
pipeline's LoKr layers (`collect`) or from a file parsed onto meta-device components (`from_entries`), and the
`ExportJob` a writer is given (docs/architecture.md §Data flow: export a file)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as LF
from .. import sharding
from ..formats.names import weight_of
from ..formats.reader import LoadEntry
from ..logs import progress
from ..model import lokr_layers


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


@dataclass(frozen=True)
class ExportJob:
    """One write. `adapters`: {adapter name: its modules} (one adapter, except for our own layout);
    `components`: the models they sit on (a pipeline's, or full-size ones on the meta device for a conversion),
    asked for names, shapes and, where DoRA needs them, base weights; `base`: "sd1" | "sd2" | "sdxl" or the DiT
    family ("flux" | "sd3" | "flux2" | "zimage"); `metadata`: the caller's, over the writer's own."""

    adapters: Mapping[str, list[ExportModule]]
    components: Mapping[str, nn.Module]
    base: str
    path: str
    dtype: torch.dtype | str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    keep_tucker: bool = False
    strict: bool = True

    @property
    def modules(self) -> list[ExportModule]:
        """The modules of the one adapter a consumer layout holds."""
        (modules,) = self.adapters.values()
        return modules

    @property
    def stem(self) -> str:
        """The file name without its extension (kohya's `ss_output_name`)."""
        return os.path.splitext(os.path.basename(self.path))[0]


def collect(components: Mapping[str, nn.Module], adapter_name: str) -> list[ExportModule]:
    """Every module holding `adapter_name`, tensors detached on the CPU (gathered whole under FSDP2: every
    process must call this)."""
    sharding.reshard(components.values())  # a gathered FSDP unit's tensors are views of a buffer its reshard frees
    out: list[ExportModule] = []
    held = [(c, path, layer) for c, model in components.items() for path, layer in lokr_layers(model)
            if adapter_name in layer.plans]
    for component, path, layer in progress(held, desc=f"exporting LoKr {adapter_name!r}"):
        dora = sharding.full(layer.dora_scale[adapter_name]).cpu() if adapter_name in layer.dora_scale else None
        norms = _row_norms(layer, adapter_name) if dora is not None and \
            LF.dora_on_output_axis(dora, layer.weight_shape) else None
        factors = layer.factors(adapter_name)
        rows = layer.rows.get(adapter_name)
        out.append(ExportModule(
            component, path.replace(".base_layer", ""),
            {k: sharding.full(v).cpu() for k, v in factors.items()}, layer.scaling[adapter_name],
            layer.plans[adapter_name], layer.weight_shape, dora, layer.r[adapter_name],
            layer.alpha[adapter_name], norms, rows, layer.origins.get(adapter_name),
            sharding.storage_key(next(iter(factors.values()))) if rows is not None else None))
    if not out:
        have = sorted(adapter_names(components))
        raise ValueError(f"adapter_name {adapter_name!r}: no LoKr adapter of that name here (adapters: {have})")
    return out


def from_entries(entries: Sequence[LoadEntry], components: Mapping[str, nn.Module]) -> list[ExportModule]:
    """The modules of a file parsed onto `components` (formats.reader): no base weights, so no row norms. The
    pieces of one fused original keep sharing one set of factors (`shares`), as a loaded adapter's do. In the
    order `collect` gives a pipeline's (components, then each one's modules), so a refusal names the same module."""
    order = {(c, path): i for i, (c, path) in
             enumerate((c, path) for c, model in components.items() for path, _ in model.named_modules())}
    out = []
    for e in progress(sorted(entries, key=lambda e: order[(e.ref.component, e.ref.path)]), desc="converting LoKr"):
        module = components[e.ref.component].get_submodule(e.ref.path)
        r = e.plan.rank or 1
        shares = id(next(iter(e.factors.values()))) if e.rows is not None else None
        out.append(ExportModule(e.ref.component, e.ref.path, dict(e.factors), e.scale, e.plan,
                                tuple(weight_of(module).shape), e.dora_scale, r,
                                e.alpha if e.alpha is not None else e.scale * r, rows=e.rows, origin=e.origin,
                                shares=shares))
    return out


def adapter_names(components: Mapping[str, nn.Module]) -> set[str]:
    """Every LoKr adapter the components hold."""
    return {a for m in components.values() for _, layer in lokr_layers(m) for a in layer.plans}


def configs_of(modules: list[ExportModule]) -> dict[str, dict[str, Any]]:
    """{component: target_modules, rank_pattern, alpha_pattern} of one adapter's modules (r and alpha as held)."""
    out: dict[str, dict[str, Any]] = {}
    for m in modules:
        c = out.setdefault(m.component, {"target_modules": [], "rank_pattern": {}, "alpha_pattern": {}})
        c["target_modules"].append(m.path)
        c["rank_pattern"][m.path], c["alpha_pattern"][m.path] = m.r, m.alpha
    return out


@torch.no_grad()
def _row_norms(layer: Any, adapter_name: str) -> RowNorms | None:
    """RowNorms of one layer, computed as the layer's DoRA forward does (None on the meta device)."""
    w = layer.base_weight()
    if w.is_meta:
        return None
    factors = {k: sharding.full(v) for k, v in layer.factors(adapter_name).items()}
    delta = LF.delta_weight(factors, layer.weight_shape, layer.scaling[adapter_name],
                            layer.rows.get(adapter_name))
    base, adapted = LF.dora_row_norms(w, delta)
    return RowNorms(base.cpu(), adapted.cpu())
