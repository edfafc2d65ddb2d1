"""Image manifests and configs (any image: :class:`ImageManifest`, :func:`parse_config`),
and a turbo image's manifest and index, pinned by the manifest digest.

``manifest -> index blob -> chunk blobs``: the manifest names the index blob (its first
layer, also in the ``io.turbofs.index.digest`` annotation) and every chunk blob; the index
names each chunk's blob by digest. :func:`parse_manifest` checks that these agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbofs.core import codec, oci
from turbofs.core import format as fmt
from turbofs.core.config import CLIENT_MAX_CONFIG, CLIENT_MAX_MANIFEST
from turbofs.core.errors import FormatError, NotFound


@dataclass(frozen=True)
class TurboManifest:
    digest: str
    raw: bytes
    config: oci.Descriptor
    index: oci.Descriptor
    blobs: tuple[oci.Descriptor, ...]
    annotations: dict[str, str]


@dataclass(frozen=True)
class OciDocument:
    """A JSON document of an image (manifest or config), named by its digest and checked."""

    digest: str
    media_type: str
    raw: bytes
    obj: dict[str, Any]
    #: names it in messages, e.g. ``REGISTRY/REPO@DIGEST``
    where: str


@dataclass(frozen=True)
class ImageManifest(OciDocument):
    """An image manifest (an image index already followed to one platform)."""

    @property
    def config(self) -> oci.Descriptor:
        return oci.Descriptor.from_json(self.obj.get("config"), f"manifest {self.where}")

    @property
    def layers(self) -> list[oci.Descriptor]:
        layers = self.obj.get("layers", [])
        if not isinstance(layers, list):
            raise FormatError(f"manifest {self.where}: layers is not a list")
        return [oci.Descriptor.from_json(d, f"manifest {self.where}") for d in layers]


@dataclass(frozen=True)
class ImageConfig(OciDocument):
    """An image config, checked against the descriptor that names it (:func:`parse_config`)."""

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """``rootfs.diff_ids``: one digest per layer, bottom first (containerd's chain IDs)."""
        rootfs = self.obj.get("rootfs")
        diffs = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diffs, list) or not diffs or not all(isinstance(d, str) for d in diffs):
            raise FormatError(f"{self.where}: rootfs.diff_ids is missing or empty")
        for d in diffs:
            try:
                oci.check_digest(d)
            except FormatError as exc:
                raise FormatError(f"{self.where}: rootfs.diff_ids: {exc}") from None
        return tuple(diffs)


def parse_config(raw: bytes, desc: oci.Descriptor, where: str | None = None) -> ImageConfig:
    """The image config ``desc`` names: bounded in size, of the size and digest ``desc`` gives, JSON."""
    where = where or f"image config {desc.digest}"
    if len(raw) > CLIENT_MAX_CONFIG:
        raise FormatError(f"{where}: {len(raw)} bytes is over the limit of {CLIENT_MAX_CONFIG}")
    if len(raw) != desc.size:
        raise FormatError(f"{where}: {len(raw)} bytes, its descriptor says {desc.size}")
    oci.verify_bytes(raw, desc.digest, where)
    return ImageConfig(desc.digest, desc.media_type, raw, oci.parse_json(raw, where), where)


def is_turbo_manifest(obj: dict[str, Any]) -> bool:
    layers = obj.get("layers")
    return bool(layers) and isinstance(layers, list) and isinstance(layers[0], dict) and (
        layers[0].get("mediaType") == oci.TURBO_INDEX
    )


def _check_schema_version(obj: dict[str, Any], where: str) -> None:
    version = obj.get("schemaVersion")
    if type(version) is not int or version != 2:  # not True, not 2.0
        raise FormatError(f"{where}: schemaVersion must be 2, not {str(version)[:40]!r}")


def _annotations(obj: dict[str, Any], where: str) -> dict[str, str]:
    """The ``annotations`` of a document: a string-string map (OCI image spec), {} if absent."""
    ann = obj.get("annotations")
    if ann is None:
        return {}
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise FormatError(f"{where}: annotations must map strings to strings")
    return dict(ann)


def _optional_string(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise FormatError(f"{where}: {key} is not a string")
    return value


def parse_manifest(raw: bytes, digest: str) -> TurboManifest:
    """A turbo image's manifest, named by ``digest``: every field of the OCI image manifest
    of the type the spec gives it, the first layer the index, the others chunk blobs."""
    if len(raw) > CLIENT_MAX_MANIFEST:
        raise FormatError(f"manifest {digest}: {len(raw)} bytes is over the limit of {CLIENT_MAX_MANIFEST}")
    oci.verify_bytes(raw, digest, "manifest")
    where = f"manifest {digest}"
    obj = oci.parse_json(raw, where)
    _check_schema_version(obj, where)
    media_type = _optional_string(obj, "mediaType", where)
    if media_type is not None and media_type not in (oci.OCI_MANIFEST, oci.DOCKER_MANIFEST):
        raise FormatError(f"{where}: media type {media_type[:100]!r} is not an image manifest")
    _optional_string(obj, "artifactType", where)
    if "subject" in obj:
        oci.Descriptor.from_json(obj["subject"], f"{where}: subject")
    ann = _annotations(obj, where)
    if not is_turbo_manifest(obj):
        raise FormatError(f"manifest {digest} is not a turbo image (its first layer is not a turbofs index)")
    config = oci.Descriptor.from_json(obj.get("config"), f"manifest {digest}: config")
    if not config.media_type:
        raise FormatError(f"{where}: config descriptor has no mediaType")
    layers = [oci.Descriptor.from_json(d, f"manifest {digest}: layer") for d in obj["layers"]]
    index, blobs = layers[0], tuple(layers[1:])
    if index.size > fmt.HEADER_SIZE + fmt.MAX_PAYLOAD:
        raise FormatError(f"manifest {digest}: index blob of {index.size} bytes is over the limit of {fmt.MAX_PAYLOAD}")
    for b in blobs:
        if b.media_type != oci.TURBO_CHUNKS:
            raise FormatError(f"manifest {digest}: layer {b.digest} has media type {b.media_type!r}, expected {oci.TURBO_CHUNKS}")
    if ann.get(oci.ANN_TURBO_INDEX, index.digest) != index.digest:
        raise FormatError(f"manifest {digest}: index annotation disagrees with its first layer")
    return TurboManifest(digest, raw, config, index, blobs, ann)


def load_index(manifest: TurboManifest, data: bytes) -> fmt.Index:
    """Decode the index blob of ``manifest``, checking its digest and its blob table."""
    if len(data) != manifest.index.size:
        raise FormatError(f"index {manifest.index.digest}: {len(data)} bytes, manifest says {manifest.index.size}")
    oci.verify_bytes(data, manifest.index.digest, "index blob")
    index = fmt.Index.from_bytes(data)
    listed = {(b.digest, b.size) for b in manifest.blobs}
    for blob in index.blobs():
        if (blob.oci_digest, blob.size) not in listed:
            raise FormatError(f"index names blob {blob.oci_digest} that manifest {manifest.digest} does not list")
    return index


@dataclass
class LayoutImage:
    """A turbo image in a local OCI image layout."""

    root: Path
    manifest: TurboManifest
    config: dict[str, Any]
    index: fmt.Index

    def blob_path(self, digest: str) -> Path:
        algo, hexd = oci.check_digest(digest).split(":", 1)
        return self.root / "blobs" / algo / hexd

    def read_chunk(self, chunk: fmt.Chunk) -> bytes:
        """The uncompressed bytes of ``chunk``, verified against its digest."""
        blob = self.index.blob(chunk.blob)
        with open(self.blob_path(blob.oci_digest), "rb") as f:
            f.seek(chunk.offset)
            frame = f.read(chunk.clen)
        return codec.decode_frame(chunk, frame).data

    def read(self, ino: int, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a regular file, straight from the layout (no cache)."""
        size = self.index.inode(ino).size
        parts = []
        for piece in self.index.map_range(ino, offset, size if length is None else length):
            if piece.chunk is None:
                parts.append(bytes(piece.length))
            else:
                data = self.read_chunk(piece.chunk)
                parts.append(data[piece.chunk_offset : piece.chunk_offset + piece.length])
        return b"".join(parts)


def open_layout_image(root: Path, tag: str | None = None) -> LayoutImage:
    """Open the turbo image tagged ``tag`` (or the only image) in the layout at ``root``."""
    where = f"{root}/index.json"
    try:
        with open(root / "index.json", "rb") as f:
            raw = f.read(CLIENT_MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise NotFound(f"{root}: not an OCI image layout (no index.json)") from None
    if len(raw) > CLIENT_MAX_MANIFEST:
        raise FormatError(f"{where}: larger than the limit of {CLIENT_MAX_MANIFEST} bytes")
    index_json = oci.parse_json(raw, where)
    _check_schema_version(index_json, where)
    media_type = _optional_string(index_json, "mediaType", where)
    if media_type is not None and media_type != oci.OCI_INDEX:
        raise FormatError(f"{where}: media type {media_type[:100]!r} is not an image index")
    _annotations(index_json, where)
    entries = index_json.get("manifests")
    if not isinstance(entries, list):
        raise FormatError(f"{where}: manifests is not a list")
    descs = [oci.Descriptor.from_json(d, where) for d in entries]
    if tag is not None:
        descs = [d for d in descs if (d.annotations or {}).get(oci.ANN_REF_NAME) == tag]
    if len(descs) != 1:
        raise NotFound(f"{root}: {'no' if not descs else 'more than one'} image" + (f" tagged {tag!r}" if tag else ""))

    def read(desc: oci.Descriptor, limit: int) -> bytes:
        """A blob of the layout, of the size its descriptor gives (checked before reading)."""
        algo, hexd = oci.check_digest(desc.digest).split(":", 1)
        if desc.size > limit:
            raise FormatError(f"{root}: blob {desc.digest} of {desc.size} bytes is over the limit of {limit}")
        try:
            with open(root / "blobs" / algo / hexd, "rb") as f:
                data = f.read(desc.size + 1)
        except FileNotFoundError:
            raise NotFound(f"{root}: blob {desc.digest} is missing") from None
        if len(data) != desc.size:
            raise FormatError(f"{root}: blob {desc.digest} is not of the {desc.size} bytes its descriptor gives")
        return data

    manifest = parse_manifest(read(descs[0], CLIENT_MAX_MANIFEST), descs[0].digest)
    config = parse_config(read(manifest.config, CLIENT_MAX_CONFIG), manifest.config)
    index = load_index(manifest, read(manifest.index, fmt.HEADER_SIZE + fmt.MAX_PAYLOAD))
    return LayoutImage(root, manifest, config.obj, index)
