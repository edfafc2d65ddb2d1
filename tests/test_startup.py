"""Recorded startups: `turbofs trace`, `turbofs build --startup-trace`, the index's startup
section, and the prefetch's two phases (startup first at full speed; the rest only when
reads leave the link quiet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from index_builder.builder import build
from tests.mount_fixtures import Mounter, mounter  # noqa: F401  (fixture)
from tests.ocifixtures import TarEntry, pseudo_random, write_oci_layout
from tests.test_node_core import FakeRegistry, Image, _cfg, registry_reader
from turbofs.core import format as fmt
from turbofs.core import trace
from turbofs.core.config import PREFETCH_BATCH_EXPANSION, BuildConfig
from turbofs.core.errors import UsageError
from turbofs.core.image import open_layout_image
from turbofs.node.cache import ChunkCache
from turbofs.node.prefetch import Prefetcher, PrefetchState
from turbofs.node.reader import ChunkReader
from turbofs.node.source import open_image

CS = 64 * 1024
FILES: dict[str, bytes] = {
    "bin/app": pseudo_random(1, 3 * CS + 100),
    "lib/libbig.so": pseudo_random(2, 6 * CS),
    "lib/libx.so": pseudo_random(3, 2 * CS),
    "data/model.bin": pseudo_random(4, 8 * CS),
    **{f"etc/conf{i:02d}.txt": pseudo_random(10 + i, 200 + i * 900) for i in range(24)},
}
CFG = BuildConfig(chunk_size=CS, blob_min=128 * 1024, blob_avg=256 * 1024, blob_max=512 * 1024)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup-src")
    entries = [TarEntry(d, "dir", mode=0o755) for d in ("bin", "data", "etc", "lib")]
    entries += [TarEntry(p, data=d, mode=0o755 if p.startswith("bin/") else 0o644) for p, d in FILES.items()]
    entries.append(TarEntry("usr/bin/app", "symlink", linkname="../../bin/app"))
    entries.insert(0, TarEntry("usr/bin", "dir", mode=0o755))
    entries.insert(0, TarEntry("usr", "dir", mode=0o755))
    write_oci_layout(root / "src", [entries[:10], entries[10:]])
    return root / "src"


def _build(source: Path, out: Path, startup: trace.StartupTrace | None = None) -> fmt.Index:
    build(f"oci:{source}:latest", out, CFG, progress=False, startup_trace=startup)
    return open_layout_image(out, "latest").index


def _file_chunks(index: fmt.Index, path: str) -> list[int]:
    return list(dict.fromkeys(c for c, _ in index.file_refs(index.resolve(path)) if c != fmt.HOLE))


def test_without_a_trace_there_is_no_startup_section(source: Path, tmp_path: Path) -> None:
    index = _build(source, tmp_path / "plain")
    assert index.startup_chunks() == []
    index.verify()


def test_a_path_list_puts_those_files_first_in_blobs_and_prefetch(source: Path, tmp_path: Path) -> None:
    plain = _build(source, tmp_path / "plain")
    listing = tmp_path / "startup.txt"
    # a symlink is followed inside the image; a missing path is skipped
    listing.write_text("# what the app reads\n/lib/libx.so\n/usr/bin/app\n/no/such/file\n")
    index = _build(source, tmp_path / "traced", trace.load(listing))
    want = _file_chunks(index, "/lib/libx.so") + _file_chunks(index, "/bin/app")
    assert index.startup_chunks() == want
    # stored first in the blobs (ids follow the layout), and first in the prefetch order
    assert want == list(range(len(want)))
    assert index.prefetch_order()[: len(want)] == want
    assert sorted(index.prefetch_order()) == list(range(index.n_chunks))
    # same chunks as without the trace: only their order changed
    assert {c.digest for c in index.chunks()} == {c.digest for c in plain.chunks()}
    index.verify()


def test_a_recorded_trace_carries_over_to_a_rebuild_by_digest(source: Path, tmp_path: Path) -> None:
    first = _build(source, tmp_path / "first")
    order = ["/data/model.bin", "/etc/conf03.txt", "/bin/app"]

    async def record() -> list[int]:
        opened = await open_image(str(tmp_path / "first"))
        try:
            async with ChunkReader(opened.index, opened.source, ChunkCache.from_config(_cfg(None))) as r:
                for p in order:
                    ino = opened.index.resolve(p)
                    size = opened.index.inode(ino).size
                    assert await r.read(ino, 0, size) == FILES[p.lstrip("/")]
                return r.trace()
        finally:
            await opened.source.aclose()

    ids = trio.run(record)
    want_digests = [first.chunk(c).digest for c in ids]
    assert ids == list(dict.fromkeys(c for p in order for c in _file_chunks(first, p)))
    recorded = trace.recorded(first, ids, image="test", index_digest="sha256:" + "0" * 64)
    assert recorded.files[0] == "/data/model.bin" and "/bin/app" in recorded.files
    path = tmp_path / "trace.json"
    recorded.write(path)
    loaded = trace.load(path)
    assert loaded.chunks == want_digests
    loaded.chunks.append(b"\x01" * 32)  # a chunk the image does not have: dropped
    second = _build(source, tmp_path / "second", loaded)
    assert [second.chunk(c).digest for c in second.startup_chunks()] == want_digests


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"format": "turbofs-startup-trace-1", "chunks": ["zz"]}', "chunks[0] is not a 64-digit hex sha256"),
        (b'{"format": "other", "chunks": []}', "not a startup trace"),
        (b'{"format": "turbofs-startup-trace-1", "chunks": 5}', '"chunks" must be a list'),
        (b"{not json", "not valid JSON"),
        (b"lib/relative.so\n", "is not an absolute path"),
        (b"# only a comment\n\n", "no paths and no chunks"),
    ],
)
def test_bad_traces_are_refused_with_the_reason(text: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        trace.parse(text, name="t")


def test_cli_build_refuses_a_bad_trace_and_writes_nothing(source: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "turbofs-startup-trace-1", "chunks": ["xyz"]}')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "turbofs.cli", "build", f"oci:{source}:latest", "-o", str(out),
                           "--startup-trace", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "chunks[0]" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# the prefetch's phases


@pytest.fixture(scope="module")
def traced(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("startup-traced")
    startup = trace.StartupTrace(paths=[b"/etc/conf05.txt", b"/lib/libbig.so", b"/bin/app"])
    result = build(f"oci:{source}:latest", root / "turbo", CFG, progress=False, startup_trace=startup)
    index = open_layout_image(root / "turbo", "latest").index
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in (root / "turbo" / "blobs" / "sha256").iterdir()}
    assert len(index.startup_chunks()) >= 10
    return Image(root / "turbo", index, result.manifest_digest, blobs)


def _chunk_at(image: Image) -> dict[tuple[str, int], int]:
    return {(image.index.blob(c.blob).oci_digest, c.offset): c.id for c in image.index.chunks()}


def test_startup_chunks_come_first_in_order_into_ram_and_disk(traced: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(traced, delay=0.005)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=1, prefetch_batch_bytes=1, prefetch_startup_batch_bytes=1)
        startup = traced.index.startup_chunks()
        async with registry_reader(traced, fake, cfg) as reader:
            prefetcher = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                p = await prefetcher.wait_done()
            at = _chunk_at(traced)
            fetched = [at[(d, off)] for d, off, _ in fake.ranges]
            assert fetched[: len(startup)] == startup
            assert sorted(fetched) == list(range(traced.index.n_chunks))
            assert p.state is PrefetchState.DONE and p.startup_chunks == len(startup)
            assert p.startup_seconds is not None and 0 < p.startup_seconds <= p.elapsed
            # the startup's chunks are in RAM (reads want them soon); the rest on disk only
            in_ram = {c for c in range(traced.index.n_chunks) if traced.index.chunk(c).digest in reader.cache.ram}
            assert in_ram == set(startup)
            disk = reader.cache.disk
            assert disk is not None and len(disk) == traced.index.n_chunks

    trio.run(main)


def test_background_prefetch_waits_for_reads_to_be_quiet(traced: Image, tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeRegistry(traced, delay=0.01)
        cfg = _cfg(tmp_path / "c", prefetch_parallel=2, prefetch_batch_bytes=1, prefetch_quiet=0.4,
                   readahead_chunks=0)
        index = traced.index
        startup = set(index.startup_chunks())
        # reads of chunks outside the startup, one every 0.1 s: never 0.4 s quiet
        targets = [(ino, s.file_offset) for p in ("data/model.bin",) for ino in [index.resolve(p)]
                   for s in index.map_range(ino, 0, len(FILES[p])) if s.chunk is not None and s.chunk.id not in startup]
        assert len(targets) >= 5
        async with registry_reader(traced, fake, cfg) as reader:
            prefetcher = Prefetcher(reader)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefetcher.run)
                for ino, off in targets[:5]:
                    await reader.read(ino, off, 10)
                    await trio.sleep(0.1)
                p = prefetcher.progress()
                # the startup phase ran regardless of the reads; the background one did not start
                assert p.startup_seconds is not None
                assert p.chunks_fetched == len(startup)
                assert p.state is PrefetchState.PAUSED
                # reads served from the cache (the startup's chunks, in RAM) hold it back too
                app = index.resolve("/bin/app")
                for k in range(5):
                    await reader.read(app, k * 1000, 10)
                    await trio.sleep(0.1)
                p = prefetcher.progress()
                assert p.chunks_fetched == len(startup) and p.state is PrefetchState.PAUSED
                done = await prefetcher.wait_done()
            assert done.state is PrefetchState.DONE and done.chunks_done == done.chunks_total

    trio.run(main)


# ---------------------------------------------------------------------------------------
# end to end: mount, start, `turbofs trace`, rebuild


def test_trace_of_a_mount_rebuilds_into_a_startup_section(
    source: Path, tmp_path: Path, mounter: Mounter  # noqa: F811
) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    _build(source, tmp_path / "img")
    mp = mounter.mount(str(tmp_path / "img"), "mnt", "--no-prefetch")
    read_order = ["lib/libx.so", "etc/conf07.txt", "bin/app"]
    for p in read_order:
        assert (mp / p).read_bytes() == FILES[p]
    out = tmp_path / "trace.json"
    proc = mounter.cli("trace", str(mp), "-o", str(out), "--run-dir", str(mounter.run_dir))
    assert "chunks of" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["format"] == trace.FORMAT and doc["image"] == str(tmp_path / "img")
    assert doc["files"][0] == "/lib/libx.so" and "/bin/app" in doc["files"]
    first = [f for f in doc["files"] if f in {"/" + p for p in read_order}]
    assert first == ["/" + p for p in read_order]
    mounter.umount(mp)
    rebuilt = tmp_path / "rebuilt"
    mounter.cli("build", f"oci:{source}:latest", "-o", str(rebuilt), "--chunk-size", str(CS),
                "--startup-trace", str(out))
    index = open_layout_image(rebuilt, "latest").index
    assert [index.chunk(c).digest.hex() for c in index.startup_chunks()] == doc["chunks"]
    # the rebuilt image mounts and prefetches its startup first
    mp2 = mounter.mount(str(rebuilt), "mnt2", "--wait")
    status = mounter.status(mp2)
    assert status["prefetch"]["state"] == "done"
    assert status["prefetch"]["startup_chunks"] == len(doc["chunks"])
    for p, data in FILES.items():
        assert (mp2 / p).read_bytes() == data


def test_prefetch_batches_are_bounded_uncompressed_too(tmp_path: Path) -> None:
    # very compressible chunks: 4 MiB of compressed batch would hold far more than 16 MiB
    entries = [TarEntry("d", "dir", mode=0o755)]
    entries += [TarEntry(f"d/f{i}", data=bytes([65 + i]) * (3 * CS)) for i in range(20)]
    write_oci_layout(tmp_path / "src", [entries])
    build(f"oci:{tmp_path / 'src'}:latest", tmp_path / "turbo", CFG, progress=False)

    async def main() -> None:
        opened = await open_image(str(tmp_path / "turbo"))
        try:
            cfg = _cfg(tmp_path / "c", prefetch_batch_bytes=4096)
            async with ChunkReader(opened.index, opened.source, ChunkCache.from_config(cfg), cfg) as reader:
                p = Prefetcher(reader)
                chunks = [opened.index.chunk(i) for i in opened.index.prefetch_order()]
                assert sum(c.ulen for c in chunks) > 8 * 4 * 4096 > sum(c.clen for c in chunks)
                batches = list(p._batches(chunks, 4096))
                assert [c for b in batches for c in b] == chunks
                for b in batches:
                    assert len(b) == 1 or (sum(c.clen for c in b) <= 4096
                                           and sum(c.ulen for c in b) <= 4096 * PREFETCH_BATCH_EXPANSION)
                assert len(batches) > 1
        finally:
            await opened.source.aclose()

    trio.run(main)
