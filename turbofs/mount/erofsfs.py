"""The erofs presentation: one read-only FUSE file that the kernel mounts as erofs.

::

    <state>/erofs/              a private FUSE mount (this module's ErofsFileFS)
        image.erofs             metadata from memory (turbofs.erofs.build_erofs), data from
                                the chunk reader (RAM cache -> disk cache -> fetcher)
    MOUNTPOINT                  mount(2) "erofs" from <state>/erofs/image.erofs (file-backed;
                                a loop device on kernels without file-backed mounts)

Start-up (:meth:`ErofsMount.start`, after FUSE_INIT): raise the FUSE readahead, read the
metadata region once so the kernel's metadata reads hit the page cache, mount erofs, then
detach the private FUSE mount. From then on only the erofs superblock holds the image file
open: the FUSE session ends, and the daemon with it, exactly when the kernel lets go of the
erofs mount (``turbofs umount``, or the last user of a lazily detached mount), and a killed
daemon leaves no FUSE mount behind (:func:`clean_stale` removes its erofs mount).

The FUSE layer only translates: a read of the image file becomes metadata bytes, chunk
slices (``reader.read_chunks``, so single-flight, digest checks, timeouts, caches and
metrics are the per-file mode's) and zeros. Errors become errno values in one place.

Metadata (:func:`prepare`): built from the index and checked, or loaded from the node's
cache folder (``<cache_dir>/erofs/``, turbofs/erofs/cache.py) and checked the same way.

Startup chunks into the page cache (``[daemon] startup_notify_store``, on by default: see
turbofs/core/config.py and bench/README.md; :class:`PageCacheStore`):
erofs reads the image file buffered (``directio`` off), through the FUSE file's page cache.
Each chunk of a recorded startup that the prefetcher brings in is pushed into that page
cache (``pyfuse3.notify_store`` of the chunk's block range of the image file, zero-padded
to whole blocks, as reads serve it), so the startup's reads of it are answered by the
kernel without a FUSE request. The pushes run in a thread of their own: the kernel locks the
pages it stores into, and a page under a FUSE read stays locked until the daemon's main
loop answers that read.

O_DIRECT: ``open(O_DIRECT)`` of a file on a file-backed erofs mount fails with EINVAL (Linux
6.18: erofs does direct I/O only on a block device, and the flag is refused at open; the
``directio`` mount option is about how erofs reads the image file, not about its users).
On the loop-device fallback O_DIRECT works. Nothing on our side can change that for a
file-backed mount; programs that need O_DIRECT use ``--mode fuse`` (tests/test_erofs.py,
``test_o_direct_works_on_loop_backed_erofs_only``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import pyfuse3
import trio

from turbofs.core import format as fmt
from turbofs.core.config import (
    DEFAULT_EROFS_META_CACHE_BYTES,
    DEFAULT_EROFS_MOUNT_OPTIONS,
    DEFAULT_EROFS_READAHEAD_KB,
    DaemonConfig,
)
from turbofs.core.errors import TurboError
from turbofs.erofs import ErofsCorrupt, ErofsImage, build_erofs, check_erofs
from turbofs.erofs import cache as meta_cache
from turbofs.erofs import ondisk as d
from turbofs.mount.fusefs import errno_of
from turbofs.node.cache import ChunkCache
from turbofs.node.metrics import NodeMetrics

log = logging.getLogger("turbofs.erofs")

IMAGE_NAME: Final = b"image.erofs"
IMAGE_INO: Final = pyfuse3.ROOT_INODE + 1
HIDDEN_DIR: Final = "erofs"
#: Bytes of the metadata region read per request when warming the page cache.
WARM_STEP: Final = 1 << 20

#: Sequential reads of the image file (this many in a row) fetch the next bytes ahead.
READAHEAD_TRIGGER: Final = 2
READAHEAD_BYTES: Final = 1 << 20

#: Try a file-backed mount (Linux 6.12+) before a loop device. Tests turn it off to
#: exercise the loop device path.
TRY_FILE_BACKED = True
MS_RDONLY: Final = 1
MNT_DETACH: Final = 2
_WRITE_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class ChunkReaderLike(Protocol):
    cfg: DaemonConfig
    cache: ChunkCache
    metrics: NodeMetrics
    on_startup_chunk: Callable[[fmt.Chunk, bytes], None] | None

    async def read_chunks(self, chunks: Sequence[fmt.Chunk], *, ino: int | None = None) -> dict[int, bytes]: ...

    def read_ahead(self, chunks: Sequence[fmt.Chunk]) -> int: ...


#: Seconds :func:`stop_page_cache_stores` waits for a push under way (one blocked on a page
#: that a read holds locked, with no main loop left to answer it, is left behind).
STORE_STOP_WAIT: Final = 2.0


class PageCacheStore:
    """Pushes chunks into the kernel's page cache of the image file, in a thread of its own.

    :meth:`put` never blocks (the reader calls it from trio's loop). Until :meth:`go_live`
    (the kernel has looked the image file up: the FUSE session runs and knows its inode)
    chunks are not pushed, since the prefetch may start before the FUSE mount exists; the
    caller hands the chunks that came in meanwhile to :meth:`go_live`. pyfuse3's session is
    one per process, so :func:`stop_page_cache_stores` (called by :meth:`ErofsMount.stop`,
    before the daemon closes the session) stops every store of the process.
    """

    _live: Final[set[PageCacheStore]] = set()
    _live_lock: Final = threading.Lock()

    def __init__(self, image: ErofsImage, *, name: str = "turbofs",
                 notify: Callable[[int, int, bytes], None] | None = None) -> None:
        self.image = image
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
            self._notify(IMAGE_INO, offset, data + bytes(pad) if pad else data)
        except OSError as exc:
            self.stats["store_errors"] += 1
            if self.stats["store_errors"] == 1:
                log.warning("%s: cannot push chunk %d into the page cache: %s", self.name, chunk.id, exc)
            return
        self.stats["stored_chunks"] += 1
        self.stats["stored_bytes"] += len(data) + pad

    def stop(self, wait: float = STORE_STOP_WAIT) -> None:
        """No push after this returns (unless one was stuck for ``wait`` seconds)."""
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


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class ErofsFileFS(pyfuse3.Operations):
    """A FUSE file system of one read-only file: the erofs image of a turbo index."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, image: ErofsImage, reader: ChunkReaderLike, *, name: str = "turbofs", readahead: int = READAHEAD_BYTES,
        store_startup: bool | None = None,
    ) -> None:
        super().__init__()
        self.image = image
        self.reader = reader
        self.name = name
        self.readahead = readahead
        self._last_end = -1
        self._streak = 0
        self.counts: dict[str, int] = {}
        self.bytes_served = {"meta": 0, "data": 0, "zeros": 0}
        #: recorded-startup chunks pushed into the image file's page cache (None: off)
        self.store: PageCacheStore | None = None
        if reader.cfg.startup_notify_store if store_startup is None else store_startup:
            self.store = PageCacheStore(image, name=name)
            reader.on_startup_chunk = self.store.put

    def _count(self, op: str) -> None:
        self.counts[op] = self.counts.get(op, 0) + 1

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = a.attr_timeout = 3600.0
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

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self._count("open")
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode != IMAGE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    def _store_go_live(self) -> None:
        """The kernel reads the image file: the startup chunks that came in before (still
        in the RAM tier) are pushed now, the others as they come."""
        assert self.store is not None
        chunks = self.image.data.chunks
        ram = self.reader.cache.ram
        backlog = []
        for cid in self.image.index.startup_chunks():
            data = ram.get(chunks[cid].digest)
            if data is not None:
                backlog.append((chunks[cid], data))
        self.store.go_live(backlog)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._count("read")
        if self.store is not None and not self.store.live:
            self._store_go_live()
        try:
            out = await self._read(off, size)
            self.reader.metrics.reads.inc()
            self.reader.metrics.read_bytes.inc(len(out))
            return out
        except pyfuse3.FUSEError:
            raise
        except BaseException as exc:
            leaf = _first_leaf(exc)
            if not isinstance(leaf, Exception):
                raise
            code = errno_of(leaf)
            if code == errno.EIO:
                log.error("%s: read of image bytes [%d, +%d) failed: %s", self.name, off, size, leaf)
            raise pyfuse3.FUSEError(code) from None

    def _read_ahead(self, off: int, size: int) -> None:
        """Sequential reads of the image file start fetching the chunks that come next."""
        if abs(off - self._last_end) <= size:
            self._streak += 1
        else:
            self._streak = 0
        self._last_end = off + size
        if self._streak < READAHEAD_TRIGGER or self.readahead <= 0:
            return
        ahead = {e.chunk.id: e.chunk for e in self.image.read(off + size, self.readahead) if e.chunk is not None}
        if ahead:
            self.reader.read_ahead(list(ahead.values()))

    async def _read(self, off: int, size: int) -> bytes:
        extents = self.image.read(off, size)
        chunks = {e.chunk.id: e.chunk for e in extents if e.chunk is not None}
        datas: dict[int, bytes] = {}
        if chunks:
            # the chunks of one request are fetched together: one coalesced request
            first = next(iter(chunks))
            datas = await self.reader.read_chunks(list(chunks.values()), ino=self.image.owner(first))
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

    async def release(self, fh: int) -> None:
        return None

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._count("opendir")
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return int(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._count("readdir")
        if start_id == 0:
            pyfuse3.readdir_reply(token, IMAGE_NAME, self._attrs(IMAGE_INO), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.image.total_blocks
        s.f_bfree = s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    async def _rofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mknod = mkdir = unlink = rmdir = symlink = rename = link = write = setxattr = removexattr = _rofs  # type: ignore[assignment]


def hidden_options(name: str) -> set[str]:
    """Options of the private FUSE mount: read-only, named, any reader (the kernel's erofs
    reads on behalf of every user of the erofs mount)."""
    return {"ro", "default_permissions", "allow_other", f"fsname={name}", "subtype=turbofs-erofs"}


# -- the kernel side ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def kernel_has_erofs() -> bool:
    """Whether this kernel knows erofs (built in, or a loaded module)."""
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["erofs"] for line in text.splitlines())


def cannot_mount_erofs() -> str | None:
    """Why this process cannot mount erofs (no erofs in the kernel, not root), or None."""
    if not kernel_has_erofs():
        return "this kernel has no erofs file system"
    if os.geteuid() != 0:
        return "mounting erofs needs root (the per-file FUSE mode does not)"
    return None


def _check(ret: int, what: str) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount_erofs(image_file: Path, target: Path, *, options: str = "") -> str:
    """Mount erofs from ``image_file`` at ``target`` read-only; returns how ("file" or "loop")."""
    code = errno.ENOTBLK
    if TRY_FILE_BACKED:
        ret = _libc.mount(os.fsencode(image_file), os.fsencode(target), b"erofs", MS_RDONLY, options.encode() or None)
        if ret == 0:
            return "file"
        code = ctypes.get_errno()
        if code not in (errno.ENOTBLK, errno.EINVAL):
            raise OSError(code, f"mount erofs {image_file} at {target}: {os.strerror(code)}")
    # a kernel without file-backed erofs mounts: a loop device
    opts = ",".join(filter(None, ["ro", "loop", options]))
    proc = subprocess.run(["mount", "-t", "erofs", "-o", opts, str(image_file), str(target)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(code, f"mount erofs {image_file} at {target}: {proc.stderr.strip()}")
    return "loop"


def umount(target: Path, *, lazy: bool = False) -> None:
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0), f"umount {target}")


def mount_entry(target: Path) -> tuple[str, bytes] | None:
    """(file system type, source) of the topmost mount at ``target``, or None."""
    want = os.fsencode(os.path.realpath(target))
    found = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
            left, _, right = line.partition(b" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == want:
                fstype, source = ([*right.split(), b"", b""])[:2]
                found = (fstype.decode(errors="replace"), _unescape(source))
    return found


def _unescape(field: bytes) -> bytes:
    """A mountinfo field with its octal escapes (space, tab, newline, backslash) undone."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _is_our_erofs(mountpoint: Path, hidden: Path) -> bool:
    entry = mount_entry(mountpoint)
    return entry is not None and entry[0] == "erofs" and entry[1] == os.fsencode(hidden / os.fsdecode(IMAGE_NAME))


def _daemon_alive(state: Path) -> bool:
    try:
        pid = int((state / "pid").read_text().strip())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in (b"Z", b"X")  # a zombie serves nothing


def clean_stale(state: Path, mountpoint: Path) -> bool:
    """Remove what a killed erofs-mode daemon of ``mountpoint`` left; True if there was some.

    That is an erofs mount at ``mountpoint`` backed by this state folder's image file, and a
    private FUSE mount that is no longer served.
    """
    cleaned = False
    hidden = state / HIDDEN_DIR
    if _daemon_alive(state):
        return False
    if _is_our_erofs(mountpoint, hidden):
        log.warning("%s: an erofs mount left by a dead daemon: unmounting it", mountpoint)
        with contextlib.suppress(OSError):
            umount(mountpoint, lazy=True)
            cleaned = True
    try:
        os.stat(hidden)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            with contextlib.suppress(OSError):
                umount(hidden, lazy=True)
                cleaned = True
    return cleaned


def prepare(index: fmt.Index, *, cache_dir: Path | None = None,
            cache_bytes: int = DEFAULT_EROFS_META_CACHE_BYTES) -> ErofsImage:
    """The checked erofs image of ``index``: loaded from ``<cache_dir>/erofs/`` when an
    earlier mount left it there, built (and left there) otherwise. Raises ErofsError: never
    mount it then.

    Cached metadata goes through the same :func:`check_erofs` as fresh metadata (its
    sha256 only shows it is the file that was written); one that fails is removed and
    built afresh, so a damaged cache costs a build, never a wrong mount.
    """
    ms: dict[str, float] = {"load_ms": 0.0, "build_ms": 0.0, "check_ms": 0.0, "store_ms": 0.0}
    t0 = time.monotonic()

    def took(step: str, since: float) -> float:
        now = time.monotonic()
        ms[step] += (now - since) * 1000
        return now

    image: ErofsImage | None = None
    key = b""
    if cache_dir is not None:
        key = index.payload_sha256()
        image = meta_cache.load(cache_dir, index, key)
    t = took("load_ms", t0)
    hit = image is not None
    if image is not None:
        try:
            check_erofs(image)
        except ErofsCorrupt as exc:
            assert cache_dir is not None
            log.warning("cached erofs metadata failed its checks, removing it and building it again: %s", exc)
            meta_cache.discard(cache_dir, key)
            image, hit = None, False
        t = took("check_ms", t)
    if image is None:
        image = build_erofs(index)
        t = took("build_ms", t)
        check_erofs(image)
        t = took("check_ms", t)
        if cache_dir is not None:
            meta_cache.store(cache_dir, image, key, max_bytes=cache_bytes)
            t = took("store_ms", t)
    image.drop_source()  # the decoded index columns; the metadata itself is a few MB
    image.stats.update({"meta_cache_hit": int(hit), **{k: round(v) for k, v in ms.items()}})
    log.info("erofs metadata of %d inodes: %d bytes, %s in %.3f s", index.n_inodes, image.meta_size,
             "loaded from the cache and checked" if hit else "built and checked", t - t0)
    return image


def _erofs_bdis() -> set[str]:
    """The backing-device-info names of file-backed erofs mounts (``erofs-N``)."""
    try:
        return {name for name in os.listdir("/sys/class/bdi") if name.startswith("erofs-")}
    except OSError:
        return set()


def _write_bdi(bdi: str, knob: str, value: int) -> None:
    try:
        Path(f"/sys/class/bdi/{bdi}/{knob}").write_text(f"{value}\n")
    except OSError as exc:
        log.warning("could not set %s of %s to %d: %s", knob, bdi, value, exc)


class ErofsMount:
    """The erofs side of one daemon: the private FUSE mount's folder and the kernel mount."""

    def __init__(self, state: Path, target: Path, image: ErofsImage, *, readahead_kb: int = 1024,
                 erofs_readahead_kb: int = DEFAULT_EROFS_READAHEAD_KB, options: str = DEFAULT_EROFS_MOUNT_OPTIONS,
                 warm_meta: bool = True) -> None:
        self.hidden = state / HIDDEN_DIR
        self.target = target
        self.image = image
        self.readahead_kb = readahead_kb  # of the FUSE file (its bdi)
        self.erofs_readahead_kb = erofs_readahead_kb  # of the erofs mount's files; 0: the kernel's
        self.options = options
        self.fuse_bdi: str | None = None  # names under /sys/class/bdi, for status and benchmarks
        self.erofs_bdi: str | None = None
        self.warm_meta = warm_meta
        self.how: str | None = None  # "file" or "loop" once mounted
        self.hidden_mounted = False

    @property
    def image_file(self) -> Path:
        return self.hidden / os.fsdecode(IMAGE_NAME)

    def prepare_dir(self) -> Path:
        self.hidden.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.hidden

    def _warm(self) -> None:
        fd = os.open(self.image_file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into the data region
            for pos in range(0, self.image.meta_size, WARM_STEP):
                os.pread(fd, min(WARM_STEP, self.image.meta_size - pos), pos)
        finally:
            os.close(fd)

    async def start(self, set_readahead: Callable[[Path, int], None]) -> None:
        """After FUSE_INIT: tune, warm, mount erofs, detach the private mount."""
        self.hidden_mounted = True
        t0 = time.monotonic()
        st = await trio.to_thread.run_sync(os.stat, self.image_file)
        self.fuse_bdi = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        if self.readahead_kb:
            await trio.to_thread.run_sync(set_readahead, self.hidden, self.readahead_kb)
        t1 = time.monotonic()
        if self.warm_meta:
            await trio.to_thread.run_sync(self._warm)
        t2 = time.monotonic()
        before = _erofs_bdis()
        try:
            self.how = await trio.to_thread.run_sync(
                lambda: mount_erofs(self.image_file, self.target, options=self.options)
            )
        except OSError as exc:
            raise TurboError(f"cannot mount erofs at {self.target}: {exc.strerror} (try --mode fuse)") from None
        self.erofs_bdi = await trio.to_thread.run_sync(self._find_erofs_bdi, before)
        if self.erofs_readahead_kb and self.erofs_bdi:
            await trio.to_thread.run_sync(_write_bdi, self.erofs_bdi, "read_ahead_kb", self.erofs_readahead_kb)
        await trio.to_thread.run_sync(lambda: umount(self.hidden, lazy=True))
        self.hidden_mounted = False
        self.image.stats["warm_ms"] = round((t2 - t1) * 1000)
        self.image.stats["mount_ms"] = round((time.monotonic() - t2) * 1000)
        log.info("erofs mounted at %s (%s-backed): FUSE ready in %.3f s, metadata read in %.3f s, mount %.3f s",
                 self.target, self.how, t1 - t0, t2 - t1, time.monotonic() - t2)

    def _find_erofs_bdi(self, before: set[str]) -> str | None:
        """The bdi of the erofs mount just made: its block device's for a loop device; for a
        file-backed mount the one ``erofs-N`` that appeared with it (None if other erofs
        mounts came and went at the same time: its readahead then stays the kernel's)."""
        if self.how == "loop":
            st = os.stat(self.target)
            return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        new = _erofs_bdis() - before
        if len(new) != 1:
            log.info("%s: cannot tell which of %s is this mount's bdi", self.target, sorted(new))
            return None
        return new.pop()

    def stop(self) -> None:
        """Detach the erofs mount (for signals and errors); the FUSE session ends with it.
        Also stops the page cache pushes, which must not outlive the FUSE session."""
        stop_page_cache_stores()
        if self.how is not None:
            if _is_our_erofs(self.target, self.hidden):
                with contextlib.suppress(OSError):
                    umount(self.target, lazy=True)
            self.how = None
        if self.hidden_mounted:
            with contextlib.suppress(OSError):
                umount(self.hidden, lazy=True)
            self.hidden_mounted = False

    def status(self) -> dict[str, Any]:
        return {"backing": self.how, "image_bytes": self.image.size, "fuse_bdi": self.fuse_bdi,
                "erofs_bdi": self.erofs_bdi, "options": self.options, **self.image.stats}


__all__ = [
    "IMAGE_NAME",
    "ErofsFileFS",
    "ErofsMount",
    "PageCacheStore",
    "cannot_mount_erofs",
    "clean_stale",
    "hidden_options",
    "kernel_has_erofs",
    "mount_erofs",
    "prepare",
    "umount",
]
