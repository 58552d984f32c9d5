"""All-or-nothing writes of one or several files (an adapter file, a PEFT folder of several).

    stage:   every file is written to a temporary `.lokr_<random>.tmp` beside its target and fsync'ed;
    set aside: an existing target is hard-linked to a `.lokr_<random>.bak` (moved there where the file
             system has no hard links), so the old bytes survive whatever happens next;
    commit:  each temporary is renamed over its target (os.replace: atomic per file);
    finish:  backups are removed and the folders fsync'ed.

Any failure (an exception, KeyboardInterrupt included) before the last rename puts every backup back,
removes every temporary and every folder the save created, and re-raises: the folders list exactly
what they listed before and old files keep their bytes (their very inodes). A crash (SIGKILL, power
loss) can leave a stray `.lokr_*` file, never a half-written target.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping

from safetensors.torch import save_file
from torch import Tensor

logger = logging.getLogger(__name__)

Writer = Callable[[str], None]  # writes a whole file at the path it is given
PREFIX = ".lokr_"


def write_files(files: Mapping[str, Writer], make_dirs: bool = False) -> None:
    """Write every {target path: writer} or none of them. `make_dirs` creates missing parent folders
    (and removes them again if the save fails); otherwise a missing folder is an error."""
    targets = {os.path.abspath(os.fspath(p)): w for p, w in files.items()}
    new_dirs = _check_targets(list(targets), make_dirs)
    created: list[str] = []
    staged: dict[str, str] = {}
    try:
        for folder in new_dirs:
            _make_dir(folder)
            created.append(folder)
        for path, write in targets.items():
            staged[path] = _fresh_name(os.path.dirname(path), ".tmp")
            _stage(path, staged[path], write)
        _commit(staged)
    except BaseException:
        for tmp in staged.values():
            _remove_quietly(tmp)
        for folder in reversed(created):
            _remove_quietly(folder, is_dir=True)
        raise
    for folder in {os.path.dirname(p) for p in [*targets, *created]}:
        sync_dir(folder)


def write_safetensors(sd: Mapping[str, Tensor], path: str, metadata: Mapping[str, str]) -> str:
    """One safetensors file, atomically (see write_files). Returns `path`."""
    write_files({path: safetensors_writer(sd, metadata)})
    return path


def safetensors_writer(sd: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Writer:
    return lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=dict(metadata))


def text_writer(text: str) -> Writer:
    return lambda tmp: _write_text(tmp, text)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


# ------------------------------------------------------------------------------------- checks
def _check_targets(paths: list[str], make_dirs: bool) -> list[str]:
    """Refuse, before anything is written, targets that cannot be written; return the folders to create
    (outermost first)."""
    missing: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot save to {path}: it is an existing folder; give a file path")
        folder = os.path.dirname(path)
        chain: list[str] = []
        while not os.path.isdir(folder):
            if os.path.lexists(folder):
                raise NotADirectoryError(f"cannot save to {path}: {folder} exists and is not a folder")
            chain.append(folder)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
        if chain and not make_dirs:
            raise FileNotFoundError(f"cannot save to {path}: folder {chain[0]} does not exist; create it first")
        missing += [f for f in reversed(chain) if f not in missing]
    return missing


def _as_oserror(err: OSError, message: str) -> OSError:
    """The same kind of OSError (PermissionError, ENOSPC ...) with a message that names the target."""
    detail = err.strerror or str(err)
    return OSError(err.errno, f"{message}: {detail}") if err.errno is not None else type(err)(f"{message}: {detail}")


# ---------------------------------------------------------------------------------- the steps
def _make_dir(folder: str) -> None:
    try:
        os.mkdir(folder)
    except OSError as err:
        raise _as_oserror(err, f"cannot create folder {folder}") from err


def _stage(path: str, tmp: str, write: Writer) -> None:
    """Write `tmp` (with the old file's permissions, else those a new file gets here) and flush it to disk."""
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        write(tmp)
        if os.path.isfile(path):  # after writing: a writer may recreate the file
            shutil.copymode(path, tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise _as_oserror(err, f"cannot write {path}") from err


def _commit(staged: Mapping[str, str]) -> None:
    """Rename every temporary over its target; on any failure restore every target as it was."""
    done: list[tuple[str, str, str | None]] = []  # (target, temporary, backup of the old file or None)
    try:
        for path, tmp in staged.items():
            done.append((path, tmp, None))
            done[-1] = (path, tmp, _set_aside(path))
            os.replace(tmp, path)
    except BaseException as err:
        restored = _roll_back(done)
        if isinstance(err, OSError):
            outcome = "nothing was changed" if restored else "some old files could not be put back: see the log"
            raise _as_oserror(err, f"cannot move the new {done[-1][0]} into place ({outcome})") from err
        raise
    for _, _, backup in done:
        if backup is not None:
            _remove_quietly(backup)


def _set_aside(path: str) -> str | None:
    """Keep the old file under a backup name; None when there is no old file."""
    if not os.path.lexists(path):
        return None
    backup = _fresh_name(os.path.dirname(path), ".bak")
    try:
        os.link(path, backup, follow_symlinks=False)  # the target stays in place until it is replaced
    except (OSError, NotImplementedError):  # no hard links on this file system: move the old file aside
        os.replace(path, backup)
    return backup


def _roll_back(done: list[tuple[str, str, str | None]]) -> bool:
    """Put every old file back and remove new ones; False if something could not be restored."""
    restored = True
    for path, tmp, backup in reversed(done):
        try:
            if backup is not None and os.path.lexists(path) and os.path.samefile(backup, path):
                os.remove(backup)  # never replaced: rename() between two links of one file does nothing
            elif backup is not None:
                os.replace(backup, path)
            elif not os.path.lexists(tmp) and os.path.lexists(path):
                os.remove(path)  # a new file that had no old one
        except OSError as err:  # keep going: restore what can be restored, and say where the rest is
            logger.error("could not restore %s (its old content is in %s): %s", path, backup, err)
            restored = False
    return restored


# ------------------------------------------------------------------------------------- helpers
def _fresh_name(folder: str, suffix: str) -> str:
    return os.path.join(folder, f"{PREFIX}{uuid.uuid4().hex[:12]}{suffix}")


def _remove_quietly(path: str, is_dir: bool = False) -> None:
    try:
        (os.rmdir if is_dir else os.remove)(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.warning("could not remove %s: %s", path, err)


def sync_dir(folder: str) -> None:
    """fsync a folder so that renames in it survive a crash (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
