"""A model's weights read one tensor at a time under diffusers' names, and its models built on the meta device:
a diffusers pipeline folder (`FolderWeights`) or an SD-family single-file checkpoint in the original layout
(`SingleFileWeights`).

Extraction compares two models module by module: each weight is read lazily from its safetensors file (`safe_open`:
one tensor in memory per read, not a state dict), and the module tree, names and shapes come from each component's
config built on the meta device (no weights). Pickle checkpoints are refused.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

_VARIANT = re.compile(r"\.(fp16|bf16|fp32|fp8|ema|non_ema)\.")  # diffusers' `variant` infix


class FolderWeights:
    """The weights of a diffusers pipeline folder (model_index.json, one sub-folder per component)."""

    def __init__(self, root: str | os.PathLike[str], what: str = "model") -> None:
        self.root = os.fspath(root)
        self.what = what
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{what}: no such folder: {self.root}")
        index = os.path.join(self.root, "model_index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"{what} {self.root} is not a diffusers pipeline folder (no model_index.json)")
        with open(index, encoding="utf-8") as fh:
            self.index: dict[str, Any] = json.load(fh)
        self._files: dict[str, dict[str, str]] = {}

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", "?"))

    def components(self) -> dict[str, tuple[str, str]]:
        """{component: (library, class)} of the components that have weights (model folders)."""
        out = {}
        for name, spec in self.index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or None in spec:
                continue
            if os.path.isfile(os.path.join(self.root, name, "config.json")):
                out[name] = (str(spec[0]), str(spec[1]))
        return out

    def keys(self, component: str) -> dict[str, str]:
        """{tensor key: the safetensors file holding it} for a component (its weights' headers only)."""
        if component not in self._files:
            from safetensors import safe_open

            folder = os.path.join(self.root, component)
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            plain = [f for f in files if not _VARIANT.search(os.path.basename(f))]
            files = plain or files
            if not files:
                pickles = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.ckpt"))
                why = " (only pickle files, which are not read: save it again with safe_serialization)" \
                    if pickles else ""
                raise FileNotFoundError(f"{self.what} {self.root}: no safetensors weights in {component}/{why}")
            found: dict[str, str] = {}
            for f in files:
                with safe_open(f, framework="pt") as fh:
                    for k in fh.keys():
                        found.setdefault(k, f)
            self._files[component] = found
        return self._files[component]

    def tensor(self, component: str, key: str) -> Tensor | None:
        """One tensor, read from its file alone; None when the component has no such key."""
        from safetensors import safe_open

        path = self.keys(component).get(key)
        if path is None:
            return None
        with safe_open(path, framework="pt") as fh:
            return fh.get_tensor(key)

    def meta_model(self, component: str) -> nn.Module:
        """The component's model built from its config on the meta device (no weights)."""
        library, cls_name = self.components()[component]
        folder = os.path.join(self.root, component)
        with torch.device("meta"):
            if library == "diffusers":
                import diffusers

                cls = getattr(diffusers, cls_name)
                return cls.from_config(cls.load_config(folder))  # type: ignore[no-any-return]
            if library == "transformers":
                import transformers

                config = transformers.AutoConfig.from_pretrained(folder)
                return getattr(transformers, cls_name)(config)  # type: ignore[no-any-return]
        raise ValueError(f"{self.what} {self.root}: component {component!r} is a {library}.{cls_name}, which "
                         "extraction cannot build")


LDM_UNET_PREFIX = "model.diffusion_model."
# where the CLIP-L text encoder sits in an SD1.x / SDXL checkpoint (SDXL's second, OpenCLIP, encoder is not read)
LDM_CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


class SingleFileWeights:
    """An SD-family single-file checkpoint (.safetensors, the original "ldm" layout: the UNet under
    `model.diffusion_model.` or bare, the CLIP-L text encoder under `cond_stage_model.transformer.` (SD1.x) or
    `conditioner.embedders.0.transformer.` (SDXL)), read one tensor at a time under diffusers' names
    (formats/ldm.py's map, the one the loaders use). The components' configs come from `config`, a diffusers folder
    of the model (as diffusers' `from_single_file(config=...)` takes one), or else from the full-size SD model whose
    UNet the file's names and shapes fit."""

    def __init__(self, path: str | os.PathLike[str], what: str = "model",
                 config: str | os.PathLike[str] | None = None) -> None:
        from safetensors import safe_open

        self.root = os.fspath(path)
        self.what = what
        if not os.path.isfile(self.root):
            raise FileNotFoundError(f"{what}: no such file: {self.root}")
        if not self.root.endswith(".safetensors"):
            raise ValueError(f"{what} {self.root}: a single-file checkpoint is read as .safetensors only (no pickle)")
        with safe_open(self.root, framework="pt") as fh:
            self._shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        self._prefix = LDM_UNET_PREFIX if any(k.startswith(LDM_UNET_PREFIX) for k in self._shapes) else ""
        if not any(k.startswith(self._prefix + "input_blocks.") for k in self._shapes):
            raise ValueError(f"{what} {self.root}: not an SD-family checkpoint in the original layout (no "
                             f"{LDM_UNET_PREFIX}input_blocks.*); single files of other families are not read yet: "
                             "give a diffusers folder")
        self._models = self._configs(config)
        self._names = {c: self._name_map(c, m) for c, m in self._models.items()}
        self.pipeline_class = "single-file checkpoint"

    def _configs(self, config: str | os.PathLike[str] | None) -> dict[str, nn.Module]:
        if config is not None:
            folder = FolderWeights(config, f"{self.what}'s config")
            found = {c: folder.meta_model(c) for c in folder.components() if c in ("unet", "text_encoder")}
            if "unet" not in found:
                raise ValueError(f"{self.what}: the config folder {config} has no unet")
            return found
        from ..architectures import SD_VARIANTS, meta_components

        for variant in SD_VARIANTS:
            comps = meta_components(variant)
            if self._fits(comps["unet"]):
                return {c: m for c, m in comps.items() if c in ("unet", "text_encoder")}
        raise ValueError(f"{self.what} {self.root}: its UNet fits no full-size SD model ({', '.join(SD_VARIANTS)}); "
                         "pass the model's diffusers folder as its config")

    def _fits(self, unet: nn.Module) -> bool:
        from ..formats.ldm import ldm_module_map

        names = ldm_module_map(unet)
        for key, p in unet.state_dict().items():
            module, _, leaf = key.rpartition(".")
            if self._shapes.get(f"{self._prefix}{names.get(module)}.{leaf}") != tuple(p.shape):
                return False
        return True

    def _name_map(self, component: str, model: nn.Module) -> dict[str, str]:
        """{diffusers key: the checkpoint's key} of a component."""
        if component == "unet":
            from ..formats.ldm import ldm_module_map

            names = ldm_module_map(model)
            out = {}
            for key in model.state_dict():
                module, _, leaf = key.rpartition(".")
                if module in names:
                    out[key] = f"{self._prefix}{names[module]}.{leaf}"
            return out
        prefix = next((p for p in LDM_CLIP_PREFIXES if any(k.startswith(p) for k in self._shapes)), None)
        if prefix is None:
            return {}
        return {k: prefix + (k if k.startswith("text_model.") or k.startswith("text_projection") else
                             "text_model." + k) for k in model.state_dict()}

    def components(self) -> dict[str, tuple[str, str]]:
        return {c: ("diffusers" if c == "unet" else "transformers", type(m).__name__) for c, m in self._models.items()
                if self._names[c]}

    def keys(self, component: str) -> dict[str, str]:
        return {k: self.root for k, v in self._names[component].items() if v in self._shapes}

    def tensor(self, component: str, key: str) -> Tensor | None:
        from safetensors import safe_open

        name = self._names[component].get(key)
        if name is None or name not in self._shapes:
            return None
        with safe_open(self.root, framework="pt") as fh:
            return fh.get_tensor(name)

    def meta_model(self, component: str) -> nn.Module:
        return self._models[component]


def open_weights(path: str | os.PathLike[str], what: str, config: str | os.PathLike[str] | None = None
                 ) -> FolderWeights | SingleFileWeights:
    """A diffusers folder, or an SD-family single-file checkpoint (`config`: a diffusers folder with its configs)."""
    if os.path.isfile(os.fspath(path)):
        return SingleFileWeights(path, what, config)
    return FolderWeights(path, what)
