"""ComfyUI's LoKr loading for the DiT pipelines, written for the tests from ComfyUI's rules (docs/formats.md §Export
of DiT adapters), never from the package: which key names ComfyUI loads, onto which weight of its own
(original-layout) model, with which row offset or (shift, scale) swap, and the LoKr rule on that weight
(references.consumer_weight). Applied to a copy of a diffusers model, it gives what ComfyUI would compute.

ComfyUI's model holds the original (BFL / Stability / Tongyi) modules. `comfy_originals` lists each one as the
rows of diffusers Linears in the original's order, by hand per family (ComfyUI's flux_to_diffusers,
mmdit_to_diffusers, z_image_to_diffusers say the same). A key `diffusion_model.<original>` patches that whole
weight; `transformer.<diffusers path>` patches that Linear's rows of its original (an offset: the heights of the
parts before it), or, for a one-Linear swapped original (an adaLN projection), the whole weight with ΔW swapped
into the original's (shift, scale) order; Flux's `diffusion_model.single_blocks.N.linear1_qkv` patches rows
[0, 3 · hidden) of linear1. Text encoders: `text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>`,
`text_encoders.<qwen3_4b|qwen3_8b>.transformer.model.<path>` and, for a non-CLIP encoder, the same without the
wrapper name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from helpers.references import consumer_weight

Parts = list[tuple[str, int, int]]  # (diffusers path, first row, end row) in the original's row order


@dataclass
class Original:
    parts: Parts
    swapped: bool = False  # a (shift, scale) adaLN projection: diffusers keeps (scale, shift)


def _linear_rows(model: nn.Module, path: str) -> int:
    return int(model.get_submodule(path).weight.shape[0])


def _add(out: dict[str, Original], model: nn.Module, original: str, paths: list[str], swapped: bool = False) -> None:
    names = dict(model.named_modules())
    if not all(p in names for p in paths):
        return  # the model has no such module (SD3's last context block, no guidance embedder, ...)
    if swapped:
        (p,) = paths
        h = _linear_rows(model, p) // 2
        out[original] = Original([(p, h, 2 * h), (p, 0, h)], True)
    else:
        out[original] = Original([(p, 0, _linear_rows(model, p)) for p in paths])


def comfy_originals(family: str, model: nn.Module) -> dict[str, Original]:
    """ComfyUI's original module name -> its rows in the diffusers model, for the tiny models of the tests."""
    out: dict[str, Original] = {}
    cfg = model.config
    qkv, add_qkv = ["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    if family in ("flux", "flux2", "chroma"):  # ComfyUI's Chroma is its Flux less the modulations (absent: skipped)
        flux2 = family == "flux2"
        for i in range(cfg.num_layers):
            b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            _add(out, model, o + "img_attn.qkv", [b + p for p in qkv])
            _add(out, model, o + "txt_attn.qkv", [b + p for p in add_qkv])
            _add(out, model, o + "img_attn.proj", [b + "attn.to_out.0"])
            _add(out, model, o + "txt_attn.proj", [b + "attn.to_add_out"])
            ff_in, ff_out = ("linear_in", "linear_out") if flux2 else ("net.0.proj", "net.2")
            _add(out, model, o + "img_mlp.0", [b + "ff." + ff_in])
            _add(out, model, o + "img_mlp.2", [b + "ff." + ff_out])
            _add(out, model, o + "txt_mlp.0", [b + "ff_context." + ff_in])
            _add(out, model, o + "txt_mlp.2", [b + "ff_context." + ff_out])
            _add(out, model, o + "img_mod.lin", [b + "norm1.linear"])
            _add(out, model, o + "txt_mod.lin", [b + "norm1_context.linear"])
        for i in range(cfg.num_single_layers):
            b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            if flux2:
                _add(out, model, o + "linear1", [b + "attn.to_qkv_mlp_proj"])
                _add(out, model, o + "linear2", [b + "attn.to_out"])
            else:
                _add(out, model, o + "linear1", [b + p for p in qkv] + [b + "proj_mlp"])
                _add(out, model, o + "linear2", [b + "proj_out"])
                _add(out, model, o + "modulation.lin", [b + "norm.linear"])
        emb = "time_guidance_embed" if flux2 else "time_text_embed"
        for original, path in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                               ("time_in.in_layer", f"{emb}.timestep_embedder.linear_1"),
                               ("time_in.out_layer", f"{emb}.timestep_embedder.linear_2"),
                               ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                               ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                               ("guidance_in.in_layer", f"{emb}.guidance_embedder.linear_1"),
                               ("guidance_in.out_layer", f"{emb}.guidance_embedder.linear_2"),
                               ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
                               ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
                               ("single_stream_modulation.lin", "single_stream_modulation.linear"),
                               ("final_layer.linear", "proj_out")):
            _add(out, model, original, [path])
        _add(out, model, "final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
        if family == "chroma":  # comfy/ldm/chroma: the approximator (diffusers keeps in_proj / out_proj's names)
            for original in ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj"):
                _add(out, model, original, [original])
            for k in range(cfg.approximator_layers):
                b = f"distilled_guidance_layer.layers.{k}."
                _add(out, model, b + "in_layer", [b + "linear_1"])
                _add(out, model, b + "out_layer", [b + "linear_2"])
    elif family == "lumina2":  # comfy/ldm/lumina (NextDiT): q, k, v rows unequal (grouped-query attention)
        for kind, n in (("layers", cfg.num_layers), ("noise_refiner", cfg.num_refiner_layers),
                        ("context_refiner", cfg.num_refiner_layers)):
            for i in range(n):
                b = f"{kind}.{i}."
                _add(out, model, b + "attention.qkv", [b + f"attn.to_{x}" for x in "qkv"])
                _add(out, model, b + "attention.out", [b + "attn.to_out.0"])
                for w in "123":
                    _add(out, model, b + f"feed_forward.w{w}", [b + f"feed_forward.linear_{w}"])
                _add(out, model, b + "adaLN_modulation.1", [b + "norm1.linear"])  # none in context_refiner
        for original, path in (("x_embedder", "x_embedder"),
                               ("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
                               ("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
                               ("cap_embedder.1", "time_caption_embed.caption_embedder.1"),
                               ("final_layer.adaLN_modulation.1", "norm_out.linear_1"),  # a scale only: no swap
                               ("final_layer.linear", "norm_out.linear_2")):
            _add(out, model, original, [path])
    elif family == "sd3":
        last = cfg.num_layers - 1
        for i in range(cfg.num_layers):
            b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            _add(out, model, o + "x_block.attn.qkv", [b + p for p in qkv])
            _add(out, model, o + "context_block.attn.qkv", [b + p for p in add_qkv])
            _add(out, model, o + "x_block.attn2.qkv", [b + "attn2.to_q", b + "attn2.to_k", b + "attn2.to_v"])
            _add(out, model, o + "x_block.attn.proj", [b + "attn.to_out.0"])
            _add(out, model, o + "x_block.attn2.proj", [b + "attn2.to_out.0"])
            _add(out, model, o + "context_block.attn.proj", [b + "attn.to_add_out"])
            _add(out, model, o + "x_block.mlp.fc1", [b + "ff.net.0.proj"])
            _add(out, model, o + "x_block.mlp.fc2", [b + "ff.net.2"])
            _add(out, model, o + "context_block.mlp.fc1", [b + "ff_context.net.0.proj"])
            _add(out, model, o + "context_block.mlp.fc2", [b + "ff_context.net.2"])
            _add(out, model, o + "x_block.adaLN_modulation.1", [b + "norm1.linear"])
            _add(out, model, o + "context_block.adaLN_modulation.1", [b + "norm1_context.linear"], swapped=i == last)
        for original, path in (("context_embedder", "context_embedder"), ("x_embedder.proj", "pos_embed.proj"),
                               ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                               ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                               ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                               ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                               ("final_layer.linear", "proj_out")):
            _add(out, model, original, [path])
        _add(out, model, "final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    elif family == "wan":  # comfy/ldm/wan/model.py: the original names (convert_wan_transformer_to_diffusers)
        leaves = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                  "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                  "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
                  "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
                  "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
        for i in range(cfg.num_layers):
            for leaf, path in leaves.items():
                _add(out, model, f"blocks.{i}.{leaf}", [f"blocks.{i}.{path}"])
        for original, path in (("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
                               ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
                               ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
                               ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
                               ("time_projection.1", "condition_embedder.time_proj"),
                               ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
                               ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
                               ("head.head", "proj_out")):
            _add(out, model, original, [path])
    elif family in ("ltxvideo", "ltx2"):
        # ComfyUI's LTXV / LTXAV models keep Lightricks' names, which are diffusers' paths but for the top-level
        # modules diffusers' converters rename (convert_ltx_transformer_checkpoint_to_diffusers,
        # convert_ltx2_transformer_to_diffusers): one Linear per original, no fused rows, no swap
        renamed = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "time_embed": "adaln_single",
                   "audio_time_embed": "audio_adaln_single",
                   "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
                   "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
                   "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
                   "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single"}
        for path, m in model.named_modules():  # (not _add: it lists the modules again for each of 1370 Linears)
            if isinstance(m, nn.Linear):
                head, dot, rest = path.partition(".")
                out[renamed.get(head, head) + dot + rest] = Original([(path, 0, m.out_features)])
    elif family in ("qwenimage", "qwenimage21", "hidream"):
        # ComfyUI's qwen_image / hidream models keep diffusers' module names (diffusers' single-file converters for
        # them are the identity), so each Linear is an original of its own, except Qwen-Image 2.1's SwiGLU input:
        # ComfyUI's `img_mlp.gate_up` is gate_layer's rows, then proj's (comfy/lora.py maps the two diffusers names
        # to those halves).
        fused = family == "qwenimage21"
        for path, m in model.named_modules():
            if not isinstance(m, nn.Linear) or (fused and path.endswith((".img_mlp.gate_layer", ".img_mlp.proj"))):
                continue
            _add(out, model, path, [path])
        for i in range(cfg.num_layers if fused else 0):
            b = f"transformer_blocks.{i}.img_mlp."
            _add(out, model, b + "gate_up", [b + "gate_layer", b + "proj"])
    elif family in ("hunyuanvideo", "hunyuanvideo15"):
        _hunyuan(out, model, family == "hunyuanvideo15")
    else:  # zimage
        for kind, n in (("layers", cfg.n_layers), ("noise_refiner", cfg.n_refiner_layers),
                        ("context_refiner", cfg.n_refiner_layers)):
            for i in range(n):
                b = f"{kind}.{i}."
                _add(out, model, b + "attention.qkv", [b + f"attention.to_{x}" for x in "qkv"])
                _add(out, model, b + "attention.out", [b + "attention.to_out.0"])
                for leaf in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"):
                    _add(out, model, b + leaf, [b + leaf])
        for original, path in (("x_embedder", "all_x_embedder.2-1"),
                               ("final_layer.linear", "all_final_layer.2-1.linear"),
                               ("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
                               ("t_embedder.mlp.0", "t_embedder.mlp.0"), ("t_embedder.mlp.2", "t_embedder.mlp.2"),
                               ("cap_embedder.1", "cap_embedder.1")):
            _add(out, model, original, [path])
    return out


def _hunyuan(out: dict[str, Original], model: nn.Module, v15: bool) -> None:
    """ComfyUI's internal HunyuanVideo module names (comfy/ldm/hunyuan_video/model.py with Flux's double / single
    blocks, mirror @ a125cd84; its loader renames Tencent's checkpoint into them): TokenRefiner's input_embedder,
    t_embedder / c_embedder (in_layer, out_layer), refiner blocks' self_attn.qkv / .proj, mlp.0 / .2,
    adaLN_modulation.1; MLPEmbedder time_in / vector_in / guidance_in; LastLayer final_layer (swapped adaLN). For 1.5
    (assumed, not read: ComfyUI's 1.5 code is not in the mirror) q, k, v keep Tencent's separate names, and
    byt5_in.fc1-3 (ByT5Mapper), vision_in.proj.1 / .3 are as in the checkpoint."""
    cfg = model.config
    emb = "time_embed" if v15 else "time_text_embed"
    tops = [("time_in.in_layer", f"{emb}.timestep_embedder.linear_1"),
            ("time_in.out_layer", f"{emb}.timestep_embedder.linear_2"),
            ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
            ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
            ("txt_in.input_embedder", "context_embedder.proj_in"),
            ("txt_in.t_embedder.in_layer", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
            ("txt_in.t_embedder.out_layer", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
            ("txt_in.c_embedder.in_layer", "context_embedder.time_text_embed.text_embedder.linear_1"),
            ("txt_in.c_embedder.out_layer", "context_embedder.time_text_embed.text_embedder.linear_2"),
            ("byt5_in.fc1", "context_embedder_2.linear_1"), ("byt5_in.fc2", "context_embedder_2.linear_2"),
            ("byt5_in.fc3", "context_embedder_2.linear_3"),
            ("vision_in.proj.1", "image_embedder.linear_1"), ("vision_in.proj.3", "image_embedder.linear_2"),
            ("final_layer.linear", "proj_out")]
    for original, path in tops:
        _add(out, model, original, [path])
    _add(out, model, "final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    for r in range(cfg.num_refiner_layers):
        o, b = f"txt_in.individual_token_refiner.blocks.{r}.", f"context_embedder.token_refiner.refiner_blocks.{r}."
        _add(out, model, o + "self_attn.qkv", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"])
        for leaf, path in (("self_attn.proj", "attn.to_out.0"), ("mlp.0", "ff.net.0.proj"), ("mlp.2", "ff.net.2"),
                           ("adaLN_modulation.1", "norm_out.linear")):
            _add(out, model, o + leaf, [b + path])
    for i in range(cfg.num_layers):
        o, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        if v15:
            for x in "qkv":
                p, q = f"to_{x}", f"add_{x}_proj"
                _add(out, model, f"{o}img_attn_{x}", [f"{b}attn.{p}"])
                _add(out, model, f"{o}txt_attn_{x}", [f"{b}attn.{q}"])
        else:
            _add(out, model, o + "img_attn.qkv", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"])
            _add(out, model, o + "txt_attn.qkv", [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"])
        for leaf, path in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                           ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                           ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                           ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
            _add(out, model, o + leaf, [b + path])
    for i in range(getattr(cfg, "num_single_layers", 0)):
        o, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        _add(out, model, o + "linear1", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"])
        _add(out, model, o + "linear2", [b + "proj_out"])
        _add(out, model, o + "modulation.lin", [b + "norm.linear"])


# Names ComfyUI's key map gives to the first rows of an original (comfy/lora.py model_lora_keys_unet, Flux models:
# every `<x>.linear1.weight` also answers to `<x>.linear1_qkv`, rows [0, 3 · hidden_size) of it: q, k and v).
def _row_name(family: str, model: nn.Module, o: str) -> tuple[str, int] | None:
    """(original, rows) for a ComfyUI row name, None for any other name."""
    if family in ("flux", "chroma") and o.startswith("single_blocks.") and o.endswith(".linear1_qkv"):
        hidden = int(model.config.num_attention_heads * model.config.attention_head_dim)
        return o.removesuffix("_qkv"), 3 * hidden
    return None


# Diffusers paths ComfyUI's key map does NOT take under `transformer.` (flux_to_diffusers was written for
# Flux.1: Flux.2's global modulation and time_guidance_embed, Chroma's approximator are reached by their original
# names only).
NOT_BY_PATH = ("time_guidance_embed.", "double_stream_modulation_", "single_stream_modulation.",
               "distilled_guidance_layer.")
# Families whose diffusers paths ComfyUI's key map takes none of: Lumina 2 (its branch maps Z-Image's spellings,
# comfy/utils.py z_image_to_diffusers, none of them a Lumina2Transformer2DModel path)
NO_PATH_MAP = ("lumina2",)


def _swap(t: Tensor) -> Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def _group(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        name, leaf = key.rsplit(".", 1)
        if name.endswith((".lora_A", ".lora_B")):  # a LoRA in diffusers' layout: <x>.lora_A.weight
            name, leaf = name.rsplit(".", 1)
        out.setdefault(name, {})[leaf] = t.float()
    return out


def comfyui_transformer(model: nn.Module, family: str, sd: dict[str, Tensor], strength: float = 1.0) -> nn.Module:
    """A copy of the diffusers transformer `model` with ComfyUI's loading of the file `sd` applied (its
    `diffusion_model.` and `transformer.` keys; every one must be a name ComfyUI maps)."""
    originals = comfy_originals(family, model)
    by_path = {p: (o, start) for o, orig in originals.items() for p, start in _offsets(orig)}
    ref = copy.deepcopy(model)
    weights = {o: torch.cat([ref.get_submodule(p).weight[a:b] for p, a, b in orig.parts]).detach().clone()
               for o, orig in originals.items()}
    for name, tensors in _group({k: v for k, v in sd.items() if not k.startswith("text_encoders.")}).items():
        if name.startswith("diffusion_model."):
            o = name.removeprefix("diffusion_model.")
            head = _row_name(family, model, o)
            if head is not None:  # the LoKr on rows [0, n) of the original, as one weight of n rows
                o, n = head
                weights[o][:n] = consumer_weight(weights[o][:n].clone(), tensors, strength, comfyui_dora=True)
                continue
            assert o in originals, f"ComfyUI has no module {o}"
            weights[o] = consumer_weight(weights[o], tensors, strength, comfyui_dora=True)
            continue
        assert name.startswith("transformer.") and family not in NO_PATH_MAP, f"ComfyUI maps no key {name}"
        path = name.removeprefix("transformer.")
        assert path in by_path and not path.startswith(NOT_BY_PATH), f"ComfyUI's key map has no {name}"
        o, start = by_path[path]
        if originals[o].swapped:  # the whole weight, ΔW computed in diffusers' order and swapped
            weights[o] = consumer_weight(weights[o], tensors, strength, function=_swap, comfyui_dora=True)
        else:  # that Linear's rows of the original weight
            rows = _linear_rows(model, path)
            w = weights[o]
            w[start:start + rows] = consumer_weight(w[start:start + rows].clone(), tensors, strength, comfyui_dora=True)
    with torch.no_grad():
        for o, orig in originals.items():
            offset = 0
            for p, a, b in orig.parts:
                ref.get_submodule(p).weight[a:b] = weights[o][offset:offset + b - a]
                offset += b - a
    return ref


def _offsets(orig: Original) -> list[tuple[str, int]]:
    """(path, the row of the original where its Linear starts) for a multi-Linear original; 0 for one Linear."""
    out, offset = [], 0
    for p, a, b in orig.parts:
        if not any(q == p for q, _ in out):
            out.append((p, offset if not orig.swapped else 0))
        offset += b - a
    return out


def comfyui_text_encoder(model: nn.Module, comfy_name: str, sd: dict[str, Tensor], strength: float = 1.0,
                         wrapperless: bool = False) -> nn.Module:
    """A copy of a transformers text encoder with the file's `text_encoders.<comfy_name>.transformer.` modules
    applied (CLIP paths under `text_model.`; an LLM's under `model.`; `wrapperless`: also the names without
    `<comfy_name>.`)."""
    ref = copy.deepcopy(model)
    names = dict(ref.named_modules())
    prefixes = [f"text_encoders.{comfy_name}.transformer."] + (["text_encoders.transformer."] if wrapperless else [])
    with torch.no_grad():
        for name, tensors in _group(sd).items():
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            if prefix is None:
                continue
            path = name.removeprefix(prefix)
            candidates = [path, path.removeprefix("text_model."), path.removeprefix("model."), "model." + path]
            module = next(names[c] for c in candidates if c in names)
            module.weight.copy_(consumer_weight(module.weight, tensors, strength, comfyui_dora=True))
    return ref

