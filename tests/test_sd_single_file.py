"""formats/sd_single.py: the VAE and the OpenCLIP text encoders of an SD single-file checkpoint, read back by the
converters diffusers' from_single_file runs (convert_ldm_vae_checkpoint, convert_open_clip_checkpoint) to exactly the
diffusers weights, on the tiny SD1.x / SD2.x / SDXL pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
from torch import nn

from lokr_diffusers import families
from lokr_diffusers.formats.sd_single import (
    SD2_OPEN_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    VAE_PREFIX,
    open_clip_state,
    vae_state,
)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_vae_reads_back_through_diffusers_converter(family: str) -> None:
    vae = families.build_tiny(family).vae
    original = vae_state(vae)
    assert all(k.startswith(VAE_PREFIX) for k in original)
    assert any(".mid.attn_1.q.weight" in k and v.dim() == 4 for k, v in original.items())  # the original's 1x1 conv
    back = convert_ldm_vae_checkpoint(dict(original), vae.config)
    want = _state(vae)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k


# SD2.x's text encoder is a CLIPTextModel as SD1's (no tiny SD2 pipeline: the SD1 one's encoder stands in for it)
@pytest.mark.parametrize(("family", "component", "prefix"), [("sd1", "text_encoder", SD2_OPEN_CLIP_PREFIX),
                                                             ("sdxl", "text_encoder_2", SDXL_OPEN_CLIP_PREFIX)])
def test_open_clip_reads_back_through_diffusers_converter(family: str, component: str, prefix: str) -> None:
    encoder = getattr(families.build_tiny(family), component)
    original = open_clip_state(encoder, prefix)
    assert prefix + "transformer.resblocks.0.attn.in_proj_weight" in original
    back = convert_open_clip_checkpoint(encoder, dict(original), prefix=prefix)
    # transformers 5's CLIPTextModel dropped the `text_model.` level the converter writes (diffusers' loader maps it)
    want = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in _state(encoder).items()}
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k
