"""LoKr models under torch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

fully_shard replaces every parameter of the modules it wraps by a `DTensor` holding this process's
rows (dim 0) between forwards; inside a forward the full tensors are gathered. What this means here:

- forward / backward / the optimizer step need nothing: inside a wrapped module's forward the layer
  sees plain full tensors, and the gradients and the optimizer act on the shards.
- fuse / unfuse (merge_adapter, pipe.fuse_lokr) run outside any forward: each layer gathers its weight
  and its factors (`full`), folds as one process would, and writes back its own rows (`write_shard`).
  Every process must call them, in the same order (each gather is a collective).
- state dicts and exports (`get_adapter_state_dict`, `save_lokr_weights`) gather each tensor (`full`):
  the files written from a sharded model equal an unsharded one's. Every process must call them too.

`shard_lokr_model` applies fully_shard as FSDP2 wants it: each repeated block, then the root.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(t: Tensor | None) -> bool:
    """`t` is a DTensor (a parameter of a module fully_shard wrapped, between forwards)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor gathered from every process (a collective: every process calls it),
    else `t` itself. Detached from autograd either way."""
    if is_sharded(t):
        with torch.no_grad():
            return t.detach().full_tensor()  # type: ignore[attr-defined, no-any-return]
    return t.detach()


def storage_key(t: Tensor) -> int:
    """An id of `t`'s storage that tells shared tensors apart (a DTensor: its local shard's)."""
    return (t.to_local() if is_sharded(t) else t).data_ptr()  # type: ignore[attr-defined, no-any-return]


def shard_like(param: Tensor, whole: Tensor) -> Tensor:
    """`whole` (a full tensor of `param`'s shape) as a DTensor laid out as the sharded `param`: this process's
    rows, on its device. No communication: every process holds `whole` already, each takes its own part."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements,  # type: ignore[attr-defined]
                             src_data_rank=None)


@torch.no_grad()
def write_shard(param: Tensor, whole: Tensor) -> None:
    """Copy this process's part of `whole` (the full tensor) into the sharded `param`, in place
    (the optimizer and FSDP keep holding the same storage)."""
    param.to_local().copy_(shard_like(param, whole.to(param.dtype)).to_local())  # type: ignore[attr-defined]


class Gathered:
    """A stand-in for a base layer whose weight is sharded: `.weight` is the gathered full weight (an
    nn.Parameter the base-weight strategies may fold into in place), `.bias` likewise."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.weight = nn.Parameter(full(base.weight), requires_grad=False)  # type: ignore[arg-type]
        bias = getattr(base, "bias", None)
        self.bias = None if bias is None else full(bias)


@contextmanager
def gathered(base: nn.Module, write_back: bool) -> Iterator[Any]:
    """Yield `base` itself, or a `Gathered` stand-in when its weight is sharded; with `write_back`,
    the stand-in's weight goes back into this process's rows when the block ends without error."""
    if not is_sharded(base.weight):  # type: ignore[arg-type]
        yield base
        return
    g = Gathered(base)
    yield g
    if write_back:
        write_shard(base.weight, g.weight)  # type: ignore[arg-type]


def reshard(models: Iterable[nn.Module]) -> None:
    """Reshard every FSDP2 unit of `models` that holds its parameters gathered (FSDP keeps the root's
    gathered after a forward without backward): a change written into gathered parameters would be lost at
    the next reshard, while one written into the shards (`write_shard`) is what the next gather reads."""
    if _dtensor_type() is None:
        return
    from torch.distributed.fsdp import FSDPModule
    for model in models:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


# ------------------------------------------------------------------------------------------ applying FSDP2
def repeated_blocks(model: nn.Module, block_classes: Iterable[type[nn.Module] | str] | None = None
                    ) -> list[nn.Module]:
    """The modules to shard one by one: instances of `block_classes` (classes or class names), by default
    the model's own `_no_split_modules` / `_repeated_blocks` (diffusers' models name their transformer
    blocks there), else the children of every nn.ModuleList. Outermost first; a block inside another
    block is not listed (FSDP2 would shard it within its parent anyway)."""
    root = _inner(model)
    wanted: set[Any] = set(block_classes or ())
    if block_classes is None:
        wanted = {*(getattr(root, "_repeated_blocks", None) or ()), *(getattr(root, "_no_split_modules", None) or ())}
    blocks: list[nn.Module] = []

    def visit(module: nn.Module, in_block: bool) -> None:
        for child in module.children():
            hit = not in_block and (type(child) in wanted or type(child).__name__ in wanted)
            if hit:
                blocks.append(child)
            visit(child, in_block or hit)

    if wanted:
        visit(root, False)
    if not blocks and block_classes is None:  # nothing named: every ModuleList's children
        blocks = [b for m in root.modules() if isinstance(m, nn.ModuleList) for b in m]
        blocks = [b for b in blocks if not any(b is not o and any(b is s for s in o.modules()) for o in blocks)]
    return blocks


def shard_lokr_model(model: nn.Module, block_classes: Iterable[type[nn.Module] | str] | None = None,
                     **fsdp_kwargs: Any) -> nn.Module:
    """Apply FSDP2's `fully_shard` to the model's repeated blocks (`repeated_blocks`), then to `model`
    itself (a LoKrModel: to the model it wraps), and return `model` (fully_shard changes the modules'
    classes in place).

    Call it after the adapters are added (`LoKrModel(...)` / `add_lokr`) and before the optimizer is made,
    inside an initialised process group (torch.distributed.init_process_group; torchrun, or accelerate).
    Sharding whole blocks keeps FSDP's gathers few and large, and no LoKr layer becomes its own FSDP unit.
    fsdp_kwargs go to every fully_shard call (mesh, reshard_after_forward, mp_policy, ...).
    """
    from torch.distributed.fsdp import fully_shard
    root = _inner(model)
    blocks = repeated_blocks(root, block_classes)
    if not blocks:
        raise ValueError(f"no blocks to shard in {type(root).__name__}: name them with block_classes=")
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(root, **fsdp_kwargs)
    return model


def _inner(model: nn.Module) -> nn.Module:
    """A LoKrModel's wrapped model (the root FSDP shards, so a sharded model keeps its own class name and
    LoKrModel.forward calls the FSDP root), else `model`."""
    inner = getattr(model, "model", None)
    return inner if hasattr(model, "peft_config") and isinstance(inner, nn.Module) else model


# --------------------------------------------------------------------------------- saving from one process
@contextmanager
def gathered_adapters(models: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, every LoKr layer of `models` holds its adapters' tensors whole, as plain Parameters
    (and, where an adapter has DoRA, its base weight too: an export reads its row norms), so that one process
    alone may save or export them (no collective left to wait on the others). Every process enters it; on
    leaving, the sharded Parameters are put back (FSDP and the optimizer hold those). Run no forward inside.

    A training script under FSDP2: `with gathered_adapters([model]): if main process: save ...`, then a barrier.
    """
    from .functional import FACTOR_NAMES
    swapped: list[tuple[Any, str, Tensor]] = []  # (holder, key, the sharded Parameter to put back)
    whole: dict[int, nn.Parameter] = {}  # one copy per sharded Parameter: row pieces keep sharing their factors

    def gather(p: Tensor) -> nn.Parameter:
        if id(p) not in whole:
            whole[id(p)] = nn.Parameter(full(p), requires_grad=False)
        return whole[id(p)]

    models = list(models)
    reshard(models)  # every unit sharded: what is swapped below stays registered until the block ends
    try:
        for model in models:
            # the LoKr layers, known by their stores (importing layers/ here would make an import cycle)
            for layer in [m for m in model.modules() if isinstance(getattr(m, "lokr_w1", None), nn.ParameterDict)]:
                for store_name in (*FACTOR_NAMES, "dora_scale"):
                    store: nn.ParameterDict = getattr(layer, store_name)
                    for key, p in list(store.items()):
                        if is_sharded(p):
                            swapped.append((store, key, p))
                            store[key] = gather(p)
                base = cast(nn.Module, layer.base_layer)
                weight = cast(Tensor, base.weight)
                if len(cast(nn.ParameterDict, layer.dora_scale)) and is_sharded(weight):
                    swapped.append((base, "weight", weight))
                    base.weight = gather(weight)
        yield
    finally:
        for holder, key, p in reversed(swapped):
            if isinstance(holder, nn.Module) and not isinstance(holder, nn.ParameterDict):
                setattr(holder, key, p)
            else:
                holder[key] = p
