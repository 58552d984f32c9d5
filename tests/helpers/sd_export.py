"""References and sources for the SD1.x / SDXL export tests (tests/test_export_comfyui.py,
tests/test_export_round_trips.py), written from docs/formats.md, never from the package's reader or its name maps:

- the source: a tiny pipeline holding adapter "src" with random factors of every kind the exports must carry
  (`export_source`), and a per-module cache of it with its inputs and outputs (`cached_sources`);
- the kohya names (docs/formats.md §Key layouts, §Portable export) built forward from the pipeline's own modules
  through an ldm table in the style of diffusers' / kohya's conversion scripts (`ldm_prefixes`, `name_map`);
- the ComfyUI and A1111 consumer rules (docs/formats.md §The math, §Scale rules, §DoRA: kron with the conv
  unsqueeze, Tucker, alpha / rank, DoRA axis, ComfyUI's output-axis DoRA normalised by ‖W‖) and LyCORIS' rule
  for the weight as trained (`comfyui_weight`, `a1111_weight`, `trained_weight`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import Tensor, nn

from helpers.lycoris_files import make_inputs, pipeline_outputs
from helpers.sd_adapters import tiny_pipe
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers

A = "src"  # the exported adapter
ATOL = 1e-5  # outputs, fp32 end to end
W_TOL = dict(rtol=1e-6, atol=1e-6)  # weights
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv", "time_emb_proj", "conv_shortcut", "linear_1"]


# ------------------------------------------------------------------------------------- sources
def components(pipe) -> dict[str, nn.Module]:
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None}


def layer_at(model: nn.Module, suffix: str):
    return next(la for p, la in lokr_layers(model) if p.endswith(suffix))


def export_source(sdxl: bool, extras: bool = True, te: bool = True, dora_out: bool = True):
    """A tiny pipeline holding adapter "src" with random factors: low-rank W2, both factors full with a
    PEFT scale alpha/r != 1 (ff.net.2: 2/16, k_proj: 1.5/4, downsampler 3x3 conv: 2/8 with a 4-D W2),
    Tucker 3x3 convs, decompose_both W1 (text encoders), rank/alpha patterns. `extras` (what PEFT cannot
    hold): DoRA on both axes (input axis only without `dora_out`), a W1-only-low-rank layer and one whose W1
    and W2 ranks differ."""
    pipe = tiny_pipe(sdxl)
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
        odd = layer_at(pipe.unet, "attn1.to_out.0")  # W1 low-rank (rank 2), W2 full: consumers read w1_b's rank
        odd.set_adapter_tensors(A, {"lokr_w1_a": rand(8, 2), "lokr_w1_b": rand(2, 8), "lokr_w2": rand(8, 8)}, 0.7)
        odd = layer_at(pipe.unet, "attn2.to_out.0")  # W1 rank 3, W2 rank 1: consumers read w2_b's rank
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


def cached_sources() -> Callable[..., tuple]:
    """(kind, extras, dora_out=True) -> (pipeline, inputs, its outputs), each built once (a test module's
    `sources` fixture holds one of these per module)."""
    cache: dict = {}

    def get(kind: str, extras: bool, dora_out: bool = True) -> tuple:
        key = kind, extras, dora_out
        if key not in cache:
            pipe = export_source(kind == "sdxl", extras, dora_out=dora_out)
            inputs = make_inputs(pipe)
            cache[key] = pipe, inputs, pipeline_outputs(pipe, inputs)
        return cache[key]

    return get


# ------------------------------------------------------- kohya names, built forward from the model
RESNET_LEAVES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_prefixes(cfg) -> list[tuple[str, str, bool]]:
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


def ldm_name(path: str, table: list[tuple[str, str, bool]]) -> str:
    for prefix, ldm, resnet in table:
        if path == prefix or path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:].split(".") if path != prefix else []
            if resnet and rest:
                rest[0] = RESNET_LEAVES[rest[0]]
            return ".".join([ldm, *rest])
    raise KeyError(f"no ldm name for {path}")


def name_map(comps: dict[str, nn.Module], base: str) -> dict[str, tuple[str, str]]:
    """Kohya name (docs/formats.md §Portable export) -> (component, module path) for every Linear / Conv2d;
    fails on a clash."""
    table = ldm_prefixes(comps["unet"].config)
    te_prefix = {"text_encoder": "lora_te1_" if base == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    out: dict[str, tuple[str, str]] = {}
    for comp, model in comps.items():
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if comp == "unet":
                name = "lora_unet_" + (ldm_name(path, table) if base == "sdxl" else path).replace(".", "_")
            else:  # the transformers 4 path: transformers 5 dropped CLIPTextModel's `text_model.` level
                tf4_path = path if hasattr(model, "text_model") else "text_model." + path
                name = te_prefix[comp] + tf4_path.replace(".", "_")
            assert name not in out, f"{name} names {out.get(name)} and {(comp, path)}"
            out[name] = (comp, path)
    return out


# ---------------------------------------------- consumer rules (docs/formats.md §The math, §Scale rules, §DoRA)
def kron_delta(w: Tensor, t: dict[str, Tensor]) -> Tensor:
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


def row_norm(w: Tensor) -> Tensor:
    """‖·‖ per output row, shaped (out, 1[, 1, 1])."""
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))


def column_norm(w: Tensor) -> Tensor:
    """‖·‖ per input column, shaped (1, in[, 1, 1])."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))


def _at_strength(w: Tensor, adapted: Tensor, strength: float) -> Tensor:
    """Every consumer's DoRA at strength s: W + s·(W' − W)."""
    return w + strength * (adapted - w)


def comfyui_weight(w: Tensor, t: dict[str, Tensor], strength: float = 1.0) -> Tensor | None:
    """ComfyUI's weight_decompose (fp32): the axis is the output one iff dora_scale.shape[0] == out. Output
    axis: W' = m · (W + ΔW) / (‖W‖ + eps), the norm of the ORIGINAL weight per row; input axis:
    W' = m · (W + ΔW) / (‖W + ΔW‖ + eps) per column; eps = finfo(fp32).eps."""
    merged = w + kron_delta(w, t)
    if "dora_scale" not in t:
        return w + strength * (merged - w)
    m, eps = t["dora_scale"], torch.finfo(torch.float32).eps
    norm = row_norm(w) if m.shape[0] == w.shape[0] else column_norm(merged)
    return _at_strength(w, merged * (m / (norm + eps)), strength)


def a1111_weight(w: Tensor, t: dict[str, Tensor], strength: float = 1.0) -> Tensor | None:
    """A1111: honours `.scale`, DoRA only on the input axis, no eps (None where it cannot apply the module)."""
    if "scale" in t:
        raise AssertionError("a portable export writes no .scale key (docs/formats.md §Portable export)")
    merged = w + kron_delta(w, t)
    if "dora_scale" not in t:
        return w + strength * (merged - w)
    if tuple(t["dora_scale"].shape) != (1, w.shape[1], *[1] * (w.dim() - 2)):
        return None
    return _at_strength(w, merged * (t["dora_scale"] / column_norm(merged)), strength)


def trained_weight(w: Tensor, factors: dict[str, Tensor], scale: float, dora_scale: Tensor | None,
                   strength: float = 1.0) -> Tensor:
    """The weight as trained (LyCORIS' rule, docs/formats.md §DoRA): ΔW = scale · W1 ⊗ W2 from the layer's own factors;
    DoRA W' = m · (W + ΔW) / (‖W + ΔW‖ + eps) per output row or input column (dora_scale's shape says
    which), eps = finfo(dtype).eps; at strength s, W + s·(W' − W)."""
    merged = w + kron_delta(w, factors) * scale  # no alpha key: kron_delta's consumer scale is 1
    if dora_scale is None:
        return w + strength * (merged - w)
    out_axis = dora_scale.shape[0] == w.shape[0] and dora_scale.numel() == w.shape[0]
    norm = row_norm(merged) if out_axis else column_norm(merged)
    return _at_strength(w, merged * (dora_scale.reshape(norm.shape) / (norm + torch.finfo(w.dtype).eps)), strength)


STRENGTHS = (1.0, 0.5, 1.7)
CONSUMERS = {"comfyui": comfyui_weight, "a1111": a1111_weight}


def modules_of(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        module, suffix = key.split(".", 1)
        out.setdefault(module, {})[suffix] = t
    return out


def metadata_of(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as fh:
        return dict(fh.metadata() or {})
