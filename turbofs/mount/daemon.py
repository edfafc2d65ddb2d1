"""``turbofs mount``: the node daemon's life, from the index to an unmounted mountpoint.

::

    turbofs mount REF MP          parent: spawns the daemon, waits for "ready" on a pipe, exits
      └─ turbofs mount --foreground   the daemon (trio):
           open_image (manifest + index only) -> ChunkReader -> presentation -> pyfuse3.init
           nursery: pyfuse3.main | handshake + readahead | control socket | prefetch | signals
    turbofs status MP             asks the daemon's control socket (turbofs.mount.control)
    turbofs umount MP             unmounts; the daemon sees the unmount and exits

The presentation is per-file FUSE (turbofs.mount.fusefs) or erofs (turbofs.mount.erofsfile,
.erofsmount, .pagecache). Every mount has a state folder, ``<run_dir>/<key>/`` (key: a hash
of the mountpoint): ``pid``, ``control.sock``, ``daemon.log``. What a killed daemon left on
the mountpoint is removed by the next ``turbofs mount`` on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from turbofs.core.errors import TurboError, single_error
from turbofs.core.format import Index
from turbofs.erofs import ErofsError, ErofsImage, prepare_image
from turbofs.mount import kernel
from turbofs.mount.control import serve_control
from turbofs.mount.ctl import PREFETCH_INCOMPLETE, MountRequest, clean_stale, state_dir
from turbofs.mount.erofsfile import IMAGE_INO, ErofsFileFS, image_mount_options
from turbofs.mount.erofsmount import ErofsMount, unmount_dead_erofs
from turbofs.mount.fusefs import TurboFS, fuse_options
from turbofs.mount.pagecache import PageCacheStore, stop_page_cache_stores
from turbofs.node import memory
from turbofs.node.cache import ChunkCache
from turbofs.node.metrics import NodeMetrics
from turbofs.node.prefetch import Prefetcher, PrefetchState
from turbofs.node.reader import ChunkReader
from turbofs.node.source import OpenedImage, open_image

log = logging.getLogger("turbofs.daemon")

_IMPORTED = time.monotonic()
_handed: float | None = None  # when a spare daemon was handed its mount (monotonic)


def handed_now() -> None:
    """This process is a spare daemon that was just handed its mount (:mod:`turbofs.mount.spare`):
    its timeline counts from now, not from its start."""
    global _handed
    _handed = time.monotonic()


def since_start() -> float:
    """Seconds since this process started to serve its mount: since its exec (from /proc:
    the interpreter's start and imports included; since this module's import where /proc
    does not say), or, for a spare daemon, since it was handed the mount."""
    if _handed is not None:
        return time.monotonic() - _handed
    try:
        ticks = int(Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


# -- the daemon --------------------------------------------------------------------------


class Daemon:
    """One mount's daemon: opens the image, serves a presentation until it is unmounted,
    and answers its control socket."""

    def __init__(self, req: MountRequest, notify: Callable[[str], None]) -> None:
        self.req = req
        self.notify = notify
        self.metrics = NodeMetrics()
        self.state = state_dir(req.run_dir, req.mountpoint)
        self.started = time.time()
        self.reader: ChunkReader | None = None
        self.cache: ChunkCache | None = None
        self.prefetcher: Prefetcher | None = None
        self.ops: TurboFS | ErofsFileFS | None = None
        self.ready = trio.Event()
        self.mode = "fuse"  # or "erofs" (decided in run)
        self.erofs: ErofsMount | None = None
        self.failure: TurboError | None = None  # why the erofs mount could not be made
        self.opened: OpenedImage | None = None
        #: seconds from the process's start (a spare's: its hand-over) to each step of the
        #: way to "ready" (status)
        self.timeline: dict[str, float] = {}

    def _mark(self, step: str) -> None:
        self.timeline[step] = round(since_start(), 3)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ref": self.req.ref,
            "mountpoint": str(self.req.mountpoint),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "mode": self.mode,
            "memory": memory.rss_figures(),
            "timeline": self.timeline,
        }
        if self.erofs is not None:
            out["erofs"] = self.erofs.status()
        if self.cache is not None:
            out["cache"] = dataclasses.asdict(self.cache.counts())
        if self.reader is not None:
            out["in_flight"] = self.reader.in_flight
        if self.prefetcher is not None:
            out["prefetch"] = dataclasses.asdict(self.prefetcher.progress())
        if self.ops is not None:
            out["fuse_requests"] = dict(self.ops.counts)
        return out

    def _trace(self, chunk_ids: list[int]) -> bytes:
        """What this mount has read so far (``chunk_ids``), as a startup trace (``turbofs
        trace``); runs in a worker thread (it walks the whole index)."""
        from turbofs.core import trace

        if self.opened is None:
            return trace.StartupTrace(image=self.req.ref).to_json()
        return trace.recorded(self.opened.index, chunk_ids, image=self.req.ref,
                              index_digest=self.opened.manifest.index.digest).to_json()

    async def _answer(self, command: str) -> str:
        """The control socket's answer to ``command`` (status is the default)."""
        if command == "metrics":
            return self.metrics.render()
        if command == "trace":
            ids = self.reader.trace() if self.reader is not None else []  # a copy, taken here
            return (await trio.to_thread.run_sync(self._trace, ids)).decode()
        return json.dumps(self.status(), default=str)

    async def _handshake(self) -> None:
        """Wait until the kernel finished FUSE_INIT (a stat answers), then tune and report."""
        if self.erofs is not None:
            try:
                await self.erofs.start()  # and mount erofs from the FUSE file
            except TurboError as exc:
                self.failure = exc
                pyfuse3.terminate()
                return
        else:
            bdi = await trio.to_thread.run_sync(kernel.bdi_of, self.req.mountpoint)
            if self.req.readahead_kb:
                await trio.to_thread.run_sync(kernel.set_readahead, bdi, self.req.readahead_kb)
        self._mark("ready")
        self.ready.set()
        self.notify("ready")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting %s", signum, self.req.mountpoint)
                if self.erofs is not None:
                    await trio.to_thread.run_sync(self._stop_erofs)
                pyfuse3.terminate()
                return

    async def _prefetch(self) -> None:
        assert self.prefetcher is not None
        await self.prefetcher.run()
        memory.trim()  # the prefetch's buffers are gone: give their pages back
        await self.ready.wait()  # "prefetched" never comes before "ready"
        p = self.prefetcher.progress()
        # "prefetched" only when every chunk is on disk (``mount --wait`` returns 0 on it)
        self.notify("prefetched" if p.state is PrefetchState.DONE else f"{PREFETCH_INCOMPLETE} {p.summary()}")

    async def run(self) -> None:
        req = self.req
        self._mark("started")
        self.state.mkdir(parents=True, exist_ok=True)
        unmount_dead_erofs(self.state, req.mountpoint)  # reads the old pid file: first
        (self.state / "pid").write_text(f"{os.getpid()}\n")
        try:
            clean_stale(req.mountpoint)
            opened = await open_image(req.ref, auth=req.auth, scheme=req.scheme, platform=req.platform,
                                      metrics=self.metrics)
            self._mark("image_opened")
            self.opened = opened
            try:
                cache = await trio.to_thread.run_sync(lambda: ChunkCache.from_config(req.cfg, metrics=self.metrics))
            except OSError as exc:  # a full disk, no permission...: say which folder and why
                await opened.source.aclose()
                raise TurboError(f"cache folder {req.cfg.cache_dir} cannot be used: {exc.strerror or exc}") from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                (self.state / "pid").unlink()  # no daemon to find there
            raise
        self.cache = cache
        name = f"turbofs:{req.ref}"[:200].replace(",", "_")
        try:
            async with ChunkReader(opened.index, opened.source, cache, req.cfg, metrics=self.metrics, name=req.ref) as reader:
                self.reader = reader
                if req.cfg.prefetch and req.cfg.cache_dir is not None:
                    self.prefetcher = Prefetcher(reader, req.cfg)
                failed: Exception | None = None
                async with trio.open_nursery() as outer:
                    # the prefetch (a recorded startup's chunks first) starts now, while the
                    # erofs metadata is built in a worker thread: the link is busy sooner
                    if self.prefetcher is not None:
                        outer.start_soon(self._prefetch)
                    try:
                        await self._serve(reader, opened, name)
                    except Exception as exc:  # raised below as itself, not in a nursery's group
                        failed = exc
                    outer.cancel_scope.cancel()
                if failed is not None:
                    raise failed
                if self.failure is not None:
                    raise self.failure
        finally:
            await opened.source.aclose()
            for leftover in ("control.sock", "pid"):
                with contextlib.suppress(FileNotFoundError):
                    (self.state / leftover).unlink()

    async def _serve(self, reader: ChunkReader, opened: OpenedImage, name: str) -> None:
        """Build the presentation, mount it, and serve until it is unmounted."""
        req = self.req
        image = await self._erofs_image(opened.index)
        self._mark("metadata")
        memory.trim()  # the metadata build's temporary objects
        if image is not None:
            self.mode = "erofs"
            store = None
            if req.cfg.startup_notify_store:
                store = PageCacheStore(image, IMAGE_INO, name=req.ref)
                reader.subscribe_startup_chunks(store.put)
            self.ops = ErofsFileFS(image, reader, self.metrics, name=req.ref,
                                   readahead_trigger=req.cfg.readahead_trigger, store=store)
            self.erofs = ErofsMount(self.state, req.mountpoint, image, readahead_kb=req.readahead_kb)
            fuse_at, options = self.erofs.prepare_dir(), image_mount_options(name)
        else:
            self.ops = TurboFS(opened.index, reader, attr_timeout=req.attr_timeout, name=req.ref)
            fuse_at, options = req.mountpoint, fuse_options(name, allow_other=req.allow_other)
        pyfuse3.init(self.ops, str(fuse_at), options)
        self._mark("fuse_mounted")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, self.state / "control.sock", self._answer)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._handshake)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            self._stop_erofs()
            pyfuse3.close(unmount=self.erofs is None or self.erofs.hidden_mounted)

    def _stop_erofs(self) -> None:
        """Stop the page-cache pushes (they must not outlive the FUSE session) and detach
        the erofs mount (the FUSE session ends with it)."""
        if self.erofs is not None:
            stop_page_cache_stores()
            self.erofs.stop()

    async def _erofs_image(self, index: Index) -> ErofsImage | None:
        """The erofs image to serve, or None for the per-file FUSE mode (``cfg.mode``)."""
        mode = self.req.cfg.mode
        if mode == "fuse":
            return None
        why_not = kernel.cannot_mount_erofs()
        if why_not:
            if mode == "erofs":
                raise TurboError(f"{why_not}: mount with --mode fuse")
            return None
        try:
            cache_dir = self.req.cfg.cache_dir
            return await trio.to_thread.run_sync(lambda: prepare_image(index, cache_dir=cache_dir))
        except ErofsError as exc:
            if mode == "erofs":
                raise TurboError(f"{self.req.ref}: refusing to serve it as erofs: {exc}") from None
            log.warning("%s: serving it with the per-file FUSE mode: %s", self.req.ref, exc)
            return None


def run_foreground(req: MountRequest, ready_fd: int | None = None) -> None:
    """Run the daemon in this process until the mount goes away."""
    out = os.fdopen(ready_fd, "w", buffering=1) if ready_fd is not None else None

    def notify(event: str) -> None:
        if out is not None:
            with contextlib.suppress(OSError):
                out.write(event + "\n")
                out.flush()
        else:
            print(f"turbofs: {event}: {req.ref} at {req.mountpoint}", file=sys.stderr, flush=True)

    memory.tune_allocator()  # before any worker thread: RSS = RAM bound + a fixed overhead
    try:
        with single_error():  # a nursery's failure: report the error that caused it
            trio.run(Daemon(req, notify).run)
    finally:
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()

