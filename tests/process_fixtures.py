"""Child processes of the tests' servers (registries, the snapshotter): start one with its
output in a log file, wait for the first line it prints, stop it.

:func:`spawn` starts ``argv`` from the repository root, stdin closed, stderr (and stdout,
unless ``capture_stdout``) appended to ``log_path``. :func:`first_line` reads the line a
server prints once it listens (``turbofs serve``, ``turbofs snapshotter``), failing with the
log's tail if the process exits or the deadline passes first. :func:`stop` sends SIGTERM,
waits, then SIGKILLs; :func:`kill` SIGKILLs at once (a crash). Both reap the process and
close its pipe, and return its exit status.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["REPO_ROOT", "ProcessFailed", "first_line", "kill", "spawn", "stop"]

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL = 4000


class ProcessFailed(RuntimeError):
    """A child exited or said nothing while starting; the message has its log's tail."""


def log_tail(log_path: Path, chars: int = LOG_TAIL) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def spawn(
    argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None, capture_stdout: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output appended to ``log_path`` (stdout piped if ``capture_stdout``)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv), cwd=REPO_ROOT, env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else log, stderr=log,
        )  # fmt: skip


def first_line(proc: subprocess.Popen[bytes], deadline: float, what: str, log_path: Path) -> str:
    """The first line ``proc`` prints on its (piped) stdout, read before ``deadline``."""
    assert proc.stdout is not None, "spawn(..., capture_stdout=True) first"
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessFailed(f"{what}: printed no first line in time (so far {buf!r})\n--- log ---\n{log_tail(log_path)}")
            if not sel.select(min(left, 0.5)):
                continue
            piece = os.read(proc.stdout.fileno(), 4096)
            if not piece:
                proc.wait(5)
                raise ProcessFailed(f"{what}: exited with status {proc.returncode} while starting (stdout {buf!r})\n"
                                    f"--- log ---\n{log_tail(log_path)}")
            buf += piece
    return buf.decode(errors="replace").splitlines()[0]


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def kill(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGKILL, as a crash would; the exit status."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode
