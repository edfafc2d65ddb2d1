"""Errors of the node daemon's read path; each one becomes ``EIO`` in the FUSE layer.

They hang off the one hierarchy of :mod:`turbofs.core.errors`::

    TurboError
     └── ReadError              a read that cannot return correct bytes (FUSE: EIO)
          ├── ChunkCorrupt      a chunk came back with the wrong digest twice
          ├── FetchTimeout      the network did not deliver within the read timeout
          ├── FetchFailed       the chunk source failed (registry error, unreachable, missing blob)
          └── ReaderClosed      the reader shut down while the read waited

Every message names the image, the file (its path in the image), the chunk (id and
digest) and the cause, so the line in the daemon's log says what broke and where.
"""

from __future__ import annotations

from turbofs.core.errors import TurboError


class ReadError(TurboError):
    """A read that cannot return correct bytes. Never partial, never wrong data."""

    def __init__(
        self,
        message: str,
        *,
        image: str = "",
        path: str = "",
        chunk_id: int | None = None,
        digest: str = "",
        cause: str = "",
    ) -> None:
        super().__init__(message)
        self.image = image
        self.path = path
        self.chunk_id = chunk_id
        self.digest = digest
        self.cause = cause


class ChunkCorrupt(ReadError):
    """Fetched, refetched once, and still not matching its digest."""


class FetchTimeout(ReadError):
    """The read waited longer than ``read_timeout`` for the network."""


class FetchFailed(ReadError):
    """The source gave up: registry error, unreachable registry, missing blob."""


class ReaderClosed(ReadError):
    """The reader was closed while the read waited for a chunk."""


__all__ = ["ChunkCorrupt", "FetchFailed", "FetchTimeout", "ReadError", "ReaderClosed"]
