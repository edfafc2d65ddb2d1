"""Chaos soak: containers started through the turbofs snapshotter for a fixed time while a
fault proxy (tests/faultproxy.py) between the node and the registry injects a seeded random
fault schedule, and the registry process is SIGKILLed and restarted now and then.

Each start is cold: a fresh snapshotter and containerd (own config, sockets, state and
chunk cache under /tmp, as bench/coldstart.py and tests/snapshotter_fixtures.py set them
up), then ``turbofs run --plain-http`` of the turbo image through the proxy. The container
hashes a fixed, seeded sample of the image's files (``sha256sum`` per file, timed with
``date +%s%N``) and prints one line per file; the soak compares each digest with the one
from the turbo layout's index.

Counted: starts, starts that succeeded, failures by cause, wrong bytes (a digest that does
not match: must be 0), reads over the timeout (a file whose read took longer than the
daemon's ``read_timeout`` plus ``--slack``: must be 0), read errors (EIO: allowed, counted),
faults injected by class, registry kills, the mount daemons' peak RSS against
``ram_cache_bytes`` plus a fixed overhead, and the chunk cache's disk use against
``disk_cache_bytes``.

Command line::

    python -m bench.chaos [--image sample] [--duration 300] [--seed 1] [--read-timeout 5]
        [--kill-every 40] [--files 150] [--out bench/results/chaos.json]

Needs root, /dev/fuse, containerd, ctr, runc. Everything listens on loopback. Writes JSON to
``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from tests.containerd_fixtures import Containerd
from tests.faultproxy import FaultProxy, Schedule
from tests.registry_fixtures import TurbofsRegistry
from tests.snapshotter_fixtures import SnapshotterProcess, proxy_plugin_toml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable
MiB: Final = 1 << 20
#: fault probabilities per blob answer (the proxy draws at most one per answer)
DEFAULT_RATES: Final[dict[str, float]] = {
    "drop": 0.02, "reset": 0.02, "truncate": 0.02, "corrupt": 0.02, "error_5xx": 0.03,
    "error_503": 0.02, "throttle": 0.02, "stall": 0.005, "stall_mid": 0.005,
}
#: a stalled request is cut after this many seconds (the node's own timeouts act first)
STALL_SECONDS: Final = 20.0
#: RSS a mount daemon may use beyond its RAM cache bound (interpreter, index, buffers)
RSS_OVERHEAD: Final = 256 * MiB
RAM_CACHE: Final = 64 * MiB
DISK_CACHE: Final = 512 * MiB
#: one container start (pull, mount, hashing) may take at most this long before it is a hang
START_TIMEOUT: Final = 300.0

#: hashes each file given as an argument: "OK|ERR MILLISECONDS SHA256 PATH" per file
CHECK_SCRIPT: Final = r"""
for f in "$@"; do
  s=$(date +%s%N)
  if d=$(sha256sum < "/$f" 2>&1); then r=OK; else r=ERR; fi
  e=$(date +%s%N)
  printf '%s %s %s %s\n' "$r" "$(( (e - s) / 1000000 ))" "$(echo "$d" | tr ' ' '_' | cut -c1-64)" "$f"
done
echo CHAOS-DONE
"""


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_cmd(argv: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def expected_files(layout: Path, count: int, seed: int) -> dict[str, str]:
    """A seeded sample of ``count`` regular files of the turbo image (always the largest
    ones under /app too): path (no leading slash) -> sha256 hex of its bytes."""
    from turbofs.core.image import open_layout_image

    img = open_layout_image(layout)
    regs = [(os.fsdecode(p).lstrip("/"), ino) for p, ino in img.index.walk() if img.index.inode(ino).is_reg]
    regs = [(p, ino) for p, ino in regs if "\n" not in p]
    rng = random.Random(seed)
    pick = [r for r in regs if r[0].startswith("app/")]
    rest = [r for r in regs if not r[0].startswith("app/")]
    pick += rng.sample(rest, min(len(rest), max(0, count - len(pick))))
    return {p: hashlib.sha256(img.read(ino)).hexdigest() for p, ino in pick}


def _vm_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
    return total


def classify(text: str) -> str:
    """A failure's cause, from what ``turbofs run`` or the container printed."""
    low = text.lower()
    for key, cause in (("input/output error", "read EIO"), ("timed out", "timeout"), ("timeout", "timeout"),
                       ("digest", "digest mismatch (refused)"), ("transport endpoint", "mount gone (ENOTCONN)"),
                       ("snapshotter", "snapshotter"), ("registry", "registry unreachable"),
                       ("connect", "registry unreachable")):
        if key in low:
            return cause
    return "other"


class Killer(threading.Thread):
    """SIGKILLs the registry every ``every`` seconds and starts it again a second later."""

    def __init__(self, reg: TurbofsRegistry, every: float) -> None:
        super().__init__(daemon=True)
        self.reg, self.every, self.kills = reg, every, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.reg.kill()
            self.kills += 1
            time.sleep(1.0)
            try:
                self.reg.start()
            except Exception as exc:  # logged; tried again on the next round
                log(f"registry restart failed: {exc}")


@contextlib.contextmanager
def node(proxy_host: str, read_timeout: float) -> Iterator[tuple[SnapshotterProcess, Containerd]]:
    """A fresh snapshotter (its own cache) and a containerd that uses it."""
    base = Path(tempfile.mkdtemp(prefix="tfs-chaos-", dir="/tmp"))
    sn = SnapshotterProcess(base, settings=f'plain_http = ["{proxy_host}"]')
    with sn.config_path.open("a") as fh:  # [daemon] is the file's last table
        fh.write(f"read_timeout = {read_timeout}\nram_cache_bytes = {RAM_CACHE}\ndisk_cache_bytes = {DISK_CACHE}\n")
    ctrd: Containerd | None = None
    try:
        sn.start()
        ctrd = Containerd(proxy_plugin_toml(sn.address)).start()
        yield sn, ctrd
    finally:
        if ctrd is not None:
            with contextlib.suppress(Exception):
                ctrd.stop()
        sn.cleanup()


def one_start(ref: str, proxy_host: str, want: dict[str, str], read_timeout: float, slack: float) -> dict[str, Any]:
    """One cold container start; its figures."""
    row: dict[str, Any] = {"ok": False, "wrong_bytes": 0, "reads_over_timeout": 0, "read_errors": 0,
                           "files_checked": 0, "cause": None}
    t0 = time.monotonic()
    with node(proxy_host, read_timeout) as (sn, c):
        argv = [PYTHON, "-m", "turbofs.cli", "run", "--rm", "--address", c.address, "--namespace", c.namespace,
                "--snapshotter", "turbofs", "--plain-http", "--entrypoint", "sh", ref, "--",
                "-c", CHECK_SCRIPT, "chaos", *sorted(want)]
        peak: dict[int, int] = {}
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                    errors="replace")
            try:
                out, err = proc.communicate(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                row["cause"] = f"hang (start over {START_TIMEOUT:.0f} s)"
            for pid in sn.daemon_pids():
                peak[pid] = _vm_kib(pid, "VmHWM")
            row["cache_disk_bytes"] = _du(sn.cache_dir)
        finally:
            row["seconds"] = round(time.monotonic() - t0, 2)
        row["daemon_peak_rss_kib"] = max(peak.values(), default=0)
        done = parse_output(row, out, want, read_timeout, slack)
        if row["wrong_bytes"]:  # the same files read again from the host, through the image mount
            row["host_reread"] = host_reread(sn, row["wrong"], want)
        if row["cause"] is None:
            if proc.returncode == 0 and done and row["files_checked"] == len(want) and not row["read_errors"]:
                row["ok"] = True
            elif row["read_errors"]:
                row["cause"] = "read EIO"
            else:
                row["cause"] = classify(err + out[-2000:])
                row["stderr_tail"] = err[-600:]
    return row


def host_reread(sn: SnapshotterProcess, wrong: list[str], want: dict[str, str]) -> list[str]:
    """For a wrong digest seen in the container: the digest of the same file read on the host."""
    out = []
    mounts = sn.turbofs_mounts()
    for item in wrong:
        path = item.split(": got ", 1)[0]
        for mp in mounts:
            try:
                got = hashlib.sha256((mp / path).read_bytes()).hexdigest()
                out.append(f"{path} via {mp}: {'right' if got == want[path] else 'WRONG ' + got}")
            except OSError as exc:
                out.append(f"{path} via {mp}: {exc}")
    return out


def parse_output(row: dict[str, Any], out: str, want: dict[str, str], read_timeout: float, slack: float) -> bool:
    """Count the container's per-file lines into ``row``; whether it printed its last line."""
    done = False
    for line in out.splitlines():
        if line == "CHAOS-DONE":
            done = True
            continue
        parts = line.split(" ", 3)
        if len(parts) != 4 or parts[0] not in ("OK", "ERR") or parts[3] not in want:
            continue
        status, ms, digest, path = parts
        row["files_checked"] += 1
        if status == "ERR":
            row["read_errors"] += 1
            row.setdefault("errors", []).append(f"{path}: {digest}")
        elif digest != want[path]:
            row["wrong_bytes"] += 1
            row.setdefault("wrong", []).append(f"{path}: got {digest}, expected {want[path]}")
        if int(ms) > (read_timeout + slack) * 1000:
            row["reads_over_timeout"] += 1
            row.setdefault("slow", []).append(f"{path}: {int(ms)} ms")
    return done


def summarize(rows: list[dict[str, Any]], proxy: FaultProxy, kills: int) -> dict[str, Any]:
    causes = Counter(r["cause"] for r in rows if not r["ok"])
    peak = max((r["daemon_peak_rss_kib"] for r in rows), default=0)
    disk = max((r.get("cache_disk_bytes", 0) for r in rows), default=0)
    return {
        "starts": len(rows), "succeeded": sum(r["ok"] for r in rows),
        "failures_by_cause": dict(causes),
        "wrong_bytes": sum(r["wrong_bytes"] for r in rows),
        "reads_over_timeout": sum(r["reads_over_timeout"] for r in rows),
        "read_errors": sum(r["read_errors"] for r in rows),
        "files_checked": sum(r["files_checked"] for r in rows),
        "faults_injected": dict(proxy.injected), "blob_requests": proxy.blob_requests,
        "registry_kills": kills,
        "daemon_peak_rss_kib": peak, "rss_bound_kib": (RAM_CACHE + RSS_OVERHEAD) // 1024,
        "rss_bound_held": peak <= (RAM_CACHE + RSS_OVERHEAD) // 1024,
        "cache_disk_max_bytes": disk, "disk_bound_bytes": DISK_CACHE, "disk_bound_held": disk <= DISK_CACHE,
        "start_seconds_median": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else None,
    }


def markdown(s: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        ("duration (s)", args.duration), ("seed", args.seed), ("image", args.image),
        ("starts", s["starts"]), ("succeeded", s["succeeded"]),
        ("failures by cause", ", ".join(f"{k}: {v}" for k, v in s["failures_by_cause"].items()) or "none"),
        ("files checked", s["files_checked"]), ("**wrong bytes** (must be 0)", s["wrong_bytes"]),
        (f"**reads over timeout** ({args.read_timeout:g} s + {args.slack:g} s; must be 0)", s["reads_over_timeout"]),
        ("read errors (EIO)", s["read_errors"]),
        ("blob requests / faults injected", f"{s['blob_requests']} / {sum(s['faults_injected'].values())} "
         f"({', '.join(f'{k} {v}' for k, v in sorted(s['faults_injected'].items()))})"),
        ("registry SIGKILLs", s["registry_kills"]),
        ("daemon peak RSS (MiB) / bound", f"{s['daemon_peak_rss_kib'] / 1024:.0f} / {s['rss_bound_kib'] / 1024:.0f} "
         f"({'held' if s['rss_bound_held'] else 'EXCEEDED'})"),
        ("cache disk max (MiB) / bound", f"{s['cache_disk_max_bytes'] / MiB:.1f} / {s['disk_bound_bytes'] / MiB:.0f} "
         f"({'held' if s['disk_bound_held'] else 'EXCEEDED'})"),
        ("median start (s)", s["start_seconds_median"]),
    ]
    return "| chaos soak | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def parse_rates(text: str) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_RATES)
    rates = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--rates: {item!r} is not NAME=PROBABILITY") from None
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--image", default="sample", help="an image of bench.images")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of soak (a start under way finishes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--read-timeout", type=float, default=5.0, help="the mount daemons' read_timeout")
    p.add_argument("--slack", type=float, default=5.0, help="seconds over the read timeout a read may take")
    p.add_argument("--kill-every", type=float, default=40.0, help="seconds between registry SIGKILLs (0: none)")
    p.add_argument("--files", type=int, default=150, help="files each container hashes")
    p.add_argument("--rates", type=parse_rates, default=parse_rates(""),
                   help="fault probabilities, NAME=P,... (default: "
                   + ",".join(f"{k}={v}" for k, v in DEFAULT_RATES.items()) + ")")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/chaos.json")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.files < 1 or args.read_timeout <= 0:
        p.error("--duration, --files and --read-timeout must be positive")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("containerd") is None:
        p.error("needs root, /dev/fuse and containerd")
    from bench.coldstart import turbo_layout
    from bench.images import ensure_image

    schedule = Schedule(args.seed, args.rates)  # checks the names and the sum
    layout = turbo_layout(args.image, ensure_image(args.image))
    want = expected_files(layout, args.files, args.seed)
    work = Path(tempfile.mkdtemp(prefix="tfs-chaos-reg-", dir="/var/tmp"))
    reg = TurbofsRegistry(work)
    started = time.time()
    rows: list[dict[str, Any]] = []
    reg.start()
    proxy = FaultProxy(reg.url)
    killer = Killer(reg, args.kill_every) if args.kill_every > 0 else None
    try:
        run_cmd([PYTHON, "-m", "turbofs.cli", "push", f"oci:{layout}:latest", f"{reg.host_port}/chaos/{args.image}:turbo",
                 "--plain-http", "--no-progress"])
        ref = f"{proxy.host_port}/chaos/{args.image}:turbo"
        proxy.faults.stall_seconds = STALL_SECONDS
        proxy.faults.schedule = schedule
        if killer is not None:
            killer.start()
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            row = one_start(ref, proxy.host_port, want, args.read_timeout, args.slack)
            rows.append(row)
            log(f"start {len(rows)}: {'ok' if row['ok'] else row['cause']} in {row['seconds']} s "
                f"(wrong {row['wrong_bytes']}, slow {row['reads_over_timeout']}, EIO {row['read_errors']})")
    finally:
        if killer is not None:
            killer.halt.set()
            killer.join(30)
        proxy.close()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows, proxy, killer.kills if killer is not None else 0)
    results = {"benchmark": "chaos", "host": platform.node(), "cpus": os.cpu_count(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
               "seconds": round(time.time() - started, 1),
               "command": "python -m bench.chaos " + " ".join(sys.argv[1:] if argv is None else argv),
               "settings": {"image": args.image, "duration": args.duration, "seed": args.seed,
                            "read_timeout": args.read_timeout, "slack": args.slack, "kill_every": args.kill_every,
                            "files": len(want), "rates": args.rates, "stall_seconds": STALL_SECONDS,
                            "ram_cache_bytes": RAM_CACHE, "disk_cache_bytes": DISK_CACHE},
               "summary": summary, "starts": rows}
    results["table"] = markdown(summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"], end="")
    log(f"wrote {args.out}")
    return 0 if summary["wrong_bytes"] == 0 and summary["reads_over_timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
