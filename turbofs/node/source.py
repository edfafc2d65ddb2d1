"""Where chunks come from: a registry (lazily, by byte ranges) or a local turbo layout.

:class:`ChunkSource` is the one seam between the node's reader and the outside: it returns
chunks' compressed frames, unverified (the reader checks them).
:class:`RegistrySource` merges adjacent chunks into ranges for
:meth:`RegistryClient.get_ranges` (batched on a turbofs registry, parallel ``Range`` GETs
elsewhere); :class:`LayoutSource` reads a local turbo OCI layout in a worker thread.
:func:`open_image` fetches and verifies the manifest, config and index, and returns them with
the source.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import httpx
import trio

from turbofs.core import format as fmt
from turbofs.core.config import CLIENT_PARALLEL
from turbofs.core.errors import FormatError, NotFound, UsageError
from turbofs.core.image import (
    ImageConfig,
    LayoutImage,
    TurboManifest,
    load_index,
    open_layout_image,
    parse_manifest,
)
from turbofs.core.oci import split_local_ref
from turbofs.core.registry import Reference, RegistryClient
from turbofs.node.metrics import MeteredTransport, NodeMetrics


@runtime_checkable
class ChunkSource(Protocol):
    """Compressed chunk frames, in the order asked. Unverified: the caller checks digests."""

    #: Names the source in messages: ``REGISTRY/REPO@DIGEST`` or the layout path.
    name: str

    async def fetch(self, chunks: Sequence[fmt.Chunk]) -> list[bytes]: ...

    async def aclose(self) -> None: ...


def coalesce(index: fmt.Index, chunks: Sequence[fmt.Chunk]) -> tuple[list[tuple[int, int, int]], dict[int, tuple[int, int]]]:
    """Byte ranges covering ``chunks``: ``[(blob id, offset, length)]``, and for each chunk id
    ``(range number, offset inside it)``. Chunks adjacent in one blob share a range;
    repeated chunks are fetched once."""
    unique = sorted({c.id: c for c in chunks}.values(), key=lambda c: (c.blob, c.offset))
    ranges: list[tuple[int, int, int]] = []
    where: dict[int, tuple[int, int]] = {}
    for c in unique:
        if ranges:
            blob, start, length = ranges[-1]
            if blob == c.blob and start + length == c.offset:
                ranges[-1] = (blob, start, length + c.clen)
                where[c.id] = (len(ranges) - 1, c.offset - start)
                continue
            if blob == c.blob and start <= c.offset and c.offset + c.clen <= start + length:
                where[c.id] = (len(ranges) - 1, c.offset - start)  # two ids, one frame
                continue
        ranges.append((c.blob, c.offset, c.clen))
        where[c.id] = (len(ranges) - 1, 0)
    return ranges, where


def _split(chunks: Sequence[fmt.Chunk], where: dict[int, tuple[int, int]], datas: Sequence[bytes]) -> list[bytes]:
    out = []
    for c in chunks:
        r, off = where[c.id]
        out.append(datas[r][off : off + c.clen])
    return out


def _first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


class RegistrySource:
    """Chunks from blobs of one repository of a registry, by byte ranges."""

    def __init__(
        self,
        client: RegistryClient,
        repo: str,
        index: fmt.Index,
        *,
        name: str | None = None,
        owns_client: bool = False,
        parallel: int = CLIENT_PARALLEL,
    ) -> None:
        self.client = client
        self.repo = repo
        self.index = index
        self.name = name or f"{client.registry}/{repo}"
        self.parallel = parallel
        self._owns_client = owns_client
        self._blob_digests = [b.oci_digest for b in index.blobs()]
        #: fetch calls and ranges asked for (for tests and status)
        self.fetches = 0
        self.ranges = 0

    async def fetch(self, chunks: Sequence[fmt.Chunk]) -> list[bytes]:
        if not chunks:
            return []
        ranges, where = coalesce(self.index, chunks)
        self.fetches += 1
        self.ranges += len(ranges)
        try:
            datas = await self.client.get_ranges(
                self.repo, [(self._blob_digests[b], off, n) for b, off, n in ranges], parallel=self.parallel
            )
        except ExceptionGroup as group:  # parallel Range GETs fail as a group: report the cause
            raise _first_leaf(group) from group
        return _split(chunks, where, datas)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()


class LayoutSource:
    """Chunks from the blob files of a local turbo OCI layout."""

    def __init__(self, image: LayoutImage) -> None:
        self.image = image
        self.name = str(image.root)
        self._paths = [image.blob_path(b.oci_digest) for b in image.index.blobs()]
        self.fetches = 0

    def _read(self, ranges: list[tuple[int, int, int]]) -> list[bytes]:
        out = []
        fds: dict[int, int] = {}
        try:
            for blob, off, length in ranges:
                if blob not in fds:
                    try:
                        fds[blob] = os.open(self._paths[blob], os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        raise NotFound(f"{self.name}: blob {self._paths[blob].name} is missing") from None
                data = os.pread(fds[blob], length, off)
                if len(data) != length:
                    raise FormatError(f"{self._paths[blob]}: {len(data)} bytes at {off}, expected {length}")
                out.append(data)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    async def fetch(self, chunks: Sequence[fmt.Chunk]) -> list[bytes]:
        if not chunks:
            return []
        ranges, where = coalesce(self.image.index, chunks)
        self.fetches += 1
        datas = await trio.to_thread.run_sync(self._read, ranges)
        return _split(chunks, where, datas)

    async def aclose(self) -> None:
        return None


class OpenedImage(NamedTuple):
    """A mountable image, as :func:`open_image` returns it: (manifest, config, index, source)."""

    manifest: TurboManifest
    config: dict[str, Any]
    index: fmt.Index  # type: ignore[assignment]  # shadows tuple.index on purpose: the image's index
    source: ChunkSource


async def open_image(
    ref: str,
    *,
    client: RegistryClient | None = None,
    auth: httpx.Auth | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    scheme: str | None = None,
    platform: str | None = None,
    metrics: NodeMetrics | None = None,
    **client_options: Any,
) -> OpenedImage:
    """Open ``ref`` for mounting: ``REGISTRY/REPO[:TAG]``, ``REGISTRY/REPO@DIGEST``, or a local
    layout ``[oci:]DIR[:TAG]``.

    Only the manifest (an image index is resolved to ``platform``, the host's by default),
    the config and the index blob are read, each verified against its digest; chunks come
    later, through the returned source. Without ``client``, one is made (with ``auth``,
    ``transport``, ``scheme`` and ``client_options``, its transport counted in ``metrics``)
    and the source owns it: close it with ``await source.aclose()``.
    """
    local = split_local_ref(ref)
    if local is not None:
        path, tag = local
        img = await trio.to_thread.run_sync(open_layout_image, path, tag)
        return OpenedImage(img.manifest, img.config, img.index, LayoutSource(img))
    try:
        reference = Reference.parse(ref)
    except UsageError as exc:
        raise UsageError(f"{ref}: not a local layout directory nor a registry reference ({exc})") from None
    owns = client is None
    if client is None:
        if auth is None:
            from turbofs.core.auth import auth_for_registry

            auth = auth_for_registry(reference.registry)
        if metrics is not None:
            transport = MeteredTransport(transport or httpx.AsyncHTTPTransport(), metrics)
        client = RegistryClient(reference.registry, scheme=scheme, auth=auth, transport=transport, **client_options)
    repo = reference.repository
    try:
        found = await client.get_image_manifest(repo, reference.reference, platform)
        manifest = parse_manifest(found.raw, found.digest)
        config: ImageConfig | None = None
        index_raw = b""

        async def get_config() -> None:
            nonlocal config
            config = await client.get_config(repo, found)

        async def get_index() -> None:
            nonlocal index_raw
            index_raw = await client.get_blob(repo, manifest.index.digest, max_size=manifest.index.size)

        async with trio.open_nursery() as nursery:  # both at once: one round trip less before the mount
            nursery.start_soon(get_config)
            nursery.start_soon(get_index)
        assert config is not None
        index = await trio.to_thread.run_sync(load_index, manifest, index_raw)
    except BaseException:
        if owns:
            await client.aclose()
        raise
    name = f"{reference.registry}/{repo}@{manifest.digest}"
    return OpenedImage(manifest, config.obj, index, RegistrySource(client, repo, index, name=name, owns_client=owns))


__all__ = [
    "ChunkSource",
    "LayoutSource",
    "OpenedImage",
    "RegistrySource",
    "coalesce",
    "open_image",
    "split_local_ref",
]
