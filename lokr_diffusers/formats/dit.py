"""Name maps for the DiT transformers: Flux.1, SD3.x, Flux.2 / Klein and Z-Image.

Built forward from the model's own Linears and its family's original-name table (lokr_diffusers/families/, one
module per family); incoming names are
looked up, never parsed (`to_q`, `add_q_proj`, `adaLN_modulation` contain `_`). Two kinds of target:

- a diffusers module path `p` (one Linear, its own rows), named in the diffusers-path layouts;
- an original name `o` (BFL / Stability / Tongyi layout), whose rows may be pieces of several diffusers
  Linears: `double_blocks.0.img_attn.qkv` is rows [0, d) of attn.to_q, [d, 2d) of to_k, [2d, 3d) of to_v.

The layouts (docs/formats.md §Key layouts), with `u(x)` = x with dots turned into underscores:

| layout    | module name                | who writes it                                          |
|-----------|----------------------------|--------------------------------------------------------|
| kohya     | lora_unet_{u(o)}           | kohya sd-scripts (Flux.1), LyCORIS' kohya wrapper      |
| comfyui   | diffusion_model.{o}        | ComfyUI, BFL, ai-toolkit for Flux.2                    |
| aitoolkit | diffusion_model.{p}        | ai-toolkit (Z-Image, ...)                              |
| lycoris   | lycoris_{u(p)}             | SimpleTuner (LyCORIS standalone)                       |
| diffusers | transformer.{p}            | diffusers / PEFT                                       |
| onetrainer| lora_transformer_{u(p)}    | OneTrainer (Flux.1, SD3; ComfyUI's model_lora_keys_unet) |

The adaptable convs of a family (SD3's patch embedding `x_embedder.proj` = diffusers' `pos_embed.proj`) are
renames named in the original layouts too (`DitNameMap.convs`); everything else here is about Linears. ComfyUI's
names for rows of an original (`single_blocks.N.linear1_qkv`: q, k, v of Flux.1's linear1) are read in the
comfyui layout only (`DitNameMap.row_names`); they cover no Linear in `covering`, which stays the originals'.
A family whose originals are spelt two ways (HunyuanVideo: Tencent's checkpoint names and ComfyUI's internal
Flux-style names, `OriginalTable.aliases`) has the second spelling named in both original layouts too
(`DitNameMap.aliases`), for the same Target; `comfyui_name` says which spelling a ComfyUI file takes.

Where the original and the diffusers path coincide (most of Z-Image), `diffusion_model.x` names one
module in both layouts and is kept under the first (comfyui). After diffusers' `fuse_qkv_projections()`
the fused `to_qkv` / `to_added_qkv` take the place of to_q/k/v (which the processors then skip): a `qkv`
original maps 1:1 onto them, and to_q/k/v are left without an original name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from torch import nn

from .. import families
from ..families import ModelFamily, OriginalTable, Rule
from ..families.tables import alias_of

logger = logging.getLogger(__name__)

# What diffusers' Attention.fuse_projections() adds: (separate leaves, in row order) -> the fused Linear.
FUSED_BY_DIFFUSERS: dict[tuple[str, ...], str] = {
    ("to_q", "to_k", "to_v"): "to_qkv",
    ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv",
    ("to_k", "to_v"): "to_kv",  # Wan's cross-attention (its query stays to_q)
    ("add_k_proj", "add_v_proj"): "to_added_kv",  # Wan 2.1 I2V's image keys and values
}

# (layout, template): {p} the name, {u} the name with dots turned into underscores.
ORIGINAL_LAYOUTS: tuple[tuple[str, str], ...] = (("comfyui", "diffusion_model.{p}"), ("kohya", "lora_unet_{u}"))
DIFFUSERS_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("aitoolkit", "diffusion_model.{p}"), ("lycoris", "lycoris_{u}"), ("diffusers", "transformer.{p}"),
    ("onetrainer", "lora_transformer_{u}"))
LAYOUTS: tuple[str, ...] = tuple(name for name, _ in ORIGINAL_LAYOUTS + DIFFUSERS_LAYOUTS)
DIFFUSERS_FUSED_TEMPLATE = "transformer.{p}"  # to_qkv / to_added_qkv of an unfused attention (diffusers_fused_name)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a target's weight are rows [src_start, src_start + stop - start) of `path`."""

    path: str
    start: int
    stop: int
    src_start: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Target:
    """What one module name in a file addresses: a weight of (out_features, in_features) made of pieces."""

    name: str  # the original name, or the diffusers path for a diffusers-path layout
    in_features: int
    pieces: tuple[Piece, ...]  # in row order, covering [0, out_features) once

    @property
    def out_features(self) -> int:
        return self.pieces[-1].stop

    @property
    def is_swap(self) -> bool:
        """One diffusers Linear's rows in another order (an adaLN projection's (shift, scale) halves)."""
        return len(self.pieces) > 1 and len({p.path for p in self.pieces}) == 1

    @property
    def is_rename(self) -> bool:
        """One diffusers Linear, all its rows in their own order."""
        (p, *rest) = self.pieces
        return not rest and p.start == 0 and p.src_start == 0


@dataclass
class DitNameMap:
    """Every name of every Linear of one DiT transformer. Build it with `dit_name_map(model)`."""

    family: str
    linears: dict[str, tuple[int, int]]  # diffusers path -> (out_features, in_features), every Linear
    originals: dict[str, Target]  # original name -> its target
    names: dict[str, tuple[str, Target]] = field(default_factory=dict)  # file module name -> (layout, target)
    ambiguous: set[str] = field(default_factory=set)
    covering: dict[str, str] = field(default_factory=dict)  # diffusers path -> the original holding its rows
    convs: dict[str, Target] = field(default_factory=dict)  # original -> its conv (a rename; in_features: in / groups)
    row_names: dict[str, Target] = field(default_factory=dict)  # ComfyUI's name for rows of an original -> them
    not_called: dict[str, str] = field(default_factory=dict)  # Linears the forward never calls -> why (_not_called)
    aliases: dict[str, str] = field(default_factory=dict)  # original -> its other spelling (OriginalTable.aliases)
    comfyui_aliases: bool = False  # the other spelling is ComfyUI's internal name (what format="comfyui" writes)

    @property
    def unnamed(self) -> list[str]:
        """Linears no original name covers (to_q/k/v beside a diffusers-fused to_qkv, unknown modules)."""
        return [p for p in self.linears if p not in self.covering]

    def target(self, name: str) -> Target | None:
        """The Target an original name or a ComfyUI row name (`single_blocks.0.linear1_qkv`) stands for."""
        return self.originals.get(name) or self.row_names.get(name)

    def row_name_of(self, path: str) -> str | None:
        """The ComfyUI row name that is exactly the Linear `path` (Flux.1's fused to_qkv), or None."""
        return next((n for n, t in self.row_names.items() if t.is_rename and t.pieces[0].path == path), None)

    def comfyui_name(self, original: str) -> str:
        """The spelling of `original` ComfyUI's generic key map takes (`diffusion_model.<it>`): its ComfyUI alias
        where the table's aliases are ComfyUI's, else the original itself."""
        return self.aliases.get(original, original) if self.comfyui_aliases else original

    def lookup(self, name: str) -> tuple[str, Target] | None:
        """(layout, target) for a module name as a file gives it (no `.lokr_w1` suffix), or None."""
        if name in self.ambiguous:
            raise ValueError(f"module name {name!r} fits more than one module of this {self.family} transformer")
        return self.names.get(name)

    def names_of(self, path: str) -> dict[str, str]:
        """layout -> the module name under which a file reaches the diffusers Linear `path` (its own name
        in the diffusers-path layouts; in the original ones, the original that holds its rows)."""
        out = {layout: _form(t, path) for layout, t in DIFFUSERS_LAYOUTS}
        if path in self.covering:
            out.update({layout: _form(t, self.covering[path]) for layout, t in ORIGINAL_LAYOUTS})
        return out


def _u(name: str) -> str:
    return name.replace(".", "_")


def _form(template: str, name: str) -> str:
    return template.format(p=name, u=_u(name))


def iter_linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Linear]]:
    """(path, Linear) for every Linear, at its logical path: a wrapper holding a `base_layer` (a LoKr or
    PEFT layer) is seen through and its own inner modules (lora_A, ...) are not listed."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        inner = child
        while not isinstance(inner, nn.Linear) and isinstance(getattr(inner, "base_layer", None), nn.Module):
            inner = getattr(inner, "base_layer")  # noqa: B009  (typed as Module, not Tensor | Module)
        if isinstance(inner, nn.Linear):
            yield path, inner
        elif inner is child:
            yield from iter_linears(child, path)


def _indices(rule: Rule, config: Mapping[str, object]) -> list[int | None]:
    if rule.blocks is None:
        return [None]
    n = config[rule.blocks]
    assert isinstance(n, int), f"config[{rule.blocks!r}] = {n!r} is not a block count"
    keep = {"all": range(n), "last": range(n - 1, n), "not_last": range(n - 1)}[rule.only]
    return list(keep)


def _fuse(parts: list[str], model: nn.Module, linears: Mapping[str, tuple[int, int]]) -> list[str]:
    """Replace to_q/k/v (add_q/k/v_proj) by diffusers' fused to_qkv (to_added_qkv) where the attention
    module has fused its projections: the processor then calls only the fused Linear."""
    out = list(parts)
    for leaves, fused in FUSED_BY_DIFFUSERS.items():
        for j in range(len(out) - len(leaves) + 1):
            parent = out[j].rpartition(".")[0]
            if out[j:j + len(leaves)] != [f"{parent}.{leaf}" for leaf in leaves]:
                continue
            if getattr(model.get_submodule(parent), "fused_projections", False) and f"{parent}.{fused}" in linears:
                out[j:j + len(leaves)] = [f"{parent}.{fused}"]
                break
    return out


def _pieces(name: str, parts: list[str], swap: bool, linears: Mapping[str, tuple[int, int]]) -> Target:
    ins = {linears[p][1] for p in parts}
    if len(ins) != 1:
        raise ValueError(f"{name}: its diffusers parts {parts} differ in in_features {sorted(ins)}")
    if swap:  # original (shift, scale) rows = diffusers (scale, shift) rows; `(h,)` halves of one Linear
        (path,) = parts
        h, odd = divmod(linears[path][0], 2)
        if odd:
            raise ValueError(f"{name}: {path} has an odd number of rows; it cannot hold (shift, scale)")
        return Target(name, ins.pop(), (Piece(path, 0, h, h), Piece(path, h, 2 * h, 0)))
    pieces, start = [], 0
    for path in parts:  # row order = the order of the parts in the table
        pieces.append(Piece(path, start, start + linears[path][0]))
        start += linears[path][0]
    return Target(name, ins.pop(), tuple(pieces))


def _originals(family: ModelFamily, table: OriginalTable, model: nn.Module, linears: Mapping[str, tuple[int, int]]
               ) -> dict[str, Target]:
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"{type(model).__name__} has no diffusers config mapping")
    out: dict[str, Target] = {}
    for rule in table.rules:
        for i in _indices(rule, config):
            name = rule.original.format(i=i)
            parts = [p.format(i=i) for p in rule.parts]
            present = [p in linears for p in parts]
            if not any(present):
                continue  # the model does not have this module (no guidance embedder, SD3's last block, ...)
            if not all(present):
                missing = [p for p in parts if p not in linears]
                raise ValueError(f"{name}: the {family.name} transformer lacks {missing} of {parts}")
            if table.fusable:
                parts = _fuse(parts, model, linears)
            out[name] = _pieces(name, parts, rule.swap, linears)
    if table.same_names:  # every Linear no rule covers keeps its diffusers path as its original name
        covered = {p.path for t in out.values() for p in t.pieces}
        uncalled = {} if table.fusable else _not_called(model, linears, False)  # fused Linears never called: no name
        for path, (rows, in_) in linears.items():
            if path not in covered and path not in out and path not in uncalled:
                out[path] = Target(path, in_, (Piece(path, 0, rows),))
    return out


SEPARATE_CALLED = ("its attention runs the fused projection made by fuse_qkv_projections() and never calls it; load "
                   "the file before fusing (or after unfuse_qkv_projections())")
FUSED_UNCALLED = ("fuse_qkv_projections() made it, but this model's attention processor never calls it (it keeps "
                  "calling to_q, to_k, to_v): name those")


def _not_called(model: nn.Module, linears: Mapping[str, tuple[int, int]], fusable: bool) -> dict[str, str]:
    """The Linears of attentions whose `fuse_qkv_projections()` ran that diffusers' forward never calls, with why:
    where the processor uses the fused Linear (a fusable table), the separate to_q / to_k / to_v (add_*_proj, Wan's
    cross-attention to_k / to_v) it replaced; where it does not (Z-Image, LTX, Qwen-Image 2.1), the fused one."""
    out: dict[str, str] = {}
    for path in linears:
        parent, _, leaf = path.rpartition(".")
        if not parent or not getattr(model.get_submodule(parent), "fused_projections", False):
            continue
        for leaves, fused in FUSED_BY_DIFFUSERS.items():
            if fusable and leaf in leaves and f"{parent}.{fused}" in linears:
                out[path] = SEPARATE_CALLED
            elif not fusable and leaf == fused:
                out[path] = FUSED_UNCALLED
    return out


def diffusers_fused_name(target: Target, linears: Mapping[str, tuple[int, int]]) -> str | None:
    """`<attention>.to_qkv` (`.to_added_qkv`) for an original `qkv` made of an unfused attention's whole to_q,
    to_k, to_v (add_q/k/v_proj), in that order: the Linear diffusers' `fuse_qkv_projections()` would make. diffusers'
    Flux.2 LoKr loader puts a fused qkv adapter there (fusing the model's projections first); we read the name
    as the same rows of to_q, to_k, to_v (docs/formats.md §Export of DiT adapters). None for anything else."""
    paths = tuple(p.path for p in target.pieces)
    parent = paths[0].rpartition(".")[0]
    whole = all(p.src_start == 0 and p.rows == linears[p.path][0] for p in target.pieces)
    for leaves, fused in FUSED_BY_DIFFUSERS.items():
        if whole and paths == tuple(f"{parent}.{leaf}" for leaf in leaves) and f"{parent}.{fused}" not in linears:
            return f"{parent}.{fused}"
    return None


def _convs(table: OriginalTable, model: nn.Module) -> dict[str, Target]:
    """original -> Target for the family's adaptable convs the model has (seen through a LoKr / PEFT wrapper):
    one piece, all the conv's output channels."""
    out: dict[str, Target] = {}
    for original, path in table.convs:
        try:
            conv = model.get_submodule(path)
        except AttributeError:
            continue  # not in this model
        while not isinstance(conv, nn.Conv2d) and isinstance(getattr(conv, "base_layer", None), nn.Module):
            conv = getattr(conv, "base_layer")  # noqa: B009  (typed as Module, not Tensor | Module)
        if isinstance(conv, nn.Conv2d):
            out[original] = Target(original, conv.in_channels // conv.groups, (Piece(path, 0, conv.out_channels),))
    return out


def _head(name: str, target: Target, stop: int) -> Target:
    """Rows [0, stop) of `target` as a Target of their own, its pieces cut at `stop`."""
    pieces = tuple(Piece(p.path, p.start, min(p.stop, stop), p.src_start) for p in target.pieces if p.start < stop)
    if not pieces or pieces[-1].stop != stop:
        raise ValueError(f"{name}: rows [0, {stop}) do not fit {target.name} ({target.out_features} rows)")
    return Target(name, target.in_features, pieces)


def _row_names(table: OriginalTable, model: nn.Module, originals: Mapping[str, Target]) -> dict[str, Target]:
    """ComfyUI's row names (families.RowName) -> their rows, for the originals the model has."""
    config = getattr(model, "config", None)
    out: dict[str, Target] = {}
    for rn in table.row_names:
        count = config[rn.blocks] if isinstance(config, Mapping) else 0
        for i in range(count if isinstance(count, int) else 0):
            original = originals.get(rn.original.format(i=i))
            if original is not None:
                name = rn.name.format(i=i)
                out[name] = _head(name, original, rn.height * original.in_features)
    return out


def _add(names: DitNameMap, layout: str, name: str, target: Target) -> None:
    if name in names.names and names.names[name][1] != target:
        names.ambiguous.add(name)
    names.names.setdefault(name, (layout, target))


def dit_name_map(model: nn.Module) -> DitNameMap:
    """The name map of a diffusers Flux / Flux.2 / SD3 / Z-Image transformer (any size, any device): its Linears
    and its adaptable convs.

    Raises:
        TypeError: not the transformer of a family with an original-name table (or no config).
        ValueError: the model's Linears do not fit the table (a part missing, in_features that differ).
    """
    family = families.of_model(model)
    if family is None or family.originals is None:
        known = sorted(f.denoiser_class for f in families.FAMILIES.values() if f.originals is not None)
        raise TypeError(f"{type(model).__name__} is not one of {known}")
    table = family.originals
    linears = {p: (m.out_features, m.in_features) for p, m in iter_linears(model)}
    result = DitNameMap(family.name, linears, _originals(family, table, model, linears))
    result.row_names = _row_names(table, model, result.originals)
    result.not_called = _not_called(model, linears, table.fusable)
    for original, target in result.originals.items():
        for piece in target.pieces:
            result.covering[piece.path] = original
        for layout, template in ORIGINAL_LAYOUTS:
            _add(result, layout, _form(template, original), target)
    result.comfyui_aliases = table.comfyui_aliases
    for original, target in result.originals.items():  # the second spelling: the original layouts only
        alias = alias_of(table, original)
        if alias is not None:
            result.aliases[original] = alias
            for layout, template in ORIGINAL_LAYOUTS:
                _add(result, layout, _form(template, alias), target)
    for row_name, target in result.row_names.items():  # ComfyUI's own key: its layout only
        _add(result, ORIGINAL_LAYOUTS[0][0], _form(ORIGINAL_LAYOUTS[0][1], row_name), target)
    for target in (*result.originals.values(), *result.row_names.values()):
        fused = diffusers_fused_name(target, linears) if table.fusable else None
        if fused is not None:  # diffusers' name for the qkv it would fuse (read only in the diffusers layout)
            _add(result, "diffusers", _form(DIFFUSERS_FUSED_TEMPLATE, fused), target)
    result.convs = _convs(table, model)
    for original, target in result.convs.items():  # diffusers-path names: names.py, as for any module
        for layout, template in ORIGINAL_LAYOUTS:
            _add(result, layout, _form(template, original), target)
    for path, (out, in_) in linears.items():
        own = Target(path, in_, (Piece(path, 0, out),))
        for layout, template in DIFFUSERS_LAYOUTS:
            _add(result, layout, _form(template, path), own)
    if result.unnamed:
        logger.debug("%d %s Linears have no original name: %s", len(result.unnamed), family.name, result.unnamed)
    return result
