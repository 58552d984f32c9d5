"""Saving adapters held as row pieces of a fused module (a Flux qkv / linear1 loaded onto to_q, to_k, to_v,
proj_mlp): the shared factors are written once (safetensors refuses shared memory), each piece's rows
beside, and every way back (set_adapter_state_dict, load_lokr_weights of our layout, save_pretrained)
gives the same outputs with the factors shared again. The PEFT layouts refuse pieces they cannot hold rather
than write something else (the consumer exports: tests/test_export_dit.py).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.dit_files import bare_pipeline, flux_with_row_pieces, original_file
from helpers.dit_models import run
from helpers.file_memory import own_memory
from helpers.tiny_dit import make_tiny_dit_pipeline
from safetensors.torch import load_file, save_file

from lokr_diffusers import LoKrConfig, LoKrModel, add_lokr
from lokr_diffusers.layers import LoKrLayer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)


def piece_groups(model: torch.nn.Module, adapter: str = "a") -> dict[tuple[int, ...], list[str]]:
    """Layers holding rows of `adapter`, grouped by the identity of their factor Parameters."""
    out: dict[tuple[int, ...], list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoKrLayer) and adapter in m.rows:
            out.setdefault(tuple(id(t) for t in m.factors(adapter).values()), []).append(name)
    return out


def test_adapter_state_dict_writes_shared_factors_once(tmp_path: Any) -> None:
    pipe = flux_with_row_pieces()
    groups = piece_groups(pipe.transformer)
    assert sorted(len(v) for v in groups.values()) == [1, 3, 3, 4]  # final adaLN (swapped), 2 qkv, linear1
    sd = LoKrModel(pipe.transformer, None).get_adapter_state_dict("a")
    save_file(sd, str(tmp_path / "a.safetensors"))  # refuses tensors sharing memory
    for paths in groups.values():
        with_factors = [p for p in paths if f"base_model.model.{p}.lokr_w1" in sd]
        assert len(with_factors) == 1, paths
        assert all(f"base_model.model.{p}.lokr_rows" in sd for p in paths)
    other = flux_with_row_pieces(seed=5)
    assert not torch.equal(run(other.transformer, "flux"), run(pipe.transformer, "flux"))
    LoKrModel(other.transformer, None).set_adapter_state_dict(load_file(str(tmp_path / "a.safetensors")), "a")
    assert torch.equal(run(other.transformer, "flux"), run(pipe.transformer, "flux"))
    assert sorted(map(sorted, piece_groups(other.transformer).values())) == sorted(map(sorted, groups.values()))


def test_adapter_state_dict_needs_the_factors_of_each_fused_module() -> None:
    pipe = flux_with_row_pieces()
    sd = LoKrModel(pipe.transformer, None).get_adapter_state_dict("a")
    sd = {k: v for k, v in sd.items() if not k.startswith("base_model.model.single_transformer_blocks.0.")}
    with pytest.raises(KeyError, match=r"single_transformer_blocks\.0"):
        LoKrModel(pipe.transformer, None).set_adapter_state_dict(sd, "a")


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
def test_our_layout_round_trip(dora: bool, tmp_path: Any) -> None:
    pipe = flux_with_row_pieces(dora=dora)
    want = run(pipe.transformer, "flux")
    path = pipe.save_lokr_weights(str(tmp_path / "ours.safetensors"), adapter_name="a", format="lokr_diffusers")
    fresh = bare_pipeline("flux")
    fresh.load_lokr_weights(path)
    assert torch.equal(run(fresh.transformer, "flux"), want)
    assert sorted(map(sorted, piece_groups(fresh.transformer).values())) == \
        sorted(map(sorted, piece_groups(pipe.transformer).values()))
    origins = {m.origins["a"] for m in fresh.transformer.modules() if isinstance(m, LoKrLayer) and "a" in m.rows}
    assert origins == {"double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1",
                       "final_layer.adaLN_modulation.1"}


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_peft_layouts_refuse_row_pieces_off_block_edges(fmt: str, tmp_path: Any) -> None:
    """Flux.1's linear1 (to_q, to_k, to_v, proj_mlp) off W1's block edges: no diffusers Linear holds it and PEFT's
    LoKr cannot hold part of a Kronecker product's rows (ComfyUI files write it: tests/test_export_dit.py)."""
    pipe = flux_with_row_pieces()
    with pytest.raises(ValueError, match=r"block edges.*lokr_diffusers"):
        pipe.save_lokr_weights(str(tmp_path / "x.safetensors"), adapter_name="a", format=fmt)
    assert not os.listdir(tmp_path)


def test_save_pretrained_round_trip(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_tiny_dit_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd, _ = original_file(base, "flux", "comfyui", aligned=False, seed=3)  # tiny_dit's Flux.1 has d = 16 too
    pipe.load_lokr_weights(sd, adapter_name="a")
    kwargs: dict[str, Any] = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="latent")
    want = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(str(tmp_path))
    back = own_memory(DiffusionPipeline.from_pretrained(str(tmp_path)))  # tests/helpers/file_memory.py: why
    back.load_lokr_weights(str(tmp_path), weight_name="lokr_adapters.safetensors")
    assert torch.equal(back(generator=torch.Generator().manual_seed(0), **kwargs).images, want)


@pytest.mark.parametrize("fused", [False, True], ids=["adapters", "fused"])
def test_save_pretrained_round_trip_flux2_klein(fused: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Flux.2 [klein] pipeline with LoKr on the transformer and the Qwen3 text encoder, saved and read back,
    generates what it did before saving: the adapters from lokr_adapters.safetensors, or fused into the saved
    weights. The weights read back map the file, so they get memory of their own before the bit-equality."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_tiny_dit_pipeline("flux2")
    qwen3 = LoKrConfig(r=2, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lokr(pipe, {"transformer": LoKrConfig(r=2, init_weights=False), "text_encoder": qwen3}, adapter_name="a")
    if fused:
        pipe.fuse_lokr(lokr_scale=0.5)
    kwargs: dict[str, Any] = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="latent")
    want = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(str(tmp_path))
    back = own_memory(DiffusionPipeline.from_pretrained(str(tmp_path)))
    side = tmp_path / "lokr_adapters.safetensors"
    assert side.exists() != fused
    if not fused:
        back.load_lokr_weights(str(tmp_path), weight_name="lokr_adapters.safetensors")
        assert back.get_list_lokr_adapters() == {"transformer": ["a"], "text_encoder": ["a"]}
    base = make_tiny_dit_pipeline("flux2")(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.equal(want, base)  # the adapters change the latents: the comparison below can fail
    assert torch.equal(back(generator=torch.Generator().manual_seed(0), **kwargs).images, want)
