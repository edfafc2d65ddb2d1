"""Independent checks of generated erofs metadata, before any kernel sees it.

:func:`check_erofs` parses the metadata of an :class:`~turbofs.erofs.writer.ErofsImage` from
the superblock down, sharing nothing with the writer but the format constants and the
decoded index, and raises :class:`~turbofs.erofs.errors.ErofsCorrupt` at the first problem:

* structure: superblock, every inode reachable from the root, directory blocks (sorted valid
  names, ``.``/``..``, file types, no directory twice), inline data within its block, block
  addresses inside the metadata or data region, chunk map lengths;
* meaning: every directory lists exactly the index's names, every inode has the index's
  attributes, hardlinks share an inode exactly as in the index, and every file block address
  is where the data region holds that piece's chunk.

The daemon refuses to mount metadata that fails (a writer bug, or a corrupted cache). It runs
at mount time, so it works on whole columns where it can.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Sequence
from itertools import compress, repeat
from operator import itemgetter

from turbofs.core import format as fmt
from turbofs.core.errors import FormatError
from turbofs.erofs import ondisk as d
from turbofs.erofs.errors import ErofsCorrupt
from turbofs.erofs.writer import ErofsImage

_KNOWN_FORMATS = frozenset({d.FORMAT_PLAIN, d.FORMAT_INLINE, d.FORMAT_CHUNKED})
_SUPER_END = d.SUPER_OFFSET + d.SUPER.size
# fields of an unpacked extended inode core
_FORMAT, _ICOUNT, _MODE, _SIZE, _IU, _UID, _GID, _MTIME, _NSEC, _NLINK = 0, 1, 2, 4, 5, 7, 8, 9, 10, 11


def _first_diff(a: Sequence[object], b: Sequence[object]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class _Checker:
    def __init__(self, image: ErofsImage) -> None:
        self.img = image
        self.meta = image.meta
        self.meta_size = len(image.meta)
        self.xattr_base = 0

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
        if root_nid != img.root_nid or root_nid * d.SLOT < _SUPER_END:
            raise self.fail(f"root nid {root_nid} overlaps the superblock or disagrees with {img.root_nid}")
        if xattr_blkaddr:
            if not 0 < xattr_blkaddr < img.meta_blocks:
                raise self.fail(f"shared xattrs at block {xattr_blkaddr}, outside the metadata")
            self.xattr_base = xattr_blkaddr * d.BLOCK_SIZE
        self.chunked_ok = bool(incompat & d.FEATURE_INCOMPAT_CHUNKED_FILE)
        # data region: chunks back to back from the end of the metadata
        chunks = img.data.chunks
        if len(img.chunk_blocks) != len(chunks) or len(chunks) != img.index.n_chunks:
            raise self.fail(f"{len(img.chunk_blocks)} chunk addresses for {len(chunks)} chunks")
        expect = [img.meta_blocks]
        for c in chunks:
            expect.append(expect[-1] + d.blocks_of(c.ulen))
        end = expect.pop()
        if img.chunk_blocks != expect:
            cid = _first_diff(img.chunk_blocks, expect)
            raise self.fail(f"chunk {cid} at block {img.chunk_blocks[cid]}, expected {expect[cid]}")
        if end != img.total_blocks:
            raise self.fail(f"the data region ends at block {end}, the image at {img.total_blocks}")
        return int(root_nid)

    # -- one inode at a time: xattrs, flat data, chunk maps, directories

    def core(self, nid: int) -> tuple[int, ...]:
        pos = nid * d.SLOT
        if pos < _SUPER_END or pos + d.INODE_EXT_SIZE > self.meta_size:
            raise self.fail(f"nid {nid} outside the metadata")
        return d.INODE_EXT.unpack_from(self.meta, pos)

    def data_pos(self, nid: int, icount: int) -> int:
        """The first byte after an inode's xattr ibody (bounds checked)."""
        end = nid * d.SLOT + d.INODE_EXT_SIZE + d.ibody_size(icount)
        if end > self.meta_size:
            raise self.fail(f"nid {nid}: xattrs run past the metadata")
        return end

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

    def xattrs(self, nid: int, icount: int) -> dict[bytes, bytes]:
        pos = nid * d.SLOT + d.INODE_EXT_SIZE
        end = self.data_pos(nid, icount)
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

    def flat_data(self, nid: int, core: tuple[int, ...], *, in_meta: bool) -> list[tuple[int, int]]:
        """(absolute position, length) pieces of a flat inode's data."""
        fw, size, i_u = core[_FORMAT], core[_SIZE], core[_IU]
        if fw not in (d.FORMAT_PLAIN, d.FORMAT_INLINE):
            raise self.fail(f"nid {nid}: layout {(fw >> 1) & 7} for a {stat.S_IFMT(core[_MODE]):#o} inode")
        data_pos = self.data_pos(nid, core[_ICOUNT])
        nblocks = d.blocks_of(size)
        inline = fw == d.FORMAT_INLINE
        whole = nblocks - 1 if inline else nblocks
        pieces: list[tuple[int, int]] = []
        if whole:
            limit = self.img.meta_blocks if in_meta else self.img.total_blocks
            low = 0 if in_meta else self.img.meta_blocks
            if not low <= i_u or i_u + whole > limit or (in_meta and i_u * d.BLOCK_SIZE < data_pos):
                raise self.fail(f"nid {nid}: blocks [{i_u}, +{whole}) outside their region")
            pieces.append((i_u * d.BLOCK_SIZE, min(size, whole * d.BLOCK_SIZE)))
        if inline:
            tail = size - whole * d.BLOCK_SIZE
            if tail <= 0 or data_pos % d.BLOCK_SIZE + tail > d.BLOCK_SIZE:
                raise self.fail(f"nid {nid}: inline data of {tail} bytes crosses a block boundary")
            pieces.append((data_pos, tail))
        return pieces

    def read(self, pieces: list[tuple[int, int]]) -> bytes:
        return b"".join(self.meta[p : p + n] for p, n in pieces)

    def chunk_map(self, nid: int, core: tuple[int, ...]) -> tuple[list[int], int]:
        """A chunk-based file's block addresses, one per chunk, and its chunk size."""
        size, i_u = core[_SIZE], core[_IU]
        if not self.chunked_ok:
            raise self.fail(f"nid {nid}: a chunk-based file without the chunked-file feature")
        fmt_bits = i_u & 0xFFFF
        if fmt_bits & ~d.CHUNK_FORMAT_BLKBITS_MASK or i_u >> 16:
            raise self.fail(f"nid {nid}: chunk format {i_u:#x}")
        chunk_bytes = d.BLOCK_SIZE << (fmt_bits & d.CHUNK_FORMAT_BLKBITS_MASK)
        count = -(-size // chunk_bytes)
        pos = self.data_pos(nid, core[_ICOUNT])
        if pos % 4 or pos + 4 * count > self.meta_size:
            raise self.fail(f"nid {nid}: chunk map of {count} entries runs past the metadata")
        addrs = [a for (a,) in d.U32.iter_unpack(self.meta[pos : pos + 4 * count])]
        for k, addr in enumerate(addrs):
            if addr == d.NULL_ADDR:
                continue
            span = d.blocks_of(min(chunk_bytes, size - k * chunk_bytes))
            if addr < self.img.meta_blocks or addr + span > self.img.total_blocks:
                raise self.fail(f"nid {nid}: chunk {k} at block {addr} outside the data region")
        return addrs, chunk_bytes

    def directory(self, nid: int, core: tuple[int, ...]) -> tuple[list[bytes], list[int], list[int]]:
        """Names, nids and file types of a directory's entries, checked block by block."""
        if core[_SIZE] <= 0:
            raise self.fail(f"directory nid {nid} is empty")
        data = self.read(self.flat_data(nid, core, in_meta=True))
        names: list[bytes] = []
        nids: list[int] = []
        ftypes: list[int] = []
        for start in range(0, len(data), d.BLOCK_SIZE):
            block = data[start : start + d.BLOCK_SIZE]
            if len(block) < d.DIRENT.size:
                raise self.fail(f"directory nid {nid}: a block of {len(block)} bytes")
            first = d.DIRENT.unpack_from(block, 0)[1]
            if first < d.DIRENT.size or first % d.DIRENT.size or first >= len(block):
                raise self.fail(f"directory nid {nid}: first name offset {first}")
            heads = list(d.DIRENT.iter_unpack(block[:first]))
            offs = list(map(itemgetter(1), heads))
            nul = block.find(b"\0", offs[-1])
            ends = [*offs[1:], nul if nul >= 0 else len(block)]
            if offs[0] != first or not all(map(int.__lt__, offs, ends)):  # names back to back, none empty
                raise self.fail(f"directory nid {nid}: name offsets {offs} out of order")
            block_names = list(map(block.__getitem__, map(slice, offs, ends)))
            if max(map(len, block_names)) > d.NAME_LEN:
                raise self.fail(f"directory nid {nid}: a name over {d.NAME_LEN} bytes")
            names += block_names
            nids += map(itemgetter(0), heads)
            ftypes += map(itemgetter(2), heads)
        joined = b"".join(names)
        if b"/" in joined or b"\0" in joined:
            raise self.fail(f"directory nid {nid}: a name holds '/' or NUL")
        if not all(map(bytes.__lt__, names, names[1:])):
            raise self.fail(f"directory nid {nid}: names not sorted and unique")
        return names, nids, ftypes

    # -- the walk

    def run(self) -> None:
        root_nid = self.superblock()
        src = self.img.data
        n = src.n_inodes
        if n != self.img.index.n_inodes:
            raise self.fail(f"built from {n} inodes, the index has {self.img.index.n_inodes}")
        cols = src.cols
        modes = cols["mode"]
        acol, bcol, parents = cols["a"], cols["b"], cols["parent"]
        kinds = list(map(stat.S_IFMT, modes))
        is_dir = [k == stat.S_IFDIR for k in kinds]
        ftype_of = [d.FILE_TYPE.get(k, 0) for k in kinds]

        # directories, from the root: names as in the index, "." and ".." right, and every
        # other entry's (index inode, nid, file type) collected for the checks below
        child_inos: list[int] = []
        child_nids: list[int] = []
        child_ftypes: list[int] = []
        seen: set[int] = set()
        stack = [(root_nid, fmt.ROOT_INO, root_nid)]
        while stack:
            nid, ino, parent_nid = stack.pop()
            if nid in seen:
                raise self.fail(f"directory nid {nid} reached twice")
            seen.add(nid)
            core = self.core(nid)
            if not stat.S_ISDIR(core[_MODE]) or not is_dir[ino]:
                raise self.fail(f"nid {nid} (index inode {ino}) is not a directory")
            names, nids, ftypes = self.directory(nid, core)
            a, b = acol[ino], bcol[ino]
            listed = sorted([*zip(src.names[a : a + b], src.dirent_inos[a : a + b], strict=True),
                             (b".", ino), (b"..", parents[ino])])
            if names != list(map(itemgetter(0), listed)):
                raise self.fail(f"directory nid {nid} lists other names than index inode {ino}")
            dot, dotdot = names.index(b"."), names.index(b"..")  # dot < dotdot: sorted
            if (nids[dot], nids[dotdot]) != (nid, parent_nid) or ftypes[dot] != d.FT_DIR or ftypes[dotdot] != d.FT_DIR:
                raise self.fail(f"directory nid {nid}: '.' or '..' names nids {nids[dot]}, {nids[dotdot]}")
            inos = list(map(itemgetter(1), listed))
            for entries in (inos, nids, ftypes):
                del entries[dotdot], entries[dot]
            child_inos += inos
            child_nids += nids
            child_ftypes += ftypes
            subdirs = list(map(is_dir.__getitem__, inos))
            stack += zip(compress(nids, subdirs), compress(inos, subdirs), repeat(nid))

        # hardlinks: each index inode is named by one nid and each nid names one index inode
        nid_by_ino = dict(zip(child_inos, child_nids, strict=True))
        if (list(map(nid_by_ino.__getitem__, child_inos)) != child_nids
                or len(set(nid_by_ino.values())) != len(nid_by_ino)):
            raise self.fail("names share inodes other than the index's hardlinks do")
        if len(nid_by_ino) != n - 1 or fmt.ROOT_INO in nid_by_ino:
            raise self.fail(f"{len(nid_by_ino) + 1} inodes reachable from the root, the index has {n}")
        if root_nid in nid_by_ino.values():
            raise self.fail("a directory entry other than '.' and '..' names the root")
        if list(map(ftype_of.__getitem__, child_inos)) != child_ftypes:
            i = _first_diff(list(map(ftype_of.__getitem__, child_inos)), child_ftypes)
            raise self.fail(f"the entry of index inode {child_inos[i]} has file type {child_ftypes[i]}")

        # every inode core, in index order, against the index's columns
        nid_of = [root_nid, *map(nid_by_ino.__getitem__, range(1, n))]
        if self.img.nids != nid_of:
            ino = _first_diff(self.img.nids, nid_of)
            raise self.fail(f"the image says index inode {ino} is at another nid than its directory entry")
        positions = list(map(d.SLOT.__mul__, nid_of))
        if min(positions) < _SUPER_END or max(positions) + d.INODE_EXT_SIZE > self.meta_size:
            nid = next(nid for nid in nid_of if not _SUPER_END <= nid * d.SLOT <= self.meta_size - d.INODE_EXT_SIZE)
            raise self.fail(f"nid {nid} outside the metadata")
        cores = list(map(d.INODE_EXT.unpack_from, repeat(self.meta), positions))
        formats = list(map(itemgetter(_FORMAT), cores))
        if not _KNOWN_FORMATS.issuperset(formats):
            ino = next(i for i, f in enumerate(formats) if f not in _KNOWN_FORMATS)
            raise self.fail(f"nid {nid_of[ino]}: inode format {formats[ino]:#x}")
        for what, field, column in (("mode", _MODE, "mode"), ("uid", _UID, "uid"), ("gid", _GID, "gid"),
                                    ("mtime", _MTIME, "mtime_sec"), ("mtime ns", _NSEC, "mtime_nsec"),
                                    ("nlink", _NLINK, "nlink")):
            got = list(map(itemgetter(field), cores))
            if got != cols[column]:
                ino = _first_diff(got, cols[column])
                raise self.fail(f"nid {nid_of[ino]}: {what} {got[ino]} differs from index inode {ino}")

        # xattrs: exactly the inodes the index gives xattrs have an ibody, holding them
        icounts = list(map(itemgetter(_ICOUNT), cores))
        with_x = list(compress(range(n), icounts))
        if with_x != list(compress(range(n), cols["xattr_count"])):
            ino = _first_diff(with_x, list(compress(range(n), cols["xattr_count"])))
            raise self.fail(f"xattrs differ from the index near index inode {ino}")
        for ino in with_x:
            if self.xattrs(nid_of[ino], icounts[ino]) != src.xattrs(ino):
                raise self.fail(f"nid {nid_of[ino]}: xattrs differ from index inode {ino}")

        # data, per type (directories were read above)
        chunks, chunk_blocks = src.chunks, self.img.chunk_blocks
        ref_chunks, ref_offsets, sizes = src.ref_chunks, src.ref_offsets, cols["size"]
        regs = [ino for ino, kind in enumerate(kinds) if kind == stat.S_IFREG]
        got = list(map(itemgetter(_SIZE), map(cores.__getitem__, regs)))
        if got != list(map(sizes.__getitem__, regs)):
            ino = regs[_first_diff(got, list(map(sizes.__getitem__, regs)))]
            raise self.fail(f"nid {nid_of[ino]}: size {cores[ino][_SIZE]} instead of {sizes[ino]}")
        # files of one piece of one chunk, flat (the common case), column by column: the
        # piece is block aligned and inside its chunk, and the inode points at its block
        one = [ino for ino in regs if bcol[ino] == 1 and formats[ino] == d.FORMAT_PLAIN]
        firsts = list(map(acol.__getitem__, one))
        cids = list(map(ref_chunks.__getitem__, firsts))
        offs = list(map(ref_offsets.__getitem__, firsts))
        if fmt.HOLE in cids:
            ino = one[cids.index(fmt.HOLE)]
            raise self.fail(f"nid {nid_of[ino]}: a flat file for index inode {ino}, a hole")
        ends = list(map(int.__add__, offs, map(sizes.__getitem__, one)))
        ulens = [c.ulen for c in chunks]
        if any(map((d.BLOCK_SIZE - 1).__and__, offs)) or not all(map(int.__le__, ends, map(ulens.__getitem__, cids))):
            ino = next(i for i, o, e, c in zip(one, offs, ends, cids, strict=True) if o % d.BLOCK_SIZE or e > ulens[c])
            raise self.fail(f"index inode {ino}: its data does not fit chunk {ref_chunks[acol[ino]]}")
        want = list(map(int.__add__, map(chunk_blocks.__getitem__, cids), map(d.BLOCK_BITS.__rrshift__, offs)))
        got = list(map(itemgetter(_IU), map(cores.__getitem__, one)))
        if got != want:
            ino = one[_first_diff(got, want)]
            raise self.fail(f"nid {nid_of[ino]}: flat data at block {cores[ino][_IU]} is not where index inode {ino} lies")
        for ino in [ino for ino in regs if bcol[ino] != 1 or formats[ino] != d.FORMAT_PLAIN]:
            core = cores[ino]
            if not bcol[ino]:  # empty
                if core[_FORMAT] != d.FORMAT_PLAIN:
                    raise self.fail(f"empty file nid {nid_of[ino]} has layout {(core[_FORMAT] >> 1) & 7}")
                continue
            self.file(nid_of[ino], core, ino)
        for ino in [ino for ino, kind in enumerate(kinds) if kind != stat.S_IFREG and kind != stat.S_IFDIR]:
            kind = kinds[ino]
            core = cores[ino]
            nid = nid_of[ino]
            if kind == stat.S_IFLNK:
                if not 0 < core[_SIZE] <= d.SYMLINK_MAX:
                    raise self.fail(f"symlink nid {nid} of {core[_SIZE]} bytes")
                if self.read(self.flat_data(nid, core, in_meta=True)) != src.targets[ino]:
                    raise self.fail(f"nid {nid}: symlink target differs from index inode {ino}")
                continue
            if core[_FORMAT] != d.FORMAT_PLAIN or core[_SIZE]:
                raise self.fail(f"special file nid {nid}: layout {(core[_FORMAT] >> 1) & 7}, size {core[_SIZE]}")
            if kind in (stat.S_IFCHR, stat.S_IFBLK) and d.decode_dev(core[_IU]) != (acol[ino], bcol[ino]):
                raise self.fail(f"nid {nid}: device {d.decode_dev(core[_IU])} instead of {(acol[ino], bcol[ino])}")

    def file(self, nid: int, core: tuple[int, ...], ino: int) -> None:
        """A regular file of several pieces, or with a hole: its blocks against its refs."""
        src = self.img.data
        cs = src.chunk_size
        size = core[_SIZE]
        refs = src.refs(ino)
        if len(refs) != -(-size // cs):
            raise self.fail(f"index inode {ino}: {len(refs)} pieces for {size} bytes")
        expect = []
        for k, (cid, off) in enumerate(refs):
            if cid == fmt.HOLE:
                expect.append(d.NULL_ADDR)
                continue
            # the piece lies inside its chunk's blocks, so no read reaches the next chunk
            if cid >= len(src.chunks) or off % d.BLOCK_SIZE or off + min(cs, size - k * cs) > src.chunks[cid].ulen:
                raise self.fail(f"index inode {ino}: piece {k} does not fit chunk {cid}")
            expect.append(self.img.chunk_blocks[cid] + off // d.BLOCK_SIZE)
        if core[_FORMAT] == d.FORMAT_CHUNKED:
            addrs, chunk_bytes = self.chunk_map(nid, core)
            if len(expect) > 1 and chunk_bytes != cs:
                raise self.fail(f"nid {nid}: chunks of {chunk_bytes} bytes, the index cuts at {cs}")
            if chunk_bytes < min(cs, size) or addrs != expect:
                raise self.fail(f"nid {nid}: chunk map differs from index inode {ino}")
        elif core[_FORMAT] == d.FORMAT_PLAIN:
            self.flat_data(nid, core, in_meta=False)
            step = cs // d.BLOCK_SIZE
            if expect != [core[_IU] + k * step for k in range(len(expect))]:
                raise self.fail(f"nid {nid}: flat data at block {core[_IU]} is not where index inode {ino} lies")
        else:
            raise self.fail(f"file nid {nid} has inline data")


def check_erofs(image: ErofsImage) -> None:
    """Parse ``image``'s metadata, check it, and check that it says what its index says;
    raise ErofsCorrupt at the first problem."""
    try:
        _Checker(image).run()
    except ErofsCorrupt:
        raise
    except (struct.error, IndexError, KeyError, ValueError, FormatError) as exc:
        raise ErofsCorrupt(f"erofs metadata check failed: {type(exc).__name__}: {exc}") from exc


__all__ = ["check_erofs"]
