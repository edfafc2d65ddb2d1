"""Independent checks of generated erofs metadata, before any kernel sees it.

:func:`check_erofs` parses the metadata bytes of an :class:`~turbofs.erofs.writer.ErofsImage`
from the superblock down, sharing nothing with the writer but the format constants, and
raises :class:`~turbofs.erofs.errors.ErofsCorrupt` at the first problem:

* structure: the superblock's fields, every inode reachable from the root (bounds, inode
  version, data layout, xattr ibody and entries, shared xattr ids), every directory block
  (entry count, name offsets, names sorted and valid, ``.`` and ``..`` right, file types
  matching the inodes they name, no directory reached twice), inline data that stays in
  its block, block addresses inside the metadata (directories, symlinks) or the data
  region (files), chunk maps of the right length;
* meaning (``deep``): every directory lists exactly the index's names, every inode has the
  index's attributes (type, mode, owner, mtime in ns, nlink, size, device, xattrs, symlink
  target), hardlinks share an inode exactly when they do in the index, and every block
  address of a file is where the data region holds that piece's chunk.

A failure here is a bug in the writer or a corrupted image in memory; the daemon refuses to
mount erofs metadata that does not pass.
"""

from __future__ import annotations

import itertools
import stat
import struct
from dataclasses import dataclass

from turbofs import format as fmt
from turbofs.erofs import ondisk as d
from turbofs.erofs.errors import ErofsCorrupt
from turbofs.erofs.writer import ErofsImage
from turbofs.errors import FormatError

_KNOWN_LAYOUTS = frozenset({d.LAYOUT_FLAT_PLAIN, d.LAYOUT_FLAT_INLINE, d.LAYOUT_CHUNK_BASED})


@dataclass(slots=True)
class _Inode:
    nid: int
    mode: int
    layout: int
    size: int
    i_u: int
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    data_pos: int  # first byte after the xattr ibody
    xattrs: dict[bytes, bytes]


class _Checker:
    def __init__(self, image: ErofsImage) -> None:
        self.img = image
        self.meta = image.meta
        self.meta_size = len(image.meta)
        self.inode_end = self.meta_size  # narrowed to the first non-inode block below
        self.xattr_base = 0
        self.xattr_blocks_end = 0

    def fail(self, msg: str) -> ErofsCorrupt:
        return ErofsCorrupt(f"erofs metadata check failed: {msg}")

    # -- superblock and regions

    def superblock(self) -> int:
        img = self.img
        if self.meta_size != img.meta_blocks * d.BLOCK_SIZE or img.meta_blocks < 1:
            raise self.fail(f"{self.meta_size} metadata bytes for {img.meta_blocks} blocks")
        (magic, _csum, _compat, blkbits, extslots, root_nid, _inos, _bt, _btn, blocks, meta_blkaddr,
         xattr_blkaddr, _uuid, _vol, incompat, _u1, extra_devices, _devt, dirblkbits, prefix_count,
         _prefix_start, _packed, _filter) = d.SUPER.unpack_from(self.meta, d.SUPER_OFFSET)
        if magic != d.MAGIC:
            raise self.fail(f"bad magic {magic:#x}")
        if blkbits != d.BLOCK_BITS or extslots or dirblkbits or extra_devices or prefix_count:
            raise self.fail("unexpected block size, superblock extension, devices or xattr prefixes")
        if incompat & ~d.FEATURE_INCOMPAT_CHUNKED_FILE:
            raise self.fail(f"unexpected incompatible features {incompat:#x}")
        if meta_blkaddr != 0:
            raise self.fail(f"metadata starts at block {meta_blkaddr}, not 0")
        if blocks != img.total_blocks or blocks < img.meta_blocks or blocks >= d.NULL_ADDR:
            raise self.fail(f"superblock says {blocks} blocks, the image has {img.total_blocks}")
        if root_nid != img.root_nid or root_nid * d.SLOT < d.SUPER_OFFSET + d.SUPER.size:
            raise self.fail(f"root nid {root_nid} overlaps the superblock or disagrees with {img.root_nid}")
        if xattr_blkaddr:
            if not 0 < xattr_blkaddr < img.meta_blocks:
                raise self.fail(f"shared xattrs at block {xattr_blkaddr}, outside the metadata")
            self.xattr_base = xattr_blkaddr * d.BLOCK_SIZE
        # data region: chunks back to back from the end of the metadata
        expect = img.meta_blocks
        chunks = img.data.chunks
        if len(img.chunk_blocks) != len(chunks) or len(chunks) != img.index.n_chunks:
            raise self.fail(f"{len(img.chunk_blocks)} chunk addresses for {len(chunks)} chunks")
        for cid, start in enumerate(img.chunk_blocks):
            if start != expect:
                raise self.fail(f"chunk {cid} at block {start}, expected {expect}")
            expect += d.blocks_of(chunks[cid].ulen)
        if expect != img.total_blocks:
            raise self.fail(f"the data region ends at block {expect}, the image at {img.total_blocks}")
        return int(root_nid)

    # -- inodes

    def inode(self, nid: int) -> _Inode:
        pos = nid * d.SLOT
        if not d.SUPER_OFFSET + d.SUPER.size <= pos or pos + d.INODE_EXT_SIZE > self.meta_size:
            raise self.fail(f"nid {nid} outside the metadata")
        (i_format, icount, mode, _r, size, i_u, _ino, uid, gid, mtime, nsec, nlink) = d.INODE_EXT.unpack_from(self.meta, pos)
        if i_format & 1 != d.INODE_EXTENDED or i_format >> 4:
            raise self.fail(f"nid {nid}: inode format {i_format:#x}")
        layout = (i_format >> 1) & 0x7
        if layout not in _KNOWN_LAYOUTS:
            raise self.fail(f"nid {nid}: data layout {layout}")
        if stat.S_IFMT(mode) not in d.FILE_TYPE:
            raise self.fail(f"nid {nid}: mode {mode:#o}")
        if nsec >= 1_000_000_000:
            raise self.fail(f"nid {nid}: {nsec} ns")
        xpos = pos + d.INODE_EXT_SIZE
        xsize = d.ibody_size(icount)
        if xpos + xsize > self.meta_size:
            raise self.fail(f"nid {nid}: xattrs run past the metadata")
        xattrs = self.xattrs(nid, xpos, xsize) if xsize else {}
        return _Inode(nid, mode, layout, size, i_u, uid, gid, mtime * 1_000_000_000 + nsec, nlink, xpos + xsize, xattrs)

    def xattr_entry(self, nid: int, pos: int, end: int) -> tuple[bytes, bytes, int]:
        if pos + d.XATTR_ENTRY.size > end:
            raise self.fail(f"nid {nid}: xattr entry header past its area")
        name_len, index, value_len = d.XATTR_ENTRY.unpack_from(self.meta, pos)
        prefix = d.XATTR_PREFIX_OF.get(index)
        if prefix is None:
            raise self.fail(f"nid {nid}: xattr name index {index}")
        size = d.xattr_entry_size(name_len, value_len)
        if pos + size > end:
            raise self.fail(f"nid {nid}: xattr entry runs past its area")
        body = pos + d.XATTR_ENTRY.size
        suffix = self.meta[body : body + name_len]
        if prefix.endswith(b".") != bool(suffix):
            raise self.fail(f"nid {nid}: xattr name {prefix + suffix!r}")
        return prefix + suffix, self.meta[body + name_len : body + name_len + value_len], size

    def xattrs(self, nid: int, pos: int, size: int) -> dict[bytes, bytes]:
        end = pos + size
        _filter, shared = d.XATTR_IBODY_HEADER.unpack_from(self.meta, pos)
        p = pos + d.XATTR_IBODY_HEADER.size
        if p + 4 * shared > end:
            raise self.fail(f"nid {nid}: {shared} shared xattr ids do not fit the ibody")
        out: dict[bytes, bytes] = {}
        for _ in range(shared):
            (sid,) = d.U32.unpack_from(self.meta, p)
            p += 4
            spos = self.xattr_base + 4 * sid
            if not self.xattr_base or spos >= self.meta_size:
                raise self.fail(f"nid {nid}: shared xattr id {sid} outside the shared area")
            name, value, _ = self.xattr_entry(nid, spos, self.meta_size)
            if name in out:
                raise self.fail(f"nid {nid}: xattr {name!r} twice")
            out[name] = value
        while p < end:
            name, value, step = self.xattr_entry(nid, p, end)
            if name in out:
                raise self.fail(f"nid {nid}: xattr {name!r} twice")
            out[name] = value
            p += step
        return out

    # -- data

    def flat_data(self, node: _Inode, *, in_meta: bool) -> list[tuple[int, int]]:
        """(absolute position, length) pieces of a flat inode's data."""
        nblocks = d.blocks_of(node.size)
        inline = node.layout == d.LAYOUT_FLAT_INLINE
        if node.layout == d.LAYOUT_CHUNK_BASED:
            raise self.fail(f"nid {node.nid}: chunk-based layout on a {stat.S_IFMT(node.mode):#o} inode")
        whole = nblocks - 1 if inline else nblocks
        pieces: list[tuple[int, int]] = []
        if whole:
            limit = self.img.meta_blocks if in_meta else self.img.total_blocks
            low = 0 if in_meta else self.img.meta_blocks
            if not low <= node.i_u or node.i_u + whole > limit or (in_meta and node.i_u * d.BLOCK_SIZE < node.data_pos):
                raise self.fail(f"nid {node.nid}: blocks [{node.i_u}, +{whole}) outside their region")
            pieces.append((node.i_u * d.BLOCK_SIZE, min(node.size, whole * d.BLOCK_SIZE)))
        if inline:
            tail = node.size - whole * d.BLOCK_SIZE
            if tail <= 0 or node.data_pos % d.BLOCK_SIZE + tail > d.BLOCK_SIZE:
                raise self.fail(f"nid {node.nid}: inline data of {tail} bytes crosses a block boundary")
            pieces.append((node.data_pos, tail))
        return pieces

    def read(self, pieces: list[tuple[int, int]]) -> bytes:
        return b"".join(self.meta[p : p + n] for p, n in pieces)

    def chunk_map(self, node: _Inode) -> list[int]:
        """A chunk-based file's block addresses, one per chunk."""
        fmt_bits = node.i_u & 0xFFFF
        if fmt_bits & ~d.CHUNK_FORMAT_BLKBITS_MASK:
            raise self.fail(f"nid {node.nid}: chunk format {fmt_bits:#x}")
        chunk_bytes = d.BLOCK_SIZE << (fmt_bits & d.CHUNK_FORMAT_BLKBITS_MASK)
        count = -(-node.size // chunk_bytes)
        pos = node.data_pos
        if pos % 4 or pos + 4 * count > self.meta_size:
            raise self.fail(f"nid {node.nid}: chunk map of {count} entries runs past the metadata")
        addrs = [a for (a,) in d.U32.iter_unpack(self.meta[pos : pos + 4 * count])]
        for k, addr in enumerate(addrs):
            if addr == d.NULL_ADDR:
                continue
            span = d.blocks_of(min(chunk_bytes, node.size - k * chunk_bytes))
            if addr < self.img.meta_blocks or addr + span > self.img.total_blocks:
                raise self.fail(f"nid {node.nid}: chunk {k} at block {addr} outside the data region")
        return addrs

    def directory(self, node: _Inode) -> list[tuple[bytes, int, int]]:
        """(name, nid, file type) of every entry, checked block by block."""
        if node.size <= 0:
            raise self.fail(f"directory nid {node.nid} is empty")
        data = self.read(self.flat_data(node, in_meta=True))
        out: list[tuple[bytes, int, int]] = []
        for start in range(0, len(data), d.BLOCK_SIZE):
            block = data[start : start + d.BLOCK_SIZE]
            (_, first, _) = d.DIRENT.unpack_from(block, 0)
            if first < d.DIRENT.size or first % d.DIRENT.size or first >= len(block):
                raise self.fail(f"directory nid {node.nid}: first name offset {first}")
            count = first // d.DIRENT.size
            heads = [d.DIRENT.unpack_from(block, i * d.DIRENT.size) for i in range(count)]
            for i, (nid, off, ftype) in enumerate(heads):
                end = heads[i + 1][1] if i + 1 < count else len(block)
                if i + 1 == count:
                    nul = block.find(b"\0", off)
                    end = nul if nul >= 0 else end
                if not first <= off < end <= len(block):
                    raise self.fail(f"directory nid {node.nid}: name offsets {off}..{end}")
                name = block[off:end]
                if len(name) > d.NAME_LEN or b"/" in name or b"\0" in name:
                    raise self.fail(f"directory nid {node.nid}: bad name {name!r}")
                out.append((name, nid, ftype))
        names = [n for n, _, _ in out]
        if any(a >= b for a, b in itertools.pairwise(names)):
            raise self.fail(f"directory nid {node.nid}: names not sorted and unique")
        return out

    # -- the walk

    def run(self, deep: bool) -> None:
        root_nid = self.superblock()
        data = self.img.data
        if len(data.inodes) != self.img.index.n_inodes:
            raise self.fail(f"built from {len(data.inodes)} inodes, the index has {self.img.index.n_inodes}")
        seen_dirs: set[int] = set()
        nid_of: dict[int, int] = {}  # index ino -> nid
        ino_of: dict[int, int] = {}  # nid -> index ino
        root = self.inode(root_nid)
        stack: list[tuple[_Inode, int, int]] = [(root, root_nid, fmt.ROOT_INO)]
        if deep:
            self.compare(root, fmt.ROOT_INO)
            nid_of[fmt.ROOT_INO] = root_nid
            ino_of[root_nid] = fmt.ROOT_INO
        while stack:
            node, parent, ino = stack.pop()
            nid = node.nid
            if nid in seen_dirs:
                raise self.fail(f"directory nid {nid} reached twice")
            seen_dirs.add(nid)
            if not stat.S_ISDIR(node.mode):
                raise self.fail(f"nid {nid} is not a directory")
            entries = self.directory(node)
            if deep:
                want = dict(data.entries[ino])
                want[b"."] = ino
                want[b".."] = data.inodes[ino].parent
                if sorted(want) != [n for n, _, _ in entries]:
                    raise self.fail(f"directory nid {nid} lists other names than index inode {ino}")
            for name, child_nid, ftype in entries:
                if name in (b".", b".."):
                    if child_nid != (nid if name == b"." else parent) or ftype != d.FT_DIR:
                        raise self.fail(f"directory nid {nid}: {name!r} names nid {child_nid}")
                    continue
                child = self.inode(child_nid)
                if d.FILE_TYPE[stat.S_IFMT(child.mode)] != ftype:
                    raise self.fail(f"directory nid {nid}: {name!r} has file type {ftype}, its inode {child.mode:#o}")
                child_ino = -1
                if deep:
                    child_ino = want[name]
                    if nid_of.setdefault(child_ino, child_nid) != child_nid or ino_of.setdefault(child_nid, child_ino) != child_ino:
                        raise self.fail(f"{name!r} in directory nid {nid}: hardlinks differ from the index")
                if stat.S_ISDIR(child.mode):
                    stack.append((child, nid, child_ino))
                else:
                    self.leaf(child)
                if deep:
                    self.compare(child, child_ino)
        if deep and len(ino_of) != len(data.inodes):
            raise self.fail(f"{len(ino_of)} inodes reachable from the root, the index has {len(data.inodes)}")

    def leaf(self, node: _Inode) -> None:
        fmt_type = stat.S_IFMT(node.mode)
        if fmt_type == stat.S_IFLNK:
            if not 0 < node.size <= d.SYMLINK_MAX:
                raise self.fail(f"symlink nid {node.nid} of {node.size} bytes")
            self.flat_data(node, in_meta=True)
        elif fmt_type == stat.S_IFREG:
            if node.layout == d.LAYOUT_CHUNK_BASED:
                self.chunk_map(node)
            elif node.layout == d.LAYOUT_FLAT_INLINE:
                raise self.fail(f"file nid {node.nid} has inline data")
            elif node.size:
                self.flat_data(node, in_meta=False)
        elif node.layout != d.LAYOUT_FLAT_PLAIN or node.size:
            raise self.fail(f"special file nid {node.nid}: layout {node.layout}, size {node.size}")

    def compare(self, node: _Inode, ino: int) -> None:
        data = self.img.data
        want = data.inodes[ino]
        got = (node.mode, node.uid, node.gid, node.mtime_ns, node.nlink)
        if got != (want.mode, want.uid, want.gid, want.mtime_ns, want.nlink):
            raise self.fail(f"nid {node.nid}: attributes {got} differ from index inode {ino}")
        if node.xattrs != data.xattrs[ino]:
            raise self.fail(f"nid {node.nid}: xattrs differ from index inode {ino}")
        fmt_type = stat.S_IFMT(node.mode)
        if fmt_type in (stat.S_IFCHR, stat.S_IFBLK) and d.decode_dev(node.i_u) != want.rdev:
            raise self.fail(f"nid {node.nid}: device {d.decode_dev(node.i_u)} instead of {want.rdev}")
        if fmt_type == stat.S_IFLNK and self.read(self.flat_data(node, in_meta=True)) != data.targets[ino]:
            raise self.fail(f"nid {node.nid}: symlink target differs from index inode {ino}")
        if fmt_type != stat.S_IFREG:
            return
        if node.size != want.size:
            raise self.fail(f"nid {node.nid}: size {node.size} instead of {want.size}")
        if not node.size:
            return
        cs = data.chunk_size
        chunks = data.chunks
        refs = data.refs[ino]
        if len(refs) != -(-node.size // cs):
            raise self.fail(f"index inode {ino}: {len(refs)} pieces for {node.size} bytes")
        expect = []
        for k, (cid, off) in enumerate(refs):
            if cid == fmt.HOLE:
                expect.append(d.NULL_ADDR)
                continue
            # the piece lies inside its chunk's blocks, so no read reaches the next chunk
            if cid >= len(chunks) or off % d.BLOCK_SIZE or off + min(cs, node.size - k * cs) > chunks[cid].ulen:
                raise self.fail(f"index inode {ino}: piece {k} does not fit chunk {cid}")
            expect.append(self.img.chunk_blocks[cid] + off // d.BLOCK_SIZE)
        if node.layout == d.LAYOUT_CHUNK_BASED:
            addrs = self.chunk_map(node)
            chunk_bytes = d.BLOCK_SIZE << (node.i_u & d.CHUNK_FORMAT_BLKBITS_MASK)
            if len(expect) > 1 and chunk_bytes != cs:
                raise self.fail(f"nid {node.nid}: chunks of {chunk_bytes} bytes, the index cuts at {cs}")
            if chunk_bytes < min(cs, node.size) or addrs != expect:
                raise self.fail(f"nid {node.nid}: chunk map differs from index inode {ino}")
        else:
            step = cs // d.BLOCK_SIZE
            if expect != [node.i_u + k * step for k in range(len(expect))]:
                raise self.fail(f"nid {node.nid}: flat data at block {node.i_u} is not where index inode {ino} lies")


def check_erofs(image: ErofsImage, *, deep: bool = True) -> None:
    """Parse ``image``'s metadata and check it (and, if ``deep``, that it says what its index
    says); raise ErofsCorrupt at the first problem."""
    try:
        _Checker(image).run(deep)
    except ErofsCorrupt:
        raise
    except (struct.error, IndexError, KeyError, ValueError, FormatError) as exc:
        raise ErofsCorrupt(f"erofs metadata check failed: {type(exc).__name__}: {exc}") from exc


__all__ = ["check_erofs"]
