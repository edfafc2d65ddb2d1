"""The chunk codec: frames the builder writes decode, checked, into exactly its chunks."""

from __future__ import annotations

import dataclasses
import hashlib
import threading

import pytest

from tests.ocifixtures import pseudo_random
from turbofs.core import codec
from turbofs.core import format as fmt
from turbofs.core.errors import DigestMismatch


def _encoded(data: bytes, *, framed: bool = True) -> tuple[fmt.Chunk, bytes]:
    frame, frame_digest = codec.ChunkCompressor(3).compress(data)
    chunk = fmt.Chunk(0, codec.chunk_digest(data), 0, 0, len(frame), len(data), frame_digest if framed else None)
    return chunk, frame


def test_compressed_frames_decode_checked_into_the_chunk() -> None:
    data = pseudo_random(1, 50_000) + bytes(50_000)
    for framed in (True, False):
        chunk, frame = _encoded(data, framed=framed)
        assert codec.frame_digest(frame) == hashlib.sha256(frame).digest()
        assert codec.decode_frame(chunk, frame) == codec.VerifiedChunk(chunk, data, chunk.frame)


def test_each_thread_compresses_with_its_own_context() -> None:
    comp = codec.ChunkCompressor(3)
    data = [pseudo_random(i, 30_000) for i in range(8)]
    out: dict[int, tuple[bytes, bytes]] = {}

    def work(i: int) -> None:
        out[i] = comp.compress(data[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[i] == comp.compress(data[i]) for i in range(8))


def test_wrong_frames_never_decode() -> None:
    data = pseudo_random(2, 20_000)
    chunk, frame = _encoded(data)
    with pytest.raises(DigestMismatch, match="compressed bytes"):
        codec.decode_frame(chunk, frame[:-1])
    plain = dataclasses.replace(chunk, frame=None)
    with pytest.raises(DigestMismatch, match="does not decompress"):
        codec.decode_frame(plain, b"\0" * len(frame))
    with pytest.raises(DigestMismatch, match="bytes decompressed"):
        codec.decode_frame(dataclasses.replace(plain, ulen=len(data) + 1), frame)


def test_verify_data_checks_length_and_digest() -> None:
    data = pseudo_random(3, 10_000)
    chunk, _frame = _encoded(data)
    assert codec.verify_data(chunk, data) == codec.VerifiedChunk(chunk, data, None)
    for bad in (data[:-1], data[:-1] + b"x"):
        with pytest.raises(DigestMismatch):
            codec.verify_data(chunk, bad)
