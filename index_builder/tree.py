"""Flattening: apply layer entries in order, with the OCI layer semantics, to one tree.

The rules (https://github.com/opencontainers/image-spec/blob/main/layer.md):

* ``DIR/.wh.NAME`` removes NAME, and ``DIR/.wh..wh..opq`` every child of DIR, from the
  layers *below*: whiteouts of a layer are applied before that layer's other entries, so
  they never hide what the same layer adds. Other ``.wh..wh.*`` names (aufs bookkeeping)
  are ignored.
* An entry replaces what its path holds, except that a directory over a directory only
  updates the attributes and keeps the children.
* A hardlink entry adds a name for the inode its target path holds at that moment (in the
  same layer or a lower one); the inode keeps its own attributes.
* Parent components are resolved inside the root, following symlinks the way a safe
  extractor does (absolute targets restart at the root, ``..`` stops at the root).
  Missing parents are created as directories (mode 0755, owner 0:0, the entry's mtime).
* Entry paths that are absolute or contain ``..`` are refused: they would escape the root.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from turbofs.core.errors import SourceError, UnsafeEntry

MAX_SYMLINKS: Final = 40
WHITEOUT_PREFIX: Final = b".wh."
OPAQUE: Final = b".wh..wh..opq"
META_PREFIX: Final = b".wh..wh."


class Node:
    """One inode of the flattened tree; hardlinked names share one Node."""

    __slots__ = ("children", "data", "gid", "mode", "mtime_ns", "rdev", "size", "target", "uid", "xattrs")

    def __init__(
        self,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        xattrs: tuple[tuple[bytes, bytes], ...] = (),
        size: int = 0,
        data: object = None,
        target: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.xattrs = xattrs
        self.size = size
        self.data = data
        self.target = target
        self.rdev = rdev
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass(slots=True)
class Op:
    """One layer entry, ready to apply."""

    kind: str  # file dir symlink hardlink char block fifo whiteout opaque
    parts: tuple[bytes, ...]
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    target: bytes = b""  # symlink target; hardlink target path
    rdev: tuple[int, int] = (0, 0)
    size: int = 0
    data: object = None


_TYPE_BITS: Final = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


def show(path: bytes | tuple[bytes, ...]) -> str:
    raw = b"/".join(path) if isinstance(path, tuple) else path
    return raw.decode("utf-8", "backslashreplace") or "/"


def split_path(name: bytes, what: str, path_max: int) -> tuple[bytes, ...]:
    """Validated components of an entry path (no empty, "." or ".." components)."""
    if len(name) > path_max:
        raise UnsafeEntry(f"{what}: path of {len(name)} bytes is longer than {path_max}")
    if name.startswith(b"/"):
        raise UnsafeEntry(f"{what}: absolute path {show(name)!r} would escape the root")
    if b"\0" in name:
        raise UnsafeEntry(f"{what}: path {show(name)!r} contains a NUL byte")
    parts = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise UnsafeEntry(f"{what}: path {show(name)!r} contains '..' and would escape the root")
    return parts


def classify(parts: tuple[bytes, ...]) -> str | None:
    """'whiteout', 'opaque', 'meta' (ignored aufs names) or None for an ordinary name."""
    if not parts:
        return None
    name = parts[-1]
    if not name.startswith(WHITEOUT_PREFIX):
        return None
    if name == OPAQUE:
        return "opaque"
    if name.startswith(META_PREFIX):
        return "meta"
    return "whiteout"


class Tree:
    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR | 0o755)

    # -- path resolution

    def _walk(self, parts: tuple[bytes, ...], *, create: bool, mtime_ns: int, what: str) -> Node | None:
        """The directory at ``parts``, following symlinks inside the root."""
        stack = [self.root]
        todo = list(reversed(parts))
        links = 0
        while todo:
            comp = todo.pop()
            if comp in (b"", b"."):
                continue
            if comp == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = stack[-1]
            assert cur.children is not None
            child = cur.children.get(comp)
            if child is None:
                if not create:
                    return None
                child = Node(stat.S_IFDIR | 0o755, mtime_ns=mtime_ns)
                cur.children[comp] = child
            if stat.S_ISLNK(child.mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise SourceError(f"{what}: too many levels of symbolic links in its parent path")
                if child.target.startswith(b"/"):
                    stack = [self.root]
                todo.extend(reversed(child.target.split(b"/")))
                continue
            if not child.is_dir:
                if not create:
                    return None
                raise SourceError(f"{what}: parent component {show(comp)!r} is not a directory")
            stack.append(child)
        return stack[-1]

    # -- operations

    def whiteout(self, op: Op, what: str) -> None:
        parent = self._walk(op.parts[:-1], create=False, mtime_ns=0, what=what)
        if parent is None:
            return
        assert parent.children is not None
        if op.kind == "opaque":
            parent.children.clear()
        else:
            parent.children.pop(op.parts[-1][len(WHITEOUT_PREFIX) :], None)

    def apply(self, op: Op, what: str) -> None:
        if not op.parts:
            if op.kind != "dir":
                raise UnsafeEntry(f"{what}: the root can only be a directory, not a {op.kind}")
            self._set_attrs(self.root, op)
            return
        parent = self._walk(op.parts[:-1], create=True, mtime_ns=op.mtime_ns, what=what)
        assert parent is not None and parent.children is not None
        name = op.parts[-1]
        if op.kind == "hardlink":
            node = self._link_target(op, what)
            parent.children[name] = node
            return
        existing = parent.children.get(name)
        if op.kind == "dir" and existing is not None and existing.is_dir:
            self._set_attrs(existing, op)
            return
        # Linux gives every symlink mode 0777, whatever the archive says
        perms = 0o777 if op.kind == "symlink" else op.mode & 0o7777
        node = Node(
            _TYPE_BITS[op.kind] | perms,
            op.uid, op.gid, op.mtime_ns, op.xattrs, op.size, op.data, op.target, op.rdev,
        )
        parent.children[name] = node

    def _link_target(self, op: Op, what: str) -> Node:
        tparts = op.target
        parts = tuple(p for p in tparts.split(b"/") if p not in (b"", b"."))
        parent = self._walk(parts[:-1], create=False, mtime_ns=0, what=what) if parts else None
        node = parent.children.get(parts[-1]) if parent is not None and parent.children is not None else None
        if node is None:
            raise SourceError(f"{what}: hardlink target {show(tparts)!r} does not exist")
        if node.is_dir:
            raise SourceError(f"{what}: hardlink target {show(tparts)!r} is a directory")
        return node

    @staticmethod
    def _set_attrs(node: Node, op: Op) -> None:
        node.mode = stat.S_IFDIR | (op.mode & 0o7777)
        node.uid, node.gid, node.mtime_ns, node.xattrs = op.uid, op.gid, op.mtime_ns, op.xattrs

    def apply_layer(self, ops: list[Op], name: str) -> None:
        """Apply one layer: its whiteouts first (they hide lower layers only), then the rest."""
        for op in ops:
            if op.kind in ("whiteout", "opaque"):
                self.whiteout(op, f"layer {name}: {show(op.parts)}")
        for op in ops:
            if op.kind not in ("whiteout", "opaque"):
                self.apply(op, f"layer {name}: {show(op.parts)}")

    # -- reading out

    def walk(self) -> Iterator[tuple[tuple[bytes, ...], Node]]:
        """Every (path, node) in depth-first, sorted-name order, the root first."""
        stack: list[tuple[tuple[bytes, ...], Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append(((*path, name), node.children[name]))
