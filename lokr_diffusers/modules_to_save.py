"""ModulesToSaveWrapper: a module trained in full per adapter (PEFT's `modules_to_save`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and one trainable copy per adapter; runs the first active copy."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active: list[str] = []
        self._enabled = True
        self.add(adapter_name)
        self._active = [adapter_name]

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def delete(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]

    def set_adapter(self, adapter_names: Iterable[str]) -> None:
        self._active = [a for a in adapter_names if a in self.modules_to_save]

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled: the original module runs (as the LoKr layers run their base layers)."""
        self._enabled = bool(enabled)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self._active if self._enabled else []
        module = self.modules_to_save[active[0]] if active else self.original_module
        return module(*args, **kwargs)

    def unwrap(self, merge: bool) -> nn.Module:
        """The module to put back: the active copy when merging, else the original."""
        return self.modules_to_save[self._active[0]] if merge and self._active else self.original_module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)
