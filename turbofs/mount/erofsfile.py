"""FUSE operations of the erofs presentation: one read-only file, ``image.erofs``, that the
kernel mounts as erofs (:mod:`turbofs.mount.erofsmount`).

A read of the image file becomes metadata bytes (from memory), chunk slices
(``reader.read_chunks``, with the per-file mode's single-flight, digest checks, timeouts
and caches) and zeros. Errors become errno values through :func:`~turbofs.mount.fusefs.errno_of`.
"""

from __future__ import annotations

import errno
import logging
import stat
from typing import Any, Final

import pyfuse3

from turbofs.core.config import EROFS_READAHEAD_BYTES, FUSE_ATTR_TIMEOUT
from turbofs.erofs import ErofsImage
from turbofs.erofs import ondisk as d
from turbofs.mount.fusefs import ReadOnlyOperations, errno_of
from turbofs.mount.pagecache import PageCacheStore
from turbofs.node.metrics import NodeMetrics
from turbofs.node.reader import PresentationReader, SequentialReads

log = logging.getLogger("turbofs.erofs")

IMAGE_NAME: Final = b"image.erofs"
IMAGE_INO: Final = pyfuse3.ROOT_INODE + 1


def image_mount_options(name: str) -> set[str]:
    """Options of the FUSE mount of the image file: read-only, named, any reader (the
    kernel's erofs reads on behalf of every user of the erofs mount)."""
    return {"ro", "default_permissions", "allow_other", f"fsname={name}", "subtype=turbofs-erofs"}


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class ErofsFileFS(ReadOnlyOperations):
    """A FUSE file system of one read-only file: the erofs image of a turbo index.

    ``store``: where the startup chunks go into the image file's page cache (None: off);
    it goes live at the first read, when the kernel knows the file.
    """

    def __init__(
        self, image: ErofsImage, reader: PresentationReader, metrics: NodeMetrics, *, name: str = "turbofs",
        readahead_trigger: int, readahead: int = EROFS_READAHEAD_BYTES, store: PageCacheStore | None = None,
    ) -> None:
        super().__init__(name)
        self.image = image
        self.reader = reader
        self.metrics = metrics
        self.readahead = readahead
        self._seq = SequentialReads(readahead_trigger, tracked=1)
        self.bytes_served = {"meta": 0, "data": 0, "zeros": 0}
        self.store = store

    def _count(self, op: str) -> None:
        self.counts[op] = self.counts.get(op, 0) + 1

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = a.attr_timeout = FUSE_ATTR_TIMEOUT
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o500
            a.st_nlink = 2
            a.st_size = 0
        elif inode == IMAGE_INO:
            a.st_mode = stat.S_IFREG | 0o400
            a.st_nlink = 1
            a.st_size = self.image.size
            a.st_blocks = self.image.size // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    # -- operations, in FUSE order

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._count("lookup")
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if bytes(name) != IMAGE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(IMAGE_INO)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        return self._attrs(inode)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self._count("open")
        self.refuse_writes(flags)
        if inode != IMAGE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    def _store_go_live(self) -> None:
        """Start the page-cache push with the startup chunks that came in before (those
        still in RAM); the others follow as they come."""
        assert self.store is not None
        chunks = self.image.data.chunks
        backlog = []
        for cid in self.image.index.startup_chunks():
            data = self.reader.in_ram(chunks[cid])
            if data is not None:
                backlog.append((chunks[cid], data))
        self.store.go_live(backlog)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._count("read")
        if self.store is not None and not self.store.live:
            self._store_go_live()
        try:
            out = await self._read(off, size)
            self.metrics.reads.inc()
            self.metrics.read_bytes.inc(len(out))
            return out
        except pyfuse3.FUSEError:
            raise
        except BaseException as exc:
            leaf = _first_leaf(exc)
            if not isinstance(leaf, Exception):
                raise
            code = errno_of(leaf)
            if code == errno.EIO:
                # the file that owns the failing chunk, not the request's first chunk
                chunk_id = getattr(leaf, "chunk_id", None)
                path = self.image.owner_path(chunk_id) if isinstance(chunk_id, int) else None
                log.error("%s: %sread of image bytes [%d, +%d) failed: %s", self.name,
                          f"{path}: " if path else "", off, size, leaf)
            raise pyfuse3.FUSEError(code) from None

    def _read_ahead(self, off: int, size: int) -> None:
        """Sequential reads of the image file start fetching the chunks that come next."""
        if not self._seq.ahead(0, off, off + size, slack=size, step=d.BLOCK_SIZE) or self.readahead <= 0:
            return
        ahead = {e.chunk.id: e.chunk for e in self.image.read(off + size, self.readahead) if e.chunk is not None}
        if ahead:
            self.reader.read_ahead(list(ahead.values()))

    async def _read(self, off: int, size: int) -> bytes:
        extents = self.image.read(off, size)
        chunks = {e.chunk.id: e.chunk for e in extents if e.chunk is not None}
        datas: dict[int, bytes] = {}
        if chunks:
            # the chunks of one request are fetched together: one coalesced request. The
            # reader's errors name the file only where all belong to one (a wrong name misleads)
            owners = {self.image.owner(cid) for cid in chunks}
            datas = await self.reader.read_chunks(list(chunks.values()),
                                                  ino=owners.pop() if len(owners) == 1 else None)
        self._read_ahead(off, size)
        parts: list[bytes] = []
        for e in extents:
            if e.data is not None:
                parts.append(e.data)
                self.bytes_served["meta"] += e.length
            elif e.chunk is not None:
                data = datas[e.chunk.id]
                parts.append(data[e.chunk_offset : e.chunk_offset + e.length])
                self.bytes_served["data"] += e.length
            else:
                parts.append(bytes(e.length))
                self.bytes_served["zeros"] += e.length
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._count("opendir")
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return int(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._count("readdir")
        if start_id == 0:
            pyfuse3.readdir_reply(token, IMAGE_NAME, self._attrs(IMAGE_INO), 1)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        return self.statvfs(self.image.total_blocks, 2)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []


__all__ = ["IMAGE_INO", "IMAGE_NAME", "ErofsFileFS", "image_mount_options"]
