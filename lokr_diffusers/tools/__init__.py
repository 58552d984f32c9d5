"""The tools that make a LoKr from something else, or something else from a LoKr (docs/tools.md):

- `nearest.py`: the LoKr nearest to one module's weight change (Kronecker SVD, alternating least squares);
- `weights.py`: a diffusers folder's weights read one tensor at a time, its models built on the meta device;
- `extract.py`: `extract_lokr`, a LoKr from the change between two model folders;
- `lora.py`: `lokr_to_lora`, a LoKr file as a LoRA by truncated SVD;
- `merge.py`: `merge_lokr`, adapters baked into a model folder;
- `combine.py`: `combine_lokr`, several LoKr files as one;
- `files.py`: adapter files read onto the model they are for;
- `report.py`: the per-module and total error report they write.
"""

from __future__ import annotations

from .extract import extract_lokr
from .lora import lokr_to_lora
from .nearest import Fit, candidate_splits, choose, nearest_lokr, relative_error
from .report import ModuleReport, Report

__all__ = ["Fit", "ModuleReport", "Report", "candidate_splits", "choose", "extract_lokr", "lokr_to_lora",
           "nearest_lokr", "relative_error"]
