"""Controlling mounts from outside the daemon: start one, wait for it, ask it (the client
of :mod:`turbofs.mount.control`), unmount it.

Kept free of the daemon's imports (FUSE, trio, the reader), so that ``turbofs mount`` (which
only spawns the daemon and waits for its "ready") and ``turbofs status``/``umount`` start
fast. The daemon itself is :mod:`turbofs.mount.daemon`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from turbofs.core.config import (
    FUSE_ATTR_TIMEOUT,
    FUSE_READAHEAD_KB,
    MOUNT_READY_TIMEOUT,
    SPARE_WAIT,
    UMOUNT_TIMEOUT,
    DaemonConfig,
)
from turbofs.core.errors import TurboError, UsageError

log = logging.getLogger("turbofs.daemon")

#: Where each mount's state folder lives (pid, control socket, log): gone at reboot, as the mounts.
DEFAULT_RUN_DIR: Final = Path("/run/turbofs/mounts")
#: The daemon's event when its prefetch ended with chunks not on disk (followed by the summary);
#: "prefetched" means every chunk is.
PREFETCH_INCOMPLETE: Final = "prefetch-incomplete"


@dataclass
class MountRequest:
    ref: str
    mountpoint: Path
    cfg: DaemonConfig
    run_dir: Path = DEFAULT_RUN_DIR
    auth: Any = None
    scheme: str | None = None
    platform: str | None = None
    attr_timeout: float = FUSE_ATTR_TIMEOUT
    readahead_kb: int = FUSE_READAHEAD_KB
    allow_other: bool = True


def state_dir(run_dir: Path, mountpoint: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]
    return run_dir / key


def daemon_pid(state: Path) -> int | None:
    """The pid its daemon wrote into the state folder ``state``, or None."""
    try:
        return int((state / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def clean_stale(mountpoint: Path) -> bool:
    """Lazily unmount FUSE mounts on ``mountpoint`` whose daemon died (ENOTCONN); True if
    there were any. A dead erofs-mode daemon's mounts: :func:`turbofs.mount.erofsmount.unmount_dead_erofs`."""
    found = False
    for _ in range(16):  # stacked dead mounts go one at a time
        if not is_stale_mount(str(mountpoint)):
            return found
        found = True
        log.warning("%s: a mount left by a dead daemon: unmounting it", mountpoint)
        for argv in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
            with contextlib.suppress(OSError):
                if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
                    break
        else:
            raise TurboError(f"{mountpoint}: a stale mount could not be removed")
    raise TurboError(f"{mountpoint}: stale mounts keep coming back")


def is_stale_mount(path: str) -> bool:
    """True if ``path`` is a FUSE mount whose daemon is gone (ENOTCONN).

    statfs always reaches the daemon; stat may be answered from the kernel's attribute cache.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


class SpareDaemon:
    """A mount daemon started ahead of need (:mod:`turbofs.mount.spare`): its interpreter up
    and its modules imported, it waits for the arguments of one mount (:func:`mount_background`),
    which saves that start on the way to a ready mount. Detached like any daemon (its own
    session); it exits on :meth:`close` or when its starter goes away (end of its input)."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "turbofs.mount.spare", str(write_fd)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(write_fd,), start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.events_fd = read_fd
        self._warm = False
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def warm(self, timeout: float = 0.0) -> bool:
        """Whether its imports are done (it said ``spare``), waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self._warm and self.proc.poll() is None:
            ready, _, _ = select.select([self.events_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            piece = os.read(self.events_fd, 4096)
            if not piece:
                break
            self._buf += piece
            self._warm = b"spare\n" in self._buf
        return self._warm

    def hand(self, argv_tail: list[str], log_path: Path, timeout: float = SPARE_WAIT) -> subprocess.Popen[bytes]:
        """Make it the daemon of ``turbofs ARGV_TAIL`` (waiting up to ``timeout`` s for a
        spare still importing: it is ahead of a new process all the same); raises OSError
        if it is gone. Its events pipe then belongs to the caller."""
        if not self.warm(timeout) or self.proc.stdin is None or self.proc.poll() is not None:
            raise OSError(errno.ESRCH, "the spare daemon is not ready or has exited")
        self.proc.stdin.write(json.dumps({"argv": argv_tail, "log": str(log_path)}).encode() + b"\n")
        self.proc.stdin.close()
        return self.proc

    def close(self) -> None:
        """Let it go (it exits by itself) and release its pipe."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        with contextlib.suppress(OSError):
            os.close(self.events_fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)


def mount_background(argv_tail: list[str], req: MountRequest, *, wait: bool, spare: SpareDaemon | None = None) -> int:
    """Start the daemon as a detached process and return once the mount is ready. A warm
    ``spare`` becomes the daemon (then it is used up: the caller drops it), else a new
    process starts."""
    state = state_dir(req.run_dir, req.mountpoint)
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "daemon.log"
    proc: subprocess.Popen[bytes] | None = None
    read_fd = -1
    if spare is not None:
        try:
            proc, read_fd = spare.hand(argv_tail, log_path), spare.events_fd
        except OSError as exc:
            log.info("spare daemon %d not usable (%s): starting a new one", spare.pid, exc)
            spare.close()
    if proc is None:
        read_fd, write_fd = os.pipe()
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "turbofs.cli", *argv_tail, "--foreground", "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                pass_fds=(write_fd,), start_new_session=True,
            )
        os.close(write_fd)
    seen: set[str] = set()
    incomplete: str | None = None  # the daemon's summary of a prefetch that ended short
    deadline = time.monotonic() + MOUNT_READY_TIMEOUT
    buf = b""
    with os.fdopen(read_fd, "rb", buffering=0) as events:
        while True:
            if "ready" in seen and (not wait or "prefetched" in seen or incomplete is not None):
                break
            # no deadline once mounted: a full prefetch (--wait) takes as long as it takes
            left = None if "ready" in seen else deadline - time.monotonic()
            if left is not None and left <= 0:
                proc.kill()
                break
            ready, _, _ = select.select([events], [], [], left)
            if not ready:
                continue
            piece = events.read(4096)
            if not piece:
                break  # the daemon exited
            buf += piece
            *lines, buf = buf.split(b"\n")
            for line in lines:
                event = line.decode(errors="replace").strip()
                if event.startswith(PREFETCH_INCOMPLETE + " "):
                    incomplete = event[len(PREFETCH_INCOMPLETE) + 1 :]
                else:
                    seen.add(event)
    if "ready" not in seen:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        reason = next((ln.split("error: ", 1)[1] for ln in reversed(tail) if "error: " in ln), " / ".join(tail))
        raise TurboError(f"mount of {req.ref} at {req.mountpoint} failed: {reason} (log: {log_path})")
    if wait and incomplete is not None:
        raise TurboError(f"{req.ref} is mounted at {req.mountpoint} (daemon pid {proc.pid}) but not all local: "
                         f"prefetch {incomplete} (log: {log_path})")
    if wait and "prefetched" not in seen:
        raise TurboError(f"{req.ref}: the daemon stopped before the prefetch completed (log: {log_path})")
    return proc.pid


def unmount(mountpoint: Path, run_dir: Path = DEFAULT_RUN_DIR, timeout: float = UMOUNT_TIMEOUT) -> None:
    """Unmount ``mountpoint`` and wait for its daemon to exit."""
    pid = daemon_pid(state_dir(run_dir, mountpoint))
    if not os.path.ismount(mountpoint) and not is_stale_mount(str(mountpoint)):
        if pid is None:
            raise UsageError(f"{mountpoint} is not mounted")
    else:
        for argv in (["fusermount3", "-u", str(mountpoint)], ["umount", str(mountpoint)]):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
        else:
            if is_stale_mount(str(mountpoint)):
                clean_stale(mountpoint)
            else:
                raise TurboError(f"{mountpoint}: unmount failed: {proc.stderr.strip()} (busy?)")
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def query(mountpoint: Path, what: str = "status", run_dir: Path = DEFAULT_RUN_DIR) -> str:
    """Ask the daemon of ``mountpoint`` for its status (JSON) or metrics (Prometheus text)."""
    import socket

    path = state_dir(run_dir, mountpoint) / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(what.encode() + b"\n")
        chunks = []
        while piece := s.recv(65536):
            chunks.append(piece)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise UsageError(f"{mountpoint}: no turbofs daemon serves this mountpoint") from None
        raise
    finally:
        s.close()
    return b"".join(chunks).decode()
