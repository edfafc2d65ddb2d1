"""Cold start: from nothing on the node to the inference process printing ``READY``.

Paths, measured under the same conditions:

``standard``
    Debian's docker-registry (CNCF distribution) holds the ordinary image; containerd 1.6
    ``ctr images pull --plain-http`` then ``ctr run`` (overlayfs snapshotter).
``turbofs``
    the turbofs registry holds the turbo image (``turbofs build`` of the same layout);
    ``turbofs run --plain-http`` through the turbofs snapshotter (lazy mount, background
    prefetch), in the node's default presentation (erofs where the kernel has it).
``turbofs+trace``
    the same, with the turbo image rebuilt with a recorded startup (``turbofs build
    --startup-trace``): the trace is what the working-set run below read (``turbofs trace``
    on its mount), recorded once per image and kept in the cache, like a user would record
    it once at push time.
``turbofs+trace-nopush``
    the same as ``turbofs+trace`` without the page-cache push of the recorded startup's
    chunks (``[daemon] startup_notify_store = false``; on by default), for that choice side
    by side.
``turbofs-fuse+trace``
    the traced image in the per-file FUSE presentation (``[daemon] mode = "fuse"``), for the
    two presentations side by side.

The link: two network namespaces, ``tfscold-reg`` (both registries, 10.215.0.1/30) and
``tfscold-node`` (10.215.0.2/30), one veth pair between them, ``tc tbf`` on the egress of
both ends at ``--rate`` (default 1gbit; ``none``: unshaped). This process enters
``tfscold-node`` (only its network namespace: mounts and processes stay in the root
namespaces), so the snapshotter, containerd (snapshotter first, then containerd with a
``[proxy_plugins.turbofs]`` section), their mount daemons, ``ctr`` and ``turbofs run`` all
reach the registries at 10.215.0.1 over that link; the registries are started with
``nsenter --net`` into ``tfscold-reg``. No address is added outside these namespaces, and
they are deleted at the end.

Every run starts from a clean node: a fresh containerd and snapshotter (new root, state,
content store, snapshots and chunk cache), the page cache dropped. Runs alternate between
the paths (each run starts with the next path of the rotation). A run records:

* ``ready_s``: seconds from the first command (``ctr images pull`` / ``turbofs run``) to the
  container's ``READY`` line on its stdout (for the standard path also ``pull_s``);
* ``bytes_at_ready`` and ``bytes_total``: bytes received by the node's end of the veth
  (everything: HTTP, TCP/IP overhead);
* turbofs: the working set (compressed chunk bytes fetched on demand and by read-ahead
  until ``READY``, from the mount daemon's metrics), fetch counts and seconds per kind,
  the daemon's peak RSS (``VmHWM``), and ``prefetch_s``, the time from the start to a
  complete background prefetch; at READY: FUSE requests by kind, bytes the daemon served
  through FUSE, the daemon's CPU seconds and the page cache's growth since the start;
* ``warm_s``: the same container started again once everything is local, page cache
  dropped (a warm start from local disk).

The lower bound of a cold start is the warm start of the standard path (native overlayfs
on local disk) plus the turbofs working set sent at the link rate.

Output: raw JSON at ``--out`` (default ``bench/results/coldstart.json``), a chart next to it
(``.png``) and a Markdown table on stdout (also in the JSON).

Command line::

    python -m bench.coldstart [--images python-1g,python-5g] [--runs 3] [--rate 1gbit|none]
        [--variants turbofs,turbofs+trace,turbofs+trace-nopush,turbofs-fuse+trace] [--retrace]
        [--trace-from IMAGE]
        [--out bench/results/coldstart.json] [--merge EARLIER.json] [--no-chart]

Images come from :mod:`bench.images` (cached); their turbo layouts and startup traces are
cached under ``$TURBOFS_CACHE/bench/coldstart/``. Images are copied into both registries
from inside the registry namespace (setup, not measured: it does not cross the link). Needs root, /dev/fuse, containerd, ctr, runc,
docker-registry, skopeo, iproute2 (ip, tc) and nsenter.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import secrets
import shutil
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

from bench.mount_bench import fetch_figures, parse_metrics
from bench.netlink import NetnsLink, tbf_for_rate
from tests.containerd_fixtures import Containerd
from tests.registry_fixtures import (
    DistributionRegistry,
    RegistryProcess,
    TurbofsRegistry,
    distribution_config,
)
from tests.snapshotter_fixtures import SnapshotterProcess, proxy_plugin_toml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable
LINK_NAME: Final = "tfscold"
LINK_SUBNET: Final = "10.215.0"
NS_REG: Final = f"{LINK_NAME}-reg"
NS_NODE: Final = f"{LINK_NAME}-node"
ADDR_REG: Final = f"{LINK_SUBNET}.1"
ADDR_NODE: Final = f"{LINK_SUBNET}.2"
PORT_DISTRIBUTION: Final = 5000
PORT_TURBOFS: Final = 5050
CLONE_NEWNET: Final = 0x40000000
READY_TIMEOUT: Final = 900.0
PREFETCH_TIMEOUT: Final = 1800.0


@dataclass(frozen=True)
class BenchImage:
    """An image of :mod:`bench.images` and how its container is told to print READY."""

    name: str
    #: command replacing the image's entrypoint (None: the image's own prints READY)
    command: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Variant:
    """A turbofs path: which turbo image (with or without a recorded startup) and mount mode."""

    name: str
    traced: bool
    mode: str | None = None  # None: the node's default
    settings: tuple[tuple[str, bool | int | float | str], ...] = ()  # more [daemon] settings


VARIANTS: Final[dict[str, Variant]] = {
    v.name: v
    for v in (
        Variant("turbofs", False),
        Variant("turbofs+trace", True),
        # the same without the page-cache push of the startup's chunks (on by default)
        Variant("turbofs+trace-nopush", True, None, (("startup_notify_store", False),)),
        Variant("turbofs-fuse+trace", True, "fuse"),
    )
}
DEFAULT_VARIANTS: Final = "turbofs,turbofs+trace,turbofs+trace-nopush,turbofs-fuse+trace"


BENCH_IMAGES: Final[dict[str, BenchImage]] = {
    "python-1g": BenchImage("python-1g"),
    "python-5g": BenchImage("python-5g"),
    "python-10g": BenchImage("python-10g"),  # ~40 GB of scratch space with --variants turbofs+trace (bench/README.md)
    # CI's small variant: reads a few files of the image, then prints READY
    "sample": BenchImage("sample", ("sh", "-c", "cat /app/run.sh /app/VERSION >/dev/null && echo READY 0")),
}


def code_version() -> dict[str, Any]:
    """The commit this runs at, and the files changed since (mount daemons start from the tree)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=False)
    return {"commit": head.stdout.strip(), "uncommitted": [line[3:] for line in dirty.stdout.splitlines()]}


def log(msg: str) -> None:
    print(f"[coldstart {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_cmd(argv: Sequence[str], *, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def parse_rate(text: str) -> int | None:
    """``1gbit``, ``500mbit``, ``100kbit``, a plain bit rate, or ``none`` -> bits/s (None)."""
    text = text.strip().lower()
    if text in ("none", "0", ""):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(?:bit)?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (e.g. 1gbit, 500mbit, none)")
    return int(float(m[1]) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m[2]])


def stats(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


# --------------------------------------------------------------------------- the link


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Link(NetnsLink):
    """The benchmark's two namespaces, tbf on both egresses unless unshaped; this process can
    enter the node namespace (only its network namespace)."""

    def __init__(self, rate_bps: int | None) -> None:
        super().__init__(LINK_NAME, LINK_SUBNET, None if rate_bps is None else tbf_for_rate(rate_bps))
        self.rate_bps = rate_bps
        self._home: int | None = None

    def setup(self) -> dict[str, Any]:
        meta = super().setup()
        return {**meta, "registry_address": ADDR_REG, "node_address": ADDR_NODE, "rate_bps": self.rate_bps}

    def enter_node(self) -> None:
        """Move this process (and so every child it starts from now on) into the node namespace."""
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        _setns(f"/run/netns/{NS_NODE}")

    def leave_node(self) -> None:
        if self._home is not None:
            _setns(f"/proc/self/fd/{self._home}")
            os.close(self._home)
            self._home = None

    def teardown(self) -> None:
        self.leave_node()
        super().teardown()


# --------------------------------------------------------------------------- registries


def _nsenter(argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{NS_REG}", *argv]


class RegTurbofs(TurbofsRegistry):
    """The turbofs registry in the registry namespace; pushes open (a benchmark's own link)."""

    def _argv(self) -> list[str]:
        return _nsenter(super()._argv())


class RegDistribution(DistributionRegistry):
    """docker-registry in the registry namespace, on a fixed port."""

    def __init__(self, workdir: Path) -> None:
        RegistryProcess.__init__(self, workdir, workdir / "storage", host=ADDR_REG, port=PORT_DISTRIBUTION)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.config_path.write_text(distribution_config(self.storage, f"{ADDR_REG}:{PORT_DISTRIBUTION}", delete=False))

    def _argv(self) -> list[str]:
        return _nsenter(super()._argv())


def _stamp(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]).split(":")[1][:16]


def coldstart_cache() -> Path:
    from bench.images import cache_dir

    return cache_dir() / "bench" / "coldstart"


def turbo_layout(name: str, layout: Path, trace: Path | None = None) -> Path:
    """The turbo image of ``layout`` (with the startup ``trace`` if given), built once and cached."""
    import hashlib

    from index_builder.builder import build
    from turbofs.core.format import REVISION
    from turbofs.core.trace import load

    suffix = "" if trace is None else "-trace-" + hashlib.sha256(trace.read_bytes()).hexdigest()[:12]
    out = coldstart_cache() / f"{name}-{_stamp(layout)}-turbo-{REVISION}{suffix}"
    if not (out / "index.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"turbofs build {name}{' --startup-trace ' + str(trace) if trace else ''} -> {out}")
        build(f"oci:{layout}:latest", out, force=True, progress=False,
              startup_trace=None if trace is None else load(trace))
    return out


def trace_path(name: str, layout: Path) -> Path:
    """Where the recorded startup trace of image ``name`` is kept."""
    return coldstart_cache() / f"{name}-{_stamp(layout)}-startup-trace.json"


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    """Copy an image into a registry from inside the registry namespace (setup: not over the link)."""
    run_cmd(_nsenter(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", *extra, src,
                      dest]))


def turbofs_push(layout: Path, dest: str) -> None:
    """Push a turbo layout with ``turbofs push``, from inside the registry namespace (setup).
    (skopeo copies the ~750 blobs of python-5g's turbo image at ~2 MB/s, CPU-bound in skopeo.)"""
    run_cmd(_nsenter([PYTHON, "-m", "turbofs.cli", "push", f"oci:{layout}:latest", dest, "--plain-http",
                      "--no-progress"]))


# --------------------------------------------------------------------------- the node


class Node:
    """A fresh snapshotter + containerd (snapshotter first), all state in new folders."""

    def __init__(self) -> None:
        self.sn: SnapshotterProcess | None = None
        self.ctrd: Containerd | None = None

    def start(self, *, prefetch: bool = True, mode: str | None = None,
              settings: Sequence[tuple[str, bool | int | float | str]] = ()) -> None:
        base = Path(tempfile.mkdtemp(prefix="tfs-cold-", dir="/tmp"))
        self.sn = SnapshotterProcess(base, settings=f'plain_http = ["{ADDR_REG}:{PORT_TURBOFS}"]')
        with self.sn.config_path.open("a") as fh:  # [daemon] is the file's last table
            if not prefetch:
                fh.write("prefetch = false\n")
            if mode is not None:
                fh.write(f"mode = {json.dumps(mode)}\n")
            for key, value in settings:  # TOML scalars: JSON's spelling of them is TOML's too
                fh.write(f"{key} = {json.dumps(value)}\n")
        self.sn.start()
        self.ctrd = Containerd(proxy_plugin_toml(self.sn.address)).start()

    def stop(self) -> None:
        ctrd, sn, self.ctrd, self.sn = self.ctrd, self.sn, None, None
        if ctrd is not None:
            ctrd.stop()
        if sn is not None:
            sn.cleanup()

    @property
    def c(self) -> Containerd:
        assert self.ctrd is not None
        return self.ctrd

    @property
    def snap(self) -> SnapshotterProcess:
        assert self.sn is not None
        return self.sn

    def reset(self, *, prefetch: bool = True, mode: str | None = None,
              settings: Sequence[tuple[str, bool | int | float | str]] = ()) -> None:
        self.stop()
        drop_caches()
        self.start(prefetch=prefetch, mode=mode, settings=settings)


def _ready_line(out: IO[str], deadline: float, marker: str = "READY") -> tuple[float, list[str]]:
    """Read lines until one starts with ``marker``: (monotonic time it came, lines so far)."""
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            return time.monotonic(), lines
    raise RuntimeError("no READY line; output:\n" + "\n".join(lines[-40:]))


def _timed_ready(
    argv: Sequence[str], t0: float | None = None, on_ready: Callable[[], None] | None = None
) -> tuple[float, list[str]]:
    """Run ``argv``; seconds from ``t0`` (default: now) to its READY line (``on_ready`` is
    called then); then wait for its end."""
    start = time.monotonic() if t0 is None else t0
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO_ROOT, errors="replace")
    assert proc.stdout is not None
    try:
        t_ready, lines = _ready_line(proc.stdout, start + READY_TIMEOUT)
        if on_ready is not None:
            on_ready()
        rest = proc.stdout.read()
        rc = proc.wait(120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {rc}:\n" + "\n".join(lines) + rest)
    return t_ready - start, lines


def app_seconds(line: str) -> float | None:
    """``READY <s>``: the seconds the app says it ran (python-1g's app.py prints them)."""
    parts = line.split()
    try:
        return float(parts[1]) if len(parts) > 1 and float(parts[1]) > 0 else None
    except ValueError:
        return None


def with_app_times(row: dict[str, Any]) -> dict[str, Any]:
    """Add ``app_s`` (the app's own run time) and ``before_app_s`` (pull, mount, container start)."""
    app = app_seconds(row["ready_line"])
    row["app_s"] = app
    row["before_app_s"] = None if app is None else round(row["ready_s"] - app, 3)
    return row


def _vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Refs:
    plain: str
    turbo: str
    traced: str = ""


def run_standard(node: Node, link: Link, image: BenchImage, refs: Refs) -> dict[str, Any]:
    c = node.c
    ctr = ["ctr", "--address", c.address, "--namespace", c.namespace]
    b0 = link.rx_bytes()
    t0 = time.monotonic()
    run_cmd([*ctr, "images", "pull", "--plain-http", refs.plain], timeout=READY_TIMEOUT)
    pull_s = time.monotonic() - t0
    cmd = list(image.command or ())
    ready_s, lines = _timed_ready([*ctr, "run", "--rm", refs.plain, f"std-{secrets.token_hex(3)}", *cmd], t0)
    b1 = link.rx_bytes()
    drop_caches()
    warm_s, _ = _timed_ready([*ctr, "run", "--rm", refs.plain, f"std-w-{secrets.token_hex(3)}", *cmd])
    return {"path": "standard", "ready_s": round(ready_s, 3), "pull_s": round(pull_s, 3),
            "bytes_at_ready": b1 - b0, "bytes_total": b1 - b0, "warm_s": round(warm_s, 3),
            "ready_line": lines[-1]}


def _turbofs_argv(node: Node, image: BenchImage, ref: str) -> list[str]:
    c = node.c
    where = ["--address", c.address, "--namespace", c.namespace, "--snapshotter", "turbofs", "--plain-http"]
    argv = [PYTHON, "-m", "turbofs.cli", "run", "--rm", *where]
    if image.command:
        return [*argv, "--entrypoint", image.command[0], ref, "--", *image.command[1:]]
    return [*argv, ref]


def working_set(node: Node, link: Link, image: BenchImage, ref: str, trace_out: Path | None) -> dict[str, Any]:
    """A cold ``turbofs run`` of the turbo image ``ref`` without background prefetch (so a
    recorded startup in it changes nothing): what the startup itself fetches. With
    ``trace_out``, what it read is written there as a startup trace (``turbofs trace``)."""
    from turbofs.mount import ctl as mountctl

    node.reset(prefetch=False)
    b0 = link.rx_bytes()
    ready_s, lines = _timed_ready(_turbofs_argv(node, image, ref))
    b1 = link.rx_bytes()
    sn = node.snap
    (mp,) = sn.turbofs_mounts()
    fetched = fetch_figures(parse_metrics(mountctl.query(mp, "metrics", sn.run_dir)))
    ws = int(fetched["demand_bytes"] + fetched["readahead_bytes"])
    out = {"path": "turbofs-no-prefetch", "ready_s": round(ready_s, 3), "bytes_at_ready": b1 - b0,
           "working_set_bytes": ws, "fetch": fetched, "ready_line": lines[-1]}
    if trace_out is not None:
        run_cmd([PYTHON, "-m", "turbofs.cli", "trace", str(mp), "-o", str(trace_out), "--run-dir", str(sn.run_dir)])
        out["trace_chunks"] = len(json.loads(trace_out.read_text())["chunks"])
    return out


class PrefetchWatcher(threading.Thread):
    """Polls the mount daemon's status (every 0.2 s) from the moment the mount appears; notes
    when its background prefetch has ended."""

    def __init__(self, sn: SnapshotterProcess) -> None:
        super().__init__(daemon=True)
        self.sn = sn
        self.done_at: float | None = None
        self.stop = False
        self.error = ""

    def run(self) -> None:
        from turbofs.mount import ctl as mountctl

        deadline = time.monotonic() + PREFETCH_TIMEOUT
        while not self.stop and time.monotonic() < deadline:
            mounts = self.sn.turbofs_mounts()
            if mounts:
                try:
                    status = json.loads(mountctl.query(mounts[0], "status", self.sn.run_dir))
                except Exception as exc:  # not answering yet
                    self.error = f"{type(exc).__name__}: {exc}"
                else:
                    if status.get("prefetch", {}).get("state") in ("done", "stopped", "disabled"):
                        self.done_at = time.monotonic()
                        return
            time.sleep(0.2)


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_turbofs(node: Node, link: Link, image: BenchImage, refs: Refs, variant: Variant) -> dict[str, Any]:
    from turbofs.mount import ctl as mountctl

    sn = node.snap
    argv = _turbofs_argv(node, image, refs.traced if variant.traced else refs.turbo)
    b0 = link.rx_bytes()
    cached0 = _meminfo_kib("Cached")
    at: dict[str, Any] = {}

    def on_ready() -> None:  # figures at the moment READY arrives
        at["page_cache_growth_bytes"] = (_meminfo_kib("Cached") - cached0) * 1024
        with contextlib.suppress(Exception):
            (mp,) = sn.turbofs_mounts()
            st = json.loads(mountctl.query(mp, "status", sn.run_dir))
            at["daemon_cpu_s"] = round(_cpu_seconds(int(st["pid"])), 3)
            at["fuse_requests"] = st.get("fuse_requests", {})
            m = parse_metrics(mountctl.query(mp, "metrics", sn.run_dir))
            at["fuse_read_bytes"] = int(m.get("turbofs_read_bytes_total", 0))

    t0, t0_wall = time.monotonic(), time.time()
    watcher = PrefetchWatcher(sn)
    watcher.start()
    try:
        ready_s, lines = _timed_ready(argv, t0, on_ready)
    except BaseException:
        watcher.stop = True
        raise
    b_ready = link.rx_bytes()
    (mp,) = sn.turbofs_mounts()

    m_ready = parse_metrics(mountctl.query(mp, "metrics", sn.run_dir))
    at_ready = fetch_figures(m_ready)
    for what in ("bytes", "chunks"):
        at_ready[f"startup_{what}"] = m_ready.get(f'turbofs_fetch_{what}_total{{kind="startup"}}', 0.0)
    status = json.loads(mountctl.query(mp, "status", sn.run_dir))
    daemon_start_after_s = round(time.time() - float(status["uptime"]) - t0_wall, 3)
    # wait for the complete background prefetch (the watcher saw when it ended)
    watcher.join(max(1.0, t0 + PREFETCH_TIMEOUT - time.monotonic()))
    if watcher.done_at is None:
        watcher.stop = True
        raise RuntimeError(f"the prefetch did not end in {PREFETCH_TIMEOUT:.0f} s ({watcher.error or 'no error'})")
    status = json.loads(mountctl.query(mp, "status", sn.run_dir))
    state = status.get("prefetch", {}).get("state")
    prefetch_s = (watcher.done_at if watcher.done_at is not None else time.monotonic()) - t0
    b_all = link.rx_bytes()
    final = fetch_figures(parse_metrics(mountctl.query(mp, "metrics", sn.run_dir)))
    pid = int(status["pid"])
    rss = {"peak_rss_kib": _vm_kib(pid, "VmHWM"), "rss_kib": _vm_kib(pid, "VmRSS")}
    drop_caches()
    warm_s, _ = _timed_ready(argv)
    on_demand = at_ready["demand_bytes"] + at_ready["readahead_bytes"]
    return {"path": variant.name, "ready_s": round(ready_s, 3), "bytes_at_ready": b_ready - b0,
            "bytes_total": b_all - b0, "on_demand_bytes_at_ready": int(on_demand),
            "fetch_at_ready": at_ready, "fetch_final": final, "prefetch_state": state,
            "prefetch_s": round(prefetch_s, 3), "prefetch": status.get("prefetch", {}),
            "mount_daemon_started_at_s": daemon_start_after_s, "daemon_timeline": status.get("timeline"),
            "mode": status.get("mode"), "erofs": status.get("erofs"), "at_ready": at,
            **rss, "warm_s": round(warm_s, 3), "ready_line": lines[-1]}


# --------------------------------------------------------------------------- the benchmark


def bench_image(
    image: BenchImage, runs: int, link: Link, regs: tuple[RegDistribution, RegTurbofs],
    variants: Sequence[Variant], *, retrace: bool = False, trace_from: str | None = None,
) -> dict[str, Any]:
    """``trace_from``: use the startup trace recorded for that image (whose startup reads the
    same files) instead of recording one; then, when no path needs the turbo image without
    a trace, that image is neither built nor pushed (python-10g: ~7 GB less scratch space)."""
    from bench.images import INFO_FILE, ensure_image

    layout = ensure_image(image.name)
    info = json.loads((layout / INFO_FILE).read_text())
    dist, treg = regs
    refs = Refs(f"{dist.host_port}/{image.name}:latest", f"{treg.host_port}/{image.name}:turbo",
                f"{treg.host_port}/{image.name}:traced")
    want_trace = any(v.traced for v in variants)
    if trace_from is not None:
        trace = trace_path(trace_from, ensure_image(trace_from))
        if not trace.is_file():
            raise SystemExit(f"no recorded startup trace of {trace_from} ({trace}): run the benchmark on it first")
    else:
        trace = trace_path(image.name, layout)
    record = want_trace and trace_from is None and (retrace or not trace.is_file())
    plain_turbo = record or not want_trace or any(not v.traced for v in variants)
    log(f"{image.name}: copying into both registries")
    skopeo_copy(f"oci:{layout}:latest", f"docker://{refs.plain}", "--preserve-digests")
    turbo = turbo_layout(image.name, layout, None if plain_turbo else trace)
    turbofs_push(turbo, refs.turbo if plain_turbo else refs.traced)
    turbo_bytes = sum(f.stat().st_size for f in (turbo / "blobs").rglob("*") if f.is_file())
    rows: list[dict[str, Any]] = []
    node = Node()
    try:
        ws = with_app_times(working_set(node, link, image, refs.turbo if plain_turbo else refs.traced,
                                        trace if record else None))
        log(f"{image.name} working set: {ws['working_set_bytes'] / 1e6:.0f} MB "
            f"(READY after {ws['ready_s']:.2f} s without prefetch)")
        if want_trace:
            traced = turbo_layout(image.name, layout, trace)
            if plain_turbo:
                turbofs_push(traced, refs.traced)
            ws["trace"] = {"file": str(trace), "recorded_now": record, "layout": str(traced), "from_image": trace_from,
                           "chunks": len(json.loads(trace.read_text())["chunks"])}
        paths: list[Variant | None] = [None, *variants]  # None: the standard path
        for i in range(runs):
            shift = i % len(paths)
            for v in paths[shift:] + paths[:shift]:
                if v is None:
                    node.reset()
                    row = with_app_times(run_standard(node, link, image, refs))
                else:
                    node.reset(mode=v.mode, settings=v.settings)
                    row = with_app_times(run_turbofs(node, link, image, refs, v))
                row["run"] = i
                log(f"{image.name} run {i} {row['path']}: READY after {row['ready_s']:.2f} s, "
                    f"{row['bytes_at_ready'] / 1e6:.0f} MB at READY, warm {row['warm_s']:.2f} s")
                rows.append(row)
    finally:
        node.stop()
    return {"image": image.name, "uncompressed_bytes": info["uncompressed_bytes"],
            "compressed_bytes": info["compressed_bytes"], "turbo_layout_bytes": turbo_bytes,
            "command": list(image.command) if image.command else None, "working_set": ws,
            "runs": rows, "summary": summarize(rows, ws["working_set_bytes"], link.rate_bps)}


def turbo_paths(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The turbofs paths measured, in the order of :data:`VARIANTS`."""
    present = {r["path"] for r in rows} - {"standard"}
    return [p for p in VARIANTS if p in present] + sorted(present - set(VARIANTS))


def summarize(rows: list[dict[str, Any]], ws: int, rate_bps: int | None) -> dict[str, Any]:
    names = ["standard", *turbo_paths(rows)]
    by = {p: [r for r in rows if r["path"] == p] for p in names}
    out: dict[str, Any] = {}
    for path, rs in by.items():
        out[path] = {"ready_s": stats([r["ready_s"] for r in rs]), "warm_s": stats([r["warm_s"] for r in rs]),
                     "bytes_at_ready": int(statistics.median([r["bytes_at_ready"] for r in rs])),
                     "bytes_total": int(statistics.median([r["bytes_total"] for r in rs]))}
        if all(r.get("app_s") is not None for r in rs):
            out[path]["app_s"] = stats([r["app_s"] for r in rs])
            out[path]["before_app_s"] = stats([r["before_app_s"] for r in rs])
    std = out["standard"]["ready_s"]["median"]
    out["gains"] = {}
    for path in names[1:]:
        t = by[path]
        out[path].update({
            "working_set_bytes": ws,
            "on_demand_bytes_at_ready": int(statistics.median([r["on_demand_bytes_at_ready"] for r in t])),
            "prefetch_s": stats([r["prefetch_s"] for r in t]),
            "peak_rss_mib": stats([r["peak_rss_kib"] / 1024 for r in t], 1),
        })
        at = [r.get("at_ready") or {} for r in t]
        if all("daemon_cpu_s" in a for a in at):
            out[path]["at_ready"] = {
                "daemon_cpu_s": stats([a["daemon_cpu_s"] for a in at]),
                "fuse_requests": int(statistics.median([sum(a["fuse_requests"].values()) for a in at])),
                "fuse_read_bytes": int(statistics.median([a["fuse_read_bytes"] for a in at])),
                "page_cache_growth_bytes": int(statistics.median([a["page_cache_growth_bytes"] for a in at])),
            }
        out["gains"][path] = round(std / out[path]["ready_s"]["median"], 2)
    out["lower_bound_s"] = round(out["standard"]["warm_s"]["median"] + (ws * 8 / rate_bps if rate_bps else 0.0), 3)
    best = min(names[1:], key=lambda p: out[p]["ready_s"]["median"])
    out["best"] = best
    out["gain"] = out["gains"][best]
    if "turbofs" in out:  # the figures of the earlier, two-path form
        out["turbofs"]["gain"] = out["gains"]["turbofs"]
    return out


def _mmm(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} s ({s['min']:.1f}-{s['max']:.1f})"


def markdown(results: dict[str, Any]) -> str:
    rate = results["link"]["rate_bps"]
    imgs = sorted(results["images"], key=lambda i: i["uncompressed_bytes"])
    paths = list(dict.fromkeys(p for i in imgs for p in i["summary"]["gains"]))
    lines = [f"Link: {'unshaped veth' if rate is None else f'veth, tbf {rate / 1e9:g} Gbit/s'}; "
             f"median (min-max) of {results['runs']} runs per path.", "",
             "| image size | standard containerd | " + " | ".join(paths) + " | gain | lower bound |",
             "|---|---|" + "---|" * len(paths) + "---|---|"]
    for img in imgs:
        s = img["summary"]
        cells = [f"{_mmm(s[p]['ready_s'])}" if p in s else "-" for p in paths]
        lines.append(
            f"| {img['image']}: {img['uncompressed_bytes'] / 1e9:.2f} GB ({img['compressed_bytes'] / 1e9:.2f} GB gz) "
            f"| {_mmm(s['standard']['ready_s'])} | " + " | ".join(cells)
            + f" | {s['gain']:.1f}x ({s['best']}) | {s['lower_bound_s']:.1f} s |")
    lines += ["", "| image | path | gain | bytes at READY | prefetch complete | daemon peak RSS | at READY: "
              "FUSE requests, bytes served, daemon CPU, page cache growth |", "|---|---|---|---|---|---|---|"]
    for img in imgs:
        s = img["summary"]
        lines.append(f"| {img['image']} | standard | | {s['standard']['bytes_at_ready'] / 1e6:.0f} MB | | | |")
        for p in paths:
            if p not in s:
                continue
            t = s[p]
            a = t.get("at_ready")
            at = "-" if a is None else (
                f"{a['fuse_requests']:,}, {a['fuse_read_bytes'] / 1e6:.0f} MB, {a['daemon_cpu_s']['median']:.1f} s, "
                f"{a['page_cache_growth_bytes'] / 1e6:.0f} MB")
            lines.append(
                f"| {img['image']} | {p} | {s['gains'][p]:.1f}x | {t['bytes_at_ready'] / 1e6:.0f} MB "
                f"| {_mmm(t['prefetch_s'])} | {t['peak_rss_mib']['median']:.0f} MiB | {at} |")
    lines += ["", "Where the time goes (medians; app = the seconds the app itself reports, before = pull, "
              "mount and container start):", ""]
    for img in imgs:
        s, ws = img["summary"], img["working_set"]
        st = s["standard"]
        if "app_s" not in st:
            continue
        parts = [f"standard {st['before_app_s']['median']:.1f} s before the app + {st['app_s']['median']:.1f} s app "
                 f"(warm start {st['warm_s']['median']:.1f} s)"]
        for p in paths:
            t = s.get(p, {})
            if "app_s" in t:
                parts.append(f"{p} {t['before_app_s']['median']:.1f} s + {t['app_s']['median']:.1f} s "
                             f"(warm {t['warm_s']['median']:.1f} s)")
        parts.append(f"turbofs without prefetch: READY after {ws['ready_s']:.1f} s "
                     f"({ws['fetch']['demand_fetches']:.0f} demand fetches, "
                     f"{ws['fetch']['demand_fetch_seconds_sum']:.1f} s of fetch time, "
                     f"{ws['working_set_bytes'] / 1e6:.0f} MB)")
        lines.append(f"* {img['image']}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = sorted(results["images"], key=lambda i: i["uncompressed_bytes"])
    xs = [i["uncompressed_bytes"] / 1e9 for i in imgs]
    paths = list(dict.fromkeys(p for i in imgs for p in i["summary"]["gains"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "sD^v<>"
    series = [("standard", "containerd (ctr pull + run)", "o")]
    series += [(p, f"{p} run", markers[k % len(markers)]) for k, p in enumerate(paths)]
    for key, label, marker in series:
        pts = [(x, i["summary"][key]["ready_s"]) for x, i in zip(xs, imgs, strict=True) if key in i["summary"]]
        med = [st["median"] for _, st in pts]
        err = [[st["median"] - st["min"] for _, st in pts], [st["max"] - st["median"] for _, st in pts]]
        ax.errorbar([x for x, _ in pts], med, yerr=err, marker=marker, capsize=4, label=label)
    ax.plot(xs, [i["summary"]["lower_bound_s"] for i in imgs], "k--", marker="x", label="lower bound")
    rate = results["link"]["rate_bps"]
    ax.set_title(f"Cold start to READY ({'unshaped' if rate is None else f'{rate / 1e9:g} Gbit/s'} link)")
    ax.set_xlabel("image size, uncompressed (GB)")
    ax.set_ylabel("seconds (median, min-max)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, max(xs) * 1.15)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def bench_env(rate_bps: int | None) -> Iterator[tuple[Link, tuple[RegDistribution, RegTurbofs], dict[str, Any]]]:
    link = Link(rate_bps)
    work = Path(tempfile.mkdtemp(prefix="tfs-coldreg-", dir="/var/tmp"))
    dist = RegDistribution(work / "distribution")
    treg = RegTurbofs(work / "turbofs", settings={"push_auth": False}, host=ADDR_REG, port=PORT_TURBOFS)
    try:
        meta = link.setup()
        link.enter_node()
        dist.start()
        treg.start()
        yield link, (dist, treg), meta
    finally:
        for reg in (treg, dist):
            with contextlib.suppress(Exception):
                reg.stop()
        link.teardown()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--images", default="python-1g,python-5g", help=f"comma-separated, of {', '.join(BENCH_IMAGES)}")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rate", type=parse_rate, default=parse_rate("1gbit"), help="link rate (1gbit, 500mbit, none)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/coldstart.json")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated turbofs paths, of {', '.join(VARIANTS)}")
    p.add_argument("--retrace", action="store_true",
                   help="record the startup trace again (default: reuse the one recorded earlier for the image)")
    p.add_argument("--trace-from", metavar="IMAGE",
                   help="use IMAGE's recorded startup trace (an image with the same app, e.g. python-5g for "
                   "python-10g) instead of recording one; the turbo image without a trace is then only built "
                   "for the turbofs path")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--merge", type=Path, help="keep the images of this earlier results file (same link) "
                   "that this run does not measure, in the JSON, table and chart")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_IMAGES]
    if unknown or args.runs < 1:
        p.error(f"unknown images {unknown} (known: {', '.join(BENCH_IMAGES)})" if unknown else "--runs >= 1")
    if args.trace_from is not None and args.trace_from not in BENCH_IMAGES:
        p.error(f"--trace-from {args.trace_from}: unknown image (known: {', '.join(BENCH_IMAGES)})")
    vnames = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in vnames if n not in VARIANTS]
    if bad or not vnames:
        p.error(f"unknown variants {bad} (known: {', '.join(VARIANTS)})")
    variants = [VARIANTS[n] for n in vnames]
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, containerd, FUSE)")
    started = time.time()
    results: dict[str, Any] = {"benchmark": "coldstart", "runs": args.runs, "host": platform.node(),
                               "cpus": os.cpu_count(), "code": code_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with bench_env(args.rate) as (link, regs, meta):
        results["link"] = meta
        results["variants"] = vnames
        results["images"] = [bench_image(BENCH_IMAGES[n], args.runs, link, regs, variants, retrace=args.retrace,
                                         trace_from=args.trace_from)
                             for n in names]
    if args.merge is not None and args.merge.is_file():
        earlier = json.loads(args.merge.read_text())
        if earlier["link"]["rate_bps"] != args.rate:
            raise SystemExit(f"{args.merge} was measured at another link rate")
        kept = [i for i in earlier["images"] if i["image"] not in names]
        results["images"] = kept + results["images"]
        results["merged_from"] = {"file": str(args.merge), "images": [i["image"] for i in kept],
                                  "started": earlier.get("started")}
    results["seconds"] = round(time.time() - started, 1)
    results["table"] = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_chart:
        chart(results, args.out.with_suffix(".png"))
    print(results["table"], end="")
    log(f"wrote {args.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
