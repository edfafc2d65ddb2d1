"""Server-side flattening: turn a plain image in the registry's storage into a turbo image.

A conversion reads the source manifest, config and layers straight from the storage, runs
the same builder as ``turbofs build`` into a temporary layout inside the storage folder,
imports the resulting blobs (verified) and stores the turbo manifest under the target tag
(by default the source tag plus ``convert_tag_suffix``). One conversion runs at a time, all
of it offloaded to a worker thread; its state and error are visible through
``GET .../_turbofs/convert/<id>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from index_builder.builder import build
from index_builder.sources import image_from_manifest
from server import jsonbody
from server.offload import offload
from server.storage import Storage
from turbofs.core import oci
from turbofs.core.config import REGISTRY_MAX_JSON_DEPTH, BuildConfig, RegistryConfig
from turbofs.core.errors import NotFound, SourceError, TurboError
from turbofs.core.image import is_turbo_manifest

log = logging.getLogger("turbofs.registry.convert")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass
class Job:
    id: str
    repo: str
    reference: str
    tag: str
    state: str = "queued"  # queued -> running -> done | failed
    error: str = ""
    manifest: str = ""
    created: float = field(default_factory=time.time)
    finished: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "repository": self.repo,
            "reference": self.reference,
            "tag": self.tag,
            "state": self.state,
        }
        if self.error:
            out["error"] = self.error
        if self.manifest:
            out["manifest"] = self.manifest
        if self.summary:
            out["summary"] = self.summary
        return out


class Converter:
    """Queues conversions and runs them one at a time in a thread."""

    def __init__(self, storage: Storage, cfg: RegistryConfig) -> None:
        self.storage = storage
        self.cfg = cfg
        self.jobs: dict[str, Job] = {}
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, repo: str, reference: str, tag: str | None) -> Job:
        if tag is None:
            if reference.startswith(("sha256:", "sha512:")):
                raise ValueError("converting by digest needs a target tag")
            tag = reference + self.cfg.convert_tag_suffix
        if not _TAG_RE.match(tag):
            raise ValueError(f"invalid target tag {tag!r}")
        job = Job(secrets.token_hex(8), repo, reference, tag)
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def maybe_auto_convert(self, repo: str, reference: str, digest: str, media_type: str) -> None:
        """Convert a freshly pushed plain image if its repository is chosen for that."""
        if not any(fnmatch.fnmatchcase(repo, pat) for pat in self.cfg.auto_convert):
            return
        if reference.startswith(("sha256:", "sha512:")) or reference.endswith(self.cfg.convert_tag_suffix):
            return
        if media_type not in (oci.OCI_MANIFEST, oci.DOCKER_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST_LIST):
            return
        got = await offload(self.storage.get_manifest, repo, digest)
        if got is None or is_turbo_manifest(json.loads(got[0])):
            return
        try:
            self.submit(repo, reference, None)
        except ValueError as exc:  # e.g. a tag too long for the suffix
            log.warning("auto-convert of %s:%s skipped: %s", repo, reference, exc)

    async def _run(self, job: Job) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            job.state = "running"
            try:
                await offload(self._convert, job)
                job.state = "done"
            except TurboError as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # a bug: still visible to the client, logged in full
                log.exception("conversion %s failed", job.id)
                job.state, job.error = "failed", f"internal error: {exc!r}"
            job.finished = time.time()
            log.info("conversion %s of %s:%s -> %s: %s %s", job.id, job.repo, job.reference, job.tag,
                     job.state, job.error)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the conversion itself (worker thread) ---------------------------------------

    def _open_blob(self, digest: str) -> BinaryIO:
        path = self.storage.blob_path(digest)
        if path is None:
            raise NotFound(f"blob {digest} is not in the registry")
        return cast(BinaryIO, open(path, "rb"))

    def _read_blob(self, digest: str, what: str, limit: int) -> bytes:
        with self._open_blob(digest) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise SourceError(f"{what} {digest} is larger than {limit} bytes")
        oci.verify_bytes(data, digest, what)
        return data

    def _convert(self, job: Job) -> None:
        got = self.storage.get_manifest(job.repo, job.reference)
        if got is None:
            raise NotFound(f"{job.repo}:{job.reference}: no such manifest")
        data, media_type, digest = got
        manifest = oci.parse_json(data, f"manifest {digest}")
        if media_type in oci.INDEX_TYPES or "manifests" in manifest:
            want = oci.host_platform()
            for entry in manifest.get("manifests", []):
                desc = oci.Descriptor.from_json(entry, f"index {digest}")
                if oci.platform_matches(desc.platform, *want):
                    sub = self.storage.get_manifest(job.repo, desc.digest)
                    if sub is None:
                        raise NotFound(f"manifest {desc.digest} of index {digest} is missing")
                    data, media_type, digest = sub
                    manifest = oci.parse_json(data, f"manifest {digest}")
                    break
            else:
                raise NotFound(f"index {digest} has no manifest for {'/'.join(p for p in want if p)}")
        if is_turbo_manifest(manifest):
            raise SourceError(f"{job.repo}:{job.reference} is already a turbo image")
        config_desc = oci.Descriptor.from_json(manifest.get("config"), f"manifest {digest}: config")
        config = self._read_blob(config_desc.digest, "image config", self.cfg.max_manifest_size)
        if jsonbody.too_deep(config, REGISTRY_MAX_JSON_DEPTH):  # the builder's parser recurses
            raise SourceError(f"image config {config_desc.digest} is nested more than "
                              f"{REGISTRY_MAX_JSON_DEPTH} levels deep")
        src = image_from_manifest(f"{job.repo}@{digest}", manifest, digest, config, self._open_blob)
        scratch = self.storage.scratch_dir(f"convert-{job.id}")  # same file system: imports are renames
        work = scratch / "image"
        try:
            result = build(src, work, BuildConfig(tag=job.tag), progress=False)
            raw = (work / "blobs" / "sha256" / result.manifest_digest.split(":", 1)[1]).read_bytes()
            for blob in sorted((work / "blobs" / "sha256").iterdir()):
                blob_digest = "sha256:" + blob.name
                if self.storage.blob_path(blob_digest) is None:
                    self.storage.import_blob(blob, blob_digest)
                self.storage.link_blob(job.repo, blob_digest)
            job.manifest = self.storage.put_manifest(job.repo, job.tag, raw, oci.OCI_MANIFEST)
            job.summary = {
                "files": result.files,
                "file_bytes": result.file_bytes,
                "chunks": result.chunks,
                "compressed_bytes": result.compressed_bytes,
                "seconds": round(result.seconds, 3),
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
