"""Catalogue of save faults and misuse (issue 8: saves of one or many files are all-or-nothing).

One tuple per case: (id, format, adapter, extra kwargs, setup of the target, injected fault, error class,
message fragments). Every case asserts the error class, that the message names the path or argument at
fault, that the folder lists exactly what it listed before (no `.lokr_*` temporaries or backups, no new
empty folders) and that old files are byte-identical. Faults are injected where real ones strike: in the
writers (safetensors' save_file, the adapter_config.json writer), in os.fsync and in os.replace.

Setups: `file` an old export at the target; `new` nothing there; `peft1` an old one-component PEFT folder;
`peft2` an old two-component one (unet/ and text_encoder/, four files); `peft_new` / `peft_deep` no folder
(one / three levels to create); `missing` the parent folder is missing; `dir` a folder where the file
goes; `file_at_peft` a file where the folder goes; `file_at_sub` a file where peft2's unet/ goes;
`dir_at_config` a folder where peft1's adapter_config.json goes; `ro_*` the same with read-only folders.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.permissions import obeying_permissions

import lokr_diffusers.atomic as atomic
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers, save_lokr_weights
from lokr_diffusers.tiny import make_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TWO, ONE, DORA = "two", "one", "dora"  # adapters: unet + text encoder; unet only; unet with output-axis DoRA
ALL_FORMATS = ("comfyui", "peft", "diffusers", "lokr_diffusers")
SINGLE_FILE = ("comfyui", "diffusers", "lokr_diffusers")
ERRORS: dict[str, Callable[[], BaseException]] = {
    "fail": lambda: OSError("injected I/O failure"),
    "enospc": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "eio": lambda: OSError(errno.EIO, os.strerror(errno.EIO)),
    "interrupt": KeyboardInterrupt,
}
T, P = "{target}", "{tmp}"  # placeholders in message fragments

CASES: list[tuple[str, str, str, dict[str, Any], str, tuple | None, type[BaseException], tuple[str, ...]]] = [
    # ---- misuse: refused before anything is written
    ("unknown_format", "onnx", TWO, {}, "file", None, ValueError, ("format", "'onnx'")),
    ("format_not_a_string", "comfyui", TWO, {"format": None}, "file", None, ValueError, ("format",)),
    *[(f"bad_dtype_string-{f}", f, TWO, {"dtype": "fp8"}, "peft2" if f == "peft" else "file", None, ValueError,
       ("dtype", "'fp8'")) for f in ALL_FORMATS],
    ("integer_dtype", "comfyui", TWO, {"dtype": torch.int8}, "file", None, ValueError, ("dtype", "int8")),
    *[(f"unknown_adapter-{f}", f, "nope", {}, "peft2" if f == "peft" else "file", None, ValueError,
       ("adapter_name", "'nope'")) for f in ALL_FORMATS],
    *[(f"adapter_list_for_one_adapter_format-{f}", f, [TWO], {}, "peft2" if f == "peft" else "file", None,
       ValueError, ("adapter_name", "holds one adapter")) for f in ("comfyui", "peft", "diffusers")],
    ("empty_adapter_list", "lokr_diffusers", [], {}, "file", None, ValueError, ("adapter_name", "no adapter")),
    ("unknown_name_in_adapter_list", "lokr_diffusers", [TWO, "nope"], {}, "file", None, ValueError, ("'nope'",)),
    ("peft_cannot_hold_dora", "peft", DORA, {}, "peft1", None, ValueError, ("DoRA", "format='comfyui'")),
    ("metadata_value_not_a_string", "comfyui", TWO, {"metadata": {"epochs": 3}}, "file", None, TypeError,
     ("metadata['epochs']",)),
    ("path_not_a_path", "comfyui", TWO, {"path": None}, "file", None, TypeError, ("path",)),
    # ---- the target cannot be written
    *[(f"missing_parent_folder-{f}", f, TWO, {}, "missing", None, FileNotFoundError, (f"{P}/missing",))
      for f in SINGLE_FILE],
    *[(f"target_is_a_folder-{f}", f, TWO, {}, "dir", None, IsADirectoryError, (T, "folder")) for f in SINGLE_FILE],
    ("peft_target_is_a_file", "peft", TWO, {}, "file_at_peft", None, NotADirectoryError, (T, "folder")),
    ("peft_component_folder_is_a_file", "peft", TWO, {}, "file_at_sub", None, NotADirectoryError, (f"{T}/unet",)),
    ("peft_config_is_a_folder", "peft", ONE, {}, "dir_at_config", None, IsADirectoryError, ("adapter_config.json",)),
    *[(f"read_only_folder-{f}", f, TWO, {}, "ro_file", None, PermissionError, (T,)) for f in SINGLE_FILE],
    ("read_only_folder-peft_one_component", "peft", ONE, {}, "ro_peft1", None, PermissionError, (T,)),
    ("read_only_folder-peft_two_components", "peft", TWO, {}, "ro_peft2", None, PermissionError, (T,)),
    ("read_only_parent-peft_new_folder", "peft", TWO, {}, "ro_parent", None, PermissionError, ("create folder", T)),
    # ---- a writer fails while staging (half a file written first)
    ("writer_fails-comfyui", "comfyui", TWO, {}, "file", ("write", 1, "fail"), OSError, (T, "injected")),
    ("disk_full-diffusers", "diffusers", TWO, {}, "file", ("write", 1, "enospc"), OSError, (T, "space")),
    ("ctrl_c_while_staging-lokr_diffusers", "lokr_diffusers", TWO, {}, "file", ("write", 1, "interrupt"),
     KeyboardInterrupt, ()),
    ("writer_fails_on_new_file-comfyui", "comfyui", TWO, {}, "new", ("write", 1, "fail"), OSError, (T,)),
    ("peft_one_component-disk_full_on_model", "peft", ONE, {}, "peft1", ("write", 1, "enospc"), OSError, (T, "space")),
    ("peft_one_component-config_writer_fails", "peft", ONE, {}, "peft1", ("write", 2, "fail"), OSError,
     (f"{T}/adapter_config.json",)),
    ("peft_two_components-2nd_file_fails", "peft", TWO, {}, "peft2", ("write", 2, "fail"), OSError, (T,)),
    ("peft_two_components-3rd_file_fails", "peft", TWO, {}, "peft2", ("write", 3, "fail"), OSError, (T,)),
    ("peft_two_components-disk_full_on_4th", "peft", TWO, {}, "peft2", ("write", 4, "enospc"), OSError, (T, "space")),
    ("peft_two_components-ctrl_c_on_3rd", "peft", TWO, {}, "peft2", ("write", 3, "interrupt"), KeyboardInterrupt, ()),
    ("peft_new_folders_removed-3rd_fails", "peft", TWO, {}, "peft_new", ("write", 3, "fail"), OSError, (T,)),
    ("peft_deep_new_folders_removed-disk_full", "peft", TWO, {}, "peft_deep", ("write", 2, "enospc"), OSError, (T,)),
    ("fsync_fails-comfyui", "comfyui", TWO, {}, "file", ("fsync", 1, "eio"), OSError, (T, "Input/output")),
    ("fsync_fails-peft_two_components_3rd", "peft", TWO, {}, "peft2", ("fsync", 3, "eio"), OSError, (T,)),
    # ---- a rename fails while committing (earlier renames are undone)
    ("rename_fails-comfyui", "comfyui", TWO, {}, "file", ("replace", 1, "eio"), OSError, (T, "into place")),
    ("rename_fails_on_new_file-diffusers", "diffusers", TWO, {}, "new", ("replace", 1, "eio"), OSError, (T,)),
    ("ctrl_c_in_rename-lokr_diffusers", "lokr_diffusers", TWO, {}, "file", ("replace", 1, "interrupt"),
     KeyboardInterrupt, ()),
    ("peft_one_component-2nd_rename_fails", "peft", ONE, {}, "peft1", ("replace", 2, "eio"), OSError,
     (f"{T}/adapter_config.json", "nothing was changed")),
    ("peft_two_components-2nd_rename_fails", "peft", TWO, {}, "peft2", ("replace", 2, "eio"), OSError, (T,)),
    ("peft_two_components-last_rename_fails", "peft", TWO, {}, "peft2", ("replace", 4, "fail"), OSError, (T,)),
    ("peft_two_components-ctrl_c_in_3rd_rename", "peft", TWO, {}, "peft2", ("replace", 3, "interrupt"),
     KeyboardInterrupt, ()),
    ("peft_two_components-ctrl_c_after_2nd_rename", "peft", TWO, {}, "peft2", ("replace_after", 2, "interrupt"),
     KeyboardInterrupt, ()),
    ("peft_new_folders_removed-3rd_rename_fails", "peft", TWO, {}, "peft_new", ("replace", 3, "eio"), OSError, (T,)),
]


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pipe() -> Any:
    """One tiny SD1 pipeline for the module: adapters TWO (unet + text encoder: a two-folder PEFT save),
    ONE (unet only) and DORA (unet, output-axis DoRA)."""
    p = make_sd_pipeline(0)
    unet = LoKrConfig(r=2, target_modules=["to_q", "to_v", "conv1"], init_weights=False)
    add_lokr(p, {"unet": unet, "text_encoder": LoKrConfig(r=2, target_modules=["q_proj"], init_weights=False)}, TWO)
    add_lokr(p, {"unet": unet}, ONE)
    add_lokr(p, {"unet": LoKrConfig(r=2, target_modules=["to_k"], init_weights=False)}, DORA)
    with torch.no_grad():
        for _, layer in lokr_layers(p.unet):
            if DORA in layer.plans:
                rows = layer.weight.detach().flatten(1).norm(dim=1).reshape(-1, 1)
                layer.set_adapter_tensors(DORA, layer.factors(DORA), layer.scaling[DORA], dora_scale=rows * 1.1)
    return p


@pytest.fixture()
def folder(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, made writable again afterwards (read-only cases) so that pytest can clean it."""
    yield tmp_path
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(stat.S_IRWXU)


def _old_export(pipe: Any, path: Path, fmt: str, adapter: str) -> None:
    """An earlier export in fp16 (adapter_config.json with a note), so that every old file's bytes differ
    from the fp32 save under test."""
    save_lokr_weights(pipe, str(path), adapter_name=adapter, format=fmt, dtype="fp16")
    for config in path.rglob("adapter_config.json") if fmt == "peft" else ():
        config.write_text(config.read_text()[:-1] + ', "note": "an earlier export"}')


def _setup(kind: str, root: Path, fmt: str, pipe: Any) -> Path:
    """Lay out the folder for `kind` (see the module docstring); returns the save target."""
    ext = "" if fmt == "peft" else ".safetensors"
    target = root / f"out{ext}"
    ro = kind.startswith("ro_")
    kind = kind.removeprefix("ro_")
    if kind == "file":
        _old_export(pipe, target, fmt, TWO)
    elif kind in ("peft1", "dir_at_config"):
        _old_export(pipe, target, "peft", ONE)
        if kind == "dir_at_config":
            (target / "adapter_config.json").unlink()
            (target / "adapter_config.json").mkdir()
    elif kind in ("peft2", "file_at_sub"):
        _old_export(pipe, target, "peft", TWO)
        if kind == "file_at_sub":
            for f in (target / "unet").iterdir():
                f.unlink()
            (target / "unet").rmdir()
            (target / "unet").write_bytes(b"not a folder")
    elif kind == "peft_deep":
        target = root / "new" / "deeper" / "out"
    elif kind == "missing":
        target = root / "missing" / f"out{ext}"
    elif kind == "dir":
        target.mkdir()
        (target / "keep.txt").write_text("inside")
    elif kind == "file_at_peft":
        target.write_bytes(b"a file, not a folder")
    if ro:
        _make_read_only(root if kind in ("file", "parent") else target)
    return target


def _make_read_only(top: Path) -> None:
    """Folders under `top` read-only; the test then runs inside `obeying_permissions` (root too)."""
    for p in [top, *top.rglob("*")]:
        if p.is_dir():
            p.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with obeying_permissions():
            (top / ".probe").write_bytes(b"")
    except PermissionError:
        return
    (top / ".probe").unlink()
    pytest.skip("this file system ignores read-only folders")


def _listing(root: Path) -> dict[str, bytes | None]:
    """Every entry under root, hidden ones included: file -> its bytes, folder -> None."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _inject(mp: pytest.MonkeyPatch, fault: tuple[str, int, str]) -> None:
    """Make the `nth` call of the faulty operation raise ERRORS[name]."""
    where, nth, name = fault
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == nth

    if where == "write":  # safetensors' save_file(tensors, filename, ...), the text writer's _write_text(path, text)
        def broken(real: Callable[..., None], path_arg: int) -> Callable[..., None]:
            def write(*args: Any, **kwargs: Any) -> None:
                if not hit():
                    return real(*args, **kwargs)
                Path(args[path_arg]).write_bytes(b"half a file")
                raise ERRORS[name]()
            return write
        mp.setattr(atomic, "save_file", broken(atomic.save_file, 1))
        mp.setattr(atomic, "_write_text", broken(atomic._write_text, 0))
        return
    real = {"fsync": os.fsync, "replace": os.replace, "replace_after": os.replace}[where]

    def op(*args: Any) -> None:
        if hit():
            if where == "replace_after":
                real(*args)
            raise ERRORS[name]()
        real(*args)

    mp.setattr(os, "fsync" if where == "fsync" else "replace", op)


# ---------------------------------------------------------------------------------------- cases
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_failed_save_changes_nothing(pipe: Any, folder: Path, monkeypatch: pytest.MonkeyPatch, case: tuple) -> None:
    _, fmt, adapter, kwargs, setup, fault, error, fragments = case
    kwargs = dict(kwargs)
    target = _setup(setup, folder, fmt if fmt in ALL_FORMATS else "comfyui", pipe)
    before = _listing(folder)
    path = kwargs.pop("path", str(target))
    with pytest.raises(error) as err, monkeypatch.context() as mp, obeying_permissions():
        if fault is not None:
            _inject(mp, fault)
        save_lokr_weights(pipe, path, **{"adapter_name": adapter, "format": fmt, **kwargs})
    for fragment in fragments:
        fragment = fragment.replace(T, str(target)).replace(P, str(folder))
        assert fragment in str(err.value), f"{fragment!r} not in {err.value!s}"
    if fault is not None and fault[2] == "enospc":
        assert getattr(err.value, "errno", None) == errno.ENOSPC
    after = _listing(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))
    assert not changed, f"the failed save changed or left: {changed}"


@pytest.mark.parametrize("setup,fmt,adapter", [("file", "comfyui", TWO), ("new", "diffusers", TWO),
                                               ("file", "lokr_diffusers", TWO), ("peft1", "peft", ONE),
                                               ("peft2", "peft", TWO), ("peft_deep", "peft", TWO)])
def test_the_same_save_without_a_fault_writes_everything(pipe: Any, folder: Path, setup: str, fmt: str,
                                                         adapter: str) -> None:
    """The control for the catalogue: the saves it breaks do change the folder when nothing fails, and
    leave no temporaries or backups behind."""
    target = _setup(setup, folder, fmt, pipe)
    before = _listing(folder)
    assert save_lokr_weights(pipe, str(target), adapter_name=adapter, format=fmt) == str(target)
    after = _listing(folder)
    new_files = [k for k, v in after.items() if v is not None and v != before.get(k)]
    want = 4 if (fmt, adapter) == ("peft", TWO) else 2 if fmt == "peft" else 1
    assert len(new_files) == want, new_files
    assert not [k for k in after if os.path.basename(k).startswith(atomic.PREFIX)]
    assert all(k in after for k in before), "an old file went missing"


def test_every_file_is_synced_before_it_is_renamed(pipe: Any, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.fsync on each staged file before its rename, and on the folders after the renames."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    target = _setup("peft2", folder, "peft", pipe)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", os.path.realpath(src)))
        real_replace(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        mp.setattr(os, "replace", replace)
        save_lokr_weights(pipe, str(target), adapter_name=TWO, format="peft")
    renamed = [(i, p) for i, (kind, p) in enumerate(events) if kind == "replace"]
    assert len(renamed) == 4, events
    for i, tmp in renamed:
        assert ("fsync", tmp) in events[:i], f"{tmp} renamed before it was synced: {events}"
    synced_dirs = {p for kind, p in events[renamed[-1][0]:] if kind == "fsync"}
    assert {os.path.realpath(target / c) for c in ("unet", "text_encoder")} <= synced_dirs, events


def test_a_replaced_file_keeps_its_permissions(pipe: Any, folder: Path) -> None:
    target = _setup("file", folder, "comfyui", pipe)
    target.chmod(0o640)
    old = target.read_bytes()
    save_lokr_weights(pipe, str(target), adapter_name=TWO)
    assert target.read_bytes() != old and stat.S_IMODE(target.stat().st_mode) == 0o640
