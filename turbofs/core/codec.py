"""The chunk codec: one zstd frame per chunk, written by the builder and checked and
decoded by every reader of chunks.

A chunk is named by the sha256 of its uncompressed bytes (:func:`chunk_digest`); from
format revision 1.2 the index also gives the sha256 of its compressed frame
(:func:`frame_digest`). :func:`decode_frame` checks a fetched frame against the index
and decompresses it into a :class:`VerifiedChunk`, the only type the node's cache tiers
accept. Compression, hashing and decompression release the GIL, and each thread reuses
one zstd context.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import zstandard

from turbofs.core.errors import DigestMismatch
from turbofs.core.format import Chunk


def chunk_digest(data: bytes) -> bytes:
    """The digest that names a chunk: sha256 of its uncompressed bytes."""
    return hashlib.sha256(data).digest()


def frame_digest(frame: bytes) -> bytes:
    """The digest of a chunk's compressed frame (the index's frames section)."""
    return hashlib.sha256(frame).digest()


class ChunkCompressor:
    """Compresses chunks into zstd frames (content size written), one context per thread."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def compress(self, data: bytes) -> tuple[bytes, bytes]:
        """The frame of ``data`` and its :func:`frame_digest`."""
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        frame = cctx.compress(data)
        return frame, frame_digest(frame)


@dataclass(frozen=True, slots=True)
class VerifiedChunk:
    """A chunk's uncompressed bytes, checked against the index.

    Made by :func:`decode_frame` and :func:`verify_data`, and by the node's disk tier for
    a file whose bytes its process checked itself; the cache tiers accept nothing else.
    """

    chunk: Chunk
    data: bytes
    #: The frame digest (``chunk.frame``) the bytes were checked through, or None when they
    #: were checked against the chunk digest. A frame check vouches for the bytes as the
    #: index that gave it describes them; only a chunk-digest check proves them to be the
    #: chunk any image names by that digest.
    frame: bytes | None = None


def verify_data(chunk: Chunk, data: bytes) -> VerifiedChunk:
    """Check uncompressed bytes against ``chunk`` (length and sha256); raises DigestMismatch."""
    if len(data) != chunk.ulen or chunk_digest(data) != chunk.digest:
        raise DigestMismatch(f"chunk {chunk.digest.hex()}: content does not match its digest")
    return VerifiedChunk(chunk, data)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (not safe to share between threads; costly to make per chunk)."""
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def decode_frame(chunk: Chunk, frame: bytes) -> VerifiedChunk:
    """Check a chunk's zstd frame against ``chunk`` and decompress it; raises DigestMismatch.

    The frame digest is checked before decompressing where the index gives it (fewer bytes
    to hash, and a wrong frame is never decompressed); otherwise the uncompressed bytes
    are checked against the chunk digest.
    """
    if len(frame) != chunk.clen:
        raise DigestMismatch(f"chunk {chunk.digest.hex()}: got {len(frame)} of {chunk.clen} compressed bytes")
    if chunk.frame is not None and frame_digest(frame) != chunk.frame:
        raise DigestMismatch(f"chunk {chunk.digest.hex()}: compressed frame does not match its digest")
    try:
        data = _decompressor().decompress(frame, max_output_size=chunk.ulen)
    except zstandard.ZstdError as exc:
        raise DigestMismatch(f"chunk {chunk.digest.hex()}: does not decompress ({exc})") from None
    if len(data) != chunk.ulen:
        raise DigestMismatch(f"chunk {chunk.digest.hex()}: {len(data)} bytes decompressed, expected {chunk.ulen}")
    if chunk.frame is None and chunk_digest(data) != chunk.digest:
        raise DigestMismatch(f"chunk {chunk.digest.hex()}: content does not match its digest")
    return VerifiedChunk(chunk, data, chunk.frame)


__all__ = ["ChunkCompressor", "VerifiedChunk", "chunk_digest", "decode_frame", "frame_digest", "verify_data"]
