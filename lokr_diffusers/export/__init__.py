"""Export of LoKr adapters for their consumers: ComfyUI / A1111 (kohya layout), PEFT, diffusers, and our own
lossless layout, for the SD and the DiT families (docs/formats.md §Portable export, §Export of DiT adapters).

- `modules.py`: `ExportModule` (one adapted module, any layout), `collect` (from a pipeline's layers),
  `from_entries` (from a parsed file), `ExportJob` (what a writer is given);
- `encode.py`: scales, Tucker, DoRA and dtype as a consumer reads them;
- `pieces.py`: a DiT adapter's row pieces regrouped into their fused original, or per Linear;
- one module per consumer: `comfyui.py`, `peft.py`, `diffusers.py`, `ours.py`, each with a writer per kind of
  family;
- `registry.py`: the one registry of writers by `format=`; `save.py`: `save_lokr_weights`.
"""

from __future__ import annotations

from .comfyui import (
    A1111_UNMATCHED,
    check_comfyui_dora,
    comfyui_module_name,
    comfyui_path_name,
    comfyui_te_name,
    to_comfyui,
    to_comfyui_dit,
)
from .diffusers import DIFFUSERS_METADATA_KEY, baked, to_diffusers, to_diffusers_dit
from .encode import DTYPES, cast, consumer_tensors, expand_tucker, resolve_dtype
from .modules import ExportJob, ExportModule, RowNorms, collect, from_entries
from .ours import to_ours
from .peft import to_peft, write_peft
from .pieces import consumer_modules, fused_module, own_module, sort_modules
from .registry import FORMAT_ALIASES, LAYOUTS, Layout, layout_of, refuse_rows, write
from .save import save_lokr_weights

__all__ = [
    "A1111_UNMATCHED", "DIFFUSERS_METADATA_KEY", "DTYPES", "FORMAT_ALIASES", "LAYOUTS", "ExportJob",
    "ExportModule", "Layout", "RowNorms", "baked", "cast", "check_comfyui_dora", "collect", "comfyui_module_name",
    "comfyui_path_name", "comfyui_te_name", "consumer_modules", "consumer_tensors", "expand_tucker", "from_entries",
    "fused_module", "layout_of", "own_module", "refuse_rows", "resolve_dtype", "save_lokr_weights", "sort_modules",
    "to_comfyui", "to_comfyui_dit", "to_diffusers", "to_diffusers_dit", "to_ours", "to_peft", "write", "write_peft",
]
