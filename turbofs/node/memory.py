"""The daemon's memory: glibc allocator settings that keep its RSS near the RAM bound plus a
fixed overhead, returning freed chunk buffers to the kernel, and the figures ``turbofs status``
reports. Everything here is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Final

from turbofs.core.config import MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

log = logging.getLogger("turbofs.node.memory")

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.gnu_get_libc_version  # noqa: B018  # present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Final = _glibc()


def tune_allocator(
    *,
    mmap_threshold: int = MALLOC_MMAP_THRESHOLD,
    arena_max: int = MALLOC_ARENA_MAX,
    trim_threshold: int = MALLOC_TRIM_THRESHOLD,
) -> bool:
    """Pin glibc's mmap threshold (a freed big block would otherwise raise it, and chunks
    would then stay in arenas), cap its arenas, lower its trim threshold; False where this
    is not glibc or a setting was refused. Call before the worker threads start."""
    if _LIBC is None:
        return False
    ok = True
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_ARENA_MAX, arena_max),
                         (_M_TRIM_THRESHOLD, trim_threshold)):
        if _LIBC.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            log.warning("mallopt(%d, %d) refused", param, value)
            ok = False
    return ok


def trim() -> None:
    """Give free pages of every malloc arena back to the kernel (``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(ctypes.c_size_t(0))


def rss_figures(pid: int | None = None) -> dict[str, int]:
    """Resident memory of a process, bytes: ``rss``, ``peak_rss`` (VmHWM), ``anon``."""
    keys = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "anon"}
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[keys[name]] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


__all__ = ["rss_figures", "trim", "tune_allocator"]
