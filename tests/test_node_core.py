"""The node daemon's core without FUSE: sources, the two-tier cache, the reader, prefetch, metrics.

Images are built with the real builder from hand-written layers. The registry is a small
in-process fake behind ``httpx.MockTransport`` (Range GETs, the turbofs batch extension, and
fault injection: 5xx answers, flipped bytes, hangs, refused connections), passed to the
client as its transport: the test seam, no internals are patched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import zstandard

from index_builder.builder import build
from tests.ocifixtures import TarEntry, pseudo_random, write_oci_layout
from turbofs.core import format as fmt
from turbofs.core import oci
from turbofs.core.codec import VerifiedChunk, decode_frame
from turbofs.core.config import READER_FAILURE_MEMORY, DaemonConfig
from turbofs.core.errors import DigestMismatch
from turbofs.core.registry import RegistryClient
from turbofs.node.cache import ChunkCache, DiskCache, RamCache
from turbofs.node.errors import ChunkCorrupt, FetchFailed, FetchTimeout, ReaderClosed, ReadError
from turbofs.node.metrics import MeteredTransport, NodeMetrics
from turbofs.node.prefetch import Prefetcher, PrefetchState, TokenBucket
from turbofs.node.reader import ChunkReader, ChunkState
from turbofs.node.source import LayoutSource, RegistrySource, coalesce, open_image

CS = 65536
REGISTRY = "registry.test"
REPO = "app"




def _text(seed: int, n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"line %d of file %d: the quick brown fox jumps over the lazy dog\n" % (i, seed)
        i += 1
    return bytes(out[:n])


FILES: dict[str, bytes] = {
    "bin/app": pseudo_random(1, 3 * CS + 5000),
    "data/big.txt": _text(2, 5 * CS + 777),
    "data/sparse.bin": pseudo_random(3, CS) + bytes(2 * CS) + pseudo_random(4, 1000),
    "empty": b"",
    "lib/libx.so": pseudo_random(5, 2 * CS),
    **{f"etc/conf{i:02d}.txt": _text(10 + i, 300 + i * 1500) for i in range(16)},
}


@dataclass
class Image:
    layout: Path
    index: fmt.Index
    manifest_digest: str
    blobs: dict[str, bytes]  # every blob of the layout, by digest

    def ino(self, path: str) -> int:
        return self.index.resolve(path)

    def chunks(self) -> list[fmt.Chunk]:
        return list(self.index.chunks())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("node-image")
    entries = [TarEntry(d, "dir", mode=0o755) for d in ("bin", "data", "etc", "lib")]
    entries += [TarEntry(p, data=d, mode=0o755 if p.startswith("bin/") else 0o644) for p, d in FILES.items()]
    entries.append(TarEntry("link", "symlink", linkname="bin/app"))
    write_oci_layout(root / "src", [entries[:8], entries[8:]])
    from turbofs.core.config import BuildConfig

    cfg = BuildConfig(chunk_size=CS, blob_min=128 * 1024, blob_avg=256 * 1024, blob_max=512 * 1024)
    result = build(f"oci:{root / 'src'}:latest", root / "turbo", cfg, progress=False)
    from turbofs.core.image import open_layout_image

    img = open_layout_image(root / "turbo", "latest")
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in (root / "turbo" / "blobs" / "sha256").iterdir()}
    assert img.index.n_blobs >= 2 and img.index.n_chunks >= 12
    return Image(root / "turbo", img.index, result.manifest_digest, blobs)


# ---------------------------------------------------------------------------------------
# A fake registry with fault injection


@dataclass
class FakeRegistry:
    image: Image
    batch: bool = False
    delay: float = 0.0  # seconds before answering a chunk request
    fail_next: int = 0  # chunk requests answered 503 before serving again
    corrupt: int = 0  # chunk answers with one byte flipped (-1: all of them)
    hang: bool = False  # chunk requests never answer
    down: bool = False  # every request: connection refused
    chunk_requests: int = 0  # Range GETs and batch POSTs
    ranges: list[tuple[str, int, int]] = field(default_factory=list)  # (digest, offset, length) served
    active: int = 0
    max_active: int = 0
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # ref -> (bytes, media type)

    def __post_init__(self) -> None:
        raw = self.image.blobs[self.image.manifest_digest]
        self.manifests["latest"] = (raw, oci.OCI_MANIFEST)
        self.manifests[self.image.manifest_digest] = (raw, oci.OCI_MANIFEST)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def _maybe_corrupt(self, data: bytes) -> bytes:
        if self.corrupt and data:
            if self.corrupt > 0:
                self.corrupt -= 1
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            return bytes(flipped)
        return data

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        if path == "/v2/_turbofs/info":
            if not self.batch:
                return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND", "message": "no"}]})
            return httpx.Response(200, json={"extensions": ["batch"], "max_batch_ranges": 64, "max_batch_bytes": 1 << 20})
        m = re.fullmatch(rf"/v2/{REPO}/manifests/(.+)", path)
        if m:
            found = self.manifests.get(m.group(1))
            if found is None:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]})
            raw, media_type = found
            return httpx.Response(200, content=raw, headers={"Content-Type": media_type, "Docker-Content-Digest": oci.sha256_digest(raw)})
        m = re.fullmatch(rf"/v2/{REPO}/blobs/(sha256:[0-9a-f]+)", path)
        is_batch = path == f"/v2/{REPO}/_turbofs/batch" and request.method == "POST"
        if m and "range" not in request.headers:
            blob = self.image.blobs.get(m.group(1))
            if blob is None:
                return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]})
            return httpx.Response(200, content=blob)
        if not (m or is_batch):
            return httpx.Response(404)
        # a chunk request: the faults apply here
        self.chunk_requests += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await trio.sleep(self.delay)
            if self.hang:
                await trio.sleep_forever()
            if self.fail_next > 0:
                self.fail_next -= 1
                return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE", "message": "try later"}]})
            if m:
                spec = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers["range"])
                assert spec is not None
                start, last = int(spec.group(1)), int(spec.group(2))
                self.ranges.append((m.group(1), start, last + 1 - start))
                body = self._maybe_corrupt(self.image.blobs[m.group(1)][start : last + 1])
                return httpx.Response(206, content=body)
            parts = []
            for r in json.loads(request.content)["ranges"]:
                self.ranges.append((r["digest"], r["offset"], r["length"]))
                parts.append(self.image.blobs[r["digest"]][r["offset"] : r["offset"] + r["length"]])
            return httpx.Response(200, content=self._maybe_corrupt(b"".join(parts)), headers={"Content-Type": oci.TURBO_BATCH})
        finally:
            self.active -= 1


def _client(fake: FakeRegistry, metrics: NodeMetrics | None = None, **kw: Any) -> RegistryClient:
    transport: httpx.AsyncBaseTransport = fake.transport()
    if metrics is not None:
        transport = MeteredTransport(transport, metrics)
    opts: dict[str, Any] = {"retries": 3, "backoff": 0.01, "backoff_max": 0.02} | kw
    return RegistryClient(REGISTRY, scheme="http", transport=transport, **opts)


def _cfg(tmp: Path | None, **kw: Any) -> DaemonConfig:
    base: dict[str, Any] = {"cache_dir": tmp, "ram_cache_bytes": 8 << 20, "disk_cache_bytes": 64 << 20}
    return DaemonConfig(**(base | kw)).validate()


@contextlib.asynccontextmanager
async def registry_reader(
    image: Image, fake: FakeRegistry, cfg: DaemonConfig, *, metrics: NodeMetrics | None = None, **client_kw: Any
) -> AsyncIterator[ChunkReader]:
    metrics = metrics or NodeMetrics()
    cache = ChunkCache.from_config(cfg, metrics=metrics)
    async with _client(fake, metrics, **client_kw) as client:
        source = RegistrySource(client, REPO, image.index, name=f"{REGISTRY}/{REPO}")
        async with ChunkReader(image.index, source, cache, cfg, metrics=metrics) as reader:
            yield reader


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


async def read_all(reader: ChunkReader, image: Image) -> None:
    for path, want in FILES.items():
        got = await reader.read(image.ino(path), 0, len(want) + 10)
        assert got == want, path


# ---------------------------------------------------------------------------------------
# Sources


def test_layout_source_reads_every_file_exactly(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        for ref in (str(image.layout), f"oci:{image.layout}:latest"):
            manifest, config, index, source = await open_image(ref)
            assert isinstance(source, LayoutSource) and manifest.digest == image.manifest_digest
            assert config["rootfs"]["type"] == "layers"
            cache = ChunkCache.from_config(_cfg(tmp_path / "c1"))
            async with ChunkReader(index, source, cache, _cfg(tmp_path / "c1")) as reader:
                await read_all(reader, image)
                # pieces across chunk boundaries, past the end, holes
                for path, want in FILES.items():
                    ino = index.resolve(path)
                    for off, n in ((0, 1), (CS - 3, 10), (CS + 5, 2 * CS), (max(0, len(want) - 1), 100), (len(want) + 5, 10)):
                        assert await reader.read(ino, off, n) == want[off : off + n], (path, off, n)
                sparse = index.resolve("data/sparse.bin")
                assert await reader.read(sparse, CS, 2 * CS) == bytes(2 * CS)

    run(main)


@pytest.mark.parametrize("batch", [False, True], ids=["range-gets", "batched"])
def test_registry_source_reads_every_file_exactly(image: Image, tmp_path: Path, batch: bool) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, batch=batch)
        metrics = NodeMetrics()
        for ref in (f"{REGISTRY}/{REPO}:latest", f"{REGISTRY}/{REPO}@{image.manifest_digest}"):
            before = fake.chunk_requests
            manifest, _config, index, source = await open_image(
                ref, transport=fake.transport(), scheme="http", metrics=metrics, retries=2, backoff=0.01
            )
            assert isinstance(source, RegistrySource) and manifest.digest == image.manifest_digest
            assert fake.chunk_requests == before  # mounting reads the manifest, config and index only
            cfg = _cfg(None)
            async with ChunkReader(index, source, ChunkCache.from_config(cfg, metrics=metrics), cfg) as reader:
                await read_all(reader, image)
                for path, want in FILES.items():
                    ino = index.resolve(path)
                    for off in range(0, len(want), 40_000):
                        assert await reader.read(ino, off, 50_000) == want[off : off + 50_000]
            await source.aclose()
            assert fake.chunk_requests > before
        assert metrics.http_requests.value(code="2xx") > 0

    run(main)


def test_image_index_is_resolved_to_the_host_platform(image: Image) -> None:
    async def main() -> None:
        fake = FakeRegistry(image)
        os_name, arch, variant = oci.host_platform()
        other = "s390x" if arch != "s390x" else "amd64"
        raw = fake.manifests["latest"][0]
        host_plat = {"os": os_name, "architecture": arch} | ({"variant": variant} if variant else {})
        idx = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [
                {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 10,
                 "platform": {"os": "linux", "architecture": other}},
                {"mediaType": oci.OCI_MANIFEST, "digest": oci.sha256_digest(raw), "size": len(raw), "platform": host_plat},
            ],
        }
        fake.manifests["multi"] = (oci.canonical_json(idx), oci.OCI_INDEX)
        manifest, _, _, source = await open_image(f"{REGISTRY}/{REPO}:multi", transport=fake.transport(), scheme="http")
        assert manifest.digest == image.manifest_digest
        await source.aclose()

    run(main)


def test_adjacent_chunks_are_coalesced(image: Image) -> None:
    chunks = image.chunks()
    ranges, where = coalesce(image.index, chunks + chunks[:3])
    assert len(ranges) == image.index.n_blobs  # each blob is one run of adjacent frames
    for c in chunks:
        r, off = where[c.id]
        blob, start, length = ranges[r]
        assert blob == c.blob and start + off == c.offset and off + c.clen <= length


# ---------------------------------------------------------------------------------------
# Single-flight, RAM and disk tiers


def test_concurrent_readers_of_one_chunk_cause_one_fetch(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, delay=0.05)
        async with registry_reader(image, fake, _cfg(tmp_path / "c", readahead_chunks=0)) as reader:
            ino = image.ino("bin/app")
            chunk = image.index.map_range(ino, 0, 1)[0].chunk
            assert chunk is not None
            assert reader.state(chunk.id) is ChunkState.MISSING
            results: list[bytes] = []

            async def one(i: int) -> None:
                results.append(await reader.read(ino, i * 100, 1000))

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, i)
                await trio.sleep(0.01)
                assert reader.state(chunk.id) is ChunkState.FETCHING
            assert fake.chunk_requests == 1
            assert sorted(results) == sorted(FILES["bin/app"][i * 100 : i * 100 + 1000] for i in range(50))
            assert reader.state(chunk.id) is ChunkState.CACHED
            assert reader.in_flight == 0

    run(main)


def test_ram_tier_stays_within_its_byte_bound(image: Image) -> None:
    async def main() -> None:
        bound = 150_000
        fake = FakeRegistry(image)
        async with registry_reader(image, fake, _cfg(None, ram_cache_bytes=bound, readahead_chunks=0)) as reader:
            await read_all(reader, image)
            await read_all(reader, image)
            ram = reader.cache.ram
            assert 0 < ram.used_bytes <= bound
            assert ram.used_bytes == sum(len(d) for d in ram._lru.values())
            assert ram.evictions > 0

    run(main)


def _verified(image: Image, chunk: fmt.Chunk) -> VerifiedChunk:
    blob = image.blobs[image.index.blob(chunk.blob).oci_digest]
    return decode_frame(chunk, blob[chunk.offset : chunk.offset + chunk.clen])


def _synthetic(i: int, size: int = 10_000) -> VerifiedChunk:
    data = pseudo_random(1000 + i, size)
    frame = zstandard.ZstdCompressor().compress(data)
    chunk = fmt.Chunk(i, hashlib.sha256(data).digest(), 0, 0, len(frame), len(data))
    return decode_frame(chunk, frame)


def test_disk_tier_bound_lru_eviction_and_pins(tmp_path: Path) -> None:
    vs = [_synthetic(i) for i in range(6)]
    block = 12288  # each 10 kB chunk takes three 4 KiB blocks
    disk = DiskCache(tmp_path / "d", 3 * block)
    for v in vs[:3]:
        assert disk.put(v)
    assert len(disk) == 3 and disk.used_bytes == 3 * block
    assert disk.get(vs[0].chunk) is not None  # 0 is now the most recently used: 1 goes first
    assert disk.put(vs[3])
    assert vs[1].chunk.digest not in disk and not disk.path(vs[1].chunk.digest).exists()
    assert all(v.chunk.digest in disk for v in (vs[0], vs[2], vs[3]))
    assert disk.used_bytes == disk.max_bytes and disk.stats.evictions == 1
    # a file being read is never evicted, though it is the least recently used
    with disk.pinned(vs[2].chunk.digest):
        for v in vs[4:]:
            assert disk.put(v)
        assert disk.path(vs[2].chunk.digest).exists() and vs[2].chunk.digest in disk
        assert [v.chunk.digest in disk for v in vs] == [False, False, True, False, True, True]
    assert disk.put(vs[0])  # unpinned, 2 is the least recently used again: it goes now
    assert [v.chunk.digest in disk for v in vs] == [True, False, False, False, True, True]
    assert sorted(p.name for p in (tmp_path / "d").glob("??/*")) == sorted(v.chunk.digest.hex() for v in (vs[0], *vs[4:]))
    # with every other file pinned, the new file is the only one that may go: the bound holds
    with contextlib.ExitStack() as stack:
        for v in (vs[0], vs[4], vs[5]):
            stack.enter_context(disk.pinned(v.chunk.digest))
        assert disk.put(vs[1]) and disk.used_bytes == 3 * block and vs[1].chunk.digest not in disk
    # what it returns is verified: a file whose bytes were swapped is a miss and is removed
    assert vs[4].chunk.digest in disk
    disk.path(vs[4].chunk.digest).write_bytes(vs[5].data)
    assert disk.get(vs[4].chunk) is None and disk.stats.corrupt == 1 and vs[4].chunk.digest not in disk
    assert disk.get(vs[5].chunk) is not None


def test_disk_cache_is_reused_after_a_restart(image: Image, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"

    async def first() -> None:
        fake = FakeRegistry(image)
        async with registry_reader(image, fake, _cfg(cache_dir)) as reader:
            await read_all(reader, image)
        assert fake.chunk_requests > 0

    async def second() -> None:
        fake = FakeRegistry(image)
        metrics = NodeMetrics()
        async with registry_reader(image, fake, _cfg(cache_dir), metrics=metrics) as reader:
            assert len(reader.cache.disk or ()) == image.index.n_chunks
            await read_all(reader, image)
        assert fake.chunk_requests == 0
        assert metrics.cache_hits.value(tier="disk") == image.index.n_chunks

    run(first)
    run(second)
    # the access order comes back from the files' times: the two newest survive a smaller bound
    files = sorted(cache_dir.glob("??/*"))
    for i, p in enumerate(files):
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    keep = sum(-(-p.stat().st_size // 4096) * 4096 for p in files[-2:])
    disk = DiskCache(cache_dir, keep)
    assert sorted(cache_dir.glob("??/*")) == files[-2:] and len(disk) == 2


def test_crash_leftovers_never_pass_as_chunks(image: Image, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    ino = image.ino("lib/libx.so")
    chunk = image.index.map_range(ino, 0, 1)[0].chunk
    assert chunk is not None
    disk = DiskCache(cache_dir, 1 << 20)
    good = _verified(image, chunk)
    assert disk.put(good)
    torn = disk.path(chunk.digest)
    torn.write_bytes(good.data[: len(good.data) // 2])  # renamed, data lost in a power cut
    dead_tmp = torn.parent / ".tmp.999999999.abcdef"  # a writer that died mid-write
    dead_tmp.write_bytes(b"partial")

    async def main() -> None:
        fake = FakeRegistry(image)
        metrics = NodeMetrics()
        async with registry_reader(image, fake, _cfg(cache_dir, readahead_chunks=0), metrics=metrics) as reader:
            assert not dead_tmp.exists()
            assert await reader.read(ino, 0, CS) == FILES["lib/libx.so"][:CS]
            disk2 = reader.cache.disk
            assert disk2 is not None and disk2.stats.corrupt == 1
        assert fake.chunk_requests == 1  # refetched, not served from the torn file
        assert torn.read_bytes() == good.data

    run(main)


def test_ram_tier_lets_go_of_what_it_evicts() -> None:
    """Evicted chunks are freed: nothing keeps a reference to them (lru-dict's popitem did,
    so the daemon grew by every chunk it ever read)."""
    import sys

    vs = [_synthetic(i, 50_000) for i in range(40)]
    ram = RamCache(120_000)  # two chunks fit
    before = [sys.getrefcount(v.data) for v in vs]
    for v in vs:
        ram.put(v)
    assert len(ram) == 2 and ram.evictions == 38
    after = [sys.getrefcount(v.data) for v in vs]
    assert after[:38] == before[:38]  # evicted: back to the references this test holds
    assert [a - b for a, b in zip(after[38:], before[38:], strict=True)] == [1, 1]  # held by the tier
    ram.discard(vs[39].chunk.digest)
    refs = sys.getrefcount(vs[39].data)  # outside the assert: pytest's rewriting holds its operands
    assert refs == before[39] and ram.used_bytes == len(vs[38].data)


def _filled_disk(root: Path, n: int = 4) -> tuple[DiskCache, list[VerifiedChunk]]:
    """A disk tier at ``root`` into which this process wrote ``n`` synthetic chunks."""
    vs = [_synthetic(i) for i in range(n)]
    disk = DiskCache(root, 1 << 20)
    for v in vs:
        assert disk.put(v)
    return disk, vs


def test_disk_tier_trusts_only_files_this_process_checked(tmp_path: Path) -> None:
    root = tmp_path / "d"
    disk, vs = _filled_disk(root)
    # written here, from checked bytes: loaded without a second sha256
    assert disk.get(vs[0].chunk) == vs[0] and disk.stats.trusted_hits == 1
    # a new process (a new DiskCache on the folder) checks each file once, then trusts it
    again = DiskCache(root, 1 << 20)
    assert again.get(vs[0].chunk) == vs[0] and again.stats.trusted_hits == 0
    assert again.get(vs[0].chunk) == vs[0] and again.stats.trusted_hits == 1
    # bytes changed under a trusted file are checked and caught, however they got there:
    # rewritten in place (same inode, same size)...
    with open(again.path(vs[0].chunk.digest), "r+b") as f:
        f.write(b"\0" * 16)
    assert again.get(vs[0].chunk) is None and again.stats.corrupt == 1
    # ...replaced by another file (a rename, as another writer would do)...
    assert again.get(vs[1].chunk) is not None
    swap = root / "swap"
    swap.write_bytes(vs[2].data)
    os.replace(swap, again.path(vs[1].chunk.digest))
    assert again.get(vs[1].chunk) is None and again.stats.corrupt == 2
    # ...or truncated (torn) while the stamp was the same otherwise
    assert again.get(vs[2].chunk) is not None
    os.truncate(again.path(vs[2].chunk.digest), 100)
    assert again.get(vs[2].chunk) is None and again.stats.corrupt == 3
    # the process that wrote the files was told nothing: it catches them too
    assert disk.get(vs[1].chunk) is None and disk.get(vs[3].chunk) == vs[3]
    assert not any(again.path(v.chunk.digest).exists() for v in vs[:3])


def _framed(chunk_data: bytes, content: bytes, i: int = 0) -> tuple[fmt.Chunk, bytes]:
    """A chunk named by the digest of ``chunk_data`` whose frame (with its frame digest, as
    an index of format revision 1.2 gives it) holds ``content``."""
    frame = zstandard.ZstdCompressor().compress(content)
    return fmt.Chunk(i, hashlib.sha256(chunk_data).digest(), 0, 0, len(frame), len(content),
                     hashlib.sha256(frame).digest()), frame


def test_a_frame_is_checked_by_its_digest_before_it_is_decompressed() -> None:
    data = pseudo_random(7, 20_000)
    chunk, frame = _framed(data, data)
    v = decode_frame(chunk, frame)
    assert v.data == data and v.frame == chunk.frame
    bad = bytearray(frame)
    bad[-1] ^= 1  # still a valid frame header: only the digest tells
    with pytest.raises(DigestMismatch, match="compressed frame does not match its digest"):
        decode_frame(chunk, bytes(bad))
    # without frame digests (an index before revision 1.2) the uncompressed bytes are checked
    plain = dataclasses.replace(chunk, frame=None)
    assert decode_frame(plain, frame) == VerifiedChunk(plain, data, None)
    wrong, wrong_frame = _framed(data, pseudo_random(8, 20_000))
    with pytest.raises(DigestMismatch, match="content does not match its digest"):
        decode_frame(dataclasses.replace(wrong, frame=None), wrong_frame)


def test_frame_checked_files_are_trusted_only_for_that_frame(tmp_path: Path) -> None:
    """An index may pair a chunk digest with a frame of other content (a faulty or hostile
    builder): its own image then reads that content, as its index says, but the disk file,
    named by the chunk digest, is hashed before it serves any chunk with another frame
    digest, in this process or any other."""
    real = pseudo_random(1, 20_000)
    lying, lying_frame = _framed(real, pseudo_random(2, 20_000))
    disk = DiskCache(tmp_path / "d", 1 << 20)
    v = decode_frame(lying, lying_frame)  # passes: the frame is the one its index names
    assert disk.put(v)
    assert disk.get(lying) == v and disk.stats.trusted_hits == 1  # the same image: trusted
    honest, honest_frame = _framed(real, real)  # another image names the real content
    assert disk.get(honest) is None  # hashed against its name: caught, dropped
    assert disk.stats.corrupt == 1 and not disk.path(honest.digest).exists()
    assert disk.put(decode_frame(honest, honest_frame))
    hits = disk.stats.trusted_hits
    assert disk.get(honest) == VerifiedChunk(honest, real, honest.frame) and disk.stats.trusted_hits == hits + 1
    # a reader without that frame digest hashes the file; then it is proven for every reader
    unframed = dataclasses.replace(honest, frame=None)
    assert disk.get(unframed) == VerifiedChunk(unframed, real, None) and disk.stats.trusted_hits == hits + 1
    assert disk.get(lying) is not None and disk.stats.trusted_hits == hits + 2
    other = DiskCache(tmp_path / "d", 1 << 20)  # another process hashes first, then trusts
    got = other.get(honest)
    assert got is not None and got.data == real and got.frame is None and other.stats.trusted_hits == 0


def test_disk_tier_serves_trusted_page_cached_files_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "d"
    disk, vs = _filled_disk(root)
    got = disk.get_cached(vs[0].chunk)  # written here, so trusted, and still in the page cache
    assert got == vs[0] and disk.stats.trusted_hits == 1
    # bytes not in the page cache: no disk read in the caller's thread, the slow path reads them
    with open(disk.path(vs[1].chunk.digest), "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if disk.get_cached(vs[1].chunk) is not None:  # the kernel may keep pages it was asked to drop
        pytest.skip("the page cache kept the file's pages after POSIX_FADV_DONTNEED")
    assert disk.get(vs[1].chunk) == vs[1]
    # files it does not trust, or that changed, are never served this way
    assert DiskCache(root, 1 << 20).get_cached(vs[2].chunk) is None  # another process: hashes first
    with open(disk.path(vs[2].chunk.digest), "r+b") as f:
        f.write(b"\0" * 16)
    assert disk.get_cached(vs[2].chunk) is None and disk.get(vs[2].chunk) is None
    framed, _ = _framed(vs[3].data, vs[3].data, 3)
    assert disk.get_cached(framed) == VerifiedChunk(framed, vs[3].data, None)  # proven by digest: any frame
    lying, lying_frame = _framed(b"other", vs[3].data, 4)
    disk2 = DiskCache(tmp_path / "e", 1 << 20)
    assert disk2.put(decode_frame(lying, lying_frame))
    assert disk2.get_cached(lying) is not None  # trusted through this frame...
    assert disk2.get_cached(dataclasses.replace(lying, frame=None)) is None  # ...only for it


# ---------------------------------------------------------------------------------------
# Faults


def test_a_corrupt_chunk_is_refetched_once(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, corrupt=1)
        metrics = NodeMetrics()
        async with registry_reader(image, fake, _cfg(tmp_path / "c", readahead_chunks=0), metrics=metrics) as reader:
            assert await reader.read(image.ino("bin/app"), 0, 4096) == FILES["bin/app"][:4096]
        assert fake.chunk_requests == 2
        assert metrics.digest_failures.value(source="network") == 1
        assert metrics.refetches.value() == 1

    run(main)


def test_a_chunk_corrupt_twice_is_an_error_never_wrong_bytes(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, corrupt=-1)
        async with registry_reader(image, fake, _cfg(tmp_path / "c", readahead_chunks=0)) as reader:
            ino = image.ino("bin/app")
            with pytest.raises(ChunkCorrupt) as info:
                await reader.read(ino, 0, 4096)
            chunk = image.index.map_range(ino, 0, 1)[0].chunk
            assert chunk is not None
            msg = str(info.value)
            assert f"{REGISTRY}/{REPO}" in msg and "/bin/app" in msg and f"chunk {chunk.id}" in msg
            assert "wrong content" in msg and info.value.path == "/bin/app"
            assert fake.chunk_requests == 2
            assert not reader.cache.contains(chunk)  # nothing unverified entered a tier
            assert reader.state(chunk.id) is ChunkState.MISSING
            fake.corrupt = 0
            # the failure is remembered a moment: reads fail at once with its cause, no fetch
            with pytest.raises(ChunkCorrupt, match="wrong content"):
                await reader.read(ino, 100, 4096)
            assert fake.chunk_requests == 2
            await trio.sleep(READER_FAILURE_MEMORY)
            assert await reader.read(ino, 0, 4096) == FILES["bin/app"][:4096]  # then fetched afresh

    run(main)


def test_5xx_answers_are_retried(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, fail_next=2)
        metrics = NodeMetrics()
        async with registry_reader(image, fake, _cfg(tmp_path / "c", readahead_chunks=0), metrics=metrics) as reader:
            assert await reader.read(image.ino("data/big.txt"), 1000, 5000) == FILES["data/big.txt"][1000:6000]
        assert fake.chunk_requests == 3
        assert metrics.retries.value() == 2
        assert metrics.http_requests.value(code="5xx") == 2

    run(main)


def test_a_registry_that_does_not_answer_fails_the_read_after_the_timeout(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, hang=True)
        cfg = _cfg(tmp_path / "c", read_timeout=0.3, readahead_chunks=0)
        async with registry_reader(image, fake, cfg) as reader:
            t0 = time.monotonic()
            with pytest.raises(FetchTimeout) as info:
                await reader.read(image.ino("etc/conf03.txt"), 0, 100)
            assert time.monotonic() - t0 < 2.0
            msg = str(info.value)
            assert f"{REGISTRY}/{REPO}" in msg and "/etc/conf03.txt" in msg and "chunk " in msg
            assert "after 0.3 s" in msg

    run(main)


def test_an_unreachable_registry_fails_the_read_with_its_cause_then_recovers(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, down=True)
        metrics = NodeMetrics()
        async with registry_reader(image, fake, _cfg(tmp_path / "c", readahead_chunks=0), metrics=metrics) as reader:
            ino = image.ino("lib/libx.so")
            with pytest.raises(FetchFailed) as info:
                await reader.read(ino, 0, 100)
            assert "unreachable" in str(info.value) and "/lib/libx.so" in str(info.value)
            assert isinstance(info.value, ReadError)
            assert metrics.retries.value() >= 4  # the first attempt and 3 retries, all refused
            assert metrics.errors.value(kind="fetch") == 1
            fake.down = False
            requests = fake.chunk_requests
            with pytest.raises(FetchFailed, match="unreachable"):  # remembered: fails at once, nothing asked
                await reader.read(ino, 0, 100)
            assert fake.chunk_requests == requests and metrics.remembered_failures.value() == 1
            await trio.sleep(READER_FAILURE_MEMORY)
            assert await reader.read(ino, 0, 100) == FILES["lib/libx.so"][:100]

    run(main)


def test_closing_the_reader_fails_waiting_reads(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, hang=True)
        errors: list[BaseException] = []

        async def waiting_read(reader: ChunkReader) -> None:
            try:
                await reader.read(image.ino("bin/app"), 0, 10)
            except ReadError as exc:
                errors.append(exc)

        # the reader closes first (inner), while the read, a task of the outer nursery, waits
        async with trio.open_nursery() as outer, registry_reader(image, fake, _cfg(tmp_path / "c")) as reader:
            outer.start_soon(waiting_read, reader)
            await trio.sleep(0.05)
            assert reader.demand_waiting == 1
        assert len(errors) == 1 and isinstance(errors[0], ReaderClosed) and "closed" in str(errors[0])

    run(main)


# ---------------------------------------------------------------------------------------
# Readahead and prefetch


def test_sequential_reads_trigger_readahead(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image)
        metrics = NodeMetrics()
        cfg = _cfg(tmp_path / "c", readahead_trigger=2, readahead_chunks=2)
        async with registry_reader(image, fake, cfg, metrics=metrics) as reader:
            ino = image.ino("data/big.txt")
            want = FILES["data/big.txt"]
            step = 16384
            for off in range(0, len(want), step):
                assert await reader.read(ino, off, step) == want[off : off + step]
                await trio.sleep(0)
        n_chunks = len({s.chunk.id for s in image.index.map_range(ino, 0, len(want)) if s.chunk})
        assert metrics.readahead_chunks.value() > 0
        # the reads themselves found most chunks already in RAM
        assert metrics.cache_hits.value(tier="ram") > len(range(0, len(want), step)) - n_chunks
        assert fake.chunk_requests < n_chunks + 1

    run(main)


def _chunk_at(image: Image) -> dict[tuple[str, int], int]:
    return {(image.index.blob(c.blob).oci_digest, c.offset): c.id for c in image.chunks()}


def test_prefetch_fills_the_disk_tier_in_prefetch_order(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=1, prefetch_batch_bytes=1)
        async with registry_reader(image, fake, cfg) as reader:
            prefetcher = Prefetcher(reader)
            assert prefetcher.progress().state is PrefetchState.WAITING
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                p = await prefetcher.wait_done()
            at = _chunk_at(image)
            assert [at[(d, off)] for d, off, _ in fake.ranges] == image.index.prefetch_order()
            assert p.state is PrefetchState.DONE and p.chunks_done == p.chunks_total == image.index.n_chunks
            assert p.bytes_done == p.bytes_total == p.bytes_fetched > 0 and p.fraction == 1.0
            disk = reader.cache.disk
            assert disk is not None and len(disk) == image.index.n_chunks
            assert len(reader.cache.ram) == 0  # prefetch goes to disk, not RAM
            text = reader.metrics.render()
            assert f'turbofs_prefetch{{image="{REGISTRY}/{REPO}",what="chunks_done"}} {image.index.n_chunks}' in text
            # a second run finds everything cached and fetches nothing
            again = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(again.run)
                p2 = await again.wait_done()
            assert p2.chunks_done == p2.chunks_total and p2.chunks_fetched == 0

    run(main)


def test_prefetch_respects_its_parallelism(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, delay=0.03)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=2, prefetch_batch_bytes=1)
        async with registry_reader(image, fake, cfg) as reader:
            prefetcher = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                await prefetcher.wait_done()
        assert fake.max_active == 2

    run(main)


def test_prefetch_respects_its_bandwidth_cap(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        total = sum(c.clen for c in image.chunks())
        rate = int(total / 1.0)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=4, prefetch_batch_bytes=1, prefetch_bandwidth=rate)
        fake = FakeRegistry(image)
        async with registry_reader(image, fake, cfg) as reader:
            prefetcher = Prefetcher(reader)
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                p = await prefetcher.wait_done()
            elapsed = trio.current_time() - t0
        last = max(c.clen for c in image.chunks())
        floor = (total - rate * 0.25 - last) / rate
        assert floor * 0.9 <= elapsed < 3.0, (elapsed, floor)
        assert p.bytes_per_second < rate / 0.75 * 1.1  # what the 0.25 s burst allows

    run(main)


def test_token_bucket_holds_its_rate() -> None:
    async def main() -> None:
        bucket = TokenBucket(rate=100_000, burst=10_000)
        t0 = trio.current_time()
        for _ in range(10):
            await bucket.acquire(10_000)
        elapsed = trio.current_time() - t0
        assert 0.85 <= elapsed < 1.5  # 100 kB at 100 kB/s, less the 10 kB burst

    run(main)


def test_demand_reads_jump_ahead_of_prefetch(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, delay=0.04)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=1, prefetch_batch_bytes=1, readahead_chunks=0)
        order = image.index.prefetch_order()
        last = image.index.chunk(order[-1])
        ino, off = next(
            (image.ino(p), s.file_offset)
            for p in FILES
            for s in image.index.map_range(image.ino(p), 0, len(FILES[p]))
            if s.chunk is not None and s.chunk.id == last.id
        )
        async with registry_reader(image, fake, cfg) as reader:
            prefetcher = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                await trio.sleep(0.1)
                t0 = trio.current_time()
                data = await reader.read(ino, off, 100)
                took = trio.current_time() - t0
                assert not prefetcher.progress().finished
                assert took < 0.25, took  # one request's delay, not the prefetch queue
                p = await prefetcher.wait_done()
            path = reader.path_of(ino).lstrip("/")
            assert data == FILES[path][off : off + 100]
            assert p.chunks_done == p.chunks_total

    run(main)


def test_prefetch_resumes_after_registry_errors(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, down=True)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=2, prefetch_backoff=0.02, prefetch_backoff_max=0.1)
        async with registry_reader(image, fake, cfg, retries=1) as reader:
            prefetcher = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                await trio.sleep(0.3)
                mid = prefetcher.progress()
                assert mid.errors > 0 and mid.chunks_done == 0 and mid.last_error and "unreachable" in mid.last_error
                fake.down = False
                p = await prefetcher.wait_done()
            assert p.state is PrefetchState.DONE and p.chunks_done == p.chunks_total

    run(main)


def test_prefetch_without_a_disk_tier_is_disabled(image: Image) -> None:
    async def main() -> None:
        fake = FakeRegistry(image)
        async with registry_reader(image, fake, _cfg(None)) as reader:
            prefetcher = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                p = await prefetcher.wait_done()
            assert p.state is PrefetchState.DISABLED and fake.chunk_requests == 0

    run(main)


# ---------------------------------------------------------------------------------------
# Metrics


_SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? '
    r"(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$"
)


def test_metrics_render_as_prometheus_text(image: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(image, fail_next=1)
        metrics = NodeMetrics()
        async with registry_reader(image, fake, _cfg(tmp_path / "c"), metrics=metrics) as reader:
            await read_all(reader, image)
            await read_all(reader, image)
        text = metrics.render()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("# "):
                assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
                continue
            assert _SAMPLE.match(line), line
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
        assert samples['turbofs_cache_hits_total{tier="ram"}'] > 0
        assert samples['turbofs_cache_misses_total{tier="ram"}'] > 0
        assert samples["turbofs_registry_retries_total"] == 1
        assert samples['turbofs_fetch_seconds_count{kind="demand"}'] >= 1
        assert samples['turbofs_fetch_seconds_bucket{kind="demand",le="+Inf"}'] == samples['turbofs_fetch_seconds_count{kind="demand"}']
        assert samples['turbofs_fetch_bytes_total{kind="demand"}'] > 0
        assert samples['turbofs_cache_chunks{tier="disk"}'] == image.index.n_chunks
        assert samples["turbofs_read_bytes_total"] == 2 * sum(len(d) for d in FILES.values())
        assert 'turbofs_digest_failures_total' in text

    run(main)


def test_metric_label_values_are_escaped() -> None:
    m = NodeMetrics()
    m.errors.inc(kind='a"b\\c\nd')
    line = next(s for s in m.render().splitlines() if s.startswith("turbofs_read_errors_total{"))
    assert line == 'turbofs_read_errors_total{kind="a\\"b\\\\c\\nd"} 1'
    assert _SAMPLE.match(line)
    with pytest.raises(ValueError):
        m.errors.inc(other="x")


def test_ram_cache_alone(image: Image) -> None:
    ram = RamCache(100_000)
    vs = [_verified(image, c) for c in image.chunks()[:4]]
    for v in vs:
        ram.put(v)
    assert ram.used_bytes <= 100_000 and vs[-1].chunk.digest in ram
    assert ram.get(vs[-1].chunk.digest) == vs[-1].data
