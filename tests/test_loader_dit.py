"""Loading LoKr files into Flux.1 / SD3 / Flux.2 Klein / Z-Image / Qwen-Image (2.1) / HiDream-I1 pipelines, in
every layout, against ComfyUI's rule written independently (tests/helpers/references.py), fp32, 1e-5 relative on
tiny transformers.

The oracle for an original-layout (BFL / ComfyUI / kohya) file: the original weight of each module is the row
blocks of diffusers' modules in the original's order (the tables in tests/helpers/dit_files.py, by hand from
diffusers' single-file converters and ComfyUI's flux_to_diffusers / mmdit_to_diffusers / z_image_to_diffusers;
the tiny sizes from tests/helpers/dit_models.py's configs), ComfyUI's rule is applied to that whole weight
(references.fused_consumer_weights), and the result is cut back and written into a copy of the model. For the
diffusers-path layouts, the rule per module (references.consumer_weight). Nothing below asks the package for
names, rows or ΔW.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from helpers.dit_files import (
    BLOCK_CLASSES,
    DIFFUSERS_LAYOUTS,
    FAMILIES,
    FLUX,
    ORIGINAL_LAYOUTS,
    ORIGINALS,
    STYLES,
    assert_close,
    bare_pipeline,
    comfyui_model,
    make_factors,
    name_in,
    original_file,
    per_module_model,
    rows_of,
    shape_of,
)
from helpers.dit_models import run, tiny
from helpers.file_memory import zero_tensors_in_place
from helpers.fullsize_dit import FULL, meta_transformer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)
from lokr_diffusers import LoKrModel, families
from lokr_diffusers.formats.dit import dit_name_map
from lokr_diffusers.formats.names import build_index
from lokr_diffusers.formats.reader import parse_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)
# ------------------------------------------------------------------------------------ original layouts
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ORIGINAL_LAYOUTS)
@pytest.mark.parametrize("aligned", [True, False], ids=["on block edges", "off block edges"])
def test_original_layout_gives_comfyuis_weights(family: str, layout: str, aligned: bool) -> None:
    pipe = bare_pipeline(family)
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, family, layout, aligned=aligned)
    name = pipe.load_lokr_weights(sd)
    assert_close(run(pipe.transformer, family), run(comfyui_model(base, family, modules), family))
    pipe.set_lokr_adapters(name, adapter_weights=0.6)
    want = run(comfyui_model(base, family, modules, 0.6), family)
    for mode in ("merged", "bypass", "auto"):
        LoKrModel(pipe.transformer, None).set_forward_mode(mode)
        assert_close(run(pipe.transformer, family), want)
    pipe.fuse_lokr()
    assert_close(run(pipe.transformer, family), want)
    pipe.unfuse_lokr()
    pipe.unload_lokr_weights()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(), base.state_dict().values(),
                                                 strict=True))


def test_two_fused_adapters_add_up() -> None:
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd_a, modules_a = original_file(base, "flux", "comfyui", aligned=False, seed=1)
    sd_b, modules_b = original_file(base, "flux", "kohya", aligned=True, seed=2)
    pipe.load_lokr_weights(sd_a, adapter_name="a")
    pipe.load_lokr_weights(sd_b, adapter_name="b")
    want = comfyui_model(comfyui_model(base, "flux", modules_a), "flux", modules_b)
    assert_close(run(pipe.transformer, "flux"), run(want, "flux"))
    pipe.delete_lokr_adapters("a")
    assert_close(run(pipe.transformer, "flux"), run(comfyui_model(base, "flux", modules_b), "flux"))


@pytest.mark.parametrize("style", STYLES)
def test_scale_rules_on_fused_modules(style: str) -> None:
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "flux", "kohya", style=style, aligned=False, seed=10)
    pipe.load_lokr_weights(sd)
    assert_close(run(pipe.transformer, "flux"), run(comfyui_model(base, "flux", modules), "flux"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_low_precision_factors_are_upcast(dtype: torch.dtype) -> None:
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "flux", "comfyui", aligned=False, seed=20)
    stored = {k: v.to(dtype) for k, v in sd.items()}
    stored_modules = {o: {k: v.to(dtype) for k, v in t.items()} for o, t in modules.items()}
    pipe.load_lokr_weights(stored)
    assert_close(run(pipe.transformer, "flux"), run(comfyui_model(base, "flux", stored_modules), "flux"))


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_on_fused_modules(axis: str) -> None:
    """DoRA normalises the whole original weight (rows of to_q, to_k, to_v together): per row on the output
    axis, per column over all pieces on the input axis."""
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "flux", "comfyui", aligned=False, seed=30)
    g = torch.Generator().manual_seed(31)
    for original, tensors in modules.items():
        out, in_ = shape_of(base, FLUX[original])
        m = torch.rand(out, 1, generator=g) + 0.5 if axis == "output" else torch.rand(1, in_, generator=g) + 0.5
        rows = rows_of(base, FLUX[original])
        w = torch.cat([mod.weight[a:b] for mod, a, b in rows]).detach()
        m = m * (w.norm(dim=1, keepdim=True) if axis == "output" else w.norm(dim=0, keepdim=True))  # near 1x
        tensors["dora_scale"] = m
        sd[f"diffusion_model.{original}.dora_scale"] = m
    pipe.load_lokr_weights(sd)
    assert_close(run(pipe.transformer, "flux"), run(comfyui_model(base, "flux", modules), "flux"))
    pipe.fuse_lokr()
    assert_close(run(pipe.transformer, "flux"), run(comfyui_model(base, "flux", modules), "flux"))


# ----------------------------------------------------------------------------- diffusers-path layouts
def per_module_file(model: nn.Module, family: str, layout: str, seed: int = 40
                    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    paths = sorted({p for blocks in ORIGINALS[family].values() for p, _, _ in blocks})
    modules = {}
    for i, path in enumerate(paths):
        m = model.get_submodule(path)
        modules[path] = make_factors(m.out_features, m.in_features, 2 if m.out_features % 2 == 0 else 1,
                                     STYLES[i % len(STYLES)], seed + i)
    sd = {f"{name_in(DIFFUSERS_LAYOUTS[layout], p)}.{k}": v for p, t in modules.items() for k, v in t.items()}
    return sd, modules


# SD3's patch embedding x_embedder.proj (diffusers' pos_embed.proj; tiny: Conv2d 4 -> 16, kernel 2 x 2, so
# W (16, 4, 2, 2) = W1 (4, 2) ⊗ W2 (4, 2, 2, 2)) by its original names: ComfyUI's generic key for every weight of
# its model (comfy/lora.py model_lora_keys_unet: diffusion_model.<key>, lora_unet_<key underscored>) and kohya's SD3
# trainer, which names it lora_unet_x_embedder_proj when it trains the embedders (networks/lora_sd3.py, emb_dims).
def _conv_factors(style: str, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    if style == "w2 low-rank":  # w2_b stored flattened (r, in_n·kh·kw), as LyCORIS writes it
        return {"lokr_w1": r(4, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 2 * 2 * 2), "alpha": torch.tensor(3.0)}
    if style == "tucker":
        return {"lokr_w1": r(4, 2), "lokr_t2": r(2, 2, 2, 2), "lokr_w2_a": r(2, 4), "lokr_w2_b": r(2, 2),
                "alpha": torch.tensor(1.5)}
    return {"lokr_w1": r(4, 2), "lokr_w2": r(4, 2, 2, 2), "alpha": torch.tensor(5.0)}  # both full: alpha ignored


@pytest.mark.parametrize("name", ["diffusion_model.x_embedder.proj", "lora_unet_x_embedder_proj"])
@pytest.mark.parametrize("style", ["w2 low-rank", "tucker", "both full"])
def test_sd3_patch_embedding_conv_by_its_original_name(name: str, style: str) -> None:
    from helpers.comfyui_dit import comfyui_transformer

    pipe = bare_pipeline("sd3")
    base = copy.deepcopy(pipe.transformer)
    assert isinstance(base.pos_embed.proj, nn.Conv2d)
    tensors = _conv_factors(style, seed=len(style))
    pipe.load_lokr_weights({f"{name}.{k}": v for k, v in tensors.items()})
    comfy = comfyui_transformer(base, "sd3", {f"diffusion_model.x_embedder.proj.{k}": v for k, v in tensors.items()})
    layer = pipe.transformer.pos_embed.proj
    with torch.no_grad():
        got = layer.base_weight() + layer.get_delta_weight(layer.active_adapters[0])
    want = comfy.pos_embed.proj.weight.detach()
    assert not torch.allclose(want, base.pos_embed.proj.weight)
    assert_close(got, want)
    assert_close(run(pipe.transformer, "sd3"), run(comfy, "sd3"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", DIFFUSERS_LAYOUTS)
def test_diffusers_path_layouts(family: str, layout: str) -> None:
    pipe = bare_pipeline(family)
    base = copy.deepcopy(pipe.transformer)
    sd, modules = per_module_file(base, family, layout)
    pipe.load_lokr_weights(sd)
    assert_close(run(pipe.transformer, family), run(per_module_model(base, modules), family))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_folder_matches_peft(family: str, tmp_path: Any) -> None:
    """A PEFT LoKr on the transformer, saved by PEFT: loaded here, the transformer gives PEFT's outputs."""
    from peft import LoKrConfig as PeftLoKrConfig
    from peft import get_peft_model

    targets = sorted({p for blocks in ORIGINALS[family].values() for p, _, _ in blocks})
    peft_model = get_peft_model(copy.deepcopy(tiny(family)), PeftLoKrConfig(
        r=2, alpha=3, target_modules=targets, init_weights=False))
    want = run(peft_model.base_model.model, family)
    peft_model.save_pretrained(str(tmp_path))
    pipe = bare_pipeline(family)
    pipe.load_lokr_weights(str(tmp_path))
    zero_tensors_in_place(tmp_path / "adapter_model.safetensors")  # loaded: copies, not views of the file
    assert_close(run(pipe.transformer, family), want)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in BLOCK_CLASSES])
@pytest.mark.parametrize("dim", [1, 4], ids=["w2 low-rank", "full matrix"])
def test_simpletuner_lycoris_file_matches_lycoris(family: str, dim: int, tmp_path: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SimpleTuner's layout is LyCORIS' standalone wrapper (`lycoris_` + the diffusers path): a LyCORIS LoKr
    on the transformer's blocks, saved by LyCORIS, gives LyCORIS' own outputs here."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    monkeypatch.setattr(LycorisNetwork, "TARGET_REPLACE_MODULE", BLOCK_CLASSES[family])
    model = tiny(family)
    base = copy.deepcopy(model)
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=2, algo="lokr", factor=4)
    net.apply_to()
    with torch.no_grad():  # LyCORIS starts at ΔW = 0
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    want = run(model, family)
    net.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, {})
    assert any(k.startswith("lycoris_") for k in load_file(str(tmp_path / "lycoris.safetensors")))
    pipe = bare_pipeline(family, base)
    pipe.load_lokr_weights(str(tmp_path / "lycoris.safetensors"))
    assert_close(run(pipe.transformer, family), want)


# ------------------------------------------------------------------------------- load_lora_weights
# Each family's pipeline, and the other pipelines diffusers has for its transformer (edit, image-to-image, inpaint,
# fill): the same transformer class, so the same names; each takes a LoKr file through load_lora_weights.
# HunyuanVideo 1.5's pipelines have no LoRA mixin (no load_lora_weights): pipe.load_lokr_weights only (below).
NO_LORA_MIXIN = ("hunyuanvideo15",)
PIPELINES_OF = [
    *((family, None) for family in FAMILIES if family not in NO_LORA_MIXIN),
    ("flux", "FluxKontextPipeline"), ("flux", "FluxKontextInpaintPipeline"), ("flux", "FluxImg2ImgPipeline"),
    ("flux", "FluxInpaintPipeline"), ("flux", "FluxFillPipeline"), ("sd3", "StableDiffusion3Img2ImgPipeline"),
    ("sd3", "StableDiffusion3InpaintPipeline"), ("flux2", "Flux2KleinInpaintPipeline"),
    ("zimage", "ZImageImg2ImgPipeline"), ("zimage", "ZImageInpaintPipeline"),
    ("wan", "WanPipeline"), ("wan", "WanVideoToVideoPipeline"),
    ("ltxvideo", "LTXImageToVideoPipeline"), ("ltxvideo", "LTXConditionPipeline"),
    ("ltxvideo", "LTXI2VLongMultiPromptPipeline"),
    ("ltx2", "LTX2ImageToVideoPipeline"), ("ltx2", "LTX2ConditionPipeline"), ("ltx2", "LTX2InContextPipeline"),
    ("ltx2", "LTX2HDRPipeline"), ("ltx2", "LTX2DFRPipeline"), ("ltx2", "LTX2DFRTemporalRefinePipeline"),
    *(("qwenimage", f"QwenImage{kind}Pipeline") for kind in (
        "Img2Img", "Inpaint", "Edit", "EditPlus", "EditInpaint", "Layered", "ControlNet", "ControlNetInpaint")),
    ("chroma", "ChromaImg2ImgPipeline"), ("chroma", "ChromaInpaintPipeline"),
    ("hunyuanvideo", "HunyuanVideoImageToVideoPipeline"), ("hunyuanvideo", "HunyuanSkyreelsImageToVideoPipeline"),
]


@pytest.mark.parametrize("pipeline", ["HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"])
def test_pipelines_without_a_lora_mixin_load_lokr_weights(pipeline: str) -> None:
    """diffusers 0.42.1 gives HunyuanVideo 1.5's pipelines no load_lora_weights; DiffusionPipeline's
    load_lokr_weights (attached by `import lokr_diffusers`) takes an original-layout file all the same."""
    import diffusers

    pipe = bare_pipeline("hunyuanvideo15", cls=getattr(diffusers, pipeline))
    assert not hasattr(pipe, "load_lora_weights")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "hunyuanvideo15", "kohya", aligned=False, seed=52)
    pipe.load_lokr_weights(sd, adapter_name="style")
    assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
    want = run(comfyui_model(base, "hunyuanvideo15", modules), "hunyuanvideo15")
    assert_close(run(pipe.transformer, "hunyuanvideo15"), want)


@pytest.mark.parametrize(("family", "pipeline"), PIPELINES_OF)
def test_load_lora_weights_routes_lokr_files(family: str, pipeline: str | None, tmp_path: Any) -> None:
    import diffusers

    pipe = bare_pipeline(family, cls=getattr(diffusers, pipeline) if pipeline else None)
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, family, "comfyui", aligned=False, seed=50)
    path = str(tmp_path / "lokr.safetensors")
    save_file(sd, path)
    pipe.load_lora_weights(path, adapter_name="style")
    assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
    zero_tensors_in_place(path)  # the row pieces' shared factors are copies, not views of the file
    assert_close(run(pipe.transformer, family), run(comfyui_model(base, family, modules), family))
    sd2, modules2 = original_file(base, family, "comfyui", aligned=False, seed=51)
    pipe.load_lora_weights(sd2, adapter_name="style", hotswap=True)
    assert_close(run(pipe.transformer, family), run(comfyui_model(base, family, modules2), family))


# --------------------------------------------------------------------------- fuse_qkv_projections()
@pytest.mark.parametrize("family", ["flux", "sd3", "flux2"])
def test_fused_projections_take_the_fused_module_directly(family: str) -> None:
    # diffusers 0.42's fused SD3 processor gives SD3.5's self-attention attn2 the joint processor (which then
    # fails without a context) and skips the RMS qk-norm (other numbers even without LoKr): SD3 here
    # without dual attention and without qk-norm, where fused and unfused diffusers agree
    sd3 = tiny("sd3", dual_attention_layers=(), qk_norm=None) if family == "sd3" else None
    pipe = bare_pipeline(family, sd3)
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, family, "kohya", aligned=False, seed=60)
    pipe.transformer.fuse_qkv_projections()
    pipe.load_lokr_weights(sd)
    qkv = {n: m for n, m in pipe.transformer.named_modules() if n.endswith(("to_qkv", "to_added_qkv"))
           and hasattr(m, "rows")}
    assert qkv
    for n, m in qkv.items():  # a qkv original maps 1:1; Flux.1's linear1 is to_qkv's rows and proj_mlp's
        assert m.rows == ({"default_0": m.rows["default_0"]} if n.startswith("single_") else {}), n
        assert not n.startswith("single_") or m.rows["default_0"].pieces == ((0, 48),)
    assert_close(run(pipe.transformer, family), run(comfyui_model(base, family, modules), family))


def test_ltx_attention_still_calls_to_q_after_fusing() -> None:
    """LTX-Video's processor calls to_q / to_k / to_v even after fuse_qkv_projections() (which adds an unused
    to_qkv): a file naming them loads onto them, and gives ComfyUI's weights (not fusable)."""
    pipe = bare_pipeline("ltxvideo")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "ltxvideo", "kohya", aligned=False, seed=61)
    pipe.transformer.fuse_qkv_projections()
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_qkv, nn.Linear)
    pipe.load_lokr_weights(sd)
    assert hasattr(pipe.transformer.transformer_blocks[0].attn1.to_q, "rows")  # a LoKr layer on to_q itself
    assert_close(run(pipe.transformer, "ltxvideo"), run(comfyui_model(base, "ltxvideo", modules), "ltxvideo"))


def test_separate_projection_names_refused_after_fusing() -> None:
    pipe = bare_pipeline("flux")
    pipe.transformer.fuse_qkv_projections()
    sd, _ = per_module_file(pipe.transformer, "flux", "diffusers")
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        pipe.load_lokr_weights(sd)
    assert not pipe.get_list_lokr_adapters()


@pytest.mark.parametrize(("family", "path"), [("ltxvideo", "transformer_blocks.0.attn1.to_qkv"),
                                              ("qwenimage21", "transformer_blocks.0.attn.to_qkv")])
def test_a_fused_projection_the_processor_never_calls_is_refused(family: str, path: str) -> None:
    """LTX-Video's and Qwen-Image 2.1's fuse_qkv_projections() make to_qkv, which their processors never call (they
    keep calling to_q, to_k, to_v): a file naming it in any layout is refused, not loaded for no effect."""
    pipe = bare_pipeline(family)
    pipe.transformer.fuse_qkv_projections()
    fused = pipe.transformer.get_submodule(path)
    assert isinstance(fused, nn.Linear)
    out, in_ = fused.weight.shape
    for name, words in ((f"transformer.{path}", "never calls it"), (f"diffusion_model.{path}", "never calls it"),
                        ("lora_unet_" + path.replace(".", "_"), "match no module")):  # no original has that name
        sd = {f"{name}.{k}": v for k, v in make_factors(out, in_, 2, "w2 low-rank", 1).items()}
        with pytest.raises(ValueError, match=words):
            pipe.load_lokr_weights(sd)
    assert not pipe.get_list_lokr_adapters()


# ------------------------------------------------------------------------------ errors and strictness
def test_unknown_keys_strict_and_not() -> None:
    pipe = bare_pipeline("flux")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "flux", "comfyui", seed=70)
    extra = {"diffusion_model.double_blocks.7.img_attn.qkv.lokr_w1": torch.ones(3, 4),
             "diffusion_model.double_blocks.7.img_attn.qkv.lokr_w2": torch.ones(16, 4)}
    with pytest.raises(ValueError, match=r"double_blocks\.7"):
        pipe.load_lokr_weights({**sd, **extra})
    assert not pipe.get_list_lokr_adapters()
    pipe.load_lokr_weights({**sd, **extra}, strict=False)
    assert_close(run(pipe.transformer, "flux"), run(comfyui_model(base, "flux", modules), "flux"))


@pytest.mark.parametrize("prefix", ["diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q",
                                    "text_embedding_projection.aggregate_embed", "connectors.text_proj_in"])
def test_ltx2_connector_keys_are_named_as_not_loaded(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """LTX2LoraLoaderMixin also loads the `connectors` component, which lokr_diffusers does not adapt: its keys (in
    Lightricks', diffusers' or the original checkpoint's names) are refused naming it, or left out with strict=False."""
    pipe = bare_pipeline("ltx2")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "ltx2", "comfyui", seed=75)
    extra = {f"{prefix}.{k}": v for k, v in make_factors(16, 16, 2, "w2 low-rank", 76).items()}
    with pytest.raises(ValueError, match=r"are for LTX-2's text connectors, the pipeline's `connectors` component"):
        pipe.load_lokr_weights({**sd, **extra})
    assert not pipe.get_list_lokr_adapters()
    pipe.load_lokr_weights({**sd, **extra}, strict=False)
    assert "cannot be loaded" in caplog.text and prefix in caplog.text
    assert_close(run(pipe.transformer, "ltx2"), run(comfyui_model(base, "ltx2", modules), "ltx2"))


@pytest.mark.parametrize(("file_family", "pipe_family", "words"), [
    ("sd3", "flux", "SD3"), ("zimage", "flux2", "Z-Image"),
    ("flux2", "zimage", "FLUX.1 / FLUX.2"), ("flux", "sd3", "FLUX.1"), ("wan", "flux", "Wan"),
    ("flux", "wan", "FLUX.1"), ("chroma", "flux", "Chroma"), ("lumina2", "zimage", "Lumina 2"),
    ("zimage", "lumina2", "Z-Image")])
def test_a_file_for_another_model_says_which(file_family: str, pipe_family: str, words: str) -> None:
    sd, _ = original_file(tiny(file_family), file_family, "comfyui")
    pipe = bare_pipeline(pipe_family)
    with pytest.raises(ValueError, match=f"looks like a {words}"):
        pipe.load_lokr_weights(sd)
    assert not pipe.get_list_lokr_adapters()


def test_a_chroma_file_of_stream_blocks_fits_flux1_too() -> None:
    """A Chroma file naming double / single blocks only (no approximator: ai-toolkit's default targets) has no name
    telling it from FLUX.1's (or FLUX.2's): both are named, and it loads onto a Chroma pipeline by Chroma's table and
    onto a FLUX.1 one of the same widths (the tiny models share d = 16) by FLUX.1's, each as ComfyUI computes it."""
    chroma = bare_pipeline("chroma")
    base = copy.deepcopy(chroma.transformer)
    sd, modules = original_file(base, "chroma", "comfyui", seed=85)
    streams = {o for o in modules if o.startswith(("double_blocks.", "single_blocks."))}
    assert streams and streams != set(modules)
    sd = {k: v for k, v in sd.items() if k.split(".")[1] in ("double_blocks", "single_blocks")}
    modules = {o: t for o, t in modules.items() if o in streams}
    assert set(families.of_file(sd)[0]) == {"flux", "flux2", "chroma"}
    chroma.load_lokr_weights(sd)
    assert_close(run(chroma.transformer, "chroma"), run(comfyui_model(base, "chroma", modules), "chroma"))
    flux = bare_pipeline("flux")
    flux_base = copy.deepcopy(flux.transformer)
    flux.load_lokr_weights(sd)
    assert_close(run(flux.transformer, "flux"), run(comfyui_model(flux_base, "chroma", modules), "flux"))
    with_approximator, _ = original_file(base, "chroma", "kohya", seed=86)
    assert families.of_file(with_approximator)[0] == ("chroma",)


def test_a_module_that_does_not_fit_changes_nothing() -> None:
    pipe = bare_pipeline("flux")
    before = run(pipe.transformer, "flux")
    sd, _ = original_file(pipe.transformer, "flux", "comfyui", seed=80)
    sd["diffusion_model.single_blocks.0.linear1.lokr_w1"] = torch.ones(5, 4)  # 112 rows are not 5 x k
    with pytest.raises(ValueError, match=r"single_blocks\.0\.linear1"):
        pipe.load_lokr_weights(sd)
    assert not any(hasattr(m, "rows") for m in pipe.transformer.modules())
    assert torch.equal(run(pipe.transformer, "flux"), before)


def test_one_module_named_twice_is_refused() -> None:
    pipe = bare_pipeline("flux")
    sd, _ = original_file(pipe.transformer, "flux", "comfyui", seed=90)
    one, _ = per_module_file(pipe.transformer, "flux", "diffusers")
    to_q = {k: v for k, v in one.items() if k.startswith("transformer.transformer_blocks.0.attn.to_q.")}
    with pytest.raises(ValueError, match="both reach"):
        pipe.load_lokr_weights({**sd, **to_q})


# ------------------------------------------------------------------- full-size files, parsed on meta models
FULL_LAYOUTS = {**ORIGINAL_LAYOUTS, **DIFFUSERS_LAYOUTS}


@functools.cache
def full_index(name: str) -> Any:
    return build_index({"transformer": meta_transformer(name)})


def zero_factors(out: int, in_: int) -> dict[str, Tensor]:
    out_l, in_m = (2 if out % 2 == 0 else 1), (2 if in_ % 2 == 0 else 1)
    return {"lokr_w1": torch.zeros(out_l, in_m), "lokr_w2_a": torch.zeros(out // out_l, 1),
            "lokr_w2_b": torch.zeros(1, in_ // in_m), "alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("name", FULL)
@pytest.mark.parametrize("layout", FULL_LAYOUTS)
def test_full_size_file_resolves_every_key(name: str, layout: str) -> None:
    """A file naming every module of a full-size transformer in one layout: every key is used, and the
    entries cover each Linear once (a fused original's pieces tile its modules' rows)."""
    model = meta_transformer(name)
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layout in ORIGINAL_LAYOUTS:  # the originals (counted by hand in test_formats_dit.py), their fused shapes
        targets = {o: (t.out_features, t.in_features) for o, t in dit_name_map(model).originals.items()}
    else:
        targets = {p: (m.out_features, m.in_features) for p, m in linears.items()}
    template = FULL_LAYOUTS[layout]
    sd = {f"{name_in(template, t)}.{k}": v for t, shape in targets.items() for k, v in zero_factors(*shape).items()}
    parsed = parse_file(sd, {}, full_index(name), layout)
    assert not parsed.unmatched
    covered = [e.ref.path for e in parsed.entries]
    assert sorted(covered) == sorted(linears)
    for e in parsed.entries:
        if e.rows is not None:
            assert e.rows.out == linears[e.ref.path].out_features
            assert layout in ORIGINAL_LAYOUTS and e.origin is not None
