"""Cutting file data into digest-addressed chunks and packing them into blobs.

* A file of at least ``chunk_size`` bytes is cut at multiples of ``chunk_size``: each
  piece's digest depends on its content only, so equal pieces of any file or image are one chunk.
* Smaller files wait (in memory, then in a spool file) and are packed at the end, in path
  order, into shared chunks at 4 KiB-aligned offsets (a directory arrives in a few
  fetches); equal files are stored once. A pack ends when full or, content-defined, after
  a file whose CRC says so, so a changed file changes its own pack only.
* A piece of zeros is a hole: no chunk, never fetched.
* Chunks are hashed and compressed (:mod:`turbofs.core.codec`) on a thread pool.
* Blobs are cut content-defined (after a chunk whose digest says so, between ``blob_min``
  and ``blob_max``), so one changed chunk changes one blob.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from isal import isal_zlib

from turbofs.core import format as fmt
from turbofs.core import oci
from turbofs.core.codec import ChunkCompressor, chunk_digest
from turbofs.core.config import BUILD_CHUNKS_QUEUED_PER_WORKER, BuildConfig
from turbofs.core.errors import SourceError

#: Chunk digest -> None (a hole) for a piece of zeros.
Digest = bytes | None


@dataclass(slots=True)
class LargeData:
    """A file cut into ``chunk_size`` pieces, each being hashed and compressed."""

    pieces: list[Future[Digest]]


@dataclass(slots=True)
class SmallData:
    """A file smaller than a chunk, waiting to be packed: in memory, or in the spool file."""

    offset: int
    size: int
    data: bytes | None = None


@dataclass(slots=True)
class _Stored:
    spool_offset: int
    clen: int
    ulen: int
    frame: bytes  # sha256 of the compressed frame (the index's frames section)


_U32_SPACE: Final = 1 << 32


class ChunkStore:
    def __init__(self, workdir: Path, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.chunk_size = cfg.chunk_size
        workdir.mkdir(parents=True, exist_ok=True)
        self._spool = open(workdir / "chunks.spool", "w+b")
        self._small = open(workdir / "small.spool", "w+b")
        self._small_size = 0
        self._small_in_memory = 0
        self.padding = 0  # zero bytes that align packed files to 4 KiB
        self._lock = threading.Lock()
        self._stored: dict[bytes, _Stored] = {}
        self._pending: set[bytes] = set()
        self._spool_size = 0
        self._pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="chunk")
        self._slots = threading.Semaphore(cfg.workers * BUILD_CHUNKS_QUEUED_PER_WORKER)
        self._codec = ChunkCompressor(cfg.zstd_level)
        self._zeros = bytes(self.chunk_size)
        self.file_bytes = 0  # bytes of file content seen (before dedup)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._spool.close()
        self._small.close()

    # -- intake

    def add_file(self, read: Callable[[int], bytes], size: int, what: str) -> LargeData | SmallData | None:
        """Take a file's content from ``read``; returns the handle kept in the tree."""
        self.file_bytes += size
        if size == 0:
            return None
        if size < self.chunk_size:
            data = _read_exact(read, size, what)
            if self._small_in_memory + size <= self.cfg.small_files_memory:
                self._small_in_memory += size
                return SmallData(0, size, data)
            off = self._small_size
            self._small.write(data)
            self._small_size += size
            return SmallData(off, size)
        pieces = []
        left = size
        while left:
            data = _read_exact(read, min(self.chunk_size, left), what)
            left -= len(data)
            pieces.append(self._submit(data))
        return LargeData(pieces)

    def _submit(self, data: bytes) -> Future[Digest]:
        self._slots.acquire()
        try:
            fut = self._pool.submit(self._put_chunk, data)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        return fut

    def _put_chunk(self, data: bytes) -> Digest:
        if data == self._zeros[: len(data)]:
            return None
        digest = chunk_digest(data)
        with self._lock:
            if digest in self._stored or digest in self._pending:
                return digest
            self._pending.add(digest)
        comp, frame = self._codec.compress(data)
        with self._lock:
            off = self._spool_size
            self._spool_size += len(comp)
            os.pwrite(self._spool.fileno(), comp, off)
            self._stored[digest] = _Stored(off, len(comp), len(data), frame)
            self._pending.discard(digest)
        return digest

    # -- packing small files

    def pack_small(self, files: Iterable[SmallData]) -> dict[int, tuple[Future[Digest], int]]:
        """Pack small files (in the given order) into chunks.

        Returns, for each SmallData (by ``id``), the future digest of its chunk and its
        offset inside that chunk. Files with equal content share one place.
        """
        self._small.flush()
        fd = self._small.fileno()
        cs = self.chunk_size
        futures: list[Future[Digest]] = []
        packs: list[bytes] = []  # kept until the end, to compare candidates for dedup
        # (size, crc32) -> places of files with that key; equal bytes are then confirmed
        seen: dict[tuple[int, int], list[tuple[int, int]]] = {}
        out: dict[int, tuple[int, int]] = {}  # id(SmallData) -> (pack number, offset)
        buf = bytearray()

        def stored(pack: int, off: int, size: int) -> bytes | bytearray:
            src = packs[pack] if pack < len(packs) else buf
            return src[off : off + size]

        def cut() -> None:
            packs.append(bytes(buf))
            futures.append(self._submit(packs[-1]))
            buf.clear()

        for sd in files:
            if id(sd) in out:
                continue
            data = sd.data if sd.data is not None else os.pread(fd, sd.size, sd.offset)
            sd.data = None  # packed from here on: free the memory early
            crc = isal_zlib.crc32(data)
            places = seen.setdefault((len(data), crc), [])
            for place in places:
                if stored(place[0], place[1], len(data)) == data:
                    out[id(sd)] = place
                    break
            if id(sd) in out:
                continue
            start = -(-len(buf) // fmt.ALIGN) * fmt.ALIGN
            if start + len(data) > cs:
                cut()
                start = 0
            self.padding += start - len(buf)
            buf.extend(bytes(start - len(buf)))
            buf.extend(data)
            out[id(sd)] = (len(packs), start)
            places.append(out[id(sd)])
            # content-defined pack ends: after a file whose CRC says so (on average every
            # half chunk), so that a changed file shifts its own pack only, not all that follow
            aligned = -(-len(data) // fmt.ALIGN) * fmt.ALIGN
            if crc < aligned * _U32_SPACE // (cs // 2):
                cut()
        if buf:
            cut()
        return {sid: (futures[pack], off) for sid, (pack, off) in out.items()}

    # -- blobs

    def write_blobs(self, order: list[bytes], writer: oci.LayoutWriter) -> tuple[list[fmt.Chunk], list[fmt.Blob]]:
        """Write every chunk, in ``order``, into content-defined blobs of the layout."""
        chunks: list[fmt.Chunk] = []
        blobs: list[fmt.Blob] = []
        cfg = self.cfg
        spread = max(1, cfg.blob_avg - cfg.blob_min)
        i = 0
        fd = self._spool.fileno()
        while i < len(order):
            with writer.blob_writer() as sink:
                first_id = len(chunks)
                while i < len(order):
                    digest = order[i]
                    st = self._stored[digest]
                    off = sink.size
                    sink.write(os.pread(fd, st.clen, st.spool_offset))
                    chunks.append(fmt.Chunk(len(chunks), digest, len(blobs), off, st.clen, st.ulen, st.frame))
                    i += 1
                    cut_mark = int.from_bytes(digest[:4], "little")
                    if sink.size >= cfg.blob_max or (
                        sink.size >= cfg.blob_min and cut_mark < st.clen * _U32_SPACE // spread
                    ):
                        break
            blob = fmt.Blob(bytes.fromhex(sink.digest.split(":", 1)[1]), sink.size)
            assert all(c.blob == len(blobs) for c in chunks[first_id:])
            blobs.append(blob)
        return chunks, blobs

    @property
    def compressed_bytes(self) -> int:
        return sum(s.clen for s in self._stored.values())

    @property
    def unique_bytes(self) -> int:
        return sum(s.ulen for s in self._stored.values())


def _read_exact(read: Callable[[int], bytes], n: int, what: str) -> bytes:
    data = read(n)
    if len(data) != n:
        raise SourceError(f"{what}: file data ends after {len(data)} of {n} bytes")
    return data
