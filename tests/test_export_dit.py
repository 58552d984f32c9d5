"""Export of adapters on Flux.1 / SD3 / Flux.2 Klein / Z-Image / Qwen-Image (2.1) / HiDream-I1 (lokr_diffusers/export/;
docs/formats.md §Export of DiT adapters), against references that do not ask the package for names, rows or ΔW:

- ComfyUI: tests/helpers/comfyui_dit.py, ComfyUI's loading written from its key maps (originals as diffusers rows, the
  diffusers names it takes with their offsets and swaps) and tests/helpers/references.py's LoKr rule; the expected key
  names spot-checked by hand;
- diffusers 0.42.1's own `load_lora_weights` (the original, not our routing) for Flux.2 Klein and Z-Image, PEFT
  0.21.2's `PeftModel.from_pretrained` for the PEFT folders;
- round trips through our loader. fp32, 1e-5 relative, on the tiny transformers of tests/helpers/dit_models.py.
"""

from __future__ import annotations

import copy
import logging
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers.comfyui_dit import comfyui_text_encoder, comfyui_transformer
from helpers.dit_files import FAMILIES, FLUX, assert_close, bare_pipeline, original_file, rows_of, shape_of
from helpers.dit_models import run
from helpers.tiny_dit import make_tiny_dit_pipeline
from safetensors.torch import load_file
from torch import Tensor, nn

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers, patches
from lokr_diffusers.targeting import dit_target_modules
from lokr_diffusers.training.output import save_outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)
A = "src"

# A few names each family's file must hold, by hand from ComfyUI's key maps (docs/formats.md §Export of DiT adapters)
EXPECTED: dict[str, tuple[str, ...]] = {
    "flux": ("diffusion_model.double_blocks.0.img_attn.proj", "diffusion_model.single_blocks.1.linear2",
             "diffusion_model.double_blocks.1.txt_mod.lin", "transformer.transformer_blocks.0.attn.to_q",
             "transformer.transformer_blocks.1.attn.add_v_proj", "transformer.single_transformer_blocks.0.proj_mlp",
             "transformer.norm_out.linear", "diffusion_model.img_in"),
    "sd3": ("diffusion_model.joint_blocks.1.x_block.mlp.fc1", "diffusion_model.context_embedder",
            "transformer.transformer_blocks.0.attn2.to_v", "transformer.transformer_blocks.2.norm1_context.linear",
            "diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1", "transformer.norm_out.linear"),
    "flux2": ("diffusion_model.single_blocks.0.linear1", "diffusion_model.double_stream_modulation_img.lin",
              "diffusion_model.time_in.in_layer", "transformer.transformer_blocks.1.attn.add_k_proj",
              "diffusion_model.double_blocks.0.img_mlp.0", "transformer.norm_out.linear"),
    "zimage": ("transformer.layers.0.attention.to_q", "diffusion_model.layers.1.feed_forward.w2",
               "diffusion_model.x_embedder", "diffusion_model.context_refiner.0.attention.out",
               "diffusion_model.final_layer.adaLN_modulation.1"),
    # no diffusers name: ComfyUI's key map has no Wan branch (comfy/lora.py), only the original names
    "wan": ("diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.1.cross_attn.v_img",
            "diffusion_model.blocks.0.ffn.2", "diffusion_model.head.head", "diffusion_model.time_projection.1",
            "diffusion_model.img_emb.proj.3", "diffusion_model.text_embedding.0"),
    # LTX: Lightricks' names, which ComfyUI's LTXV / LTXAV models keep (diffusers' paths but for the top-level renames)
    "ltxvideo": ("diffusion_model.patchify_proj", "diffusion_model.adaln_single.linear",
                 "diffusion_model.adaln_single.emb.timestep_embedder.linear_1",
                 "diffusion_model.transformer_blocks.1.attn2.to_k", "diffusion_model.transformer_blocks.0.ff.net.2",
                 "diffusion_model.caption_projection.linear_2", "diffusion_model.proj_out"),
    "ltx2": ("diffusion_model.audio_patchify_proj", "diffusion_model.av_ca_v2a_gate_adaln_single.linear",
             "diffusion_model.audio_adaln_single.emb.timestep_embedder.linear_2",
             "diffusion_model.transformer_blocks.0.audio_to_video_attn.to_q",
             "diffusion_model.transformer_blocks.0.audio_ff.net.0.proj", "diffusion_model.audio_proj_out"),
    # the same-name families: each Linear by its own name; Qwen-Image 2.1's gate_layer / proj adapted apart are
    # ComfyUI's diffusers names for the halves of its img_mlp.gate_up
    "qwenimage": ("diffusion_model.transformer_blocks.0.attn.add_q_proj", "diffusion_model.norm_out.linear",
                  "diffusion_model.transformer_blocks.1.img_mod.1", "diffusion_model.img_in",
                  "diffusion_model.transformer_blocks.0.txt_mlp.net.2",
                  "diffusion_model.time_text_embed.timestep_embedder.linear_1"),
    "qwenimage21": ("transformer.transformer_blocks.0.img_mlp.gate_layer",
                    "transformer.transformer_blocks.1.img_mlp.proj",
                    "diffusion_model.transformer_blocks.1.img_mlp.out", "diffusion_model.modulation.1",
                    "diffusion_model.txt_in.out_layer", "diffusion_model.transformer_blocks.0.attn.to_out.0"),
    "hidream": ("diffusion_model.double_stream_blocks.0.block.attn1.to_k_t",
                "diffusion_model.single_stream_blocks.0.block.ff_i.experts.3.w1",
                "diffusion_model.double_stream_blocks.0.block.ff_t.w2", "diffusion_model.caption_projection.1.linear",
                "diffusion_model.final_layer.adaLN_modulation.1", "diffusion_model.x_embedder.proj"),
    # Chroma: ComfyUI's Flux key map (diffusers paths of the blocks), the approximator by its original names
    "chroma": ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.1.proj_mlp",
               "diffusion_model.double_blocks.1.txt_attn.proj", "diffusion_model.single_blocks.0.linear2",
               "diffusion_model.distilled_guidance_layer.layers.1.out_layer",
               "diffusion_model.distilled_guidance_layer.in_proj", "diffusion_model.txt_in",
               "diffusion_model.final_layer.linear"),
    # Lumina 2: original names only (ComfyUI has no map of its diffusers paths); q, k, v have none of their own
    "lumina2": ("diffusion_model.layers.0.attention.out", "diffusion_model.noise_refiner.0.feed_forward.w2",
                "diffusion_model.layers.1.adaLN_modulation.1", "diffusion_model.final_layer.adaLN_modulation.1",
                "diffusion_model.final_layer.linear", "diffusion_model.cap_embedder.1",
                "diffusion_model.t_embedder.mlp.0", "diffusion_model.x_embedder"),
}
# ComfyUI loads Lumina 2 by its original names only (its Lumina2 key map gives Z-Image's diffusers spellings), and q,
# k, v are rows of one original (attention.qkv): an adapter on them one by one has no ComfyUI name (see
# test_lumina2_comfyui_file_leaves_out_separate_qkv).
# HunyuanVideo (1.5's token refiner too) likewise: ComfyUI has no diffusers-path map for it, its fused originals are
# written whole or not at all (tests/test_hunyuanvideo.py::test_comfyui_file_of_separate_modules).
NO_SEPARATE_QKV = {
    "lumina2": "ComfyUI has no name for Lumina 2's to_q / to_k / to_v one by one",
    "hunyuanvideo": "ComfyUI has no name for HunyuanVideo's q, k, v one by one: tests/test_hunyuanvideo.py",
    "hunyuanvideo15": "ComfyUI has no name for the token refiner's q, k, v one by one: tests/test_hunyuanvideo.py",
}
SEPARATE = [pytest.param(f, marks=pytest.mark.skip(reason=NO_SEPARATE_QKV[f])) if f in NO_SEPARATE_QKV else f
            for f in FAMILIES]


def names_of(sd: dict[str, Tensor]) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in sd}


def randomise(model: nn.Module, seed: int, dora: bool = False) -> None:
    """Random factors; with `dora`, DoRA on every fifth layer (output axis on even ones, magnitudes 1.2x the base
    norms) and on norm_out.linear (output axis: its rows are swapped in ComfyUI's model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (path, layer) in enumerate(lokr_layers(model)):
            for t in layer.factors(A).values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            if dora and (i % 5 == 2 or path == "norm_out.linear") and len(layer.weight_shape) == 2:
                w = layer.weight.detach()
                out_axis = i % 10 == 2 or path == "norm_out.linear"
                m = w.norm(dim=1, keepdim=True) if out_axis else w.norm(dim=0, keepdim=True)
                layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], r=layer.r[A], alpha=layer.alpha[A],
                                          dora_scale=m * 1.2)


def adapted(family: str, dora: bool = False, seed: int = 0) -> tuple[Any, nn.Module]:
    """(bare pipeline whose transformer holds adapter A on attention, feed-forward, adaLN and embedders with
    random factors: low-rank W2 (r 2, alpha 3), both factors full (proj_out / HiDream's final_layer.linear, r 64),
    r 1 on to_k; the base)."""
    pipe = bare_pipeline(family)
    base = copy.deepcopy(pipe.transformer)
    targets = dit_target_modules(pipe.transformer, norms=True, embedders=True)
    config = LoKrConfig(r=2, alpha=3.0, target_modules=targets, init_weights=False,
                        rank_pattern={r"^(proj_out|final_layer\.linear|layers\.0\.feed_forward\.(w2|linear_2))$": 64,
                                      r".*to_k$": 1},
                        alpha_pattern={r".*to_k$": 0.5})
    add_lokr(pipe, {"transformer": config}, A)
    randomise(pipe.transformer, seed, dora)
    return pipe, base


def save(pipe: Any, tmp_path: Any, fmt: str, **kwargs: Any) -> str:
    name = f"{fmt}.safetensors" if fmt != "peft" else "peft"
    return pipe.save_lokr_weights(str(tmp_path / name), adapter_name=A, format=fmt, **kwargs)


# ------------------------------------------------------------------------------------------ comfyui
@pytest.mark.parametrize("family", SEPARATE)
def test_comfyui_file_of_separate_modules(family: str, tmp_path: Any) -> None:
    pipe, base = adapted(family, dora=True)
    path = save(pipe, tmp_path, "comfyui")
    sd = load_file(path)
    assert set(EXPECTED[family]) <= names_of(sd)
    assert all(k.startswith(("diffusion_model.", "transformer.")) for k in sd)
    assert_close(run(pipe.transformer, family), run(comfyui_transformer(base, family, sd), family))
    pipe.set_lokr_adapters(A, adapter_weights=0.6)
    assert_close(run(pipe.transformer, family), run(comfyui_transformer(base, family, sd, 0.6), family))
    pipe.set_lokr_adapters(A, adapter_weights=1.0)
    back = bare_pipeline(family, copy.deepcopy(base))
    back.load_lokr_weights(path)
    assert_close(run(back.transformer, family), run(pipe.transformer, family), rel=1e-6)


# HunyuanVideo files are written in ComfyUI's own spelling of the originals, not the Tencent names they were loaded
# by: tests/test_hunyuanvideo.py::test_comfyui_file_of_a_loaded_file_is_in_comfyuis_spelling
SAME_NAMES = [pytest.param(f, marks=pytest.mark.skip(reason="ComfyUI spelling: test_hunyuanvideo.py"))
              if f.startswith("hunyuanvideo") else f for f in FAMILIES]


@pytest.mark.parametrize("family", SAME_NAMES)
@pytest.mark.parametrize("aligned", [True, False], ids=["on block edges", "off block edges"])
def test_comfyui_file_of_fused_modules_is_the_file_loaded(family: str, aligned: bool, tmp_path: Any) -> None:
    """An adapter loaded from a kohya file naming fused originals is written back once per original, under
    ComfyUI's name, with the very tensors loaded; ComfyUI's rule on it and our loader both give its outputs."""
    pipe = bare_pipeline(family)
    base = copy.deepcopy(pipe.transformer)
    sd_in, modules = original_file(base, family, "kohya", aligned=aligned, seed=3)
    pipe.load_lokr_weights(sd_in, adapter_name=A)
    path = save(pipe, tmp_path, "comfyui")
    sd = load_file(path)
    assert names_of(sd) == {f"diffusion_model.{o}" for o in modules}
    for original, tensors in modules.items():
        for leaf, t in tensors.items():
            assert torch.allclose(sd[f"diffusion_model.{original}.{leaf}"], t, rtol=1e-6, atol=0), (original, leaf)
    want = run(pipe.transformer, family)
    assert_close(want, run(comfyui_transformer(base, family, sd), family))
    back = bare_pipeline(family, copy.deepcopy(base))
    back.load_lokr_weights(path)
    assert torch.equal(run(back.transformer, family), want)


def test_lumina2_comfyui_file_leaves_out_separate_qkv(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Lumina 2 adapted module by module: every module with an original of its own is written under it, q, k, v (rows
    of attention.qkv, which ComfyUI reaches by that name only) are refused by name, or left out with strict=False;
    ComfyUI's rule on the file gives the pipeline without them."""
    pipe, base = adapted("lumina2", dora=True)
    with pytest.raises(ValueError, match=r"attn\.to_q: ComfyUI's lumina2 key map has no name"):
        save(pipe, tmp_path, "comfyui")
    assert not os.listdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        sd = load_file(save(pipe, tmp_path, "comfyui", strict=False))
    assert "layers.0.attn.to_k" in caplog.text
    assert set(EXPECTED["lumina2"]) <= names_of(sd)
    assert all(k.startswith("diffusion_model.") and ".attention.qkv." not in k for k in sd)
    for path, layer in list(lokr_layers(pipe.transformer)):
        if path.rpartition(".")[2] in ("to_q", "to_k", "to_v"):
            layer.delete_adapter(A)
    assert_close(run(pipe.transformer, "lumina2"), run(comfyui_transformer(base, "lumina2", sd), "lumina2"))


@pytest.mark.parametrize("axis", ["output", "input"])
def test_comfyui_file_of_fused_modules_with_dora(axis: str, tmp_path: Any) -> None:
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd_in, _ = original_file(base, "flux", "comfyui", style="both low-rank", aligned=False, seed=30)
    g = torch.Generator().manual_seed(31)
    for original, blocks in FLUX.items():
        w = torch.cat([m.weight[a:b] for m, a, b in rows_of(base, blocks)]).detach()
        out, in_ = shape_of(base, blocks)
        m = w.norm(dim=1, keepdim=True) if axis == "output" else w.norm(dim=0, keepdim=True)
        noise = torch.rand(out, 1, generator=g) if axis == "output" else torch.rand(1, in_, generator=g)
        sd_in[f"diffusion_model.{original}.dora_scale"] = m * (noise + 0.6)
    pipe.load_lokr_weights(sd_in, adapter_name=A)
    path = save(pipe, tmp_path, "comfyui")
    sd = load_file(path)
    want = run(pipe.transformer, "flux")
    assert_close(want, run(comfyui_transformer(base, "flux", sd), "flux"))
    back = bare_pipeline("flux", copy.deepcopy(base))
    back.load_lokr_weights(path)
    assert_close(run(back.transformer, "flux"), want, rel=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_comfyui_names_a_fused_single_block_qkv_as_rows_of_linear1(dora: bool, tmp_path: Any) -> None:
    """Flux.1 after fuse_qkv_projections(): a single block's to_qkv is rows [0, 3 · hidden) of linear1, which
    ComfyUI's key map names `diffusion_model.single_blocks.N.linear1_qkv` (comfy/lora.py model_lora_keys_unet).
    ComfyUI's rule on the file (tests/helpers/comfyui_dit.py, on the unfused model ComfyUI's linear1 stands for)
    gives the pipeline's outputs; our loader reads it back onto a fused pipeline (to_qkv) and an unfused one
    (q, k, v rows)."""
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    pipe.transformer.fuse_qkv_projections()
    targets = ["single_transformer_blocks.0.attn.to_qkv", "single_transformer_blocks.1.attn.to_qkv",
               "transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_out.0"]
    add_lokr(pipe, {"transformer": LoKrConfig(r=2, alpha=3.0, target_modules=targets, init_weights=False)}, A)
    randomise(pipe.transformer, seed=4)
    if dora:  # output axis on one single block (rescaled for ComfyUI's rule), input axis on the other
        for i, axis in enumerate((1, 0)):
            layer = pipe.transformer.get_submodule(f"single_transformer_blocks.{i}.attn.to_qkv")
            m = layer.weight.detach().norm(dim=axis, keepdim=True) * 1.2
            layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], r=layer.r[A], alpha=layer.alpha[A],
                                      dora_scale=m)
    path = save(pipe, tmp_path, "comfyui")
    sd = load_file(path)
    written = ("single_blocks.0.linear1_qkv", "single_blocks.1.linear1_qkv", "double_blocks.0.img_attn.qkv",
               "double_blocks.0.img_attn.proj")
    assert names_of(sd) == {f"diffusion_model.{n}" for n in written}
    want = run(pipe.transformer, "flux")
    assert_close(want, run(comfyui_transformer(base, "flux", sd), "flux"))
    fused = bare_pipeline("flux", copy.deepcopy(base))
    fused.transformer.fuse_qkv_projections()
    fused.load_lokr_weights(path)
    assert_close(run(fused.transformer, "flux"), want, rel=1e-6)
    unfused = bare_pipeline("flux", copy.deepcopy(base))
    unfused.load_lokr_weights(path, adapter_name=A)
    assert_close(run(unfused.transformer, "flux"), want)
    (tmp_path / "again").mkdir()
    assert names_of(load_file(save(unfused, tmp_path / "again", "comfyui"))) == names_of(sd)  # written back as read


def test_comfyui_refuses_a_module_it_has_no_name_for(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Rows of a fused original off W1's block edges, without the rest of their group (an adapter loaded from a
    linear1 file, then taken off proj_mlp): ComfyUI has no name for part of a Kronecker product's rows. Refused by
    name, or left out with strict=False."""
    pipe = bare_pipeline("flux")
    sd_in, _ = original_file(pipe.transformer, "flux", "comfyui", aligned=False, seed=6)
    pipe.load_lokr_weights({k: v for k, v in sd_in.items() if ".single_blocks.0.linear1." in k
                            or ".single_blocks.1.linear2." in k}, adapter_name=A)
    pipe.transformer.get_submodule("single_transformer_blocks.0.proj_mlp").delete_adapter(A)
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.attn\.to_k.*block edges"):
        save(pipe, tmp_path, "comfyui")
    assert not os.listdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        path = save(pipe, tmp_path, "comfyui", strict=False)
    assert "single_transformer_blocks.0.attn.to_q" in caplog.text
    assert names_of(load_file(path)) == {"diffusion_model.single_blocks.1.linear2"}
    with pytest.raises(ValueError, match="transformer is a flux one"):
        save(pipe, tmp_path, "comfyui", base="sd3")


# --------------------------------------------------------------------------------------- text encoders
@pytest.mark.parametrize(("family", "encoders"), [
    ("flux", {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}),
    ("sd3", {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}),
    ("zimage", {"text_encoder": "qwen3"})])
def test_comfyui_text_encoder_names(family: str, encoders: dict[str, str], tmp_path: Any) -> None:
    pipe = make_tiny_dit_pipeline(family)  # type: ignore[arg-type]
    bases = {c: copy.deepcopy(getattr(pipe, c)) for c in encoders}
    add_lokr(pipe, {c: LoKrConfig(r=2, alpha=3.0, init_weights=False) for c in encoders}, A)
    for c in encoders:
        randomise(getattr(pipe, c), seed=len(c))
    sd = load_file(save(pipe, tmp_path, "comfyui"))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    for c, comfy in encoders.items():
        wrapperless = comfy == "qwen3"  # a tiny Qwen3 (width 16) is neither qwen3_4b nor qwen3_8b
        prefix = "text_encoders.transformer.model." if wrapperless else f"text_encoders.{comfy}.transformer."
        assert any(k.startswith(prefix) for k in sd), c
        ref = comfyui_text_encoder(bases[c], comfy, sd, wrapperless=wrapperless)
        with torch.no_grad():
            got, want = getattr(pipe, c)(ids)[0], ref(ids)[0]
        assert_close(got, want)
    if family == "flux":
        assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lokr_w1" in sd


# ---------------------------------------------------------------------------------- diffusers / peft
def diffusers_load(pipe: Any, path: str) -> None:
    """diffusers' own load_lora_weights (the method lokr_diffusers routes LoKr files away from)."""
    patches.original(type(pipe).load_lora_weights)(pipe, path, adapter_name="diffusers")


def peft_factors(out: int, in_: int, r: int, seed: int, alpha: float) -> dict[str, Tensor]:
    """A LoKr module shaped as PEFT plans it (PEFT's own factorization, decompose_factor -1, W1 full)."""
    from peft.tuners.lokr.layer import factorization

    (out_l, out_k), (in_m, in_n) = factorization(out, -1), factorization(in_, -1)
    g = torch.Generator().manual_seed(seed)
    f = {"lokr_w1": torch.randn(out_l, in_m, generator=g) * 0.3, "alpha": torch.tensor(alpha)}
    if r < max(out_k, in_n) / 2:
        f.update(lokr_w2_a=torch.randn(out_k, r, generator=g) * 0.3, lokr_w2_b=torch.randn(r, in_n, generator=g) * 0.3)
    else:
        f["lokr_w2"] = torch.randn(out_k, in_n, generator=g) * 0.3
    return f


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_diffusers_file_loads_in_diffusers(family: str, tmp_path: Any) -> None:
    pipe, base = adapted(family)
    path = save(pipe, tmp_path, "diffusers")
    sd = load_file(path)
    assert all(k.startswith("transformer.") and ".lokr_" in k for k in sd)  # no alpha: diffusers refuses it
    want = run(pipe.transformer, family)
    theirs = bare_pipeline(family, copy.deepcopy(base))
    diffusers_load(theirs, path)
    assert not list(lokr_layers(theirs.transformer))  # PEFT's layers, not ours
    assert_close(run(theirs.transformer, family), want)
    ours = bare_pipeline(family, copy.deepcopy(base))
    ours.load_lokr_weights(path)
    assert_close(run(ours.transformer, family), want)


def test_diffusers_file_of_a_fused_qkv_on_flux2(tmp_path: Any) -> None:
    """A Flux.2 file naming fused qkv originals (off W1's block edges for to_q / to_k / to_v) goes to diffusers'
    fused to_qkv / to_added_qkv, which diffusers' Flux.2 loader makes itself (fuse_qkv_projections())."""
    pipe = bare_pipeline("flux2")
    base = copy.deepcopy(pipe.transformer)
    sd_in: dict[str, Tensor] = {}
    modules = [("double_blocks.0.img_attn.qkv", None), ("double_blocks.1.txt_attn.qkv", None),
               ("double_blocks.0.img_mlp.0", "transformer_blocks.0.ff.linear_in")]
    for i, (original, path) in enumerate(modules):
        out, in_ = (48, 16) if path is None else tuple(base.get_submodule(path).weight.shape)
        sd_in.update({f"diffusion_model.{original}.{k}": v for k, v in peft_factors(out, in_, 1, i, 2.5).items()})
    pipe.load_lokr_weights(sd_in, adapter_name=A)
    assert any(m.rows for _, m in lokr_layers(pipe.transformer))
    path = save(pipe, tmp_path, "diffusers")
    assert {"transformer.transformer_blocks.0.attn.to_qkv", "transformer.transformer_blocks.1.attn.to_added_qkv",
            "transformer.transformer_blocks.0.ff.linear_in"} == names_of(load_file(path))
    want = run(pipe.transformer, "flux2")
    theirs = bare_pipeline("flux2", copy.deepcopy(base))
    diffusers_load(theirs, path)
    assert_close(run(theirs.transformer, "flux2"), want)
    ours = bare_pipeline("flux2", copy.deepcopy(base))
    ours.load_lokr_weights(path)
    assert_close(run(ours.transformer, "flux2"), want)
    # beside an adapter on a separate to_q, which diffusers' fused attention would no longer call: refused
    to_q = {f"transformer.transformer_blocks.1.attn.to_q.{k}": v for k, v in peft_factors(16, 16, 1, 9, 1.0).items()}
    mixed = bare_pipeline("flux2", copy.deepcopy(base))
    mixed.load_lokr_weights({**sd_in, **to_q}, adapter_name=A)
    with pytest.raises(ValueError, match=r"to_q.*lokr_diffusers"):
        save(mixed, tmp_path / "mixed", "diffusers")


@pytest.mark.parametrize("family", ["flux2", "zimage", "wan", "ltxvideo", "ltx2", "qwenimage", "qwenimage21", "hidream",
                                    "chroma", "lumina2", "hunyuanvideo", "hunyuanvideo15"])
def test_peft_folder_loads_in_peft(family: str, tmp_path: Any) -> None:
    from peft import PeftModel

    pipe, base = adapted(family)
    folder = save(pipe, tmp_path, "peft")
    want = run(pipe.transformer, family)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert_close(run(theirs.base_model.model, family), want)
    ours = bare_pipeline(family, copy.deepcopy(base))
    ours.load_lokr_weights(folder)
    assert_close(run(ours.transformer, family), want)


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_what_peft_cannot_hold_is_refused(fmt: str, tmp_path: Any) -> None:
    """Z-Image's fused attention.qkv off W1's block edges (no diffusers Linear holds it), and DoRA."""
    pipe = bare_pipeline("zimage")
    sd_in, _ = original_file(pipe.transformer, "zimage", "comfyui", aligned=False, seed=5)
    pipe.load_lokr_weights(sd_in, adapter_name=A)
    with pytest.raises(ValueError, match="block edges"):
        save(pipe, tmp_path, fmt)
    dora, _ = adapted("flux2", dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        save(dora, tmp_path, fmt)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwenimage", "qwenimage21", "hidream"])
def test_diffusers_and_peft_layouts_read_back_for_flux1_and_sd3(family: str, tmp_path: Any) -> None:
    """diffusers 0.42.1 has no LoKr loader for these (Qwen-Image and HiDream neither); our loader reads both layouts
    back."""
    pipe, base = adapted(family)
    want = run(pipe.transformer, family)
    for fmt in ("diffusers", "peft"):
        back = bare_pipeline(family, copy.deepcopy(base))
        back.load_lokr_weights(save(pipe, tmp_path, fmt))
        assert_close(run(back.transformer, family), want)


# --------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("fmt", ["comfyui", "peft", "diffusers"])
def test_training_outputs(family: str, fmt: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_tiny_dit_pipeline(family)  # type: ignore[arg-type]
    add_lokr(pipe, {"transformer": LoKrConfig(r=2, init_weights=False)}, "default")
    args = SimpleNamespace(output_dir=str(tmp_path), export_format=fmt, pretrained_model_name_or_path="tiny",
                           validation_prompt="a cat", rank=2, alpha=None, unet_target_modules="default",
                           train_text_encoder=False, te_rank=None)
    files = save_outputs(pipe, args, family, SimpleNamespace(global_step=3))
    assert set(files) == {"lokr", fmt, "model_card"}
    fresh = make_tiny_dit_pipeline(family)  # type: ignore[arg-type]
    fresh.load_lokr_weights(files[fmt], adapter_name="back")
    pairs = list(zip(lokr_layers(fresh.transformer), lokr_layers(pipe.transformer), strict=True))
    assert pairs
    for (pa, a), (pb, b) in pairs:
        assert pa == pb
        assert torch.allclose(a.get_delta_weight("back"), b.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="transformer is a"):
        save_outputs(pipe, args, "zimage", SimpleNamespace(global_step=3))
