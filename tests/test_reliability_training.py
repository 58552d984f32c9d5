"""The training side's catalogue of bad input and faults: one tuple per case.

Each case asserts the error class and a fragment of its message (or, where the right behaviour is to
work with a warning, that it works and what the warning says), and that nothing was written or damaged:
the files under the test's folder are byte-for-byte what they were, no output folder appears, old
checkpoints stay intact. The checks are tested where they live (argument parsing, the data readers,
the checkpoint module); the real training loop runs only for the cases that need the loaded model.
The end-to-end SIGKILL of a training run is in test_training_resume_ddp.py; here a small subprocess
kills itself inside `checkpoint.save`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.training import checkpoint
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.checks import check_not_fused, check_pipeline
from lokr_diffusers.training.errors import (
    AdapterFusedError,
    CheckpointError,
    InputNotFoundError,
    TrainingInputError,
)
from lokr_diffusers.training.run import build_dataset, main, train

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks shape"


# ------------------------------------------------------------------------------------------------ helpers

def _snapshot(root: Path) -> dict[str, str]:
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


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (16, 16), color: Any = (200, 30, 30),
           fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _folder(d: Path, n: int = 2, captions: bool = True) -> Path:
    for k in range(n):
        _image(d / f"{k}.png", color=(40 * k, 100, 200))
        if captions:
            (d / f"{k}.txt").write_text(PROMPT, encoding="utf-8")
    return d


def _tiny_model(**config: Any) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    model = LoKrModel(base, LoKrConfig(target_modules=["0", "2"], **{"r": 2, **config}), "default")
    params = [p for _, layer in lokr_layers(model) for p in layer.factors("default").values()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(torch.randn(2, 32)).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def _save(out: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any, limit: int | None = None) -> str:
    return checkpoint.save(str(out), step, {"m": model}, "default", optimizer, scheduler, limit)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete checkpoint-1 of the tiny model (copied and damaged by the cases)."""
    out = tmp_path_factory.mktemp("template")
    _save(out, 1, *_tiny_model())
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


@pytest.fixture
def ctx(tmp_path: Path, tiny_sd_dir: str, template: Path) -> Ctx:
    c = Ctx(tmp_path, tiny_sd_dir, template)
    _folder(Path(c.data()))
    return c


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _rot(name: str) -> Callable[[Path], None]:
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


def _strip_hashes(folder: Path) -> None:
    """state.json as checkpoints written before hashes were recorded had it: the step, the tensor count, sizes."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    state.pop("sha256", None)
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")


# ------------------------------------------------------------------------- arguments (exit 2, one line)

ARGUMENT_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("max_steps_negative", lambda c: c.base("--max_train_steps", "-1"), "--max_train_steps -1: must be a positive"),
    ("max_steps_zero", lambda c: c.base("--max_train_steps", "0"), "--max_train_steps 0: must be a positive"),
    ("epochs_zero", lambda c: c.base("--num_train_epochs", "0"), "--num_train_epochs 0: must be at least 1"),
    ("batch_zero", lambda c: c.base("--train_batch_size", "0"), "--train_batch_size 0: must be at least 1"),
    ("accumulation_zero", lambda c: c.base("--gradient_accumulation_steps", "0"),
     "--gradient_accumulation_steps 0: must be at least 1"),
    ("resolution_20", lambda c: c.base("--resolution", "20"), "--resolution 20: must be a positive multiple of 8"),
    ("resolution_negative", lambda c: c.base("--resolution", "-64"), "--resolution -64: must be a positive"),
    ("lr_negative", lambda c: c.base("--learning_rate=-1e-4"), "--learning_rate -0.0001: must be a positive"),
    ("lr_nan", lambda c: c.base("--learning_rate", "nan"), "--learning_rate nan: must be a positive"),
    ("te_lr_zero", lambda c: c.base("--text_encoder_lr", "0"), "--text_encoder_lr 0.0: must be a positive"),
    ("warmup_negative", lambda c: c.base("--lr_warmup_steps", "-1"), "--lr_warmup_steps -1: must be 0 or more"),
    ("beta1_one", lambda c: c.base("--adam_beta1", "1.0"), "--adam_beta1 1.0: must be in [0, 1)"),
    ("epsilon_zero", lambda c: c.base("--adam_epsilon", "0"), "--adam_epsilon 0.0: must be a positive"),
    ("grad_norm_negative", lambda c: c.base("--max_grad_norm", "-1"), "--max_grad_norm -1.0: must be a positive"),
    ("snr_gamma_zero", lambda c: c.base("--snr_gamma", "0"), "--snr_gamma 0.0: must be a positive"),
    ("checkpointing_negative", lambda c: c.base("--checkpointing_steps", "-5"),
     "--checkpointing_steps -5: must be a positive number of steps between checkpoints, or 0"),
    ("total_limit_zero", lambda c: c.base("--checkpoints_total_limit", "0"),
     "--checkpoints_total_limit 0: must be at least 1"),
    ("validation_images_zero", lambda c: c.base("--num_validation_images", "0"),
     "--num_validation_images 0: must be at least 1"),
    ("workers_negative", lambda c: c.base("--dataloader_num_workers", "-1"), "--dataloader_num_workers -1"),
    ("rank_zero", lambda c: c.base("--rank", "0"), "--rank 0: must be a positive integer"),
    ("te_rank_negative", lambda c: c.base("--te_rank", "-2"), "--te_rank -2: must be a positive integer"),
    ("alpha_inf", lambda c: c.base("--alpha", "inf"), "--alpha inf: must be a finite number"),
    ("rank_dropout_one", lambda c: c.base("--rank_dropout", "1"), "--rank_dropout 1.0: must be in [0, 1)"),
    ("module_dropout_negative", lambda c: c.base("--module_dropout", "-0.1"), "--module_dropout -0.1: must be in"),
    ("decompose_factor_zero", lambda c: c.base("--decompose_factor", "0"), "--decompose_factor 0: must be -1"),
    ("scheduler_unknown", lambda c: c.base("--lr_scheduler", "cosnie"), "--lr_scheduler 'cosnie': unknown"),
    ("unet_targets_empty", lambda c: c.base("--unet_target_modules", ","), "--unet_target_modules is empty"),
    ("te_targets_empty", lambda c: c.base("--train_text_encoder", "--te_target_modules", ""),
     "--te_target_modules is empty"),
    ("no_data_source", lambda c: c.base(data=False), "give --train_data_dir (an image folder) or --dataset_name"),
    ("two_data_sources", lambda c: c.base("--dataset_name", "some/set"), "one of --train_data_dir and --dataset_name"),
    ("data_dir_missing", lambda c: c.base("--train_data_dir", str(c.tmp / "nope")), "nope: no such folder"),
    ("data_dir_is_file", lambda c: c.base("--train_data_dir", c.file("images.zip")), "images.zip: is a file"),
    ("output_dir_is_file", lambda c: c.base("--output_dir", c.file("out.txt")), "out.txt: is a file; give a folder"),
    ("output_dir_under_file", lambda c: c.base("--output_dir", os.path.join(c.file("f"), "run")),
     "is a file, so the folder cannot be created"),
    ("model_path_missing", lambda c: c.base("--pretrained_model_name_or_path", str(c.tmp / "models" / "sd")),
     "sd: no such folder; give a diffusers pipeline folder"),
    ("model_folder_not_a_pipeline", lambda c: c.base("--pretrained_model_name_or_path", c.data()),
     "no model_index.json"),
    ("model_path_is_file", lambda c: c.base("--pretrained_model_name_or_path", c.file("model.safetensors")),
     "model.safetensors: is a file"),
    ("resume_missing", lambda c: c.base("--resume_from_checkpoint", "checkpoint-7"),
     "--resume_from_checkpoint checkpoint-7: no such folder"),
    ("resume_not_a_checkpoint", lambda c: c.base("--resume_from_checkpoint", c.data()),
     "not a complete checkpoint: "),
    ("resume_no_state", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(_remove("state.json"))),
     "no state.json (not a checkpoint, or its save did not finish)"),
    ("resume_no_optimizer", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(_remove("optimizer.pt"))),
     "optimizer.pt is missing"),
    ("resume_truncated_adapter", lambda c: c.base("--resume_from_checkpoint",
                                                  c.checkpoint(_truncate("adapter.safetensors"))),
     "adapter.safetensors has"),
    ("resume_rotten_optimizer", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(_rot("optimizer.pt"))),
     "optimizer.pt: its sha256 differs from the one state.json recorded"),
    ("resume_rotten_adapter", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(_rot("adapter.safetensors"))),
     "adapter.safetensors: its sha256 differs from the one state.json recorded"),
    ("resume_bad_state_json", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(_write("state.json", b"{"))),
     "state.json: unreadable"),
    ("resume_state_without_step", lambda c: c.base("--resume_from_checkpoint",
                                                   c.checkpoint(_write("state.json", b'{"step": 1}'))),
     "non-negative integer 'global_step'"),
    ("db_prior_without_class_data", lambda c: c.base("--with_prior_preservation", dreambooth=True),
     "--with_prior_preservation needs --class_data_dir"),
    ("db_instance_dir_missing", lambda c: c.base("--instance_data_dir", str(c.tmp / "dog"), dreambooth=True),
     "dog: no such folder"),
    ("db_class_dir_missing", lambda c: c.base("--with_prior_preservation", "--class_prompt", "a photo of dog",
                                              "--class_data_dir", str(c.tmp / "dogs"), dreambooth=True),
     "dogs: no such folder"),
    ("db_empty_instance_prompt", lambda c: c.base("--instance_prompt", " ", dreambooth=True),
     "--instance_prompt is empty"),
]


@pytest.mark.parametrize("make_argv, fragment", [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES])
def test_bad_arguments_exit_2_with_one_line(ctx: Ctx, capsys: pytest.CaptureFixture[str], make_argv: Any,
                                            fragment: str) -> None:
    argv = make_argv(ctx)
    before = _snapshot(ctx.tmp)
    with pytest.raises(SystemExit) as exc:
        parse("t", dreambooth="--instance_prompt" in argv, argv=argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], err
    assert _snapshot(ctx.tmp) == before  # nothing written, nothing damaged


# ------------------------------------------------------------------------------- data: refused up front

def _metadata(text: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        _folder(d, captions=False)
        (d / "metadata.jsonl").write_bytes(text)
    return make


def _garbage(d: Path, names: tuple[str, ...] = ("a.png", "b.jpg"), data: bytes = b"\x89PNG not really") -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).write_bytes(data)
        (d / name).with_suffix(".txt").write_text(PROMPT, encoding="utf-8")


DATA_ERRORS: list[tuple[str, str, Callable[[Path], None], type[Exception], str]] = [
    ("empty_folder", "t2i", lambda d: d.mkdir(), TrainingInputError, "no images"),
    ("no_image_files", "t2i", lambda d: (d.mkdir(), (d / "notes.txt").write_text("hi")), TrainingInputError,
     "no images (.png, .jpg"),
    ("all_captions_missing", "t2i", lambda d: _folder(d, captions=False), TrainingInputError,
     "none of the 2 image(s) has a caption; add a metadata.jsonl"),
    ("all_captions_blank", "t2i", lambda d: (_folder(d, captions=False), (d / "0.txt").write_text("  \n"),
                                             (d / "1.txt").write_text("")), TrainingInputError,
     "has a caption"),
    ("metadata_bad_json", "t2i", _metadata(b'{"file_name": "0.png", "text": "x"}\n{oops\n'), TrainingInputError,
     "metadata.jsonl, line 2: not valid JSON"),
    ("metadata_not_utf8", "t2i", _metadata(b'{"file_name": "0.png", "text": "caf\xe9"}\n'), TrainingInputError,
     "metadata.jsonl, line 1: not UTF-8 text"),
    ("metadata_missing_file", "t2i", _metadata(b'{"file_name": "gone.png", "text": "x"}\n'), InputNotFoundError,
     "line 1: file_name='gone.png' names a missing file"),
    ("metadata_not_an_object", "t2i", _metadata(b'["0.png", "x"]\n'), TrainingInputError,
     "line 1: expected a JSON object"),
    ("metadata_caption_number", "t2i", _metadata(b'{"file_name": "0.png", "text": 3}\n'), TrainingInputError,
     "line 1: caption must be a string"),
    ("metadata_duplicate", "t2i", _metadata(b'{"file_name": "0.png", "text": "x"}\n' * 2), TrainingInputError,
     "listed twice"),
    ("all_images_corrupt", "t2i", _garbage, TrainingInputError, "none of the 2 image(s) can be read"),
    ("all_images_empty_files", "t2i", lambda d: _garbage(d, data=b""), TrainingInputError, "b.jpg: "),
    ("dangling_symlink_only", "t2i", lambda d: (d.mkdir(), os.symlink(d / "gone.png", d / "a.png"),
                                                (d / "a.txt").write_text(PROMPT)), TrainingInputError,
     "a.png: FileNotFoundError"),
    ("db_instance_folder_empty", "db", lambda d: d.mkdir(), TrainingInputError,
     "--instance_data_dir '"),
    ("db_instance_all_corrupt", "db", _garbage, TrainingInputError, "--instance_data_dir"),
    ("db_class_folder_empty", "db_prior", lambda d: (_folder(d), (d.parent / "cls").mkdir()), TrainingInputError,
     "--class_data_dir '"),
]


@pytest.mark.parametrize("kind, make, error, fragment", [c[1:] for c in DATA_ERRORS], ids=[c[0] for c in DATA_ERRORS])
def test_bad_data_refused_before_training(tmp_path: Path, tiny_sd_dir: str, kind: str, make: Any,
                                          error: type[Exception], fragment: str) -> None:
    c = Ctx(tmp_path, tiny_sd_dir, Path())
    make(Path(c.data()))
    prior = ("--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls"), "--class_prompt", "a shape")
    args = parse("t", dreambooth=kind != "t2i", argv=c.base(*(prior if kind == "db_prior" else ()),
                                                            dreambooth=kind != "t2i"))
    before = _snapshot(tmp_path)
    with pytest.raises(error) as exc:
        build_dataset(args)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert _snapshot(tmp_path) == before and not c.out.exists()


def test_data_error_through_the_script_entry_point(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    """`main` (what the example scripts call) turns a data error into argparse's exit: code 2, one line."""
    for f in Path(ctx.data()).glob("*.txt"):
        f.unlink()
    before = _snapshot(ctx.tmp)
    with pytest.raises(SystemExit) as exc:
        main("t", dreambooth=False, argv=ctx.base())
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert next(line for line in err.splitlines() if "error:" in line).endswith("(0001.png -> 0001.txt)")
    assert _snapshot(ctx.tmp) == before and not ctx.out.exists()


# ----------------------------------------------------------------------------- data: works, with a warning

def _mixed(d: Path, bad: str, data: bytes | None) -> None:
    _folder(d)
    if data is None:
        os.symlink(d / "nowhere.png", d / bad)
    else:
        (d / bad).write_bytes(data)


def _truncated_png(d: Path) -> None:
    _folder(d)
    Image.effect_noise((64, 64), 50).save(d / "big.png")
    raw = (d / "big.png").read_bytes()
    (d / "big.png").write_bytes(raw[: len(raw) // 2])


def _one(mode: str, color: Any, size: tuple[int, int] = (16, 16), name: str = "0.png",
         fmt: str | None = None) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        _image(d / name, mode, size, color, fmt)
        (d / name).with_suffix(".txt").write_text(PROMPT, encoding="utf-8")
    return make


def _caption_bytes(data: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        _folder(d, n=1, captions=False)
        (d / "0.txt").write_bytes(data)
    return make


# (id, make the folder, images kept, the pixel value all of item 0 must have or None, caption of item 0 or
# None, a warning fragment or None)
DATA_WORKS: list[tuple[str, Callable[[Path], None], int, float | None, str | None, str | None]] = [
    ("one_corrupt_among_good", lambda d: _mixed(d, "bad.png", b"garbage"), 2, None, None,
     "skipping 1 unreadable image(s) of 3"),
    ("truncated_png_among_good", _truncated_png, 2, None, None, "big.png"),
    ("dangling_link_among_good", lambda d: _mixed(d, "link.png", None), 2, None, None, "link.png"),
    ("some_captions_missing", lambda d: (_folder(d), (d / "1.txt").unlink()), 2, None, PROMPT,
     "1 of 2 image(s) have no caption"),
    ("caption_not_utf8", _caption_bytes(b"caf\xe9 photo"), 1, None, "caf\ufffd photo", "is not UTF-8"),
    ("caption_utf8_bom", _caption_bytes(b"\xef\xbb\xbfa photo"), 1, None, "a photo", None),
    ("mode_L", _one("L", 255), 1, 1.0, PROMPT, None),
    ("mode_1_bit", _one("1", 0), 1, -1.0, PROMPT, None),
    ("mode_RGBA", _one("RGBA", (255, 255, 255, 0)), 1, 1.0, PROMPT, None),
    ("mode_LA", _one("LA", (0, 255)), 1, -1.0, PROMPT, None),
    ("mode_P_palette", _one("P", 0), 1, -1.0, PROMPT, None),
    ("mode_CMYK_jpeg", _one("CMYK", (0, 0, 0, 0), name="0.jpg", fmt="JPEG"), 1, 1.0, PROMPT, None),
    ("png_16_bit_white", _one("I;16", 65535), 1, 1.0, PROMPT, None),
    ("png_16_bit_black", _one("I;16", 0), 1, -1.0, PROMPT, None),
    ("image_1x1", _one("RGB", (255, 255, 255), size=(1, 1)), 1, 1.0, PROMPT, None),
    ("aspect_100_to_1", _one("RGB", (0, 0, 0), size=(200, 2)), 1, -1.0, PROMPT, "aspect ratio over 4:1"),
    ("webp_and_bmp", lambda d: (_one("RGB", (0, 0, 0), name="a.webp")(d), _one("RGB", (0, 0, 0), name="b.bmp")(d)),
     2, -1.0, PROMPT, None),
]


@pytest.mark.parametrize("make, kept, value, caption, warning", [c[1:] for c in DATA_WORKS],
                         ids=[c[0] for c in DATA_WORKS])
def test_odd_data_works(tmp_path: Path, tiny_sd_dir: str, caplog: pytest.LogCaptureFixture, make: Any, kept: int,
                        value: float | None, caption: str | None, warning: str | None) -> None:
    c = Ctx(tmp_path, tiny_sd_dir, Path())
    Path(c.data()).mkdir()
    make(Path(c.data()))
    caplog.set_level(logging.WARNING, logger="lokr_diffusers")
    ds = build_dataset(parse("t", dreambooth=False, argv=c.base()))
    assert len(ds) == kept
    item = ds[0]
    x = item["pixel_values"]
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    if value is not None:
        assert torch.allclose(x, torch.full_like(x, value), atol=0.02), (x.min(), x.max())
    if caption is not None:
        assert item["caption"] == caption
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warning is None:
        assert not warnings, warnings
    else:
        assert any(warning in w for w in warnings), warnings
    assert not c.out.exists()


# ------------------------------------------------------------------------------ checkpoints: which one

def _leftover_tmp(out: Path) -> None:
    (out / ".checkpoint-2.tmp-dead").mkdir()
    (out / ".checkpoint-2.tmp-dead" / "adapter.safetensors").write_bytes(b"half")


# (id, damage done to the output folder beside a complete checkpoint-1, what `latest` picks, log fragment)
LATEST_CASES: list[tuple[str, Callable[[Ctx], None], str | None, str]] = [
    ("skips_temporary_folder", lambda c: _leftover_tmp(c.out), "checkpoint-1", "ignoring 1 unfinished checkpoint"),
    ("skips_no_state_json", lambda c: c.checkpoint(_remove("state.json"), "checkpoint-2"), "checkpoint-1",
     "skipping checkpoint-2, not a complete checkpoint"),
    ("skips_missing_optimizer", lambda c: c.checkpoint(_remove("optimizer.pt"), "checkpoint-2"), "checkpoint-1",
     "optimizer.pt is missing"),
    ("skips_truncated_adapter", lambda c: c.checkpoint(_truncate("adapter.safetensors"), "checkpoint-2"),
     "checkpoint-1", "truncated or changed"),
    ("skips_truncated_scheduler", lambda c: c.checkpoint(_truncate("scheduler.pt"), "checkpoint-2"), "checkpoint-1",
     "scheduler.pt has"),
    ("skips_rotten_optimizer", lambda c: c.checkpoint(_rot("optimizer.pt"), "checkpoint-2"), "checkpoint-1",
     "optimizer.pt: its sha256 differs from the one state.json recorded"),
    ("skips_rotten_adapter", lambda c: c.checkpoint(_rot("adapter.safetensors"), "checkpoint-2"), "checkpoint-1",
     "checkpoint-2/adapter.safetensors: its sha256 differs"),
    ("skips_rotten_scheduler", lambda c: c.checkpoint(_write("scheduler.pt", _flipped(c.template / "scheduler.pt")),
                                                      "checkpoint-2"), "checkpoint-1", "scheduler.pt: its sha256"),
    ("skips_empty_folder", lambda c: (c.out / "checkpoint-3").mkdir(), "checkpoint-1", "skipping checkpoint-3"),
    ("none_complete", lambda c: shutil.rmtree(c.out / "checkpoint-1") or c.checkpoint(_remove("state.json")),
     None, "skipping checkpoint-1"),
]


@pytest.mark.parametrize("damage, picked, log", [c[1:] for c in LATEST_CASES], ids=[c[0] for c in LATEST_CASES])
def test_latest_is_the_newest_complete_checkpoint(ctx: Ctx, caplog: pytest.LogCaptureFixture, damage: Any,
                                                  picked: str | None, log: str) -> None:
    ctx.checkpoint()
    damage(ctx)
    before = _snapshot(ctx.tmp)
    caplog.set_level(logging.WARNING, logger="lokr_diffusers")
    found = checkpoint.resolve(str(ctx.out), "latest")
    assert found == (str(ctx.out / picked) if picked else None)
    assert any(log in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert _snapshot(ctx.tmp) == before  # choosing reads only


def _flipped(path: Path) -> bytes:
    """The file's bytes with one bit of its last byte flipped (same size)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    return bytes(data)


def test_checkpoint_records_each_file_sha256(ctx: Ctx) -> None:
    folder = Path(ctx.checkpoint())
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    names = ("adapter.safetensors", "optimizer.pt", "scheduler.pt")
    assert state["sha256"] == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_checkpoint_without_hashes_still_resumes(ctx: Ctx, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written before hashes were recorded (state.json without "sha256") is checked by size, as then."""
    folder = ctx.checkpoint(_strip_hashes)
    caplog.set_level(logging.WARNING, logger="lokr_diffusers")
    assert checkpoint.resolve(str(ctx.out), "latest") == folder
    assert checkpoint.resolve(str(ctx.out), "checkpoint-1") == folder
    assert not caplog.records
    model, optimizer, scheduler = _tiny_model()
    with torch.no_grad():  # other values than the checkpoint's, so that loading shows
        for p in optimizer.param_groups[0]["params"]:
            p.add_(1.0)
    assert checkpoint.load(folder, {"m": model}, "default", optimizer, scheduler) == 1
    saved = load_file(os.path.join(folder, "adapter.safetensors"))
    factors = {f"m.{path}.{k}": t for path, layer in lokr_layers(model) for k, t in layer.factors("default").items()}
    assert factors.keys() == saved.keys() and all(torch.equal(t, saved[k]) for k, t in factors.items())


def test_resume_latest_skips_a_rotten_checkpoint(tmp_path: Path, tiny_sd_dir: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Through `train`: checkpoint-2's optimizer state rots (a tensor of NaN, size unchanged); resuming with
    `latest` warns, naming the file, resumes from checkpoint-1 and ends with finite weights."""
    c = Ctx(tmp_path, tiny_sd_dir, Path())
    _folder(Path(c.data()))
    train(parse("t", False, c.base("--max_train_steps", "2", "--checkpointing_steps", "1")))
    _rot("optimizer.pt")(c.out / "checkpoint-2")
    caplog.set_level(logging.INFO, logger="lokr_diffusers")
    result = train(parse("t", False, c.base("--max_train_steps", "3", "--checkpointing_steps", "1",
                                            "--resume_from_checkpoint", "latest")))
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint-2" in m and "optimizer.pt: its sha256 differs" in m for m in messages), messages
    assert any(f"resumed from {c.out / 'checkpoint-1'} at step 1" in m for m in messages), messages
    adapter = load_file(result.files["lokr"])
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values() if t.is_floating_point())
    assert checkpoint.read_state(str(c.out / "checkpoint-3"))["global_step"] == 3


# ----------------------------------------------------------------------- checkpoints: loading a wrong one

# (id, damage to checkpoint-1 or None, the config of the run that resumes, error fragment)
LOAD_CASES: list[tuple[str, Callable[[Path], None] | None, dict[str, Any], str]] = [
    ("other_shapes", None, {"decompose_factor": 2}, "differ in shape (e.g. m.model.0.lokr_w1: (4, 4) saved, (2, 2)"),
    ("other_tensors", None, {"r": 4}, "of this run's tensors are not in it"),
    ("old_format_truncated_optimizer", lambda f: (_truncate("optimizer.pt")(f), _write(
        "state.json", b'{"global_step": 1}')(f)), {}, "a file is corrupt"),
    ("rotten_adapter", _rot("adapter.safetensors"), {}, "adapter.safetensors: its sha256 differs"),
    ("rotten_optimizer", _rot("optimizer.pt"), {}, "optimizer.pt: its sha256 differs"),
    ("optimizer_of_another_run", lambda f: torch.save({"state": {}, "param_groups": []}, f / "optimizer.pt")
     or _write("state.json", b'{"global_step": 1}')(f), {}, "does not fit this run's optimizer"),
]


@pytest.mark.parametrize("damage, config, fragment", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_loading_a_wrong_checkpoint_changes_nothing(ctx: Ctx, damage: Any, config: dict[str, Any],
                                                    fragment: str) -> None:
    folder = ctx.checkpoint(damage)
    model, optimizer, scheduler = _tiny_model(**config)
    weights, opt_state = _state(model), repr(optimizer.state_dict())
    before = _snapshot(ctx.tmp)
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(folder, {"m": model}, "default", optimizer, scheduler)
    assert fragment in str(exc.value) and folder in str(exc.value)
    assert all(torch.equal(v, _state(model)[k]) for k, v in weights.items())
    assert repr(optimizer.state_dict()) == opt_state and _snapshot(ctx.tmp) == before


def test_resume_from_another_adapter_trains_nothing(tmp_path: Path, tiny_sd_dir: str) -> None:
    """Through `train`: a checkpoint written with --rank 4 and a run with --rank 2 (real model)."""
    from diffusers import DiffusionPipeline

    from lokr_diffusers.pipeline import add_lokr
    from lokr_diffusers.training.loop import ADAPTER, lokr_configs, trainable_parameters

    c = Ctx(tmp_path, tiny_sd_dir, Path())
    _folder(Path(c.data()))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    add_lokr(pipe, lokr_configs(parse("t", False, c.base("--rank", "4")), ["unet"]), ADAPTER)
    optimizer = torch.optim.AdamW(trainable_parameters(pipe, ["unet"]))
    checkpoint.save(str(c.out), 1, {"unet": pipe.unet}, ADAPTER, optimizer,
                    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint-1 was written for another adapter"):
        train(parse("t", False, c.base("--resume_from_checkpoint", "latest")))
    assert _snapshot(tmp_path) == before  # no loss log, no output file, checkpoint-1 intact


# ---------------------------------------------------------------------------- checkpoints: faulty saves

class Boom(OSError):
    pass


def _fail_at(name: str) -> Callable[[str], None]:
    real = checkpoint._fsync_file

    def fsync(path: str) -> None:
        real(path)
        if path.endswith(name):
            raise Boom(28, "No space left on device (simulated)")
    return fsync


# (id, prepare the output folder, file after whose write the save fails or None, limit, checkpoints after)
SAVE_CASES: list[tuple[str, Callable[[Ctx], None], str | None, int | None, list[str]]] = [
    ("disk_full_mid_save", lambda c: None, "optimizer.pt", None, ["checkpoint-1"]),
    ("disk_full_with_limit_1", lambda c: None, "scheduler.pt", 1, ["checkpoint-1"]),
    ("disk_full_at_marker", lambda c: None, "state.json", 1, ["checkpoint-1"]),
    ("limit_1_after_success", lambda c: None, None, 1, ["checkpoint-2"]),
    ("limit_2_after_success", lambda c: c.checkpoint(name="checkpoint-0"), None, 2, ["checkpoint-1", "checkpoint-2"]),
    ("replaces_existing_step", lambda c: c.checkpoint(name="checkpoint-2"), None, None,
     ["checkpoint-1", "checkpoint-2"]),
    ("failed_replace_keeps_old", lambda c: c.checkpoint(name="checkpoint-2"), "adapter.safetensors", None,
     ["checkpoint-1", "checkpoint-2"]),
    ("cleans_crash_leftovers", lambda c: (_leftover_tmp(c.out), (c.out / ".checkpoint-0.del-x").mkdir()), None,
     None, ["checkpoint-1", "checkpoint-2"]),
    ("restores_set_aside", lambda c: (c.out / "checkpoint-1").rename(c.out / ".checkpoint-1.old-x"), None, None,
     ["checkpoint-1", "checkpoint-2"]),
]


@pytest.mark.parametrize("prepare, fail_after, limit, after", [c[1:] for c in SAVE_CASES],
                         ids=[c[0] for c in SAVE_CASES])
def test_checkpoint_saves_are_all_or_nothing(ctx: Ctx, monkeypatch: pytest.MonkeyPatch, prepare: Any,
                                             fail_after: str | None, limit: int | None, after: list[str]) -> None:
    ctx.checkpoint()
    prepare(ctx)
    model, optimizer, scheduler = _tiny_model()
    old = {n: _snapshot(p) for n in ("checkpoint-1", "checkpoint-2")
           for p in (ctx.out / n, ctx.out / f".{n}.old-x") if p.is_dir()}  # set aside: restored as it was
    if fail_after is not None:
        monkeypatch.setattr(checkpoint, "_fsync_file", _fail_at(fail_after))
        with pytest.raises(Boom):
            _save(ctx.out, 2, model, optimizer, scheduler, limit)
    else:
        _save(ctx.out, 2, model, optimizer, scheduler, limit)
    names = sorted(os.listdir(ctx.out))
    assert names == after, names  # no temporary or hidden folder left either way
    for name in after:
        if fail_after is not None or name != "checkpoint-2":
            assert _snapshot(ctx.out / name) == old[name], name  # untouched
        assert checkpoint.incomplete_reason(str(ctx.out / name)) is None
    if fail_after is None:
        assert checkpoint.read_state(str(ctx.out / "checkpoint-2"))["global_step"] == 2


def test_save_into_a_file_fails_and_changes_nothing(ctx: Ctx) -> None:
    target = Path(ctx.file("out_file"))
    before = _snapshot(ctx.tmp)
    with pytest.raises(FileExistsError):
        _save(target, 1, *_tiny_model())
    assert _snapshot(ctx.tmp) == before


KILLER = """
import os, signal, sys
import torch
from torch import nn
from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.training import checkpoint

out = sys.argv[1]
model = LoKrModel(nn.Sequential(nn.Linear(8, 8)), LoKrConfig(r=2, target_modules=["0"]), "default")
opt = torch.optim.AdamW([p for _, l in lokr_layers(model) for p in l.factors("default").values()])
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
checkpoint.save(out, 1, {"m": model}, "default", opt, sched, 1)
real = checkpoint._fsync_file

def die(path):
    real(path)
    if ".checkpoint-2.tmp-" in path and path.endswith("scheduler.pt"):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._fsync_file = die
checkpoint.save(out, 2, {"m": model}, "default", opt, sched, 1)
"""


def test_sigkill_inside_checkpoint_save(tmp_path: Path) -> None:
    """A process killed (SIGKILL, from inside the save, so not timed) while it writes checkpoint-2 with
    --checkpoints_total_limit 1: checkpoint-1 survives whole, `latest` picks it, the next save cleans up."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert names[-1] == "checkpoint-1" and len(names) == 2 and names[0].startswith(".checkpoint-2.tmp-"), names
    assert sorted(os.listdir(out / names[0])) == ["adapter.safetensors", "optimizer.pt", "scheduler.pt"]
    assert checkpoint.resolve(str(out), "latest") == str(out / "checkpoint-1")
    with pytest.raises(CheckpointError, match=r"no state\.json"):
        checkpoint.resolve(str(out), str(out / names[0]))
    model = LoKrModel(nn.Sequential(nn.Linear(8, 8)), LoKrConfig(r=2, target_modules=["0"]), "default")
    opt = torch.optim.AdamW([p for _, layer in lokr_layers(model) for p in layer.factors("default").values()])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert checkpoint.load(str(out / "checkpoint-1"), {"m": model}, "default", opt, sched) == 1
    checkpoint.save(str(out), 2, {"m": model}, "default", opt, sched, 1)
    assert sorted(os.listdir(out)) == ["checkpoint-2"]


# ------------------------------------------------------------------------------ the model and its state

def _fake_pipe(vae_levels: int, unet_levels: int, text_encoder_2: bool = False) -> SimpleNamespace:
    return SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[1] * vae_levels)),
                           unet=SimpleNamespace(config=SimpleNamespace(down_block_types=["D"] * unet_levels)),
                           text_encoder=object(), tokenizer=object(),
                           text_encoder_2=object() if text_encoder_2 else None)


# (id, pipeline, --resolution, --sdxl, error fragment or None when it fits)
PIPELINE_CASES: list[tuple[str, SimpleNamespace, int, bool, str | None]] = [
    ("sd15_at_32", _fake_pipe(4, 4), 32, False, "needs a multiple of 8 of at least 64"),
    ("sd15_at_64", _fake_pipe(4, 4), 64, False, None),
    ("sdxl_at_24", _fake_pipe(4, 3, True), 24, False, "of at least 32"),
    ("sdxl_at_32", _fake_pipe(4, 3, True), 32, True, None),
    ("vae_16x_at_40", _fake_pipe(5, 1), 40, False, "needs a multiple of 16"),
    ("tiny_at_8", _fake_pipe(2, 2), 8, False, None),
    ("sdxl_flag_on_sd1", _fake_pipe(4, 4), 512, True, "--sdxl: m has no text_encoder_2"),
    ("no_unet", SimpleNamespace(vae=None, unet=None, text_encoder=None, tokenizer=None), 512, False,
     "without unet, vae, text_encoder, tokenizer"),
]


@pytest.mark.parametrize("pipe, resolution, sdxl, fragment", [c[1:] for c in PIPELINE_CASES],
                         ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_fits_the_resolution(pipe: SimpleNamespace, resolution: int, sdxl: bool, fragment: str | None) -> None:
    args = SimpleNamespace(pretrained_model_name_or_path="m", resolution=resolution, sdxl=sdxl)
    if fragment is None:
        check_pipeline(pipe, args)
    else:
        with pytest.raises(TrainingInputError) as exc:
            check_pipeline(pipe, args)
        assert fragment in str(exc.value)


def test_training_refuses_a_fused_adapter() -> None:
    model, _, _ = _tiny_model()
    check_not_fused({"m": model}, "default")
    model.merge_adapter()
    weights = _state(model)
    with pytest.raises(AdapterFusedError, match=r"'default' is fused into 2 layer.*unfuse it before training"):
        check_not_fused({"m": model}, "default")
    assert all(torch.equal(v, _state(model)[k]) for k, v in weights.items())
