"""The training side's catalogue of bad input: arguments, data, the pipeline and the adapter's state; one tuple
per case.

Each case asserts the error class and a fragment of its message (or, where the right behaviour is to
work with a warning, that it works and what the warning says), and that nothing was written or damaged:
the files under the test's folder are byte-for-byte what they were, no output folder appears. The checks
are tested where they live (argument parsing, the data readers, the pipeline checks); the inputs, the tiny
model and the damaged checkpoints the arguments name come from tests/helpers/training_faults.py.
Checkpoints (which one `latest` picks, a wrong one, faulty saves, SIGKILL):
tests/test_reliability_training_checkpoints.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers.training_faults import (
    PROMPT,
    Ctx,
    image,
    image_folder,
    model_state,
    remove,
    rot,
    snapshot,
    tiny_model,
    truncate,
    write,
)
from PIL import Image

from lokr_diffusers.training.args import parse
from lokr_diffusers.training.checks import check_not_fused, check_pipeline
from lokr_diffusers.training.errors import AdapterFusedError, InputNotFoundError, TrainingInputError
from lokr_diffusers.training.run import build_dataset, main

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
    ("resume_no_state", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(remove("state.json"))),
     "no state.json (not a checkpoint, or its save did not finish)"),
    ("resume_no_optimizer", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(remove("optimizer.pt"))),
     "optimizer.pt is missing"),
    ("resume_truncated_adapter", lambda c: c.base("--resume_from_checkpoint",
                                                  c.checkpoint(truncate("adapter.safetensors"))),
     "adapter.safetensors has"),
    ("resume_rotten_optimizer", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(rot("optimizer.pt"))),
     "optimizer.pt: its sha256 differs from the one state.json recorded"),
    ("resume_rotten_adapter", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(rot("adapter.safetensors"))),
     "adapter.safetensors: its sha256 differs from the one state.json recorded"),
    ("resume_bad_state_json", lambda c: c.base("--resume_from_checkpoint", c.checkpoint(write("state.json", b"{"))),
     "state.json: unreadable"),
    ("resume_state_without_step", lambda c: c.base("--resume_from_checkpoint",
                                                   c.checkpoint(write("state.json", b'{"step": 1}'))),
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
    before = snapshot(ctx.tmp)
    with pytest.raises(SystemExit) as exc:
        parse("t", dreambooth="--instance_prompt" in argv, argv=argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], err
    assert snapshot(ctx.tmp) == before  # nothing written, nothing damaged


# ------------------------------------------------------------------------------- data: refused up front

def _metadata(text: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        image_folder(d, captions=False)
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
    ("all_captions_missing", "t2i", lambda d: image_folder(d, captions=False), TrainingInputError,
     "none of the 2 image(s) has a caption; add a metadata.jsonl"),
    ("all_captions_blank", "t2i", lambda d: (image_folder(d, captions=False), (d / "0.txt").write_text("  \n"),
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
    ("db_class_folder_empty", "db_prior", lambda d: (image_folder(d), (d.parent / "cls").mkdir()), TrainingInputError,
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
    before = snapshot(tmp_path)
    with pytest.raises(error) as exc:
        build_dataset(args)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert snapshot(tmp_path) == before and not c.out.exists()


def test_data_error_through_the_script_entry_point(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    """`main` (what the example scripts call) turns a data error into argparse's exit: code 2, one line."""
    for f in Path(ctx.data()).glob("*.txt"):
        f.unlink()
    before = snapshot(ctx.tmp)
    with pytest.raises(SystemExit) as exc:
        main("t", dreambooth=False, argv=ctx.base())
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert next(line for line in err.splitlines() if "error:" in line).endswith("(0001.png -> 0001.txt)")
    assert snapshot(ctx.tmp) == before and not ctx.out.exists()


# ----------------------------------------------------------------------------- data: works, with a warning

def _mixed(d: Path, bad: str, data: bytes | None) -> None:
    image_folder(d)
    if data is None:
        os.symlink(d / "nowhere.png", d / bad)
    else:
        (d / bad).write_bytes(data)


def _truncated_png(d: Path) -> None:
    image_folder(d)
    Image.effect_noise((64, 64), 50).save(d / "big.png")
    raw = (d / "big.png").read_bytes()
    (d / "big.png").write_bytes(raw[: len(raw) // 2])


def _one(mode: str, color: Any, size: tuple[int, int] = (16, 16), name: str = "0.png",
         fmt: str | None = None) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        image(d / name, mode, size, color, fmt)
        (d / name).with_suffix(".txt").write_text(PROMPT, encoding="utf-8")
    return make


def _caption_bytes(data: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        image_folder(d, n=1, captions=False)
        (d / "0.txt").write_bytes(data)
    return make


# (id, make the folder, images kept, the pixel value all of item 0 must have or None, caption of item 0 or
# None, a warning fragment or None)
DATA_WORKS: list[tuple[str, Callable[[Path], None], int, float | None, str | None, str | None]] = [
    ("one_corrupt_among_good", lambda d: _mixed(d, "bad.png", b"garbage"), 2, None, None,
     "skipping 1 unreadable image(s) of 3"),
    ("truncated_png_among_good", _truncated_png, 2, None, None, "big.png"),
    ("dangling_link_among_good", lambda d: _mixed(d, "link.png", None), 2, None, None, "link.png"),
    ("some_captions_missing", lambda d: (image_folder(d), (d / "1.txt").unlink()), 2, None, PROMPT,
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
    model, _, _ = tiny_model()
    check_not_fused({"m": model}, "default")
    model.merge_adapter()
    weights = model_state(model)
    with pytest.raises(AdapterFusedError, match=r"'default' is fused into 2 layer.*unfuse it before training"):
        check_not_fused({"m": model}, "default")
    assert all(torch.equal(v, model_state(model)[k]) for k, v in weights.items())
