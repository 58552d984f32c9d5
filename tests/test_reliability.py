"""Reliability catalogue, part 1: misuse of the adapter API and the compositions that used to give
wrong numbers (docs/adapters.md). The other parts are tests/test_reliability_loads.py (files, folders),
tests/test_reliability_arguments.py (metadata, configs, CLI), tests/test_reliability_saves.py (saves),
tests/test_reliability_training_inputs.py and tests/test_reliability_training_checkpoints.py (training);
docs/reliability.md's catalogue table counts them all.

Misuse: one row per case (state to start from, the call, the error class and a message fragment); the
pipeline must be exactly as before: every parameter bit for bit, the module tree, requires_grad flags,
every LoKr layer's state, the adapter lists, diffusers' own LoRA adapters.
Compositions: each reproduces a sequence from the issue that once went wrong, against a reference
built independently (a fresh pipeline in the state docs/adapters.md defines).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers.state_sources import COMPS, UNET, base_pipe, lokr_files, lora_file

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)
from lokr_diffusers import LoKrConfig, LoKrModel, add_lokr, lokr_layers
from lokr_diffusers.training.errors import AdapterFusedError

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def _tiny_ops_on_one_thread(one_thread: None) -> None:
    """Tiny ops: one thread avoids OpenMP sync costs (conftest.one_thread)."""


@pytest.fixture(scope="module")
def base():
    return base_pipe()


def _fresh(base, *steps: str):
    """A copy of the base pipeline after the named steps."""
    pipe = copy.copy(base)
    for c in COMPS:
        setattr(pipe, c, copy.deepcopy(getattr(base, c)))
    files = lokr_files()
    for step in steps:
        if step in ("a", "b", "c"):
            pipe.load_lokr_weights(files[step], adapter_name=step)
        elif step == "lora":
            pipe.load_lora_weights(dict(lora_file()), adapter_name="lora")
        elif step == "fused":
            pipe.fuse_lokr(lokr_scale=0.5)
        elif step == "weight2":
            pipe.set_lokr_adapters("a", 2.0)
        elif step == "disabled":
            pipe.disable_lokr()
        elif step == "huge":  # a factor that overflows W + ΔW in the text encoder's first layer
            layer = next(la for _, la in lokr_layers(pipe.text_encoder))
            with torch.no_grad():
                next(iter(layer.factors("a").values())).fill_(3e38)
        else:
            raise KeyError(step)
    return pipe


def fingerprint(pipe) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    out: dict[str, Any] = {"lokr": pipe.get_list_lokr_adapters(), "active": pipe.get_active_lokr_adapters(),
                           "lora": pipe.get_list_adapters()}
    for c in COMPS:
        model = getattr(pipe, c)
        out[c + ".tree"] = [(n, type(m).__name__) for n, m in model.named_modules()]
        out[c + ".params"] = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
        out[c + ".states"] = [(n, la.state, la.call_scale) for n, la in lokr_layers(model)]
    return out


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before.items():
        if key.endswith(".params"):
            assert after[key].keys() == value.keys(), key
            for n, (t, flag) in value.items():
                assert torch.equal(after[key][n][0], t) and after[key][n][1] == flag, f"{key}: {n}"
        else:
            assert after[key] == value, key


def _outputs(pipe, call_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    kwargs = {"cross_attention_kwargs": {"scale": call_scale}} if call_scale is not None else {}
    with torch.no_grad():
        u = pipe.unet(x.to(pipe.unet.dtype), torch.tensor([10]), ctx.to(pipe.unet.dtype), **kwargs).sample
        t = pipe.encode_prompt("a photo of a red cat", "cpu", 1, False, lora_scale=call_scale)[0]
    return u, t


def assert_outputs_close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], atol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=0, atol=atol)


def assert_outputs_differ(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    """The two states compute visibly different outputs (so a comparison with either can fail)."""
    assert max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True)) > 1e-3


# ------------------------------------------------------------------------------------- misuse
def _lokr_model(pipe) -> LoKrModel:
    return LoKrModel(pipe.unet, None)


def _train_after_fuse(pipe) -> None:
    pipe.unet.train()
    for _, layer in lokr_layers(pipe.unet):
        for t in layer.factors("a").values():
            t.requires_grad_(True)
    try:
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 32)
        pipe.unet(x, torch.tensor([10]), ctx).sample.sum().backward()
    finally:
        pipe.unet.eval()
        for _, layer in lokr_layers(pipe.unet):
            for t in layer.factors("a").values():
                t.requires_grad_(False)


def _mixed_file_with_bad_lora() -> dict[str, torch.Tensor]:
    """LoKr modules that fit, plus a LoRA module (on a module no LoKr touches) whose shapes do not fit:
    diffusers fails on it after the LoKr part is in place."""
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
    bad = {f"{name}.lora_down.weight": torch.randn(2, 35), f"{name}.lora_up.weight": torch.randn(32, 2),
           f"{name}.alpha": torch.tensor(2.0)}
    return {**lokr_files()["c"], **bad}


def _corrupt_file() -> str:
    """A .safetensors whose header is garbage."""
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    return path


def _second_component_fails(pipe) -> None:
    add_lokr(pipe, {"unet": LoKrConfig(target_modules=["to_q"]), "text_encoder": LoKrConfig(target_modules=["nope"])},
             "x")


MISUSE: list[tuple[str, tuple[str, ...], Callable[[Any], Any], type[BaseException], str]] = [
    # set_lokr_adapters
    ("set-unknown-name", ("a",), lambda p: p.set_lokr_adapters(["a", "zz"]), ValueError,
     "unknown LoKr adapters ['zz']"),
    ("set-nan-second", ("a", "b"), lambda p: p.set_lokr_adapters(["a", "b"], [0.5, NAN]), ValueError, "finite"),
    ("set-inf", ("a",), lambda p: p.set_lokr_adapters("a", INF), ValueError, "finite"),
    ("set-nan-in-dict", ("a", "b"), lambda p: p.set_lokr_adapters(["a", "b"], [1.0, {"unet": NAN}]), ValueError,
     "adapter_weights['b']['unet']"),
    ("set-string-weight", ("a",), lambda p: p.set_lokr_adapters("a", "0.5"), TypeError, "adapter_weights"),
    ("set-bool-weight", ("a",), lambda p: p.set_lokr_adapters("a", True), TypeError, "must be a number"),
    ("set-unknown-component", ("a", "b"), lambda p: p.set_lokr_adapters(["a", "b"], [1.0, {"vae": 0.5}]),
     ValueError, "components ['vae']"),
    ("set-length-mismatch", ("a", "b"), lambda p: p.set_lokr_adapters(["a", "b"], [1.0]), ValueError,
     "2 adapters but 1"),
    ("set-name-not-str", ("a",), lambda p: p.set_lokr_adapters([1]), TypeError, "must be strings"),
    ("set-weights-a-set", ("a",), lambda p: p.set_lokr_adapters(["a"], {0.5}), TypeError, "adapter_weights"),
    ("set-when-fused-unknown", ("a", "fused"), lambda p: p.set_lokr_adapters("b"), ValueError, "unknown"),
    # fuse_lokr
    ("fuse-nan-scale", ("a",), lambda p: p.fuse_lokr(lokr_scale=NAN), ValueError, "lokr_scale"),
    ("fuse-inf-scale", ("a",), lambda p: p.fuse_lokr(lokr_scale=-INF), ValueError, "lokr_scale"),
    ("fuse-string-scale", ("a",), lambda p: p.fuse_lokr(lokr_scale="1"), TypeError, "lokr_scale"),
    ("fuse-unknown-component", ("a",), lambda p: p.fuse_lokr(components=["vae"]), ValueError,
     "unknown components ['vae']"),
    ("fuse-component-as-str", ("a",), lambda p: p.fuse_lokr(components="vae"), ValueError, "unknown components"),
    ("fuse-unknown-adapter", ("a",), lambda p: p.fuse_lokr(adapter_names=["a", "q"]), ValueError,
     "unknown LoKr adapters ['q']"),
    ("fuse-again-other-scale", ("a", "fused"), lambda p: p.fuse_lokr(lokr_scale=0.8), ValueError,
     "already fused at strength 0.5"),
    ("fuse-again-other-weight", ("a", "fused", "weight2"), lambda p: p.fuse_lokr(0.5), ValueError, "already fused"),
    ("safe-fuse-non-finite", ("a", "huge"), lambda p: p.fuse_lokr(safe_fusing=True), ValueError, "non-finite"),
    # delete / load / add
    ("delete-unknown", ("a",), lambda p: p.delete_lokr_adapters("zz"), ValueError, "unknown LoKr adapters ['zz']"),
    ("delete-known-and-unknown", ("a", "b"), lambda p: p.delete_lokr_adapters(["a", "zz"]), ValueError, "['zz']"),
    ("delete-not-str", ("a",), lambda p: p.delete_lokr_adapters([None]), TypeError, "must be strings"),
    ("load-empty-name", (), lambda p: p.load_lokr_weights(lokr_files()["a"], adapter_name=""), ValueError,
     "adapter name ''"),
    ("load-dotted-name", (), lambda p: p.load_lokr_weights(lokr_files()["a"], adapter_name="a.b"), ValueError,
     "letters, digits"),
    ("load-name-not-str", (), lambda p: p.load_lokr_weights(lokr_files()["a"], adapter_name=3), ValueError,
     "adapter name 3"),
    ("load-taken-name", ("a",), lambda p: p.load_lokr_weights(lokr_files()["b"], adapter_name="a"), ValueError,
     "already loaded"),
    ("load-lora-only", (), lambda p: p.load_lokr_weights(dict(lora_file())), ValueError, "load_lora_weights"),
    ("load-mixed-bad-lora-part", ("a",), lambda p: p.load_lokr_weights(_mixed_file_with_bad_lora(), adapter_name="m"),
     ValueError, "size mismatch for mid_block.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("load-lora-weights-path-typo", ("a",), lambda p: p.load_lora_weights("./styel.safetensors"), FileNotFoundError,
     "no such file or folder: ./styel.safetensors"),
    ("load-lora-weights-corrupt", ("a",), lambda p: p.load_lora_weights(_corrupt_file()), ValueError,
     "not a valid safetensors file"),
    ("load-unknown-kwarg", (), lambda p: p.load_lokr_weights(lokr_files()["a"], adapter="x"), TypeError, "adapter"),
    ("add-vae", (), lambda p: add_lokr(p, {"vae": LoKrConfig(target_modules=["conv_in"])}), ValueError, "got 'vae'"),
    ("add-missing-te2", (), lambda p: add_lokr(p, {"text_encoder_2": LoKrConfig()}), ValueError,
     "no component 'text_encoder_2'"),
    ("add-empty", (), lambda p: add_lokr(p, {}), ValueError, "non-empty"),
    ("add-list", (), lambda p: add_lokr(p, [LoKrConfig()]), ValueError, "non-empty"),
    ("add-second-fails", ("a",), _second_component_fails, ValueError, "['nope']"),
    ("add-taken-name", ("a",), lambda p: add_lokr(p, {"unet": LoKrConfig(target_modules=["to_k"])}, "a"), ValueError,
     "already exists"),
    ("add-dict-config", (), lambda p: add_lokr(p, {"unet": {"r": 4}}), TypeError, "LoKrConfig"),
    ("add-bad-name", (), lambda p: add_lokr(p, {"unet": LoKrConfig(target_modules=["to_q"])}, "a b"), ValueError,
     "letters, digits"),
    # LoKrModel
    ("model-set-unknown", ("a",), lambda p: _lokr_model(p).set_adapter("zz"), ValueError, "unknown adapters"),
    ("model-delete-unknown", ("a",), lambda p: _lokr_model(p).delete_adapter("zz"), ValueError, "does not exist"),
    ("model-weight-nan", ("a",), lambda p: _lokr_model(p).set_adapter_weight("a", NAN), ValueError, "finite"),
    ("model-weight-unknown", ("a",), lambda p: _lokr_model(p).set_adapter_weight("zz", 1.0), ValueError,
     "does not exist"),
    ("model-merge-unknown", ("a",), lambda p: _lokr_model(p).merge_adapter(["zz"]), ValueError, "unknown adapters"),
    ("model-forward-mode", ("a",), lambda p: _lokr_model(p).set_forward_mode("fast"), ValueError, "forward mode"),
    ("model-state-dict-key", ("a",), lambda p: _lokr_model(p).set_adapter_state_dict({"nope.lokr_w1": torch.ones(1)},
                                                                                      "a"), KeyError, "nope"),
    ("model-state-dict-shape", ("a",), lambda p: _lokr_model(p).set_adapter_state_dict(
        {k: torch.ones(3, 3) for k in _lokr_model(p).get_adapter_state_dict("a")}, "a"), ValueError, "does not"),
    ("model-inject-twice", ("a",), lambda p: LoKrModel(p.unet, LoKrConfig(target_modules=["to_k"]), "a"), ValueError,
     "already exists"),
    # calls
    ("train-after-fuse", ("a", "fused"), _train_after_fuse, AdapterFusedError, "is fused into the base weights"),
    ("call-scale-nan", ("a",), lambda p: _outputs(p, call_scale=NAN), ValueError, "finite"),
    ("call-scale-string", ("a",), lambda p: p.unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 8, 32),
                                                    cross_attention_kwargs={"scale": "x"}), ValueError, "finite"),
    ("encode-lora-scale-inf", ("a",), lambda p: p.encode_prompt("a", "cpu", 1, False, lora_scale=INF), ValueError,
     "finite"),
    ("unfuse-unknown-component", ("a", "fused"), lambda p: p.unfuse_lokr(components=["vae"]), ValueError,
     "unknown components"),
    ("disabled-fuse-other-scale", ("a", "fused", "disabled"), lambda p: p.fuse_lokr(lokr_scale=2.0), ValueError,
     "already fused"),
    ("with-lora-set-unknown", ("a", "lora"), lambda p: p.set_lokr_adapters(["lora"]), ValueError,
     "unknown LoKr adapters ['lora']"),
]


@pytest.mark.parametrize(("steps", "call", "error", "fragment"), [c[1:] for c in MISUSE], ids=[c[0] for c in MISUSE])
def test_misuse_is_refused_and_changes_nothing(base, steps, call, error, fragment) -> None:
    pipe = _fresh(base, *steps)
    before = fingerprint(pipe)
    with pytest.raises(error) as info:
        call(pipe)
    assert fragment in str(info.value), str(info.value)
    assert_same(before, fingerprint(pipe))


# -------------------------------------------------------------------------------- compositions
def test_fused_scale_survives_deleting_another_adapter(base) -> None:
    pipe = _fresh(base, "a", "b")
    pipe.fuse_lokr(lokr_scale=0.5)
    pipe.delete_lokr_adapters("b")
    ref = _fresh(base, "a")
    ref.set_lokr_adapters("a", 0.5)
    assert_outputs_close(_outputs(pipe), _outputs(ref))
    assert pipe.get_list_lokr_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    pipe.unfuse_lokr()  # a runs unfused at its weight (1.0) again
    assert_outputs_close(_outputs(pipe), _outputs(_fresh(base, "a")))


def test_disable_enable_keeps_a_merged_lokr_model_merged(base) -> None:
    pipe = _fresh(base)
    w0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    model = LoKrModel(pipe.unet, LoKrConfig(r=2, target_modules=["to_q", "ff.net.2"], init_weights=False))
    model.set_adapter_weight("default", 0.5)
    unfused = _outputs(pipe)
    model.merge_adapter()
    with model.disable_adapter():
        assert_outputs_close(_outputs(pipe), _outputs(_fresh(base)), atol=0)
    assert all(la.merged for _, la in lokr_layers(pipe.unet))
    assert_outputs_close(_outputs(pipe), unfused)
    model.unmerge_adapter()
    base_now = {n.replace(".base_layer", ""): p for n, p in pipe.unet.named_parameters() if "lokr_" not in n}
    assert all(torch.equal(base_now[n], w) for n, w in w0.items())  # bit for bit


def test_lokr_and_lora_fused_together_unfuse_in_either_order(base) -> None:
    for order in ("lokr_first", "lora_first"):
        pipe = _fresh(base, "a", "lora")
        w0 = {n: p.detach().clone() for n, p in _fresh(base).unet.named_parameters()}
        both = _outputs(pipe)
        pipe.fuse_lokr()
        pipe.fuse_lora()
        assert_outputs_close(_outputs(pipe), both)
        steps = [pipe.unfuse_lokr, pipe.unfuse_lora]
        for step in steps if order == "lokr_first" else steps[::-1]:
            step()
        assert_outputs_close(_outputs(pipe), both)
        pipe.unload_lokr_weights()
        pipe.unload_lora_weights()
        now = dict(pipe.unet.named_parameters())
        worst = max((now[n] - w).abs().max().item() for n, w in w0.items())
        assert worst < 1e-6, (order, worst)  # was 0.7 when unfuse_lokr restored a stale snapshot


def test_two_dora_adapters_forward_equals_fused(base) -> None:
    pipe = _fresh(base, "b", "c")  # DoRA on the same attn1.to_q in both
    layer = pipe.unet.get_submodule(UNET[0])
    assert "b" in layer.dora_scale and "c" in layer.dora_scale
    unfused = _outputs(pipe)
    pipe.fuse_lokr()
    assert_outputs_close(_outputs(pipe), unfused)  # was 0.46 off: forward summed, fuse applied one after the other


def test_modules_to_save_follow_disable(base) -> None:
    pipe = _fresh(base)
    model = LoKrModel(pipe.text_encoder, LoKrConfig(target_modules=["q_proj"], modules_to_save=["final_layer_norm"]))
    wrapper = pipe.text_encoder.get_submodule("final_layer_norm")
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.mul_(3.0)
    changed = _outputs(pipe)[1]
    assert_outputs_differ((changed,), (_outputs(_fresh(base))[1],))
    with model.disable_adapter():
        assert_outputs_close((_outputs(pipe)[1],), (_outputs(_fresh(base))[1],), atol=0)
    assert_outputs_close((_outputs(pipe)[1],), (changed,))


@pytest.mark.parametrize("scale", [0.0, 0.3, -1.0])
def test_call_scale_scales_unfused_lokr_like_lora(base, scale: float) -> None:
    pipe = _fresh(base, "a")
    ref = _fresh(base, "a")
    ref.set_lokr_adapters("a", scale)
    assert_outputs_differ(_outputs(ref), _outputs(pipe))
    assert_outputs_close(_outputs(pipe, call_scale=scale), _outputs(ref))
    assert_outputs_close(_outputs(pipe), _outputs(_fresh(base, "a")))  # the scale lasts one call
    pipe.fuse_lokr()
    assert_outputs_close(_outputs(pipe, call_scale=scale), _outputs(_fresh(base, "a")))  # fused: not scaled, as LoRA


def test_pipeline_call_with_cross_attention_scale(base) -> None:
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "guidance_scale": 1.0}
    pipe, ref = _fresh(base, "a"), _fresh(base, "a")
    ref.set_lokr_adapters("a", 0.25)
    got = pipe("a red cat", generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"scale": 0.25},
               **kwargs).images
    want = ref("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(got - want).max() < 1e-5


def test_unload_lora_weights_unloads_lora_and_lokr(base) -> None:
    pipe = _fresh(base, "a", "lora")
    pipe.unload_lora_weights()  # crashed: diffusers took every module with a base_layer for PEFT's
    assert pipe.get_list_adapters() == {} and pipe.get_list_lokr_adapters() == {}
    assert_outputs_close(_outputs(pipe), _outputs(_fresh(base)))


@pytest.mark.parametrize("form", ["seed", "in_place", "fused"])
def test_save_pretrained_with_lokr_loads_again(base, tmp_path, form: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = _fresh(base, "a") if form != "seed" else _fresh(base)
    if form == "seed":
        pipe.unet = LoKrModel(pipe.unet, LoKrConfig(r=2, target_modules=["to_q", "conv1"], init_weights=False), "s")
    if form == "fused":
        pipe.fuse_lokr(lokr_scale=0.5)
    expected = _outputs(pipe)
    pipe.save_pretrained(tmp_path / "p")
    assert isinstance(pipe.unet, LoKrModel) == (form == "seed")  # the pipeline is as it was
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "p")
    side = tmp_path / "p" / "lokr_adapters.safetensors"
    assert side.exists() == (form != "fused")  # fused adapters are in the saved weights
    if side.exists():
        loaded.load_lokr_weights(str(tmp_path / "p"), weight_name="lokr_adapters.safetensors")
    assert_outputs_close(_outputs(loaded), expected)


def test_dtype_round_trip_while_fused_restores_the_base(base) -> None:
    pipe = _fresh(base, "a", "fused")
    w0 = {n: p.detach().clone() for n, p in _fresh(base).unet.named_parameters()}
    pipe.to(torch.float64)
    assert_outputs_close(_outputs(pipe), _outputs(_fresh(base, "a", "fused")))
    pipe.to(torch.float32)
    pipe.unfuse_lokr()
    pipe.unload_lokr_weights()
    assert all(torch.equal(p, w0[n]) for n, p in pipe.unet.named_parameters())


def test_loading_while_disabled_stays_disabled(base) -> None:
    pipe = _fresh(base, "a", "disabled")
    pipe.load_lokr_weights(lokr_files()["b"], adapter_name="b")
    assert_outputs_close(_outputs(pipe), _outputs(_fresh(base)), atol=0)
    pipe.enable_lokr()
    ref = _fresh(base, "a", "b")
    assert_outputs_differ(_outputs(ref), _outputs(_fresh(base)))
    assert_outputs_close(_outputs(pipe), _outputs(ref))


def test_fused_and_trainable_adapter_refuses_training_with_a_message(base) -> None:
    pipe = _fresh(base, "a", "fused")
    with pytest.raises(RuntimeError, match="unfuse it first"):
        _train_after_fuse(pipe)
    assert all(math.isfinite(p.sum().item()) for p in pipe.unet.parameters())


def test_the_catalogue_is_big_enough() -> None:
    assert len(MISUSE) >= 50


class _JointModel(torch.nn.Module):
    """A denoiser-like module whose forward takes joint_attention_kwargs (SD3 / Flux style)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, joint_attention_kwargs: dict | None = None) -> torch.Tensor:
        return self.proj(x)


def test_joint_attention_kwargs_scale_reaches_lokr() -> None:
    torch.manual_seed(0)
    model = _JointModel()
    LoKrModel(model, LoKrConfig(r=2, target_modules=["proj"], init_weights=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        full, plain = model(x), model.proj.base_layer(x)
        half = model(x, joint_attention_kwargs={"scale": 0.5})
        again = model(x)
    torch.testing.assert_close(half, plain + 0.5 * (full - plain))
    torch.testing.assert_close(again, full, rtol=0, atol=0)  # one call only


def test_a_copied_pipeline_scales_its_own_text_encoder(base) -> None:
    pipe = _fresh(base, "a")
    copied = copy.deepcopy(pipe)
    ref = _fresh(base, "a")
    ref.set_lokr_adapters("a", 0.5)
    del pipe  # the copy must not reach back into the original
    assert_outputs_differ(_outputs(ref), _outputs(copied))
    assert_outputs_close(_outputs(copied, call_scale=0.5), _outputs(ref))


@pytest.mark.parametrize("call", ["weights", "fuse"])
def test_negative_strengths_mean_what_consumers_compute_with_a_warning(base, caplog, call: str) -> None:
    pipe, plus = _fresh(base, "a"), _fresh(base, "a")
    w0 = {n: p.detach().clone() for n, p in _fresh(base).unet.named_parameters()}
    with caplog.at_level("WARNING", logger="lokr_diffusers"):
        pipe.set_lokr_adapters("a", -1.0) if call == "weights" else pipe.fuse_lokr(lokr_scale=-1.0)
    assert "subtracted" in caplog.text
    if call == "weights":
        pipe.fuse_lokr()
    plus.fuse_lokr()
    got, ref = dict(pipe.unet.named_parameters()), dict(plus.unet.named_parameters())
    for path in UNET:  # source "a" has no DoRA: W − ΔW mirrors W + ΔW around W
        n = path + ".base_layer.weight"
        w = w0[path + ".weight"]
        assert (ref[n] - w).abs().max() > 1e-3
        torch.testing.assert_close(got[n] - w, -(ref[n] - w), rtol=0, atol=1e-6)
