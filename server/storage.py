"""The registry's storage folder: content-addressed blobs, repositories, upload sessions.

This is the only code that touches the storage folder. Its layout::

    ROOT/
      blobs/sha256/<hex>                                  blob bytes, shared by all repositories
      blobs/sha512/<hex>
      repositories/<name>/_layers/<algo>/<hex>            empty file: the blob belongs to <name>
      repositories/<name>/_manifests/revisions/<algo>/<hex>   the manifest's media type
      repositories/<name>/_manifests/tags/<tag>           the digest the tag points to
      repositories/<name>/_referrers/<algo>/<hex>/<algo>-<hex>  descriptor of a manifest whose
                                                          ``subject`` is the first digest
      uploads/<uuid>/state.json                           {"repo": ..., "created": ...}
      uploads/<uuid>/data                                 the bytes received so far
      tmp/                                                scratch folders (scratch_dir)
      quarantine/<algo>/<hex>.<ns>                        blob files whose bytes no longer
                                                          matched their digest (kept for the
                                                          operator; never served)

``<name>`` may have several components. Manifests are blobs too.

Crash safety: every file is written under a dot-name in its final folder, fsynced, renamed,
and the folder fsynced; the empty ``_layers/`` files are created in place, and upload sessions
are not flushed (a crash loses a session). A blob enters ``blobs/`` only once hashed, matched
to its digest and fsynced. Names, tags, digests and upload ids are checked against their
grammar before any path is built from them, which keeps every path inside the folder.

Integrity: a blob file whose bytes no longer match its digest (found by a full-blob read, a
manifest read, an upload of the same blob, or :meth:`Storage.scrub`) is moved to
``quarantine/``: the registry no longer has it (HEAD and GET answer 404), its repository links
stay, so the next upload of the right bytes stores it again and every image is whole again.

Concurrency: every method blocks except :meth:`Storage.upload_append`, which reads its stream
on the event loop and offloads each write; the app calls the others through
``server.offload.offload``, so ``_lock`` guards the set of busy upload sessions (one request
per session at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from server import jsonbody
from server.errors import (
    BlobInUse,
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    SizeInvalid,
)
from server.offload import offload
from turbofs.core.config import REGISTRY_IO_CHUNK, REGISTRY_QUARANTINE_DIR, RegistryConfig
from turbofs.core.errors import FormatError
from turbofs.core.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    atomic_write,
    check_digest,
    fsync_dir,
)

# -- grammar (OCI distribution spec) -----------------------------------------------------

_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
MAX_NAME_LENGTH: Final = 255
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

T = TypeVar("T")
log = logging.getLogger("turbofs.registry")

#: Manifest media types the registry stores (and serves back with the same type).
MANIFEST_MEDIA_TYPES: Final = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
_IMAGE_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_GENERIC_CONTENT_TYPES: Final = frozenset({"", "application/json", "application/octet-stream"})


def check_name(name: str) -> str:
    """Validate a repository name; return it (NameInvalid otherwise)."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name!r}", detail={"name": str(name)[:300]})
    return name


def is_tag(reference: str) -> bool:
    return TAG_RE.fullmatch(reference) is not None


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise ManifestInvalid(f"invalid tag {tag!r}", detail={"tag": str(tag)[:300]})
    return tag


def check_blob_digest(digest: str) -> str:
    """Validate a digest (sha256 or sha512); return it (DigestInvalid otherwise)."""
    try:
        return check_digest(digest)
    except FormatError as exc:
        raise DigestInvalid(str(exc), detail={"digest": str(digest)[:300]}) from None


def is_digest(reference: str) -> bool:
    return ":" in reference


def _split(digest: str) -> tuple[str, str]:
    algo, hexd = check_blob_digest(digest).split(":", 1)
    return algo, hexd


def _hash_file(path: Path, algo: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        return _hash_open(f, algo)


def _hash_open(f: Any, algo: str) -> tuple[str, int]:
    """(digest, size) of what is left to read of the open file ``f``."""
    h = hashlib.new(algo)
    size = 0
    while chunk := f.read(REGISTRY_IO_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return f"{algo}:{h.hexdigest()}", size


def file_id(st: os.stat_result) -> tuple[int, int]:
    """Which file a stat result is of (device, inode): a blob replaced meanwhile differs."""
    return st.st_dev, st.st_ino


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_content(actual: str, expected: str, what: str = "content", **detail: int) -> None:
    if actual != expected:
        raise DigestInvalid(
            f"{what} has digest {actual}, not {expected}",
            detail={"expected": expected, "actual": actual, **detail},
        )


def _append(path: Path, pieces: list[bytes], h: Any) -> int:
    """Append ``pieces`` to the file ``path``, then feed them to the running hash ``h`` (if
    any), so the hash never covers bytes that are not in the file; return the bytes written."""
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    if h is not None:
        h.update(data)
    return len(data)


@dataclass(frozen=True)
class UploadStatus:
    """Where an upload session stands."""

    uuid: str
    repo: str
    offset: int  # bytes received so far
    created: float
    updated: float


@dataclass(frozen=True)
class ScrubReport:
    """What :meth:`Storage.scrub` found: ``bad`` maps each blob whose bytes did not match its
    digest to where it was moved (None with ``dry_run``, or if a repair won the race), and
    ``links`` to the repositories that link it (they get it back with the next upload)."""

    checked: int
    bytes: int
    bad: dict[str, Path | None]
    links: dict[str, list[str]]


@dataclass(frozen=True)
class PutResult:
    digest: str
    media_type: str
    subject: str | None  # digest of the manifest's ``subject``, if it has one


class Storage:
    """The storage folder of one registry (see the module docstring for the layout)."""

    def __init__(self, root: Path, limits: RegistryConfig | None = None) -> None:
        """``limits``: a configuration whose size limits and upload_ttl apply (the defaults if None)."""
        limits = limits or RegistryConfig()
        self.root = Path(root)
        self.max_blob_size = limits.max_blob_size
        self.max_manifest_size = limits.max_manifest_size
        self.upload_ttl = limits.upload_ttl
        for sub in ("blobs/sha256", "blobs/sha512", "repositories", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        #: upload id -> (offset, running sha256) while the hash covers the whole data file
        self._hashes: dict[str, tuple[int, Any]] = {}

    # -- paths ---------------------------------------------------------------------------

    def _blob_file(self, digest: str) -> Path:
        algo, hexd = _split(digest)
        return self.root / "blobs" / algo / hexd

    def _repo_dir(self, repo: str) -> Path:
        return self.root / "repositories" / check_name(repo)

    def _layer_link(self, repo: str, digest: str) -> Path:
        algo, hexd = _split(digest)
        return self._repo_dir(repo) / "_layers" / algo / hexd

    def _revision(self, repo: str, digest: str) -> Path:
        algo, hexd = _split(digest)
        return self._repo_dir(repo) / "_manifests" / "revisions" / algo / hexd

    def _tags_dir(self, repo: str) -> Path:
        return self._repo_dir(repo) / "_manifests" / "tags"

    def _tag_file(self, repo: str, tag: str) -> Path:
        return self._tags_dir(repo) / check_tag(tag)

    def _referrers_dir(self, repo: str, subject: str) -> Path:
        algo, hexd = _split(subject)
        return self._repo_dir(repo) / "_referrers" / algo / hexd

    def _upload_dir(self, uuid: str) -> Path:
        if not isinstance(uuid, str) or not _UUID_RE.fullmatch(uuid):
            raise BlobUploadUnknown(f"unknown upload {str(uuid)[:100]!r}")
        return self.root / "uploads" / uuid

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path | None:
        """The file holding blob ``digest``, or None if the registry does not have it."""
        path = self._blob_file(digest)
        return path if path.is_file() else None

    def blob_size(self, digest: str) -> int | None:
        try:
            return self._blob_file(digest).stat().st_size
        except FileNotFoundError:
            return None

    def repo_exists(self, repo: str) -> bool:
        d = self._repo_dir(repo)
        return (d / "_manifests").is_dir() or (d / "_layers").is_dir()

    def repo_has_blob(self, repo: str, digest: str) -> bool:
        return self._layer_link(repo, digest).exists() and self._blob_file(digest).is_file()

    def find_blob(self, repo: str, digest: str) -> Path | None:
        """The file of blob ``digest`` if ``repo`` has it, else None."""
        return self._blob_file(digest) if self.repo_has_blob(repo, digest) else None

    def link_blob(self, repo: str, digest: str) -> None:
        """Make blob ``digest`` (which must be stored) part of repository ``repo``."""
        self.link_stored(repo, [digest], strict=True)

    def mount_blob(self, repo: str, source: str, digest: str) -> bool:
        """Link blob ``digest`` into ``repo`` if repository ``source`` has it; whether it did."""
        if not self.repo_has_blob(source, digest):
            return False
        self.link_blob(repo, digest)
        return True

    def link_stored(self, repo: str, digests: Iterable[str], *, strict: bool = False) -> list[str]:
        """Link into ``repo`` those of ``digests`` the registry stores; return the others (with
        ``strict``, BlobUnknown for the first of them). New names cost one flush per folder."""
        dirty: list[Path] = []
        unknown: list[str] = []
        for digest in dict.fromkeys(digests):
            try:
                dirty += self._link_unsynced(repo, digest)
            except BlobUnknown:
                if strict:
                    raise
                unknown.append(digest)
        for folder in dict.fromkeys(dirty):
            fsync_dir(folder)
        return unknown

    def _link_unsynced(self, repo: str, digest: str) -> list[Path]:
        """Create ``repo``'s link to stored blob ``digest`` if it is missing; return the
        folders whose new entries still need an fsync (the caller syncs them, so that several
        new names cost one flush each folder)."""
        link = self._layer_link(repo, digest)
        if not self._blob_file(digest).is_file():
            raise BlobUnknown(f"blob {digest} is not in the registry", detail={"digest": digest})
        if link.exists():
            return []
        dirty = _make_dirs(link.parent)
        try:
            # an empty file: there are no bytes to tear, so no temporary name and no file fsync
            os.close(os.open(link, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:  # another request linked it meanwhile
            return dirty
        return [*dirty, link.parent]

    def unlink_blob(self, repo: str, digest: str) -> None:
        """Remove blob ``digest`` from ``repo`` (its bytes stay until garbage_collect).

        Refused (BlobInUse, 409) while a manifest of ``repo`` references the blob (its config,
        a layer, a turbo index or chunk blob) or the blob is a manifest of ``repo``: removing
        it would break the image silently; delete those manifests first."""
        link = self._layer_link(repo, digest)
        users = self.manifests_using(repo, digest) if link.exists() else []
        if users:
            raise BlobInUse(
                f"blob {digest} is used by {len(users)} manifest(s) of {repo} "
                f"({', '.join(users[:3])}); delete those manifests first",
                detail={"digest": digest, "manifests": users[:100]},
            )
        try:
            link.unlink()
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not in {repo}", detail={"digest": digest}) from None
        fsync_dir(link.parent)

    def manifests_using(self, repo: str, digest: str) -> list[str]:
        """Digests of the manifests of ``repo`` that reference blob ``digest`` (config or
        layer), or that are ``digest`` itself; sorted."""
        users: set[str] = set()
        base = self._repo_dir(repo) / "_manifests" / "revisions"
        for algo in _listdir(base):
            for hexd in _listdir(base / algo):
                manifest = f"{algo}:{hexd}"
                if manifest == digest:
                    users.add(manifest)
                    continue
                try:
                    obj = json.loads(self._blob_file(manifest).read_bytes())  # checked when put
                except (OSError, ValueError, DigestInvalid):
                    continue
                if not isinstance(obj, dict):
                    continue
                layers = obj.get("layers")
                descs = [obj.get("config"), *(layers if isinstance(layers, list) else [])]
                if any(isinstance(d, dict) and d.get("digest") == digest for d in descs):
                    users.add(manifest)
        return sorted(users)

    # -- integrity -----------------------------------------------------------------------

    def quarantine_blob(self, digest: str, expected: tuple[int, int] | None = None) -> Path | None:
        """Move blob ``digest``'s file to ``quarantine/`` (the registry no longer has it; the
        repository links stay); return where it went, or None if nothing moved.

        ``expected``: the :func:`file_id` of the file found bad; a file that is no longer that
        one (repaired meanwhile by an upload) is left in place."""
        src = self._blob_file(digest)
        algo, hexd = _split(digest)
        folder = self.root / REGISTRY_QUARANTINE_DIR / algo
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{hexd}.{time.time_ns()}"
        try:
            if expected is not None and file_id(src.stat()) != expected:
                return None
            os.rename(src, dest)
        except FileNotFoundError:
            return None
        if expected is not None and file_id(dest.stat()) != expected:
            # a repair replaced the file between the check and the rename: put it back
            with contextlib.suppress(FileExistsError):
                os.link(dest, src)
            dest.unlink()
            return None
        fsync_dir(src.parent)
        fsync_dir(folder)
        log.error("blob %s does not match its digest: moved to %s; the next upload of it "
                  "repairs it", digest, dest)
        return dest

    def verify_blob(self, digest: str) -> bool | None:
        """Whether blob ``digest``'s stored bytes match it; a bad one is quarantined. None if
        the registry does not have it."""
        path = self._blob_file(digest)
        try:
            with open(path, "rb") as f:
                fid = file_id(os.fstat(f.fileno()))
                actual, _ = _hash_open(f, digest.split(":", 1)[0])
        except FileNotFoundError:
            return None
        if actual == digest:
            return True
        self.quarantine_blob(digest, fid)
        return False

    def scrub(self, *, dry_run: bool = False, progress: Callable[[str, int], None] | None = None) -> ScrubReport:
        """Hash every stored blob; quarantine those whose bytes do not match their digest
        (only report them with ``dry_run``). ``progress(digest, size)`` after each blob."""
        checked = total = 0
        bad: dict[str, Path | None] = {}
        for algo in ("sha256", "sha512"):
            for hexd in sorted(_listdir(self.root / "blobs" / algo)):
                if hexd.startswith("."):
                    continue  # a temporary file of a write in progress
                digest = f"{algo}:{hexd}"
                try:
                    check_blob_digest(digest)
                    with open(self._blob_file(digest), "rb") as f:
                        fid = file_id(os.fstat(f.fileno()))
                        actual, size = _hash_open(f, algo)
                except (FileNotFoundError, DigestInvalid):
                    continue  # gone meanwhile (garbage collection, quarantine), or no blob name
                checked += 1
                total += size
                if actual != digest:
                    bad[digest] = None if dry_run else self.quarantine_blob(digest, fid)
                if progress is not None:
                    progress(digest, size)
        links: dict[str, list[str]] = {d: [] for d in bad}
        if bad:
            for repo in self.repositories():
                for d in bad:
                    if self._layer_link(repo, d).exists():
                        links[d].append(repo)
        return ScrubReport(checked, total, bad, links)

    def _replace_if_bad(self, dest: Path) -> bool:
        """Check the stored blob file ``dest`` (named by its digest) when a verified copy of
        its bytes arrives; quarantine it if bad. True if it was bad (and is gone)."""
        digest = f"{dest.parent.name}:{dest.name}"
        try:
            with open(dest, "rb") as f:
                fid = file_id(os.fstat(f.fileno()))
                actual, _ = _hash_open(f, dest.parent.name)
        except FileNotFoundError:
            return True
        if actual == digest:
            return False
        self.quarantine_blob(digest, fid)
        return True

    def import_blob(self, src: Path, digest: str) -> None:
        """Move the file ``src`` into the store as blob ``digest``, after checking its bytes.

        On success ``src`` is gone (moved, or dropped if the blob was already stored). If its
        content does not match ``digest``, DigestInvalid is raised and ``src`` is left alone.
        """
        src = Path(src)
        dest = self._blob_file(digest)
        algo = digest.split(":", 1)[0]
        if src.stat().st_dev == dest.parent.stat().st_dev:
            _check_content(_hash_file(src, algo)[0], digest)
            _fsync_file(src)
            self._publish(src, dest)
            src.unlink()
            return
        # another file system: copy under a temporary name while hashing, then publish that
        fd, tmp_name = tempfile.mkstemp(prefix=".import.", suffix=".tmp", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            h = hashlib.new(algo)
            with open(src, "rb") as f:
                while chunk := f.read(REGISTRY_IO_CHUNK):
                    h.update(chunk)
                    _write_all(fd, chunk)
            os.fsync(fd)
            _check_content(f"{algo}:{h.hexdigest()}", digest)
            self._publish(tmp, dest)
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        src.unlink()

    def _publish(self, verified: Path, dest: Path, *, sync: bool = True) -> bool:
        """Give the verified (and fsynced) file ``verified`` its final name ``dest`` (a hard
        link; the caller removes ``verified``); with ``sync``, fsync the folder. An existing
        blob is checked and left as it is if its bytes are right, else quarantined and replaced.
        True if the name is new."""
        try:
            os.link(verified, dest)
        except FileExistsError:
            if not self._replace_if_bad(dest):
                return False
            try:
                os.link(verified, dest)
            except FileExistsError:  # another upload repaired it meanwhile
                return False
        now = time.time()
        os.utime(dest, (now, now))  # a fresh blob is young for garbage_collect's grace period
        if sync:
            fsync_dir(dest.parent)
        return True

    def put_blob_bytes(self, data: bytes) -> str:
        """Store ``data`` as a blob (not linked to any repository); return its sha256 digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._put_bytes(data, digest)
        return digest

    def _put_bytes(self, data: bytes, digest: str) -> None:
        """Store ``data`` (which has ``digest``) unless the same bytes are stored; a stored copy
        that differs went bad: quarantined, replaced."""
        path = self._blob_file(digest)
        try:
            with open(path, "rb") as f:
                fid = file_id(os.fstat(f.fileno()))
                if f.read(len(data) + 1) == data:
                    return
            self.quarantine_blob(digest, fid)
        except FileNotFoundError:
            pass
        atomic_write(path, data)

    # -- manifests -----------------------------------------------------------------------

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag or its digest; return its digest.

        Checks: the size limit, the JSON, the media type (``media_type``, usually the request's
        Content-Type, must agree with the manifest's ``mediaType``), a digest ``reference``
        matches the bytes, and every blob (image manifest) or manifest (index) it references
        is in ``repo``. The config and layers are linked to ``repo``.
        """
        return self.put_manifest_info(repo, reference, data, media_type).digest

    def put_manifest_info(
        self, repo: str, reference: str, data: bytes, media_type: str
    ) -> PutResult:
        """:meth:`put_manifest`, returning the digest, the media type and the subject."""
        check_name(repo)
        if is_digest(reference):
            digest_ref: str | None = check_blob_digest(reference)
            tag = None
        else:
            digest_ref = None
            tag = check_tag(reference)
        if len(data) > self.max_manifest_size:
            raise SizeInvalid(
                f"manifest of {len(data)} bytes is larger than the limit of "
                f"{self.max_manifest_size} bytes",
                status=413,
                detail={"size": len(data), "limit": self.max_manifest_size},
            )
        algo = digest_ref.split(":", 1)[0] if digest_ref else "sha256"
        digest = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
        if digest_ref is not None:
            _check_content(digest, digest_ref, "manifest")
        try:
            obj = jsonbody.loads(data, "manifest")
        except jsonbody.JsonError as exc:
            raise ManifestInvalid(str(exc)) from None
        if not isinstance(obj, dict):
            raise ManifestInvalid("manifest is not a JSON object")
        mtype = self._manifest_type(obj, media_type)
        if obj.get("schemaVersion") != 2:
            raise ManifestInvalid(
                f"unsupported schemaVersion {obj.get('schemaVersion')!r} (2 is supported)"
            )
        links, subject = self._check_references(repo, obj, mtype)

        self._put_bytes(data, digest)
        self.link_stored(repo, [*links, digest], strict=True)
        revision = self._revision(repo, digest)
        atomic_write(revision, mtype.encode())
        if subject is not None:
            self._add_referrer(repo, subject, obj, mtype, digest, len(data))
        if tag is not None:
            atomic_write(self._tag_file(repo, tag), digest.encode())
        return PutResult(digest, mtype, subject)

    @staticmethod
    def _manifest_type(obj: dict[str, Any], content_type: str) -> str:
        ctype = content_type.split(";", 1)[0].strip().lower()
        body_type = obj.get("mediaType")
        if body_type is not None and not isinstance(body_type, str):
            raise ManifestInvalid("mediaType is not a string")
        if ctype in MANIFEST_MEDIA_TYPES:
            if body_type and body_type != ctype:
                raise ManifestInvalid(
                    f"Content-Type {ctype} does not match the manifest's mediaType {body_type}",
                    detail={"contentType": ctype, "mediaType": body_type},
                )
            return ctype
        if ctype not in _GENERIC_CONTENT_TYPES and not ctype.startswith("application/vnd.docker.distribution.manifest.v1"):
            raise ManifestInvalid(
                f"unsupported manifest media type {ctype}",
                detail={"mediaType": ctype, "supported": sorted(MANIFEST_MEDIA_TYPES)},
            )
        if body_type:
            if body_type not in MANIFEST_MEDIA_TYPES:
                raise ManifestInvalid(
                    f"unsupported manifest media type {body_type}",
                    detail={"mediaType": body_type, "supported": sorted(MANIFEST_MEDIA_TYPES)},
                )
            return body_type
        if obj.get("schemaVersion") == 1 or ctype.startswith("application/vnd.docker.distribution.manifest.v1"):
            raise ManifestInvalid("Docker schema 1 manifests are not supported")
        if "manifests" in obj:
            return OCI_INDEX
        if "config" in obj:
            return OCI_MANIFEST
        raise ManifestInvalid("cannot tell the manifest's media type (set Content-Type)")

    def _check_references(
        self, repo: str, obj: dict[str, Any], mtype: str
    ) -> tuple[list[str], str | None]:
        """Validate the descriptors of ``obj``; return (blobs to link, subject digest)."""
        links: list[str] = []
        missing: list[str] = []
        try:
            if mtype in _IMAGE_TYPES:
                config = Descriptor.from_json(obj.get("config"), "config")
                layers_raw = obj.get("layers", [])
                if not isinstance(layers_raw, list):
                    raise ManifestInvalid("layers is not a list")
                layers = [Descriptor.from_json(x, f"layer {i}") for i, x in enumerate(layers_raw)]
                for desc in [config, *layers]:
                    size = self.blob_size(desc.digest)
                    if size is None or not self._layer_link(repo, desc.digest).exists():
                        if desc.urls and desc is not config:
                            continue  # a foreign layer, fetched from its URLs
                        missing.append(desc.digest)
                        continue
                    if size != desc.size:
                        raise ManifestInvalid(
                            f"descriptor of {desc.digest} says {desc.size} bytes, "
                            f"the blob has {size}",
                            detail={"digest": desc.digest, "size": desc.size, "actual": size},
                        )
                    links.append(desc.digest)
                unknown = "manifest references {} blob(s)"
            else:
                children_raw = obj.get("manifests")
                if not isinstance(children_raw, list):
                    raise ManifestInvalid("manifests is not a list")
                for i, x in enumerate(children_raw):
                    child = Descriptor.from_json(x, f"manifests[{i}]")
                    if not self._revision(repo, child.digest).exists():
                        missing.append(child.digest)
                unknown = "index references {} manifest(s)"
            if missing:
                raise ManifestBlobUnknown(
                    f"{unknown.format(len(missing))} unknown to {repo}: " + ", ".join(missing[:5]),
                    detail={"digests": missing},
                )
            subject = None
            if obj.get("subject") is not None:
                subject = Descriptor.from_json(obj["subject"], "subject").digest
        except FormatError as exc:
            raise ManifestInvalid(str(exc)) from None
        return links, subject

    def _resolve(self, repo: str, reference: str) -> str | None:
        """The digest a tag or digest reference stands for in ``repo``, if it has it."""
        if is_digest(reference):
            digest = check_blob_digest(reference)
        else:
            try:
                digest = self._tag_file(repo, reference).read_text().strip()
            except (FileNotFoundError, NotADirectoryError):
                return None
            except ManifestInvalid:
                raise ManifestUnknown(
                    f"invalid reference {reference!r}", detail={"reference": reference[:300]}
                ) from None
            try:
                check_digest(digest)
            except FormatError:
                return None
        return digest if self._revision(repo, digest).is_file() else None

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str] | None:
        """(bytes, media type, digest) of a manifest by tag or digest, or None (also when its
        stored bytes no longer match the digest: then they are quarantined)."""

        def read(path: Path) -> tuple[bytes, tuple[int, int]]:
            with open(path, "rb") as f:
                return f.read(), file_id(os.fstat(f.fileno()))

        found = self._manifest(repo, reference, read)
        if found is None:
            return None
        media_type, digest, (data, fid) = found
        if f"{digest.split(':', 1)[0]}:{hashlib.new(digest.split(':', 1)[0], data).hexdigest()}" != digest:
            self.quarantine_blob(digest, fid)
            return None
        return data, media_type, digest

    def manifest_info(self, repo: str, reference: str) -> tuple[str, str, int] | None:
        """(media type, digest, size) of a manifest, without reading it."""
        return self._manifest(repo, reference, lambda path: path.stat().st_size)

    def _manifest(self, repo: str, reference: str, read: Callable[[Path], T]) -> tuple[str, str, T] | None:
        """(media type, digest, ``read(blob file)``) of a manifest by tag or digest, or None."""
        digest = self._resolve(repo, reference)
        if digest is None:
            return None
        try:
            media_type = self._revision(repo, digest).read_text().strip()
            return media_type, digest, read(self._blob_file(digest))
        except FileNotFoundError:
            return None

    def delete_manifest(self, repo: str, reference: str) -> None:
        """Delete a tag (reference is a tag) or a manifest and every tag pointing to it."""
        check_name(repo)
        if not is_digest(reference):
            path = self._tag_file(repo, reference)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                raise ManifestUnknown(
                    f"tag {reference} is not in {repo}", detail={"tag": reference}
                ) from None
            fsync_dir(path.parent)
            return
        digest = check_blob_digest(reference)
        revision = self._revision(repo, digest)
        if not revision.is_file():
            raise ManifestUnknown(
                f"manifest {digest} is not in {repo}", detail={"digest": digest}
            )
        for tag, target in self._tag_targets(repo):
            if target == digest:
                with contextlib.suppress(FileNotFoundError):
                    (self._tags_dir(repo) / tag).unlink()
        self._drop_referrer(repo, digest)
        revision.unlink()
        fsync_dir(revision.parent)
        if self._tags_dir(repo).is_dir():
            fsync_dir(self._tags_dir(repo))

    def _tag_targets(self, repo: str) -> Iterator[tuple[str, str]]:
        tags_dir = self._tags_dir(repo)
        try:
            names = os.listdir(tags_dir)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if TAG_RE.fullmatch(name):
                try:
                    yield name, (tags_dir / name).read_text().strip()
                except FileNotFoundError:
                    continue

    def tags(self, repo: str) -> list[str]:
        """The tags of ``repo``, sorted (NameUnknown if there is no such repository)."""
        if not self.repo_exists(repo):
            raise NameUnknown(f"repository {repo} is not known", detail={"name": repo})
        return sorted(name for name, _ in self._tag_targets(repo))

    def repositories(self) -> list[str]:
        """Every repository (one with blobs or manifests), sorted."""
        top = self.root / "repositories"
        found: list[str] = []
        for dirpath, dirnames, _ in os.walk(top):
            if "_manifests" in dirnames or "_layers" in dirnames:
                found.append(os.path.relpath(dirpath, top))
            dirnames[:] = [d for d in dirnames if not d.startswith(("_", "."))]
        return sorted(found)

    # -- referrers -----------------------------------------------------------------------

    def _add_referrer(
        self, repo: str, subject: str, obj: dict[str, Any], mtype: str, digest: str, size: int
    ) -> None:
        desc: dict[str, Any] = {"mediaType": mtype, "digest": digest, "size": size}
        artifact_type = obj.get("artifactType")
        if not artifact_type and mtype in _IMAGE_TYPES and isinstance(obj.get("config"), dict):
            artifact_type = obj["config"].get("mediaType")
        if isinstance(artifact_type, str) and artifact_type:
            desc["artifactType"] = artifact_type
        ann = obj.get("annotations")
        if isinstance(ann, dict) and ann:
            desc["annotations"] = ann
        algo, hexd = digest.split(":", 1)
        atomic_write(self._referrers_dir(repo, subject) / f"{algo}-{hexd}", json.dumps(desc).encode())

    def _drop_referrer(self, repo: str, digest: str) -> None:
        try:
            obj = json.loads(self._blob_file(digest).read_bytes())
            subject = obj["subject"]["digest"]
            algo, hexd = digest.split(":", 1)
            (self._referrers_dir(repo, subject) / f"{algo}-{hexd}").unlink()
        except (OSError, ValueError, KeyError, TypeError, DigestInvalid):
            return

    def referrers(self, repo: str, subject: str, artifact_type: str | None = None) -> list[dict[str, Any]]:
        """Descriptors of the manifests in ``repo`` whose ``subject`` is ``subject``."""
        folder = self._referrers_dir(repo, subject)
        out: list[dict[str, Any]] = []
        try:
            names = sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for name in names:
            if name.startswith("."):
                continue
            try:
                desc = json.loads((folder / name).read_bytes())
            except (FileNotFoundError, ValueError):
                continue
            if not self._revision(repo, desc["digest"]).is_file():
                continue
            if artifact_type is None or desc.get("artifactType") == artifact_type:
                out.append(desc)
        return out

    # -- upload sessions -----------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, uuid: str, repo: str | None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Hold upload ``uuid`` for one operation; yield (its folder, its state)."""
        found = self._acquire(uuid, repo)
        try:
            yield found
        finally:
            self._release(uuid)

    def _acquire(self, uuid: str, repo: str | None) -> tuple[Path, dict[str, Any]]:
        """Mark upload ``uuid`` busy (BlobUploadInvalid if it is); return (its folder, its
        state). The caller calls :meth:`_release` when done."""
        folder = self._upload_dir(uuid)
        with self._lock:
            if uuid in self._busy:
                raise BlobUploadInvalid(
                    f"upload {uuid} is busy with another request", detail={"uuid": uuid}
                )
            self._busy.add(uuid)
        try:
            try:
                state = json.loads((folder / "state.json").read_bytes())
            except (FileNotFoundError, NotADirectoryError, ValueError):
                raise BlobUploadUnknown(f"unknown upload {uuid}", detail={"uuid": uuid}) from None
            if repo is not None and state.get("repo") != repo:
                raise BlobUploadUnknown(
                    f"upload {uuid} does not belong to {repo}", detail={"uuid": uuid}
                )
        except BaseException:
            self._release(uuid)
            raise
        return folder, state

    def _release(self, uuid: str) -> None:
        with self._lock:  # held for a set operation only, so the event loop may take it
            self._busy.discard(uuid)

    def new_upload(self, repo: str) -> str:
        """Start an upload session for ``repo``; return its id."""
        check_name(repo)
        uuid = str(uuidlib.uuid4())
        folder = self._upload_dir(uuid)
        folder.mkdir()
        try:
            (folder / "data").touch()
            # not flushed (a crash loses the session; the client starts again), and no temporary
            # name: no request can name the session before this returns
            (folder / "state.json").write_bytes(json.dumps({"repo": repo, "created": time.time()}).encode())
        except BaseException:  # a full disk: no half-made session is left behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return uuid

    async def upload_append(
        self,
        uuid: str,
        data_stream: bytes | Iterable[bytes] | AsyncIterable[bytes],
        expected_offset: int | None = None,
        *,
        repo: str | None = None,
        expected_length: int | None = None,
    ) -> int:
        """Append bytes to upload ``uuid``; return the new offset (bytes received in all).

        ``expected_offset``: where the chunk starts (from Content-Range); RangeInvalid (416)
        if the upload stands elsewhere. ``data_stream`` is bytes or a (sync or async) iterable
        of byte chunks; what arrived is kept, also when the stream breaks off, so a client can
        resume. Past max_blob_size: SizeInvalid. One offloaded write in flight at a time.

        ``expected_length``: the chunk's length (from Content-Range); a stream that ends
        shorter or runs longer is refused (RangeInvalid) and none of its bytes are kept."""
        folder, _state = await offload(self._acquire, uuid, repo)
        try:
            path = folder / "data"
            offset = await offload(lambda: path.stat().st_size)
            if expected_offset is not None and expected_offset != offset:
                raise RangeInvalid(
                    f"chunk starts at {expected_offset} but the upload is at {offset}",
                    detail={"offset": offset, "start": expected_offset},
                )
            entry = self._hashes.pop(uuid, None)
            h: Any = entry[1] if entry is not None and entry[0] == offset else None
            if h is None and offset == 0:
                h = hashlib.sha256()
            writer = _Appender(path, h, offset)
            start = offset
            refused = False
            try:
                async for chunk in _chunks(data_stream):
                    if expected_length is not None and offset + len(chunk) - start > expected_length:
                        refused = True
                        raise _length_mismatch(start, expected_length, "more")
                    if offset + len(chunk) > self.max_blob_size:
                        raise SizeInvalid(
                            f"blob is larger than the limit of {self.max_blob_size} bytes",
                            status=413,
                            detail={"limit": self.max_blob_size},
                        )
                    await writer.add(chunk)
                    offset += len(chunk)
                if expected_length is not None and offset - start != expected_length:
                    refused = True
                    raise _length_mismatch(start, expected_length, f"only {offset - start}")
            finally:
                try:
                    await writer.drain()  # what arrived is kept, also when the stream broke off
                finally:
                    if refused:  # ... but not a chunk that is not what its Content-Range says
                        await offload(os.truncate, path, start)
                        writer.written = start
                    elif writer.broken:  # ... nor the part of a write that failed (a full disk)
                        await offload(os.truncate, path, writer.written)
                    elif h is not None:
                        self._hashes[uuid] = (writer.written, h)
            return writer.written
        finally:
            self._release(uuid)

    def upload_status(self, uuid: str, *, repo: str | None = None) -> UploadStatus:
        with self._session(uuid, repo) as (folder, state):
            st = (folder / "data").stat()
            return UploadStatus(uuid, str(state["repo"]), st.st_size, float(state["created"]), st.st_mtime)

    def upload_finish(self, uuid: str, digest: str, *, repo: str | None = None) -> None:
        """Verify the upload's bytes against ``digest``, store and link the blob, end the session.

        On a mismatch the session and its bytes are deleted and DigestInvalid is raised.
        """
        check_blob_digest(digest)
        with self._session(uuid, repo) as (folder, state):
            data = folder / "data"
            algo = digest.split(":", 1)[0]
            try:
                entry = self._hashes.pop(uuid, None)
                size = data.stat().st_size
                if algo == "sha256" and entry is not None and entry[0] == size:
                    actual = "sha256:" + entry[1].hexdigest()
                else:
                    actual, size = _hash_file(data, algo)
                _check_content(actual, digest, "uploaded content", size=size)
                # bytes flushed before the blob is named, names flushed before the 201
                dest = self._blob_file(digest)
                dirty: list[Path] = []
                # a stored copy is checked: bytes gone bad are replaced by these (a repair)
                if not dest.is_file() or self._replace_if_bad(dest):
                    _fsync_file(data)
                    if self._publish(data, dest, sync=False):
                        dirty.append(dest.parent)
                dirty += self._link_unsynced(str(state["repo"]), digest)
                for parent in dict.fromkeys(dirty):
                    fsync_dir(parent)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def upload_cancel(self, uuid: str, *, repo: str | None = None) -> None:
        with self._session(uuid, repo) as (folder, _state):
            self._hashes.pop(uuid, None)
            shutil.rmtree(folder, ignore_errors=True)

    def expire_uploads(self, now: float | None = None) -> int:
        """Delete upload sessions idle for longer than upload_ttl; return how many."""
        now = time.time() if now is None else now
        top = self.root / "uploads"
        count = 0
        for name in os.listdir(top):
            path = top / name
            if not _UUID_RE.fullmatch(name):
                with contextlib.suppress(OSError):
                    if now - path.lstat().st_mtime > self.upload_ttl:
                        if path.is_dir() and not path.is_symlink():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink()
                continue
            with self._lock:
                if name in self._busy:
                    continue
                self._busy.add(name)
            try:
                last = 0.0
                for p in (path, path / "data", path / "state.json"):
                    with contextlib.suppress(OSError):
                        last = max(last, p.stat().st_mtime)
                if now - last > self.upload_ttl:
                    shutil.rmtree(path, ignore_errors=True)
                    self._hashes.pop(name, None)
                    count += 1
            finally:
                with self._lock:
                    self._busy.discard(name)
        return count

    def uploads(self) -> list[str]:
        """Ids of the upload sessions present."""
        return sorted(n for n in os.listdir(self.root / "uploads") if _UUID_RE.fullmatch(n))

    # -- housekeeping --------------------------------------------------------------------

    def clean_temporary_files(self, older_than: float = 0.0) -> int:
        """Remove what a crash left behind (older than ``older_than`` seconds): temporary
        files in blobs/ and folders in tmp/ (see scratch_dir)."""
        now = time.time()
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / "tmp"):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime >= older_than:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)
                        count += 1
        for algo_dir in (self.root / "blobs").iterdir():
            for entry in os.scandir(algo_dir):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime >= older_than:
                            os.unlink(entry.path)
                            count += 1
        return count

    def scratch_dir(self, prefix: str = "work") -> Path:
        """A fresh private folder under ``ROOT/tmp`` for files that will be imported with
        :meth:`import_blob` (same file system: a rename, no copy). The caller removes it;
        leftovers of a crash are removed at the next start (clean_temporary_files)."""
        top = self.root / "tmp"
        top.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=top))

    def garbage_collect(self, grace: float | None = None) -> int:
        """Delete blobs no repository links any more; return how many.

        Blobs younger than ``grace`` seconds (default: upload_ttl) are kept, so a blob that is
        being pushed right now (stored, not yet linked) survives.
        """
        grace = self.upload_ttl if grace is None else grace
        linked: set[str] = set()
        top = self.root / "repositories"
        for dirpath, dirnames, _ in os.walk(top):
            for kind in ("_layers", "_manifests"):
                if kind not in dirnames:
                    continue
                base = Path(dirpath) / kind
                if kind == "_manifests":
                    base = base / "revisions"
                with contextlib.suppress(FileNotFoundError):
                    for algo in os.listdir(base):
                        for hexd in os.listdir(base / algo):
                            linked.add(f"{algo}:{hexd}")
            dirnames[:] = [d for d in dirnames if not d.startswith(("_", "."))]
        now = time.time()
        count = 0
        for algo_dir in (self.root / "blobs").iterdir():
            for entry in os.scandir(algo_dir):
                if entry.name.startswith("."):
                    continue
                if f"{algo_dir.name}:{entry.name}" in linked:
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime >= grace:
                        os.unlink(entry.path)
                        count += 1
        return count


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders that got new entries
    (the parents of those created), outermost first, for the caller to fsync."""
    missing: list[Path] = []
    p = folder
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    dirty: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        dirty.append(d.parent)
    return dirty


def _length_mismatch(start: int, expected: int, got: str) -> RangeInvalid:
    return RangeInvalid(
        f"Content-Range says {expected} bytes but the body has {got}",
        detail={"offset": start, "contentRangeLength": expected},
    )


class _Appender:
    """Appends pieces to a file off the event loop, in writes of about REGISTRY_IO_CHUNK with
    one in flight while the next pieces arrive. After a failed write it writes nothing more."""

    def __init__(self, path: Path, h: Any, offset: int) -> None:
        self.path = path
        self.h = h
        self.written = offset  # the file's size as far as finished writes tell
        self.broken = False
        self.pieces: list[bytes] = []
        self.buffered = 0
        self.pending: asyncio.Future[int] | None = None

    async def add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.buffered += len(piece)
        if self.buffered >= REGISTRY_IO_CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        """Wait for the write in flight, then start one of what is buffered."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                self.written += await pending
            except BaseException:
                self.broken = True
                raise
        if self.pieces and not self.broken:
            pieces, self.pieces, self.buffered = self.pieces, [], 0
            self.pending = asyncio.ensure_future(offload(_append, self.path, pieces, self.h))

    async def drain(self) -> None:
        """Write what is buffered and wait until every write is done."""
        await self._flush()
        await self._flush()


async def _chunks(data: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if data:
            yield bytes(data)
    elif isinstance(data, AsyncIterable):
        async for chunk in data:
            if chunk:
                yield chunk
    else:
        for chunk in data:
            if chunk:
                yield chunk
