"""The parts of the erofs on-disk format that turbofs writes and checks.

Written from the public specification (the kernel's ``Documentation/filesystems/erofs.rst``
and the layout definitions in ``fs/erofs/erofs_fs.h``); only the uncompressed subset is
used. Everything is little endian. Sizes in bytes::

    offset 0       1024 bytes (boot sector room), then the 128-byte superblock at 1024
    meta area      inodes, each at ``meta_blkaddr * block size + 32 * nid`` (32-byte slots)
                   inode core (64, extended) | xattr ibody | block map or inline tail
    blocks         directory blocks, long symlink targets, the shared xattr area
    data region    file data, block aligned

An inode's ``i_format`` holds the inode version in bit 0 (1: the 64-byte extended inode,
with 32-bit uid/gid/nlink and nanosecond mtime) and the data layout in bits 1-3.
"""

from __future__ import annotations

import stat
import struct
from typing import Final

BLOCK_BITS: Final = 12
BLOCK_SIZE: Final = 1 << BLOCK_BITS
SUPER_OFFSET: Final = 1024
MAGIC: Final = 0xE0F5E1E2
#: Inodes sit in 32-byte slots; a nid is a slot number from the metadata area's start.
SLOT: Final = 32
NULL_ADDR: Final = 0xFFFFFFFF
NAME_LEN: Final = 255
#: The longest symlink target the kernel reads back (PATH_MAX less the terminating NUL).
SYMLINK_MAX: Final = 4095

FEATURE_INCOMPAT_CHUNKED_FILE: Final = 0x4

# data layouts (i_format bits 1-3)
LAYOUT_FLAT_PLAIN: Final = 0
LAYOUT_FLAT_INLINE: Final = 2
LAYOUT_CHUNK_BASED: Final = 4
INODE_EXTENDED: Final = 1
#: i_format of the extended inodes written here, one per data layout.
FORMAT_PLAIN: Final = INODE_EXTENDED | LAYOUT_FLAT_PLAIN << 1
FORMAT_INLINE: Final = INODE_EXTENDED | LAYOUT_FLAT_INLINE << 1
FORMAT_CHUNKED: Final = INODE_EXTENDED | LAYOUT_CHUNK_BASED << 1

#: chunk_info.format: bits 0-4 are log2(chunk size / block size); bit 5 asks for 8-byte
#: chunk indexes instead of the 4-byte block address array written here.
CHUNK_FORMAT_BLKBITS_MASK: Final = 0x1F
CHUNK_FORMAT_INDEXES: Final = 0x20

# xattr name indexes (the prefix of the name)
XATTR_PREFIXES: Final = (
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
)
XATTR_PREFIX_OF: Final = {index: prefix for prefix, index in XATTR_PREFIXES}

# directory entry file types
FT_REG: Final = 1
FT_DIR: Final = 2
FT_CHR: Final = 3
FT_BLK: Final = 4
FT_FIFO: Final = 5
FT_SOCK: Final = 6
FT_LNK: Final = 7
FILE_TYPE: Final = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_LNK,
}

# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time,
# build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name,
# feature_incompat, u1, extra_devices, devt_slotoff, dirblkbits, xattr_prefix_count,
# xattr_prefix_start, packed_nid, xattr_filter_reserved, reserved
SUPER: Final = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
# i_format, i_xattr_icount, i_mode, reserved, i_size, i_u, i_ino, i_uid, i_gid,
# i_mtime, i_mtime_nsec, i_nlink, reserved
INODE_EXT: Final = struct.Struct("<HHHHQIIIIqII16x")
INODE_EXT_SIZE: Final = 64
INODE_COMPACT_SIZE: Final = 32
# h_name_filter, h_shared_count, reserved
XATTR_IBODY_HEADER: Final = struct.Struct("<IB7x")
# e_name_len, e_name_index, e_value_size
XATTR_ENTRY: Final = struct.Struct("<BBH")
# nid, nameoff, file_type, reserved
DIRENT: Final = struct.Struct("<QHBx")
U32: Final = struct.Struct("<I")

assert SUPER.size == 128 and INODE_EXT.size == INODE_EXT_SIZE
assert XATTR_IBODY_HEADER.size == 12 and XATTR_ENTRY.size == 4 and DIRENT.size == 12


def align(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def blocks_of(n: int) -> int:
    return -(-n // BLOCK_SIZE)


def xattr_entry_size(name_len: int, value_len: int) -> int:
    return align(XATTR_ENTRY.size + name_len + value_len, 4)


def ibody_size(icount: int) -> int:
    """Bytes of the xattr ibody given ``i_xattr_icount``."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + 4 * (icount - 1)


def encode_dev(major: int, minor: int) -> int:
    """The kernel's "new" 32-bit device number encoding (12-bit major, 20-bit minor)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(dev: int) -> tuple[int, int]:
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(name index, suffix) of a full xattr name, or None if erofs has no prefix for it."""
    for prefix, index in XATTR_PREFIXES:
        if prefix.endswith(b".") and name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
        if not prefix.endswith(b".") and name == prefix:
            return index, b""
    return None
