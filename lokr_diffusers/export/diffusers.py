"""diffusers' layouts (`format="diffusers"`): one .safetensors file keyed `<component>.<path>.lokr_*`
(docs/formats.md §Key layouts, §Export of DiT adapters).

SD families: alphas for the consumer rule, Tucker cores kept, r / alpha of every module in the metadata
`lokr_adapter_metadata`. DiT families: diffusers' own serialisation of a PEFT LoKr adapter, which diffusers 0.42.1's
`load_lora_weights` reads for Flux.2 and Z-Image: scales baked into W1 and no alpha tensors (its loaders refuse
keys that name neither lora nor lokr), each component's LoKrConfig in `lora_adapter_metadata`; a fused original's
pieces on diffusers' fused `to_qkv` where the family can fuse, else per Linear (pieces.consumer_modules).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from torch import Tensor

from .. import families
from .encode import consumer_tensors, write_one
from .modules import ExportJob, ExportModule, configs_of
from .peft import to_peft
from .pieces import consumer_modules

logger = logging.getLogger(__name__)

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: {"<component>.<field>": ...}
# the LoKrConfig fields written to diffusers' metadata (diffusers calls LoKrConfig(**them))
PEFT_FIELDS: tuple[str, ...] = ("r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "decompose_both",
                                "decompose_factor", "use_effective_conv2d", "rank_dropout", "module_dropout",
                                "init_weights")


def to_diffusers(modules: list[ExportModule]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers' single-file layout (`unet.` / `text_encoder.` keys), alphas for the consumer rule."""
    sd: dict[str, Tensor] = {}
    for m in modules:
        sd.update({f"{m.component}.{m.path}.{k}": v for k, v in consumer_tensors(m, keep_tucker=True).items()})
    return sd, {"lokr_adapter_metadata": json.dumps(configs_of(modules))}


def baked(m: ExportModule) -> ExportModule:
    """The module with its scale multiplied into W1 (lokr_w1, or w1_a), scale 1: no alpha needed."""
    key = "lokr_w1" if "lokr_w1" in m.factors else "lokr_w1_a"
    return replace(m, factors={**m.factors, key: m.factors[key] * m.scale}, scale=1.0)


def to_diffusers_dit(modules: list[ExportModule], family: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers' own serialisation of a PEFT LoKr adapter: `<component>.<path>.lokr_*`, scales baked into W1,
    each component's LoKrConfig in `lora_adapter_metadata` under `<component>.` (diffusers reads the
    transformer's)."""
    by_component: dict[str, list[ExportModule]] = {}
    for m in modules:
        by_component.setdefault(m.component, []).append(baked(m))
    sd: dict[str, Tensor] = {}
    config: dict[str, Any] = {}
    for component, ms in by_component.items():
        psd, peft_config = to_peft(ms)
        sd.update({f"{component}.{k.removeprefix('base_model.model.')}": v for k, v in psd.items()})
        config.update({f"{component}.{k}": peft_config[k] for k in PEFT_FIELDS})
    if families.get(family).diffusers_lokr and set(by_component) - {"transformer"}:
        logger.warning("diffusers' load_lora_weights for %s loads the transformer's LoKr modules only; the text "
                       "encoders' (%s) are in the file for pipe.load_lokr_weights", family,
                       ", ".join(sorted(set(by_component) - {"transformer"})))
    return sd, {DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)}


def save_sd(job: ExportJob) -> str:
    """The writer of the registry for the SD families."""
    sd, meta = to_diffusers(job.modules)
    return write_one(job, sd, meta)


def save_dit(job: ExportJob) -> str:
    """The writer of the registry for the DiT families."""
    sd, meta = to_diffusers_dit(consumer_modules(job.modules, job.components, job.base, "diffusers"), job.base)
    return write_one(job, sd, meta)
