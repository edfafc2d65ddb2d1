"""Background prefetch of an image's chunks into the disk tier, in the index's order.

**Startup**: a recorded startup's chunks first, in first-use order, small batches at full
parallelism, into RAM too; it does not yield to reads, which will want them soon.
**Background**: the rest, in batches of adjacent chunks (``prefetch_batch_bytes``),
``prefetch_parallel`` at a time, optionally bandwidth-capped, to disk only.

Both go through :meth:`ChunkReader.prefetch` (one single-flight table). No background batch
starts while a read waits or until reads have been quiet for ``prefetch_quiet`` seconds, so a
read's response never queues behind batches. Failed batches are retried with backoff (for at
most ``PREFETCH_GIVE_UP`` seconds of nothing but failures); a chunk corrupt twice is skipped.
Prefetch stops at ``prefetch_disk_share`` of the disk bound, since more would evict its own
first, most useful chunks, and when the file system is down to the cache's reserve.

Success means local: the state is ``done`` only if every chunk is in the disk tier (written
after its digest check) when the prefetch ends; otherwise ``incomplete`` (or ``stopped`` at
the bound), with ``missing``: chunks not on disk by cause (``disk_full``, ``write_error``,
``corrupt``, ``fetch``, ``disk_bound``, ``evicted``).
"""

from __future__ import annotations

import enum
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import trio

from turbofs.core.config import (
    PREFETCH_BATCH_EXPANSION,
    PREFETCH_BUCKET_BURST,
    PREFETCH_GIVE_UP,
    DaemonConfig,
)
from turbofs.core.errors import DigestMismatch
from turbofs.core.format import Chunk
from turbofs.node.reader import ChunkReader

log = logging.getLogger("turbofs.node.prefetch")


class PrefetchState(enum.StrEnum):  # a str: JSON-friendly for ``turbofs status``
    WAITING = "waiting"  # not started
    STARTUP = "startup"  # fetching a recorded startup's chunks
    RUNNING = "running"
    PAUSED = "paused"  # a demand read is waiting
    BACKOFF = "backoff"  # after a failed fetch
    DONE = "done"  # every chunk on disk, checked
    INCOMPLETE = "incomplete"  # ended with chunks not on disk: ``missing`` says how many and why
    STOPPED = "stopped"  # reached its share of the disk cache bound (``missing``: disk_bound)
    DISABLED = "disabled"  # no disk tier, or prefetch turned off


@dataclass(frozen=True)
class PrefetchProgress:
    """Where a prefetch stands. Bytes are compressed bytes (what crosses the network)."""

    state: PrefetchState
    chunks_total: int
    chunks_done: int  # on disk: fetched now, or found there
    chunks_fetched: int  # fetched by this prefetcher
    chunks_failed: int  # given up (wrong digest twice)
    bytes_total: int
    bytes_done: int
    bytes_fetched: int
    errors: int  # failed fetches, each retried after a backoff
    elapsed: float  # seconds since the start
    bytes_per_second: float  # fetched bytes / elapsed
    chunks_per_second: float
    last_error: str | None
    startup_chunks: int = 0  # chunks of the recorded startup (the first phase)
    startup_seconds: float | None = None  # when the startup phase ended (since the start)
    #: chunks not on disk, by cause; complete once the prefetch has ended
    missing: dict[str, int] = field(default_factory=dict)
    write_errors: int = 0  # chunks fetched and checked, but not written to the disk tier

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0

    @property
    def finished(self) -> bool:
        return self.state in (PrefetchState.DONE, PrefetchState.INCOMPLETE, PrefetchState.STOPPED,
                              PrefetchState.DISABLED)

    def summary(self) -> str:
        """One line: the state, and for a prefetch that ended short, what is missing and why."""
        if not self.missing:
            return f"{self.state.value}: {self.chunks_done} of {self.chunks_total} chunks on disk"
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(self.missing.items()))
        text = f"{self.state.value}: {sum(self.missing.values())} of {self.chunks_total} chunks not on disk ({causes})"
        return text + (f"; last error: {self.last_error}" if self.last_error else "")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; taking more than there are
    goes into debt, and the taker sleeps until the debt is paid (so the long-run rate holds
    for requests of any size)."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = trio.current_time) -> None:
        if rate <= 0 or burst < 0:
            raise ValueError("rate must be positive, burst not negative")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last: float | None = None

    async def acquire(self, n: float) -> None:
        now = self._clock()
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class Prefetcher:
    """Prefetch of one image's chunks into the disk tier, through its reader."""

    def __init__(
        self,
        reader: ChunkReader,
        cfg: DaemonConfig | None = None,
        *,
        order: Sequence[int] | None = None,
    ) -> None:
        self.reader = reader
        self.cfg = (cfg or reader.cfg).validate()
        index = reader.index
        ids = order if order is not None else index.prefetch_order()
        startup = dict.fromkeys(index.startup_chunks() if order is None else ())
        self._startup = [index.chunk(i) for i in startup]
        self._rest = [index.chunk(i) for i in dict.fromkeys(ids) if i not in startup]
        self._chunks = self._startup + self._rest
        self._startup_end: float | None = None  # set when the startup phase has ended
        self._bytes_total = sum(c.clen for c in self._chunks)
        self._state = PrefetchState.WAITING
        self._done = trio.Event()
        self._start: float | None = None
        self._end: float | None = None
        self.chunks_done = 0
        self.chunks_fetched = 0
        self.chunks_failed = 0
        self.bytes_done = 0
        self.bytes_fetched = 0
        self.errors = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self._written = 0  # disk usage this prefetcher added
        self._stop = False
        self._stop_cause: str | None = None  # why it stopped early: disk_bound, disk_full, fetch
        self._failed: dict[int, str] = {}  # chunk id -> why it is not on disk (corrupt, write_error...)
        self._missing: dict[str, int] = {}  # at the end: chunks not on disk, by cause
        self._failing_since: float | None = None  # every fetch has failed since then
        self._paused = 0
        self._backing_off = 0
        self._bucket = (
            TokenBucket(self.cfg.prefetch_bandwidth, self.cfg.prefetch_bandwidth * PREFETCH_BUCKET_BURST)
            if self.cfg.prefetch_bandwidth
            else None
        )
        reader.metrics.track_prefetch(reader.name, self._figures)

    # -- status

    def _figures(self) -> dict[str, float]:
        p = self.progress()
        return {
            "chunks_done": p.chunks_done, "chunks_total": p.chunks_total, "chunks_failed": p.chunks_failed,
            "bytes_done": p.bytes_done, "bytes_total": p.bytes_total, "bytes_fetched": p.bytes_fetched,
            "errors": p.errors, "write_errors": p.write_errors, "chunks_missing": sum(p.missing.values()),
        }

    def progress(self) -> PrefetchProgress:
        state = self._state
        if state is PrefetchState.RUNNING:
            if self._startup and self._startup_end is None:
                state = PrefetchState.STARTUP
            if self._backing_off:
                state = PrefetchState.BACKOFF
            elif self._paused:
                state = PrefetchState.PAUSED
        if self._start is None:
            elapsed = 0.0
        else:
            elapsed = (self._end if self._end is not None else trio.current_time()) - self._start
        return PrefetchProgress(
            state, len(self._chunks), self.chunks_done, self.chunks_fetched, self.chunks_failed,
            self._bytes_total, self.bytes_done, self.bytes_fetched, self.errors, elapsed,
            self.bytes_fetched / elapsed if elapsed > 0 else 0.0,
            self.chunks_fetched / elapsed if elapsed > 0 else 0.0,
            self.last_error,
            len(self._startup),
            None if self._startup_end is None or self._start is None else self._startup_end - self._start,
            dict(self._missing),
            self.write_errors,
        )

    async def wait_done(self) -> PrefetchProgress:
        await self._done.wait()
        return self.progress()

    # -- the work

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prefetch everything (or up to the disk share); returns when finished."""
        self._start = trio.current_time()
        try:
            if not self.cfg.prefetch or self.reader.cache.disk is None:
                self._state = PrefetchState.DISABLED
                task_status.started()
                return
            self._state = PrefetchState.RUNNING
            task_status.started()
            if self._startup:
                try:
                    await self._phase(self._batches(self._startup, self.cfg.prefetch_startup_batch_bytes), True)
                finally:
                    self._startup_end = trio.current_time()
            if not self._stop:
                await self._phase(self._batches(self._rest, self.cfg.prefetch_batch_bytes), False)
            self._missing = self._not_on_disk()
            if not self._missing:
                self._state = PrefetchState.DONE
            elif self._stop_cause == "disk_bound":
                self._state = PrefetchState.STOPPED
            else:
                self._state = PrefetchState.INCOMPLETE
            if self.reader.cache.disk is not None:
                self.reader.cache.disk.flush_write_log()
            p = self.progress()
            log.log(
                logging.INFO if p.state is PrefetchState.DONE else logging.WARNING,
                "%s: prefetch %s: %d of %d chunks, %.1f of %.1f MB, %.1f s",
                self.reader.name, p.summary(), p.chunks_done, p.chunks_total,
                p.bytes_done / 1e6, p.bytes_total / 1e6, p.elapsed,
            )
        finally:
            self._end = trio.current_time()
            self._done.set()

    def _not_on_disk(self) -> dict[str, int]:
        """The chunks the disk tier does not hold now, by cause."""
        cache = self.reader.cache
        causes: Counter[str] = Counter()
        for c in dict.fromkeys(self._chunks):
            if not cache.on_disk(c):
                causes[self._failed.get(c.id) or self._stop_cause or "evicted"] += 1
        return dict(causes)

    def _end_early(self, cause: str, why: str) -> None:
        if not self._stop:
            log.warning("%s: prefetch ends early: %s", self.reader.name, why)
        self._stop, self._stop_cause = True, self._stop_cause or cause

    def _done_chunk(self, c: Chunk, *, fetched: bool) -> None:
        self.chunks_done += 1
        self.bytes_done += c.clen
        if fetched:
            self.chunks_fetched += 1
            self.bytes_fetched += c.clen
            self._written += c.ulen  # disk usage: the disk tier holds uncompressed chunks

    async def _phase(self, batches: Iterator[list[Chunk]], startup: bool) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.cfg.prefetch_parallel):
                nursery.start_soon(self._worker, batches, startup)

    def _batches(self, chunks: Sequence[Chunk], max_bytes: int) -> Iterator[list[Chunk]]:
        """Consecutive ``chunks`` not cached yet, ``max_bytes`` compressed at most per batch
        and ``PREFETCH_BATCH_EXPANSION`` times that uncompressed (a batch is held
        decompressed until on disk). Lazy: what reads cached meanwhile is skipped."""
        cache = self.reader.cache
        batch: list[Chunk] = []
        size = usize = 0
        for c in chunks:
            if self._stop:
                return
            if cache.on_disk(c):
                self._done_chunk(c, fetched=False)
                continue
            if batch and (size + c.clen > max_bytes or usize + c.ulen > max_bytes * PREFETCH_BATCH_EXPANSION):
                yield batch
                batch, size, usize = [], 0, 0
            batch.append(c)
            size += c.clen
            usize += c.ulen
        if batch and not self._stop:
            yield batch

    async def _worker(self, batches: Iterator[list[Chunk]], startup: bool) -> None:
        for batch in batches:
            await self._fetch_batch(batch, startup)
            if self._stop:
                return

    async def _fetch_batch(self, batch: list[Chunk], startup: bool = False) -> None:
        reader = self.reader
        disk = reader.cache.disk
        attempt = 0
        quiet = self.cfg.prefetch_quiet
        while batch:
            if not startup and not reader.demand_quiet(quiet):
                self._paused += 1
                try:
                    await reader.wait_demand_idle(quiet)
                finally:
                    self._paused -= 1
            if self._bucket is not None:
                await self._bucket.acquire(sum(c.clen for c in batch))
            todo = []
            for c in batch:
                if reader.cache.on_disk(c):
                    self._done_chunk(c, fetched=False)
                else:
                    todo.append(c)
            if not todo:
                return
            full = False
            if disk is not None:  # only what the file system can take above the cache's reserve
                room, fit = disk.free_bytes(), 0
                while fit < len(todo) and todo[fit].ulen <= room:
                    room -= todo[fit].ulen
                    fit += 1
                if fit == 0:
                    self._end_early("disk_full", f"the file system of {disk.root} is down to the cache's reserve")
                    return
                full, todo = fit < len(todo), todo[:fit]
            full_writes = disk.stats.disk_full if disk is not None else 0
            results = await reader.prefetch(todo, startup=startup)
            retry = []
            unwritten = 0
            for c, err in zip(todo, results, strict=True):
                if err is None:
                    if reader.cache.on_disk(c):
                        self._done_chunk(c, fetched=True)
                    else:  # fetched and checked, but the disk tier could not keep it
                        unwritten += 1
                        self._failed[c.id] = "write_error"
                elif isinstance(err, DigestMismatch):
                    self.chunks_failed += 1
                    self.errors += 1
                    self._failed[c.id] = "corrupt"
                    self.last_error = f"chunk {c.id}: {err}"
                else:
                    retry.append(c)
                    self.last_error = f"{type(err).__name__}: {err}"
            if len(retry) < len(todo):
                self._failing_since = None
            if unwritten and disk is not None:
                self.write_errors += unwritten
                self.errors += 1
                self.last_error = f"{unwritten} chunks not written to the disk cache: {disk.stats.last_write_error}"
                if disk.stats.disk_full > full_writes or disk.free_bytes() < max(c.ulen for c in todo):
                    for c in todo:
                        if self._failed.get(c.id) == "write_error":
                            self._failed[c.id] = "disk_full"
                    self._end_early("disk_full", f"the disk cache is full ({disk.stats.last_write_error})")
                    return
            if full and disk is not None:
                self._end_early("disk_full", f"the file system of {disk.root} is down to the cache's reserve")
                return
            if disk is not None and self._written >= disk.max_bytes * self.cfg.prefetch_disk_share:
                self._end_early("disk_bound", f"{self._written} bytes written, the cache's share of its bound")
                return
            if retry:
                now = trio.current_time()
                if self._failing_since is None:
                    self._failing_since = now
                elif now - self._failing_since > PREFETCH_GIVE_UP:
                    for c in retry:
                        self._failed[c.id] = "fetch"
                    self._end_early("fetch", f"every fetch failed for {PREFETCH_GIVE_UP:g} s ({self.last_error})")
                    return
                self.errors += 1
                attempt += 1
                cap = min(self.cfg.prefetch_backoff_max, self.cfg.prefetch_backoff * 2 ** (attempt - 1))
                delay = cap / 2 + random.uniform(0, cap / 2)
                log.warning(
                    "%s: prefetch of %d chunks failed (%s); again in %.1f s",
                    reader.name, len(retry), self.last_error, delay,
                )
                self._backing_off += 1
                try:
                    await trio.sleep(delay)
                finally:
                    self._backing_off -= 1
            batch = retry


__all__ = ["PrefetchProgress", "PrefetchState", "Prefetcher", "TokenBucket"]
