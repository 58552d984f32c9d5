"""A DiT transformer's whole state under its original keys: the single-file layout (BFL's `flux1-dev.safetensors`,
Stability's SD3 transformer, Tongyi's Z-Image, ...) that ComfyUI loads as a diffusion model and diffusers'
`from_single_file` converts back to the diffusers model.

Built from the family's original-name table (lokr_diffusers/families/): each rule's original weight and bias are the
rows of its diffusers Linears in the table's order (a fused `qkv` the rows of to_q, to_k, to_v; an adaLN projection
its two halves swapped back to (shift, scale)), each conv of `convs` is renamed, and every other tensor (a norm's
scale, a learned table) is renamed by the table's `params` or, where `params_kept`, keeps its key. A family whose
table does not say it covers the whole state (`single_file`) is refused, as is a model with a tensor no rule names
(a fused `to_qkv` made by `fuse_qkv_projections()`).

The plan (`original_plan`) is data: original key -> the diffusers slices it is made of, so that the tests can run
diffusers' converters on it without the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import families
from .dit import dit_name_map


@dataclass(frozen=True)
class Slice:
    """Rows [start, start + rows) of the diffusers state tensor `key` (rows None: all of it)."""

    key: str
    start: int = 0
    rows: int | None = None


Plan = dict[str, tuple[Slice, ...]]  # original key -> its slices, concatenated along the rows


def original_plan(model: nn.Module, keys: list[str] | None = None) -> Plan:
    """Where each original key of `model`'s single file comes from. `keys`: the diffusers state keys (default the
    model's `state_dict()` keys; a meta model is fine).

    Raises:
        ValueError: the family has no single-file layout here, or a tensor has no original name.
    """
    family = families.of_model(model)
    table = family.originals if family is not None else None
    if family is None or table is None or not table.single_file:
        title = family.title if family is not None else type(model).__name__
        raise ValueError(f"{title}: no original single-file layout is written for this model (diffusers has no "
                         "converter for it, or the name tables do not cover its whole state); use the diffusers folder")
    keys = list(model.state_dict()) if keys is None else keys
    present = set(keys)
    names = dit_name_map(model)
    plan: Plan = {}
    for original, target in names.originals.items():
        for suffix in ("weight", "bias"):
            parts = [f"{p.path}.{suffix}" for p in target.pieces]
            found = [k in present for k in parts]
            if any(found) and not all(found):
                raise ValueError(f"{original}.{suffix}: the {family.title} transformer has only some of {parts}")
            if all(found):
                plan[f"{original}.{suffix}"] = tuple(Slice(k, p.src_start, p.rows)
                                                     for k, p in zip(parts, target.pieces, strict=True))
    for original, path in table.convs:
        for suffix in ("weight", "bias"):
            if f"{path}.{suffix}" in present:
                plan[f"{original}.{suffix}"] = (Slice(f"{path}.{suffix}"),)
    used = {s.key for slices in plan.values() for s in slices}
    rules = [(re.compile(pattern), template) for pattern, template in table.params]
    for key in keys:
        if key in used:
            continue
        if key.rpartition(".")[0] in names.linears:
            raise ValueError(f"{key}: a Linear no original name covers (a fused to_qkv made by fuse_qkv_projections()?"
                             " unfuse_qkv_projections() first)")
        renamed = next((m.expand(t) for r, t in rules if (m := r.fullmatch(key))), key if table.params_kept else None)
        if renamed is None:
            raise ValueError(f"{key}: no original name for this tensor of the {family.title} transformer")
        if renamed in plan:
            raise ValueError(f"{key}: its original name {renamed} is already taken")
        plan[renamed] = (Slice(key),)
    return plan


def original_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`model`'s state (or `state`, keyed as the model's) under the original keys, each tensor contiguous."""
    state = model.state_dict() if state is None else state
    out: dict[str, Tensor] = {}
    for original, slices in original_plan(model, list(state)).items():
        parts = [state[s.key] if s.rows is None else state[s.key][s.start:s.start + s.rows] for s in slices]
        out[original] = (parts[0] if len(parts) == 1 else torch.cat(parts)).detach().contiguous()
    return out
