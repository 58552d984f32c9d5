"""A tiny SD1.x / SDXL pipeline holding a random LoKr adapter of every factor kind (low-rank, both full, Tucker,
DoRA on both axes), the outputs it computes, and their comparison: the source of truth that tests/helpers/writers.py
writes in each layout and the loaders must give back."""

from __future__ import annotations

import torch

from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers
from lokr_diffusers.tiny import make_sd_pipeline, make_sdxl_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def tiny_pipe(sdxl: bool, seed: int = 0):
    return make_sdxl_pipeline(seed) if sdxl else make_sd_pipeline(seed)


def source_pipeline(sdxl: bool, adapter: str = "src", seed: int = 1):
    """A tiny pipeline with a random LoKr adapter covering every factor kind, DoRA on a few layers."""
    pipe = tiny_pipe(sdxl)
    unet = LoKrConfig(r=1, alpha=2.0, target_modules=UNET_TARGETS, use_effective_conv2d=True, init_weights=False,
                      rank_pattern={"ff.net.2": 16, r"attn2\.to_k": 1}, alpha_pattern={"to_v": 0.5})
    te = LoKrConfig(r=1, alpha=1.5, init_weights=False, decompose_both=True, rank_pattern={"fc2": 16})
    configs = {"unet": unet, "text_encoder": te} | ({"text_encoder_2": te} if sdxl else {})
    add_lokr(pipe, configs, adapter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for comp in configs:
            for i, (_, layer) in enumerate(lokr_layers(getattr(pipe, comp))):
                for t in layer.factors(adapter).values():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
                if i % 7 == 3:  # DoRA, on the output axis and (every other one) the input axis
                    w = layer.weight.detach()
                    norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1)) if i % 14 == 3 else \
                        w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
                    layer.set_adapter_tensors(adapter, layer.factors(adapter), layer.scaling[adapter],
                                              dora_scale=norm * 1.3)
    return pipe


def outputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    dt = pipe.unet.dtype
    x = torch.randn(2, 4, 16, 16, generator=g).to(dt)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dt)
    ids = pipe.tokenizer(["a photo of a cat", "red dog"], padding="max_length", return_tensors="pt").input_ids
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g).to(dt),
                                   "time_ids": torch.randn(2, 6, generator=g).to(dt)}} if sdxl else {}
    with torch.no_grad():
        out = {"unet": pipe.unet(x, torch.tensor([10, 500]), ctx, **extra).sample,
               "text_encoder": pipe.text_encoder(ids)[0]}
        if sdxl:
            out["text_encoder_2"] = pipe.text_encoder_2(ids)[0]
    return out


def assert_outputs(a: dict, b: dict, atol: float = 1e-5) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
