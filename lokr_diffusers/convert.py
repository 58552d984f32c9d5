"""Convert a LoKr file between layouts without a pipeline: the file is read onto the full-size components of its
model built on the meta device (architectures.py: SD1.x / SD2.x / SDXL, and each DiT family's variants: FLUX.1,
SD3.5, FLUX.2 / Klein, Z-Image; which ones is each family's record, lokr_diffusers/families/), so names and shapes
are checked without weights, then written by the writers save_lokr_weights uses (export/registry.py)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import families
from .architectures import MODEL_NAMES, meta_components
from .export import DTYPES, FORMAT_ALIASES, ExportJob, from_entries, layout_of, write
from .formats.names import build_index
from .formats.reader import ParsedFile, check_holds_lokr, parse_loaded
from .formats.report import base_hint, file_base, unmatched_message
from .io import read_lokr_file
from .loaded import LoadedFile
from .loader import split_file

logger = logging.getLogger(__name__)

BASE_CHOICES: tuple[str, ...] = tuple(families.FAMILIES)


def guess_families(state_dict: dict[str, Tensor]) -> tuple[str, ...]:
    """The DiT families ("flux", "sd3", "flux2", "zimage") a file can be for by its module names
    (families.of_file), in the order they are tried; () for a UNet file or one whose names say nothing.
    FLUX.1 and FLUX.2 share most original names: such a file gives both."""
    found, _ = families.of_file(list(state_dict))
    if any(families.get(f).originals is None for f in found):  # a UNet family among them: no DiT family is told
        return ()
    return found


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
    if base is not None and base not in BASE_CHOICES:
        raise ValueError(f"base={base!r}: unknown base model; use one of {BASE_CHOICES}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}, a floating torch dtype or None")


def parse_for_base(file: LoadedFile, base: str, strict: bool = True
                   ) -> tuple[dict[str, nn.Module], dict[str, ParsedFile]]:
    """Every adapter of the file parsed against the full-size `base` (an SD base or a DiT variant of
    architectures.VARIANTS); a mismatch says which model the file is for.

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
            raise ValueError(f"{src} (checked against a full-size {MODEL_NAMES[base]}): "
                             f"{unmatched_message(p.unmatched, part.tensors, comps)}")
        parsed[name or "default"] = p
    return comps, parsed


def candidate_models(file: LoadedFile, base: str | None) -> list[str]:
    """The full-size models to read the file onto, in order: `base`'s (a DiT family has several variants), else
    those its names and widths point to."""
    if base is not None:
        return list(families.get(base).variants)
    tensors = dict(file.tensors)
    guessed = [v for f in guess_families(tensors) for v in families.get(f).variants]
    sd = file_base(tensors).base
    if guessed or sd is not None:
        return guessed or list(families.get(str(sd)).variants)
    raise ValueError(f"cannot tell which base model {file.path or 'the state dict'} is for; pass base= one of "
                     f"{BASE_CHOICES} (--base on the command line)")


def fit(file: LoadedFile, models: Sequence[str], strict: bool = True
        ) -> tuple[str, dict[str, nn.Module], dict[str, ParsedFile]]:
    """(model, its meta-device components, every adapter's parse) for the first of `models` the file fits: every
    key used and every shape right. `strict=False` takes, failing that, the first it fits with keys left over."""
    errors: list[tuple[str, ValueError]] = []
    for model in models:
        try:
            return model, *parse_for_base(file, model, strict=True)
        except ValueError as err:
            errors.append((model, err))
    for model in models if not strict else ():
        try:
            return model, *parse_for_base(file, model, strict=False)
        except ValueError:
            pass
    first = errors[0][1]
    if len(errors) == 1:
        raise first
    others = ", ".join(MODEL_NAMES[m] for m, _ in errors[1:])
    raise ValueError(f"{first} It fits none of the other full-size models it may be for either ({others}); pass "
                     f"base= the family it was trained for, one of {BASE_CHOICES} (--base on the command line)"
                     ) from None


def convert_lokr_file(src: str | os.PathLike[str] | LoadedFile, dst: str | os.PathLike[str], to: str = "comfyui",
                      base: str | None = None, dtype: torch.dtype | str | None = None, strict: bool = True) -> str:
    """Read `src` (any layout we load) and write it to `dst` in format `to` for base `base`.

    Args:
        src: a file or folder in any layout `load_lokr_weights` reads, or a LoadedFile (`io.read_lokr_file`).
        dst: the file (a folder for `to="peft"`) to write.
        to: "comfyui" (aliases "kohya", "a1111"), "peft", "diffusers" or "lokr_diffusers".
        base: "sd1" | "sd2" | "sdxl" | "flux" | "sd3" | "flux2" | "zimage", guessed from the file when None (a DiT
            family is read onto each of its full-size variants in turn, `ModelFamily.variants`, until one fits).
        dtype: the tensor dtype to write (default: as read).
        strict: keys that match no module of the base raise (default); False leaves them out, and modules a DiT
            ComfyUI file has no name for are left out with a warning.

    Returns:
        The path written. What a layout cannot hold (DoRA for PEFT, output-axis DoRA for ComfyUI without base
        weights, a DiT module's rows off W1's block edges for PEFT / diffusers) is refused with the reason.
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
    model, comps, parsed = fit(file, candidate_models(file, base), strict)
    logger.info("%s read as a LoKr for %s", file.path or "the state dict", MODEL_NAMES[model])
    per_adapter = {}
    for name, p in parsed.items():
        if p.lora:
            logger.warning("%d plain LoRA keys are not converted", len(p.lora))
        per_adapter[name] = from_entries(p.entries, comps)
    if not layout.several and len(per_adapter) > 1:
        raise ValueError(f"{src} holds {len(per_adapter)} adapters; format {to!r} holds one")
    return write(layout, ExportJob(per_adapter, comps, families.of_variant(model).name, dst, dtype, strict=strict))
