"""paths.py: the path choice per device type. "measure" times both paths once per key and keeps the
answer; the measurement itself changes nothing a user can see (no .grad, no random numbers, same
outputs as either path); "model" is the CPU's default."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel, paths
from lokr_diffusers.model import lokr_layers


@pytest.fixture(autouse=True)
def default_choice() -> Iterator[None]:
    paths.set_path_choice(None)
    yield
    paths.set_path_choice(None)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every real measurement's answer, in order."""
    seen: list[bool] = []
    real = paths.bypass_is_faster

    def spy(*args: object) -> bool:
        seen.append(real(*args))  # type: ignore[arg-type]
        return seen[-1]

    monkeypatch.setattr(paths, "bypass_is_faster", spy)
    return seen


def _model(train: bool = True) -> LoKrModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    cfg = LoKrConfig(r=4, alpha=4, target_modules=["0", "2"], init_weights=False)
    return LoKrModel(base, cfg, "a").train(train)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_defaults_per_device_type() -> None:
    assert paths.path_choice("cpu") == "model"
    assert paths.path_choice("cuda") == "measure"
    paths.set_path_choice("model", "cuda")
    assert paths.path_choice("cuda") == "model" and paths.path_choice("cpu") == "model"
    paths.set_path_choice("measure")
    assert paths.path_choice("cpu") == "measure" and paths.path_choice("cuda") == "measure"
    paths.set_path_choice(None)
    assert paths.path_choice("cpu") == "model"
    with pytest.raises(ValueError, match="path choice"):
        paths.set_path_choice("fastest")


def test_model_choice_measures_nothing(calls: list[bool]) -> None:
    model = _model()
    model(torch.randn(2, 5, 32))
    assert calls == []


def test_measured_once_per_key_and_kept(calls: list[bool]) -> None:
    paths.set_path_choice("measure", "cpu")
    layer = dict(lokr_layers(_model()))["model.0"]
    for _ in range(3):
        layer(torch.randn(2, 5, 32))
    assert len(calls) == 1
    layer(torch.randn(2, 7, 32))  # another input shape: another key
    assert len(calls) == 2
    with torch.no_grad():
        layer(torch.randn(2, 7, 32))  # no gradients (training mode: no reuse): another key
    assert len(calls) == 3
    paths.set_path_choice("measure", "cpu")  # setting again forgets what was measured
    with torch.no_grad():
        layer(torch.randn(2, 7, 32))
    assert len(calls) == 4


@pytest.mark.parametrize("answer", [True, False])
def test_the_measured_answer_is_the_path_taken(monkeypatch: pytest.MonkeyPatch, answer: bool) -> None:
    paths.set_path_choice("measure", "cpu")
    monkeypatch.setattr(paths, "bypass_is_faster", lambda *a: answer)
    layer = dict(lokr_layers(_model()))["model.0"]
    taken: list[str] = []
    real_bypass, real_joint, real_merged = layer._bypass, layer._with_bypass, layer._run_merged
    monkeypatch.setattr(layer, "_bypass", lambda *a: (taken.append("bypass"), real_bypass(*a))[1])
    monkeypatch.setattr(layer, "_with_bypass", lambda *a: (taken.append("bypass"), real_joint(*a))[1])
    monkeypatch.setattr(layer, "_run_merged", lambda *a: (taken.append("merged"), real_merged(*a))[1])
    layer(torch.randn(2, 5, 32)).sum().backward()
    assert taken == ["bypass" if answer else "merged"]


def test_measuring_changes_nothing_a_user_sees(calls: list[bool]) -> None:
    """Same outputs and gradients as the cost model's choice (fp32 rounding), no .grad left by the
    measurement, the global RNG untouched."""
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))
    expected = _step(_model(), x)
    paths.set_path_choice("measure", "cpu")
    model = _model()
    rng = torch.get_rng_state()
    layer_out = model(x)  # the first call measures
    assert calls, "nothing was measured: the test cannot see the measurement"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    del layer_out
    out, grads = _step(model, x)
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected[1].keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_nothing_is_measured_while_compiling(calls: list[bool]) -> None:
    paths.set_path_choice("measure", "cpu")
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    compiled(torch.randn(2, 5, 32)).sum().backward()
    torch._dynamo.reset()
    assert calls == []


def test_bypass_is_faster_compares_medians() -> None:
    import time

    assert paths.bypass_is_faster(lambda: None, lambda: time.sleep(0.002), torch.device("cpu"))
    assert not paths.bypass_is_faster(lambda: time.sleep(0.002), lambda: None, torch.device("cpu"))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_measuring_inside_gradient_checkpointing(calls: list[bool], use_reentrant: bool) -> None:
    """The first call measures inside torch.utils.checkpoint (as in training with gradient
    checkpointing): the timed graphs stay out of checkpoint's saved-tensor bookkeeping, and the
    gradients are those of the cost model's choice."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    expected = _step(_model(), x)
    paths.set_path_choice("measure", "cpu")
    model = _model()
    out = checkpoint(model.model, x, use_reentrant=use_reentrant)
    out.square().mean().backward()
    assert calls, "nothing was measured: the test cannot see the measurement"
    torch.testing.assert_close(out.detach(), expected[0], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected[1].keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[1][n], rtol=1e-4, atol=1e-6, msg=n)
