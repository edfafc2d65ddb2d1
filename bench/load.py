"""Registry load: ``turbofs serve`` (its own storage folder, loopback) under 16, 64, 128 and
512 concurrent clients, for the three requests a fleet of nodes sends it:

* ``range``: chunk-sized Range GETs (64 KiB at random 4 KiB-aligned offsets of 32 blobs of
  4 MiB);
* ``batch``: ``POST /v2/<name>/_turbofs/batch`` of 16 such ranges (docs/api.md);
* ``push``: monolithic blob uploads (``POST /v2/<name>/blobs/uploads/?digest=``) of 128 KiB
  blobs, each a distinct blob.

The clients are aiohttp sessions in this one process (one connection per client). Each case
sends at most ``--requests`` requests and runs at most ``--max-seconds``. Reported per case:
requests/s, MB/s of payload, p50/p99 latency, errors (any answer other than the expected
status, or a transport error: must be 0); and the registry's RSS (VmRSS sampled every
100 ms): after a warm-up (every case once, up to 500 requests each, so that the registry
has met the highest concurrency), at the end, and the peak. "Memory flat": the RSS at the end
is within 25 % + 32 MiB of the RSS after the warm-up.

Command line::

    python -m bench.load [--clients 16,64,128,512] [--requests 3000] [--max-seconds 20]
        [--out bench/results/load.json]

Writes JSON to ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp

from tests.registry_fixtures import TurbofsRegistry

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
REPO: Final = "load/blobs"
BLOBS: Final = 32
BLOB_SIZE: Final = 4 << 20
RANGE_SIZE: Final = 64 << 10
BATCH_RANGES: Final = 16
PUSH_SIZE: Final = 128 << 10
#: "memory flat": end RSS <= warm RSS * (1 + share) + fixed
FLAT_SHARE: Final = 0.25
FLAT_FIXED_KIB: Final = 32 * 1024


def log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.halt = pid, [0], threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            self.samples.append(rss_kib(self.pid))


class Load:
    """The registry's content and the request makers."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.digests: list[str] = []
        self.push_base = random.Random(seed + 1).randbytes(PUSH_SIZE)
        self.push_counter = 0

    async def setup(self, session: aiohttp.ClientSession) -> None:
        gen = random.Random(7)
        for _ in range(BLOBS):
            data = gen.randbytes(BLOB_SIZE)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            async with session.post(f"{self.url}/v2/{REPO}/blobs/uploads/?digest={digest}", data=data) as r:
                if r.status != 201:
                    raise RuntimeError(f"setup upload answered {r.status}: {await r.text()}")
            self.digests.append(digest)

    def _range(self) -> tuple[str, int]:
        return self.rng.choice(self.digests), self.rng.randrange(0, (BLOB_SIZE - RANGE_SIZE) // 4096) * 4096

    async def range_get(self, session: aiohttp.ClientSession) -> int:
        digest, off = self._range()
        headers = {"Range": f"bytes={off}-{off + RANGE_SIZE - 1}"}
        async with session.get(f"{self.url}/v2/{REPO}/blobs/{digest}", headers=headers) as r:
            body = await r.read()
            if r.status != 206 or len(body) != RANGE_SIZE:
                raise RuntimeError(f"range: {r.status}, {len(body)} bytes")
            return len(body)

    async def batch(self, session: aiohttp.ClientSession) -> int:
        ranges = [{"digest": d, "offset": o, "length": RANGE_SIZE} for d, o in (self._range() for _ in range(BATCH_RANGES))]
        async with session.post(f"{self.url}/v2/{REPO}/_turbofs/batch", json={"ranges": ranges}) as r:
            body = await r.read()
            if r.status != 200 or len(body) != RANGE_SIZE * BATCH_RANGES:
                raise RuntimeError(f"batch: {r.status}, {len(body)} bytes")
            return len(body)

    async def push(self, session: aiohttp.ClientSession) -> int:
        self.push_counter += 1
        data = self.push_counter.to_bytes(8, "big") + self.push_base[8:]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        async with session.post(f"{self.url}/v2/{REPO}/blobs/uploads/?digest={digest}", data=data,
                                headers={"Content-Type": "application/octet-stream"}) as r:
            await r.read()
            if r.status != 201:
                raise RuntimeError(f"push: {r.status}")
            return len(data)


async def run_case(make: Callable[[aiohttp.ClientSession], Awaitable[int]], clients: int, requests: int,
                   max_seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    moved = 0
    left = requests
    deadline = time.monotonic() + max_seconds
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal left, moved
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                t0 = time.monotonic()
                try:
                    n = await make(session)  # (not `moved += await ...`: that loses other clients' sums)
                except Exception as exc:  # counted: a load error is a result, not a crash
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                moved += n
                latencies.append(time.monotonic() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        took = time.monotonic() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else 0.0

    return {"clients": clients, "requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "error_samples": sorted(set(errors))[:5], "seconds": round(took, 2),
            "req_per_s": round(len(lat) / took, 1), "mb_per_s": round(moved / took / 1e6, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else 0.0}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| case | clients | requests | req/s | MB/s | p50 ms | p99 ms | errors | RSS end MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["cases"]:
        lines.append(f"| {c['kind']} | {c['clients']} | {c['requests']} | {c['req_per_s']} | {c['mb_per_s']} | "
                     f"{c['p50_ms']} | {c['p99_ms']} | {c['errors']} | {c['rss_end_kib'] / 1024:.0f} |")
    m = results["memory"]
    lines.append("")
    lines.append(f"Registry RSS: {m['warm_kib'] / 1024:.0f} MiB after warm-up, {m['end_kib'] / 1024:.0f} MiB at the "
                 f"end, peak {m['peak_kib'] / 1024:.0f} MiB; flat: {'yes' if m['flat'] else 'NO'}; "
                 f"errors: {results['errors']}.")
    return "\n".join(lines) + "\n"


async def bench(url: str, pid: int, clients: Sequence[int], requests: int, max_seconds: float, seed: int,
                kinds: Sequence[str]) -> dict[str, Any]:
    load = Load(url, seed)
    async with aiohttp.ClientSession() as session:
        await load.setup(session)
    makers = {"range": load.range_get, "batch": load.batch, "push": load.push}
    sampler = RssSampler(pid)
    sampler.start()
    log("warm-up: every case once, at most 500 requests each")
    for n in clients:
        for kind in kinds:
            await run_case(makers[kind], n, min(requests, 500), max_seconds)
    warm = rss_kib(pid)
    cases = []
    for n in clients:
        for kind in kinds:
            row = await run_case(makers[kind], n, requests, max_seconds)
            row["kind"] = kind
            row["rss_end_kib"] = rss_kib(pid)
            cases.append(row)
            log(f"{kind} x{n}: {row['req_per_s']} req/s, {row['mb_per_s']} MB/s, p50 {row['p50_ms']} ms, "
                f"p99 {row['p99_ms']} ms, errors {row['errors']}")
    end = rss_kib(pid)
    sampler.halt.set()
    sampler.join(5)
    memory = {"warm_kib": warm, "end_kib": end, "peak_kib": max(sampler.samples),
              "flat": end <= warm * (1 + FLAT_SHARE) + FLAT_FIXED_KIB}
    return {"cases": cases, "memory": memory, "errors": sum(c["errors"] for c in cases)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--clients", default="16,64,128,512", help="comma-separated concurrency levels")
    p.add_argument("--kinds", default="range,batch,push", help="comma-separated, of range, batch, push")
    p.add_argument("--requests", type=int, default=3000, help="at most this many requests per case")
    p.add_argument("--max-seconds", type=float, default=20.0, help="at most this long per case")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/load.json")
    args = p.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients {args.clients!r}: not a list of integers")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not clients or min(clients) < 1 or args.requests < 1 or not set(kinds) <= {"range", "batch", "push"}:
        p.error("--clients must be positive integers, --requests positive, --kinds of range, batch, push")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    work = Path(tempfile.mkdtemp(prefix="tfs-load-", dir="/var/tmp"))
    reg = TurbofsRegistry(work)
    started = time.time()
    reg.start()
    try:
        assert reg.proc is not None
        results = asyncio.run(bench(reg.url, reg.proc.pid, clients, args.requests, args.max_seconds, args.seed, kinds))
        results["registry_log_tracebacks"] = reg.log().count("Traceback")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    results.update({"benchmark": "load", "host": platform.node(), "cpus": os.cpu_count(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "seconds": round(time.time() - started, 1),
                    "command": "python -m bench.load " + " ".join(sys.argv[1:] if argv is None else argv),
                    "settings": {"blobs": BLOBS, "blob_size": BLOB_SIZE, "range_size": RANGE_SIZE,
                                 "batch_ranges": BATCH_RANGES, "push_size": PUSH_SIZE,
                                 "requests": args.requests, "max_seconds": args.max_seconds}})
    results["table"] = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"], end="")
    log(f"wrote {args.out}")
    return 0 if results["errors"] == 0 and results["memory"]["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
