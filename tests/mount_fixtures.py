"""Driving ``turbofs mount`` as a user would, for tests: the ``mounter`` fixture."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


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
