"""Which turbo image a snapshot stands for: from ``turbofs pull``'s labels, or from the
labels containerd's CRI plugin passes.

:func:`fetch_image` reads a turbo image's manifest and config and computes its chain IDs
(the index and chunks are the mount's job). :class:`Resolver` caches them per manifest
digest and applies the CRI rules: a plain image is used through its turbo twin (the tag plus
``turbo_tag_suffix``, as ``turbofs serve --auto-convert`` writes it) when that twin was
converted from this very manifest (``io.turbofs.source.manifest``) or has the same config.
The gRPC worker threads meet the async registry client only in :func:`run_registry_call`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from turbofs.core import oci
from turbofs.core.config import (
    CLIENT_RETRIES,
    CLIENT_TIMEOUT,
    DEFAULT_SNAPSHOTTER_REGISTRY_RETRIES,
    DEFAULT_SNAPSHOTTER_REGISTRY_TIMEOUT,
    DEFAULT_TURBO_TAG_SUFFIX,
    LAYER_DOWNLOAD_PARALLEL,
    LAYER_DOWNLOAD_PIECE,
    RESOLVER_CACHE_ENTRIES,
    RESOLVER_DIGEST_REFETCHES,
    RESOLVER_NEGATIVE_TTL,
)
from turbofs.core.errors import (
    DigestMismatch,
    FormatError,
    NotFound,
    SourceError,
    TurboError,
    UsageError,
)
from turbofs.core.image import ImageManifest, is_turbo_manifest, load_index, parse_manifest
from turbofs.core.registry import Reference, RegistryClient
from turbofs.snapshotter import labels as L
from turbofs.snapshotter.labels import chain_ids

log = logging.getLogger("turbofs.snapshotter")

#: Where containerd sends requests for images named ``docker.io/...``.
DOCKER_HUB: Final = "registry-1.docker.io"

T = TypeVar("T")


def run_registry_call(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` (a coroutine function using the registry client) to completion on trio in
    the calling thread, and return its result: how blocking code (gRPC worker threads,
    ``turbofs pull``) calls the async client."""
    return trio.run(fn)


async def refetching(fetch: Callable[[], Awaitable[T]]) -> T:
    """``fetch()``, done again (up to RESOLVER_DIGEST_REFETCHES times) while its bytes fail
    their digest: a corrupt answer is a transient fault, as it is for the node's chunks. A
    mismatch that stays is raised (its message names the digest); bad bytes are never returned."""
    for tries in range(RESOLVER_DIGEST_REFETCHES + 1):
        try:
            return await fetch()
        except DigestMismatch as exc:
            if tries == RESOLVER_DIGEST_REFETCHES:
                raise DigestMismatch(f"{exc} (fetched {tries + 1} times)") from None
            log.warning("%s: fetching it again", exc)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TurboImage:
    """A turbo image as the snapshotter and ``turbofs pull`` see it."""

    reference: Reference  # as asked (tag or digest)
    manifest_digest: str
    manifest: bytes
    media_type: str
    config_digest: str
    config_media_type: str
    config: bytes
    diff_ids: tuple[str, ...]
    scheme: str | None = None

    @property
    def pinned(self) -> str:
        """``REGISTRY/REPO@DIGEST``: what a mount of this image opens."""
        return f"{self.reference.registry}/{self.reference.repository}@{self.manifest_digest}"

    @property
    def chain(self) -> list[str]:
        return chain_ids(self.diff_ids)

    @property
    def top(self) -> str:
        return self.chain[-1]

    def image_config(self) -> dict[str, Any]:
        obj = json.loads(self.config)
        conf = obj.get("config") or {}
        return conf if isinstance(conf, dict) else {}


async def _turbo_image(
    client: RegistryClient, ref: Reference, manifest: ImageManifest, *, require_turbo: bool
) -> TurboImage | None:
    """The turbo image of ``manifest`` (its config fetched and checked), or None for a plain
    image unless ``require_turbo``."""
    if not is_turbo_manifest(manifest.obj):
        if require_turbo:
            raise FormatError(f"{manifest.where} is not a turbo image (its first layer is not a turbofs index); "
                              "convert it with 'turbofs push', or pull it with 'ctr images pull'")
        return None
    parse_manifest(manifest.raw, manifest.digest)  # the turbo image's own rules
    config = await refetching(lambda: client.get_config(ref.repository, manifest))
    return TurboImage(ref, manifest.digest, manifest.raw, manifest.media_type, config.digest, config.media_type,
                      config.raw, config.diff_ids)


def _client(ref: Reference, scheme: str | None, retries: int, timeout: float) -> RegistryClient:
    from turbofs.core.auth import auth_for_registry

    return RegistryClient(ref.registry, scheme=scheme, auth=auth_for_registry(ref.registry), retries=retries, timeout=timeout)


def fetch_image(
    ref: str,
    *,
    manifest_digest: str | None = None,
    scheme: str | None = None,
    platform: str | None = None,
    retries: int = CLIENT_RETRIES,
    timeout: float = CLIENT_TIMEOUT,
) -> TurboImage:
    """The turbo image ``ref`` names (pinned to ``manifest_digest`` if given). Blocking.

    Raises NotFound (no such repository, tag or manifest), RegistryError (the registry
    refused or is unreachable), FormatError (a corrupt manifest or config, or a plain image).
    """
    try:
        reference = Reference.parse(ref)
    except UsageError as exc:
        raise UsageError(f"image reference {ref!r}: {exc}") from None
    if manifest_digest is not None:
        try:
            oci.check_digest(manifest_digest)
        except FormatError as exc:
            raise UsageError(f"manifest digest: {exc}") from None

    async def go() -> TurboImage:
        async with _client(reference, scheme, retries, timeout) as client:
            manifest = await refetching(lambda: client.get_image_manifest(
                reference.repository, manifest_digest or reference.reference, platform))
            img = await _turbo_image(client, reference, manifest, require_turbo=True)
            assert img is not None
            return dataclasses.replace(img, scheme=scheme)

    return run_registry_call(go)


def presented(
    img: TurboImage, *, retries: int = DEFAULT_SNAPSHOTTER_REGISTRY_RETRIES, timeout: float = CLIENT_TIMEOUT
) -> tuple[int, int]:
    """What the turbo image ``img`` presents once mounted, from its index (fetched from the
    registry and verified): (bytes, inodes) -- the apparent size of its regular files, each
    inode once (hardlinks share an inode in the index), and its number of inodes. Blocking."""
    manifest = parse_manifest(img.manifest, img.manifest_digest)

    async def go() -> bytes:
        async with _client(img.reference, img.scheme, retries, timeout) as client:
            return await refetching(lambda: client.get_blob(img.reference.repository, manifest.index.digest,
                                                            max_size=manifest.index.size))

    index = load_index(manifest, run_registry_call(go))
    size = 0
    for ino in range(index.n_inodes):
        node = index.inode(ino)
        if stat.S_ISREG(node.mode):
            size += node.size
    return size, index.n_inodes


@dataclass(frozen=True)
class LayerSource:
    """The layer a placeholder stands for, from the CRI labels it carries: blob
    ``layer_digest`` of the image ``image_ref`` (manifest ``manifest_digest`` where known),
    whose chain ID is ``chain_id``."""

    image_ref: str
    layer_digest: str
    chain_id: str
    manifest_digest: str | None = None

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> LayerSource | None:
        ref, layer, chain = labels.get(L.CRI_IMAGE_REF), labels.get(L.CRI_LAYER), labels.get(L.TARGET)
        if not (ref and layer and chain):
            return None
        return cls(ref, layer, chain, labels.get(L.CRI_MANIFEST) or None)

    def describe(self) -> str:
        return f"layer {self.layer_digest} of {self.image_ref}"


@dataclass(frozen=True)
class LayerBlob:
    """A downloaded layer blob whose digest (and size, where known) was verified."""

    path: Path
    digest: str
    size: int
    compression: str | None  # None: sniff it from the bytes
    diff_id: str | None  # from the image config, where known


def _registry_reference(ref: str) -> Reference:
    reference = Reference.parse(ref)
    if reference.registry == "docker.io":
        reference = dataclasses.replace(reference, registry=DOCKER_HUB)
    return reference


async def _layer_descriptor(client: RegistryClient, ref: Reference, src: LayerSource) -> tuple[oci.Descriptor, str]:
    """The descriptor and diff ID of ``src``'s layer, from the image's manifest and config:
    the position whose chain ID is ``src.chain_id``."""
    assert src.manifest_digest is not None
    digest = src.manifest_digest
    manifest = await refetching(lambda: client.get_image_manifest(ref.repository, digest))
    where = f"manifest {manifest.where}"
    layers = manifest.layers
    diffs = (await refetching(lambda: client.get_config(ref.repository, manifest))).diff_ids
    if len(diffs) != len(layers):
        raise FormatError(f"{where}: {len(layers)} layers but its config has {len(diffs)} diff_ids")
    chain = chain_ids(diffs)
    for i, desc in enumerate(layers):
        if desc.digest == src.layer_digest and chain[i] == src.chain_id:
            if desc.media_type not in oci.LAYER_COMPRESSION:
                raise FormatError(f"{where}: layer {desc.digest} has media type {desc.media_type!r}, "
                                  "which is no tar layer")
            return desc, diffs[i]
    raise FormatError(f"{where}: no layer {src.layer_digest} with chain ID {src.chain_id}")


class Resolver:
    """Turbo images by reference, for the snapshotter: cached, with the CRI twin rule."""

    def __init__(self, *, plain_http: list[str] | None = None, retries: int = DEFAULT_SNAPSHOTTER_REGISTRY_RETRIES,
                 timeout: float = DEFAULT_SNAPSHOTTER_REGISTRY_TIMEOUT,
                 turbo_tag_suffix: str = DEFAULT_TURBO_TAG_SUFFIX) -> None:
        self.plain_http = set(plain_http or [])
        self.retries = retries
        self.timeout = timeout
        self.suffix = turbo_tag_suffix
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, str], tuple[TurboImage | None, float]] = OrderedDict()

    def scheme(self, registry: str) -> str | None:
        return "http" if registry in self.plain_http else None

    def _remember(self, key: tuple[str, str, str], value: TurboImage | None) -> None:
        """Cache a result: a turbo image (named by digest: for good) or None (for a while)."""
        with self._lock:
            self._cache[key] = (value, time.monotonic() + (RESOLVER_NEGATIVE_TTL if value is None else float("inf")))
            self._cache.move_to_end(key)
            while len(self._cache) > RESOLVER_CACHE_ENTRIES:
                self._cache.popitem(last=False)

    def _cached(self, key: tuple[str, str, str]) -> tuple[bool, TurboImage | None]:
        with self._lock:
            if key in self._cache:
                value, until = self._cache[key]
                if time.monotonic() < until:
                    self._cache.move_to_end(key)
                    return True, value
                del self._cache[key]
        return False, None

    def turbo(self, ref: str, manifest_digest: str) -> TurboImage:
        """The turbo image ``ref`` pinned to ``manifest_digest`` (``turbofs pull``'s labels)."""
        key = ("turbo", ref, manifest_digest)
        hit, img = self._cached(key)
        if hit and img is not None:
            return img
        reference = Reference.parse(ref) if "/" in ref else None
        if reference is None:
            raise UsageError(f"image reference {ref!r}: expected REGISTRY/REPOSITORY[:TAG]")
        img = fetch_image(ref, manifest_digest=manifest_digest, scheme=self.scheme(reference.registry),
                          retries=self.retries, timeout=self.timeout)
        self._remember(key, img)
        return img

    def presented(self, pinned: str, manifest_digest: str) -> tuple[int, int]:
        """(bytes, inodes) the turbo image ``pinned`` (``REGISTRY/REPO@DIGEST``) presents: see
        :func:`presented`."""
        return presented(self.turbo(pinned, manifest_digest), retries=self.retries, timeout=self.timeout)

    def fetch_layer(self, src: LayerSource, dest: Path) -> LayerBlob:
        """Download the layer ``src`` names into the file ``dest`` and verify it: the blob's
        digest and size, and its chain ID and diff ID against the image's manifest and config
        where the manifest digest is known. Blocking."""
        try:
            reference = _registry_reference(src.image_ref)
            oci.check_digest(src.layer_digest)
        except TurboError as exc:
            raise SourceError(f"{src.describe()}: {exc}") from None

        async def go() -> LayerBlob:
            async with _client(reference, self.scheme(reference.registry), self.retries, self.timeout) as client:
                if src.manifest_digest is not None:
                    desc, diff_id = await _layer_descriptor(client, reference, src)
                    await refetching(lambda: client.download_blob(
                        reference.repository, desc.digest, desc.size, dest,
                        piece=LAYER_DOWNLOAD_PIECE, parallel=LAYER_DOWNLOAD_PARALLEL))
                    return LayerBlob(dest, desc.digest, desc.size, oci.LAYER_COMPRESSION[desc.media_type], diff_id)
                data = await refetching(lambda: client.get_blob(reference.repository, src.layer_digest))  # verified
                dest.write_bytes(data)
                return LayerBlob(dest, src.layer_digest, len(data), None, None)

        return run_registry_call(go)

    def for_cri(self, ref: str, manifest_digest: str) -> TurboImage | None:
        """The turbo image to mount for the plain or turbo image CRI pulls, or None."""
        key = ("cri", ref, manifest_digest)
        hit, img = self._cached(key)
        if hit:
            return img
        try:
            reference = _registry_reference(ref)
            oci.check_digest(manifest_digest)
        except TurboError as exc:
            log.info("CRI labels name %s@%s, which is no registry reference (%s): ordinary unpack", ref, manifest_digest, exc)
            self._remember(key, None)
            return None
        scheme = self.scheme(reference.registry)

        async def go() -> TurboImage | None:
            async with _client(reference, scheme, self.retries, self.timeout) as client:
                pulled = await refetching(lambda: client.get_image_manifest(reference.repository, manifest_digest))
                if is_turbo_manifest(pulled.obj):
                    return await _turbo_image(client, reference, pulled, require_turbo=True)
                if not reference.tag:
                    return None
                twin_tag = reference.tag + self.suffix
                try:
                    twin_manifest = await refetching(lambda: client.get_image_manifest(reference.repository, twin_tag))
                except NotFound:
                    return None
                twin = await _turbo_image(client, reference, twin_manifest, require_turbo=False)
                if twin is None:
                    return None
                source = json.loads(twin.manifest).get("annotations", {}).get(oci.ANN_TURBO_SOURCE)
                if source != pulled.digest and twin.config_digest != pulled.config.digest:
                    log.info("%s:%s is not a conversion of %s@%s: ordinary unpack",
                             reference.repository, twin_tag, ref, pulled.digest)
                    return None
                return twin

        try:
            img = run_registry_call(go)
        except TurboError as exc:
            # the CRI plugin unpacks the layers itself when we decline; it reports its own errors
            log.warning("CRI image %s@%s: no lazy mount (%s): ordinary unpack", ref, manifest_digest, exc)
            self._remember(key, None)
            return None
        if img is not None:
            img = dataclasses.replace(img, scheme=scheme)
        self._remember(key, img)
        return img


__all__ = ["LayerBlob", "LayerSource", "Resolver", "TurboImage", "fetch_image", "presented", "run_registry_call"]
