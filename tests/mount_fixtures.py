"""Driving ``turbofs mount`` as a user would, for tests: the ``mounter`` fixture."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from index_builder.builder import build
from tests.ocifixtures import TarEntry, write_oci_layout
from turbofs.core.config import BuildConfig
from turbofs.core.image import LayoutImage, open_layout_image


class Mounter:
    """Runs ``turbofs mount`` / ``umount`` as a user would, each mount with its own state."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.run_dir = base / "run"
        self.cache_dir = base / "cache"
        self.mounts: list[Path] = []

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "turbofs.cli", *args], capture_output=True, text=True,
                              check=False, timeout=timeout)
        if check and proc.returncode != 0:
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in self.run_dir.glob("*/daemon.log"))
            raise AssertionError(f"turbofs {' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{logs}")
        return proc

    def mount(self, ref: str, name: str = "mnt", *extra: str, check: bool = True) -> Path:
        mp = self.base / name
        mp.mkdir(parents=True, exist_ok=True)
        proc = self.cli("mount", ref, str(mp), "--run-dir", str(self.run_dir), "--cache-dir", str(self.cache_dir),
                        *extra, check=check)
        if proc.returncode == 0:
            self.mounts.append(mp)
        return mp

    def status(self, mp: Path) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("status", str(mp), "--run-dir", str(self.run_dir)).stdout)
        return result

    def metrics(self, mp: Path) -> str:
        return self.cli("status", str(mp), "--metrics", "--run-dir", str(self.run_dir)).stdout

    def pid(self, mp: Path) -> int:
        return int(self.status(mp)["pid"])

    def umount(self, mp: Path) -> None:
        self.cli("umount", str(mp), "--run-dir", str(self.run_dir))
        self.mounts.remove(mp)

    def cleanup(self) -> None:
        for mp in self.mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
        for pid_file in self.run_dir.glob("*/pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


# -- shared by the per-file and erofs mount tests


def build_layout(base: Path, layers: list[list[TarEntry]], chunk_size: int) -> LayoutImage:
    """A turbo image (OCI layout at ``base/turbo``) built from tar layers."""
    src = write_oci_layout(base / "src", layers)
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(chunk_size=chunk_size), progress=False)
    return open_layout_image(base / "turbo")


def assert_read_only(mp: Path, existing: str | None = None) -> None:
    """The mount says it is read-only, and creating (or writing ``existing``) fails so."""
    assert os.statvfs(mp).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as exc:
        (mp / "new-file").write_text("x")
    assert exc.value.errno == errno.EROFS
    if existing is not None:
        with pytest.raises(OSError) as exc:
            (mp / existing).write_text("x")
        assert exc.value.errno in (errno.EROFS, errno.EACCES)


def wait_unmounted(mp: Path, timeout: float = 10.0, what: str = "the mount did not go away") -> None:
    deadline = time.monotonic() + timeout
    while os.path.ismount(mp):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@contextlib.contextmanager
def foreground_mount(argv: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """``argv`` (a ``turbofs mount --foreground`` command line) run until it says "ready";
    yields the process, and kills it on the way out if it is still running."""
    proc = subprocess.Popen(list(argv), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "ready" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)
