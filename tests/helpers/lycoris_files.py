"""Real LyCORIS 4.1.3 LoKr files for the tiny pipelines, and LyCORIS' own outputs with them (a test helper).

`build_lycoris_file(pipe, variant, directory)` builds a LyCORIS network through its kohya wrapper
(`lycoris.kohya.create_network(..., algo="lokr")` + `apply_to`) on deep copies of the pipeline's
UNet and text encoder(s), randomises its factors (LyCORIS initialises so that ΔW = 0), saves it with
`net.save_weights` and runs the patched copies on fixed inputs. The pipeline itself is left
untouched (LyCORIS monkey-patches `forward` of the modules it adapts, hence the copies).

Facts this relies on (docs/formats.md §Oracles in tests, re-checked here):
- LyCORIS' default preset `full` crashes on diffusers' UNet2DConditionModel ("duplicated lora name:
  lora_unet_time_embedding_linear_1"), so a preset .toml without `TimestepEmbedding` is written;
- `apply_preset` changes class-level state: `lycoris.kohya` is reloaded before each network;
- module names: `lora_unet_<diffusers path>`; SD1 text encoder `lora_te_encoder_layers_{i}_...`
  (transformers 5's CLIPTextModel has no `text_model.` level); SDXL `lora_te1_encoder_layers_{i}_...`
  for CLIPTextModel and `lora_te2_text_model_encoder_layers_{i}_...` for CLIPTextModelWithProjection;
- LyCORIS' forward uses its `scale`, which equals the consumer rule (alpha / rank when an alpha
  exists and some factor is low-rank, else 1) applied to the saved tensors: checked per module;
- the kohya wrapper's DoRA (`dora_wd=True`) defaults to `wd_on_output=True`: dora_scale (out, 1) /
  (out, 1, 1, 1); `wd_on_output=False` gives (1, in) / (1, in, 1, 1).

fp16 variants: the factors and dora_scale are rounded to fp16 *before* LyCORIS runs, so the fp16
file holds exactly the tensors behind the expected outputs, and the fp32 tolerance applies.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from lokr_diffusers.tiny import make_sd_pipeline, make_sdxl_pipeline

PRESET_TOML = """\
# LyCORIS preset for diffusers' UNet2DConditionModel: its `full` preset also targets
# TimestepEmbedding, whose linear_1/linear_2 are named by unet_target_name too -> duplicated name crash.
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

REL_DELTA = 0.3  # each module's ΔW is rescaled to this RMS relative to its base weight's RMS
DORA_JITTER = 0.2  # dora_scale *= 1 + DORA_JITTER * randn: the magnitude changes too, not only the direction

# module-name prefix in the file -> pipeline component
PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


@dataclass(frozen=True)
class Variant:
    """One way of running LyCORIS' kohya wrapper: network dim/alpha, its kwargs, the save dtype,
    and the tensor names the file must (`expect`) and must not (`forbid`) contain."""

    id: str
    dim: int
    alpha: float
    kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: torch.dtype = torch.float32
    expect: frozenset[str] = frozenset()
    forbid: frozenset[str] = frozenset()
    dora_axis: str | None = None  # "out" | "in" when dora_wd is on

    @property
    def network_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


_LOW_RANK_W2 = frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"})
_NOT = frozenset({"lokr_w1_a", "lokr_w1_b", "lokr_t2", "dora_scale"})

# Tiny model dims are 32/37/64/128/512: with factor -1, 64 -> (8, 8) and 32 -> (4, 8), so W2 is
# low-rank only for r < 4 (r < max(out_k, in_n) / 2). dim=2 keeps every W2 low-rank there.
VARIANTS: list[Variant] = [
    Variant("default", 2, 2.0, expect=_LOW_RANK_W2, forbid=_NOT | {"lokr_w2"}),
    Variant("alpha_ne_dim", 2, 0.5, expect=_LOW_RANK_W2, forbid=_NOT | {"lokr_w2"}),
    Variant("factor4", 2, 1.0, (("factor", 4),), expect=_LOW_RANK_W2, forbid=_NOT | {"lokr_w2"}),
    Variant("factor8", 2, 1.0, (("factor", 8),), expect=_LOW_RANK_W2, forbid=_NOT | {"lokr_w2"}),
    # W1 low-rank where r < max(out_l, in_m) / 2 (UNet 64-wide layers), full on the 32-wide text encoders
    Variant("decompose_both", 2, 1.0, (("decompose_both", True),),
            expect=_LOW_RANK_W2 | {"lokr_w1_a", "lokr_w1_b"}, forbid=frozenset({"lokr_t2", "dora_scale"})),
    # 3x3 convs get conv_dim=3 < 4: low-rank W2 in Tucker form (t2 (3, 3, 3, 3), w2_a (3, out_k)) and
    # their own scale 0.75 / 3; linear and 1x1 conv layers keep dim 2, alpha 1 (scale 0.5).
    Variant("tucker", 2, 1.0, (("use_tucker", True), ("conv_dim", 3), ("conv_alpha", 0.75)),
            expect=_LOW_RANK_W2 | {"lokr_t2"}, forbid=frozenset({"lokr_w1_a", "lokr_w2", "dora_scale"})),
    Variant("full_matrix", 2, 1.0, (("full_matrix", True),), expect=frozenset({"lokr_w1", "lokr_w2", "alpha"}),
            forbid=_NOT | {"lokr_w2_a", "lokr_w2_b"}),
    # r=8: both factors full on most layers (LyCORIS saves alpha := r = 8 there, scale 1) but W2 low-rank
    # (scale 4/8) on ff.net.0.proj (out 512 -> W2 (32, 8)) and the text encoders' fc1/fc2 (37 is prime): mixed.
    Variant("large_rank_mixed", 8, 4.0, expect=_LOW_RANK_W2 | {"lokr_w2"}, forbid=_NOT),
    Variant("rs_lora", 2, 1.0, (("rs_lora", True),), expect=_LOW_RANK_W2, forbid=_NOT | {"lokr_w2"}),
    Variant("dora_out", 2, 1.0, (("dora_wd", True),), expect=_LOW_RANK_W2 | {"dora_scale"},
            forbid=frozenset({"lokr_w1_a", "lokr_t2", "lokr_w2"}), dora_axis="out"),
    Variant("dora_in", 2, 1.0, (("dora_wd", True), ("wd_on_output", False)), expect=_LOW_RANK_W2 | {"dora_scale"},
            forbid=frozenset({"lokr_w1_a", "lokr_t2", "lokr_w2"}), dora_axis="in"),
    Variant("fp16", 2, 1.0, dtype=torch.float16, expect=_LOW_RANK_W2, forbid=_NOT | {"lokr_w2"}),
    Variant("fp16_tucker_dora", 2, 1.0, (("use_tucker", True), ("dora_wd", True)), dtype=torch.float16,
            expect=_LOW_RANK_W2 | {"lokr_t2", "dora_scale"}, forbid=frozenset({"lokr_w1_a", "lokr_w2"}),
            dora_axis="out"),
]
VARIANT_IDS: list[str] = [v.id for v in VARIANTS]
KINDS: tuple[str, ...] = ("sd", "sdxl")


@dataclass(frozen=True)
class Inputs:
    """Fixed inputs: UNet (latents, timestep, conditioning) and token ids per text encoder."""

    latents: Tensor
    timestep: Tensor
    encoder_hidden_states: Tensor
    added_cond_kwargs: dict[str, Tensor] | None
    input_ids: dict[str, Tensor]  # component -> (B, T) token ids


@dataclass
class LycorisFile:
    """A LoKr file written by LyCORIS, with its outputs. `expected` / `base` are keyed like
    `pipeline_outputs`: "unet", "text_encoder", "text_encoder_2", "text_encoder_2.text_embeds"."""

    kind: str  # "sd" | "sdxl"
    variant: Variant
    path: str
    tensors: dict[str, Tensor]  # the file as saved
    metadata: dict[str, str]
    modules: dict[str, list[str]]  # component -> module names in the file ("lora_unet_...")
    weight_shapes: dict[str, tuple[int, ...]]  # module name -> base weight shape
    scales: dict[str, float]  # module name -> LyCORIS' scale (== consumer rule on the file)
    inputs: Inputs
    base: dict[str, Tensor]
    expected: dict[str, Tensor]
    build_seconds: float = 0.0


def make_pipeline(kind: str, seed: int = 0) -> Any:
    """A fresh tiny pipeline: "sd" (SD1.x-like) or "sdxl". The same seed gives the same weights."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return make_sdxl_pipeline(seed) if kind == "sdxl" else make_sd_pipeline(seed)


def pipeline_kind(pipe: Any) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def write_preset(directory: str) -> str:
    path = os.path.join(directory, "lycoris_preset_diffusers_unet.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(PRESET_TOML)
    return path


def make_inputs(pipe: Any, size: int = 16, tokens: int = 12) -> Inputs:
    """Deterministic inputs. The UNet gets a random conditioning (not the text encoders' output),
    so a UNet mismatch and a text-encoder mismatch show up separately."""
    gen = torch.Generator().manual_seed(1234)
    unet = pipe.unet
    batch = 2
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    timestep = torch.tensor([10, 500])
    cond = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)
    added = None
    if unet.config.addition_embed_type == "text_time":
        n_time = (unet.config.projection_class_embeddings_input_dim
                  - pipe.text_encoder_2.config.projection_dim) // unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim, generator=gen),
                 "time_ids": torch.randn(batch, n_time, generator=gen).abs() * 100}
    prompts = ["a photo of a cat", "sks dog painting in red style"]
    ids = {"text_encoder": pipe.tokenizer(prompts, padding="max_length", max_length=tokens, truncation=True,
                                          return_tensors="pt").input_ids}
    if getattr(pipe, "text_encoder_2", None) is not None:
        ids["text_encoder_2"] = pipe.tokenizer_2(prompts, padding="max_length", max_length=tokens, truncation=True,
                                                 return_tensors="pt").input_ids
    return Inputs(latents, timestep, cond, added, ids)


@torch.no_grad()
def component_outputs(unet: nn.Module, text_encoders: dict[str, nn.Module], inputs: Inputs) -> dict[str, Tensor]:
    """UNet `.sample`; each text encoder's last_hidden_state (and text_embeds when it projects)."""
    out: dict[str, Tensor] = {}
    kwargs = {"added_cond_kwargs": inputs.added_cond_kwargs} if inputs.added_cond_kwargs is not None else {}
    out["unet"] = unet(inputs.latents, inputs.timestep, encoder_hidden_states=inputs.encoder_hidden_states,
                       **kwargs).sample
    for name, te in text_encoders.items():
        res = te(inputs.input_ids[name])
        out[name] = res.last_hidden_state
        if getattr(res, "text_embeds", None) is not None:
            out[f"{name}.text_embeds"] = res.text_embeds
    return out


def pipeline_outputs(pipe: Any, inputs: Inputs) -> dict[str, Tensor]:
    """`component_outputs` on a pipeline's own unet / text_encoder / text_encoder_2."""
    tes = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    return component_outputs(pipe.unet, tes, inputs)


def consumer_scale(tensors: dict[str, Tensor]) -> float:
    """ComfyUI / A1111 rule (docs/formats.md §Scale rules), on one module's tensors (suffix -> tensor)."""
    if "lokr_w2_b" in tensors:
        rank = tensors["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in tensors:
        rank = tensors["lokr_w1_b"].shape[0]
    else:
        return 1.0
    return float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0


def file_modules(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """module name -> {suffix: tensor}."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        module, suffix = key.split(".", 1)
        modules.setdefault(module, {})[suffix] = t
    return modules


def component_of(module_name: str) -> str:
    for prefix, component in PREFIXES.items():
        if module_name.startswith(prefix):
            return component
    raise KeyError(f"{module_name}: no known component prefix")


def _create_network(variant: Variant, unet: nn.Module, tes: list[nn.Module], preset: str) -> Any:
    import lycoris.kohya

    kohya = importlib.reload(lycoris.kohya)  # apply_preset mutates class attributes
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # set after import: lycoris.logging sets INFO
    te_arg: nn.Module | list[nn.Module] = tes if len(tes) > 1 else tes[0]
    net = kohya.create_network(1.0, variant.dim, variant.alpha, None, te_arg, unet, algo="lokr", preset=preset,
                               warn_on_unmatched=False, **variant.network_kwargs)
    net.apply_to(te_arg, unet, apply_text_encoder=True, apply_unet=True)
    return net.eval()


@torch.no_grad()
def _randomise(net: Any, variant: Variant, seed: int) -> None:
    """Random factors, each module's ΔW rescaled to REL_DELTA of its weight's RMS; dora_scale jittered.
    For fp16 variants every saved tensor is then rounded to fp16 in place (what the file will hold)."""
    gen = torch.Generator().manual_seed(seed)
    for lyc in net.loras:
        params = dict(lyc.named_parameters())
        for name, p in params.items():
            if name.startswith("lokr_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name == "dora_scale":
                p.mul_(1 + DORA_JITTER * torch.randn(p.shape, generator=gen))
        delta = lyc.get_weight(lyc.shape)
        base = lyc.org_module[0].weight
        ratio = REL_DELTA * base.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
        params["lokr_w1" if "lokr_w1" in params else "lokr_w1_a"].mul_(ratio)
        if variant.dtype != torch.float32:
            for p in params.values():
                p.copy_(p.to(variant.dtype).float())


def _metadata(variant: Variant, kind: str) -> dict[str, str]:
    args = {"algo": "lokr", "preset": "diffusers_unet", **{k: str(v) for k, v in variant.kwargs}}
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(variant.dim),
        "ss_network_alpha": str(variant.alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1",
        "ss_v2": "False",
        "ss_output_name": f"tiny_{kind}_{variant.id}",
    }


def check_file(lf: LycorisFile) -> None:
    """Assert the file has the tensor kinds its variant is about (so a test can't silently cover
    only full matrices), LyCORIS' scale == the consumer rule, and dora_scale on the expected axis."""
    v = lf.variant
    modules = file_modules(lf.tensors)
    suffixes = {s for m in modules.values() for s in m}
    assert v.expect <= suffixes, f"{lf.kind}/{v.id}: file lacks {sorted(v.expect - suffixes)}"
    assert not (v.forbid & suffixes), f"{lf.kind}/{v.id}: file unexpectedly has {sorted(v.forbid & suffixes)}"
    assert all(t.dtype == v.dtype for t in lf.tensors.values()), f"{lf.kind}/{v.id}: not all {v.dtype}"
    assert set(modules) == set(lf.scales), f"{lf.kind}/{v.id}: file modules != LyCORIS modules"
    for name, ts in modules.items():
        assert ("lokr_w1" in ts) != ("lokr_w1_a" in ts) and ("lokr_w2" in ts) != ("lokr_w2_a" in ts), name
        assert abs(consumer_scale(ts) - lf.scales[name]) <= 1e-6 * abs(lf.scales[name]), (
            f"{name}: consumer rule {consumer_scale(ts)} != LyCORIS scale {lf.scales[name]}")
        if v.dora_axis is not None:
            shape, ds = lf.weight_shapes[name], tuple(ts["dora_scale"].shape)
            ones = (1,) * (len(shape) - 2)
            want = (shape[0], 1, *ones) if v.dora_axis == "out" else (1, shape[1], *ones)
            assert ds == want, f"{name}: dora_scale {ds}, expected {want} ({v.dora_axis} axis)"
    assert sum(len(m) for m in lf.modules.values()) == len(modules)
    if lf.kind == "sdxl":
        assert lf.modules.get("text_encoder_2") and lf.modules.get("text_encoder"), lf.modules.keys()


def build_lycoris_file(pipe: Any, variant: Variant, directory: str, seed: int = 0,
                       inputs: Inputs | None = None) -> LycorisFile:
    """Write `<directory>/lycoris_<kind>_<variant>.safetensors` with LyCORIS and compute its outputs.

    `pipe` is not modified: LyCORIS runs on deep copies of its UNet and text encoder(s).
    Returns the path, the saved tensors, LyCORIS' outputs (`expected`) and the pipeline's (`base`).
    """
    start = time.perf_counter()
    kind = pipeline_kind(pipe)
    os.makedirs(directory, exist_ok=True)
    inputs = inputs if inputs is not None else make_inputs(pipe)
    te_names = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]

    unet = copy.deepcopy(pipe.unet).eval()
    tes = {n: copy.deepcopy(getattr(pipe, n)).eval() for n in te_names}
    net = _create_network(variant, unet, list(tes.values()), write_preset(directory))
    _randomise(net, variant, seed)
    expected = component_outputs(unet, tes, inputs)
    base = pipeline_outputs(pipe, inputs)

    path = os.path.join(directory, f"lycoris_{kind}_{variant.id}.safetensors")
    net.save_weights(path, variant.dtype, _metadata(variant, kind))
    tensors = load_file(path)
    with safe_open(path, "pt") as fh:
        metadata = dict(fh.metadata() or {})
    modules: dict[str, list[str]] = {}
    for name in sorted(file_modules(tensors)):
        modules.setdefault(component_of(name), []).append(name)
    lf = LycorisFile(
        kind=kind, variant=variant, path=path, tensors=tensors, metadata=metadata, modules=modules,
        weight_shapes={lyc.lora_name: tuple(lyc.shape) for lyc in net.loras},
        scales={lyc.lora_name: float(lyc.scale) for lyc in net.loras},
        inputs=inputs, base=base, expected=expected,
    )
    check_file(lf)
    lf.build_seconds = time.perf_counter() - start
    return lf
