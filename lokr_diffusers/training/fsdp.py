"""What a training run under FSDP2 needs around run.py's steps. Two ways in:

- `--fsdp` (any launcher: torchrun, `accelerate launch --num_processes N`; NCCL on GPUs, gloo on CPUs): the script
  shards the denoiser itself (sharding.shard_lokr_model: each repeated block, then the root) after LoKr is added
  and before the optimizer is made, and leaves the model out of `accelerator.prepare` (which would wrap it in DDP);
- accelerate's FSDP plugin (`accelerate launch --use_fsdp --fsdp_version 2 ...`, GPUs only): accelerate shards the
  model when it is prepared, and FSDP2 there wants the optimizer prepared in the same call, and one model.

Then, either way:

- `check_fsdp_args` / `check_fsdp_run`: refuse what cannot run (one process; FSDP1; several trained components;
  a quantized base) before anything loads;
- `prepare`: the denoiser and its optimizer in one `accelerator.prepare` call (the optimizer's parameters
  become the shards);
- `saving`: every process enters it; inside, the adapters are whole on each process
  (sharding.gathered_adapters), so the main process alone writes the final files and exports;
- `full_optimizer_state` / `shard_optimizer_state`: the optimizer's state whole (every process calls it), and
  back into the shards, for checkpoint.py: a sharded optimizer's own state_dict holds only this process's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .. import sharding
from .errors import TrainingInputError


def uses_fsdp(accelerator: Any) -> bool:
    """The run is sharded by accelerate's FSDP plugin (either version)."""
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


def check_fsdp_args(args: Any) -> None:
    """TrainingInputError at parsing for a --fsdp run that cannot be: one process (nothing to shard over), a text
    encoder that trains (only the denoiser is sharded: its unsharded factors would train apart on each process),
    a quantized base (fp8 storage, torchao's and bitsandbytes' weights are not sharded by fully_shard here)."""
    if not getattr(args, "fsdp", False):
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise TrainingInputError("--fsdp shards the denoiser across the processes of a distributed launch, and this "
                                 "run is one process: launch it with `torchrun --nproc_per_node N` or `accelerate "
                                 "launch --num_processes N`, or leave out --fsdp")
    if getattr(args, "train_text_encoder", False):
        raise TrainingInputError("--fsdp shards the denoiser only: leave out --train_text_encoder, or train the text "
                                 "encoder with DDP (the same launch without --fsdp)")
    if getattr(args, "base_precision", "none") != "none":
        raise TrainingInputError(f"--fsdp with --base_precision {args.base_precision}: FSDP2 shards the base (each "
                                 "process holds 1/N of it) and does not shard quantized weights; give one of them")


def sharded(args: Any, accelerator: Any) -> bool:
    """The denoiser is sharded in this run: by --fsdp, or by accelerate's FSDP plugin."""
    return bool(getattr(args, "fsdp", False)) or uses_fsdp(accelerator)


def check_fsdp_run(accelerator: Any, trained: list[str]) -> None:
    """TrainingInputError for an FSDP run LoKr cannot do: FSDP1 (its FlatParameters hide the factors this
    package fuses and saves: use fsdp_version 2), or more than one trained component (accelerate's FSDP2
    prepares one model with its optimizer: leave out --train_text_encoder)."""
    if not uses_fsdp(accelerator):
        return
    if not getattr(accelerator, "is_fsdp2", False):
        raise TrainingInputError("LoKr training under FSDP needs FSDP2: set fsdp_version: 2 in the accelerate "
                                 "config (accelerate launch --fsdp_version 2)")
    if len(trained) > 1:
        raise TrainingInputError(f"under FSDP2 accelerate prepares one model with its optimizer, and this run "
                                 f"trains {trained}: leave out --train_text_encoder, or train with DDP")


def prepare(accelerator: Any, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
    """The model and its optimizer prepared together (what FSDP2 asks of accelerate; also right for DDP)."""
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer


@contextmanager
def saving(accelerator: Any, models: Iterable[nn.Module], is_sharded: bool | None = None) -> Iterator[bool]:
    """Yield whether this process writes (the main one); every process enters. Under FSDP (`is_sharded`, by default
    accelerate's plugin) the adapters are whole inside (sharding.gathered_adapters) and the processes wait for the
    writer at the end."""
    if not (uses_fsdp(accelerator) if is_sharded is None else is_sharded):
        yield bool(accelerator.is_main_process)
        return
    with sharding.gathered_adapters(list(models)):
        yield bool(accelerator.is_main_process)
        accelerator.wait_for_everyone()


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded tensor gathered whole, on the CPU: the file an unsharded run
    writes (torch's own layout, parameters by index), so a checkpoint resumes on any number of processes. Every
    process calls it (each gather is a collective), in the same order."""
    state = optimizer.state_dict()
    whole = {i: {k: sharding.full(v).cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
             for i, st in state["state"].items()}
    return {**state, "state": whole}


def shard_optimizer_state(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A `full_optimizer_state` (or an unsharded run's state dict) made fit for this process's sharded optimizer:
    each tensor shaped as its parameter becomes a DTensor of this process's rows, as the parameter is (no
    communication: every process read the same file). Unchanged where no parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # torch's index order
    out = {}
    for i, st in state["state"].items():
        p = params[int(i)] if int(i) < len(params) else None
        out[i] = {k: sharding.shard_like(p, v) if p is not None and sharding.is_sharded(p) and isinstance(v, Tensor)
                  and v.shape == p.shape else v for k, v in st.items()}
    return {**state, "state": out}
