"""The push of a recorded startup's chunks into the kernel's page cache of the erofs image
file (``[daemon] startup_notify_store``).

erofs reads the image file through the FUSE file's page cache; each startup chunk the
prefetcher brings in is stored there (``pyfuse3.notify_store``, zero-padded to whole blocks),
so the startup's reads need no FUSE request. The pushes run in their own thread: the kernel
locks the pages it stores into, and a page under a FUSE read stays locked until the main
loop answers that read.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Final

import pyfuse3

from turbofs.core import format as fmt
from turbofs.core.config import PAGE_CACHE_STOP_WAIT
from turbofs.erofs import ErofsImage
from turbofs.erofs import ondisk as d

log = logging.getLogger("turbofs.mount.pagecache")


class PageCacheStore:
    """Pushes chunks into the kernel's page cache of the image file (FUSE inode ``ino``).

    :meth:`put` never blocks (the reader calls it from trio's loop). Nothing is pushed before
    :meth:`go_live` (the kernel has looked the image file up), since the prefetch may start
    before the FUSE mount exists; the caller hands the chunks that came in meanwhile to
    :meth:`go_live`. pyfuse3's session is one per process, so :func:`stop_page_cache_stores`
    stops every store of the process before the session closes.
    """

    _live: Final[set[PageCacheStore]] = set()
    _live_lock: Final = threading.Lock()

    def __init__(self, image: ErofsImage, ino: int, *, name: str = "turbofs",
                 notify: Callable[[int, int, bytes], None] | None = None) -> None:
        self.image = image
        self.ino = ino
        self.name = name
        self._notify = notify or pyfuse3.notify_store
        self._queue: queue.SimpleQueue[tuple[fmt.Chunk, bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # held while a push runs
        self._stopped = False
        self.live = False
        self._thread: threading.Thread | None = None
        #: in the image's figures (``turbofs status``: ``erofs``)
        self.stats = image.stats
        self.stats.update({"startup_notify_store": 1, "stored_chunks": 0, "stored_bytes": 0, "store_errors": 0})

    def put(self, chunk: fmt.Chunk, data: bytes) -> None:
        if self._stopped or not self.live:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="turbofs-page-cache-store", daemon=True)
            with PageCacheStore._live_lock:
                PageCacheStore._live.add(self)
            self._thread.start()
        self._queue.put((chunk, data))

    def go_live(self, backlog: Iterable[tuple[fmt.Chunk, bytes]] = ()) -> None:
        """Push from now on, starting with ``backlog`` (chunks that came in before)."""
        self.live = True
        for chunk, data in backlog:
            self.put(chunk, data)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            chunk, data = item
            with self._lock:
                if self._stopped:
                    return
                self._push(chunk, data)

    def _push(self, chunk: fmt.Chunk, data: bytes) -> None:
        offset = self.image.chunk_blocks[chunk.id] * d.BLOCK_SIZE
        pad = d.blocks_of(len(data)) * d.BLOCK_SIZE - len(data)
        try:
            self._notify(self.ino, offset, data + bytes(pad) if pad else data)
        except OSError as exc:
            self.stats["store_errors"] += 1
            if self.stats["store_errors"] == 1:
                log.warning("%s: cannot push chunk %d into the page cache: %s", self.name, chunk.id, exc)
            return
        self.stats["stored_chunks"] += 1
        self.stats["stored_bytes"] += len(data) + pad

    def stop(self, wait: float = PAGE_CACHE_STOP_WAIT) -> None:
        """No push after this returns (unless one was stuck for ``wait`` seconds: a push
        blocked on a page that a read holds locked, with no main loop left to answer it)."""
        self._stopped = True
        self._queue.put(None)
        if self._lock.acquire(timeout=wait):
            self._lock.release()
        else:
            log.warning("%s: a page cache push did not finish in %g s", self.name, wait)
        with PageCacheStore._live_lock:
            PageCacheStore._live.discard(self)


def stop_page_cache_stores() -> None:
    """Stop every :class:`PageCacheStore` of this process (before pyfuse3.close)."""
    with PageCacheStore._live_lock:
        stores = list(PageCacheStore._live)
    for store in stores:
        store.stop()


__all__ = ["PageCacheStore", "stop_page_cache_stores"]
