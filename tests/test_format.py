"""The index format: encode/decode round trips, reader API, and malformed input."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbofs.core import format as fmt
from turbofs.core.errors import FormatError, NotFound

CS = 1 << 13  # 8 KiB chunks keep the examples small


def _chunk(i: int, blob: int, off: int, ulen: int) -> fmt.Chunk:
    return fmt.Chunk(i, hashlib.sha256(str(i).encode()).digest(), blob, off, 100, ulen)


def sample_index() -> bytes:
    """/ (root) with: bin/ (dir), bin/sh (file, 2 pieces + hole), bin/link (hardlink of sh),
    lib -> usr/lib (symlink), dev/null (char 1:3), fifo, empty, small (packed at 4096)."""
    D, R = stat.S_IFDIR, stat.S_IFREG
    inodes = [
        fmt.InodeSpec(
            D | 0o755,
            children=(
                (b"bin", 1),
                (b"lib", 3),
                (b"dev", 4),
                (b"fifo", 6),
                (b"empty", 7),
                (b"small", 8),
            ),
        ),
        fmt.InodeSpec(D | 0o755, uid=1, gid=2, children=((b"sh", 2), (b"link", 2))),
        fmt.InodeSpec(
            R | 0o4755,
            uid=0,
            gid=0,
            mtime_ns=1_700_000_000_123_456_789,
            size=CS * 2 + 10,
            xattrs=((b"security.capability", b"\x01\x00\x00\x02\xff"), (b"user.a", b"")),
            refs=((0, 0), (fmt.HOLE, 0), (1, 0)),
        ),
        fmt.InodeSpec(stat.S_IFLNK | 0o777, target=b"usr/lib"),
        fmt.InodeSpec(D | 0o755, children=((b"null", 5),)),
        fmt.InodeSpec(stat.S_IFCHR | 0o666, rdev=(1, 3)),
        fmt.InodeSpec(stat.S_IFIFO | 0o644, mtime_ns=-5),
        fmt.InodeSpec(R | 0o644),
        fmt.InodeSpec(R | 0o600, size=100, refs=((2, 4096),)),
    ]
    chunks = [_chunk(0, 0, 0, CS), _chunk(1, 0, 100, 10), _chunk(2, 1, 0, 4096 + 100)]
    blobs = [fmt.Blob(b"\1" * 32, 200), fmt.Blob(b"\2" * 32, 100)]
    return fmt.encode(chunk_size=CS, inodes=inodes, chunks=chunks, blobs=blobs, prefetch=[2, 0, 1])


def test_round_trip_reader_api() -> None:
    idx = fmt.Index.from_bytes(sample_index())
    idx.verify()
    assert idx.chunk_size == CS
    assert [n for n, _ in idx.listdir(idx.root)] == [
        b"bin",
        b"dev",
        b"empty",
        b"fifo",
        b"lib",
        b"small",
    ]
    sh = idx.resolve("bin/sh")
    assert idx.resolve(b"/bin/link") == sh
    node = idx.inode(sh)
    assert node.mode == stat.S_IFREG | 0o4755
    assert node.nlink == 2
    assert node.mtime_ns == 1_700_000_000_123_456_789
    assert node.size == CS * 2 + 10
    assert idx.xattrs(sh) == {b"security.capability": b"\x01\x00\x00\x02\xff", b"user.a": b""}
    bin_node = idx.inode(idx.resolve("bin"))
    assert (bin_node.uid, bin_node.gid, bin_node.nlink, bin_node.parent) == (1, 2, 2, idx.root)
    assert idx.inode(idx.root).nlink == 4  # ".", "..", bin/.., dev/..
    lib = idx.resolve("lib")
    assert idx.inode(lib).is_symlink and idx.readlink(lib) == b"usr/lib"
    assert idx.inode(lib).size == len(b"usr/lib")
    assert idx.inode(idx.resolve("dev/null")).rdev == (1, 3)
    assert idx.inode(idx.resolve("fifo")).mtime_ns == -5
    assert idx.prefetch_order() == [2, 0, 1]
    assert idx.lookup(idx.root, b"nope") is None
    with pytest.raises(NotFound):
        idx.resolve("bin/sh/x")
    with pytest.raises(NotFound):
        idx.resolve("missing")


def test_map_range_pieces_holes_and_packing() -> None:
    idx = fmt.Index.from_bytes(sample_index())
    sh = idx.resolve("bin/sh")
    whole = idx.map_range(sh, 0, 1 << 30)
    assert [
        (s.chunk.id if s.chunk else None, s.chunk_offset, s.length, s.file_offset) for s in whole
    ] == [
        (0, 0, CS, 0),
        (None, 0, CS, CS),
        (1, 0, 10, 2 * CS),
    ]
    mid = idx.map_range(sh, CS - 5, 10)
    assert [(s.chunk.id if s.chunk else None, s.chunk_offset, s.length) for s in mid] == [
        (0, CS - 5, 5),
        (None, 0, 5),
    ]
    assert idx.map_range(sh, 5 * CS, 10) == []
    small = idx.resolve("small")
    (piece,) = idx.map_range(small, 10, 50)
    assert piece.chunk is not None and (piece.chunk.id, piece.chunk_offset, piece.length) == (
        2,
        4106,
        50,
    )
    assert idx.map_range(idx.resolve("empty"), 0, 10) == []


def test_encoding_is_deterministic() -> None:
    assert sample_index() == sample_index()


def test_header_checks() -> None:
    blob = sample_index()
    with pytest.raises(FormatError, match="magic"):
        fmt.Index.from_bytes(b"NOTTURBO" + blob[8:])
    with pytest.raises(FormatError, match="version 99"):
        fmt.Index.from_bytes(blob[:8] + struct.pack("<H", 99) + blob[10:])
    with pytest.raises(FormatError, match="header"):
        fmt.Index.from_bytes(blob[:10])
    with pytest.raises(FormatError):
        fmt.Index.from_bytes(blob[:-1])
    with pytest.raises(FormatError, match="exceeds the limit"):
        fmt.Index.from_bytes(blob, max_payload=100)
    corrupt = bytearray(blob)
    corrupt[fmt.HEADER_SIZE - 1] ^= 0xFF  # the payload checksum
    with pytest.raises(FormatError, match="checksum"):
        fmt.Index.from_bytes(bytes(corrupt))


def _payload(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(blob[fmt.HEADER_SIZE :])


def _rewrap(payload: bytes) -> bytes:
    comp = zstandard.ZstdCompressor().compress(payload)
    header = struct.pack(
        "<8sHHIQQ32s",
        fmt.MAGIC,
        fmt.VERSION,
        0,
        fmt.HEADER_SIZE,
        len(payload),
        len(comp),
        hashlib.sha256(payload).digest(),
    )
    return header + comp


def _exercise(idx: fmt.Index) -> None:
    idx.verify()
    for path, ino in idx.walk():
        node = idx.inode(ino)
        idx.xattrs(ino)
        assert idx.resolve(path) == ino or node.nlink > 1
        if node.is_reg:
            total = sum(s.length for s in idx.map_range(ino, 0, node.size))
            assert total == node.size


_OK_ERRORS: tuple[type[Exception], ...] = (FormatError, NotFound, NotADirectoryError, ValueError)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_fuzz_payload_mutations(data: st.DataObject) -> None:
    """A mutated payload (with a valid checksum) either decodes consistently or raises FormatError."""
    payload = bytearray(_payload(sample_index()))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    try:
        idx = fmt.Index.from_bytes(_rewrap(bytes(payload)))
        _exercise(idx)
    except _OK_ERRORS:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_blobs(raw: bytes) -> None:
    with pytest.raises(FormatError):
        fmt.Index.from_bytes(raw)
    with contextlib.suppress(*_OK_ERRORS):
        _exercise(fmt.Index.from_bytes(_rewrap(raw)))


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="power of two"):
        fmt.encode(
            chunk_size=3000, inodes=[fmt.InodeSpec(stat.S_IFDIR)], chunks=[], blobs=[], prefetch=[]
        )
    with pytest.raises(ValueError, match="root"):
        fmt.encode(
            chunk_size=CS, inodes=[fmt.InodeSpec(stat.S_IFREG)], chunks=[], blobs=[], prefetch=[]
        )
    with pytest.raises(ValueError, match="duplicate"):
        fmt.encode(
            chunk_size=CS,
            inodes=[
                fmt.InodeSpec(stat.S_IFDIR, children=((b"a", 1), (b"a", 1))),
                fmt.InodeSpec(stat.S_IFREG),
            ],
            chunks=[],
            blobs=[],
            prefetch=[],
        )


def _with_frames(chunks: list[fmt.Chunk]) -> list[fmt.Chunk]:
    return [dataclasses.replace(c, frame=hashlib.sha256(b"frame %d" % c.id).digest()) for c in chunks]


def _sections(blob: bytes) -> dict[int, bytes]:
    payload = zstandard.ZstdDecompressor().decompress(blob[fmt.HEADER_SIZE :])
    _log2, _root, n, _ = struct.unpack_from("<IIII", payload, 0)
    out = {}
    for i in range(n):
        sec, _, off, length = struct.unpack_from("<IIQQ", payload, 16 + 24 * i)
        out[sec] = payload[off : off + length]
    return out


def test_frame_digests_round_trip_and_are_optional() -> None:
    idx = fmt.Index.from_bytes(sample_index())
    assert not idx.has_frame_digests and fmt.SEC_FRAMES not in _sections(sample_index())
    assert all(c.frame is None for c in idx.chunk_list()) and idx.chunk(0).frame is None
    chunks = _with_frames(idx.chunk_list())
    blob = _reencode(chunks)
    assert len(_sections(blob)[fmt.SEC_FRAMES]) == 32 * len(chunks)
    framed = fmt.Index.from_bytes(blob)
    framed.verify()
    assert framed.has_frame_digests
    assert framed.chunk_list() == chunks and [framed.chunk(i) for i in range(3)] == chunks
    # all chunks or none: half a section would leave some chunks unchecked by it
    with pytest.raises(ValueError, match="all or none"):
        _reencode([chunks[0], *idx.chunk_list()[1:]])
    with pytest.raises(ValueError, match="32 bytes"):
        _reencode([dataclasses.replace(c, frame=b"short") for c in chunks])


def test_a_frames_section_of_the_wrong_length_is_refused() -> None:
    blob = _reencode(_with_frames(fmt.Index.from_bytes(sample_index()).chunk_list()))
    payload = bytearray(zstandard.ZstdDecompressor().decompress(blob[fmt.HEADER_SIZE :]))
    _log2, _root, n, _ = struct.unpack_from("<IIII", payload, 0)
    for i in range(n):
        sec, _, off, length = struct.unpack_from("<IIQQ", payload, 16 + 24 * i)
        if sec == fmt.SEC_FRAMES:
            struct.pack_into("<IIQQ", payload, 16 + 24 * i, sec, 0, off, length - 32)
    with pytest.raises(FormatError, match="frames section holds 2 digests for 3 chunks"):
        fmt.Index(bytes(payload))


def _reencode(chunks: list[fmt.Chunk]) -> bytes:
    """A small index over ``sample_index``'s three chunks, with these chunk records."""
    D, R = stat.S_IFDIR, stat.S_IFREG
    inodes = [
        fmt.InodeSpec(D | 0o755, children=((b"a", 1), (b"b", 2))),
        fmt.InodeSpec(R | 0o644, size=CS + 10, refs=((0, 0), (1, 0))),
        fmt.InodeSpec(R | 0o600, size=100, refs=((2, 4096),)),
    ]
    blobs = [fmt.Blob(b"\1" * 32, 200), fmt.Blob(b"\2" * 32, 100)]
    return fmt.encode(chunk_size=CS, inodes=inodes, chunks=chunks, blobs=blobs, prefetch=[2, 0, 1])


# -- decompression bombs: a lying header or frame is refused before the payload is allocated

_BOMB_PROBE = """
import json, sys
from turbofs.core import format as fmt
from turbofs.core.errors import FormatError

def hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")

blob = open(sys.argv[1], "rb").read()
before = hwm()
try:
    fmt.Index.from_bytes(blob)
    outcome = "decoded"
except FormatError as exc:
    outcome = "FormatError: " + str(exc)
print(json.dumps({"outcome": outcome, "growth": hwm() - before}))
"""


def _zeros_frame(size: int, *, content_size: bool) -> bytes:
    """One zstd frame of ``size`` zero bytes, compressed piece by piece (never held whole)."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compressobj(
        size=size if content_size else -1)
    piece = bytes(1 << 20)
    out = [cobj.compress(piece[: min(len(piece), size - done)]) for done in range(0, size, len(piece))]
    return b"".join([*out, cobj.flush()])


def _blob(declared: int, frame: bytes) -> bytes:
    return struct.pack("<8sHHIQQ32s", fmt.MAGIC, fmt.VERSION, 0, fmt.HEADER_SIZE, declared, len(frame),
                       b"\0" * 32) + frame


@pytest.mark.parametrize("case", ["header-and-frame-1GiB", "header-1GiB-no-frame-size", "frame-lies-1GiB"])
def test_an_index_bomb_is_refused_with_bounded_memory(case: str, tmp_path: Path) -> None:
    """A ~32 KB index blob whose payload is (or claims to be) 1 GiB is refused with
    FormatError, and the decoding process's peak RSS grows by at most a few MiB."""
    gib = 1 << 30
    if case == "header-and-frame-1GiB":
        blob = _blob(gib, _zeros_frame(gib, content_size=True))
    elif case == "header-1GiB-no-frame-size":
        blob = _blob(gib, _zeros_frame(gib, content_size=False))
    else:  # a header within the ratio-free size, a frame that says (and holds) 1 GiB
        blob = _blob(4 << 20, _zeros_frame(gib, content_size=True))
    assert len(blob) < 64 * 1024
    path = tmp_path / "bomb.idx"
    path.write_bytes(blob)
    proc = subprocess.run([sys.executable, "-c", _BOMB_PROBE, str(path)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outcome"].startswith("FormatError: corrupt turbofs index"), result
    assert result["growth"] < 16 << 20, result  # the old decoder's grew by the whole 1 GiB


def test_the_section_table_must_account_for_the_declared_payload() -> None:
    """A payload with a valid checksum but bytes past its last section (the shape of a bomb
    hidden behind a real table) is refused; so is a declared size the sections exceed."""
    payload = _payload(sample_index())
    with pytest.raises(FormatError, match=f"the sections end at byte {len(payload)}, the header declares"):
        fmt.Index.from_bytes(_rewrap(payload + bytes(1 << 20)))
    with pytest.raises(FormatError):
        fmt.Index.from_bytes(_rewrap(payload[:-8]))
    fmt.Index.from_bytes(_rewrap(payload)).verify()


def test_the_ratio_limit() -> None:
    """Within the ratio-free size any ratio decodes (sparse files' refs compress to nothing);
    above it, a payload more than INDEX_MAX_RATIO times its compressed size is refused unread."""
    from turbofs.core.config import INDEX_MAX_RATIO, INDEX_RATIO_FREE

    assert fmt.payload_limit(1000) == INDEX_RATIO_FREE
    assert fmt.payload_limit(INDEX_RATIO_FREE) == INDEX_RATIO_FREE * INDEX_MAX_RATIO
    D, R = stat.S_IFDIR, stat.S_IFREG
    pieces = 1 << 20  # a 8 GiB sparse file at 8 KiB chunks: 8 MiB of hole refs
    sparse = fmt.encode(chunk_size=CS, inodes=[fmt.InodeSpec(D | 0o755, children=((b"hole", 1),)),
                                               fmt.InodeSpec(R | 0o644, size=pieces * CS,
                                                             refs=((fmt.HOLE, 0),) * pieces)],
                        chunks=[], blobs=[], prefetch=[])
    assert len(sparse) * INDEX_MAX_RATIO < (8 << 20) < INDEX_RATIO_FREE
    assert fmt.Index.from_bytes(sparse).inode(1).size == pieces * CS
    big = INDEX_RATIO_FREE + 1
    with pytest.raises(FormatError, match="decompression bomb"):
        fmt.Index.from_bytes(_blob(big, b"\0" * (big // INDEX_MAX_RATIO)))
