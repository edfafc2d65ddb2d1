"""A private containerd for tests: its own config, root, state, sockets and namespace.

Fixtures (register them in ``tests/conftest.py`` by importing this module's fixtures):

``containerd_factory`` (session scope)
    ``containerd_factory(extra_toml="", *, namespace=None, content_sharing="isolated")
    -> Containerd`` starts one more containerd and returns it running; every instance it made is stopped at the end of the
    session (or earlier by ``instance.stop()``, which is idempotent). ``extra_toml`` is
    appended to the generated config, so it must hold tables only, e.g. a
    ``[proxy_plugins.turbofs]`` snapshotter section.
``containerd`` (module scope)
    A plain instance (no extra config) shared by the tests of one module, stopped when the
    module is done.

Both skip the test, with the reason, when the ``containerd``/``ctr`` binaries are missing or
we are not root; everything else that goes wrong is an error with the tail of the log.

A :class:`Containerd` has ``.address`` (the gRPC unix socket), ``.namespace`` (unique to
the instance), ``.root``, ``.state``, ``.log`` (containerd's output), ``.config_path`` and
``.ctr(*args, check=True, timeout=..., namespace=None)``, which runs ``ctr --address ADDRESS
--namespace NAMESPACE ARGS`` and returns the ``CompletedProcess[str]``; ``ctr_bytes`` is the
same with raw stdout (``ctr content get``), and there are small helpers for ``ctr images ls``
and ``ctr content get``.

The content store runs with ``content_sharing_policy = "isolated"`` (containerd's default is
"shared"): with "shared", a pull into a fresh namespace links blobs that another namespace
already downloaded and sends no request for them, so a test of a registry would prove
nothing. With "isolated" every namespace starts empty and really downloads.

What containerd 1.6.20 (Debian) does whatever its config says, found on this machine: it
creates ``/run/containerd/{fifo,s,runc}``; ``ctr run`` leaves cgroup directories
``/sys/fs/cgroup/*/NAMESPACE`` and ``/run/containerd/runc/NAMESPACE`` behind. Every instance
therefore uses its own namespace (``tfs-PID-RANDOM``), and :meth:`Containerd.stop` removes
those directories (only when empty) for each namespace the instance used. Shims
(``containerd-shim-runc-v2``) and containers outlive containerd, so ``stop`` first
force-deletes the tasks it knows, then (after SIGTERM/SIGKILL of containerd) kills shims
still serving this instance's socket, ``runc delete --force``s containers left in its
namespaces, unmounts whatever is left under its directory and removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = [
    "Containerd",
    "ContainerdFactory",
    "CtrError",
    "ImageRecord",
    "containerd",
    "containerd_factory",
    "require_containerd",
    "unique_namespace",
]

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
START_TIMEOUT = 30.0  # seconds until `ctr version` must answer
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
DEFAULT_CTR_TIMEOUT = 120.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNC_STATE_ROOT = Path("/run/containerd/runc")
SHIM_SOCKET_DIR = Path("/run/containerd/s")  # runc's root for the io.containerd.runc.v2 shim
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the NUL
LOG_TAIL_LINES = 40

# Plugins we never use: the CRI server (slow to start, needs a CNI config) and snapshotters
# that only print warnings on ext4.
DISABLED_PLUGINS: tuple[str, ...] = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")


def _tool_env() -> dict[str, str]:
    """Our environment with the sbin directories on PATH (runc lives in /usr/sbin)."""
    env = dict(os.environ)
    parts = env.get("PATH", "/usr/bin:/bin").split(":")
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if extra not in parts:
            parts.append(extra)
    env["PATH"] = ":".join(parts)
    return env


def require_containerd() -> None:
    """Skip the calling test unless containerd and ctr are installed and we are root."""
    missing = [b for b in (CONTAINERD_BIN, CTR_BIN) if shutil.which(b, path=_tool_env()["PATH"]) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian package containerd)")
    if os.geteuid() != 0:
        pytest.skip("a private containerd needs root")


def unique_namespace(prefix: str = "tfs") -> str:
    """A containerd namespace name no other run on this machine uses."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def _toml_str(value: str | os.PathLike[str]) -> str:
    """A TOML basic string (JSON string escapes are valid TOML escapes for these values)."""
    return json.dumps(os.fspath(value))


def _shim_socket(cmdline: list[bytes]) -> Path | None:
    """The socket a killed ``containerd-shim-runc-v2 -namespace NS -id ID -address ADDR``
    leaves behind: containerd 1.6 names it ``/run/containerd/s/HEX``, HEX being the SHA-256
    of ``ADDR/NS/ID``."""
    args: dict[bytes, bytes] = {}
    for flag, value in itertools.pairwise(cmdline):
        if flag in (b"-namespace", b"-id", b"-address"):
            args[flag] = value
    if len(args) != 3:
        return None
    key = os.path.join(args[b"-address"], args[b"-namespace"], args[b"-id"])
    return SHIM_SOCKET_DIR / hashlib.sha256(key).hexdigest()


class CtrError(subprocess.CalledProcessError):
    """A ``ctr`` command failed; the message carries its output and containerd's log tail."""

    def __init__(
        self,
        returncode: int,
        cmd: Sequence[str],
        output: str | bytes,
        stderr: str | bytes,
        log_tail: str,
    ) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.log_tail = log_tail

    def __str__(self) -> str:
        def text(value: str | bytes | None) -> str:
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            return "\n".join((value or "").splitlines()[-20:])

        return (
            f"{' '.join(self.cmd)} exited with status {self.returncode}\n"
            f"--- stderr:\n{text(self.stderr)}\n--- stdout:\n{text(self.output)}\n"
            f"--- containerd log (tail):\n{self.log_tail}"
        )


class ImageRecord:
    """One line of ``ctr images ls``: name, manifest media type and digest."""

    __slots__ = ("digest", "media_type", "name")

    def __init__(self, name: str, media_type: str, digest: str) -> None:
        self.name = name
        self.media_type = media_type
        self.digest = digest

    def __repr__(self) -> str:
        return f"ImageRecord({self.name!r}, {self.media_type!r}, {self.digest!r})"


class Containerd:
    """One private containerd process, with everything it owns under ``base``.

    Use :meth:`start` / :meth:`stop` or ``with Containerd(...) as c:``. ``base`` is made with
    :func:`tempfile.mkdtemp` under ``/tmp`` by default, short enough for a unix socket path.
    """

    def __init__(
        self,
        extra_toml: str = "",
        *,
        namespace: str | None = None,
        base: Path | None = None,
        content_sharing: str = "isolated",
    ) -> None:
        if content_sharing not in ("isolated", "shared"):
            raise ValueError(f"content_sharing must be isolated or shared, not {content_sharing!r}")
        self.content_sharing = content_sharing
        self.namespace = namespace or unique_namespace()
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"invalid containerd namespace {self.namespace!r}")
        self._owns_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="tfs-ctrd-", dir="/tmp"))
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.opt = self.base / "opt"
        self.address = str(self.base / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = self.base / "config.toml"
        self.log = self.base / "containerd.log"
        self.extra_toml = extra_toml
        if len(self.ttrpc_address.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for a unix socket: {self.ttrpc_address}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._namespaces_used: set[str] = {self.namespace}
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        """The config.toml this instance runs with (version 2)."""
        disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
        text = f"""\
version = 2
root = {_toml_str(self.root)}
state = {_toml_str(self.state)}
disabled_plugins = [{disabled}]

[grpc]
  address = {_toml_str(self.address)}
  uid = 0
  gid = 0

[ttrpc]
  address = {_toml_str(self.ttrpc_address)}

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {_toml_str(self.opt)}

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = {_toml_str(self.content_sharing)}
"""
        if self.extra_toml.strip():
            text += "\n# extra configuration of the test\n" + self.extra_toml.strip() + "\n"
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"containerd config is not valid TOML ({exc}):\n{text}") from exc
        return text

    def start(self, timeout: float = START_TIMEOUT) -> Containerd:
        """Write the config, start containerd, and wait until ``ctr version`` answers."""
        if self._proc is not None:
            raise RuntimeError("this containerd was already started")
        for path in (self.root, self.state, self.opt):
            path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [CONTAINERD_BIN, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_tool_env(),
                start_new_session=True,  # a ^C of pytest reaches us, and we stop it in order
            )
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with status {self._proc.returncode} while starting\n"
                    f"{self.log_tail()}"
                )
            if os.path.exists(self.address):
                probe = subprocess.run(
                    [CTR_BIN, "--address", self.address, "version"],
                    capture_output=True, text=True, env=_tool_env(), timeout=10, check=False,
                )
                if probe.returncode == 0:
                    return self
                last = probe.stderr.strip()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"containerd did not answer within {timeout:.0f} s ({last})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Delete tasks, stop containerd (SIGTERM, then SIGKILL), unmount, remove everything.

        Idempotent; safe to call on an instance that never started or failed to start.
        """
        if self._stopped:
            return
        self._stopped = True
        if self.running:
            with contextlib.suppress(Exception):
                self._delete_tasks()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        self._kill_shims()
        self._delete_runc_containers()
        self._unmount_all()
        self._remove_namespace_leftovers()
        if self._owns_base:
            if self._mounts_under(self.base):
                # never rmtree through a mount point that refused to go away
                raise RuntimeError(f"mounts left under {self.base}; not removing it")
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- ctr

    def _argv(self, args: Sequence[str], namespace: str | None) -> list[str]:
        ns = namespace or self.namespace
        self._namespaces_used.add(ns)
        return [CTR_BIN, "--address", self.address, "--namespace", ns, *args]

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_CTR_TIMEOUT,
        namespace: str | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address ADDRESS --namespace NS ARGS``; raise :class:`CtrError` on failure
        when ``check``."""
        argv = self._argv(args, namespace)
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, errors="replace",
            env=_tool_env(), timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise CtrError(proc.returncode, argv, proc.stdout, proc.stderr, self.log_tail())
        return proc

    def ctr_bytes(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_CTR_TIMEOUT,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """:meth:`ctr` with stdout as raw bytes (for ``ctr content get``)."""
        argv = self._argv(args, namespace)
        proc = subprocess.run(
            argv, capture_output=True, env=_tool_env(), timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise CtrError(proc.returncode, argv, proc.stdout, proc.stderr, self.log_tail())
        return proc

    def images(self, *, namespace: str | None = None) -> dict[str, ImageRecord]:
        """``ctr images ls`` as {name: record}."""
        out = self.ctr("images", "ls", namespace=namespace).stdout.splitlines()
        records: dict[str, ImageRecord] = {}
        for line in out[1:]:  # header: REF TYPE DIGEST SIZE PLATFORMS LABELS
            fields = line.split()
            if len(fields) >= 3:
                records[fields[0]] = ImageRecord(fields[0], fields[1], fields[2])
        return records

    def image_digest(self, name: str, *, namespace: str | None = None) -> str:
        """The manifest (or index) digest containerd holds for image ``name``."""
        records = self.images(namespace=namespace)
        if name not in records:
            raise KeyError(f"no image {name!r} in namespace {namespace or self.namespace}: {sorted(records)}")
        return records[name].digest

    def content_get(self, digest: str, *, namespace: str | None = None) -> bytes:
        """The bytes of one blob in containerd's content store (``ctr content get``)."""
        return self.ctr_bytes("content", "get", digest, namespace=namespace).stdout

    def content_digests(self, *, namespace: str | None = None) -> set[str]:
        """Digests of the blobs visible in a namespace (``ctr content ls -q``)."""
        return set(self.ctr("content", "ls", "-q", namespace=namespace).stdout.split())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no containerd log)"
        return "\n".join(text.splitlines()[-lines:])

    # ---------------------------------------------------------------- cleanup helpers

    def _delete_tasks(self) -> None:
        """Force-delete the tasks and containers of every namespace (shims exit with them)."""
        listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=15).stdout.split()
        self._namespaces_used.update(listed)
        for ns in sorted(self._namespaces_used):
            tasks = self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=15)
            for task in tasks.stdout.split():
                self.ctr("tasks", "delete", "--force", task, namespace=ns, check=False, timeout=30)
            containers = self.ctr("containers", "ls", "-q", namespace=ns, check=False, timeout=15)
            ids = containers.stdout.split()
            if ids:
                self.ctr("containers", "rm", *ids, namespace=ns, check=False, timeout=30)

    def _kill_shims(self) -> None:
        """SIGKILL shim processes still serving this instance (their command line names our
        socket); nothing else is touched."""
        needle = self.address.encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and b"containerd-shim" in cmdline[0] and needle in cmdline:
                pid = int(entry.name)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                # a shim whose containerd died can end up as our child: reap it
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                socket_path = _shim_socket(cmdline)
                if socket_path is not None:
                    with contextlib.suppress(OSError):
                        socket_path.unlink()

    def _delete_runc_containers(self) -> None:
        """``runc delete --force`` what runc still knows in our namespaces: the processes of
        containers whose shim died with a crashed containerd keep running otherwise."""
        for ns in sorted(self._namespaces_used):
            runc_root = RUNC_STATE_ROOT / ns
            if not runc_root.is_dir():
                continue
            for entry in runc_root.iterdir():
                if entry.is_dir():
                    subprocess.run(
                        ["runc", "--root", str(runc_root), "delete", "--force", entry.name],
                        capture_output=True, env=_tool_env(), timeout=30, check=False,
                    )

    @staticmethod
    def _mounts_under(top: Path) -> list[str]:
        """Mount points at or below ``top``, deepest first."""
        prefix = os.fspath(top).rstrip("/")
        found: list[str] = []
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                raw = line.split(" ")[4]
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw)
                if point == prefix or point.startswith(prefix + "/"):
                    found.append(point)
        return sorted(set(found), key=lambda p: (p.count("/"), p), reverse=True)

    def _unmount_all(self) -> None:
        for point in self._mounts_under(self.base):
            done = subprocess.run(["umount", point], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-R", "-l", point], capture_output=True, check=False)

    def _remove_namespace_leftovers(self, timeout: float = 3.0) -> None:
        """Remove the empty cgroup and runc state directories ``ctr run`` left per namespace
        (retrying a little: a cgroup stays busy while its last process is exiting)."""
        deadline = time.monotonic() + timeout
        while self._remove_namespace_dirs() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _remove_namespace_dirs(self) -> list[Path]:
        """One pass of rmdir, deepest first; returns the directories still there."""
        left: list[Path] = []
        for ns in sorted(self._namespaces_used):
            candidates: list[Path] = [RUNC_STATE_ROOT / ns]
            if CGROUP_ROOT.is_dir():
                candidates += [hierarchy / ns for hierarchy in CGROUP_ROOT.iterdir()]
            for top in candidates:
                if not top.is_dir() or top.is_symlink():
                    continue
                # deepest first: cgroup directories go only with rmdir, and only when empty
                subdirs = sorted(
                    (Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True
                )
                for sub in subdirs:
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                if top.exists():
                    left.append(top)
        return left


class ContainerdFactory:
    """Starts containerd instances on demand and stops all of them in :meth:`close`."""

    def __init__(self) -> None:
        self.instances: list[Containerd] = []

    def __call__(
        self,
        extra_toml: str = "",
        *,
        namespace: str | None = None,
        content_sharing: str = "isolated",
    ) -> Containerd:
        require_containerd()
        instance = Containerd(extra_toml, namespace=namespace, content_sharing=content_sharing)
        self.instances.append(instance)
        return instance.start()

    def close(self) -> None:
        errors: list[str] = []
        for instance in reversed(self.instances):
            try:
                instance.stop()
            except Exception as exc:  # stop every instance, report all failures
                errors.append(f"{instance.base}: {exc}")
        self.instances.clear()
        if errors:
            raise RuntimeError("stopping containerd failed:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def containerd_factory() -> Iterator[ContainerdFactory]:
    """``containerd_factory(extra_toml="", *, namespace=None) -> Containerd`` (running)."""
    require_containerd()
    factory = ContainerdFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def containerd(containerd_factory: ContainerdFactory) -> Iterator[Containerd]:
    """A private containerd for the tests of one module, with its own namespace."""
    instance = containerd_factory()
    try:
        yield instance
    finally:
        instance.stop()
