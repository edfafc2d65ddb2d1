"""The kernel side of a mount: mount(2) of erofs (file-backed, or a loop device), unmount,
/proc/self/mountinfo, and readahead through /sys/class/bdi."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Final

log = logging.getLogger("turbofs.mount.kernel")

#: Try a file-backed mount (Linux 6.12+) before a loop device; tests turn it off to exercise
#: the loop device path.
TRY_FILE_BACKED = True
MS_RDONLY: Final = 1
MNT_DETACH: Final = 2

_libc = ctypes.CDLL(None, use_errno=True)


def kernel_has_erofs() -> bool:
    """Whether this kernel knows erofs (built in, or a loaded module)."""
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["erofs"] for line in text.splitlines())


def cannot_mount_erofs() -> str | None:
    """Why this process cannot mount erofs (no erofs in the kernel, not root), or None."""
    if not kernel_has_erofs():
        return "this kernel has no erofs file system"
    if os.geteuid() != 0:
        return "mounting erofs needs root (the per-file FUSE mode does not)"
    return None


def mount_erofs(image_file: Path, target: Path, *, options: str = "") -> str:
    """Mount erofs from ``image_file`` at ``target`` read-only; returns how ("file" or "loop")."""
    code = errno.ENOTBLK
    if TRY_FILE_BACKED:
        ret = _libc.mount(os.fsencode(image_file), os.fsencode(target), b"erofs", MS_RDONLY, options.encode() or None)
        if ret == 0:
            return "file"
        code = ctypes.get_errno()
        if code not in (errno.ENOTBLK, errno.EINVAL):
            raise OSError(code, f"mount erofs {image_file} at {target}: {os.strerror(code)}")
    # a kernel without file-backed erofs mounts: a loop device
    opts = ",".join(filter(None, ["ro", "loop", options]))
    proc = subprocess.run(["mount", "-t", "erofs", "-o", opts, str(image_file), str(target)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(code, f"mount erofs {image_file} at {target}: {proc.stderr.strip()}")
    return "loop"


def umount(target: Path, *, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


def mount_entry(target: Path) -> tuple[str, bytes] | None:
    """(file system type, source) of the topmost mount at ``target``, or None."""
    want = os.fsencode(os.path.realpath(target))
    found = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
            left, _, right = line.partition(b" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == want:
                fstype, source = ([*right.split(), b"", b""])[:2]
                found = (fstype.decode(errors="replace"), _unescape(source))
    return found


def _unescape(field: bytes) -> bytes:
    """A mountinfo field with its octal escapes (space, tab, newline, backslash) undone."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


# -- readahead (backing device info) ----------------------------------------------------


def bdi_of(path: Path) -> str:
    """The bdi name (``MAJOR:MINOR``) of the file system that holds ``path``."""
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def erofs_bdis() -> set[str]:
    """The bdi names of file-backed erofs mounts (``erofs-N``)."""
    try:
        return {name for name in os.listdir("/sys/class/bdi") if name.startswith("erofs-")}
    except OSError:
        return set()


def set_readahead(bdi: str, kb: int) -> None:
    """Set the readahead of ``bdi`` to ``kb`` KiB (a warning if the kernel refuses)."""
    try:
        Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as exc:
        log.warning("could not set the readahead of bdi %s to %d KiB: %s", bdi, kb, exc)


__all__ = [
    "bdi_of",
    "cannot_mount_erofs",
    "erofs_bdis",
    "kernel_has_erofs",
    "mount_entry",
    "mount_erofs",
    "set_readahead",
    "umount",
]
