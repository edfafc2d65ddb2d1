"""Image manifests and configs (any image: :class:`ImageManifest`, :func:`parse_config`),
and a turbo image's manifest and index, pinned by the manifest digest.

``manifest -> index blob -> chunk blobs``: the manifest names the index blob (its first
layer, also in the ``io.turbofs.index.digest`` annotation) and every chunk blob; the index
names each chunk's blob by digest. :func:`parse_manifest` checks that these agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbofs.core import codec, oci
from turbofs.core import format as fmt
from turbofs.core.config import CLIENT_MAX_CONFIG
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
        return [oci.Descriptor.from_json(d, f"manifest {self.where}") for d in self.obj.get("layers") or []]


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


def parse_manifest(raw: bytes, digest: str) -> TurboManifest:
    oci.verify_bytes(raw, digest, "manifest")
    obj = oci.parse_json(raw, f"manifest {digest}")
    if obj.get("schemaVersion") != 2:
        raise FormatError(f"manifest {digest}: schemaVersion must be 2")
    if not is_turbo_manifest(obj):
        raise FormatError(f"manifest {digest} is not a turbo image (its first layer is not a turbofs index)")
    config = oci.Descriptor.from_json(obj.get("config"), f"manifest {digest}: config")
    layers = [oci.Descriptor.from_json(d, f"manifest {digest}: layer") for d in obj["layers"]]
    index, blobs = layers[0], tuple(layers[1:])
    for b in blobs:
        if b.media_type != oci.TURBO_CHUNKS:
            raise FormatError(f"manifest {digest}: layer {b.digest} has media type {b.media_type!r}, expected {oci.TURBO_CHUNKS}")
    ann = obj.get("annotations") or {}
    if ann.get(oci.ANN_TURBO_INDEX, index.digest) != index.digest:
        raise FormatError(f"manifest {digest}: index annotation disagrees with its first layer")
    return TurboManifest(digest, raw, config, index, blobs, dict(ann))


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
    try:
        index_json = json.loads((root / "index.json").read_bytes())
    except FileNotFoundError:
        raise NotFound(f"{root}: not an OCI image layout (no index.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{root}/index.json: {exc}") from None
    descs = [oci.Descriptor.from_json(d, f"{root}/index.json") for d in index_json.get("manifests", [])]
    if tag is not None:
        descs = [d for d in descs if (d.annotations or {}).get(oci.ANN_REF_NAME) == tag]
    if len(descs) != 1:
        raise NotFound(f"{root}: {'no' if not descs else 'more than one'} image" + (f" tagged {tag!r}" if tag else ""))

    def read(digest: str) -> bytes:
        algo, hexd = oci.check_digest(digest).split(":", 1)
        try:
            return (root / "blobs" / algo / hexd).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{root}: blob {digest} is missing") from None

    manifest = parse_manifest(read(descs[0].digest), descs[0].digest)
    config = parse_config(read(manifest.config.digest), manifest.config)
    index = load_index(manifest, read(manifest.index.digest))
    return LayoutImage(root, manifest, config.obj, index)
