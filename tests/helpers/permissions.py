"""Read-only folders that root obeys too: root writes anywhere because it holds CAP_DAC_OVERRIDE (and
CAP_DAC_READ_SEARCH), so a test of a read-only target would pass vacuously, or skip, as root. Linux keeps a
thread's capabilities in three sets; `obeying_permissions` clears those two from the *effective* set only
(capset(2), this thread), so the mode bits bind root as they bind a user, and raises them again from the
*permitted* set on the way out. Not root: nothing to do."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_DAC_BITS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (word 0)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _caps() -> tuple[_Header, ctypes.Array[_Data]]:
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if _libc().capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    return header, data


def _set(header: _Header, data: ctypes.Array[_Data]) -> None:
    if _libc().capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


@contextmanager
def obeying_permissions() -> Iterator[None]:
    """Within the block, this thread obeys file mode bits even as root (see the module docstring)."""
    if os.geteuid() != 0:
        yield
        return
    header, data = _caps()
    saved = data[0].effective
    data[0].effective = saved & ~_DAC_BITS
    _set(header, data)
    try:
        yield
    finally:
        header, data = _caps()
        data[0].effective = saved
        _set(header, data)
