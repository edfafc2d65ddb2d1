"""Mount benchmark: ``turbofs mount`` through real FUSE mounts from a real ``turbofs serve``.

Run as root from the repository root (``python -m bench.mount_bench``). It measures:

1. **Mount-to-ready time** of a synthetic 100,000-file image (100,000 small files in
   5,000 directories, one uncompressed tar layer written with :mod:`tarfile` into an OCI
   layout made here, converted with ``turbofs build``, pushed with ``turbofs push``): the
   wall time of the ``turbofs mount`` command, which returns once the mount answers. With
   the default settings (background prefetch on), with ``--no-prefetch``, and with the
   page cache dropped first (interpreter and libraries read from disk). Where the time
   goes: the same command for a one-file image (the fixed cost), interpreter start and
   the imports of both processes ``turbofs mount`` runs (the command and the daemon it
   spawns), and, in this process, the steps the daemon takes before mounting: manifest
   GET, config and index GETs, index decode (digest check, ``Index.from_bytes``, blob
   table check).
2. **Cold sequential reads** of large files (a synthetic image of ``--big-files`` files
   of ``--big-mib`` MiB of random bytes, so the bytes on the wire are the file bytes):
   fresh disk cache, page cache dropped after mounting, each file read front to back with
   1 MiB ``read`` calls. Over loopback (with ``--no-prefetch`` and with the defaults) and
   through a 1 Gbit/s ``tc tbf`` link between two network namespaces (``--no-prefetch``).
   The link itself is measured first with curl downloading a 256 MiB blob from the same
   registry through the same link.
3. **Reads from the disk cache and the page cache**: after a full prefetch (``mount
   --wait``) into a disk cache, remount with ``--no-prefetch`` and read the files with the
   page cache dropped (cache files come from disk), read them again (page cache), then
   remount without dropping (cache files in the page cache: the disk tier's CPU cost).
4. **Per-operation latency through FUSE** (medians in microseconds, one call timed at a
   time): ``lookup`` (first ``stat`` of a never-seen name, its directory already known;
   and of a missing name), ``stat`` again (served by the kernel: entries and attributes
   are cached for 3600 s, and the daemon's request counters show no new request),
   ``getattr`` forced through to the daemon with ``statx(AT_STATX_FORCE_SYNC)``,
   ``readdir`` (``listdir`` of a never-listed 20-entry directory), and a 128 KiB
   ``O_DIRECT`` ``pread`` (no page cache) of a chunk in the daemon's RAM tier and of a
   chunk on the disk tier only. Also a 128 KiB ``pread`` from the page cache.
5. **Full prefetch**: ``turbofs mount --wait`` of the ``python-1g`` turbo image (the
   default build, 397 MB of compressed chunks), fresh disk cache: compressed MB/s of the
   whole command and as the prefetcher reports it; the daemon's peak RSS (VmHWM, and the
   maximum VmRSS sampled every 20 ms) with the default RAM bound, and its RSS after the
   prefetch. On loopback and through the shaped link.

Where the time goes: for every read run the CPU seconds of the daemon (all threads, and its
main thread alone, which runs trio's loop), of the registry and of the reader,
the cores busy machine-wide (``/proc/stat``: everyone's work), and the daemon's fetches (how
many, their mean duration, how many were in flight on average). Beside them, measured
alone: the CPU per MB of decompress + verify, sha256 and the disk-cache write (one thread,
in this process), and the registry client alone fetching every chunk of the big-file
image in 1 MiB batches, 1, 2 or 4 at a time, with and without the decompress + verify step
(through the shaped link it runs inside the node namespace). Through the link, two variants
test two suspects: the registry's blob files left in the page cache, and a deeper readahead
(``[daemon] readahead_chunks = 16``).

The shaped link: namespaces ``tfsbench-reg`` (the registry, 10.213.0.1/30) and
``tfsbench-node`` (10.213.0.2/30), one veth pair between them, ``tbf rate 1gbit burst
256kb latency 50ms`` on the egress of both ends. The registry runs in ``tfsbench-reg``
on the same storage as the loopback one. ``turbofs mount`` (and so its daemon) is started
with ``nsenter --net`` into ``tfsbench-node``: only its network namespace differs, so the
mount appears in the root mount namespace and is read from there. No address is added
outside these two namespaces; they are deleted at the end (and at the start, if a killed
run left them).

The synthetic images are kept under ``$TURBOFS_CACHE/bench/mount/`` (with a stamp naming
their parameters); registry storage, mounts and disk caches live in a temporary folder
that is removed at the end.

Command line::

    python -m bench.mount_bench [--runs 3] [--files 100000] [--dirs 5000]
        [--big-files 3] [--big-mib 200] [--no-shaped] [--no-python-1g] [--mode fuse]

``--mode`` is passed to every ``turbofs mount`` (left out, the mount's own default
applies). ``status`` of each mount names the presentation it got (``mode``; absent: the
per-file FUSE one), and the JSON records it.

Results go to ``bench/results/mount.json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib
import io
import json
import mmap
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.build_bench import (
    RESULTS_DIR,
    code_state,
    ensure_variant,
    log,
    machine_info,
    write_results,
)
from bench.images import DigestingWriter
from bench.netlink import NetnsLink
from bench.registry_bench import listening_port
from turbofs.core.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    BuildConfig,
    DaemonConfig,
    KiB,
    MiB,
)

RESULTS_FILE: Final = RESULTS_DIR / "mount.json"
PYTHON: Final = sys.executable
TURBOFS: Final = [PYTHON, "-m", "turbofs.cli"]
TAG: Final = "latest"
MB: Final = 1e6

LINK_NAME: Final = "tfsbench"
LINK_SUBNET: Final = "10.213.0"
NS_REG: Final = f"{LINK_NAME}-reg"
NS_NODE: Final = f"{LINK_NAME}-node"
ADDR_REG: Final = f"{LINK_SUBNET}.1"
ADDR_NODE: Final = f"{LINK_SUBNET}.2"
NS_PORT: Final = 5050
TBF: Final = ["rate", "1gbit", "burst", "256kb", "latency", "50ms"]
LINK_BITS: Final = 1e9

LINK_BLOB_BYTES: Final = 256 * MiB
READ_BUF: Final = 1 * MiB
OP_READ: Final = 128 * KiB
#: statx(2) flag: ask the file system, do not trust cached attributes (FUSE sends GETATTR).
AT_STATX_FORCE_SYNC: Final = 0x2000
AT_FDCWD: Final = -100
STATX_BASIC_STATS: Final = 0x7FF
RSS_SAMPLE_S: Final = 0.02


# --------------------------------------------------------------------------- small helpers


def stats(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """Median, min and max of ``values``, rounded."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def lat_us(ns: Sequence[int]) -> dict[str, float]:
    """Median and p99 (microseconds) of per-call times in nanoseconds."""
    s = sorted(ns)
    return {
        "median_us": round(s[len(s) // 2] / 1000, 1),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] / 1000, 1),
        "calls": len(s),
    }


def run_cmd(argv: Sequence[str], *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - values[3] - values[4], total


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Cores busy on average between two cpu_jiffies() readings (everyone's work, not only ours)."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total * (os.cpu_count() or 1), 2) if total else 0.0


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU seconds of one thread (``tid == pid``: the daemon's main thread, which
    runs trio's loop: FUSE requests, HTTP, bookkeeping; decoding runs in worker threads)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def nsenter(netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TURBOFS_REGISTRY_")}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{labels}': value}`` (histogram buckets left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "_bucket{" in line:
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


def fetch_figures(metrics: dict[str, float]) -> dict[str, float]:
    """Compressed bytes, chunks and fetches from the registry, per kind, and HTTP requests."""
    out: dict[str, float] = {}
    for kind in ("demand", "readahead", "prefetch"):
        out[f"{kind}_bytes"] = metrics.get(f'turbofs_fetch_bytes_total{{kind="{kind}"}}', 0.0)
        out[f"{kind}_chunks"] = metrics.get(f'turbofs_fetch_chunks_total{{kind="{kind}"}}', 0.0)
        out[f"{kind}_fetches"] = metrics.get(f'turbofs_fetch_seconds_count{{kind="{kind}"}}', 0.0)
        out[f"{kind}_fetch_seconds_sum"] = round(metrics.get(f'turbofs_fetch_seconds_sum{{kind="{kind}"}}', 0.0), 4)
    out["http_requests"] = sum(v for k, v in metrics.items() if k.startswith("turbofs_registry_requests_total"))
    out["disk_hits"] = metrics.get('turbofs_cache_hits_total{tier="disk"}', 0.0)
    return out


# --------------------------------------------------------------------------- synthetic images


class _RandomReader:
    """``size`` seeded pseudo-random bytes, read in pieces (incompressible file content)."""

    def __init__(self, seed: int, size: int) -> None:
        self.rng = random.Random(seed)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"".join(self.rng.randbytes(min(n - i, 64 * MiB)) for i in range(0, n, 64 * MiB))


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_tar_layout(layout: Path, fill: Callable[[tarfile.TarFile], None]) -> dict[str, Any]:
    """An OCI image layout with one uncompressed tar layer written by ``fill``."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    tmp = blobs / "layer.tmp"
    with open(tmp, "wb") as raw:
        writer = DigestingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            fill(tf)
    layer_digest = writer.sha.hexdigest()
    tmp.rename(blobs / layer_digest)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created_by": "bench.mount_bench (tarfile)"}],
    }
    cfg_digest, cfg_size = _put_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": f"sha256:{layer_digest}",
            "size": writer.size,
        }],
    }
    man_digest, man_size = _put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man_digest,
            "size": man_size,
            "annotations": {"org.opencontainers.image.ref.name": TAG},
        }],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return {"layer_bytes": writer.size, "layer_digest": f"sha256:{layer_digest}"}


def _dir_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    ti.mtime = 1_700_000_000
    return ti


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 1_700_000_000
    return ti


def many_files_names(files: int, dirs: int) -> list[tuple[str, list[str]]]:
    """The directories of the many-files image and the files in each: ``pkgAA/modBBB``
    (``dirs`` leaf directories under ``ceil(dirs/100)`` top directories), files spread evenly."""
    per_dir = -(-files // dirs)
    out: list[tuple[str, list[str]]] = []
    left = files
    for d in range(dirs):
        n = min(per_dir, left)
        left -= n
        top, sub = divmod(d, 100)
        out.append((f"srv/pkg{top:03d}/mod{sub:02d}", [f"file{i:03d}.py" for i in range(n)]))
    return out


def fill_many_files(files: int, dirs: int, seed: int) -> Callable[[tarfile.TarFile], None]:
    def fill(tf: tarfile.TarFile) -> None:
        rng = random.Random(seed)
        tf.addfile(_dir_info("srv"))
        seen_tops: set[str] = set()
        for d, names in many_files_names(files, dirs):
            top = d.rsplit("/", 1)[0]
            if top not in seen_tops:
                seen_tops.add(top)
                tf.addfile(_dir_info(top))
            tf.addfile(_dir_info(d))
            for name in names:
                path = f"{d}/{name}"
                size = rng.randint(64, 2048)
                line = f"# {path}: {rng.getrandbits(64):016x}\nvalue = {rng.random()!r}\n".encode()
                data = (line * (size // len(line) + 1))[:size]
                tf.addfile(_file_info(path, size), io.BytesIO(data))

    return fill


def big_file_names(count: int) -> list[str]:
    return [f"data/blob{i:02d}.bin" for i in range(count)]


def fill_big_files(count: int, size: int, seed: int) -> Callable[[tarfile.TarFile], None]:
    def fill(tf: tarfile.TarFile) -> None:
        tf.addfile(_dir_info("data"))
        for i, name in enumerate(big_file_names(count)):
            tf.addfile(_file_info(name, size), _RandomReader(seed + i, size))

    return fill


def fill_tiny(tf: tarfile.TarFile) -> None:
    data = b"hello from a one-file image\n"
    tf.addfile(_file_info("hello.txt", len(data)), io.BytesIO(data))


def images_root() -> Path:
    base = Path(os.environ.get("TURBOFS_CACHE") or Path.home() / ".cache" / "turbofs")
    return base / "bench" / "mount"


def ensure_synthetic(name: str, params: dict[str, Any], fill: Callable[[tarfile.TarFile], None]) -> Path:
    """The turbo layout of synthetic image ``name`` (built unless a stamp with ``params`` is there)."""
    from turbofs.core.image import open_layout_image

    root = images_root()
    out = root / name
    stamp = root / f"{name}.json"
    b = BuildConfig()
    params = {**params, "chunk_size": b.chunk_size, "zstd_level": b.zstd_level,
              "blob_sizes": [b.blob_min, b.blob_avg, b.blob_max]}
    with contextlib.suppress(Exception):
        if json.loads(stamp.read_text())["params"] == params:
            open_layout_image(out, TAG)
            return out
    log(f"building synthetic image {name} {params}")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        t0 = time.monotonic()
        info = write_tar_layout(work / "src", fill)
        t1 = time.monotonic()
        log(f"{name}: tar layer {info['layer_bytes'] / MB:.1f} MB written in {t1 - t0:.1f} s; turbofs build")
        shutil.rmtree(out, ignore_errors=True)
        run_cmd([*TURBOFS, "build", f"oci:{work / 'src'}:{TAG}", "--output", str(out), "--force"])
        t2 = time.monotonic()
        stamp.write_text(json.dumps({
            "params": params, **info, "tar_seconds": round(t1 - t0, 1), "build_seconds": round(t2 - t1, 1),
        }, indent=2) + "\n")
        log(f"{name}: built in {t2 - t1:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def layout_figures(layout: Path) -> dict[str, Any]:
    from turbofs.core.image import open_layout_image

    img = open_layout_image(layout, TAG)
    ix = img.index
    regular = [ix.inode(i) for _p, i in ix.walk() if ix.inode(i).is_reg]
    return {
        "manifest": img.manifest.digest,
        "inodes": ix.n_inodes,
        "regular_files": len(regular),
        "file_bytes": sum(n.size for n in regular),
        "chunks": ix.n_chunks,
        "compressed_bytes": sum(c.clen for c in ix.chunks()),
        "blobs": ix.n_blobs,
        "index_bytes": img.manifest.index.size,
    }


# --------------------------------------------------------------------------- registry


@dataclass
class Registry:
    """``turbofs serve`` as a child process (optionally inside a network namespace)."""

    storage: Path
    config: Path
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port, the one bound once started
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30) -> None:
        argv = [*nsenter(self.netns), *TURBOFS, "--config", str(self.config), "serve",
                "--host", self.host, "--port", str(self.port), "--storage", str(self.storage)]
        if self.netns:
            argv.append("--no-push-auth")  # nothing is pushed there; pulls need no token anyway
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                                         env=clean_env())
        out = self.proc.stdout
        try:
            self.port = listening_port(self.proc, time.monotonic() + timeout, self.log_path)
        except RuntimeError:
            self.stop()
            raise
        threading.Thread(target=self._drain, args=(out,), daemon=True).start()

    @staticmethod
    def _drain(out: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            while out.read(65536):
                pass

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def upload_random_blob(registry: str, repo: str, size: int, seed: int) -> str:
    """Upload ``size`` random bytes as a blob (for measuring a link with a plain GET)."""
    import trio

    from turbofs.core.registry import RegistryClient

    data = _RandomReader(seed, size).read()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def go() -> None:
        async with RegistryClient(registry, scheme="http") as client:
            if not await client.blob_exists(repo, digest):
                await client.upload_blob(repo, digest, data)

    trio.run(go)
    return digest


def curl_blob(url: str, netns: str | None) -> dict[str, float]:
    proc = run_cmd([*nsenter(netns), "curl", "-sS", "--fail", "-o", "/dev/null", "-w",
                    "%{size_download} %{time_total} %{time_starttransfer}", url])
    size, total, first = (float(x) for x in proc.stdout.split())
    return {"bytes": size, "seconds": round(total, 4), "first_byte_s": round(first, 4),
            "mb_per_s": round(size / total / MB, 1)}


def curl_parallel(url: str, netns: str | None, size: int, flows: int) -> dict[str, float]:
    """``flows`` curl processes at once, each a ``Range`` of 1/flows of the blob."""
    part = size // flows
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([*nsenter(netns), "curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}",
                          "-r", f"{i * part}-{(i + 1) * part - 1}", url], stdout=subprocess.PIPE, text=True)
        for i in range(flows)
    ]
    got = 0
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"curl -r of {url} failed ({proc.returncode})")
        got += int(float(out))
    seconds = time.perf_counter() - t0
    if got != part * flows:
        raise RuntimeError(f"curl -r: {got} bytes, expected {part * flows} (no Range support?)")
    return {"flows": flows, "bytes": got, "seconds": round(seconds, 4), "mb_per_s": round(got / seconds / MB, 1)}


# --------------------------------------------------------------------------- mounts


@dataclass
class Mounted:
    mp: Path
    pid: int
    seconds: float  # wall time of the turbofs mount command


class Mounts:
    """Runs ``turbofs mount`` / ``umount`` as a user does; remembers what to clean up."""

    def __init__(self, work: Path, config: Path, extra: Sequence[str] = ()) -> None:
        self.work = work
        self.config = config
        self.extra = list(extra)  # added to every mount (e.g. --mode fuse)
        self.run_dir = work / "run"
        self.active: dict[Path, int] = {}
        self._n = 0

    def new_dir(self, label: str) -> Path:
        self._n += 1
        d = self.work / f"{label}-{self._n}"
        d.mkdir(parents=True)
        return d

    def argv(self, ref: str, mp: Path, cache: Path, extra: Sequence[str], netns: str | None,
             config: Path | None = None) -> list[str]:
        argv = [*nsenter(netns), *TURBOFS, "--config", str(config or self.config), "mount", ref, str(mp),
                "--run-dir", str(self.run_dir), "--cache-dir", str(cache), *self.extra, *extra]
        if netns:
            argv.append("--plain-http")
        return argv

    def mount(self, ref: str, mp: Path, cache: Path, *extra: str, netns: str | None = None,
              config: Path | None = None) -> Mounted:
        argv = self.argv(ref, mp, cache, extra, netns, config)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=clean_env())
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"turbofs mount {ref} failed: {proc.stderr.strip()}")
        m = re.search(r"daemon pid (\d+)", proc.stdout)
        assert m is not None, proc.stdout
        self.active[mp] = int(m[1])
        return Mounted(mp, int(m[1]), seconds)

    def pid_file(self, mp: Path) -> Path:
        from turbofs.mount.ctl import state_dir

        return state_dir(self.run_dir, mp) / "pid"

    def register(self, mp: Path, pid: int) -> None:
        self.active[mp] = pid

    def umount(self, mp: Path) -> None:
        pid = self.active.pop(mp, None)
        proc = run_cmd([*TURBOFS, "umount", str(mp), "--run-dir", str(self.run_dir)], check=False)
        if proc.returncode != 0:
            log(f"umount {mp}: {proc.stderr.strip()}; lazy unmount")
            run_cmd(["fusermount3", "-u", "-z", str(mp)], check=False)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def status(self, mp: Path) -> dict[str, Any]:
        from turbofs.mount.ctl import query

        result: dict[str, Any] = json.loads(query(mp, "status", self.run_dir))
        return result

    def metrics(self, mp: Path) -> dict[str, float]:
        from turbofs.mount.ctl import query

        return parse_metrics(query(mp, "metrics", self.run_dir))

    def cleanup(self) -> None:
        for mp in list(self.active):
            with contextlib.suppress(Exception):
                self.umount(mp)


def read_files(paths: Sequence[Path]) -> tuple[int, float]:
    """Read each file front to back with 1 MiB reads; (bytes, seconds)."""
    buf = bytearray(READ_BUF)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - t0


@dataclass
class RssSampler:
    """Samples a daemon's VmRSS while it runs (its pid from the mount's pid file)."""

    pid_file: Path
    pid: int | None = None
    max_rss_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.pid is None:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    self.pid = int(self.pid_file.read_text().strip())
            if self.pid is not None:
                with contextlib.suppress(OSError, KeyError):
                    self.max_rss_kib = max(self.max_rss_kib, proc_status_kib(self.pid, "VmRSS"))
                    self.samples += 1
            self._stop.wait(RSS_SAMPLE_S)


# --------------------------------------------------------------------------- the network namespaces


def shaped_link() -> NetnsLink:
    """Two network namespaces joined by a veth pair with tbf (``TBF``) on both egresses."""
    return NetnsLink(LINK_NAME, LINK_SUBNET, ["tbf", *TBF])


# --------------------------------------------------------------------------- 1. mount to ready


def import_times(runs: int) -> dict[str, Any]:
    """Interpreter start and the imports each of the two processes of a mount does."""
    cases = {
        "python_start": "pass",
        "cli_imports": "import turbofs.cli, turbofs.core.config",
        "daemon_imports": "import turbofs.cli, turbofs.core.config, turbofs.mount.daemon",
    }
    out: dict[str, Any] = {}
    for name, code in cases.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run_cmd([PYTHON, "-c", code])
            times.append(time.perf_counter() - t0)
        out[name] = stats(times)
    return out


def open_steps(registry: str, repo: str, tag: str, runs: int) -> dict[str, Any]:
    """The daemon's steps before mounting, timed one by one in this process."""
    import trio

    from turbofs.core.image import load_index, parse_manifest
    from turbofs.core.registry import RegistryClient
    from turbofs.node.cache import ChunkCache

    rows: list[dict[str, float]] = []
    erofs_prepare: Callable[[Any], object] | None = None
    with contextlib.suppress(ImportError):
        erofs_prepare = getattr(importlib.import_module("turbofs.erofs"), "prepare_image", None)

    async def once(cache_dir: Path) -> dict[str, float]:
        t: dict[str, float] = {}
        t00 = time.perf_counter()
        async with RegistryClient(registry, scheme="http") as client:
            t0 = time.perf_counter()
            raw, _media, digest = await client.get_manifest(repo, tag)
            manifest = parse_manifest(raw, digest)
            t1 = time.perf_counter()
            await client.get_blob(repo, manifest.config.digest, max_size=8 << 20)
            data = await client.get_blob(repo, manifest.index.digest, max_size=manifest.index.size)
            t2 = time.perf_counter()
            load_index(manifest, data)
            t3 = time.perf_counter()
            ChunkCache.from_config(DaemonConfig(cache_dir=cache_dir))
            t4 = time.perf_counter()
            if erofs_prepare is not None:  # what the erofs presentation adds before mounting
                erofs_prepare(load_index(manifest, data))
                t["erofs_prepare_ms"] = (time.perf_counter() - t4) * 1e3
        t.update(client_create_ms=(t0 - t00) * 1e3, manifest_get_ms=(t1 - t0) * 1e3, config_and_index_get_ms=(t2 - t1) * 1e3,
                 index_decode_ms=(t3 - t2) * 1e3, cache_open_ms=(t4 - t3) * 1e3, index_bytes=len(data),
                 total_ms=(t4 - t00) * 1e3)
        return t

    with tempfile.TemporaryDirectory(prefix="mount-bench-cache-") as tmp:
        for i in range(runs):
            rows.append(trio.run(once, Path(tmp) / f"c{i}"))
    keys = [k for k in rows[0] if k.endswith("_ms")]
    out: dict[str, Any] = {k: stats([r[k] for r in rows], 1) for k in keys}
    out["index_bytes"] = int(rows[0]["index_bytes"])
    out["runs"] = [{k: round(v, 2) for k, v in r.items()} for r in rows]
    return out


def bench_ready(mounts: Mounts, ref: str, runs: int, *, extra: Sequence[str] = (), cold: bool = False,
                netns: str | None = None, probe: str | None = None) -> dict[str, Any]:
    """``turbofs mount`` wall time to a ready mount, ``runs`` times, each with a fresh disk cache."""
    rows = []
    for _ in range(runs):
        mp, cache = mounts.new_dir("mnt"), mounts.new_dir("cache")
        if cold:
            drop_caches()
        m = mounts.mount(ref, mp, cache, *extra, netns=netns)
        row: dict[str, Any] = {"seconds": round(m.seconds, 4),
                               "rss_at_ready_mib": round(proc_status_kib(m.pid, "VmRSS") / 1024, 1)}
        status = mounts.status(mp)
        row["mode"] = status.get("mode", "fuse")
        if "erofs" in status:  # the erofs presentation reports how its metadata was made
            row["erofs"] = status["erofs"]
        if probe:
            t0 = time.perf_counter()
            os.stat(mp / probe)
            row["first_stat_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        mounts.umount(mp)
        shutil.rmtree(cache, ignore_errors=True)
        rows.append(row)
    out: dict[str, Any] = {"seconds": stats([r["seconds"] for r in rows]),
                           "rss_at_ready_mib": stats([r["rss_at_ready_mib"] for r in rows], 1)}
    if probe:
        out["first_stat_ms"] = stats([r["first_stat_ms"] for r in rows], 2)
    out["runs"] = rows
    log(f"  ready: {out['seconds']}")
    return out


# --------------------------------------------------------------------------- 2./3. reads


def bench_cold_read(mounts: Mounts, ref: str, names: Sequence[str], runs: int, *, extra: Sequence[str] = (),
                    netns: str | None = None, registry_pid: int | None = None, drop: bool = True,
                    config: Path | None = None) -> dict[str, Any]:
    """Fresh disk cache, page cache dropped (unless ``drop`` is False: then the registry's
    blob files stay in the page cache), the files read front to back."""
    rows = []
    for _ in range(runs):
        mp, cache = mounts.new_dir("mnt"), mounts.new_dir("cache")
        if drop:
            drop_caches()  # before mounting: with prefetch on, the read starts right after the mount
        m = mounts.mount(ref, mp, cache, *extra, netns=netns, config=config)
        reg0 = cpu_seconds(registry_pid) if registry_pid else 0.0
        d0 = cpu_seconds(m.pid)
        main0 = thread_cpu_seconds(m.pid, m.pid)
        me0 = time.process_time()
        sys0 = cpu_jiffies()
        nbytes, seconds = read_files([mp / n for n in names])
        sys1 = cpu_jiffies()
        me1 = time.process_time()
        main1 = thread_cpu_seconds(m.pid, m.pid)
        d1 = cpu_seconds(m.pid)
        reg1 = cpu_seconds(registry_pid) if registry_pid else 0.0
        figures = fetch_figures(mounts.metrics(mp))
        status = mounts.status(mp)
        fuse = status.get("fuse_requests", {})
        wire = figures["demand_bytes"] + figures["readahead_bytes"] + figures["prefetch_bytes"]
        rows.append({
            "bytes": nbytes, "seconds": round(seconds, 3), "mb_per_s": round(nbytes / seconds / MB, 1),
            "wire_bytes": int(wire), "wire_mb_per_s": round(wire / seconds / MB, 1),
            "daemon_cpu_s": round(d1 - d0, 2), "registry_cpu_s": round(reg1 - reg0, 2) if registry_pid else None,
            "daemon_main_thread_busy": round((main1 - main0) / seconds, 2),
            "reader_cpu_s": round(me1 - me0, 2), "machine_busy_cores": busy_cores(sys0, sys1),
            "fuse_reads": fuse.get("read", 0), "mode": status.get("mode", "fuse"),
            **{k: (round(v, 3) if k.endswith("_sum") else int(v)) for k, v in figures.items()},
        })
        fetches = figures["demand_fetches"] + figures["readahead_fetches"] + figures["prefetch_fetches"]
        fetch_s = (figures["demand_fetch_seconds_sum"] + figures["readahead_fetch_seconds_sum"]
                   + figures["prefetch_fetch_seconds_sum"])
        rows[-1]["mean_fetch_ms"] = round(fetch_s / fetches * 1e3, 2) if fetches else None
        rows[-1]["mean_fetches_in_flight"] = round(fetch_s / seconds, 2)
        mounts.umount(mp)
        shutil.rmtree(cache, ignore_errors=True)
        log(f"  cold read: {rows[-1]['mb_per_s']} MB/s ({seconds:.2f} s, daemon CPU {d1 - d0:.2f} s, "
            f"main thread {rows[-1]['daemon_main_thread_busy']:.0%} busy, "
            f"{rows[-1]['mean_fetches_in_flight']} fetches in flight of {rows[-1]['mean_fetch_ms']} ms, "
            f"machine busy {rows[-1]['machine_busy_cores']} cores)")
    return {
        "mb_per_s": stats([r["mb_per_s"] for r in rows], 1),
        "wire_mb_per_s": stats([r["wire_mb_per_s"] for r in rows], 1),
        "daemon_cpu_s": stats([r["daemon_cpu_s"] for r in rows], 2),
        "daemon_main_thread_busy": stats([r["daemon_main_thread_busy"] for r in rows], 2),
        "mean_fetch_ms": stats([r["mean_fetch_ms"] or 0.0 for r in rows], 2),
        "mean_fetches_in_flight": stats([r["mean_fetches_in_flight"] for r in rows], 2),
        "machine_busy_cores": stats([r["machine_busy_cores"] for r in rows], 2),
        "runs": rows,
    }


def odirect_read_ns(path: Path, offsets: Sequence[int]) -> list[int]:
    """One 128 KiB O_DIRECT pread per offset, each timed (the page cache is bypassed)."""
    buf = mmap.mmap(-1, OP_READ)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = []
    try:
        for off in offsets:
            t0 = time.perf_counter_ns()
            n = os.preadv(fd, [buf], off)
            out.append(time.perf_counter_ns() - t0)
            if n != OP_READ:
                raise RuntimeError(f"{path}: short O_DIRECT read ({n} bytes at {off})")
    finally:
        os.close(fd)
        buf.close()
    return out


def pagecache_read_ns(path: Path, offsets: Sequence[int]) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    out = []
    try:
        for off in offsets:
            t0 = time.perf_counter_ns()
            os.pread(fd, OP_READ, off)
            out.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
    return out


def _timed_read(paths: Sequence[Path], daemon_pid: int) -> dict[str, Any]:
    """Read ``paths`` whole: MB/s, seconds and the daemon's CPU seconds."""
    d0 = cpu_seconds(daemon_pid)
    nbytes, secs = read_files(paths)
    return {"mb_per_s": round(nbytes / secs / MB, 1), "seconds": round(secs, 3),
            "daemon_cpu_s": round(cpu_seconds(daemon_pid) - d0, 2)}


def bench_cached_reads(mounts: Mounts, ref: str, names: Sequence[str], file_size: int, runs: int,
                       registry_pid: int) -> dict[str, Any]:
    """Full prefetch into a disk cache, then reads from the disk tier and the page cache,
    and 128 KiB O_DIRECT read latency from the RAM and disk tiers."""
    cache = mounts.new_dir("cache")
    mp = mounts.new_dir("mnt")
    drop_caches()
    reg0 = cpu_seconds(registry_pid)
    with RssSampler(mounts.pid_file(mp)) as rss:
        m = mounts.mount(ref, mp, cache, "--wait")
    reg1 = cpu_seconds(registry_pid)
    prefetch = mounts.status(mp).get("prefetch", {})
    prefetch_row = {
        "command_seconds": round(m.seconds, 3), "prefetcher": prefetch,
        "daemon_cpu_s": round(cpu_seconds(m.pid), 2), "registry_cpu_s": round(reg1 - reg0, 2),
        "max_rss_mib": round(rss.max_rss_kib / 1024, 1),
        "vm_hwm_mib": round(proc_status_kib(m.pid, "VmHWM") / 1024, 1),
    }
    log(f"  prefetch of the big-file image: {m.seconds:.2f} s, prefetcher "
        f"{prefetch.get('bytes_per_second', 0) / MB:.1f} MB/s")
    mounts.umount(mp)

    paths_rel = list(names)
    chunk = DEFAULT_CHUNK_SIZE
    n_chunks = file_size // chunk
    rng = random.Random(7)
    rows = []
    for run in range(runs):
        row: dict[str, Any] = {}
        # disk tier, cache files cold (page cache dropped)
        mp = mounts.new_dir("mnt")
        m = mounts.mount(ref, mp, cache, "--no-prefetch")
        paths = [mp / n for n in paths_rel]
        drop_caches()
        row["disk_cold"] = _timed_read(paths, m.pid)
        figures = fetch_figures(mounts.metrics(mp))
        row["disk_cold"]["fetched_bytes"] = int(figures["demand_bytes"] + figures["readahead_bytes"])
        # page cache (the same mount, second read)
        row["page_cache"] = _timed_read(paths, m.pid)
        mounts.umount(mp)
        # disk tier, cache files in the page cache (a fresh mount: empty RAM tier, empty FUSE
        # page cache; the cache files are still in the page cache from the first read)
        mp = mounts.new_dir("mnt")
        m = mounts.mount(ref, mp, cache, "--no-prefetch")
        row["disk_warm"] = _timed_read([mp / n for n in paths_rel], m.pid)
        mounts.umount(mp)
        # 128 KiB O_DIRECT reads: disk tier (chunks not in RAM yet), then RAM tier (same chunks)
        mp = mounts.new_dir("mnt")
        m = mounts.mount(ref, mp, cache, "--no-prefetch")
        target = mp / paths_rel[run % len(paths_rel)]
        picks = rng.sample(range(0, n_chunks, 4), min(300, n_chunks // 4))
        offsets = [c * chunk for c in picks]
        try:
            disk_ns = odirect_read_ns(target, offsets)
        except OSError as exc:  # e.g. a mount mode whose file system has no O_DIRECT
            disk_ns = []
            row["op_read_128k_error"] = f"O_DIRECT: {exc}"
        ram_ns = odirect_read_ns(target, offsets) + odirect_read_ns(target, offsets) if disk_ns else []
        pagecache_read_ns(target, offsets)  # fill the page cache for these offsets
        page_ns = pagecache_read_ns(target, offsets)
        status = mounts.status(mp)
        row["mode"] = status.get("mode", "fuse")
        row["op_read_128k"] = {
            "page_cache": lat_us(page_ns),
            "fuse_reads": status.get("fuse_requests", {}).get("read", 0),
            "disk_hits": status.get("cache", {}).get("disk", {}).get("hits"),
        }
        if disk_ns:
            row["op_read_128k"].update(disk_tier=lat_us(disk_ns), ram_tier=lat_us(ram_ns))
        mounts.umount(mp)
        rows.append(row)
        log(f"  disk cold {row['disk_cold']['mb_per_s']} MB/s, page cache {row['page_cache']['mb_per_s']} MB/s, "
            f"disk warm {row['disk_warm']['mb_per_s']} MB/s; 128K reads {row['op_read_128k']}")
    shutil.rmtree(cache, ignore_errors=True)

    def col(kind: str, key: str = "mb_per_s") -> dict[str, float]:
        return stats([r[kind][key] for r in rows], 1)

    def op(tier: str) -> dict[str, float] | None:
        have = [r["op_read_128k"][tier]["median_us"] for r in rows if tier in r["op_read_128k"]]
        return stats(have, 1) if have else None

    return {
        "prefetch_big_image": prefetch_row,
        "disk_cold_mb_per_s": col("disk_cold"),
        "disk_cold_daemon_cpu_s": col("disk_cold", "daemon_cpu_s"),
        "disk_warm_mb_per_s": col("disk_warm"),
        "disk_warm_daemon_cpu_s": col("disk_warm", "daemon_cpu_s"),
        "page_cache_mb_per_s": col("page_cache"),
        "op_read_128k_us": {"ram_tier": op("ram_tier"), "disk_tier": op("disk_tier"), "page_cache": op("page_cache")},
        "runs": rows,
    }


def cpu_components(layout: Path, chunks: int = 64) -> dict[str, Any]:
    """CPU per MB of what the daemon does to each chunk fetched, in this process, one core:
    zstd decompression + sha256 check (``decode_frame``), sha256 alone, and the disk-cache
    write (a temporary file, then a rename). For comparison with the daemon's CPU per MB."""
    from turbofs.core.codec import decode_frame
    from turbofs.core.image import open_layout_image

    img = open_layout_image(layout, TAG)
    ix = img.index
    every = list(ix.chunks())
    picked = every[:: max(1, len(every) // chunks)][:chunks]
    frames = []
    for c in picked:
        with open(img.blob_path(ix.blob(c.blob).oci_digest), "rb") as f:
            f.seek(c.offset)
            frames.append(f.read(c.clen))
    ubytes = sum(c.ulen for c in picked)
    cbytes = sum(c.clen for c in picked)

    def per_mb(fn: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t0)
        return round(best / (ubytes / MB) * 1e3, 3)

    datas = [decode_frame(c, f).data for c, f in zip(picked, frames, strict=True)]
    with tempfile.TemporaryDirectory(prefix="mount-bench-write-", dir=images_root()) as tmp:

        def write_all() -> None:
            for i, d in enumerate(datas):
                path = Path(tmp) / f"{i:04d}"
                tmpf = Path(tmp) / f".{i:04d}.tmp"
                with open(tmpf, "wb") as f:
                    f.write(d)
                tmpf.rename(path)

        return {
            "chunks": len(picked),
            "compression_ratio": round(ubytes / cbytes, 2),
            "note": "ms of one core per MB of uncompressed chunk bytes",
            "decode_frame_ms_per_mb": per_mb(lambda: [decode_frame(c, f) for c, f in zip(picked, frames, strict=True)]),
            "sha256_ms_per_mb": per_mb(lambda: [hashlib.sha256(d).digest() for d in datas]),
            "cache_write_ms_per_mb": per_mb(write_all),
        }


def client_fetch_cost(ref: str, batch: int = 4, parallel: int = 1, netns: str | None = None,
                      decode: bool = False) -> dict[str, Any]:
    """The registry client alone: every chunk of ``ref`` fetched in batches of ``batch``
    adjacent chunks (1 MiB: what a sequential reader's readahead asks for), ``parallel``
    fetches at a time; with ``decode``, each batch is then decompressed and checked in a
    worker thread, as the daemon does (no disk write, no FUSE). Wall time and CPU per MB.
    With ``netns`` it runs as a child process in that network namespace."""
    if netns:
        proc = run_cmd([*nsenter(netns), PYTHON, "-m", "bench.mount_bench", "client-fetch", ref,
                        "--batch", str(batch), "--parallel", str(parallel), *(["--decode"] if decode else [])])
        result: dict[str, Any] = json.loads(proc.stdout)
        return result
    import trio

    from turbofs.core.codec import decode_frame
    from turbofs.node.source import open_image

    def decode_all(picked: Sequence[Any], frames: Sequence[bytes]) -> None:
        for c, frame in zip(picked, frames, strict=True):
            decode_frame(c, frame)

    async def go() -> tuple[int, float, float, int]:
        opened = await open_image(ref, scheme="http")
        try:
            chunks = sorted(opened.index.chunks(), key=lambda c: (c.blob, c.offset))
            batches = iter(range(0, len(chunks), batch))
            total = 0

            async def worker() -> None:
                nonlocal total
                for i in batches:
                    picked = chunks[i : i + batch]
                    frames = await opened.source.fetch(picked)
                    if decode:
                        await trio.to_thread.run_sync(decode_all, picked, frames)
                    total += sum(len(f) for f in frames)

            t0, c0 = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as nursery:
                for _ in range(parallel):
                    nursery.start_soon(worker)
            return total, time.perf_counter() - t0, time.process_time() - c0, len(chunks)
        finally:
            await opened.source.aclose()

    total, wall, cpu, n = trio.run(go)
    return {"chunks": n, "batch_chunks": batch, "parallel": parallel, "decode": decode, "bytes": total,
            "mb_per_s": round(total / wall / MB, 1), "cpu_ms_per_mb": round(cpu / (total / MB) * 1e3, 3)}


# --------------------------------------------------------------------------- 4. metadata latency


class _Statx:
    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.buf = ctypes.create_string_buffer(256)  # sizeof(struct statx)

    def __call__(self, path: bytes) -> None:
        if self.libc.statx(AT_FDCWD, path, AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, self.buf) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)


def _timed(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def _missing(path: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.stat(path)


def bench_metadata(mounts: Mounts, ref: str, files: int, dirs: int, passes: int) -> dict[str, Any]:
    """Lookup, getattr, readdir latency through FUSE on the many-files image."""
    mp, cache = mounts.new_dir("mnt"), mounts.new_dir("cache")
    mounts.mount(ref, mp, cache, "--no-prefetch")
    mode = mounts.status(mp).get("mode", "fuse")
    tree = many_files_names(files, dirs)
    statx = _Statx()
    per_pass = max(1, min(250, len(tree) // (2 * passes)))
    rows = []
    for p in range(passes):
        stat_dirs = tree[p * per_pass : (p + 1) * per_pass]
        list_dirs = tree[(passes + p) * per_pass : (passes + p + 1) * per_pass]
        paths = [os.fsencode(mp / d / n) for d, names in stat_dirs for n in names]
        for d, _ in stat_dirs + list_dirs:  # directories known, their entries not
            os.stat(mp / d)
        c0 = dict(mounts.status(mp).get("fuse_requests", {}))
        lookup = [_timed(lambda q=q: os.stat(q)) for q in paths]  # type: ignore[misc]
        c1 = dict(mounts.status(mp).get("fuse_requests", {}))
        again = [_timed(lambda q=q: os.stat(q)) for q in paths]  # type: ignore[misc]
        c2 = dict(mounts.status(mp).get("fuse_requests", {}))
        forced = [_timed(lambda q=q: statx(q)) for q in paths]  # type: ignore[misc]
        c3 = dict(mounts.status(mp).get("fuse_requests", {}))
        missing = [_timed(lambda q=q: _missing(q + b".missing")) for q in paths[:2000]]  # type: ignore[misc]
        c4 = dict(mounts.status(mp).get("fuse_requests", {}))
        listing = [os.fsencode(mp / d) for d, _ in list_dirs]
        readdir = [_timed(lambda q=q: os.listdir(q)) for q in listing]  # type: ignore[misc]
        c5 = dict(mounts.status(mp).get("fuse_requests", {}))
        relist = [_timed(lambda q=q: os.listdir(q)) for q in listing]  # type: ignore[misc]

        def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}

        row: dict[str, dict[str, Any]] = {
            "lookup": {**lat_us(lookup), "fuse_requests": delta(c0, c1)},
            "stat_again_kernel_cached": {**lat_us(again), "fuse_requests": delta(c1, c2)},
            "getattr_forced": {**lat_us(forced), "fuse_requests": delta(c2, c3)},
            "lookup_missing": {**lat_us(missing), "fuse_requests": delta(c3, c4)},
            "readdir_20": {**lat_us(readdir), "fuse_requests": delta(c4, c5)},
            "readdir_20_again": dict(lat_us(relist)),
        }
        rows.append(row)
        log(f"  pass {p + 1}: lookup {rows[-1]['lookup']['median_us']} us, stat again "
            f"{rows[-1]['stat_again_kernel_cached']['median_us']} us, getattr {rows[-1]['getattr_forced']['median_us']} us, "
            f"missing {rows[-1]['lookup_missing']['median_us']} us, listdir {rows[-1]['readdir_20']['median_us']} us")
    mounts.umount(mp)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "mode": mode,
        "median_of_pass_medians_us": {
            k: stats([r[k]["median_us"] for r in rows], 1) for k in rows[0]
        },
        "passes": rows,
    }


# --------------------------------------------------------------------------- 5. full prefetch


def bench_prefetch(mounts: Mounts, ref: str, compressed: int, runs: int, *, netns: str | None = None,
                   registry_pid: int | None = None) -> dict[str, Any]:
    rows = []
    for _ in range(runs):
        mp, cache = mounts.new_dir("mnt"), mounts.new_dir("cache")
        drop_caches()
        reg0 = cpu_seconds(registry_pid) if registry_pid else 0.0
        sys0 = cpu_jiffies()
        with RssSampler(mounts.pid_file(mp)) as rss:
            m = mounts.mount(ref, mp, cache, "--wait", netns=netns)
            hwm = proc_status_kib(m.pid, "VmHWM")
            rss_after = proc_status_kib(m.pid, "VmRSS")
            main_cpu = thread_cpu_seconds(m.pid, m.pid)
        sys1 = cpu_jiffies()
        reg1 = cpu_seconds(registry_pid) if registry_pid else 0.0
        time.sleep(1.0)
        rss_idle = proc_status_kib(m.pid, "VmRSS")
        status = mounts.status(mp)
        pf = status.get("prefetch", {})
        figures = fetch_figures(mounts.metrics(mp))
        rows.append({
            "command_seconds": round(m.seconds, 3),
            "command_mb_per_s": round(compressed / m.seconds / MB, 1),
            "prefetcher_seconds": pf.get("elapsed"),
            "prefetcher_mb_per_s": round(pf.get("bytes_per_second", 0) / MB, 1),
            "prefetch_state": pf.get("state"),
            "bytes_fetched": pf.get("bytes_fetched"),
            "chunks_fetched": pf.get("chunks_fetched"),
            "fetches": int(figures["prefetch_fetches"]),
            "http_requests": int(figures["http_requests"]),
            "errors": pf.get("errors"),
            "vm_hwm_mib": round(hwm / 1024, 1),
            "max_rss_sampled_mib": round(rss.max_rss_kib / 1024, 1),
            "rss_samples": rss.samples,
            "rss_after_mib": round(rss_after / 1024, 1),
            "rss_after_1s_mib": round(rss_idle / 1024, 1),
            "daemon_cpu_s": round(cpu_seconds(m.pid), 2),
            "daemon_main_thread_cpu_s": round(main_cpu, 2),
            "registry_cpu_s": round(reg1 - reg0, 2) if registry_pid else None,
            "machine_busy_cores": busy_cores(sys0, sys1),
            "disk_cache": status.get("cache", {}),
        })
        mounts.umount(mp)
        shutil.rmtree(cache, ignore_errors=True)
        r = rows[-1]
        log(f"  prefetch: {r['command_seconds']} s ({r['command_mb_per_s']} MB/s; prefetcher "
            f"{r['prefetcher_mb_per_s']} MB/s), VmHWM {r['vm_hwm_mib']} MiB, after {r['rss_after_mib']} MiB, "
            f"daemon CPU {r['daemon_cpu_s']} s (main thread {r['daemon_main_thread_cpu_s']} s)")
    return {
        "command_seconds": stats([r["command_seconds"] for r in rows]),
        "command_mb_per_s": stats([r["command_mb_per_s"] for r in rows], 1),
        "prefetcher_mb_per_s": stats([r["prefetcher_mb_per_s"] for r in rows], 1),
        "vm_hwm_mib": stats([r["vm_hwm_mib"] for r in rows], 1),
        "rss_after_mib": stats([r["rss_after_mib"] for r in rows], 1),
        "daemon_cpu_s": stats([r["daemon_cpu_s"] for r in rows], 2),
        "daemon_main_thread_cpu_s": stats([r["daemon_main_thread_cpu_s"] for r in rows], 2),
        "machine_busy_cores": stats([r["machine_busy_cores"] for r in rows], 2),
        "runs": rows,
    }


# --------------------------------------------------------------------------- main


def push(layout: Path, registry: str, repo: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = run_cmd([*TURBOFS, "push", f"oci:{layout}:{TAG}", f"{registry}/{repo}"])
    return {"seconds": round(time.perf_counter() - t0, 2), "summary": proc.stdout.strip().splitlines()[-1:]}


def tool_versions() -> dict[str, str]:
    out = {}
    for name, argv in {"curl": ["curl", "--version"], "iproute2": ["ip", "-V"],
                       "fuse": ["fusermount3", "--version"]}.items():
        with contextlib.suppress(OSError):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[name] = (proc.stdout or proc.stderr).strip().splitlines()[0]
    with contextlib.suppress(ImportError):
        import pyfuse3

        out["pyfuse3"] = str(getattr(pyfuse3, "__version__", "?"))
    return out


@contextlib.contextmanager
def workspace(mount_extra: Sequence[str] = ()) -> Iterator[tuple[Path, Mounts, list[Registry], NetnsLink]]:
    work = Path(tempfile.mkdtemp(prefix="turbofs-mount-bench-"))
    config = work / "empty.toml"
    config.write_text("# defaults only\n")
    mounts = Mounts(work, config, mount_extra)
    registries: list[Registry] = []
    link = shaped_link()
    try:
        yield work, mounts, registries, link
    finally:
        mounts.cleanup()
        for reg in registries:
            reg.stop()
        link.teardown()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = args.runs
    big_size = args.big_mib * MiB
    t_start = time.monotonic()
    log("images")
    files_layout = ensure_synthetic("files100k", {"files": args.files, "dirs": args.dirs, "seed": 1},
                                    fill_many_files(args.files, args.dirs, 1))
    big_layout = ensure_synthetic("bigfiles", {"count": args.big_files, "size": big_size, "seed": 100},
                                  fill_big_files(args.big_files, big_size, 100))
    tiny_layout = ensure_synthetic("tiny", {"files": 1}, fill_tiny)
    py_layout = ensure_variant("python-1g", DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL) if args.python_1g else None
    big_names = big_file_names(args.big_files)
    results: dict[str, Any] = {
        "benchmark": "mount",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "code": code_state(),
        "tree": str(Path(__file__).resolve().parent.parent),
        "tools": tool_versions(),
        "parameters": {"runs": runs, "mode_flag": args.mode, "files": args.files, "dirs": args.dirs, "big_files": args.big_files,
                       "big_file_bytes": big_size, "daemon_defaults": {
                           k: str(v) for k, v in vars(DaemonConfig()).items()}},
        "images": {"files100k": layout_figures(files_layout), "bigfiles": layout_figures(big_layout),
                   "tiny": layout_figures(tiny_layout)},
    }
    if py_layout is not None:
        results["images"]["python-1g"] = layout_figures(py_layout)

    with workspace(["--mode", args.mode] if args.mode else []) as (work, mounts, registries, link):
        storage = work / "storage"
        loop = Registry(storage, mounts.config, work / "registry-loopback.log")
        registries.append(loop)
        loop.start()
        reg = loop.host_port
        log(f"registry on {reg}; pushing")
        pushes = {
            "files100k": push(files_layout, reg, "bench/files100k:v1"),
            "bigfiles": push(big_layout, reg, "bench/bigfiles:v1"),
            "tiny": push(tiny_layout, reg, "bench/tiny:v1"),
        }
        if py_layout is not None:
            pushes["python-1g"] = push(py_layout, reg, "bench/python-1g:v1")
        link_digest = upload_random_blob(reg, "bench/link", LINK_BLOB_BYTES, 5)
        results["pushes"] = pushes
        lo: dict[str, Any] = {}
        results["loopback"] = lo

        log("link check on loopback: curl of a 256 MiB blob (page cache warm)")
        lo["curl_blob"] = [curl_blob(f"http://{reg}/v2/bench/link/blobs/{link_digest}", None) for _ in range(runs)]
        lo["curl_blob_mb_per_s"] = stats([r["mb_per_s"] for r in lo["curl_blob"]], 1)

        log("1. mount to ready")
        ready: dict[str, Any] = {}
        lo["ready"] = ready
        probe = f"{many_files_names(args.files, args.dirs)[0][0]}/file000.py"
        log(" tiny image, defaults")
        ready["tiny_defaults"] = bench_ready(mounts, f"{reg}/bench/tiny:v1", runs, probe="hello.txt")
        log(" files100k, defaults (prefetch on)")
        ready["files100k_defaults"] = bench_ready(mounts, f"{reg}/bench/files100k:v1", runs, probe=probe)
        log(" files100k, --no-prefetch")
        ready["files100k_no_prefetch"] = bench_ready(mounts, f"{reg}/bench/files100k:v1", runs,
                                                     extra=["--no-prefetch"], probe=probe)
        log(" files100k, defaults, page cache dropped before each mount")
        ready["files100k_cold_page_cache"] = bench_ready(mounts, f"{reg}/bench/files100k:v1", runs, cold=True,
                                                         probe=probe)
        log(" where the time goes: interpreter and imports, daemon steps in-process")
        if py_layout is not None:
            log(" python-1g, --no-prefetch (a real image; daemon RSS at ready)")
            ready["python_1g_no_prefetch"] = bench_ready(mounts, f"{reg}/bench/python-1g:v1", runs,
                                                         extra=["--no-prefetch"], probe="app/app.py")
        ready["imports_s"] = import_times(max(runs, 5))
        ready["open_steps_files100k"] = open_steps(reg, "bench/files100k", "v1", max(runs, 5))
        ready["open_steps_tiny"] = open_steps(reg, "bench/tiny", "v1", max(runs, 5))

        log("4. metadata latency (files100k, --no-prefetch)")
        lo["metadata"] = bench_metadata(mounts, f"{reg}/bench/files100k:v1", args.files, args.dirs, runs)

        log("2. cold sequential read of the big files, loopback, --no-prefetch")
        lo["cold_read_no_prefetch"] = bench_cold_read(mounts, f"{reg}/bench/bigfiles:v1", big_names, runs,
                                                      extra=["--no-prefetch"], registry_pid=loop.pid)
        log("2. cold sequential read of the big files, loopback, defaults (prefetch on)")
        lo["cold_read_defaults"] = bench_cold_read(mounts, f"{reg}/bench/bigfiles:v1", big_names, runs,
                                                   registry_pid=loop.pid)
        log("3. disk cache and page cache reads; 128 KiB read latency")
        lo["cached_reads"] = bench_cached_reads(mounts, f"{reg}/bench/bigfiles:v1", big_names, big_size, runs,
                                                loop.pid)
        lo["cpu_components_bigfiles"] = cpu_components(big_layout)
        log(f"  CPU per MB in one thread: {lo['cpu_components_bigfiles']}")
        lo["client_fetch_bigfiles"] = client_fetch_cost(f"{reg}/bench/bigfiles:v1")
        log(f"  registry client alone: {lo['client_fetch_bigfiles']}")
        if py_layout is not None:
            lo["cpu_components_python_1g"] = cpu_components(py_layout, 256)
            log(f"  python-1g CPU per MB in one thread: {lo['cpu_components_python_1g']}")
        if py_layout is not None:
            log("5. full prefetch of python-1g, loopback")
            lo["prefetch_python_1g"] = bench_prefetch(
                mounts, f"{reg}/bench/python-1g:v1", results["images"]["python-1g"]["compressed_bytes"], runs,
                registry_pid=loop.pid)
        loop.stop()

        if args.shaped:
            log("shaped link: network namespaces")
            sh: dict[str, Any] = {"setup": link.setup()}
            results["shaped_1gbit"] = sh
            nsreg = Registry(storage, mounts.config, work / "registry-netns.log", host=ADDR_REG, port=NS_PORT,
                             netns=NS_REG)
            registries.append(nsreg)
            nsreg.start()
            rreg = nsreg.host_port
            url = f"http://{rreg}/v2/bench/link/blobs/{link_digest}"
            curl_blob(url, NS_NODE)  # warm the registry's page cache
            sh["curl_blob"] = [curl_blob(url, NS_NODE) for _ in range(runs)]
            sh["curl_blob_mb_per_s"] = stats([r["mb_per_s"] for r in sh["curl_blob"]], 1)
            sh["curl_blob_4_flows"] = [curl_parallel(url, NS_NODE, LINK_BLOB_BYTES, 4) for _ in range(runs)]
            sh["curl_blob_4_flows_mb_per_s"] = stats([r["mb_per_s"] for r in sh["curl_blob_4_flows"]], 1)
            link_mb = sh["curl_blob_mb_per_s"]["median"]
            log(f" link: curl {link_mb} MB/s, 4 flows {sh['curl_blob_4_flows_mb_per_s']['median']} MB/s "
                f"(tbf rate {LINK_BITS / 8 / MB:.0f} MB/s)")
            sh["client_fetch_bigfiles"] = []
            for parallel, decode in ((1, False), (2, False), (4, False), (2, True)):
                sh["client_fetch_bigfiles"].append(
                    client_fetch_cost(f"{rreg}/bench/bigfiles:v1", 4, parallel, NS_NODE, decode))
                log(f" registry client alone, 1 MiB fetches, {parallel} at a time, decode {decode}: "
                    f"{sh['client_fetch_bigfiles'][-1]}")
            log(" 1. mount to ready through the link")
            sh["ready_files100k_defaults"] = bench_ready(mounts, f"{rreg}/bench/files100k:v1", runs,
                                                         netns=NS_NODE, probe=probe)
            log(" 2. cold sequential read through the link, --no-prefetch")
            sh["cold_read_no_prefetch"] = bench_cold_read(mounts, f"{rreg}/bench/bigfiles:v1", big_names, runs,
                                                          extra=["--no-prefetch"], netns=NS_NODE,
                                                          registry_pid=nsreg.pid)
            log(" 2. cold sequential read through the link, defaults (prefetch on)")
            sh["cold_read_defaults"] = bench_cold_read(mounts, f"{rreg}/bench/bigfiles:v1", big_names, runs,
                                                       netns=NS_NODE, registry_pid=nsreg.pid)
            log(" 2. the same, registry's blob files left in the page cache (no drop)")
            sh["cold_read_no_prefetch_registry_warm"] = bench_cold_read(
                mounts, f"{rreg}/bench/bigfiles:v1", big_names, runs, extra=["--no-prefetch"], netns=NS_NODE,
                registry_pid=nsreg.pid, drop=False)
            deeper = work / "readahead16.toml"
            deeper.write_text("[daemon]\nreadahead_chunks = 16\n")
            log(" 2. the same, page cache dropped, [daemon] readahead_chunks = 16 (default 4)")
            sh["cold_read_no_prefetch_readahead16"] = bench_cold_read(
                mounts, f"{rreg}/bench/bigfiles:v1", big_names, runs, extra=["--no-prefetch"], netns=NS_NODE,
                registry_pid=nsreg.pid, config=deeper)
            for key in ("cold_read_no_prefetch", "cold_read_defaults", "cold_read_no_prefetch_registry_warm",
                        "cold_read_no_prefetch_readahead16"):
                med = sh[key]["wire_mb_per_s"]["median"]
                sh[key]["share_of_curl"] = round(med / link_mb, 3)
                sh[key]["share_of_tbf_rate"] = round(med * MB / (LINK_BITS / 8), 3)
            if py_layout is not None:
                log(" 5. full prefetch of python-1g through the link")
                sh["prefetch_python_1g"] = bench_prefetch(
                    mounts, f"{rreg}/bench/python-1g:v1", results["images"]["python-1g"]["compressed_bytes"], runs,
                    netns=NS_NODE, registry_pid=nsreg.pid)
                med = sh["prefetch_python_1g"]["prefetcher_mb_per_s"]["median"]
                sh["prefetch_python_1g"]["share_of_curl"] = round(med / link_mb, 3)
            nsreg.stop()
    results["total_seconds"] = round(time.monotonic() - t_start, 1)
    return results


def bench_memory(ref: str, extra: Sequence[str], *, read: bool = True) -> dict[str, Any]:
    """Daemon memory through a full prefetch of ``ref`` (a registry reference or a local
    turbo layout) while ``tar`` reads the whole image (``read``): RSS sampled every 100 ms,
    the kernel's peak (VmHWM) and what is left 2 s after the end. Fresh cache and state."""
    base = Path(tempfile.mkdtemp(prefix="tfs-membench-", dir="/tmp"))
    mp, run_dir, cache = base / "mnt", base / "run", base / "cache"
    mp.mkdir()
    cli = [sys.executable, "-m", "turbofs.cli"]
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def status() -> dict[str, Any]:
        out: dict[str, Any] = json.loads(run_cmd([*cli, "status", str(mp), "--run-dir", str(run_dir)]).stdout)
        return out

    try:
        t0 = time.monotonic()
        run_cmd([*cli, "mount", ref, str(mp), "--run-dir", str(run_dir), "--cache-dir", str(cache), *extra])
        pid = int(status()["pid"])

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    samples.append((time.monotonic() - t0, proc_status_kib(pid, "VmRSS")))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        reader = subprocess.Popen("tar cf - . | cat > /dev/null", shell=True, cwd=mp) if read else None
        while status().get("prefetch", {}).get("state") not in ("done", "stopped", "disabled", None):
            time.sleep(0.5)
        prefetch_s = time.monotonic() - t0
        if reader is not None:
            reader.wait()
        read_s = time.monotonic() - t0
        time.sleep(2)
        stop.set()
        sampler.join()
        st = status()
        return {
            "ref": ref, "options": list(extra), "mode": st["mode"], "read_while_prefetching": read,
            "prefetch_s": round(prefetch_s, 1), "read_s": round(read_s, 1),
            "prefetch_bytes": st["prefetch"]["bytes_done"], "ram_cache_bytes": st["cache"]["ram_bytes"],
            "peak_rss_mib": round(proc_status_kib(pid, "VmHWM") / 1024, 1),
            "rss_after_mib": round(proc_status_kib(pid, "VmRSS") / 1024, 1),
            "rss_mib_over_time": [(round(t, 1), round(k / 1024)) for t, k in samples[:: max(1, len(samples) // 30)]],
        }
    finally:
        stop.set()
        run_cmd([*cli, "umount", str(mp), "--run-dir", str(run_dir)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["memory"]:  # daemon RSS through a full prefetch (bench/README.md, Mount, 5)
        sub = argparse.ArgumentParser(prog="python -m bench.mount_bench memory")
        sub.add_argument("ref", help="registry reference or local turbo layout")
        sub.add_argument("--no-read", dest="read", action="store_false", help="prefetch only, no reader")
        a, extra = sub.parse_known_args(argv[1:])
        print(json.dumps(bench_memory(a.ref, extra, read=a.read), indent=1))
        return 0
    if argv[:1] == ["client-fetch"]:  # internal: client_fetch_cost inside a network namespace
        sub = argparse.ArgumentParser(prog="python -m bench.mount_bench client-fetch")
        sub.add_argument("ref")
        sub.add_argument("--batch", type=int, default=4)
        sub.add_argument("--parallel", type=int, default=1)
        sub.add_argument("--decode", action="store_true")
        a = sub.parse_args(argv[1:])
        print(json.dumps(client_fetch_cost(a.ref, a.batch, a.parallel, decode=a.decode)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.mount_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--files", type=int, default=100_000, help="files of the many-files image")
    p.add_argument("--dirs", type=int, default=5_000, help="directories of the many-files image")
    p.add_argument("--big-files", type=int, default=3, help="files of the big-file image")
    p.add_argument("--big-mib", type=int, default=200, help="MiB per file of the big-file image")
    p.add_argument("--no-shaped", dest="shaped", action="store_false", help="skip the 1 Gbit/s link")
    p.add_argument("--no-python-1g", dest="python_1g", action="store_false", help="skip the python-1g prefetch")
    p.add_argument("--mode", help="pass --mode MODE to every turbofs mount (default: the mount's own default)")
    p.add_argument("--output", type=Path, default=RESULTS_FILE)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("mount_bench: needs root (FUSE mounts, drop_caches, network namespaces)", file=sys.stderr)
        return 1
    results = run(args)
    write_results(args.output, results)
    log(f"results in {args.output} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
