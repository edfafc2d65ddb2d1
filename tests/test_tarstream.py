"""The streaming tar reader against archives written by Python's tarfile in every format."""

from __future__ import annotations

import io
import tarfile

import pytest

from tests.ocifixtures import pseudo_random
from turbofs.core.tar import TarError, TarReader


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _read_all(data: bytes, piece: int = 7_777) -> list[tuple[bytes, str, bytes, int, int, bytes]]:
    pieces = iter(_pieces(data, piece))
    tar = TarReader(lambda: next(pieces, b""))
    out = []
    for e in tar:
        content = b""
        while chunk := tar.read(1000):
            content += chunk
        out.append((e.name, e.type, e.linkname, e.mode, e.uid, content))
    assert tar.ended
    return out


def _archive(fmt: int, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, name in enumerate(names):
            data = pseudo_random(i, 300 * i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o4755 if i % 2 else 0o644
            info.uid = 5_000_000 if fmt != tarfile.USTAR_FORMAT else 1000
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link-to-first")
        link.type = tarfile.LNKTYPE
        link.linkname = names[0]
        tf.addfile(link)
        sym = tarfile.TarInfo("sym")
        sym.type = tarfile.SYMTYPE
        sym.linkname = "x" * 150 if fmt != tarfile.USTAR_FORMAT else "short"
        tf.addfile(sym)
        dev = tarfile.TarInfo("dev/null")
        dev.type = tarfile.CHRTYPE
        dev.devmajor, dev.devminor = 1, 3
        tf.addfile(dev)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_agrees_with_tarfile(fmt: int) -> None:
    long = "d" * 90 + "/" + "e" * 90 + "/file"  # needs the ustar prefix or an extension
    names = ["short", long] if fmt != tarfile.USTAR_FORMAT else ["short", "p" * 60 + "/" + "n" * 60]
    names.append("f" * 200 if fmt != tarfile.USTAR_FORMAT else "plain")
    data = _archive(fmt, names)
    ours = _read_all(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        theirs = []
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            kind = {tarfile.REGTYPE: "file", tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink",
                    tarfile.CHRTYPE: "char"}[m.type]
            theirs.append((m.name.encode(), kind, m.linkname.encode(), m.mode, m.uid, f.read() if f else b""))
    assert ours == theirs
    for piece in (1, 512, 513, 1 << 20):
        assert _read_all(data, piece) == ours


def test_pax_values_stay_bytes_and_globals_apply() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tf:
        info = tarfile.TarInfo("x")
        info.pax_headers = {"SCHILY.xattr.user.k": "v", "mtime": "1700000000.123456789"}
        tf.addfile(info, io.BytesIO(b""))
    pieces = iter([buf.getvalue()])
    tar = TarReader(lambda: next(pieces, b""))
    (entry,) = list(tar)
    assert entry.pax[b"SCHILY.xattr.user.k"] == b"v"
    assert entry.pax[b"comment"] == b"global"
    assert entry.mtime_ns == 1_700_000_000_123_456_789


def test_an_empty_pax_value_deletes_the_record_but_is_an_own_xattr() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"SCHILY.xattr.user.g": "global", "comment": "global"}) as tf:
        info = tarfile.TarInfo("a" * 120)  # the name goes into a pax "path" record
        info.pax_headers = {"SCHILY.xattr.user.g": "", "SCHILY.xattr.user.own": "", "comment": ""}
        tf.addfile(info, io.BytesIO(b""))
    pieces = iter([buf.getvalue()])
    (entry,) = list(TarReader(lambda: next(pieces, b"")))
    assert entry.name == b"a" * 120
    assert b"SCHILY.xattr.user.g" not in entry.pax and b"comment" not in entry.pax  # globals deleted
    assert entry.pax[b"SCHILY.xattr.user.own"] == b""


def test_base256_numbers_and_old_directories() -> None:
    block = bytearray(512)
    block[0:4] = b"dir/"
    block[100:108] = b"0000755\0"
    block[108:116] = b"\x80" + (7_000_000).to_bytes(7, "big")  # base-256 uid
    block[116:124] = b"0000000\0"
    block[124:136] = b"00000000000\0"
    block[136:148] = b"14000000000\0"
    block[156:157] = b"\0"  # an old regular-file type with a trailing slash: a directory
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    (e,) = list(TarReader(iter([bytes(block) + bytes(1024), b""]).__next__))
    assert (e.type, e.uid, e.name) == ("dir", 7_000_000, b"dir/")


def test_bad_archives() -> None:
    with pytest.raises(TarError, match="checksum"):
        list(TarReader(iter([b"not a tar" * 100, b""]).__next__))
    with pytest.raises(TarError, match="empty"):
        list(TarReader(iter([b""]).__next__))
    good = _archive(tarfile.PAX_FORMAT, ["a", "b"])
    with pytest.raises(TarError, match="truncated"):
        _read_all(good[:1000])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("sparse")
        info.type = tarfile.GNUTYPE_SPARSE
        tf.addfile(info)
    with pytest.raises(TarError, match="sparse"):
        _read_all(buf.getvalue())
