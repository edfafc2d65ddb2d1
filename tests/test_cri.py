"""A pod through containerd's CRI plugin on the turbofs snapshotter, driven the way the
kubelet drives it (``runtime.v1`` over gRPC, :mod:`turbofs.proto.cri_pb2`).

Everything is real and local: the snapshotter (started first), Debian's containerd 1.6 with
its CRI plugin on (``snapshotter = "turbofs"``, ``disable_snapshot_annotations = false``, its
own root, state and socket), runc, and the turbofs registry holding

* ``app:latest``: the Debian-based ``sample`` image, plain, with its turbo twin
  ``app:latest-turbo`` (what ``turbofs serve --auto-convert`` writes). The kubelet names the
  plain image; the snapshotter mounts the twin lazily;
* ``pause:1``: the sandbox image (``sandbox_image``), made here from the sample's Debian base
  layer plus a layer of its own, entrypoint ``sleep infinity``, so that nothing is pulled from
  the internet. It shares its base layer with the app image, as real images do.

The pod uses the node's network (no CNI needed). The test pulls the app image (no layer and
no chunk blob reaches containerd's content store; the image's snapshot is the turbofs mount),
runs a container that prints, reads the container's log file, and removes it all.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from tests.containerd_fixtures import require_containerd
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from tests.snapshotter_fixtures import (
    CriContainerd,
    SnapshotterProcess,
    cri_toml,
    derived_layout,
    proxy_plugin_toml,
)
from turbofs.proto import CRI_IMAGES, CRI_RUNTIME, cri_pb2, unary
from turbofs.snapshotter import labels as L
from turbofs.snapshotter.remote import fetch_image

R = TypeVar("R", bound=Message)
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace


class Cri:
    """The CRI services on containerd's socket."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{address}")

    def runtime(self, method: str, request: Message, reply: type[R], timeout: float = 120) -> R:
        return unary(self.channel, CRI_RUNTIME, method, reply)(request, timeout=timeout)

    def image(self, method: str, request: Message, reply: type[R], timeout: float = 300) -> R:
        return unary(self.channel, CRI_IMAGES, method, reply)(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def _wait_for(cond: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _log_lines(path: Path) -> list[tuple[str, str]]:
    """(stream, text) of each full line of a CRI container log (``TIME STREAM TAG TEXT``)."""
    out = []
    for line in path.read_text().splitlines():
        _, stream, tag, text = line.split(" ", 3)
        if tag == "F":
            out.append((stream, text))
    return out


@pytest.fixture(scope="module")
def cri_node(turbofs_snapshotter: SnapshotterProcess, shared_turbofs_registry: TurbofsRegistry,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CriContainerd, Cri, dict[str, str]]]:
    """containerd with the CRI plugin on turbofs, and the images (see the module docstring)."""
    from bench.images import ensure_image
    from index_builder.builder import build
    from tests.ocifixtures import TarEntry

    require_containerd()
    work = tmp_path_factory.mktemp("cri")
    reg = shared_turbofs_registry.host_port
    sample = ensure_image("sample")
    turbo = work / "turbo"
    build(f"oci:{sample}:latest", turbo, progress=False)
    skopeo_copy(f"oci:{sample}:latest", f"docker://{reg}/app:latest", "--preserve-digests")
    skopeo_copy(f"oci:{turbo}:latest", f"docker://{reg}/app:latest-turbo", "--preserve-digests")
    pause = derived_layout(sample, 1, [TarEntry("pause", data=b"turbofs test sandbox\n")], work / "pause",
                           {"Entrypoint": ["sleep", "infinity"], "Cmd": None, "WorkingDir": "/"})
    skopeo_copy(f"oci:{pause}:latest", f"docker://{reg}/pause:1", "--preserve-digests")
    (work / "cni" / "net.d").mkdir(parents=True)
    (work / "cni" / "bin").mkdir()
    toml = cri_toml(plain_http_registries=(reg,), sandbox_image=f"{reg}/pause:1", cni_dir=work / "cni")
    ctrd = CriContainerd(toml + proxy_plugin_toml(turbofs_snapshotter.address), namespace=NAMESPACE)
    try:
        ctrd.start()
        cri = Cri(ctrd.address)
        refs = {"app": f"{reg}/app:latest", "twin": f"{reg}/app:latest-turbo", "pause": f"{reg}/pause:1",
                "logs": str(work / "logs")}
        yield ctrd, cri, refs
        cri.close()
    finally:
        ctrd.stop()


def test_pod_runs_a_lazily_pulled_image(
    cri_node: tuple[CriContainerd, Cri, dict[str, str]], turbofs_snapshotter: SnapshotterProcess
) -> None:
    ctrd, cri, refs = cri_node
    sn = turbofs_snapshotter
    version = cri.runtime("Version", cri_pb2.VersionRequest(version="v1"), cri_pb2.VersionResponse)
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1"), version

    # the kubelet's order: the sandbox first (containerd pulls sandbox_image itself), then the image
    uid = secrets.token_hex(4)
    logs = Path(refs["logs"]) / uid
    logs.mkdir(parents=True)
    sandbox_config = cri_pb2.PodSandboxConfig(
        metadata=cri_pb2.PodSandboxMetadata(name="turbofs-pod", uid=uid, namespace="default"),
        log_directory=str(logs),
        linux=cri_pb2.LinuxPodSandboxConfig(security_context=cri_pb2.LinuxSandboxSecurityContext(
            namespace_options=cri_pb2.NamespaceOption(network=cri_pb2.NODE))),
    )
    pod = cri.runtime("RunPodSandbox", cri_pb2.RunPodSandboxRequest(config=sandbox_config),
                      cri_pb2.RunPodSandboxResponse, timeout=300).pod_sandbox_id
    try:
        twin = fetch_image(refs["twin"])
        t0 = time.monotonic()
        image_ref = cri.image("PullImage", cri_pb2.PullImageRequest(
            image=cri_pb2.ImageSpec(image=refs["app"]), sandbox_config=sandbox_config), cri_pb2.PullImageResponse).image_ref
        print(f"\nCRI PullImage of the app image (lazy, via its turbo twin): {time.monotonic() - t0:.2f} s")
        assert image_ref == twin.config_digest  # the CRI image ID: the config's digest

        # nothing of the image's data came into containerd: no chunk blob, no index, no layer of its own
        content = ctrd.content_digests(namespace=NAMESPACE)
        twin_blobs = {d["digest"] for d in json.loads(twin.manifest)["layers"]}
        assert not content & twin_blobs
        app_manifest = json.loads(ctrd.content_get(ctrd.image_digest(refs["app"], namespace=NAMESPACE), namespace=NAMESPACE))
        app_layers = [d["digest"] for d in app_manifest["layers"]]
        pause_manifest = json.loads(ctrd.content_get(ctrd.image_digest(refs["pause"], namespace=NAMESPACE), namespace=NAMESPACE))
        shared = {d["digest"] for d in pause_manifest["layers"]}
        assert app_layers[0] in shared  # the Debian base, downloaded for the sandbox image
        assert not content & (set(app_layers) - shared)
        # the image's snapshot is the lazy mount of the twin
        info = json.loads(ctrd.ctr("snapshots", "--snapshotter", "turbofs", "info", twin.top, namespace=NAMESPACE).stdout)
        assert info["Labels"][L.REMOTE] == "top" and info["Labels"][L.REMOTE_IMAGE].endswith(f"/app@{twin.manifest_digest}")
        (mp,) = sn.turbofs_mounts()

        marker = secrets.token_hex(8)
        config = cri_pb2.ContainerConfig(
            metadata=cri_pb2.ContainerMetadata(name="app"),
            image=cri_pb2.ImageSpec(image=image_ref),
            args=[marker],  # the image's entrypoint (/app/run.sh) with this argument
            envs=[cri_pb2.KeyValue(key="GREETING", value="hi")],
            log_path="app/0.log",
        )
        cid = cri.runtime("CreateContainer", cri_pb2.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=sandbox_config), cri_pb2.CreateContainerResponse).container_id
        cri.runtime("StartContainer", cri_pb2.StartContainerRequest(container_id=cid), cri_pb2.StartContainerResponse)

        def status() -> cri_pb2.ContainerStatus:
            return cri.runtime("ContainerStatus", cri_pb2.ContainerStatusRequest(container_id=cid),
                               cri_pb2.ContainerStatusResponse).status

        _wait_for(lambda: status().state == cri_pb2.CONTAINER_EXITED, "the container to exit")
        st = status()
        assert (st.exit_code, st.reason) == (0, "Completed"), st
        assert st.log_path == str(logs / "app/0.log")
        assert _log_lines(Path(st.log_path)) == [("stdout", f"sample app 1.1.0 says: hi {marker}"),
                                                 ("stdout", "Hello from a turbofs sample image.")]

        # a second container, still running: its root file system is an overlay on the mount
        long = cri_pb2.ContainerConfig(metadata=cri_pb2.ContainerMetadata(name="sleeper"),
                                       image=cri_pb2.ImageSpec(image=image_ref), command=["sh", "-c"],
                                       args=["cat /app/VERSION; exec sleep 300"], log_path="sleeper/0.log")
        cid2 = cri.runtime("CreateContainer", cri_pb2.CreateContainerRequest(
            pod_sandbox_id=pod, config=long, sandbox_config=sandbox_config), cri_pb2.CreateContainerResponse).container_id
        cri.runtime("StartContainer", cri_pb2.StartContainerRequest(container_id=cid2), cri_pb2.StartContainerResponse)
        log2 = logs / "sleeper/0.log"
        _wait_for(lambda: log2.exists() and bool(_log_lines(log2)), "the sleeper's first line")
        assert _log_lines(log2) == [("stdout", "1.1.0")]
        rootfs = f"{ctrd.state}/io.containerd.runtime.v2.task/{NAMESPACE}/{cid2}/rootfs"
        (line,) = [x for x in Path("/proc/self/mountinfo").read_text().splitlines() if x.split(" ")[4] == rootfs]
        assert f"lowerdir={mp}" in line.split(" - ", 1)[1]
        cri.runtime("StopContainer", cri_pb2.StopContainerRequest(container_id=cid2, timeout=1), cri_pb2.StopContainerResponse)
        for c in (cid, cid2):
            cri.runtime("RemoveContainer", cri_pb2.RemoveContainerRequest(container_id=c), cri_pb2.RemoveContainerResponse)
    finally:
        cri.runtime("StopPodSandbox", cri_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), cri_pb2.StopPodSandboxResponse)
        cri.runtime("RemovePodSandbox", cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), cri_pb2.RemovePodSandboxResponse)
    for ref in (refs["app"], refs["pause"]):
        cri.image("RemoveImage", cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=ref)), cri_pb2.RemoveImageResponse)
    _wait_for(lambda: not sn.turbofs_mounts(), "the twin's mount to be released")
    assert not ctrd.ctr("snapshots", "--snapshotter", "turbofs", "ls", namespace=NAMESPACE).stdout.splitlines()[1:]
