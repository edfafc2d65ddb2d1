"""The turbofs index format: encode and decode (specification: ``docs/format.md``).

Standard library and ``zstandard`` only. The builder calls :func:`encode`; the node opens an
index with :meth:`Index.from_bytes` and reads it through :class:`Index` (lookup, listdir,
getattr, readlink, xattrs, map_range). Decoding does no per-entry work (records are unpacked
on access from fixed-size tables); every accessor checks the bounds of what it reads and
raises :class:`~turbofs.core.errors.FormatError` rather than return a wrong entry;
:meth:`Index.verify` checks the whole index at once.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import zstandard

from turbofs.core.config import INDEX_MAX_PAYLOAD, INDEX_MAX_RATIO, INDEX_RATIO_FREE
from turbofs.core.errors import FormatError, NotFound

MAGIC: Final = b"TURBOIDX"
VERSION: Final = 1
#: The revision of VERSION this module writes: 1.2 adds the frames section (optional
#: sections only: every reader of VERSION reads it). See the changelog in docs/format.md.
REVISION: Final = "1.2"
#: Versions this module reads. See the changelog in docs/format.md.
READABLE_VERSIONS: Final = frozenset({1})

#: Default upper bound for a decompressed index payload (a decompression-bomb guard).
MAX_PAYLOAD: Final = INDEX_MAX_PAYLOAD
#: Most sections a payload's table may list.
MAX_SECTIONS: Final = 64

ROOT_INO: Final = 0
#: Chunk id of a hole: the piece reads as zeros and is never fetched.
HOLE: Final = 0xFFFFFFFF
#: Data of every file starts at a multiple of this inside its uncompressed chunk.
ALIGN: Final = 4096

MIN_CHUNK_LOG2: Final = 12  # 4 KiB
MAX_CHUNK_LOG2: Final = 26  # 64 MiB

# Section ids in the payload's section table.
SEC_INODES: Final = 1
SEC_DIRENTS: Final = 2
SEC_REFS: Final = 3
SEC_CHUNKS: Final = 4
SEC_BLOBS: Final = 5
SEC_XATTRS: Final = 6
SEC_PREFETCH: Final = 7
SEC_HEAP: Final = 8
#: Added in revision 1.1 (readers of 1.0 skip it): the recorded startup's chunks, in first-use order.
SEC_STARTUP: Final = 9
#: Added in revision 1.2 (readers of 1.0 and 1.1 skip it): the sha256 of every chunk's
#: compressed frame, by chunk id, so that a reader can check a fetched frame before
#: decompressing it instead of hashing the (larger) uncompressed bytes.
SEC_FRAMES: Final = 10

_HEADER = struct.Struct("<8sHHIQQ32s")  # magic, version, flags, header size, payload len, compressed len, payload sha256
_SUPER = struct.Struct("<IIII")  # chunk_size_log2, root ino, n_sections, reserved
_SECTION = struct.Struct("<IIQQ")  # id, reserved, offset, length
_INODE = struct.Struct("<IIIIqIIIIQII")  # mode uid gid nlink mtime_s mtime_ns xattr_start xattr_count parent size a b
_DIRENT = struct.Struct("<IIH2x")  # name_off ino name_len
_REF = struct.Struct("<II")  # chunk id, offset inside the uncompressed chunk
_CHUNK = struct.Struct("<32sIIQII")  # digest, blob, flags, offset in blob, compressed len, uncompressed len
_BLOB = struct.Struct("<32sQ")  # sha256, size
_XATTR = struct.Struct("<IIII")  # key_off key_len value_off value_len
_U32 = struct.Struct("<I")
_SHA256: Final = 32

HEADER_SIZE: Final = _HEADER.size
_RECORD_SIZES: Final = {
    SEC_INODES: _INODE.size,
    SEC_DIRENTS: _DIRENT.size,
    SEC_REFS: _REF.size,
    SEC_CHUNKS: _CHUNK.size,
    SEC_BLOBS: _BLOB.size,
    SEC_XATTRS: _XATTR.size,
    SEC_PREFETCH: _U32.size,
    SEC_HEAP: 1,
    SEC_STARTUP: _U32.size,
    SEC_FRAMES: _SHA256,
}
#: Sections an index may leave out.
_OPTIONAL_SECTIONS: Final = frozenset({SEC_STARTUP, SEC_FRAMES})


# ---------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True, slots=True)
class Blob:
    """A chunk blob: concatenated zstd frames, addressed by the sha256 of its bytes."""

    digest: bytes  # 32 raw bytes of sha256
    size: int

    @property
    def oci_digest(self) -> str:
        return "sha256:" + self.digest.hex()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently compressed chunk inside a blob."""

    id: int
    digest: bytes  # sha256 of the uncompressed bytes
    blob: int
    offset: int  # of the compressed frame inside the blob
    clen: int
    ulen: int
    #: sha256 of the compressed frame (``[offset, offset + clen)`` of the blob), where the
    #: index has a frames section (revision 1.2); None otherwise
    frame: bytes | None = None


@dataclass(frozen=True, slots=True)
class ChunkSlice:
    """A piece of a file read: ``length`` bytes at ``chunk_offset`` of an uncompressed chunk."""

    chunk: Chunk | None  # None: a hole, reads as zeros
    chunk_offset: int
    length: int
    file_offset: int


@dataclass(frozen=True, slots=True)
class Inode:
    """The attributes of one inode."""

    ino: int
    mode: int  # full st_mode: type and permission bits
    uid: int
    gid: int
    nlink: int
    mtime_ns: int
    size: int
    parent: int  # directories: the parent directory (the root is its own parent)
    rdev: tuple[int, int]  # (major, minor) of devices

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True)
class InodeSpec:
    """What the builder gives :func:`encode` for one inode.

    ``children`` (directories) lists (name, ino) pairs in any order; ``refs`` (regular
    files) lists one (chunk id, offset) pair per piece of ``chunk_size`` bytes.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: tuple[int, int] = (0, 0)
    target: bytes = b""
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    refs: tuple[tuple[int, int], ...] = ()
    children: tuple[tuple[bytes, int], ...] = field(default=())


# ---------------------------------------------------------------------------------------
# Encoding


class _Heap:
    """Byte strings stored once each."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.seen: dict[bytes, int] = {}

    def add(self, data: bytes) -> int:
        off = self.seen.get(data)
        if off is None:
            off = len(self.buf)
            self.buf += data
            self.seen[data] = off
        return off


def encode(
    *,
    chunk_size: int,
    inodes: Sequence[InodeSpec],
    chunks: Sequence[Chunk],
    blobs: Sequence[Blob],
    prefetch: Sequence[int],
    startup: Sequence[int] = (),
    level: int = 9,
) -> bytes:
    """Encode an index. ``inodes[0]`` is the root directory; output is deterministic.

    ``startup``: the chunks a recorded start read, in first-use order (no section when empty).
    A frames section is written when every chunk has its ``frame`` digest; none may have it
    otherwise."""
    log2 = chunk_size.bit_length() - 1
    if chunk_size != 1 << log2 or not MIN_CHUNK_LOG2 <= log2 <= MAX_CHUNK_LOG2:
        raise ValueError(f"chunk size {chunk_size} is not a power of two in [4 KiB, 64 MiB]")
    if not inodes or not stat.S_ISDIR(inodes[ROOT_INO].mode):
        raise ValueError("inode 0 must be the root directory")
    n = len(inodes)
    parent = [ROOT_INO] * n
    nlink = [0] * n
    for ino, spec in enumerate(inodes):
        if stat.S_ISDIR(spec.mode):
            nlink[ino] += 2  # its own "." and the entry in its parent (".." for the root)
            for _name, child in spec.children:
                if stat.S_ISDIR(inodes[child].mode):
                    parent[child] = ino
                    nlink[ino] += 1  # the child's ".."
                else:
                    nlink[child] += 1
    heap = _Heap()
    inode_buf = bytearray()
    dirent_buf = bytearray()
    ref_buf = bytearray()
    xattr_buf = bytearray()
    n_dirents = n_refs = n_xattrs = 0
    for ino, spec in enumerate(inodes):
        x_start = n_xattrs
        for key, value in sorted(spec.xattrs):
            xattr_buf += _XATTR.pack(heap.add(key), len(key), heap.add(value), len(value))
            n_xattrs += 1
        a = b = 0
        fmt = stat.S_IFMT(spec.mode)
        if fmt == stat.S_IFDIR:
            a = n_dirents
            kids = sorted(spec.children)
            for i in range(1, len(kids)):
                if kids[i][0] == kids[i - 1][0]:
                    raise ValueError(f"duplicate name {kids[i][0]!r} in directory {ino}")
            for name, child in kids:
                dirent_buf += _DIRENT.pack(heap.add(name), child, len(name))
            n_dirents += len(kids)
            b = len(kids)
        elif fmt == stat.S_IFREG:
            a = n_refs
            for chunk_id, off in spec.refs:
                ref_buf += _REF.pack(chunk_id, off)
            n_refs += len(spec.refs)
            b = len(spec.refs)
        elif fmt == stat.S_IFLNK:
            a, b = heap.add(spec.target), len(spec.target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            a, b = spec.rdev
        sec, nsec = divmod(spec.mtime_ns, 1_000_000_000)
        size = len(spec.target) if fmt == stat.S_IFLNK else spec.size
        inode_buf += _INODE.pack(
            spec.mode, spec.uid, spec.gid, nlink[ino], sec, nsec, x_start,
            n_xattrs - x_start, parent[ino], size, a, b,
        )
    chunk_buf = bytearray()
    frames = [c.frame for c in chunks if c.frame is not None]
    if frames and len(frames) != len(chunks):
        raise ValueError(f"{len(frames)} of {len(chunks)} chunks have a frame digest: all or none")
    if any(len(f) != _SHA256 for f in frames):
        raise ValueError("a frame digest is not 32 bytes")
    for i, c in enumerate(chunks):
        if c.id != i:
            raise ValueError(f"chunk {i} has id {c.id}")
        chunk_buf += _CHUNK.pack(c.digest, c.blob, 0, c.offset, c.clen, c.ulen)
    blob_buf = b"".join(_BLOB.pack(bl.digest, bl.size) for bl in blobs)
    prefetch_buf = b"".join(_U32.pack(c) for c in prefetch)
    sections = [
        (SEC_INODES, bytes(inode_buf)),
        (SEC_DIRENTS, bytes(dirent_buf)),
        (SEC_REFS, bytes(ref_buf)),
        (SEC_CHUNKS, bytes(chunk_buf)),
        (SEC_BLOBS, blob_buf),
        (SEC_XATTRS, bytes(xattr_buf)),
        (SEC_PREFETCH, prefetch_buf),
        (SEC_HEAP, bytes(heap.buf)),
    ]
    if startup:
        sections.append((SEC_STARTUP, b"".join(_U32.pack(c) for c in startup)))
    if frames:
        sections.append((SEC_FRAMES, b"".join(frames)))
    table_len = _SUPER.size + _SECTION.size * len(sections)
    parts = [_SUPER.pack(log2, ROOT_INO, len(sections), 0)]
    off = table_len
    bodies = []
    for sec_id, body in sections:
        pad = -off % 8
        off += pad
        parts.append(_SECTION.pack(sec_id, 0, off, len(body)))
        bodies.append(b"\0" * pad + body)
        off += len(body)
    payload = b"".join(parts + bodies)
    compressed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(payload)
    header = _HEADER.pack(
        MAGIC, VERSION, 0, HEADER_SIZE, len(payload), len(compressed), hashlib.sha256(payload).digest()
    )
    return header + compressed


# ---------------------------------------------------------------------------------------
# Decoding


def _fmt_err(msg: str) -> FormatError:
    return FormatError(f"corrupt turbofs index: {msg}")


def payload_limit(clen: int) -> int:
    """The largest payload an index blob of ``clen`` compressed bytes may declare."""
    return max(INDEX_RATIO_FREE, clen * INDEX_MAX_RATIO)


def _check_table(head: bytes, plen: int) -> None:
    """The superblock and section table at the start of a payload (``head``: its first
    bytes) must fit and end the last section exactly at the declared payload length."""
    if len(head) < _SUPER.size:
        raise _fmt_err(f"payload of {len(head)} bytes is too short for its superblock")
    n_sections = _SUPER.unpack_from(head, 0)[2]
    table_end = _SUPER.size + n_sections * _SECTION.size
    if n_sections > MAX_SECTIONS or table_end > len(head):
        raise _fmt_err(f"section table of {n_sections} entries does not fit")
    end = max((off + length for _, _, off, length in
               (_SECTION.unpack_from(head, _SUPER.size + i * _SECTION.size) for i in range(n_sections))),
              default=table_end)
    if max(end, table_end) != plen:
        raise _fmt_err(f"the sections end at byte {max(end, table_end)}, the header declares {plen}")


class Index:
    """A decoded index: the metadata tree, chunk maps and prefetch order of one image."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        try:
            log2, root, n_sections, _ = _SUPER.unpack_from(payload, 0)
        except struct.error as exc:
            raise _fmt_err("payload too short for its superblock") from exc
        if not MIN_CHUNK_LOG2 <= log2 <= MAX_CHUNK_LOG2:
            raise _fmt_err(f"chunk size 2^{log2} out of range")
        if root != ROOT_INO:
            raise _fmt_err(f"root inode {root} is not {ROOT_INO}")
        if n_sections > MAX_SECTIONS or _SUPER.size + n_sections * _SECTION.size > len(payload):
            raise _fmt_err(f"section table of {n_sections} entries does not fit")
        self.chunk_size: int = 1 << log2
        mv = memoryview(payload)
        secs: dict[int, memoryview] = {}
        for i in range(n_sections):
            sec_id, _, off, length = _SECTION.unpack_from(payload, _SUPER.size + i * _SECTION.size)
            if off + length > len(payload):
                raise _fmt_err(f"section {sec_id} [{off}, +{length}) past the payload end")
            if sec_id in secs:
                raise _fmt_err(f"section {sec_id} appears twice")
            rec = _RECORD_SIZES.get(sec_id)
            if rec is None:
                continue  # a section from a later minor revision: ignored
            if length % rec:
                raise _fmt_err(f"section {sec_id} length {length} is not a multiple of {rec}")
            secs[sec_id] = mv[off : off + length]
        missing = set(_RECORD_SIZES) - set(secs) - _OPTIONAL_SECTIONS
        if missing:
            raise _fmt_err(f"missing sections {sorted(missing)}")
        self._inodes = secs[SEC_INODES]
        self._dirents = secs[SEC_DIRENTS]
        self._refs = secs[SEC_REFS]
        self._chunks = secs[SEC_CHUNKS]
        self._blobs = secs[SEC_BLOBS]
        self._xattrs = secs[SEC_XATTRS]
        self._prefetch = secs[SEC_PREFETCH]
        self._startup = secs.get(SEC_STARTUP, memoryview(b""))
        frames = secs.get(SEC_FRAMES)
        self._heap = bytes(secs[SEC_HEAP])
        self.n_inodes = len(self._inodes) // _INODE.size
        self.n_dirents = len(self._dirents) // _DIRENT.size
        self.n_refs = len(self._refs) // _REF.size
        self.n_chunks = len(self._chunks) // _CHUNK.size
        self.n_blobs = len(self._blobs) // _BLOB.size
        if frames is not None and len(frames) != self.n_chunks * _SHA256:
            raise _fmt_err(f"frames section holds {len(frames) // _SHA256} digests for {self.n_chunks} chunks")
        self._frames: bytes | None = None if frames is None else bytes(frames)
        if self.n_inodes == 0:
            raise _fmt_err("no inodes")
        if not stat.S_ISDIR(self._raw_inode(ROOT_INO)[0]):
            raise _fmt_err("the root inode is not a directory")

    # -- opening

    @classmethod
    def from_bytes(cls, blob: bytes, *, max_payload: int = MAX_PAYLOAD) -> Index:
        """Decode an index blob (header + zstd payload), checking magic, version and checksum."""
        if len(blob) < HEADER_SIZE:
            raise _fmt_err(f"{len(blob)} bytes is shorter than the {HEADER_SIZE}-byte header")
        magic, version, _flags, hsize, plen, clen, checksum = _HEADER.unpack_from(blob, 0)
        if magic != MAGIC:
            raise _fmt_err(f"bad magic {magic!r}, expected {MAGIC!r}")
        if version not in READABLE_VERSIONS:
            raise FormatError(
                f"turbofs index version {version} is not supported by this turbofs "
                f"(reads versions {sorted(READABLE_VERSIONS)})"
            )
        if hsize < HEADER_SIZE or hsize + clen != len(blob):
            raise _fmt_err(f"header says {hsize}+{clen} bytes, blob has {len(blob)}")
        if plen > max_payload:
            raise _fmt_err(f"payload of {plen} bytes exceeds the limit of {max_payload}")
        limit = payload_limit(clen)
        if plen > limit:
            raise _fmt_err(
                f"payload of {plen} bytes from {clen} compressed exceeds the limit of {limit} "
                f"({INDEX_MAX_RATIO}x the compressed size, at least {INDEX_RATIO_FREE}): a decompression bomb"
            )
        frame = blob[hsize:]
        dctx = zstandard.ZstdDecompressor()
        try:
            # the frame's own size field, when present, is what zstd allocates: it must agree
            content = zstandard.frame_content_size(frame)
            if content not in (-1, plen):
                raise _fmt_err(f"payload frame says {content} bytes, the header {plen}")
            # the section table accounts for every byte of the payload: checked on the first
            # bytes, before the whole payload is decompressed
            head = dctx.stream_reader(frame).read(min(plen, _SUPER.size + MAX_SECTIONS * _SECTION.size))
            _check_table(head, plen)
            # bounded: at most plen bytes (the frame's size field equals it or is absent)
            payload = dctx.decompress(frame, max_output_size=plen)
        except zstandard.ZstdError as exc:
            raise _fmt_err(f"payload does not decompress: {exc}") from exc
        if len(payload) != plen or hashlib.sha256(payload).digest() != checksum:
            raise _fmt_err("payload checksum mismatch")
        return cls(payload)

    # -- raw records

    def _raw_inode(self, ino: int) -> tuple[int, ...]:
        if not 0 <= ino < self.n_inodes:
            raise _fmt_err(f"inode {ino} out of range (0..{self.n_inodes - 1})")
        return _INODE.unpack_from(self._inodes, ino * _INODE.size)

    def _heap_bytes(self, off: int, length: int) -> bytes:
        if off + length > len(self._heap):
            raise _fmt_err(f"string [{off}, +{length}) past the heap end")
        return self._heap[off : off + length]

    def _dir_range(self, ino: int) -> tuple[int, int]:
        mode, *_rest, a, b = self._raw_inode(ino)
        if not stat.S_ISDIR(mode):
            raise NotADirectoryError(f"inode {ino} is not a directory")
        if a + b > self.n_dirents:
            raise _fmt_err(f"directory {ino} entries [{a}, +{b}) out of range")
        return a, b

    def _dirent(self, i: int) -> tuple[bytes, int]:
        name_off, ino, name_len = _DIRENT.unpack_from(self._dirents, i * _DIRENT.size)
        if ino >= self.n_inodes:
            raise _fmt_err(f"directory entry {i} names inode {ino} out of range")
        return self._heap_bytes(name_off, name_len), ino

    # -- reader API

    @property
    def root(self) -> int:
        return ROOT_INO

    def inode(self, ino: int) -> Inode:
        mode, uid, gid, nlink, sec, nsec, _xs, _xn, parent, size, a, b = self._raw_inode(ino)
        if nsec >= 1_000_000_000:
            raise _fmt_err(f"inode {ino} has {nsec} nanoseconds")
        if parent >= self.n_inodes:
            raise _fmt_err(f"inode {ino} has parent {parent} out of range")
        fmt = stat.S_IFMT(mode)
        if fmt not in _KNOWN_TYPES:
            raise _fmt_err(f"inode {ino} has unknown type {fmt:#o}")
        rdev = (a, b) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else (0, 0)
        return Inode(ino, mode, uid, gid, nlink, sec * 1_000_000_000 + nsec, size, parent, rdev)

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode of ``name`` in directory ``parent``, or None."""
        start, count = self._dir_range(parent)
        lo, hi = start, start + count
        while lo < hi:
            mid = (lo + hi) // 2
            mid_name, ino = self._dirent(mid)
            if mid_name == name:
                return ino
            if mid_name < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def resolve(self, path: bytes | str) -> int:
        """The inode at ``path`` (relative to the root; symlinks are not followed)."""
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        ino = ROOT_INO
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            try:
                found = self.lookup(ino, part)
            except NotADirectoryError:
                found = None
            if found is None:
                raise NotFound(f"{raw.decode('utf-8', 'backslashreplace')}: no such file in image")
            ino = found
        return ino

    def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) pairs of a directory, sorted by name bytes."""
        start, count = self._dir_range(ino)
        return [self._dirent(i) for i in range(start, start + count)]

    def readlink(self, ino: int) -> bytes:
        mode, *_rest, a, b = self._raw_inode(ino)
        if not stat.S_ISLNK(mode):
            raise ValueError(f"inode {ino} is not a symlink")
        return self._heap_bytes(a, b)

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        _, _, _, _, _, _, start, count, *_rest = self._raw_inode(ino)
        if (start + count) * _XATTR.size > len(self._xattrs):
            raise _fmt_err(f"inode {ino} xattrs [{start}, +{count}) out of range")
        out = {}
        for i in range(start, start + count):
            ko, kl, vo, vl = _XATTR.unpack_from(self._xattrs, i * _XATTR.size)
            out[self._heap_bytes(ko, kl)] = self._heap_bytes(vo, vl)
        return out

    def chunk(self, chunk_id: int) -> Chunk:
        if not 0 <= chunk_id < self.n_chunks:
            raise _fmt_err(f"chunk {chunk_id} out of range (0..{self.n_chunks - 1})")
        digest, blob, _flags, off, clen, ulen = _CHUNK.unpack_from(self._chunks, chunk_id * _CHUNK.size)
        if blob >= self.n_blobs:
            raise _fmt_err(f"chunk {chunk_id} names blob {blob} out of range")
        if ulen > self.chunk_size:
            raise _fmt_err(f"chunk {chunk_id} of {ulen} bytes exceeds the chunk size")
        frames = self._frames
        frame = None if frames is None else frames[chunk_id * _SHA256 : (chunk_id + 1) * _SHA256]
        return Chunk(chunk_id, digest, blob, off, clen, ulen, frame)

    def chunks(self) -> Iterator[Chunk]:
        return (self.chunk(i) for i in range(self.n_chunks))

    def blob(self, blob_id: int) -> Blob:
        if not 0 <= blob_id < self.n_blobs:
            raise _fmt_err(f"blob {blob_id} out of range")
        digest, size = _BLOB.unpack_from(self._blobs, blob_id * _BLOB.size)
        return Blob(digest, size)

    def blobs(self) -> list[Blob]:
        return [self.blob(i) for i in range(self.n_blobs)]

    def prefetch_order(self) -> list[int]:
        return [c for (c,) in _U32.iter_unpack(self._prefetch)]

    @property
    def has_frame_digests(self) -> bool:
        """Whether the index gives each chunk's compressed-frame digest (revision 1.2)."""
        return self._frames is not None

    def startup_chunks(self) -> list[int]:
        """The chunks a recorded process start read, in first-use order (empty without a
        recorded trace). The prefetch order starts with them."""
        return [c for (c,) in _U32.iter_unpack(self._startup)]

    def file_refs(self, ino: int) -> list[tuple[int, int]]:
        """The (chunk id, offset) of each ``chunk_size`` piece of a regular file."""
        mode, *_rest, size, a, b = self._raw_inode(ino)
        if not stat.S_ISREG(mode):
            raise _fmt_err(f"inode {ino} is not a regular file")
        if a + b > self.n_refs:
            raise _fmt_err(f"file {ino} chunk map [{a}, +{b}) out of range")
        if b != -(-size // self.chunk_size):
            raise _fmt_err(f"file {ino} of {size} bytes has {b} chunk references")
        return [_REF.unpack_from(self._refs, i * _REF.size) for i in range(a, a + b)]

    def map_range(self, ino: int, offset: int, length: int) -> list[ChunkSlice]:
        """The chunk slices that hold bytes [offset, offset+length) of a regular file.

        The range is clipped to the file size. Slices come in file order.
        """
        mode, *_rest, size, a, b = self._raw_inode(ino)
        if not stat.S_ISREG(mode):
            raise _fmt_err(f"inode {ino} is not a regular file")
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(size, offset + length)
        if offset >= end:
            return []
        cs = self.chunk_size
        if b != -(-size // cs) or a + b > self.n_refs:
            raise _fmt_err(f"file {ino} of {size} bytes has a bad chunk map [{a}, +{b})")
        out = []
        piece = offset // cs
        pos = offset
        while pos < end:
            chunk_id, coff = _REF.unpack_from(self._refs, (a + piece) * _REF.size)
            piece_start = piece * cs
            piece_len = min(cs, size - piece_start)
            take = min(end, piece_start + piece_len) - pos
            within = pos - piece_start
            if chunk_id == HOLE:
                out.append(ChunkSlice(None, 0, take, pos))
            else:
                chunk = self.chunk(chunk_id)
                if coff + piece_len > chunk.ulen:
                    raise _fmt_err(f"file {ino} piece {piece} runs past the end of chunk {chunk_id}")
                out.append(ChunkSlice(chunk, coff + within, take, pos))
            pos += take
            piece += 1
        return out

    def walk(self, ino: int = ROOT_INO, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """Every (path, inode) below ``ino`` in depth-first, name order (the root excluded)."""
        stack = [(prefix, ino)]
        depth = 0
        while stack:
            base, dino = stack.pop()
            depth += 1
            if depth > self.n_inodes + 1:
                raise _fmt_err("directory cycle")
            entries = self.listdir(dino)
            for name, child in reversed(entries):
                path = base + b"/" + name if base else name
                if stat.S_ISDIR(self._raw_inode(child)[0]):
                    stack.append((path, child))
            for name, child in entries:
                yield (base + b"/" + name if base else name), child

    def verify(self) -> None:
        """Check the whole index; raise FormatError at the first inconsistency."""
        seen_dirs = {ROOT_INO}
        refcount = [0] * self.n_inodes
        for ino in range(self.n_inodes):
            node = self.inode(ino)
            self.xattrs(ino)
            if node.is_dir:
                entries = self.listdir(ino)
                names = [n for n, _ in entries]
                if names != sorted(set(names)):
                    raise _fmt_err(f"directory {ino} entries are not sorted and unique")
                for name, child in entries:
                    if not name or b"/" in name or name in (b".", b".."):
                        raise _fmt_err(f"directory {ino} has an invalid name {name!r}")
                    refcount[child] += 1
                    if stat.S_ISDIR(self._raw_inode(child)[0]):
                        if child in seen_dirs or self.inode(child).parent != ino:
                            raise _fmt_err(f"directory {child} is linked twice or has a wrong parent")
                        seen_dirs.add(child)
            elif node.is_reg:
                for chunk_id, _off in self.file_refs(ino):
                    if chunk_id != HOLE:
                        self.chunk(chunk_id)
                self.map_range(ino, 0, node.size)
            elif node.is_symlink:
                self.readlink(ino)
        for ino in range(1, self.n_inodes):
            if refcount[ino] == 0:
                raise _fmt_err(f"inode {ino} is not reachable from the root")
        for chunk in self.chunks():
            if chunk.offset + chunk.clen > self.blob(chunk.blob).size:
                raise _fmt_err(f"chunk {chunk.id} runs past the end of its blob")
        for c in self.prefetch_order():
            if c >= self.n_chunks:
                raise _fmt_err(f"prefetch order names chunk {c} out of range")
        for c in self.startup_chunks():
            if c >= self.n_chunks:
                raise _fmt_err(f"startup section names chunk {c} out of range")

    # -- bulk reader API: whole tables in one pass, for a presentation that needs every entry
    # at once (the erofs writer builds the whole tree at mount time). Each checks, for all
    # entries together, what the accessors above check one at a time, and raises
    # FormatError at the first problem. Columns come from the tables by strided views of
    # the payload (no per-record unpacking) where the machine is little endian.

    def _table_columns(self, table: memoryview, words: Sequence[int], wide: Sequence[int], record: int,
                       *, native: bool | None = None) -> list[list[int]]:
        """Columns of a table: the u32 fields at ``words`` (u32 indexes in a record), then
        the i64/u64 fields at ``wide`` (u64 indexes; ``-k - 1`` for a signed one at ``k``).
        ``native``: read through typed views (default: where the machine is little endian)."""
        if native is None:
            native = struct.pack("=I", 1) == struct.pack("<I", 1) and struct.calcsize("I") * 2 == struct.calcsize("Q") == 8
        if native:
            w = table.cast("I")
            out = [w[k :: record // 4].tolist() for k in words]
            if wide:
                q, u = table.cast("q"), table.cast("Q")
                out += [(q[-k - 1 :: record // 8] if k < 0 else u[k :: record // 8]).tolist() for k in wide]
            return out
        fmt = "<" + "I" * (record // 4)  # a big-endian machine: unpack, then pick the fields
        rows = [struct.unpack_from(fmt, table, off) for off in range(0, len(table), record)]
        out = [[r[k] for r in rows] for k in words]
        for k in wide:
            col = [r[2 * (-k - 1 if k < 0 else k)] | r[2 * (-k - 1 if k < 0 else k) + 1] << 32 for r in rows]
            out.append([v - (1 << 64) if k < 0 and v >> 63 else v for v in col])
        return out

    def inode_columns(self) -> dict[str, list[int]]:
        """Every field of every inode, one list per field, indexed by inode number: ``mode,
        uid, gid, nlink, mtime_sec, mtime_nsec, xattr_start, xattr_count, parent, size, a,
        b`` (docs/format.md). Checked as the one-inode accessors check, so slices of
        :meth:`dirent_columns`, :meth:`ref_columns` and :meth:`xattr_records` taken with these
        fields are in range."""
        names = ("mode", "uid", "gid", "nlink", "mtime_nsec", "xattr_start", "xattr_count", "parent", "a", "b",
                 "mtime_sec", "size")
        cols = dict(zip(names, self._table_columns(self._inodes, (0, 1, 2, 3, 6, 7, 8, 9, 12, 13), (-3, 5),
                                                   _INODE.size), strict=True))
        n = self.n_inodes
        modes, nsecs, parents = cols["mode"], cols["mtime_nsec"], cols["parent"]
        xstarts, xcounts = cols["xattr_start"], cols["xattr_count"]
        if not _KNOWN_TYPES.issuperset(map(stat.S_IFMT, modes)):
            ino = next(i for i, m in enumerate(modes) if stat.S_IFMT(m) not in _KNOWN_TYPES)
            raise _fmt_err(f"inode {ino} has unknown type {stat.S_IFMT(modes[ino]):#o}")
        if max(nsecs) >= 1_000_000_000:
            ino = next(i for i, ns in enumerate(nsecs) if ns >= 1_000_000_000)
            raise _fmt_err(f"inode {ino} has {nsecs[ino]} nanoseconds")
        if max(parents) >= n:
            ino = next(i for i, p in enumerate(parents) if p >= n)
            raise _fmt_err(f"inode {ino} has parent {parents[ino]} out of range")
        n_xattrs = len(self._xattrs) // _XATTR.size
        if max(map(int.__add__, xstarts, xcounts)) > n_xattrs:
            ino = next(i for i in range(n) if xstarts[i] + xcounts[i] > n_xattrs)
            raise _fmt_err(f"inode {ino} xattrs [{xstarts[ino]}, +{xcounts[ino]}) out of range")
        n_heap = len(self._heap)
        log2 = self.chunk_size.bit_length() - 1
        up = self.chunk_size - 1
        for ino, (mode, size, a, b) in enumerate(zip(modes, cols["size"], cols["a"], cols["b"], strict=True)):
            kind = mode & 0o170000
            if kind == stat.S_IFREG:
                if a + b > self.n_refs or b != (size + up) >> log2:
                    raise _fmt_err(f"file {ino} of {size} bytes has a bad chunk map [{a}, +{b})")
            elif kind == stat.S_IFDIR:
                if a + b > self.n_dirents:
                    raise _fmt_err(f"directory {ino} entries [{a}, +{b}) out of range")
            elif kind == stat.S_IFLNK and a + b > n_heap:
                raise _fmt_err(f"symlink {ino} target [{a}, +{b}) past the heap end")
        return cols

    def dirent_columns(self) -> tuple[list[bytes], list[int]]:
        """Every directory entry's name and inode, in table order: a directory's entries
        (sorted by name) are ``[a, a + b)`` of its inode. Inodes and names are checked to be
        in range."""
        offs, inos, lens = self._table_columns(self._dirents, (0, 1, 2), (), _DIRENT.size)
        lens = list(map((0xFFFF).__and__, lens))  # u16 name length, then two zero bytes
        ends = list(map(int.__add__, offs, lens))
        heap = self._heap
        if inos and max(inos) >= self.n_inodes:
            i = next(i for i, ino in enumerate(inos) if ino >= self.n_inodes)
            raise _fmt_err(f"directory entry {i} names inode {inos[i]} out of range")
        if ends and max(ends) > len(heap):
            i = next(i for i, end in enumerate(ends) if end > len(heap))
            raise _fmt_err(f"directory entry {i}: name [{offs[i]}, +{lens[i]}) past the heap end")
        return list(map(heap.__getitem__, map(slice, offs, ends))), inos

    def ref_columns(self) -> tuple[list[int], list[int]]:
        """Every ref's chunk id and offset, in table order: a file's pieces are ``[a, a + b)``
        of its inode. Chunk ids are checked to be in range (or :data:`HOLE`); whether a
        piece fits its chunk is for the user to check, as :meth:`map_range` does."""
        cids, offs = self._table_columns(self._refs, (0, 1), (), _REF.size)
        real = [c for c in cids if c != HOLE]
        if real and max(real) >= self.n_chunks:
            i = next(i for i, c in enumerate(cids) if c != HOLE and c >= self.n_chunks)
            raise _fmt_err(f"ref {i} names chunk {cids[i]} out of range (0..{self.n_chunks - 1})")
        return cids, offs

    def xattr_records(self) -> list[tuple[bytes, bytes]]:
        """Every xattr as ``(name, value)``, in table order: an inode's (sorted by name) are
        ``[xattr_start, xattr_start + xattr_count)`` of its inode."""
        raw: list[tuple[int, int, int, int]] = list(_XATTR.iter_unpack(self._xattrs))
        heap = self._heap
        if raw and max(max(ko + kl, vo + vl) for ko, kl, vo, vl in raw) > len(heap):
            i = next(i for i, (ko, kl, vo, vl) in enumerate(raw) if max(ko + kl, vo + vl) > len(heap))
            raise _fmt_err(f"xattr {i} runs past the heap end")
        return [(heap[ko : ko + kl], heap[vo : vo + vl]) for ko, kl, vo, vl in raw]

    def chunk_list(self) -> list[Chunk]:
        """Every chunk, by id, checked as :meth:`chunk` checks one."""
        frames = self._frames
        if frames is None:
            out = [Chunk(i, digest, blob, off, clen, ulen)
                   for i, (digest, blob, _flags, off, clen, ulen) in enumerate(_CHUNK.iter_unpack(self._chunks))]
        else:
            out = [Chunk(i, digest, blob, off, clen, ulen, frames[i * _SHA256 : (i + 1) * _SHA256])
                   for i, (digest, blob, _flags, off, clen, ulen) in enumerate(_CHUNK.iter_unpack(self._chunks))]
        for c in out:
            if c.blob >= self.n_blobs:
                raise _fmt_err(f"chunk {c.id} names blob {c.blob} out of range")
            if c.ulen > self.chunk_size:
                raise _fmt_err(f"chunk {c.id} of {c.ulen} bytes exceeds the chunk size")
        return out

    def payload_sha256(self) -> bytes:
        """The sha256 of the decoded payload: the checksum in the header of the blob this
        index came from, so it names the index (caches of what is derived from it use it)."""
        return hashlib.sha256(self._payload).digest()


_KNOWN_TYPES: Final = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)


def piece_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


__all__ = [
    "ALIGN",
    "HOLE",
    "MAGIC",
    "REVISION",
    "ROOT_INO",
    "VERSION",
    "Blob",
    "Chunk",
    "ChunkSlice",
    "Index",
    "Inode",
    "InodeSpec",
    "encode",
    "piece_count",
]
