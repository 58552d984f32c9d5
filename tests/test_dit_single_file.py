"""formats/dit_state.py: a DiT transformer's whole state under its original keys, read back by the converter
diffusers' `from_single_file` runs for the class (SINGLE_FILE_LOADABLE_CLASSES) to exactly the diffusers state.

Full size on the meta device with fingerprints (each tensor a column of distinct numbers: the converters only rename,
cut and reorder rows, so the numbers show where every row went); tiny models with their real weights."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from helpers.dit_models import tiny
from helpers.fullsize_dit import NAMES, meta_transformer
from torch import Tensor, nn

from lokr_diffusers import families
from lokr_diffusers.formats.dit_state import original_plan, original_state_dict


def _writes_single_file(model: nn.Module) -> bool:
    family = families.of_model(model)
    return bool(family and family.originals and family.originals.single_file)


FULL = [n for n in NAMES if _writes_single_file(meta_transformer(n))]
TINY = ["sd3", "flux2", "zimage", "wan", "ltxvideo", "ltx2", "qwenimage", "qwenimage21", "hidream"]


def read_back(model: nn.Module, original: dict[str, Tensor]) -> dict[str, Tensor]:
    """What diffusers' from_single_file makes of the original-layout state: the class's registered converter."""
    convert = SINGLE_FILE_LOADABLE_CLASSES[type(model).__name__]["checkpoint_mapping_fn"]
    return convert(checkpoint=dict(original), config=dict(model.config))


def fingerprints(model: nn.Module) -> dict[str, Tensor]:
    """Every state key of `model` as a column of distinct numbers: shape[0] rows (one number for a 0-d tensor)."""
    out: dict[str, Tensor] = {}
    n = 0
    for key, value in model.state_dict().items():
        rows = value.shape[0] if value.dim() else 1
        column = torch.arange(n, n + rows, dtype=torch.float64)
        out[key] = column[:, None] if value.dim() >= 2 else column if value.dim() else column[0]
        n += rows
    return out


def check_round_trip(model: nn.Module, state: dict[str, Tensor]) -> None:
    original = original_state_dict(model, state)
    back = read_back(model, original)
    assert sorted(back) == sorted(state), (sorted(set(state) - set(back))[:5], sorted(set(back) - set(state))[:5])
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    # nothing written twice or left for the converter to drop
    assert sum(t.numel() for t in original.values()) == sum(t.numel() for t in state.values())


@pytest.mark.parametrize("name", FULL)
def test_full_size_state_reads_back_through_diffusers_converter(name: str) -> None:
    model = meta_transformer(name)
    check_round_trip(model, fingerprints(model))


def test_the_families_with_a_single_file_layout() -> None:
    """The ones diffusers' from_single_file reads; HunyuanVideo 1.5 (diffusers has no converter for it) is refused."""
    assert {families.of_model(meta_transformer(n)).name for n in FULL} >= {  # type: ignore[union-attr]
        "flux", "sd3", "flux2", "zimage", "wan", "ltxvideo", "ltx2", "qwenimage", "hidream", "chroma", "lumina2",
        "hunyuanvideo"}
    with pytest.raises(ValueError, match="no original single-file layout"):
        original_plan(meta_transformer("hunyuanvideo-1.5"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_weights_read_back_exactly(name: str) -> None:
    model = tiny(name)
    check_round_trip(model, {k: v.detach() for k, v in model.state_dict().items()})


def test_flux_original_keys_are_bfl_names() -> None:
    """Spot names from BFL's flux1-dev.safetensors layout (ComfyUI's loader reads these)."""
    model = tiny("flux")
    original = original_state_dict(model)
    for key in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_attn.norm.key_norm.scale",
                "single_blocks.0.linear1.bias", "single_blocks.1.norm.query_norm.scale",
                "final_layer.adaLN_modulation.1.weight", "guidance_in.out_layer.weight", "img_in.weight"):
        assert key in original, key
    d = model.config.num_attention_heads * model.config.attention_head_dim
    qkv = original["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(qkv[d:2 * d], model.transformer_blocks[0].attn.to_k.weight)
    shift_scale = original["final_layer.adaLN_modulation.1.weight"]  # diffusers keeps (scale, shift)
    assert torch.equal(shift_scale[:d], model.norm_out.linear.weight[d:])


def test_a_fused_model_is_refused() -> None:
    model = tiny("flux")
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="to_qkv"):
        original_plan(model)
