"""LoKrConfig: PEFT's LoKr fields and defaults, plus LyCORIS' `full_matrix`.

`lora_alpha` is accepted as an alias of `alpha` (the diffusers/PEFT docs example passes it).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from numbers import Real
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
V = TypeVar("V")


@functools.lru_cache(maxsize=512)
def compile_pattern(field_name: str, regex: str, shown: str | None = None) -> re.Pattern[str]:
    """`re.compile(regex)`, or a ValueError naming the config field and the pattern (`shown`, when
    the field's value is embedded in a larger regex)."""
    try:
        return re.compile(regex)
    except re.error as err:
        raise ValueError(f"{field_name}: {shown if shown is not None else regex!r} is not a valid regular "
                         f"expression ({err}); fix it, or escape it with re.escape() to match it literally") from None


def pattern_regex(field_name: str, pattern: str) -> re.Pattern[str]:
    """A rank_pattern / alpha_pattern key as the regex `(.*\\.)?(pattern)$` (ValueError naming
    the field and the key when it is not a valid regex)."""
    return compile_pattern(field_name, rf"(.*\.)?({pattern})$", pattern)


def pattern_value(patterns: Mapping[str, V], key: str, default: V, field_name: str = "rank_pattern/alpha_pattern"
                  ) -> V:
    """The value of the first pattern matching `key` as `(.*\\.)?(pattern)$`, else `default`."""
    for pattern, value in patterns.items():
        if pattern_regex(field_name, pattern).match(key):
            return value
    return default


def _check_number(name: str, value: Any) -> None:
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclass(init=False)
class LoKrConfig:
    """Configuration of one LoKr adapter.

    Args:
        r: rank of the low-rank factors.
        alpha: scale numerator; a fresh adapter uses scale = alpha / r (PEFT's rule).
        rank_dropout: probability of dropping an output row of ΔW, training only.
        module_dropout: probability of skipping the whole adapter for a step, training only.
        rank_dropout_scale: rescale the kept rows by 1 / mean(kept).
        use_effective_conv2d: Tucker ("effective conv2d") factor for convs with kernel > 1.
        decompose_both: also make W1 low-rank when r < max(W1's dims) / 2.
        decompose_factor: Kronecker split factor; -1 splits near sqrt(dim).
        target_modules: list (exact name or `.suffix` match) or str (full regex); None = defaults.
        exclude_modules: same matching, removed from the targets.
        init_weights: True (W1 zero, ΔW = 0), "lycoris" (W2 zero, ΔW = 0), False (random).
        layers_to_transform / layers_pattern: restrict to these layer indices (PEFT semantics).
        rank_pattern / alpha_pattern: {regex: value}; the first key matching a module's name wins.
        modules_to_save: extra modules trained in full and saved with the adapter.
        full_matrix: force every factor full (LyCORIS).
        inference_mode: adapter parameters are created frozen.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | Literal["lycoris"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    full_matrix: bool = False
    inference_mode: bool = False

    def __init__(self, **kwargs: Any) -> None:
        if "lora_alpha" in kwargs:
            alias = kwargs.pop("lora_alpha")
            if "alpha" in kwargs and kwargs["alpha"] != alias:
                raise ValueError(f"alpha={kwargs['alpha']} and lora_alpha={alias} disagree; pass one of them")
            kwargs["alpha"] = alias
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"LoKrConfig got unknown arguments {unknown}; known: {sorted(known)}")
        for name, f in known.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        self._validate()

    @property
    def lora_alpha(self) -> float:
        return self.alpha

    def _validate(self) -> None:
        """Types first (TypeError naming the field), then values (ValueError); regexes compiled here,
        so a bad pattern fails when the config is made, not deep inside injection."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        _check_number("alpha", self.alpha)
        if self.alpha <= 0:
            logger.warning("alpha=%s: the scale alpha / r is %s, the adapter %s", self.alpha,
                           "0" if self.alpha == 0 else "negative", "changes nothing" if self.alpha == 0 else
                           "is applied reversed")
        for name in ("rank_dropout", "module_dropout"):
            p = getattr(self, name)
            _check_number(name, p)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        for name in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale", "full_matrix", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.init_weights not in (True, False, "lycoris") or not isinstance(self.init_weights, (bool, str)):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if not isinstance(self.decompose_factor, int) or isinstance(self.decompose_factor, bool):
            raise TypeError(f"decompose_factor must be an integer, got {self.decompose_factor!r}")
        if self.decompose_factor == 0:
            raise ValueError("decompose_factor must be -1 (near sqrt) or a positive integer, got 0")
        self._validate_names()
        self._validate_patterns()

    def _validate_names(self) -> None:
        for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if name != "layers_pattern" else list(value)
                setattr(self, name, value)
            if value is None or (isinstance(value, str) and name != "modules_to_save"):
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                kinds = "a list of str" + (", a str (regex)" if name != "modules_to_save" else "")
                raise TypeError(f"{name} must be {kinds} or None, got {value!r}")
        if isinstance(self.target_modules, str):
            compile_pattern("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            compile_pattern("exclude_modules", self.exclude_modules)
        for pattern in [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []:
            compile_pattern("layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", pattern)
        for module in self.modules_to_save or []:
            compile_pattern("modules_to_save", rf"(^|.*\.){module}($|\..*)", module)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, list) or
                                   not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise TypeError(f"layers_to_transform must be an int, a list of int or None, got {layers!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")

    def _validate_patterns(self) -> None:
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, pattern_name)
            if not isinstance(pattern, dict):
                raise TypeError(f"{pattern_name} must be a dict of {{regex: value}}, got {type(pattern).__name__}")
            for key, value in pattern.items():
                if not isinstance(key, str):
                    raise TypeError(f"{pattern_name} keys must be str (regexes), got {key!r}")
                compile_pattern(pattern_name, rf"(.*\.)?({key})$", key)
                if pattern_name == "alpha_pattern":
                    _check_number(f"alpha_pattern[{key!r}]", value)
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")

    # ------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `peft_type` and `lora_alpha`-free, PEFT field names."""
        d = asdict(self)
        d["peft_type"] = "LOKR"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoKrConfig:
        """Build from our dict or a PEFT adapter_config.json (unknown PEFT-only keys are dropped)."""
        if not isinstance(d, dict):
            raise TypeError(f"a LoKr config must be a dict (a JSON object), got {type(d).__name__}")
        known = {f.name for f in fields(cls)} | {"lora_alpha"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> LoKrConfig:
        """Read a folder holding adapter_config.json, or the JSON file itself."""
        p = os.fspath(path)
        return read_adapter_config(os.path.join(p, CONFIG_NAME) if os.path.isdir(p) else p)[0]


def load_config_json(path: str) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file for anything else (OSError when unreadable)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err}); is it really an adapter_config.json?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; fix the "
                         "file or save it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object ({{\"r\": ..., "
                         "\"alpha\": ...}); fix the file or save it again")
    return data


def read_adapter_config(path: str) -> tuple[LoKrConfig, dict[str, Any]]:
    """(LoKrConfig, the raw dict) of a PEFT adapter_config.json; every problem is a ValueError
    naming the file and the field."""
    data = load_config_json(path)
    peft_type = data.get("peft_type", "LOKR")
    if not isinstance(peft_type, str) or peft_type.upper() != "LOKR":
        hint = " (a LoRA adapter: load it with pipe.load_lora_weights)" if str(peft_type).upper() == "LORA" else ""
        raise ValueError(f"{path}: peft_type is {peft_type!r}, not 'LOKR'{hint}")
    try:
        return LoKrConfig.from_dict(data), data
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
