"""A LoKr file as read: one object that every route carries whole (docs/architecture.md §Data flow: load a file).

Reading (`io.read_lokr_file`) returns a `LoadedFile`; loading, converting, inspecting and merging take it
as it is. What the package learns about a file while reading it (where it came from, the PEFT config
beside it) lives in the object's fields, never in the file's metadata: `metadata` is the file's own,
as written by whoever wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

DICT_SOURCE = "a state dict"  # `source` of a LoadedFile made from a dict of tensors


@dataclass(frozen=True)
class LoadedFile:
    """One LoKr file (or folder, hub file, state dict) as read.

    Attributes:
        tensors: {key: tensor}, the file's tensors as stored.
        metadata: the file's own safetensors header metadata, untouched ({} for a dict or a pickle).
        layout: the key layout read off the keys ("kohya", "lycoris", "peft", "diffusers", "comfyui",
            "onetrainer", "unknown"; `io.detect_layout`).
        source: the file read (for a hub repo, its downloaded copy), the folder of a multi-component
            PEFT save, or DICT_SOURCE.
        repo: the hub repo id the file came from, if any.
        peft_config: the contents of the adapter_config.json beside a PEFT file (r, alpha, rank_pattern,
            alpha_pattern, ...), if any.
        config_path: where that adapter_config.json is.
    """

    tensors: Mapping[str, Tensor]
    metadata: Mapping[str, str] = field(default_factory=dict)
    layout: str = "unknown"
    source: str = DICT_SOURCE
    repo: str | None = None
    peft_config: Mapping[str, Any] | None = None
    config_path: str | None = None

    @property
    def path(self) -> str | None:
        """The file or folder read, None for a state dict: what error messages name."""
        return None if self.source == DICT_SOURCE else self.source

    def named(self, message: str) -> str:
        """`message` prefixed with the file it is about (unless it names it already, or there is none)."""
        where = self.path
        return message if where is None or where in message else f"{where}: {message}"
