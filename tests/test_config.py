"""LoKrConfig: field checks (types, values, regexes) and reading adapter_config.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lokr_diffusers.config import LoKrConfig, compile_pattern, read_adapter_config

PEFT_0_21_CONFIG = {  # what peft 0.21 writes for a LoKr adapter (keys we do not use are dropped)
    "alpha": 8, "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "decompose_both": False,
    "decompose_factor": -1, "exclude_modules": None, "inference_mode": True, "init_weights": True,
    "layers_pattern": None, "layers_to_transform": None, "module_dropout": 0.0, "modules_to_save": None,
    "peft_type": "LOKR", "r": 4, "rank_dropout": 0.0, "rank_dropout_scale": False, "rank_pattern": {"to_q": 2},
    "revision": None, "target_modules": ["to_k", "to_q"], "task_type": None, "use_effective_conv2d": True,
}


def test_a_peft_written_config_reads(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(PEFT_0_21_CONFIG))
    config, raw = read_adapter_config(str(path))
    assert (config.r, config.alpha, config.rank_pattern, config.use_effective_conv2d) == (4, 8, {"to_q": 2}, True)
    assert raw == PEFT_0_21_CONFIG


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "not valid JSON: Expecting value at line 1 column 1"),
    (b'{"r": 4,\n "alpha": }', "not valid JSON: Expecting value at line 2 column 11"),
    (b"null", "holds a JSON NoneType, not an object"),
    (b"\x89PNG\r\n", "not a UTF-8 text file"),
    (json.dumps({**PEFT_0_21_CONFIG, "peft_type": "LORA"}).encode(), "peft_type is 'LORA', not 'LOKR' (a LoRA"),
    (json.dumps({**PEFT_0_21_CONFIG, "r": 4.5}).encode(), "r must be a positive integer, got 4.5"),
    (json.dumps({**PEFT_0_21_CONFIG, "target_modules": "to_(q"}).encode(), "target_modules: 'to_(q' is not a valid"),
    (json.dumps({**PEFT_0_21_CONFIG, "layers_to_transform": "0"}).encode(), "layers_to_transform must be"),
])
def test_bad_config_file_names_the_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        read_adapter_config(str(path))
    assert type(caught.value) is ValueError
    assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value), str(caught.value)
    assert path.read_bytes() == content


def test_missing_config_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: nowhere/adapter_config\.json"):
        read_adapter_config("nowhere/adapter_config.json")


def test_from_dict_wants_a_dict() -> None:
    with pytest.raises(TypeError, match=r"must be a dict \(a JSON object\), got list"):
        LoKrConfig.from_dict([("r", 4)])  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [0, -2.0])
def test_alpha_zero_or_negative_warns(caplog: pytest.LogCaptureFixture, alpha: float) -> None:
    with caplog.at_level(logging.WARNING):
        config = LoKrConfig(alpha=alpha)
    assert config.alpha == alpha and f"alpha={alpha}" in caplog.text


def test_tuples_and_sets_become_lists() -> None:
    config = LoKrConfig(target_modules={"to_v", "to_q"}, layers_to_transform=2)
    assert config.target_modules == ["to_q", "to_v"] and config.layers_to_transform == [2]


def test_compile_pattern_names_field_and_pattern() -> None:
    assert compile_pattern("target_modules", r".*to_q").fullmatch("a.to_q")
    with pytest.raises(ValueError, match=r"alpha_pattern: 'x\(' is not a valid regular expression \(missing \)"):
        compile_pattern("alpha_pattern", r"(.*\.)?(x()$", "x(")
