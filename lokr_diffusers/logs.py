"""Logging and progress bars, the way diffusers does them.

- Every module logs to `logging.getLogger(__name__)`, under the library's root logger
  `lokr_diffusers`, which has diffusers' default verbosity (WARNING) and follows
  `diffusers.utils.logging.set_verbosity*()` (and the `DIFFUSERS_VERBOSITY` variable) until
  `lokr_diffusers.logs.set_verbosity()` sets its own level; `LOKR_DIFFUSERS_VERBOSITY` (debug, info,
  warning, error) sets it from the environment. The library never prints.
- With no logging configured, records go to stderr as diffusers' do; once the application (or
  pytest) configures the root logger, they propagate there only, never twice.
- `warn_once` says a warning once per cause (per message) in a process.
- `progress(...)`: a tqdm bar on work that can take about a second or more (loads, fuses, conversions,
  exports): judged by the tensor elements the work touches where the caller knows them (a fuse), else by
  the item count. Always off after `disable_progress_bar()` here or diffusers'
  `diffusers.utils.logging.disable_progress_bar()`, and when the caller passes `disable=True` (a pipeline's
  `set_progress_bar_config(disable=True)`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = logging.getLogger("lokr_diffusers")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
# Below about a second of work a bar is noise (diffusers draws them for long work only). Measured on 2 CPU
# cores: adding, loading or exporting costs about 1 ms per layer; fusing about 1 s per 1e8 weight elements.
PROGRESS_MIN_ITEMS = 1000
PROGRESS_MIN_WORK = 10**8  # tensor elements
_state: dict[str, Any] = {"own_level": False, "bars": None}
_warned: set[tuple[str, str]] = set()


class _StderrUnlessConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr while nobody configured logging; afterwards the records only propagate."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # the stream of the moment (pytest, notebooks swap it)
        super().emit(record)


def _configure() -> None:
    if any(isinstance(h, _StderrUnlessConfigured) for h in ROOT.handlers):
        return
    ROOT.addHandler(_StderrUnlessConfigured())
    env = os.environ.get("LOKR_DIFFUSERS_VERBOSITY", "").lower()
    if env in LEVELS:
        set_verbosity(LEVELS[env])
    elif env:
        ROOT.warning("LOKR_DIFFUSERS_VERBOSITY=%r is not one of %s", env, list(LEVELS))
    if not _state["own_level"]:
        ROOT.setLevel(LEVELS.get(os.environ.get("DIFFUSERS_VERBOSITY", "").lower(), logging.WARNING))


def set_verbosity(level: int) -> None:
    """The library's level from now on (no longer following diffusers')."""
    _state["own_level"] = True
    ROOT.setLevel(level)


def get_verbosity() -> int:
    return ROOT.getEffectiveLevel()


def set_verbosity_info() -> None:
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(logging.WARNING)


def set_verbosity_debug() -> None:
    set_verbosity(logging.DEBUG)


def set_verbosity_error() -> None:
    set_verbosity(logging.ERROR)


def follow_diffusers(level: int) -> None:
    """Called when diffusers' verbosity changes (hooks.py): ours follows unless set here."""
    if not _state["own_level"]:
        ROOT.setLevel(level)


def warn_once(logger: logging.Logger, message: str) -> None:
    key = (logger.name, message)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def disable_progress_bar() -> None:
    _state["bars"] = False


def enable_progress_bar() -> None:
    _state["bars"] = True


def bars_enabled() -> bool:
    """Ours if set, else diffusers' global switch (if diffusers is imported), else on."""
    if _state["bars"] is not None:
        return bool(_state["bars"])
    utils = sys.modules.get("diffusers.utils.logging")
    return bool(utils.is_progress_bar_enabled()) if utils is not None else True


def progress(items: Iterable[T], total: int | None = None, desc: str = "", disable: bool | None = None,
             work: int | None = None) -> Iterator[T]:
    """`items`, with a tqdm bar on stderr when the work can take about a second and bars are on.

    Args:
        total: the item count, when `items` has no len().
        disable: True turns the bar off (None and False leave it to the switches; neither turns it on).
        work: the tensor elements the work touches, when known: it decides instead of the item count.
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    long = work >= PROGRESS_MIN_WORK if work is not None else (total or 0) >= PROGRESS_MIN_ITEMS
    show = long and not disable and bars_enabled()
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, leave=False)


_configure()


def pipeline_disable(pipe: Any) -> bool | None:
    """The pipeline's `set_progress_bar_config(disable=...)`, if it set one."""
    config = getattr(pipe, "_progress_bar_config", None)
    return config.get("disable") if isinstance(config, dict) else None


def reset_warnings() -> None:
    """Forget which warnings were said (each is said again once): for tests and long sessions."""
    _warned.clear()
