"""The training side's catalogue of checkpoint faults: one tuple per case.

Which checkpoint `latest` picks beside damaged ones (temporary folders, missing or truncated files, a file rotten
in place), loading a wrong checkpoint, saves failing midway (disk full) and the total limit. Each case asserts the
error class and a fragment of its message (or, where the right behaviour is to work with a warning, what the
warning says), and that nothing was written or damaged: the files under the test's folder are byte-for-byte what
they were, old checkpoints stay intact. The checks are tested in the checkpoint module; the real training loop
runs only for the cases that need the loaded model. The tiny model, its checkpoints and the damage come from
tests/helpers/training_faults.py. The end-to-end SIGKILL of a training run is in test_training_resume_ddp.py;
here a small subprocess kills itself inside `checkpoint.save`. Arguments, data, the pipeline and a fused adapter:
tests/test_reliability_training_inputs.py.
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
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.training_faults import (
    Ctx,
    image_folder,
    model_state,
    remove,
    rot,
    save_checkpoint,
    snapshot,
    tiny_model,
    truncate,
    write,
)
from safetensors.torch import load_file
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.training import checkpoint
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.errors import CheckpointError
from lokr_diffusers.training.run import train

ROOT = Path(__file__).resolve().parents[1]


def _strip_hashes(folder: Path) -> None:
    """state.json as checkpoints written before hashes were recorded had it: the step, the tensor count, sizes."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    state.pop("sha256", None)
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")


# ------------------------------------------------------------------------------ checkpoints: which one

def _leftover_tmp(out: Path) -> None:
    (out / ".checkpoint-2.tmp-dead").mkdir()
    (out / ".checkpoint-2.tmp-dead" / "adapter.safetensors").write_bytes(b"half")


# (id, damage done to the output folder beside a complete checkpoint-1, what `latest` picks, log fragment)
LATEST_CASES: list[tuple[str, Callable[[Ctx], None], str | None, str]] = [
    ("skips_temporary_folder", lambda c: _leftover_tmp(c.out), "checkpoint-1", "ignoring 1 unfinished checkpoint"),
    ("skips_no_state_json", lambda c: c.checkpoint(remove("state.json"), "checkpoint-2"), "checkpoint-1",
     "skipping checkpoint-2, not a complete checkpoint"),
    ("skips_missing_optimizer", lambda c: c.checkpoint(remove("optimizer.pt"), "checkpoint-2"), "checkpoint-1",
     "optimizer.pt is missing"),
    ("skips_truncated_adapter", lambda c: c.checkpoint(truncate("adapter.safetensors"), "checkpoint-2"),
     "checkpoint-1", "truncated or changed"),
    ("skips_truncated_scheduler", lambda c: c.checkpoint(truncate("scheduler.pt"), "checkpoint-2"), "checkpoint-1",
     "scheduler.pt has"),
    ("skips_rotten_optimizer", lambda c: c.checkpoint(rot("optimizer.pt"), "checkpoint-2"), "checkpoint-1",
     "optimizer.pt: its sha256 differs from the one state.json recorded"),
    ("skips_rotten_adapter", lambda c: c.checkpoint(rot("adapter.safetensors"), "checkpoint-2"), "checkpoint-1",
     "checkpoint-2/adapter.safetensors: its sha256 differs"),
    ("skips_rotten_scheduler", lambda c: c.checkpoint(write("scheduler.pt", _flipped(c.template / "scheduler.pt")),
                                                      "checkpoint-2"), "checkpoint-1", "scheduler.pt: its sha256"),
    ("skips_empty_folder", lambda c: (c.out / "checkpoint-3").mkdir(), "checkpoint-1", "skipping checkpoint-3"),
    ("none_complete", lambda c: shutil.rmtree(c.out / "checkpoint-1") or c.checkpoint(remove("state.json")),
     None, "skipping checkpoint-1"),
]


@pytest.mark.parametrize("damage, picked, log", [c[1:] for c in LATEST_CASES], ids=[c[0] for c in LATEST_CASES])
def test_latest_is_the_newest_complete_checkpoint(ctx: Ctx, caplog: pytest.LogCaptureFixture, damage: Any,
                                                  picked: str | None, log: str) -> None:
    ctx.checkpoint()
    damage(ctx)
    before = snapshot(ctx.tmp)
    caplog.set_level(logging.WARNING, logger="lokr_diffusers")
    found = checkpoint.resolve(str(ctx.out), "latest")
    assert found == (str(ctx.out / picked) if picked else None)
    assert any(log in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert snapshot(ctx.tmp) == before  # choosing reads only


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
    model, optimizer, scheduler = tiny_model()
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
    image_folder(Path(c.data()))
    train(parse("t", False, c.base("--max_train_steps", "2", "--checkpointing_steps", "1")))
    rot("optimizer.pt")(c.out / "checkpoint-2")
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
    ("old_format_truncated_optimizer", lambda f: (truncate("optimizer.pt")(f), write(
        "state.json", b'{"global_step": 1}')(f)), {}, "a file is corrupt"),
    ("rotten_adapter", rot("adapter.safetensors"), {}, "adapter.safetensors: its sha256 differs"),
    ("rotten_optimizer", rot("optimizer.pt"), {}, "optimizer.pt: its sha256 differs"),
    ("optimizer_of_another_run", lambda f: torch.save({"state": {}, "param_groups": []}, f / "optimizer.pt")
     or write("state.json", b'{"global_step": 1}')(f), {}, "does not fit this run's optimizer"),
]


@pytest.mark.parametrize("damage, config, fragment", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_loading_a_wrong_checkpoint_changes_nothing(ctx: Ctx, damage: Any, config: dict[str, Any],
                                                    fragment: str) -> None:
    folder = ctx.checkpoint(damage)
    model, optimizer, scheduler = tiny_model(**config)
    weights, opt_state = model_state(model), repr(optimizer.state_dict())
    before = snapshot(ctx.tmp)
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(folder, {"m": model}, "default", optimizer, scheduler)
    assert fragment in str(exc.value) and folder in str(exc.value)
    assert all(torch.equal(v, model_state(model)[k]) for k, v in weights.items())
    assert repr(optimizer.state_dict()) == opt_state and snapshot(ctx.tmp) == before


def test_resume_from_another_adapter_trains_nothing(tmp_path: Path, tiny_sd_dir: str) -> None:
    """Through `train`: a checkpoint written with --rank 4 and a run with --rank 2 (real model)."""
    from diffusers import DiffusionPipeline

    from lokr_diffusers.pipeline import add_lokr
    from lokr_diffusers.training.loop import ADAPTER, lokr_configs, trainable_parameters

    c = Ctx(tmp_path, tiny_sd_dir, Path())
    image_folder(Path(c.data()))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    add_lokr(pipe, lokr_configs(parse("t", False, c.base("--rank", "4")), ["unet"]), ADAPTER)
    optimizer = torch.optim.AdamW(trainable_parameters(pipe, ["unet"]))
    checkpoint.save(str(c.out), 1, {"unet": pipe.unet}, ADAPTER, optimizer,
                    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint-1 was written for another adapter"):
        train(parse("t", False, c.base("--resume_from_checkpoint", "latest")))
    assert snapshot(tmp_path) == before  # no loss log, no output file, checkpoint-1 intact


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
    model, optimizer, scheduler = tiny_model()
    old = {n: snapshot(p) for n in ("checkpoint-1", "checkpoint-2")
           for p in (ctx.out / n, ctx.out / f".{n}.old-x") if p.is_dir()}  # set aside: restored as it was
    if fail_after is not None:
        monkeypatch.setattr(checkpoint, "_fsync_file", _fail_at(fail_after))
        with pytest.raises(Boom):
            save_checkpoint(ctx.out, 2, model, optimizer, scheduler, limit)
    else:
        save_checkpoint(ctx.out, 2, model, optimizer, scheduler, limit)
    names = sorted(os.listdir(ctx.out))
    assert names == after, names  # no temporary or hidden folder left either way
    for name in after:
        if fail_after is not None or name != "checkpoint-2":
            assert snapshot(ctx.out / name) == old[name], name  # untouched
        assert checkpoint.incomplete_reason(str(ctx.out / name)) is None
    if fail_after is None:
        assert checkpoint.read_state(str(ctx.out / "checkpoint-2"))["global_step"] == 2


def test_save_into_a_file_fails_and_changes_nothing(ctx: Ctx) -> None:
    target = Path(ctx.file("out_file"))
    before = snapshot(ctx.tmp)
    with pytest.raises(FileExistsError):
        save_checkpoint(target, 1, *tiny_model())
    assert snapshot(ctx.tmp) == before


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
