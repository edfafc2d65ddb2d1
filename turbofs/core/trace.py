"""Startup traces: which chunks (and files) a process start read, in first-use order.

A mount records the order in which it first reads chunks; ``turbofs trace MOUNTPOINT`` writes
it here, and ``turbofs build --startup-trace FILE`` puts it in the index, so later cold starts
fetch those chunks first (docs/format.md, "Startup").

The file is JSON (``FORMAT``)::

    {"format": "turbofs-startup-trace-1",
     "image": "127.0.0.1:5050/app:turbo", "index": "sha256:...",
     "chunks": ["<64 hex: sha256 of the uncompressed chunk>", ...],
     "files": ["/usr/bin/python3.11", ...]}

Chunks are named by digest, so a trace carries over to a rebuild (missing chunks are skipped);
``files`` is informative only. A plain text file of absolute image paths, one per line
(``#`` comments allowed), is accepted too: all chunks of those files, in that order.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from turbofs.core.errors import UsageError
from turbofs.core.format import Index
from turbofs.core.oci import atomic_write

FORMAT: Final = "turbofs-startup-trace-1"
#: A trace longer than this is refused (a 64 GiB image of 256 KiB chunks has 262,144).
MAX_ENTRIES: Final = 4_000_000


@dataclass
class StartupTrace:
    """Chunk digests (raw 32 bytes) in first-use order, and/or image paths (raw bytes)."""

    chunks: list[bytes] = field(default_factory=list)
    paths: list[bytes] = field(default_factory=list)
    image: str = ""
    index: str = ""
    files: list[str] = field(default_factory=list)  # informative

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"format": FORMAT, "image": self.image, "index": self.index,
                               "chunks": [c.hex() for c in self.chunks], "files": self.files}
        return (json.dumps(doc, indent=1) + "\n").encode()

    def write(self, path: Path) -> None:
        atomic_write(path, self.to_json())


def _path_bytes(text: str) -> bytes:
    return os.fsencode(text)


def parse(data: bytes, *, name: str = "trace") -> StartupTrace:
    """A trace from ``turbofs trace``'s JSON, or from a list of image paths."""
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{name}: not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise UsageError(f"{name}: not a startup trace (expected \"format\": \"{FORMAT}\")")
        raw = doc.get("chunks")
        if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
            raise UsageError(f"{name}: \"chunks\" must be a list of at most {MAX_ENTRIES} digests")
        chunks: list[bytes] = []
        for i, h in enumerate(raw):
            if not isinstance(h, str) or len(h) != 64:
                raise UsageError(f"{name}: chunks[{i}] is not a 64-digit hex sha256")
            try:
                chunks.append(bytes.fromhex(h))
            except ValueError as exc:
                raise UsageError(f"{name}: chunks[{i}] is not a 64-digit hex sha256") from exc
        files = doc.get("files") or []
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise UsageError(f"{name}: \"files\" must be a list of paths")
        return StartupTrace(chunks=chunks, image=str(doc.get("image") or ""), index=str(doc.get("index") or ""),
                            files=list(files))
    try:
        text = data.decode("utf-8", "surrogateescape")
    except UnicodeDecodeError as exc:  # pragma: no cover - surrogateescape never fails
        raise UsageError(f"{name}: {exc}") from exc
    paths: list[bytes] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("/"):
            raise UsageError(f"{name}:{lineno}: {line!r} is not an absolute path in the image")
        paths.append(_path_bytes(line))
        if len(paths) > MAX_ENTRIES:
            raise UsageError(f"{name}: more than {MAX_ENTRIES} paths")
    if not paths:
        raise UsageError(f"{name}: no paths and no chunks: not a startup trace")
    return StartupTrace(paths=paths)


def load(path: Path) -> StartupTrace:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read startup trace {path}: {exc.strerror or exc}") from exc
    return parse(data, name=str(path))


def recorded(index: Index, chunk_ids: Sequence[int], *, image: str = "", index_digest: str = "") -> StartupTrace:
    """The trace of a mount that read ``chunk_ids`` (first-use order) of ``index``; ``files``
    lists, in the same order, a path of each regular file those chunks hold data of."""
    wanted = dict.fromkeys(chunk_ids)
    holders: dict[int, list[bytes]] = {}
    for raw, ino in index.walk():
        if not stat.S_ISREG(index.inode(ino).mode):
            continue
        for chunk_id, _off in index.file_refs(ino):
            if chunk_id in wanted:
                lst = holders.setdefault(chunk_id, [])
                if raw not in lst:
                    lst.append(raw)
    files: dict[str, None] = {}
    for c in wanted:
        for raw in holders.get(c, ()):
            files.setdefault("/" + raw.decode("utf-8", "backslashreplace"), None)
    return StartupTrace(chunks=[index.chunk(c).digest for c in wanted], image=image, index=index_digest,
                        files=list(files))


__all__ = ["FORMAT", "MAX_ENTRIES", "StartupTrace", "load", "parse", "recorded"]
