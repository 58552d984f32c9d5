"""Convert a LoKr file between layouts without a pipeline: names and shapes are checked against the
full-size base architecture built on the meta device."""

from __future__ import annotations

import logging
import os
import tempfile

import torch
from torch import Tensor, nn

from . import export
from .architectures import BASE_NAMES, BASES, meta_components
from .formats.names import build_index, weight_of
from .formats.reader import LoadEntry, ParsedFile, check_holds_lokr, parse_loaded
from .formats.report import base_hint, file_base, unmatched_message
from .io import read_lokr_file
from .loaded import LoadedFile
from .loader import split_file
from .logs import progress

logger = logging.getLogger(__name__)


def guess_base(state_dict: dict[str, Tensor]) -> str | None:
    """"sd1" | "sd2" | "sdxl" from the file's structure (names, then widths read off the factors:
    see formats.report), None when it does not say or says "SD1.x or SD2.x"."""
    base = file_base(state_dict).base
    return base if base in BASES else None


def check_output_path(dst: str, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a missing or read-only parent
    folder, a folder where a file is wanted (or a file where a folder is wanted)."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {dst}: the folder {parent} does not exist; create it first")
    try:  # a real probe (os.access says yes to root and on read-only mounts); unnamed, so nothing is left behind
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write {dst}: the folder {parent} is not writable ({err.strerror or err}); "
                              "choose a folder you can write to") from None
    if folder and os.path.lexists(dst) and not os.path.isdir(dst):
        raise NotADirectoryError(f"cannot write {dst}: it is an existing file and this output is a folder")
    if not folder and os.path.isdir(dst):
        raise IsADirectoryError(f"cannot write {dst}: it is an existing folder; give a file path such as "
                                f"{os.path.join(dst, 'lokr.safetensors')}")


def _modules(entries: list[LoadEntry], comps: dict[str, nn.Module]) -> list[export.ExportModule]:
    out = []
    for e in progress(entries, desc="converting LoKr"):
        module = comps[e.ref.component].get_submodule(e.ref.path)
        r = e.plan.rank or 1
        out.append(export.ExportModule(e.ref.component, e.ref.path, dict(e.factors), e.scale, e.plan,
                                       tuple(weight_of(module).shape), e.dora_scale, r,
                                       e.alpha if e.alpha is not None else e.scale * r))
    return out


def _check_args(to: str, base: str | None, dtype: torch.dtype | str | None) -> str:
    fmt = export.FORMAT_ALIASES.get(to) if isinstance(to, str) else None
    if fmt is None:
        raise ValueError(f"to={to!r}: unknown format; use one of {sorted(export.FORMAT_ALIASES)}")
    if base is not None and base not in BASES:
        raise ValueError(f"base={base!r}: unknown base model; use one of {BASES}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) and \
            dtype not in export.DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(export.DTYPES)}, a floating torch dtype or None")
    return fmt


def parse_for_base(file: LoadedFile, base: str, strict: bool = True
                   ) -> tuple[dict[str, nn.Module], dict[str, ParsedFile]]:
    """Every adapter of the file parsed against the full-size `base`; a mismatch says which base the
    file is for.

    Returns:
        (the meta-device components, {adapter name ("default" for a one-adapter file): its parse}).
    """
    src = file.path or "the state dict"
    comps = meta_components(base)
    index = build_index(comps)
    parsed: dict[str, ParsedFile] = {}
    for name, part in split_file(file).items():
        try:
            p = parse_loaded(part, index)
        except ValueError as err:
            where = "" if src in str(err) else f"{src}: "
            raise ValueError(f"{where}{err}.{base_hint(part.tensors, comps)}") from None
        if p.unmatched and strict:
            raise ValueError(f"{src} (checked against a full-size {BASE_NAMES[base]}): "
                             f"{unmatched_message(p.unmatched, part.tensors, comps)}")
        parsed[name or "default"] = p
    return comps, parsed


def convert_lokr_file(src: str | os.PathLike[str] | LoadedFile, dst: str | os.PathLike[str], to: str = "comfyui",
                      base: str | None = None, dtype: torch.dtype | str | None = None, strict: bool = True) -> str:
    """Read `src` (any layout we load) and write it to `dst` in format `to` for base `base`.

    Args:
        src: a file or folder in any layout `load_lokr_weights` reads, or a LoadedFile (`io.read_lokr_file`).
        dst: the file (a folder for `to="peft"`) to write.
        to: "comfyui" (aliases "kohya", "a1111"), "peft", "diffusers" or "lokr_diffusers".
        base: "sd1" | "sd2" | "sdxl", guessed from the file when None.
        dtype: the tensor dtype to write (default: as read).
        strict: keys that match no module of the base raise (default); False leaves them out.

    Returns:
        The path written.
    """
    fmt = _check_args(to, base, dtype)
    dst = os.fspath(dst)
    check_output_path(dst, folder=fmt == "peft")
    file = read_lokr_file(src)
    try:
        check_holds_lokr(file.tensors)
    except ValueError as err:
        raise ValueError(file.named(str(err))) from None
    base = base or guess_base(dict(file.tensors))
    if base not in BASES:
        raise ValueError(f"cannot tell which base model {file.path or 'the state dict'} is for; pass base= one of "
                         f"{BASES} (--base on the command line)")
    comps, parsed = parse_for_base(file, base, strict)
    per_adapter: dict[str, list[export.ExportModule]] = {}
    for name, p in parsed.items():
        if p.lora:
            logger.warning("%d plain LoRA keys are not converted", len(p.lora))
        per_adapter[name] = _modules(p.entries, comps)
    if fmt == export.OURS_FORMAT:
        sd_out, meta = export.to_ours(per_adapter)
        return export.write_safetensors(export.cast(sd_out, dtype), dst, meta)
    if len(per_adapter) > 1:
        raise ValueError(f"{src} holds {len(per_adapter)} adapters; format {to!r} holds one")
    modules = next(iter(per_adapter.values()))
    if fmt == "comfyui":
        stem = os.path.splitext(os.path.basename(dst))[0]
        sd_out, meta = export.to_comfyui(modules, base, comps["unet"].config, name=stem)
    elif fmt == "diffusers":
        sd_out, meta = export.to_diffusers(modules)
    else:
        return export.write_peft(modules, dst, dtype, None)
    return export.write_safetensors(export.cast(sd_out, dtype), dst, meta)
