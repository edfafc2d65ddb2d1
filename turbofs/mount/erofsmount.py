"""The life of an erofs-mode mount: the image file's private FUSE mount and the kernel's
erofs mount on top of it.

::

    <state>/erofs/              the private FUSE mount (turbofs.mount.erofsfile)
        image.erofs             metadata from memory, data from the chunk reader
    MOUNTPOINT                  erofs mounted from <state>/erofs/image.erofs (file-backed;
                                a loop device on kernels without file-backed mounts)

:meth:`ErofsMount.start` (after FUSE_INIT) raises the FUSE readahead, warms the metadata in
the page cache, mounts erofs and detaches the private FUSE mount: the erofs superblock alone
holds the image file open, so the daemon ends when the kernel lets go, and a killed daemon
leaves no FUSE mount (:func:`unmount_dead_erofs` removes its erofs mount). O_DIRECT opens fail
with EINVAL on a file-backed mount (the loop fallback and ``--mode fuse`` allow them).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any, Final

import trio

from turbofs.core.config import (
    DEFAULT_EROFS_MOUNT_OPTIONS,
    DEFAULT_EROFS_READAHEAD_KB,
    EROFS_WARM_STEP,
    FUSE_READAHEAD_KB,
)
from turbofs.core.errors import TurboError
from turbofs.erofs import ErofsImage
from turbofs.mount import kernel
from turbofs.mount.ctl import daemon_pid
from turbofs.mount.erofsfile import IMAGE_NAME

log = logging.getLogger("turbofs.erofs")

#: The private FUSE mount's folder in the mount's state folder.
HIDDEN_DIR: Final = "erofs"


def _image_file(state: Path) -> Path:
    return state / HIDDEN_DIR / os.fsdecode(IMAGE_NAME)


def _is_our_erofs(mountpoint: Path, state: Path) -> bool:
    entry = kernel.mount_entry(mountpoint)
    return entry is not None and entry[0] == "erofs" and entry[1] == os.fsencode(_image_file(state))


def _daemon_alive(state: Path) -> bool:
    pid = daemon_pid(state)
    if pid is None or pid == os.getpid():
        return False
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in (b"Z", b"X")  # a zombie serves nothing


def unmount_dead_erofs(state: Path, mountpoint: Path) -> bool:
    """Remove what a killed erofs-mode daemon of ``mountpoint`` left: its erofs mount at
    ``mountpoint`` and its private FUSE mount, no longer served. True if there was some."""
    cleaned = False
    hidden = state / HIDDEN_DIR
    if _daemon_alive(state):
        return False
    if _is_our_erofs(mountpoint, state):
        log.warning("%s: an erofs mount left by a dead daemon: unmounting it", mountpoint)
        with contextlib.suppress(OSError):
            kernel.umount(mountpoint, lazy=True)
            cleaned = True
    try:
        os.stat(hidden)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            with contextlib.suppress(OSError):
                kernel.umount(hidden, lazy=True)
                cleaned = True
    return cleaned


class ErofsMount:
    """The erofs side of one daemon: the private FUSE mount's folder and the kernel mount."""

    def __init__(self, state: Path, target: Path, image: ErofsImage, *, readahead_kb: int = FUSE_READAHEAD_KB,
                 erofs_readahead_kb: int = DEFAULT_EROFS_READAHEAD_KB, options: str = DEFAULT_EROFS_MOUNT_OPTIONS,
                 warm_meta: bool = True) -> None:
        self.state = state
        self.hidden = state / HIDDEN_DIR
        self.target = target
        self.image = image
        self.readahead_kb = readahead_kb  # of the FUSE file (its bdi)
        self.erofs_readahead_kb = erofs_readahead_kb  # of the erofs mount's files; 0: the kernel's
        self.options = options
        self.fuse_bdi: str | None = None  # names under /sys/class/bdi, for status and benchmarks
        self.erofs_bdi: str | None = None
        self.warm_meta = warm_meta
        self.how: str | None = None  # "file" or "loop" once mounted
        self.hidden_mounted = False

    @property
    def image_file(self) -> Path:
        return _image_file(self.state)

    def prepare_dir(self) -> Path:
        self.hidden.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.hidden

    def _warm(self) -> None:
        fd = os.open(self.image_file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into the data region
            for pos in range(0, self.image.meta_size, EROFS_WARM_STEP):
                os.pread(fd, min(EROFS_WARM_STEP, self.image.meta_size - pos), pos)
        finally:
            os.close(fd)

    async def start(self) -> None:
        """After FUSE_INIT: tune, warm, mount erofs, detach the private mount."""
        self.hidden_mounted = True
        t0 = time.monotonic()
        self.fuse_bdi = await trio.to_thread.run_sync(kernel.bdi_of, self.image_file)
        if self.readahead_kb:
            await trio.to_thread.run_sync(kernel.set_readahead, self.fuse_bdi, self.readahead_kb)
        t1 = time.monotonic()
        if self.warm_meta:
            await trio.to_thread.run_sync(self._warm)
        t2 = time.monotonic()
        before = kernel.erofs_bdis()
        try:
            self.how = await trio.to_thread.run_sync(
                lambda: kernel.mount_erofs(self.image_file, self.target, options=self.options)
            )
        except OSError as exc:
            raise TurboError(f"cannot mount erofs at {self.target}: {exc.strerror} (try --mode fuse)") from None
        self.erofs_bdi = await trio.to_thread.run_sync(self._find_erofs_bdi, before)
        if self.erofs_readahead_kb and self.erofs_bdi:
            await trio.to_thread.run_sync(kernel.set_readahead, self.erofs_bdi, self.erofs_readahead_kb)
        await trio.to_thread.run_sync(lambda: kernel.umount(self.hidden, lazy=True))
        self.hidden_mounted = False
        self.image.stats["warm_ms"] = round((t2 - t1) * 1000)
        self.image.stats["mount_ms"] = round((time.monotonic() - t2) * 1000)
        log.info("erofs mounted at %s (%s-backed): FUSE ready in %.3f s, metadata read in %.3f s, mount %.3f s",
                 self.target, self.how, t1 - t0, t2 - t1, time.monotonic() - t2)

    def _find_erofs_bdi(self, before: set[str]) -> str | None:
        """The bdi of the erofs mount just made: its block device's for a loop device; for a
        file-backed mount the one ``erofs-N`` that appeared with it (None if other erofs
        mounts came and went at the same time: its readahead then stays the kernel's)."""
        if self.how == "loop":
            return kernel.bdi_of(self.target)
        new = kernel.erofs_bdis() - before
        if len(new) != 1:
            log.info("%s: cannot tell which of %s is this mount's bdi", self.target, sorted(new))
            return None
        return new.pop()

    def stop(self) -> None:
        """Detach the erofs mount (for signals and errors); the FUSE session ends with it."""
        if self.how is not None:
            if _is_our_erofs(self.target, self.state):
                with contextlib.suppress(OSError):
                    kernel.umount(self.target, lazy=True)
            self.how = None
        if self.hidden_mounted:
            with contextlib.suppress(OSError):
                kernel.umount(self.hidden, lazy=True)
            self.hidden_mounted = False

    def status(self) -> dict[str, Any]:
        return {"backing": self.how, "image_bytes": self.image.size, "fuse_bdi": self.fuse_bdi,
                "erofs_bdi": self.erofs_bdi, "options": self.options, **self.image.stats}


__all__ = ["HIDDEN_DIR", "ErofsMount", "unmount_dead_erofs"]
