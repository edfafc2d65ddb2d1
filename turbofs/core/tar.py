"""A streaming reader of layer tar archives: POSIX ustar and pax, and GNU extensions.

File data is handed out in the pieces the caller asks for, straight from the decompressed
stream; pax values stay raw bytes (names that are not UTF-8, binary xattr values). An empty
pax value deletes the record (POSIX), so the ustar field or global record applies, except an
entry's own xattr record, which is an xattr with an empty value. Supported: all ustar
entry types, pax ``x`` and ``g`` headers, GNU long names (``L``, ``K``) and base-256 numbers;
GNU sparse files and multi-volume archives are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Final

from turbofs.core.config import TAR_MAX_META_SIZE
from turbofs.core.errors import SourceError
from turbofs.core.fstree import XATTR_RECORDS

BLOCK: Final = 512
_NS: Final = 1_000_000_000
_TYPES: Final = {
    b"0": "file", b"\0": "file", b"7": "file",
    b"1": "hardlink", b"2": "symlink", b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo",
}  # fmt: skip


class TarError(SourceError):
    """The bytes are not a valid tar archive (or use a feature turbofs does not support)."""


@dataclass
class TarEntry:
    name: bytes
    type: str  # file hardlink symlink char block dir fifo
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[bytes, bytes] = field(default_factory=dict)


class _Input:
    """Bytes from a source of pieces, taken in exact amounts."""

    def __init__(self, next_piece: Callable[[], bytes]) -> None:
        self._next = next_piece
        self._piece = b""
        self._pos = 0
        self.offset = 0  # bytes consumed so far

    def take(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the stream."""
        avail = len(self._piece) - self._pos
        if avail >= n:
            out = self._piece[self._pos : self._pos + n]
            self._pos += n
            self.offset += n
            return out
        parts = [self._piece[self._pos :]]
        need = n - avail
        self._piece, self._pos = b"", 0
        while need > 0:
            piece = self._next()
            if not piece:
                break
            if len(piece) > need:
                parts.append(piece[:need])
                self._piece, self._pos = piece, need
                need = 0
            else:
                parts.append(piece)
                need -= len(piece)
        out = b"".join(parts)
        self.offset += len(out)
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            got = len(self.take(min(n, 1 << 20)))
            if not got:
                raise TarError(f"tar archive is truncated: it ends inside an entry ({n} bytes missing)")
            n -= got


def _number(raw: bytes, what: str) -> int:
    if raw[:1] and raw[0] & 0x80:  # base-256, two's complement when the first byte is 0xff
        value = int.from_bytes(raw[1:], "big")
        if raw[0] == 0xFF:
            value -= 1 << (8 * (len(raw) - 1))
        else:
            value |= (raw[0] & 0x3F) << (8 * (len(raw) - 1))
        return value
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"invalid number {raw!r} in the {what} field of a tar header") from None


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break  # NUL padding
        space = data.find(b" ", pos)
        if space < 0:
            raise TarError("malformed pax record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("malformed pax record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarError("malformed pax record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarError("pax record without '='")
        out[key] = value
        pos = end
    return out


def _merge(global_: dict[bytes, bytes], local: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The pax records in force for one entry."""
    merged = {**global_, **local} if global_ else local
    for key, value in local.items():
        if not value and (key in global_ or not key.startswith(XATTR_RECORDS)):
            del merged[key]
    return merged


def _pax_int(pax: dict[bytes, bytes], key: bytes, default: int) -> int:
    value = pax.get(key)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise TarError(f"invalid pax {key.decode()} {value!r}") from None


def _pax_mtime(value: bytes) -> int:
    try:
        return int((Decimal(value.decode("ascii")) * _NS).to_integral_value(rounding="ROUND_FLOOR"))
    except (InvalidOperation, UnicodeDecodeError):
        raise TarError(f"invalid pax mtime {value!r}") from None


class TarReader:
    """Iterate over the entries of a tar stream; read each file's data with :meth:`read`."""

    def __init__(self, next_piece: Callable[[], bytes]) -> None:
        self._in = _Input(next_piece)
        self._left = 0  # data bytes of the current entry not read yet
        self._pad = 0  # padding after the current entry's data
        self._global: dict[bytes, bytes] = {}
        self.ended = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current entry's data (exactly n unless the entry ends)."""
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._in.take(n)
        if len(data) < n:
            raise TarError(f"tar archive is truncated: it ends inside a file ({self._left - len(data)} bytes missing)")
        self._left -= n
        return data

    def _finish_entry(self) -> None:
        self._in.skip(self._left + self._pad)
        self._left = self._pad = 0

    def _block(self) -> bytes | None:
        block = self._in.take(BLOCK)
        if not block:
            return None
        if len(block) < BLOCK:
            raise TarError("tar archive is truncated: it ends inside a header")
        return block

    def _meta(self, size: int, what: str) -> bytes:
        if size > TAR_MAX_META_SIZE:
            raise TarError(f"{what} of {size} bytes is too large")
        data = self._in.take(size)
        if len(data) < size:
            raise TarError(f"tar archive is truncated: it ends inside a {what}")
        self._in.skip(-size % BLOCK)
        return data

    def __iter__(self) -> Iterator[TarEntry]:
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        first = True
        while True:
            self._finish_entry()
            block = self._block()
            if block is None or block == bytes(BLOCK):
                if first and block is None:
                    raise TarError("empty stream: not a tar archive")
                self.ended = True
                return
            chksum = _number(block[148:156], "checksum")
            unsigned = sum(block[:148]) + 256 + sum(block[156:])
            # some old writers summed signed chars: accept that too
            if chksum != unsigned and chksum != unsigned - sum(2 * b for b in block if b > 127):
                raise TarError(
                    "invalid tar header checksum" + (" (not a tar archive?)" if first else f" at byte {self._in.offset - BLOCK}")
                )
            first = False
            typeflag = block[156:157]
            size = _number(block[124:136], "size")
            if size < 0:
                raise TarError("negative size in a tar header")
            if typeflag == b"x":
                pax.update(_parse_pax(self._meta(size, "pax header")))
                continue
            if typeflag == b"g":
                records = {**self._global, **_parse_pax(self._meta(size, "global pax header"))}
                self._global = {k: v for k, v in records.items() if v}
                continue
            if typeflag == b"L":
                long_name = _cstr(self._meta(size, "GNU long name"))
                continue
            if typeflag == b"K":
                long_link = _cstr(self._meta(size, "GNU long link name"))
                continue
            if typeflag == b"V":  # a volume label: nothing to extract
                self._left, self._pad = size, -size % BLOCK
                pax, long_name, long_link = {}, None, None
                continue
            kind = _TYPES.get(typeflag)
            if kind is None:
                what = {b"S": "GNU sparse file", b"M": "multi-volume continuation"}.get(typeflag, "entry type")
                raise TarError(f"unsupported tar {what} {typeflag!r}")
            merged = _merge(self._global, pax)
            if any(k.startswith(b"GNU.sparse.") for k in merged):
                raise TarError("unsupported pax sparse file")
            name = _cstr(block[0:100])
            if block[257:263] == b"ustar\0":  # POSIX: the prefix field extends the name
                prefix = _cstr(block[345:500])
                if prefix:
                    name = prefix + b"/" + name
            if long_name is not None:
                name = long_name
            name = merged.get(b"path", name)
            linkname = merged.get(b"linkpath", long_link if long_link is not None else _cstr(block[157:257]))
            size = _pax_int(merged, b"size", size)
            if kind == "file" and typeflag in (b"\0", b"0") and name.endswith(b"/"):
                kind = "dir"  # old archives mark directories by a trailing slash
            mtime = merged.get(b"mtime")
            entry = TarEntry(
                name=name,
                type=kind,
                size=size if kind == "file" else 0,
                mode=_number(block[100:108], "mode") & 0o7777,
                uid=_pax_int(merged, b"uid", _number(block[108:116], "uid")),
                gid=_pax_int(merged, b"gid", _number(block[116:124], "gid")),
                mtime_ns=_pax_mtime(mtime) if mtime else _number(block[136:148], "mtime") * _NS,
                linkname=linkname,
                devmajor=_number(block[329:337], "devmajor") if kind in ("char", "block") else 0,
                devminor=_number(block[337:345], "devminor") if kind in ("char", "block") else 0,
                pax=merged,
            )
            self._left, self._pad = size, -size % BLOCK
            pax, long_name, long_link = {}, None, None
            yield entry
