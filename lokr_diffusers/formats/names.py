"""Every name a LoKr file may give a pipeline module, built forward from the pipeline's own modules.

No incoming name is ever rewritten (`_` -> `.` guessing breaks on `to_q`, `proj_in`, ...): we list,
for each adaptable module of each component, the names it has in each layout, and look incoming
names up. The layouts (docs/formats.md §Key layouts, §DiT models), as templates over a module's diffusers
path `p`, its ldm path `l` (UNet only), and `u(x)` = x with dots turned into underscores:

| layout    | unet                               | transformer (formats/dit.py) | text encoders     |
|-----------|------------------------------------|------------------------------|-------------------|
| kohya     | lora_unet_{u(p)}, lora_unet_{u(l)} | lora_unet_{u(original)} (*) | lora_te*_ ...     |
| lycoris   | lycoris_{u(p)} (SimpleTuner)       | lycoris_{u(p)}               |                   |
| diffusers | unet.{p}                           | transformer.{p}              | text_encoder*.{p} |
| comfyui   | diffusion_model.{l}                | diffusion_model.{original}   | text_encoders...  |
| aitoolkit |                                    | diffusion_model.{p}          |                   |
| onetrainer|                                    | lora_transformer_{u(p)}      |                   |
(*) A transformer no family names (formats/dit.py has no table for it): lora_unet_{u(p)}, its own paths.
The text encoders' names per tool are in formats/text_encoders.py. An original DiT name may be a fused
weight (`qkv`, Flux.1's `linear1`): it resolves to a `FusedRef`, rows of several modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from .. import families
from ..adaptable import AdaptedModule
from .dit import DIFFUSERS_LAYOUTS, Target, dit_name_map
from .text_encoders import kind_of, te_forms

logger = logging.getLogger(__name__)

# The pipeline components LoKr adapts (the one list: pipeline.py, loader.py, io.py, scaling.py use it)
# transformer_2: Wan 2.2 A14B's second (low-noise) expert, of the same class as `transformer`; a file names one
# expert's modules under `transformer.`, loaded into the second with load_into_transformer_2=True (diffusers' rule)
COMPONENTS: tuple[str, ...] = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2",
                               "text_encoder_3")
TEXT_ENCODERS: tuple[str, ...] = tuple(c for c in COMPONENTS if c.startswith("text_encoder"))
ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class ModuleRef:
    """A module slot: component name and its path there (through any LoKr / PEFT wrapper)."""

    component: str
    path: str


@dataclass(frozen=True)
class FusedRef:
    """An original module whose weight is rows of several modules of `component` (a fused qkv or Flux.1
    linear1 over diffusers' to_q / to_k / to_v / proj_mlp), or of one module in another row order (an adaLN
    projection's swapped halves): `target.pieces` say which rows go where (formats/dit.py)."""

    component: str
    target: Target


def iter_adaptable(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every Linear / Conv1d / Conv2d of `model`, at its logical path.

    A LoKr layer is reported at its own path. A foreign wrapper holding a `base_layer` (a PEFT
    LoRA layer loaded by diffusers) is seen through: its path is the slot's, its inner modules
    (lora_A, lora_B, ...) are not candidates.
    """
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        inner = child
        while not isinstance(inner, (AdaptedModule, *ADAPTABLE)) and isinstance(getattr(inner, "base_layer", None),
                                                                            nn.Module):
            inner = getattr(inner, "base_layer")  # noqa: B009  (typed as Module, not Tensor | Module)
        if isinstance(inner, (AdaptedModule, *ADAPTABLE)):
            yield path, inner
        else:
            yield from iter_adaptable(child, path)


def get_slot(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent, attribute) holding the adaptable module at `path`, through foreign wrappers."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    child = getattr(parent, attr)
    while not isinstance(child, (AdaptedModule, *ADAPTABLE)) and \
            isinstance(getattr(child, "base_layer", None), nn.Module):
        parent, attr, child = child, "base_layer", getattr(child, "base_layer")  # noqa: B009
    return parent, attr


def weight_of(module: nn.Module) -> Tensor:
    """A module's `weight`, typed as a Tensor."""
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _u(path: str) -> str:
    return path.replace(".", "_")


def unet_forms(path: str, ldm: str | None) -> list[tuple[str, str]]:
    """(layout, module name) pairs under which a file may name the UNet module `path`."""
    forms = [("kohya", "lora_unet_" + _u(path)), ("lycoris", "lycoris_" + _u(path)), ("diffusers", "unet." + path)]
    if ldm is not None:
        forms += [("kohya", "lora_unet_" + _u(ldm)), ("comfyui", "diffusion_model." + ldm),
                  ("comfyui", "model.diffusion_model." + ldm)]
    return forms


def transformer_forms(path: str) -> list[tuple[str, str]]:
    """The diffusers-path names of a transformer module (any DiT, also one formats/dit.py has no table for)."""
    return [(layout, template.format(p=path, u=_u(path))) for layout, template in DIFFUSERS_LAYOUTS]


@dataclass
class NameIndex:
    """Incoming module name -> (layout, ModuleRef or FusedRef), plus every adaptable module per component.
    `unused`: modules diffusers' forward does not call (to_q / to_k / to_v beside the `to_qkv` made by
    `fuse_qkv_projections()`), with the reason: a file naming one is refused, not loaded for no effect."""

    names: dict[str, tuple[str, ModuleRef | FusedRef]]
    modules: dict[str, dict[str, nn.Module]]  # component -> path -> module
    ambiguous: set[str]
    unused: dict[ModuleRef, str] = field(default_factory=dict)
    origins: dict[ModuleRef, str] = field(default_factory=dict)  # DiT module -> the original holding its rows
    # DiT modules that are a whole original in another row order (an adaLN projection's (shift, scale) halves)
    swapped: set[ModuleRef] = field(default_factory=set)

    def lookup(self, name: str) -> tuple[str, ModuleRef | FusedRef] | None:
        if name in self.ambiguous:
            raise ValueError(f"module name {name!r} fits more than one module of this pipeline")
        return self.names.get(name)


def build_index(components: Mapping[str, nn.Module]) -> NameIndex:
    """The name index of a pipeline's components ({"unet": ..., "transformer": ..., "text_encoder": ...})."""
    index = NameIndex({}, {}, set())
    kinds = {c: kind_of(m) for c, m in components.items() if c in TEXT_ENCODERS}
    for component, model in components.items():
        index.modules[component] = dict(iter_adaptable(model))
        family = families.of_model(model) if component == "transformer" else None
        if family is not None and family.originals is not None:  # named by its family's original-name table
            _add_dit(index, model)
            continue
        ldm = _ldm_paths(model, list(index.modules[component])) if component == "unet" else {}
        for path in index.modules[component]:
            ref = ModuleRef(component, path)
            if component == "unet":
                forms = unet_forms(path, ldm.get(path))
            elif component in kinds:
                forms = te_forms(component, path, kinds[component], kinds)
            else:
                forms = transformer_forms(path)
                if component == "transformer":  # a class no family names: kohya-style names from its own paths
                    forms.append(("kohya", "lora_unet_" + _u(path)))
            for layout, name in forms:
                _add(index, name, layout, ref)
    return index


def _add(index: NameIndex, name: str, layout: str, ref: ModuleRef | FusedRef) -> None:
    if name in index.names and index.names[name][1] != ref:
        index.ambiguous.add(name)
    index.names.setdefault(name, (layout, ref))


def _add_dit(index: NameIndex, model: nn.Module) -> None:
    """A Flux / Flux.2 / SD3 / Z-Image transformer: every Linear by its diffusers path and by its original
    name (formats/dit.py); a fused original becomes a FusedRef. Other adaptable modules get the diffusers-path
    names (and SD3's patch-embedding Conv2d its original names, from the map's `convs`)."""
    nm = dit_name_map(model)
    for name, (layout, target) in nm.names.items():
        piece = target.pieces[0]
        ref: ModuleRef | FusedRef = ModuleRef("transformer", piece.path) if target.is_rename else \
            FusedRef("transformer", target)
        _add(index, name, layout, ref)
    index.ambiguous |= nm.ambiguous
    index.origins.update({ModuleRef("transformer", p): o for p, o in nm.covering.items()})
    index.swapped.update(ModuleRef("transformer", t.pieces[0].path) for t in nm.originals.values() if t.is_swap)
    for path in index.modules["transformer"]:
        if path not in nm.linears:
            for layout, name in transformer_forms(path):
                _add(index, name, layout, ModuleRef("transformer", path))
    for path, why in nm.not_called.items():
        index.unused[ModuleRef("transformer", path)] = why


def _ldm_paths(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """diffusers path -> ldm path for the UNet's modules ({} for a UNet the ldm table does not describe)."""
    from .ldm import diffusers_to_ldm

    config = getattr(unet, "config", None)
    if config is None:
        return {}
    out: dict[str, str] = {}
    for path in paths:
        try:
            ldm = diffusers_to_ldm(path, config)
        except (KeyError, ValueError, IndexError) as err:
            logger.debug("no ldm names for %s: %s", type(unet).__name__, err)
            return {}
        if ldm is not None:
            out[path] = ldm
    return out
