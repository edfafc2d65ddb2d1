"""The turbofs snapshotter as a real process, and a private containerd that uses it.

Fixtures (registered in ``tests/conftest.py``):

``turbofs_snapshotter`` (module scope)
    A :class:`SnapshotterProcess`: ``turbofs --config OWN.toml snapshotter`` with its own
    socket, root, run folder and chunk cache under a short ``/tmp`` folder, started and
    answering. ``.stop()``, ``.start()``, ``.restart()``, ``.kill()`` (SIGKILL, as a crash),
    ``.log()``, ``.channel()`` (a gRPC channel to its socket for direct calls),
    ``.turbofs_mounts()`` (mountpoints of the image mounts it made), ``.daemon_pids()``.
    At the end every mount it made is unmounted, its daemons killed, its folder removed.
``snapshotter_containerd`` (module scope)
    A private containerd (``tests/containerd_fixtures.py``) started *after* the snapshotter,
    with ``[proxy_plugins.turbofs]`` pointing at it; stopped (tasks deleted, mounts undone)
    before the snapshotter goes.

Both skip, with the reason, unless we are root with /dev/fuse, containerd and ctr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests import process_fixtures
from tests.containerd_fixtures import Containerd, ContainerdFactory, require_containerd

__all__ = [
    "CriContainerd",
    "SnapshotterProcess",
    "derived_layout",
    "proxy_plugin_toml",
    "snapshotter_containerd",
    "turbofs_snapshotter",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
_LISTENING = re.compile(r"turbofs snapshotter listening on unix:(\S+)")


def proxy_plugin_toml(address: Path | str, name: str = "turbofs") -> str:
    """The containerd config section that makes ``name`` a proxy snapshotter at ``address``."""
    return f'[proxy_plugins.{name}]\n  type = "snapshot"\n  address = {json.dumps(str(address))}\n'


def _has_cap_sys_resource() -> bool:
    """Whether we hold CAP_SYS_RESOURCE (24), which lowering an OOM score adjustment needs; some
    container sandboxes drop it even for root."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def cri_toml(snapshotter: str = "turbofs", plain_http_registries: tuple[str, ...] = (), *,
             sandbox_image: str | None = None, cni_dir: Path | None = None) -> str:
    """containerd's CRI plugin set up for a remote snapshotter (what a Kubernetes node needs);
    ``sandbox_image`` replaces the pause image (pulled from the internet otherwise), ``cni_dir``
    the node's CNI folders (for host-network pods, which need no CNI, an empty folder)."""
    text = '[plugins."io.containerd.grpc.v1.cri"]\n'
    if sandbox_image is not None:
        text += f"  sandbox_image = {json.dumps(sandbox_image)}\n"
    if not _has_cap_sys_resource():
        # the pause container asks for oom_score_adj -998, which needs CAP_SYS_RESOURCE (runc's
        # child dies, "can't get final child's PID from pipe: EOF"): keep it at containerd's own
        text += "  restrict_oom_score_adj = true\n"
    text += (
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        f"  snapshotter = {json.dumps(snapshotter)}\n"
        "  disable_snapshot_annotations = false\n"
    )
    if cni_dir is not None:
        text += (f'[plugins."io.containerd.grpc.v1.cri".cni]\n  bin_dir = {json.dumps(str(cni_dir / "bin"))}\n'
                 f'  conf_dir = {json.dumps(str(cni_dir / "net.d"))}\n')
    for reg in plain_http_registries:
        text += (f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors.{json.dumps(reg)}]\n'
                 f'  endpoint = [{json.dumps("http://" + reg)}]\n')
    return text


class CriContainerd(Containerd):
    """A private containerd with its CRI plugin on (the fixture's instances have it off):
    start it with ``extra_toml`` holding :func:`cri_toml` and :func:`proxy_plugin_toml`."""

    def config_text(self) -> str:
        text = super().config_text()
        cri = '"io.containerd.grpc.v1.cri", '
        assert cri in text
        return text.replace(cri, "", 1)


def derived_layout(base: Path, keep: int, entries: list[Any], dest: Path, config: dict[str, Any] | None = None) -> Path:
    """A plain OCI layout: the first ``keep`` layers of layout ``base`` (same blobs, so the same
    chain IDs) plus one gzip layer made of ``entries`` (:class:`tests.ocifixtures.TarEntry`);
    ``config`` updates the image config's ``config`` (Entrypoint, Cmd...)."""
    import gzip

    from tests.ocifixtures import layer_tar_bytes

    def blob(digest: str) -> Path:
        return base / "blobs" / "sha256" / digest.split(":", 1)[1]

    def put(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (dest / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest, len(data)

    (dest / "blobs" / "sha256").mkdir(parents=True)
    manifest = json.loads(blob(json.loads((base / "index.json").read_text())["manifests"][0]["digest"]).read_bytes())
    image_config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    image_config["config"].update(config or {})
    layers = manifest["layers"][:keep]
    for layer in layers:
        shutil.copyfile(blob(layer["digest"]), dest / "blobs" / "sha256" / layer["digest"][7:])
    tar = layer_tar_bytes(entries)
    digest, size = put(gzip.compress(tar, mtime=0))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
    image_config["rootfs"]["diff_ids"] = [*image_config["rootfs"]["diff_ids"][:keep], "sha256:" + hashlib.sha256(tar).hexdigest()]
    image_config.pop("history", None)
    cdigest, csize = put(json.dumps(image_config).encode())
    manifest.update(config={"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
                    layers=layers)
    mdigest, msize = put(json.dumps(manifest).encode())
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return dest


def _mountinfo_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            raw = line.split(" ")[4]
            out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return out


class SnapshotterProcess:
    """One ``turbofs snapshotter`` with everything it owns under ``base``."""

    def __init__(self, base: Path, *, settings: str = "") -> None:
        self.base = base
        self.address = base / "sn.sock"
        self.root = base / "root"
        self.run_dir = base / "run"
        self.cache_dir = base / "cache"
        self.config_path = base / "turbofs.toml"
        self.log_path = base / "snapshotter.log"
        self.config_path.write_text(
            "[snapshotter]\n"
            f"address = {json.dumps(str(self.address))}\n"
            f"root = {json.dumps(str(self.root))}\n"
            f"run_dir = {json.dumps(str(self.run_dir))}\n"
            f"{settings}\n"
            "[daemon]\n"
            f"cache_dir = {json.dumps(str(self.cache_dir))}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

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
        argv = [sys.executable, "-m", "turbofs.cli", "--config", str(self.config_path), "snapshotter"]
        self.proc = process_fixtures.spawn(argv, self.log_path, capture_stdout=True)
        try:
            line = process_fixtures.first_line(self.proc, time.monotonic() + timeout, "the snapshotter", self.log_path)
        except BaseException:
            self.stop()
            raise
        if not _LISTENING.search(line):
            raise RuntimeError(f"unexpected first line of the snapshotter: {line!r}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (the image mounts stay: they are separate processes)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            process_fixtures.stop(proc, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            process_fixtures.kill(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.address}")

    def turbofs_mounts(self) -> list[Path]:
        """Image mountpoints of this snapshotter that are mounted now."""
        prefix = str(self.root / "mounts") + "/"
        return sorted({Path(p) for p in _mountinfo_points() if p.startswith(prefix)})

    def daemon_pids(self) -> list[int]:
        """Pids of the live mount daemons this snapshotter started (zombies are not alive)."""
        pids = []
        for pid_file in self.run_dir.glob("*/pid"):
            with contextlib.suppress(ValueError, OSError, IndexError):
                pid = int(pid_file.read_text())
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(pid)
        return pids

    def cleanup(self) -> None:
        """Stop it, unmount every mount under its folder, kill its daemons, remove it."""
        self.stop()
        from turbofs.mount import ctl as mountctl

        for mp in self.turbofs_mounts():
            with contextlib.suppress(Exception):
                mountctl.unmount(mp, self.run_dir, timeout=10)
        for _ in range(3):
            points = sorted((p for p in _mountinfo_points() if p.startswith(str(self.base) + "/")),
                            key=lambda p: p.count("/"), reverse=True)
            if not points:
                break
            for point in points:
                if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for pid in self.daemon_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def _require_node() -> None:
    require_containerd()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")


@pytest.fixture(scope="module")
def turbofs_snapshotter() -> Iterator[SnapshotterProcess]:
    """A running snapshotter of its own (module scope)."""
    _require_node()
    sn = SnapshotterProcess(Path(tempfile.mkdtemp(prefix="tfs-sn-", dir="/tmp")))
    try:
        sn.start()
        yield sn
    finally:
        sn.cleanup()


@pytest.fixture(scope="module")
def snapshotter_containerd(
    containerd_factory: ContainerdFactory, turbofs_snapshotter: SnapshotterProcess
) -> Iterator[Containerd]:
    """A private containerd whose ``turbofs`` snapshotter is ``turbofs_snapshotter``."""
    instance = containerd_factory(proxy_plugin_toml(turbofs_snapshotter.address))
    try:
        yield instance
    finally:
        instance.stop()
