"""Metadata keys our writers put in the files they create and our reader reads back (docs/formats.md §Metadata):
part of those layouts, never messages the package writes to itself."""

from __future__ import annotations

# A ComfyUI file whose output-axis dora_scale is written for ComfyUI's rule (by the ComfyUI writer) says so here; the
# reader (formats/reader.py) then undoes the rescaling from the base weights (docs/formats.md §DoRA).
DORA_RULE_KEY, DORA_RULE_COMFYUI = "lokr_dora_rule", "comfyui"
