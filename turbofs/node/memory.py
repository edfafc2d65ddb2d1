"""The daemon's memory: allocator settings that keep its RSS at the RAM bound plus a fixed
overhead, and the figures ``turbofs status`` reports.

Measured (bench/README.md, "Mount", section 5), python-5g (6.2 GB) read whole while the
prefetch ran, 256 MiB RAM bound, per-file FUSE mode:

* lru-dict's ``popitem`` kept a reference to every value it returned (RamCache no longer
  calls it): 1.46 GB of RSS for python-1g, growing with every chunk read;
* then glibc's **dynamic mmap threshold**: a freed block bigger than the threshold (a 4 MiB
  HTTP body, say) raises it, up to 32 MiB, so from then on every 256 KiB chunk is carved
  out of a heap arena instead of a mapping of its own. Chunks live in the RAM tier for
  long, the transient buffers of fetches die young and interleave with them, and freed
  arena space stays resident: 392 of 720 MiB of arena memory was free at the end of that
  run (``malloc_info``), a peak RSS of 580 MiB. Pinned at 128 KiB (glibc's starting value,
  now never raised), chunk-sized buffers are mappings of their own and go back to the
  kernel when freed: 396 MiB peak for the same run.

:func:`tune_allocator` pins the threshold (and caps the arenas: worker threads of
``trio.to_thread`` would otherwise get up to 8 per core); :func:`trim` gives free arena
pages back after the big one-off allocations (the erofs metadata build, a finished
prefetch). Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Final

log = logging.getLogger("turbofs.node.memory")

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8

#: Blocks at least this big get a mapping of their own, given back when freed (glibc's
#: default starting value, pinned so that it is never raised).
MMAP_THRESHOLD: Final = 128 * 1024
#: Malloc arenas: the trio loop's thread and worker threads share these (each thread of
#: glibc's default, 8 per core, keeps its own free space resident).
ARENA_MAX: Final = 2
#: Free space at the top of a heap beyond this is given back at once.
TRIM_THRESHOLD: Final = 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.gnu_get_libc_version  # noqa: B018  # present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Final = _glibc()


def tune_allocator(
    *, mmap_threshold: int = MMAP_THRESHOLD, arena_max: int = ARENA_MAX, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Pin glibc's mmap threshold, cap its arenas, lower its trim threshold; False where
    this is not glibc or a setting was refused. Call before the worker threads start."""
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


__all__ = ["ARENA_MAX", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "rss_figures", "trim", "tune_allocator"]
