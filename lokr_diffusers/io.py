"""Reading LoKr files: a path, a folder (PEFT's adapter_model + adapter_config.json), a hub repo id,
or a state dict. safetensors everywhere; .bin/.pt/.ckpt only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

logger = logging.getLogger(__name__)

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
PEFT_CONFIG_KEY = "lokr_diffusers.peft_config"  # where a PEFT folder's config rides in the metadata
HUB_GUESSES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "pytorch_lokr_weights.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def lokr_state_dict(pretrained_model_name_or_path_or_dict: str | os.PathLike[str] | dict[str, Tensor],
                    weight_name: str | None = None, subfolder: str | None = None,
                    **hub_kwargs: Any) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Read a LoKr file. Returns (state_dict, metadata, detected key layout).

    The layout is one of "kohya", "lycoris", "diffusers", "comfyui", "peft" (see formats.names),
    decided from the key prefixes alone; loaders confirm it against the pipeline's own names.
    """
    source = pretrained_model_name_or_path_or_dict
    metadata: dict[str, str] = {}
    if isinstance(source, dict):
        state_dict = dict(source)
    elif (folders := component_folders(os.fspath(source), subfolder)) and weight_name is None:
        state_dict = _read_component_folders(folders)
    else:
        state_dict, metadata = _read(_resolve(os.fspath(source), weight_name, subfolder, hub_kwargs))
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{len(bad)} entries are not tensors: {bad[:5]}")
    return state_dict, metadata, detect_layout(state_dict)


def detect_layout(state_dict: dict[str, Tensor]) -> str:
    """The key layout by prefix vote (the most common wins)."""
    votes: dict[str, int] = {}
    for key in state_dict:
        layout = ("peft" if key.startswith("base_model.model.") else
                  "kohya" if key.startswith(("lora_unet_", "lora_te")) else
                  "lycoris" if key.startswith("lycoris_") else
                  "comfyui" if key.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")) else
                  "diffusers" if key.startswith(("unet.", "text_encoder.", "text_encoder_2.")) else "unknown")
        votes[layout] = votes.get(layout, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else "unknown"


COMPONENT_FOLDERS = ("unet", "text_encoder", "text_encoder_2")


def component_folders(path: str, subfolder: str | None = None) -> dict[str, str]:
    """{component: folder} when `path` holds one PEFT adapter folder per pipeline component (what
    `save_lokr_weights(format="peft")` writes for several components), else {}."""
    root = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(root) or any(os.path.isfile(os.path.join(root, w)) for w in PEFT_WEIGHTS):
        return {}
    return {c: os.path.join(root, c) for c in COMPONENT_FOLDERS
            if os.path.isfile(os.path.join(root, c, PEFT_WEIGHTS[0])) and os.path.isfile(os.path.join(root, c,
                                                                                                     PEFT_CONFIG))}


def _read_component_folders(folders: dict[str, str]) -> dict[str, Tensor]:
    """Several PEFT folders as one diffusers-style state dict; each module's scale (PEFT's alpha / r,
    from its own folder's config and patterns) rides along as `lokr_scale`."""
    from .config import LoKrConfig
    from .targeting import pattern_value

    out: dict[str, Tensor] = {}
    for component, folder in folders.items():
        sd, metadata = _read(os.path.join(folder, PEFT_WEIGHTS[0]))
        config = LoKrConfig.from_dict(json.loads(metadata[PEFT_CONFIG_KEY]))
        for key, tensor in sd.items():
            if not key.startswith("base_model.model."):
                raise ValueError(f"{folder}: key {key} is not in PEFT's layout")
            out[f"{component}.{key[len('base_model.model.'):]}"] = tensor
            path = key[len("base_model.model."):].rsplit(".", 1)[0]
            r = pattern_value(config.rank_pattern, path, config.r)
            alpha = pattern_value(config.alpha_pattern, path, config.alpha)
            out[f"{component}.{path}.lokr_scale"] = torch.tensor(float(alpha) / r, dtype=torch.float64)
    return out


def _resolve(path: str, weight_name: str | None, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str:
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        if weight_name:
            return os.path.join(local, weight_name)
        for name in PEFT_WEIGHTS:
            if os.path.isfile(os.path.join(local, name)):
                return os.path.join(local, name)
        files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
        if len(files) == 1:
            return os.path.join(local, files[0])
        raise FileNotFoundError(f"{local} holds {len(files)} .safetensors files {files[:5]}; pass weight_name=")
    if os.path.isfile(local):
        return local
    if os.path.exists(path) or path.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise FileNotFoundError(f"no LoKr file at {local}")
    return _from_hub(path, weight_name, subfolder, hub_kwargs)


def _from_hub(repo_id: str, weight_name: str | None, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    names = [weight_name] if weight_name else list(HUB_GUESSES)
    last: Exception | None = None
    for name in names:
        try:
            return hf_hub_download(repo_id, name, subfolder=subfolder, **hub_kwargs)
        except EntryNotFoundError as err:
            last = err
    raise FileNotFoundError(f"{repo_id}: none of {names} found; pass weight_name=") from last


def _read(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        state_dict = load_file(path)
    elif path.endswith(PICKLE_SUFFIXES):
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary code from pickles
        state_dict, metadata = (loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded), {}
        if not isinstance(state_dict, dict):
            raise TypeError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    else:
        raise ValueError(f"{path}: not a .safetensors (or .bin/.pt/.ckpt) file")
    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    if os.path.basename(path) in PEFT_WEIGHTS and os.path.isfile(config):
        with open(config, encoding="utf-8") as fh:
            metadata[PEFT_CONFIG_KEY] = fh.read()
        json.loads(metadata[PEFT_CONFIG_KEY])  # fail early on a broken config
    logger.info("read %d tensors from %s", len(state_dict), path)
    return state_dict, metadata
