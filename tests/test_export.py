"""Export (`save_lokr_weights`, `pipe.save_lokr_weights`, `convert_lokr_file`) against references written
here from docs/formats.md, never from the package's reader or its name maps:

- the ComfyUI and A1111 consumer rules (docs/formats.md §The math, §Scale rules, §DoRA: kron with the conv
  unsqueeze, Tucker, alpha / rank, DoRA axis, ComfyUI's output-axis DoRA normalised by ‖W‖) applied to an
  exported file give back every module's ΔW / DoRA weight as the pipeline holds it, and as LyCORIS' rule
  (written here too) trains it, at several strengths;
- the kohya names (docs/formats.md §Key layouts, §Portable export) come from the pipeline's own modules
  through an ldm table written here in the style of diffusers' / kohya's conversion scripts
  (`_ldm_prefixes`), itself checked against diffusers' single-file converter; a few names are written out
  by hand;
- round trips through every format, PEFT 0.21.2 and LyCORIS 4.1.3 loading the files, dtype, atomic writes.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator

import pytest
import torch
from helpers.lycoris_files import component_outputs, make_inputs, pipeline_outputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import lokr_diffusers
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers, save_lokr_weights
from lokr_diffusers.tiny import make_sd_pipeline, make_sdxl_pipeline

A = "src"  # the exported adapter
ATOL = 1e-5  # outputs, fp32 end to end
W_TOL = dict(rtol=1e-6, atol=1e-6)  # weights
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv", "time_emb_proj", "conv_shortcut", "linear_1"]
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # docs/formats.md §Portable export
FACTOR_KEYS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP sync costs more than it gives on a busy 2-core box
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- sources
def _pipe(sdxl: bool):
    return make_sdxl_pipeline(0) if sdxl else make_sd_pipeline(0)


def _comps(pipe) -> dict[str, nn.Module]:
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None}


def _layer(model: nn.Module, suffix: str):
    return next(la for p, la in lokr_layers(model) if p.endswith(suffix))


def _source(sdxl: bool, extras: bool = True, te: bool = True, dora_out: bool = True):
    """A tiny pipeline holding adapter "src" with random factors: low-rank W2, both factors full with a
    PEFT scale alpha/r != 1 (ff.net.2: 2/16, k_proj: 1.5/4, downsampler 3x3 conv: 2/8 with a 4-D W2),
    Tucker 3x3 convs, decompose_both W1 (text encoders), rank/alpha patterns. `extras` (what PEFT cannot
    hold): DoRA on both axes (input axis only without `dora_out`), a W1-only-low-rank layer and one whose W1
    and W2 ranks differ."""
    pipe = _pipe(sdxl)
    unet = LoKrConfig(r=1, alpha=2.0, target_modules=UNET_TARGETS, use_effective_conv2d=True, init_weights=False,
                      rank_pattern={"ff.net.2": 16, r"attn2\.to_k": 1, "time_emb_proj": 2, "downsamplers.0.conv": 8,
                                    "conv1": 2},
                      alpha_pattern={"to_v": 0.5, "conv_shortcut": 3.0})
    te_cfg = LoKrConfig(r=1, alpha=1.5, init_weights=False, decompose_both=True, rank_pattern={"fc2": 16, "k_proj": 4})
    configs = {"unet": unet} | ({"text_encoder": te_cfg} | ({"text_encoder_2": te_cfg} if sdxl else {}) if te else {})
    add_lokr(pipe, configs, A)
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(shape, generator=g) * 0.3  # noqa: E731
    with torch.no_grad():
        for comp in configs:
            for _, layer in lokr_layers(getattr(pipe, comp)):
                for t in layer.factors(A).values():
                    t.copy_(rand(*t.shape))
        if not extras:
            return pipe
        odd = _layer(pipe.unet, "attn1.to_out.0")  # W1 low-rank (rank 2), W2 full: consumers read w1_b's rank
        odd.set_adapter_tensors(A, {"lokr_w1_a": rand(8, 2), "lokr_w1_b": rand(2, 8), "lokr_w2": rand(8, 8)}, 0.7)
        odd = _layer(pipe.unet, "attn2.to_out.0")  # W1 rank 3, W2 rank 1: consumers read w2_b's rank
        odd.set_adapter_tensors(A, {"lokr_w1_a": rand(8, 3), "lokr_w1_b": rand(3, 8), "lokr_w2_a": rand(8, 1),
                                    "lokr_w2_b": rand(1, 8)}, 0.4)
        for comp in configs:
            for i, (_, layer) in enumerate(lokr_layers(getattr(pipe, comp))):
                if i % 7 == 3:  # DoRA, output axis (i % 14 == 3) or input axis, magnitudes 1.3x the base norms
                    w = layer.weight.detach()
                    if i % 14 == 3 and dora_out:
                        norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
                    else:
                        norm = w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
                    layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], r=layer.r[A], alpha=layer.alpha[A],
                                              dora_scale=norm * 1.3)
    return pipe


@pytest.fixture(scope="module")
def sources() -> Callable[..., tuple]:
    """(kind, extras, dora_out=True) -> (pipeline, inputs, its outputs), built once per module."""
    cache: dict = {}

    def get(kind: str, extras: bool, dora_out: bool = True) -> tuple:
        key = kind, extras, dora_out
        if key not in cache:
            pipe = _source(kind == "sdxl", extras, dora_out=dora_out)
            inputs = make_inputs(pipe)
            cache[key] = pipe, inputs, pipeline_outputs(pipe, inputs)
        return cache[key]

    return get


# ------------------------------------------------------- kohya names, built forward from the model
RESNET_LEAVES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_prefixes(cfg) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is a resnet), as diffusers' convert_diffusers_to_original_*.py scripts
    lay the original UNet out: per level i, L = layers_per_block + 1 ldm blocks (the extra one holds the
    downsampler on the way down, one more layer on the way up); resnet at .0, transformer at .1, the
    upsampler after the level's last layer (.2 behind a transformer, else .1)."""
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    L = lpb + 1
    down_attn = ["CrossAttn" in t for t in cfg.down_block_types]
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    table = [("conv_in", "input_blocks.0.0", False), ("time_embedding.linear_1", "time_embed.0", False),
             ("time_embedding.linear_2", "time_embed.2", False), ("conv_norm_out", "out.0", False),
             ("conv_out", "out.2", False), ("add_embedding.linear_1", "label_emb.0.0", False),
             ("add_embedding.linear_2", "label_emb.0.2", False), ("mid_block.resnets.0", "middle_block.0", True),
             ("mid_block.attentions.0", "middle_block.1", False), ("mid_block.resnets.1", "middle_block.2", True)]
    for i in range(n):
        for j in range(lpb):
            table.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{L * i + j + 1}.0", True))
            if down_attn[i]:
                table.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{L * i + j + 1}.1", False))
        for j in range(L):
            table.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{L * i + j}.0", True))
            if up_attn[i]:
                table.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{L * i + j}.1", False))
        if i < n - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{L * (i + 1)}.0.op", False))
            table.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{L * i + lpb}.{1 + up_attn[i]}.conv",
                          False))
    return table


def _ldm(path: str, table: list[tuple[str, str, bool]]) -> str:
    for prefix, ldm, resnet in table:
        if path == prefix or path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:].split(".") if path != prefix else []
            if resnet and rest:
                rest[0] = RESNET_LEAVES[rest[0]]
            return ".".join([ldm, *rest])
    raise KeyError(f"no ldm name for {path}")


def _name_map(comps: dict[str, nn.Module], base: str) -> dict[str, tuple[str, str]]:
    """Kohya name (docs/formats.md §Portable export) -> (component, module path) for every Linear / Conv2d;
    fails on a clash."""
    table = _ldm_prefixes(comps["unet"].config)
    te_prefix = {"text_encoder": "lora_te1_" if base == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    out: dict[str, tuple[str, str]] = {}
    for comp, model in comps.items():
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if comp == "unet":
                name = "lora_unet_" + (_ldm(path, table) if base == "sdxl" else path).replace(".", "_")
            else:  # the transformers 4 path: transformers 5 dropped CLIPTextModel's `text_model.` level
                tf4_path = path if hasattr(model, "text_model") else "text_model." + path
                name = te_prefix[comp] + tf4_path.replace(".", "_")
            assert name not in out, f"{name} names {out.get(name)} and {(comp, path)}"
            out[name] = (comp, path)
    return out


# ---------------------------------------------- consumer rules (docs/formats.md §The math, §Scale rules, §DoRA)
def _delta(w: Tensor, t: dict[str, Tensor]) -> Tensor:
    """scale · kron(W1, W2) as ComfyUI's lokr.py / A1111's network_lokr.py build it."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:  # Tucker: w2_a is (r, out_k), w2_b (r, in_n)
        w2 = torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:  # conv: (out_k, in_n·kh·kw), a 2-D kron then a reshape lands on the same entries
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2" not in t else t["lokr_w1_b"].shape[0] if "lokr_w1" not in t else None
    scale = float(t["alpha"]) / rank if "alpha" in t and rank is not None else 1.0
    return torch.kron(w1, w2.contiguous()).reshape(w.shape) * scale


def _row_norm(w: Tensor) -> Tensor:
    """‖·‖ per output row, shaped (out, 1[, 1, 1])."""
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))


def _column_norm(w: Tensor) -> Tensor:
    """‖·‖ per input column, shaped (1, in[, 1, 1])."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))


def _at_strength(w: Tensor, adapted: Tensor, strength: float) -> Tensor:
    """Every consumer's DoRA at strength s: W + s·(W' − W)."""
    return w + strength * (adapted - w)


def comfyui_weight(w: Tensor, t: dict[str, Tensor], strength: float = 1.0) -> Tensor | None:
    """ComfyUI's weight_decompose (fp32): the axis is the output one iff dora_scale.shape[0] == out. Output
    axis: W' = m · (W + ΔW) / (‖W‖ + eps), the norm of the ORIGINAL weight per row; input axis:
    W' = m · (W + ΔW) / (‖W + ΔW‖ + eps) per column; eps = finfo(fp32).eps."""
    merged = w + _delta(w, t)
    if "dora_scale" not in t:
        return w + strength * (merged - w)
    m, eps = t["dora_scale"], torch.finfo(torch.float32).eps
    norm = _row_norm(w) if m.shape[0] == w.shape[0] else _column_norm(merged)
    return _at_strength(w, merged * (m / (norm + eps)), strength)


def a1111_weight(w: Tensor, t: dict[str, Tensor], strength: float = 1.0) -> Tensor | None:
    """A1111: honours `.scale`, DoRA only on the input axis, no eps (None where it cannot apply the module)."""
    if "scale" in t:
        raise AssertionError("a portable export writes no .scale key (docs/formats.md §Portable export)")
    merged = w + _delta(w, t)
    if "dora_scale" not in t:
        return w + strength * (merged - w)
    if tuple(t["dora_scale"].shape) != (1, w.shape[1], *[1] * (w.dim() - 2)):
        return None
    return _at_strength(w, merged * (t["dora_scale"] / _column_norm(merged)), strength)


def trained_weight(w: Tensor, factors: dict[str, Tensor], scale: float, dora_scale: Tensor | None,
                   strength: float = 1.0) -> Tensor:
    """The weight as trained (LyCORIS' rule, docs/formats.md §DoRA): ΔW = scale · W1 ⊗ W2 from the layer's own factors;
    DoRA W' = m · (W + ΔW) / (‖W + ΔW‖ + eps) per output row or input column (dora_scale's shape says
    which), eps = finfo(dtype).eps; at strength s, W + s·(W' − W)."""
    merged = w + _delta(w, factors) * scale  # no alpha key: _delta's consumer scale is 1
    if dora_scale is None:
        return w + strength * (merged - w)
    out_axis = dora_scale.shape[0] == w.shape[0] and dora_scale.numel() == w.shape[0]
    norm = _row_norm(merged) if out_axis else _column_norm(merged)
    return _at_strength(w, merged * (dora_scale.reshape(norm.shape) / (norm + torch.finfo(w.dtype).eps)), strength)


STRENGTHS = (1.0, 0.5, 1.7)
CONSUMERS = {"comfyui": comfyui_weight, "a1111": a1111_weight}


def _modules(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        module, suffix = key.split(".", 1)
        out.setdefault(module, {})[suffix] = t
    return out


def _metadata(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as fh:
        return dict(fh.metadata() or {})


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
    src = _source(sdxl)
    add_lokr(src, {"unet": LoKrConfig(r=2, target_modules=["proj_out"], init_weights=False)}, "other")  # not exported
    path = str(tmp_path / "style.safetensors")
    with caplog.at_level(logging.WARNING):
        assert save_lokr_weights(src, path, adapter_name=A, keep_tucker=keep_tucker) == path
    modules = _modules(load_file(path))
    fresh = _comps(_pipe(sdxl))
    names = _name_map(fresh, kind)
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
    assert _metadata(path).get("lokr_dora_rule") == "comfyui"  # readers can tell ComfyUI's dora_scale

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
        files[kind] = set(_modules(load_file(path)))
    maps = {k: _name_map(_comps(_pipe(k == "sdxl")), k) for k in files}
    for kind, component, path, name in HAND_NAMES:
        assert maps[kind].get(name) == (component, path), f"test's own map: {name}"
        assert name in files[kind], f"{kind}: {name} not in the export"


@pytest.mark.parametrize("kind,base,v2", [("sd1", None, "False"), ("sdxl", None, "False"), ("sd1", "sd2", "True")])
def test_comfyui_metadata(sources, tmp_path, kind: str, base: str | None, v2: str) -> None:
    path = save_lokr_weights(sources(kind, True)[0], str(tmp_path / "my_style.safetensors"), adapter_name=A,
                             base=base, metadata={"my_key": "kept"})
    meta = _metadata(path)
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
    pipe = _pipe(True)
    config = LoKrConfig(r=1, init_weights=False, target_modules=["layers.0.self_attn.q_proj"])
    add_lokr(pipe, {"text_encoder_2": config}, A)
    path = save_lokr_weights(pipe, str(tmp_path / "te2.safetensors"), adapter_name=A)
    modules = _modules(load_file(path))
    group = {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")}
    assert set(modules) == group
    w = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.k_proj.weight.detach()
    for name in group - {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}:
        t = modules[name]
        assert ("lokr_w1" in t or "lokr_w1_a" in t) and ("lokr_w2" in t or "lokr_w2_a" in t), name
        assert torch.equal(comfyui_weight(w, t), w), f"{name}: a filler module must not change the weight"
    fresh = _pipe(True)
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
    pipe = _pipe(True)
    add_lokr(pipe, {"text_encoder_2": LoKrConfig(r=1, init_weights=False, target_modules=targets)}, A)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        path = save_lokr_weights(pipe, str(tmp_path / "te2.safetensors"), adapter_name=A)
    assert ("lora_te2_text_projection" in _modules(load_file(path))) == warned
    about = [r.getMessage() for r in caplog.records if "text_projection" in r.getMessage()]
    assert len(about) == warned and all(r.levelno == logging.WARNING for r in caplog.records), about
    assert all("A1111" in m and "lora_te2_text_projection" in m and "ComfyUI" in m for m in about), about


# ----------------------------------------------------------------------------- full-size names
@pytest.mark.parametrize("arch,base", [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")])
def test_full_size_names(arch: str, base: str) -> None:
    from helpers.fullsize_sd import meta_sd_components

    from lokr_diffusers.export import comfyui_module_name

    comps = meta_sd_components(arch)
    expected = {v: k for k, v in _name_map(comps, base).items()}
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

    unet = _pipe(sdxl).unet
    table = _ldm_prefixes(unet.config)
    state = unet.state_dict()
    ldm = {"model.diffusion_model." + _ldm(k, table): v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is v for k, v in state.items())


# ------------------------------------------------------------------------------- 2. round trips
ROUND_TRIPS = [  # (format, kwargs, extras in the source)
    ("comfyui", {}, True), ("comfyui", {"keep_tucker": True}, True), ("diffusers", {}, True),
    ("lokr_diffusers", {}, True), ("peft", {}, False),
]  # the aliases kohya / a1111 write the very same file (test_method_and_aliases_write_the_same_file)
# A ComfyUI file holds output-axis DoRA rescaled for ComfyUI's rule, which our reader (LyCORIS' rule) does not
# undo yet: its round trip is test_comfyui_output_axis_dora_round_trip; the others here keep that DoRA.


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt,kwargs,extras", ROUND_TRIPS,
                         ids=[f + ("-keep_tucker" if kw else "") for f, kw, _ in ROUND_TRIPS])
def test_round_trip(sources, tmp_path, kind: str, fmt: str, kwargs: dict, extras: bool) -> None:
    src, inputs, expected = sources(kind, extras, dora_out=fmt != "comfyui")
    path = str(tmp_path / ("out" if fmt == "peft" else "out.safetensors"))
    assert save_lokr_weights(src, path, adapter_name=A, format=fmt, **kwargs) == path
    if fmt == "peft":
        assert {"unet", "text_encoder"} <= set(os.listdir(path))
    pipe = _pipe(kind == "sdxl")
    base = pipeline_outputs(pipe, inputs)
    pipe.load_lokr_weights(path)
    got = pipeline_outputs(pipe, inputs)
    for k in expected:
        assert (expected[k] - base[k]).abs().max() > 1e-2, f"{k}: the adapter must change the output"
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=k)


def test_comfyui_output_axis_dora_round_trip(sources, tmp_path) -> None:
    src, inputs, expected = sources("sd1", True)
    path = save_lokr_weights(src, str(tmp_path / "out.safetensors"), adapter_name=A)
    pipe = _pipe(False)
    pipe.load_lokr_weights(path)
    got = pipeline_outputs(pipe, inputs)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=k)


def test_method_and_aliases_write_the_same_file(sources, tmp_path) -> None:
    src = sources("sdxl", True)[0]
    files = {}
    for how in ("comfyui", "kohya", "a1111", "method"):
        os.makedirs(tmp_path / how)
        path = str(tmp_path / how / "same.safetensors")
        if how == "method":
            assert src.save_lokr_weights(path, adapter_name=A, format="comfyui") == path
        else:
            save_lokr_weights(src, path, adapter_name=A, format=how)
        files[how] = load_file(path), _metadata(path)
    ref_sd, ref_meta = files["comfyui"]
    for how, (sd, meta) in files.items():
        assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], v) for k, v in ref_sd.items()), how
        assert meta == ref_meta, how


# ----------------------------------------------------------------------------------- 3. PEFT
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_peft_loads_the_peft_export(sources, tmp_path, kind: str) -> None:
    peft = pytest.importorskip("peft")
    sdxl = kind == "sdxl"
    if sdxl:  # UNet only: the folder itself is the adapter
        src = _source(True, extras=False, te=False)
        inputs = make_inputs(src)
        expected = pipeline_outputs(src, inputs)
    else:
        src, inputs, expected = sources(kind, False)
    folder = tmp_path / "peft"
    save_lokr_weights(src, str(folder), adapter_name=A, format="peft")
    comps = ["unet"] if sdxl else ["unet", "text_encoder"]
    fresh = _pipe(sdxl)
    for comp in comps:
        sub = folder if sdxl else folder / comp
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(sub)), comp
        setattr(fresh, comp, peft.PeftModel.from_pretrained(getattr(fresh, comp), str(sub)).eval())
    outputs = component_outputs(fresh.unet, {"text_encoder": fresh.text_encoder} if not sdxl else {}, inputs)
    for k, v in outputs.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=ATOL, msg=k)


# ------------------------------------------------------------------------------------ 4. LyCORIS
# docs/formats.md §Oracles in tests: no TimestepEmbedding module target (duplicated names with unet_target_name)
LYCORIS_PRESET = {
    "enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"], "text_encoder_target_name": []}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_lycoris_loads_the_comfyui_export(tmp_path, kind: str) -> None:
    """LyCORIS' kohya loader names UNet modules by diffusers paths and text encoders by their transformers 5
    paths (no `text_model.`): the SDXL UNet's ldm names and the `text_model` level are renamed here,
    through the test's own map; SD1 UNet names are read as written. LyCORIS re-plans each module from
    (rank, factor, decompose_both) and needs an alpha everywhere, so the source has no both-full layers
    and DoRA on LyCORIS' default output axis only. That DoRA is written for ComfyUI's rule (‖W‖, not
    ‖W + ΔW‖): the test turns it back into LyCORIS' magnitude, m = m' · (‖W + ΔW‖ + eps) / (‖W‖ + eps)."""
    kohya = importlib.reload(pytest.importorskip("lycoris.kohya"))  # apply_preset mutates class state
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    kohya.LycorisNetworkKohya.apply_preset(LYCORIS_PRESET)  # its `full` preset crashes on diffusers' UNet
    sdxl = kind == "sdxl"
    src = _pipe(sdxl)
    unet = LoKrConfig(r=2, alpha=1.5, target_modules=UNET_TARGETS, use_effective_conv2d=True, init_weights=False,
                      alpha_pattern={"to_v": 0.5, "conv2": 3.0})
    te = LoKrConfig(r=1, alpha=0.75, init_weights=False, decompose_both=True)
    add_lokr(src, {"unet": unet, "text_encoder": te} | ({"text_encoder_2": te} if sdxl else {}), A)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for comp in _comps(src):
            for i, (_, layer) in enumerate(lokr_layers(getattr(src, comp))):
                for t in layer.factors(A).values():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
                if i % 5 == 2:
                    w = layer.weight.detach()
                    norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
                    layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], dora_scale=norm * 1.2)
    assert any("lokr_t2" in la.factors(A) for _, la in lokr_layers(src.unet))
    path = save_lokr_weights(src, str(tmp_path / "lyco.safetensors"), adapter_name=A)
    sd = load_file(path)
    fresh = _pipe(sdxl)
    comps = _comps(fresh)
    names = _name_map(comps, kind)
    prefix = {"unet": "lora_unet_"} | ({"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if sdxl
                                       else {"text_encoder": "lora_te_"})
    renamed = {}
    eps = torch.finfo(torch.float32).eps
    for key, v in sd.items():
        module, suffix = key.split(".", 1)
        comp, p = names[module]
        if suffix == "dora_scale":
            w0 = comps[comp].get_submodule(p).weight.detach()
            assert v.shape[0] == w0.shape[0], f"{key}: the source has output-axis DoRA only"
            v = v * (_row_norm(w0 + _delta(w0, _modules(sd)[module])) + eps) / (_row_norm(w0) + eps)
        renamed[f"{prefix[comp]}{p.replace('.', '_')}.{suffix}"] = v
    if not sdxl:
        assert {k for k in sd if k.startswith("lora_unet_")} == {k for k in renamed if k.startswith("lora_unet_")}
    tes = {c: copy.deepcopy(m) for c, m in comps.items() if c != "unet"}
    lyc_unet = copy.deepcopy(comps["unet"])
    te_arg = list(tes.values()) if sdxl else tes["text_encoder"]
    net, _ = kohya.create_network_from_weights(1.0, path, None, te_arg, lyc_unet, weights_sd=renamed,
                                               for_inference=True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len(_modules(sd))
    net.apply_to(te_arg, lyc_unet, apply_text_encoder=True, apply_unet=True)
    inputs = make_inputs(src)
    got, expected, base = (component_outputs(lyc_unet.eval(), tes, inputs), pipeline_outputs(src, inputs),
                           pipeline_outputs(fresh, inputs))
    for k in expected:
        assert (expected[k] - base[k]).abs().max() > 1e-2, k
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=k)


# ------------------------------------------------------------------------ 5. dtype, atomic writes
DTYPES = [("comfyui", "fp16", torch.float16), ("comfyui", torch.float16, torch.float16),
          ("comfyui", "bf16", torch.bfloat16), ("lokr_diffusers", "fp16", torch.float16),
          ("peft", "fp16", torch.float16)]


@pytest.mark.parametrize("fmt,dtype,want", DTYPES, ids=[f"{f}-{d}" for f, d, _ in DTYPES])
def test_dtype(sources, tmp_path, fmt: str, dtype, want: torch.dtype) -> None:
    src, inputs, expected = sources("sd1", fmt != "peft", dora_out=fmt != "comfyui")  # see ROUND_TRIPS
    ext = "" if fmt == "peft" else ".safetensors"
    ref = save_lokr_weights(src, str(tmp_path / f"ref{ext}"), adapter_name=A, format=fmt)
    path = save_lokr_weights(src, str(tmp_path / f"half{ext}"), adapter_name=A, format=fmt, dtype=dtype)
    files = [("unet/adapter_model.safetensors", "unet/adapter_model.safetensors")] if fmt == "peft" else [("", "")]
    for a, b in files:
        full, half = load_file(os.path.join(ref, a) if a else ref), load_file(os.path.join(path, b) if b else path)
        assert full.keys() == half.keys()
        for k, v in half.items():
            if k.endswith(".lokr_scale"):  # our lossless layout keeps the scale in fp64 (export.cast's docs)
                assert v.dtype == torch.float64 and torch.equal(v, full[k]), k
                continue
            assert v.dtype == want, f"{k}: {v.dtype}"  # alpha too, as LyCORIS does (docs/formats.md §Key layouts)
            assert torch.equal(v, full[k].to(want)), k
    if dtype == "fp16":
        pipe = _pipe(False)
        pipe.load_lokr_weights(path)
        got = pipeline_outputs(pipe, inputs)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=5e-2, msg=k)


def _listing(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _breaking_save(fail_on: int) -> Callable[..., None]:
    """safetensors' save_file, failing half-way through its `fail_on`-th file (disk full)."""
    calls: list[str] = []

    def save(tensors, filename, metadata=None) -> None:
        calls.append(filename)
        if len(calls) < fail_on:
            return save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    return save


FAILURES = [  # (id, save_lokr_weights kwargs, error, source has DoRA, safetensors write that fails (0: none))
    ("unknown_format", {"format": "onnx"}, ValueError, True, 0),
    ("unknown_dtype", {"dtype": "fp8"}, ValueError, True, 0),
    ("unknown_adapter", {"adapter_name": "nope"}, ValueError, True, 0),
    ("peft_cannot_hold_dora", {"format": "peft"}, ValueError, True, 0),
    ("write_fails_midway", {"dtype": "fp16"}, OSError, True, 1),
    ("peft_first_write_fails", {"format": "peft", "dtype": "fp16"}, OSError, False, 1),
    # PEFT writes one folder per component: failing on the second must not leave a new unet beside an old te
    ("peft_second_write_fails", {"format": "peft", "dtype": "fp16"}, OSError, False, 2),
]


@pytest.mark.parametrize("case", FAILURES, ids=[f[0] for f in FAILURES])
def test_failed_save_leaves_existing_files_untouched(sources, tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                     case: tuple) -> None:
    _, kwargs, error, extras, fail_on = case
    src = sources("sd1", extras)[0]
    peft = kwargs.get("format") == "peft"
    target = tmp_path / ("out" if peft else "out.safetensors")
    if peft:  # an earlier (fp32) export sits in the folder
        save_lokr_weights(sources("sd1", False)[0], str(target), adapter_name=A, format="peft")
    else:
        save_file({"old": torch.ones(2)}, str(target), metadata={"old": "yes"})
    before = _listing(tmp_path)
    if fail_on:
        monkeypatch.setattr(lokr_diffusers.atomic, "save_file", _breaking_save(fail_on))
    with pytest.raises(error):
        save_lokr_weights(src, str(target), **{"adapter_name": A, **kwargs})
    after = _listing(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"a failed save changed or left files: {changed}"


def test_save_into_a_missing_folder_fails_cleanly(sources, tmp_path) -> None:
    with pytest.raises(OSError):
        save_lokr_weights(sources("sd1", True)[0], str(tmp_path / "missing" / "x.safetensors"), adapter_name=A)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------- 6. output-axis DoRA for ComfyUI
def _dora_out_source() -> tuple:
    """SD1 pipeline, adapter "src" with output-axis DoRA on Linear and Conv2d layers (magnitudes 1.2x
    and 0.8x the base row norms), and adapter "other" on the same layers, fused into the weights."""
    pipe = _pipe(False)
    targets = ["to_q", "to_out.0", "conv1", "conv_shortcut"]
    add_lokr(pipe, {"unet": LoKrConfig(r=2, alpha=3.0, target_modules=targets, init_weights=False)}, A)
    add_lokr(pipe, {"unet": LoKrConfig(r=2, target_modules=targets, init_weights=False)}, "other")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, (_, layer) in enumerate(lokr_layers(pipe.unet)):
            for t in [*layer.factors(A).values(), *layer.factors("other").values()]:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            rows = _row_norm(layer.weight.detach()) * (1.2 if i % 2 else 0.8)
            layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], r=layer.r[A], alpha=layer.alpha[A],
                                      dora_scale=rows)
    pipe.fuse_lokr(adapter_names=["other"])
    return pipe


def test_comfyui_dora_is_relative_to_the_base_weight_without_fused_adapters(tmp_path) -> None:
    """ComfyUI applies the file to the base model: the rescaled dora_scale must use W without "other"."""
    src = _dora_out_source()
    path = save_lokr_weights(src, str(tmp_path / "dora.safetensors"), adapter_name=A)
    fresh = _comps(_pipe(False))
    names = _name_map(fresh, "sd1")
    kinds = {2: 0, 4: 0}
    for name, t in _modules(load_file(path)).items():
        comp, p = names[name]
        layer = _layer(src.unet, p)
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
    assert "lokr_dora_rule" not in _metadata(str(tmp_path / "f.safetensors"))


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
    out = _modules(load_file(dst))
    names = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "unet.up_blocks.1.resnets.0.conv1": "lora_unet_output_blocks_3_0_in_layers_2",
             "text_encoder_2.text_model.encoder.layers.3.mlp.fc1": "lora_te2_text_model_encoder_layers_3_mlp_fc1"}
    assert set(out) == set(names.values())
    assert _metadata(dst)["ss_base_model_version"] == "sdxl_base_v1-0"
    for m, (shape, ts) in mods.items():
        t = out[names[m]]
        assert "lokr_t2" not in t
        w = torch.zeros(shape)
        torch.testing.assert_close(_delta(w, t), _delta(w, ts), rtol=1e-5, atol=1e-5, msg=m)
