"""The containerd snapshotter (``turbofs snapshotter``), ``turbofs pull`` and ``turbofs run``.

The first tests need nothing but Python: containerd's filter syntax, chain IDs, and the
snapshotter's logic over a fake mounter and a fake registry. The rest run for real: the
snapshotter process (``tests/snapshotter_fixtures.py``, started first), then Debian's
containerd 1.6 with ``[proxy_plugins.turbofs]`` pointing at it, runc, the turbofs registry,
and the Debian-based ``sample`` image (``bench.images``) converted to a turbo image:

* ``turbofs run`` streams a container's output (the image's entrypoint, cmd, env and working
  directory; then ``sh -c`` commands), and times the first line against ``ctr images pull``
  + ``ctr run`` of the plain image;
* what a container writes lands in its own upper directory, never in the image mount or
  the chunk cache; two containers share one mount; removing them removes their snapshots,
  and removing the image releases the mount;
* a snapshotter restart keeps a running container working (the mounts are their own
  processes); a snapshotter crash plus a dead mount daemon: the restarted snapshotter mounts
  the image again;
* a plain image unpacks through the same snapshotter (``ctr images pull --snapshotter``);
* the CRI plugin's labels on a plain image with a turbo twin give lazy snapshots;
* bad input gets the right gRPC codes from the snapshotter socket, which keeps serving.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from tests.containerd_fixtures import Containerd, require_containerd, unique_namespace
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from tests.snapshotter_fixtures import SnapshotterProcess, derived_layout
from turbofs.core.errors import DigestMismatch, NotFound, UsageError
from turbofs.core.registry import Reference
from turbofs.proto import CRI_IMAGES, SNAPSHOTS, cri_pb2, unary, unary_stream
from turbofs.proto import snapshots_pb2 as pb
from turbofs.snapshotter import filters
from turbofs.snapshotter import labels as L
from turbofs.snapshotter.core import Snapshotter, Usage, remote_name
from turbofs.snapshotter.errors import AlreadyExists, FailedPrecondition, LayerFailed
from turbofs.snapshotter.remote import LayerBlob, LayerSource, Resolver, TurboImage, fetch_image

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_GREETING = "sample app 1.1.0 says: hello world"


# -- without containerd -------------------------------------------------------------------


def test_filters_parse_containerds_syntax() -> None:
    text = 'labels."containerd.io/snapshot.ref"==sha256:ab,parent=="default/3/sha256:cd"'
    parsed = filters.parse([text])
    hit = filters.snapshot_adaptor("n", "default/3/sha256:cd", "committed", {"containerd.io/snapshot.ref": "sha256:ab"})
    miss = filters.snapshot_adaptor("n", "", "committed", {"containerd.io/snapshot.ref": "sha256:ab"})
    assert filters.match(parsed, hit) and not filters.match(parsed, miss)
    assert filters.match(filters.parse(["kind==active", "name~=^n$"]), hit)  # OR of filters
    assert not filters.match(filters.parse(["kind==active,name~=^n$"]), hit)
    assert filters.match(filters.parse(["labels.a"]), filters.snapshot_adaptor("n", "", "view", {"a": "1"}))
    assert filters.match(filters.parse([]), miss)
    for bad in ['name=="open', "name==", "name~=(", "==x", "name==a b"]:
        with pytest.raises(Exception, match="filter"):
            filters.parse([bad])


def test_chain_ids() -> None:
    d = [f"sha256:{i:064x}" for i in range(3)]
    c = L.chain_ids(d)
    assert c[0] == d[0]
    assert c[1] == "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    assert c[2] == "sha256:" + hashlib.sha256(f"{c[1]} {d[2]}".encode()).hexdigest()


class FakeMounter:
    """Mounts are folders with a file in them; ``dead`` mountpoints fail ``check``."""

    def __init__(self) -> None:
        self.mounted: dict[Path, str] = {}
        self.dead: set[Path] = set()
        self.calls: list[str] = []

    def mount(self, ref: str, mountpoint: Path, *, plain_http: bool) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        (mountpoint / "image").write_text(ref)
        self.mounted[mountpoint] = ref
        self.dead.discard(mountpoint)
        self.calls.append(f"mount {ref}")

    def check(self, mountpoint: Path) -> bool:
        return mountpoint in self.mounted and mountpoint not in self.dead

    def unmount(self, mountpoint: Path) -> None:
        self.mounted.pop(mountpoint, None)
        (mountpoint / "image").unlink(missing_ok=True)
        self.calls.append(f"unmount {mountpoint.name}")

    def close(self) -> None:
        pass  # the mounts stay, as with the real one


def _fake_image(ref: str, layers: int = 3) -> TurboImage:
    diffs = tuple(f"sha256:{hashlib.sha256(f'{ref}/{i}'.encode()).hexdigest()}" for i in range(layers))
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": list(diffs)}, "config": {"Cmd": ["sh"]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "ref": ref}).encode()
    return TurboImage(Reference.parse(ref), "sha256:" + hashlib.sha256(manifest).hexdigest(), manifest,
                      "application/vnd.oci.image.manifest.v1+json", "sha256:" + hashlib.sha256(config).hexdigest(),
                      "application/vnd.oci.image.config.v1+json", config, diffs)


class FakeResolver(Resolver):
    def __init__(self, images: list[TurboImage]) -> None:
        super().__init__()
        self.images = {img.manifest_digest: img for img in images}

    def turbo(self, ref: str, manifest_digest: str) -> TurboImage:
        if manifest_digest not in self.images:
            raise NotFound(f"{ref}@{manifest_digest}: manifest unknown")
        return self.images[manifest_digest]

    def for_cri(self, ref: str, manifest_digest: str) -> TurboImage | None:
        return self.images.get(manifest_digest)

    def presented(self, pinned: str, manifest_digest: str) -> tuple[int, int]:
        return 1000 + len(self.images[manifest_digest].diff_ids), 7


def _pull(sn: Snapshotter, img: TurboImage, ns: str) -> str:
    """What containerd's unpacker makes of an image whose layers carry labels naming a turbo
    image (each layer in turn, on the one below); the backend name of the top."""
    parent = ""
    for i, chain_id in enumerate(img.chain):
        labels = {L.TARGET: chain_id, L.IMAGE_REF: str(img.reference), L.MANIFEST: img.manifest_digest}
        with pytest.raises(AlreadyExists):
            sn.prepare(f"{ns}/{i}/extract-{chain_id}", parent, labels)
        parent = remote_name(chain_id, parent)
        assert sn.stat(parent).labels[L.TARGET] == chain_id
    return parent


def test_core_remote_and_local_snapshots(tmp_path: Path) -> None:
    img, other = _fake_image("reg.example/app:1"), _fake_image("reg.example/other:1", layers=1)
    mounter = FakeMounter()
    sn = Snapshotter(tmp_path / "root", mounter, FakeResolver([img, other]))
    top = _pull(sn, img, "a")
    assert mounter.calls == [f"mount {img.pinned}"]  # one mount, at the first layer
    assert _pull(sn, img, "b") == top  # a second namespace shares the snapshots
    assert [s.remote for s in sn.walk([])] == ["top", "placeholder", "placeholder"]  # placeholders last
    assert (sn.usage(top).size, sn.usage(top).inodes) == (1003, 7)  # what the image presents
    assert sn.usage(remote_name(img.chain[0], "")) == Usage(0, 0)  # a placeholder presents nothing
    # what turbofs pull does: the top alone, without a parent
    with pytest.raises(AlreadyExists):
        sn.prepare("e/1/extract", "", {L.TARGET: img.top, L.IMAGE_REF: str(img.reference), L.MANIFEST: img.manifest_digest})
    alone = sn.stat(remote_name(img.top, ""))
    assert (alone.remote, alone.parent, alone.image) == ("top", "", img.manifest_digest)
    sn.remove(alone.name)
    assert mounter.mounted  # the chain above still holds the mount

    # a container: an overlay over the image mount, its own upper directory
    (m,) = sn.prepare("a/9/c1", top, {})
    opts = dict(o.split("=", 1) for o in m.options if "=" in o)
    assert m.type == "overlay" and Path(opts["lowerdir"]).joinpath("image").read_text() == img.pinned
    assert Path(opts["upperdir"]).is_dir() and Path(opts["upperdir"]).parent.parent == tmp_path / "root" / "snapshots"
    assert sn.mounts("a/9/c1") == [m]
    (v,) = sn.view("a/9/v1", top, {})
    assert (v.type, v.options) == ("bind", ("ro", "rbind")) and v.source == opts["lowerdir"]

    # placeholders hold no files: no snapshot can stand on one, and they are not offered as real layers
    first = remote_name(img.chain[0], "")
    with pytest.raises(FailedPrecondition, match="placeholder"):
        sn.prepare("a/10/on-placeholder", first, {})
    (plain,) = sn.prepare("c/1/extract", "", {L.TARGET: img.chain[0]})
    assert plain.type == "bind" and plain.options == ("rw", "rbind")
    Path(plain.source, "f").write_text("x" * 5000)
    sn.commit("c/2/" + img.chain[0], "c/1/extract", {L.TARGET: img.chain[0]})
    with pytest.raises(AlreadyExists, match="already committed"):
        sn.prepare("d/1/extract", "", {L.TARGET: img.chain[0]})  # a real layer now exists: shared
    assert sn.usage("c/2/" + img.chain[0]).size >= 5000

    # the target must be one of the image's chain IDs
    with pytest.raises(FailedPrecondition, match="not a chain ID"):
        sn.prepare("a/11/x", "", {L.TARGET: other.chain[0], L.IMAGE_REF: str(img.reference), L.MANIFEST: img.manifest_digest})

    # removal: children first; the mount goes with the last snapshot of the image
    with pytest.raises(FailedPrecondition, match="children"):
        sn.remove(top)
    for key in ("a/9/c1", "a/9/v1", top, remote_name(img.chain[1], first), first, "c/2/" + img.chain[0]):
        sn.remove(key)
    assert mounter.calls[-1].startswith("unmount") and not mounter.mounted

    # restart: a dead mount is mounted again, a live one re-attached
    top = _pull(sn, img, "a")
    sn.close()
    (mp,) = mounter.mounted
    mounter.dead.add(mp)
    sn2 = Snapshotter(tmp_path / "root", mounter, FakeResolver([img]))
    sn2.recover(background=False)
    assert mounter.calls[-1] == f"mount {img.pinned}" and mounter.check(mp)
    n = len(mounter.calls)
    sn2.recover()
    assert len(mounter.calls) == n
    assert sn2.stat(top).remote == "top"
    sn2.close()


class LayerResolver(FakeResolver):
    """Layers from local tar bytes; ``fail`` makes the next fetches fail, as a registry might."""

    def __init__(self, images: list[TurboImage], layers: dict[str, bytes]) -> None:
        super().__init__(images)
        self.layers = layers
        self.fetches: list[str] = []
        self.fail = 0

    def fetch_layer(self, src: LayerSource, dest: Path) -> LayerBlob:
        self.fetches.append(src.layer_digest)
        time.sleep(0.2)  # long enough for concurrent askers to pile up
        if self.fail:
            self.fail -= 1
            raise DigestMismatch(f"blob {src.layer_digest}: content has another digest")
        data = self.layers[src.layer_digest]
        dest.write_bytes(data)
        return LayerBlob(dest, src.layer_digest, len(data), "none", "sha256:" + hashlib.sha256(data).hexdigest())


def test_placeholders_become_layers_once(tmp_path: Path) -> None:
    from tests.ocifixtures import TarEntry, layer_tar_bytes, whiteout

    tars = [layer_tar_bytes([TarEntry("etc", "dir"), TarEntry("etc/a", data=b"a" * 10000), TarEntry("etc/b", data=b"b")]),
            layer_tar_bytes([whiteout("etc/b"), TarEntry("etc/c", data=b"c")])]
    digests = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    img = _fake_image("reg.example/app:1", layers=3)
    resolver = LayerResolver([img], dict(zip(digests, tars, strict=True)))
    sn = Snapshotter(tmp_path / "root", FakeMounter(), resolver)
    parent = ""
    for i, chain_id in enumerate(img.chain):  # what the CRI plugin's unpacker does
        labels = {L.TARGET: chain_id, L.CRI_IMAGE_REF: "reg.example/app:1", L.CRI_MANIFEST: img.manifest_digest,
                  L.CRI_LAYER: digests[i] if i < 2 else "sha256:" + "f" * 64}
        with pytest.raises(AlreadyExists):
            sn.prepare(f"k8s.io/{i}/extract", parent, labels)
        parent = remote_name(chain_id, parent)
    second = sn.stat(parent).parent
    first = sn.stat(second).parent

    # a failure names the layer and the cause, and leaves both placeholders as they were
    resolver.fail = 1
    with pytest.raises(LayerFailed, match=f"layer {digests[0]} of reg.example/app:1.*content has another digest") as err:
        sn.prepare("k8s.io/5/on-second", second, {})
    assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert [sn.stat(n).remote for n in (first, second)] == ["placeholder", "placeholder"]
    assert sorted(p.name for p in sn.snapshots_dir.iterdir()) == []

    # four at once: each layer is fetched and applied once, the lower one first
    results: list[object] = []
    threads = [threading.Thread(target=lambda k=k: results.append(sn.prepare(f"k8s.io/6/c{k}", second, {})))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and resolver.fetches == [digests[0], digests[0], digests[1]]
    (m,) = sn.mounts("k8s.io/6/c0")
    lowers = dict(o.split("=", 1) for o in m.options if "=" in o)["lowerdir"].split(":")
    assert [Path(d).parent.name for d in lowers] == [str(sn.stat(second).id), str(sn.stat(first).id)]
    assert os.lstat(Path(lowers[0]) / "etc/b").st_rdev == 0 and (Path(lowers[0]) / "etc/c").read_bytes() == b"c"
    assert (Path(lowers[1]) / "etc/a").read_bytes() == b"a" * 10000
    info = sn.stat(first)
    assert info.remote is None and info.image is None and info.labels[L.MATERIALIZED] == digests[0]
    assert L.REMOTE not in info.labels and sn.usage(first).size >= 10000
    assert sn.stat(parent).remote == "top"  # the lazy top stays as it is
    # a Mounts of a placeholder-free committed layer: read-only, all of it
    (ro,) = sn.mounts(second)
    assert ro.type == "overlay" and ro.options == ("lowerdir=" + ":".join(lowers),)
    sn.close()


def test_cleanup_reclaims_what_nothing_refers_to(tmp_path: Path) -> None:
    img = _fake_image("reg.example/app:1")
    mounter = FakeMounter()
    sn = Snapshotter(tmp_path / "root", mounter, FakeResolver([img]))
    sn.prepare("a/1/kept", "", {})
    orphan = sn.snapshots_dir / "999"
    (orphan / "fs").mkdir(parents=True)
    mp = sn.ensure_mount(img.manifest_digest, img.pinned)  # a mount no snapshot refers to
    (sn.mounts_dir / "stray").mkdir()
    sn.cleanup()
    assert not orphan.exists() and not (sn.mounts_dir / "stray").exists()
    assert mp not in mounter.mounted and sn.store.mount(img.manifest_digest) is None
    assert sn.stat("a/1/kept").kind_name == "active" and sn.mounts("a/1/kept")[0].type == "bind"
    sn.close()


def test_client_conventions(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbofs.containerd import Target, ctr_run_argv, image_name, run_args

    for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
        monkeypatch.delenv(var, raising=False)
    assert Target.from_env() == Target("/run/containerd/containerd.sock", "default", "turbofs")
    monkeypatch.setenv("CONTAINERD_ADDRESS", "/x.sock")
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "ns")
    monkeypatch.setenv("CONTAINERD_SNAPSHOTTER", "sn")
    assert Target.from_env() == Target("/x.sock", "ns", "sn")
    assert Target.from_env("/y.sock", None, None) == Target("/y.sock", "ns", "sn")
    img = _fake_image("reg.example/app:1")
    conf = {"rootfs": {"diff_ids": list(img.diff_ids)}, "config": {"Entrypoint": ["/e"], "Cmd": ["c1", "c2"]}}
    img = TurboImage(**{**img.__dict__, "config": json.dumps(conf).encode()})
    assert run_args(img, []) == ["/e", "c1", "c2"]
    assert run_args(img, ["x"]) == ["/e", "x"]  # CMD replaces Cmd
    assert run_args(img, ["-c", "y"], ["sh"]) == ["sh", "-c", "y"]  # --entrypoint drops Cmd too
    with pytest.raises(UsageError, match="no Entrypoint or Cmd"):
        run_args(img, [], [])  # --entrypoint '' without a command
    assert image_name("docker://reg.example/app") == "reg.example/app:latest"
    argv = ctr_run_argv(Target("/a", "n", "turbofs"), "reg.example/app:1", "id", ["/e"], rm=True)
    assert argv == ["ctr", "--address", "/a", "--namespace", "n", "run", "--snapshotter", "turbofs", "--rm",
                    "reg.example/app:1", "id", "/e"]


def test_containerd_config_files() -> None:
    """The files of containerd_config/ parse, containerd accepts its config, and the documented
    turbofs settings are the real defaults."""
    import dataclasses
    import shutil as sh
    import tomllib

    from turbofs.core.config import (
        DaemonConfig,
        RegistryConfig,
        SnapshotterConfig,
        daemon_config,
        registry_config,
        snapshotter_config,
    )

    base = REPO_ROOT / "containerd_config"
    for path in base.rglob("*.toml"):
        tomllib.loads(path.read_text())
    node = base / "etc/turbofs/config.toml"
    table = tomllib.loads(node.read_text())
    loaded = {"snapshotter": snapshotter_config(node), "daemon": daemon_config(node), "registry": registry_config(node)}
    defaults = {"snapshotter": SnapshotterConfig(), "daemon": DaemonConfig(), "registry": RegistryConfig()}
    for name, values in table.items():
        for key, value in values.items():
            want = getattr(defaults[name], key)
            assert str(value) == str(want), f"[{name}] {key} = {value!r} in {node}, but the default is {want!r}"
            assert str(getattr(loaded[name], key)) == str(want)
    assert {f.name for f in dataclasses.fields(SnapshotterConfig)} <= set(table["snapshotter"])
    units = base / "etc/systemd/system"
    assert "KillMode=process" in (units / "turbofs-snapshotter.service").read_text()
    assert "After=turbofs-snapshotter.service" in (units / "containerd.service.d/turbofs.conf").read_text()
    if sh.which("containerd") is None:
        pytest.skip("containerd is not installed")
    dump = subprocess.run(["containerd", "--config", str(base / "etc/containerd/config.toml"), "config", "dump"],
                          capture_output=True, text=True, check=True).stdout
    for line in ('snapshotter = "turbofs"', "disable_snapshot_annotations = false", "[proxy_plugins.turbofs]",
                 'address = "/run/turbofs/snapshotter.sock"'):
        assert line in dump
    assert f'address = "{SnapshotterConfig().address}"' in dump


# -- helpers for the real thing ------------------------------------------------------------


def _cli(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "turbofs.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"turbofs {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _where(c: Containerd, namespace: str | None = None) -> list[str]:
    return ["--address", c.address, "--namespace", namespace or c.namespace, "--snapshotter", "turbofs"]


def _timed(argv: list[str], timeout: float = 180) -> tuple[float, float, str]:
    """(seconds to the first line of output, seconds to exit, output) of a command."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.monotonic() - t0
    rest = proc.stdout.read()
    rc = proc.wait(timeout)
    out = first + rest
    assert rc == 0, f"{' '.join(argv)} exited {rc}:\n{out}"
    return t_first, time.monotonic() - t0, out


def _retry(fn: Callable[[], subprocess.CompletedProcess[str]], seconds: float = 30) -> subprocess.CompletedProcess[str]:
    """containerd's connection to a restarted snapshotter backs off for a few seconds."""
    deadline = time.monotonic() + seconds
    while True:
        proc = fn()
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc
        time.sleep(0.5)


def _wait_for(cond: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _overlay(c: Containerd, container: str, namespace: str | None = None) -> dict[str, str]:
    """The overlay options of a running container's root file system."""
    point = f"{c.state}/io.containerd.runtime.v2.task/{namespace or c.namespace}/{container}/rootfs"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == point:
            sep = fields.index("-")
            assert fields[sep + 1] == "overlay", line
            return dict(o.split("=", 1) for o in fields[sep + 3].split(",") if "=" in o)
    raise AssertionError(f"no root file system mounted for {container}")


def _kill_container(c: Containerd, name: str, namespace: str | None = None) -> None:
    c.ctr("tasks", "delete", "--force", name, namespace=namespace, check=False)
    c.ctr("containers", "rm", name, namespace=namespace)


def _collect_garbage(c: Containerd, namespace: str | None = None) -> None:
    """Have containerd collect garbage now (deleting a lease with --sync does), rather than
    when its scheduler next gets to it: it keeps collections to 2% of the time
    (``pause_threshold`` 0.02), so after a 0.4 s collection the next may come 20 s later
    (the likely cause of one time-out of the wait below, under the full suite's load)."""
    lease = c.ctr("leases", "create", namespace=namespace).stdout.split()[0]
    c.ctr("leases", "delete", "--sync", lease, namespace=namespace)


class Snapshots:
    """Direct calls to the snapshotter's socket."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def call(self, method: str, request: Message, reply: type[Message] = Empty) -> Any:
        return unary(self.channel, SNAPSHOTS, method, reply)(request, timeout=60)

    def code(self, method: str, request: Message, reply: type[Message] = Empty) -> tuple[grpc.StatusCode, str]:
        try:
            self.call(method, request, reply)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code(), exc.details() or ""
        raise AssertionError(f"{method} succeeded")

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> pb.PrepareSnapshotResponse:
        req = pb.PrepareSnapshotRequest(snapshotter="turbofs", key=key, parent=parent, labels=dict(labels or {}))
        reply: pb.PrepareSnapshotResponse = self.call("Prepare", req, pb.PrepareSnapshotResponse)
        return reply

    def stat(self, key: str) -> pb.Info:
        reply: pb.StatSnapshotResponse = self.call("Stat", pb.StatSnapshotRequest(key=key), pb.StatSnapshotResponse)
        return reply.info

    def remove(self, key: str) -> None:
        self.call("Remove", pb.RemoveSnapshotRequest(key=key))

    def list(self, *filter_texts: str) -> list[pb.Info]:
        stream = unary_stream(self.channel, SNAPSHOTS, "List", pb.ListSnapshotsResponse)
        return [info for batch in stream(pb.ListSnapshotsRequest(filters=list(filter_texts)), timeout=60) for info in batch.info]


# -- the images ------------------------------------------------------------------------------


@dataclass
class Images:
    registry: TurbofsRegistry
    turbo_ref: str  # the turbo sample
    plain_ref: str  # the same image, plain
    plain_digest: str
    twin_ref: str  # plain_ref's turbo twin (tag + "-turbo")
    turbo: TurboImage


@pytest.fixture(scope="module")
def images(shared_turbofs_registry: TurbofsRegistry, tmp_path_factory: pytest.TempPathFactory) -> Images:
    from bench.images import ensure_image
    from index_builder.builder import build

    require_containerd()  # skip before building anything where the rest cannot run
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    layout = ensure_image("sample")
    turbo_layout = tmp_path_factory.mktemp("sample-turbo") / "layout"
    build(f"oci:{layout}:latest", turbo_layout, progress=False)
    reg = shared_turbofs_registry.host_port
    for dest in (f"{reg}/sample:latest", f"{reg}/plain:latest-turbo"):
        skopeo_copy(f"oci:{turbo_layout}:latest", f"docker://{dest}", "--preserve-digests")
    skopeo_copy(f"oci:{layout}:latest", f"docker://{reg}/plain:latest", "--preserve-digests")
    index = json.loads((layout / "index.json").read_text())
    return Images(shared_turbofs_registry, f"{reg}/sample:latest", f"{reg}/plain:latest",
                  index["manifests"][0]["digest"], f"{reg}/plain:latest-turbo", fetch_image(f"{reg}/sample:latest"))


# -- turbofs run --------------------------------------------------------------------------


def test_turbofs_run_streams_output(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    c, sn = snapshotter_containerd, turbofs_snapshotter
    # cold: nothing mounted, an empty chunk cache
    t_first, t_all, out = _timed([sys.executable, "-m", "turbofs.cli", "run", "--rm", *_where(c), images.turbo_ref])
    assert out.splitlines()[0] == SAMPLE_GREETING  # Entrypoint + Cmd, Env (GREETING), WorkingDir
    print(f"\nturbofs run (cold, lazy): first line after {t_first:.2f} s, done after {t_all:.2f} s")
    assert len(sn.turbofs_mounts()) == 1

    script = 'echo "$GREETING from $(pwd) as $(id -u)"; cat /app/VERSION; test ! -e /etc/motd && echo no-motd; head -c 3 /etc/debian_version'
    out = _cli("run", "--rm", *_where(c), "--entrypoint", "sh", images.turbo_ref, "--", "-c", script).stdout
    assert out.splitlines()[:3] == ["hello from /app as 0", "1.1.0", "no-motd"]
    assert out.splitlines()[3] == "12."
    out = _cli("run", "--rm", "--name", "with-args", *_where(c), images.turbo_ref, "--", "turbofs").stdout
    assert out.splitlines()[0] == "sample app 1.1.0 says: hello turbofs"  # CMD replaces the image's Cmd
    assert len(sn.turbofs_mounts()) == 1
    assert "with-args" not in c.ctr("containers", "ls", "-q").stdout  # --rm
    c.ctr("images", "rm", "--sync", images.turbo_ref)
    _wait_for(lambda: not sn.turbofs_mounts(), "the image mount to be released")


def test_writes_stay_in_the_upper_dir_and_one_mount_is_shared(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    c, sn = snapshotter_containerd, turbofs_snapshotter
    _cli("pull", *_where(c), images.turbo_ref)
    for name in ("w1", "w2"):
        _cli("run", "--detach", "--name", name, *_where(c), "--entrypoint", "sleep", images.turbo_ref, "--", "300")
    (mp,) = sn.turbofs_mounts()
    o1, o2 = _overlay(c, "w1"), _overlay(c, "w2")
    assert o1["lowerdir"] == o2["lowerdir"] == str(mp)  # one mount, shared
    assert o1["upperdir"] != o2["upperdir"]
    upper1 = Path(o1["upperdir"])

    marker = secrets.token_hex(16)
    c.ctr("tasks", "exec", "--exec-id", "write", "w1", "sh", "-c",
          f"echo {marker} > /etc/turbofs-marker && echo {marker} >> /app/VERSION && echo {marker} > /root/new")
    assert (upper1 / "etc/turbofs-marker").read_text().strip() == marker
    assert (upper1 / "app/VERSION").read_text().split() == ["1.1.0", marker]  # copied up, then written
    assert (upper1 / "root/new").read_text().strip() == marker
    assert not (mp / "etc/turbofs-marker").exists() and (mp / "app/VERSION").read_text().strip() == "1.1.0"
    seen = c.ctr("tasks", "exec", "--exec-id", "read", "w2", "sh", "-c",
                 "cat /app/VERSION; test -e /etc/turbofs-marker || echo absent").stdout.split()
    assert seen == ["1.1.0", "absent"]
    for path in sn.cache_dir.rglob("*"):
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), f"the marker reached the chunk cache: {path}"

    # removing the containers removes their snapshots (containerd's GC calls Remove) ...
    for name in ("w1", "w2"):
        _kill_container(c, name)
    _collect_garbage(c)
    _wait_for(lambda: not upper1.exists() and not Path(o2["upperdir"]).exists(), "the containers' upper dirs to go")
    assert sn.turbofs_mounts() == [mp]  # ... the image still holds the mount
    # ... and removing the image releases it, with its daemon
    pids = sn.daemon_pids()
    c.ctr("images", "rm", "--sync", images.turbo_ref)
    _wait_for(lambda: not sn.turbofs_mounts(), "the image mount to be released")
    _wait_for(lambda: not any(_alive(p) for p in pids), "the mount daemon to exit")
    assert not Snapshots(sn.channel()).list(f'labels."{L.REMOTE}"')


def _alive(pid: int) -> bool:
    """Running (a zombie is not: a daemon whose parent died waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_snapshotter_restart_keeps_containers_working(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    c, sn = snapshotter_containerd, turbofs_snapshotter
    _cli("run", "--detach", "--name", "r1", *_where(c), "--entrypoint", "sleep", images.turbo_ref, "--", "300")
    pids = sn.daemon_pids()
    assert len(pids) == 1
    sn.restart()
    assert "re-attached the turbofs mount" in sn.log()
    assert sn.daemon_pids() == pids
    # the running container reads files it never read before (fetched lazily now)
    out = c.ctr("tasks", "exec", "--exec-id", "after", "r1", "sh", "-c",
                "cat /etc/issue; md5sum /usr/bin/* | wc -l; echo ok > /tmp/w && cat /tmp/w").stdout.split("\n")
    assert out[0].startswith("turbofs sample image") and int(out[1]) > 50 and out[2] == "ok"
    # and new containers start (containerd reconnects after a back-off)
    proc = _retry(lambda: _cli("run", "--rm", *_where(c), images.turbo_ref, check=False))
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == SAMPLE_GREETING, proc.stderr
    _kill_container(c, "r1")

    # a crash of the snapshotter and of the mount daemon: the image is mounted again
    sn.kill()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not any(_alive(p) for p in pids), "the mount daemon to die")
    sn.start()
    _wait_for(lambda: "mounting it again" in sn.log() and bool(sn.daemon_pids()) and sn.daemon_pids() != pids,
              "the image to be mounted again")
    proc = _retry(lambda: _cli("run", "--rm", *_where(c), "--entrypoint", "cat", images.turbo_ref, "--", "/app/VERSION",
                               check=False))
    assert proc.returncode == 0 and proc.stdout.strip() == "1.1.0", proc.stderr
    c.ctr("images", "rm", "--sync", images.turbo_ref)
    _wait_for(lambda: not sn.turbofs_mounts(), "the image mount to be released")


def test_plain_image_through_the_same_snapshotter(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    c, sn = snapshotter_containerd, turbofs_snapshotter
    ns = unique_namespace("plain")
    mounts_before = sn.turbofs_mounts()
    t0 = time.monotonic()
    c.ctr("images", "pull", "--plain-http", "--snapshotter", "turbofs", images.plain_ref, namespace=ns, timeout=300)
    t_pull = time.monotonic() - t0
    t_first, t_all, out = _timed(["ctr", *_where(c, ns)[:4], "run", "--rm", "--snapshotter", "turbofs",
                                  images.plain_ref, "p1"])
    assert out.splitlines()[0] == SAMPLE_GREETING
    print(f"\nctr images pull + ctr run (plain): first line after {t_pull + t_first:.2f} s "
          f"(pull {t_pull:.2f} s), done after {t_pull + t_all:.2f} s")
    out = c.ctr("run", "--rm", "--snapshotter", "turbofs", images.plain_ref, "p2", "sh", "-c",
                "cat /app/VERSION; test ! -e /etc/motd && echo whiteout-applied", namespace=ns).stdout
    assert out.split() == ["1.1.0", "whiteout-applied"]
    snaps = Snapshots(sn.channel())
    local = snaps.list(f'name~="^{ns}/",kind==committed')
    assert len(local) == 3 and all(L.REMOTE not in i.labels for i in local)  # the layers, unpacked
    assert sn.turbofs_mounts() == mounts_before  # no lazy mount for a plain image
    c.ctr("images", "rm", "--sync", images.plain_ref, namespace=ns)
    _wait_for(lambda: not snaps.list(f'name~="^{ns}/"'), "the plain image's snapshots to go")


def _all_gone(snaps: Snapshots, sn: SnapshotterProcess, ns: str) -> bool:
    return not snaps.list(f'name~="^{ns}/"') and not sn.turbofs_mounts()


def test_plain_image_sharing_base_layers_with_a_turbo_image(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd, tmp_path: Path
) -> None:
    """One namespace, a turbo image pulled lazily, then a plain image made of the same base
    layers plus one of its own: the plain image unpacks and runs (its shared base layers are
    real layers, not parts of the flattened turbo image), and the turbo image still runs lazily.
    Then the other order, in a fresh namespace."""
    from bench.images import image_path
    from tests.ocifixtures import TarEntry

    c, sn = snapshotter_containerd, turbofs_snapshotter
    reg = images.registry.host_port
    marker = secrets.token_hex(8)
    layout = derived_layout(image_path("sample"), 2, [
        TarEntry("other", "dir", mode=0o755), TarEntry("other/marker", data=f"{marker}\n".encode())], tmp_path / "plain")
    plain = f"{reg}/shares-base:latest"
    skopeo_copy(f"oci:{layout}:latest", f"docker://{plain}", "--preserve-digests")
    check = "cat /other/marker; cat /app/VERSION; test ! -e /etc/motd || echo motd-there"
    snaps = Snapshots(sn.channel())
    for ns, order in ((unique_namespace("shared-a"), ("turbo", "plain")), (unique_namespace("shared-b"), ("plain", "turbo"))):
        for what in order:
            if what == "turbo":
                _cli("pull", *_where(c, ns), images.turbo_ref)
            else:
                c.ctr("images", "pull", "--plain-http", "--snapshotter", "turbofs", plain, namespace=ns, timeout=300)
        # the plain image: the base layers as they are (1.0.0, /etc/motd), plus its own layer
        out = c.ctr("run", "--rm", "--snapshotter", "turbofs", plain, "p", "sh", "-c", check, namespace=ns).stdout
        assert out.split() == [marker, "1.0.0", "motd-there"], out
        out = _cli("run", "--rm", *_where(c, ns), "--entrypoint", "sh", images.turbo_ref, "--", "-c", check).stdout
        assert out.split()[-1:] == ["1.1.0"] and marker not in out, out
        local = snaps.list(f'name~="^{ns}/",kind==committed')
        assert len(local) == 3 and all(L.REMOTE not in i.labels for i in local)  # the plain image's 3 layers
        assert len(sn.turbofs_mounts()) == 1
        c.ctr("images", "rm", "--sync", plain, images.turbo_ref, namespace=ns)
        _wait_for(functools.partial(_all_gone, snaps, sn, ns), "the snapshots to go")


def _usage(c: Containerd, snapshotter: str, ns: str, *keys: str) -> dict[str, tuple[int, int]]:
    """``ctr snapshots --snapshotter S usage -b KEYS``: {key: (bytes, inodes)}."""
    out = c.ctr("snapshots", "--snapshotter", snapshotter, "usage", "-b", *keys, namespace=ns).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {key: (int(size), int(inodes)) for key, size, inodes in rows}


def _presented(top: Path) -> tuple[int, int]:
    """(apparent bytes of regular files, inodes) under ``top``, each inode once (stat only:
    nothing is read, so a lazy mount fetches nothing)."""
    seen: set[int] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for path in (dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))):
            st = os.lstat(path)
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return size, len(seen)


def test_usage_through_containerd(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    """``ctr snapshots usage`` of every kind of turbofs snapshot: a turbo image's top gives what
    the image presents (its index: file bytes, inodes), the same as a walk of its mount; an
    unpacked layer and a container's snapshot give what containerd's own overlayfs snapshotter
    gives for the same layer and the same container writes."""
    c, sn = snapshotter_containerd, turbofs_snapshotter
    ns = unique_namespace("usage")
    _cli("pull", *_where(c, ns), images.turbo_ref)
    (mp,) = sn.turbofs_mounts()
    walked = _presented(mp)
    assert walked[0] > 50 << 20 and walked[1] > 1000
    assert _usage(c, "turbofs", ns, images.turbo.top) == {images.turbo.top: walked}
    assert _usage(c, "turbofs", ns)[images.turbo.top] == walked  # the same from a listing (Walk + Usage)

    # the plain image through both snapshotters, and one container on each writing the same
    plain_ns = unique_namespace("usage-plain")
    script = "head -c 1234567 /dev/zero > /big && mkdir -p /d/e && echo x > /d/e/f && ln /big /big2 && sleep 300"
    for snapshotter in ("turbofs", "overlayfs"):
        c.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, images.plain_ref, namespace=plain_ns,
              timeout=300)
        c.ctr("run", "--detach", "--snapshotter", snapshotter, images.plain_ref, f"u-{snapshotter}", "sh", "-c", script,
              namespace=plain_ns)
    layers = [*images.turbo.chain]  # the plain image has the same config, so the same chain IDs
    ours, theirs = _usage(c, "turbofs", plain_ns, *layers), _usage(c, "overlayfs", plain_ns, *layers)
    assert ours == theirs and all(size > 0 and inodes > 0 for size, inodes in ours.values())
    def written(snapshotter: str) -> bool:
        return _usage(c, snapshotter, plain_ns, f"u-{snapshotter}")[f"u-{snapshotter}"][0] >= 1234567

    _wait_for(lambda: written("turbofs") and written("overlayfs"), "the files to be written")
    ours_c, theirs_c = _usage(c, "turbofs", plain_ns, "u-turbofs")["u-turbofs"], _usage(c, "overlayfs", plain_ns, "u-overlayfs")["u-overlayfs"]
    assert ours_c == theirs_c and ours_c[1] >= 5, (ours_c, theirs_c)  # upper root, /big (two names), /d, /d/e, /d/e/f
    for snapshotter in ("turbofs", "overlayfs"):
        _kill_container(c, f"u-{snapshotter}", plain_ns)
    c.ctr("images", "rm", "--sync", images.plain_ref, namespace=plain_ns)
    c.ctr("images", "rm", "--sync", images.turbo_ref, namespace=ns)
    _wait_for(lambda: not sn.turbofs_mounts(), "the image mount to be released")


def test_cri_labels_mount_the_turbo_twin(images: Images, turbofs_snapshotter: SnapshotterProcess) -> None:
    sn = turbofs_snapshotter
    snaps = Snapshots(sn.channel())
    cri = {L.CRI_IMAGE_REF: images.plain_ref, L.CRI_MANIFEST: images.plain_digest}
    parent = ""
    for i, chain_id in enumerate(images.turbo.chain):
        code, details = snaps.code("Prepare", pb.PrepareSnapshotRequest(
            key=f"k8s.io/{i}/extract-{chain_id}", parent=parent, labels={**cri, L.TARGET: chain_id}),
            pb.PrepareSnapshotResponse)
        assert code is grpc.StatusCode.ALREADY_EXISTS, details
        (found,) = snaps.list(f'labels."{L.TARGET}"=={chain_id},parent=="{parent}"')
        parent = found.name
    top = snaps.stat(parent)
    assert top.labels[L.REMOTE] == "top" and top.labels[L.REMOTE_IMAGE] == f"{images.registry.host_port}/plain@{images.turbo.manifest_digest}"
    (mp,) = sn.turbofs_mounts()
    (m,) = snaps.prepare("k8s.io/9/sandbox", parent).mounts
    assert m.type == "overlay" and f"lowerdir={mp}" in m.options
    snaps.remove("k8s.io/9/sandbox")
    for name in _chain_names(snaps, parent):
        snaps.remove(name)
    _wait_for(lambda: not sn.turbofs_mounts(), "the twin's mount to be released")

    # a CRI image without a turbo twin (here: a registry that is not there) unpacks as usual
    (m,) = snaps.prepare("k8s.io/10/extract-x", "", {L.CRI_IMAGE_REF: "127.0.0.1:9/none:latest",
                                                     L.CRI_MANIFEST: images.plain_digest,
                                                     L.TARGET: images.turbo.chain[0]}).mounts
    assert m.type == "bind" and "rw" in m.options
    snaps.remove("k8s.io/10/extract-x")


def test_cri_pull_is_lazy(images: Images, turbofs_snapshotter: SnapshotterProcess) -> None:
    """containerd's CRI plugin (as the kubelet drives it) pulls a plain image with a turbo twin
    without downloading one layer: the snapshotter answers every layer from the twin."""
    from tests.snapshotter_fixtures import CriContainerd, cri_toml, proxy_plugin_toml

    require_containerd()
    sn = turbofs_snapshotter
    reg = images.registry.host_port
    ctrd = CriContainerd(cri_toml(plain_http_registries=(reg,)) + proxy_plugin_toml(sn.address), namespace="k8s.io")
    try:
        ctrd.start()
        channel = grpc.insecure_channel(f"unix:{ctrd.address}")
        pull = unary(channel, CRI_IMAGES, "PullImage", cri_pb2.PullImageResponse)
        t0 = time.monotonic()
        reply = pull(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=images.plain_ref)), timeout=120)
        print(f"\nCRI PullImage of the plain image (lazy, via its twin): {time.monotonic() - t0:.2f} s")
        assert reply.image_ref == images.turbo.config_digest  # the CRI's image ID is the config digest
        # only the manifest and the config came: no layer
        assert ctrd.content_digests(namespace="k8s.io") == {images.plain_digest, images.turbo.config_digest}
        listed = ctrd.ctr("snapshots", "--snapshotter", "turbofs", "ls", namespace="k8s.io").stdout
        assert all(chain_id in listed for chain_id in images.turbo.chain)
        (mp,) = sn.turbofs_mounts()
        assert (mp / "app/VERSION").read_text().strip() == "1.1.0"
        remove = unary(channel, CRI_IMAGES, "RemoveImage", cri_pb2.RemoveImageResponse)
        remove(cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=images.plain_ref)), timeout=60)
        _wait_for(lambda: not sn.turbofs_mounts(), "the twin's mount to be released")
        channel.close()
    finally:
        ctrd.stop()


def _chain_names(snaps: Snapshots, top: str) -> list[str]:
    """``top`` and its ancestors, top first."""
    out = []
    name = top
    while name:
        out.append(name)
        name = snaps.stat(name).parent
    return out


# -- bad input ---------------------------------------------------------------------------------


class _ManifestServer(http.server.ThreadingHTTPServer):
    manifests: dict[str, tuple[bytes, str]]  # reference -> (bytes, Docker-Content-Digest)


class _ManifestHandler(http.server.BaseHTTPRequestHandler):
    server: _ManifestServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        m = re.fullmatch(r"/v2/[^/]+/manifests/(.+)", self.path)
        if self.path == "/v2/":
            body, digest = b"{}", ""
        elif m and m.group(1) in self.server.manifests:
            body, digest = self.server.manifests[m.group(1)]
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def _bad_registry(manifests: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    srv = _ManifestServer(("127.0.0.1", 0), _ManifestHandler)
    srv.manifests = manifests
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_input_gets_grpc_codes(
    images: Images, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    sn, c = turbofs_snapshotter, snapshotter_containerd
    snaps = Snapshots(sn.channel())
    S = grpc.StatusCode
    reg = images.registry.host_port
    some = images.turbo.manifest_digest

    def prepare(key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> tuple[grpc.StatusCode, str]:
        return snaps.code("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent, labels=dict(labels or {})),
                          pb.PrepareSnapshotResponse)

    def turbo(ref: str, digest: str = some, target: str = images.turbo.chain[0]) -> dict[str, str]:
        return {L.TARGET: target, L.IMAGE_REF: ref, L.MANIFEST: digest}

    # keys that do not exist
    assert snaps.code("Stat", pb.StatSnapshotRequest(key="bad/1/none"), pb.StatSnapshotResponse) == (S.NOT_FOUND, "snapshot bad/1/none does not exist")
    assert snaps.code("Mounts", pb.MountsRequest(key="bad/1/none"), pb.MountsResponse)[0] is S.NOT_FOUND
    assert snaps.code("Remove", pb.RemoveSnapshotRequest(key="bad/1/none"))[0] is S.NOT_FOUND
    assert snaps.code("Commit", pb.CommitSnapshotRequest(name="bad/1/c", key="bad/1/none"))[0] is S.NOT_FOUND
    assert snaps.code("Usage", pb.UsageRequest(key="bad/1/none"), pb.UsageResponse)[0] is S.NOT_FOUND
    code, msg = prepare("bad/2/a", "bad/1/no-parent")
    assert code is S.NOT_FOUND and "parent snapshot bad/1/no-parent" in msg
    assert prepare("")[0] is S.INVALID_ARGUMENT

    # an unknown image, a registry that refuses, a corrupt manifest, a plain image, a foreign layer
    code, msg = prepare("bad/3/a", labels=turbo(f"{reg}/no-such-repo:latest"))
    assert code is S.NOT_FOUND and "no-such-repo" in msg
    code, msg = prepare("bad/3/b", labels=turbo("127.0.0.1:9/app:latest"))
    assert code is S.UNAVAILABLE and "unreachable" in msg
    code, msg = prepare("bad/3/c", labels={L.TARGET: images.turbo.chain[0], L.IMAGE_REF: images.turbo_ref})
    assert code is S.INVALID_ARGUMENT and L.MANIFEST in msg
    not_turbo = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": some, "size": 2},
                            "layers": []}).encode()
    not_turbo_digest = "sha256:" + hashlib.sha256(not_turbo).hexdigest()
    with _bad_registry({some: (b'{"schemaVersion": 2, "layers": [', some), not_turbo_digest: (not_turbo, not_turbo_digest)}) as bad:
        code, msg = prepare("bad/3/d", labels=turbo(f"{bad}/app"))
        assert code is S.FAILED_PRECONDITION and "digest" in msg, msg
        code, msg = prepare("bad/3/e", labels=turbo(f"{bad}/app", not_turbo_digest))
        assert code is S.FAILED_PRECONDITION and "not a turbo image" in msg, msg
    code, msg = prepare("bad/3/f", labels=turbo(images.turbo_ref, target="sha256:" + "0" * 64))
    assert code is S.FAILED_PRECONDITION and "not a chain ID" in msg
    # the failures left no placeholder behind
    assert not snaps.list(f'labels."{L.REMOTE}"==placeholder')

    # wrong kinds and states
    snaps.prepare("bad/4/a")
    assert prepare("bad/4/a")[0] is S.ALREADY_EXISTS
    code, msg = prepare("bad/4/b", "bad/4/a")
    assert code is S.FAILED_PRECONDITION and "not committed" in msg
    snaps.call("Commit", pb.CommitSnapshotRequest(name="bad/4/committed", key="bad/4/a"))
    assert snaps.code("Commit", pb.CommitSnapshotRequest(name="bad/4/again", key="bad/4/committed"))[0] is S.FAILED_PRECONDITION
    (ro,) = snaps.call("Mounts", pb.MountsRequest(key="bad/4/committed"), pb.MountsResponse).mounts  # read-only, all of it
    assert ro.type == "bind" and list(ro.options) == ["ro", "rbind"]
    snaps.prepare("bad/4/child", "bad/4/committed")
    code, msg = snaps.code("Remove", pb.RemoveSnapshotRequest(key="bad/4/committed"))
    assert code is S.FAILED_PRECONDITION and "children" in msg
    code, _ = snaps.code("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="bad/4/child"), update_mask=FieldMask(paths=["parent"])),
                         pb.UpdateSnapshotResponse)
    assert code is S.INVALID_ARGUMENT
    try:
        snaps.list('name=="unterminated')
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call) and exc.code() is S.INVALID_ARGUMENT
    else:
        raise AssertionError("a bad filter was accepted")
    reply = snaps.call("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="bad/4/child", labels={"x": "1"}),
                                                          update_mask=FieldMask(paths=["labels.x"])), pb.UpdateSnapshotResponse)
    assert reply.info.labels["x"] == "1"
    for key in ("bad/4/child", "bad/4/committed"):
        snaps.remove(key)

    # through containerd: turbofs pull names the cause
    proc = _cli("pull", *_where(c), f"{reg}/no-such-repo:latest", check=False)
    assert proc.returncode == 1 and "no-such-repo" in proc.stderr and "turbofs: error:" in proc.stderr
    proc = _cli("pull", *_where(c), images.plain_ref, check=False)
    assert proc.returncode == 1 and "not a turbo image" in proc.stderr

    # and the snapshotter is still serving
    assert sn.running
    snaps.prepare("bad/5/alive")
    snaps.remove("bad/5/alive")
    assert not [i for i in snaps.list('name~="^bad/"')]


# -- a large Python image ---------------------------------------------------------------------


def _turbo_layout(name: str) -> Path:
    """The turbo layout of cached bench image ``name``, built once per source manifest and
    format version (kept under ``$TURBOFS_CACHE/tests/``)."""
    from bench.images import cache_dir, image_path
    from index_builder.builder import build
    from turbofs.core import format as fmt

    src = image_path(name)
    if not (src / "index.json").exists():
        pytest.skip(f"bench image {name} is not built (python -m bench.images {name})")
    digest = json.loads((src / "index.json").read_text())["manifests"][0]["digest"]
    out = cache_dir() / "tests" / f"{name}-turbo-{digest[7:19]}-v{fmt.VERSION}"
    if not (out / "index.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build(f"oci:{src}:latest", tmp, progress=False, force=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def test_python_image_runs_lazily(
    shared_turbofs_registry: TurbofsRegistry, turbofs_snapshotter: SnapshotterProcess, snapshotter_containerd: Containerd
) -> None:
    c, sn = snapshotter_containerd, turbofs_snapshotter
    layout = _turbo_layout("python-1g")
    ref = f"{shared_turbofs_registry.host_port}/python:latest"
    skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}", "--preserve-digests", timeout=300)
    t_first, _, out = _timed([sys.executable, "-m", "turbofs.cli", "run", "--rm", *_where(c), "--entrypoint",
                              "python3", ref, "--", "-c", "import sys, numpy; print(sys.version_info[:2], numpy.__name__)"])
    assert out.splitlines()[0] == "(3, 11) numpy", out
    print(f"\nturbofs run python3 -c 'import numpy' (1.4 GB image, cold): first line after {t_first:.2f} s")
    t_first, _, out = _timed([sys.executable, "-m", "turbofs.cli", "run", "--rm", *_where(c), ref])
    assert out.splitlines()[-1].startswith("READY"), out  # the image's entrypoint: imports torch, one forward pass
    print(f"turbofs run of /app/app.py (torch): READY after {t_first:.2f} s")
    c.ctr("images", "rm", "--sync", ref)
    _wait_for(lambda: not sn.turbofs_mounts(), "the python image's mount to be released", seconds=30)
