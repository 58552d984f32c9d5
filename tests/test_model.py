"""LoKrModel: targeting rules, adapters, merge/unload, trainability, state dicts, and bad input.

Each bad-input case checks the error names the culprit and the model is left exactly as it was.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel, lokr_layers
from lokr_diffusers.layers import LoKrLayer
from lokr_diffusers.modules_to_save import ModulesToSaveWrapper


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(16, 16)
        self.to_v = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b.norm(b.to_v(b.to_q(x)))
        return self.head(x)


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _targets(model: nn.Module) -> list[str]:
    return [n for n, _ in lokr_layers(model)]


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(target_modules=["to_q"]), ["layers.0.to_q", "layers.1.to_q", "layers.2.to_q"]),
        (dict(target_modules=["layers.1.to_q", "head"]), ["layers.1.to_q", "head"]),
        (dict(target_modules=r"layers\.[02]\.to_(q|v)"), ["layers.0.to_q", "layers.0.to_v", "layers.2.to_q",
                                                            "layers.2.to_v"]),
        (dict(target_modules=["to_q", "to_v"], exclude_modules=["layers.0.to_v"]),
         ["layers.0.to_q", "layers.1.to_q", "layers.1.to_v", "layers.2.to_q", "layers.2.to_v"]),
        (dict(target_modules=["to_q", "conv"], layers_to_transform=[1], layers_pattern="layers"),
         ["layers.1.to_q", "layers.1.conv"]),
        (dict(target_modules=["to_q"], layers_to_transform=2), ["layers.2.to_q"]),
    ],
)
def test_targeting_rules(kwargs: dict, expected: list[str]) -> None:
    model = LoKrModel(_net(), LoKrConfig(**kwargs), "default")
    assert sorted(_targets(model.model)) == sorted(expected)


def test_rank_and_alpha_patterns_first_match_wins() -> None:
    cfg = LoKrConfig(r=2, alpha=2, target_modules=["to_q", "to_v"],
                     rank_pattern={r"layers\.1\.to_q": 4, "to_q": 6}, alpha_pattern={"to_v": 8})
    model = LoKrModel(_net(), cfg)
    layers = dict(lokr_layers(model.model))
    assert layers["layers.1.to_q"].r["default"] == 4 and layers["layers.0.to_q"].r["default"] == 6
    assert layers["layers.0.to_v"].r["default"] == 2 and layers["layers.0.to_v"].alpha["default"] == 8
    assert layers["layers.0.to_v"].scaling["default"] == 4.0 and layers["layers.0.to_q"].scaling["default"] == 2 / 6


BAD = [
    (dict(target_modules=["to_q", "to_k"]), ValueError, "to_k"),
    (dict(target_modules=r"nothing\..*"), ValueError, "match no module"),
    (dict(target_modules=["norm"]), TypeError, "LayerNorm"),
    (dict(target_modules=["to_q"], rank_pattern={"to_v": 4}), ValueError, "rank_pattern key 'to_v'"),
    (dict(target_modules=["to_q"], alpha_pattern={"head": 4}), ValueError, "alpha_pattern key 'head'"),
    (dict(target_modules=["to_q"], rank_pattern={"to_q": 0}), ValueError, "rank_pattern"),
    (dict(target_modules=["to_q"], modules_to_save=["missing"]), ValueError, "missing"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_config_leaves_model_unchanged(kwargs: dict, error: type, message: str) -> None:
    net = _net()
    before = _snapshot(net)
    with pytest.raises(error, match=message):
        LoKrModel(net, LoKrConfig(**kwargs), "default")
    after = _snapshot(net)
    assert after[0] == before[0] and after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])


def test_bad_second_adapter_leaves_first_untouched() -> None:
    model = LoKrModel(_net(), LoKrConfig(target_modules=["to_q"], init_weights=False))
    before = _snapshot(model.model)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoKrConfig(target_modules=["to_q"]))
    with pytest.raises(TypeError, match="LayerNorm"):
        model.add_adapter("b", LoKrConfig(target_modules=["to_q", "norm"]))
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter("a.b", LoKrConfig(target_modules=["to_q"]))
    assert _snapshot(model.model)[0] == before[0] and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(r: float) -> None:
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoKrConfig(r=r)


def test_config_alias_and_json_round_trip(tmp_path) -> None:
    cfg = LoKrConfig(r=4, lora_alpha=16, target_modules=["to_q"], rank_pattern={"x": 2}, init_weights="lycoris")
    assert cfg.alpha == 16 and cfg.lora_alpha == 16
    with pytest.raises(ValueError, match="disagree"):
        LoKrConfig(alpha=1, lora_alpha=2)
    with pytest.raises(TypeError, match="unknown arguments"):
        LoKrConfig(rank=4)
    cfg.save_pretrained(tmp_path)
    assert LoKrConfig.from_pretrained(tmp_path) == cfg
    assert json.loads(cfg.to_json_string())["peft_type"] == "LOKR"
    peft = pytest.importorskip("peft")
    peft_cfg = peft.LoKrConfig(r=4, alpha=16, target_modules=["to_q"], decompose_both=True)
    peft_cfg.save_pretrained(tmp_path / "p")
    ours = LoKrConfig.from_pretrained(tmp_path / "p")
    assert (ours.r, ours.alpha, ours.decompose_both, ours.target_modules) == (4, 16, True, ["to_q"])


def test_default_targets_and_unknown_architecture() -> None:
    from lokr_diffusers.tiny import make_text_encoder, make_tokenizer

    te = make_text_encoder(make_tokenizer())
    names = _targets(LoKrModel(te, LoKrConfig()).model)
    assert len(names) == 2 * 6 and all(n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
                                       for n in names)
    with pytest.raises(ValueError, match="no default target_modules for Net"):
        LoKrModel(_net(), LoKrConfig())


def test_adapters_set_delete_disable_and_trainable() -> None:
    net = _net()
    x = torch.randn(3, 16)
    base_out = net(x)
    model = LoKrModel(net, LoKrConfig(target_modules=["to_q", "to_v"], init_weights=False), "a")
    model.add_adapter("b", LoKrConfig(target_modules=["to_q"], init_weights=False, r=4))
    assert model.active_adapters == ["a"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a" in n.rsplit("lokr_", 1)[1] for n in trainable)
    out_a = model(x)
    model.set_adapter(["a", "b"])
    out_ab = model(x)
    model.set_adapter("b")
    out_b = model(x)
    assert not torch.allclose(out_a, out_ab) and not torch.allclose(out_b, out_ab)
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), out_b)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"]
    assert all("b" not in layer.plans for _, layer in lokr_layers(model.model))
    with pytest.raises(ValueError, match="unknown adapters"):
        model.set_adapter("b")


def test_passthrough_attributes() -> None:
    from lokr_diffusers.tiny import make_sd_pipeline

    unet = make_sd_pipeline().unet
    wrapped = LoKrModel(unet, LoKrConfig())
    assert wrapped.config is unet.config and wrapped.dtype == unet.dtype and wrapped.device == unet.device
    assert wrapped.config.in_channels == 4


def test_merge_unmerge_and_unload_restore_the_model() -> None:
    net = _net()
    reference = copy.deepcopy(net)
    x = torch.randn(3, 16)
    model = LoKrModel(net, LoKrConfig(target_modules=["to_q", "to_v", "head"], init_weights=False))
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    plain = model.unload()
    assert plain is net and not _targets(plain)
    assert plain.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in reference.state_dict().items())
    model2 = LoKrModel(copy.deepcopy(reference), LoKrConfig(target_modules=["to_q"], init_weights=False))
    with torch.no_grad():
        out2 = model2(x)
        merged = model2.merge_and_unload()
        assert not _targets(merged) and isinstance(merged.layers[0].to_q, nn.Linear)
        torch.testing.assert_close(merged(x), out2, rtol=1e-5, atol=1e-5)


def test_adapter_state_dict_round_trip_and_validation() -> None:
    a = LoKrModel(_net(0), LoKrConfig(target_modules=["to_q", "conv"], init_weights=False, use_effective_conv2d=True,
                                      r=1))
    b = LoKrModel(_net(0), LoKrConfig(target_modules=["to_q", "conv"], init_weights=True, use_effective_conv2d=True,
                                      r=1))
    sd = a.get_adapter_state_dict()
    assert all(k.startswith("base_model.model.layers.") for k in sd) and any(k.endswith("lokr_t2") for k in sd)
    b.set_adapter_state_dict(sd)
    x = torch.randn(3, 16)
    assert torch.equal(a(x), b(x))
    bad = dict(sd)
    bad["base_model.model.head.lokr_w1"] = torch.zeros(2, 2)
    with pytest.raises(KeyError, match="match no LoKr module"):
        b.set_adapter_state_dict(bad)
    missing = {k: v for k, v in sd.items() if "layers.0.to_q" not in k}
    with pytest.raises(KeyError, match="get no tensors"):
        b.set_adapter_state_dict(missing)
    wrong = {**sd, "base_model.model.layers.0.to_q.lokr_w1": torch.zeros(3, 3)}
    before = {k: v.clone() for k, v in b.get_adapter_state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.0\.to_q"):
        b.set_adapter_state_dict(wrong)
    assert all(torch.equal(v, before[k]) for k, v in b.get_adapter_state_dict().items())


def test_modules_to_save() -> None:
    net = _net()
    model = LoKrModel(net, LoKrConfig(target_modules=["to_q"], modules_to_save=["head"]))
    assert isinstance(net.head, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in net.head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in net.head.original_module.parameters())
    with torch.no_grad():
        net.head.modules_to_save["default"].bias.add_(1.0)
    x = torch.randn(2, 16)
    out = model(x)
    sd = model.get_adapter_state_dict()
    assert "base_model.model.head.bias" in sd
    plain = model.merge_and_unload()
    assert isinstance(plain.head, nn.Linear)
    torch.testing.assert_close(plain(x), out)


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    model = LoKrModel(_net(), LoKrConfig(target_modules=["to_q"], r=2))
    trainable, total = model.get_nb_trainable_parameters()
    expected = sum(layer.plans["default"].numel() for _, layer in lokr_layers(model.model))
    assert trainable == expected and total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")


def test_injecting_into_a_lokr_layer_base_is_not_possible() -> None:
    model = LoKrModel(_net(), LoKrConfig(target_modules=r".*to_q.*"))
    assert all(isinstance(m, LoKrLayer) for n, m in model.model.named_modules() if n.endswith("to_q"))
    model.add_adapter("b", LoKrConfig(target_modules=r".*to_q.*"))  # the base_layer inside is never a target
    assert all(sorted(layer.plans) == ["b", "default"] for _, layer in lokr_layers(model.model))


def test_safe_merge_on_the_model_is_all_or_nothing() -> None:
    model = LoKrModel(_net(), LoKrConfig(target_modules=["to_q", "to_v"], init_weights=False))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    layer = dict(lokr_layers(model.model))["layers.2.to_v"]
    with torch.no_grad():
        layer.lokr_w1["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(v, before[k]) or torch.isnan(v).any() for k, v in model.model.state_dict().items())
    assert not any(la.merged for _, la in lokr_layers(model.model))
