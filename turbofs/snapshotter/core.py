"""The snapshotter's logic, without gRPC: what each of containerd's snapshot calls does.

Two kinds of snapshots live side by side:

* **Local** snapshots, as containerd's overlayfs snapshotter makes them:
  ``<root>/snapshots/<id>/{fs,work}``; active ones are a bind mount (no parent) or an overlay
  over the parents' ``fs``, nearest first. Plain images unpack this way.
* **Remote** snapshots stand for a turbo image. A Prepare whose labels name a turbo image
  (``turbofs pull``'s ``containerd.io/snapshot/turbofs.*``, or the CRI's ``cri.image-ref`` +
  ``cri.manifest-digest``) for one of its chain IDs is answered ALREADY_EXISTS, so containerd
  skips that layer's unpack. The **top** chain ID's files are the image's turbofs mount (one
  per manifest, kept while any snapshot of the image exists); ``turbofs pull`` prepares the
  top alone, leaving the chain IDs below free for plain images that share them.
  containerd's own unpacker prepares every layer; the chain IDs below the top then become
  **placeholders** (a turbo image is flattened). A placeholder becomes a real local snapshot
  only when something needs it: its layer (``cri.layer-digest``) is fetched, verified (blob
  digest, chain ID, diff ID) and applied (:mod:`turbofs.snapshotter.apply`), once; a failure
  leaves it a placeholder (:class:`~turbofs.snapshotter.errors.LayerFailed`), and one without
  those labels cannot be mounted (FAILED_PRECONDITION). Placeholders never stand in for real
  layers.

A container of a turbo image is an overlay with its own upper directory over the mount; its
writes never reach the image or the chunk cache. Local snapshots carry containerd's key
(``NAMESPACE/N/KEY``); remote ones are ``turbofs/<chain ID>[/<hash of parent>]``, so a chain
ID may be remote under one parent and local under another.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from turbofs.core.config import SNAPSHOTTER_MAX_LAYER_SIZE
from turbofs.core.errors import NotFound, SourceError, UsageError
from turbofs.core.layers import LayerStream
from turbofs.core.tar import TarError, TarReader
from turbofs.snapshotter import filters
from turbofs.snapshotter import labels as L
from turbofs.snapshotter.apply import ApplyStats, LayerApplier
from turbofs.snapshotter.errors import AlreadyExists, FailedPrecondition, LayerFailed
from turbofs.snapshotter.mounts import Mounter
from turbofs.snapshotter.remote import LayerSource, Resolver, TurboImage
from turbofs.snapshotter.store import ACTIVE, COMMITTED, VIEW, MountRecord, Snapshot, Store

log = logging.getLogger("turbofs.snapshotter")

_OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


def _syncfs(path: Path) -> None:
    """Flush the file system holding ``path`` (a layer is durable before it is recorded)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def disk_usage(path: Path) -> Usage:
    """Bytes allocated (blocks) and inodes under ``path``, each hardlinked inode once."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def add(p: str) -> None:
        nonlocal size
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512

    add(str(path))
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            add(os.path.join(dirpath, name))
    return Usage(size, len(seen))


def remote_name(target: str, parent: str) -> str:
    if not parent:
        return f"turbofs/{target}"
    return f"turbofs/{target}/{hashlib.sha256(parent.encode()).hexdigest()[:16]}"


class Snapshotter:
    """containerd's snapshot calls over a :class:`Store`, a :class:`Mounter` and a :class:`Resolver`."""

    def __init__(self, root: Path, mounter: Mounter, resolver: Resolver, *, cri_lookup: bool = True) -> None:
        self.root = root
        self.snapshots_dir = root / "snapshots"
        self.mounts_dir = root / "mounts"
        for d in (self.snapshots_dir, self.mounts_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.store = Store(root / "metadata.db")
        self.mounter = mounter
        self.resolver = resolver
        self.cri_lookup = cri_lookup
        self._locks_lock = threading.Lock()
        #: one per image: mounting, unmounting and recording snapshots of it do not interleave
        self._image_locks: dict[str, threading.RLock] = {}
        #: one per placeholder: it is materialised once, however many ask
        self._placeholder_locks: dict[str, threading.Lock] = {}
        #: folders under snapshots/ that a materialisation is filling (Cleanup leaves them)
        self._applying: set[str] = set()
        self._index_off = _OVERLAY_INDEX_PARAM.exists()

    def close(self) -> None:
        self.mounter.close()
        self.store.close()

    # -- paths and mounts ----------------------------------------------------------------

    def _dir(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id)

    def _image_lock(self, digest: str) -> threading.RLock:
        with self._locks_lock:
            return self._image_locks.setdefault(digest, threading.RLock())

    def _mountpoint(self, digest: str) -> Path:
        return self.mounts_dir / digest.split(":", 1)[-1][:32]

    def ensure_mount(self, digest: str, ref: str | None = None, plain_http: bool = False) -> Path:
        """The live mountpoint of the turbo image ``digest``, mounting it (again) if needed."""
        with self._image_lock(digest):
            rec = self.store.mount(digest)
            if rec is not None and self.mounter.check(rec.mountpoint):
                return rec.mountpoint
            if rec is not None:
                log.warning("turbofs mount of %s at %s is gone: mounting it again", rec.ref, rec.mountpoint)
                ref, plain_http = rec.ref, rec.plain_http
            if ref is None:
                raise NotFound(f"no turbofs mount is recorded for image {digest}")
            mp = rec.mountpoint if rec is not None else self._mountpoint(digest)
            self.mounter.mount(ref, mp, plain_http=plain_http)
            self.store.put_mount(MountRecord(digest, ref, mp, plain_http, time.time()))
            return mp

    def _release_mount(self, digest: str) -> bool:
        """Unmount image ``digest`` if no snapshot refers to it; False if it stays (busy)."""
        with self._image_lock(digest):
            if self.store.by_image(digest):
                return True
            rec = self.store.mount(digest)
            if rec is None:
                return True
            try:
                self.mounter.unmount(rec.mountpoint)
            except Exception as exc:
                log.warning("unmount of %s at %s failed (%s): Cleanup will retry", rec.ref, rec.mountpoint, exc)
                return False
            self.store.delete_mount(digest)
            with contextlib.suppress(OSError):
                rec.mountpoint.rmdir()
            log.info("released the turbofs mount of %s (%s)", rec.ref, rec.mountpoint)
            return True

    def _lowers(self, parent: str) -> list[str]:
        """The lower directories for a snapshot on ``parent``, nearest first."""
        out: list[str] = []
        name = parent
        depth = 0
        while name:
            snap = self.store.get(name)
            if snap is None:
                raise NotFound(f"parent snapshot {name} does not exist")
            if snap.remote == L.REMOTE_PLACEHOLDER:
                snap = self._materialize(snap)
            if snap.remote == L.REMOTE_TOP:
                assert snap.image is not None
                ref = snap.labels.get(L.REMOTE_IMAGE)
                plain = ref is not None and self.resolver.scheme(ref.split("/", 1)[0]) == "http"
                out.append(str(self.ensure_mount(snap.image, ref, plain)))
                return out  # the turbofs mount is the whole image
            out.append(str(self._dir(snap) / "fs"))
            name = snap.parent
            depth += 1
            if depth > 10_000:
                raise FailedPrecondition(f"snapshot chain under {parent} loops")
        return out

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if snap.kind == COMMITTED:  # read-only, all of it: its own files over its parents'
            if snap.remote == L.REMOTE_TOP:
                return [Mount("bind", self._lowers(snap.name)[0], ("ro", "rbind"))]
            lowers = [str(self._dir(snap) / "fs"), *self._lowers(snap.parent)]
            if len(lowers) == 1:
                return [Mount("bind", lowers[0], ("ro", "rbind"))]
            return [Mount("overlay", "overlay", ("lowerdir=" + ":".join(lowers),))]
        lowers = self._lowers(snap.parent)
        own = self._dir(snap)
        if snap.kind == VIEW:
            if not lowers:
                return [Mount("bind", str(own / "fs"), ("ro", "rbind"))]
            if len(lowers) == 1:
                return [Mount("bind", lowers[0], ("ro", "rbind"))]
            return [Mount("overlay", "overlay", ("lowerdir=" + ":".join(lowers),))]
        if not lowers:
            return [Mount("bind", str(own / "fs"), ("rw", "rbind"))]
        options = ["index=off"] if self._index_off else []
        options += [f"workdir={own / 'work'}", f"upperdir={own / 'fs'}", "lowerdir=" + ":".join(lowers)]
        return [Mount("overlay", "overlay", tuple(options))]

    # -- remote snapshots ----------------------------------------------------------------

    def _remote_for(self, labels: Mapping[str, str], target: str) -> TurboImage | None:
        """The turbo image this Prepare is about, or None for an ordinary snapshot."""
        if L.IMAGE_REF in labels:
            digest = labels.get(L.MANIFEST)
            if not digest:
                raise UsageError(f"label {L.IMAGE_REF} needs {L.MANIFEST} (the turbo manifest's digest)")
            img = self.resolver.turbo(labels[L.IMAGE_REF], digest)
            if target not in img.chain:
                raise FailedPrecondition(
                    f"{target} is not a chain ID of turbo image {img.pinned} (its config {img.config_digest} "
                    f"has {len(img.diff_ids)} layers, top chain ID {img.top})"
                )
            return img
        if self.cri_lookup and L.CRI_IMAGE_REF in labels and L.CRI_MANIFEST in labels:
            cri_img = self.resolver.for_cri(labels[L.CRI_IMAGE_REF], labels[L.CRI_MANIFEST])
            if cri_img is not None and target not in cri_img.chain:
                log.info("CRI layer %s is not in the chain of %s: ordinary unpack", target, cri_img.pinned)
                return None
            return cri_img
        return None

    def _materialised(self, target: str, parent: str) -> Snapshot | None:
        """A committed snapshot of chain ID ``target`` on ``parent`` that holds real files."""
        for name in self.store.children(parent):
            snap = self.store.get(name)
            if (snap is not None and snap.kind == COMMITTED and snap.labels.get(L.TARGET) == target
                    and snap.remote != L.REMOTE_PLACEHOLDER):
                return snap
        return None

    def _prepare_remote(self, img: TurboImage, key: str, target: str, parent: str, labels: Mapping[str, str]) -> None:
        role = L.REMOTE_TOP if target == img.top else L.REMOTE_PLACEHOLDER
        name = remote_name(target, parent)
        existing = self.store.get(name)
        if existing is not None and existing.remote is not None:
            if existing.remote == L.REMOTE_TOP:
                assert existing.image is not None
                self.ensure_mount(existing.image)
            raise AlreadyExists(f"target snapshot {target}: {existing.remote} of turbo image {existing.labels.get(L.REMOTE_IMAGE)}")
        self._check_parent(parent)
        new_labels = {k: v for k, v in labels.items() if k.startswith("containerd.io/snapshot")}
        new_labels.update({L.TARGET: target, L.REMOTE: role, L.REMOTE_IMAGE: img.pinned})
        with self._image_lock(img.manifest_digest):  # no release of the mount in between
            # mount before answering for any layer, so that a failing mount leaves no placeholder
            self.ensure_mount(img.manifest_digest, img.pinned, img.scheme == "http")
            try:
                with self.store.transaction() as db:
                    Store.insert(db, name, COMMITTED, parent, new_labels, remote=role, image=img.manifest_digest)
            except sqlite3.IntegrityError:
                pass  # a concurrent Prepare recorded it first
            else:
                log.info("%s: %s %s of %s (for %s)", name, role, target, img.pinned, key)
        raise AlreadyExists(f"target snapshot {target}: {role} of turbo image {img.pinned}")

    # -- placeholders become layers ------------------------------------------------------

    def _placeholder_lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._placeholder_locks.setdefault(name, threading.Lock())

    def _materialize(self, snap: Snapshot) -> Snapshot:
        """Turn placeholder ``snap`` into the real layer it stands for (its parents first); once,
        however many ask. A failure leaves it a placeholder and names the layer and the cause."""
        with self._placeholder_lock(snap.name):
            cur = self.store.get(snap.name)
            if cur is None:
                raise NotFound(f"snapshot {snap.name} does not exist")
            if cur.remote != L.REMOTE_PLACEHOLDER:
                return cur  # materialised meanwhile
            src = LayerSource.from_labels(cur.labels)
            if src is None:
                raise FailedPrecondition(
                    f"snapshot {cur.name} is a placeholder for layer {cur.labels.get(L.TARGET, '?')} of turbo image "
                    f"{cur.labels.get(L.REMOTE_IMAGE, cur.image)} and names no layer blob to fetch "
                    f"(label {L.CRI_LAYER}): only the image's top layer can be mounted"
                )
            parents = [Path(p) for p in self._lowers(cur.parent)]  # materialises those below first
            tmp = self.snapshots_dir / f"new-{cur.id}-{secrets.token_hex(4)}"
            with self._locks_lock:
                self._applying.add(tmp.name)
            try:
                t0 = time.monotonic()
                try:
                    stats, usage = self._apply_layer(src, tmp, parents)
                except Exception as exc:
                    raise LayerFailed(f"snapshot {cur.name}: could not make {src.describe()} (chain ID {src.chain_id}) "
                                      f"a real layer: {exc}", exc) from exc
                d = self._dir(cur)
                with self.store.transaction() as db:
                    row = Store.get_row(db, cur.name)
                    if row is None or row.remote != L.REMOTE_PLACEHOLDER or row.id != cur.id:
                        raise NotFound(f"snapshot {cur.name} was removed while its layer was applied")
                    if d.exists():  # left by a crash before a commit of the database
                        shutil.rmtree(d)
                    os.rename(tmp, d)
                    labels = {k: v for k, v in row.labels.items() if k not in (L.REMOTE, L.REMOTE_IMAGE)}
                    labels[L.MATERIALIZED] = src.layer_digest
                    row.labels, row.remote, row.image = labels, None, None
                    row.size, row.inodes, row.updated = usage.size, usage.inodes, time.time()
                    Store.update_row(db, row)
                log.info("%s: applied %s (%d entries, %d bytes of files, %d whiteouts) in %.2f s: a real layer now",
                         cur.name, src.describe(), stats.entries, stats.bytes, stats.whiteouts, time.monotonic() - t0)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                with self._locks_lock:
                    self._applying.discard(tmp.name)
            if cur.image is not None:
                self._release_mount(cur.image)  # the image's last snapshot may have been this one
            return row

    def _apply_layer(self, src: LayerSource, tmp: Path, parents: list[Path]) -> tuple[ApplyStats, Usage]:
        """Fetch and apply layer ``src`` into ``tmp/fs`` (with ``tmp/work``), verified."""
        tmp.mkdir(mode=0o700)
        (tmp / "fs").mkdir(mode=0o755)
        (tmp / "work").mkdir(mode=0o700)
        blob = self.resolver.fetch_layer(src, tmp / "blob")
        with open(blob.path, "rb") as f:
            # the blob's digest was checked as it was downloaded; the diff ID is checked here
            stream = LayerStream(f, name=blob.digest, compression=blob.compression, digest=None, size=None,
                                 diff_id=blob.diff_id, max_size=SNAPSHOTTER_MAX_LAYER_SIZE)
            try:
                try:
                    stats = LayerApplier(tmp / "fs", parents, what=f"layer {blob.digest}").apply(TarReader(stream.next_piece))
                except TarError as exc:
                    raise SourceError(f"layer {blob.digest}: not a valid tar archive ({exc})") from None
                stream.close_and_verify()
            finally:
                stream.abort()
        blob.path.unlink()
        _syncfs(tmp / "fs")
        return stats, disk_usage(tmp / "fs")

    # -- containerd's calls --------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(VIEW, key, parent, labels)

    def _create(self, kind: int, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        if not key:
            raise UsageError("snapshot key must not be empty")
        target = labels.get(L.TARGET, "")
        if kind == ACTIVE and target:
            found = self._materialised(target, parent)
            if found is not None:
                raise AlreadyExists(f"target snapshot {target}: already committed as {found.name}")
            img = self._remote_for(labels, target)
            if img is not None:
                self._prepare_remote(img, key, target, parent, labels)
        if self.store.get(key) is not None:
            raise AlreadyExists(f"snapshot {key} already exists")
        self._check_parent(parent)
        self._lowers(parent)  # a placeholder parent fails here, before anything is made
        try:
            with self.store.transaction() as db:
                snap = Store.insert(db, key, kind, parent, dict(labels))
                d = self._dir(snap)
                if d.exists():  # left by a crash before a commit of the database
                    shutil.rmtree(d)
                d.mkdir(mode=0o700)
                (d / "fs").mkdir(mode=0o755)
                (d / "work").mkdir(mode=0o700)
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {key} already exists") from None
        return self._mounts(snap)

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of a snapshot; a committed one gets read-only mounts of all it holds (a
        placeholder is materialised first)."""
        snap = self._get(key)
        if snap.remote == L.REMOTE_PLACEHOLDER:
            snap = self._materialize(snap)
        return self._mounts(snap)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        if not name:
            raise UsageError("committed snapshot name must not be empty")
        snap = self._get(key)
        if snap.kind != ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is {snap.kind_name}: only an active snapshot can be committed")
        usage = disk_usage(self._dir(snap) / "fs")
        snap.name, snap.kind, snap.labels = name, COMMITTED, dict(labels)
        snap.size, snap.inodes, snap.updated = usage.size, usage.inodes, time.time()
        try:
            with self.store.transaction() as db:
                Store.update_row(db, snap)
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {name} already exists") from None

    def remove(self, key: str) -> None:
        snap = self._get(key)
        children = self.store.children(key)
        if children:
            raise FailedPrecondition(f"snapshot {key} has {len(children)} children (e.g. {children[0]}): remove them first")
        if snap.image is not None:
            with self._image_lock(snap.image):
                with self.store.transaction() as db:
                    Store.delete_row(db, snap.id)
                self._release_mount(snap.image)
            return
        trash: Path | None = None
        with self.store.transaction() as db:
            Store.delete_row(db, snap.id)
            d = self._dir(snap)
            if d.exists():
                trash = self.snapshots_dir / f"rm-{snap.id}"
                d.rename(trash)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def stat(self, key: str) -> Snapshot:
        return self._get(key)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        snap = self._get(name)
        if not paths:
            snap.labels = dict(labels)
        for path in paths:
            if path == "labels":
                snap.labels = dict(labels)
            elif path.startswith("labels."):
                k = path[len("labels."):]
                if k in labels:
                    snap.labels[k] = labels[k]
                else:
                    snap.labels.pop(k, None)
            else:
                raise UsageError(f"cannot update field {path!r} of snapshot {name} (only labels)")
        snap.updated = time.time()
        with self.store.transaction() as db:
            Store.update_row(db, snap)
        return snap

    def usage(self, key: str) -> Usage:
        """What a snapshot holds, counted as containerd's overlayfs snapshotter does:

        * active: its upper directory's blocks and inodes, now (hardlinks once);
        * committed local: the same, counted at commit; view: 0;
        * a turbo image's top: what the image presents (apparent bytes, inodes), read once from
          the verified index; not the node's disk (the chunk cache is shared and bounded apart);
        * a placeholder: 0 (the whole image counts at the top)."""
        snap = self._get(key)
        if snap.remote == L.REMOTE_TOP:
            if snap.inodes == 0:
                assert snap.image is not None
                pinned = snap.labels.get(L.REMOTE_IMAGE)
                if not pinned:
                    raise FailedPrecondition(f"snapshot {key} names no turbo image (label {L.REMOTE_IMAGE})")
                snap.size, snap.inodes = self.resolver.presented(pinned, snap.image)
                self.store.set_usage(snap.id, snap.size, snap.inodes)
            return Usage(snap.size, snap.inodes)
        if snap.remote is not None:
            return Usage(0, 0)
        if snap.kind == ACTIVE:
            return disk_usage(self._dir(snap) / "fs")
        return Usage(snap.size, snap.inodes)

    def walk(self, filter_texts: Sequence[str]) -> list[Snapshot]:
        """Snapshots matching the filters; placeholders last, so that a lookup by chain ID
        finds a snapshot with real files first."""
        parsed = filters.parse(filter_texts)
        snaps = [s for s in self.store.all()
                 if filters.match(parsed, filters.snapshot_adaptor(s.name, s.parent, s.kind_name, s.labels))]
        snaps.sort(key=lambda s: (s.remote == L.REMOTE_PLACEHOLDER, s.id))
        return snaps

    def cleanup(self) -> None:
        """Reclaim folders without a snapshot and turbofs mounts without a snapshot."""
        known = {str(s.id) for s in self.store.all()}
        with self._locks_lock:
            known |= self._applying
        for entry in self.snapshots_dir.iterdir():
            if entry.name not in known:
                if any(os.path.ismount(p) for p in (entry / "fs", entry)):
                    log.warning("cleanup: %s is mounted: left alone", entry)
                    continue
                log.info("cleanup: removing %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
        for rec in self.store.mounts():
            if not self.store.by_image(rec.digest):
                self._release_mount(rec.digest)
        recorded = {rec.mountpoint.name for rec in self.store.mounts()}
        for entry in self.mounts_dir.iterdir():
            if entry.name not in recorded and not os.path.ismount(entry):
                with contextlib.suppress(OSError):
                    entry.rmdir()

    def recover(self, *, background: bool = True) -> threading.Thread | None:
        """At start: re-attach the live turbofs mounts, release unreferenced ones, and remount dead
        ones (in a thread unless not ``background``, so a registry that is down does not hold up
        the start; a snapshot needing one waits for it)."""
        dead: list[MountRecord] = []
        for rec in self.store.mounts():
            if not self.store.by_image(rec.digest):
                self._release_mount(rec.digest)
            elif self.mounter.check(rec.mountpoint):
                log.info("re-attached the turbofs mount of %s at %s", rec.ref, rec.mountpoint)
            else:
                dead.append(rec)

        def remount() -> None:
            for rec in dead:
                try:
                    self.ensure_mount(rec.digest)
                except Exception as exc:  # retried on the next use of the image
                    log.error("could not mount %s again at %s: %s", rec.ref, rec.mountpoint, exc)

        if not dead:
            return None
        if not background:
            remount()
            return None
        thread = threading.Thread(target=remount, name="remount", daemon=True)
        thread.start()
        return thread

    def _check_parent(self, parent: str) -> None:
        """Raise unless ``parent`` is empty or names a committed snapshot."""
        if not parent:
            return
        p = self.store.get(parent)
        if p is None:
            raise NotFound(f"parent snapshot {parent} does not exist")
        if p.kind != COMMITTED:
            raise FailedPrecondition(f"parent snapshot {parent} is not committed")

    def _get(self, key: str) -> Snapshot:
        if not key:
            raise UsageError("snapshot key must not be empty")
        snap = self.store.get(key)
        if snap is None:
            raise NotFound(f"snapshot {key} does not exist")
        return snap


__all__ = ["Mount", "Snapshotter", "Usage", "disk_usage", "remote_name"]
