"""The chunk cache: a RAM tier of decompressed chunks over a disk tier shared by the node.

* **RAM** (:class:`RamCache`): decompressed chunks, bounded in bytes, LRU, so a chunk is
  decompressed once however many reads touch it.
* **Disk** (:class:`DiskCache`): uncompressed chunks in ``<dir>/<2 hex>/<64 hex>`` named by
  their sha256, shared by every image and mount, bounded in bytes (LRU), kept across
  restarts; raw rather than zstd, so a disk hit costs no second decompression.

Both tiers take only a :class:`~turbofs.core.codec.VerifiedChunk`. Disk files are renamed into
place without fsync, so a file is checked against its name before use unless this process
wrote or checked it and it keeps that stamp (inode, size, mtime ns); trust from a frame check
extends only to chunks with the same frame digest. Eviction never removes a file being read
(readers pin it); several daemons may share one directory.

The disk tier stays within its byte bound and leaves a reserve of its file system free
(``DISK_CACHE_RESERVE_*``, by statvfs): short of space it evicts its own least recently used
chunks, else writes nothing. Failed writes are counted by cause; the first is logged with its
cause, later ones in one summary line per ``DISK_CACHE_WRITE_LOG_INTERVAL``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio
from lru import LRU

from turbofs.core.codec import VerifiedChunk, verify_data
from turbofs.core.config import (
    CACHE_STALE_TEMP,
    DISK_CACHE_BLOCK,
    DISK_CACHE_RESERVE_MAX,
    DISK_CACHE_RESERVE_SHARE,
    DISK_CACHE_WRITE_LOG_INTERVAL,
    RAM_CACHE_MAX_ENTRIES,
    DaemonConfig,
)
from turbofs.core.errors import DigestMismatch
from turbofs.core.format import Chunk
from turbofs.node.metrics import Counter, Gauge, NodeMetrics

log = logging.getLogger("turbofs.node.cache")

#: Written into ``<dir>/CACHE_VERSION``; files of another version are not read.
DISK_FORMAT: Final = b"turbofs chunk cache 1: uncompressed chunks named by their sha256\n"

_NAME_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_TEMP_RE: Final = re.compile(r"^\.tmp\.(\d+)\.[0-9a-f]+$")
_TEMP_PREFIX: Final = secrets.token_hex(4)
#: Temp files in the cache folder itself (the version file's), ".version": before they had hex names.
_ROOT_TEMP_RE: Final = re.compile(r"^\.tmp\.(\d+)\.(?:[0-9a-f]+|version)$")
#: Reads that must not wait for the disk (preadv with RWF_NOWAIT, Linux 4.14+).
_NOWAIT: Final = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
_temp_numbers = itertools.count()


# ---------------------------------------------------------------------------------------
# RAM


class RamCache:
    """Decompressed chunks by digest, bounded in bytes, least recently used out first.

    Used from the trio thread only (no lock).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._lru: LRU[bytes, bytes] = LRU(RAM_CACHE_MAX_ENTRIES, self._evicted)

    def _evicted(self, _key: bytes, value: bytes) -> None:
        self.used_bytes -= len(value)
        self.evictions += 1

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._lru

    def get(self, digest: bytes) -> bytes | None:
        """The chunk's bytes (now the most recently used), or None."""
        return self._lru.get(digest)

    def put(self, v: VerifiedChunk) -> None:
        size = len(v.data)
        if size > self.max_bytes:
            return
        old = self._lru.pop(v.chunk.digest, None)
        if old is not None:
            self.used_bytes -= len(old)
        self._lru[v.chunk.digest] = v.data
        self.used_bytes += size
        while self.used_bytes > self.max_bytes:
            # never LRU.popitem: lru-dict keeps a reference to every value it pops that
            # way (amitdev/lru-dict#64), which would leak every evicted chunk
            oldest = self._lru.peek_last_item()
            if oldest is None:  # only if the byte count were wrong: never loop forever
                self.used_bytes = 0
                break
            dropped = self._lru.pop(oldest[0], b"")
            self.used_bytes -= len(dropped)
            self.evictions += 1

    def discard(self, digest: bytes) -> None:
        old = self._lru.pop(digest, None)
        if old is not None:
            self.used_bytes -= len(old)


# ---------------------------------------------------------------------------------------
# Disk


@dataclass
class DiskStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0
    write_errors: int = 0  # every cache file not written, whatever the cause
    disk_full: int = 0  # of which: no space (the file system's reserve reached, ENOSPC, EDQUOT)
    last_write_error: str = ""
    evictions: int = 0
    removed_temps: int = 0
    trusted_hits: int = 0  # hits on files this process had checked: no second sha256


#: A cache file as this process last saw it: (inode, size, mtime in ns).
_Stamp = tuple[int, int, int]


@dataclass
class _Entry:
    usage: int  # bytes counted against the bound (size rounded up to DISK_CACHE_BLOCK)
    pins: int = 0
    #: Set once this process has checked the file's bytes (it wrote them after their
    #: digest check, or read and checked them): while the file still has this stamp, its
    #: bytes are those bytes, and loading it needs no second sha256.
    verified: _Stamp | None = None
    #: Set when the check behind ``verified`` was a frame check (:attr:`VerifiedChunk.frame`):
    #: the trust then extends only to chunks with that same frame digest.
    frame: bytes | None = None

    def vouches_for(self, chunk: Chunk, st: os.stat_result | None = None) -> bool:
        """Whether the file's bytes need no sha256 for ``chunk``: checked by this process, by
        a check that covers ``chunk`` (see ``frame``), and, given the file's ``st``, unchanged
        since (its stamp)."""
        if self.verified is None or (self.frame is not None and self.frame != chunk.frame):
            return False
        return st is None or self.verified == (st.st_ino, st.st_size, st.st_mtime_ns)


def _usage(size: int) -> int:
    return max(DISK_CACHE_BLOCK, -(-size // DISK_CACHE_BLOCK) * DISK_CACHE_BLOCK)


def _read_fd(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from the start of ``fd`` (fewer only at its end)."""
    data = os.read(fd, n)
    if 0 < len(data) < n:  # a short read before the end (rare): go on
        parts = [data]
        got = len(data)
        while got < n and (more := os.read(fd, n - got)):
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def _stamp(fd: int, st: os.stat_result) -> _Stamp:
    """Set the file's times to now (the LRU order kept across restarts) and return its
    stamp: an mtime set here to the nanosecond is one no later write leaves behind."""
    now = time.time_ns()
    try:
        os.utime(fd, ns=(now, now))
    except OSError:
        return (st.st_ino, st.st_size, st.st_mtime_ns)
    return (st.st_ino, st.st_size, now)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskCache:
    """Uncompressed chunks in ``root/<2 hex>/<64 hex>``, bounded in bytes, LRU out.

    Thread-safe: one lock guards the in-memory index (order, sizes, pins); file I/O runs
    outside it except unlinks. Opening scans the directory to rebuild the index.
    """

    def __init__(self, root: Path, max_bytes: int, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.stats = DiskStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._log_next: float | None = None  # monotonic time of the next write-failure summary
        self._unlogged = 0  # write failures since the last line about them
        self._open()

    # -- start

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "CACHE_VERSION"
        try:
            found = marker.read_bytes()
        except FileNotFoundError:
            found = None
        if found is not None and found != DISK_FORMAT:
            log.warning("%s: cache of another format (%r): starting empty", self.root, found[:60])
            self._wipe()
        if found != DISK_FORMAT:
            # named as every temp file is, so that the cleaner matches it; gone if the write fails
            tmp = self.root / f".tmp.{os.getpid()}.{_TEMP_PREFIX}{next(_temp_numbers):x}"
            try:
                tmp.write_bytes(DISK_FORMAT)
                os.replace(tmp, marker)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        now = time.time()
        with os.scandir(self.root) as it:  # a version file's temp left by a crash
            for e in it:
                if m := _ROOT_TEMP_RE.match(e.name):
                    self._maybe_remove_temp(Path(e.path), int(m.group(1)), now)
        found_files: list[tuple[float, str, int]] = []
        for sub in self._subdirs():
            with os.scandir(sub) as it:
                for e in it:
                    if _NAME_RE.match(e.name) and e.name.startswith(sub.name):
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        found_files.append((max(st.st_atime, st.st_mtime), e.name, st.st_size))
                    elif m := _TEMP_RE.match(e.name):
                        self._maybe_remove_temp(Path(e.path), int(m.group(1)), now)
        found_files.sort()
        for _, name, size in found_files:
            self._entries[name] = _Entry(_usage(size))
            self._bytes += _usage(size)
        with self._lock:
            self._evict_locked()
        log.info("%s: %d cached chunks, %d bytes", self.root, len(self._entries), self._bytes)

    def _subdirs(self) -> Iterator[Path]:
        for i in range(256):
            sub = self.root / f"{i:02x}"
            if sub.is_dir():
                yield sub

    def _maybe_remove_temp(self, path: Path, pid: int, now: float) -> None:
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            return
        if not _pid_alive(pid) or age > CACHE_STALE_TEMP:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.stats.removed_temps += 1

    def _wipe(self) -> None:
        for sub in self._subdirs():
            for p in sub.iterdir():
                if _NAME_RE.match(p.name) or _TEMP_RE.match(p.name):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()

    # -- queries

    def path(self, digest: bytes | str) -> Path:
        name = digest if isinstance(digest, str) else digest.hex()
        return self.root / name[:2] / name

    @property
    def used_bytes(self) -> int:
        """Disk usage counted against the bound (file sizes in whole blocks)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: bytes) -> bool:
        return digest.hex() in self._entries

    def free_bytes(self) -> int:
        """Bytes the file system can still take before the cache's reserve (negative when the
        reserve is already eaten into); statvfs, so other users of the disk count."""
        st = os.statvfs(self.root)
        reserve = min(DISK_CACHE_RESERVE_MAX, int(st.f_blocks * st.f_frsize * DISK_CACHE_RESERVE_SHARE))
        return st.f_bavail * st.f_frsize - reserve

    def room(self) -> int:
        """Bytes more the cache can hold without evicting: the rest of its bound, or what the
        file system leaves above the reserve if that is less."""
        try:
            free = self.free_bytes()
        except OSError:
            free = self.max_bytes
        return max(0, min(self.max_bytes - self._bytes, free))

    def touch(self, digest: bytes) -> None:
        """Mark a chunk as just used (in memory only)."""
        name = digest.hex()
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)

    @contextlib.contextmanager
    def pinned(self, digest: bytes) -> Iterator[bool]:
        """Keep a chunk's file from eviction while the block runs; yields whether it is cached."""
        name = digest.hex()
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.pins += 1
        try:
            yield entry is not None
        finally:
            if entry is not None:
                with self._lock:
                    entry.pins -= 1
                    if self._bytes > self.max_bytes:
                        self._evict_locked()

    # -- read and write (blocking: call from a worker thread)

    def get(self, chunk: Chunk) -> VerifiedChunk | None:
        """The chunk from disk, verified; None if absent or bad (a bad file is removed).

        A file this process vouches for (:meth:`_Entry.vouches_for`) has only its length
        checked; any other (an earlier run's, possibly torn; replaced since) is hashed first.
        """
        name = chunk.digest.hex()
        path = self.path(name)
        with self.pinned(chunk.digest) as present:
            if not present:
                with self._lock:
                    self.stats.misses += 1
                return None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = _read_fd(fd, chunk.ulen + 1)  # one more: a longer file is caught too
                    st = os.fstat(fd)  # after the read: a write in between changed the mtime
                    with self._lock:
                        entry = self._entries.get(name)
                        trusted = entry is not None and entry.vouches_for(chunk, st)
                        frame = entry.frame if entry is not None and trusted else None
                        if trusted:
                            self.stats.trusted_hits += 1
                    v = (VerifiedChunk(chunk, data, frame) if trusted and len(data) == chunk.ulen
                         else verify_data(chunk, data))
                    stamp = _stamp(fd, st)  # also the access order, which survives a restart
                finally:
                    os.close(fd)
            except FileNotFoundError:
                self._forget(name, unlink=False)
                with self._lock:
                    self.stats.misses += 1
                return None
            except (OSError, DigestMismatch) as exc:
                log.warning("%s: dropping bad cache file: %s", path, exc)
                self._forget(name, unlink=True)
                with self._lock:
                    self.stats.corrupt += 1
                    self.stats.misses += 1
                return None
        with self._lock:
            self.stats.hits += 1
            entry = self._entries.get(name)
            if entry is not None:
                entry.verified, entry.frame = stamp, v.frame
                self._entries.move_to_end(name)
        return v

    def get_cached(self, chunk: Chunk) -> VerifiedChunk | None:
        """The chunk, only if it needs neither a sha256 nor a disk read: a file this process
        vouches for whose bytes are all in the page cache (``RWF_NOWAIT``). For the trio
        thread, where it saves a worker thread's hand-off (on a cold start, reads find many
        just-prefetched chunks on disk only); None means: ask :meth:`get` in a thread.
        """
        if not _NOWAIT:
            return None
        name = chunk.digest.hex()
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.vouches_for(chunk):
                return None
        with self.pinned(chunk.digest):
            try:
                buf = bytearray(chunk.ulen)
                fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    n = os.preadv(fd, [buf], 0, os.RWF_NOWAIT)
                    st = os.fstat(fd)  # after the read: a write in between changed the mtime
                finally:
                    os.close(fd)
            except OSError:  # BlockingIOError (not all cached), gone, ...: the slow path decides
                return None
        with self._lock:
            if n != chunk.ulen or st.st_size != chunk.ulen or not entry.vouches_for(chunk, st):
                return None
            self.stats.hits += 1
            self.stats.trusted_hits += 1
            if self._entries.get(name) is entry:
                self._entries.move_to_end(name)
            frame = entry.frame
        return VerifiedChunk(chunk, bytes(buf), frame)

    def put(self, v: VerifiedChunk) -> bool:
        """Store a verified chunk (temporary name, optional fsync, rename). False on I/O error."""
        name = v.chunk.digest.hex()
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return True
        path = self.path(name)
        if not self._make_room(_usage(len(v.data))):
            self._write_failed(path, OSError(errno.ENOSPC, "not written: the file system is down to the cache's reserve"))
            return False
        # unique without a syscall: a random part drawn once per process, then a counter
        tmp = path.parent / f".tmp.{os.getpid()}.{_TEMP_PREFIX}{next(_temp_numbers):x}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the first file of its folder (folders are made on demand)
                path.parent.mkdir(exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(v.data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
                stamp = _stamp(fd, os.fstat(fd))
            finally:
                os.close(fd)
            os.rename(tmp, path)
            if self.fsync:
                dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._write_failed(path, exc)
            return False
        usage = _usage(len(v.data))
        with self._lock:
            self.stats.writes += 1
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = _Entry(usage)
                self._bytes += usage
            entry.verified, entry.frame = stamp, v.frame  # the file holds v.data, checked as v says
            self._entries.move_to_end(name)
            self._evict_locked()
        return True

    def _make_room(self, usage: int) -> bool:
        """Whether ``usage`` bytes fit above the file system's reserve, after evicting least
        recently used chunks if they do not yet."""
        try:
            short = usage - self.free_bytes()
            if short <= 0:
                return True
            with self._lock:
                self._evict_locked(short)
            return self.free_bytes() >= usage
        except OSError:
            return True  # no statvfs: the write itself will tell

    def _write_failed(self, path: Path, exc: OSError) -> None:
        """Count a failed write; log the first with its cause, then at most one summary line
        per interval."""
        now = time.monotonic()
        with self._lock:
            self.stats.write_errors += 1
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.stats.disk_full += 1
            self.stats.last_write_error = f"{path}: {exc}"
            if self._log_next is None:
                self._log_next = now + DISK_CACHE_WRITE_LOG_INTERVAL
                summary = 0
            elif now >= self._log_next:
                self._log_next = now + DISK_CACHE_WRITE_LOG_INTERVAL
                summary, self._unlogged = self._unlogged + 1, 0
            else:
                self._unlogged += 1
                return
        if summary:
            log.warning("%s: %d cache files not written in the last %g s or so (%d in all; last: %s)",
                        self.root, summary, DISK_CACHE_WRITE_LOG_INTERVAL, self.stats.write_errors, exc)
        else:
            log.warning("%s: cannot write cache file: %s (further failures are summed up every %g s)",
                        path, exc, DISK_CACHE_WRITE_LOG_INTERVAL)

    def flush_write_log(self) -> None:
        """Log the failed writes not yet summed up (at the end of a prefetch, at exit)."""
        with self._lock:
            pending, self._unlogged = self._unlogged, 0
            last = self.stats.last_write_error
        if pending:
            log.warning("%s: %d more cache files not written (%d in all; last: %s)",
                        self.root, pending, self.stats.write_errors, last)

    def _forget(self, name: str, *, unlink: bool) -> None:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self._bytes -= entry.usage
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(name))

    def _evict_locked(self, free: int = 0) -> None:
        """Remove least recently used, unpinned files until under the bound and ``free`` more
        bytes are freed (lock held)."""
        if self._bytes <= self.max_bytes and free <= 0:
            return
        victims = []
        for name, entry in self._entries.items():
            if self._bytes <= self.max_bytes and free <= 0:
                break
            if entry.pins:
                continue  # being read: never removed under a reader
            victims.append(name)
            self._bytes -= entry.usage
            free -= entry.usage
        for name in victims:
            del self._entries[name]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))
            self.stats.evictions += 1


# ---------------------------------------------------------------------------------------
# Both tiers


@dataclass
class CacheCounts:
    """What the cache holds, for ``turbofs status``."""

    ram_bytes: int
    ram_chunks: int
    ram_max_bytes: int
    disk_bytes: int
    disk_chunks: int
    disk_max_bytes: int
    disk: DiskStats = field(default_factory=DiskStats)


class ChunkCache:
    """The RAM tier over the disk tier (which may be absent).

    The fast path, :meth:`get_ram`, is synchronous; everything touching the disk runs in
    a worker thread. One ChunkCache may serve every reader of the daemon.
    """

    def __init__(self, ram: RamCache, disk: DiskCache | None = None, *, metrics: NodeMetrics | None = None) -> None:
        self.ram = ram
        self.disk = disk
        self.metrics = metrics or NodeMetrics()
        m = self.metrics
        with contextlib.suppress(ValueError):  # a second cache on the same metrics: first one wins
            m.add(Gauge("turbofs_cache_bytes", "Bytes held by each cache tier.", ["tier"], self._bytes_by_tier))
            m.add(Gauge("turbofs_cache_chunks", "Chunks held by each cache tier.", ["tier"], self._chunks_by_tier))
            m.add(Gauge("turbofs_cache_evictions", "Chunks evicted from each cache tier.", ["tier"],
                        self._evictions_by_tier))
            m.add(Counter("turbofs_disk_cache_write_errors_total",
                          "Cache files not written, by cause (disk_full: the reserve reached, ENOSPC, EDQUOT).",
                          ["cause"], self._write_errors_by_cause))

    @classmethod
    def from_config(cls, cfg: DaemonConfig, *, metrics: NodeMetrics | None = None) -> ChunkCache:
        disk = None
        if cfg.cache_dir is not None:
            disk = DiskCache(cfg.cache_dir, cfg.disk_cache_bytes, fsync=cfg.disk_cache_fsync)
        return cls(RamCache(cfg.ram_cache_bytes), disk, metrics=metrics)

    def _bytes_by_tier(self) -> list[tuple[tuple[str, ...], float]]:
        return [(("ram",), float(self.ram.used_bytes)), (("disk",), float(self.disk.used_bytes if self.disk is not None else 0))]

    def _chunks_by_tier(self) -> list[tuple[tuple[str, ...], float]]:
        return [(("ram",), float(len(self.ram))), (("disk",), float(len(self.disk) if self.disk is not None else 0))]

    def _write_errors_by_cause(self) -> list[tuple[tuple[str, ...], float]]:
        st = self.disk.stats if self.disk is not None else DiskStats()
        return [(("disk_full",), float(st.disk_full)), (("io",), float(st.write_errors - st.disk_full))]

    def _evictions_by_tier(self) -> list[tuple[tuple[str, ...], float]]:
        return [(("ram",), float(self.ram.evictions)), (("disk",), float(self.disk.stats.evictions if self.disk is not None else 0))]

    def counts(self) -> CacheCounts:
        d = self.disk
        return CacheCounts(
            self.ram.used_bytes, len(self.ram), self.ram.max_bytes,
            d.used_bytes if d is not None else 0, len(d) if d is not None else 0, d.max_bytes if d is not None else 0,
            d.stats if d is not None else DiskStats(),
        )

    # -- lookups

    def get_ram(self, chunk: Chunk) -> bytes | None:
        data = self.ram.get(chunk.digest)
        if data is None:
            self.metrics.cache_misses.inc(tier="ram")
        else:
            self.metrics.cache_hits.inc(tier="ram")
            if self.disk is not None:
                self.disk.touch(chunk.digest)
        return data

    def get_disk_cached(self, chunk: Chunk, *, ram: bool = True) -> bytes | None:
        """The chunk from the disk tier without blocking (:meth:`DiskCache.get_cached`),
        moved into RAM if ``ram``; None if that needs a worker thread (or it is not there)."""
        if self.disk is None:
            return None
        v = self.disk.get_cached(chunk)
        if v is None:
            return None
        self.metrics.cache_hits.inc(tier="disk")
        if ram:
            self.ram.put(v)
        return v.data

    def on_disk(self, chunk: Chunk) -> bool:
        return self.disk is not None and chunk.digest in self.disk

    def contains(self, chunk: Chunk) -> bool:
        return chunk.digest in self.ram or self.on_disk(chunk)

    async def get_disk_many(
        self, chunks: Sequence[Chunk], *, ram: bool = True, count: bool = True
    ) -> dict[int, VerifiedChunk]:
        """The chunks the disk tier holds (verified), by chunk id; moved into RAM if ``ram``.
        ``count``: record hits and misses (not for prefetch, which looks for what is absent)."""
        disk = self.disk
        if disk is None or not chunks:
            return {}
        wanted = [c for c in chunks if c.digest in disk]
        if count and len(chunks) > len(wanted):
            self.metrics.cache_misses.inc(len(chunks) - len(wanted), tier="disk")
        if not wanted:
            return {}

        def work() -> list[VerifiedChunk | None]:
            return [disk.get(c) for c in wanted]

        found = await trio.to_thread.run_sync(work)
        out = {}
        for c, v in zip(wanted, found, strict=True):
            if count:
                (self.metrics.cache_misses if v is None else self.metrics.cache_hits).inc(tier="disk")
            if v is None:
                continue
            if ram:
                self.ram.put(v)
            out[c.id] = v
        return out

    async def get(self, chunk: Chunk) -> bytes | None:
        """A chunk's bytes from RAM, else from disk (then kept in RAM), else None."""
        data = self.get_ram(chunk)
        if data is not None:
            return data
        found = await self.get_disk_many([chunk])
        v = found.get(chunk.id)
        return v.data if v is not None else None

    # -- storing: verified chunks only

    def put_ram(self, v: VerifiedChunk) -> None:
        """Keep a chunk in the RAM tier (trio thread)."""
        self.ram.put(v)

    def put_disk_blocking(self, v: VerifiedChunk) -> bool:
        """Write a chunk to the disk tier, if there is one; False if not written. Blocking:
        for a worker thread, such as the one that just decoded ``v``."""
        return self.disk.put(v) if self.disk is not None else False


__all__ = [
    "DISK_FORMAT",
    "CacheCounts",
    "ChunkCache",
    "DiskCache",
    "DiskStats",
    "RamCache",
]
