"""LoKrConfig: PEFT's LoKr fields and defaults, plus LyCORIS' `full_matrix`.

`lora_alpha` is accepted as an alias of `alpha` (the diffusers/PEFT docs example passes it).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

CONFIG_NAME = "adapter_config.json"


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
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        for name in ("rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if self.decompose_factor == 0:
            raise ValueError("decompose_factor must be -1 (near sqrt) or a positive integer, got 0")
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, pattern_name)
            if not isinstance(pattern, dict):
                raise TypeError(f"{pattern_name} must be a dict of {{regex: value}}, got {type(pattern).__name__}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    # ------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `peft_type` and `lora_alpha`-free, PEFT field names."""
        d = asdict(self)
        d["peft_type"] = "LOKR"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoKrConfig:
        """Build from our dict or a PEFT adapter_config.json (unknown PEFT-only keys are dropped)."""
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
        if os.path.isdir(p):
            p = os.path.join(p, CONFIG_NAME)
        with open(p, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

