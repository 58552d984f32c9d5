"""A diffusers pipeline folder's weights, read one tensor at a time, and its models built on the meta device.

Extraction compares two models module by module: each weight is read lazily from the components' safetensors
files (`safe_open`: one tensor in memory per read, not a state dict), and the module tree, names and shapes come
from each component's config built on the meta device (no weights). Pickle checkpoints are refused.
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
            if os.path.isfile(self.root) and self.root.endswith(".safetensors"):
                raise ValueError(f"{what} {self.root}: a single-file checkpoint; extraction reads diffusers folders "
                                 "(convert one with diffusers' from_single_file(...).save_pretrained(folder))")
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
