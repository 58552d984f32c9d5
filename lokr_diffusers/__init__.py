"""lokr_diffusers: LoKr (Low-Rank Kronecker product) adapters for diffusers pipelines.

`import lokr_diffusers` is cheap: it imports neither torch nor diffusers. The names below load their
module on first use (PEP 562), and the diffusers integration (hooks.py: pipeline methods such as
`pipe.load_lokr_weights`, LoKr files through `pipe.load_lora_weights`, diffusers' adapter methods
acting on LoKr adapters) attaches itself when diffusers is imported. `detach()` undoes it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .hooks import attach, detach

__version__ = "0.1.0"

_EXPORTS = {
    "LoKrConfig": "config",
    "convert_lokr_file": "convert",
    "save_lokr_weights": "export",
    "LoKrPlan": "functional",
    "factorization": "functional",
    "plan_lokr": "functional",
    "lokr_state_dict": "io",
    "read_lokr_file": "io",
    "LoadedFile": "loaded",
    "Conv1d": "layers",
    "Conv2d": "layers",
    "Linear": "layers",
    "LoKrLayer": "layers",
    "LoKrModel": "model",
    "lokr_layers": "model",
    "add_lokr": "pipeline",
    "dit_target_modules": "targeting",
    "extract_lokr": "tools",
    "lokr_to_lora": "tools",
}

__all__ = [
    "Conv1d",
    "Conv2d",
    "Linear",
    "LoKrConfig",
    "LoKrLayer",
    "LoKrModel",
    "LoKrPlan",
    "LoadedFile",
    "add_lokr",
    "attach",
    "convert_lokr_file",
    "detach",
    "dit_target_modules",
    "extract_lokr",
    "factorization",
    "lokr_layers",
    "lokr_state_dict",
    "lokr_to_lora",
    "plan_lokr",
    "read_lokr_file",
    "save_lokr_weights",
]

if TYPE_CHECKING:
    from .config import LoKrConfig
    from .convert import convert_lokr_file
    from .export import save_lokr_weights
    from .functional import LoKrPlan, factorization, plan_lokr
    from .io import lokr_state_dict, read_lokr_file
    from .layers import Conv1d, Conv2d, Linear, LoKrLayer
    from .loaded import LoadedFile
    from .model import LoKrModel, lokr_layers
    from .pipeline import add_lokr
    from .targeting import dit_target_modules
    from .tools import extract_lokr, lokr_to_lora


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule: lokr_diffusers.logs, ...
        raise AttributeError(f"module 'lokr_diffusers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


attach()  # now if diffusers is imported, else when it is (patches.when_imported)
