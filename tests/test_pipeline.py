"""On tiny offline SD1.x / SDXL pipelines: the issue's seed example verbatim, and add_lokr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lokr_diffusers import LoKrConfig, LoKrModel, add_lokr, lokr_layers


def _run(pipe, prompt: str = "a photo of a cat") -> np.ndarray:
    """Final latents of a 2-step run (the VAE decode adds nothing to what these tests check)."""
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="latent").images.numpy()


def _randomise(module: torch.nn.Module, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lokr_layers(module):
            for t in (t for a in layer.plans for t in layer.factors(a).values()):
                t.copy_(torch.randn(t.shape, generator=g) * std)


def test_seed_example_verbatim(tiny_sd_dir: str) -> None:
    local_dir = tiny_sd_dir
    # ---- the example, as written ----
    config_te = LoKrConfig(r=8, lora_alpha=32, target_modules=["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"],
                           rank_dropout=0.0, module_dropout=0.0, init_weights=True)
    config_unet = LoKrConfig(r=8, lora_alpha=32, target_modules=["proj_in", "proj_out", "to_k", "to_q", "to_v",
                             "to_out.0", "ff.net.0.proj", "ff.net.2"], rank_dropout=0.0, module_dropout=0.0,
                             init_weights=True, use_effective_conv2d=True)
    pipe = StableDiffusionPipeline.from_pretrained(local_dir)
    before = _run(pipe)
    pipe.text_encoder = LoKrModel(pipe.text_encoder, config_te, "default")
    pipe.unet = LoKrModel(pipe.unet, config_unet, "default")
    image = pipe("a photo of a cat", num_inference_steps=2).images[0]
    # ---- checks ----
    assert image.size == (64, 64)
    assert np.array_equal(_run(pipe), before)  # init_weights=True: ΔW = 0
    assert len(list(lokr_layers(pipe.unet))) > 0 and len(list(lokr_layers(pipe.text_encoder))) == 12
    _randomise(pipe.unet)
    after_unet = _run(pipe)
    assert np.abs(after_unet - before).max() > 1e-3
    _randomise(pipe.text_encoder)
    assert np.abs(_run(pipe) - after_unet).max() > 1e-3


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_add_lokr_separate_configs(tiny_sd_dir: str, tiny_sdxl_dir: str, sdxl: bool) -> None:
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_sdxl_dir if sdxl else tiny_sd_dir)
    before = _run(pipe)
    unet_cfg = LoKrConfig(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                          use_effective_conv2d=True, init_weights=False)
    te_cfg = LoKrConfig(r=2, alpha=1, init_weights=False)
    configs = {"unet": unet_cfg, "text_encoder": te_cfg}
    if sdxl:
        configs["text_encoder_2"] = te_cfg
    adapted = add_lokr(pipe, configs, adapter_name="style")
    assert set(adapted) == set(configs)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # adapted in place, class kept
    unet_layers = dict(lokr_layers(pipe.unet))
    tucker = [n for n, la in unet_layers.items() if la.plans["style"].tucker]
    assert tucker and all(n.endswith(("conv1", "conv2")) for n in tucker)
    te_layers = dict(lokr_layers(pipe.text_encoder))
    assert all(la.r["style"] == 2 for la in te_layers.values())
    assert all(la.r["style"] == 4 for la in unet_layers.values())
    assert np.abs(_run(pipe) - before).max() > 1e-3


def test_add_lokr_is_atomic(tiny_sdxl_dir: str) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    before = _run(pipe)
    modules_before = [(n, type(m)) for n, m in pipe.unet.named_modules()]
    flags_before = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    good, good_te = LoKrConfig(target_modules=["to_q"]), LoKrConfig(target_modules=["q_proj"])
    bad = LoKrConfig(target_modules=["q_proj", "no_such_layer"])
    with pytest.raises(ValueError, match="no_such_layer"):
        add_lokr(pipe, {"unet": good, "text_encoder": good_te, "text_encoder_2": bad})
    with pytest.raises(ValueError, match="got 'vae'"):
        add_lokr(pipe, {"unet": good, "vae": good})
    assert [(n, type(m)) for n, m in pipe.unet.named_modules()] == modules_before
    assert all(p.requires_grad == flags_before[n] for n, p in pipe.unet.named_parameters())
    assert not list(lokr_layers(pipe.text_encoder)) and not list(lokr_layers(pipe.text_encoder_2))
    assert np.array_equal(_run(pipe), before)
