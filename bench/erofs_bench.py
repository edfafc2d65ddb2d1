"""The erofs presentation's readahead and caching, measured (issue #7), and the startup
page-cache push.

``reads`` (the default): a local turbo layout of ``python-1g`` (the cold-start benchmark's
cached build) mounted with ``turbofs mount --mode erofs --no-prefetch`` over a disk cache
that already holds every chunk (one ``mount --wait`` first), then, per variant:

* ``fuse_ra_kb``: ``read_ahead_kb`` of the FUSE image file's bdi (the daemon sets 1024; set
  before erofs opens the file, by running the daemon with ``MountRequest.readahead_kb``);
* ``erofs_ra_kb``: ``read_ahead_kb`` of the erofs mount's own bdi (the kernel's 128);
* ``directio``: erofs reads the image file with O_DIRECT (``mount -o remount,ro,directio``),
  so its bytes are not also kept in the FUSE file's page cache.

The knobs come from ``turbofs status`` (``erofs.fuse_bdi``, ``erofs.erofs_bdi``) and are
written after the mount (erofs's before any file is opened). Two workloads, each on a fresh mount with the page cache dropped
(so the daemon's RAM tier is empty and its disk tier is read from disk):

* ``bigfile``: the image's largest file read front to back in 1 MiB reads;
* ``startup``: ``find`` over the whole tree, then every regular file of the recorded
  startup trace (``python-1g-*-startup-trace.json``, field ``files``) read whole.

Per run: wall seconds of the workload, FUSE read requests and bytes through FUSE (the
daemon's counters), daemon CPU seconds, and the growth of ``Cached`` in /proc/meminfo.
Variants are interleaved (the order rotates every run); the summary has medians.

``coldstart``: ``bench.coldstart`` (``--images python-1g --variants ...``) with the traced
image in the erofs mode, with and without ``[daemon] startup_notify_store``, interleaved in
one invocation (two extra variants whose mount daemons get that setting).

Command lines::

    python -m bench.erofs_bench [reads] [--runs 3] [--out bench/results/erofs.json]
    python -m bench.erofs_bench coldstart [--runs 3] [--out bench/results/erofs.json]

Both merge their part into ``--out`` (``reads`` / ``coldstart`` keys). Needs root,
/dev/fuse and erofs; ``coldstart`` what bench.coldstart needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable
READ_SIZE: Final = 1 << 20
#: The daemon, as ``turbofs mount --foreground`` runs it, with the FUSE file's readahead set.
DAEMON: Final = """
import json, sys
from pathlib import Path
from turbofs.core.config import daemon_config
from turbofs.mount.ctl import MountRequest
from turbofs.mount.daemon import run_foreground
a = json.loads(sys.argv[1])
cfg = daemon_config(Path("/dev/null"), cache_dir=Path(a["cache_dir"]), mode="erofs", prefetch=False)
run_foreground(MountRequest(a["ref"], Path(a["mp"]), cfg, run_dir=Path(a["run_dir"]), readahead_kb=a["ra"]))
"""



#: (fuse_ra_kb, erofs_ra_kb, directio): the daemon's defaults first
VARIANTS: Final = [
    (1024, 128, False), (128, 128, False), (1024, 1024, False), (128, 1024, False), (4096, 128, False),
    (1024, 128, True), (1024, 1024, True),
]


def vname(v: tuple[int, int, bool]) -> str:
    return f"fuse{v[0]}-erofs{v[1]}{'-directio' if v[2] else ''}"


def log(msg: str) -> None:
    print(f"[erofs_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = Path(os.environ.get("TURBOFS_CACHE", Path.home() / ".cache" / "turbofs"))
    return base / "bench" / "coldstart"


def python_1g() -> tuple[Path, Path]:
    """The cached plain turbo layout of python-1g and its startup trace."""
    layouts = sorted(p for p in cache_root().glob("python-1g-*-turbo") if p.is_dir())
    traces = sorted(cache_root().glob("python-1g-*-startup-trace.json"))
    if not layouts or not traces:
        raise SystemExit(f"no python-1g turbo layout or startup trace under {cache_root()}: "
                         "run python -m bench.coldstart --images python-1g once")
    return layouts[0], traces[0]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def turbofs(*args: str) -> str:
    proc = subprocess.run([PYTHON, "-m", "turbofs.cli", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"turbofs {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Bench:
    def __init__(self, layout: Path, base: Path) -> None:
        self.layout = layout
        self.base = base
        self.run_dir = base / "run"
        self.cache_dir = base / "cache"
        self.mp = base / "mnt"
        self.mp.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def mounted(self, fuse_ra_kb: int = 1024) -> Iterator[dict[str, Any]]:
        """A ``turbofs mount --mode erofs --no-prefetch --foreground`` whose FUSE file gets
        ``fuse_ra_kb`` of readahead before erofs opens it (``MountRequest.readahead_kb``:
        a file's readahead is fixed when it is opened, so sysfs afterwards would not do)."""
        args = {"ref": f"oci:{self.layout}", "mp": str(self.mp), "run_dir": str(self.run_dir),
                "cache_dir": str(self.cache_dir), "ra": fuse_ra_kb}
        proc = subprocess.Popen([PYTHON, "-c", DAEMON, json.dumps(args)], stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            while "turbofs: ready" not in (line := proc.stderr.readline()):
                if not line:
                    raise RuntimeError(f"the mount did not come up: {proc.stderr.read()}")
            drain = threading.Thread(target=proc.stderr.read, daemon=True)  # its log must not block it
            drain.start()
            yield self.status()
        finally:
            # the daemon is our child: reap it while `turbofs umount` waits for it to go
            umount = subprocess.Popen([PYTHON, "-m", "turbofs.cli", "umount", str(self.mp), "--run-dir",
                                       str(self.run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            umount.wait()

    def fill_cache(self) -> None:
        turbofs("mount", f"oci:{self.layout}", str(self.mp), "--mode", "erofs", "--wait", "--run-dir",
                str(self.run_dir), "--cache-dir", str(self.cache_dir))
        turbofs("umount", str(self.mp), "--run-dir", str(self.run_dir))

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = json.loads(turbofs("status", str(self.mp), "--run-dir", str(self.run_dir)))
        return st

    def read_bytes_metric(self) -> int:
        for line in turbofs("status", str(self.mp), "--metrics", "--run-dir", str(self.run_dir)).splitlines():
            if line.startswith("turbofs_read_bytes_total"):
                return int(float(line.split()[-1]))
        return 0


def largest_file(layout: Path) -> str:
    from turbofs.core.image import open_layout_image

    index = open_layout_image(layout).index
    best, size = "", -1
    for raw, ino in index.walk():
        node = index.inode(ino)
        if (node.mode & 0o170000) == 0o100000 and node.size > size:
            best, size = raw.decode(errors="surrogateescape"), node.size
    return best.lstrip("/")


def read_whole(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(READ_SIZE)
            if not b:
                return n
            n += len(b)


def workload(kind: str, mp: Path, big: str, files: Sequence[str]) -> int:
    if kind == "bigfile":
        return read_whole(mp / big)
    subprocess.run(["find", str(mp)], stdout=subprocess.DEVNULL, check=True)
    n = 0
    for f in files:
        p = mp / f.lstrip("/")
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                n += read_whole(p)
    return n


def set_knobs(st: dict[str, Any], mp: Path, v: tuple[int, int, bool]) -> None:
    e = st["erofs"]
    got = int(Path(f"/sys/class/bdi/{e['fuse_bdi']}/read_ahead_kb").read_text())
    if got != v[0]:
        raise RuntimeError(f"the FUSE file's readahead is {got} KiB, not {v[0]}")
    if e.get("erofs_bdi"):
        Path(f"/sys/class/bdi/{e['erofs_bdi']}/read_ahead_kb").write_text(f"{v[1]}\n")
    elif v[1] != 128:
        raise RuntimeError("the erofs mount's bdi is unknown")
    if v[2]:
        subprocess.run(["mount", "-o", "remount,ro,directio", str(mp)], check=True, capture_output=True)
        opts = next(ln.split()[3] for ln in Path("/proc/mounts").read_text().splitlines() if ln.split()[1] == str(mp))
        if "directio" not in opts.split(","):
            raise RuntimeError(f"directio did not take: {opts}")


def one_run(b: Bench, kind: str, v: tuple[int, int, bool], big: str, files: Sequence[str]) -> dict[str, Any]:
    with b.mounted(v[0]) as st:
        set_knobs(st, b.mp, v)
        pid = int(st["pid"])
        drop_caches()
        reads0 = b.status()["fuse_requests"].get("read", 0)
        bytes0, cpu0, cached0 = b.read_bytes_metric(), cpu_seconds(pid), meminfo_kib("Cached")
        t0 = time.perf_counter()
        n = workload(kind, b.mp, big, files)
        wall = time.perf_counter() - t0
        cached1, cpu1 = meminfo_kib("Cached"), cpu_seconds(pid)
        reads1 = b.status()["fuse_requests"].get("read", 0)
        bytes1 = b.read_bytes_metric()
    return {"workload": kind, "variant": vname(v), "fuse_ra_kb": v[0], "erofs_ra_kb": v[1], "directio": v[2],
            "wall_s": round(wall, 3), "bytes_read": n, "fuse_reads": reads1 - reads0,
            "fuse_bytes": bytes1 - bytes0, "daemon_cpu_s": round(cpu1 - cpu0, 3),
            "page_cache_growth_bytes": (cached1 - cached0) * 1024}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in dict.fromkeys(r["workload"] for r in rows):
        out[kind] = {}
        for name in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["workload"] == kind and r["variant"] == name]
            out[kind][name] = {k: statistics.median(r[k] for r in rs) for k in
                               ("wall_s", "fuse_reads", "fuse_bytes", "daemon_cpu_s", "page_cache_growth_bytes")}
            out[kind][name]["wall_min"] = min(r["wall_s"] for r in rs)
            out[kind][name]["wall_max"] = max(r["wall_s"] for r in rs)
    return out


def markdown(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for kind, by in summary.items():
        lines += [f"{kind}:", "", "| variant | wall s, median (min-max) | FUSE reads | MB through FUSE | "
                  "daemon CPU s | page cache growth MB |", "|---|---|---|---|---|---|"]
        for name, s in by.items():
            lines.append(f"| {name} | {s['wall_s']:.2f} ({s['wall_min']:.2f}-{s['wall_max']:.2f}) | "
                         f"{s['fuse_reads']:.0f} | {s['fuse_bytes'] / 1e6:.0f} | {s['daemon_cpu_s']:.2f} | "
                         f"{s['page_cache_growth_bytes'] / 1e6:.0f} |")
        lines.append("")
    return "\n".join(lines)


def cmd_reads(runs: int) -> dict[str, Any]:
    layout, trace = python_1g()
    files = [f for f in json.loads(trace.read_text())["files"] if isinstance(f, str)]
    big = largest_file(layout)
    base = Path(tempfile.mkdtemp(prefix="tfs-erofsbench-", dir="/var/tmp"))
    b = Bench(layout, base)
    rows: list[dict[str, Any]] = []
    try:
        log(f"filling the disk cache from {layout}")
        b.fill_cache()
        order = list(VARIANTS)
        for i in range(runs):
            shift = i % len(order)
            for kind in ("bigfile", "startup"):
                for v in order[shift:] + order[:shift]:
                    row = one_run(b, kind, v, big, files)
                    row["run"] = i
                    log(f"run {i} {kind} {row['variant']}: {row['wall_s']:.2f} s, {row['fuse_reads']} reads, "
                        f"{row['fuse_bytes'] / 1e6:.0f} MB via FUSE, cpu {row['daemon_cpu_s']:.2f} s, "
                        f"cache +{row['page_cache_growth_bytes'] / 1e6:.0f} MB")
                    rows.append(row)
    finally:
        with contextlib.suppress(Exception):
            if os.path.ismount(b.mp):
                turbofs("umount", str(b.mp), "--run-dir", str(b.run_dir))
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(rows)
    return {"layout": str(layout), "trace": str(trace), "bigfile": big, "startup_files": len(files),
            "runs": runs, "rows": rows, "summary": summary, "table": markdown(summary)}


# --------------------------------------------------------------------------- coldstart

STORE_VARIANTS: Final = {"turbofs+trace+store": True, "turbofs+trace-store": False}


def cmd_coldstart(runs: int, out: Path) -> dict[str, Any]:
    """bench.coldstart with two erofs variants of the traced image: startup_notify_store on/off."""
    from bench import coldstart as cs

    for name, on in STORE_VARIANTS.items():
        cs.VARIANTS[name] = cs.Variant(name, True, "erofs", (("startup_notify_store", on),))
    tmp = Path(tempfile.mkdtemp(prefix="tfs-erofscold-")) / "coldstart.json"
    cs.main(["--images", "python-1g", "--runs", str(runs), "--variants", ",".join(STORE_VARIANTS),
             "--out", str(tmp), "--no-chart"])
    res: dict[str, Any] = json.loads(tmp.read_text())
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.erofs_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", default="reads", choices=("reads", "coldstart"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/erofs.json")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (mounts, drop_caches, sysfs)")
    from bench.coldstart import code_version

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "erofs"}
    started = time.time()
    part = cmd_reads(args.runs) if args.what == "reads" else cmd_coldstart(args.runs, args.out)
    part.update({"host": platform.node(), "cpus": os.cpu_count(), "code": code_version(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                 "seconds": round(time.time() - started, 1)})
    results[args.what] = part
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(part.get("table", ""), end="")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
