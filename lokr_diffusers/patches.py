"""Everything lokr_diffusers changes in other libraries' classes, in one registry.

`patch(owner, name, make)` replaces `owner.name` by `make(current)` and records what `owner.__dict__`
held before; `restore()` puts every original back (`lokr_diffusers.detach()`). Patching twice is a
no-op, so attaching is idempotent. `original(fn)` is the function a wrapper stands for.

`when_imported(module, callback)` runs `callback(module)` once that module has been imported: now if
it already is, else right after its code has run (a `sys.meta_path` finder wraps the module's loader).
This is how `import lokr_diffusers` attaches to diffusers without importing diffusers itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

_MISSING = object()
ORIGINAL = "__lokr_original__"  # attribute of every wrapper: the function it wraps
_patched: dict[tuple[Any, str], Any] = {}  # (class or module, name) -> its __dict__[name] before, or _MISSING
_pending: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = threading.RLock()
_bypass = threading.local()


def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
    """Set `owner.name = make(current)` on a class or module (current: the attribute as it resolves
    now, through base classes, or None). Returns False, changing nothing, if already patched."""
    with _lock:
        if (owner, name) in _patched:
            return False
        before = owner.__dict__.get(name, _MISSING)
        new = make(getattr(owner, name, None))
        _patched[(owner, name)] = before
        setattr(owner, name, new)
        return True


def wraps(new: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `new` as the wrapper of `original` (see `original`)."""
    setattr(new, ORIGINAL, original)
    return new


def original(fn: Any) -> Any:
    """The function `fn` wraps (through any number of our wrappers), or `fn` itself."""
    while hasattr(fn, ORIGINAL):
        fn = getattr(fn, ORIGINAL)
    return fn


def is_patched(owner: Any, name: str) -> bool:
    return (owner, name) in _patched


def restore() -> int:
    """Put back every patched attribute (newest first); returns how many."""
    with _lock:
        items = list(_patched.items())
        for (owner, name), before in reversed(items):
            if before is _MISSING:
                if name in owner.__dict__:
                    delattr(owner, name)
            else:
                setattr(owner, name, before)
        _patched.clear()
        _pending.clear()
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        return len(items)


def patched() -> list[str]:
    """'Owner.name' for every current patch, in the order they were made."""
    return [f"{getattr(owner, '__qualname__', owner.__name__)}.{name}" for owner, name in _patched]


@contextmanager
def bypassed() -> Iterator[None]:
    """Within this block (this thread), the wrappers that ask `is_bypassed()` call straight
    through to diffusers' own methods: used while a pipeline-level method drives its components."""
    depth = getattr(_bypass, "depth", 0)
    _bypass.depth = depth + 1
    try:
        yield
    finally:
        _bypass.depth = depth


def is_bypassed() -> bool:
    return getattr(_bypass, "depth", 0) > 0


# ------------------------------------------------------------------------------ post-import hooks
def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run `callback(module)` when `module_name` is imported (now, if it is)."""
    with _lock:
        module = sys.modules.get(module_name)
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            callback(module)
            return
        _pending.setdefault(module_name, []).append(callback)
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())


def pending() -> list[str]:
    return sorted(_pending)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module someone waits for, it asks the other finders and wraps
    the loader they return so that the callbacks run after the module's code."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, fullname: str) -> None:
        self._inner, self._fullname = inner, fullname

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, get_resource_reader, ...
        return getattr(self._inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        with _lock:
            callbacks = _pending.pop(self._fullname, [])
        for callback in callbacks:
            callback(module)
