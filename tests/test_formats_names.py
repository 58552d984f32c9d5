"""Key coverage on full-size architectures (built on the meta device: no memory, no time).

For SD1.5, SD2.1 and SDXL, a file naming every Linear / Conv1d / Conv2d of the UNet and text
encoder(s) in each layout (names written by tests/writers.py from docs/formats.md §Key layouts) must map 100% of
its modules, each to the module it names.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from writers import LAYOUTS, module_name

from lokr_diffusers.formats.names import ModuleRef, build_index, iter_adaptable

SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
OPENCLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280)


def _components(base: str) -> dict[str, nn.Module]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}[base])
        if base == "sdxl":
            return {"unet": unet, "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_G))}
        te = CLIPTextModel(CLIPTextConfig(**(CLIP_L if base == "sd15" else OPENCLIP_H)))
        return {"unet": unet, "text_encoder": te}


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def full_size(request: pytest.FixtureRequest) -> tuple[str, dict[str, nn.Module]]:
    return request.param, _components(request.param)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_module_of_a_full_size_file_maps(full_size, layout: str) -> None:
    base, comps = full_size
    index = build_index(comps)
    sdxl = base == "sdxl"
    named, total = 0, 0
    for component, model in comps.items():
        modules = dict(iter_adaptable(model))
        assert len(modules) == sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())
        total += len(modules)
        for path in modules:
            name = module_name(layout, component, path, comps["unet"].config, sdxl)
            if name is None:  # only SimpleTuner's layout lacks names, and only for text encoders
                assert layout == "lycoris" and component != "unet", (layout, path)
                continue
            assert index.lookup(name) is not None, name
            assert index.lookup(name)[1] == ModuleRef(component, path), name
            named += 1
    unet_modules = len(dict(iter_adaptable(comps["unet"])))
    assert named == (unet_modules if layout == "lycoris" else total)  # 100% of what the file names
    assert not index.ambiguous


def test_module_counts_are_the_real_ones() -> None:
    comps = _components("sd15")
    counts = {c: len(dict(iter_adaptable(m))) for c, m in comps.items()}
    assert counts == {c: sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in comps[c].modules()) for c in comps}
    assert counts["text_encoder"] == 12 * 6
