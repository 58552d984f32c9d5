"""HunyuanVideo and HunyuanVideo 1.5 beyond the parametrized DiT suites: the two spellings of their original names
(Tencent's checkpoint / musubi-tuner, ComfyUI's internal Flux-style ones), what a ComfyUI file is written with, the
tiny HunyuanVideo's row order (diffusers' converter hard-codes hidden 3072, so only the full size runs it), and
fuse_qkv_projections() doing nothing to either. Oracles: tests/helpers/dit_files.py (ORIGINALS, by hand from the
converters), tests/helpers/comfyui_dit.py (ComfyUI's module names and rule, by hand), never the package's tables.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers.comfyui_dit import comfy_originals, comfyui_transformer
from helpers.dit_files import ORIGINALS, assert_close, bare_pipeline, original_file
from helpers.dit_models import run, tiny
from helpers.fullsize_dit import meta_transformer
from safetensors.torch import load_file
from torch import nn

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers
from lokr_diffusers.formats.dit import dit_name_map

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("hunyuanvideo", "hunyuanvideo15")
# (Tencent's name, ComfyUI's) of the same rows, by hand from comfy/supported_models.py process_unet_state_dict
SPELLINGS = [
    ("double_blocks.3.img_mod.linear", "double_blocks.3.img_mod.lin"),
    ("double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn.qkv"),
    ("double_blocks.19.txt_attn_proj", "double_blocks.19.txt_attn.proj"),
    ("double_blocks.7.txt_mlp.fc2", "double_blocks.7.txt_mlp.2"),
    ("single_blocks.39.modulation.linear", "single_blocks.39.modulation.lin"),
    ("time_in.mlp.0", "time_in.in_layer"), ("guidance_in.mlp.2", "guidance_in.out_layer"),
    ("txt_in.t_embedder.mlp.2", "txt_in.t_embedder.out_layer"),
    ("txt_in.c_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    ("txt_in.individual_token_refiner.blocks.1.self_attn_qkv",
     "txt_in.individual_token_refiner.blocks.1.self_attn.qkv"),
    ("txt_in.individual_token_refiner.blocks.0.mlp.fc1", "txt_in.individual_token_refiner.blocks.0.mlp.0"),
]


@pytest.mark.parametrize(("tencent", "comfy"), SPELLINGS)
def test_both_spellings_name_the_same_rows_in_the_original_layouts(tencent: str, comfy: str) -> None:
    nm = dit_name_map(meta_transformer("hunyuanvideo"))
    target = nm.originals[tencent]
    for name in (tencent, comfy):
        for module_name in (f"diffusion_model.{name}", "lora_unet_" + name.replace(".", "_")):
            found = nm.lookup(module_name)
            assert found is not None and found[1] == target, module_name
    assert nm.lookup(f"transformer.{comfy}") is None  # not a diffusers-path name
    assert nm.comfyui_name(tencent) == comfy
    assert set(nm.covering.values()) <= set(nm.originals)  # covering keeps Tencent's names
    assert comfy not in nm.originals or comfy == tencent


def test_unrenamed_originals_keep_one_name() -> None:
    nm = dit_name_map(meta_transformer("hunyuanvideo-1.5"))
    for name in ("double_blocks.0.img_attn_q", "byt5_in.fc1", "vision_in.proj.3", "final_layer.adaLN_modulation.1"):
        assert name not in nm.aliases and nm.comfyui_name(name) == name
    assert nm.comfyui_name("double_blocks.53.img_attn_proj") == "double_blocks.53.img_attn.proj"


def test_tiny_hunyuanvideo_fused_rows_follow_the_converter() -> None:
    """d = 20: img_attn_qkv / self_attn_qkv rows are q, k, v (chunk 3), linear1 q, k, v then the MLP input (4d),
    final_layer.adaLN_modulation.1 (shift, scale) is diffusers' (scale, shift): convert_hunyuan_video_transformer_
    to_diffusers, whose 3072 split only fits the full size (test_formats_dit.py runs it there)."""
    model = tiny("hunyuanvideo")
    nm = dit_name_map(model)
    d = 20

    def rows(original: str) -> list[tuple[str, int, int, int]]:
        return [(p.path, p.start, p.stop, p.src_start) for p in nm.originals[original].pieces]

    b, s, r = "transformer_blocks.1.attn.", "single_transformer_blocks.0.", "context_embedder.token_refiner."
    assert rows("double_blocks.1.img_attn_qkv") == [(b + "to_q", 0, d, 0), (b + "to_k", d, 2 * d, 0),
                                                    (b + "to_v", 2 * d, 3 * d, 0)]
    assert rows("double_blocks.1.txt_attn_qkv") == [(b + "add_q_proj", 0, d, 0), (b + "add_k_proj", d, 2 * d, 0),
                                                    (b + "add_v_proj", 2 * d, 3 * d, 0)]
    assert rows("single_blocks.0.linear1") == [(s + "attn.to_q", 0, d, 0), (s + "attn.to_k", d, 2 * d, 0),
                                               (s + "attn.to_v", 2 * d, 3 * d, 0), (s + "proj_mlp", 3 * d, 7 * d, 0)]
    assert rows("txt_in.individual_token_refiner.blocks.0.self_attn_qkv")[1] == (
        r + "refiner_blocks.0.attn.to_k", d, 2 * d, 0)
    assert rows("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1") == [
        (r + "refiner_blocks.0.norm_out.linear", 0, 2 * d, 0)]  # no swap
    assert rows("final_layer.adaLN_modulation.1") == [("norm_out.linear", 0, d, d), ("norm_out.linear", d, 2 * d, 0)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_qkv_projections_changes_nothing(family: str) -> None:
    """fusable=False: diffusers' fuse_qkv_projections() leaves every attention unfused (no to_qkv is called)."""
    model = tiny(family)
    before = run(model, family)
    model.fuse_qkv_projections()  # type: ignore[operator]
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())
    assert torch.equal(run(model, family), before)
    assert dit_name_map(model).originals == dit_name_map(tiny(family)).originals


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_file_of_a_loaded_file_is_in_comfyuis_spelling(family: str, tmp_path: Any) -> None:
    """A kohya file naming originals in both spellings is written back to ComfyUI once per original, under
    ComfyUI's internal name, with the tensors loaded; ComfyUI's rule on that file gives the loaded outputs."""
    pipe = bare_pipeline(family)
    base = copy.deepcopy(pipe.transformer)
    sd_in, _ = original_file(base, family, "kohya", aligned=False, seed=3)
    pipe.load_lokr_weights(sd_in, adapter_name="a")
    sd = load_file(pipe.save_lokr_weights(str(tmp_path / "c.safetensors"), adapter_name="a", format="comfyui"))
    comfy = comfy_originals(family, base)
    names = {k.rsplit(".", 1)[0].removeprefix("diffusion_model.") for k in sd}
    assert names <= set(comfy) and len(names) == len(ORIGINALS[family])
    assert_close(run(comfyui_transformer(base, family, sd), family), run(pipe.transformer, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_file_of_separate_modules(family: str, tmp_path: Any) -> None:
    """An adapter on diffusers Linears: those that are a whole original get ComfyUI's name; rows of a fused one
    (HunyuanVideo's to_q, any refiner's to_q) have none, since ComfyUI has no diffusers-path map for this model:
    refused, or left out with strict=False."""
    pipe = bare_pipeline(family)
    base = copy.deepcopy(pipe.transformer)
    whole = r".*transformer_blocks\.\d+\.(ff\.net\.(0\.proj|2)|attn\.(to_out\.0|to_add_out|add_v_proj)|norm1\.linear)"
    add_lokr(pipe, {"transformer": LoKrConfig(r=2, alpha=3.0, target_modules=whole, init_weights=False)}, "a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lokr_layers(pipe.transformer):
            for t in layer.factors("a").values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    path = pipe.save_lokr_weights(str(tmp_path / "c.safetensors"), adapter_name="a", format="comfyui", strict=False)
    sd = load_file(path)
    names = {k.rsplit(".", 1)[0] for k in sd}
    assert {"diffusion_model.double_blocks.0.img_mlp.0", "diffusion_model.double_blocks.1.img_mod.lin"} <= names
    assert ("diffusion_model.double_blocks.1.txt_attn_v" in names) == (family == "hunyuanvideo15")
    if family == "hunyuanvideo15":  # every module written: ComfyUI's rule gives the pipeline's outputs
        assert_close(run(comfyui_transformer(base, family, sd), family), run(pipe.transformer, family))
    else:  # add_v_proj is rows of txt_attn_qkv: no ComfyUI name
        assert not any("add_v_proj" in n or "txt_attn.qkv" in n for n in names)
        with pytest.raises(ValueError, match="cannot be written for ComfyUI"):
            pipe.save_lokr_weights(str(tmp_path / "d.safetensors"), adapter_name="a", format="comfyui")


def test_models_are_told_apart() -> None:
    from lokr_diffusers import families

    assert families.of_model(tiny("hunyuanvideo")).name == "hunyuanvideo"  # type: ignore[union-attr]
    assert families.of_model(tiny("hunyuanvideo15")).name == "hunyuanvideo15"  # type: ignore[union-attr]
    assert isinstance(tiny("hunyuanvideo15").get_submodule("x_embedder.proj"), nn.Conv3d)  # left out: not adaptable


def test_alias_renames_read_a_name_as_ending_in_a_dot() -> None:
    """OriginalTable.aliases are substring renames over `name + "."`, in order (ComfyUI's on `<name>.weight`): a
    pattern ending in a dot matches at the name's end or before a dot, never inside a longer leaf."""
    from lokr_diffusers.families.tables import OriginalTable, alias_of

    table = OriginalTable((), fusable=False, aliases=(("mlp.fc1.", "mlp.0."), ("_in.mlp.0.", "_in.in_layer.")))
    assert alias_of(table, "blocks.0.mlp.fc1") == "blocks.0.mlp.0"
    assert alias_of(table, "blocks.0.mlp.fc10") is None
    assert alias_of(table, "time_in.mlp.0") == "time_in.in_layer"
    assert alias_of(table, "x.mlp.fc1.y") == "x.mlp.0.y"
    assert alias_of(OriginalTable((), fusable=False), "time_in.mlp.0") is None
