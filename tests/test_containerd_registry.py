"""A real containerd (1.6, Debian) against real registries, through ``ctr``.

Each test runs against two registries: Debian's ``docker-registry`` (the reference
implementation of the OCI distribution API) and the turbofs registry (fixtures of
tests/registry_fixtures.py; a case is skipped if its fixture is not registered). Every test works in namespaces of its own, and
the private containerd runs with ``content_sharing_policy = "isolated"``, so a pull into a
fresh namespace really downloads every blob from the registry (with containerd's default,
"shared", a blob already on disk in another namespace is linked without a request).

What is checked:

* plain images: skopeo pushes a small multi-layer image (gzip, zstd and uncompressed
  layers); ``ctr images pull --plain-http`` gets byte-identical manifest, config and layers
  and unpacks them; ``ctr images push --plain-http`` copies it to another repository; a pull
  of the copy into a clean namespace gives the same bytes again.
* turbo images: containerd cannot unpack turbo layers (``ctr images pull`` fetches, then
  fails: "mismatched image rootfs and manifest layers" or "no processor for media-type"),
  so ``ctr content fetch --plain-http`` is the way to pull one; every blob of the turbo layout (manifest, original config, index, chunk blobs)
  arrives byte-identical, and ``ctr images push`` of it to another repository round-trips.
* the whole path: the cached ``sample`` Debian image (``bench.images``) is pushed with
  skopeo, pulled and unpacked by containerd, and run with runc (``ctr run --rm``).

Found here: ``ctr run IMAGE ID ARGS`` of ctr 1.6.20 replaces the image's Entrypoint and Cmd
with ARGS (it does not put the Entrypoint in front); without ARGS it runs Entrypoint + Cmd.
skopeo 1.9 gzips uncompressed layers on the way to a registry (a new manifest) unless
``--preserve-digests`` is given.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.containerd_fixtures import Containerd, ContainerdFactory, unique_namespace
from tests.ocifixtures import TarEntry, opaque, read_blob, whiteout, write_oci_layout
from tests.registry_fixtures import RegistryProcess, skopeo_copy

TAG = "latest"
REGISTRY_KINDS = ("distribution", "turbofs")

needs_tools = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (scripts/bootstrap.sh)"
)
pytestmark = [needs_tools]


# ------------------------------------------------------------------------------ registries


@dataclass(frozen=True)
class Endpoint:
    """A registry the tests push to and pull from, over plain HTTP."""

    kind: str  # "distribution" | "turbofs"
    host_port: str  # "127.0.0.1:PORT"

    def ref(self, repo: str, tag: str = "v1") -> str:
        return f"{self.host_port}/{repo}:{tag}"


@pytest.fixture(params=REGISTRY_KINDS)
def registry(request: pytest.FixtureRequest) -> Endpoint:
    """Each registry in turn: Debian's docker-registry (a fresh one per test), then one
    turbofs registry per module (tests use repository names of their own)."""
    name = "distribution_registry" if request.param == "distribution" else "shared_turbofs_registry"
    try:
        server: RegistryProcess = request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"fixture {name} is not registered (tests/conftest.py, tests/registry_fixtures.py)")
    return Endpoint(request.param, server.host_port)


# ------------------------------------------------------------------------------ images


def small_layers() -> list[list[TarEntry]]:
    """Three small layers with directories, files, a symlink, a whiteout and an opaque dir."""
    big = bytes(range(256)) * 1024  # 256 KiB, some real bytes to move
    return [
        [
            TarEntry("etc", "dir", mode=0o755),
            TarEntry("etc/hostname", data=b"turbofs\n"),
            TarEntry("etc/gone", data=b"deleted by layer 2\n"),
            TarEntry("opt", "dir", mode=0o755),
            TarEntry("opt/cache", "dir", mode=0o755),
            TarEntry("opt/cache/old", data=b"hidden by an opaque marker\n"),
            TarEntry("usr", "dir", mode=0o755),
            TarEntry("usr/lib", "dir", mode=0o755),
            TarEntry("usr/lib/big.bin", data=big),
        ],
        [
            TarEntry("etc", "dir", mode=0o755),
            whiteout("etc/gone"),
            TarEntry("etc/added", data=b"layer 2\n"),
            TarEntry("usr", "dir", mode=0o755),
            TarEntry("usr/lib", "dir", mode=0o755),
            TarEntry("usr/lib/link", "symlink", linkname="big.bin"),
        ],
        [
            TarEntry("opt", "dir", mode=0o755),
            TarEntry("opt/cache", "dir", mode=0o755),
            opaque("opt/cache"),
            TarEntry("opt/cache/new", data=b"layer 3\n"),
        ],
    ]


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small OCI layout (tag ``latest``) with a gzip, a zstd and an uncompressed layer."""
    layout = tmp_path_factory.mktemp("small-image") / "layout"
    write_oci_layout(
        layout,
        small_layers(),
        compression=["gzip", "zstd", "none"],
        config={"Entrypoint": ["/bin/true"], "Env": ["PATH=/usr/bin:/bin"]},
    )
    return layout


@pytest.fixture(scope="module")
def turbo_image(small_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small image converted by the turbofs builder (an OCI layout, tag ``latest``)."""
    from index_builder.builder import build
    from turbofs.core.config import BuildConfig

    out = tmp_path_factory.mktemp("turbo-image") / "layout"
    build(f"oci:{small_image}:{TAG}", out, BuildConfig(), progress=False)
    return out


@pytest.fixture(scope="module")
def sample_image() -> Path:
    """The cached Debian ``sample`` image of bench/images.py (built on first use, ~30 s)."""
    from bench.images import ImageBuildError, ensure_image

    try:
        return ensure_image("sample")
    except ImageBuildError as exc:
        pytest.skip(f"cannot build the sample image: {exc}")


# ------------------------------------------------------------------------------ helpers


def layout_manifest(layout: Path, tag: str = TAG) -> tuple[str, dict[str, Any], bytes]:
    """(digest, parsed manifest, raw bytes) of the manifest tagged ``tag`` in a layout."""
    index = json.loads((layout / "index.json").read_bytes())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            raw = read_blob(layout, desc["digest"])
            return desc["digest"], json.loads(raw), raw
    raise AssertionError(f"no tag {tag!r} in {layout}")


def layout_blob_digests(layout: Path, tag: str = TAG) -> list[str]:
    """Manifest, config and layer digests of a layout's image, in that order."""
    digest, manifest, _ = layout_manifest(layout, tag)
    return [digest, manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def run_tool(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def skopeo_push(layout: Path, ref: str, tag: str = TAG) -> None:
    """Copy ``oci:LAYOUT:TAG`` to ``docker://REF`` over plain HTTP, keeping the bytes.

    Without ``--preserve-digests`` skopeo 1.9 gzips uncompressed layers on the way to a
    registry and so writes a new manifest.
    """
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{ref}", "--preserve-digests")


def registry_manifest(ref: str) -> bytes:
    """The manifest bytes a registry serves for ``ref`` (``skopeo inspect --raw``)."""
    return run_tool("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout


def unique_repo(stem: str) -> str:
    """A repository name no other test run in a shared registry uses."""
    return f"ctrtest/{stem}-{secrets.token_hex(4)}"


def assert_blobs_equal(ctrd: Containerd, layout: Path, digests: list[str], namespace: str) -> None:
    """Every digest is in the namespace's content store with exactly the layout's bytes."""
    present = ctrd.content_digests(namespace=namespace)
    missing = [d for d in digests if d not in present]
    assert not missing, f"not in containerd's content store ({namespace}): {missing}"
    for digest in digests:
        got = ctrd.content_get(digest, namespace=namespace)
        want = read_blob(layout, digest)
        assert got == want, f"{digest}: containerd holds {len(got)} bytes that differ from the layout's {len(want)}"


def assert_unpacked(ctrd: Containerd, ref: str, namespace: str) -> None:
    lines = [line for line in ctrd.ctr("images", "check", namespace=namespace).stdout.splitlines() if line.startswith(ref + " ")]
    assert lines, f"{ref} not listed by ctr images check"
    fields = lines[0].split()
    assert "complete" in fields, lines[0]
    assert fields[-1] == "true", f"not unpacked: {lines[0]}"


# ------------------------------------------------------------------------------ tests


def test_pull_push_roundtrip(containerd: Containerd, registry: Endpoint, small_image: Path) -> None:
    """skopeo push -> ctr pull (unpack) -> ctr push to another repo -> ctr pull in a clean
    namespace: the same manifest digest and the same bytes at every step."""
    digest, _, manifest_bytes = layout_manifest(small_image)
    blobs = layout_blob_digests(small_image)
    src = registry.ref(unique_repo("plain-src"))
    copy = registry.ref(unique_repo("plain-copy"))
    skopeo_push(small_image, src)
    assert registry_manifest(src) == manifest_bytes

    first = unique_namespace("pull")
    containerd.ctr("images", "pull", "--plain-http", src, namespace=first)
    assert containerd.image_digest(src, namespace=first) == digest
    assert_blobs_equal(containerd, small_image, blobs, first)
    assert_unpacked(containerd, src, first)

    containerd.ctr("images", "push", "--plain-http", copy, src, namespace=first)
    assert registry_manifest(copy) == manifest_bytes

    second = unique_namespace("back")
    assert not containerd.content_digests(namespace=second)
    containerd.ctr("images", "pull", "--plain-http", copy, namespace=second)
    assert containerd.image_digest(copy, namespace=second) == digest
    assert_blobs_equal(containerd, small_image, blobs, second)
    assert_unpacked(containerd, copy, second)


def test_turbo_image_content_fetch(containerd: Containerd, registry: Endpoint, turbo_image: Path) -> None:
    """A turbo image reaches containerd byte for byte with ``ctr content fetch``; ``ctr images
    pull`` cannot unpack it; ``ctr images push`` copies it to another repository intact."""
    digest, manifest, manifest_bytes = layout_manifest(turbo_image)
    layer_types = {layer["mediaType"] for layer in manifest["layers"]}
    assert layer_types == {"application/vnd.turbofs.index.v1", "application/vnd.turbofs.chunks.v1+zstd"}
    blobs = layout_blob_digests(turbo_image)
    src = registry.ref(unique_repo("turbo-src"))
    copy = registry.ref(unique_repo("turbo-copy"))
    skopeo_push(turbo_image, src)
    assert registry_manifest(src) == manifest_bytes

    fetched = unique_namespace("fetch")
    containerd.ctr("content", "fetch", "--plain-http", src, namespace=fetched)
    assert containerd.image_digest(src, namespace=fetched) == digest
    assert_blobs_equal(containerd, turbo_image, blobs, fetched)

    # ctr images pull = fetch + unpack, and containerd cannot unpack turbo blobs: it refuses
    # when the manifest has fewer blobs than the config has diff_ids ("mismatched image
    # rootfs and manifest layers"), else it tries to apply the index blob as the first
    # layer ("no processor for media-type")
    pulled = unique_namespace("pull")
    failed = containerd.ctr("images", "pull", "--plain-http", src, namespace=pulled, check=False)
    assert failed.returncode != 0
    assert (
        "mismatched image rootfs and manifest layers" in failed.stderr
        or "no processor for media-type" in failed.stderr
    ), failed.stderr

    containerd.ctr("images", "push", "--plain-http", copy, src, namespace=fetched)
    assert registry_manifest(copy) == manifest_bytes
    again = unique_namespace("again")
    containerd.ctr("content", "fetch", "--plain-http", copy, namespace=again)
    assert containerd.image_digest(copy, namespace=again) == digest
    assert_blobs_equal(containerd, turbo_image, blobs, again)


def test_run_container_from_registry(containerd: Containerd, registry: Endpoint, sample_image: Path) -> None:
    """The whole path: skopeo push of a real Debian image, ctr pull (unpack), runc runs it."""
    digest, _, _ = layout_manifest(sample_image)
    ref = registry.ref(unique_repo("sample"))
    skopeo_push(sample_image, ref)

    ns = unique_namespace("run")
    containerd.ctr("images", "pull", "--plain-http", ref, namespace=ns, timeout=300)
    assert containerd.image_digest(ref, namespace=ns) == digest

    # with ARGS, ctr 1.6 replaces Entrypoint + Cmd (the image's Env and WorkingDir stay)
    script = "echo hello; echo $GREETING from $(pwd) $(cat /app/VERSION); test -e /etc/motd || echo motd-gone"
    out = containerd.ctr("run", "--rm", ref, f"sh-{secrets.token_hex(4)}", "sh", "-c", script, namespace=ns)
    assert out.stdout.splitlines() == ["hello", "hello from /app 1.1.0", "motd-gone"], out.stdout

    # without ARGS: the image's Entrypoint (/app/run.sh) and Cmd (world)
    out = containerd.ctr("run", "--rm", ref, f"entry-{secrets.token_hex(4)}", namespace=ns)
    assert out.stdout.splitlines() == [
        "sample app 1.1.0 says: hello world",
        "Hello from a turbofs sample image.",
    ], out.stdout

    leftover = containerd.ctr("containers", "ls", "-q", namespace=ns).stdout.split()
    assert leftover == [], f"ctr run --rm left containers: {leftover}"


def test_private_containerd_is_isolated(containerd: Containerd) -> None:
    """The fixture's containerd answers on its own socket and keeps its state in its dirs."""
    version = containerd.ctr("version").stdout
    assert "Server:" in version and "1.6" in version, version
    assert os.path.exists(containerd.address)
    assert str(containerd.root) in containerd.config_path.read_text()
    plugins = containerd.ctr("plugins", "ls").stdout
    assert "io.containerd.grpc.v1" in plugins and " cri " not in plugins
    assert containerd.log.stat().st_size > 0


def test_factory_extra_config(containerd_factory: ContainerdFactory) -> None:
    """Extra TOML reaches containerd: a proxy snapshotter is listed (nothing listens yet)."""
    extra = f"""
[proxy_plugins.turbofs]
  type = "snapshot"
  address = "/tmp/tfs-no-such-{secrets.token_hex(4)}.sock"
"""
    ctrd = containerd_factory(extra)
    try:
        rows = [line.split() for line in ctrd.ctr("plugins", "ls").stdout.splitlines()]
        assert ["io.containerd.snapshotter.v1", "turbofs", "-", "ok"] in rows, rows
    finally:
        ctrd.stop()
    assert not ctrd.base.exists()
    with pytest.raises(ValueError, match="not valid TOML"):
        containerd_factory("[proxy_plugins.turbofs\n")
