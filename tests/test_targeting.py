"""targeting: PEFT's matching rules, and errors that name the config field and the pattern."""

from __future__ import annotations

import pytest
from torch import nn

from lokr_diffusers.config import LoKrConfig
from lokr_diffusers.targeting import find_targets, is_target, pattern_value


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])


def test_matching_rules() -> None:
    config = LoKrConfig(target_modules=["to_q"], rank_pattern={r"layers\.1\.to_q": 2}, alpha_pattern={"to_q": 3.0})
    targets = find_targets(Net(), config, (nn.Linear,))
    assert [(t.name, t.r, t.alpha) for t in targets] == [("layers.0.to_q", 8, 3.0), ("layers.1.to_q", 2, 3.0)]
    regex = LoKrConfig(target_modules=r"layers\.0\..*", exclude_modules=["norm"])
    assert [t.name for t in find_targets(Net(), regex, (nn.Linear,))] == ["layers.0.to_q", "layers.0.to_k"]


@pytest.mark.parametrize(("field_name", "value", "shown"), [
    ("target_modules", "to_q)", "to_q)"),
    ("exclude_modules", "[norm", "[norm"),
    ("modules_to_save", ["norm("], "norm("),
    ("layers_pattern", "layers[", "layers["),
])
def test_bad_regex_set_after_creation_names_the_field(field_name: str, value: object, shown: str) -> None:
    config = LoKrConfig(target_modules=["to_q"], layers_to_transform=[0])
    setattr(config, field_name, value)
    with pytest.raises(ValueError, match=rf"^{field_name}: '{__import__('re').escape(shown)}' is not a valid regular"):
        is_target(config, "layers.0.to_q")


def test_pattern_value_names_the_field() -> None:
    assert pattern_value({r"to_(q|k)": 2}, "layers.0.to_k", 8, "rank_pattern") == 2
    assert pattern_value({r"to_v": 2}, "layers.0.to_k", 8, "rank_pattern") == 8
    with pytest.raises(ValueError, match=r"^rank_pattern: '\?to_q' is not a valid regular expression"):
        pattern_value({"?to_q": 2}, "layers.0.to_q", 8, "rank_pattern")


def test_unknown_target_and_unused_pattern_are_named() -> None:
    with pytest.raises(ValueError, match=r"target_modules \['to_x'\] match no module of Net"):
        find_targets(Net(), LoKrConfig(target_modules=["to_q", "to_x"]), (nn.Linear,))
    with pytest.raises(ValueError, match=r"rank_pattern key 'to_v' matches no targeted module"):
        find_targets(Net(), LoKrConfig(target_modules=["to_q"], rank_pattern={"to_v": 2}), (nn.Linear,))
