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


# where the CLIP-L text encoder sits in an SD1.x / SDXL checkpoint (OpenCLIP ones: formats/sd_single.py)
LDM_CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
Slices = tuple[tuple[str, int, int, int], ...]  # (checkpoint key, its rows [start, stop), into our rows from)


class SingleFileWeights:
    """A single-file checkpoint (.safetensors) in its family's original layout, read one tensor at a time under
    diffusers' names, by the name maps the loaders use:

    - SD1.x / SD2.x / SDXL (formats/ldm.py): the UNet under `model.diffusion_model.` (or bare), the CLIP-L text
      encoder under `cond_stage_model.transformer.` (SD1.x) or `conditioner.embedders.0.transformer.` (SDXL), the
      OpenCLIP one in open_clip's layout (formats/sd_single.py: SD2.x `cond_stage_model.model.`, SDXL's second
      `conditioner.embedders.1.model.`; q, k, v read as their rows of `in_proj`; not the transposed projection);
    - the DiT families with an original-name table (formats/dit.py): the transformer's Linear and conv weights
      under their original names (bare, `model.diffusion_model.` or `diffusion_model.`), a fused original (`qkv`)
      read as the rows each diffusers Linear holds.

    The components' configs come from `config`, a diffusers folder of the model (as diffusers'
    `from_single_file(config=...)` takes one), or else from the full-size model the file's names and shapes fit."""

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
        from ..formats.ldm import LDM_UNET_PREFIX

        prefixes = (LDM_UNET_PREFIX, "diffusion_model.", "")
        self._prefix = next(p for p in prefixes if p == "" or any(k.startswith(p) for k in self._shapes))
        self._sd = any(k.startswith(self._prefix + "input_blocks.") for k in self._shapes)
        self._models = self._configs(config)
        self._names = {c: self._name_map(c, m) for c, m in self._models.items()}
        self.pipeline_class = "single-file checkpoint"

    def _configs(self, config: str | os.PathLike[str] | None) -> dict[str, nn.Module]:
        keep = ("unet", "text_encoder", "text_encoder_2") if self._sd else ("transformer",)
        if config is not None:
            folder = FolderWeights(config, f"{self.what}'s config")
            found = {c: folder.meta_model(c) for c in folder.components() if c in keep}
            if keep[0] not in found or not self._fits(found[keep[0]]):
                raise ValueError(f"{self.what} {self.root}: its names and shapes do not fit the model of {config} "
                                 f"(read as {'an SD UNet' if self._sd else 'a transformer in original names'})")
            return found
        from .. import families
        from ..architectures import SD_VARIANTS, meta_components

        if self._sd:
            variants = list(SD_VARIANTS)
        else:  # the families the file's names point to (their signs), those with original names
            named, _ = families.of_file(k.removeprefix(self._prefix).rpartition(".")[0] for k in self._shapes)
            variants = [v for f in named if families.get(f).originals is not None for v in families.get(f).variants]
            if len(named) == len(families.FAMILIES) or not variants:
                raise ValueError(f"{self.what} {self.root}: its names are of no SD UNet nor of a family with "
                                 "original names; give a diffusers folder")
        for variant in variants:
            comps = meta_components(variant)
            denoiser = comps.get(keep[0])
            if denoiser is not None and self._fits(denoiser):
                return {c: m for c, m in comps.items() if c in keep}
        kind = "SD model" if self._sd else "model of a family with original names"
        raise ValueError(f"{self.what} {self.root}: its names and shapes fit no full-size {kind}; pass the model's "
                         "diffusers folder as its config (--config)")

    def _fits(self, denoiser: nn.Module) -> bool:
        """Every weight the map names is in the file with its shape (the SD UNet: every parameter)."""
        try:
            names = self._name_map("unet" if self._sd else "transformer", denoiser)
        except (TypeError, ValueError):
            return False
        if not names:
            return False
        state = {k: tuple(v.shape) for k, v in denoiser.state_dict().items()}
        for key, slices in names.items():
            if any(self._shapes.get(src, (-1,))[0] < stop for src, _, stop, _ in slices) or \
                    any(self._shapes.get(src, ())[1:] != state[key][1:] for src, *_ in slices):
                return False
        return not self._sd or len(names) == len(state)

    def _name_map(self, component: str, model: nn.Module) -> dict[str, Slices]:
        """{diffusers key: where its rows are in the checkpoint}."""
        from ..formats.ldm import clip_state_key, ldm_state_keys

        state = model.state_dict()
        if component == "unet":
            return {k: ((name, 0, state[k].shape[0], 0),) for k, name in ldm_state_keys(model, self._prefix).items()}
        if component == "transformer":
            return self._dit_map(model)
        from ..formats.sd_single import SD2_OPEN_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, open_clip_keys

        def present(prefix: str) -> bool:
            return any(k.startswith(prefix) for k in self._shapes)

        if component == "text_encoder_2" or not any(present(p) for p in LDM_CLIP_PREFIXES):
            prefix = SDXL_OPEN_CLIP_PREFIX if component == "text_encoder_2" else SD2_OPEN_CLIP_PREFIX
            if not present(prefix):
                return {}
            return {k: ((name, row, row + state[k].shape[0], 0),) for k, (name, row) in
                    open_clip_keys(model, prefix).items() if not name.endswith("text_projection")}
        prefix = next(p for p in LDM_CLIP_PREFIXES if present(p))
        return {k: ((clip_state_key(k, prefix), 0, v.shape[0], 0),) for k, v in state.items()}

    def _dit_map(self, model: nn.Module) -> dict[str, Slices]:
        """A DiT transformer's Linear / conv weights: each from the original holding its rows (formats/dit.py)."""
        from ..formats.dit import dit_name_map

        names = dit_name_map(model)
        out: dict[str, list[tuple[str, int, int, int]]] = {}
        for original, target in names.originals.items():
            key = self._prefix + original + ".weight"
            for piece in target.pieces:
                out.setdefault(piece.path + ".weight", []).append((key, piece.start, piece.stop, piece.src_start))
        for original, target in names.convs.items():
            (piece,) = target.pieces
            out[piece.path + ".weight"] = [(self._prefix + original + ".weight", 0, piece.rows, 0)]
        return {k: tuple(v) for k, v in out.items()}

    def components(self) -> dict[str, tuple[str, str]]:
        return {c: ("transformers" if c.startswith("text_encoder") else "diffusers", type(m).__name__)
                for c, m in self._models.items() if self._names[c]}

    def keys(self, component: str) -> dict[str, str]:
        return {k: self.root for k, slices in self._names[component].items()
                if all(src in self._shapes for src, *_ in slices)}

    def tensor(self, component: str, key: str) -> Tensor | None:
        """The weight under diffusers' name `key`: the checkpoint's tensor, or the rows of the original(s) holding
        it; None when the file has no such weight."""
        from safetensors import safe_open

        slices = self._names[component].get(key)
        if slices is None or any(src not in self._shapes for src, *_ in slices):
            return None
        with safe_open(self.root, framework="pt") as fh:
            if len(slices) == 1 and slices[0][1] == 0 and slices[0][2] == self._shapes[slices[0][0]][0]:
                return fh.get_tensor(slices[0][0])
            parts = [(fh.get_slice(src)[start:stop], at) for src, start, stop, at in slices]
        rows = sum(p.shape[0] for p, _ in parts)
        out = parts[0][0].new_empty((rows, *parts[0][0].shape[1:]))
        for part, at in parts:
            out[at:at + part.shape[0]] = part
        return out

    def meta_model(self, component: str) -> nn.Module:
        return self._models[component]


def open_weights(path: str | os.PathLike[str], what: str, config: str | os.PathLike[str] | None = None
                 ) -> FolderWeights | SingleFileWeights:
    """A diffusers folder, or a single-file checkpoint (`config`: a diffusers folder with the model's configs)."""
    if os.path.isfile(os.fspath(path)):
        return SingleFileWeights(path, what, config)
    return FolderWeights(path, what)
