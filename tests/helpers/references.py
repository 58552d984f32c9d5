"""Independent references for tests: the consumers' (ComfyUI / A1111) LoKr rule and a LoRA's delta,
written from the formulas (docs/formats.md), never from the package's own code."""

from __future__ import annotations

from collections.abc import Callable

import torch


def consumer_weight(w: torch.Tensor, tensors: dict[str, torch.Tensor], strength: float,
                    function: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    comfyui_dora: bool = False) -> torch.Tensor:
    """ComfyUI / A1111 rule from docs/formats.md §The math, §Scale rules, §DoRA, written out
    independently: scale = alpha / rank when an alpha exists and a factor is low-rank (rank from w2_b, else
    w1_b), else 1. DoRA normalises w + ΔW per row or column (LyCORIS' rule, which our reader applies to files
    without the lokr_dora_rule mark); `comfyui_dora`: ComfyUI's own, whose output axis divides by the norm of
    w itself. `function` (ComfyUI's key-map function, e.g. a (shift, scale) swap) maps ΔW, computed in the
    shape of w, before it is added (DoRA then normalises w + function(ΔW))."""
    if "lora_B" in tensors:  # a LoRA in diffusers' layout: ComfyUI reads `<x>.alpha` if the file has one, else 1
        down, up = tensors["lora_A"], tensors["lora_B"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else None
        dw = lora_delta(down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1), alpha).reshape(w.shape)
        return w + strength * (function(dw) if function is not None else dw)
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    out_k, in_n = w.shape[0] // w1.shape[0], w.shape[1] // w1.shape[1]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"].reshape(out_k, in_n, *w.shape[2:])
    elif "lokr_t2" in tensors:
        w2 = torch.einsum("ijkl,ip,jq->pqkl", tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    else:
        w2 = (tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]).reshape(out_k, in_n, *w.shape[2:])
    rank = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else \
        tensors["lokr_w1_b"].shape[0] if "lokr_w1_b" in tensors else None
    scale = float(tensors["alpha"]) / rank if "alpha" in tensors and rank else 1.0
    dw = torch.einsum("ij,pq...->ipjq...", w1, w2).reshape(w.shape) * scale
    dw = function(dw) if function is not None else dw
    if "dora_scale" not in tensors:
        return w + strength * dw
    m, merged = tensors["dora_scale"], w + dw
    if m.shape[0] == w.shape[0] and m.numel() == w.shape[0]:
        norm = (w if comfyui_dora else merged).reshape(w.shape[0], -1).norm(dim=1).reshape(m.shape)
    else:
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(m.shape)
    adapted = merged * m / (norm + torch.finfo(w.dtype).eps)
    return w + strength * (adapted - w)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """kohya LoRA: ΔW = (alpha / rank) · up @ down (linear layers)."""
    rank = down.shape[0]
    return (up @ down) * ((alpha / rank) if alpha is not None else 1.0)


def fused_consumer_weights(blocks: list[torch.Tensor], tensors: dict[str, torch.Tensor],
                           strength: float) -> list[torch.Tensor]:
    """ComfyUI's rule for a LoKr on an original (BFL / Stability / Tongyi) fused module, e.g. Flux's
    `img_attn.qkv`: the original weight is the row blocks of diffusers' modules stacked in the original's
    order; ComfyUI applies the adapter to that whole weight (ΔW = scale · kron(W1, W2) of its full height,
    DoRA normalising the whole weight); the result is cut back into the same row blocks."""
    fused = consumer_weight(torch.cat(blocks), tensors, strength)
    return list(torch.split(fused, [b.shape[0] for b in blocks]))
