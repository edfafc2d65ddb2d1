"""Build erofs metadata for a turbo index, with file data pointing into the turbo chunks.

:func:`build_erofs` lays out one virtual image file::

    block 0 ..       superblock (at 1024), then every inode (root first, index order):
                     64-byte extended inode | xattr ibody | block map or inline tail
    ..               directory blocks, symlink targets too long to inline, shared xattrs
    data region      every chunk of the index, in chunk id order, each at a block-aligned
                     address, zero-padded to a whole block (holes take no room)

No chunk is re-encoded: because every file's data starts 4 KiB-aligned inside its
uncompressed chunk and large files are cut at fixed power-of-two offsets
(``docs/format.md``), file piece *k* of a large file is exactly the block range of its chunk,
and a packed small file is the blocks of its chunk from ``offset / 4096`` on. So:

* a regular file with one piece (or pieces that lie back to back) is a flat file whose
  data starts at that block;
* any other regular file is chunk-based with ``chunk size = turbo chunk size`` and a 4-byte
  block address per piece (``NULL_ADDR`` for a hole);
* directories and symlinks keep their last partial block inline after the inode when it
  fits in the inode's block, and in a block of their own otherwise;
* devices carry their number in the inode; xattrs used by two or more inodes are shared,
  the others are inline.

:class:`ErofsImage` holds the metadata bytes (in memory) and maps any byte range of the
virtual file to metadata bytes, chunk slices and zeros (:meth:`ErofsImage.read`), which is
all the FUSE layer needs to serve it.
"""

from __future__ import annotations

import bisect
import hashlib
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from turbofs import format as fmt
from turbofs.erofs import ondisk as d
from turbofs.erofs.errors import ErofsUnsupported

#: The slot of the root inode: right after the superblock, so its nid fits the 16-bit field.
ROOT_NID: Final = (d.SUPER_OFFSET + d.SUPER.size) // d.SLOT
#: A shared xattr is worth it only if this many inodes carry it.
SHARE_MIN_USERS: Final = 2
#: The most shared xattrs one inode may name (an 8-bit count).
MAX_SHARED_PER_INODE: Final = 255
VOLUME_NAME: Final = b"turbofs"


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
    """What the erofs image is built from, read from the index once (the writer builds from
    it and the checker compares against it)."""

    inodes: list[fmt.Inode]
    xattrs: list[dict[bytes, bytes]]
    entries: dict[int, list[tuple[bytes, int]]]  # directories: listdir
    refs: dict[int, list[tuple[int, int]]]  # regular files with data: file_refs
    targets: dict[int, bytes]  # symlinks
    chunks: list[fmt.Chunk]
    chunk_size: int


def decode_index(index: fmt.Index) -> IndexData:
    inodes = [index.inode(i) for i in range(index.n_inodes)]
    entries: dict[int, list[tuple[bytes, int]]] = {}
    refs: dict[int, list[tuple[int, int]]] = {}
    targets: dict[int, bytes] = {}
    for node in inodes:
        if node.is_dir:
            entries[node.ino] = index.listdir(node.ino)
        elif node.is_reg:
            if node.size:
                refs[node.ino] = index.file_refs(node.ino)
        elif node.is_symlink:
            targets[node.ino] = index.readlink(node.ino)
    xattrs = [index.xattrs(i) for i in range(index.n_inodes)]
    return IndexData(inodes, xattrs, entries, refs, targets, list(index.chunks()), index.chunk_size)


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

    @property
    def size(self) -> int:
        return self.total_blocks * d.BLOCK_SIZE

    @property
    def meta_size(self) -> int:
        return self.meta_blocks * d.BLOCK_SIZE

    def drop_source(self) -> None:
        """Forget the decoded index data but the chunk table (reads need no more; checks do)."""
        d_ = self.data
        self.data = IndexData([], [], {}, {}, {}, d_.chunks, d_.chunk_size)

    def owner(self, chunk_id: int) -> int | None:
        """A regular file whose data lies in chunk ``chunk_id`` (for messages), or None."""
        ino = self.chunk_owner[chunk_id] if 0 <= chunk_id < len(self.chunk_owner) else -1
        return ino if ino >= 0 else None

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


@dataclass(slots=True)
class _Node:
    ino: int
    mode: int
    layout: int = d.LAYOUT_FLAT_PLAIN
    pos: int = 0  # byte position of the inode core
    xattr_size: int = 0
    shared: list[int] = field(default_factory=list)  # shared xattr ids
    inline: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (index, suffix, value)
    extra: int = 0  # bytes after the xattrs: block map or inline tail
    i_u: int = 0
    size: int = 0
    tail: bytes = b""  # inline tail (symlinks; directories fill theirs in later)
    blocks: int = 0  # whole blocks outside the inode (dirs, long symlinks)
    first_block: int = 0
    block_map: list[int] | None = None  # chunk-based files: block per piece (or NULL_ADDR)


def _dir_blocks(entries: list[tuple[bytes, int]]) -> list[list[tuple[bytes, int]]]:
    """Directory entries cut into blocks (each: dirents, then names; sorted throughout)."""
    blocks: list[list[tuple[bytes, int]]] = [[]]
    used = 0
    for name, child in entries:
        cost = d.DIRENT.size + len(name)
        if used + cost > d.BLOCK_SIZE:
            blocks.append([])
            used = 0
        blocks[-1].append((name, child))
        used += cost
    return blocks


def _block_bytes(entries: list[tuple[bytes, int]]) -> int:
    return sum(d.DIRENT.size + len(name) for name, _ in entries)


def _xattr_key(name: bytes) -> tuple[int, bytes]:
    split = d.split_xattr_name(name)
    if split is None:
        raise ErofsUnsupported(f"xattr {name!r} has no erofs name prefix")
    index, suffix = split
    if len(suffix) > d.NAME_LEN:
        raise ErofsUnsupported(f"xattr name {name!r} is longer than {d.NAME_LEN} bytes after its prefix")
    return index, suffix


def _xattr_entry(index: int, suffix: bytes, value: bytes) -> bytes:
    raw = d.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(d.align(len(raw), 4) - len(raw))


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


def build_erofs(index: fmt.Index, *, volume_name: bytes = VOLUME_NAME) -> ErofsImage:
    """Build the erofs metadata of ``index`` (raises ErofsUnsupported for what erofs cannot hold)."""
    src = decode_index(index)
    n = len(src.inodes)
    cs = src.chunk_size
    cs_blocks = cs // d.BLOCK_SIZE
    chunk_bits = cs.bit_length() - 1 - d.BLOCK_BITS
    inodes = src.inodes

    # chunk placement inside the data region (relative; shifted once the metadata is sized)
    rel_blocks: list[int] = []
    nb = 0
    for chunk in src.chunks:
        rel_blocks.append(nb)
        nb += d.blocks_of(chunk.ulen)
    data_blocks = nb
    owner = [-1] * len(src.chunks)

    # xattrs: which (name, value) pairs are shared
    xattrs = src.xattrs
    counts: Counter[tuple[bytes, bytes]] = Counter()
    for xs in xattrs:
        for name, value in xs.items():
            if len(value) > 0xFFFF:
                raise ErofsUnsupported(f"xattr {name!r} has a value of {len(value)} bytes (at most 65535)")
            counts[(name, value)] += 1
    shared_ids: dict[tuple[bytes, bytes], int] = {}
    shared_area = bytearray()
    for (name, value), users in sorted(counts.items()):
        if users < SHARE_MIN_USERS:
            continue
        entry = _xattr_entry(*_xattr_key(name), value)
        room = d.BLOCK_SIZE - len(shared_area) % d.BLOCK_SIZE
        if len(entry) > room and len(entry) <= d.BLOCK_SIZE:
            shared_area += bytes(room)  # an entry never straddles a block when it can help it
        shared_ids[(name, value)] = len(shared_area) // 4
        shared_area += entry

    # pass 1: inode sizes and positions
    nodes: list[_Node] = []
    dir_entries: dict[int, list[list[tuple[bytes, int]]]] = {}
    pos = ROOT_NID * d.SLOT
    wasted = 0
    for ino in range(n):
        node = inodes[ino]
        nd = _Node(ino, node.mode)
        for name, value in sorted(xattrs[ino].items()) if xattrs[ino] else ():
            sid = shared_ids.get((name, value))
            if sid is not None and len(nd.shared) < MAX_SHARED_PER_INODE:
                nd.shared.append(sid)
            else:
                nd.inline.append((*_xattr_key(name), value))
        if nd.shared or nd.inline:
            nd.xattr_size = d.XATTR_IBODY_HEADER.size + 4 * len(nd.shared)
            nd.xattr_size += sum(d.xattr_entry_size(len(s), len(v)) for _, s, v in nd.inline)
            if (nd.xattr_size - d.XATTR_IBODY_HEADER.size) // 4 + 1 > 0xFFFF:
                raise ErofsUnsupported(f"inode {ino}: {nd.xattr_size} bytes of xattrs do not fit an erofs inode")
        fmt_type = stat.S_IFMT(node.mode)
        tail_len = 0
        if fmt_type == stat.S_IFDIR:
            entries = [*src.entries[ino], (b".", ino), (b"..", node.parent)]
            if max(len(name) for name, _ in entries) > d.NAME_LEN:
                raise ErofsUnsupported(f"inode {ino}: a name longer than {d.NAME_LEN} bytes")
            entries.sort()
            blocks = _dir_blocks(entries)
            dir_entries[ino] = blocks
            nd.size = (len(blocks) - 1) * d.BLOCK_SIZE + _block_bytes(blocks[-1])
            tail_len = _block_bytes(blocks[-1])
            nd.blocks = len(blocks) - 1
        elif fmt_type == stat.S_IFLNK:
            target = src.targets[ino]
            if not 0 < len(target) <= d.SYMLINK_MAX:
                raise ErofsUnsupported(f"inode {ino}: a symlink target of {len(target)} bytes")
            nd.size = len(target)
            nd.blocks = (len(target) - 1) // d.BLOCK_SIZE if target else 0
            tail_len = len(target) - nd.blocks * d.BLOCK_SIZE
            nd.tail = target
        elif fmt_type == stat.S_IFREG:
            nd.size = node.size
            if node.size:
                refs = src.refs[ino]
                for cid, _off in refs:
                    if cid != fmt.HOLE and owner[cid] < 0:
                        owner[cid] = ino
                first = _contiguous(refs, rel_blocks, cs_blocks)
                if first is not None:
                    nd.i_u = first  # relative for now
                    nd.layout = d.LAYOUT_FLAT_PLAIN
                    nd.block_map = None
                else:
                    nd.layout = d.LAYOUT_CHUNK_BASED
                    bits = chunk_bits if node.size > cs else max(0, (node.size - 1).bit_length() - d.BLOCK_BITS)
                    if len(refs) > 1:
                        bits = chunk_bits
                    nd.i_u = bits
                    nd.block_map = [
                        d.NULL_ADDR if cid == fmt.HOLE else rel_blocks[cid] + off // d.BLOCK_SIZE for cid, off in refs
                    ]
                    nd.extra = 4 * len(refs)
        elif fmt_type in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = node.rdev
            if major > 0xFFF or minor > 0xFFFFF:
                raise ErofsUnsupported(f"inode {ino}: device {major}:{minor} does not fit 32 bits")
            nd.i_u = d.encode_dev(major, minor)
        # inline tail, when it fits in the block it starts in
        if fmt_type in (stat.S_IFDIR, stat.S_IFLNK) and tail_len:
            start = pos + d.INODE_EXT_SIZE + nd.xattr_size
            room = d.BLOCK_SIZE - start % d.BLOCK_SIZE
            core = d.INODE_EXT_SIZE + nd.xattr_size + tail_len
            if tail_len <= room:
                nd.layout = d.LAYOUT_FLAT_INLINE
            elif core <= d.BLOCK_SIZE and d.BLOCK_SIZE - pos % d.BLOCK_SIZE < d.BLOCK_SIZE - tail_len:
                wasted += d.align(pos, d.BLOCK_SIZE) - pos  # padding costs less than a tail block
                pos = d.align(pos, d.BLOCK_SIZE)
                nd.layout = d.LAYOUT_FLAT_INLINE
            else:
                nd.layout = d.LAYOUT_FLAT_PLAIN
                nd.blocks += 1
            if nd.layout == d.LAYOUT_FLAT_INLINE:
                nd.extra = tail_len
        nd.pos = pos
        pos = d.align(pos + d.INODE_EXT_SIZE + nd.xattr_size + nd.extra, d.SLOT)
        nodes.append(nd)

    # pass 2: blocks after the inodes
    next_block = d.blocks_of(pos)
    for nd in nodes:
        if nd.blocks:
            nd.first_block = next_block
            next_block += nd.blocks
    xattr_blkaddr = next_block if shared_area else 0
    next_block += d.blocks_of(len(shared_area))
    meta_blocks = next_block
    if meta_blocks + data_blocks >= d.NULL_ADDR:
        raise ErofsUnsupported(f"an image of {meta_blocks + data_blocks} blocks passes the 32-bit block address")
    chunk_blocks = [meta_blocks + b for b in rel_blocks]
    nids = [nd.pos // d.SLOT for nd in nodes]

    # pass 3: bytes
    meta = bytearray(meta_blocks * d.BLOCK_SIZE)
    any_chunked = False
    for nd in nodes:
        node = inodes[nd.ino]
        fmt_type = stat.S_IFMT(nd.mode)
        p = nd.pos + d.INODE_EXT_SIZE
        if nd.xattr_size:
            d.XATTR_IBODY_HEADER.pack_into(meta, p, 0, len(nd.shared))
            p += d.XATTR_IBODY_HEADER.size
            for sid in nd.shared:
                d.U32.pack_into(meta, p, sid)
                p += 4
            for index_, suffix, value in nd.inline:
                entry = _xattr_entry(index_, suffix, value)
                meta[p : p + len(entry)] = entry
                p += len(entry)
        i_u = nd.i_u
        if fmt_type == stat.S_IFDIR:
            blocks = dir_entries[nd.ino]
            raws = [_dir_block(b, nids, inodes) for b in blocks]
            for k in range(nd.blocks):
                start = (nd.first_block + k) * d.BLOCK_SIZE
                meta[start : start + len(raws[k])] = raws[k]
            if nd.layout == d.LAYOUT_FLAT_INLINE:
                meta[p : p + len(raws[-1])] = raws[-1]
            i_u = nd.first_block if nd.blocks else 0
        elif fmt_type == stat.S_IFLNK:
            if nd.layout == d.LAYOUT_FLAT_INLINE:
                whole = nd.blocks * d.BLOCK_SIZE
                start = nd.first_block * d.BLOCK_SIZE
                meta[start : start + whole] = nd.tail[:whole]
                meta[p : p + len(nd.tail) - whole] = nd.tail[whole:]
            else:
                start = nd.first_block * d.BLOCK_SIZE
                meta[start : start + len(nd.tail)] = nd.tail
            i_u = nd.first_block if nd.blocks else 0
        elif fmt_type == stat.S_IFREG:
            if nd.layout == d.LAYOUT_CHUNK_BASED:
                any_chunked = True
                assert nd.block_map is not None
                for addr in nd.block_map:
                    d.U32.pack_into(meta, p, addr if addr == d.NULL_ADDR else addr + meta_blocks)
                    p += 4
            elif nd.size:
                i_u = nd.i_u + meta_blocks
        icount = 0 if not nd.xattr_size else (nd.xattr_size - d.XATTR_IBODY_HEADER.size) // 4 + 1
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        d.INODE_EXT.pack_into(
            meta, nd.pos,
            d.INODE_EXTENDED | (nd.layout << 1), icount, nd.mode, 0, nd.size, i_u,
            nd.ino + 1, node.uid, node.gid, sec, nsec, node.nlink,
        )
    if shared_area:
        start = xattr_blkaddr * d.BLOCK_SIZE
        meta[start : start + len(shared_area)] = shared_area

    uuid = _volume_uuid(src)
    d.SUPER.pack_into(
        meta, d.SUPER_OFFSET,
        d.MAGIC, 0, 0, d.BLOCK_BITS, 0, ROOT_NID, n, 0, 0, meta_blocks + data_blocks, 0, xattr_blkaddr,
        uuid, volume_name[:16].ljust(16, b"\0"),
        d.FEATURE_INCOMPAT_CHUNKED_FILE if any_chunked else 0, 0, 0, 0, 0, 0, 0, 0, 0,
    )
    stats = {
        "inodes": n,
        "meta_bytes": len(meta),
        "inode_bytes": pos - ROOT_NID * d.SLOT,
        "padding_bytes": wasted,
        "shared_xattrs": len(shared_ids),
        "data_blocks": data_blocks,
    }
    return ErofsImage(
        index, src, bytes(meta), meta_blocks, chunk_blocks, meta_blocks + data_blocks, ROOT_NID, nids, owner, stats
    )


def _volume_uuid(src: IndexData) -> bytes:
    """A volume uuid that depends on the image only: its inode count and chunk digests."""
    h = hashlib.sha256(b"turbofs-erofs\0" + len(src.inodes).to_bytes(8, "little"))
    for chunk in src.chunks:
        h.update(chunk.digest)
    return h.digest()[:16]


def _dir_block(entries: list[tuple[bytes, int]], nids: list[int], inodes: list[fmt.Inode]) -> bytes:
    nameoff = d.DIRENT.size * len(entries)
    heads = bytearray()
    names = bytearray()
    for name, child in entries:
        heads += d.DIRENT.pack(nids[child], nameoff + len(names), d.FILE_TYPE[stat.S_IFMT(inodes[child].mode)])
        names += name
    return bytes(heads + names)


__all__ = ["ROOT_NID", "ErofsImage", "Extent", "IndexData", "build_erofs", "decode_index"]
