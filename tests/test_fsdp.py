"""LoKr under torch's FSDP2 (fully_shard), 2 processes on the CPU with gloo (helpers/fsdp_runs.py).

The oracle is the same model unsharded in one process, trained on the whole batch: the sharded run's
factors, fused weights, fused outputs, state dicts and files must equal its (to float32 rounding, 1e-6:
the gradients' sum over the processes is a reduction in another order). FSDP's own warnings are allowed
only where the bare model (no adapters), sharded the same way, raises them too.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from helpers.fsdp_runs import STEPS, flux_case, sd_case, spawn
from torch import Tensor

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
TOL = 1e-6


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _check_training(ranks: list[dict[str, Any]]) -> None:
    """Per step, the processes' mean loss is the oracle's (forward); the gathered factors equal the oracle's
    after the steps (backward and optimizer), on every process, and are plain tensors."""
    ref = ranks[0]["ref_losses"]
    assert len(ref) == STEPS
    for step in range(STEPS):
        assert sum(r["losses"][step] for r in ranks) / len(ranks) == pytest.approx(ref[step], abs=TOL)
    for r in ranks:
        assert r["dtensors"] == []
        assert _max_diff(r["state_dict"], r["ref_state_dict"]) <= TOL
        assert all(torch.equal(r["state_dict"][k], ranks[0]["state_dict"][k]) for k in r["state_dict"])


def _check_warnings(r: dict[str, Any]) -> None:
    """Each FSDP warning no more often than the bare model, run through the same steps, raises it (a message
    names the module's class only: a LoKr Linear returning a view where the bare Linear does not adds one)."""
    ours, bare = Counter(r["warned"]), Counter(r["bare_warned"])
    extra = {w: n - bare[w] for w, n in ours.items() if n > bare[w]}
    assert extra == {}, f"FSDP warnings the bare model does not raise: {extra}"


def test_flux_sharded_by_blocks_trains_fuses_and_saves_as_one_process() -> None:
    ranks = spawn(flux_case, "blocks", True)
    _check_training(ranks)
    from helpers.fsdp_runs import _flux_lokr
    fresh = _flux_lokr().get_adapter_state_dict()
    assert _max_diff(ranks[0]["state_dict"], fresh) > 1e-3  # the steps moved the factors
    # the main process alone wrote its file inside gathered_adapters: the oracle's
    assert _max_diff(ranks[0]["main_files"]["lokr_diffusers"], ranks[0]["ref_files"]["lokr_diffusers"]) <= TOL
    main = ranks[0]  # the optimizer's state, whole on the main process: the oracle's, and back in unchanged
    assert main["opt_keys_match"] and main["opt_diff"] <= TOL and main["opt_reloaded"]
    for r in ranks:
        _check_warnings(r)
        # fuse: the weights and the output are the oracle's fused ones; unfuse: the weights bit for bit
        assert _max_diff(r["merged_weights"], r["ref_merged_weights"]) <= TOL
        torch.testing.assert_close(r["merged_out"], r["ref_merged_out"], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["merged_out"], r["unmerged_out"], rtol=0, atol=1e-5)
        assert r["unmerge_changed"] == []
        assert torch.equal(r["after_unmerge_out"], r["unmerged_out"])
        # the files written from the sharded model hold the whole tensors: the oracle's
        for fmt, tensors in r["files"].items():
            assert _max_diff(tensors, r["ref_files"][fmt]) <= TOL, fmt
            assert all(torch.equal(tensors[k], ranks[0]["files"][fmt][k]) for k in tensors)
        assert r["swapped_after"] == []  # gathered_adapters put the sharded Parameters back
        assert _max_diff(r["checkpoint_tensors"], r["ref_checkpoint_tensors"]) <= TOL
        # a state dict loaded into the sharded model comes back out as it went in
        assert all(torch.equal(r["reloaded"][k], r["ref_state_dict"][k]) for k in r["ref_state_dict"])


@pytest.mark.parametrize("mode", [pytest.param("root", marks=pytest.mark.slow), "layers"])
def test_flux_sharded_whole_or_per_layer_trains_as_one_process(mode: str) -> None:
    """layers: every LoKr layer its own FSDP unit, against every bare Linear: a LoKr Linear on a 2-D input
    (Flux's timestep embedders) returns no view where F.linear returns none."""
    ranks = spawn(flux_case, mode, False)
    _check_training(ranks)
    for r in ranks:
        _check_warnings(r)


@pytest.mark.slow
def test_sd_unet_sharded_by_blocks_trains_fuses_and_exports_as_one_process() -> None:
    ranks = spawn(sd_case)
    ref = ranks[0]["ref_losses"]
    for step in range(STEPS):
        assert sum(r["losses"][step] for r in ranks) / len(ranks) == pytest.approx(ref[step], abs=TOL)
    for r in ranks:
        assert r["warned"] == []  # whole blocks: the UNet's blocks return no views
        torch.testing.assert_close(r["merged_out"], r["ref_merged_out"], rtol=0, atol=1e-5)
        assert r["unmerge_changed"] == []
        assert _max_diff(r["files"]["comfyui"], r["ref_files"]["comfyui"]) <= TOL
        assert all(torch.equal(v, ranks[0]["files"]["comfyui"][k]) for k, v in r["files"]["comfyui"].items())


def test_repeated_blocks_are_the_models_own() -> None:
    """shard_lokr_model's units: diffusers' `_no_split_modules` / `_repeated_blocks`, outermost only."""
    from diffusers.models.attention import BasicTransformerBlock
    from helpers.dit_models import tiny

    from lokr_diffusers import LoKrConfig, LoKrModel, dit_target_modules
    from lokr_diffusers.sharding import repeated_blocks
    from lokr_diffusers.tiny import make_sd_pipeline
    flux = tiny("flux")
    want = [*flux.transformer_blocks, *flux.single_transformer_blocks]
    assert [id(b) for b in repeated_blocks(flux)] == [id(b) for b in want]
    model = LoKrModel(flux, LoKrConfig(r=2, target_modules=dit_target_modules(flux)))
    assert [id(b) for b in repeated_blocks(model)] == [id(b) for b in want]
    unet = make_sd_pipeline().unet
    blocks = repeated_blocks(unet)
    names = sorted({type(b).__name__ for b in blocks})
    assert names == ["BasicTransformerBlock", "CrossAttnUpBlock2D", "ResnetBlock2D", "UpBlock2D"]
    assert not any(b is not o and any(b is s for s in o.modules()) for b in blocks for o in blocks)
    assert [type(b) for b in repeated_blocks(unet, [BasicTransformerBlock])] == \
        [BasicTransformerBlock] * sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())


def test_training_refuses_fsdp1_and_several_components() -> None:
    """training/fsdp.py on accelerate's attributes (accelerate enables FSDP on accelerators only, so its
    FSDP2 path cannot run here; the CPU runs above shard with torch's fully_shard directly)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lokr_diffusers.training.errors import TrainingInputError
    from lokr_diffusers.training.fsdp import check_fsdp_run, saving, uses_fsdp
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False, is_main_process=False)
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    assert not uses_fsdp(ddp) and uses_fsdp(fsdp1) and uses_fsdp(fsdp2)
    check_fsdp_run(ddp, ["unet", "text_encoder"])
    check_fsdp_run(fsdp2, ["transformer"])
    with pytest.raises(TrainingInputError, match="fsdp_version: 2"):
        check_fsdp_run(fsdp1, ["transformer"])
    with pytest.raises(TrainingInputError, match="--train_text_encoder"):
        check_fsdp_run(fsdp2, ["transformer", "text_encoder"])
    with saving(ddp, []) as main:
        assert main is False
