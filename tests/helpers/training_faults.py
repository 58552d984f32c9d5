"""Inputs and faults for the training side's reliability catalogue (tests/test_reliability_training_inputs.py,
tests/test_reliability_training_checkpoints.py): image folders, a tiny LoKr model with an optimizer that has
state, its checkpoints (a complete one to copy, `write_template`), the damage done to a checkpoint's files
(truncated, removed, rewritten, rotten in place), the run's arguments (`Ctx`) and a snapshot of a folder's bytes
to say that nothing was written or damaged.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.training import checkpoint

PROMPT = "a photo of sks shape"


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha1 of the bytes, or "dir" / "link"} of everything under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def image(path: Path, mode: str = "RGB", size: tuple[int, int] = (16, 16), color: Any = (200, 30, 30),
           fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def image_folder(d: Path, n: int = 2, captions: bool = True) -> Path:
    for k in range(n):
        image(d / f"{k}.png", color=(40 * k, 100, 200))
        if captions:
            (d / f"{k}.txt").write_text(PROMPT, encoding="utf-8")
    return d


def tiny_model(**config: Any) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    model = LoKrModel(base, LoKrConfig(target_modules=["0", "2"], **{"r": 2, **config}), "default")
    params = [p for _, layer in lokr_layers(model) for p in layer.factors("default").values()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(torch.randn(2, 32)).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any,
                    limit: int | None = None) -> str:
    return checkpoint.save(str(out), step, {"m": model}, "default", optimizer, scheduler, limit)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_template(out: Path) -> Path:
    """A complete checkpoint-1 of the tiny model in `out` (copied and damaged by the cases: a test module's
    `template` fixture, built once per module)."""
    save_checkpoint(out, 1, *tiny_model())
    return out / "checkpoint-1"


@dataclass
class Ctx:
    tmp: Path
    model: str
    template: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def data(self) -> str:
        return str(self.tmp / "data")

    def base(self, *extra: str, dreambooth: bool = False, data: bool = True) -> list[str]:
        argv = ["--pretrained_model_name_or_path", self.model, "--output_dir", str(self.out), "--resolution", "16",
                "--max_train_steps", "1", "--rank", "2"]
        if dreambooth:
            argv += ["--instance_data_dir", self.data(), "--instance_prompt", PROMPT]
        elif data:
            argv += ["--train_data_dir", self.data()]
        return argv + list(extra)

    def file(self, name: str, data: bytes = b"not a folder") -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def checkpoint(self, damage: Callable[[Path], None] | None = None, name: str = "checkpoint-1") -> str:
        folder = self.out / name
        shutil.copytree(self.template, folder)
        if damage is not None:
            damage(folder)
        return str(folder)


def truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def rot(name: str) -> Callable[[Path], None]:
    """Overwrite one tensor's bytes inside `name` with NaN, the file's size unchanged (a bad disk block, a bit
    flip in a copy): the file still parses, only its contents say it changed. The tensor is the adapter's first
    one, or the optimizer's exp_avg of its first parameter, found in the file by its bytes."""
    def damage(folder: Path) -> None:
        path = folder / name
        data = path.read_bytes()
        if name.endswith(".safetensors"):
            tensor = next(iter(load_file(str(path)).values()))
        else:
            tensor = torch.load(path, weights_only=True)["state"][0]["exp_avg"]
        raw = tensor.contiguous().numpy().tobytes()
        at = data.find(raw)
        assert at >= 0 and data.find(raw, at + 1) < 0, f"{name}: the tensor's bytes are not in the file once"
        nan = torch.full_like(tensor, float("nan")).numpy().tobytes()
        path.write_bytes(data[:at] + nan + data[at + len(raw):])
        assert len(path.read_bytes()) == len(data)
    return damage
