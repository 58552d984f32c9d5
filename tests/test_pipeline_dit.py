"""The tiny DiT pipelines (tests/helpers/tiny_dit.py) with LoKr: add_lokr's defaults per component, and
text-encoder files in each tool's names (CLIP-L / CLIP-G / T5 / Qwen3) against ComfyUI's rule per module.

The expected names are written here from the tools' conventions (docs/formats.md §DiT models: kohya
sd-scripts lora_flux.py / lora_sd3.py, ComfyUI's model_lora_keys_clip), the module paths from the models'
own named_modules(); the expected weights from references.consumer_weight.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers.references import consumer_weight
from helpers.tiny_dit import make_tiny_dit_pipeline
from torch import Tensor, nn

import lokr_diffusers
from lokr_diffusers import LoKrConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)


def generate(pipe: Any) -> Tensor:
    out = pipe(prompt="a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.images


# (family, {component: number of modules adapted by default}) counted from the tiny configs: Flux.1 2 double
# blocks x 12 (q, k, v, out, add q/k/v, add out, ff x 2, ff_context x 2) + 2 single x 5 (q, k, v, proj_mlp,
# proj_out); CLIP 2 layers x 6; T5 2 blocks x 7 (q, k, v, o, wi_0, wi_1, wo); Qwen3 layers x 7.
@pytest.mark.parametrize(("family", "components"), [
    ("flux", {"transformer": 2 * 12 + 2 * 5, "text_encoder": 2 * 6, "text_encoder_2": 2 * 7}),
    ("sd3", {"transformer": None, "text_encoder": 2 * 6, "text_encoder_2": 2 * 6, "text_encoder_3": 2 * 7}),
    ("flux2", {"transformer": None, "text_encoder": None}),
    ("zimage", {"transformer": None, "text_encoder": 2 * 7}),
])
def test_add_lokr_with_defaults(family: str, components: dict[str, int | None]) -> None:
    pipe = make_tiny_dit_pipeline(family)  # type: ignore[arg-type]
    before = generate(pipe)
    cfg = LoKrConfig(r=2, alpha=2, init_weights=False)
    adapted = lokr_diffusers.add_lokr(pipe, {c: cfg for c in components}, adapter_name="x")
    for c, n in components.items():
        assert adapted[c], c
        if n is not None:
            assert len(adapted[c]) == n, (c, adapted[c])
    assert not any("lm_head" in p for p in adapted.get("text_encoder", []))
    after = generate(pipe)
    assert after.shape == before.shape and not torch.allclose(after, before)
    pipe.disable_lokr()
    assert torch.allclose(generate(pipe), before, atol=1e-6)


def test_norms_and_embedders_on_request() -> None:
    pipe = make_tiny_dit_pipeline("flux")
    from lokr_diffusers.targeting import dit_target_modules

    base = set(dit_target_modules(pipe.transformer))
    more = set(dit_target_modules(pipe.transformer, norms=True, embedders=True))
    assert base < more
    assert {"norm_out.linear", "x_embedder", "proj_out", "transformer_blocks.0.norm1.linear",
            "single_transformer_blocks.1.norm.linear", "time_text_embed.timestep_embedder.linear_1"} <= more - base
    assert "single_transformer_blocks.1.proj_out" in base


# --------------------------------------------------------------------------------------- text encoders
# (family, component, module path, file module name); several tools per encoder
TE_NAMES = [
    ("flux", "text_encoder", "encoder.layers.0.self_attn.q_proj",
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("flux", "text_encoder", "encoder.layers.1.mlp.fc2", "lora_te_text_model_encoder_layers_1_mlp_fc2"),
    ("flux", "text_encoder", "encoder.layers.1.mlp.fc1",
     "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1"),
    ("flux", "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q",
     "lora_te3_encoder_block_0_layer_0_SelfAttention_q"),
    ("flux", "text_encoder_2", "encoder.block.0.layer.1.DenseReluDense.wi_0",
     "lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_0"),  # OneTrainer's T5 prefix for Flux
    ("flux", "text_encoder_2", "encoder.block.1.layer.0.SelfAttention.o",
     "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.o"),
    ("flux", "text_encoder_2", "encoder.block.1.layer.1.DenseReluDense.wo",
     "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wo"),
    ("sd3", "text_encoder", "text_model.encoder.layers.0.self_attn.k_proj",
     "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"),
    ("sd3", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"),
    ("sd3", "text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj",
     "text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj"),
    ("sd3", "text_encoder_3", "encoder.block.0.layer.0.SelfAttention.v",
     "lora_te3_encoder_block_0_layer_0_SelfAttention_v"),
    ("sd3", "text_encoder_3", "encoder.block.1.layer.1.DenseReluDense.wi_1",
     "text_encoder_3.encoder.block.1.layer.1.DenseReluDense.wi_1"),
    ("zimage", "text_encoder", "layers.0.self_attn.q_proj", "lora_te_layers_0_self_attn_q_proj"),
    ("zimage", "text_encoder", "layers.1.mlp.down_proj",
     "text_encoders.qwen3_4b.transformer.model.layers.1.mlp.down_proj"),
    ("zimage", "text_encoder", "layers.1.self_attn.v_proj", "text_encoder.layers.1.self_attn.v_proj"),
    ("flux2", "text_encoder", "model.layers.0.mlp.gate_proj", "lora_te_layers_0_mlp_gate_proj"),
    ("flux2", "text_encoder", "model.layers.2.self_attn.o_proj",
     "text_encoders.transformer.model.layers.2.self_attn.o_proj"),
    ("flux2", "text_encoder", "model.layers.1.self_attn.k_proj", "text_encoder.model.layers.1.self_attn.k_proj"),
]


def te_output(te: nn.Module) -> Tensor:
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        return te(input_ids=ids)[0]


@pytest.mark.parametrize("family", ["flux", "sd3", "zimage", "flux2"])
def test_text_encoder_names_per_tool(family: str) -> None:
    pipe = make_tiny_dit_pipeline(family)  # type: ignore[arg-type]
    cases = [c for c in TE_NAMES if c[0] == family]
    refs = {c: copy.deepcopy(getattr(pipe, c)) for _, c, _, _ in cases}
    g = torch.Generator().manual_seed(1)
    sd: dict[str, Tensor] = {}
    for _, component, path, name in cases:
        m = getattr(pipe, component).get_submodule(path)
        out, in_ = m.weight.shape
        out_l, in_m = (2 if out % 2 == 0 else 1), (2 if in_ % 2 == 0 else 1)
        tensors = {"lokr_w1": torch.randn(out_l, in_m, generator=g),
                   "lokr_w2_a": torch.randn(out // out_l, 1, generator=g),
                   "lokr_w2_b": torch.randn(1, in_ // in_m, generator=g), "alpha": torch.tensor(0.5)}
        sd.update({f"{name}.{k}": v * 0.3 if k != "alpha" else v for k, v in tensors.items()})
        ref = refs[component].get_submodule(path)
        with torch.no_grad():
            ref.weight.copy_(consumer_weight(ref.weight, {k: sd[f"{name}.{k}"] for k in tensors}, 1.0))
    pipe.load_lokr_weights(sd)
    assert set(pipe.get_list_lokr_adapters()) == set(refs)
    for component, ref in refs.items():
        got, want = te_output(getattr(pipe, component)), te_output(ref)
        assert (got - want).abs().max() / want.abs().max() < 1e-5, component
