"""Snapshots of a built turbo image, in the form of ocifixtures.snapshot_tree, for comparisons."""

from __future__ import annotations

import hashlib
import stat

from tests.ocifixtures import EntryInfo
from turbofs.core.image import LayoutImage

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def snapshot_index(img: LayoutImage) -> dict[bytes, EntryInfo]:
    """Every entry of the image through the reader API, content hashed from the chunks."""
    idx = img.index
    groups: dict[int, bytes] = {}
    entries = list(idx.walk())
    for path, ino in entries:
        node = idx.inode(ino)
        if node.is_reg and node.nlink > 1:
            groups[ino] = min(groups.get(ino, path), path)
    out: dict[bytes, EntryInfo] = {}
    for path, ino in entries:
        node = idx.inode(ino)
        digest = hashlib.sha256(img.read(ino)).hexdigest() if node.is_reg else ""
        out[path] = EntryInfo(
            type=_KINDS[stat.S_IFMT(node.mode)],
            mode=stat.S_IMODE(node.mode),
            uid=node.uid,
            gid=node.gid,
            size=node.size,
            mtime_ns=node.mtime_ns,
            xattrs=() if node.is_symlink else tuple(sorted((k.decode(), v) for k, v in idx.xattrs(ino).items())),
            target=idx.readlink(ino) if node.is_symlink else b"",
            rdev=node.rdev,
            sha256=digest,
            link_group=groups.get(ino, b""),
        )
    return out
