"""Convert a LoKr file between layouts without a pipeline: names and shapes are checked against the
full-size base architecture built on the meta device, then written by the writers save_lokr_weights uses
(export/registry.py)."""

from __future__ import annotations

import logging
import os
import tempfile

import torch
from torch import Tensor, nn

from .architectures import BASE_NAMES, BASES, meta_components
from .export import DTYPES, FORMAT_ALIASES, ExportJob, from_entries, layout_of, write
from .formats.names import build_index
from .formats.reader import ParsedFile, check_holds_lokr, parse_loaded
from .formats.report import base_hint, file_base, unmatched_message
from .io import read_lokr_file
from .loaded import LoadedFile
from .loader import split_file

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


def _check_args(to: str, base: str | None, dtype: torch.dtype | str | None) -> None:
    if layout_of(to) is None:
        raise ValueError(f"to={to!r}: unknown format; use one of {sorted(FORMAT_ALIASES)}")
    if base is not None and base not in BASES:
        raise ValueError(f"base={base!r}: unknown base model; use one of {BASES}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}, a floating torch dtype or None")


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
    _check_args(to, base, dtype)
    layout = layout_of(to)
    assert layout is not None
    dst = os.fspath(dst)
    check_output_path(dst, folder=layout.folder)
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
    per_adapter = {}
    for name, p in parsed.items():
        if p.lora:
            logger.warning("%d plain LoRA keys are not converted", len(p.lora))
        per_adapter[name] = from_entries(p.entries, comps)
    if not layout.several and len(per_adapter) > 1:
        raise ValueError(f"{src} holds {len(per_adapter)} adapters; format {to!r} holds one")
    return write(layout, ExportJob(per_adapter, comps, base, dst, dtype))
