"""What a training run under FSDP2 needs around run.py's steps (not wired into the scripts' arguments here).

With accelerate's FSDP plugin (`accelerate launch --use_fsdp --fsdp_version 2 ...`), accelerate shards the
model itself (fully_shard over its auto-wrap policy's blocks, then the root) when the model is prepared,
and FSDP2 there wants the optimizer prepared in the same call, and one model. Then:

- `check_fsdp_run`: refuse what cannot run (FSDP1; several trained components) before anything loads;
- `prepare`: the denoiser and its optimizer in one `accelerator.prepare` call (the optimizer's parameters
  become the shards);
- `saving`: every process enters it; inside, the adapters are whole on each process
  (sharding.gathered_adapters), so the main process alone writes the final files and exports;
- `full_optimizer_state` / `load_full_optimizer_state`: the optimizer's state whole on the main process
  (every process calls them), for checkpoint.py: a sharded optimizer's own state_dict holds only this
  process's shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..sharding import gathered_adapters
from .errors import TrainingInputError


def uses_fsdp(accelerator: Any) -> bool:
    """The run is sharded by accelerate's FSDP plugin (either version)."""
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


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
def saving(accelerator: Any, models: Iterable[nn.Module]) -> Iterator[bool]:
    """Yield whether this process writes (the main one); every process enters. Under FSDP the adapters are
    whole inside (sharding.gathered_adapters) and the processes wait for the writer at the end."""
    if not uses_fsdp(accelerator):
        yield bool(accelerator.is_main_process)
        return
    with gathered_adapters(list(models)):
        yield bool(accelerator.is_main_process)
        accelerator.wait_for_everyone()


def full_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with whole tensors, keyed by parameter name, on the CPU of the main
    process (rank 0; {} on the others). Every process calls it
    (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,  # type: ignore[no-any-return]
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Put a `full_optimizer_state` back into a sharded optimizer, each process taking its shards: the main
    process passes the state, the others {} (it is broadcast from rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
