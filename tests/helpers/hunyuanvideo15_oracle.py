"""The oracle for HunyuanVideo 1.5's original names: diffusers 0.42.1 has no single-file converter for
HunyuanVideo15Transformer3DModel, so this is the hand table of its Linears read off diffusers' repository script
scripts/convert_hunyuan_video1_5_to_diffusers.py (huggingface/diffusers @ 38c42b4d,
convert_hyvideo15_transformer_to_diffusers), written apart from the package, and a converter of an original
checkpoint's Linear weights that applies it (the script's own pops of norms, embeddings and the Conv3d left out).
"""

from __future__ import annotations

import torch
from torch import Tensor

# (original, diffusers) renames outside the blocks, in the script's order (its steps 1-4, 6, 7, 11)
TOP: list[tuple[str, str]] = [
    ("time_in.mlp.0", "time_embed.timestep_embedder.linear_1"),  # 1.
    ("time_in.mlp.2", "time_embed.timestep_embedder.linear_2"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),  # 2.
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),  # 3.
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),  # 4.
    ("byt5_in.fc1", "context_embedder_2.linear_1"),  # 6.
    ("byt5_in.fc2", "context_embedder_2.linear_2"),
    ("byt5_in.fc3", "context_embedder_2.linear_3"),
    ("vision_in.proj.1", "image_embedder.linear_1"),  # 7.
    ("vision_in.proj.3", "image_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),  # 11.
]
# 5. txt_in.individual_token_refiner.blocks.{i} -> context_embedder.token_refiner.refiner_blocks.{i}
REFINER: list[tuple[str, str]] = [
    ("self_attn_proj", "attn.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.1", "norm_out.linear"),  # not swapped
]
REFINER_QKV = ("self_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"])  # torch.chunk(3) of the rows
# 10. double_blocks.{i} -> transformer_blocks.{i}: every Linear a rename (q, k, v apart)
DOUBLE: list[tuple[str, str]] = [
    ("img_mod.linear", "norm1.linear"), ("txt_mod.linear", "norm1_context.linear"),
    ("img_attn_q", "attn.to_q"), ("img_attn_k", "attn.to_k"), ("img_attn_v", "attn.to_v"),
    ("img_attn_proj", "attn.to_out.0"),
    ("txt_attn_q", "attn.add_q_proj"), ("txt_attn_k", "attn.add_k_proj"), ("txt_attn_v", "attn.add_v_proj"),
    ("txt_attn_proj", "attn.to_add_out"),
    ("img_mlp.fc1", "ff.net.0.proj"), ("img_mlp.fc2", "ff.net.2"),
    ("txt_mlp.fc1", "ff_context.net.0.proj"), ("txt_mlp.fc2", "ff_context.net.2"),
]
FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # 11. swap_scale_shift: (shift, scale) halves


def _count(ckpt: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in ckpt if k.startswith(prefix)})


def convert_hyvideo15_linears(ckpt: dict[str, Tensor]) -> dict[str, Tensor]:
    """The script's conversion of the Linears' weights and biases of an original checkpoint (the script fixes 54
    double and 2 refiner blocks; here they are counted from the keys, so tiny models convert too)."""
    src: dict[str, Tensor | None] = dict(ckpt)
    out: dict[str, Tensor | None] = {}
    for suffix in ("weight", "bias"):
        if suffix == "bias":  # a Linear without a bias has none to move
            src.update({k.replace(".weight", ".bias"): None for k in ckpt if k.endswith(".weight")
                        and k.replace(".weight", ".bias") not in src})
        pairs = list(TOP)
        for i in range(_count(src, "txt_in.individual_token_refiner.blocks.")):
            o, d = f"txt_in.individual_token_refiner.blocks.{i}.", f"context_embedder.token_refiner.refiner_blocks.{i}."
            pairs += [(o + a, d + b) for a, b in REFINER]
            qkv = src.pop(f"{o}{REFINER_QKV[0]}.{suffix}")
            for name, part in zip(REFINER_QKV[1], torch.chunk(qkv, 3, dim=0) if qkv is not None else [None] * 3,
                                  strict=True):
                out[f"{d}{name}.{suffix}"] = part
        for i in range(_count(src, "double_blocks.")):
            pairs += [(f"double_blocks.{i}.{a}", f"transformer_blocks.{i}.{b}") for a, b in DOUBLE]
        for o, d in pairs:
            out[f"{d}.{suffix}"] = src.pop(f"{o}.{suffix}")
        adaln = src.pop(f"{FINAL_ADALN[0]}.{suffix}")
        if adaln is not None:
            shift, scale = adaln.chunk(2, dim=0)
            out[f"{FINAL_ADALN[1]}.{suffix}"] = torch.cat([scale, shift], dim=0)
    assert not src, f"keys the script does not read: {sorted(src)[:5]}"
    return {k: v for k, v in out.items() if v is not None}
