"""The text-to-image example script end to end in subprocesses (CPU): exact resume after an
interruption, a SIGKILL in the middle of writing a checkpoint, and a 2-process torchrun (gloo) run.

Resume: the cosine schedule's length is --max_train_steps, so an interrupted run must be started
with the full --max_train_steps and stopped from outside, as a crash or a preemption stops it:
the test kills the process (SIGKILL) once checkpoint-3 is complete, then resumes with "latest".

Distributed: only rank 0 writes, so each rank's final adapter is read through a test-only launcher
that runs the unchanged example script (runpy) with `Accelerator.end_training` wrapped to dump that
rank's adapter tensors; no library code is changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lokr_diffusers.training.data import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "train_text_to_image_lokr.py")
OURS = "pytorch_lokr_weights.safetensors"
OURS_PREFIX = "lokr.default."  # our file's key = this + a checkpoint key (plus alpha / lokr_scale entries)
RESOLUTION = 32  # the tiny UNet (two down blocks) and VAE take 32x32 images: 8x8 latents


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _common(model: str, data: str, out: str, steps: int, checkpointing: int) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", str(RESOLUTION),
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing),
            "--seed", "0", "--rank", "2", "--use_effective_conv2d", "--unet_target_modules", "full",
            "--train_text_encoder", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
            "--gradient_accumulation_steps", "2", "--export_format", "none", "--output_dir", out]


def _run(cmd: list[str], log: Path, env: dict[str, str], timeout: float = 300) -> str:
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    text = log.read_text(encoding="utf-8")
    assert rc == 0, f"{' '.join(cmd)} exited with {rc}:\n{text[-4000:]}"
    return text


def _checkpoint_done(folder: Path, step: int) -> bool:
    """state.json is the last file checkpoint.save writes; once it parses, the folder is complete."""
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))["global_step"] == step
    except (OSError, ValueError, KeyError):
        return False


def _run_until_checkpoint(cmd: list[str], out: Path, step: int, log: Path, env: dict[str, str],
                          timeout: float = 300) -> None:
    """Start the run and SIGKILL it as soon as checkpoint-<step> is complete (a crash / preemption)."""
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _checkpoint_done(out / f"checkpoint-{step}", step):
                if proc.poll() is not None:
                    pytest.fail(f"run ended (rc {proc.returncode}) before checkpoint-{step}:\n"
                                f"{log.read_text(encoding='utf-8')[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint-{step} after {timeout} s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical (the key sets must match)."""
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _factors_of_our_file(path: Path) -> dict[str, torch.Tensor]:
    """Our file's adapter factors, keyed as in checkpoints (alpha / lokr_scale entries left out)."""
    return {k[len(OURS_PREFIX):]: v for k, v in load_file(str(path)).items()
            if k.startswith(OURS_PREFIX) and k.rsplit(".", 1)[-1] not in ("alpha", "lokr_scale")}


def _losses(out: Path) -> list[dict[str, float]]:
    with open(out / "loss.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("resume_data")), n=8, size=RESOLUTION, seed=0)


def test_resume_after_interruption_is_exact(tiny_sd_dir: str, data_dir: str, tmp_path: Path) -> None:
    env = _env()
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    # A: uninterrupted, 6 steps.
    _run([sys.executable, EXAMPLE, *_common(tiny_sd_dir, data_dir, str(a), 6, 3)], tmp_path / "A.log", env)
    assert [r["step"] for r in _losses(a)] == [1, 2, 3, 4, 5, 6]
    final_a = load_file(str(a / OURS))
    ckpt3_a = load_file(str(a / "checkpoint-3" / "adapter.safetensors"))
    assert _factors_of_our_file(a / OURS).keys() == ckpt3_a.keys()
    assert _equal(_factors_of_our_file(a / OURS), ckpt3_a), "steps 4-6 did not change the adapter"
    assert not _equal(_factors_of_our_file(a / OURS), load_file(str(a / "checkpoint-6" / "adapter.safetensors")))

    # C: resume from A's checkpoint-3 (a path) into a fresh folder: the resume mechanics alone, from
    # the very tensors A had at step 3, so this holds whether or not two fresh runs start alike.
    _run([sys.executable, EXAMPLE, *_common(tiny_sd_dir, data_dir, str(c), 6, 3),
          "--resume_from_checkpoint", str(a / "checkpoint-3")], tmp_path / "C.log", env)
    assert [r["step"] for r in _losses(c)] == [4, 5, 6]
    assert _losses(c) == _losses(a)[3:], "resumed steps 4-6 logged other losses / learning rates"
    diff = _equal(load_file(str(c / OURS)), final_a)
    assert not diff, (f"resumed from A's checkpoint-3: {len(diff)} tensors differ from A's final "
                      f"(max |diff| {_max_diff(load_file(str(c / OURS)), final_a):.3g}), e.g. {diff[:3]}")

    # B: the same full-length command as A, killed once checkpoint-3 is written, then resumed with "latest".
    cmd_b = [sys.executable, EXAMPLE, *_common(tiny_sd_dir, data_dir, str(b), 6, 3)]
    _run_until_checkpoint(cmd_b, b, 3, tmp_path / "B1.log", env)
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (b / OURS).exists()
    ckpt3_b = load_file(str(b / "checkpoint-3" / "adapter.safetensors"))
    log2 = _run([*cmd_b, "--resume_from_checkpoint", "latest"], tmp_path / "B2.log", env)
    assert "resumed from" in log2 and "checkpoint-3 at step 3" in log2
    final_b = load_file(str(b / OURS))
    # The first half of B is A's first half (same arguments, same --seed, nothing resumed yet).
    diff = _equal(ckpt3_b, ckpt3_a)
    assert not diff, (f"two runs with identical arguments and --seed 0 differ at checkpoint-3 ({len(diff)} of "
                      f"{len(ckpt3_a)} tensors, max |diff| {_max_diff(ckpt3_b, ckpt3_a):.3g}), before any resume: "
                      "the training run is not reproducible (is the adapter's initialisation seeded?)")
    diff = _equal(final_b, final_a)
    assert not diff, (f"interrupted + resumed run differs from the uninterrupted one in {len(diff)} tensors "
                      f"(max |diff| {_max_diff(final_b, final_a):.3g}), e.g. {diff[:3]}")
    assert [r for r in _losses(b) if r["step"] > 3][-3:] == _losses(a)[3:]


KILL_IN_SAVE = '''\
"""Test-only launcher: run a training script unchanged, SIGKILLed from inside the save of
checkpoint-<LOKR_TEST_KILL_STEP>, once its optimizer.pt is on disk (before state.json and the rename)."""
import os, runpy, signal, sys

from lokr_diffusers.training import checkpoint

_fsync_file = checkpoint._fsync_file


def fsync_then_die(path):
    _fsync_file(path)
    folder = os.path.basename(os.path.dirname(path))
    if folder.startswith(f".checkpoint-{os.environ['LOKR_TEST_KILL_STEP']}.tmp-") and path.endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint._fsync_file = fsync_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_sigkill_while_writing_a_checkpoint(tiny_sd_dir: str, data_dir: str, tmp_path: Path) -> None:
    """Killed while checkpoint-2 is half written, with --checkpoints_total_limit 1: checkpoint-1 is still
    there and complete, `latest` resumes from it (not from the half-written folder), the resumed run
    finishes and the leftovers are gone."""
    from lokr_diffusers.training import checkpoint

    out = tmp_path / "out"
    launcher = tmp_path / "kill_in_save.py"
    launcher.write_text(KILL_IN_SAVE, encoding="utf-8")
    args = ["--pretrained_model_name_or_path", tiny_sd_dir, "--train_data_dir", data_dir, "--resolution",
            str(RESOLUTION), "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "1", "--rank", "2", "--export_format", "none", "--output_dir", str(out)]
    with open(tmp_path / "killed.log", "w", encoding="utf-8") as fh:
        rc = subprocess.run([sys.executable, str(launcher), EXAMPLE, *args], cwd=ROOT,
                            env=_env(LOKR_TEST_KILL_STEP="2"), stdout=fh, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    assert rc == -signal.SIGKILL, (rc, (tmp_path / "killed.log").read_text(encoding="utf-8")[-4000:])
    names = sorted(os.listdir(out))
    half = [n for n in names if n.startswith(".checkpoint-2.tmp-")]
    assert [n for n in names if not n.startswith(".")] == ["checkpoint-1", "loss.jsonl"] and len(half) == 1, names
    assert sorted(os.listdir(out / half[0])) == ["adapter.safetensors", "optimizer.pt"]  # killed mid-save
    assert _checkpoint_done(out / "checkpoint-1", 1)
    assert checkpoint.latest(str(out)) == str(out / "checkpoint-1")

    log = _run([sys.executable, EXAMPLE, *args, "--resume_from_checkpoint", "latest"], tmp_path / "resumed.log", _env())
    assert "ignoring 1 unfinished checkpoint folder" in log and "checkpoint-1 at step 1" in log, log[-4000:]
    assert "done: 3 steps" in log
    assert sorted(os.listdir(out)) == ["README.md", "checkpoint-3", "loss.jsonl", OURS]  # limit 1, no leftovers
    assert _checkpoint_done(out / "checkpoint-3", 3)
    assert [r["step"] for r in _losses(out)] == [1, 2, 3]  # step 2 of the killed run dropped from the log


RANK_DUMP = '''\
"""Test-only launcher: run a training script unchanged, dumping each rank's final adapter."""
import json, os, runpy, sys

from accelerate import Accelerator
from safetensors.torch import save_file

from lokr_diffusers.training.checkpoint import adapter_tensors
from lokr_diffusers.training.loop import ADAPTER

_prepare_model, _end_training = Accelerator.prepare_model, Accelerator.end_training


def prepare_model(self, model, *args, **kwargs):
    out = _prepare_model(self, model, *args, **kwargs)
    self.__dict__.setdefault("_test_wrappers", []).append(type(out).__name__)
    return out


def end_training(self):
    comps = {}
    for m in self._models:  # the unwrapped models, in prepare order: unet, text_encoder
        comps["unet" if type(m).__name__.startswith("UNet") else "text_encoder"] = self.unwrap_model(m)
    folder, rank = os.environ["LOKR_TEST_RANK_DUMP"], self.process_index
    save_file(adapter_tensors(comps, ADAPTER), os.path.join(folder, f"rank{rank}.safetensors"))
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump({"num_processes": self.num_processes, "distributed_type": str(self.distributed_type),
                   "wrappers": self.__dict__.get("_test_wrappers", [])}, fh)
    _end_training(self)


Accelerator.prepare_model, Accelerator.end_training = prepare_model, end_training
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_torchrun_two_processes_cpu(tiny_sd_dir: str, data_dir: str, tmp_path: Path) -> None:
    out, dump = tmp_path / "out", tmp_path / "ranks"
    dump.mkdir()
    launcher = tmp_path / "rank_dump.py"
    launcher.write_text(RANK_DUMP, encoding="utf-8")
    # plain torchrun, as a user runs it: the script itself asks accelerate for CPU processes (gloo)
    # when there is no accelerator
    env = _env(LOKR_TEST_RANK_DUMP=str(dump))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           EXAMPLE, *_common(tiny_sd_dir, data_dir, str(out), 3, 2)]
    log = _run(cmd, tmp_path / "ddp.log", env)

    for rank in (0, 1):
        info = json.loads((dump / f"rank{rank}.json").read_text(encoding="utf-8"))
        assert info == {"num_processes": 2, "distributed_type": "DistributedType.MULTI_CPU",
                        "wrappers": ["DistributedDataParallel", "DistributedDataParallel"]}, (rank, info)
    # Only rank 0 wrote: one output set, one checkpoint, one log line per step.
    assert sorted(os.listdir(out)) == ["README.md", "checkpoint-2", "loss.jsonl", OURS]
    assert sorted(os.listdir(out / "checkpoint-2")) == ["adapter.safetensors", "optimizer.pt", "scheduler.pt",
                                                       "state.json"]
    assert _checkpoint_done(out / "checkpoint-2", 2)
    assert log.count("checkpoint: saved ") == 1 and log.count("done: 3 steps") == 1, log[-4000:]
    records = _losses(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # The schedule stepped once per optimizer step, as in one process: cosine over 3 steps, 1 warm-up step.
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-12)

    # Both ranks end with bit-identical adapters, and the file rank 0 wrote holds them.
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    diff = _equal(rank0, rank1)
    assert not diff, f"ranks differ in {len(diff)} tensors (max |diff| {_max_diff(rank0, rank1):.3g}), e.g. {diff[:3]}"
    assert not _equal(_factors_of_our_file(out / OURS), rank0)
    # Training moved the adapter: W1 starts at zero (init_weights=true) and step 3 changed what step 2 saved.
    assert all(v.abs().sum() > 0 for k, v in rank0.items() if k.endswith("lokr_w1"))
    assert _equal(rank0, load_file(str(out / "checkpoint-2" / "adapter.safetensors")))
