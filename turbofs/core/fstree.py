"""Layer entry rules shared by the builder and the snapshotter's layer applier.

* Entry paths: relative, no ``..``, no NUL (:func:`split_path`); anything else would escape
  the root.
* OCI whiteouts (https://github.com/opencontainers/image-spec/blob/main/layer.md):
  ``DIR/.wh.NAME`` removes NAME from the layers below, ``DIR/.wh..wh..opq`` every child of
  DIR; other ``.wh..wh.*`` names are aufs bookkeeping and ignored (:func:`classify`).
* Extended attributes from pax records (:func:`pax_xattrs`): ``SCHILY.xattr.NAME=VALUE``
  (raw bytes) and ``LIBARCHIVE.xattr.NAME=BASE64`` (NAME percent-encoded). As containerd
  does: an empty value is an xattr with an empty value, and ``trusted.*`` is never taken
  (``trusted.overlay.*`` would steer the overlayfs mounted above the image).
* In-root resolution (:func:`resolve`): symlinks are followed as a safe extractor does: an
  absolute target starts again at the root, ``..`` stops at the root, and at most
  :data:`~turbofs.core.config.MAX_SYMLINKS` links are followed per path.
"""

from __future__ import annotations

from base64 import b64decode
from collections.abc import Callable, Iterable, Mapping
from typing import Final, TypeVar
from urllib.parse import unquote_to_bytes

from turbofs.core.config import MAX_SYMLINKS
from turbofs.core.errors import UnsafeEntry

WHITEOUT_PREFIX: Final = b".wh."
OPAQUE: Final = b".wh..wh..opq"
META_PREFIX: Final = b".wh..wh."
SCHILY_XATTR: Final = b"SCHILY.xattr."
LIBARCHIVE_XATTR: Final = b"LIBARCHIVE.xattr."
XATTR_RECORDS: Final = (SCHILY_XATTR, LIBARCHIVE_XATTR)
_HOST_ONLY_XATTRS: Final = b"trusted."

H = TypeVar("H")


def show(path: bytes | Iterable[bytes]) -> str:
    """A path for messages: raw bytes shown as UTF-8 with escapes, ``/`` for the root."""
    raw = path if isinstance(path, bytes) else b"/".join(path)
    return raw.decode("utf-8", "backslashreplace") or "/"


def split_path(name: bytes, what: str, path_max: int) -> tuple[bytes, ...]:
    """The components of an entry path (no empty, ``.`` or ``..`` ones); refuses paths that
    would escape the root."""
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
    if not parts or not parts[-1].startswith(WHITEOUT_PREFIX):
        return None
    if parts[-1] == OPAQUE:
        return "opaque"
    if parts[-1].startswith(META_PREFIX):
        return "meta"
    return "whiteout"


def whited_name(parts: tuple[bytes, ...]) -> bytes:
    """The name a whiteout entry removes."""
    return parts[-1][len(WHITEOUT_PREFIX) :]


def keep_xattr(name: bytes) -> bool:
    """Whether an xattr of an image is kept: not ``trusted.*``, which belongs to the host."""
    return bool(name) and not name.startswith(_HOST_ONLY_XATTRS)


def pax_xattrs(pax: Mapping[bytes, bytes], what: str) -> tuple[tuple[bytes, bytes], ...]:
    """The xattrs that a tar entry's pax records carry and an image may set, sorted by name."""
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith(SCHILY_XATTR):
            name = key[len(SCHILY_XATTR) :]
        elif key.startswith(LIBARCHIVE_XATTR):
            try:
                name = unquote_to_bytes(key[len(LIBARCHIVE_XATTR) :])
                value = b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                raise UnsafeEntry(f"{what}: invalid {key.decode(errors='replace')} record") from None
        else:
            continue
        if keep_xattr(name):
            out[name] = value
    return tuple(sorted(out.items()))


def resolve(
    root: H,
    parts: Iterable[bytes],
    step: Callable[[H, bytes], H | None],
    link: Callable[[H], bytes | None],
    what: str,
) -> tuple[tuple[bytes, ...], H] | None:
    """Walk ``parts`` from ``root``, following symlinks inside the root.

    ``step(parent, name)`` gives the handle of a child (None: stop, the walk fails);
    ``link(handle)`` gives its symlink target, or None if it is not a symlink. Returns the
    resolved components and the handle they lead to, or None where ``step`` gave None.
    """
    names: list[bytes] = []
    handles = [root]
    todo = list(parts)
    todo.reverse()
    links = 0
    while todo:
        comp = todo.pop()
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if names:
                names.pop()
                handles.pop()
            continue
        child = step(handles[-1], comp)
        if child is None:
            return None
        target = link(child)
        if target is None:
            names.append(comp)
            handles.append(child)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise UnsafeEntry(f"{what}: more than {MAX_SYMLINKS} symbolic links in its path (a loop?)")
        if target.startswith(b"/"):
            del names[:], handles[1:]
        todo.extend(reversed(target.split(b"/")))
    return tuple(names), handles[-1]


__all__ = [
    "LIBARCHIVE_XATTR", "META_PREFIX", "OPAQUE", "SCHILY_XATTR", "WHITEOUT_PREFIX", "XATTR_RECORDS",
    "classify", "keep_xattr", "pax_xattrs", "resolve", "show", "split_path", "whited_name",
]
