"""A layer blob as a verified, size-limited stream of uncompressed tar bytes.

A background thread reads the blob, checks it against its descriptor digest and size,
decompresses it (gzip, zstd or none) and hashes the uncompressed bytes for the diff ID;
the tar parser reads from :class:`LayerStream` in the calling thread. zlib, zstd and
hashlib release the GIL, so decompression overlaps parsing and chunking.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Final, cast

import zstandard
from isal import isal_zlib

from turbofs.core.config import LAYER_QUEUE_DEPTH, LAYER_READ_BLOCK
from turbofs.core.errors import DigestMismatch, LimitExceeded, SourceError

_INFLATE_ERRORS: Final[tuple[type[Exception], ...]] = cast(
    "tuple[type[Exception], ...]", (zlib.error, isal_zlib.error, zstandard.ZstdError)
)
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def sniff_compression(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Decoder:
    """Incremental decompression of one format: multi-member gzip, multi-frame zstd, or none."""

    def __init__(self, compression: str) -> None:
        if compression not in ("gzip", "zstd", "none"):
            raise SourceError(f"unsupported compression {compression!r}")
        self.compression = compression
        self._obj: Any = None
        self.done = compression == "none"  # at a member boundary
        self.started = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.compression == "none":
            return [data]
        out: list[bytes] = []
        while data:
            if self.done and not data.strip(b"\0"):
                break  # zero padding after the last member, as some writers add
            if self._obj is None or self.done:
                # ISA-L: a faster inflate than zlib (bench/README.md)
                self._obj = (
                    isal_zlib.decompressobj(wbits=31)
                    if self.compression == "gzip"
                    else zstandard.ZstdDecompressor().decompressobj()
                )
                self.done = False
            self.started = True
            try:
                out.append(self._obj.decompress(data))
            except _INFLATE_ERRORS as exc:
                raise SourceError(f"not valid {self.compression} data: {exc}") from None
            if self._obj.eof:
                self.done = True
                data = self._obj.unused_data
            else:
                data = b""
        return out

    def finish(self) -> None:
        if self.compression != "none" and (not self.done or not self.started):
            raise SourceError(f"truncated {self.compression} data")


class LayerStream(io.RawIOBase):
    """Readable uncompressed tar bytes of one layer; :meth:`close_and_verify` checks digests."""

    def __init__(
        self,
        fileobj: BinaryIO,
        *,
        name: str,
        compression: str | None,
        digest: str | None,
        size: int | None,
        diff_id: str | None,
        max_size: int,
        on_read: Callable[[int], object] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self._file = fileobj
        self._expect_digest, self._expect_size, self._expect_diff_id = digest, size, diff_id
        self._max_size = max_size
        self._on_read = on_read
        head = fileobj.read(LAYER_READ_BLOCK)
        self._first = head
        self.compression = compression or sniff_compression(head)
        self.uncompressed_size = 0
        self.compressed_size = 0
        self.diff_id = ""
        self.digest = ""
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(LAYER_QUEUE_DEPTH)
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"layer:{name[:24]}", daemon=True)
        self._thread.start()

    # -- producer thread

    def _run(self) -> None:
        algo = (self._expect_digest or "sha256:").split(":", 1)[0]
        zhash = hashlib.new(algo)
        uhash = hashlib.sha256()
        decoder = _Decoder(self.compression)
        try:
            data = self._first
            self._first = b""
            while data:
                if self._stop.is_set():
                    return
                zhash.update(data)
                self.compressed_size += len(data)
                if self._on_read:
                    self._on_read(len(data))
                for piece in decoder.feed(data):
                    if not piece:
                        continue
                    uhash.update(piece)
                    self.uncompressed_size += len(piece)
                    if self.uncompressed_size > self._max_size:
                        raise LimitExceeded(
                            f"layer {self.name}: more than {self._max_size} uncompressed bytes "
                            "(raise --max-layer-size if this is intended)"
                        )
                    self._put(piece)
                data = self._file.read(LAYER_READ_BLOCK)
            decoder.finish()
            self.digest = f"{algo}:{zhash.hexdigest()}"
            self.diff_id = "sha256:" + uhash.hexdigest()
            self._put(None)
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- consumer side

    def readable(self) -> bool:
        return True

    def next_piece(self) -> bytes:
        """The next piece of uncompressed bytes, as the decompressor made it; b"" at the end."""
        if self._buf:
            out = bytes(self._buf)
            self._buf = memoryview(b"")
            return out
        while not self._eof:
            item = self._queue.get()
            if item is None:
                self._eof = True
                break
            if isinstance(item, BaseException):
                self._eof = True
                if isinstance(item, SourceError):
                    raise type(item)(
                        item.args[0] if item.args[0].startswith("layer") else f"layer {self.name}: {item.args[0]}"
                    ) from None
                raise item
            if item:
                return item
        return b""

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buf:
            self._buf = memoryview(self.next_piece())
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        """Read to the end, so that the digests cover the whole blob."""
        while self.next_piece():
            pass

    def close_and_verify(self) -> None:
        self.drain()
        self._thread.join()
        if self._expect_size is not None and self.compressed_size != self._expect_size:
            raise DigestMismatch(
                f"layer {self.name}: blob has {self.compressed_size} bytes, descriptor says {self._expect_size}"
            )
        if self._expect_digest is not None and self.digest != self._expect_digest:
            raise DigestMismatch(
                f"layer {self.name}: blob digest is {self.digest}, descriptor says {self._expect_digest}"
            )
        if self._expect_diff_id is not None and self.diff_id != self._expect_diff_id:
            raise DigestMismatch(
                f"layer {self.name}: uncompressed digest is {self.diff_id}, "
                f"the config's rootfs.diff_ids says {self._expect_diff_id}"
            )

    def abort(self) -> None:
        self._stop.set()
        self._eof = True
        self._thread.join(timeout=5)
