"""Two-process FSDP2 runs on the CPU (gloo) for tests/test_fsdp.py.

`spawn(case, ...)` starts `world` processes (torch.multiprocessing, forked), each joins a gloo
process group and runs `case(rank, world, *args)`; what rank r's case returns is saved by torch.save and
handed back, one entry per rank. Each case builds an unsharded copy of the same model in the same process
(the one-process oracle: the same seeds, the whole batch) beside the sharded one, and returns both sides'
numbers, so the test compares them in the parent.

The data: rank r gets sample r of a 2-sample batch; the oracle takes the whole batch. The loss is a mean
over the batch's elements, and FSDP2 averages the gradients over the processes: the same gradient.
"""

from __future__ import annotations

import os
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import Tensor, nn

STEPS = 3
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, out: str, case: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = case(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(case: Callable[..., Any], *args: Any, world: int = 2) -> list[Any]:
    """What `case(rank, world, *args)` returned on each rank (case: a module-level function). The processes
    are forked: they inherit the imported torch and diffusers (spawning re-imports them, ~7 s of CPU each)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, _free_port(), out, case, args), nprocs=world, join=True,
                           start_method="fork")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@contextmanager
def fsdp_warnings() -> Iterator[list[str]]:
    """The messages of the FSDP warnings raised inside the block, each time one is raised."""
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    seen += sorted(str(w.message) for w in caught if "FSDP" in str(w.message))


def gathered_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter of `model`, whole (gathered from FSDP2's shards), on the CPU."""
    from lokr_diffusers import sharding
    return {n: sharding.full(p).cpu().clone() for n, p in model.named_parameters()}


def shard(model: nn.Module, mode: str, layer_types: tuple[type, ...] = ()) -> None:
    """blocks: shard_lokr_model (the repeated blocks, then the root); root: the whole model as one unit;
    layers: each module of `layer_types`, then the root."""
    from torch.distributed.fsdp import fully_shard

    from lokr_diffusers.sharding import shard_lokr_model
    inner = getattr(model, "model", model)
    if mode == "blocks":
        shard_lokr_model(model)
        return
    if mode == "layers":
        for m in list(inner.modules()):
            if isinstance(m, layer_types) and m is not inner:
                fully_shard(m)
    fully_shard(inner)


def _train(model: nn.Module, batches: list[dict[str, Any]], loss_of: Callable[[nn.Module, dict[str, Any]], Tensor],
           adam: bool = True, keep: list[Any] | None = None) -> list[float]:
    """AdamW, or SGD with momentum: Adam's first step is lr · g / (|g| + eps), so where a gradient is near
    eps (the tiny UNet's cross-attention output, 1e-8) the rounding of FSDP's sum over the processes moves
    the update by up to lr; SGD keeps the factors within 1e-7 of the oracle's there."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR) if adam else torch.optim.SGD(params, lr=LR, momentum=0.9)
    losses = []
    for batch in batches:
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    if keep is not None:
        keep.append(opt)
    return losses


def _adapter_files(source: Any, rank: int, tag: str, formats: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
    """Each format's file written from `source` (every rank writes its own, to a folder of its own), read back."""
    from lokr_diffusers import save_lokr_weights
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for fmt in formats:
            path = save_lokr_weights(source, os.path.join(d, f"{tag}{rank}-{fmt}.safetensors"), format=fmt)
            if os.path.isdir(path):
                files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs
                               if f.endswith(".safetensors"))
                out[fmt] = {f"{os.path.relpath(f, path)}:{k}": v for f in files for k, v in load_file(f).items()}
            else:
                out[fmt] = load_file(path)
    return out


# ------------------------------------------------------------------------------------------ tiny Flux
def _flux_sample(seed: int) -> dict[str, Any]:
    from helpers.dit_models import inputs
    g = torch.Generator().manual_seed(100 + seed)
    return {**inputs("flux", seed=seed), "target": torch.randn(1, 4, 8, generator=g)}


def _flux_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples joined along the batch (the position ids are per token, shared)."""
    first = samples[0]
    return {k: (torch.cat([s[k] for s in samples]) if k not in ("img_ids", "txt_ids") else first[k]) for k in first}


def _flux_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    kwargs = {k: v for k, v in batch.items() if k != "target"}
    out = model(**kwargs, return_dict=False)[0]
    return (out - batch["target"]).square().mean()


def _flux_lokr(seed: int = 0) -> nn.Module:
    from helpers.dit_models import tiny
    from lokr_diffusers import LoKrConfig, LoKrModel, dit_target_modules
    m = tiny("flux", seed=seed)
    torch.manual_seed(seed + 1)
    # the embedders too: LoKr layers in the root's FSDP unit, which stays gathered after a forward without backward
    targets = dit_target_modules(m, embedders=True)
    model = LoKrModel(m, LoKrConfig(r=4, alpha=4, init_weights=False, target_modules=targets))
    return model.train()


def flux_case(rank: int, world: int, mode: str, checks: bool) -> dict[str, Any]:
    """Train the tiny Flux transformer's LoKr sharded (`mode`: see `shard`) and unsharded; with `checks`,
    then fuse / unfuse, the state dict (out and back in) and the exported files, on both."""
    from helpers.dit_models import tiny
    from lokr_diffusers import Linear, sharding
    steps = [[_flux_sample(2 * s), _flux_sample(2 * s + 1)] for s in range(STEPS)]
    ref, ours = _flux_lokr(), _flux_lokr()
    bare = tiny("flux").train()
    result: dict[str, Any] = {}
    opts: list[Any] = []
    result["ref_losses"] = _train(ref, [_flux_batch(b) for b in steps], _flux_loss, keep=opts)
    shard(ours, mode, (Linear,))
    shard(bare, mode, (nn.Linear,))
    with fsdp_warnings() as ours_warned:
        result["losses"] = _train(ours, [b[rank] for b in steps], _flux_loss, keep=opts)
    with fsdp_warnings() as bare_warned:  # the same steps' forwards and backwards
        for b in steps:
            _flux_loss(bare, b[rank]).backward()
    result["warned"], result["bare_warned"] = ours_warned, bare_warned
    sd = ours.get_adapter_state_dict()
    result["dtensors"] = sorted(k for k, v in sd.items() if type(v) is not Tensor)
    result["state_dict"], result["ref_state_dict"] = sd, ref.get_adapter_state_dict()
    if not checks:
        return result
    # the optimizer's state, whole (training/fsdp.py): the oracle's, and back into the shards unchanged
    from lokr_diffusers.training.fsdp import full_optimizer_state, shard_optimizer_state
    full_state = full_optimizer_state(opts[1])  # torch's own layout, whole on every process
    with torch.no_grad():
        for st in opts[1].state.values():  # lost, so that only the load can bring the moments back
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
    opts[1].load_state_dict(shard_optimizer_state(opts[1], full_state))
    again = full_optimizer_state(opts[1])
    if rank == 0:
        ref_state = opts[0].state_dict()["state"]  # the same parameters in the same order
        moments = ("exp_avg", "exp_avg_sq")
        result["opt_keys_match"] = sorted(full_state["state"]) == sorted(ref_state)
        result["opt_diff"] = max((full_state["state"][i][k] - ref_state[i][k]).abs().max().item()
                                 for i in ref_state for k in moments)
        result["opt_reloaded"] = all(torch.equal(again["state"][i][k], full_state["state"][i][k])
                                     for i in full_state["state"] for k in moments)
    # fuse / unfuse: the merged forward equals the oracle's; unfusing restores the base weights bit for bit
    ours.eval()
    ref.eval()
    probe = _flux_batch([_flux_sample(50)])
    kwargs = {k: v for k, v in probe.items() if k != "target"}
    before = gathered_params(ours.model)
    with torch.no_grad():
        result["unmerged_out"] = ours(**kwargs, return_dict=False)[0]
        ours.merge_adapter()
        ref.merge_adapter()
        result["merged_out"] = ours(**kwargs, return_dict=False)[0]
        result["ref_merged_out"] = ref(**kwargs, return_dict=False)[0]
        result["merged_weights"] = gathered_params(ours.model)
        result["ref_merged_weights"] = gathered_params(ref.model)
        ours.unmerge_adapter()
        after = gathered_params(ours.model)
        result["unmerge_changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
        result["after_unmerge_out"] = ours(**kwargs, return_dict=False)[0]
    # files: written from the sharded model, equal to the oracle's
    comps_ours, comps_ref = {"transformer": ours.model}, {"transformer": ref.model}
    result["files"] = _adapter_files(comps_ours, rank, "ours", ("lokr_diffusers", "peft"))
    result["ref_files"] = _adapter_files(comps_ref, rank, "ref", ("lokr_diffusers", "peft"))
    # a training checkpoint's adapter tensors (training/checkpoint.py), gathered
    from lokr_diffusers.training.checkpoint import adapter_tensors
    result["checkpoint_tensors"] = adapter_tensors({"transformer": ours.model}, "default")
    result["ref_checkpoint_tensors"] = adapter_tensors({"transformer": ref.model}, "default")
    # one process alone writes, inside gathered_adapters (as a training script's main process does)
    from lokr_diffusers.sharding import gathered_adapters
    held = {n: p for n, p in ours.named_parameters()}
    with gathered_adapters([ours.model]):  # reshards first: the forward above left the root's unit gathered
        if rank == 0:
            result["main_files"] = _adapter_files(comps_ours, rank, "main", ("lokr_diffusers",))
        dist.barrier()
    result["dtensors_after"] = sorted(k for k, v in ours.get_adapter_state_dict().items() if type(v) is not Tensor)
    result["swapped_after"] = [n for n, p in ours.named_parameters() if p is not held[n] or not sharding.is_sharded(p)]
    # a state dict loaded into the sharded model: each process keeps its rows of it
    ours.set_adapter_state_dict(result["ref_state_dict"])
    result["reloaded"] = ours.get_adapter_state_dict()
    return result


# ------------------------------------------------------------------------------------------ tiny SD UNet
def _sd_pipe() -> Any:
    from lokr_diffusers import LoKrConfig, add_lokr
    from lokr_diffusers.tiny import make_sd_pipeline
    pipe = make_sd_pipeline(seed=0)
    torch.manual_seed(1)
    add_lokr(pipe, {"unet": LoKrConfig(r=4, alpha=4, init_weights=False, use_effective_conv2d=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                       "conv1", "conv2", "ff.net.2"])})
    pipe.unet.train()
    return pipe


def _sd_sample(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([10 + seed]),
            "encoder_hidden_states": torch.randn(1, 3, 32, generator=g), "target": torch.randn(1, 4, 8, 8, generator=g)}


def _sd_batch(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}


def _sd_loss(unet: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], return_dict=False)[0]
    return (out - batch["target"]).square().mean()


def sd_case(rank: int, world: int) -> dict[str, Any]:
    """The tiny SD pipeline's UNet LoKr (convs with Tucker cores, attention) trained sharded by blocks and
    unsharded; then pipe.fuse_lokr / unfuse_lokr and a ComfyUI file from each."""
    from lokr_diffusers.sharding import shard_lokr_model
    steps = [[_sd_sample(2 * s), _sd_sample(2 * s + 1)] for s in range(STEPS)]
    ref, ours = _sd_pipe(), _sd_pipe()
    result: dict[str, Any] = {"ref_losses": _train(ref.unet, [_sd_batch(b) for b in steps], _sd_loss, adam=False)}
    shard_lokr_model(ours.unet)
    with fsdp_warnings() as warned:
        result["losses"] = _train(ours.unet, [b[rank] for b in steps], _sd_loss, adam=False)
    result["warned"] = warned
    probe = _sd_sample(50)
    ours.unet.eval()
    ref.unet.eval()
    before = gathered_params(ours.unet)
    with torch.no_grad():
        ours.fuse_lokr()
        ref.fuse_lokr()
        result["merged_out"], result["ref_merged_out"] = _sd_out(ours.unet, probe), _sd_out(ref.unet, probe)
        ours.unfuse_lokr()
        after = gathered_params(ours.unet)
        result["unmerge_changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    result["files"] = _adapter_files(ours, rank, "ours", ("comfyui",))
    result["ref_files"] = _adapter_files(ref, rank, "ref", ("comfyui",))
    return result


def _sd_out(unet: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], return_dict=False)[0]
