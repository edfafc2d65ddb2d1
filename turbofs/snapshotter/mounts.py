"""The turbofs mounts behind remote snapshots: one per image manifest, shared by every
snapshot and container of that image on the node.

The snapshotter sees a mount through :class:`Mounter` (``mount`` returns once it is ready,
``check``, ``unmount``). :class:`DaemonMounter` uses ``turbofs mount`` daemons in their own
sessions, so they outlive a snapshotter restart and are found again by ``check``; their state
folders lie under ``run_dir`` (``turbofs status MOUNTPOINT --run-dir RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

from turbofs.core.config import SPARE_REFILL_DELAY, UNMOUNT_WAIT, DaemonConfig
from turbofs.core.errors import TurboError
from turbofs.mount import ctl as mountctl
from turbofs.snapshotter.errors import MountFailed

log = logging.getLogger("turbofs.snapshotter")


class Mounter(Protocol):
    def mount(self, ref: str, mountpoint: Path, *, plain_http: bool) -> None:
        """Mount ``ref`` (``REGISTRY/REPO@DIGEST``) at ``mountpoint``; return once ready."""

    def check(self, mountpoint: Path) -> bool:
        """True if the mount at ``mountpoint`` is there and its daemon answers."""

    def unmount(self, mountpoint: Path) -> None:
        """Unmount and stop the daemon; raise if the mount is busy."""

    def close(self) -> None:
        """Release what the mounter holds (the mounts themselves stay)."""


class DaemonMounter:
    """``turbofs mount`` daemons (:func:`turbofs.mount.ctl.mount_background`).

    With ``spare`` (the default) it keeps one daemon started ahead of need
    (:class:`turbofs.mount.ctl.SpareDaemon`) and hands the next mount to it; the next spare
    starts ``spare_delay`` seconds later (a timer thread)."""

    def __init__(self, run_dir: Path, daemon_cfg: DaemonConfig, config_path: Path | None = None, *,
                 spare: bool = True, spare_delay: float = SPARE_REFILL_DELAY) -> None:
        self.run_dir = run_dir
        self.cfg = daemon_cfg
        self.config_path = config_path
        #: daemons started by this process: reaped once they exit (no zombies)
        self._children: set[int] = set()
        self._lock = threading.Lock()
        self._use_spare = spare
        self._spare_delay = spare_delay
        self._spare: mountctl.SpareDaemon | None = None
        self._refill: threading.Timer | None = None
        self._closed = False
        if spare:
            self._start_spare()

    def _start_spare(self) -> None:
        with self._lock:
            self._refill = None
            if self._closed or self._spare is not None:
                return
            try:
                self._spare = mountctl.SpareDaemon()
            except OSError as exc:
                log.warning("cannot start a spare mount daemon: %s", exc)

    def _take_spare(self) -> mountctl.SpareDaemon | None:
        """The spare for a mount now (None if there is none), and the next one scheduled."""
        with self._lock:
            spare, self._spare = self._spare, None
            if self._use_spare and not self._closed and self._refill is None:
                self._refill = threading.Timer(self._spare_delay, self._start_spare)
                self._refill.daemon = True
                self._refill.start()
        return spare

    @property
    def spare_pid(self) -> int | None:
        """The pid of the spare daemon waiting now, if any."""
        spare = self._spare
        return spare.pid if spare is not None else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            if self._refill is not None:
                self._refill.cancel()
        if spare is not None:
            spare.close()

    def reap(self) -> None:
        """Collect the exit status of our daemons that have exited."""
        with self._lock:
            for pid in list(self._children):
                self._reaped(pid)

    def _reaped(self, pid: int) -> bool:
        """Whether our daemon ``pid`` has exited, collecting its status (hold ``_lock``)."""
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            self._children.discard(pid)
        return bool(done)

    def _pid(self, mountpoint: Path) -> int | None:
        try:
            return int((mountctl.state_dir(self.run_dir, mountpoint) / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def mount(self, ref: str, mountpoint: Path, *, plain_http: bool) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(TurboError):
            mountctl.clean_stale(mountpoint)
        argv: list[str] = []
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        argv += ["mount", ref, str(mountpoint), "--run-dir", str(self.run_dir)]
        if self.cfg.cache_dir is not None:
            argv += ["--cache-dir", str(self.cfg.cache_dir)]
        if plain_http:
            argv.append("--plain-http")
        req = mountctl.MountRequest(ref=ref, mountpoint=mountpoint, cfg=self.cfg, run_dir=self.run_dir,
                                  scheme="http" if plain_http else None)
        self.reap()
        try:
            pid = mountctl.mount_background(argv, req, wait=False, spare=self._take_spare())
        except TurboError as exc:
            raise MountFailed(str(exc)) from None
        with self._lock:
            self._children.add(pid)
        log.info("mounted %s at %s (daemon pid %d)", ref, mountpoint, pid)

    def check(self, mountpoint: Path) -> bool:
        """Mounted, and its daemon answers on its control socket (a killed daemon, even one
        left a zombie, or a stale FUSE mount does not)."""
        if mountctl.is_stale_mount(str(mountpoint)) or not os.path.ismount(mountpoint):
            return False
        try:
            mountctl.query(mountpoint, "status", self.run_dir)
        except (OSError, TurboError) as exc:
            log.warning("the turbofs daemon of %s does not answer: %s", mountpoint, exc)
            return False
        return True

    def unmount(self, mountpoint: Path) -> None:
        pid = self._pid(mountpoint)
        if os.path.ismount(mountpoint) or mountctl.is_stale_mount(str(mountpoint)):
            # unmount; a daemon still there a moment later gets SIGTERM (it then cleans up)
            mountctl.unmount(mountpoint, self.run_dir, timeout=0.2)
        elif pid is not None:  # a daemon without its mount
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        if pid is not None and not self._wait_exit(pid, UNMOUNT_WAIT):
            log.warning("the turbofs daemon %d of %s did not exit: killing it", pid, mountpoint)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, UNMOUNT_WAIT)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        """Wait for daemon ``pid`` to exit, reaping it if it is our child; True if it did."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._reaped(pid) if pid in self._children else not _running(pid):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not: it waits for its parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


__all__ = ["DaemonMounter", "Mounter"]
