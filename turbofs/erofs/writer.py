"""Build erofs metadata for a turbo index, with file data pointing into the turbo chunks.

:func:`build_erofs` lays out one virtual image file::

    block 0 ..       superblock (at 1024), then every inode (root first, index order):
                     64-byte extended inode | xattr ibody | block map or inline tail
    ..               directory blocks, symlink targets too long to inline, shared xattrs
    data region      every chunk of the index, in chunk id order, each at a block-aligned
                     address, zero-padded to a whole block (holes take no room)

No chunk is re-encoded: file data starts 4 KiB-aligned in its chunk and large files are cut
at power-of-two offsets (docs/format.md), so each file piece is a block range of its chunk.
A file whose pieces lie back to back is flat; any other is chunk-based (chunk size = turbo
chunk size, ``NULL_ADDR`` for a hole). Directory and symlink tails are inline when they fit
in the inode's block. Xattrs used by two or more inodes are shared.

The build runs at mount time: it reads the index as columns
(:meth:`turbofs.core.format.Index.inode_columns`) and runs Python per inode only where an
inode needs a decision. :meth:`ErofsImage.read` maps any byte range of the virtual file to
metadata bytes, chunk slices and zeros.
"""

from __future__ import annotations

import bisect
import hashlib
import stat
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, compress, repeat
from typing import BinaryIO, Final

from turbofs.core import format as fmt
from turbofs.core.errors import FormatError
from turbofs.erofs import ondisk as d
from turbofs.erofs.errors import ErofsUnsupported

#: The slot of the root inode: right after the superblock, so its nid fits the 16-bit field.
ROOT_NID: Final = (d.SUPER_OFFSET + d.SUPER.size) // d.SLOT
#: A shared xattr is worth it only if this many inodes carry it.
SHARE_MIN_USERS: Final = 2
#: The most shared xattrs one inode may name (an 8-bit count).
MAX_SHARED_PER_INODE: Final = 255
VOLUME_NAME: Final = b"turbofs"
#: Changes whenever :func:`build_erofs` may write other bytes for the same index, so that
#: metadata cached by an earlier version is never taken for this one's.
WRITER_VERSION: Final = 2



@dataclass(frozen=True, slots=True)
class Extent:
    """A piece of a read of the image file: metadata bytes, chunk bytes or zeros."""

    offset: int  # in the image file
    length: int
    data: bytes | None = None  # metadata bytes (exactly ``length`` of them)
    chunk: fmt.Chunk | None = None  # or bytes [chunk_offset, +length) of this chunk
    chunk_offset: int = 0


@dataclass(frozen=True)
class IndexData:
    """What the erofs image is built from, read from the index in one pass (the writer
    builds from it and the checker compares against it). Columns are indexed by inode
    number (``cols``), dirent number (``names``, ``dirent_inos``) or ref number."""

    cols: dict[str, list[int]]  # Index.inode_columns()
    names: list[bytes]
    dirent_inos: list[int]
    ref_chunks: list[int]
    ref_offsets: list[int]
    xattr_records: list[tuple[bytes, bytes]]
    targets: dict[int, bytes]  # symlinks
    chunks: list[fmt.Chunk]
    chunk_size: int

    @property
    def n_inodes(self) -> int:
        return len(self.cols["mode"]) if self.cols else 0

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        """A directory's (name, inode) pairs, sorted by name (``Index.listdir``)."""
        a, b = self.cols["a"][ino], self.cols["b"][ino]
        return list(zip(self.names[a : a + b], self.dirent_inos[a : a + b], strict=True))

    def refs(self, ino: int) -> list[tuple[int, int]]:
        """A regular file's (chunk id, offset) per piece (``Index.file_refs``)."""
        a, b = self.cols["a"][ino], self.cols["b"][ino]
        return list(zip(self.ref_chunks[a : a + b], self.ref_offsets[a : a + b], strict=True))

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        start, count = self.cols["xattr_start"][ino], self.cols["xattr_count"][ino]
        return dict(self.xattr_records[start : start + count])


def decode_index(index: fmt.Index) -> IndexData:
    cols = index.inode_columns()
    names, dirent_inos = index.dirent_columns()
    ref_chunks, ref_offsets = index.ref_columns()
    modes = cols["mode"]
    links = [ino for ino, m in enumerate(modes) if m & 0o170000 == stat.S_IFLNK]
    targets = {ino: index.readlink(ino) for ino in links}
    return IndexData(cols, names, dirent_inos, ref_chunks, ref_offsets, index.xattr_records(), targets,
                     index.chunk_list(), index.chunk_size)


@dataclass
class ErofsImage:
    """An erofs image of a turbo index: metadata in memory, data in the turbo chunks."""

    index: fmt.Index
    data: IndexData
    meta: bytes  # blocks [0, meta_blocks)
    meta_blocks: int
    chunk_blocks: list[int]  # the first block of each chunk, by chunk id (ascending)
    total_blocks: int
    root_nid: int = ROOT_NID
    nids: list[int] = field(default_factory=list)  # nid of each index inode
    chunk_owner: list[int] = field(default_factory=list)  # an index inode using each chunk, or -1
    stats: dict[str, int] = field(default_factory=dict)
    _owner_paths: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.total_blocks * d.BLOCK_SIZE

    @property
    def meta_size(self) -> int:
        return self.meta_blocks * d.BLOCK_SIZE

    def drop_source(self) -> None:
        """Forget the decoded index data but the chunk table (reads need no more; checks do)."""
        d_ = self.data
        self.data = IndexData({}, [], [], [], [], [], {}, d_.chunks, d_.chunk_size)

    def owner(self, chunk_id: int) -> int | None:
        """A regular file whose data lies in chunk ``chunk_id`` (for messages), or None."""
        ino = self.chunk_owner[chunk_id] if 0 <= chunk_id < len(self.chunk_owner) else -1
        return ino if ino >= 0 else None

    def owner_path(self, chunk_id: int) -> str | None:
        """The path in the image of the file :meth:`owner` names (for messages), or None."""
        ino = self.owner(chunk_id)
        if ino is None:
            return None
        path = self._owner_paths.get(ino)
        if path is None:
            try:
                raw = next((p for p, i in self.index.walk() if i == ino), None)
            except FormatError:
                raw = None
            path = f"<inode {ino}>" if raw is None else "/" + raw.decode("utf-8", "backslashreplace")
            self._owner_paths[ino] = path
        return path

    def chunk_at(self, block: int) -> tuple[int, int]:
        """(chunk id, block within it) of a block of the data region."""
        cid = bisect.bisect_right(self.chunk_blocks, block) - 1
        return cid, block - self.chunk_blocks[cid]

    def read(self, offset: int, length: int) -> list[Extent]:
        """The extents holding bytes ``[offset, offset+length)`` of the image (clipped)."""
        end = min(self.size, offset + length)
        out: list[Extent] = []
        pos = max(0, offset)
        meta_end = self.meta_size
        while pos < end:
            if pos < meta_end:
                stop = min(end, meta_end)
                out.append(Extent(pos, stop - pos, data=self.meta[pos:stop]))
                pos = stop
                continue
            cid, _ = self.chunk_at(pos // d.BLOCK_SIZE)
            chunk = self.data.chunks[cid]
            start = self.chunk_blocks[cid] * d.BLOCK_SIZE
            region_end = start + d.blocks_of(chunk.ulen) * d.BLOCK_SIZE
            within = pos - start
            if within < chunk.ulen:
                take = min(end, start + chunk.ulen) - pos
                out.append(Extent(pos, take, chunk=chunk, chunk_offset=within))
            else:
                take = min(end, region_end) - pos
                out.append(Extent(pos, take))
            pos += take
        return out

    def write_to(self, out: BinaryIO, read_chunk: Callable[[fmt.Chunk], bytes]) -> None:
        """Write the whole image file (metadata and every chunk) to ``out``."""
        out.write(self.meta)
        for chunk in self.data.chunks:
            data = read_chunk(chunk)
            out.write(data)
            out.write(bytes(d.blocks_of(len(data)) * d.BLOCK_SIZE - len(data)))
        out.truncate(self.size)


# -- layout --------------------------------------------------------------------------------


def _dir_cuts(names: list[bytes]) -> tuple[list[int], int]:
    """Where a directory's sorted entries are cut into blocks (the end index of each block's
    entries), and the bytes of its last block."""
    total = d.DIRENT.size * len(names) + sum(map(len, names))
    if total <= d.BLOCK_SIZE:
        return [len(names)], total
    cuts: list[int] = []
    used = 0
    for i, name in enumerate(names):
        cost = d.DIRENT.size + len(name)
        if used + cost > d.BLOCK_SIZE:
            cuts.append(i)
            used = 0
        used += cost
    cuts.append(len(names))
    return cuts, used


def _xattr_key(name: bytes) -> tuple[int, bytes]:
    split = d.split_xattr_name(name)
    if split is None:
        raise ErofsUnsupported(f"xattr {name!r} has no erofs name prefix")
    index, suffix = split
    if len(suffix) > d.NAME_LEN:
        raise ErofsUnsupported(f"xattr name {name!r} is longer than {d.NAME_LEN} bytes after its prefix")
    return index, suffix


def _xattr_entry(name: bytes, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ErofsUnsupported(f"xattr {name!r} has a value of {len(value)} bytes (at most 65535)")
    index, suffix = _xattr_key(name)
    raw = d.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(d.align(len(raw), 4) - len(raw))


def _xattr_bodies(src: IndexData) -> tuple[dict[int, bytes], bytes, int]:
    """The xattr ibody of every inode that has xattrs, the shared xattr area, and how many
    (name, value) pairs are shared."""
    starts, counts_col = src.cols["xattr_start"], src.cols["xattr_count"]
    records = src.xattr_records
    users = list(compress(range(src.n_inodes), counts_col))
    counts: Counter[tuple[bytes, bytes]] = Counter()
    for ino in users:
        counts.update(records[starts[ino] : starts[ino] + counts_col[ino]])
    shared_ids: dict[tuple[bytes, bytes], int] = {}
    area = bytearray()
    for pair, n_users in sorted(counts.items()):
        if n_users < SHARE_MIN_USERS:
            continue
        entry = _xattr_entry(*pair)
        room = d.BLOCK_SIZE - len(area) % d.BLOCK_SIZE
        if len(entry) > room and len(entry) <= d.BLOCK_SIZE:
            area += bytes(room)  # an entry never straddles a block when it can help it
        shared_ids[pair] = len(area) // 4
        area += entry
    bodies: dict[int, bytes] = {}
    for ino in users:
        shared: list[int] = []
        inline: list[bytes] = []
        for pair in records[starts[ino] : starts[ino] + counts_col[ino]]:
            sid = shared_ids.get(pair)
            if sid is not None and len(shared) < MAX_SHARED_PER_INODE:
                shared.append(sid)
            else:
                inline.append(_xattr_entry(*pair))
        body = b"".join([d.XATTR_IBODY_HEADER.pack(0, len(shared)), *(d.U32.pack(s) for s in shared), *inline])
        if (len(body) - d.XATTR_IBODY_HEADER.size) // 4 + 1 > 0xFFFF:
            raise ErofsUnsupported(f"inode {ino}: {len(body)} bytes of xattrs do not fit an erofs inode")
        bodies[ino] = body
    return bodies, bytes(area), len(shared_ids)


def _contiguous(refs: list[tuple[int, int]], chunk_blocks: list[int], cs_blocks: int) -> int | None:
    """The first block if every piece's data follows the previous one's, else None."""
    cid, off = refs[0]
    if cid == fmt.HOLE:
        return None
    first: int = chunk_blocks[cid] + (off >> d.BLOCK_BITS)
    expect = first
    for cid, off in refs[1:]:
        expect += cs_blocks
        if cid == fmt.HOLE or chunk_blocks[cid] + (off >> d.BLOCK_BITS) != expect:
            return None
    return first


def _put_dir_block(meta: bytearray, start: int, names: list[bytes], inos: list[int], nids: list[int],
                   ftypes: list[int]) -> None:
    """One directory block (dirents, then names) at ``start``."""
    head = d.DIRENT.size * len(names)
    deque(map(d.DIRENT.pack_into, repeat(meta), range(start, start + head, d.DIRENT.size),
              map(nids.__getitem__, inos), accumulate(map(len, names), initial=head),
              map(ftypes.__getitem__, inos)), maxlen=0)
    blob = b"".join(names)
    meta[start + head : start + head + len(blob)] = blob


def build_erofs(index: fmt.Index, *, volume_name: bytes = VOLUME_NAME) -> ErofsImage:
    """Build the erofs metadata of ``index`` (raises ErofsUnsupported for what erofs cannot hold)."""
    src = decode_index(index)
    cols = src.cols
    n = src.n_inodes
    modes, sizes, acol, bcol = cols["mode"], cols["size"], cols["a"], cols["b"]
    parents, xcounts = cols["parent"], cols["xattr_count"]
    names, dirent_inos = src.names, src.dirent_inos
    ref_chunks, ref_offsets = src.ref_chunks, src.ref_offsets
    cs = src.chunk_size
    cs_blocks = cs // d.BLOCK_SIZE
    chunk_bits = cs.bit_length() - 1 - d.BLOCK_BITS
    if max(modes) > 0xFFFF:
        ino = next(i for i, m in enumerate(modes) if m > 0xFFFF)
        raise ErofsUnsupported(f"inode {ino}: mode {modes[ino]:#o} does not fit 16 bits")
    if names and max(map(len, names)) > d.NAME_LEN:
        name = next(nm for nm in names if len(nm) > d.NAME_LEN)
        raise ErofsUnsupported(f"a name longer than {d.NAME_LEN} bytes: {name[:40]!r}...")

    # chunk placement inside the data region (relative; shifted once the metadata is sized)
    rel_blocks = list(accumulate((d.blocks_of(c.ulen) for c in src.chunks), initial=0))
    data_blocks = rel_blocks.pop()
    owner = [-1] * len(src.chunks)
    bodies, shared_area, n_shared = _xattr_bodies(src)

    # Plain inodes: regular files without xattrs that are empty or one piece of one chunk
    # (most inodes of most images). Each is 64 bytes with nothing after it, so they fill
    # one table after the other inodes, built column by column below.
    plain = [ino for ino, m, x, b in zip(range(n), modes, xcounts, bcol, strict=True)
             if m & 0o170000 == stat.S_IFREG and not x and b <= 1]
    plain = [ino for ino in plain if not bcol[ino] or ref_chunks[acol[ino]] != fmt.HOLE]
    is_plain = bytearray(n)
    for ino in plain:
        is_plain[ino] = 1

    # pass 1: the other inodes' sizes and positions, in inode order (the root first)
    pos_of = [0] * n
    fw_of = [d.FORMAT_PLAIN] * n
    icount_of = [0] * n
    size_of = [0] * n
    iu_of = [0] * n
    flat: list[int] = []  # regular files whose i_u is a block relative to the data region
    maps: list[tuple[int, list[int]]] = []  # chunk-based files: block (relative) per piece
    dirs: list[tuple[int, list[bytes], list[int], list[int], bool]] = []  # ino, names, inos, cuts, inline
    links: list[tuple[int, bool]] = []  # symlink, inline
    outside: list[tuple[int, int]] = []  # (ino, whole blocks after the inodes)
    pos = ROOT_NID * d.SLOT
    wasted = 0
    for ino in compress(range(n), map((1).__xor__, is_plain)):
        kind = modes[ino] & 0o170000
        xsize = 0
        if xcounts[ino]:
            xsize = len(bodies[ino])
            icount_of[ino] = (xsize - d.XATTR_IBODY_HEADER.size) // 4 + 1
        if kind == stat.S_IFREG:
            pos_of[ino] = pos
            size = sizes[ino]
            extra = 0
            if size:
                size_of[ino] = size
                refs = src.refs(ino)
                for rcid, _off in refs:
                    if rcid != fmt.HOLE and owner[rcid] < 0:
                        owner[rcid] = ino
                first = _contiguous(refs, rel_blocks, cs_blocks)
                if first is not None:
                    iu_of[ino] = first
                    flat.append(ino)
                else:
                    fw_of[ino] = d.FORMAT_CHUNKED
                    bits = chunk_bits if len(refs) > 1 else max(0, (size - 1).bit_length() - d.BLOCK_BITS)
                    iu_of[ino] = bits
                    maps.append((ino, [d.NULL_ADDR if rcid == fmt.HOLE else rel_blocks[rcid] + (off >> d.BLOCK_BITS)
                                       for rcid, off in refs]))
                    extra = 4 * len(refs)
            pos += (d.INODE_EXT_SIZE + xsize + extra + d.SLOT - 1) & -d.SLOT
            continue
        tail_len = 0
        whole = 0
        if kind == stat.S_IFDIR:
            a, b = acol[ino], bcol[ino]
            ents = sorted([*zip(names[a : a + b], dirent_inos[a : a + b], strict=True),
                           (b".", ino), (b"..", parents[ino])])
            ent_names = [nm for nm, _ in ents]
            cuts, tail_len = _dir_cuts(ent_names)
            size_of[ino] = (len(cuts) - 1) * d.BLOCK_SIZE + tail_len
            whole = len(cuts) - 1
        elif kind == stat.S_IFLNK:
            target = src.targets[ino]
            if not 0 < len(target) <= d.SYMLINK_MAX:
                raise ErofsUnsupported(f"inode {ino}: a symlink target of {len(target)} bytes")
            size_of[ino] = len(target)
            whole = (len(target) - 1) // d.BLOCK_SIZE
            tail_len = len(target) - whole * d.BLOCK_SIZE
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = acol[ino], bcol[ino]
            if major > 0xFFF or minor > 0xFFFFF:
                raise ErofsUnsupported(f"inode {ino}: device {major}:{minor} does not fit 32 bits")
            iu_of[ino] = d.encode_dev(major, minor)
        # the tail of a directory or symlink: inline when it fits in the block it starts in
        inline = False
        if tail_len:
            room = d.BLOCK_SIZE - (pos + d.INODE_EXT_SIZE + xsize) % d.BLOCK_SIZE
            if tail_len <= room:
                inline = True
            elif (d.INODE_EXT_SIZE + xsize + tail_len <= d.BLOCK_SIZE
                  and d.BLOCK_SIZE - pos % d.BLOCK_SIZE < d.BLOCK_SIZE - tail_len):
                wasted += d.align(pos, d.BLOCK_SIZE) - pos  # padding costs less than a tail block
                pos = d.align(pos, d.BLOCK_SIZE)
                inline = True
            else:
                whole += 1
            if inline:
                fw_of[ino] = d.FORMAT_INLINE
        if kind == stat.S_IFDIR:
            dirs.append((ino, ent_names, [c for _, c in ents], cuts, inline))
        elif kind == stat.S_IFLNK:
            links.append((ino, inline))
        if whole:
            outside.append((ino, whole))
        pos_of[ino] = pos
        pos += (d.INODE_EXT_SIZE + xsize + (tail_len if inline else 0) + d.SLOT - 1) & -d.SLOT

    # the plain inodes' table
    with_data = [ino for ino in plain if bcol[ino]]
    firsts = list(map(acol.__getitem__, with_data))
    cids = list(map(ref_chunks.__getitem__, firsts))
    blocks = list(map(int.__add__, map(rel_blocks.__getitem__, cids),
                      map(d.BLOCK_BITS.__rrshift__, map(ref_offsets.__getitem__, firsts))))
    for ino, block in zip(with_data, blocks, strict=True):
        iu_of[ino] = block
        size_of[ino] = sizes[ino]
    flat += with_data
    for cid, ino in dict(zip(reversed(cids), reversed(with_data), strict=True)).items():
        if owner[cid] < 0:
            owner[cid] = ino
    for ino, at in zip(plain, range(pos, pos + d.INODE_EXT_SIZE * len(plain), d.INODE_EXT_SIZE), strict=True):
        pos_of[ino] = at
    pos += d.INODE_EXT_SIZE * len(plain)

    # pass 2: blocks after the inodes
    next_block = d.blocks_of(pos)
    first_block: dict[int, int] = {}
    for ino, whole in outside:
        first_block[ino] = iu_of[ino] = next_block
        next_block += whole
    xattr_blkaddr = next_block if shared_area else 0
    next_block += d.blocks_of(len(shared_area))
    meta_blocks = next_block
    if meta_blocks + data_blocks >= d.NULL_ADDR:
        raise ErofsUnsupported(f"an image of {meta_blocks + data_blocks} blocks passes the 32-bit block address")
    chunk_blocks = [meta_blocks + b for b in rel_blocks]
    for ino in flat:
        iu_of[ino] += meta_blocks
    nids = list(map((d.SLOT.bit_length() - 1).__rrshift__, pos_of))

    # pass 3: bytes
    meta = bytearray(meta_blocks * d.BLOCK_SIZE)
    deque(map(d.INODE_EXT.pack_into, repeat(meta), pos_of, fw_of, icount_of, modes, repeat(0), size_of, iu_of,
              range(1, n + 1), cols["uid"], cols["gid"], cols["mtime_sec"], cols["mtime_nsec"], cols["nlink"]),
          maxlen=0)
    for ino, body in bodies.items():
        p = pos_of[ino] + d.INODE_EXT_SIZE
        meta[p : p + len(body)] = body
    for ino, blocks in maps:
        p = pos_of[ino] + d.INODE_EXT_SIZE + len(bodies.get(ino, b""))
        addrs = [b if b == d.NULL_ADDR else b + meta_blocks for b in blocks]
        meta[p : p + 4 * len(addrs)] = b"".join(map(d.U32.pack, addrs))
    ftypes = [d.FILE_TYPE[m & 0o170000] for m in modes]
    for ino, ent_names, ent_inos, cuts, inline in dirs:
        start = 0
        for k, end in enumerate(cuts):
            if k < len(cuts) - 1 or not inline:
                at = (first_block[ino] + k) * d.BLOCK_SIZE
            else:
                at = pos_of[ino] + d.INODE_EXT_SIZE + len(bodies.get(ino, b""))
            _put_dir_block(meta, at, ent_names[start:end], ent_inos[start:end], nids, ftypes)
            start = end
    for ino, inline in links:
        target = src.targets[ino]
        whole = (len(target) - 1) // d.BLOCK_SIZE if inline else d.blocks_of(len(target))
        split = min(len(target), whole * d.BLOCK_SIZE)
        if whole:
            at = first_block[ino] * d.BLOCK_SIZE
            meta[at : at + split] = target[:split]
        if inline:
            at = pos_of[ino] + d.INODE_EXT_SIZE + len(bodies.get(ino, b""))
            meta[at : at + len(target) - split] = target[split:]
    if shared_area:
        start = xattr_blkaddr * d.BLOCK_SIZE
        meta[start : start + len(shared_area)] = shared_area

    d.SUPER.pack_into(
        meta, d.SUPER_OFFSET,
        d.MAGIC, 0, 0, d.BLOCK_BITS, 0, ROOT_NID, n, 0, 0, meta_blocks + data_blocks, 0, xattr_blkaddr,
        _volume_uuid(src), volume_name[:16].ljust(16, b"\0"),
        d.FEATURE_INCOMPAT_CHUNKED_FILE if maps else 0, 0, 0, 0, 0, 0, 0, 0, 0,
    )
    stats = {
        "inodes": n,
        "meta_bytes": len(meta),
        "inode_bytes": pos - ROOT_NID * d.SLOT,
        "padding_bytes": wasted,
        "shared_xattrs": n_shared,
        "data_blocks": data_blocks,
    }
    return ErofsImage(
        index, src, bytes(meta), meta_blocks, chunk_blocks, meta_blocks + data_blocks, ROOT_NID, nids, owner, stats
    )


def _volume_uuid(src: IndexData) -> bytes:
    """A volume uuid that depends on the image only: its inode count and chunk digests."""
    h = hashlib.sha256(b"turbofs-erofs\0" + src.n_inodes.to_bytes(8, "little"))
    for chunk in src.chunks:
        h.update(chunk.digest)
    return h.digest()[:16]


__all__ = ["ROOT_NID", "WRITER_VERSION", "ErofsImage", "Extent", "IndexData", "build_erofs", "decode_index"]
