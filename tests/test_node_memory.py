"""The daemon's memory: through a full prefetch of an image of a few hundred MB
and whole-image reads, its peak RSS stays within the RAM bound plus a fixed overhead, and
reading the image again does not make it grow.

Real mounts of an image pushed to a real turbofs registry; the figures are the kernel's
(``VmHWM``, ``VmRSS`` of the daemon), read from ``/proc``.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from index_builder.builder import build
from tests.mount_fixtures import Mounter
from tests.ocifixtures import TarEntry, write_oci_layout
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from turbofs.core.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DEMAND_PARALLEL,
    DEFAULT_PREFETCH_BATCH_BYTES,
    DEFAULT_PREFETCH_PARALLEL,
    BuildConfig,
)

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
]

MiB = 1 << 20
RAM_BOUND = 16 * MiB
#: What the daemon may hold besides its idle self (measured per test: a --no-prefetch mount
#: of the same image, just ready) and the RAM tier's bound, whatever the image's size:
#: * the prefetch's batches in flight: DEFAULT_PREFETCH_PARALLEL (4) batches of
#:   DEFAULT_PREFETCH_BATCH_BYTES (4 MiB) compressed, each held as the HTTP body, its
#:   frames and its decompressed chunks (this image expands 1.6x on average: ~2.6 x 4 MiB),
#:   42 MiB if all four were at their largest at once;
#: * demand and read-ahead fetches: at most DEFAULT_DEMAND_PARALLEL (16) chunks of 256 KiB
#:   twice over (frame and chunk), 8 MiB;
#: * allocator slack: glibc's arenas keep free space of their own (two arenas, see
#:   turbofs/node/memory.py) and Python's small-object pools, ~14 MiB.
IN_FLIGHT = DEFAULT_PREFETCH_PARALLEL * DEFAULT_PREFETCH_BATCH_BYTES * 26 // 10 + 2 * DEFAULT_DEMAND_PARALLEL * DEFAULT_CHUNK_SIZE
OVERHEAD = IN_FLIGHT + 14 * MiB
#: A second full read of the image may add this much to the peak at most (no leak).
REREAD_GROWTH = 8 * MiB

_WORDS = [b"turbofs", b"chunk", b"digest", b"prefetch", b"layer", b"registry", b"mount", b"erofs",
          b"lookup", b"kernel", b"python", b"import", b"module", b"library", b"daemon", b"cache"]


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _text(seed: int, size: int) -> bytes:
    """Compressible bytes (zstd 3 makes them ~3x smaller): random words and numbers."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(_WORDS) + str(rng.randrange(1000)).encode() for _ in range(400)) + b"\n"
    return bytes(out[:size])


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """About 320 MB: 20 files of 12 MiB of random bytes, 10 of 8 MiB of text, small files;
    returns the turbo layout and each file's sha256."""
    base = tmp_path_factory.mktemp("bigimage")
    entries = [TarEntry("data", "dir"), TarEntry("text", "dir"), TarEntry("etc", "dir")]
    entries += [TarEntry(f"data/r{i:02d}.bin", data=_random(i, 12 * MiB + 1000 * i)) for i in range(20)]
    entries += [TarEntry(f"text/t{i:02d}.txt", data=_text(100 + i, 8 * MiB + 777 * i)) for i in range(10)]
    entries += [TarEntry(f"etc/c{i:03d}.conf", data=_text(1000 + i, 500 + 37 * i)) for i in range(300)]
    sums = {e.name: hashlib.sha256(e.data).hexdigest() for e in entries if e.type == "file"}
    src = write_oci_layout(base / "src", [entries], compression="zstd")
    del entries
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(), progress=False)
    return base / "turbo", {str(k): v for k, v in sums.items()}


def _read_all(mp: Path, sums: dict[str, str]) -> None:
    """Read and check every file, its pages first dropped from the kernel's page cache (so
    that the reads reach the daemon again; in erofs mode the FUSE image file under the
    erofs mount keeps its own cache, out of reach here)."""
    for name, want in sums.items():
        h = hashlib.sha256()
        with open(mp / name, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while piece := f.read(MiB):
                h.update(piece)
        assert h.hexdigest() == want, name


def _vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@pytest.mark.parametrize("mode", ["fuse", "erofs"])
def test_rss_stays_within_the_ram_bound_plus_a_fixed_overhead(
    mode: str, mounter: Mounter, big_image: tuple[Path, dict[str, str]], shared_turbofs_registry: TurbofsRegistry
) -> None:
    layout, sums = big_image
    ref = f"{shared_turbofs_registry.host_port}/node/big:v1"
    skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}", "--preserve-digests")
    opts = ("--ram-cache-size", str(RAM_BOUND), "--mode", mode)

    # the daemon idle, image open and mounted: what it costs before any chunk moves
    mp = mounter.mount(ref, "idle", "--no-prefetch", *opts)
    idle = mounter.status(mp)
    assert idle["mode"] == mode
    base = idle["memory"]["rss"]
    mounter.umount(mp)
    limit = base + RAM_BOUND + OVERHEAD

    # a full prefetch (--wait returns once every chunk is in the disk cache)
    mp = mounter.mount(ref, "mnt", "--wait", *opts)
    status = mounter.status(mp)
    pid = status["pid"]
    assert status["prefetch"]["state"] == "done"
    assert status["prefetch"]["chunks_done"] == status["prefetch"]["chunks_total"]
    image_bytes = status["prefetch"]["bytes_total"]
    assert image_bytes > 200 * MiB  # the image is far bigger than the bound and the overhead
    after_prefetch = _vm_kib(pid, "VmHWM") * 1024
    assert after_prefetch <= limit, (after_prefetch >> 20, base >> 20, limit >> 20)

    # every byte read twice through a RAM tier of 16 MiB: chunks come from the disk tier
    # into RAM and are evicted again, ~20 times its bound per pass
    _read_all(mp, sums)
    first = _vm_kib(pid, "VmHWM") * 1024
    reads = mounter.status(mp)["fuse_requests"].get("read", 0)
    _read_all(mp, sums)
    second = _vm_kib(pid, "VmHWM") * 1024
    status = mounter.status(mp)
    if mode == "fuse":  # the second pass reached the daemon (FUSE reads are 1 MiB at most)
        assert status["fuse_requests"]["read"] - reads >= image_bytes // MiB
    assert status["cache"]["ram_bytes"] <= RAM_BOUND
    assert status["cache"]["ram_chunks"] < status["prefetch"]["chunks_total"] // 8
    print(f"{mode}: idle {base >> 20} MiB, limit {limit >> 20}, peak after prefetch {after_prefetch >> 20}, "
          f"after a read {first >> 20}, after two {second >> 20}, now {status['memory']['rss'] >> 20}")
    assert first <= limit, (first >> 20, base >> 20, limit >> 20)
    assert second - first <= REREAD_GROWTH, ((second - first) >> 20, "MiB more on the second pass")
    assert status["memory"]["rss"] <= limit
    mounter.umount(mp)
