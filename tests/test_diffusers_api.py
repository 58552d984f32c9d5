"""diffusers' own adapter methods on a pipeline holding a LoKr and a LoRA (diffusers_api.py).

The table: each row runs one diffusers method the way a diffusers user would (`pipe.set_adapters`,
`pipe.unet.disable_adapters`, ...) on a fresh pipeline, and the same operation on another fresh
pipeline through our explicit `*_lokr*` methods for the LoKr plus diffusers' own, unwrapped method
for the LoRA (`own`); the UNet and text-encoder outputs must agree. Each row that changes anything
first asserts that its result differs from the starting pipeline, so the comparison can fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers.state_sources import COMPS, _source, base_pipe, lokr_files, lora_file

import lokr_diffusers
from lokr_diffusers import lokr_layers, patches

Row = tuple[str, Callable[[Any], Any], Callable[[Any], Any], bool]


@pytest.fixture(autouse=True, scope="module")
def _tiny_ops_on_one_thread(one_thread: None) -> None:
    """Tiny ops: one thread avoids OpenMP sync costs (conftest.one_thread)."""


@pytest.fixture(scope="module")
def base():
    return base_pipe()


def _copy(base):
    pipe = copy.copy(base)
    for c in COMPS:
        setattr(pipe, c, copy.deepcopy(getattr(base, c)))
    return pipe


def fresh(base):
    """The pipeline as a diffusers user loads it: a LoKr file and a LoRA file, both through
    load_lora_weights."""
    pipe = _copy(base)
    pipe.load_lora_weights(dict(lokr_files()["a"]), adapter_name="kr")
    pipe.load_lora_weights(dict(lora_file()), adapter_name="lora")
    return pipe


def own(pipe, method: str, *args: Any, component: str | None = None, **kwargs: Any) -> Any:
    """diffusers' own method (ours unwrapped), on the pipeline or one of its components."""
    target = pipe if component is None else getattr(pipe, component)
    with patches.bypassed():
        return patches.original(getattr(type(target), method))(target, *args, **kwargs)


def outputs(pipe, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    kwargs = {"cross_attention_kwargs": {"scale": scale}} if scale is not None else {}
    with torch.no_grad():
        u = pipe.unet(x, torch.tensor([10]), ctx, **kwargs).sample
        t = pipe.encode_prompt("a photo of a red cat", "cpu", 1, False, lora_scale=scale)[0]
    return u, t


def assert_close(a, b, atol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=0, atol=atol)


def assert_differ(a, b) -> None:
    assert max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True)) > 1e-3


def _fuse_unfuse(p) -> None:
    p.fuse_lora()
    p.unfuse_lora()


def _disable_enable(p) -> None:
    p.disable_lora()
    p.enable_lora()


def _attention_weight(p, weight: float) -> None:
    """The LoKr's UNet layers inside the transformer blocks at `weight`, the others (resnet convs)
    at 1.0, layer by layer."""
    for path, layer in lokr_layers(p.unet):
        layer.set_adapter_weight("kr", weight if ".attentions." in path else 1.0)


def _own_lora_fuse(p, **kwargs: Any) -> None:
    own(p, "fuse_lora", components=["unet", "text_encoder"], **kwargs)


ROWS: list[Row] = [
    ("set_adapters both weighted",
     lambda p: p.set_adapters(["kr", "lora"], [0.5, 0.7]),
     lambda p: (p.set_lokr_adapters("kr", 0.5), own(p, "set_adapters", ["lora"], [0.7])), True),
    ("set_adapters only the LoKr",
     lambda p: p.set_adapters("kr"),
     lambda p: own(p, "delete_adapters", ["lora"]), True),
    ("set_adapters only the LoRA",
     lambda p: p.set_adapters(["lora"], 1.5),
     lambda p: (p.delete_lokr_adapters("kr"), own(p, "set_adapters", ["lora"], [1.5])), True),
    ("set_adapters per-component weights",
     lambda p: p.set_adapters(["kr", "lora"], [{"unet": 0.3, "text_encoder": 0.6}, 1.2]),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.3, "text_encoder": 0.6}), own(p, "set_adapters", "lora", 1.2)),
     True),
    ("set_adapters per-block weights",  # diffusers' rule: block weights reach the attention blocks only
     lambda p: p.set_adapters(["kr", "lora"], [{"unet": {"down": 0.0, "mid": 0.4, "up": 0.0}}, 0.5]),
     lambda p: (_attention_weight(p, 0.4), own(p, "set_adapters", "lora", 0.5)), True),
    ("fuse_lora all active",
     lambda p: p.fuse_lora(),
     lambda p: (p.fuse_lokr(), _own_lora_fuse(p)), False),
    ("fuse_lora lora_scale, only the LoKr",
     lambda p: p.fuse_lora(lora_scale=0.5, adapter_names=["kr"]),
     lambda p: p.set_lokr_adapters("kr", 0.5), True),
    ("fuse_lora components=unet, lora_scale",
     lambda p: p.fuse_lora(components=["unet"], lora_scale=0.7),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.7}), own(p, "fuse_lora", components=["unet"], lora_scale=0.7)),
     True),
    ("fuse_lora safe_fusing",
     lambda p: p.fuse_lora(safe_fusing=True),
     lambda p: (p.fuse_lokr(safe_fusing=True), _own_lora_fuse(p, safe_fusing=True)), False),
    ("fuse_lora then unfuse_lora", _fuse_unfuse, lambda p: None, False),
    ("disable_lora",
     lambda p: p.disable_lora(),
     lambda p: (p.disable_lokr(), own(p, "disable_lora")), True),
    ("disable_lora then enable_lora", _disable_enable, lambda p: None, False),
    ("delete_adapters the LoKr",
     lambda p: p.delete_adapters("kr"),
     lambda p: p.delete_lokr_adapters("kr"), True),
    ("delete_adapters both",
     lambda p: p.delete_adapters(["kr", "lora"]),
     lambda p: (p.delete_lokr_adapters("kr"), own(p, "delete_adapters", ["lora"])), True),
    ("unload_lora_weights",
     lambda p: p.unload_lora_weights(),
     lambda p: (p.unload_lokr_weights(), own(p, "unload_lora_weights")), True),
    ("set_lora_device cpu", lambda p: p.set_lora_device(["kr", "lora"], "cpu"), lambda p: None, False),
    ("unet.set_adapters",
     lambda p: p.unet.set_adapters(["kr", "lora"], [0.5, 0.7]),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.5}), own(p, "set_adapters", ["lora"], [0.7], component="unet")),
     True),
    ("unet.set_adapters per-block",
     lambda p: p.unet.set_adapters(["kr", "lora"], [{"mid": 0.25}, 1.0]),
     lambda p: _attention_weight(p, 0.25), True),
    ("unet.set_adapter the LoKr",
     lambda p: p.unet.set_adapter("kr"),
     lambda p: own(p, "delete_adapters", ["lora"], component="unet"), True),
    ("unet.disable_adapters",
     lambda p: p.unet.disable_adapters(),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.0}), own(p, "disable_adapters", component="unet")), True),
    ("unet.disable_lora",
     lambda p: p.unet.disable_lora(),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.0}), own(p, "disable_lora", component="unet")), True),
    ("unet.delete_adapters the LoKr",
     lambda p: p.unet.delete_adapters("kr"),
     lambda p: p.set_lokr_adapters("kr", {"unet": 0.0}), True),
    ("unet.fuse_lora",
     lambda p: p.unet.fuse_lora(lora_scale=0.5),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.5}), own(p, "fuse_lora", 0.5, component="unet")), True),
    ("unet.unload_lora",
     lambda p: p.unet.unload_lora(),
     lambda p: (p.set_lokr_adapters("kr", {"unet": 0.0}), own(p, "delete_adapters", ["lora"], component="unet")),
     True),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_method_table(base, row: Row) -> None:
    _, through_diffusers, through_ours, changes = row
    start = outputs(fresh(base))
    a, b = fresh(base), fresh(base)
    through_diffusers(a)
    through_ours(b)
    if changes:
        assert_differ(outputs(a), start)
    assert_close(outputs(a), outputs(b))


def test_call_scale_scales_lora_and_lokr(base) -> None:
    """`cross_attention_kwargs={"scale": s}` (and encode_prompt's lora_scale) scale both kinds for
    one call: the same as both adapters at weight s."""
    pipe, weighted = fresh(base), fresh(base)
    weighted.set_lokr_adapters("kr", 0.5)
    own(weighted, "set_adapters", ["lora"], [0.5])
    assert_differ(outputs(pipe, 0.5), outputs(pipe))
    assert_close(outputs(pipe, 0.5), outputs(weighted))


def test_lists_and_active(base) -> None:
    pipe = fresh(base)
    assert pipe.get_list_adapters() == {"unet": ["lora", "kr"], "text_encoder": ["lora", "kr"]}
    assert pipe.get_active_adapters() == ["lora", "kr"]
    assert pipe.unet.active_adapters() == ["lora", "kr"]
    pipe.set_adapters("kr")
    assert pipe.get_active_adapters() == ["kr"] and pipe.get_active_lokr_adapters() == ["kr"]
    pipe.fuse_lora(adapter_names=["kr"])
    assert pipe.fused_loras == {"kr"} and pipe.num_fused_loras == 1
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    pipe.unet.delete_adapters("kr")
    assert pipe.get_list_adapters() == {"unet": ["lora"], "text_encoder": ["lora", "kr"]}


def test_unknown_names_change_nothing(base) -> None:
    pipe = fresh(base)
    before = outputs(pipe)
    for call in (lambda: pipe.set_adapters(["kr", "nope"]), lambda: pipe.delete_adapters(["kr", "nope"]),
                 lambda: pipe.fuse_lora(adapter_names=["kr", "nope"]), lambda: pipe.unet.set_adapters("nope")):
        with pytest.raises(ValueError, match="nope"):
            call()
    assert pipe.get_list_adapters() == {"unet": ["lora", "kr"], "text_encoder": ["lora", "kr"]}
    assert_close(outputs(pipe), before, atol=0)


def test_lora_failure_undoes_the_lokr_part(base, monkeypatch) -> None:
    """diffusers raising in its part of set_adapters leaves the LoKr part as it was."""
    pipe = fresh(base)
    before = outputs(pipe)
    from diffusers.loaders import peft

    def failing(*args, **kwargs):
        raise RuntimeError("diffusers failed")

    monkeypatch.setattr(peft, "set_weights_and_activate_adapters", failing)
    with pytest.raises(RuntimeError, match="diffusers failed"):
        pipe.set_adapters(["kr", "lora"], [0.1, 0.2])
    assert_close(outputs(pipe), before, atol=0)


def test_unload_lora_weights_restores_the_base_bit_for_bit(base) -> None:
    pipe = _copy(base)
    weights = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPS}
    types = {c: [type(m) for m in getattr(pipe, c).modules()] for c in COMPS}
    pipe.load_lora_weights(dict(lokr_files()["b"]), adapter_name="kr")
    assert any(True for _ in lokr_layers(pipe.unet))
    pipe.unload_lora_weights()
    for c in COMPS:
        model = getattr(pipe, c)
        assert [type(m) for m in model.modules()] == types[c]
        assert model.state_dict().keys() == weights[c].keys()
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[c][k]), (c, k)
    assert pipe.get_list_adapters() == {}


def test_lora_loaded_after_lokr_gets_a_free_default_name(base) -> None:
    pipe = _copy(base)
    pipe.load_lora_weights(dict(lokr_files()["a"]))
    pipe.load_lora_weights(dict(lora_file()))
    names = pipe.get_list_adapters()["unet"]
    assert len(names) == 2 and len(set(names)) == 2


def test_set_lora_device_moves_only_the_named_adapters(base) -> None:
    pipe = fresh(base)
    pipe.load_lora_weights(dict(lokr_files()["c"]), adapter_name="kr2")
    pipe.set_lora_device(["kr"], "meta")
    layers = [layer for c in COMPS for _, layer in lokr_layers(getattr(pipe, c))]
    assert all(t.device.type == "meta" for la in layers for t in la.adapter_tensors("kr").values())
    assert all(t.device.type == "cpu" for la in layers if "kr2" in la.plans
               for t in la.adapter_tensors("kr2").values())
    assert all(p.device.type == "cpu" for n, p in pipe.unet.named_parameters() if "lora_" in n)


def test_hotswap_replaces_values_in_place(base) -> None:
    """load_lora_weights(..., hotswap=True) with a LoKr file of equal shapes: the same parameters
    hold the new values (a compiled model would not recompile), the outputs are those of the new
    file loaded afresh."""
    other = _source("a", 11)
    pipe, expected = fresh(base), _copy(base)
    expected.load_lora_weights(dict(other), adapter_name="kr")
    expected.load_lora_weights(dict(lora_file()), adapter_name="lora")
    params = {id(p) for c in COMPS for _, la in lokr_layers(getattr(pipe, c)) for p in la.parameters()}
    before = outputs(pipe)
    pipe.load_lora_weights(dict(other), adapter_name="kr", hotswap=True)
    after = {id(p) for c in COMPS for _, la in lokr_layers(getattr(pipe, c)) for p in la.parameters()}
    assert after == params
    assert_differ(outputs(pipe), before)
    assert_close(outputs(pipe), outputs(expected))
    with pytest.raises(ValueError, match="equal shapes"):
        pipe.load_lora_weights(dict(lokr_files()["c"]), adapter_name="kr", hotswap=True)
    assert_close(outputs(pipe), outputs(expected), atol=0)


def test_detach_and_attach_again() -> None:
    from diffusers import DiffusionPipeline
    from diffusers.loaders.lora_base import LoraBaseMixin

    wrapped = LoraBaseMixin.set_adapters
    try:
        restored = lokr_diffusers.detach()
        assert "LoraBaseMixin.set_adapters" in restored and "DiffusionPipeline.load_lokr_weights" in restored
        assert not hasattr(DiffusionPipeline, "load_lokr_weights")
        assert not hasattr(LoraBaseMixin.set_adapters, patches.ORIGINAL)
        assert patches.patched() == []
    finally:
        lokr_diffusers.attach()
        lokr_diffusers.attach()  # idempotent
    assert hasattr(DiffusionPipeline, "load_lokr_weights")
    assert patches.original(LoraBaseMixin.set_adapters) is patches.original(wrapped)
    assert len(patches.patched()) == len(set(patches.patched()))


def _mixed_file() -> dict[str, torch.Tensor]:
    """LoKr "a" on the modules the LoRA file leaves free, plus the LoRA file: one adapter, two kinds."""
    lora = lora_file()
    lora_modules = {k.split(".")[0] for k in lora}
    lokr = {k: v for k, v in lokr_files()["a"].items() if k.split(".")[0] not in lora_modules}
    assert lokr and len(lokr) < len(lokr_files()["a"])
    return {**lokr, **lora}


def test_a_mixed_file_is_one_adapter_of_both_kinds(base) -> None:
    pipe, expected = _copy(base), _copy(base)
    for p in (pipe, expected):
        p.load_lora_weights(_mixed_file(), adapter_name="mix")
    start = outputs(pipe)
    assert pipe.get_list_adapters() == {"unet": ["mix"], "text_encoder": ["mix"]}
    assert pipe.get_active_adapters() == ["mix"]
    pipe.set_adapters("mix", 0.5)
    expected.set_lokr_adapters("mix", 0.5)
    own(expected, "set_adapters", "mix", 0.5)
    assert_differ(outputs(pipe), start)
    assert_close(outputs(pipe), outputs(expected))
    pipe.delete_adapters("mix")
    assert not any(pipe.get_list_adapters().values())
    assert_close(outputs(pipe), outputs(_copy(base)))


def test_sdxl_pipeline_methods_match_the_lokr_methods() -> None:
    """The SDXL mixin (three components, its own fuse_lora defaults) drives LoKr the same way."""
    from helpers.writers import write_adapter

    from lokr_diffusers import LoKrConfig, add_lokr
    from lokr_diffusers.tiny import make_sdxl_pipeline

    src = make_sdxl_pipeline(0)
    add_lokr(src, {c: LoKrConfig(r=2, init_weights=False) for c in ("unet", "text_encoder", "text_encoder_2")}, "x")
    sd = write_adapter(src, "x", "kohya")
    g = torch.Generator().manual_seed(0)
    sample = (torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, 64, generator=g))
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}

    def out(p):
        with torch.no_grad():
            u = p.unet(sample[0], torch.tensor([5]), sample[1], added_cond_kwargs=cond).sample
            e = p.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=False)
        return (u, e[0], e[2])

    def pair():
        a, b = make_sdxl_pipeline(0), make_sdxl_pipeline(0)
        for p in (a, b):
            p.load_lora_weights(dict(sd), adapter_name="x")
        return a, b

    base = out(make_sdxl_pipeline(0))
    a, b = pair()
    assert a.get_list_adapters() == {c: ["x"] for c in ("unet", "text_encoder", "text_encoder_2")}
    assert_differ(out(a), base)
    a.set_adapters("x", {"unet": 0.5, "text_encoder_2": 0.25})
    b.set_lokr_adapters("x", {"unet": 0.5, "text_encoder": 1.0, "text_encoder_2": 0.25})
    assert_close(out(a), out(b))
    a.fuse_lora(lora_scale=0.5)  # SDXL's default components: unet, text_encoder, text_encoder_2
    b.fuse_lokr(lokr_scale=0.5)
    assert_close(out(a), out(b))
    a.unfuse_lora()
    b.unfuse_lokr()
    a.disable_lora()
    assert_close(out(a), base)
    a.enable_lora()
    assert_close(out(a), out(b))
    a.unload_lora_weights()
    assert_close(out(a), base, atol=0)
    assert a.get_list_adapters() == {}


def test_lora_only_pipelines_take_diffusers_path_untouched(base) -> None:
    pipe, ref = _copy(base), _copy(base)
    for p in (pipe, ref):
        p.load_lora_weights(dict(lora_file()), adapter_name="lora")
    pipe.set_adapters("lora", 0.5)
    own(ref, "set_adapters", "lora", 0.5)
    pipe.fuse_lora(lora_scale=0.7)
    own(ref, "fuse_lora", components=["unet", "text_encoder"], lora_scale=0.7)
    pipe.unet.disable_adapters()
    own(ref, "disable_adapters", component="unet")
    assert pipe.get_list_adapters() == own(ref, "get_list_adapters") == {"unet": ["lora"], "text_encoder": ["lora"]}
    assert_close(outputs(pipe), outputs(ref), atol=0)
    touched = {c: [k for k in vars(getattr(pipe, c)) if "lokr" in k] for c in COMPS}
    assert touched == {c: [] for c in COMPS}


def test_enable_lora_hotswap_then_both_kinds_load_and_swap(base) -> None:
    """diffusers' enable_lora_hotswap (called before the first load, as diffusers asks) leaves LoKr
    loading and LoKr hot-swapping as they are."""
    other = _source("a", 11)
    pipe, expected = _copy(base), _copy(base)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(dict(lokr_files()["a"]), adapter_name="kr")
    pipe.load_lora_weights(dict(lora_file()), adapter_name="lora")
    pipe.load_lora_weights(dict(other), adapter_name="kr", hotswap=True)
    expected.load_lora_weights(dict(other), adapter_name="kr")
    expected.load_lora_weights(dict(lora_file()), adapter_name="lora")
    assert_close(outputs(pipe), outputs(expected))
