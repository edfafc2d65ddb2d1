"""A streaming reader of layer tar archives: POSIX ustar and pax, and GNU extensions.

File data is handed out in the pieces the caller asks for, straight from the decompressed
stream; pax values stay raw bytes (names that are not UTF-8, binary xattr values). An empty
pax value deletes the record (POSIX), so the ustar field or global record applies, except an
entry's own xattr record, which is an xattr with an empty value. Supported: all ustar
entry types, pax ``x`` and ``g`` headers, GNU long names (``L``, ``K``) and base-256 numbers;
GNU sparse files and multi-volume archives are refused. Numbers are checked where they are
read (pax decimals are digits only; uid, gid and device numbers fit 32 bits, mtime 64-bit
seconds), and the metadata before one entry is bounded as a whole (TAR_MAX_META_SIZE).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from turbofs.core.config import TAR_MAX_META_SIZE
from turbofs.core.errors import SourceError
from turbofs.core.fstree import XATTR_RECORDS

BLOCK: Final = 512
_NS: Final = 1_000_000_000
_U32_MAX: Final = (1 << 32) - 1
#: seconds an mtime may hold: the index and the kernel keep a signed 64-bit count
_MTIME_MIN, _MTIME_MAX = -(1 << 63), (1 << 63) - 1
#: a pax decimal: digits only (no sign, blanks or underscores, as int() would take), at
#: most 20 of them (2^64 has 20)
_PAX_UINT: Final = re.compile(rb"[0-9]{1,20}")
#: a pax time: seconds and an optional fraction (no exponent, NaN or infinity); the
#: fraction's digits past a nanosecond only round
_PAX_TIME: Final = re.compile(rb"-?[0-9]{1,20}(?:\.[0-9]{0,64})?")
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
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not _PAX_UINT.fullmatch(data, pos, space):
            raise TarError(f"malformed pax record length {data[pos : pos + 21]!r}")
        length = int(data[pos:space])
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
    merged = {**global_, **local}  # a copy always: the loop below deletes from it
    for key, value in local.items():
        if not value and (key in global_ or not key.startswith(XATTR_RECORDS)):
            del merged[key]
    return merged


def _pax_int(pax: dict[bytes, bytes], key: bytes, default: int) -> int:
    value = pax.get(key)
    if not value:
        return default
    if not _PAX_UINT.fullmatch(value):
        raise TarError(f"invalid pax {key.decode()} {value[:40]!r}")
    return int(value)


def _pax_mtime(value: bytes) -> int:
    if not _PAX_TIME.fullmatch(value):
        raise TarError(f"invalid pax mtime {value[:40]!r}")
    return int((Decimal(value.decode("ascii")) * _NS).to_integral_value(rounding="ROUND_FLOOR"))


def _in_range(value: int, low: int, high: int, what: str) -> int:
    """``value``, refused if the index or the kernel could not hold it."""
    if not low <= value <= high:
        raise TarError(f"{what} {value} in a tar header is out of range [{low}, {high}]")
    return value


class TarReader:
    """Iterate over the entries of a tar stream; read each file's data with :meth:`read`."""

    def __init__(self, next_piece: Callable[[], bytes]) -> None:
        self._in = _Input(next_piece)
        self._left = 0  # data bytes of the current entry not read yet
        self._pad = 0  # padding after the current entry's data
        self._global: dict[bytes, bytes] = {}
        self._meta_bytes = 0  # pax and long-name bytes read since the last entry
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
        # one bound for all the metadata before an entry (several pax headers, long names)
        self._meta_bytes += size
        if size > TAR_MAX_META_SIZE or self._meta_bytes > TAR_MAX_META_SIZE:
            raise TarError(f"{what} of {size} bytes is too large (metadata of one entry is limited to "
                           f"{TAR_MAX_META_SIZE} bytes)")
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
                if sum(len(k) + len(v) for k, v in self._global.items()) > TAR_MAX_META_SIZE:
                    raise TarError(f"global pax records of more than {TAR_MAX_META_SIZE} bytes")
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
                self._meta_bytes = 0
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
            dev = kind in ("char", "block")
            entry = TarEntry(
                name=name,
                type=kind,
                size=size if kind == "file" else 0,
                mode=_number(block[100:108], "mode") & 0o7777,
                uid=_in_range(_pax_int(merged, b"uid", _number(block[108:116], "uid")), 0, _U32_MAX, "uid"),
                gid=_in_range(_pax_int(merged, b"gid", _number(block[116:124], "gid")), 0, _U32_MAX, "gid"),
                mtime_ns=_pax_mtime(mtime) if mtime else _number(block[136:148], "mtime") * _NS,
                linkname=linkname,
                devmajor=_in_range(_number(block[329:337], "devmajor"), 0, _U32_MAX, "devmajor") if dev else 0,
                devminor=_in_range(_number(block[337:345], "devminor"), 0, _U32_MAX, "devminor") if dev else 0,
                pax=merged,
            )
            _in_range(entry.mtime_ns // _NS, _MTIME_MIN, _MTIME_MAX, "mtime")
            self._left, self._pad = size, -size % BLOCK
            pax, long_name, long_link = {}, None, None
            self._meta_bytes = 0
            yield entry
