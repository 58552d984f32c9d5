"""The one registry of writers: `format=` names a `Layout` (or an alias of one), and each layout has one writer
for the SD families (SD1.x / SD2.x / SDXL) and one for the DiT families (Flux.1, SD3, Flux.2 / Klein, Z-Image),
the same function where the layout does not differ between them. `save_lokr_weights`, `convert_lokr_file` and the
`lokr-diffusers convert` command all write through `write` (docs/architecture.md §Data flow: export a file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import families
from . import comfyui, diffusers, ours, peft
from .modules import ExportJob, ExportModule

Write = Callable[[ExportJob], str]  # writes the job's file (or folder), returns its path


@dataclass(frozen=True)
class Layout:
    """One `format=`: its name, aliases, its writer per kind of family, whether it writes a folder (`folder`) and
    whether one file holds several adapters (`several`)."""

    name: str
    sd: Write
    dit: Write
    aliases: tuple[str, ...] = ()
    folder: bool = False
    several: bool = False

    def writer(self, base: str) -> Write:
        """The writer for the family `base`: the DiT writer for a family with an original-name table (its names
        come from formats/dit.py), else the SD one."""
        return self.dit if _dit(base) else self.sd


LAYOUTS: tuple[Layout, ...] = (
    Layout("comfyui", comfyui.save_sd, comfyui.save_dit, aliases=("kohya", "a1111")),
    Layout("peft", peft.save_sd, peft.save_dit, folder=True),
    Layout("diffusers", diffusers.save_sd, diffusers.save_dit),
    Layout("lokr_diffusers", ours.save, ours.save, several=True),
)
FORMAT_ALIASES: dict[str, str] = {name: layout.name for layout in LAYOUTS for name in (layout.name, *layout.aliases)}
_BY_NAME: dict[str, Layout] = {layout.name: layout for layout in LAYOUTS}


def _dit(base: str) -> bool:
    return families.get(base).originals is not None


def layout_of(format: str) -> Layout | None:
    """The layout `format` names (an alias included), None for an unknown one."""
    name = FORMAT_ALIASES.get(format) if isinstance(format, str) else None
    return _BY_NAME[name] if name is not None else None


def refuse_rows(modules: list[ExportModule], fmt: str) -> None:
    """The SD consumer layouts have no form for an adapter held as rows of a fused original module (a DiT file's
    `qkv` split over to_q / to_k / to_v): say so instead of writing a file that means otherwise."""
    pieces = [m for m in modules if m.rows is not None]
    if pieces:
        m = pieces[0]
        raise ValueError(f"{m.component}.{m.path} holds rows {m.rows.pieces if m.rows else ()} of the fused module "
                         f"{m.origin!r} ({len(pieces)} such modules): format {fmt!r} cannot write them yet; "
                         "save it with format='lokr_diffusers' (or pipe.save_pretrained), which keeps them")


def write(layout: Layout, job: ExportJob) -> str:
    """Write `job` in `layout` with the writer of the job's family; returns the path written. The caller has
    checked that a layout holding one adapter gets one."""
    if not _dit(job.base) and not layout.several:
        refuse_rows(job.modules, layout.name)
    return layout.writer(job.base)(job)
