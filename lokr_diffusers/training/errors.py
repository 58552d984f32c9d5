"""The errors of the training scripts. Every message names the argument, file or folder at fault and
says what to do; `run.main` turns a `TrainingInputError` into argparse's one-line `error: ...` with
exit code 2, raised before any training step (nothing is written by a run that fails its checks)."""

from __future__ import annotations

from ..errors import AdapterFusedError  # the layers raise it too, so it lives below them

__all__ = ["AdapterFusedError", "CheckpointError", "InputNotFoundError", "TrainingInputError"]


class TrainingInputError(ValueError):
    """Bad training input: an argument, a data folder or file, a checkpoint to resume from."""


class InputNotFoundError(TrainingInputError, FileNotFoundError):
    """A folder or file named by an argument (or by metadata.jsonl) does not exist."""


class CheckpointError(TrainingInputError):
    """A checkpoint that cannot be resumed from: incomplete, corrupt, or written for another adapter."""
