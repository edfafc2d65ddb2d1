"""Registries for tests: the turbofs registry and Debian's distribution, as real processes.

Fixtures (registered in tests/conftest.py):

* ``turbofs_registry`` -- a fresh ``turbofs serve`` with its own storage folder and free port.
* ``turbofs_registry_factory`` -- ``make(**settings)`` starts another one; ``settings`` are
  ``[registry]`` settings written to its own TOML file (``upload_ttl=0.5``,
  ``max_manifest_size=4096``...); ``env={"TURBOFS_REGISTRY_X": ...}`` adds environment
  variables. All are stopped at the end of the test.
* ``shared_turbofs_registry`` -- one server for a whole test module (use distinct repository
  names per test).
* ``distribution_registry`` -- ``docker-registry serve CONFIG`` (CNCF distribution) with
  filesystem storage in a temporary folder and deletes enabled; skipped if the binary is
  missing.

Each is a :class:`RegistryProcess`: ``.url`` ("http://127.0.0.1:PORT"), ``.host_port``
("127.0.0.1:PORT", for ``docker://HOST_PORT/repo:tag``), ``.port``, ``.storage`` (its storage
folder), ``.stop()`` / ``.kill()`` (SIGKILL) / ``.start()`` / ``.restart()`` (same storage, same
port), ``.log()`` (its stderr so far). The servers see no ``/etc/turbofs/config.toml`` and no
``TURBOFS_REGISTRY_*`` variables of the calling environment.

:func:`skopeo` / :func:`skopeo_copy` run skopeo with TLS verification off for ``docker://``
references (these registries speak plain HTTP on loopback) and the insecure policy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import process_fixtures

__all__ = [
    "REPO_ROOT",
    "DistributionRegistry",
    "RegistryProcess",
    "SkopeoError",
    "TurbofsRegistry",
    "distribution_registry",
    "free_port",
    "shared_turbofs_registry",
    "skopeo",
    "skopeo_copy",
    "turbofs_registry",
    "turbofs_registry_factory",
]

REPO_ROOT = process_fixtures.REPO_ROOT
START_TIMEOUT = 30.0
_LISTENING_RE = re.compile(r"turbofs registry listening on http://(\[[^\]]+\]|[^:\s]+):(\d+) \(storage ")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURBOFS_REGISTRY_")}
    env.update(extra or {})
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


class RegistryProcess:
    """A registry server run as a child process (see the module docstring)."""

    name = "registry"
    #: read the child's stdout (turbofs prints its port there); else it goes to the log
    read_stdout = False

    def __init__(self, workdir: Path, storage: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = Path(storage)
        self.host = host
        self.port = port
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: exit status of the last stop (0: it shut down cleanly on SIGTERM)
        self.returncode: int | None = None

    # subclasses fill these in
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return _clean_env()

    def _await_bound(self, deadline: float) -> None:
        """Wait until the process says (or shows) it is listening; set self.port."""

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        self.proc = process_fixtures.spawn(self._argv(), self.log_path, env=self._env(), capture_stdout=self.read_stdout)
        deadline = time.monotonic() + timeout
        try:
            self._await_bound(deadline)
            self._await_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def _fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"{self.name}: {why}\n--- log ---\n{self.log()[-4000:]}")

    def _await_ready(self, deadline: float) -> None:
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise self._fail("exited while starting")
            with contextlib.suppress(httpx.HTTPError):
                # 401: up, with authentication switched on
                if httpx.get(f"{self.url}/v2/", timeout=2).status_code in (200, 401):
                    return
            if time.monotonic() > deadline:
                raise self._fail(f"did not answer on {self.url} in time")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (SIGTERM), wait, kill if it will not stop."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.returncode = process_fixtures.stop(proc, timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash would (``start()`` brings it back on the same port and storage)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.returncode = process_fixtures.kill(proc)

    def __enter__(self) -> RegistryProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TurbofsRegistry(RegistryProcess):
    """``python -m turbofs.cli --config OWN.toml serve --port P --storage DIR``.

    The first start uses port 0 and reads the port from the line the server prints; later
    starts reuse that port.
    """

    name = "turbofs-registry"
    read_stdout = True

    def __init__(
        self,
        workdir: Path,
        storage: Path | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(workdir, storage or Path(workdir) / "storage", host=host, port=port)
        self.settings = dict(settings or {})
        self.extra_env = dict(env or {})
        self.config_path = self.workdir / "turbofs.toml"
        lines = ["[registry]"] + [f"{k} = {_toml_value(v)}" for k, v in self.settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.banner = ""

    def _argv(self) -> list[str]:
        return [
            sys.executable, "-m", "turbofs.cli", "--config", str(self.config_path), "serve",
            "--host", self.host, "--port", str(self.port), "--storage", str(self.storage),
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        return _clean_env(self.extra_env)

    def _await_bound(self, deadline: float) -> None:
        assert self.proc is not None
        self.banner = process_fixtures.first_line(self.proc, deadline, self.name, self.log_path)
        m = _LISTENING_RE.search(self.banner)
        if m is None:
            raise self._fail(f"unexpected first line {self.banner!r}")
        self.port = int(m[2])


def distribution_config(storage: Path, addr: str, *, delete: bool = True, secret: str | None = None) -> str:
    """docker-registry's config.yml: filesystem storage at ``storage``, listening on ``addr``
    (HOST:PORT), warnings only, no access log; ``delete``: the API may delete blobs and
    manifests; ``secret``: the HTTP secret (set it where several could share storage)."""
    lines = ["version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true",
             "storage:", "  filesystem:", f"    rootdirectory: {storage}"]
    if delete:
        lines += ["  delete:", "    enabled: true"]
    lines += ["http:", f"  addr: {addr}"]
    if secret is not None:
        lines.append(f"  secret: {secret}")
    return "\n".join(lines) + "\n"


class DistributionRegistry(RegistryProcess):
    """Debian's ``docker-registry serve CONFIG`` (CNCF distribution 2.8)."""

    name = "distribution"
    binary = "docker-registry"

    def __init__(self, workdir: Path, storage: Path | None = None, *, host: str = "127.0.0.1") -> None:
        super().__init__(workdir, storage or Path(workdir) / "storage", host=host, port=free_port(host))
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.config_path.write_text(distribution_config(self.storage, f"{host}:{self.port}"))

    def _argv(self) -> list[str]:
        return [self.binary, "serve", str(self.config_path)]


# -- skopeo --------------------------------------------------------------------------------


class SkopeoError(RuntimeError):
    """skopeo failed; the message carries its stderr."""


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo --insecure-policy ARGS``; raise SkopeoError with its stderr on failure."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    argv = ["skopeo", "--insecure-policy", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SkopeoError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _tls_flags(ref: str, side: str) -> list[str]:
    return [f"--{side}-tls-verify=false"] if ref.startswith("docker://") else []


def skopeo_copy(src: str, dest: str, *extra: str, timeout: float = 120) -> None:
    """``skopeo copy SRC DEST`` (plain HTTP allowed for docker:// references)."""
    skopeo("copy", "--quiet", *_tls_flags(src, "src"), *_tls_flags(dest, "dest"), *extra, src, dest,
           timeout=timeout)  # fmt: skip


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def turbofs_registry_factory(tmp_path: Path) -> Iterator[Callable[..., TurbofsRegistry]]:
    """``make(env=None, **settings)``: start another turbofs registry for this test."""
    made: list[TurbofsRegistry] = []

    def make(env: Mapping[str, str] | None = None, **settings: Any) -> TurbofsRegistry:
        reg = TurbofsRegistry(tmp_path / f"turbofs-registry-{len(made)}", settings=settings, env=env)
        made.append(reg)
        reg.start()
        return reg

    yield make
    for reg in made:
        reg.stop()


@pytest.fixture
def turbofs_registry(turbofs_registry_factory: Callable[..., TurbofsRegistry]) -> TurbofsRegistry:
    """A fresh turbofs registry with default settings (own storage, free port)."""
    return turbofs_registry_factory()


@pytest.fixture(scope="module")
def shared_turbofs_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TurbofsRegistry]:
    """One turbofs registry for a whole test module."""
    reg = TurbofsRegistry(tmp_path_factory.mktemp("shared-turbofs-registry"))
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture
def distribution_registry(tmp_path: Path) -> Iterator[DistributionRegistry]:
    """CNCF distribution (Debian's docker-registry) on a free loopback port."""
    if shutil.which(DistributionRegistry.binary) is None:
        pytest.skip("docker-registry (CNCF distribution) is not installed")
    reg = DistributionRegistry(tmp_path / "distribution")
    reg.start()
    yield reg
    reg.stop()
