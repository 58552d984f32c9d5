"""`lokr_to_lora`: a LoKr file as a LoRA, for the tools that read only LoRA (docs/tools.md §Convert a LoKr to a LoRA).

Each module's ΔW = scale · W1 ⊗ W2 (functional.delta_weight) is factored by a truncated SVD, ΔW ≈ U_r S_r V_rᵀ, the
best rank-r approximation in Frobenius norm: up = U_r √S_r (out, r), down = √S_r V_rᵀ (r, in·k), a conv's down
shaped (r, in, *k) and up (out, r, 1, ...). The rank is `rank`, or per module the smallest that keeps `energy` of
ΔW's squared singular values, or full (exact).

Scales, so that every consumer reads the same weights whatever ranks the modules get. kohya's layout and PEFT's
folder: every module carries one alpha A (the most common rank), and each module's up is multiplied by r_i / A, so
the consumers' rule alpha / r (kohya, ComfyUI, A1111, PEFT's lora_alpha / r) gives ΔW exactly; one alpha for all also
keeps clear of diffusers 0.42.1's kohya converter, which can give a module another module's alpha when they differ.
diffusers' layout has no alpha key, and ComfyUI then scales by 1 while diffusers reads the LoraConfig: every module
gets lora_alpha = its rank (`alpha_pattern` beside `rank_pattern`), a scale of 1 for both, and its up as fitted.

Layouts: the SD families by kohya names (`lora_unet_*`, `lora_te*_*`: `lora_down.weight`, `lora_up.weight`,
`alpha`), which diffusers' `load_lora_weights`, ComfyUI and A1111 read; the DiT families in diffusers' own layout
(`<component>.<path>.lora_A.weight` / `lora_B.weight`, the LoraConfig in `lora_adapter_metadata`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import families
from ..atomic import Writer, safetensors_writer, text_writer, write_files
from ..export import cast, comfyui_module_name
from ..export.diffusers import DIFFUSERS_METADATA_KEY
from ..logs import progress
from .files import entry_delta, place, refuse_dora, weight_shape
from .nearest import FULL_SVD_MAX, seeded_svd_lowrank
from .report import ModuleReport, Report, report_path

logger = logging.getLogger(__name__)

LORA_METADATA_KEY = "lokr_diffusers_lora"  # the report's summary in the written file's metadata
LORA_LAYOUTS = ("lora", "lora_peft")


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA: up (out, r[, 1...]), down (r, in[, *k]), before the alpha correction."""

    component: str
    path: str
    up: Tensor
    down: Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def lora_of(delta: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor, float]:
    """(up, down, relative error) of the best LoRA of ΔW (out, in, *k): rank `rank`, or the smallest keeping
    `energy` of Σσ², or full. The error ‖ΔW − up·down‖ / ‖ΔW‖ is measured."""
    out, inn, *kernel = delta.shape
    m = delta.reshape(out, -1)
    full = min(m.shape)
    if rank is not None and energy is None and rank < full // 4 and full > FULL_SVD_MAX:
        u, s, v = seeded_svd_lowrank(m, rank, torch.Generator(device=m.device).manual_seed(0))  # randomized: pays here
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if energy is not None:
        rank = energy_rank(s, energy)
    r = max(1, min(rank or full, len(s)))
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    norm = m.norm()
    err = float((m - up @ down).norm() / norm) if norm > 0 else 0.0
    up = up.reshape(out, r, *([1] * len(kernel)))
    down = down.reshape(r, inn, *kernel)
    return up.contiguous(), down.contiguous(), err


def lokr_to_lora(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str = "lora",
                 rank: int | None = None, energy: float | None = None, model: str | os.PathLike[str] | None = None,
                 base: str | None = None, dtype: torch.dtype | str | None = None) -> Report:
    """Write the LoKr file `src` as a LoRA: `to="lora"`, one file (kohya names for the SD families, diffusers' layout
    for the DiT families); `to="lora_peft"`, a PEFT LoRA folder (a sub-folder per component when several). Each
    module's ΔW by a truncated SVD.

    Args:
        src: a LoKr file or folder in any layout `load_lokr_weights` reads (one adapter).
        dst: the .safetensors file (or PEFT folder) to write; a JSON report is written beside it (`<dst>.json`).
        rank: the LoRA rank of every module; `energy` (0 < e <= 1): per module the smallest rank keeping that share
            of ΔW's squared singular values; neither: full rank (exact).
        model: a diffusers folder of the model the file is for (its configs, no weights read); default the
            full-size model the file's names and shapes fit (`base` names the family).
        dtype: the tensors' dtype in the file (default fp32).

    Returns:
        The Report, per module (rank, error, parameters) and in total; DoRA modules are refused (their magnitude
        normalises W + ΔW, which needs the base weights a LoRA file does not carry).
    """
    from ..convert import check_output_path

    if to not in LORA_LAYOUTS:
        raise ValueError(f"to={to!r}: one of {LORA_LAYOUTS}")
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    dst = os.fspath(dst)
    check_output_path(dst, folder=to == "lora_peft")
    placed = place([src], model, base)
    comps, family, (parsed,) = placed.components, placed.family, placed.parsed
    entries = parsed.entries
    refuse_dora(src, entries, "a LoRA file cannot hold them without the base weights (DoRA's magnitude normalises "
                "W + ΔW): merge the LoKr into the model instead (lokr-diffusers merge)")
    if parsed.lora:
        logger.warning("%s: %d plain LoRA keys beside the LoKr modules are not converted", src, len(parsed.lora))
    report = Report("lora", dst, family.name, options={"source": os.fspath(src), "rank": rank, "energy": energy})
    loras: list[LoraModule] = []
    work = sum(math.prod(weight_shape(e, comps)) for e in entries)
    for e in progress(entries, desc="converting LoKr to LoRA", work=work * 16):
        delta = entry_delta(e, comps)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{e.ref.component}.{e.ref.path}: ΔW has NaN or inf values; nothing written")
        up, down, error = lora_of(delta, rank, energy)
        loras.append(LoraModule(e.ref.component, e.ref.path, up, down))
        report.modules.append(ModuleReport(e.ref.component, e.ref.path, (), int(down.shape[0]), False, error,
                                           up.numel() + down.numel(), float(delta.norm()), None))
    summary = {LORA_METADATA_KEY: json.dumps(report.summary())}
    if to == "lora_peft":
        files = _peft_folders(loras, dst, dtype, summary)
    else:
        sd, metadata = (_kohya(loras, family.name, comps) if family.originals is None else _diffusers(loras))
        files = {dst: safetensors_writer(cast(sd, dtype), {**metadata, **summary})}
    write_files({**files, report_path(dst): text_writer(report.to_json())}, make_dirs=to == "lora_peft")
    return report


def common_alpha(loras: list[LoraModule]) -> int:
    """The one alpha every module carries: the most common rank (those modules keep their up as fitted)."""
    return Counter(m.rank for m in loras).most_common(1)[0][0]


def _kohya(loras: list[LoraModule], family: str, comps: dict[str, nn.Module]) -> tuple[dict[str, Tensor],
                                                                                   dict[str, str]]:
    """kohya's LoRA layout: `<kohya name>.lora_down.weight` / `.lora_up.weight` / `.alpha`, one alpha for all."""
    alpha = common_alpha(loras)
    unet_config = getattr(comps.get("unet"), "config", None)
    sd: dict[str, Tensor] = {}
    for m in loras:
        name = comfyui_module_name(m.component, m.path, unet_config, family)
        sd[f"{name}.lora_down.weight"] = m.down
        sd[f"{name}.lora_up.weight"] = m.up * (m.rank / alpha)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(alpha), "ss_network_alpha": str(alpha),
                "ss_base_model_version": families.get(family).kohya.model_version}
    return sd, metadata


def _diffusers(loras: list[LoraModule]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers' layout: `<component>.<path>.lora_A.weight` (down) / `lora_B.weight` (up), each component's
    LoraConfig in `lora_adapter_metadata` (r and lora_alpha the common rank, other ranks by rank_pattern and their
    alphas, equal to them, by alpha_pattern: a scale of 1 everywhere, as ComfyUI reads a file with no alpha key)."""
    alpha = common_alpha(loras)
    sd: dict[str, Tensor] = {}
    config: dict[str, object] = {}
    for component in dict.fromkeys(m.component for m in loras):
        mods = [m for m in loras if m.component == component]
        for m in mods:
            sd[f"{component}.{m.path}.lora_A.weight"] = m.down
            sd[f"{component}.{m.path}.lora_B.weight"] = m.up
        other = {"^" + re.escape(m.path): m.rank for m in mods if m.rank != alpha}
        config.update({f"{component}.r": alpha, f"{component}.lora_alpha": alpha,
                       f"{component}.target_modules": sorted(m.path for m in mods),
                       f"{component}.rank_pattern": other, f"{component}.alpha_pattern": other})
    return sd, {DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)}


def _peft_folders(loras: list[LoraModule], dst: str, dtype: torch.dtype | str | None,
                  metadata: dict[str, str]) -> dict[str, Writer]:
    """PEFT's LoRA folder(s): `dst` for one component, `dst/<component>` for several; `adapter_model.safetensors`
    (`base_model.model.<path>.lora_A.weight` / `lora_B.weight`) and an `adapter_config.json` with r and lora_alpha
    the common rank, other ranks by rank_pattern."""
    alpha = common_alpha(loras)
    comps = list(dict.fromkeys(m.component for m in loras))
    files: dict[str, Writer] = {}
    for component in comps:
        mods = [m for m in loras if m.component == component]
        sd = {}
        for m in mods:
            sd[f"base_model.model.{m.path}.lora_A.weight"] = m.down
            sd[f"base_model.model.{m.path}.lora_B.weight"] = m.up * (m.rank / alpha)
        config = {"peft_type": "LORA", "r": alpha, "lora_alpha": alpha, "target_modules": sorted(m.path for m in mods),
                  "rank_pattern": {"^" + re.escape(m.path): m.rank for m in mods if m.rank != alpha},
                  "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False,
                  "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "task_type": None,
                  "base_model_name_or_path": None}
        folder = dst if len(comps) == 1 else os.path.join(dst, component)
        files[os.path.join(folder, "adapter_model.safetensors")] = safetensors_writer(cast(sd, dtype), metadata)
        files[os.path.join(folder, "adapter_config.json")] = text_writer(json.dumps(config, indent=2, sort_keys=True))
    return files


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest r with Σ_{i<r} σ_i² >= energy · Σσ² (singular values `s`, descending)."""
    squares = s.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return min(int((kept < energy - 1e-12).sum()) + 1, len(s))
