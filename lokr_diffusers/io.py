"""Reading LoKr files: a path, a folder (PEFT's adapter_model + adapter_config.json), a hub repo id,
or a state dict. safetensors everywhere; .bin/.pt/.ckpt only through `torch.load(weights_only=True)`.

Every problem is an error that names the file (or argument) and says what to do: a damaged file is
an `InvalidFileError` (a ValueError), a missing one a FileNotFoundError, an unreachable hub an
OSError; no exception of safetensors, pickle or huggingface_hub escapes.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .formats.names import COMPONENTS
from .functional import FACTOR_NAMES
from .loaded import LoadedFile

logger = logging.getLogger(__name__)

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
HUB_GUESSES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "pytorch_lokr_weights.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
FILE_SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES, ".json", ".lokr", ".lora", ".zip")
HUB_ARGS = frozenset({"revision", "cache_dir", "force_download", "proxies", "local_files_only", "token", "local_dir",
                      "user_agent", "etag_timeout", "repo_type", "endpoint", "headers"})
IGNORED_ARGS = frozenset({"use_safetensors", "low_cpu_mem_usage"})  # diffusers' LoRA loader habits, no meaning here
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


class InvalidFileError(ValueError):
    """A file that cannot be what it claims: not valid safetensors, a damaged or unsafe pickle, empty."""


def read_lokr_file(source: str | os.PathLike[str] | Mapping[str, Tensor] | LoadedFile,
                   weight_name: str | None = None, subfolder: str | None = None, **hub_kwargs: Any) -> LoadedFile:
    """Read a LoKr file, a folder, a hub repo id or a state dict into one `LoadedFile`.

    Args:
        source: a .safetensors (or .bin/.pt/.ckpt) file, a folder (PEFT's adapter_model + adapter_config.json,
            one PEFT folder per component, or one .safetensors), an `org/name` hub repo id, a {name: tensor}
            dict, or a LoadedFile (returned as it is).
        weight_name: the file inside a folder or repo.
        subfolder: the folder inside `source` that holds it.
        hub_kwargs: hub download arguments (revision, token, cache_dir, ...).

    Returns:
        The tensors, the file's own metadata untouched, the key layout read off the keys (loaders confirm
        it against the pipeline's own names), where it came from, and the adapter_config.json beside a
        PEFT file. Local paths must exist; only an `org/name` string that is not a local path goes to the hub.
    """
    if isinstance(source, LoadedFile):
        return source
    _check_args(weight_name, subfolder, hub_kwargs)
    if isinstance(source, Mapping):
        state_dict = _from_dict(source)
        return LoadedFile(state_dict, {}, detect_layout(state_dict))
    if isinstance(source, (str, os.PathLike)) and isinstance(os.fspath(source), str):
        path = str(os.fspath(source))
        if not path.strip():
            raise ValueError("the path is empty; pass a LoKr file, a folder, an org/name hub repo id or a state dict")
        root = os.path.expanduser(path)
        folders = component_folders(root, subfolder) if weight_name is None else {}
        if folders:
            return _read_component_folders(folders, os.path.join(root, subfolder) if subfolder else root)
        file, repo = _resolve(path, weight_name, subfolder, hub_kwargs)
        return _read_file(file, repo)
    raise TypeError("expected a LoKr file path, a folder, an org/name hub repo id or a dict of {name: tensor}, "
                    f"got {type(source).__name__}")


def lokr_state_dict(pretrained_model_name_or_path_or_dict: str | os.PathLike[str] | dict[str, Tensor],
                    weight_name: str | None = None, subfolder: str | None = None,
                    **hub_kwargs: Any) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Read a LoKr file (see `read_lokr_file`).

    Returns:
        (state_dict, the file's own metadata, detected key layout): "kohya", "lycoris", "diffusers",
        "comfyui", "peft" (see formats.names), decided from the key prefixes alone. A PEFT folder's
        adapter_config.json is not in the metadata: `read_lokr_file` gives it (`LoadedFile.peft_config`).
    """
    file = read_lokr_file(pretrained_model_name_or_path_or_dict, weight_name, subfolder, **hub_kwargs)
    return dict(file.tensors), dict(file.metadata), file.layout


def _from_dict(source: Mapping[Any, Any]) -> dict[str, Tensor]:
    state_dict = check_state_dict(source)
    modules = _peft_modules(state_dict)
    if modules and not all(modules.values()):
        logger.warning("a state dict in PEFT's layout (base_model.model.*) without alpha tensors: loaded at scale 1 "
                       "(no alpha: the consumers' rule). PEFT's scale alpha / r is in adapter_config.json: load "
                       "the folder holding it instead")
    return state_dict


def _check_args(weight_name: Any, subfolder: Any, hub_kwargs: Mapping[str, Any]) -> None:
    for name, value in (("weight_name", weight_name), ("subfolder", subfolder)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str (a file or folder name), got {type(value).__name__}")
    unknown = sorted(set(hub_kwargs) - HUB_ARGS - IGNORED_ARGS)
    if unknown:
        raise TypeError(f"unknown arguments {unknown}; besides weight_name and subfolder, only hub download "
                        f"arguments are accepted: {sorted(HUB_ARGS)}")
    for name in IGNORED_ARGS & set(hub_kwargs):
        logger.debug("argument %s has no meaning for LoKr files; ignored", name)


def check_state_dict(state_dict: Mapping[Any, Any], source: str = "the state dict") -> dict[str, Tensor]:
    """A copy of `state_dict` as {str: Tensor}; TypeError naming the entries that are not."""
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"{source} has keys that are not str: {bad_keys[:5]!r}; expected {{name: torch.Tensor}}")
    bad = [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{source} has {len(bad)} values that are not tensors: {', '.join(bad[:5])}; expected "
                        "{name: torch.Tensor}")
    if not state_dict:
        raise ValueError(f"{source} is empty: no tensors to load")
    return dict(state_dict)


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """The key layout by prefix vote (the most common wins)."""
    votes: dict[str, int] = {}
    for key in state_dict:
        layout = ("peft" if key.startswith("base_model.model.") else
                  "kohya" if key.startswith(("lora_unet_", "lora_te")) else
                  "lycoris" if key.startswith("lycoris_") else
                  "comfyui" if key.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")) else
                  "onetrainer" if key.startswith("lora_transformer_") else
                  "diffusers" if key.startswith(tuple(f"{c}." for c in COMPONENTS)) else "unknown")
        votes[layout] = votes.get(layout, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else "unknown"


COMPONENT_FOLDERS = COMPONENTS  # one PEFT folder per component (save_lokr_weights(format="peft"))


def component_folders(path: str, subfolder: str | None = None) -> dict[str, str]:
    """{component: folder} when `path` holds one PEFT adapter folder per pipeline component (what
    `save_lokr_weights(format="peft")` writes for several components), else {}."""
    root = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(root) or any(os.path.isfile(os.path.join(root, w)) for w in PEFT_WEIGHTS):
        return {}
    found = {c: os.path.join(root, c) for c in COMPONENT_FOLDERS
             if os.path.isfile(os.path.join(root, c, PEFT_WEIGHTS[0]))}
    for folder in found.values():
        if not os.path.isfile(os.path.join(folder, PEFT_CONFIG)):
            raise ValueError(_missing_config(os.path.join(folder, PEFT_WEIGHTS[0])))
    return found


def _read_component_folders(folders: dict[str, str], root: str) -> LoadedFile:
    """Several PEFT folders as one diffusers-style state dict; each module's scale (PEFT's alpha / r,
    from its own folder's config and patterns) is given as a `lokr_scale` tensor, unless the module
    carries its own alpha tensor (the file's own tensors win, see formats.reader)."""
    from .config import LoKrConfig, pattern_value

    out: dict[str, Tensor] = {}
    for component, folder in folders.items():
        file = _read_file(os.path.join(folder, PEFT_WEIGHTS[0]))
        sd = file.tensors
        config = LoKrConfig.from_dict(dict(file.peft_config or {}))  # there and checked: component_folders, _read_file
        for key, tensor in sd.items():
            if not key.startswith("base_model.model."):
                raise ValueError(f"{file.source}: key {key} is not in PEFT's layout (base_model.model.<module>...)")
            out[f"{component}.{key[len('base_model.model.'):]}"] = tensor
        for path in {k[len("base_model.model."):].rsplit(".", 1)[0] for k in sd}:
            if f"base_model.model.{path}.alpha" in sd:
                continue
            r = pattern_value(config.rank_pattern, path, config.r, "rank_pattern")
            alpha = pattern_value(config.alpha_pattern, path, config.alpha, "alpha_pattern")
            out[f"{component}.{path}.lokr_scale"] = torch.tensor(float(alpha) / r, dtype=torch.float64)
    return LoadedFile(out, {}, detect_layout(out), root)


# ---------------------------------------------------------------------------------- where is it
def looks_local(path: str) -> bool:
    """Is `path` meant as a local path rather than a hub repo id? Yes when it starts with `.`, `~`
    or a separator, has a backslash, a file suffix or more than one `/`, when its first part exists
    here, or when it is not of the form org/name."""
    if path.startswith((".", "~", "/", os.sep)) or "\\" in path or path.lower().endswith(FILE_SUFFIXES):
        return True
    if path.count("/") != 1 or os.path.exists(path.split("/")[0]) or ".." in path or "--" in path:
        return True
    return _REPO_ID.fullmatch(path) is None


def _resolve(path: str, weight_name: str | None, subfolder: str | None,
             hub_kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """(the local file to read, the hub repo id it was downloaded from or None)."""
    local = os.path.join(path, subfolder) if subfolder else path
    expanded = os.path.expanduser(local)
    if os.path.isdir(expanded):
        return _file_in_folder(expanded, weight_name), None
    if os.path.isfile(expanded):
        return expanded, None
    if os.path.exists(expanded):
        raise InvalidFileError(f"{local}: neither a file nor a folder")
    if looks_local(path):
        hint = "" if os.path.isdir(os.path.dirname(os.path.abspath(expanded))) else \
            f" (the folder {os.path.dirname(local) or '.'} does not exist either)"
        raise FileNotFoundError(f"no such file or folder: {local}{hint}")
    return _from_hub(path, weight_name, subfolder, hub_kwargs), path


def _file_in_folder(folder: str, weight_name: str | None) -> str:
    if weight_name:
        path = os.path.join(folder, weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file or folder: {path}")
        return path
    for name in PEFT_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(files) == 1:
        return os.path.join(folder, files[0])
    if not files:
        raise FileNotFoundError(f"no LoKr file in folder {folder}: it holds no .safetensors file nor "
                                f"{' / '.join(PEFT_WEIGHTS)}; pass the file itself, or weight_name=")
    raise ValueError(f"{folder} holds {len(files)} .safetensors files {files[:5]}; pass weight_name= to pick one")


def _from_hub(repo_id: str, weight_name: str | None, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    names = [weight_name] if weight_name else list(HUB_GUESSES)
    for name in names:
        try:
            return hf_hub_download(repo_id, name, subfolder=subfolder, **hub_kwargs)
        except LocalEntryNotFoundError as err:  # offline, or no connection, and not in the cache
            raise OSError(f"could not reach the Hugging Face Hub for repo {repo_id!r} (offline or no connection, "
                          f"and {name} is not in the local cache). If you meant a local file or folder, it must "
                          f"exist: no such file or folder: {repo_id}") from err
        except EntryNotFoundError:
            continue
        except RevisionNotFoundError as err:
            raise OSError(f"hub repo {repo_id!r} has no revision {hub_kwargs.get('revision')!r}") from err
        except RepositoryNotFoundError as err:
            raise OSError(f"hub repo {repo_id!r} not found (or private or gated: pass token=). If you meant a "
                          f"local file or folder, it must exist: no such file or folder: {repo_id}") from err
        except Exception as err:  # network, HTTP, validation: said in one line
            raise OSError(f"hub repo {repo_id!r}: downloading {name} failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from err
    raise FileNotFoundError(f"hub repo {repo_id!r} has none of {names}; pass weight_name=")


# --------------------------------------------------------------------------------------- reading
def _read_file(path: str, repo: str | None = None) -> LoadedFile:
    """One file as a LoadedFile, with the adapter_config.json beside a PEFT file."""
    state_dict, metadata = _read(path)
    config, config_path = _peft_config_beside(path, state_dict)
    logger.info("read %d tensors from %s", len(state_dict), path)
    return LoadedFile(state_dict, metadata, detect_layout(state_dict), path, repo, config, config_path)


def _read(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, the file's own metadata) of a non-empty file."""
    if os.path.getsize(path) == 0:
        raise InvalidFileError(f"{path}: the file is empty (0 bytes), not a LoKr file; was a download or a save "
                               "interrupted? Get or write it again")
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        state_dict, metadata = _read_safetensors(path)
    elif path.lower().endswith(PICKLE_SUFFIXES):
        state_dict, metadata = _read_pickle(path), {}
    else:
        raise InvalidFileError(f"{path}: not a .safetensors (or .bin/.pt/.ckpt) file")
    if not state_dict:
        raise InvalidFileError(f"{path}: holds no tensors, so no LoKr modules; was it saved from an empty adapter?")
    return state_dict, metadata


def _read_safetensors(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}  # safe_open has no __iter__
    except SafetensorError as err:
        raise InvalidFileError(f"{path}: not a valid safetensors file ({err}); it is damaged or truncated: "
                               "download or export it again") from None
    except OSError as err:
        raise OSError(f"{path}: cannot read the file ({err.strerror or err})") from None
    except Exception as err:  # anything else safetensors may raise on a broken header
        raise InvalidFileError(f"{path}: not a valid safetensors file ({type(err).__name__}: {err})") from None
    return state_dict, metadata


def _read_pickle(path: str) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary code from pickles
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"an object of class {found.group(1)}" if found else "something torch.save did not write"
        raise InvalidFileError(f"{path}: refused: the pickle holds {what}, not only tensors. .bin/.pt/.ckpt files "
                               "are read with weights_only=True so that nothing in them runs; use a .safetensors "
                               "file, or convert this one with a tool you trust") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise InvalidFileError(f"{path}: not a valid PyTorch file ({str(err).splitlines()[0]}); it is damaged or "
                               "truncated: download or export it again") from None
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, dict):
        raise InvalidFileError(f"{path}: holds a {type(state_dict).__name__}, not a dict of tensors")
    try:
        return check_state_dict(state_dict, path) if state_dict else {}
    except TypeError as err:
        raise InvalidFileError(str(err)) from None


def _peft_modules(state_dict: Mapping[str, Tensor]) -> dict[str, bool]:
    """{PEFT-layout LoKr module: has an alpha tensor}."""
    out: dict[str, bool] = {}
    for key in state_dict:
        if key.startswith("base_model.model."):
            module, _, leaf = key.rpartition(".")
            if leaf not in FACTOR_NAMES and module.rpartition(".")[2] in FACTOR_NAMES:  # in-memory `.lokr_w1.<name>`
                module, _, leaf = module.rpartition(".")
            if leaf in FACTOR_NAMES:
                out[module] = out.get(module, False) or f"{module}.alpha" in state_dict
    return out


def _missing_config(weights: str) -> str:
    config = os.path.join(os.path.dirname(weights), PEFT_CONFIG)
    return (f"{weights}: PEFT-layout LoKr weights (keys base_model.model.*) without their {PEFT_CONFIG}: r and alpha, "
            f"which make the scale alpha / r, are only in that file. Put the {PEFT_CONFIG} saved with these weights "
            f"next to them, as {config}")


def _peft_config_beside(path: str, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Any] | None, str | None]:
    """(contents, path) of the adapter_config.json beside a PEFT file (checked, naming the file), or
    (None, None); PEFT-layout LoKr weights with neither that config nor alpha tensors are refused."""
    from .config import read_adapter_config

    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    modules = _peft_modules(state_dict)
    if os.path.isfile(config) and (os.path.basename(path) in PEFT_WEIGHTS or modules):
        _, raw = read_adapter_config(config)
        return raw, config
    if modules and not all(modules.values()):
        raise ValueError(_missing_config(path))
    return None, None
