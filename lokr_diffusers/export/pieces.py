"""The row pieces of a DiT adapter regrouped for the consumer layouts (docs/formats.md §Export of DiT adapters).

An adapter loaded from a file naming a fused original (`qkv`, Flux.1's `linear1`, a swapped adaLN projection) is
held as row pieces by the diffusers Linears of its rows, sharing one set of factors. A consumer writes it back as
the original (`fused_module`, ComfyUI and diffusers' fused `to_qkv`), or per Linear where each piece's rows lie
on W1's block edges (`own_module`: its ΔW is then kron(W1's rows, W2), exact); anything else is refused, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .. import families
from .. import functional as LF
from ..formats.dit import DitNameMap, Target, diffusers_fused_name, dit_name_map
from ..formats.fused import layer_rows
from .modules import ExportModule, RowNorms

_SEPARATE_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass
class Sorted:
    """A transformer's modules of one adapter: `groups`, every row piece of one original (in the original's row
    order); `partial`, pieces whose group is not all here; `singles`, modules holding their own weight."""

    groups: list[tuple[Target, list[ExportModule]]] = field(default_factory=list)
    partial: list[ExportModule] = field(default_factory=list)
    singles: list[ExportModule] = field(default_factory=list)


def sort_modules(modules: list[ExportModule], nm: DitNameMap) -> Sorted:
    """The transformer's modules sorted into whole groups of pieces, partial groups and single modules."""
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


def _place(height: int, parts: list[tuple[LF.Rows, Tensor]]) -> Tensor:
    """(height,): each layer's values (in its own row order) put back at its rows of the fused weight."""
    out = torch.zeros(height, dtype=parts[0][1].dtype)
    for rows, values in parts:
        offset = 0
        for a, b in rows.pieces:
            out[a:b] = values[offset:offset + b - a]
            offset += b - a
    return out


def _base_weight(module: nn.Module) -> Tensor:
    """The module's weight without fused adapters: a LoKr layer's `base_weight()`, else its own weight (a plain
    Linear of the components a file is converted on)."""
    base_weight = getattr(module, "base_weight", None)
    w = base_weight() if callable(base_weight) else module.weight
    assert isinstance(w, Tensor)
    return w


@torch.no_grad()
def _input_axis_dora(pieces: list[ExportModule], transformer: nn.Module) -> Tensor:
    """The fused module's (1, in) magnitude m, from a piece's m_p = m · (‖W_p + ΔW_p‖ + eps) / (‖W + ΔW‖ + eps)
    (formats/fused.py split_dora, column norms), which needs the base weights."""
    eps = torch.finfo(torch.float32).eps
    col_sq: list[Tensor] = []
    for p in pieces:
        w = _base_weight(transformer.get_submodule(p.path))
        if w.is_meta:
            raise ValueError(f"{p.component}.{p.path}: its input-axis DoRA on the fused {p.origin} is put back "
                             "together from the base weights, which are on the meta device here; load the file "
                             "into a pipeline of its model and save it from there, or write format='lokr_diffusers'")
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


def off_edges(m: ExportModule, fmt: str, why: str) -> str:
    """The refusal of a piece off W1's block edges, naming it and what to write instead."""
    return (f"{m.component}.{m.path} holds rows {m.rows.pieces if m.rows else ()} of the fused module {m.origin!r}, "
            f"off W1's block edges (blocks of {m.plan.out_k} rows, W2's height): {why}; export format 'comfyui' or "
            f"'lokr_diffusers' for it (format {fmt!r})")


def consumer_modules(modules: list[ExportModule], components: Mapping[str, nn.Module], family: str,
                     fmt: str) -> list[ExportModule]:
    """The modules as diffusers' paths hold them: a fused group on diffusers' fused qkv Linear (`diffusers` only,
    where the family's table says diffusers can fuse), else per Linear on W1's block edges; refused otherwise."""
    record = families.get(family)
    fusable = record.originals is not None and record.originals.fusable
    transformer: Any = components["transformer"]
    nm = dit_name_map(transformer)
    dit = sort_modules([m for m in modules if m.component == "transformer"], nm)
    out = [m for m in modules if m.component != "transformer"] + dit.singles
    fused_names: list[str] = []
    for target, pieces in dit.groups:
        alias = diffusers_fused_name(target, nm.linears) if fmt == "diffusers" and fusable else None
        if alias is not None:
            out.append(fused_module(target, pieces, alias, transformer))
            fused_names.append(alias)
            continue
        own = [own_module(p) for p in pieces]
        for p, o in zip(pieces, own, strict=True):
            if o is None:
                raise ValueError(off_edges(p, fmt, "no diffusers Linear holds that module's rows and PEFT's LoKr on "
                                                   "one Linear cannot hold part of a Kronecker product's rows"))
        out += [o for o in own if o is not None]
    for p in dit.partial:
        own_p = own_module(p)
        if own_p is None:
            raise ValueError(off_edges(p, fmt, "its other pieces are not in this adapter"))
        out.append(own_p)
    separate = [m.path for m in dit.singles if m.path.rpartition(".")[2] in _SEPARATE_QKV]
    if record.diffusers_lokr and fused_names and separate:
        raise ValueError(f"this adapter has a fused qkv ({fused_names[0]}, as diffusers loads it: it fuses the "
                         f"model's projections first) and adapters on separate projections ({separate[0]}), which "
                         "diffusers' fused attention would no longer call; export format 'comfyui' or "
                         "'lokr_diffusers' instead")
    return out
