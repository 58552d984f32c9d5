"""torch.compile with LoKr (issue 10 item 4): `fullgraph=True` traces the adapted model, and changing
what does not change shapes (factor values, an adapter's weight or scale, diffusers' call scale, a
hotswap of equal shapes) recompiles nothing, while the compiled model still sees every change.

Dynamo's guards do not depend on the backend, so the cheap "eager" backend counts recompilations;
"aot_eager" runs backward through the traced graph. Each change is checked twice: the compiled
output equals the eager output after it (so the change reached the graph), and the compiled model
was not recompiled (`torch.compiler.set_stance("fail_on_recompile")` raises if it would be).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers.layers import LoKrLayer
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.scaling import call_scale


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """A Linear, a 3x3 Conv2d (Tucker factors) and a Conv1d: each layer type the injector makes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 64)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.conv(img)  # (B, 8, 6, 6)
        h = self.conv1d(h.flatten(2)).mean(-1)  # (B, 8)
        return self.proj(x).mean(1) + h.sum(-1, keepdim=True)  # (B, 64)


def _model(names: tuple[str, ...] = ("a",), dora: bool = False) -> LoKrModel:
    torch.manual_seed(0)
    base = Block()
    cfg = LoKrConfig(r=4, alpha=2, target_modules=["proj", "conv", "conv1d"], init_weights=False,
                     use_effective_conv2d=True, decompose_factor=2)
    model = LoKrModel(base, cfg, names[0])
    for n in names[1:]:
        model.add_adapter(n, cfg)
    if dora:
        for _, layer in lokr_layers(model):
            layer.dora_scale[names[0]] = nn.Parameter(layer.weight.detach().flatten(1).norm(dim=1).view(
                -1, *[1] * (layer.weight.dim() - 1)) * 1.1)
            layer.commit(layer.state)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 32, generator=g), torch.randn(2, 4, 6, 6, generator=g)


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def assert_same_without_recompiling(model: nn.Module, compiled: Callable, change: Callable[[], object]) -> None:
    """The compiled model's output, after `change`, equals eager's and differs from before it, with no
    new graph."""
    x, img = _inputs()
    with torch.no_grad():
        before = compiled(x, img)
        n = graphs()
        change()
        torch.compiler.set_stance("fail_on_recompile")
        try:
            after = compiled(x, img)
        finally:
            torch.compiler.set_stance("default")
        expected = model(x, img)
    assert graphs() == n
    assert not torch.equal(before, after), "the change did not change the output: the test cannot see it"
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def _layers(model: nn.Module) -> list[LoKrLayer]:
    return [layer for _, layer in lokr_layers(model)]


def _scale_factors(model: nn.Module) -> None:
    for layer in _layers(model):
        for t in layer.factors("a").values():
            t.mul_(1.5)


CHANGES: dict[str, Callable[[LoKrModel], object]] = {
    "factor values in place (an optimizer step)": _scale_factors,
    "adapter weight": lambda m: m.set_adapter_weight("a", 0.3),
    "adapter scale (a hotswap with another alpha)": lambda m: [
        layer.set_scale("a", layer.scaling["a"] * 3) for layer in _layers(m)],
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("mode", ["auto", "merged", "bypass"])
def test_change_reaches_compiled_model_without_recompiling(change: str, mode: str) -> None:
    model = _model().eval()
    model.set_forward_mode(mode)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert_same_without_recompiling(model, compiled, lambda: CHANGES[change](model))


def test_call_scale_reaches_compiled_model_without_recompiling() -> None:
    model = _model().eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, img = _inputs()
    with torch.no_grad():
        compiled(x, img)
        n = graphs()
        torch.compiler.set_stance("fail_on_recompile")
        try:
            with call_scale([model], 0.25):
                scaled = compiled(x, img)
            plain = compiled(x, img)
        finally:
            torch.compiler.set_stance("default")
        with call_scale([model], 0.25):
            expected = model(x, img)
        assert graphs() == n
        torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain, model(x, img), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(scaled, plain)


def test_two_adapters_and_dora_compile_fullgraph() -> None:
    model = _model(("a", "b"), dora=True).eval()
    model.set_adapter(["a", "b"])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, img = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, img), model(x, img), rtol=1e-5, atol=1e-5)
    assert_same_without_recompiling(model, compiled, lambda: [layer.set_adapter_weight("b", -0.7)
                                                              for layer in _layers(model)])


def test_fused_and_disabled_compile_fullgraph() -> None:
    model = _model().eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, img = _inputs()
    with torch.no_grad():
        unfused = compiled(x, img)
        model.merge_adapter()
        torch.testing.assert_close(compiled(x, img), unfused, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(compiled(x, img), model.model(x, img), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["auto", "merged", "bypass"])
def test_training_step_compiles_fullgraph_with_the_same_gradients(mode: str) -> None:
    model = _model().train()
    model.set_forward_mode(mode)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, img = _inputs()
    compiled(x, img).square().mean().backward()
    ref(x, img).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # an optimizer step changes factor values in place: the next compiled step must not recompile
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    n = graphs()
    torch.compiler.set_stance("fail_on_recompile")
    try:
        compiled(x, img).square().mean().backward()
    finally:
        torch.compiler.set_stance("default")
    assert graphs() == n


@pytest.mark.parametrize("move", [torch.float64, "meta"], ids=["dtype", "device"])
def test_a_move_keeps_traced_numbers_with_the_weight(move: torch.dtype | str) -> None:
    """The traced scales follow the weight to its device (meta: the one other device every machine has), with
    their values, and a cast keeps them."""
    model = _model()
    def numbers(layer: LoKrLayer) -> dict[str, tuple[float, ...]]:
        return {a: tuple(t.item() for t in pair) for a, pair in layer._traced.items()}

    want = {id(layer): numbers(layer) for layer in _layers(model)}
    model.to(move)
    for layer in _layers(model):
        assert layer._traced.keys() == want[id(layer)].keys() and layer._traced
        assert {t.device for pair in layer._traced.values() for t in pair} == {layer.weight.device}
        assert {t.device for t in (layer._call_t, *layer._total.values())} == {layer.weight.device}
        if layer.weight.device.type != "meta":
            assert numbers(layer) == want[id(layer)]


def test_compiled_unet_of_a_pipeline_sees_set_adapters_hotswap_and_call_scale() -> None:
    """`pipe.unet.compile(fullgraph=True)` with a loaded LoKr file: diffusers' set_adapters, a hotswap
    of another file of equal shapes and the call scale reach the compiled UNet without recompiling
    (the call scale after its first change: Dynamo then makes the number symbolic, as for any
    float argument)."""
    from helpers.state_sources import _source, base_pipe, lokr_files

    pipe, ref = base_pipe(), base_pipe()
    for p in (pipe, ref):
        p.load_lora_weights(dict(lokr_files()["a"]), adapter_name="kr")
    unet = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 10]), torch.randn(2, 77, 32, generator=g))

    def run(model: nn.Module, scale: float) -> torch.Tensor:
        return model(*args, cross_attention_kwargs={"scale": scale}).sample

    steps: list[tuple[str, Callable[[object], object], float]] = [
        ("set_adapters", lambda p: p.set_adapters(["kr"], [0.5]), 1.0),
        ("hotswap", lambda p: p.load_lora_weights(dict(_source("a", 11)), adapter_name="kr", hotswap=True), 1.0),
        ("call scale", lambda p: None, 0.5),
    ]
    with torch.no_grad():
        unet.compile(fullgraph=True, backend="eager")
        run(unet, 1.0)
        run(unet, 0.3)  # the one recompilation: the call scale becomes a symbolic float
        for _ in range(2):  # W + ΔW built and stored by one graph, reused by another (reuse.py)
            before = run(unet, 1.0)
        assert any(la.kept.traced is not None for _, la in lokr_layers(unet))
        n = graphs()
        for name, change, scale in steps:
            change(pipe)
            change(ref)
            torch.compiler.set_stance("fail_on_recompile")
            try:
                outs = [run(unet, scale) for _ in range(2)]  # the first call builds, the second reuses
            finally:
                torch.compiler.set_stance("default")
            assert not torch.equal(outs[0], before), name
            expected = run(ref.unet, scale)
            for out in outs:
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)
            before = outs[1]
    assert graphs() == n


def _reusing(model: nn.Module, backend: str = "eager") -> Callable:
    """model compiled with fullgraph=True after two calls without grad: the one that builds and stores
    W + ΔW, and the one that reuses it (two graphs)."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x, img = _inputs()
    with torch.no_grad():
        compiled(x, img)
        compiled(x, img)
    return compiled


def _frozen() -> LoKrModel:
    """Frozen factors, then eval(): whether a layer's adapters are frozen is read at each commit and
    train() / eval() (reuse.py), as when adapters are loaded for inference."""
    model = _model()
    for _, layer in lokr_layers(model):
        for t in layer.factors("a").values():
            t.requires_grad_(False)
    return model.eval()


def test_compiled_inference_reuses_frozen_adapters_at_the_bare_op_count() -> None:
    """Frozen adapters at inference: the first compiled call builds W + ΔW and stores it, the next
    runs a graph with the bare model's ops (graph nodes counted); two graphs in all."""
    model = _frozen()
    bare = copy.deepcopy(model.model)  # the same block with each LoKr layer replaced by its base layer
    for name, layer in lokr_layers(bare):
        setattr(bare, name, layer.base_layer)
    seen: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: object) -> Callable:
        seen.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=record)
    x, img = _inputs()
    with torch.no_grad():
        compiled(x, img)
        compiled(x, img)
        torch.compiler.set_stance("fail_on_recompile")
        try:
            out = compiled(x, img)
        finally:
            torch.compiler.set_stance("default")
        torch.testing.assert_close(out, model(x, img), rtol=1e-5, atol=1e-5)
        torch.compile(bare, fullgraph=True, backend=record)(x, img)
    assert len(seen) == 3  # build, reuse, bare
    assert all(layer.kept.traced is not None for _, layer in lokr_layers(model))
    build, reused, bare_graph = (_ops(gm) for gm in seen)
    assert reused == bare_graph, (reused, bare_graph)
    assert len(build) > len(bare_graph)  # the counter can tell building from reusing


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's calls, by target name (placeholders, attribute reads and the output left out)."""
    return [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")]


@pytest.mark.parametrize("change", ["adapter weight", "adapter scale (a hotswap with another alpha)"])
def test_compiled_reuse_sees_every_change_without_recompiling(change: str) -> None:
    model = _frozen()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, img = _inputs()
    with torch.no_grad():
        compiled(x, img)
        compiled(x, img)  # now reusing
    assert_same_without_recompiling(model, compiled, lambda: CHANGES[change](model))
    with torch.no_grad():
        torch.compiler.set_stance("fail_on_recompile")
        try:
            again = compiled(x, img)  # reusing what the previous call rebuilt
        finally:
            torch.compiler.set_stance("default")
        torch.testing.assert_close(again, model(x, img), rtol=1e-5, atol=1e-5)


def test_compiled_reuse_and_hand_edits_of_frozen_factors_need_forget() -> None:
    """The documented limit (reuse.py): an in-place edit of a frozen factor outside the library is
    seen by eager reuse by itself and by a compiled model after reuse.forget()."""
    from lokr_diffusers import reuse

    model = _frozen()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, img = _inputs()
    with torch.no_grad():
        compiled(x, img)
        stale = compiled(x, img)
        _scale_factors(model)
        assert torch.equal(compiled(x, img), stale)
        reuse.forget()
        torch.testing.assert_close(compiled(x, img), model(x, img), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, img), stale)


def test_an_optimizer_step_or_load_state_dict_drops_compiled_kept_weights() -> None:
    model = _frozen()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, img = _inputs()
    base = [p for n, p in model.named_parameters() if "base_layer" in n]
    opt = torch.optim.SGD(base, lr=0.1)
    for p in base:
        p.grad = torch.ones_like(p)
    for act in (opt.step, lambda: model.load_state_dict({k: v * 1.1 for k, v in model.state_dict().items()})):
        with torch.no_grad():
            compiled(x, img)
            stale = compiled(x, img)
        assert all(layer.kept.traced is not None for _, layer in lokr_layers(model))
        act()
        assert all(layer.kept.traced is None for _, layer in lokr_layers(model))
        with torch.no_grad():
            now = compiled(x, img)
            torch.testing.assert_close(now, model(x, img), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(now, stale)


def test_training_after_compiled_reuse_does_not_use_the_kept_weight() -> None:
    model = _frozen()
    compiled, (x, img) = _reusing(model, "aot_eager"), _inputs()
    model.train()
    assert all(layer.kept.traced is None for _, layer in lokr_layers(model))
    for _, layer in lokr_layers(model):
        for t in layer.factors("a").values():
            t.requires_grad_(True)
    compiled(x, img).square().mean().backward()
    assert all(t.grad is not None for _, la in lokr_layers(model) for t in la.factors("a").values())


def test_a_deep_copy_holds_no_kept_weight_and_is_reached_by_forget() -> None:
    from lokr_diffusers import reuse

    model = _frozen()
    _reusing(model)
    assert all(layer.kept.traced is not None for _, layer in lokr_layers(model))
    twin = copy.deepcopy(model)
    assert all(layer.kept.traced is None and layer.kept in reuse.TRACED.kept for _, layer in lokr_layers(twin))


def test_regional_compilation_of_a_diffusers_model_trains_and_an_optimizer_step_recompiles_nothing() -> None:
    """diffusers' `compile_repeated_blocks` (each FluxTransformerBlock / FluxSingleTransformerBlock compiled, the
    LoKr layers inside): a training step's output and the factors' gradients equal eager's, and after an optimizer
    step the next training step runs on the same graphs."""
    from helpers.dit_models import inputs, tiny

    targets = ["to_q", "to_k", "to_v", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"]
    model = LoKrModel(tiny("flux"), LoKrConfig(r=4, target_modules=targets, init_weights=False), "a").train()
    ref = copy.deepcopy(model)
    model.model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    kw = inputs("flux")
    out = model(**kw).sample
    out.square().mean().backward()
    expected = ref(**kw).sample
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads and all(g is not None for g in grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    n = graphs()
    assert n >= 2  # one graph per block class at least: the blocks were compiled
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad()
    torch.compiler.set_stance("fail_on_recompile")
    try:
        model(**kw).sample.square().mean().backward()
    finally:
        torch.compiler.set_stance("default")
    assert graphs() == n


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
def test_a_plain_adapter_reaches_the_graph_as_one_number_per_layer(dora: bool) -> None:
    """The training graph takes a plain adapter's scale · strength · call scale as one 0-d input per layer (fewer
    inputs to check and pass per call), DoRA's scale and strength · call scale apart; the output and gradients
    equal eager's."""
    model = _model(dora=dora).train()
    x, img = _inputs()
    seen: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        seen.append(sum(isinstance(t, torch.Tensor) and t.dim() == 0 for t in example_inputs))
        return gm.forward

    out = torch.compile(model, backend=backend, fullgraph=True)(x, img)
    grads = torch.autograd.grad(out.square().sum(), [t for la in _layers(model) for t in la.factors("a").values()])
    expected = model(x, img)
    want = torch.autograd.grad(expected.square().sum(), [t for la in _layers(model) for t in la.factors("a").values()])
    assert seen == [len(_layers(model)) * (3 if dora else 1)]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
