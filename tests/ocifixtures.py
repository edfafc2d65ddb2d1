"""Test helpers: build OCI images from hand-written tar layers, unpack a reference with umoci.

Everything here is written from scratch for turbofs' tests:

* :class:`TarEntry` / :func:`write_layer_tar` write PAX tar layers byte by byte (we do not use
  :mod:`tarfile` for layers, so that nanosecond mtimes, raw-byte xattrs and non-UTF-8 names are
  under our control and huge files can be streamed from a generator).
* :func:`write_oci_layout` turns lists of entries into a standard OCI image layout, with
  deterministic bytes (same input -> same digests).
* :func:`write_oci_archive` / :func:`write_docker_archive` wrap a layout into the two archive
  transports skopeo understands.
* :func:`umoci_unpack` produces the reference root file system; :func:`snapshot_tree` and
  :func:`diff_snapshots` compare trees; :func:`expected_tree` is a small independent model of
  layer flattening (OCI whiteout rules) that the self-tests check against umoci.

What ``umoci unpack`` (umoci 0.4.7, Debian package, run as root on ext4) does with metadata,
found by experiment; tests/test_ocifixtures.py asserts these (the two unreproducible
mtimes below are excluded from the comparison there, not asserted):

* Regular files: content, mode, uid/gid (also > 2097151, via PAX "uid"/"gid") and nanosecond
  mtime are reproduced exactly.
* setuid / setgid / sticky bits: kept (files and directories). umoci chmods after chowning,
  so the kernel's clearing of setuid on chown does not bite.
* Directory mtimes: kept, including directories whose contents a later layer changes without
  listing the directory again (adding a child, a whiteout, an opaque marker): umoci restores
  the parent's mtime after each change. A directory listed again in an upper layer takes that
  entry's mode/owner/mtime and *its* xattrs (the old xattrs are dropped, not merged).
  One quirk: "x/" re-created in a layer *and* "x" whited out in the same layer (whiteout after
  the new entries) keeps the new contents but leaves x's mtime at the time of the unpack (the
  removal of the lower children is not followed by a restore). Avoid that order in tests or
  exclude that path's mtime; whiteouts placed before the new entries are fine.
* Parent directories need not be listed: umoci creates missing parents as root:root 0o755
  with the *current time* as mtime -- not reproducible, hence IMPLICIT_MTIME / mtime_known().
* Symlinks: target (any bytes, also > 100 bytes) and nanosecond mtime kept (lutimes); mode is
  always 0o777 on Linux whatever the tar says; owner kept (lchown). snapshot_tree reports no
  xattrs for symlinks.
* Hardlinks: a hard link to the target's inode, so every piece of metadata of the link is the
  target's; the hardlink header's own mode/uid/mtime/xattrs are ignored. Links to files of a
  lower layer work; replacing the target in a later layer leaves the link on the old inode.
  A hardlink to a symlink makes a second name for the symlink inode (snapshot_tree gives
  link_group only to regular files).
* Xattrs: user.*, trusted.* and security.capability are all set, raw bytes (NULs included),
  also on directories, also on a non-root-owned file with a capability (umoci sets xattrs after
  chown, which would otherwise clear security.capability). trusted.* needs CAP_SYS_ADMIN: it
  would be lost in a rootless/user-namespace run, which is why callers can pass
  ``ignore_xattrs`` to diff_snapshots. The ext4 file system holding /work and /tmp here keeps
  user.*, trusted.* and security.* xattrs (probe_xattr() checks a directory at run time).
* Device nodes and FIFOs: created with the right (major, minor), mode and owner; we are root
  with CAP_MKNOD outside a user namespace here, so mknod works. Not so in rootless runs.
* Non-UTF-8 names and symlink targets (PAX "path"/"linkpath" with raw bytes) come out
  byte-exact; long names (> 100 bytes) too.
* Whiteouts / opaque markers act only on lower layers: entries of the same layer survive
  whatever the order of marker and entries. Whiteouts of missing paths are ignored.
* Media types: umoci 0.4.7 unpacks +gzip and uncompressed layers but refuses
  application/vnd.oci.image.layer.v1.tar+zstd ("blob is not correct mediatype"); it also
  refuses Docker schema 2 manifests. skopeo 1.9.3 reads zstd layers, but its oci: transport
  does not find index.json entries whose mediaType is the Docker manifest type ("no
  descriptor found for reference"); use write_docker_archive for Docker media types.
* Apart from the implicit parents and the one whiteout quirk above, expected_tree() (our own
  model of flattening) and umoci agree on every EntryInfo field, which the self-tests check.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

__all__ = [
    "DEFAULT_MTIME",
    "IMPLICIT_MTIME",
    "EntryInfo",
    "ImageInfo",
    "TarEntry",
    "ToolError",
    "Writer",
    "blob_path",
    "can_mknod",
    "default_content",
    "default_ignore_xattr",
    "diff_snapshots",
    "expected_tree",
    "layer_media_type",
    "layer_tar_bytes",
    "mtime_known",
    "opaque",
    "probe_xattr",
    "pseudo_random",
    "read_blob",
    "read_layer_tar",
    "read_manifest",
    "skopeo_inspect",
    "snapshot_tree",
    "umoci_unpack",
    "whiteout",
    "write_docker_archive",
    "write_layer_tar",
    "write_oci_archive",
    "write_oci_layout",
]

DEFAULT_MTIME: tuple[int, int] = (1700000000, 123456789)
"""Default (seconds, nanoseconds) mtime of a :class:`TarEntry`."""

ENTRY_TYPES = ("file", "dir", "symlink", "hardlink", "char", "block", "fifo")

_TYPEFLAGS: dict[str, bytes] = {
    "file": b"0",
    "hardlink": b"1",
    "symlink": b"2",
    "char": b"3",
    "block": b"4",
    "dir": b"5",
    "fifo": b"6",
}
_TYPES_BY_FLAG: dict[bytes, str] = {v: k for k, v in _TYPEFLAGS.items()}
_TYPES_BY_FLAG[b"\0"] = "file"  # pre-POSIX regular file
_TYPES_BY_FLAG[b"7"] = "file"  # contiguous file, treated as regular

WHITEOUT_PREFIX = b".wh."
OPAQUE_NAME = b".wh..wh..opq"

_BLOCK = 512
_CHUNK = 1 << 20  # streaming granularity for file content
_MAX_OCTAL_12 = 8**11 - 1  # size / mtime fields: 11 octal digits + NUL
_MAX_OCTAL_8 = 8**7 - 1  # mode / uid / gid / devmajor / devminor: 7 octal digits + NUL


def _b(value: bytes | str) -> bytes:
    """Path-ish value as raw bytes (str is encoded as UTF-8, surrogate escapes kept raw)."""
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------------
# Tar entries and the layer tar writer
# --------------------------------------------------------------------------------------------


def pseudo_random(seed: int, size: int) -> bytes:
    """``size`` incompressible bytes determined by ``seed`` (a chain of SHA-256 digests)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(b"turbofs-random-%d-%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:size])


def default_content(offset: int, length: int) -> bytes:
    """Deterministic, cheap, not-trivially-compressible content for big generated files.

    The file is a sequence of 64 KiB blocks; block ``i`` is a 32-byte SHA-256 of ``i`` repeated.
    Any byte range can be produced without producing what is before it.
    """
    block = 1 << 16
    out = bytearray()
    pos = offset
    end = offset + length
    while pos < end:
        index, inner = divmod(pos, block)
        pattern = hashlib.sha256(b"turbofs-fixture-%d" % index).digest() * (block // 32)
        take = min(block - inner, end - pos)
        out += pattern[inner : inner + take]
        pos += take
    return bytes(out)


@dataclass
class TarEntry:
    """One entry of a hand-written layer tar."""

    name: bytes | str  # path inside the layer, relative, e.g. "usr/bin/x"
    type: str = "file"  # one of ENTRY_TYPES
    data: bytes = b""  # content for files
    mode: int = 0o644  # permission bits incl. setuid/setgid/sticky (07777)
    uid: int = 0
    gid: int = 0
    mtime: tuple[int, int] = DEFAULT_MTIME  # (seconds, nanoseconds)
    linkname: bytes | str = ""  # symlink target or hardlink target path
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    size: int | None = None  # with empty data: a generated file of this size
    content_gen: Callable[[int, int], bytes] | None = None  # (offset, length) -> bytes

    @property
    def name_bytes(self) -> bytes:
        return _b(self.name)

    @property
    def linkname_bytes(self) -> bytes:
        return _b(self.linkname)

    @property
    def file_size(self) -> int:
        """Content size for files (0 for every other type)."""
        if self.type != "file":
            return 0
        if self.data:
            return len(self.data)
        return self.size or 0

    @property
    def mtime_ns(self) -> int:
        return self.mtime[0] * 1_000_000_000 + self.mtime[1]

    def validate(self) -> None:
        if self.type not in ENTRY_TYPES:
            raise ValueError(f"{self.name!r}: unknown entry type {self.type!r}")
        if not self.name_bytes or self.name_bytes.startswith(b"/"):
            raise ValueError(f"{self.name!r}: name must be relative and non-empty")
        if b"\0" in self.name_bytes or b"\0" in self.linkname_bytes:
            raise ValueError(f"{self.name!r}: NUL byte in name or linkname")
        if self.mode & ~0o7777:
            raise ValueError(f"{self.name!r}: mode {self.mode:o} has bits outside 07777")
        if self.type != "file" and (self.data or self.size):
            raise ValueError(f"{self.name!r}: only files carry data")
        if self.type == "file" and self.data and self.size not in (None, len(self.data)):
            raise ValueError(f"{self.name!r}: size {self.size} != len(data) {len(self.data)}")
        if self.type in ("symlink", "hardlink") and not self.linkname_bytes:
            raise ValueError(f"{self.name!r}: {self.type} needs a linkname")
        if self.type not in ("symlink", "hardlink") and self.linkname_bytes:
            raise ValueError(f"{self.name!r}: linkname only for symlink/hardlink")
        if not 0 <= self.mtime[1] < 1_000_000_000 or self.mtime[0] < 0:
            raise ValueError(f"{self.name!r}: bad mtime {self.mtime}")
        for value in (self.devmajor, self.devminor):
            if not 0 <= value <= _MAX_OCTAL_8:
                raise ValueError(f"{self.name!r}: device number {value} out of range")
        if self.uid < 0 or self.gid < 0:
            raise ValueError(f"{self.name!r}: negative uid/gid")
        for key in self.xattrs:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"{self.name!r}: bad xattr name {key!r}")


def whiteout(path: str | bytes) -> TarEntry:
    """A whiteout entry deleting ``path`` from lower layers ("dir/.wh.name")."""
    raw = _b(path).rstrip(b"/")
    parent, _, base = raw.rpartition(b"/")
    name = (parent + b"/" if parent else b"") + WHITEOUT_PREFIX + base
    return TarEntry(name=name, mode=0o600)


def opaque(dirpath: str | bytes) -> TarEntry:
    """An opaque-directory marker hiding everything below ``dirpath`` in lower layers."""
    raw = _b(dirpath).rstrip(b"/")
    return TarEntry(name=raw + b"/" + OPAQUE_NAME, mode=0o600)


class Writer(Protocol):
    """Anything with a binary ``write`` (files, BytesIO, compressors, hashing tees)."""

    def write(self, data: bytes, /) -> object: ...


def _octal(value: int, width: int) -> bytes:
    """Zero-padded octal number field of ``width`` bytes, NUL-terminated."""
    return b"%0*o\0" % (width - 1, value)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One "LEN KEY=VALUE\\n" record; LEN counts the whole record including itself."""
    body = b" " + key + b"=" + value + b"\n"
    digits = len(str(len(body)))
    while len(str(len(body) + digits)) != digits:
        digits += 1
    return b"%d" % (len(body) + digits) + body


def _ascii_field(raw: bytes, width: int) -> bytes:
    """Best-effort ustar field for a value that is also carried in a PAX record."""
    safe = bytes(c if 0x20 <= c < 0x7F else 0x5F for c in raw)
    return safe[-width:] if len(safe) > width else safe


def _ustar_header(
    *,
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    if len(name) > 100 or len(linkname) > 100:
        raise AssertionError("caller must move long names to PAX records")
    header = b"".join(
        [
            name.ljust(100, b"\0"),
            _octal(mode, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,  # checksum, computed below with this field as spaces
            typeflag,
            linkname.ljust(100, b"\0"),
            b"ustar\x0000",
            b"\0" * 32,  # uname
            b"\0" * 32,  # gname
            _octal(devmajor, 8),
            _octal(devminor, 8),
            b"\0" * 155,  # prefix (unused: long names go to PAX "path")
            b"\0" * 12,
        ]
    )
    assert len(header) == _BLOCK
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _pad(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _pax_records_for(entry: TarEntry, header_name: bytes, size: int) -> list[bytes]:
    records: list[bytes] = []
    name = header_name
    if len(name) > 100 or not name.isascii():
        records.append(pax_record(b"path", name))
    link = entry.linkname_bytes
    if len(link) > 100 or not link.isascii():
        records.append(pax_record(b"linkpath", link))
    seconds, nanos = entry.mtime
    if nanos or seconds > _MAX_OCTAL_12:
        records.append(pax_record(b"mtime", b"%d.%09d" % (seconds, nanos)))
    if size > _MAX_OCTAL_12:
        records.append(pax_record(b"size", b"%d" % size))
    if entry.uid > _MAX_OCTAL_8:
        records.append(pax_record(b"uid", b"%d" % entry.uid))
    if entry.gid > _MAX_OCTAL_8:
        records.append(pax_record(b"gid", b"%d" % entry.gid))
    for key in sorted(entry.xattrs):
        records.append(pax_record(b"SCHILY.xattr." + _b(key), entry.xattrs[key]))
    return records


def _write_entry(entry: TarEntry, out: Writer, index: int) -> None:
    entry.validate()
    name = entry.name_bytes
    if entry.type == "dir" and not name.endswith(b"/"):
        name += b"/"
    size = entry.file_size
    records = _pax_records_for(entry, name, size)
    seconds = entry.mtime[0]
    if records:
        payload = b"".join(records)
        out.write(
            _ustar_header(
                name=b"PaxHeaders.0/%d" % index,
                mode=0o644,
                uid=0,
                gid=0,
                size=len(payload),
                mtime=min(seconds, _MAX_OCTAL_12),
                typeflag=b"x",
            )
        )
        out.write(payload + _pad(len(payload)))
    link = entry.linkname_bytes
    out.write(
        _ustar_header(
            name=name if len(name) <= 100 and name.isascii() else _ascii_field(name, 100),
            mode=entry.mode,
            uid=entry.uid if entry.uid <= _MAX_OCTAL_8 else 0,
            gid=entry.gid if entry.gid <= _MAX_OCTAL_8 else 0,
            size=size if size <= _MAX_OCTAL_12 else 0,
            mtime=min(seconds, _MAX_OCTAL_12),
            typeflag=_TYPEFLAGS[entry.type],
            linkname=link if len(link) <= 100 and link.isascii() else _ascii_field(link, 100),
            devmajor=entry.devmajor,
            devminor=entry.devminor,
        )
    )
    if entry.type != "file" or size == 0:
        return
    if entry.data:
        out.write(entry.data)
    else:
        gen = entry.content_gen or default_content
        offset = 0
        while offset < size:
            want = min(_CHUNK, size - offset)
            chunk = gen(offset, want)
            if len(chunk) != want:
                raise ValueError(
                    f"{entry.name!r}: content_gen({offset}, {want}) returned {len(chunk)} bytes"
                )
            out.write(chunk)
            offset += want
    out.write(_pad(size))


def write_layer_tar(entries: Iterable[TarEntry], out: Writer) -> None:
    """Write ``entries`` as a PAX tar stream (ending with two zero blocks) to ``out``.

    Non-ASCII or long names/link targets go into PAX "path"/"linkpath" records as raw bytes
    (byte-exact, may be invalid UTF-8); nanosecond mtimes into "mtime" ("SEC.NNNNNNNNN");
    xattrs into "SCHILY.xattr.NAME" with the raw value; sizes >= 8 GiB into "size". File content
    is streamed in 1 MiB pieces, so files of any size can be written.
    """
    for index, entry in enumerate(entries):
        _write_entry(entry, out, index)
    out.write(b"\0" * (2 * _BLOCK))


def layer_tar_bytes(entries: Iterable[TarEntry]) -> bytes:
    """The layer tar of ``entries`` as one bytes object (for small layers)."""
    buf = io.BytesIO()
    write_layer_tar(entries, buf)
    return buf.getvalue()


def _parse_pax(payload: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0:
            break
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        record = payload[space + 1 : pos + length]
        if not record.endswith(b"\n"):
            raise ValueError("malformed PAX record")
        key, _, value = record[:-1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _field_int(raw: bytes) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def read_layer_tar(data: bytes | BinaryIO) -> list[TarEntry]:
    """Parse a (small, uncompressed) tar back into :class:`TarEntry` values, names as bytes.

    An independent reader for round-trip checks of :func:`write_layer_tar`; understands the
    PAX records that writer emits (plus global headers are skipped). Not for huge files.
    """
    stream: BinaryIO = io.BytesIO(data) if isinstance(data, bytes) else data
    entries: list[TarEntry] = []
    pax: dict[bytes, bytes] = {}
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK or header == b"\0" * _BLOCK:
            break
        typeflag = header[156:157]
        size = _field_int(header[124:136])
        if typeflag in (b"x", b"g"):
            payload = stream.read(size)
            stream.read(-size % _BLOCK)
            if typeflag == b"x":
                pax = _parse_pax(payload)
            continue
        size = int(pax[b"size"]) if b"size" in pax else size
        name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        name = pax.get(b"path", name)
        link = pax.get(b"linkpath", header[157:257].split(b"\0", 1)[0])
        if b"mtime" in pax:
            sec_text, _, frac = pax[b"mtime"].partition(b".")
            mtime = (int(sec_text), int((frac + b"000000000")[:9]))
        else:
            mtime = (_field_int(header[136:148]), 0)
        kind = _TYPES_BY_FLAG.get(typeflag)
        if kind is None:
            raise ValueError(f"unsupported tar typeflag {typeflag!r} for {name!r}")
        content = stream.read(size) if kind == "file" else b""
        stream.read(-size % _BLOCK if kind == "file" else 0)
        xattrs = {
            key[len(b"SCHILY.xattr.") :].decode("utf-8", "surrogateescape"): value
            for key, value in pax.items()
            if key.startswith(b"SCHILY.xattr.")
        }
        entries.append(
            TarEntry(
                name=name.rstrip(b"/") if kind == "dir" else name,
                type=kind,
                data=content,
                mode=_field_int(header[100:108]) & 0o7777,
                uid=int(pax[b"uid"]) if b"uid" in pax else _field_int(header[108:116]),
                gid=int(pax[b"gid"]) if b"gid" in pax else _field_int(header[116:124]),
                mtime=mtime,
                linkname=link if kind in ("symlink", "hardlink") else b"",
                devmajor=_field_int(header[329:337]),
                devminor=_field_int(header[337:345]),
                xattrs=xattrs,
            )
        )
        pax = {}
    return entries


# --------------------------------------------------------------------------------------------
# OCI image layout writer
# --------------------------------------------------------------------------------------------

OCI_LAYOUT_VERSION = "1.0.0"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
FIXTURE_CREATED = "2023-11-14T22:13:20Z"  # 1700000000

_COMPRESSIONS = ("gzip", "zstd", "none")


def layer_media_type(compression: str, *, docker: bool = False) -> str:
    """Media type of a layer blob compressed with ``compression`` (gzip | zstd | none)."""
    if compression not in _COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}")
    if docker:
        if compression == "zstd":
            raise ValueError("Docker schema 2 has no zstd layer media type")
        return MT_DOCKER_LAYER + (".gzip" if compression == "gzip" else "")
    return MT_OCI_LAYER + {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]


@dataclass
class ImageInfo:
    """What :func:`write_oci_layout` wrote."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    layer_media_types: list[str] = field(default_factory=list)
    manifest_media_type: str = MT_OCI_MANIFEST


class _HashingWriter:
    """Write-through tee that hashes and counts what passes (optionally into a sink)."""

    def __init__(self, sink: Writer | None = None) -> None:
        self.sink = sink
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self.hasher.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.sink, "flush", None)
        if flush is not None:
            flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    """Path of blob ``digest`` ("sha256:HEX") inside an OCI layout."""
    algorithm, _, hexpart = digest.partition(":")
    if not hexpart or "/" in hexpart or "/" in algorithm:
        raise ValueError(f"bad digest {digest!r}")
    return Path(layout) / "blobs" / algorithm / hexpart


def read_blob(layout: Path, digest: str) -> bytes:
    """The bytes of blob ``digest`` (for small blobs: manifests, configs, indexes)."""
    return blob_path(layout, digest).read_bytes()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _store_blob_bytes(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest, len(data)


class _BlobFile:
    """A blob being streamed into ``blobs/sha256``; renamed to its digest on :meth:`commit`."""

    def __init__(self, layout: Path) -> None:
        self.dir = Path(layout) / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-blob-", dir=self.dir)
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.hashing = _HashingWriter(self.file)

    def commit(self) -> tuple[str, int]:
        self.file.close()
        digest = self.hashing.digest
        os.replace(self.tmp, blob_path(self.dir.parent.parent, digest))
        return digest, self.hashing.size

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _write_layer_blob(
    layout: Path, layer: Sequence[TarEntry] | bytes, compression: str
) -> tuple[str, int, str]:
    """Stream one layer into the layout; return (blob digest, blob size, diff_id)."""
    blob = _BlobFile(layout)
    try:
        compressor: Any
        if compression == "gzip":
            compressor = gzip.GzipFile(
                filename="", mode="wb", compresslevel=6, fileobj=blob.hashing, mtime=0
            )
        elif compression == "zstd":
            compressor = zstandard.ZstdCompressor(level=3).stream_writer(
                cast("IO[bytes]", blob.hashing), closefd=False
            )
        elif compression == "none":
            compressor = None
        else:
            raise ValueError(f"unknown compression {compression!r}")
        uncompressed = _HashingWriter(compressor if compressor is not None else blob.hashing)
        if isinstance(layer, bytes):
            uncompressed.write(layer)
        else:
            write_layer_tar(layer, uncompressed)
        if compressor is not None:
            compressor.close()
        digest, size = blob.commit()
    except BaseException:
        blob.abort()
        raise
    return digest, size, uncompressed.digest


def write_oci_layout(
    layout: Path,
    layers: Sequence[Sequence[TarEntry] | bytes],
    *,
    compression: str | Sequence[str] = "gzip",
    tag: str = "latest",
    config: dict[str, Any] | None = None,
    architecture: str = "amd64",
    os_name: str = "linux",
    docker_media_types: bool = False,
) -> ImageInfo:
    """Write (or add a tag to) an OCI image layout at ``layout``.

    ``layers[i]`` is a list of entries or an already-built uncompressed tar. ``compression`` is
    gzip | zstd | none for all layers, or a list with one value per layer. ``config`` is merged
    into the image config's "config" object (Entrypoint, Cmd, Env, WorkingDir, User, Labels...).
    With ``docker_media_types`` the manifest/config/layers use Docker schema 2 media types
    (gzip or none only); skopeo reads such a layout, umoci refuses it.

    The output is deterministic. An existing layout is reused: blobs are shared and the
    index.json entry carrying the same tag is replaced, other tags are kept.
    """
    layout = Path(layout)
    compressions = (
        [compression] * len(layers) if isinstance(compression, str) else list(compression)
    )
    if len(compressions) != len(layers):
        raise ValueError("need one compression per layer")
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    layer_descriptors: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for layer, comp in zip(layers, compressions, strict=True):
        media_type = layer_media_type(comp, docker=docker_media_types)
        digest, size, diff_id = _write_layer_blob(layout, layer, comp)
        layer_descriptors.append({"mediaType": media_type, "digest": digest, "size": size})
        diff_ids.append(diff_id)

    image_config: dict[str, Any] = {
        "created": FIXTURE_CREATED,
        "architecture": architecture,
        "os": os_name,
        "config": dict(config or {}),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": FIXTURE_CREATED, "created_by": f"ocifixtures layer {i}"}
            for i in range(len(layers))
        ],
    }
    config_digest, config_size = _store_blob_bytes(layout, _json_bytes(image_config))
    manifest_mt = MT_DOCKER_MANIFEST if docker_media_types else MT_OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_mt,
        "config": {
            "mediaType": MT_DOCKER_CONFIG if docker_media_types else MT_OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descriptors,
    }
    manifest_digest, manifest_size = _store_blob_bytes(layout, _json_bytes(manifest))

    (layout / "oci-layout").write_bytes(_json_bytes({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    index_path = layout / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_bytes())
    index["manifests"] = [
        m
        for m in index.get("manifests", [])
        if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": manifest_mt,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {REF_NAME_ANNOTATION: tag},
        }
    )
    index_path.write_bytes(_json_bytes(index))
    return ImageInfo(
        layout=layout,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=[d["digest"] for d in layer_descriptors],
        diff_ids=diff_ids,
        layer_media_types=[d["mediaType"] for d in layer_descriptors],
        manifest_media_type=manifest_mt,
    )


def read_manifest(layout: Path, tag: str) -> tuple[str, dict[str, Any]]:
    """(digest, parsed manifest) of the manifest tagged ``tag`` in an OCI layout."""
    index = json.loads((Path(layout) / "index.json").read_bytes())
    for descriptor in index.get("manifests", []):
        if descriptor.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            digest = str(descriptor["digest"])
            manifest: dict[str, Any] = json.loads(read_blob(layout, digest))
            return digest, manifest
    raise KeyError(f"tag {tag!r} not in {layout}/index.json")


def _decompressed_reader(path: Path, media_type: str) -> contextlib.AbstractContextManager[Any]:
    if media_type.endswith(("+gzip", ".gzip")):
        return gzip.open(path, "rb")
    if media_type.endswith("+zstd"):
        raw = path.open("rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return contextlib.closing(reader)
    if media_type in (MT_OCI_LAYER, MT_DOCKER_LAYER):
        return path.open("rb")
    raise ValueError(f"unsupported layer media type {media_type!r}")


# --------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------


def _tarinfo(name: str, *, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def write_oci_archive(layout: Path, archive: Path) -> None:
    """Tar the layout directory (files at the archive root, as skopeo's oci-archive: writes)."""
    layout = Path(layout)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(layout):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(layout)
            if rel_dir != Path("."):
                tar.addfile(_tarinfo(rel_dir.as_posix(), directory=True))
            for filename in sorted(filenames):
                if filename.startswith(".tmp-"):
                    continue
                path = Path(dirpath) / filename
                rel = (rel_dir / filename).as_posix()
                with path.open("rb") as f:
                    tar.addfile(_tarinfo(rel, size=path.stat().st_size), f)


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag:
        return repo_tag, "latest"
    return repo, tag


def write_docker_archive(
    layout: Path, tag: str, archive: Path, repo_tag: str = "example.com/test:latest"
) -> None:
    """Write image ``tag`` of an OCI layout as a ``docker save`` tarball.

    Contents: ``manifest.json`` ([{Config, RepoTags, Layers}]), the config as ``<hex>.json``
    (same bytes, so the image ID is unchanged), every layer uncompressed as
    ``<diff_id hex>/layer.tar`` and a legacy ``repositories`` file.
    """
    layout = Path(layout)
    archive = Path(archive)
    _, manifest = read_manifest(layout, tag)
    config_digest = str(manifest["config"]["digest"])
    config_bytes = read_blob(layout, config_digest)
    diff_ids: list[str] = json.loads(config_bytes)["rootfs"]["diff_ids"]
    layers: list[dict[str, Any]] = manifest["layers"]
    if len(diff_ids) != len(layers):
        raise ValueError("config diff_ids and manifest layers disagree")
    config_name = config_digest.partition(":")[2] + ".json"
    layer_names = [d.partition(":")[2] + "/layer.tar" for d in diff_ids]
    repo, repo_tag_part = _split_repo_tag(repo_tag)
    docker_manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    repositories = {repo: {repo_tag_part: diff_ids[-1].partition(":")[2] if diff_ids else ""}}

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        written: set[str] = set()
        for descriptor, diff_id, name in zip(layers, diff_ids, layer_names, strict=True):
            if name in written:
                continue
            written.add(name)
            src = blob_path(layout, str(descriptor["digest"]))
            with tempfile.TemporaryFile(dir=archive.parent) as tmp:
                hasher = _HashingWriter(tmp)
                with _decompressed_reader(src, str(descriptor["mediaType"])) as reader:
                    while chunk := reader.read(_CHUNK):
                        hasher.write(chunk)
                if hasher.digest != diff_id:
                    raise ValueError(f"layer {descriptor['digest']} does not match {diff_id}")
                tmp.seek(0)
                tar.addfile(_tarinfo(name.partition("/")[0], directory=True))
                tar.addfile(_tarinfo(name, size=hasher.size), tmp)
        tar.addfile(_tarinfo(config_name, size=len(config_bytes)), io.BytesIO(config_bytes))
        for name, payload in (
            ("manifest.json", _json_bytes(docker_manifest)),
            ("repositories", _json_bytes(repositories)),
        ):
            tar.addfile(_tarinfo(name, size=len(payload)), io.BytesIO(payload))


# --------------------------------------------------------------------------------------------
# skopeo / umoci
# --------------------------------------------------------------------------------------------


class ToolError(RuntimeError):
    """An external tool (skopeo, umoci) failed; the message carries its stderr."""


def _run_tool(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    if shutil.which(argv[0]) is None:
        raise ToolError(f"{argv[0]} is not installed")
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise ToolError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}:\n"
            + proc.stderr.decode("utf-8", "replace")
        )
    return proc


def skopeo_inspect(ref: str, *, raw: bool = False, config: bool = False) -> dict[str, Any]:
    """Parsed JSON of ``skopeo inspect`` for a transport reference ("oci:DIR:TAG", ...).

    Default: the summary (Digest, Layers, Env, Architecture, Os, Labels...). ``raw=True``:
    the manifest as stored (``--raw``); ``config=True``: the image config (``--config``, which
    is where Entrypoint/Cmd/WorkingDir live). Raises :class:`ToolError` with skopeo's stderr.
    """
    argv = ["skopeo", "inspect"]
    if raw:
        argv.append("--raw")
    if config:
        argv.append("--config")
    argv.append(ref)
    result: dict[str, Any] = json.loads(_run_tool(argv).stdout)
    return result


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    """``umoci unpack --image LAYOUT:TAG DEST`` (as root: owners kept); returns DEST/rootfs.

    Use a fresh ``dest``: umoci 0.4.7 also unpacks into an existing directory, mixing trees.
    """
    _run_tool(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)])
    return Path(dest) / "rootfs"


# --------------------------------------------------------------------------------------------
# Tree snapshots
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryInfo:
    """Metadata of one path of an unpacked tree, comparable across trees."""

    type: str  # file, dir, symlink, char, block, fifo (socket if one is found)
    mode: int  # permission bits (st_mode & 0o7777)
    uid: int
    gid: int
    size: int  # files: byte size; symlinks: len(target); others 0
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]  # sorted by name
    target: bytes  # symlink target, else b""
    rdev: tuple[int, int]  # (major, minor) for devices, else (0, 0)
    sha256: str  # hex digest of file content, else ""
    link_group: bytes  # regular files with nlink > 1: smallest path sharing the inode; else b""


ENTRY_FIELDS = tuple(EntryInfo.__dataclass_fields__)


def default_ignore_xattr(name: str) -> bool:
    """Xattrs :func:`snapshot_tree` leaves out by default: only ``security.selinux``."""
    return name == "security.selinux"


def _kind(st_mode: int) -> str:
    for check, kind in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if check(st_mode):
            return kind
    raise ValueError(f"unknown file type {st_mode:o}")


def probe_xattr(directory: Path, name: str = "user.turbofs-probe") -> bool:
    """Whether a file in ``directory`` can carry xattr ``name`` (set, read back, listed)."""
    fd, tmp = tempfile.mkstemp(prefix=".xattr-probe-", dir=directory)
    os.close(fd)
    try:
        os.setxattr(tmp, name, b"\x00probe\xff")
        return os.getxattr(tmp, name) == b"\x00probe\xff" and name in os.listxattr(tmp)
    except OSError:
        return False
    finally:
        os.unlink(tmp)


def can_mknod(directory: Path) -> bool:
    """Whether we may create a character device node (1, 3) in ``directory``."""
    path = Path(tempfile.mkdtemp(prefix=".mknod-probe-", dir=directory)) / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        return True
    except OSError:
        return False
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


def _hash_file(path: bytes) -> str:
    hasher = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _walk(root: bytes, rel: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        child_rel = rel + b"/" + child.name if rel else child.name
        st = child.stat(follow_symlinks=False)
        yield child_rel, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, child_rel)


def snapshot_tree(
    root: Path, *, ignore_xattrs: Callable[[str], bool] = default_ignore_xattr
) -> dict[bytes, EntryInfo]:
    """Metadata of every path below ``root`` (not following symlinks; root itself excluded).

    Keys are paths relative to ``root`` as bytes without a leading "/". Symlinks get no xattrs.
    """
    root_b = os.fsencode(root)
    raw: dict[bytes, tuple[os.stat_result, EntryInfo]] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, st in _walk(root_b, b""):
        path = os.path.join(root_b, rel)
        kind = _kind(st.st_mode)
        target = os.readlink(path) if kind == "symlink" else b""
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if kind != "symlink":
            names = sorted(n for n in os.listxattr(path, follow_symlinks=False))
            xattrs = tuple(
                (n, os.getxattr(path, n, follow_symlinks=False))
                for n in names
                if not ignore_xattrs(n)
            )
        if kind == "file":
            size = st.st_size
            if st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif kind == "symlink":
            size = len(target)
        else:
            size = 0
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else (0, 0)
        info = EntryInfo(
            type=kind,
            mode=st.st_mode & 0o7777,
            uid=st.st_uid,
            gid=st.st_gid,
            size=size,
            mtime_ns=st.st_mtime_ns,
            xattrs=xattrs,
            target=target,
            rdev=rdev,
            sha256=_hash_file(path) if kind == "file" else "",
            link_group=b"",
        )
        raw[rel] = (st, info)
    result = {rel: info for rel, (_, info) in raw.items()}
    for paths in inodes.values():
        group = min(paths)
        for rel in paths:
            result[rel] = _replace(result[rel], link_group=group)
    return result


def _replace(info: EntryInfo, **changes: Any) -> EntryInfo:
    values = {name: getattr(info, name) for name in ENTRY_FIELDS}
    values.update(changes)
    return EntryInfo(**values)


def _show(field_name: str, value: Any) -> str:
    if field_name == "mode" and isinstance(value, int):
        return f"0o{value:o}"
    return repr(value)


def diff_snapshots(
    expected: dict[bytes, EntryInfo],
    actual: dict[bytes, EntryInfo],
    *,
    compare_mtime_of: Callable[[bytes, EntryInfo], bool] = lambda p, e: True,
    ignore_fields: Collection[str] = (),
    ignore_xattrs: Callable[[str], bool] = lambda name: False,
) -> list[str]:
    """Human-readable differences between two snapshots; an empty list means equal.

    ``compare_mtime_of(path, expected_info)`` picks the paths whose mtime is compared;
    ``ignore_fields`` names EntryInfo fields never compared (e.g. ``{"xattrs"}``);
    ``ignore_xattrs(name)`` drops single xattrs from both sides before comparing.
    """
    unknown = set(ignore_fields) - set(ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"unknown EntryInfo fields {sorted(unknown)}")
    out: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        want = expected.get(path)
        have = actual.get(path)
        if have is None:
            assert want is not None
            out.append(f"missing: {path!r} (expected {want.type})")
            continue
        if want is None:
            out.append(f"extra: {path!r} ({have.type})")
            continue
        for name in ENTRY_FIELDS:
            if name in ignore_fields:
                continue
            if name == "mtime_ns" and not compare_mtime_of(path, want):
                continue
            a, b = getattr(want, name), getattr(have, name)
            if name == "xattrs":
                a = tuple(kv for kv in a if not ignore_xattrs(kv[0]))
                b = tuple(kv for kv in b if not ignore_xattrs(kv[0]))
            if a != b:
                out.append(f"{path!r}: {name} expected {_show(name, a)}, actual {_show(name, b)}")
    return out


# --------------------------------------------------------------------------------------------
# A small model of layer flattening
# --------------------------------------------------------------------------------------------

IMPLICIT_DIR_MODE = 0o755
"""Mode ``expected_tree`` gives to parent directories a layer does not list (see findings)."""

IMPLICIT_MTIME = -1
"""``mtime_ns`` that ``expected_tree`` gives to unlisted parents: umoci stamps them with the
time of the unpack, which no test can predict. Tar mtimes are never negative."""


def mtime_known(path: bytes, info: EntryInfo) -> bool:
    """``compare_mtime_of`` for :func:`diff_snapshots` against :func:`expected_tree`: compare
    every mtime except those of directories the layers never listed."""
    return info.mtime_ns != IMPLICIT_MTIME


@dataclass
class _Node:
    info: EntryInfo  # link_group is filled in at the end
    inode: int


def _entry_info(entry: TarEntry) -> EntryInfo:
    kind = entry.type
    data_hash = ""
    size = 0
    if kind == "file":
        size = entry.file_size
        if entry.data or not size:
            data_hash = hashlib.sha256(entry.data).hexdigest()
        else:
            gen = entry.content_gen or default_content
            hasher = hashlib.sha256()
            for offset in range(0, size, _CHUNK):
                hasher.update(gen(offset, min(_CHUNK, size - offset)))
            data_hash = hasher.hexdigest()
    target = entry.linkname_bytes if kind == "symlink" else b""
    return EntryInfo(
        type=kind,
        mode=0o777 if kind == "symlink" else entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        size=len(target) if kind == "symlink" else size,
        mtime_ns=entry.mtime_ns,
        # a PAX record with an empty value deletes the keyword (POSIX pax), so an xattr with an
        # empty value is no xattr at all; umoci agrees
        xattrs=() if kind == "symlink" else tuple(sorted((k, v) for k, v in entry.xattrs.items() if v)),
        target=target,
        rdev=(entry.devmajor, entry.devminor) if kind in ("char", "block") else (0, 0),
        sha256=data_hash,
        link_group=b"",
    )


def _clean(name: bytes) -> bytes:
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ValueError(f"'..' in layer path {name!r}")
    return b"/".join(parts)


def _under(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


def expected_tree(
    layers: Iterable[Iterable[TarEntry]],
    *,
    implicit_dir: Callable[[bytes], EntryInfo] | None = None,
) -> dict[bytes, EntryInfo]:
    """What unpacking ``layers`` in order should give, as a :func:`snapshot_tree`-style dict.

    OCI rules: in each layer, whiteouts ("x/.wh.name") and opaque markers ("x/.wh..wh..opq")
    act on the lower layers only; other entries are applied in order, a later entry for the
    same path replaces the earlier one (a directory over a directory only updates metadata);
    a hardlink shares the inode (and so all metadata) of its target, its own header metadata
    is ignored. Parents a layer does not list are created as ``implicit_dir(path)`` (default:
    root-owned 0o755 directory with mtime ``IMPLICIT_MTIME``; pass ``compare_mtime_of=
    mtime_known`` to :func:`diff_snapshots`).

    Directory mtimes are the entries' own mtimes: this models an unpacker that restores a
    directory's mtime after changing its contents, which is what umoci does (see findings).
    """

    def default_implicit(path: bytes) -> EntryInfo:
        return EntryInfo(
            "dir", IMPLICIT_DIR_MODE, 0, 0, 0, IMPLICIT_MTIME, (), b"", (0, 0), "", b""
        )

    make_dir = implicit_dir or default_implicit
    tree: dict[bytes, _Node] = {}
    counter = 0

    def ensure_parents(path: bytes) -> None:
        nonlocal counter
        parts = path.split(b"/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = b"/".join(parts[:i])
            node = tree.get(parent)
            if node is None or node.info.type != "dir":
                remove(parent)
                counter += 1
                tree[parent] = _Node(make_dir(parent), counter)

    def remove(path: bytes) -> None:
        for p in [p for p in tree if _under(p, path)]:
            del tree[p]

    for layer in layers:
        entries = list(layer)
        regular: list[TarEntry] = []
        for entry in entries:
            name = _clean(entry.name_bytes)
            parent, _, base = name.rpartition(b"/")
            if base == OPAQUE_NAME:
                for p in [p for p in tree if p != parent and _under(p, parent)]:
                    del tree[p]
            elif base.startswith(WHITEOUT_PREFIX):
                remove((parent + b"/" if parent else b"") + base[len(WHITEOUT_PREFIX) :])
            else:
                regular.append(entry)
        for entry in regular:
            name = _clean(entry.name_bytes)
            ensure_parents(name)
            old = tree.get(name)
            if entry.type == "hardlink":
                target = tree.get(_clean(entry.linkname_bytes))
                if target is None or target.info.type == "dir":
                    raise ValueError(f"hardlink {name!r} to missing/dir {entry.linkname!r}")
                remove(name)
                tree[name] = _Node(target.info, target.inode)
                continue
            info = _entry_info(entry)
            if old is not None and old.info.type == "dir" and info.type == "dir":
                tree[name] = _Node(info, old.inode)
                continue
            remove(name)
            counter += 1
            tree[name] = _Node(info, counter)

    groups: dict[int, list[bytes]] = {}
    for path, node in tree.items():
        if node.info.type == "file":
            groups.setdefault(node.inode, []).append(path)
    result = {path: node.info for path, node in tree.items()}
    for paths in groups.values():
        if len(paths) > 1:
            for path in paths:
                result[path] = _replace(result[path], link_group=min(paths))
    return result
