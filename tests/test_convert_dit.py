"""convert_lokr_file and `lokr-diffusers convert` on Flux.1, SD3, Flux.2 Klein and Z-Image files (convert.py,
export/registry.py; docs/formats.md §Export of DiT adapters).

A conversion must be what a pipeline holding the file saves: the file is loaded into a tiny pipeline of its family
(tests/helpers/tiny_dit.py) and saved with `save_lokr_weights` in the same layout; the converted file must hold the
same tensors, load to the same layers and give the same pipeline outputs as the source loaded directly, and a
conversion that the layout cannot hold must be refused with save's reason. The tiny pipeline's components stand in
for the full-size ones (`lokr_diffusers.convert.meta_components`, per family asked); the full-size DiT variants
themselves are read in `test_a_full_size_file_finds_its_variant`, with files built from ComfyUI's key maps
(tests/helpers/comfyui_dit.py), not from the package's tables.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.comfyui_dit import comfy_originals
from helpers.dit_files import original_file
from helpers.dit_models import tiny as tiny_transformer
from helpers.fullsize_dit import meta_transformer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import lokr_diffusers
from lokr_diffusers import LoKrConfig, add_lokr, families, lokr_layers
from lokr_diffusers import functional as LF
from lokr_diffusers.architectures import DIT_VARIANTS, MODEL_NAMES, meta_components
from lokr_diffusers.cli import CONVERT_BASES, main
from lokr_diffusers.components import pipeline_components
from lokr_diffusers.convert import guess_families
from lokr_diffusers.export import FORMAT_ALIASES
from lokr_diffusers.targeting import dit_target_modules
from lokr_diffusers.tools.lora import LORA_LAYOUTS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)
A = "src"
FAMILIES = ("flux", "sd3", "flux2", "zimage", "ltxvideo", "chroma", "lumina2")
LAYOUTS = ("comfyui", "diffusers", "peft", "lokr_diffusers")


def tiny(family: str) -> Any:
    return families.build_tiny(family)  # the builder the record names (tests/helpers/tiny_dit.py, tiny_<family>.py)


def adapted(family: str, dora: bool = False) -> Any:
    """A tiny pipeline holding adapter A on the transformer (attention and feed-forward) and on every text encoder
    (their default targets), random factors (r 2, alpha 3); with `dora`, output-axis DoRA on one transformer
    layer."""
    pipe = tiny(family)
    configs = {"transformer": LoKrConfig(r=2, alpha=3.0, target_modules=dit_target_modules(pipe.transformer),
                                         init_weights=False)}
    for te in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, te, None) is not None:
            configs[te] = LoKrConfig(r=2, alpha=3.0, init_weights=False)
    add_lokr(pipe, configs, A)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for component, model in pipeline_components(pipe).items():
            for i, (_, layer) in enumerate(lokr_layers(model)):
                for t in layer.factors(A).values():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
                if dora and component == "transformer" and i == 3:
                    m = layer.weight.detach().norm(dim=1, keepdim=True) * 1.2
                    layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], r=layer.r[A],
                                              alpha=layer.alpha[A], dora_scale=m)
    return pipe


def loaded(family: str, path: str, name: str = A) -> Any:
    pipe = tiny(family)
    pipe.load_lokr_weights(path, adapter_name=name)
    return pipe


def outputs(pipe: Any) -> Tensor:
    """The pipeline's latents after two steps: every text encoder and the transformer take part."""
    video = {"num_frames": 9} if type(pipe).__name__.startswith("LTX") else {}  # not LTX-Video's default 161
    out = pipe(prompt="a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0), **video)
    return out.frames if video else out.images


def layers(pipe: Any) -> set[tuple[str, str]]:
    return {(c, p) for c, m in pipeline_components(pipe).items() for p, _ in lokr_layers(m)}


def assert_close(got: Tensor, want: Tensor, rel: float = 1e-5) -> None:
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < rel, f"relative error {err:.2e}"


def target(folder: Path, layout: str) -> str:
    folder.mkdir(exist_ok=True)
    return str(folder / ("lokr" if layout == "peft" else "lokr.safetensors"))


def contents(path: str) -> dict[str, Any]:
    """Every tensor of a file, or of every file of a PEFT folder (keyed by sub-folder), and its configs."""
    p = Path(path)
    if p.is_file():
        return dict(load_file(path))
    out: dict[str, Any] = {}
    for f in sorted(p.rglob("adapter_model.safetensors")):
        out.update({f"{f.parent.relative_to(p)}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(p.rglob("adapter_config.json")):
        out[str(f.relative_to(p))] = json.loads(f.read_text())
    return out


def assert_same_files(got: str, want: str) -> None:
    a, b = contents(got), contents(want)
    assert set(a) == set(b)
    for k, v in b.items():
        same = torch.equal(a[k], v) if isinstance(v, Tensor) else a[k] == v
        assert same, k


@pytest.fixture()
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tiny pipeline's components stand in for each full-size variant convert asks for (its family's): the
    variants asked, in order."""
    names: list[str] = []

    def components(model: str) -> dict[str, Any]:
        names.append(model)
        return pipeline_components(tiny(families.of_variant(model).name))

    monkeypatch.setattr("lokr_diffusers.convert.meta_components", components)
    return names


def convert(src: str, folder: Path, layout: str, base: str | None = None) -> str:
    return lokr_diffusers.convert_lokr_file(src, target(folder, layout), to=layout, base=base)


# ------------------------------------------------------------------------------------ what save writes
# Lumina 2's q, k, v adapted one by one have no ComfyUI name (rows of attention.qkv, and ComfyUI maps no Lumina 2
# diffusers path): ComfyUI's file of such an adapter is refused (tests/test_export_dit.py writes it without them)
SEPARATE_REFUSED = {("lumina2", "comfyui"): r"attn\.to_q: ComfyUI's lumina2 key map has no name"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_converted_file_is_what_the_loaded_pipeline_saves(family: str, layout: str, tmp_path: Path,
                                                            asked: list[str]) -> None:
    """Our layout's file of an adapter on the transformer and the text encoders, converted with base=family."""
    src = adapted(family).save_lokr_weights(str(tmp_path / "src.safetensors"), adapter_name=A,
                                            format="lokr_diffusers")
    if (family, layout) in SEPARATE_REFUSED:  # refused by both, for the same reason
        with pytest.raises(ValueError, match=SEPARATE_REFUSED[family, layout]) as by_convert:
            convert(src, tmp_path / "converted", layout, base=family)
        with pytest.raises(ValueError, match=SEPARATE_REFUSED[family, layout]) as by_save:
            loaded(family, src).save_lokr_weights(target(tmp_path / "saved", layout), adapter_name=A, format=layout)
        assert str(by_convert.value) == str(by_save.value)
        return
    dst = convert(src, tmp_path / "converted", layout, base=family)
    assert asked and set(asked) <= set(families.get(family).variants)
    direct = loaded(family, src)
    saved = direct.save_lokr_weights(target(tmp_path / "saved", layout), adapter_name=A, format=layout)
    assert_same_files(dst, saved)
    back = loaded(family, dst)
    assert layers(back) == layers(direct)
    want = outputs(direct)
    assert not torch.allclose(want, outputs(tiny(family)), rtol=1e-3)  # the adapter does something
    assert_close(outputs(back), want)


# A kohya file naming fused originals, on W1's block edges, its factors made by hand (W1 (out_l, 4)): PEFT plans
# another factorisation, so the diffusers and PEFT layouts refuse it, saying so (docs/formats.md §Export of DiT
# adapters); a file PEFT plans goes to diffusers: test_a_fused_qkv_converts_to_diffusers_fused_to_qkv.
ORIGINALS_REFUSED = {"diffusers": "PEFT would plan", "peft": "PEFT would plan"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "ltxvideo"])  # LTX-Video has no fused original
def test_a_file_of_fused_originals_converts_as_a_pipeline_saves_it(family: str, layout: str, tmp_path: Path,
                                                                   asked: list[str]) -> None:
    """No base: the family is told by the file's names (FLUX.1 and FLUX.2 share them; FLUX.1 is tried first). A
    one-adapter file's adapter is "default" in our layout, as loaded."""
    sd, _ = original_file(tiny(family).transformer, family, "kohya", seed=3)
    src = str(tmp_path / "src.safetensors")
    save_file(sd, src)
    direct = loaded(family, src, "default")
    assert any(layer.rows for _, layer in lokr_layers(direct.transformer))
    saving = target(tmp_path / "saved", layout)
    if layout in ORIGINALS_REFUSED:
        with pytest.raises(ValueError, match=ORIGINALS_REFUSED[layout]) as by_save:
            direct.save_lokr_weights(saving, adapter_name="default", format=layout)
        with pytest.raises(ValueError, match=ORIGINALS_REFUSED[layout]) as by_convert:
            convert(src, tmp_path / "converted", layout)
        assert str(by_convert.value) == str(by_save.value)
        return
    dst = convert(src, tmp_path / "converted", layout)
    assert families.of_variant(asked[-1]).name == family
    assert_same_files(dst, direct.save_lokr_weights(saving, adapter_name="default", format=layout))
    back = loaded(family, dst)
    assert layers(back) == layers(direct)
    assert_close(outputs(back), outputs(direct))


def test_a_fused_qkv_converts_to_diffusers_fused_to_qkv(tmp_path: Path, asked: list[str]) -> None:
    """Flux.2's double-block qkv originals factored as PEFT plans them go onto diffusers' fused to_qkv /
    to_added_qkv, as a pipeline holding them saves them."""
    model = tiny("flux2").transformer
    g = torch.Generator().manual_seed(5)
    sd: dict[str, Tensor] = {}
    for original, path in (("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q"),
                           ("double_blocks.1.txt_attn.qkv", "transformer_blocks.1.attn.add_q_proj")):
        rows, columns = model.get_submodule(path).weight.shape
        plan = LF.plan_lokr((3 * rows, columns), 1)
        sd.update({f"diffusion_model.{original}.{k}": torch.randn(s, generator=g) * 0.3
                   for k, s in plan.shapes().items()})
        sd[f"diffusion_model.{original}.alpha"] = torch.tensor(2.5)
    src = str(tmp_path / "src.safetensors")
    save_file(sd, src)
    direct = loaded("flux2", src, "default")
    dst = convert(src, tmp_path / "converted", "diffusers")
    assert {k.rsplit(".", 1)[0] for k in load_file(dst)} == {"transformer.transformer_blocks.0.attn.to_qkv",
                                                            "transformer.transformer_blocks.1.attn.to_added_qkv"}
    assert_same_files(dst, direct.save_lokr_weights(target(tmp_path / "saved", "diffusers"), adapter_name="default",
                                                    format="diffusers"))
    assert_close(outputs(loaded("flux2", dst)), outputs(direct))


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("layout", "reason"), [
    ("comfyui", "needs the base model's weights"),
    ("peft", "PEFT's LoKr has no DoRA"),
    ("diffusers", "PEFT's LoKr has no DoRA"),
])
def test_what_a_layout_cannot_hold_is_refused_before_anything_is_written(layout: str, reason: str, tmp_path: Path,
                                                                         asked: list[str]) -> None:
    """Output-axis DoRA: ComfyUI's file needs base weights to rescale it (a conversion has none), PEFT has no DoRA."""
    src = adapted("flux2", dora=True).save_lokr_weights(str(tmp_path / "src.safetensors"), adapter_name=A,
                                                        format="lokr_diffusers")
    with pytest.raises(ValueError, match=reason):
        convert(src, tmp_path / "out", layout, base="flux2")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_rows_off_block_edges_are_refused_as_save_refuses_them(layout: str, tmp_path: Path,
                                                               asked: list[str]) -> None:
    """Z-Image's fused attention.qkv off W1's block edges: no diffusers Linear holds it."""
    sd, _ = original_file(tiny("zimage").transformer, "zimage", "comfyui", aligned=False, seed=5)
    src = str(tmp_path / "src.safetensors")
    save_file(sd, src)
    with pytest.raises(ValueError, match="block edges") as saving:
        loaded("zimage", src).save_lokr_weights(target(tmp_path / "saved", layout), adapter_name=A, format=layout)
    with pytest.raises(ValueError, match="block edges") as converting:
        convert(src, tmp_path / "out", layout)
    assert str(converting.value) == str(saving.value)


def test_a_file_of_another_family_is_refused_naming_it(tmp_path: Path, asked: list[str]) -> None:
    sd, _ = original_file(tiny("zimage").transformer, "zimage", "kohya", seed=2)
    src = str(tmp_path / "src.safetensors")
    save_file(sd, src)
    with pytest.raises(ValueError, match="looks like a Z-Image LoKr"):
        convert(src, tmp_path / "out", "comfyui", base="sd3")


# ------------------------------------------------------------------------------------ telling the family
@pytest.mark.parametrize(("family", "layout", "expected"), [
    ("flux", "kohya", ("flux",)),  # txt_mod.lin: FLUX.1's own modulation
    ("flux", "comfyui", ("flux",)),
    ("sd3", "kohya", ("sd3",)),
    ("flux2", "comfyui", ("flux", "flux2", "chroma")),  # double / single blocks only: FLUX.1, FLUX.2 and Chroma
    ("zimage", "kohya", ("zimage",)),  # adaLN_modulation.0: Z-Image's (Lumina 2's is .1)
    ("chroma", "kohya", ("chroma",)),  # distilled_guidance_layer
    ("chroma", "comfyui", ("chroma",)),
    ("lumina2", "kohya", ("lumina2",)),  # a block's adaLN_modulation.1
    ("lumina2", "comfyui", ("lumina2",)),
    ("hunyuanvideo", "kohya", ("hunyuanvideo",)),  # Tencent's img_mlp.fc1, self_attn_qkv beside ComfyUI's names
    ("hunyuanvideo", "comfyui", ("hunyuanvideo",)),
    ("hunyuanvideo15", "kohya", ("hunyuanvideo15",)),  # img_attn_q, byt5_in: 1.5's own
    ("hunyuanvideo15", "comfyui", ("hunyuanvideo15",)),
])
def test_the_family_is_told_by_the_file_names(family: str, layout: str, expected: tuple[str, ...]) -> None:
    model = tiny(family).transformer if family in FAMILIES else tiny_transformer(family)  # no tiny pipeline
    sd, _ = original_file(model, family, layout)
    assert guess_families(sd) == expected


@pytest.mark.parametrize(("family", "layout", "expected"), [
    ("ltxvideo", "comfyui", ("ltxvideo", "ltx2")),  # LTX-2 keeps every LTX-Video name: only its audio stream tells
    ("ltxvideo", "kohya", ("ltxvideo", "ltx2")),
    ("ltx2", "comfyui", ("ltx2",)),  # audio_patchify_proj, av_ca_*, audio_attn2, ...
    ("ltx2", "kohya", ("ltx2",)),
])
def test_an_ltx_family_is_told_by_the_file_names(family: str, layout: str, expected: tuple[str, ...]) -> None:
    sd, _ = original_file(tiny_transformer(family), family, layout)
    assert guess_families(sd) == expected


# The families without a tiny pipeline here, told by the names of a file for their tiny transformer: Qwen-Image's
# per-block modulation, Qwen-Image 2.1's fused SwiGLU input, HiDream's stream blocks (their originals are their
# diffusers paths, so the comfyui layout is ai-toolkit's too).
@pytest.mark.parametrize(("family", "layout", "expected"), [
    ("qwenimage", "kohya", ("qwenimage",)),
    ("qwenimage", "comfyui", ("qwenimage",)),
    ("qwenimage21", "comfyui", ("qwenimage21",)),
    ("hidream", "kohya", ("hidream",)),
])
def test_a_same_name_familys_file_is_told_by_its_names(family: str, layout: str, expected: tuple[str, ...]) -> None:
    sd, _ = original_file(tiny_transformer(family), family, layout)
    assert guess_families(sd) == expected


@pytest.mark.parametrize(("key", "expected"), [
    ("transformer.transformer_blocks.0.attn1.to_q", ("ltxvideo", "ltx2")),  # diffusers / PEFT
    ("lycoris_transformer_blocks_3_attn1_to_out_0", ("ltxvideo", "ltx2")),  # SimpleTuner
    ("lycoris_transformer_blocks_3_attn2_to_out_0", ()),  # attn2 alone: SD3.5 Medium has it too
    ("diffusion_model.time_embed.linear", ()),  # ai-toolkit's diffusers path: a name other families share
    ("transformer.transformer_blocks.0.audio_attn1.to_k", ("ltx2",)),
    ("lora_transformer_av_cross_attn_video_a2v_gate_linear", ("ltx2",)),  # OneTrainer
    ("transformer_blocks.0.attn1.to_v", ("ltxvideo", "ltx2")),  # ComfyUI's plain names
    # a UNet's attn1 under down_blocks is not LTX's
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", ()),
])
def test_ltx_names_in_other_layouts(key: str, expected: tuple[str, ...]) -> None:
    found = guess_families({f"{key}.lokr_w1": torch.zeros(2, 2)})
    assert found == expected or (not expected and not {"ltxvideo", "ltx2"} & set(found))
@pytest.mark.parametrize(("family", "expected"), [
    ("flux", ("flux",)),  # single_transformer_blocks.N.norm.linear: FLUX.1's
    ("flux2", ("flux2",)),
    ("zimage", ("zimage",)),
    ("chroma", ("chroma",)),
    ("lumina2", ("lumina2",)),
])
def test_a_diffusers_path_file_is_told_by_its_names(family: str, expected: tuple[str, ...]) -> None:
    """A file naming every Linear of the tiny transformer by its diffusers path (transformer.<path>, as PEFT and
    diffusers write it)."""
    model = tiny(family).transformer
    keys = {f"transformer.{p}.lokr_w1": torch.zeros(1) for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert guess_families(keys) == expected


@pytest.mark.parametrize(("keys", "expected"), [
    # original names both NextDiT models have (attention, feed-forward, refiners): either
    (("diffusion_model.layers.0.attention.qkv", "diffusion_model.noise_refiner.0.feed_forward.w1"),
     ("zimage", "lumina2")),
    (("lora_unet_context_refiner_0_attention_out",), ("zimage", "lumina2")),
    # FLUX.1's double / single blocks without modulation or approximator: FLUX.1, FLUX.2 (same names) and Chroma
    (("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"), ("flux", "flux2", "chroma")),
    (("transformer.single_transformer_blocks.0.proj_mlp",), ("flux", "chroma")),
])
def test_names_two_families_share_fit_both(keys: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert guess_families({f"{k}.lokr_w1": torch.zeros(1) for k in keys}) == expected
@pytest.mark.parametrize(("keys", "expected"), [
    # musubi-tuner's default HunyuanVideo file (blocks, no modulations): Tencent's img_mlp_fc1 tells it
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_mlp_fc1",
      "lora_unet_single_blocks_3_linear1"], ("hunyuanvideo",)),
    (["lora_unet_double_blocks_0_img_attn_q", "lora_unet_double_blocks_0_img_mlp_fc1"], ("hunyuanvideo15",)),
    (["diffusion_model.double_blocks.0.img_mod.linear", "diffusion_model.time_in.mlp.0"], ("hunyuanvideo",)),
    # ComfyUI's spelling of HunyuanVideo's blocks is FLUX.1's: such a file alone is told FLUX.1 (tried first)
    (["diffusion_model.double_blocks.0.img_mod.lin", "diffusion_model.single_blocks.0.linear1"], ("flux",)),
    (["diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv",
      "diffusion_model.double_blocks.0.img_mod.lin"], ("hunyuanvideo",)),
])
def test_hunyuanvideo_files_are_told_by_their_names(keys: list[str], expected: tuple[str, ...]) -> None:
    assert guess_families({f"{k}.lokr_w1": torch.zeros(2, 2) for k in keys}) == expected


def test_an_sd_file_names_no_dit_family() -> None:
    assert guess_families({"lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w1": torch.zeros(2, 2)}) == ()
    assert guess_families({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.zeros(2, 2)}) == ()


@pytest.mark.parametrize("variant", list(DIT_VARIANTS))
def test_every_variant_builds_as_its_family(variant: str) -> None:
    comps = meta_components(variant)
    family = families.of_model(comps["transformer"])
    assert family is not None and family.name == families.of_variant(variant).name
    assert family.originals is not None and type(comps["transformer"]).__name__ == family.denoiser_class
    assert all(p.is_meta for m in comps.values() for p in m.parameters())


# (variant, text-encoder modules: name, weight shape) for a full-size file; ComfyUI's names (docs/formats.md §DiT
# models) and the published widths: CLIP-L 768, CLIP-G 1280, T5-XXL 4096, Qwen3-8B 4096 (q_proj 32 x 128 rows)
FULL_SIZE: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "flux1-dev": [("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", (768, 768)),
                  ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", (4096, 4096))],
    "sd35-large": [("text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1", (5120, 1280))],
    "flux2-klein-9b": [("text_encoders.qwen3_8b.transformer.model.layers.2.self_attn.q_proj", (4096, 4096))],
    "zimage-turbo": [("text_encoders.qwen3_4b.transformer.model.layers.0.mlp.down_proj", (2560, 9728))],
    # LTX-Video 13B's names are LTX-2's too (LTX-2's audio names are absent): LTX-Video is tried first, 2B then 13B
    "ltx-video-2b": [], "ltx-video-13b": [], "ltx-2": [],
    "qwen-image": [],  # transformer modules only (no text-encoder config of theirs here)
    "qwen-image-2.1": [],
    "hidream-i1": [],
    "chroma1-hd": [("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo", (4096, 10240))],
    "lumina-image-2": [],
    "hunyuanvideo": [], "hunyuanvideo-1.5": [],  # transformer only: their variants have no text encoders
}


# the largest models (a file of every Linear of a 13-20 B transformer, read onto each variant tried before it) run
# with -m slow; the default suite keeps the others (every family still reads its full-size names elsewhere:
# test_loader_dit.py::test_full_size_file_resolves_every_key)
LARGE = {"hidream-i1", "qwen-image", "ltx-2", "ltx-video-13b", "hunyuanvideo"}


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in LARGE else v for v in FULL_SIZE])
def test_a_full_size_file_finds_its_variant(variant: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A ComfyUI file of every 4th original of a full-size model (names and rows from ComfyUI's key maps), no base:
    read onto each variant of the families its names point to until one fits (SD3.5 Large after Medium, Klein 9B
    after 4B), and written back to ComfyUI as it was."""
    g = torch.Generator().manual_seed(0)
    model = meta_transformer(variant)
    shapes = list(FULL_SIZE[variant])
    for i, (original, orig) in enumerate(comfy_originals(families.of_variant(variant).name, model).items()):
        weight = model.get_submodule(orig.parts[0][0]).weight
        rows = sum(b - a for _, a, b in orig.parts)  # a fused original: its pieces' rows
        if i % 4 == 0:
            shapes.append((f"diffusion_model.{original}", (rows, *weight.shape[1:])))
    sd: dict[str, Tensor] = {}
    for name, shape in shapes:
        plan = LF.plan_lokr(shape, 4)
        sd.update({f"{name}.{k}": torch.randn(s, generator=g) * 0.01 for k, s in plan.shapes().items()})
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    src = str(tmp_path / "src.safetensors")
    save_file(sd, src)
    with caplog.at_level(logging.INFO, logger="lokr_diffusers.convert"):
        dst = lokr_diffusers.convert_lokr_file(src, str(tmp_path / "out.safetensors"), to="comfyui")
    assert f"read as a LoKr for {MODEL_NAMES[variant]}" in caplog.text
    out = load_file(dst)
    assert set(out) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(out[k], v, rtol=1e-6, atol=0, msg=k)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_converts_a_dit_file_with_a_family_alias(tmp_path: Path, asked: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sd, _ = original_file(tiny("flux2").transformer, "flux2", "kohya", seed=4)
    src, dst = str(tmp_path / "src.safetensors"), str(tmp_path / "out.safetensors")
    save_file(sd, src)
    assert main(["convert", src, dst, "--to", "comfyui", "--base", "klein"]) == 0
    assert asked == list(families.get("flux2").variants[:len(asked)]) and families.of_variant(asked[-1]).name == "flux2"
    assert f"wrote {dst}" in capsys.readouterr().out
    assert main(["convert", src, str(tmp_path / "z.safetensors"), "--to", "comfyui", "--base", "zimage"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lokr-diffusers convert: error:") and len(err.strip().splitlines()) == 1


def test_cli_offers_the_registry_formats_and_every_family() -> None:
    from lokr_diffusers.cli import _parser

    convert = next(a for a in _parser()._actions if a.dest == "command").choices["convert"]  # type: ignore[union-attr]
    options = {a.dest: a.choices for a in convert._actions}
    assert sorted(options["to"]) == sorted([*FORMAT_ALIASES, *LORA_LAYOUTS])  # and the LoKr as a LoRA
    assert set(CONVERT_BASES.values()) == set(families.FAMILIES)  # every family with full-size models
    assert all(families.get(f).variants for f in families.FAMILIES)
