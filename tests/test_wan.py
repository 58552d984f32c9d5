"""Wan: after diffusers' fuse_qkv_projections(), names of the separate q / k / v are refused. Wan 2.2 A14B's two
experts (`transformer`, high noise; `transformer_2`, low noise): a file per expert, loaded into the second with
load_into_transformer_2=True (diffusers' WanLoraLoaderMixin rule), through load_lokr_weights and diffusers' own
load_lora_weights; the adapter API acts on both. Oracle: ComfyUI's rule on each expert's original weights
(tests/helpers/dit_files.py, by hand from convert_wan_transformer_to_diffusers), never the package."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from helpers.dit_files import assert_close, bare_pipeline, comfyui_model, original_file
from helpers.dit_models import inputs
from helpers.tiny_video import make_wan_pipeline
from torch import nn

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_t2v(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():  # the tiny experts are text-to-video: no image tokens
        return model(**{**inputs("wan"), "encoder_hidden_states_image": None}, return_dict=False)[0]


@functools.cache
def _files() -> tuple[Any, Any, Any]:
    pipe = make_wan_pipeline(0, experts=2)
    high, low = pipe.transformer, pipe.transformer_2
    return pipe, original_file(high, "wan", "comfyui", seed=1), original_file(low, "wan", "kohya", seed=2)


def fresh() -> tuple[Any, nn.Module, nn.Module]:
    pipe = copy.deepcopy(_files()[0])
    return pipe, copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.transformer_2)


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("method", ["load_lokr_weights", "load_lora_weights"])
def test_one_file_per_expert(method: str) -> None:
    pipe, high, low = fresh()
    _, (sd_high, m_high), (sd_low, m_low) = _files()
    getattr(pipe, method)(sd_high, adapter_name="high")
    assert same(pipe.transformer_2, low)  # the first expert's file leaves the second alone
    getattr(pipe, method)(sd_low, adapter_name="low", load_into_transformer_2=True)
    assert_close(run_t2v(pipe.transformer), run_t2v(comfyui_model(high, "wan", m_high)))
    assert_close(run_t2v(pipe.transformer_2), run_t2v(comfyui_model(low, "wan", m_low)))
    assert pipe.get_list_lokr_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}


def test_the_adapter_api_acts_on_both_experts() -> None:
    pipe, high, low = fresh()
    _, (sd_high, m_high), (sd_low, m_low) = _files()
    pipe.load_lokr_weights(sd_high, adapter_name="high")
    pipe.load_lokr_weights(sd_low, adapter_name="low", load_into_transformer_2=True)
    pipe.set_adapters(["high", "low"], adapter_weights=[0.5, 0.25])  # diffusers' own method
    want_high, want_low = comfyui_model(high, "wan", m_high, 0.5), comfyui_model(low, "wan", m_low, 0.25)
    assert_close(run_t2v(pipe.transformer), run_t2v(want_high))
    assert_close(run_t2v(pipe.transformer_2), run_t2v(want_low))
    pipe.fuse_lora()
    assert_close(run_t2v(pipe.transformer), run_t2v(want_high))
    assert_close(run_t2v(pipe.transformer_2), run_t2v(want_low))
    pipe.unfuse_lora()
    pipe.disable_lora()
    assert_close(run_t2v(pipe.transformer_2), run_t2v(low))
    pipe.enable_lora()
    pipe.delete_adapters("low")
    assert pipe.get_list_lokr_adapters() == {"transformer": ["high"]}
    pipe.unload_lora_weights()
    assert same(pipe.transformer, high) and same(pipe.transformer_2, low)


def test_the_pipeline_runs_each_expert_with_its_adapter() -> None:
    """Two steps: the first runs `transformer`, the second `transformer_2` (boundary_ratio 0.875)."""
    pipe, high, low = fresh()
    _, (sd_high, m_high), (sd_low, m_low) = _files()
    pipe.load_lora_weights(sd_high, adapter_name="high")
    pipe.load_lora_weights(sd_low, adapter_name="low", load_into_transformer_2=True)
    ref = copy.deepcopy(_files()[0])
    ref.transformer, ref.transformer_2 = comfyui_model(high, "wan", m_high), comfyui_model(low, "wan", m_low)

    def frames(p: Any) -> torch.Tensor:
        return p("a cat", num_inference_steps=2, height=16, width=16, num_frames=1, guidance_scale=1.0,
                 output_type="pt", max_sequence_length=16, generator=torch.Generator().manual_seed(0)).frames

    only_high = copy.deepcopy(ref)
    only_high.transformer_2 = low
    assert not torch.allclose(frames(ref), frames(only_high))  # the second step does run the second expert
    assert_close(frames(pipe), frames(ref))


def test_a_second_expert_that_is_not_there_is_named() -> None:
    pipe = make_wan_pipeline(0)
    sd, _ = original_file(pipe.transformer, "wan", "comfyui")
    before = copy.deepcopy(pipe.transformer)
    with pytest.raises(ValueError, match="load_into_transformer_2=True, but WanPipeline has no transformer_2"):
        pipe.load_lokr_weights(sd, load_into_transformer_2=True)
    assert same(pipe.transformer, before) and not pipe.get_list_lokr_adapters()


def test_a_name_in_use_on_the_other_expert_is_refused() -> None:
    pipe, _, low = fresh()
    _, (sd_high, _), (sd_low, _) = _files()
    pipe.load_lokr_weights(sd_high, adapter_name="a")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lokr_weights(sd_low, adapter_name="a", load_into_transformer_2=True)
    assert same(pipe.transformer_2, low)
    assert pipe.load_lokr_weights(sd_low, load_into_transformer_2=True) != "a"  # a default name not in use


def test_names_of_fused_away_projections_are_refused() -> None:
    """After fuse_qkv_projections() Wan's attention calls attn1.to_qkv, attn2.to_kv and attn2.to_added_kv only; a
    file's separate q / k / v LoKr cannot be one adapter of those: refused, nothing loaded (loading it before
    fusing works, as diffusers' own LoRA loading)."""
    pipe = bare_pipeline("wan")
    sd, _ = original_file(pipe.transformer, "wan", "kohya", seed=60)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        pipe.load_lokr_weights(sd)
    assert not pipe.get_list_lokr_adapters()
    only_ffn = {k: v for k, v in sd.items() if "_ffn_" in k or "_head_" in k}
    assert only_ffn and pipe.load_lokr_weights(only_ffn)  # modules the fused attention leaves alone load


def test_cli_turns_a_simpletuner_wan_file_into_one_comfyui_loads(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """SimpleTuner writes LyCORIS' `lycoris_<diffusers path>` names, which ComfyUI's key map does not take for Wan:
    `lokr-diffusers convert --to comfyui` writes the original names, and ComfyUI's rule on them gives LyCORIS'
    own outputs. The tiny model stands in for the full-size ones convert reads the file onto."""
    import logging

    from helpers.comfyui_dit import comfyui_transformer
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import load_file

    from lokr_diffusers.cli import main
    from lokr_diffusers.components import pipeline_components

    pipe = bare_pipeline("wan")
    monkeypatch.setattr("lokr_diffusers.convert.meta_components", lambda _: pipeline_components(pipe))
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    monkeypatch.setattr(LycorisNetwork, "TARGET_REPLACE_MODULE", ["WanTransformerBlock"])
    model = copy.deepcopy(pipe.transformer)
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lokr", factor=4)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    want = run_i2v(model)
    src, dst = str(tmp_path / "simpletuner.safetensors"), str(tmp_path / "comfyui.safetensors")
    net.save_weights(src, torch.float32, {})
    assert main(["convert", src, dst, "--to", "comfyui", "--base", "wan"]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    sd = load_file(dst)
    assert {k.rsplit(".", 1)[0] for k in sd} >= {"diffusion_model.blocks.0.self_attn.q",
                                                  "diffusion_model.blocks.1.cross_attn.k_img",
                                                  "diffusion_model.blocks.1.ffn.0"}
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert_close(run_i2v(comfyui_transformer(pipe.transformer, "wan", sd)), want)


def run_i2v(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs("wan"), return_dict=False)[0]


def test_musubi_tuners_lokr_factor_tensor_is_read_past() -> None:
    """musubi-tuner writes `lora_unet_blocks_0_self_attn_q.lokr_w1` ... and one module-less `lokr_factor` tensor."""
    pipe = bare_pipeline("wan")
    base = copy.deepcopy(pipe.transformer)
    sd, modules = original_file(base, "wan", "kohya", seed=7)
    pipe.load_lokr_weights({**sd, "lokr_factor": torch.tensor(4)})
    assert_close(run_i2v(pipe.transformer), run_i2v(comfyui_model(base, "wan", modules)))
    with pytest.raises(ValueError, match="lokr_factr"):  # any other stray key is still reported
        pipe.load_lokr_weights({**sd, "lokr_factr": torch.tensor(4)})


def test_add_lokr_defaults_on_both_experts_and_the_text_encoder() -> None:
    """Default targets, counted from the tiny configs: each expert's 2 blocks x (self-attention q, k, v, out;
    cross-attention q, k, v, out; ffn x 2); UMT5's 2 blocks x (q, k, v, o, wi_0, wi_1, wo), as kohya targets T5."""
    from lokr_diffusers import LoKrConfig, add_lokr

    pipe, _, _ = fresh()
    cfg = LoKrConfig(r=2, alpha=2, init_weights=False)
    adapted = add_lokr(pipe, {c: cfg for c in ("transformer", "transformer_2", "text_encoder")}, adapter_name="x")
    assert {c: len(p) for c, p in adapted.items()} == {"transformer": 20, "transformer_2": 20, "text_encoder": 14}
    assert adapted["transformer"] == adapted["transformer_2"]
    assert {p.rsplit(".", 1)[1] for p in adapted["text_encoder"]} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}


def test_default_targets_after_fusing_are_what_the_attention_calls() -> None:
    from lokr_diffusers.targeting import dit_target_modules

    model = copy.deepcopy(bare_pipeline("wan").transformer)
    model.fuse_qkv_projections()
    targets = set(dit_target_modules(model))
    assert {"blocks.0.attn1.to_qkv", "blocks.0.attn2.to_kv", "blocks.0.attn2.to_added_kv", "blocks.0.attn2.to_q"} \
        <= targets
    assert not {"blocks.0.attn1.to_q", "blocks.0.attn2.to_k", "blocks.0.attn2.add_v_proj"} & targets
