"""Full-size DiT transformers on the meta device (no memory, well under a second each).

The configs are the package's copies of the published `transformer/config.json` values
(lokr_diffusers/architectures.py, which says where each was read): data, not a rule under test. The name maps
checked against these models are tested against diffusers' converters and ComfyUI's key maps, not against the
package.
"""

from __future__ import annotations

import functools
from typing import Any

import diffusers
import torch
from torch import nn

from lokr_diffusers.architectures import DIT_VARIANTS
from lokr_diffusers.families import of_variant

NAMES: tuple[str, ...] = (
    "flux1-dev", "flux1-schnell", "sd35-medium", "sd35-large", "flux2-klein-4b", "flux2-klein-9b", "zimage-turbo",
    "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b",
    "ltx-video-2b", "ltx-video-13b", "ltx-2",
    "qwen-image", "qwen-image-2.1",
    "hidream-i1",
    "chroma1-hd",
    "lumina-image-2",
    "hunyuanvideo", "hunyuanvideo-1.5",
)
FULL: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    name: (getattr(diffusers, of_variant(name).denoiser_class), DIT_VARIANTS[name].config) for name in NAMES}


@functools.cache
def meta_transformer(name: str) -> nn.Module:
    """The full-size transformer `name` (a key of FULL) on the meta device."""
    cls, config = FULL[name]
    with torch.device("meta"):
        return cls(**config)
