"""The node's hardening against failures it met in probing (issue 16): the registry's
capabilities after an outage, mount failures reported as one line by ``turbofs mount``,
and erofs-mode error logs that name the file owning the failing chunk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.faultproxy import fault_proxy
from tests.mount_fixtures import Mounter, build_layout
from tests.ocifixtures import TarEntry, pseudo_random
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from turbofs.core.image import LayoutImage
from turbofs.core.registry import RegistryClient, RegistryError
from turbofs.mount import kernel

needs_mounts = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                  reason="needs /dev/fuse and root (FUSE with allow_other, tmpfs, erofs)")

CS = 64 * 1024


# -- capabilities: only a definitive answer is kept ------------------------------------------


class _Recording(httpx.AsyncHTTPTransport):
    """A real HTTP transport that notes each request's method and path."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        return await super().handle_async_request(request)


def test_batches_are_used_once_a_registry_that_was_down_is_back(turbofs_registry: TurbofsRegistry) -> None:
    """The first read met a registry that was down: once it is back, reads are batched
    again (the old client kept ``{}`` for good and sent one Range GET per range)."""
    data = pseudo_random(7, 300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ranges = [(digest, 0, 1000), (digest, 50_000, 2000), (digest, 299_000, 1000)]
    want = [data[o : o + n] for _, o, n in ranges]

    async def setup() -> None:
        async with RegistryClient(turbofs_registry.host_port, scheme="http") as client:
            await client.upload_blob("caps/test", digest, data)

    anyio.run(setup, backend="trio")
    with fault_proxy(turbofs_registry.url) as proxy:
        transport = _Recording()

        async def main() -> None:
            async with RegistryClient(proxy.host_port, scheme="http", transport=transport, retries=0,
                                      caps_retry=0.3) as client:
                proxy.faults.down = True
                with pytest.raises(RegistryError):
                    await client.get_ranges("caps/test", ranges)
                proxy.faults.down = False
                await anyio.sleep(0.5)
                transport.seen.clear()
                assert await client.get_ranges("caps/test", ranges) == want
                assert ("POST", "/v2/caps/test/_turbofs/batch") in transport.seen, transport.seen
                assert not [p for m, p in transport.seen if m == "GET" and "/blobs/" in p], transport.seen

        anyio.run(main, backend="trio")


def test_capabilities_keep_definitive_answers_only() -> None:
    """A 404 (a registry without the extensions) is asked once; a 503 or a refused
    connection is asked again after ``caps_retry``, and not before."""
    answers: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/_turbofs/info"
        status = answers.pop(0)
        if status == 0:
            raise httpx.ConnectError("refused", request=request)
        if status == 200:
            return httpx.Response(200, json={"extensions": ["batch"]})
        return httpx.Response(status)

    async def main() -> None:
        for first, definitive in ((404, True), (403, True), (503, False), (0, False), (429, False)):
            answers[:] = [first, 200]
            async with RegistryClient("registry.test", scheme="http", transport=httpx.MockTransport(handler),
                                      retries=3, backoff=0.001, caps_retry=0.3) as client:
                assert await client.capabilities() == {}
                assert answers == [200], f"{first}: asked more than once (retried)"
                assert await client.capabilities() == {}  # within caps_retry or for good: not asked
                assert answers == [200]
                await anyio.sleep(0.4)
                assert await client.has_extension("batch") is not definitive, first
                assert answers == ([200] if definitive else [])

    anyio.run(main, backend="trio")


# -- mount failures: one line naming the cause, a non-zero exit, nothing left behind ---------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    base = tmp_path_factory.mktemp("small")
    files = [TarEntry(f"data/f{i}.bin", data=pseudo_random(100 + i, 3 * CS + i)) for i in range(6)]
    return build_layout(base, [[TarEntry("data", "dir"), *files]], CS)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and "ExceptionGroup" not in err and "+--" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("turbofs: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _daemon_logs(mounter: Mounter) -> str:
    return "\n".join(p.read_text(errors="replace") for p in mounter.run_dir.glob("*/daemon.log"))


@needs_mounts
@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_a_missing_index_blob_fails_the_mount_in_one_line(
    foreground: bool, mounter: Mounter, small: LayoutImage, turbofs_registry: TurbofsRegistry,
) -> None:
    """The index blob is gone from the registry: ``turbofs mount`` says so in one line and
    exits non-zero (it was an ExceptionGroup traceback out of the daemon's nursery)."""
    ref = f"{turbofs_registry.host_port}/hard/noindex:v1"
    skopeo_copy(f"oci:{small.root}:latest", f"docker://{ref}", "--preserve-digests")
    algo, hexd = small.manifest.index.digest.split(":")
    (turbofs_registry.storage / "blobs" / algo / hexd).unlink()
    mp = mounter.base / "mnt"
    mp.mkdir()
    args = ["mount", ref, str(mp), "--run-dir", str(mounter.run_dir), "--cache-dir", str(mounter.cache_dir)]
    proc = mounter.cli(*args, *(["--foreground"] if foreground else []), check=False)
    if foreground:  # the daemon itself: its last line is the error, no traceback before it
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "ExceptionGroup" not in proc.stderr, proc.stderr
        proc.stderr = proc.stderr.strip().splitlines()[-1]
    _assert_one_line_error(proc, small.manifest.index.digest)
    assert "Traceback" not in _daemon_logs(mounter)
    assert not os.path.ismount(mp)


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs filled to the last block."""
    where = tmp_path / "full"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True)
    try:
        with open(where / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(64 * 1024))
                    f.flush()
            except OSError:
                pass
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@needs_mounts
def test_a_cache_dir_on_a_full_disk_fails_the_mount_clearly(mounter: Mounter, small: LayoutImage, full_fs: Path) -> None:
    """A new ``--cache-dir`` on a full file system: one line naming the folder and the
    cause, a non-zero exit, and no temporary file left in it (it was an uncaught OSError
    and a ``.tmp.<pid>.version`` that no cleaner matched)."""
    cache = full_fs / "new-cache"
    mp = mounter.base / "mnt"
    mp.mkdir()
    proc = mounter.cli("mount", f"oci:{small.root}", str(mp), "--run-dir", str(mounter.run_dir),
                       "--cache-dir", str(cache), check=False)
    _assert_one_line_error(proc, str(cache), "No space left on device")
    assert "Traceback" not in _daemon_logs(mounter)
    assert not os.path.ismount(mp)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp.")] == [] if cache.exists() else True


@needs_mounts
def test_the_cache_version_file_leaves_no_temp_behind(full_fs: Path, tmp_path: Path) -> None:
    """Writing the version file of a new cache folder on a full disk fails with the OSError
    and removes its temp file; a version temp left by a crash (either name) is cleaned by
    the next start."""
    from turbofs.core.config import CACHE_STALE_TEMP
    from turbofs.node.cache import DiskCache

    with pytest.raises(OSError) as info:
        DiskCache(full_fs / "c", 1 << 20)
    assert info.value.errno == 28
    assert [p.name for p in (full_fs / "c").iterdir()] == []
    folder = tmp_path / "cache"
    DiskCache(folder, 1 << 20)
    old = time.time() - CACHE_STALE_TEMP - 60
    for name in (".tmp.1.version", ".tmp.1.0badcafe0"):
        (folder / name).write_bytes(b"half")
        os.utime(folder / name, (old, old))
    (folder / ".tmp.1.notours").write_bytes(b"x")
    DiskCache(folder, 1 << 20)
    assert sorted(p.name for p in folder.iterdir()) == [".tmp.1.notours", "CACHE_VERSION"]


# -- erofs mode: an error names the file that owns the failing chunk -------------------------


@needs_mounts
@pytest.mark.skipif(not kernel.kernel_has_erofs(), reason="this kernel has no erofs")
def test_erofs_read_errors_name_the_file_that_owns_the_bad_chunk(mounter: Mounter, tmp_path: Path) -> None:
    """Files a.bin and b.bin lie next to each other in the erofs image; b.bin's first chunk
    is corrupt in the layout. The image-file reads that span both fail, and the daemon log
    names b.bin, never a.bin (the old code named the owner of a request's first chunk)."""
    img = build_layout(tmp_path / "img", [[TarEntry(name, data=pseudo_random(seed, 2 * CS))
                                           for seed, name in ((1, "a.bin"), (2, "b.bin"), (3, "c.bin"))]], CS)
    ino = {os.fsdecode(p): i for p, i in img.index.walk()}
    a_chunks = [c for c, _ in img.index.file_refs(ino["a.bin"])]
    bad = img.index.chunk(img.index.file_refs(ino["b.bin"])[0][0])
    assert bad.id > max(a_chunks) and bad.id - max(a_chunks) == 1  # b's data right after a's
    blob = img.blob_path(img.index.blob(bad.blob).oci_digest)
    raw = bytearray(blob.read_bytes())
    raw[bad.offset + bad.clen // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(raw))
    mp = mounter.mount(f"oci:{img.root}", "mnt", "--mode", "erofs", "--no-prefetch")
    assert mounter.status(mp)["mode"] == "erofs"
    # a whole-file read of a.bin: the kernel's readahead of the image file runs into b.bin
    with open(mp / "a.bin", "rb") as f, contextlib.suppress(OSError):
        f.read()
    with pytest.raises(OSError) as info, open(mp / "b.bin", "rb") as f:
        f.read()
    assert info.value.errno == errno.EIO
    errors = [ln for ln in _daemon_logs(mounter).splitlines() if "ERROR" in ln or "error" in ln.lower()]
    named = [ln for ln in errors if "/b.bin" in ln]
    assert named, errors
    assert not [ln for ln in errors if "/a.bin" in ln], errors
    mounter.umount(mp)
