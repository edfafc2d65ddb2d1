"""The node daemon's core, without FUSE: chunk sources, the two-tier chunk cache, the reader
with single-flight and readahead, background prefetch, and metrics.

A presentation needs only :func:`open_image`, a :class:`ChunkCache` (shared by every mount),
a :class:`ChunkReader` over them, a :class:`Prefetcher` and :class:`NodeMetrics`; a
:class:`ReadError` from ``reader.read`` becomes EIO.
"""

from turbofs.node.cache import ChunkCache, DiskCache, RamCache
from turbofs.node.errors import ChunkCorrupt, FetchFailed, FetchTimeout, ReaderClosed, ReadError
from turbofs.node.metrics import MeteredTransport, NodeMetrics
from turbofs.node.prefetch import Prefetcher, PrefetchProgress, PrefetchState, TokenBucket
from turbofs.node.reader import ChunkReader, ChunkState, FetchKind
from turbofs.node.source import ChunkSource, LayoutSource, OpenedImage, RegistrySource, open_image

__all__ = [
    "ChunkCache",
    "ChunkCorrupt",
    "ChunkReader",
    "ChunkSource",
    "ChunkState",
    "DiskCache",
    "FetchFailed",
    "FetchKind",
    "FetchTimeout",
    "LayoutSource",
    "MeteredTransport",
    "NodeMetrics",
    "OpenedImage",
    "PrefetchProgress",
    "PrefetchState",
    "Prefetcher",
    "RamCache",
    "ReadError",
    "ReaderClosed",
    "RegistrySource",
    "TokenBucket",
    "open_image",
]
