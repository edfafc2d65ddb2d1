"""The node daemon's core, without FUSE: chunk sources, the two-tier chunk cache, the reader
with single-flight and readahead, background prefetch, and metrics.

A FUSE tree (one file per index entry) or a FUSE file holding a kernel erofs image sits on
top of :class:`ChunkReader`; neither needs anything else from here but a
:class:`Prefetcher` and :class:`NodeMetrics`::

    opened = await open_image("localhost:5050/app:latest")     # manifest + config + index
    cache = ChunkCache.from_config(cfg)                          # shared by every mount
    async with ChunkReader(opened.index, opened.source, cache, cfg) as reader:
        prefetcher = Prefetcher(reader)
        nursery.start_soon(prefetcher.run)
        data = await reader.read(ino, offset, length)             # ReadError -> EIO
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
