"""One adapter's settings in one layer: a record, and PEFT-style read-only views over the records.

A layer holds one `Adapter` per adapter name (`layer.adapters`); its tensors live in the layer's
ParameterDicts (`lokr_w1["default"]`, ...), named like PEFT's so that `state_dict()` keys match.
`layer.r`, `layer.alpha`, `layer.scaling`, ... read one field of every record as PEFT's per-adapter
dicts do (`layer.scaling["default"]`); they cannot be written: the layer's methods change records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from .. import functional as LF

T = TypeVar("T")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be a non-empty string of letters, digits, '_' or '-'")


@dataclass(slots=True)
class Adapter:
    """What one adapter is in one layer, besides its tensors.

    rows / origin: a fused original module (Flux's qkv, linear1) split over diffusers' Linears: the
    adapter's kron is the fused weight, of which this layer holds `rows` (functional.Rows; factors
    shared between the pieces), and `origin` names the original module (what an export writes back).
    """

    plan: LF.LoKrPlan  # with rows: the plan of the adapter's fused weight
    scale: float  # the producer's scale (alpha / r for a fresh adapter)
    r: int
    alpha: float
    rows: LF.Rows | None = None
    origin: str | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False


class Field(Mapping[str, T], Generic[T]):
    """{adapter: one field of its record}, read-only, leaving out adapters whose field is None."""

    __slots__ = ("_name", "_records")

    def __init__(self, records: Mapping[str, Adapter], name: str) -> None:
        self._records, self._name = records, name

    def __getitem__(self, adapter_name: str) -> T:
        value: Any = getattr(self._records[adapter_name], self._name)
        if value is None:
            raise KeyError(adapter_name)
        return value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return (a for a, rec in self._records.items() if getattr(rec, self._name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class View(Generic[T]):
    """A layer's class attribute reading one field of every record as a `Field` (PEFT's per-adapter dicts:
    `layer.r["default"]`). Assigning it raises: the layer's methods change records."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layer: Any, owner: type | None = None) -> Field[T]:
        if layer is None:
            return self  # type: ignore[return-value]  # the descriptor itself, read off the class
        return Field(layer.adapters, self.name)

    def __set__(self, layer: Any, value: Any) -> None:
        raise AttributeError(f"{self.name!r} is read from the adapters' records; change it with the layer's methods")


def initialise(tensors: dict[str, Tensor], init_weights: bool | str) -> None:
    """True: W1 zero; "lycoris": W2 zero; False: random. The rest Kaiming-uniform, as PEFT/LyCORIS."""
    zero: set[str] = set()
    if init_weights is True:
        zero = {"lokr_w1", "lokr_w1_a"}
    elif init_weights == "lycoris":
        zero = {"lokr_w2", "lokr_w2_b"}
    with torch.no_grad():
        for name, t in tensors.items():
            if name in zero:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
