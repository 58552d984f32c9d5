"""Every name a LoKr file may give a pipeline module, built forward from the pipeline's own modules.

No incoming name is ever rewritten (`_` -> `.` guessing breaks on `to_q`, `proj_in`, ...): we list,
for each adaptable module of each component, the names it has in each layout, and look incoming
names up. The layouts (docs/formats.md §Key layouts), as templates over a module's diffusers path `p`, its ldm
path `l` (UNet only), and `u(x)` = x with dots turned into underscores:

| layout    | unet                                   | text encoder(s)                                    |
|-----------|----------------------------------------|----------------------------------------------------|
| kohya     | lora_unet_{u(p)}, lora_unet_{u(l)}     | lora_te_ / lora_te1_ / lora_te2_ + u(text_model.p) |
| lycoris   | lycoris_{u(p)} (SimpleTuner)           |                                                    |
| diffusers | unet.{p}                               | text_encoder.{p}, text_encoder_2.{p}               |
| comfyui   | diffusion_model.{l}                    | text_encoders.clip_l / clip_g .transformer.{p}     |
Text-encoder names are accepted with and without the `text_model.` level (transformers 5 dropped it
from CLIPTextModel, files made before or after it differ).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from ..layers import LoKrLayer

logger = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

# kohya prefixes by (component, number of text encoders in the pipeline)
KOHYA_TE_PREFIX: dict[tuple[str, int], tuple[str, ...]] = {
    ("text_encoder", 1): ("lora_te_", "lora_te1_"),
    ("text_encoder", 2): ("lora_te1_",),
    ("text_encoder_2", 2): ("lora_te2_",),
}
COMFY_TE_PREFIX: dict[str, str] = {"text_encoder": "text_encoders.clip_l.transformer.",
                                   "text_encoder_2": "text_encoders.clip_g.transformer."}


@dataclass(frozen=True)
class ModuleRef:
    """A module slot: component name and its path there (through any LoKr / PEFT wrapper)."""

    component: str
    path: str


def iter_adaptable(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every Linear / Conv1d / Conv2d of `model`, at its logical path.

    A LoKr layer is reported at its own path. A foreign wrapper holding a `base_layer` (a PEFT
    LoRA layer loaded by diffusers) is seen through: its path is the slot's, its inner modules
    (lora_A, lora_B, ...) are not candidates.
    """
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        inner = child
        while not isinstance(inner, (LoKrLayer, *ADAPTABLE)) and isinstance(getattr(inner, "base_layer", None),
                                                                            nn.Module):
            inner = getattr(inner, "base_layer")  # noqa: B009  (typed as Module, not Tensor | Module)
        if isinstance(inner, (LoKrLayer, *ADAPTABLE)):
            yield path, inner
        else:
            yield from iter_adaptable(child, path)


def get_slot(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent, attribute) holding the adaptable module at `path`, through foreign wrappers."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    child = getattr(parent, attr)
    while not isinstance(child, (LoKrLayer, *ADAPTABLE)) and isinstance(getattr(child, "base_layer", None), nn.Module):
        parent, attr, child = child, "base_layer", getattr(child, "base_layer")  # noqa: B009
    return parent, attr


def weight_of(module: nn.Module) -> Tensor:
    """A module's `weight`, typed as a Tensor."""
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _u(path: str) -> str:
    return path.replace(".", "_")


def _te_paths(path: str) -> tuple[str, ...]:
    """The text-encoder path with and without the `text_model.` level (with it first)."""
    if path.startswith("text_model."):
        return path, path[len("text_model."):]
    return "text_model." + path, path


def name_forms(ref: ModuleRef, ldm: str | None, n_text_encoders: int) -> list[tuple[str, str]]:
    """(layout, module name) pairs under which a file may name the module `ref`."""
    p, c = ref.path, ref.component
    if c == "unet":
        forms = [("kohya", "lora_unet_" + _u(p)), ("lycoris", "lycoris_" + _u(p)), ("diffusers", "unet." + p)]
        if ldm is not None:
            forms += [("kohya", "lora_unet_" + _u(ldm)), ("comfyui", "diffusion_model." + ldm),
                      ("comfyui", "model.diffusion_model." + ldm)]
        return forms
    forms = []
    for tp in _te_paths(p):
        forms += [("kohya", pre + _u(tp)) for pre in KOHYA_TE_PREFIX.get((c, n_text_encoders), ())]
        forms += [("diffusers", f"{c}.{tp}")]
        if c in COMFY_TE_PREFIX:
            forms += [("comfyui", COMFY_TE_PREFIX[c] + tp)]
    return forms


@dataclass
class NameIndex:
    """Incoming module name -> (layout, ModuleRef), plus every adaptable module per component."""

    names: dict[str, tuple[str, ModuleRef]]
    modules: dict[str, dict[str, nn.Module]]  # component -> path -> module
    ambiguous: set[str]

    def lookup(self, name: str) -> tuple[str, ModuleRef] | None:
        if name in self.ambiguous:
            raise ValueError(f"module name {name!r} fits more than one module of this pipeline")
        return self.names.get(name)


def build_index(components: Mapping[str, nn.Module]) -> NameIndex:
    """The name index of a pipeline's components ({"unet": ..., "text_encoder": ..., ...})."""
    n_te = sum(1 for c in components if c.startswith("text_encoder"))
    names: dict[str, tuple[str, ModuleRef]] = {}
    ambiguous: set[str] = set()
    modules: dict[str, dict[str, nn.Module]] = {}
    for component, model in components.items():
        modules[component] = dict(iter_adaptable(model))
        ldm = _ldm_paths(model, list(modules[component])) if component == "unet" else {}
        for path in modules[component]:
            ref = ModuleRef(component, path)
            for layout, name in name_forms(ref, ldm.get(path), n_te):
                if name in names and names[name][1] != ref:
                    ambiguous.add(name)
                names[name] = (layout, ref)
    return NameIndex(names, modules, ambiguous)


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
