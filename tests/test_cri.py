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

import hashlib
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
from tests.faultproxy import FaultProxy
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from tests.snapshotter_fixtures import (
    CriContainerd,
    SnapshotterProcess,
    cri_toml,
    derived_layout,
    proxy_plugin_toml,
)
from turbofs.proto import CRI_IMAGES, CRI_RUNTIME, SNAPSHOTS, cri_pb2, unary, unary_stream
from turbofs.proto import snapshots_pb2 as pb
from turbofs.snapshotter import labels as L
from turbofs.snapshotter.remote import fetch_image

R = TypeVar("R", bound=Message)
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace


class Cri:
    """The CRI services on containerd's socket."""

    proxy: FaultProxy  # in front of the registry: the fault-injection seam

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


def _start_container(cri: Cri, pod: str, config: cri_pb2.ContainerConfig,
                     sandbox_config: cri_pb2.PodSandboxConfig) -> str:
    """Create and start a container in ``pod``; its id."""
    cid: str = cri.runtime("CreateContainer", cri_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=sandbox_config), cri_pb2.CreateContainerResponse).container_id
    cri.runtime("StartContainer", cri_pb2.StartContainerRequest(container_id=cid), cri_pb2.StartContainerResponse)
    return cid


def _status(cri: Cri, cid: str) -> cri_pb2.ContainerStatus:
    status: cri_pb2.ContainerStatus = cri.runtime(
        "ContainerStatus", cri_pb2.ContainerStatusRequest(container_id=cid), cri_pb2.ContainerStatusResponse).status
    return status


@pytest.fixture(scope="module")
def cri_node(turbofs_snapshotter: SnapshotterProcess, shared_turbofs_registry: TurbofsRegistry,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CriContainerd, Cri, dict[str, str]]]:
    """containerd with the CRI plugin on turbofs, and the images (see the module docstring)."""
    from bench.images import ensure_image
    from index_builder.builder import build
    from tests.ocifixtures import TarEntry, whiteout

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
    # "shares:1": a plain image made of the sample's two base layers (the same blobs) and one
    # of its own, which whites out a file of the base
    shares = derived_layout(sample, 2, [TarEntry("other", "dir", mode=0o755), TarEntry("other/marker", data=b"own layer\n"),
                                        whiteout("etc/motd")], work / "shares")
    skopeo_copy(f"oci:{shares}:latest", f"docker://{reg}/shares:1", "--preserve-digests")
    (work / "cni" / "net.d").mkdir(parents=True)
    (work / "cni" / "bin").mkdir()
    proxy = FaultProxy(f"http://{reg}")
    toml = cri_toml(plain_http_registries=(reg, proxy.host_port), sandbox_image=f"{reg}/pause:1", cni_dir=work / "cni")
    ctrd = CriContainerd(toml + proxy_plugin_toml(turbofs_snapshotter.address), namespace=NAMESPACE)
    try:
        ctrd.start()
        cri = Cri(ctrd.address)
        refs = {"app": f"{reg}/app:latest", "twin": f"{reg}/app:latest-turbo", "pause": f"{reg}/pause:1",
                "logs": str(work / "logs"), "shares": f"{reg}/shares:1", "proxied-app": f"{proxy.host_port}/app:latest"}
        cri.proxy = proxy
        yield ctrd, cri, refs
        cri.close()
    finally:
        ctrd.stop()
        proxy.close()


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
        cid = _start_container(cri, pod, config, sandbox_config)
        _wait_for(lambda: _status(cri, cid).state == cri_pb2.CONTAINER_EXITED, "the container to exit")
        st = _status(cri, cid)
        assert (st.exit_code, st.reason) == (0, "Completed"), st
        assert st.log_path == str(logs / "app/0.log")
        assert _log_lines(Path(st.log_path)) == [("stdout", f"sample app 1.1.0 says: hi {marker}"),
                                                 ("stdout", "Hello from a turbofs sample image.")]

        # a second container, still running: its root file system is an overlay on the mount
        long = cri_pb2.ContainerConfig(metadata=cri_pb2.ContainerMetadata(name="sleeper"),
                                       image=cri_pb2.ImageSpec(image=image_ref), command=["sh", "-c"],
                                       args=["cat /app/VERSION; exec sleep 300"], log_path="sleeper/0.log")
        cid2 = _start_container(cri, pod, long, sandbox_config)
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


# -- a plain image sharing base layers with a lazily pulled one ---------------------------------


def _backend(sn: SnapshotterProcess) -> dict[str, pb.Info]:
    """The snapshotter's own snapshots (its socket, not containerd's metadata), by name."""
    with sn.channel() as channel:
        replies = unary_stream(channel, SNAPSHOTS, "List", pb.ListSnapshotsResponse)(pb.ListSnapshotsRequest(), timeout=30)
        return {info.name: info for reply in replies for info in reply.info}


def _usage(sn: SnapshotterProcess, key: str) -> tuple[int, int]:
    with sn.channel() as channel:
        u = unary(channel, SNAPSHOTS, "Usage", pb.UsageResponse)(pb.UsageRequest(key=key), timeout=30)
        return u.size, u.inodes


def _pull(cri: Cri, ref: str) -> str:
    return cri.image("PullImage", cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref)), cri_pb2.PullImageResponse).image_ref


def _remove_images(cri: Cri, *refs: str) -> None:
    for ref in refs:
        cri.image("RemoveImage", cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=ref)), cri_pb2.RemoveImageResponse)


def _run_in_pod(cri: Cri, logs_dir: str, image_ref: str, command: list[str]) -> list[tuple[str, str]]:
    """Run ``command`` in a container of ``image_ref`` in a pod of its own; its log lines."""
    uid = secrets.token_hex(4)
    logs = Path(logs_dir) / uid
    logs.mkdir(parents=True)
    sandbox_config = cri_pb2.PodSandboxConfig(
        metadata=cri_pb2.PodSandboxMetadata(name=f"pod-{uid}", uid=uid, namespace="default"),
        log_directory=str(logs),
        linux=cri_pb2.LinuxPodSandboxConfig(security_context=cri_pb2.LinuxSandboxSecurityContext(
            namespace_options=cri_pb2.NamespaceOption(network=cri_pb2.NODE))),
    )
    pod = cri.runtime("RunPodSandbox", cri_pb2.RunPodSandboxRequest(config=sandbox_config),
                      cri_pb2.RunPodSandboxResponse, timeout=300).pod_sandbox_id
    try:
        config = cri_pb2.ContainerConfig(metadata=cri_pb2.ContainerMetadata(name="c"), image=cri_pb2.ImageSpec(image=image_ref),
                                         command=command, log_path="c/0.log")
        cid = _start_container(cri, pod, config, sandbox_config)
        _wait_for(lambda: _status(cri, cid).state == cri_pb2.CONTAINER_EXITED, "the container to exit")
        st = _status(cri, cid)
        assert st.exit_code == 0, (st, Path(st.log_path).read_text())
        lines = _log_lines(Path(st.log_path))
        cri.runtime("RemoveContainer", cri_pb2.RemoveContainerRequest(container_id=cid), cri_pb2.RemoveContainerResponse)
        return lines
    finally:
        cri.runtime("StopPodSandbox", cri_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), cri_pb2.StopPodSandboxResponse)
        cri.runtime("RemovePodSandbox", cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), cri_pb2.RemovePodSandboxResponse)


#: In a container of "shares:1": its own layer, the base layers' files, the whiteout of its layer.
SHARES_CHECK = ["sh", "-c", "cat /other/marker /app/VERSION; test ! -e /etc/motd && echo motd-gone; "
                "sha256sum /etc/debian_version /bin/sh | cut -d' ' -f1"]


def _expected_shares(mp: Path) -> list[tuple[str, str]]:
    """What SHARES_CHECK prints, the base files' digests read from the twin's mount (the same
    base layers, flattened)."""
    digests = [hashlib.sha256((mp / p).read_bytes()).hexdigest() for p in ("etc/debian_version", "bin/sh")]
    return [("stdout", line) for line in ["own layer", "1.0.0", "motd-gone", *digests]]


def _clean(cri: Cri, ctrd: CriContainerd, sn: SnapshotterProcess, *refs: str) -> None:
    _remove_images(cri, *refs)
    _wait_for(lambda: not sn.turbofs_mounts(), "the twin's mount to be released")
    _wait_for(lambda: not ctrd.ctr("snapshots", "--snapshotter", "turbofs", "ls", namespace=NAMESPACE).stdout.splitlines()[1:],
              "the snapshots to go")


def test_plain_image_pulled_after_a_lazy_one_that_shares_its_base(
    cri_node: tuple[CriContainerd, Cri, dict[str, str]], turbofs_snapshotter: SnapshotterProcess
) -> None:
    """The lazy pull leaves the base layers' chain IDs as placeholders; the plain image's
    unpack needs them as real layers: the snapshotter fetches and applies exactly those."""
    ctrd, cri, refs = cri_node
    sn = turbofs_snapshotter
    twin = fetch_image(refs["twin"])
    _pull(cri, refs["app"])
    placeholders = {n: i for n, i in _backend(sn).items() if i.labels.get(L.REMOTE) == L.REMOTE_PLACEHOLDER}
    assert sorted(i.labels[L.TARGET] for i in placeholders.values()) == sorted(twin.chain[:2])
    (mp,) = sn.turbofs_mounts()

    shares = _pull(cri, refs["shares"])
    after = _backend(sn)
    for name in placeholders:  # the two base layers: real now, made from the layer blobs
        info = after[name]
        assert L.REMOTE not in info.labels and info.labels[L.MATERIALIZED] == info.labels[L.CRI_LAYER], info
        size, inodes = _usage(sn, name)
        assert size > 0 and inodes > 1
    top = [i for i in after.values() if i.labels.get(L.REMOTE) == L.REMOTE_TOP]
    assert len(top) == 1 and sn.turbofs_mounts() == [mp]  # the lazy image stays lazy
    # the twin's own layer was never downloaded: only the plain image's blobs it needed
    assert not ctrd.content_digests(namespace=NAMESPACE) & {d["digest"] for d in json.loads(twin.manifest)["layers"]}

    assert _run_in_pod(cri, refs["logs"], shares, SHARES_CHECK) == _expected_shares(mp)
    # and the lazy image still runs on its mount
    assert _run_in_pod(cri, refs["logs"], twin.config_digest, ["cat", "/app/VERSION"]) == [("stdout", "1.1.0")]
    _clean(cri, ctrd, sn, refs["app"], refs["shares"], refs["pause"])

    # the other order: the plain image first (real layers), the lazy one on top of them
    shares = _pull(cri, refs["shares"])
    _pull(cri, refs["app"])
    assert not [i for i in _backend(sn).values() if i.labels.get(L.REMOTE) == L.REMOTE_PLACEHOLDER]
    (mp,) = sn.turbofs_mounts()
    assert _run_in_pod(cri, refs["logs"], shares, SHARES_CHECK) == _expected_shares(mp)
    assert _run_in_pod(cri, refs["logs"], twin.config_digest, ["cat", "/app/VERSION"]) == [("stdout", "1.1.0")]
    _clean(cri, ctrd, sn, refs["app"], refs["shares"], refs["pause"])


def test_a_corrupt_layer_leaves_the_placeholder(
    cri_node: tuple[CriContainerd, Cri, dict[str, str]], turbofs_snapshotter: SnapshotterProcess
) -> None:
    """The lazy image comes through a proxy that then corrupts every blob: the base layer
    fails its digest, the plain image's pull fails naming the layer and the cause, and the
    placeholder stays one, until the registry answers right again."""
    ctrd, cri, refs = cri_node
    sn = turbofs_snapshotter
    _pull(cri, refs["proxied-app"])
    placeholders = {n for n, i in _backend(sn).items() if i.labels.get(L.REMOTE) == L.REMOTE_PLACEHOLDER}
    assert len(placeholders) == 2
    cri.proxy.faults.corrupt = 1_000_000
    try:
        with pytest.raises(grpc.RpcError) as err:
            _pull(cri, refs["shares"])
        assert isinstance(err.value, grpc.Call)
        message = err.value.details() or ""
        layers = {_backend(sn)[n].labels[L.CRI_LAYER] for n in placeholders}
        assert any(layer in message for layer in layers) and "digest" in message, message
    finally:
        cri.proxy.faults.corrupt = 0
    now = _backend(sn)
    assert all(now[n].labels.get(L.REMOTE) == L.REMOTE_PLACEHOLDER for n in placeholders)
    assert all(_usage(sn, n) == (0, 0) for n in placeholders)
    leftovers = [p.name for p in (sn.root / "snapshots").iterdir() if not p.name.isdigit()]
    assert not leftovers, leftovers  # no half-applied folder

    shares = _pull(cri, refs["shares"])  # the registry answers right again
    assert all(L.REMOTE not in _backend(sn)[n].labels for n in placeholders)
    (mp,) = sn.turbofs_mounts()
    assert _run_in_pod(cri, refs["logs"], shares, SHARES_CHECK) == _expected_shares(mp)
    _clean(cri, ctrd, sn, refs["proxied-app"], refs["shares"], refs["pause"])
