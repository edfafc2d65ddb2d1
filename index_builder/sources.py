"""Input images for the builder: OCI layouts, OCI archives, docker archives, root directories.

A source spec is one of::

    oci:DIR[:TAG]            an OCI image layout directory
    oci-archive:FILE[:TAG]   a tar of an OCI image layout
    docker-archive:FILE[:REF] a `docker save` / `skopeo copy ... docker-archive:` tarball
    dir:DIR                  a root file system directory
    PATH[:TAG]               any of the above, recognised by its content

:func:`open_source` returns a :class:`SourceImage`: the config bytes and the layers in
order, each with its descriptor and a function that opens its blob.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from turbofs.core import oci
from turbofs.core.config import BuildConfig
from turbofs.core.errors import FormatError, LimitExceeded, NotFound, SourceError
from turbofs.core.layers import sniff_compression


@dataclass
class LayerRef:
    media_type: str
    digest: str | None  # None where the format has no compressed digest (docker archives)
    size: int | None
    diff_id: str | None
    open: Callable[[], BinaryIO]
    compression: str | None  # None: sniff from the bytes

    @property
    def name(self) -> str:
        return self.digest or self.diff_id or "?"


@dataclass
class SourceImage:
    description: str
    config: bytes = b""
    manifest_digest: str | None = None
    layers: list[LayerRef] = field(default_factory=list)
    rootfs: Path | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def config_json(self) -> dict[str, Any]:
        return oci.parse_json(self.config, f"{self.description}: image config")

    def close(self) -> None:
        for closer in self._closers:
            closer()


# -- blob access ---------------------------------------------------------------------------


class _BlobStore:
    """Reads blobs by digest from a layout directory or an uncompressed tar of one."""

    def __init__(self, where: str, cfg: BuildConfig) -> None:
        self.where = where
        self.cfg = cfg

    def open(self, digest: str) -> BinaryIO:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_small(self, name_or_digest: str, what: str, *, by_name: bool = False) -> bytes:
        with self._open_name(name_or_digest) if by_name else self.open(name_or_digest) as f:
            data = f.read(self.cfg.max_config_size + 1)
        if len(data) > self.cfg.max_config_size:
            raise LimitExceeded(f"{self.where}: {what} is larger than {self.cfg.max_config_size} bytes")
        return data

    def _open_name(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def read_verified(self, desc: oci.Descriptor, what: str) -> bytes:
        if desc.size > self.cfg.max_config_size:
            raise LimitExceeded(f"{self.where}: {what} {desc.digest} is {desc.size} bytes, over the limit")
        data = self.read_small(desc.digest, what)
        if len(data) != desc.size:
            raise FormatError(f"{self.where}: {what} {desc.digest} has {len(data)} bytes, descriptor says {desc.size}")
        oci.verify_bytes(data, desc.digest, f"{self.where}: {what}")
        return data


class _DirBlobs(_BlobStore):
    def __init__(self, root: Path, cfg: BuildConfig) -> None:
        super().__init__(str(root), cfg)
        self.root = root

    def _open_name(self, name: str) -> BinaryIO:
        try:
            return open(self.root / name, "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.root}: {name} is missing") from None

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def open(self, digest: str) -> BinaryIO:
        algo, hexd = oci.check_digest(digest).split(":", 1)
        path = self.root / "blobs" / algo / hexd
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.where}: blob {digest} is missing ({path})") from None


class _TarBlobs(_BlobStore):
    def __init__(self, path: Path, cfg: BuildConfig) -> None:
        super().__init__(str(path), cfg)
        with open(path, "rb") as f:
            head = f.read(4)
        if sniff_compression(head) != "none":
            raise SourceError(f"{path}: compressed archives are not supported; decompress it first")
        try:
            self.tar = tarfile.open(path, "r:")
        except (tarfile.TarError, OSError) as exc:
            raise SourceError(f"{path}: not a tar archive ({exc})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in self.tar.getmembers():
            name = m.name
            while name.startswith("./"):
                name = name[2:]
            if m.isreg():
                self.members[name.lstrip("/")] = m

    def close(self) -> None:
        self.tar.close()

    def exists(self, name: str) -> bool:
        return name in self.members

    def _open_name(self, name: str) -> BinaryIO:
        m = self.members.get(name)
        if m is None:
            raise NotFound(f"{self.where}: {name} is missing from the archive")
        f = self.tar.extractfile(m)
        assert f is not None
        return cast(BinaryIO, f)

    def open(self, digest: str) -> BinaryIO:
        algo, hexd = oci.check_digest(digest).split(":", 1)
        name = f"blobs/{algo}/{hexd}"
        if name not in self.members:
            raise NotFound(f"{self.where}: blob {digest} is missing from the archive")
        return self._open_name(name)


# -- OCI layouts ---------------------------------------------------------------------------


def _select_manifest(store: _BlobStore, tag: str | None, cfg: BuildConfig) -> tuple[oci.Descriptor, dict[str, Any]]:
    if not store.exists("index.json"):
        raise SourceError(f"{store.where}: not an OCI image layout (no index.json)")
    index = oci.parse_json(store.read_small("index.json", "index.json", by_name=True), f"{store.where}: index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError(f"{store.where}: index.json has no manifests list")
    descs = [oci.Descriptor.from_json(e, f"{store.where}: index.json") for e in entries]
    if not descs:
        raise NotFound(f"{store.where}: the layout holds no image")
    if tag:
        chosen = [d for d in descs if (d.annotations or {}).get(oci.ANN_REF_NAME) == tag]
        if not chosen:
            tags = sorted({(d.annotations or {}).get(oci.ANN_REF_NAME, "") for d in descs} - {""})
            raise NotFound(f"{store.where}: no image tagged {tag!r} (tags: {', '.join(tags) or 'none'})")
    elif len(descs) == 1:
        chosen = descs
    else:
        tags = sorted({(d.annotations or {}).get(oci.ANN_REF_NAME, "") for d in descs} - {""})
        raise SourceError(f"{store.where}: the layout holds {len(descs)} images; name one with :TAG ({', '.join(tags)})")
    return _resolve_platform(store, chosen[0], cfg, depth=0)


def _resolve_platform(
    store: _BlobStore, desc: oci.Descriptor, cfg: BuildConfig, depth: int
) -> tuple[oci.Descriptor, dict[str, Any]]:
    if depth > 4:
        raise FormatError(f"{store.where}: image indexes nested too deeply")
    data = store.read_verified(desc, "manifest")
    obj = oci.parse_json(data, f"{store.where}: manifest {desc.digest}")
    media_type = obj.get("mediaType") or desc.media_type
    if media_type in oci.INDEX_TYPES or (not media_type and "manifests" in obj):
        want = oci.parse_platform(cfg.platform)
        subs = [oci.Descriptor.from_json(m, f"{store.where}: index {desc.digest}") for m in obj.get("manifests", [])]
        for sub in subs:
            if oci.platform_matches(sub.platform, *want):
                return _resolve_platform(store, sub, cfg, depth + 1)
        have = [f"{(s.platform or {}).get('os')}/{(s.platform or {}).get('architecture')}" for s in subs]
        raise NotFound(f"{store.where}: no manifest for platform {'/'.join(p for p in want if p)} (has {', '.join(have)})")
    if media_type not in oci.MANIFEST_TYPES and not (not media_type and "layers" in obj):
        raise SourceError(f"{store.where}: unsupported manifest media type {media_type!r}")
    return desc, obj


def image_from_manifest(
    description: str,
    manifest: dict[str, Any],
    manifest_digest: str | None,
    config: bytes,
    open_blob: Callable[[str], BinaryIO],
) -> SourceImage:
    """A source image from an already verified manifest and config, whose blobs ``open_blob``
    opens by digest (the registry converts images in its storage this way)."""
    layers = _layers_from_manifest(description, open_blob, manifest, config)
    return SourceImage(description, config, manifest_digest, layers)


def _layers_from_manifest(
    where: str, open_blob: Callable[[str], BinaryIO], manifest: dict[str, Any], config: bytes
) -> list[LayerRef]:
    layers_json = manifest.get("layers")
    if not isinstance(layers_json, list):
        raise FormatError(f"{where}: manifest has no layers list")
    descs = [oci.Descriptor.from_json(d, f"{where}: manifest layer") for d in layers_json]
    if any(d.media_type == oci.TURBO_INDEX for d in descs):
        raise SourceError(f"{where}: this is already a turbo image")
    diff_ids = _diff_ids(config, where)
    if len(diff_ids) != len(descs):
        raise FormatError(f"{where}: config lists {len(diff_ids)} diff_ids for {len(descs)} layers")
    out = []
    for desc, diff_id in zip(descs, diff_ids, strict=True):
        comp = oci.LAYER_COMPRESSION.get(desc.media_type)
        if comp is None:
            raise SourceError(f"{where}: layer {desc.digest} has unsupported media type {desc.media_type!r}")
        out.append(LayerRef(desc.media_type, desc.digest, desc.size, diff_id, _opener(open_blob, desc.digest), comp))
    return out


def _opener(open_blob: Callable[[str], BinaryIO], digest: str) -> Callable[[], BinaryIO]:
    return lambda: open_blob(digest)


def _diff_ids(config: bytes, where: str) -> list[str]:
    cfg = oci.parse_json(config, f"{where}: image config")
    rootfs = cfg.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise FormatError(f"{where}: image config has no rootfs.diff_ids")
    for d in ids:
        oci.check_digest(d)
    return ids


def _open_layout(store: _BlobStore, tag: str | None, cfg: BuildConfig, description: str) -> SourceImage:
    desc, manifest = _select_manifest(store, tag, cfg)
    config_desc = oci.Descriptor.from_json(manifest.get("config"), f"{store.where}: manifest config")
    if config_desc.media_type and config_desc.media_type not in oci.CONFIG_TYPES:
        raise SourceError(f"{store.where}: unsupported config media type {config_desc.media_type!r}")
    config = store.read_verified(config_desc, "image config")
    layers = _layers_from_manifest(store.where, store.open, manifest, config)
    return SourceImage(description, config, desc.digest, layers)


# -- docker archives -----------------------------------------------------------------------


def _open_docker_archive(store: _TarBlobs, ref: str | None) -> SourceImage:
    where = store.where
    if not store.exists("manifest.json"):
        raise SourceError(f"{where}: not a docker archive (no manifest.json)")
    data = store.read_small("manifest.json", "manifest.json", by_name=True)
    try:
        items = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{where}: manifest.json is not valid JSON: {exc}") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise FormatError(f"{where}: manifest.json must be a non-empty list of images")
    if ref:
        chosen = [i for i in items if ref in (i.get("RepoTags") or [])]
        if not chosen:
            raise NotFound(f"{where}: no image tagged {ref!r}")
        item = chosen[0]
    elif len(items) == 1:
        item = items[0]
    else:
        raise SourceError(f"{where}: the archive holds {len(items)} images; name one with :REF")
    config_name = item.get("Config")
    layer_names = item.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise FormatError(f"{where}: manifest.json entry lacks Config or Layers")
    config = store.read_small(config_name, "image config", by_name=True)
    diff_ids = _diff_ids(config, where)
    if len(diff_ids) != len(layer_names):
        raise FormatError(f"{where}: config lists {len(diff_ids)} diff_ids for {len(layer_names)} layers")
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        if not isinstance(name, str) or not store.exists(name):
            raise NotFound(f"{where}: layer {name!r} is missing from the archive")
        layers.append(LayerRef(oci.OCI_LAYER, None, None, diff_id, _name_opener(store, name), None))
    # docker archives do not carry the manifest; name the source by its config
    return SourceImage(f"{where}", config, None, layers)


def _name_opener(store: _TarBlobs, name: str) -> Callable[[], BinaryIO]:
    return lambda: store._open_name(name)


# -- entry point ---------------------------------------------------------------------------

_PREFIXES = ("oci:", "oci-archive:", "docker-archive:", "dir:")


def open_source(spec: str, cfg: BuildConfig) -> SourceImage:
    """Open a source image for reading (see the module docstring for the spec forms)."""
    kind = None
    rest = spec
    for prefix in _PREFIXES:
        if spec.startswith(prefix):
            kind, rest = prefix[:-1], spec[len(prefix) :]
            break
    path, ref = oci.split_path_ref(rest)
    if kind is None:
        if path.is_dir():
            kind = "oci" if (path / "oci-layout").exists() or (path / "index.json").exists() else "dir"
        else:
            kind = "archive"
    if kind == "dir":
        if not path.is_dir():
            raise SourceError(f"{path}: not a directory")
        if ref:
            raise SourceError(f"{spec}: a root directory takes no tag")
        return SourceImage(f"dir:{path}", rootfs=path)
    if kind == "oci":
        if not path.is_dir():
            raise SourceError(f"{path}: not a directory")
        return _open_layout(_DirBlobs(path, cfg), ref, cfg, f"oci:{path}")
    tar_store = _TarBlobs(path, cfg)
    try:
        if kind == "archive":
            kind = "oci-archive" if tar_store.exists("index.json") else "docker-archive"
        if kind == "oci-archive":
            src = _open_layout(tar_store, ref, cfg, f"oci-archive:{path}")
        else:
            src = _open_docker_archive(tar_store, ref)
    except BaseException:
        tar_store.close()
        raise
    src._closers.append(tar_store.close)
    return src


def synthetic_diff_id(index_blob: bytes) -> str:
    """The diff ID given to an image built from a root directory, which has no layer tar."""
    return "sha256:" + hashlib.sha256(b"turbofs-rootfs\0" + index_blob).hexdigest()

