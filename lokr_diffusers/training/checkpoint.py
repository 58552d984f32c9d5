"""Training checkpoints that hold only what training changes: the adapter's tensors (safetensors),
the optimizer and LR-scheduler states and the step. No model weights, no pickled code.

Crash safety (a SIGKILL or a power cut at any moment leaves a resumable folder):
    write:    every file goes into `.checkpoint-N.tmp-<random>/` beside the final folder and is fsync'ed;
              `state.json` (the step, each file's size and sha256) is written last: it marks the folder complete;
    publish:  the folder is fsync'ed and renamed to `checkpoint-N` (an existing `checkpoint-N` is first
              renamed aside to `.checkpoint-N.old-<random>` and removed only after the new one is in place);
    prune:    `--checkpoints_total_limit` removes old checkpoints only after that, each renamed to a
              hidden `.checkpoint-N.del-<random>` before it is deleted, so a half-deleted folder never
              looks like a checkpoint;
    clean:    the next save removes hidden leftovers of a crashed save (and puts back a set-aside
              `checkpoint-N` whose replacement never arrived).
`latest` is the newest *complete* checkpoint: hidden folders and folders whose `state.json` is missing,
unreadable or disagrees with the files' sizes or sha256 are skipped, and the log says so. A file damaged in
place (a bad disk block, a bit flip in a copy: same size, still parses) shows only in its sha256; a checkpoint
written before hashes were recorded is checked by size, as it was then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import uuid
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import sharding
from ..atomic import sync_dir
from ..model import lokr_layers
from .errors import CheckpointError
from .fsdp import shard_optimizer_state

logger = logging.getLogger(__name__)
PREFIX = "checkpoint-"
ADAPTER_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE = ("adapter.safetensors", "optimizer.pt", "scheduler.pt",
                                                            "state.json")
FILES = (ADAPTER_FILE, OPTIMIZER_FILE, SCHEDULER_FILE)  # STATE_FILE, written last, lists their sizes and hashes
LEFTOVER = re.compile(rf"^\.{PREFIX}(\d+)\.(tmp|old|del)-")  # hidden folders of unfinished saves
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError)


def adapter_tensors(components: dict[str, nn.Module], adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's factors by "component.path.key", whole (gathered under FSDP2: sharding.full), on the CPU."""
    sharding.reshard(components.values())  # a gathered FSDP unit's tensors are views of a buffer its reshard frees
    return {f"{c}.{path}.{k}": sharding.full(t).cpu().contiguous() for c, m in components.items()
            for path, layer in lokr_layers(m) for k, t in layer.factors(adapter).items()}


# -------------------------------------------------------------------------------------------------- save

def save(output_dir: str, step: int, components: dict[str, nn.Module], adapter: str, optimizer: Any,
         lr_scheduler: Any, limit: int | None = None, optimizer_state: dict[str, Any] | None = None) -> str:
    """Write checkpoint-<step>/ (adapter.safetensors, optimizer.pt, scheduler.pt, state.json) all or
    nothing, then keep at most `limit` checkpoints (the new one included). `optimizer_state`: what to write for the
    optimizer instead of its own state_dict (a sharded one's, gathered whole: training/fsdp.py)."""
    os.makedirs(output_dir, exist_ok=True)
    clean_leftovers(output_dir)
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = tempfile.mkdtemp(prefix=f".{PREFIX}{step}.tmp-", dir=output_dir)
    try:
        _write(tmp, step, components, adapter, optimizer_state or optimizer.state_dict(), lr_scheduler)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s", final)
    if limit is not None:
        prune(output_dir, limit, keep=f"{PREFIX}{step}")
    return final


def _write(folder: str, step: int, components: dict[str, nn.Module], adapter: str, optimizer_state: dict[str, Any],
           lr_scheduler: Any) -> None:
    tensors = adapter_tensors(components, adapter)
    save_file(tensors, os.path.join(folder, ADAPTER_FILE))
    _fsync_file(os.path.join(folder, ADAPTER_FILE))
    for name, state in ((OPTIMIZER_FILE, optimizer_state), (SCHEDULER_FILE, lr_scheduler.state_dict())):
        with open(os.path.join(folder, name), "wb") as fh:
            torch.save(state, fh)
        _fsync_file(os.path.join(folder, name))
    record = {"global_step": step, "tensors": len(tensors),
              "files": {n: os.path.getsize(os.path.join(folder, n)) for n in FILES},
              "sha256": {n: sha256_of(os.path.join(folder, n)) for n in FILES}}  # read back after fsync
    with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    _fsync_file(os.path.join(folder, STATE_FILE))
    sync_dir(folder)


def _publish(tmp: str, final: str) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` is set aside first, removed after."""
    parent = os.path.dirname(final) or "."
    aside = None
    if os.path.lexists(final):
        aside = os.path.join(parent, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    sync_dir(parent)
    if aside is not None:
        _remove_tree(aside)


def prune(output_dir: str, limit: int, keep: str) -> list[str]:
    """Remove the oldest checkpoints so that at most `limit` remain, never `keep` (the one just written)."""
    others = [n for n in list_checkpoints(output_dir) if n != keep]
    doomed = others[: max(0, len(others) - (limit - 1))]
    for name in doomed:
        hidden = os.path.join(output_dir, f".{name}.del-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(os.path.join(output_dir, name), hidden)  # never seen half-deleted as checkpoint-N
        except OSError as e:  # the new checkpoint is safe; an old one left over is not worth a crash
            logger.warning("could not remove %s (--checkpoints_total_limit %d): %s", name, limit, e)
            continue
        _remove_tree(hidden)
        logger.info("removed %s (--checkpoints_total_limit %d)", name, limit)
    if doomed:
        sync_dir(output_dir)
    return doomed


def clean_leftovers(output_dir: str) -> None:
    """Remove what crashed saves left (hidden tmp/old/del folders); put back a set-aside checkpoint-N
    whose replacement never arrived, when it is complete."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        m = LEFTOVER.match(name)
        if m is None:
            continue
        path, final = os.path.join(output_dir, name), os.path.join(output_dir, f"{PREFIX}{m.group(1)}")
        try:
            if m.group(2) == "old" and not os.path.lexists(final) and incomplete_reason(path) is None:
                os.replace(path, final)
                logger.warning("restored %s from %s (a save that replaced it was interrupted)", final, name)
                continue
            _remove_tree(path)
        except OSError as e:
            logger.warning("could not clean up %s: %s", path, e)
            continue
        logger.warning("removed %s, left by an interrupted checkpoint save", path)


def sha256_of(path: str) -> str:
    """The file's sha256, hex; read in 1 MiB chunks (an optimizer state may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- find

def list_checkpoints(output_dir: str) -> list[str]:
    """Names of the checkpoint-N folders in `output_dir`, oldest (smallest N) first; complete or not."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith(PREFIX) and d[len(PREFIX):].isdigit()
             and os.path.isdir(os.path.join(output_dir, d))]
    return sorted(names, key=lambda d: int(d[len(PREFIX):]))


def read_state(folder: str) -> dict[str, Any]:
    """state.json of a checkpoint folder; CheckpointError when it is missing or malformed."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no {STATE_FILE} (not a checkpoint, or its save did not finish)")
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or state["global_step"] < 0:
        raise CheckpointError(f"{path}: expected a JSON object with a non-negative integer 'global_step'")
    return state


def incomplete_reason(folder: str) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    try:
        state = read_state(folder)
    except CheckpointError as e:
        return str(e)
    listed, hashed = state.get("files"), state.get("sha256")
    sizes: dict[str, Any] = listed if isinstance(listed, dict) else {}
    hashes: dict[str, Any] = hashed if isinstance(hashed, dict) else {}  # {} in checkpoints from before hashes
    for name in FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if name in sizes and os.path.getsize(path) != sizes[name]:
            return f"{path} has {os.path.getsize(path)} bytes, {STATE_FILE} says {sizes[name]} (truncated or changed)"
    for name in FILES:  # after the cheap checks: hashing reads every byte
        path = os.path.join(folder, name)
        if name in hashes and sha256_of(path) != hashes[name]:
            return (f"{path}: its sha256 differs from the one {STATE_FILE} recorded when the checkpoint was written "
                    "(the file was damaged or changed since)")
    try:
        with safe_open(os.path.join(folder, ADAPTER_FILE), "pt") as fh:
            fh.keys()
    except READ_ERRORS as e:
        return f"{os.path.join(folder, ADAPTER_FILE)} is not a readable safetensors file ({e})"
    return None


def latest(output_dir: str) -> str | None:
    """The newest complete checkpoint folder in `output_dir`, or None; what it skips goes to the log."""
    hidden = sorted(n for n in os.listdir(output_dir) if LEFTOVER.match(n)) if os.path.isdir(output_dir) else []
    if hidden:
        logger.warning("ignoring %d unfinished checkpoint folder(s) in %s: %s", len(hidden), output_dir,
                       ", ".join(hidden))
    for name in reversed(list_checkpoints(output_dir)):
        reason = incomplete_reason(os.path.join(output_dir, name))
        if reason is None:
            return os.path.join(output_dir, name)
        logger.warning("skipping %s, not a complete checkpoint: %s", name, reason)
    return None


def resolve(output_dir: str, which: str) -> str | None:
    """A checkpoint folder from --resume_from_checkpoint: "latest" (None when there is none), or a path
    or a name in `output_dir`, which must be a complete checkpoint (CheckpointError otherwise)."""
    if which == "latest":
        return latest(output_dir)
    path = which if os.path.isdir(which) else os.path.join(output_dir, which)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume_from_checkpoint {which}: no such folder (also looked in --output_dir "
                              f"{output_dir}); give a checkpoint-N folder or 'latest'")
    reason = incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(f"--resume_from_checkpoint {which}: not a complete checkpoint: {reason}; "
                              "give another checkpoint-N folder or 'latest' (the newest complete one)")
    return path


# ---------------------------------------------------------------------------------------------- load

def _read(folder: str) -> tuple[dict[str, torch.Tensor], Any, Any, int]:
    reason = incomplete_reason(folder)
    if reason is not None:
        raise CheckpointError(f"cannot resume from {folder}: {reason}")
    try:
        tensors = load_file(os.path.join(folder, ADAPTER_FILE))
        optimizer = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True)
        scheduler = torch.load(os.path.join(folder, SCHEDULER_FILE), weights_only=True)
    except READ_ERRORS as e:
        raise CheckpointError(f"cannot resume from {folder}: a file is corrupt ({type(e).__name__}: {e})") from e
    return tensors, optimizer, scheduler, int(read_state(folder)["global_step"])


def _check_match(folder: str, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless `saved` has exactly this run's adapter tensors, shape for shape."""
    missing, extra = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    shapes = sorted(k for k in current.keys() & saved.keys() if saved[k].shape != current[k].shape)
    if not (missing or extra or shapes):
        return
    parts = [f"{len(missing)} of this run's tensors are not in it (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(extra)} of its tensors are not in this run (e.g. {extra[0]})"] if extra else []
    parts += [f"{len(shapes)} differ in shape (e.g. {shapes[0]}: {tuple(saved[shapes[0]].shape)} saved, "
              f"{tuple(current[shapes[0]].shape)} now)"] if shapes else []
    raise CheckpointError(f"{folder} was written for another adapter: {'; '.join(parts)}. Resume with the "
                          "arguments of the run that wrote it (--rank, --te_rank, --decompose_factor, "
                          "--decompose_both, --use_effective_conv2d, the target modules, --train_text_encoder) "
                          "or train into a new --output_dir")


def load(folder: str, components: dict[str, nn.Module], adapter: str, optimizer: Any, lr_scheduler: Any) -> int:
    """Restore adapter tensors (in place, so the optimizer keeps its parameters), optimizer and
    scheduler states; returns the global step. Everything is read and checked before anything is
    changed: a CheckpointError leaves the adapter, optimizer and scheduler as they were."""
    tensors, opt_state, sched_state, step = _read(folder)
    current = {f"{c}.{path}.{k}": t for c, m in components.items() for path, layer in lokr_layers(m)
               for k, t in layer.factors(adapter).items()}
    _check_match(folder, tensors, current)
    try:
        # checks its parameter groups before it changes anything; a sharded optimizer takes its rows of each tensor
        optimizer.load_state_dict(shard_optimizer_state(optimizer, opt_state))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(folder, OPTIMIZER_FILE)} does not fit this run's optimizer ({e}); "
                              "resume with the arguments of the run that wrote it") from e
    lr_scheduler.load_state_dict(sched_state)
    with torch.no_grad():
        for k, t in tensors.items():
            if sharding.is_sharded(current[k]):  # under FSDP2: this process's rows (sharding.py)
                sharding.write_shard(current[k], t)
            else:
                current[k].copy_(t)
    return step
