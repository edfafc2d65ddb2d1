"""Flattening: apply layer entries in order, with the OCI layer semantics, to one tree.

The rules are docs/format.md's ("Flattening rules"; the entry rules shared with the
snapshotter are in :mod:`turbofs.core.fstree`). A layer's whiteouts are applied before its
other entries, so they never hide what the same layer adds; a directory over a directory
keeps its children; a hardlink names the inode its target holds at that moment.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from turbofs.core import fstree
from turbofs.core.errors import SourceError, UnsafeEntry
from turbofs.core.fstree import show


@dataclass(slots=True, eq=False)
class Node:
    """One inode of the flattened tree; hardlinked names share one Node."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    size: int = 0
    data: object = None
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    children: dict[bytes, Node] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if stat.S_ISDIR(self.mode):
            self.children = {}

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


def link_target(node: Node) -> bytes | None:
    """The target of a symlink node, None for any other node."""
    return node.target if stat.S_ISLNK(node.mode) else None


def child(node: Node, name: bytes) -> Node | None:
    """The child ``name`` of a directory node; None if missing or ``node`` is no directory."""
    return node.children.get(name) if node.children is not None else None


class Tree:
    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR | 0o755)

    # -- path resolution

    def _walk(self, parts: tuple[bytes, ...], *, create: bool, mtime_ns: int, what: str) -> Node | None:
        """The directory at ``parts``, following symlinks inside the root; missing ones are
        made when ``create``, else the walk gives None."""

        def step(parent: Node, name: bytes) -> Node | None:
            assert parent.children is not None
            node = parent.children.get(name)
            if node is None:
                if not create:
                    return None
                node = parent.children[name] = Node(stat.S_IFDIR | 0o755, mtime_ns=mtime_ns)
            elif not node.is_dir and not stat.S_ISLNK(node.mode):
                if not create:
                    return None
                raise SourceError(f"{what}: parent component {show(name)!r} is not a directory")
            return node

        found = fstree.resolve(self.root, parts, step, link_target, what)
        return None if found is None else found[1]

    # -- operations

    def whiteout(self, op: Op, what: str) -> None:
        parent = self._walk(op.parts[:-1], create=False, mtime_ns=0, what=what)
        if parent is None:
            return
        assert parent.children is not None
        if op.kind == "opaque":
            parent.children.clear()
        else:
            parent.children.pop(fstree.whited_name(op.parts), None)

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
        node = child(parent, parts[-1]) if parent is not None else None
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
