"""Training checkpoints that hold only what training changes: the adapter's tensors (safetensors),
the optimizer and LR-scheduler states and the step. No model weights, no pickled code."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model import lokr_layers

logger = logging.getLogger(__name__)
PREFIX = "checkpoint-"


def adapter_tensors(components: dict[str, nn.Module], adapter: str) -> dict[str, torch.Tensor]:
    return {f"{c}.{path}.{k}": t.detach().cpu().contiguous() for c, m in components.items()
            for path, layer in lokr_layers(m) for k, t in layer.factors(adapter).items()}


def save(output_dir: str, step: int, components: dict[str, nn.Module], adapter: str, optimizer: Any,
         lr_scheduler: Any, limit: int | None = None) -> str:
    """Write checkpoint-<step>/ (adapter.safetensors, optimizer.pt, scheduler.pt, state.json); keep
    at most `limit` checkpoints."""
    if limit is not None:
        existing = list_checkpoints(output_dir)
        for old in existing[: max(0, len(existing) - limit + 1)]:
            shutil.rmtree(os.path.join(output_dir, old))
    folder = os.path.join(output_dir, f"{PREFIX}{step}")
    os.makedirs(folder, exist_ok=True)
    save_file(adapter_tensors(components, adapter), os.path.join(folder, "adapter.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    torch.save(lr_scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as fh:
        json.dump({"global_step": step}, fh)
    logger.info("saved %s", folder)
    return folder


def list_checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith(PREFIX) and d[len(PREFIX):].isdigit()]
    return sorted(names, key=lambda d: int(d[len(PREFIX):]))


def resolve(output_dir: str, which: str) -> str | None:
    """A checkpoint folder from --resume_from_checkpoint ("latest" or a path / name)."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return os.path.join(output_dir, found[-1]) if found else None
    path = which if os.path.isdir(which) else os.path.join(output_dir, which)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {which}")
    return path


def load(folder: str, components: dict[str, nn.Module], adapter: str, optimizer: Any, lr_scheduler: Any) -> int:
    """Restore adapter tensors (in place, so the optimizer keeps its parameters), optimizer and
    scheduler states; returns the global step."""
    tensors = load_file(os.path.join(folder, "adapter.safetensors"))
    current = {f"{c}.{path}.{k}": t for c, m in components.items() for path, layer in lokr_layers(m)
               for k, t in layer.factors(adapter).items()}
    if current.keys() != tensors.keys():
        raise ValueError(f"{folder} does not match this run's adapter ({len(tensors)} vs {len(current)} tensors)")
    with torch.no_grad():
        for k, t in tensors.items():
            current[k].copy_(t)
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    lr_scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as fh:
        return int(json.load(fh)["global_step"])
