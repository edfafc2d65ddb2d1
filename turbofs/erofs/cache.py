"""Generated erofs metadata kept on the node, so that a second mount of an image skips the build.

One file per index, in the node's cache folder::

    <cache_dir>/erofs/<sha256 of the index payload>.w<WRITER_VERSION>.meta
        header  8s magic "TFSEROFM", u32 file version, u32 writer version,
                32s index payload sha256, u64 body length, 32s sha256 of the body
        body    u32 meta_blocks, u32 total_blocks, u32 root nid, u32 inodes, u32 chunks,
                u32 stats length, then the metadata bytes, the nid of every inode (u64 each),
                the owner of every chunk (i64 each, -1: none) and the build's stats (JSON)

The name and header tie a file to one index and one writer version. Written under a temporary
name and renamed, without fsync: every load checks the body's sha256 (a torn file is a miss,
removed and rebuilt). That sha256 does not make the metadata trusted: the loader
(:func:`turbofs.erofs.prepare.prepare_image`) runs :func:`~turbofs.erofs.check_erofs` on it as
on fresh metadata. The folder is bounded in bytes, least recently used files out first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import time
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Final

from turbofs.core import format as fmt
from turbofs.core.config import CACHE_STALE_TEMP
from turbofs.erofs import ondisk as d
from turbofs.erofs.writer import WRITER_VERSION, ErofsImage, decode_index

log = logging.getLogger("turbofs.erofs")

MAGIC: Final = b"TFSEROFM"
FILE_VERSION: Final = 1
SUBDIR: Final = "erofs"
_HEADER: Final = struct.Struct("<8sII32sQ32s")
_BODY_HEAD: Final = struct.Struct("<IIIIII")
_NAME_RE: Final = re.compile(r"^[0-9a-f]{64}\.w\d+\.meta$")
_TEMP_RE: Final = re.compile(r"^\.tmp\.\d+\.[0-9a-f]+$")


def cache_path(cache_dir: Path, index_sha256: bytes) -> Path:
    return Path(cache_dir) / SUBDIR / f"{index_sha256.hex()}.w{WRITER_VERSION}.meta"


_BIG_ENDIAN: Final = struct.pack("=I", 1) != struct.pack("<I", 1)


def _le_array(code: str, data: bytes | memoryview) -> list[int]:
    """Little-endian 8-byte integers ('q' signed, 'Q' unsigned: 8 bytes in every CPython)."""
    out = array(code)
    out.frombytes(data)
    if _BIG_ENDIAN:
        out.byteswap()
    return out.tolist()


def _le_bytes(code: str, values: list[int]) -> bytes:
    out = array(code, values)
    if _BIG_ENDIAN:
        out.byteswap()
    return out.tobytes()


def encode(image: ErofsImage, index_sha256: bytes) -> bytes:
    stats = json.dumps(image.stats, sort_keys=True).encode()
    body = b"".join([
        _BODY_HEAD.pack(image.meta_blocks, image.total_blocks, image.root_nid, len(image.nids),
                        len(image.chunk_owner), len(stats)),
        image.meta,
        _le_bytes("Q", image.nids),
        _le_bytes("q", image.chunk_owner),
        stats,
    ])
    header = _HEADER.pack(MAGIC, FILE_VERSION, WRITER_VERSION, index_sha256, len(body), hashlib.sha256(body).digest())
    return header + body


def decode(raw: bytes, index: fmt.Index, index_sha256: bytes) -> ErofsImage:
    """The cached image of ``index`` in ``raw``; ValueError names what is wrong with it."""
    if len(raw) < _HEADER.size:
        raise ValueError(f"{len(raw)} bytes, shorter than the header")
    magic, version, writer, key, body_len, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != FILE_VERSION or writer != WRITER_VERSION:
        raise ValueError(f"magic {magic!r}, file version {version}, writer version {writer}")
    if key != index_sha256:
        raise ValueError("made for another index")
    body = memoryview(raw)[_HEADER.size :]
    if len(body) != body_len or hashlib.sha256(body).digest() != digest:
        raise ValueError("body length or sha256 mismatch (torn or damaged file)")
    meta_blocks, total_blocks, root_nid, n_inodes, n_chunks, stats_len = _BODY_HEAD.unpack_from(body)
    meta_len = meta_blocks * d.BLOCK_SIZE
    if n_inodes != index.n_inodes or n_chunks != index.n_chunks:
        raise ValueError(f"{n_inodes} inodes and {n_chunks} chunks, the index has {index.n_inodes} and {index.n_chunks}")
    if _BODY_HEAD.size + meta_len + 8 * (n_inodes + n_chunks) + stats_len != len(body):
        raise ValueError("section lengths do not add up to the body")
    p = _BODY_HEAD.size
    meta = bytes(body[p : p + meta_len])
    p += meta_len
    nids = _le_array("Q", body[p : p + 8 * n_inodes])
    p += 8 * n_inodes
    owner = _le_array("q", body[p : p + 8 * n_chunks])
    p += 8 * n_chunks
    if owner and (min(owner) < -1 or max(owner) >= n_inodes):
        raise ValueError("a chunk owner out of range")
    stats = json.loads(bytes(body[p:]))
    if not isinstance(stats, dict) or not all(isinstance(v, int) for v in stats.values()):
        raise ValueError("stats are not a table of integers")
    src = decode_index(index)
    chunk_blocks = list(accumulate((d.blocks_of(c.ulen) for c in src.chunks), initial=meta_blocks))[:-1]
    return ErofsImage(index, src, meta, meta_blocks, chunk_blocks, total_blocks, root_nid, nids, owner, stats)


def load(cache_dir: Path, index: fmt.Index, index_sha256: bytes) -> ErofsImage | None:
    """The cached image of ``index``, or None (absent; a bad file is removed)."""
    path = cache_path(cache_dir, index_sha256)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: cannot read cached erofs metadata: %s", path, exc)
        return None
    try:
        image = decode(raw, index, index_sha256)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        log.warning("%s: cached erofs metadata refused (%s): removing it", path, exc)
        discard(cache_dir, index_sha256)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used
    return image


def discard(cache_dir: Path, index_sha256: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        cache_path(cache_dir, index_sha256).unlink()


def store(cache_dir: Path, image: ErofsImage, index_sha256: bytes, *, max_bytes: int) -> Path | None:
    """Write ``image`` for later mounts (temporary name, rename) and keep the folder under
    ``max_bytes``; returns the file, or None when it could not be written (logged)."""
    path = cache_path(cache_dir, index_sha256)
    data = encode(image, index_sha256)
    if len(data) > max_bytes:
        return None
    tmp = path.parent / f".tmp.{os.getpid()}.{secrets.token_hex(6)}"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        log.warning("%s: cannot cache erofs metadata: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    evict(path.parent, max_bytes, keep=path)
    return path


def evict(folder: Path, max_bytes: int, *, keep: Path | None = None) -> None:
    """Remove the least recently used cached files until the rest fit ``max_bytes`` (and
    temporary files left by killed daemons)."""
    now = time.time()
    files: list[tuple[float, int, Path]] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if _NAME_RE.match(e.name):
                files.append((st.st_mtime, st.st_size, Path(e.path)))
            elif _TEMP_RE.match(e.name) and now - st.st_mtime > CACHE_STALE_TEMP:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
    used = sum(size for _, size, _ in files)
    for _, size, path in sorted(files, key=lambda f: (f[2] == keep, f[0])):
        if used <= max_bytes:
            break
        if path == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            used -= size


__all__ = ["cache_path", "decode", "discard", "encode", "evict", "load", "store"]
