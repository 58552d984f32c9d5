"""pipe.load_lokr_weights & co. on tiny SD1.x / SDXL pipelines.

The source of truth is a pipeline holding LoKr adapters made with add_lokr (random factors, low-rank,
both-full, Tucker and DoRA layers); tests/helpers/writers.py writes them in each layout and the loaded
pipeline must compute what the source computes. Fused weights are checked against a reference of
the consumer rule written here from docs/formats.md §Scale rules, §DoRA.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from helpers.file_memory import zero_tensors_in_place
from helpers.references import consumer_weight as _consumer_weight
from helpers.sd_adapters import assert_outputs, outputs, source_pipeline, tiny_pipe
from helpers.writers import LAYOUTS, write_adapter
from safetensors.torch import save_file

import lokr_diffusers
from lokr_diffusers import lokr_layers
from lokr_diffusers.tiny import make_sd_pipeline


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sdxl"])
def source(request: pytest.FixtureRequest):
    pipe = source_pipeline(request.param)
    return request.param, pipe, outputs(pipe)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_to_the_same_outputs(source, layout: str) -> None:
    sdxl, src, expected = source
    state_dict = write_adapter(src, "src", layout)
    pipe = tiny_pipe(sdxl)
    base = outputs(pipe)
    name = pipe.load_lokr_weights(state_dict, adapter_name="x")
    got = outputs(pipe)
    if layout == "lycoris":  # SimpleTuner's names cover the UNet only
        expected = {k: (v if k == "unet" else base[k]) for k, v in expected.items()}
    assert_outputs(got, expected)
    assert name == "x" and (got["unet"] - base["unet"]).abs().max() > 1e-2
    n_modules = len({k.rsplit(".", 1)[0] for k in state_dict})
    assert sum(len(list(lokr_layers(m))) for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
               if m is not None) == n_modules


def test_path_folder_dict_and_load_lora_weights_agree(source, tmp_path) -> None:
    sdxl, src, expected = source
    state_dict = write_adapter(src, "src", "kohya")
    folder = tmp_path / "lokr"
    folder.mkdir()
    save_file(state_dict, folder / "style.safetensors")
    for arg, kwargs in [(str(folder / "style.safetensors"), {}), (str(folder), {}),
                        (str(tmp_path), {"weight_name": "style.safetensors", "subfolder": "lokr"}), (state_dict, {})]:
        pipe = tiny_pipe(sdxl)
        pipe.load_lokr_weights(arg, **kwargs)
        assert_outputs(outputs(pipe), expected)
    pipe = tiny_pipe(sdxl)
    pipe.load_lora_weights(str(folder / "style.safetensors"), adapter_name="via_lora")
    assert pipe.get_list_lokr_adapters()["unet"] == ["via_lora"]
    assert_outputs(outputs(pipe), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("entry", ["load_lokr_weights", "load_lora_weights"])
def test_a_loaded_adapter_keeps_no_view_of_its_file(source, layout: str, entry: str, tmp_path) -> None:
    """safetensors hands out tensors that map the file (tests/helpers/file_memory.py). A loaded adapter holds copies:
    rewriting the file in place afterwards changes nothing, and its numbers do not hang on where in the file
    each tensor starts."""
    sdxl, src, expected = source
    path = tmp_path / "style.safetensors"
    save_file(write_adapter(src, "src", layout), path)
    pipe = tiny_pipe(sdxl)
    getattr(pipe, entry)(str(path), adapter_name="style")
    assert pipe.get_list_lokr_adapters()["unet"] == ["style"]
    zero_tensors_in_place(path)
    got = outputs(pipe)
    if layout == "lycoris":  # SimpleTuner's names cover the UNet only
        got, expected = {"unet": got["unet"]}, {"unet": expected["unet"]}
    assert_outputs(got, expected)


def test_peft_saved_adapter_matches_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    pipe = make_sd_pipeline()
    unet = pipe.unet
    config = peft.LoKrConfig(r=2, alpha=3, target_modules=["to_q", "to_v", "conv1", "proj_in"], init_weights=False,
                             use_effective_conv2d=True, rank_pattern={"conv1": 1}, alpha_pattern={"to_v": 5})
    peft_unet = peft.get_peft_model(make_sd_pipeline().unet, config)
    peft_unet.save_pretrained(tmp_path / "peft_unet")
    assert (tmp_path / "peft_unet" / "adapter_config.json").exists()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = peft_unet(x, t, ctx).sample
        base = unet(x, t, ctx).sample
    pipe.load_lokr_weights(str(tmp_path / "peft_unet"), adapter_name="peft")
    with torch.no_grad():
        got = pipe.unet(x, t, ctx).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    assert list(pipe.get_list_lokr_adapters()) == ["unet"]


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_fused_weights_equal_the_consumer_rule(source, strength: float) -> None:
    sdxl, src, _ = source
    state_dict = write_adapter(src, "src", "kohya_ldm")
    pipe = tiny_pipe(sdxl)
    originals = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}
    pipe.load_lokr_weights(state_dict, adapter_name="x")
    pipe.fuse_lokr(lokr_scale=strength)
    checked = 0
    for comp in ("unet", "text_encoder"):
        model = getattr(pipe, comp)
        for path, layer in lokr_layers(model):
            file_tensors = {k: v for k, v in layer.adapter_tensors("x").items()}
            alpha = layer.alpha["x"] if not layer.plans["x"].both_full else None
            if alpha is not None:
                file_tensors["alpha"] = torch.tensor(alpha)
            w0 = originals[comp][path + ".weight"]
            torch.testing.assert_close(layer.weight, _consumer_weight(w0, file_tensors, strength), rtol=1e-5,
                                       atol=1e-6, msg=path)
            checked += 1
    assert checked > 20
    pipe.unfuse_lokr()
    pipe.unload_lokr_weights()
    for comp in ("unet", "text_encoder"):
        restored = getattr(pipe, comp).state_dict()
        assert restored.keys() == originals[comp].keys()
        assert all(torch.equal(restored[k], v) for k, v in originals[comp].items())  # bit for bit


def _file_tensors(layer, adapter: str) -> dict[str, torch.Tensor]:
    """What a consumer-rule file holds for this layer's adapter (alpha omitted when both are full)."""
    tensors = dict(layer.adapter_tensors(adapter))
    if not layer.plans[adapter].both_full:
        tensors["alpha"] = torch.tensor(layer.alpha[adapter])
    return tensors


def _reference(loaded, weights: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """Outputs of a fresh pipeline whose weights have the adapters applied one after the other, in
    the order of `weights`, each by the consumer rule (`_consumer_weight`, which for DoRA normalises
    the weight so far, as ComfyUI applies patches) at strength weights[a][component]."""
    fresh = make_sd_pipeline()
    with torch.no_grad():
        for comp in ("unet", "text_encoder"):
            for path, layer in lokr_layers(getattr(loaded, comp)):
                module = getattr(fresh, comp).get_submodule(path)
                for a, per_comp in weights.items():
                    if a in layer.plans:
                        w = module.weight.detach().clone()
                        module.weight.copy_(_consumer_weight(w, _file_tensors(layer, a), per_comp[comp]))
    return outputs(fresh)


def test_adapter_management() -> None:
    src_a, src_b = source_pipeline(False, "a", seed=1), source_pipeline(False, "b", seed=2)
    pipe = make_sd_pipeline()
    plain = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = outputs(pipe)
    pipe.load_lokr_weights(write_adapter(src_a, "a", "kohya"), adapter_name="a")
    pipe.load_lokr_weights(write_adapter(src_b, "b", "comfyui"))
    assert pipe.get_list_lokr_adapters() == {"unet": ["a", "default_1"], "text_encoder": ["a", "default_1"]}
    assert pipe.get_active_lokr_adapters() == ["a", "default_1"]
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lokr_weights(write_adapter(src_a, "a", "kohya"), adapter_name="a")
    one = {"unet": 1.0, "text_encoder": 1.0}
    assert_outputs(outputs(pipe), _reference(pipe, {"a": one, "default_1": one}))
    pipe.set_lokr_adapters("a")
    assert_outputs(outputs(pipe), outputs(src_a))
    mix = [0.5, {"unet": 1.0, "text_encoder": 0.0}]
    pipe.set_lokr_adapters(["a", "default_1"], adapter_weights=mix)
    assert_outputs(outputs(pipe), _reference(pipe, {"a": {"unet": 0.5, "text_encoder": 0.5},
                                                      "default_1": {"unet": 1.0, "text_encoder": 0.0}}))
    pipe.disable_lokr()
    assert_outputs(outputs(pipe), base, atol=0)
    pipe.enable_lokr()
    pipe.set_lokr_adapters(["a", "default_1"], adapter_weights=0.0)
    assert_outputs(outputs(pipe), base)
    pipe.set_lokr_adapters(["a", "default_1"])
    pipe.delete_lokr_adapters("a")
    assert pipe.get_list_lokr_adapters() == {"unet": ["default_1"], "text_encoder": ["default_1"]}
    assert_outputs(outputs(pipe), outputs(src_b))
    pipe.unload_lokr_weights()
    assert not pipe.get_list_lokr_adapters()
    assert pipe.unet.state_dict().keys() == plain.keys()
    assert all(torch.equal(v, plain[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(ValueError, match="unknown LoKr adapters"):
        pipe.set_lokr_adapters("a")


def _snapshot(pipe) -> dict:
    return {c: ([(n, type(m)) for n, m in getattr(pipe, c).named_modules()],
                {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}) for c in ("unet", "text_encoder")}


def _same(a: dict, b: dict) -> bool:
    return all(a[c][0] == b[c][0] and a[c][1].keys() == b[c][1].keys() and
               all(torch.equal(v, b[c][1][k]) for k, v in a[c][1].items()) for c in a)


def test_bad_files_leave_the_pipeline_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    src = source_pipeline(False)
    good = write_adapter(src, "src", "kohya")
    pipe = make_sd_pipeline()
    before = _snapshot(pipe)
    stray = {**good, "lora_unet_no_such_block_to_q.lokr_w1": torch.ones(2, 2),
             "lora_unet_no_such_block_to_q.lokr_w2": torch.ones(2, 2)}
    with pytest.raises(ValueError, match=r"2 of \d+ keys match no module.*no_such_block"):
        pipe.load_lokr_weights(stray)
    assert _same(before, _snapshot(pipe))
    key = next(k for k in good if k.endswith("lokr_w1"))
    for bad, message in [({**good, key: good[key][:, :1]}, "does not"),
                         ({**good, key: good[key] * float("nan")}, "NaN"),
                         ({**good, "lora_unet_conv_in.alpha": torch.tensor(1.0)},
                          "match no module"),
                         ({k: v for k, v in good.items() if not k.startswith(key.rsplit(".", 1)[0] + ".lokr_w2")},
                          "missing W2")]:
        with pytest.raises(ValueError, match=message):
            pipe.load_lokr_weights(bad)
        assert _same(before, _snapshot(pipe)), message
    with caplog.at_level(logging.WARNING):
        pipe.load_lokr_weights(stray, strict=False, adapter_name="partial")
    assert "no_such_block" in caplog.text
    assert_outputs(outputs(pipe), outputs(src))


def test_sdxl_file_into_sd1_says_so() -> None:
    sdxl_file = write_adapter(source_pipeline(True), "src", "kohya_ldm")
    with pytest.raises(ValueError, match="looks like an SDXL LoKr; the pipeline is"):
        _with_real_dims(make_sd_pipeline()).load_lokr_weights(sdxl_file)


def _with_real_dims(pipe):
    """The tiny UNet's cross-attention width says nothing about its base; pose as SD1.5."""
    pipe.unet.register_to_config(cross_attention_dim=768)
    return pipe


def _fold_in(target, loaded, adapter: str) -> None:
    """Add `adapter`'s weight change (consumer rule) into `target`'s base weights, wherever they sit
    (inside a PEFT LoRA wrapper too)."""
    from lokr_diffusers.formats.names import get_slot

    with torch.no_grad():
        for comp in ("unet", "text_encoder"):
            for path, layer in lokr_layers(getattr(loaded, comp)):
                if adapter in layer.plans:
                    parent, attr = get_slot(getattr(target, comp), path.replace(".base_layer", ""))
                    module = getattr(parent, attr)
                    w0 = module.weight.detach().clone()
                    module.weight += _consumer_weight(w0, _file_tensors(layer, adapter), 1.0) - w0


def test_mixed_lora_and_lokr_file_and_coexistence() -> None:
    pytest.importorskip("peft")
    lokr = write_adapter(source_pipeline(False), "src", "kohya", components=("unet",))
    g = torch.Generator().manual_seed(5)
    lora = {}
    for name, (i, o, k) in {"lora_unet_down_blocks_1_attentions_0_proj_out": (64, 64, (1, 1)),
                            "lora_te_text_model_encoder_layers_0_mlp_fc1": (32, 37, ())}.items():
        lora[f"{name}.lora_down.weight"] = torch.randn(2, i, *k, generator=g) * 0.3
        lora[f"{name}.lora_up.weight"] = torch.randn(o, 2, *k, generator=g) * 0.3
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    only_lora = make_sd_pipeline()
    only_lora.load_lora_weights(dict(lora), adapter_name="l")
    lora_out = outputs(only_lora)
    assert (lora_out["unet"] - outputs(make_sd_pipeline())["unet"]).abs().max() > 1e-3
    mixed = make_sd_pipeline()
    mixed.load_lokr_weights({**lokr, **lora}, adapter_name="m")
    _fold_in(only_lora, mixed, "m")  # the reference: LoRA by diffusers/PEFT on base + LoKr's ΔW
    expected = outputs(only_lora)
    assert_outputs(outputs(mixed), expected)
    for order in ("lora_first", "lokr_first"):
        pipe = make_sd_pipeline()
        steps = [lambda p: p.load_lora_weights(dict(lora), adapter_name="l"),
                 lambda p: p.load_lokr_weights(dict(lokr), adapter_name="k")]
        for step in steps if order == "lora_first" else steps[::-1]:
            step(pipe)
        assert_outputs(outputs(pipe), expected)
        pipe.unload_lokr_weights()
        assert_outputs(outputs(pipe), lora_out)


def test_loaded_adapter_follows_device_and_dtype() -> None:
    pipe = make_sd_pipeline()
    pipe.load_lokr_weights(write_adapter(source_pipeline(False), "src", "kohya"))
    pipe.to(torch.float64)
    assert all(t.dtype == torch.float64 for _, la in lokr_layers(pipe.unet) for t in la.factors("default_0").values())
    out = outputs(pipe)
    assert out["unet"].dtype == torch.float64


@pytest.mark.parametrize("when", ["before", "after"])
def test_model_cpu_offload_before_or_after_loading(when: str) -> None:
    src = source_pipeline(False)
    pipe = make_sd_pipeline()
    if when == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    pipe.load_lokr_weights(write_adapter(src, "src", "kohya"))
    if when == "after":
        pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")  # offloading is (still) on
    assert_outputs(outputs(pipe), outputs(src))


def test_other_pipelines_sharing_the_components_have_the_methods() -> None:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    src = source_pipeline(False)
    sd = make_sd_pipeline()
    for cls in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
        pipe = cls(**sd.components)
        pipe.load_lokr_weights(write_adapter(src, "src", "kohya"), adapter_name="x")
        assert_outputs(outputs(pipe), outputs(src))
        pipe.unload_lokr_weights()


def test_hub_repo_id_reads_through_huggingface_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    path = tmp_path / "hub.safetensors"
    save_file(write_adapter(source_pipeline(False), "src", "kohya"), path)
    calls = []

    def fake_download(repo_id: str, filename: str, subfolder: str | None = None, **kwargs) -> str:
        calls.append((repo_id, filename, subfolder, kwargs))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    pipe = make_sd_pipeline()
    pipe.load_lokr_weights("org/repo", weight_name="char.safetensors", adapter_name="char", revision="main")
    assert calls == [("org/repo", "char.safetensors", None, {"revision": "main"})]
    assert os.path.exists(path) and pipe.get_active_lokr_adapters() == ["char"]
    assert lokr_diffusers.lokr_state_dict(str(path))[2] == "kohya"
