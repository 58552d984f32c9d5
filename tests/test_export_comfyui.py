"""Export to the portable (ComfyUI / A1111 / kohya) layout (`save_lokr_weights`, `convert_lokr_file`) against
references in tests/helpers/sd_export.py, written from docs/formats.md, never from the package's reader or its
name maps:

- the ComfyUI and A1111 consumer rules (docs/formats.md §The math, §Scale rules, §DoRA: kron with the conv
  unsqueeze, Tucker, alpha / rank, DoRA axis, ComfyUI's output-axis DoRA normalised by ‖W‖) applied to an
  exported file give back every module's ΔW / DoRA weight as the pipeline holds it, and as LyCORIS' rule
  (in the helper too) trains it, at several strengths; output-axis DoRA relative to the base weight, kept
  as trained outside ComfyUI, refused by convert_lokr_file (which has no base weights);
- the kohya names (docs/formats.md §Key layouts, §Portable export) come from the pipeline's own modules
  through the helper's ldm table in the style of diffusers' / kohya's conversion scripts (`ldm_prefixes`),
  itself checked here against diffusers' single-file converter; a few names are written out by hand;
  metadata, OpenCLIP attention groups, SDXL te2's text_projection, full-size names.

Round trips, PEFT and LyCORIS loading the files, dtype and atomic writes: tests/test_export_round_trips.py.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
from helpers.lycoris_files import make_inputs, pipeline_outputs
from helpers.sd_adapters import tiny_pipe
from helpers.sd_export import (
    ATOL,
    CONSUMERS,
    STRENGTHS,
    W_TOL,
    A,
    comfyui_weight,
    components,
    export_source,
    kron_delta,
    layer_at,
    ldm_name,
    ldm_prefixes,
    metadata_of,
    modules_of,
    name_map,
    row_norm,
    trained_weight,
)
from safetensors.torch import load_file, save_file
from torch import Tensor

import lokr_diffusers
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers, save_lokr_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # docs/formats.md §Portable export
FACTOR_KEYS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


def _check_module_layout(name: str, t: dict[str, Tensor], layer, keep_tucker: bool) -> list[str]:
    """docs/formats.md §Portable export for one module of a ComfyUI file; returns the source's kinds it covers."""
    plan, factors = layer.plans[A], layer.factors(A)
    allowed = FACTOR_KEYS | {"alpha", "dora_scale"} | ({"lokr_t2"} if keep_tucker else set())
    assert set(t) <= allowed, f"{name}: unexpected {sorted(set(t) - allowed)}"
    assert ("lokr_w1" in t) != ({"lokr_w1_a", "lokr_w1_b"} <= set(t)), f"{name}: no single W1 form"
    assert ("lokr_w2" in t) != ({"lokr_w2_a", "lokr_w2_b"} <= set(t)), f"{name}: no single W2 form"
    # every module has an alpha: consumers ignore it when both factors are full (the scale is baked
    # into W1), and LyCORIS' loader crashes on a module without one
    assert "alpha" in t and t["alpha"].dim() == 0, f"{name}: no 0-d alpha"
    kinds = []
    if "lokr_t2" in factors:
        kinds.append("tucker")
        r = factors["lokr_t2"].shape[0]
        if keep_tucker:
            assert torch.equal(t["lokr_t2"], factors["lokr_t2"]), name
        else:  # expanded to LyCORIS' non-Tucker conv layout, same rank
            assert t["lokr_w2_a"].shape == (plan.out_k, r) and t["lokr_w2_b"].shape == (r, plan.in_n * 9), name
    kinds += ["both_full_scaled"] if plan.both_full and abs(layer.scaling[A] - 1) > 0.1 else []  # baked into W1
    kinds += ["both_full_conv"] if plan.both_full and layer.weight.dim() == 4 else []
    kinds += ["w1_only_lowrank"] if plan.w1_lowrank and not plan.w2_lowrank else []
    kinds += ["both_lowrank"] if plan.w1_lowrank and plan.w2_lowrank else []
    if "dora_scale" in t:
        assert t["dora_scale"].dim() == layer.weight.dim(), f"{name}: dora_scale must be 2-D / 4-D"
        out_axis = t["dora_scale"].shape[0] == layer.weight.shape[0]
        kinds.append("dora_in" if not out_axis else "dora_out_conv" if layer.weight.dim() == 4 else "dora_out_linear")
    return kinds


# --------------------------------------------------------------------------------- 1. comfyui file
@pytest.mark.parametrize("kind,keep_tucker", [("sd1", False), ("sdxl", False), ("sd1", True)],
                         ids=["sd1", "sdxl", "sd1-keep_tucker"])
def test_comfyui_export_equals_the_consumer_rules(kind: str, keep_tucker: bool, tmp_path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    sdxl = kind == "sdxl"
    src = export_source(sdxl)
    add_lokr(src, {"unet": LoKrConfig(r=2, target_modules=["proj_out"], init_weights=False)}, "other")  # not exported
    path = str(tmp_path / "style.safetensors")
    with caplog.at_level(logging.WARNING):
        assert save_lokr_weights(src, path, adapter_name=A, keep_tucker=keep_tucker) == path
    modules = modules_of(load_file(path))
    fresh = components(tiny_pipe(sdxl))
    names = name_map(fresh, kind)
    held = {(c, p.replace(".base_layer", "")): la
            for c in fresh for p, la in lokr_layers(getattr(src, c)) if A in la.plans}
    assert set(modules) <= set(names), f"not docs/formats.md names: {sorted(set(modules) - set(names))[:5]}"
    assert sorted(names[m] for m in modules) == sorted(held), "file modules != modules holding the adapter"

    kinds = dict.fromkeys(("tucker", "both_full_scaled", "both_full_conv", "w1_only_lowrank", "both_lowrank",
                           "dora_in", "dora_out_linear", "dora_out_conv"), 0)
    expected: dict[str, Tensor] = {}
    for name, t in modules.items():
        layer = held[names[name]]
        factors = {k: v.detach() for k, v in layer.factors(A).items()}
        dora = layer.dora_scale[A].detach() if A in layer.dora_scale else None
        for k in _check_module_layout(name, t, layer, keep_tucker):
            kinds[k] += 1
        w0 = fresh[names[name][0]].get_submodule(names[name][1]).weight.detach()
        for consumer, rule in CONSUMERS.items():
            for s in STRENGTHS:
                w = rule(w0, t, s)
                if w is None:
                    continue
                want = trained_weight(w0, factors, layer.scaling[A], dora, s)
                torch.testing.assert_close(w, want, **W_TOL, msg=f"{consumer} at strength {s}: {name}")
                if s == 1.0:
                    expected[f"{consumer}:{name}"] = w
            if "dora_scale" not in t:
                torch.testing.assert_close(rule(w0, t) - w0, layer.get_delta_weight(A).detach(), **W_TOL,
                                           msg=f"{consumer}: {name}")
    assert all(kinds.values()), f"the source lacks a case: {kinds}"
    assert sum(k.startswith("a1111:") for k in expected) == \
        len(modules) - kinds["dora_out_linear"] - kinds["dora_out_conv"]
    assert "output axis" in caplog.text and "A1111" in caplog.text  # A1111 cannot apply those: the export says so
    assert metadata_of(path).get("lokr_dora_rule") == "comfyui"  # readers can tell ComfyUI's dora_scale

    src.fuse_lokr(adapter_names=[A])
    for key, w in expected.items():
        name = key.split(":", 1)[1]
        torch.testing.assert_close(held[names[name]].weight.detach(), w, **W_TOL, msg=key)


# (kind, component, module path, kohya name), from docs/formats.md §Key layouts, §Portable export and the ldm
# layout by hand
HAND_NAMES = [
    ("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("sdxl", "unet", "down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
    ("sdxl", "unet", "down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("sdxl", "unet", "down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("sdxl", "unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
     "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2"),
    ("sdxl", "unet", "mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
    ("sdxl", "unet", "up_blocks.0.attentions.2.proj_in", "lora_unet_output_blocks_2_1_proj_in"),
    ("sdxl", "unet", "up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
    ("sdxl", "unet", "up_blocks.1.resnets.2.time_emb_proj", "lora_unet_output_blocks_5_0_emb_layers_1"),
    ("sdxl", "unet", "add_embedding.linear_1", "lora_unet_label_emb_0_0"),
    ("sdxl", "unet", "time_embedding.linear_1", "lora_unet_time_embed_0"),
    ("sdxl", "text_encoder", "encoder.layers.1.mlp.fc2", "lora_te1_text_model_encoder_layers_1_mlp_fc2"),
    ("sdxl", "text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj",
     "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"),
    ("sd1", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("sd1", "unet", "up_blocks.0.upsamplers.0.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
    ("sd1", "text_encoder", "encoder.layers.0.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
]


def test_names_written_by_hand(sources, tmp_path) -> None:
    files = {}
    for kind in ("sd1", "sdxl"):
        path = save_lokr_weights(sources(kind, True)[0], str(tmp_path / f"{kind}.safetensors"), adapter_name=A)
        files[kind] = set(modules_of(load_file(path)))
    maps = {k: name_map(components(tiny_pipe(k == "sdxl")), k) for k in files}
    for kind, component, path, name in HAND_NAMES:
        assert maps[kind].get(name) == (component, path), f"test's own map: {name}"
        assert name in files[kind], f"{kind}: {name} not in the export"


@pytest.mark.parametrize("kind,base,v2", [("sd1", None, "False"), ("sdxl", None, "False"), ("sd1", "sd2", "True")])
def test_comfyui_metadata(sources, tmp_path, kind: str, base: str | None, v2: str) -> None:
    path = save_lokr_weights(sources(kind, True)[0], str(tmp_path / "my_style.safetensors"), adapter_name=A,
                             base=base, metadata={"my_key": "kept"})
    meta = metadata_of(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == (BASE_VERSION[base or kind], v2)
    assert int(meta["ss_network_dim"]) >= 1 and float(meta["ss_network_alpha"]) > 0
    assert meta["ss_output_name"] == "my_style" and meta["my_key"] == "kept"
    sd = load_file(path)
    assert not any(k.endswith((".lokr_t2", ".scale")) for k in sd)
    if base == "sd2":  # SD2 names: diffusers UNet paths, `lora_te_`
        assert any(k.startswith("lora_unet_down_blocks_") for k in sd)
        assert any(k.startswith("lora_te_text_model_") for k in sd)


def test_openclip_attention_groups_are_completed(tmp_path) -> None:
    """A1111 applies an OpenCLIP attention (SDXL te2) only with q, k, v and out all present
    (docs/formats.md §Key layouts)."""
    pipe = tiny_pipe(True)
    config = LoKrConfig(r=1, init_weights=False, target_modules=["layers.0.self_attn.q_proj"])
    add_lokr(pipe, {"text_encoder_2": config}, A)
    path = save_lokr_weights(pipe, str(tmp_path / "te2.safetensors"), adapter_name=A)
    modules = modules_of(load_file(path))
    group = {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")}
    assert set(modules) == group
    w = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.k_proj.weight.detach()
    for name in group - {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}:
        t = modules[name]
        assert ("lokr_w1" in t or "lokr_w1_a" in t) and ("lokr_w2" in t or "lokr_w2_a" in t), name
        assert torch.equal(comfyui_weight(w, t), w), f"{name}: a filler module must not change the weight"
    fresh = tiny_pipe(True)
    fresh.load_lokr_weights(path)
    inputs = make_inputs(pipe)
    out, got = pipeline_outputs(pipe, inputs), pipeline_outputs(fresh, inputs)
    for k in out:
        torch.testing.assert_close(got[k], out[k], rtol=0, atol=ATOL, msg=k)


@pytest.mark.parametrize("targets,warned", [(["text_projection", "layers.0.mlp.fc1"], True),
                                             (["layers.0.mlp.fc1"], False)], ids=["with projection", "without"])
def test_sdxl_te2_text_projection_is_written_with_an_a1111_warning(targets: list[str], warned: bool, tmp_path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """SDXL's second text encoder in A1111 is open_clip's, whose text_projection is a bare nn.Parameter, not a
    layer: A1111's key map (networks.py, built from named_modules) has nothing for lora_te2_text_projection and
    drops it (logged at debug level only). ComfyUI maps it (comfy/lora.py model_lora_keys_clip), so the export
    writes it, and says, naming A1111 and the key, that A1111 will not apply it."""
    pipe = tiny_pipe(True)
    add_lokr(pipe, {"text_encoder_2": LoKrConfig(r=1, init_weights=False, target_modules=targets)}, A)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        path = save_lokr_weights(pipe, str(tmp_path / "te2.safetensors"), adapter_name=A)
    assert ("lora_te2_text_projection" in modules_of(load_file(path))) == warned
    about = [r.getMessage() for r in caplog.records if "text_projection" in r.getMessage()]
    assert len(about) == warned and all(r.levelno == logging.WARNING for r in caplog.records), about
    assert all("A1111" in m and "lora_te2_text_projection" in m and "ComfyUI" in m for m in about), about


# ----------------------------------------------------------------------------- full-size names
@pytest.mark.parametrize("arch,base", [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")])
def test_full_size_names(arch: str, base: str) -> None:
    from helpers.fullsize_sd import meta_sd_components

    from lokr_diffusers.export import comfyui_module_name

    comps = meta_sd_components(arch)
    expected = {v: k for k, v in name_map(comps, base).items()}
    got = {ref: comfyui_module_name(ref[0], ref[1], comps["unet"].config, base) for ref in expected}
    assert len(set(got.values())) == len(got)
    wrong = [(ref, got[ref], expected[ref]) for ref in expected if got[ref] != expected[ref]]
    assert not wrong, f"{len(wrong)} of {len(got)} names differ from docs/formats.md, e.g. {wrong[:3]}"
    te_layer = re.compile(r"^lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
    unet = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d"
                      if base == "sdxl" else
                      r"^lora_unet_(conv_in$|conv_out$|time_embedding_|down_blocks_|mid_block_|up_blocks_)")
    for (comp, path), name in got.items():
        ok = unet.match(name) if comp == "unet" else (te_layer.match(name) or name == "lora_te2_text_projection")
        assert ok, f"{comp}.{path} -> {name}"


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_ldm_table_agrees_with_diffusers_single_file_converter(sdxl: bool) -> None:
    """The test's ldm table, checked against diffusers' own ldm -> diffusers UNet converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_pipe(sdxl).unet
    table = ldm_prefixes(unet.config)
    state = unet.state_dict()
    ldm = {"model.diffusion_model." + ldm_name(k, table): v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is v for k, v in state.items())


# ------------------------------------------------------------------- 2. output-axis DoRA for ComfyUI
def _dora_out_source() -> tuple:
    """SD1 pipeline, adapter "src" with output-axis DoRA on Linear and Conv2d layers (magnitudes 1.2x
    and 0.8x the base row norms), and adapter "other" on the same layers, fused into the weights."""
    pipe = tiny_pipe(False)
    targets = ["to_q", "to_out.0", "conv1", "conv_shortcut"]
    add_lokr(pipe, {"unet": LoKrConfig(r=2, alpha=3.0, target_modules=targets, init_weights=False)}, A)
    add_lokr(pipe, {"unet": LoKrConfig(r=2, target_modules=targets, init_weights=False)}, "other")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, (_, layer) in enumerate(lokr_layers(pipe.unet)):
            for t in [*layer.factors(A).values(), *layer.factors("other").values()]:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            rows = row_norm(layer.weight.detach()) * (1.2 if i % 2 else 0.8)
            layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], r=layer.r[A], alpha=layer.alpha[A],
                                      dora_scale=rows)
    pipe.fuse_lokr(adapter_names=["other"])
    return pipe


def test_comfyui_dora_is_relative_to_the_base_weight_without_fused_adapters(tmp_path) -> None:
    """ComfyUI applies the file to the base model: the rescaled dora_scale must use W without "other"."""
    src = _dora_out_source()
    path = save_lokr_weights(src, str(tmp_path / "dora.safetensors"), adapter_name=A)
    fresh = components(tiny_pipe(False))
    names = name_map(fresh, "sd1")
    kinds = {2: 0, 4: 0}
    for name, t in modules_of(load_file(path)).items():
        comp, p = names[name]
        layer = layer_at(src.unet, p)
        w0 = fresh[comp].get_submodule(p).weight.detach()
        assert not torch.equal(layer.weight.detach(), w0), f"{name}: 'other' must be fused here"
        assert t["dora_scale"].shape == (w0.shape[0], *[1] * (w0.dim() - 1)), name
        kinds[w0.dim()] += 1
        factors = {k: v.detach() for k, v in layer.factors(A).items()}
        for s in STRENGTHS:
            want = trained_weight(w0, factors, layer.scaling[A], layer.dora_scale[A].detach(), s)
            torch.testing.assert_close(comfyui_weight(w0, t, s), want, **W_TOL, msg=f"{name} at {s}")
    assert kinds[2] and kinds[4], kinds


@pytest.mark.parametrize("fmt", ["diffusers", "lokr_diffusers"])
def test_trained_dora_scale_is_kept_outside_comfyui(sources, tmp_path, fmt: str) -> None:
    """Our reader applies LyCORIS' rule to these layouts: the trained magnitudes go in unchanged."""
    src = sources("sd1", True)[0]
    sd = load_file(save_lokr_weights(src, str(tmp_path / "f.safetensors"), adapter_name=A, format=fmt))
    held = {p.replace(".base_layer", ""): la for p, la in lokr_layers(src.unet) if A in la.dora_scale}
    assert any(la.dora_scale[A].shape[0] == la.weight.shape[0] for la in held.values()), "no output-axis DoRA"
    prefix = "unet." if fmt == "diffusers" else f"lokr.{A}.unet."
    for p, la in held.items():
        assert torch.equal(sd[f"{prefix}{p}.dora_scale"], la.dora_scale[A].detach()), p
    assert "lokr_dora_rule" not in metadata_of(str(tmp_path / "f.safetensors"))


def _full_size_dora_file(path, dora_shape: tuple[int, ...]) -> None:
    """A diffusers-layout file for full-size SDXL: one 640x640 attention module with DoRA."""
    g = torch.Generator().manual_seed(9)
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {"lokr_w1": torch.randn(20, 20, generator=g), "lokr_w2_a": torch.randn(32, 2, generator=g),
               "lokr_w2_b": torch.randn(2, 32, generator=g), "alpha": torch.tensor(2.0),
               "dora_scale": torch.rand(dora_shape, generator=g) + 0.5}
    save_file({f"{module}.{k}": v for k, v in tensors.items()}, str(path))


def test_convert_refuses_output_axis_dora_to_comfyui(tmp_path) -> None:
    """convert_lokr_file has no base weights (meta-device model): output-axis DoRA to ComfyUI is refused with
    what to do instead, and nothing is written; other formats and input-axis DoRA convert."""
    src = tmp_path / "in.safetensors"
    _full_size_dora_file(src, (640, 1))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"base model's weights.*save_lokr_weights") as err:
        lokr_diffusers.convert_lokr_file(str(src), str(tmp_path / "out.safetensors"), to="comfyui", base="sdxl")
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before
    dst = lokr_diffusers.convert_lokr_file(str(src), str(tmp_path / "d.safetensors"), to="diffusers", base="sdxl")
    assert torch.equal(next(v for k, v in load_file(dst).items() if k.endswith(".dora_scale")),
                       load_file(str(src))["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.dora_scale"])
    _full_size_dora_file(src, (1, 640))  # input axis: ComfyUI's rule is LyCORIS' there, nothing to rescale
    dst = lokr_diffusers.convert_lokr_file(str(src), str(tmp_path / "in_axis.safetensors"), to="comfyui", base="sdxl")
    got = next(v for k, v in load_file(dst).items() if k.endswith(".dora_scale"))
    assert torch.equal(got, load_file(str(src))["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
                                                ".dora_scale"])


# --------------------------------------------------------------------------- convert_lokr_file
def test_convert_diffusers_file_to_comfyui_for_full_size_sdxl(tmp_path) -> None:
    """A hand-made diffusers-layout file for full-size SDXL (a few modules, small factors) converted to the
    portable layout: ldm / te2 names (docs/formats.md §Portable export), the same ΔW by the consumer rule,
    Tucker expanded."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    mods = {  # module: (weight shape, tensors)
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (  # 640 -> (20, 32)
            (640, 640), {"lokr_w1": r(20, 20), "lokr_w2_a": r(32, 2), "lokr_w2_b": r(2, 32),
                         "alpha": torch.tensor(3.0)}),
        "unet.up_blocks.1.resnets.0.conv1": (  # Tucker conv, 1920 -> 640 channels: in (40, 48), out (20, 32)
            (640, 1920, 3, 3), {"lokr_w1": r(20, 40), "lokr_t2": r(2, 2, 3, 3), "lokr_w2_a": r(2, 32),
                                "lokr_w2_b": r(2, 48), "alpha": torch.tensor(1.0)}),
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1": (  # 5120 x 1280: (64, 80) x (32, 40), both full
            (5120, 1280), {"lokr_w1": r(64, 32), "lokr_w2": r(80, 40) * 0.1}),
    }
    src = tmp_path / "in.safetensors"
    save_file({f"{m}.{k}": v for m, (_, ts) in mods.items() for k, v in ts.items()}, str(src))
    dst = lokr_diffusers.convert_lokr_file(str(src), str(tmp_path / "out.safetensors"), to="comfyui", base="sdxl")
    out = modules_of(load_file(dst))
    names = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "unet.up_blocks.1.resnets.0.conv1": "lora_unet_output_blocks_3_0_in_layers_2",
             "text_encoder_2.text_model.encoder.layers.3.mlp.fc1": "lora_te2_text_model_encoder_layers_3_mlp_fc1"}
    assert set(out) == set(names.values())
    assert metadata_of(dst)["ss_base_model_version"] == "sdxl_base_v1-0"
    for m, (shape, ts) in mods.items():
        t = out[names[m]]
        assert "lokr_t2" not in t
        w = torch.zeros(shape)
        torch.testing.assert_close(kron_delta(w, t), kron_delta(w, ts), rtol=1e-5, atol=1e-5, msg=m)
