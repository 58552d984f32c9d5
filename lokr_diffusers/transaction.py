"""All-or-nothing changes to module trees: snapshot what a call may change, restore it on any error.

A snapshot holds, for every module of the given models, its attribute dict one level deep (the
child-module, parameter and buffer tables, hook tables, and plain dict/list attributes such as
PEFT's `peft_config`, a LoRA layer's `scaling` or a LoKr layer's adapter tables), and every
parameter's `requires_grad`. Restoring puts back modules that were replaced (a LoRA or LoKr
wrapper), removes what was added, and resets the flags. Tensor VALUES are not copied (that would
double the model): calls that change weights in place (fuse) roll back through the layers' own
states instead (`layers.LoKrLayer.commit`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

_SHALLOW = (dict, list, set, OrderedDict)  # exact types: a FrozenDict config is shared, not copied


def _copy(value: Any) -> Any:
    return value.copy() if type(value) in _SHALLOW else value


def _copy_attrs(obj: Any) -> dict[str, Any]:
    return {k: _copy(v) for k, v in vars(obj).items()}


class Snapshot:
    """What `restore` puts back: every module's attributes and every parameter's requires_grad."""

    def __init__(self, models: Iterable[nn.Module], others: Iterable[Any] = ()) -> None:
        self.modules: list[tuple[nn.Module, dict[str, Any]]] = []
        self.flags: list[tuple[nn.Parameter, bool]] = []
        seen: set[int] = set()
        for model in models:
            for module in model.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self.modules.append((module, _copy_attrs(module)))
                self.flags += [(p, p.requires_grad) for p in module.parameters(recurse=False)]
        self.others = [(o, _copy_attrs(o)) for o in others]

    def restore(self) -> None:
        for obj, attrs in [*self.modules, *self.others]:
            d = vars(obj)
            d.clear()
            d.update({k: _copy(v) for k, v in attrs.items()})
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextmanager
def all_or_nothing(models: Iterable[nn.Module], others: Iterable[Any] = ()) -> Iterator[Snapshot]:
    """Run the block; if it raises (anything, KeyboardInterrupt included), put the module trees of
    `models` and the attributes of `others` (e.g. the pipeline object) back as they were."""
    snap = Snapshot(list(models), list(others))
    try:
        yield snap
    except BaseException:
        snap.restore()
        logger.debug("rolled back %d modules", len(snap.modules))
        raise
