"""Upload benchmark: pushing a turbo image into a registry through a 1 Gbit/s link.

Why it exists: ``bench.coldstart`` took about 8 minutes to ``skopeo copy`` the 3 GB turbo
image of ``python-5g`` (3,614 layers of ~0.9 MB) into the turbofs registry. This module
separates what the client costs from what the registry costs.

Setup: two network namespaces of its own (``tfsup-reg`` 10.217.0.1/30 and ``tfsup-node``
10.217.0.2/30) joined by a veth pair with ``tc tbf rate RATE burst RATE/8/250 latency 50ms``
on both egresses (the shaping of ``bench.coldstart``). For every run a fresh ``turbofs serve``
(``push_auth = false``) and a fresh ``docker-registry`` (distribution 2.8) start in the
registry namespace, each with an empty storage folder on disk and a port never used before in
this invocation (so skopeo's blob-info cache knows no location in them, and no cross-repository
mount happens). The clients run in the node namespace; per run and registry, in this order:

* ``skopeo``: ``skopeo copy --preserve-digests oci:TURBO:latest docker://REG/bench/skopeo``
  (skopeo 1.9.3 in Debian 12);
* ``serial``: a minimal client of this module that uploads every blob of the layout one after
  the other the way skopeo 1.9.3 does (HEAD, POST, PATCH with the body streamed, PUT
  ?digest=), timing each request;
* ``push``: ``turbofs push --plain-http`` (default: 4 blobs at once, POST + PUT with the body).

Reported per case: seconds, MB/s, the client's CPU seconds (user+sys, from the children's
rusage) and the server's (``/proc/PID/stat``); for ``serial`` also the median and p90 of each
request kind. Each registry gets fresh storage for every case.

``--many N,N,...`` adds a CPU-only check of skopeo itself: synthetic layouts of N layers of
1 KiB each, copied inside the registry namespace (no shaping) to both registries; skopeo's
CPU seconds against N.

Command line::

    python -m bench.upload_bench [--image python-1g] [--runs 3] [--rate 1gbit]
                                 [--cases skopeo,serial,push] [--many 250,500,1000]

Needs root (namespaces, tc), ``skopeo``, ``docker-registry`` and the turbo layout that
``bench.coldstart`` caches (``~/.cache/turbofs/bench/coldstart/IMAGE-*-turbo``). Results go
to ``bench/results/upload.json``; progress to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from bench.build_bench import REPO_ROOT, RESULTS_DIR, machine_info, write_results
from bench.netlink import NetnsLink, tbf_for_rate
from tests.registry_fixtures import distribution_config

LINK_NAME: Final = "tfsup"
LINK_SUBNET: Final = "10.217.0"
NS_REG: Final = f"{LINK_NAME}-reg"
NS_NODE: Final = f"{LINK_NAME}-node"
ADDR_REG: Final = f"{LINK_SUBNET}.1"
ADDR_NODE: Final = f"{LINK_SUBNET}.2"
FIRST_PORT: Final = 5300
START_TIMEOUT: Final = 30.0
READ_SIZE: Final = 1 << 20
CASES: Final = ("skopeo", "serial", "push")

_T_START = time.monotonic()


def log(msg: str) -> None:
    print(f"bench [{time.monotonic() - _T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run_cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def parse_rate(text: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for suffix, factor in units.items():
        if text.lower().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    raise SystemExit(f"--rate: give a rate like 1gbit or 500mbit, not {text!r}")


# --------------------------------------------------------------------------- the link


def link(rate_bps: int) -> NetnsLink:
    """The two namespaces and the shaped veth pair (``with link(rate).up() as info``)."""
    return NetnsLink(LINK_NAME, LINK_SUBNET, tbf_for_rate(rate_bps))


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


# --------------------------------------------------------------------------- registries


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def address(self) -> str:
        return f"{ADDR_REG}:{self.port}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _await_http(server: Server, deadline: float) -> None:
    url = f"http://{server.address}/v2/"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} exited while starting (see {server.workdir})")
        probe = run_cmd(in_ns(NS_NODE, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]),
                        check=False)
        if probe.stdout.strip() in ("200", "401"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.kind} did not answer on {url}")



def start_server(kind: str, port: int) -> Server:
    """A fresh registry of ``kind`` (turbofs, distribution) in the registry namespace."""
    workdir = Path(tempfile.mkdtemp(prefix=f"tfsup-{kind}-", dir="/var/tmp"))
    storage = workdir / "storage"
    storage.mkdir()
    out = open(workdir / "server.log", "wb")
    if kind == "turbofs":
        (workdir / "turbofs.toml").write_text("[registry]\npush_auth = false\n")
        argv = [sys.executable, "-m", "turbofs.cli", "--config", str(workdir / "turbofs.toml"), "serve",
                "--host", ADDR_REG, "--port", str(port), "--storage", str(storage)]
    else:
        (workdir / "config.yml").write_text(
            distribution_config(storage, f"{ADDR_REG}:{port}", delete=False, secret="turbofs-bench"))
        argv = ["docker-registry", "serve", str(workdir / "config.yml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURBOFS_")}
    proc = subprocess.Popen(in_ns(NS_REG, argv), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=out)
    out.close()
    server = Server(kind, proc, port, workdir)
    try:
        _await_http(server, time.monotonic() + START_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------- clients


def timed_child(argv: Sequence[str]) -> tuple[float, float]:
    """Run ``argv`` to completion: (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run_cmd(argv)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def layout_blobs(layout: Path) -> list[Path]:
    return sorted((layout / "blobs" / "sha256").iterdir())


def serial_client(base: str, repo: str, layout: Path) -> dict[str, Any]:
    """Upload every blob of ``layout`` one at a time: HEAD, POST, PATCH (streamed), PUT."""
    times: dict[str, list[float]] = {k: [] for k in ("head", "post", "patch", "put")}

    def body(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while piece := f.read(READ_SIZE):
                yield piece

    total = 0
    with httpx.Client(base_url=base, timeout=120) as c:
        t_all = time.perf_counter()
        for path in layout_blobs(layout):
            digest = "sha256:" + path.name
            size = path.stat().st_size
            t0 = time.perf_counter()
            c.head(f"/v2/{repo}/blobs/{digest}")
            t1 = time.perf_counter()
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            r.raise_for_status()
            loc = r.headers["location"]
            t2 = time.perf_counter()
            r = c.patch(loc, content=body(path), headers={"Content-Type": "application/octet-stream",
                                                          "Content-Length": str(size)})
            r.raise_for_status()
            loc = r.headers["location"]
            t3 = time.perf_counter()
            r = c.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}")
            r.raise_for_status()
            t4 = time.perf_counter()
            for kind, a, b in (("head", t0, t1), ("post", t1, t2), ("patch", t2, t3), ("put", t3, t4)):
                times[kind].append((b - a) * 1000)
            total += size
        wall = time.perf_counter() - t_all
    out: dict[str, Any] = {"blobs": len(times["put"]), "bytes": total, "wall_s": wall}
    for kind, values in times.items():
        ordered = sorted(values)
        out[f"{kind}_ms"] = {"median": round(statistics.median(ordered), 2),
                             "p90": round(ordered[int(len(ordered) * 0.9)], 2)}
    return out


def run_case(case: str, server: Server, layout: Path, size: int) -> dict[str, Any]:
    repo = f"bench/{case}"
    cpu0 = server.cpu_seconds()
    detail: dict[str, Any] = {}
    if case == "skopeo":
        wall, cpu = timed_child(in_ns(NS_NODE, [
            "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
            f"oci:{layout}:latest", f"docker://{server.address}/{repo}:latest"]))
    elif case == "serial":
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = run_cmd(in_ns(NS_NODE, [sys.executable, "-m", "bench.upload_bench", "--serial-client",
                                       f"http://{server.address}", repo, str(layout)]))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        detail = json.loads(proc.stdout)
        wall = float(detail.pop("wall_s"))
    elif case == "push":
        wall, cpu = timed_child(in_ns(NS_NODE, [
            sys.executable, "-m", "turbofs.cli", "push", "--plain-http", "--no-progress", str(layout),
            f"{server.address}/{repo}:latest"]))
    else:
        raise ValueError(case)
    return {"case": case, "registry": server.kind, "seconds": round(wall, 3), "MB_s": round(size / 1e6 / wall, 1),
            "client_cpu_s": round(cpu, 2), "server_cpu_s": round(server.cpu_seconds() - cpu0, 2), **detail}


# --------------------------------------------------------------------------- many tiny layers


def many_layers_layout(out: Path, n: int) -> Path:
    """An OCI layout with ``n`` layers of 1 KiB (turbofs chunk media type); deterministic."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, Any]:
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return {"digest": f"sha256:{hexd}", "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    layers = [{"mediaType": "application/vnd.turbofs.chunks.v1+zstd",
               **put(hashlib.sha512(f"{n}-{i}".encode()).digest() * 16)} for i in range(n)]
    manifest = put(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config}, "layers": layers,
    }).encode())
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "annotations": {"org.opencontainers.image.ref.name": "latest"}, **manifest}]}))
    return out


# --------------------------------------------------------------------------- driver


def find_layout(image: str) -> Path:
    from bench.images import cache_dir

    found = sorted((cache_dir() / "bench" / "coldstart").glob(f"{image}-*-turbo"))
    found = [p for p in found if (p / "index.json").is_file()]
    if not found:
        raise SystemExit(f"no turbo layout of {image} cached: run `python -m bench.coldstart --images {image}` once")
    return found[-1]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted({(r["case"], r["registry"]) for r in rows}):
        sel = [r for r in rows if (r["case"], r["registry"]) == key]
        entry = {}
        for field in ("seconds", "MB_s", "client_cpu_s", "server_cpu_s"):
            vals = [float(r[field]) for r in sel]
            entry[field] = {"median": round(statistics.median(vals), 2), "min": min(vals), "max": max(vals)}
        if key[0] == "serial":
            for kind in ("head", "post", "patch", "put"):
                entry[f"{kind}_ms_median"] = round(statistics.median(r[f"{kind}_ms"]["median"] for r in sel), 2)
        out[f"{key[0]}/{key[1]}"] = entry
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("skopeo", "docker-registry", "tc", "ip", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing program: {tool}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, tc)")
    layout = find_layout(args.image)
    blobs = layout_blobs(layout)
    size = sum(p.stat().st_size for p in blobs)
    log(f"{layout}: {len(blobs)} blobs, {size / 1e6:.1f} MB")
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"--cases: unknown case {c!r} (known: {', '.join(CASES)})")
    port = FIRST_PORT
    rows: list[dict[str, Any]] = []
    many: list[dict[str, Any]] = []
    rate = parse_rate(args.rate)
    with link(rate).up() as link_info:
        link_info["rate_bps"] = rate
        for run_no in range(args.runs):
            for case in cases:
                kinds = ("turbofs", "distribution") if run_no % 2 == 0 else ("distribution", "turbofs")
                for kind in kinds:
                    server = start_server(kind, port)
                    port += 1
                    try:
                        row = run_case(case, server, layout, size)
                    finally:
                        server.stop()
                    row["run"] = run_no
                    rows.append(row)
                    log(json.dumps(row))
        if args.many:
            work = Path(tempfile.mkdtemp(prefix="tfsup-many-", dir="/var/tmp"))
            try:
                for n in (int(x) for x in args.many.split(",")):
                    lay = many_layers_layout(work / f"n{n}", n)
                    for kind in ("turbofs", "distribution"):
                        server = start_server(kind, port)
                        port += 1
                        try:
                            wall, cpu = timed_child(in_ns(NS_REG, [
                                "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                                "--preserve-digests", f"oci:{lay}:latest",
                                f"docker://{server.address}/bench/many:latest"]))
                            server_cpu = server.cpu_seconds()
                        finally:
                            server.stop()
                        many.append({"layers": n, "registry": kind, "seconds": round(wall, 2),
                                     "skopeo_cpu_s": round(cpu, 2), "server_cpu_s": round(server_cpu, 2)})
                        log(json.dumps(many[-1]))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": machine_info(),
        "command": " ".join(["python -m bench.upload_bench", *sys.argv[1:]]),
        "skopeo": run_cmd(["skopeo", "--version"]).stdout.strip(),
        "image": {"name": args.image, "layout": str(layout), "blobs": len(blobs), "bytes": size},
        "link": link_info,
        "load_average": os.getloadavg(),
        "runs": rows,
        "summary": summary(rows),
        "many_layers": many,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="python-1g")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--many", default="", help="layer counts for the skopeo scaling check, e.g. 250,500,1000")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "upload.json")
    parser.add_argument("--serial-client", nargs=3, metavar=("BASE", "REPO", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serial_client:
        base, repo, lay = args.serial_client
        print(json.dumps(serial_client(base, repo, Path(lay))))
        return 0
    data = run(args)
    path = write_results(args.out, data)
    log(f"wrote {path}")
    print(json.dumps(data["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
