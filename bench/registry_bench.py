"""Registry benchmark: the turbofs registry against CNCF distribution, side by side.

Both registries run on loopback at the same time, each with its own storage folder and free
port: ``turbofs serve`` and Debian's ``docker-registry serve CONFIG.yml`` (distribution
2.8). Both get the same content:

* the turbo image of ``python-1g`` (256 KiB chunks, zstd 3; the build that
  :func:`bench.build_bench.ensure_variant` keeps, built if missing), pushed with
  ``skopeo copy --preserve-digests`` to ``bench/img:v1``;
* one blob of 512 MiB of random bytes, uploaded through the API (POST, then one PUT).

Every blob file of both storage folders is read once before the load, so both registries
serve from the page cache. The load comes from one client for both: ``wrk`` (Debian's
package), driven by a Lua script that replays a list of requests (method, path, Range
header, body) written by this module; 1 thread for one connection, 2 threads otherwise.
Cases, each with 1, 8 and 32 connections (``--conns``):

* ``range_16m``: GETs of 16 MiB ranges of the 512 MiB blob (32 aligned ranges in a fixed
  shuffled order);
* ``whole_blob``: GETs of whole chunk blobs of the turbo image (all of them, 1.6-14.7 MB,
  median 3.5 MB; what skopeo or a node prefetching whole blobs asks for);
* ``chunk_range``: one Range GET per compressed chunk, the real (blob, offset, length)
  of the image's chunks from its index, in a fixed shuffled order;
* ``chunk_batch`` (turbofs only): the same chunks, 64 per ``POST
  /v2/<name>/_turbofs/batch``.

Each case runs ``--runs`` times (default 3) for ``--duration`` seconds (default 5), the
two registries alternating. Reported per run: MB/s (bytes wrk read, headers included, over
wrk's duration), requests/s, latency percentiles, errors; CPU seconds of the server
process and of wrk per GB moved; and the server's memory: VmRSS sampled every 50 ms
from ``/proc/PID/status`` (peak and median during the run, and 0.5 s after it), and
VmHWM, the kernel's own peak, reset before each run (``echo 5 > /proc/PID/clear_refs``).
Medians, min and max per case and the ratio turbofs / distribution go into the summary.

Finally, with ``strace -c -f`` attached to each server in turn for a short 16 MiB range load,
the system calls that moved the bytes (``sendfile`` or ``write``...) are counted: the check
that the turbofs registry sends with zero copy.

Command line::

    python -m bench.registry_bench [--runs 3] [--duration 5] [--conns 1,8,32] [--keep]

Results go to ``bench/results/registry.json``; progress goes to stderr. Needs ``wrk``,
``skopeo`` and ``docker-registry`` (``apt-get install wrk skopeo docker-registry``), and
root for the VmHWM reset (without it, only the sampled peak is reported).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urljoin

import httpx

from bench.build_bench import (
    REPO_ROOT,
    RESULTS_DIR,
    ensure_variant,
    log,
    median_min_max,
    new_results,
    save_results,
)
from tests.process_fixtures import first_line
from tests.registry_fixtures import distribution_config
from turbofs.core.config import DEFAULT_CHUNK_SIZE, MiB
from turbofs.core.image import LayoutImage, open_layout_image

HOST: Final = "127.0.0.1"
REPO: Final = "bench/img"
TAG: Final = "v1"
IMAGE: Final = "python-1g"
LEVEL: Final = 3
BIG_BLOB_SIZE: Final = 512 * MiB
RANGE_SIZE: Final = 16 * MiB
BATCH_RANGES: Final = 64
SAMPLE_INTERVAL: Final = 0.05
START_TIMEOUT: Final = 30.0
SETTLE_SECONDS: Final = 0.5
#: system calls counted by the zero-copy check
IO_SYSCALLS: Final = ("sendfile", "write", "writev", "sendmsg", "sendto", "splice",
                      "copy_file_range", "read", "pread64", "readv", "mmap")

_T_START = time.monotonic()
_LISTENING_RE: Final = re.compile(r"listening on http://(\[[^\]]+\]|[^:\s]+):(\d+)")


def tool_versions() -> dict[str, str]:
    """Versions of the programs involved (first line of their version output)."""
    out: dict[str, str] = {}
    for name, argv in (
        ("wrk", ["wrk", "--version"]),
        ("docker-registry", ["docker-registry", "--version"]),
        ("skopeo", ["skopeo", "--version"]),
    ):
        with contextlib.suppress(OSError):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            text = (proc.stdout or proc.stderr).strip().splitlines()
            out[name] = text[0] if text else ""
    with contextlib.suppress(ImportError):
        import aiohttp

        out["aiohttp"] = aiohttp.__version__
    return out


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise SystemExit(f"missing programs: {', '.join(missing)} (apt-get install {' '.join(missing)})")


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stats(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    return {k: round(v, digits) for k, v in median_min_max(values).items()}


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A registry process started by this benchmark (stopped only through ``stop``)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    storage: Path
    log_path: Path
    _log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def _status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise RuntimeError(f"{self.name}: no {key} in /proc/{self.pid}/status")

    def rss_kb(self) -> int:
        return self._status_kb("VmRSS:")

    def hwm_kb(self) -> int:
        return self._status_kb("VmHWM:")

    def reset_hwm(self) -> bool:
        """Reset the kernel's peak RSS (VmHWM) to the current RSS; False if not permitted."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (all threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # after "pid (comm)": state is fields[0], utime fields[11], stime fields[12]
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def blob_files(self) -> dict[str, Path]:
        """digest -> file of every blob in the storage folder."""
        out: dict[str, Path] = {}
        if self.name == "turbofs":
            for p in (self.storage / "blobs" / "sha256").glob("*"):
                out[f"sha256:{p.name}"] = p
        else:
            for p in (self.storage / "docker/registry/v2/blobs/sha256").glob("*/*/data"):
                out[f"sha256:{p.parent.name}"] = p
        return out

    def blob_sizes(self) -> dict[str, int]:
        return {d: p.stat().st_size for d, p in self.blob_files().items()}

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _await_http(server: Server, deadline: float) -> None:
    while True:
        if not server.running():
            raise RuntimeError(f"{server.name} exited while starting:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v2/", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{server.name} did not answer on {server.url}:\n{server.log_tail()}")
        time.sleep(0.05)


def listening_port(proc: subprocess.Popen[bytes], deadline: float, log_path: Path) -> int:
    """The port in the first line ``turbofs serve`` prints ("... listening on http://HOST:PORT");
    RuntimeError if it exits, prints something else, or prints nothing by ``deadline``."""
    line = first_line(proc, deadline, "turbofs serve", log_path)
    m = _LISTENING_RE.search(line)
    if m is None:
        raise RuntimeError(f"unexpected first line from turbofs serve: {line!r}")
    return int(m[2])


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TURBOFS_REGISTRY_")}


def start_turbofs(workdir: Path, settings: dict[str, Any] | None = None) -> Server:
    """``turbofs serve`` on a free loopback port, own storage and own (empty) configuration."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    config = workdir / "turbofs.toml"
    lines = ["[registry]", *(f"{k} = {json.dumps(v)}" for k, v in (settings or {}).items())]
    config.write_text("\n".join(lines) + "\n")
    log_path = workdir / "turbofs.log"
    log_file = open(log_path, "ab")
    argv = [sys.executable, "-m", "turbofs.cli", "--config", str(config), "serve",
            "--host", HOST, "--port", "0", "--storage", str(storage)]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_clean_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=log_file)
    server = Server("turbofs", proc, 0, storage, log_path, log_file)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        server.port = listening_port(proc, deadline, log_path)
    except RuntimeError:
        server.stop()
        raise
    _await_http(server, deadline)
    return server



def start_distribution(workdir: Path) -> Server:
    """Debian's ``docker-registry serve CONFIG.yml`` (filesystem storage, no access log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(distribution_config(storage, f"{HOST}:{port}", secret="turbofs-bench"))
    log_path = workdir / "distribution.log"
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], cwd=workdir,
                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    server = Server("distribution", proc, port, storage, log_path, log_file)
    _await_http(server, time.monotonic() + START_TIMEOUT)
    return server


@contextlib.contextmanager
def servers_running(starters: Sequence[Callable[[], Server]]) -> Iterator[list[Server]]:
    """Start servers; stop every one that was started, whatever happens."""
    started: list[Server] = []
    try:
        for start in starters:
            started.append(start())
        yield started
    finally:
        for s in started:
            s.stop()


# --------------------------------------------------------------------------- content


def skopeo_copy(src: str, dest: str, *extra: str) -> float:
    """``skopeo copy`` to a plain-HTTP registry; return the seconds it took."""
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", *extra, src, dest]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return time.monotonic() - t0


def random_blob(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 8 * MiB))
            h.update(piece)
            f.write(piece)
            left -= len(piece)
    return f"sha256:{h.hexdigest()}"


def upload_blob(server: Server, repo: str, path: Path, digest: str) -> float:
    """Upload a file as one blob (POST a session, one streaming PUT); return the seconds."""
    size = path.stat().st_size

    def body() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while piece := f.read(MiB):
                yield piece

    t0 = time.monotonic()
    with httpx.Client(timeout=300) as client:
        resp = client.post(f"{server.url}/v2/{repo}/blobs/uploads/")
        if resp.status_code != 202:
            raise RuntimeError(f"{server.name}: upload session refused: {resp.status_code} {resp.text}")
        location = urljoin(server.url + "/", resp.headers["Location"])
        url = f"{location}{'&' if '?' in location else '?'}digest={digest}"
        resp = client.put(url, content=body(), headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if resp.status_code != 201:
            raise RuntimeError(f"{server.name}: upload failed: {resp.status_code} {resp.text}")
    return time.monotonic() - t0


def read_files(paths: Sequence[Path]) -> int:
    """Read every file once (page cache warm-up); return the bytes read."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(8 * MiB):
                total += len(block)
    return total


# --------------------------------------------------------------------------- wrk

# Replays requests from a file written by this module, one per line:
#   METHOD <tab> PATH <tab> RANGE <tab> BODY      (RANGE and BODY may be empty)
# Each thread walks the list from its own starting point; done() prints one JSON line.
WRK_LUA: Final = r"""
local reqs = {}
local n = 0
local i = 0
local made = 0

function setup(thread)
  thread:set("thread_no", made)
  made = made + 1
end

function init(args)
  local f = assert(io.open(args[1], "r"))
  for line in f:lines() do
    local method, path, range, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    local headers = {}
    if range ~= "" then headers["Range"] = range end
    if body == "" then body = nil else headers["Content-Type"] = "application/json" end
    n = n + 1
    reqs[n] = wrk.format(method, path, headers, body)
  end
  f:close()
  local threads = tonumber(args[2]) or 1
  i = math.floor(n * (thread_no or 0) / threads) % n
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_us": %.0f, "requests": %.0f, "bytes": %.0f, ' ..
    '"errors": {"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f}, ' ..
    '"latency_us": {"p50": %.0f, "p90": %.0f, "p99": %.0f, "max": %.0f, "mean": %.1f}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str = ""
    body: str = ""

    def line(self) -> str:
        return f"{self.method}\t{self.path}\t{self.range}\t{self.body}\n"


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    requests: tuple[Request, ...]
    #: payload bytes the whole list asks for (for the mean response size)
    payload_bytes: int
    #: byte ranges per request (64 for a batch)
    ranges_per_request: int = 1
    turbofs_only: bool = False

    @property
    def mean_payload(self) -> float:
        return self.payload_bytes / len(self.requests)


class RssSampler:
    """Samples VmRSS of some processes every ``interval`` seconds in a thread."""

    def __init__(self, servers: Sequence[Server], interval: float = SAMPLE_INTERVAL) -> None:
        self.servers = list(servers)
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {s.name: [] for s in servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for s in self.servers:
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    self.samples[s.name].append((now, s.rss_kb()))
            self._stop.wait(self.interval)

    def between(self, name: str, t0: float, t1: float) -> list[int]:
        return [kb for t, kb in list(self.samples[name]) if t0 <= t <= t1]

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_wrk(server: Server, lua: Path, reqfile: Path, conns: int, duration: float,
            sampler: RssSampler) -> dict[str, Any]:
    """One wrk run against one server; wrk's figures, CPU and memory of both sides."""
    threads = 1 if conns == 1 else 2
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{round(duration)}s", "--timeout", "60s",
            "-s", str(lua), server.url, "--", str(reqfile), str(threads)]
    hwm_reset = server.reset_hwm()
    rss_before = server.rss_kb()
    cpu0 = server.cpu_seconds()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    _pid, status, usage = os.wait4(proc.pid, 0)
    t1 = time.monotonic()
    cpu1 = server.cpu_seconds()
    hwm = server.hwm_kb()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"wrk failed ({status}):\n{out}")
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if m is None:
        raise RuntimeError(f"no summary from wrk:\n{out}")
    w: dict[str, Any] = json.loads(m[1])
    time.sleep(SETTLE_SECONDS)
    rss_after = server.rss_kb()
    during = sampler.between(server.name, t0, t1)
    seconds = w["duration_us"] / 1e6
    gb = w["bytes"] / 1e9
    errors = sum(w["errors"].values())
    return {
        "registry": server.name,
        "connections": conns,
        "wrk_threads": threads,
        "seconds": round(seconds, 3),
        "requests": w["requests"],
        "bytes": w["bytes"],
        "mb_per_s": round(w["bytes"] / 1e6 / seconds, 1),
        "requests_per_s": round(w["requests"] / seconds, 1),
        "latency_ms": {k: round(v / 1000, 2) for k, v in w["latency_us"].items()},
        "errors": w["errors"],
        "error_total": errors,
        "server_cpu_seconds": round(cpu1 - cpu0, 2),
        "server_cpu_s_per_gb": round((cpu1 - cpu0) / gb, 3) if gb else None,
        "client_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "client_cpu_s_per_gb": round((usage.ru_utime + usage.ru_stime) / gb, 3) if gb else None,
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_peak_sampled_mib": round(max(during) / 1024, 1) if during else None,
        "rss_median_during_mib": round(statistics.median(during) / 1024, 1) if during else None,
        "rss_samples": len(during),
        "vmhwm_mib": round(hwm / 1024, 1) if hwm_reset else None,
        "rss_after_mib": round(rss_after / 1024, 1),
    }


# --------------------------------------------------------------------------- cases


def make_cases(img: LayoutImage, big_digest: str, seed: int = 1) -> list[Case]:
    rng = random.Random(seed)
    blob_path = f"/v2/{REPO}/blobs/"
    offsets = list(range(0, BIG_BLOB_SIZE, RANGE_SIZE))
    rng.shuffle(offsets)
    range16 = tuple(
        Request("GET", blob_path + big_digest, f"bytes={o}-{o + RANGE_SIZE - 1}") for o in offsets
    )
    blobs = list(img.manifest.blobs)
    rng.shuffle(blobs)
    whole = tuple(Request("GET", blob_path + b.digest) for b in blobs)
    chunks = list(img.index.chunks())
    rng.shuffle(chunks)
    chunks = chunks[: len(chunks) // BATCH_RANGES * BATCH_RANGES]
    digest_of = dict(enumerate(b.oci_digest for b in img.index.blobs()))
    ranges = [(digest_of[c.blob], c.offset, c.clen) for c in chunks]
    chunk_reqs = tuple(Request("GET", blob_path + d, f"bytes={o}-{o + n - 1}") for d, o, n in ranges)
    batches = []
    for i in range(0, len(ranges), BATCH_RANGES):
        group = ranges[i : i + BATCH_RANGES]
        body = json.dumps({"ranges": [{"digest": d, "offset": o, "length": n} for d, o, n in group]},
                          separators=(",", ":"))
        batches.append(Request("POST", f"/v2/{REPO}/_turbofs/batch", "", body))
    chunk_bytes = sum(n for _, _, n in ranges)
    return [
        Case("range_16m", "GET of a 16 MiB range of the 512 MiB random blob", range16,
             RANGE_SIZE * len(range16)),
        Case("whole_blob", f"GET of a whole chunk blob of the turbo image ({len(whole)} blobs)", whole,
             sum(b.size for b in blobs)),
        Case("chunk_range", f"Range GET of one compressed chunk ({len(chunk_reqs)} chunks)", chunk_reqs,
             chunk_bytes),
        Case("chunk_batch", f"POST _turbofs/batch of {BATCH_RANGES} chunks (the same chunks)",
             tuple(batches), chunk_bytes, BATCH_RANGES, turbofs_only=True),
    ]


def sanity_check(servers: Sequence[Server], img: LayoutImage, big: Path, big_digest: str) -> None:
    """Both registries return the right bytes for a range, a whole blob and a batch."""
    with open(big, "rb") as f:
        f.seek(5 * RANGE_SIZE)
        want = f.read(RANGE_SIZE)
    blob = img.manifest.blobs[0]
    whole = img.blob_path(blob.digest).read_bytes()
    chunks = list(img.index.chunks())[:5]
    digest_of = dict(enumerate(b.oci_digest for b in img.index.blobs()))
    with httpx.Client(timeout=60) as client:
        for s in servers:
            lo = 5 * RANGE_SIZE
            r = client.get(f"{s.url}/v2/{REPO}/blobs/{big_digest}",
                           headers={"Range": f"bytes={lo}-{lo + RANGE_SIZE - 1}"})
            if r.status_code != 206 or r.content != want:
                raise RuntimeError(f"{s.name}: wrong answer to a 16 MiB range ({r.status_code})")
            r = client.get(f"{s.url}/v2/{REPO}/blobs/{blob.digest}")
            if r.status_code != 200 or r.content != whole:
                raise RuntimeError(f"{s.name}: wrong whole blob ({r.status_code})")
            if s.name == "turbofs":
                body = {"ranges": [{"digest": digest_of[c.blob], "offset": c.offset, "length": c.clen}
                                   for c in chunks]}
                r = client.post(f"{s.url}/v2/{REPO}/_turbofs/batch", json=body)
                expect = b""
                for c in chunks:
                    with open(img.blob_path(digest_of[c.blob]), "rb") as f:
                        f.seek(c.offset)
                        expect += f.read(c.clen)
                if r.status_code != 200 or r.content != expect:
                    raise RuntimeError(f"turbofs: wrong batch answer ({r.status_code})")


# --------------------------------------------------------------------------- zero-copy check


def syscall_counts(server: Server, lua: Path, reqfile: Path, duration: float) -> dict[str, Any]:
    """Count the server's I/O system calls (``strace -c -f``) during a one-connection load."""
    if shutil.which("strace") is None:
        return {"skipped": "strace is not installed"}
    out_file = reqfile.with_name(f"strace-{server.name}.txt")
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out_file), "-p", str(server.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attach to every thread
        argv = ["wrk", "-t", "1", "-c", "1", "-d", f"{round(duration)}s", "--timeout", "60s",
                "-s", str(lua), server.url, "--", str(reqfile), "1"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    moved = json.loads(m[1])["bytes"] if m else None
    calls: dict[str, int] = {}
    for line in out_file.read_text(errors="replace").splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[-1] in IO_SYSCALLS and parts[3].isdigit():
            calls[parts[-1]] = int(parts[3])
    return {"bytes_moved": moved, "calls": calls,
            "bytes_per_call": {k: round(moved / v) for k, v in calls.items() if moved and v}}


# --------------------------------------------------------------------------- summary


def summarise(runs: list[dict[str, Any]], cases: Sequence[Case]) -> dict[str, Any]:
    """Median, min and max per (case, registry, connections), and the ratios."""
    out: dict[str, Any] = {}
    for case in cases:
        per: dict[str, Any] = {}
        for r in runs:
            if r["case"] != case.name:
                continue
            key = f"{r['registry']}/{r['connections']}"
            per.setdefault(key, []).append(r)
        table: dict[str, Any] = {}
        for key, rs in per.items():
            entry: dict[str, Any] = {
                "runs": len(rs),
                "mb_per_s": stats([r["mb_per_s"] for r in rs]),
                "requests_per_s": stats([r["requests_per_s"] for r in rs]),
                "latency_p50_ms": stats([r["latency_ms"]["p50"] for r in rs], 2),
                "latency_p99_ms": stats([r["latency_ms"]["p99"] for r in rs], 2),
                "server_cpu_s_per_gb": stats([r["server_cpu_s_per_gb"] for r in rs], 3),
                "client_cpu_s_per_gb": stats([r["client_cpu_s_per_gb"] for r in rs], 3),
                "rss_peak_sampled_mib": stats([r["rss_peak_sampled_mib"] for r in rs if r["rss_peak_sampled_mib"]]),
                "rss_median_during_mib": stats([r["rss_median_during_mib"] for r in rs if r["rss_median_during_mib"]]),
                "rss_after_mib": stats([r["rss_after_mib"] for r in rs]),
                "errors": sum(r["error_total"] for r in rs),
            }
            hwm = [r["vmhwm_mib"] for r in rs if r["vmhwm_mib"] is not None]
            if hwm:
                entry["vmhwm_mib"] = stats(hwm)
            if case.ranges_per_request > 1:
                entry["ranges_per_s"] = stats([r["requests_per_s"] * case.ranges_per_request for r in rs])
            table[key] = entry
        ratios: dict[str, Any] = {}
        for key, entry in table.items():
            reg, conns = key.split("/")
            if reg != "turbofs":
                continue
            if case.name == "chunk_batch":
                ranges_base = _chunk_range_entry(runs, conns)
                if ranges_base is None:
                    continue
                ratios[conns] = {
                    "mb_per_s": round(entry["mb_per_s"]["median"] / ranges_base["mb"], 2),
                    "ranges_per_s": round(entry["ranges_per_s"]["median"] / ranges_base["rps"], 2),
                    "vs": "distribution chunk_range (one Range GET per chunk)",
                }
                continue
            base = table.get(f"distribution/{conns}")
            if base is None:
                continue
            ratios[conns] = {
                "mb_per_s": round(entry["mb_per_s"]["median"] / base["mb_per_s"]["median"], 2),
                "requests_per_s": round(entry["requests_per_s"]["median"] / base["requests_per_s"]["median"], 2),
                "server_cpu_s_per_gb": round(entry["server_cpu_s_per_gb"]["median"]
                                             / base["server_cpu_s_per_gb"]["median"], 2),
            }
        out[case.name] = {"what": case.what, "mean_payload_bytes": round(case.mean_payload),
                          "requests_in_list": len(case.requests), "by_registry": table,
                          "ratio_turbofs_to_distribution": ratios}
    return out


def _chunk_range_entry(runs: list[dict[str, Any]], conns: str) -> dict[str, float] | None:
    rs = [r for r in runs if r["case"] == "chunk_range" and r["registry"] == "distribution"
          and str(r["connections"]) == conns]
    if not rs:
        return None
    return {"mb": statistics.median(r["mb_per_s"] for r in rs),
            "rps": statistics.median(r["requests_per_s"] for r in rs)}


def memory_summary(runs: list[dict[str, Any]], baseline: dict[str, float], final: dict[str, float],
                   servers: Sequence[Server]) -> dict[str, Any]:
    """Per server: RSS before the load, peak during it, after each run, and after all of it."""
    out: dict[str, Any] = {}
    for s in servers:
        rs = [r for r in runs if r["registry"] == s.name]
        if not rs:
            continue
        after = [r["rss_after_mib"] for r in rs]
        served = 0
        reqs = 0
        timeline = []
        for r in rs:
            served += r["bytes"]
            reqs += r["requests"]
            timeline.append({"case": r["case"], "connections": r["connections"],
                             "cumulative_gb": round(served / 1e9, 2), "cumulative_requests": reqs,
                             "rss_after_mib": r["rss_after_mib"]})
        hwm = [r["vmhwm_mib"] for r in rs if r["vmhwm_mib"] is not None]
        out[s.name] = {
            "rss_before_load_mib": baseline.get(s.name),
            "rss_peak_sampled_mib": max(r["rss_peak_sampled_mib"] or 0 for r in rs),
            "vmhwm_max_mib": max(hwm) if hwm else None,
            "rss_after_first_run_mib": after[0],
            "rss_after_last_run_mib": after[-1],
            "rss_after_runs_min_max_mib": [min(after), max(after)],
            "rss_final_mib": final.get(s.name),
            "served_gb": round(served / 1e9, 2),
            "served_requests": reqs,
            "timeline": timeline,
        }
    return out


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_tools("wrk", "skopeo", "docker-registry")
    conns_list = [int(c) for c in args.conns.split(",")]
    img_dir = ensure_variant(IMAGE, DEFAULT_CHUNK_SIZE, LEVEL)
    img = open_layout_image(img_dir, "latest")
    image_bytes = sum(d.size for d in (img.manifest.config, img.manifest.index, *img.manifest.blobs))
    log(f"turbo image {img_dir}: {len(img.manifest.blobs)} chunk blobs, {img.index.n_chunks} chunks, "
        f"{image_bytes / 1e6:.1f} MB")
    work = Path(tempfile.mkdtemp(prefix="turbofs-registry-bench-"))
    data = new_results(
        "registry",
        tools=tool_versions(),
        settings={"runs": args.runs, "duration_s": args.duration, "connections": conns_list,
                  "range_bytes": RANGE_SIZE, "big_blob_bytes": BIG_BLOB_SIZE,
                  "batch_ranges": BATCH_RANGES, "rss_sample_interval_s": SAMPLE_INTERVAL,
                  "client": "wrk, 1 thread for 1 connection, 2 threads otherwise"},
        image={"layout": str(img_dir), "manifest": img.manifest.digest, "bytes": image_bytes,
               "chunk_blobs": len(img.manifest.blobs), "chunks": img.index.n_chunks},
    )
    try:
        log(f"work folder {work}; writing the {BIG_BLOB_SIZE // MiB} MiB random blob")
        big = work / "big.bin"
        big_digest = random_blob(big, BIG_BLOB_SIZE)
        starters = [lambda: start_turbofs(work / "turbofs"), lambda: start_distribution(work / "distribution")]
        with servers_running(starters) as servers:
            setup: dict[str, Any] = {}
            for s in servers:
                log(f"{s.name} on {s.url} (pid {s.pid}): pushing the turbo image with skopeo")
                push_s = skopeo_copy(f"oci:{img_dir}:latest", f"docker://{s.host_port}/{REPO}:{TAG}",
                                     "--preserve-digests")
                up_s = upload_blob(s, REPO, big, big_digest)
                setup[s.name] = {"skopeo_push_seconds": round(push_s, 2),
                                 "big_blob_upload_seconds": round(up_s, 2),
                                 "rss_after_upload_mib": round(s.rss_kb() / 1024, 1)}
                log(f"{s.name}: skopeo push {push_s:.1f} s, 512 MiB upload {up_s:.1f} s")
            want = {d.digest for d in img.manifest.blobs} | {big_digest}
            for s in servers:
                missing = want - set(s.blob_files())
                if missing:
                    raise RuntimeError(f"{s.name} lacks {len(missing)} blobs after the push")
            warm = read_files([p for s in servers for p in s.blob_files().values()])
            log(f"page cache warmed ({warm / 1e9:.2f} GB read)")
            sanity_check(servers, img, big, big_digest)
            log("both registries return the right bytes")
            data["setup"] = setup

            cases = make_cases(img, big_digest)
            lua = work / "replay.lua"
            lua.write_text(WRK_LUA)
            reqfiles = {}
            for case in cases:
                reqfiles[case.name] = work / f"{case.name}.txt"
                reqfiles[case.name].write_text("".join(r.line() for r in case.requests))
            data["cases"] = {c.name: {"what": c.what, "requests_in_list": len(c.requests),
                                      "mean_payload_bytes": round(c.mean_payload)} for c in cases}

            runs: list[dict[str, Any]] = []
            time.sleep(1.0)
            baseline = {s.name: round(s.rss_kb() / 1024, 1) for s in servers}
            log(f"RSS before the load: {baseline}")
            total = sum(len(conns_list) * (1 if c.turbofs_only else 2) for c in cases) * args.runs
            with RssSampler(servers) as sampler:
                for rep in range(args.runs):
                    order = servers if rep % 2 == 0 else list(reversed(servers))
                    for case in cases:
                        for conns in conns_list:
                            for s in order:
                                if case.turbofs_only and s.name != "turbofs":
                                    continue
                                r = run_wrk(s, lua, reqfiles[case.name], conns, args.duration, sampler)
                                r.update(case=case.name, run=rep + 1)
                                runs.append(r)
                                log(f"[{len(runs)}/{total}] {case.name:11s} c={conns:<2d} {s.name:12s} "
                                    f"{r['mb_per_s']:8.1f} MB/s {r['requests_per_s']:8.1f} req/s "
                                    f"server {r['server_cpu_s_per_gb']} cpu-s/GB "
                                    f"RSS peak {r['rss_peak_sampled_mib']} MiB"
                                    + (f" ERRORS {r['errors']}" if r["error_total"] else ""))
            time.sleep(2.0)
            final = {s.name: round(s.rss_kb() / 1024, 1) for s in servers}
            log(f"RSS 2 s after the load: {final}")
            data["runs"] = runs
            data["summary"] = summarise(runs, cases)
            data["memory"] = memory_summary(runs, baseline, final, servers)
            if not args.no_strace:
                data["zero_copy_check"] = {}
                for s in servers:
                    log(f"{s.name}: counting I/O system calls with strace")
                    data["zero_copy_check"][s.name] = syscall_counts(s, lua, reqfiles["range_16m"], 3.0)
                    log(f"{s.name}: {data['zero_copy_check'][s.name]}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    data["total_seconds"] = round(time.monotonic() - _T_START, 1)
    return data


def print_table(data: dict[str, Any]) -> None:
    for name, case in data["summary"].items():
        log(f"{name}: {case['what']}")
        for key, e in sorted(case["by_registry"].items(), key=lambda kv: (int(kv[0].split('/')[1]), kv[0])):
            mb = e["mb_per_s"]
            log(f"  {key:16s} {mb['median']:8.1f} MB/s ({mb['min']}-{mb['max']}) "
                f"{e['requests_per_s']['median']:8.1f} req/s  server {e['server_cpu_s_per_gb']['median']} "
                f"cpu-s/GB  RSS peak {e['rss_peak_sampled_mib']['median']} MiB")
        log(f"  ratio turbofs/distribution: {case['ratio_turbofs_to_distribution']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every case (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--conns", default="1,8,32", help="concurrent connections (default 1,8,32)")
    parser.add_argument("--no-strace", action="store_true", help="skip the system call count")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (storage, logs)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "registry.json")
    args = parser.parse_args(argv)
    data = run(args)
    print_table(data)
    save_results(args.output, data, "bench.registry_bench", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
