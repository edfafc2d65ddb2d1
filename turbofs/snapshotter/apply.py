"""Apply one layer's tar stream to a directory in overlayfs's diff format.

The same directory containerd's unpack into an overlay snapshot makes; the snapshotter uses
it to turn a placeholder into a real layer
(:meth:`~turbofs.snapshotter.core.Snapshotter._materialize`).
The layer rules are docs/format.md's (held once in :mod:`turbofs.core.fstree`: in-root
symlinks, the xattr rule, unsafe names refused with :class:`~turbofs.core.errors.UnsafeEntry`);
what differs for an overlay diff:

* ``.wh.NAME`` becomes a character device 0/0 ``NAME`` (overlayfs's whiteout) with the
  entry's owner; ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory.
* A whiteout of a name this layer created leaves that entry (a directory becomes opaque),
  and a directory created after whiting out its name is opaque (containerd 1.6 differs).
* Hard links reach files of the same layer only; the inode keeps its metadata.
* Parents the layer does not list are created as the nearest lower layer has them, else
  0755 root; directory mtimes are set last; the root's own entry is ignored.

Not atomic: the caller applies into a fresh directory and renames it into place once the
layer's digests are verified.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from turbofs.core.config import DEFAULT_PATH_MAX, LAYER_READ_BLOCK
from turbofs.core.errors import UnsafeEntry
from turbofs.core.fstree import (
    classify,
    keep_xattr,
    pax_xattrs,
    resolve,
    show,
    split_path,
    whited_name,
)
from turbofs.core.tar import TarEntry, TarReader

log = logging.getLogger("turbofs.snapshotter")

OPAQUE_XATTR: Final = "trusted.overlay.opaque"


@dataclass
class ApplyStats:
    entries: int = 0
    whiteouts: int = 0
    bytes: int = 0


def _join(base: bytes, parts: Sequence[bytes]) -> bytes:
    return base + b"".join(b"/" + p for p in parts)


def _fs_child(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name


def _fs_link(path: bytes) -> bytes | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return os.readlink(path) if stat.S_ISLNK(st.st_mode) else None


def root_path(root: bytes, parts: Sequence[bytes], what: str) -> tuple[bytes, ...]:
    """The components of ``parts`` below ``root`` with every symlink that exists resolved
    inside ``root``."""
    found = resolve(root, parts, _fs_child, _fs_link, what)
    assert found is not None  # _fs_child always gives a path
    return found[0]


class LayerApplier:
    """Applies the entries of one layer under ``root`` (an empty directory); ``parents`` are
    the lower layers' directories, nearest first (for parent directories the layer omits)."""

    def __init__(self, root: Path, parents: Sequence[Path], *, what: str) -> None:
        self.root = os.fsencode(root)
        self.parents = [os.fsencode(p) for p in parents]
        self.what = what
        self.stats = ApplyStats()
        self._dirs: list[tuple[bytes, int]] = []  # (path, mtime_ns), set at the end
        self._whited: set[bytes] = set()  # whiteout devices this layer made
        self._made: set[bytes] = set()  # paths of entries this layer made

    # -- the whole stream

    def apply(self, tar: TarReader) -> ApplyStats:
        for entry in tar:
            self.entry(entry, tar)
        self.finish()
        return self.stats

    def finish(self) -> None:
        for path, mtime in reversed(self._dirs):
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    # -- one entry

    def entry(self, e: TarEntry, tar: TarReader) -> None:
        self.stats.entries += 1
        what = f"{self.what}: {show(e.name)}"
        parts = split_path(e.name, self.what, DEFAULT_PATH_MAX)
        if not parts:
            return  # the root directory: containerd ignores its entry too
        special = classify(parts)
        if special == "meta":
            return
        pparts = root_path(self.root, parts[:-1], what)
        parent = _join(self.root, pparts)
        if pparts:
            self._mkparent(pparts, what)
        if special == "opaque":
            os.setxattr(parent, OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        if special == "whiteout":
            self._whiteout(parent + b"/" + whited_name(parts), e, what)
            return
        path = parent + b"/" + parts[-1]
        was_whited = path in self._whited
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISDIR(st.st_mode) and e.type == "dir"):
            _remove(path)
            self._whited.discard(path)
        if e.type == "file":
            self._file(path, e, tar)
        elif e.type == "dir":
            if st is None or not stat.S_ISDIR(st.st_mode):
                os.mkdir(path, 0o700)
            if was_whited:  # this layer removed the lower directory, then made its own
                os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)
        elif e.type == "hardlink":
            self._hardlink(path, e, what)
        elif e.type == "symlink":
            os.symlink(e.linkname, path)
        elif e.type in ("char", "block"):
            kind = stat.S_IFCHR if e.type == "char" else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(e.devmajor, e.devminor))
        elif e.type == "fifo":
            os.mkfifo(path, 0o600)
        else:  # pragma: no cover - the tar reader knows no other types
            raise UnsafeEntry(f"{what}: unsupported entry type {e.type}")
        self._made.add(path)
        if e.type != "hardlink":  # a new name keeps the inode's metadata (a chown would drop capabilities)
            self._metadata(path, e, what)

    def _file(self, path: bytes, e: TarEntry, tar: TarReader) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            left = e.size
            while left > 0:
                data = tar.read(min(left, LAYER_READ_BLOCK))
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                left -= len(data)
        finally:
            os.close(fd)
        self.stats.bytes += e.size

    def _hardlink(self, path: bytes, e: TarEntry, what: str) -> None:
        target_parts = split_path(e.linkname, f"{what} (hard link target)", DEFAULT_PATH_MAX)
        if not target_parts:
            raise UnsafeEntry(f"{what}: hard link to the root directory")
        resolved = root_path(self.root, target_parts[:-1], what)
        target = _join(self.root, [*resolved, target_parts[-1]])
        if target not in self._made or not os.path.lexists(target):
            raise UnsafeEntry(f"{what}: hard link to {show(e.linkname)!r}, which is not a file of this layer")
        if stat.S_ISDIR(os.lstat(target).st_mode):
            raise UnsafeEntry(f"{what}: hard link to directory {show(e.linkname)!r}")
        os.link(target, path, follow_symlinks=False)

    def _whiteout(self, path: bytes, e: TarEntry, what: str) -> None:
        self.stats.whiteouts += 1
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            # whiteouts hide what lower layers hold: an entry of this layer stays
            if stat.S_ISDIR(st.st_mode):
                os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        os.mknod(path, stat.S_IFCHR, 0)  # mode 0, as containerd makes them
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        self._whited.add(path)

    def _metadata(self, path: bytes, e: TarEntry, what: str) -> None:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        is_link = e.type == "symlink"
        for name, value in pax_xattrs(e.pax, what):
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or (
                        exc.errno == errno.EPERM and name.startswith(b"user.") and e.type not in ("file", "dir")):
                    log.warning("%s: xattr %s not set: %s", what, name.decode(errors="replace"), exc.strerror)
                    continue
                raise
        if not is_link:
            os.chmod(path, e.mode & 0o7777)  # after chown, which clears set-id bits
        if e.type == "dir":
            self._dirs.append((path, e.mtime_ns))
        else:
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    # -- parents

    def _mkparent(self, parts: tuple[bytes, ...], what: str) -> None:
        path = _join(self.root, parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                return
            raise UnsafeEntry(f"{what}: its parent {show(parts)!r} is not a directory in this layer")
        if len(parts) > 1:
            self._mkparent(parts[:-1], what)
        os.mkdir(path, 0o755)
        for lower in self.parents:
            lpath = _join(lower, root_path(lower, parts, what))
            try:
                lst = os.lstat(lpath)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(lst.st_mode):
                break  # replaced in that layer: defaults
            os.chown(path, lst.st_uid, lst.st_gid, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(lst.st_mode))
            for name in os.listxattr(lpath, follow_symlinks=False):
                if keep_xattr(os.fsencode(name)):
                    os.setxattr(path, name, os.getxattr(lpath, name, follow_symlinks=False), follow_symlinks=False)
            os.utime(path, ns=(lst.st_atime_ns, lst.st_mtime_ns), follow_symlinks=False)
            return


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


__all__ = ["OPAQUE_XATTR", "ApplyStats", "LayerApplier", "root_path"]
