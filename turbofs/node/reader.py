"""Reads of file bytes: chunk map -> cache (RAM, then disk) -> source, with single-flight.

``read(ino, offset, length)``::

    map_range -> slices of chunks (holes read as zeros)
      -> RAM tier hit, or disk tier hit all in the page cache (``RWF_NOWAIT``, a file this
         process trusts): slice it, no await, no thread
      -> else join or start a *flight* for the chunk, wait (at most read_timeout):
           disk tier (verified) or source.fetch (coalesced ranges)
           -> codec: frame check + decompress, once -> cache (disk, + RAM) -> every waiter

Chunk states: ``MISSING -> FETCHING -> CACHED``, a failed fetch back to ``MISSING``
(:class:`ChunkState`). One flight per chunk, whatever the number of waiters; its result or
error reaches all of them. Bytes that do not match their digest are fetched once more, then
the read fails with :class:`~turbofs.node.errors.ChunkCorrupt`: never returned, never cached.

Failure time is bounded: a read waits at most ``read_timeout`` (then
:class:`~turbofs.node.errors.FetchTimeout`), and the fetches of reads (demand, readahead) end
at that deadline too, retries included. A chunk's failure (or a read's timeout on it) is
remembered for ``READER_FAILURE_MEMORY`` seconds and shared by every reader: reads of it
meanwhile fail at once with the same cause, so one user ``read()`` (several FUSE reads) waits
once; afterwards the next read fetches it afresh.

Demand reads and readahead (:class:`SequentialReads`) have their own slots
(``demand_parallel``); prefetch (:mod:`turbofs.node.prefetch`) has others and pauses while
demand reads wait. The presentations use the reader only through :class:`PresentationReader`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol

import trio
from lru import LRU

from turbofs.core.codec import VerifiedChunk, decode_frame
from turbofs.core.config import (
    READER_FAILURE_MEMORY,
    READER_RECENT_FAILURE,
    READER_SEQ_TRACKED_FILES,
    DaemonConfig,
)
from turbofs.core.errors import DigestMismatch, FormatError
from turbofs.core.format import Chunk, Index
from turbofs.node.cache import ChunkCache
from turbofs.node.errors import ChunkCorrupt, FetchFailed, FetchTimeout, ReaderClosed, ReadError
from turbofs.node.metrics import NodeMetrics
from turbofs.node.source import ChunkSource

log = logging.getLogger("turbofs.node.reader")


class FetchKind(enum.StrEnum):
    DEMAND = "demand"  # a read waits for it
    READAHEAD = "readahead"  # a sequential reader will want it soon (into RAM and disk)
    PREFETCH = "prefetch"  # background, into the disk tier only
    STARTUP = "startup"  # prefetch of a recorded startup's chunks: reads will want them soon (RAM and disk)


#: The kind a read waiting on flights of several kinds is counted under: the first here.
_WAIT_ORDER: Final = [FetchKind.STARTUP, FetchKind.PREFETCH, FetchKind.READAHEAD, FetchKind.DEMAND]


class ChunkState(enum.StrEnum):
    MISSING = "missing"
    FETCHING = "fetching"
    CACHED = "cached"


class IllegalTransition(RuntimeError):
    """A chunk state change the state machine does not allow (a bug, never user error)."""


_ALLOWED: Final = {
    (ChunkState.MISSING, ChunkState.FETCHING),
    (ChunkState.FETCHING, ChunkState.CACHED),
    (ChunkState.FETCHING, ChunkState.MISSING),
}


class _FetchTimedOut(Exception):
    """A background fetch passed fetch_timeout."""


class _Closed(Exception):
    """The reader closed before the fetch finished."""


class _ReadTimedOut(Exception):
    """A read waited ``read_timeout`` for the chunk (its message is the cause)."""


class _Flight:
    """One chunk on its way in; every reader of the chunk waits on ``done``."""

    __slots__ = ("chunk", "data", "done", "error", "kind", "state", "waiters")

    def __init__(self, chunk: Chunk, kind: FetchKind) -> None:
        self.chunk = chunk
        self.kind = kind
        self.state = ChunkState.MISSING
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.waiters = 0

    def move(self, to: ChunkState) -> None:
        if (self.state, to) not in _ALLOWED:
            raise IllegalTransition(f"chunk {self.chunk.id}: {self.state.value} -> {to.value}")
        self.state = to


@dataclass
class _Seq:
    end: int
    streak: int = 0
    ra_piece: int = -1


class SequentialReads:
    """The one readahead detection: which streams of reads (a file, the erofs image file)
    go forward, so that the chunks after them are worth fetching ahead.

    A read continues its stream when it starts within ``slack`` bytes of where the stream
    ended; after ``trigger`` such reads in a row, :meth:`ahead` says yes once for each
    ``step``-sized piece the stream's end moves into.
    """

    def __init__(self, trigger: int, tracked: int = READER_SEQ_TRACKED_FILES) -> None:
        self.trigger = trigger
        self._seq: LRU[int, _Seq] = LRU(tracked)

    def ahead(self, key: int, offset: int, end: int, *, slack: int, step: int) -> bool:
        """Record a read of ``[offset, end)`` of stream ``key``; True: read ahead from ``end``."""
        st = self._seq.get(key)
        if st is None:
            self._seq[key] = _Seq(end)
            return False
        if abs(offset - st.end) <= slack:
            st.streak += 1
            st.end = max(st.end, end)
        else:
            st.streak = 0
            st.end = end
            return False
        piece = end // step
        if st.streak < self.trigger or piece <= st.ra_piece:
            return False
        st.ra_piece = piece
        return True


class PresentationReader(Protocol):
    """The reader as the presentations (turbofs.mount) use it: nothing else of it is theirs."""

    async def read(self, ino: int, offset: int, length: int) -> bytes: ...

    async def read_chunks(self, chunks: Sequence[Chunk], *, ino: int | None = None) -> dict[int, bytes]: ...

    def read_ahead(self, chunks: Sequence[Chunk]) -> int: ...

    def in_ram(self, chunk: Chunk) -> bytes | None: ...

    def subscribe_startup_chunks(self, callback: Callable[[Chunk, bytes], None]) -> Callable[[], None]: ...


class ChunkReader:
    """File reads of one image over a chunk source and a (possibly shared) chunk cache.

    Use as ``async with ChunkReader(...) as reader:``; fetches run in its nursery.
    """

    def __init__(
        self,
        index: Index,
        source: ChunkSource,
        cache: ChunkCache,
        cfg: DaemonConfig | None = None,
        *,
        metrics: NodeMetrics | None = None,
        name: str | None = None,
    ) -> None:
        self.index = index
        self.source = source
        self.cache = cache
        self.cfg = (cfg or DaemonConfig()).validate()
        self.metrics = metrics or cache.metrics
        self.name = name or source.name
        self._flights: dict[int, _Flight] = {}
        self._demand_slots = trio.CapacityLimiter(self.cfg.demand_parallel)
        self._seq = SequentialReads(self.cfg.readahead_trigger)
        self._demand_waiting = 0
        self._demand_idle = trio.Event()
        self._demand_idle.set()
        self._demand_last = -float("inf")  # trio time the last read stopped waiting
        self._read_last = -float("inf")  # trio time of the last read (cached or not)
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._paths: dict[int, str] | None = None
        self._last_failure: tuple[float, str] | None = None
        #: chunk id -> (trio time until which its failure holds, the failure)
        self._failures: dict[int, tuple[float, BaseException]] = {}
        self._trace: dict[int, None] = {}  # chunk ids in the order reads first asked for them
        self._startup_listeners: list[Callable[[Chunk, bytes], None]] = []

    # -- lifetime

    async def __aenter__(self) -> ChunkReader:
        stack = contextlib.AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None and self._nursery is not None
        self._nursery.cancel_scope.cancel()
        stack, self._stack, self._nursery = self._stack, None, None
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # fetch tasks never raise: the body's own exception comes out unwrapped
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                raise exc from None
            raise

    # -- introspection

    def state(self, chunk_id: int) -> ChunkState:
        flight = self._flights.get(chunk_id)
        if flight is not None:
            return flight.state
        return ChunkState.CACHED if self.cache.contains(self.index.chunk(chunk_id)) else ChunkState.MISSING

    def trace(self) -> list[int]:
        """The chunks reads have asked for (not readahead or prefetch), in first-use order:
        a process start's trace (:mod:`turbofs.core.trace`)."""
        return list(self._trace)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    @property
    def demand_waiting(self) -> int:
        """Reads waiting for chunks right now."""
        return self._demand_waiting

    async def wait_demand_idle(self, quiet: float = 0.0) -> None:
        """Return once no read waits for a chunk and no read at all (even one served from
        a cache) has come for ``quiet`` seconds: the process using the image is not busy
        reading it, so background work takes neither the link nor the CPU from it."""
        while True:
            while self._demand_waiting:
                await self._demand_idle.wait()
            left = max(self._demand_last, self._read_last) + quiet - trio.current_time()
            if left <= 0:
                return
            await trio.sleep(left)

    def demand_quiet(self, quiet: float) -> bool:
        """No read waits for a chunk, and no read has come for ``quiet`` seconds."""
        return not self._demand_waiting and trio.current_time() - max(self._demand_last, self._read_last) >= quiet

    def subscribe_startup_chunks(self, callback: Callable[[Chunk, bytes], None]) -> Callable[[], None]:
        """Call ``callback(chunk, data)`` with each chunk of a recorded startup once it is in
        (verified bytes); it must not block. Returns the function that ends the subscription."""
        self._startup_listeners.append(callback)
        return lambda: self._startup_listeners.remove(callback)

    def in_ram(self, chunk: Chunk) -> bytes | None:
        """The chunk's bytes if the RAM tier holds them (nothing fetched, no hit counted)."""
        return self.cache.ram.get(chunk.digest)

    def path_of(self, ino: int) -> str:
        """A path of ``ino`` in the image, for messages (built on first use)."""
        if self._paths is None:
            paths: dict[int, str] = {}
            try:
                for raw, i in self.index.walk():
                    paths.setdefault(i, "/" + raw.decode("utf-8", "backslashreplace"))
            except FormatError:
                pass
            self._paths = paths
        return self._paths.get(ino, f"<inode {ino}>")

    # -- reads

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of regular file ``ino`` (clipped to its size)."""
        slices = self.index.map_range(ino, offset, length)
        if not slices:
            return b""
        end = slices[-1].file_offset + slices[-1].length
        datas, missing = self._from_caches([s.chunk for s in slices if s.chunk is not None])
        if missing:
            self._fail_if_remembered(missing.values(), ino)
            flights = self._start(list(missing.values()), FetchKind.DEMAND)
            self._readahead(ino, offset, end)
            datas.update(await self._wait(flights, ino))
        else:
            self._readahead(ino, offset, end)
        parts = [
            bytes(s.length) if s.chunk is None else datas[s.chunk.id][s.chunk_offset : s.chunk_offset + s.length]
            for s in slices
        ]
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.metrics.reads.inc()
        self.metrics.read_bytes.inc(len(out))
        return out

    async def read_chunk(self, chunk: Chunk, *, ino: int | None = None) -> bytes:
        """The whole uncompressed chunk (for a reader of chunks rather than files)."""
        return (await self.read_chunks([chunk], ino=ino))[chunk.id]

    def _from_caches(self, chunks: Sequence[Chunk]) -> tuple[dict[int, bytes], dict[int, Chunk]]:
        """The chunks the RAM tier holds (by id), or the disk tier without blocking (a
        trusted file in the page cache), and the others (by id, once each)."""
        datas: dict[int, bytes] = {}
        missing: dict[int, Chunk] = {}
        trace = self._trace
        self._read_last = trio.current_time()
        for c in chunks:
            if c.id in datas or c.id in missing:
                continue
            if c.id not in trace:
                trace[c.id] = None
            data = self.cache.get_ram(c)
            if data is None and c.id not in self._flights:
                data = self.cache.get_disk_cached(c)
            if data is None:
                missing[c.id] = c
            else:
                datas[c.id] = data
        return datas, missing

    async def read_chunks(self, chunks: Sequence[Chunk], *, ino: int | None = None) -> dict[int, bytes]:
        """Whole uncompressed chunks by id; the missing ones are fetched together (one
        coalesced request where they are adjacent in a blob), not one request each."""
        datas, missing = self._from_caches(chunks)
        if missing:
            self._fail_if_remembered(missing.values(), ino)
            datas.update(await self._wait(self._start(list(missing.values()), FetchKind.DEMAND), ino))
        return datas

    # -- remembered failures

    def _remembered(self, chunk_id: int) -> BaseException | None:
        """The failure of ``chunk_id`` still remembered, or None (an old one is forgotten)."""
        found = self._failures.get(chunk_id)
        if found is None:
            return None
        if trio.current_time() >= found[0]:
            del self._failures[chunk_id]
            return None
        return found[1]

    def _remember(self, chunk_id: int, error: BaseException) -> None:
        self._failures[chunk_id] = (trio.current_time() + READER_FAILURE_MEMORY, error)

    def _fail_if_remembered(self, chunks: Iterable[Chunk], ino: int | None) -> None:
        """Raise the remembered failure of the first of ``chunks`` that has one."""
        for c in chunks:
            err = self._remembered(c.id)
            if err is not None:
                self.metrics.remembered_failures.inc()
                raise self._error(c, err, ino, remembered=True)

    def read_ahead(self, chunks: Sequence[Chunk]) -> int:
        """Start fetching ``chunks`` (those not cached or in flight) for a reader that will
        want them soon; returns how many were started."""
        todo = [c for c in chunks if c.id not in self._flights and c.digest not in self.cache.ram
                and self._remembered(c.id) is None]
        if todo:
            self.metrics.readahead_chunks.inc(len(todo))
            self._start(todo, FetchKind.READAHEAD)
        return len(todo)

    async def prefetch(self, chunks: Sequence[Chunk], *, startup: bool = False) -> list[BaseException | None]:
        """Bring ``chunks`` into the disk tier (joining flights already under way); returns
        each chunk's error, or None. No timeout: each flight is bounded by fetch_timeout.
        ``startup``: chunks of a recorded startup, which reads will want soon: into RAM too."""
        todo = [c for c in chunks if not self.cache.contains(c)]  # its own backoff paces it
        kind = FetchKind.STARTUP if startup else FetchKind.PREFETCH
        flights = {f.chunk.id: f for f in self._start(todo, kind)}
        for f in flights.values():
            await f.done.wait()
        return [flights[c.id].error if c.id in flights else None for c in chunks]

    # -- flights

    def _start(self, chunks: Sequence[Chunk], kind: FetchKind) -> list[_Flight]:
        """The flights of ``chunks``: existing ones joined, the others started as one fetch."""
        if self._nursery is None:
            raise RuntimeError("ChunkReader used outside 'async with'")
        flights: list[_Flight] = []
        new: list[_Flight] = []
        for c in chunks:
            flight = self._flights.get(c.id)
            if flight is None:
                flight = _Flight(c, kind)
                flight.move(ChunkState.FETCHING)
                self._flights[c.id] = flight
                new.append(flight)
            flights.append(flight)
        if new:
            self._nursery.start_soon(self._run, new, kind)
        return flights

    def _settle(self, flight: _Flight, result: VerifiedChunk | BaseException) -> None:
        if flight.done.is_set():
            return
        if isinstance(result, VerifiedChunk):
            flight.move(ChunkState.CACHED)
            self._failures.pop(flight.chunk.id, None)
            if flight.kind is not FetchKind.PREFETCH:
                flight.data = result.data
            elif flight.waiters:  # a read joined the prefetch: it wants the bytes, and in RAM
                flight.data = result.data
                self.cache.put_ram(result)
            if flight.kind is FetchKind.STARTUP:
                for listener in self._startup_listeners:
                    try:
                        listener(flight.chunk, result.data)
                    except Exception:
                        log.exception("%s: a startup chunk listener failed", self.name)
        else:
            flight.move(ChunkState.MISSING)
            flight.error = result
            # remembered when a read waited on it (a failed readahead or prefetch alone is
            # not: the read that comes will try for itself)
            if not isinstance(result, _Closed) and (flight.waiters or flight.kind is FetchKind.DEMAND):
                self._remember(flight.chunk.id, result)
        if self._flights.get(flight.chunk.id) is flight:
            del self._flights[flight.chunk.id]
        flight.done.set()

    async def _run(self, flights: list[_Flight], kind: FetchKind) -> None:
        chunks = [f.chunk for f in flights]
        # a read's fetch, retries included, ends with the read's deadline: nothing of it is
        # left to hold a slot or a connection once the read has failed
        limit = self.cfg.read_timeout if kind in (FetchKind.DEMAND, FetchKind.READAHEAD) else self.cfg.fetch_timeout
        try:
            results: dict[int, VerifiedChunk | BaseException]
            try:
                with trio.move_on_after(limit) as scope:
                    results = await self._load(chunks, kind)
                if scope.cancelled_caught:
                    err = _FetchTimedOut(f"no answer from {self.source.name} within {limit:g} s")
                    results = dict.fromkeys((c.id for c in chunks), err)
            except Exception as exc:  # the source's failure is every waiter's failure
                results = dict.fromkeys((c.id for c in chunks), exc)
            for f in flights:
                res = results.get(f.chunk.id)
                if isinstance(res, BaseException):
                    self._last_failure = (trio.current_time(), f"{type(res).__name__}: {res}")
                self._settle(f, res if res is not None else RuntimeError("chunk missing from the fetch result"))
        finally:
            for f in flights:  # cancelled: the reader is closing
                self._settle(f, _Closed(f"reader of {self.name} closed"))

    async def _load(self, chunks: list[Chunk], kind: FetchKind) -> dict[int, VerifiedChunk | BaseException]:
        ram = kind is not FetchKind.PREFETCH
        count = kind in (FetchKind.DEMAND, FetchKind.READAHEAD)  # cache hits/misses are the reads'
        out: dict[int, VerifiedChunk | BaseException] = dict(
            await self.cache.get_disk_many(chunks, ram=ram, count=count)
        )
        rest = [c for c in chunks if c.id not in out]
        if rest:
            if kind in (FetchKind.PREFETCH, FetchKind.STARTUP):
                fetched = await self._fetch_verified(rest, kind)
            else:
                async with self._demand_slots:
                    fetched = await self._fetch_verified(rest, kind)
            if ram:  # disk hits went into RAM already
                for v in fetched.values():
                    if isinstance(v, VerifiedChunk):
                        self.cache.put_ram(v)
            out.update(fetched)
        return out

    def _decode_and_store(self, chunks: list[Chunk], frames: list[bytes]) -> list[VerifiedChunk | DigestMismatch]:
        """Check and decode each fetched frame (the codec) and hand what passes to the disk
        tier (the cache), in one worker-thread hop for the batch."""
        out: list[VerifiedChunk | DigestMismatch] = []
        for c, frame in zip(chunks, frames, strict=True):
            try:
                v = decode_frame(c, frame)
            except DigestMismatch as exc:
                out.append(exc)
                continue
            self.cache.put_disk_blocking(v)
            out.append(v)
        return out

    async def _fetch_verified(self, chunks: list[Chunk], kind: FetchKind) -> dict[int, VerifiedChunk | BaseException]:
        """Fetch, decompress, verify; chunks with a wrong digest are fetched once more."""
        out: dict[int, VerifiedChunk | BaseException] = {}
        pending = chunks
        for attempt in range(2):
            t0 = trio.current_time()
            try:
                frames = await self.source.fetch(pending)
            except Exception as exc:
                log.warning("%s: fetch of %d chunks failed: %s", self.name, len(pending), exc)
                out.update(dict.fromkeys((c.id for c in pending), exc))
                return out
            self.metrics.fetch_seconds.observe(trio.current_time() - t0, kind=kind.value)
            self.metrics.fetch_bytes.inc(sum(len(f) for f in frames), kind=kind.value)
            self.metrics.fetch_chunks.inc(len(frames), kind=kind.value)
            decoded = await trio.to_thread.run_sync(self._decode_and_store, pending, frames)
            bad: list[Chunk] = []
            for c, res in zip(pending, decoded, strict=True):
                if isinstance(res, DigestMismatch):
                    self.metrics.digest_failures.inc(source="network")
                    log.warning("%s: %s (attempt %d)", self.name, res, attempt + 1)
                    bad.append(c)
                    out[c.id] = res
                else:
                    out[c.id] = res
            if not bad:
                break
            if attempt == 0:
                self.metrics.refetches.inc(len(bad))
            pending = bad
        return out

    async def _wait(self, flights: list[_Flight], ino: int | None) -> dict[int, bytes]:
        for f in flights:
            f.waiters += 1
        if self._demand_waiting == 0:
            self._demand_idle = trio.Event()
        self._demand_waiting += 1
        # what the read waits on: its own fetch, or one the prefetch (a recorded startup's,
        # or the background's) had started; the disk tier's loads count as the fetches do
        on = min((f.kind for f in flights), key=_WAIT_ORDER.index).value
        t0 = trio.current_time()
        try:
            with trio.move_on_after(self.cfg.read_timeout) as scope:
                for f in flights:
                    await f.done.wait()
        finally:
            for f in flights:
                f.waiters -= 1
            self._demand_waiting -= 1
            now = trio.current_time()
            self.metrics.read_waits.inc(on=on)
            self.metrics.read_wait_seconds.inc(now - t0, on=on)
            if self._demand_waiting == 0:
                self._demand_last = now
                self._demand_idle.set()
        if scope.cancelled_caught:
            cause = f"no data from {self.source.name} after {self.cfg.read_timeout:g} s"
            if self._last_failure and trio.current_time() - self._last_failure[0] < READER_RECENT_FAILURE:
                cause += f" (last failure: {self._last_failure[1]})"
            else:
                cause += " (the fetch is still in progress)"
            timed_out = _ReadTimedOut(cause)
            late = [f for f in flights if not f.done.is_set()]
            for f in late:
                self._remember(f.chunk.id, timed_out)
                # a stuck flight (a prefetch's, under fetch_timeout) is left to finish on its
                # own: once the memory ends, the next read starts a fresh fetch
                if self._flights.get(f.chunk.id) is f:
                    del self._flights[f.chunk.id]
            raise self._error(late[0].chunk, timed_out, ino)
        out: dict[int, bytes] = {}
        for f in flights:
            if f.error is not None or f.data is None:
                raise self._error(f.chunk, f.error, ino)
            out[f.chunk.id] = f.data
        return out

    def _error(self, c: Chunk, err: BaseException | None, ino: int | None, *, remembered: bool = False) -> ReadError:
        """The read error for chunk ``c`` failing with ``err``: counted, logged (a remembered
        failure at debug level: it was logged when it happened), and named."""
        path = self.path_of(ino) if ino is not None else ""
        digest = c.digest.hex()
        where = f"{self.name}: {path or 'chunk read'}: chunk {c.id} (sha256:{digest[:16]}...)"
        cls: type[ReadError]
        if isinstance(err, _ReadTimedOut):
            cls, kind = FetchTimeout, "timeout"
            cause = str(err)
        elif isinstance(err, DigestMismatch):
            cls, kind = ChunkCorrupt, "corrupt"
            cause = f"wrong content from {self.source.name} twice: {err}"
        elif isinstance(err, _FetchTimedOut):
            cls, kind = FetchTimeout, "timeout"
            cause = str(err)
        elif isinstance(err, _Closed):
            cls, kind = ReaderClosed, "closed"
            cause = str(err)
        else:
            cls, kind = FetchFailed, "fetch"
            cause = f"{type(err).__name__}: {err}" if err is not None else "no data"
        self.metrics.errors.inc(kind=kind)
        if remembered:
            cause += f" (failed less than {READER_FAILURE_MEMORY:g} s ago: not fetched again yet)"
        message = f"{where}: {cause}"
        log.log(logging.DEBUG if remembered else logging.ERROR, "%s", message)
        return cls(message, image=self.name, path=path, chunk_id=c.id, digest="sha256:" + digest, cause=cause)

    # -- readahead

    def _readahead(self, ino: int, offset: int, end: int) -> None:
        n = self.cfg.readahead_chunks
        if n <= 0:
            return
        cs = self.index.chunk_size
        if not self._seq.ahead(ino, offset, end, slack=cs, step=cs):
            return
        try:
            ahead = self.index.map_range(ino, end, n * cs)
        except FormatError:
            return
        self.read_ahead(list({s.chunk.id: s.chunk for s in ahead if s.chunk is not None}.values()))


__all__ = ["ChunkReader", "ChunkState", "FetchKind", "IllegalTransition", "PresentationReader", "SequentialReads"]
