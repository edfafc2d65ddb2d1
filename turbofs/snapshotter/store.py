"""The snapshotter's metadata: snapshots and turbofs mounts, in SQLite under ``--root``.

``<root>/metadata.db`` (WAL, every transaction durable before containerd gets its answer).
``snapshots``: ``name`` (containerd's key, or ``turbofs/<chain ID>...`` for remote ones),
``parent``, ``kind`` (containerd's numbers: 1 view, 2 active, 3 committed), ``remote``
(``top`` or ``placeholder``, with the manifest digest in ``image``). ``mounts``: one row per
mounted turbo image (``digest``), with the pinned reference and the mountpoint.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

SCHEMA_VERSION: Final = 1

VIEW: Final = 1
ACTIVE: Final = 2
COMMITTED: Final = 3
KIND_NAMES: Final = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT,
    image TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent);
CREATE INDEX IF NOT EXISTS snapshots_image ON snapshots (image);
CREATE TABLE IF NOT EXISTS mounts (
    digest TEXT PRIMARY KEY,
    ref TEXT NOT NULL,
    mountpoint TEXT NOT NULL,
    plain_http INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


@dataclass
class Snapshot:
    id: int
    name: str
    kind: int
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    size: int = 0
    inodes: int = 0
    remote: str | None = None  # "top" | "placeholder"
    image: str | None = None  # manifest digest of the turbo image

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, "unknown")


@dataclass
class MountRecord:
    digest: str
    ref: str
    mountpoint: Path
    plain_http: bool
    created: float


def _snapshot(row: sqlite3.Row) -> Snapshot:
    return Snapshot(
        id=row["id"], name=row["name"], kind=row["kind"], parent=row["parent"], labels=json.loads(row["labels"]),
        created=row["created"], updated=row["updated"], size=row["size"], inodes=row["inodes"],
        remote=row["remote"], image=row["image"],
    )


def _mount(row: sqlite3.Row) -> MountRecord:
    return MountRecord(row["digest"], row["ref"], Path(row["mountpoint"]), bool(row["plain_http"]), row["created"])


class Store:
    """Thread-safe access to ``metadata.db``; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise RuntimeError(f"{path}: schema version {row['value']}, this turbofs knows {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error), holding the store's lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- snapshots ---------------------------------------------------------------------

    def get(self, name: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE name=?", (name,)).fetchone()
        return _snapshot(row) if row is not None else None

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [_snapshot(r) for r in self._db.execute("SELECT * FROM snapshots ORDER BY id")]

    def children(self, name: str) -> list[str]:
        with self._lock:
            return [r["name"] for r in self._db.execute("SELECT name FROM snapshots WHERE parent=?", (name,))]

    def by_image(self, digest: str) -> list[Snapshot]:
        with self._lock:
            return [_snapshot(r) for r in self._db.execute("SELECT * FROM snapshots WHERE image=?", (digest,))]

    @staticmethod
    def get_row(db: sqlite3.Connection, name: str) -> Snapshot | None:
        """``get`` inside a :meth:`transaction`."""
        row = db.execute("SELECT * FROM snapshots WHERE name=?", (name,)).fetchone()
        return _snapshot(row) if row is not None else None

    @staticmethod
    def insert(db: sqlite3.Connection, name: str, kind: int, parent: str, labels: dict[str, str], *,
               remote: str | None = None, image: str | None = None) -> Snapshot:
        now = time.time()
        cur = db.execute(
            "INSERT INTO snapshots (name, kind, parent, labels, created, updated, remote, image) VALUES (?,?,?,?,?,?,?,?)",
            (name, kind, parent, json.dumps(labels, sort_keys=True), now, now, remote, image),
        )
        assert cur.lastrowid is not None
        return Snapshot(cur.lastrowid, name, kind, parent, dict(labels), now, now, 0, 0, remote, image)

    @staticmethod
    def update_row(db: sqlite3.Connection, snap: Snapshot) -> None:
        db.execute(
            "UPDATE snapshots SET name=?, kind=?, parent=?, labels=?, updated=?, size=?, inodes=?, remote=?, image=? WHERE id=?",
            (snap.name, snap.kind, snap.parent, json.dumps(snap.labels, sort_keys=True), snap.updated, snap.size,
             snap.inodes, snap.remote, snap.image, snap.id),
        )

    def set_usage(self, snap_id: int, size: int, inodes: int) -> None:
        """Record a snapshot's usage (nothing else of the row changes)."""
        with self.transaction() as db:
            db.execute("UPDATE snapshots SET size=?, inodes=? WHERE id=?", (size, inodes, snap_id))

    @staticmethod
    def delete_row(db: sqlite3.Connection, snap_id: int) -> None:
        db.execute("DELETE FROM snapshots WHERE id=?", (snap_id,))

    # -- mounts ------------------------------------------------------------------------

    def mount(self, digest: str) -> MountRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM mounts WHERE digest=?", (digest,)).fetchone()
        return _mount(row) if row is not None else None

    def mounts(self) -> list[MountRecord]:
        with self._lock:
            return [_mount(r) for r in self._db.execute("SELECT * FROM mounts ORDER BY created")]

    def put_mount(self, rec: MountRecord) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO mounts VALUES (?,?,?,?,?)",
                       (rec.digest, rec.ref, str(rec.mountpoint), int(rec.plain_http), rec.created))

    def delete_mount(self, digest: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM mounts WHERE digest=?", (digest,))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
            m = self._db.execute("SELECT COUNT(*) FROM mounts").fetchone()[0]
        return {"snapshots": n, "mounts": m}


__all__ = ["ACTIVE", "COMMITTED", "KIND_NAMES", "VIEW", "MountRecord", "Snapshot", "Store"]
