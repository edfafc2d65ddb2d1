"""The per-file FUSE presentation of a turbo image: it only translates.

Inodes map to index entries (FUSE inode = index inode + 1, so the root is
``pyfuse3.ROOT_INODE``); metadata comes from the in-memory index; file data comes from the
reader (``read(ino, offset, length)``). Errors become errno values in one place,
:func:`errno_of`. The image never changes: the kernel caches entries and attributes for
``attr_timeout`` seconds and files open with ``keep_cache``, so repeated reads never reach Python.
:class:`ReadOnlyOperations` is what both presentations answer alike.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import pyfuse3

from turbofs.core import format as fmt
from turbofs.core.config import FUSE_ATTR_TIMEOUT
from turbofs.core.errors import FormatError, NotFound, TurboError
from turbofs.node.reader import PresentationReader

log = logging.getLogger("turbofs.fuse")

T = TypeVar("T")
_WRITE_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def errno_of(exc: BaseException) -> int:
    """The one place where exceptions become errno values (both presentations use it)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, FormatError | TurboError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


class ReadOnlyOperations(pyfuse3.Operations):
    """What both presentations answer alike: no change to anything, no ACLs, permissions
    checked by the kernel ("default_permissions"), requests counted by operation."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.counts: dict[str, int] = {}

    @staticmethod
    def refuse_writes(flags: int) -> None:
        """EROFS for an open that would write."""
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)

    @staticmethod
    def statvfs(blocks: int, files: int) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = blocks
        s.f_bfree = s.f_bavail = 0
        s.f_files = files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    async def _rofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mknod = mkdir = unlink = rmdir = symlink = rename = link = write = setxattr = removexattr = _rofs  # type: ignore[assignment]


class TurboFS(ReadOnlyOperations):
    """Read-only FUSE operations over an index and a reader."""

    def __init__(
        self,
        index: fmt.Index,
        reader: PresentationReader,
        *,
        attr_timeout: float = FUSE_ATTR_TIMEOUT,
        name: str = "turbofs",
        on_error: Callable[[str, int, BaseException], None] | None = None,
    ) -> None:
        super().__init__(name)
        self.index = index
        self.reader = reader
        self.attr_timeout = attr_timeout
        self._on_error = on_error
        self._paths: dict[int, bytes] = {}

    # -- helpers

    def _ino(self, fuse_ino: int) -> int:
        return int(fuse_ino) - 1

    def path_of(self, ino: int) -> str:
        """A path of index inode ``ino`` (for log messages)."""
        if not self._paths:
            self._paths = {i: p for p, i in self.index.walk()}
        return "/" + self._paths.get(ino, b"?").decode("utf-8", "backslashreplace")

    async def _guard(self, op: str, ino: int, fn: Callable[[], Awaitable[T]]) -> T:
        self.counts[op] = self.counts.get(op, 0) + 1
        try:
            return await fn()
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_of(exc)
            if code == errno.EIO:
                log.error("%s: %s %s failed: %s", self.name, op, self.path_of(ino), exc)
                if self._on_error:
                    self._on_error(op, ino, exc)
            raise pyfuse3.FUSEError(code) from None

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.index.inode(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino + 1
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = os.makedev(*node.rdev) if node.rdev != (0, 0) else 0
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = -(-node.size // 512) if node.is_reg else 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    # -- operations, in FUSE order

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._ino(parent_inode)

        async def run() -> pyfuse3.EntryAttributes:
            if name == b".":
                return self._attrs(parent)
            if name == b"..":
                return self._attrs(self.index.inode(parent).parent)
            found = self.index.lookup(parent, bytes(name))
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(found)

        return await self._guard("lookup", parent, run)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        ino = self._ino(inode)

        async def run() -> pyfuse3.EntryAttributes:
            return self._attrs(ino)

        return await self._guard("getattr", ino, run)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        ino = self._ino(inode)

        async def run() -> bytes:
            if not self.index.inode(ino).is_symlink:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return self.index.readlink(ino)

        return await self._guard("readlink", ino, run)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        ino = self._ino(inode)
        self.refuse_writes(flags)

        async def run() -> pyfuse3.FileInfo:
            if not self.index.inode(ino).is_reg:
                raise pyfuse3.FUSEError(errno.EISDIR if self.index.inode(ino).is_dir else errno.EINVAL)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

        return await self._guard("open", ino, run)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        ino = self._ino(fh)

        async def run() -> bytes:
            return await self.reader.read(ino, off, size)

        return await self._guard("read", ino, run)

    async def opendir(self, inode: int, ctx: Any) -> int:
        ino = self._ino(inode)

        async def run() -> int:
            if not self.index.inode(ino).is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return int(inode)

        return await self._guard("opendir", ino, run)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = self._ino(fh)

        async def run() -> None:
            entries = self.index.listdir(ino)
            for i in range(start_id, len(entries)):
                name, child = entries[i]
                if not pyfuse3.readdir_reply(token, name, self._attrs(child), i + 1):
                    break

        await self._guard("readdir", ino, run)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        total = sum(c.ulen for c in self.index.chunks()) if self.index.n_chunks < 1_000_000 else 0
        return self.statvfs(-(-total // 4096), self.index.n_inodes)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        ino = self._ino(inode)

        async def run() -> bytes:
            value = self.index.xattrs(ino).get(bytes(name))
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value

        return await self._guard("getxattr", ino, run)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        ino = self._ino(inode)

        async def run() -> list[bytes]:
            return list(self.index.xattrs(ino))

        return await self._guard("listxattr", ino, run)


def fuse_options(name: str, *, allow_other: bool = True) -> set[str]:
    """Mount options: read-only, named, kernel permission checks, other users allowed in."""
    opts = {"ro", "default_permissions", f"fsname={name}", "subtype=turbofs"}
    if allow_other:
        opts.add("allow_other")
    if os.geteuid() == 0:
        opts |= {"suid", "dev"}  # an image's setuid programs and device nodes work as in the image
    return opts
