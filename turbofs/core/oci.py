"""OCI image plumbing shared by the builder, the registry and the node.

Media types, digests, descriptors, atomic file writes, and reading and writing OCI image
layout directories (https://github.com/opencontainers/image-spec/blob/main/image-layout.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from turbofs.core.errors import DigestMismatch, FormatError, NotFound, SourceError

# -- media types -------------------------------------------------------------------------

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"

TURBO_INDEX: Final = "application/vnd.turbofs.index.v1"
TURBO_CHUNKS: Final = "application/vnd.turbofs.chunks.v1+zstd"
#: The answer of the batched chunk fetch (docs/api.md).
TURBO_BATCH: Final = "application/vnd.turbofs.batch.v1"
#: Manifest annotations of a turbo image.
ANN_TURBO_VERSION: Final = "io.turbofs.format.version"
ANN_TURBO_INDEX: Final = "io.turbofs.index.digest"
ANN_TURBO_SOURCE: Final = "io.turbofs.source.manifest"
ANN_TURBO_CHUNK_SIZE: Final = "io.turbofs.chunk-size"
ANN_REF_NAME: Final = "org.opencontainers.image.ref.name"

MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})

#: Layer media types we can unpack, mapped to their compression.
LAYER_COMPRESSION: Final = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

# -- digests -----------------------------------------------------------------------------

_DIGEST_RE: Final = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
#: The OCI grammar for any digest; we verify only sha256 and sha512.
_ANY_DIGEST_RE: Final = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Validate a digest string; return it. Unsupported algorithms are rejected clearly."""
    if not isinstance(digest, str) or not _ANY_DIGEST_RE.match(digest):
        raise FormatError(f"invalid digest {digest!r}")
    if not _DIGEST_RE.match(digest):
        raise FormatError(f"unsupported digest {digest!r} (sha256 and sha512 are supported)")
    return digest


def hasher(digest: str) -> Any:
    """A fresh hashlib object for the algorithm of ``digest``."""
    return hashlib.new(check_digest(digest).split(":", 1)[0])


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    h = hasher(digest)
    h.update(data)
    actual = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if actual != digest:
        raise DigestMismatch(f"{what}: content has digest {actual}, expected {digest}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise FormatError(f"{what}: descriptor is not an object")
        media_type = obj.get("mediaType", "")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise FormatError(f"{what}: mediaType is not a string")
        if not isinstance(digest, str):
            raise FormatError(f"{what}: descriptor has no digest")
        try:
            check_digest(digest)
        except FormatError as exc:
            raise FormatError(f"{what}: {exc}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{what}: descriptor {digest} has an invalid size {size!r}")
        ann = obj.get("annotations")
        if ann is not None and not (
            isinstance(ann, dict) and all(isinstance(v, str) for v in ann.values())
        ):
            raise FormatError(f"{what}: annotations must map strings to strings")
        plat = obj.get("platform")
        urls = obj.get("urls") or ()
        if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) for u in urls):
            raise FormatError(f"{what}: descriptor {digest}: urls must be a list of strings")
        return cls(media_type, digest, size, ann, plat if isinstance(plat, dict) else None, tuple(urls))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = self.platform
        if self.urls:
            out["urls"] = list(self.urls)
        return out


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace) for manifests we write."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from outside: anything else (not JSON, NaN or Infinity, nesting past the
    parser's depth, integers past Python's digit limit) is a FormatError."""
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise FormatError(f"{what} is not acceptable JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise FormatError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    return obj


# -- atomic writes -----------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# -- OCI image layouts -------------------------------------------------------------------

OCI_LAYOUT_FILE: Final = b'{"imageLayoutVersion":"1.0.0"}'


class LayoutWriter:
    """Writes an OCI image layout into a fresh directory, blob by blob."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        algo, hexd = check_digest(digest).split(":", 1)
        return self.root / "blobs" / algo / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            atomic_write(path, data)
        return digest

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[_BlobSink]:
        """A sink for a large blob; its final name is its sha256 once closed."""
        fd, tmp = tempfile.mkstemp(prefix=".blob.", suffix=".tmp", dir=self.blob_dir)
        sink = _BlobSink(os.fdopen(fd, "wb"))
        try:
            yield sink
            sink.file.flush()
            os.fsync(sink.file.fileno())
            sink.file.close()
            os.replace(tmp, self.blob_path(sink.digest))
        except BaseException:
            sink.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def finish(self, manifests: list[Descriptor]) -> None:
        atomic_write(self.root / "oci-layout", OCI_LAYOUT_FILE)
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [d.to_json() for d in manifests],
        }
        atomic_write(self.root / "index.json", canonical_json(index))


class _BlobSink:
    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def publish_dir(tmp: Path, dest: Path, *, force: bool) -> None:
    """Move a completely written directory ``tmp`` to ``dest`` (replacing it if ``force``)."""
    if dest.exists() or dest.is_symlink():
        if not force:
            raise SourceError(f"{dest} already exists (use --force to replace it)")
        trash = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, trash)
        os.rename(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    fsync_dir(dest.parent)


def open_blob_file(path: Path, digest: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"blob {digest} is missing ({path})") from None


def platform_matches(plat: dict[str, Any] | None, want_os: str, want_arch: str, want_variant: str | None) -> bool:
    if not plat:
        return False
    if plat.get("os") != want_os or plat.get("architecture") != want_arch:
        return False
    return want_variant is None or plat.get("variant") in (None, want_variant)


def host_platform() -> tuple[str, str, str | None]:
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}.get(machine, machine)
    variant = "v8" if arch == "arm64" else ("v7" if arch == "arm" else None)
    return "linux", arch, variant


def parse_platform(text: str | None) -> tuple[str, str, str | None]:
    if not text:
        return host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SourceError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def split_path_ref(rest: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH:REF`` where PATH exists."""
    path = Path(rest)
    if path.exists():
        return path, None
    # PATH:REF, where REF may hold colons itself (docker-archive:FILE:example.com:5000/x:1)
    for i, ch in enumerate(rest):
        if ch == ":" and i and Path(rest[:i]).exists():
            return Path(rest[:i]), rest[i + 1 :] or None
    raise NotFound(f"{rest}: no such file or directory")


def split_local_ref(ref: str) -> tuple[Path, str | None] | None:
    """``(DIR, TAG)`` if ``ref`` names a local layout (``oci:DIR[:TAG]``, or an existing
    ``DIR[:TAG]``), else None."""
    explicit = ref.startswith("oci:")
    rest = ref.removeprefix("oci:")
    path = Path(rest)
    if path.is_dir():
        return path, None
    head, sep, tag = rest.rpartition(":")
    if sep and head and Path(head).is_dir() and "/" not in tag:
        return Path(head), tag or None
    if explicit:
        raise NotFound(f"{ref}: no such OCI layout directory")
    return None
