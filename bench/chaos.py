"""Chaos soak: containers started through the turbofs snapshotter for a fixed time while a
fault proxy (tests/faultproxy.py) between the node and the registry injects a seeded random
fault schedule, the registry process is SIGKILLed and restarted now and then, and the mount
daemon serving the running container's image is SIGKILLed while the container reads.

Each start is cold: a fresh snapshotter and containerd (own config, sockets, state and
chunk cache under /tmp, as bench/coldstart.py and tests/snapshotter_fixtures.py set them
up), then ``turbofs run --plain-http`` of the turbo image through the proxy. The container
hashes a fixed, seeded sample of the image's files (``sha256sum`` per file, timed with
``date +%s%N``) and prints one line per file; the soak compares each digest with the one
from the turbo layout's index.

Daemon kills (``--kill-daemon-every``, a seeded schedule of its own): when one is due, the
killer waits for a container that has hashed a seeded number of its files, then SIGKILLs
the mount daemon(s) of that start's snapshotter (their pid files under its run folder).
Reads after the kill must fail (ENOTCONN, ECONNABORTED, or EIO in erofs mode), never give
wrong bytes. The node of a start with a daemon kill is kept for the next start, which
meets the dead mount: the snapshotter has to notice it and mount the image again (its log
says so); that start's outcome is counted apart, and it is never a kill target.

Counted: starts, starts that succeeded, failures by cause, wrong bytes (a digest that does
not match: must be 0), reads over the timeout (a file whose read took longer than the
daemon's ``read_timeout`` plus ``--slack``: must be 0), read errors (EIO: allowed, counted)
by cause (``daemon killed``: a read that failed after its start's daemon kill, or with
ENOTCONN/ECONNABORTED; ``registry faults``: the others, from the proxy's faults and the
registry kills; ``dead mount not remounted``: ENOTCONN/ECONNABORTED in the start after a
kill; ``daemon died (not killed by the soak)``: the same in any other start; these two must
be 0), faults injected by class, registry kills, daemon kills, starts after a daemon kill
(each must find the snapshotter mounting the image again) and their outcome by cause, the
mount daemons' peak RSS against ``ram_cache_bytes`` plus a fixed overhead, and the chunk
cache's disk use against ``disk_cache_bytes``. The exit status is 1 when a must-be-0 count
is not, or a start after a kill found no remount.

In erofs mode (``auto`` picks it where the kernel can) a read after the kill fails with EIO,
not ENOTCONN: there the start after a kill is checked by the snapshotter's remount log line.

Command line::

    python -m bench.chaos [--image sample] [--duration 300] [--seed 1] [--read-timeout 5]
        [--kill-every 40] [--kill-daemon-every 45] [--files 150] [--out bench/results/chaos.json]

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
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

#: hashes each file given as an argument: "OK MILLISECONDS SHA256 PATH" per file, or
#: "ERR MILLISECONDS ERRNO:MESSAGE PATH" (ERRNO: ENOTCONN, ECONNABORTED, EIO or other);
#: stderr goes into the capture first, so that a failed open's message is caught too
CHECK_SCRIPT: Final = r"""
for f in "$@"; do
  s=$(date +%s%N)
  if d=$(sha256sum 2>&1 < "/$f"); then r=OK; else
    r=ERR
    case "$d" in
      *"not connected"*) d="ENOTCONN:$d" ;;
      *"onnection abort"*) d="ECONNABORTED:$d" ;;
      *"nput/output error"*) d="EIO:$d" ;;
      *) d="other:$d" ;;
    esac
  fi
  e=$(date +%s%N)
  printf '%s %s %s %s\n' "$r" "$(( (e - s) / 1000000 ))" "$(printf '%s' "$d" | tr '\n ' '__' | cut -c1-64)" "$f"
done
echo CHAOS-DONE
"""
#: the errnos of a read on a FUSE mount whose daemon died (in flight, then after)
DEAD_MOUNT_ERRNOS: Final = ("ENOTCONN", "ECONNABORTED")
#: what the snapshotter logs when it finds an image mount dead and mounts it again
REMOUNT_LOG: Final = "is gone: mounting it again"
#: read error causes the harness tells apart
DAEMON_KILLED: Final = "daemon killed"
REGISTRY_FAULTS: Final = "registry faults"
NOT_REMOUNTED: Final = "dead mount not remounted"
DAEMON_DIED: Final = "daemon died (not killed by the soak)"


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


class Reading:
    """The container start under way, as the daemon killer sees it."""

    def __init__(self, sn: SnapshotterProcess, killable: bool) -> None:
        self.sn, self.killable = sn, killable
        self.lock = threading.Lock()
        self.lines = 0  # per-file lines the container printed so far
        self.done = False  # the container has exited: too late for a kill
        self.kill: dict[str, Any] | None = None  # set by the killer: pids, after_lines, at, rss_kib


class DaemonKiller(threading.Thread):
    """SIGKILLs the mount daemons of the start under way, on a seeded schedule of its own: a
    gap of ``every`` times 0.5-1.5, then the kill once the container has hashed a drawn
    number of files (1 to half of them); a kill falls due again at the next start if this one
    ends first or may not be hit."""

    def __init__(self, every: float, seed: int, files: int) -> None:
        super().__init__(daemon=True)
        self.every, self.files, self.kills = every, files, 0
        self.rng = random.Random(f"daemon-kill-{seed}")
        self.current: Reading | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every * self.rng.uniform(0.5, 1.5)):
            after = self.rng.randint(1, max(1, self.files // 2))
            while not self.halt.is_set() and not self._try(after):
                self.halt.wait(0.05)

    def _try(self, after: int) -> bool:
        """Kill the daemons of the current start if it has read ``after`` files; whether it did."""
        target = self.current
        if target is None or not target.killable:
            return False
        with target.lock:
            if target.done or target.lines < after:
                return False
            pids = target.sn.daemon_pids()
            if not pids:
                return False
            rss = max(_vm_kib(pid, "VmHWM") for pid in pids)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            target.kill = {"pids": pids, "after_lines": target.lines, "at": time.monotonic(), "rss_kib": rss}
        self.kills += 1
        log(f"SIGKILLed mount daemon(s) {pids} after {target.lines} files")
        return True


class Node:
    """A fresh snapshotter (its own cache) and a containerd that uses it."""

    def __init__(self, proxy_host: str, read_timeout: float) -> None:
        base = Path(tempfile.mkdtemp(prefix="tfs-chaos-", dir="/tmp"))
        self.sn = SnapshotterProcess(base, settings=f'plain_http = ["{proxy_host}"]')
        with self.sn.config_path.open("a") as fh:  # [daemon] is the file's last table
            fh.write(f"read_timeout = {read_timeout}\nram_cache_bytes = {RAM_CACHE}\ndisk_cache_bytes = {DISK_CACHE}\n")
        self.ctrd: Containerd | None = None
        try:
            self.sn.start()
            self.ctrd = Containerd(proxy_plugin_toml(self.sn.address)).start()
        except BaseException:
            self.close()
            raise

    @property
    def containerd(self) -> Containerd:
        assert self.ctrd is not None
        return self.ctrd

    def close(self) -> None:
        if self.ctrd is not None:
            with contextlib.suppress(Exception):
                self.ctrd.stop()
            self.ctrd = None
        self.sn.cleanup()


def one_start(ref: str, nd: Node, want: dict[str, str], read_timeout: float, slack: float,
              killer: DaemonKiller | None, after_kill: bool, t0: float) -> dict[str, Any]:
    """One container start on node ``nd`` (cold unless ``after_kill``: then the node of the
    start whose daemon was killed); its figures."""
    row: dict[str, Any] = {"ok": False, "wrong_bytes": 0, "reads_over_timeout": 0, "read_errors": 0,
                           "read_errors_by_cause": {}, "files_checked": 0, "cause": None,
                           "after_daemon_kill": after_kill}
    sn, c = nd.sn, nd.containerd
    remounts_before = sn.log().count(REMOUNT_LOG)
    argv = [PYTHON, "-m", "turbofs.cli", "run", "--rm", "--address", c.address, "--namespace", c.namespace,
            "--snapshotter", "turbofs", "--plain-http", "--entrypoint", "sh", ref, "--",
            "-c", CHECK_SCRIPT, "chaos", *sorted(want)]
    peak: dict[int, int] = {}
    reading = Reading(sn, killable=not after_kill)
    lines: list[tuple[float, str]] = []  # (arrival, line) of the container's output
    err_parts: list[str] = []
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                errors="replace")

        def pump_out() -> None:
            assert proc.stdout is not None
            for text in proc.stdout:
                lines.append((time.monotonic(), text.rstrip("\n")))
                if text.startswith(("OK ", "ERR ")):
                    reading.lines += 1

        def pump_err() -> None:
            assert proc.stderr is not None
            err_parts.append(proc.stderr.read())

        pumps = [threading.Thread(target=f, daemon=True) for f in (pump_out, pump_err)]
        for t in pumps:
            t.start()
        if killer is not None:
            killer.current = reading
        try:
            proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            row["cause"] = f"hang (start over {START_TIMEOUT:.0f} s)"
        finally:
            with reading.lock:
                reading.done = True
            if killer is not None:
                killer.current = None
        for t in pumps:
            t.join(30)
        for pid in sn.daemon_pids():
            peak[pid] = _vm_kib(pid, "VmHWM")
        row["cache_disk_bytes"] = _du(sn.cache_dir)
    finally:
        row["seconds"] = round(time.monotonic() - t0, 2)
    kill = reading.kill
    if kill is not None:
        row["daemon_kill"] = {"pids": kill["pids"], "after_files": kill["after_lines"],
                              "at_seconds": round(kill["at"] - t0, 2)}
        peak[-1] = kill["rss_kib"]
    if after_kill:
        row["remounted"] = sn.log().count(REMOUNT_LOG) > remounts_before
    row["daemon_peak_rss_kib"] = max(peak.values(), default=0)
    out, err = "\n".join(line for _, line in lines), "".join(err_parts)
    done = parse_output(row, lines, want, read_timeout, slack, kill["at"] if kill is not None else None)
    if row["wrong_bytes"]:  # the same files read again from the host, through the image mount
        row["host_reread"] = host_reread(sn, row["wrong"], want)
    by_cause = row["read_errors_by_cause"]
    if row["cause"] is None:
        if proc.returncode == 0 and done and row["files_checked"] == len(want) and not row["read_errors"]:
            row["ok"] = True
        elif by_cause.get(NOT_REMOUNTED) or by_cause.get(DAEMON_DIED):
            row["cause"] = NOT_REMOUNTED if by_cause.get(NOT_REMOUNTED) else DAEMON_DIED
        elif kill is not None and (by_cause.get(DAEMON_KILLED) or not row["read_errors"]):
            row["cause"] = DAEMON_KILLED
        elif row["read_errors"]:
            row["cause"] = "read EIO"
        else:
            row["cause"] = classify(err + out[-2000:])
    if not row["ok"]:
        row["stderr_tail"] = err[-600:]
    if row["wrong_bytes"] or by_cause.get(NOT_REMOUNTED) or by_cause.get(DAEMON_DIED):
        row["evidence"] = keep_evidence(sn)
    return row


def keep_evidence(sn: SnapshotterProcess) -> str:
    """Copy the snapshotter's and its mount daemons' logs out of the node (which is removed
    after the start) into a folder under /var/tmp; its path."""
    dest = Path(tempfile.mkdtemp(prefix="tfs-chaos-evidence-", dir="/var/tmp"))
    with contextlib.suppress(OSError):
        shutil.copyfile(sn.log_path, dest / "snapshotter.log")
    for daemon_log in sn.run_dir.glob("*/daemon.log"):
        with contextlib.suppress(OSError):
            shutil.copyfile(daemon_log, dest / f"daemon-{daemon_log.parent.name}.log")
    return str(dest)


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


def parse_output(row: dict[str, Any], lines: list[tuple[float, str]], want: dict[str, str], read_timeout: float,
                 slack: float, killed_at: float | None) -> bool:
    """Count the container's per-file lines (with their arrival times) into ``row``; whether
    it printed its last line. A read error's cause: ``daemon killed`` if it came after this
    start's daemon kill or has a dead-mount errno, ``dead mount not remounted`` for a
    dead-mount errno in the start after a kill, ``registry faults`` otherwise."""
    done = False
    causes: Counter[str] = Counter()
    for arrived, line in lines:
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
            dead_errno = digest.split(":", 1)[0] in DEAD_MOUNT_ERRNOS
            if killed_at is not None and (arrived >= killed_at or dead_errno):
                cause = DAEMON_KILLED
            elif dead_errno and row["after_daemon_kill"]:
                cause = NOT_REMOUNTED
            elif dead_errno:
                cause = DAEMON_DIED
            else:
                cause = REGISTRY_FAULTS
            causes[cause] += 1
            row.setdefault("errors", []).append(f"{path}: {digest} [{cause}]")
        elif digest != want[path]:
            row["wrong_bytes"] += 1
            row.setdefault("wrong", []).append(f"{path}: got {digest}, expected {want[path]}")
        if int(ms) > (read_timeout + slack) * 1000:
            row["reads_over_timeout"] += 1
            row.setdefault("slow", []).append(f"{path}: {int(ms)} ms")
    row["read_errors_by_cause"] = dict(causes)
    return done


def summarize(rows: list[dict[str, Any]], proxy: FaultProxy, kills: int, daemon_kills: int) -> dict[str, Any]:
    causes = Counter(r["cause"] for r in rows if not r["ok"])
    peak = max((r["daemon_peak_rss_kib"] for r in rows), default=0)
    disk = max((r.get("cache_disk_bytes", 0) for r in rows), default=0)
    error_causes: Counter[str] = Counter()
    for r in rows:
        error_causes.update(r["read_errors_by_cause"])
    killed = [r for r in rows if "daemon_kill" in r]
    after = [r for r in rows if r["after_daemon_kill"]]
    return {
        "starts": len(rows), "succeeded": sum(r["ok"] for r in rows),
        "failures_by_cause": dict(causes),
        "wrong_bytes": sum(r["wrong_bytes"] for r in rows),
        "reads_over_timeout": sum(r["reads_over_timeout"] for r in rows),
        "read_errors": sum(r["read_errors"] for r in rows),
        "read_errors_by_cause": dict(error_causes),
        "files_checked": sum(r["files_checked"] for r in rows),
        "faults_injected": dict(proxy.injected), "blob_requests": proxy.blob_requests,
        "registry_kills": kills,
        "daemon_kills": daemon_kills,
        "daemon_kills_that_failed_reads": sum(bool(r["read_errors_by_cause"].get(DAEMON_KILLED)) for r in killed),
        "starts_after_daemon_kill": len(after),
        "starts_after_daemon_kill_succeeded": sum(r["ok"] for r in after),
        "starts_after_daemon_kill_failures_by_cause": dict(Counter(r["cause"] for r in after if not r["ok"])),
        "starts_after_daemon_kill_remounted": sum(bool(r.get("remounted")) for r in after),
        "daemon_peak_rss_kib": peak, "rss_bound_kib": (RAM_CACHE + RSS_OVERHEAD) // 1024,
        "rss_bound_held": peak <= (RAM_CACHE + RSS_OVERHEAD) // 1024,
        "cache_disk_max_bytes": disk, "disk_bound_bytes": DISK_CACHE, "disk_bound_held": disk <= DISK_CACHE,
        "start_seconds_median": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else None,
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


def markdown(s: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        ("duration (s)", args.duration), ("seed", args.seed), ("image", args.image),
        ("starts", s["starts"]), ("succeeded", s["succeeded"]),
        ("failures by cause", _counts(s["failures_by_cause"])),
        ("files checked", s["files_checked"]), ("**wrong bytes** (must be 0)", s["wrong_bytes"]),
        (f"**reads over timeout** ({args.read_timeout:g} s + {args.slack:g} s; must be 0)", s["reads_over_timeout"]),
        ("read errors (EIO)", s["read_errors"]),
        ("read errors by cause", _counts(s["read_errors_by_cause"])),
        ("blob requests / faults injected", f"{s['blob_requests']} / {sum(s['faults_injected'].values())} "
         f"({', '.join(f'{k} {v}' for k, v in sorted(s['faults_injected'].items()))})"),
        ("registry SIGKILLs", s["registry_kills"]),
        ("daemon SIGKILLs (that failed reads)", f"{s['daemon_kills']} ({s['daemon_kills_that_failed_reads']})"),
        ("starts after a daemon kill / succeeded / remounted", f"{s['starts_after_daemon_kill']} / "
         f"{s['starts_after_daemon_kill_succeeded']} / {s['starts_after_daemon_kill_remounted']}"),
        ("failures after a daemon kill by cause", _counts(s["starts_after_daemon_kill_failures_by_cause"])),
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
    p.add_argument("--kill-daemon-every", type=float, default=45.0,
                   help="mean seconds between SIGKILLs of the running container's mount daemon (0: none)")
    p.add_argument("--files", type=int, default=150, help="files each container hashes")
    p.add_argument("--rates", type=parse_rates, default=parse_rates(""),
                   help="fault probabilities, NAME=P,... (default: "
                   + ",".join(f"{k}={v}" for k, v in DEFAULT_RATES.items()) + ")")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/chaos.json")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.files < 1 or args.read_timeout <= 0:
        p.error("--duration, --files and --read-timeout must be positive")
    if args.kill_every < 0 or args.kill_daemon_every < 0:
        p.error("--kill-every and --kill-daemon-every must be 0 (off) or positive")
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
    dkiller = DaemonKiller(args.kill_daemon_every, args.seed, len(want)) if args.kill_daemon_every > 0 else None
    loops: list[Killer | DaemonKiller] = []  # both threads, to start and to halt alike
    if killer is not None:
        loops.append(killer)
    if dkiller is not None:
        loops.append(dkiller)
    nd: Node | None = None
    try:
        run_cmd([PYTHON, "-m", "turbofs.cli", "push", f"oci:{layout}:latest", f"{reg.host_port}/chaos/{args.image}:turbo",
                 "--plain-http", "--no-progress"])
        ref = f"{proxy.host_port}/chaos/{args.image}:turbo"
        proxy.faults.stall_seconds = STALL_SECONDS
        proxy.faults.schedule = schedule
        for thread in loops:
            thread.start()
        end = time.monotonic() + args.duration
        while True:
            after_kill = nd is not None  # the node of a start whose daemon was killed: its next start
            if not after_kill and time.monotonic() >= end:
                break
            t0 = time.monotonic()
            if nd is None:
                nd = Node(proxy.host_port, args.read_timeout)
            row = one_start(ref, nd, want, args.read_timeout, args.slack, dkiller, after_kill, t0)
            rows.append(row)
            if after_kill or "daemon_kill" not in row:
                nd.close()
                nd = None
            log(f"start {len(rows)}{' (after a daemon kill)' if after_kill else ''}: "
                f"{'ok' if row['ok'] else row['cause']} in {row['seconds']} s (wrong {row['wrong_bytes']}, "
                f"slow {row['reads_over_timeout']}, EIO {row['read_errors']} {row['read_errors_by_cause']})")
    finally:
        for thread in loops:
            thread.halt.set()
            if thread.ident is not None:  # started
                thread.join(30)
        if nd is not None:
            nd.close()
        proxy.close()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows, proxy, killer.kills if killer is not None else 0,
                        dkiller.kills if dkiller is not None else 0)
    results = {"benchmark": "chaos", "host": platform.node(), "cpus": os.cpu_count(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
               "seconds": round(time.time() - started, 1),
               "command": "python -m bench.chaos " + " ".join(sys.argv[1:] if argv is None else argv),
               "settings": {"image": args.image, "duration": args.duration, "seed": args.seed,
                            "read_timeout": args.read_timeout, "slack": args.slack, "kill_every": args.kill_every,
                            "kill_daemon_every": args.kill_daemon_every,
                            "files": len(want), "rates": args.rates, "stall_seconds": STALL_SECONDS,
                            "ram_cache_bytes": RAM_CACHE, "disk_cache_bytes": DISK_CACHE},
               "summary": summary, "starts": rows}
    results["table"] = markdown(summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"], end="")
    log(f"wrote {args.out}")
    failed = (summary["wrong_bytes"] or summary["reads_over_timeout"]
              or summary["read_errors_by_cause"].get(NOT_REMOUNTED) or summary["read_errors_by_cause"].get(DAEMON_DIED)
              or summary["starts_after_daemon_kill_remounted"] < summary["starts_after_daemon_kill"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
