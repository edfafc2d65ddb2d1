"""``turbofs mount``: real FUSE mounts of turbo images from a local layout, the turbofs
registry and Debian's docker-registry, with faults injected between daemon and registry."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from index_builder.builder import build
from tests.faultproxy import fault_proxy
from tests.imagecheck import snapshot_index
from tests.mount_fixtures import Mounter
from tests.ocifixtures import (
    TarEntry,
    diff_snapshots,
    pseudo_random,
    snapshot_tree,
    write_oci_layout,
)
from tests.registry_fixtures import DistributionRegistry, TurbofsRegistry, skopeo_copy
from tests.test_build import kitchen_sink_layers
from turbofs.core.config import READER_FAILURE_MEMORY, BuildConfig
from turbofs.core.image import LayoutImage, open_layout_image

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with allow_other and devices needs root"),
]

CS = 64 * 1024




@pytest.fixture(scope="module")
def kitchen(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    base = tmp_path_factory.mktemp("kitchen")
    src = write_oci_layout(base / "src", kitchen_sink_layers())
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(chunk_size=CS), progress=False)
    return open_layout_image(base / "turbo")


@pytest.fixture(scope="module")
def bulky(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    """About 48 MB of incompressible data in 1.5 MB files, plus small ones."""
    base = tmp_path_factory.mktemp("bulky")
    files = [TarEntry(f"data/f{i:02d}.bin", data=pseudo_random(i, 1_500_000 + i)) for i in range(32)]
    small = [TarEntry(f"etc/c{i:03d}.conf", data=pseudo_random(1000 + i, 700 + i)) for i in range(200)]
    src = write_oci_layout(base / "src", [[TarEntry("data", "dir"), TarEntry("etc", "dir"), *files, *small]])
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(chunk_size=CS), progress=False)
    return open_layout_image(base / "turbo")


def _push(img: LayoutImage, registry: str, repo: str) -> str:
    skopeo_copy(f"oci:{img.root}:latest", f"docker://{registry}/{repo}", "--preserve-digests")
    return f"{registry}/{repo}"


def _read_all(mp: Path, img: LayoutImage) -> None:
    for path, ino in img.index.walk():
        node = img.index.inode(ino)
        if node.is_reg:
            assert (mp / os.fsdecode(path)).read_bytes() == img.read(ino), path


# -- fidelity ------------------------------------------------------------------------


def test_local_layout_mount_is_faithful(mounter: Mounter, kitchen: LayoutImage) -> None:
    mp = mounter.mount(f"oci:{kitchen.root}")
    assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
    assert os.statvfs(mp).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as exc:
        (mp / "new-file").write_text("x")
    assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError) as exc:
        (mp / "etc" / "passwd").write_text("x")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    mounter.umount(mp)
    assert not os.path.ismount(mp)


@pytest.mark.parametrize("kind", ["turbofs", "distribution"])
def test_registry_mount_is_faithful_and_lazy(
    kind: str, mounter: Mounter, kitchen: LayoutImage, turbofs_registry: TurbofsRegistry,
    distribution_registry: DistributionRegistry,
) -> None:
    reg = turbofs_registry if kind == "turbofs" else distribution_registry
    with fault_proxy(reg.url) as proxy:
        ref = _push(kitchen, proxy.host_port, "node/kitchen:v1")
        proxy.blob_requests = 0
        mp = mounter.mount(ref, "mnt", "--no-prefetch")
        assert proxy.blob_requests == 2  # the config and the index, nothing else before the mount is ready
        assert (mp / "etc" / "passwd").read_bytes().startswith(b"root:")
        assert proxy.blob_requests <= 4
        assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
        status = mounter.status(mp)
        assert status["ref"] == ref and "prefetch" not in status
        assert "turbofs_fetch_bytes_total" in mounter.metrics(mp)
        mounter.umount(mp)


def test_digest_pinned_mount_and_bad_refs(mounter: Mounter, kitchen: LayoutImage, turbofs_registry: TurbofsRegistry) -> None:
    ref = _push(kitchen, turbofs_registry.host_port, "node/pin:v1")
    mp = mounter.mount(f"{turbofs_registry.host_port}/node/pin@{kitchen.manifest.digest}")
    assert (mp / "etc" / "passwd").exists()
    bad = mounter.cli("mount", f"{turbofs_registry.host_port}/node/nothing:v1", str(mounter.base / "mnt"),
                      "--run-dir", str(mounter.run_dir), check=False)
    assert bad.returncode == 1 and "nothing" in bad.stderr and "Traceback" not in bad.stderr
    not_dir = mounter.cli("mount", ref, str(mounter.base / "no-such-dir"), check=False)
    assert not_dir.returncode == 2 and "not a directory" in not_dir.stderr


# -- reads -----------------------------------------------------------------------------


def test_concurrent_readers(mounter: Mounter, bulky: LayoutImage, turbofs_registry: TurbofsRegistry) -> None:
    ref = _push(bulky, turbofs_registry.host_port, "node/bulky:v1")
    mp = mounter.mount(ref, "mnt", "--no-prefetch")
    files = [(mp / os.fsdecode(p), ino) for p, ino in bulky.index.walk() if bulky.index.inode(ino).is_reg]
    errors: list[str] = []

    def reader(k: int) -> None:
        try:
            for path, ino in files[k::4] + files[:3]:  # every thread also reads the same first files
                if path.read_bytes() != bulky.read(ino):
                    errors.append(str(path))
        except OSError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    fetched = mounter.metrics(mp)
    assert "turbofs_fetch_chunks_total" in fetched


def test_prefetch_wait_and_bounded_ram(mounter: Mounter, bulky: LayoutImage, turbofs_registry: TurbofsRegistry) -> None:
    ref = _push(bulky, turbofs_registry.host_port, "node/ram:v1")
    mp = mounter.mount(ref, "mnt", "--wait", "--ram-cache-size", "4M")
    status = mounter.status(mp)
    assert status["prefetch"]["state"] == "done"
    assert status["prefetch"]["chunks_done"] == status["prefetch"]["chunks_total"] == bulky.index.n_chunks
    _read_all(mp, bulky)
    status = mounter.status(mp)
    assert status["cache"]["ram_bytes"] <= 4 * 1024 * 1024
    rss_kb = int(next(ln.split()[1] for ln in Path(f"/proc/{status['pid']}/status").read_text().splitlines()
                      if ln.startswith("VmRSS:")))
    image_bytes = sum(c.ulen for c in bulky.index.chunks())
    assert rss_kb * 1024 < 4 * 1024 * 1024 + 160 * 1024 * 1024  # the bound plus a fixed overhead
    assert image_bytes > 40_000_000


def test_disk_cache_bound_and_reuse_after_restart(
    mounter: Mounter, bulky: LayoutImage, turbofs_registry: TurbofsRegistry
) -> None:
    ref = _push(bulky, turbofs_registry.host_port, "node/disk:v1")
    mp = mounter.mount(ref, "mnt", "--wait")
    _read_all(mp, bulky)
    mounter.umount(mp)
    with fault_proxy(turbofs_registry.url) as proxy:
        mp = mounter.mount(ref.replace(turbofs_registry.host_port, proxy.host_port), "mnt", "--no-prefetch")
        before = proxy.blob_requests  # config and index
        _read_all(mp, bulky)
        assert proxy.blob_requests == before  # every chunk came from the disk cache
        mounter.umount(mp)
    # a small bound: prefetch stops filling (and --wait says the image is not all local),
    # reads still work, the folder stays within the bound
    small = Mounter(mounter.base / "small")
    try:
        mp = small.base / "mnt"
        mp.mkdir(parents=True)
        proc = small.cli("mount", ref, str(mp), "--run-dir", str(small.run_dir), "--cache-dir", str(small.cache_dir),
                         "--disk-cache-size", "8M", "--wait", check=False)
        small.mounts.append(mp)
        assert proc.returncode == 1 and "not all local: prefetch stopped" in proc.stderr, proc.stderr
        assert "disk_bound" in proc.stderr and small.status(mp)["prefetch"]["state"] == "stopped"
        _read_all(mp, bulky)
        used = sum(p.stat().st_size for p in small.cache_dir.rglob("*") if p.is_file())
        assert used <= 8 * 1024 * 1024
        small.umount(mp)
    finally:
        small.cleanup()


# -- faults ----------------------------------------------------------------------------


def test_faults_never_return_wrong_bytes(mounter: Mounter, bulky: LayoutImage, turbofs_registry: TurbofsRegistry) -> None:
    with fault_proxy(turbofs_registry.url) as proxy:
        ref = _push(bulky, proxy.host_port, "node/faults:v1")
        mp = mounter.mount(ref, "mnt", "--no-prefetch", "--read-timeout", "20")
        files = [(mp / os.fsdecode(p), ino) for p, ino in bulky.index.walk() if bulky.index.inode(ino).is_reg]
        # fewer failures in a row than one fetch's retries (a fetch that runs out of them
        # fails the read, and its failure is remembered for the next FUSE reads of the chunk)
        proxy.faults.error_503 = 2
        proxy.faults.drop = 1
        proxy.faults.truncate = 1
        proxy.faults.corrupt = 1  # once: refetched, then right
        for path, ino in files[:10]:
            assert path.read_bytes() == bulky.read(ino)
        # a chunk that is corrupt on every fetch: EIO, never the wrong bytes (the last big
        # file: far from those read above, so no readahead of theirs has fetched it already)
        victim, victim_ino = files[31]
        assert victim.name == "f31.bin"
        proxy.faults.corrupt = 1000
        with pytest.raises(OSError) as exc:
            victim.read_bytes()
        assert exc.value.errno == errno.EIO
        proxy.faults.corrupt = 0
        time.sleep(READER_FAILURE_MEMORY)  # the failure is remembered that long, then fetched afresh
        assert victim.read_bytes() == bulky.read(victim_ino)  # no remount needed
        assert "turbofs_digest_failures_total" in mounter.metrics(mp)


def test_registry_down_then_back(mounter: Mounter, bulky: LayoutImage, turbofs_registry: TurbofsRegistry) -> None:
    with fault_proxy(turbofs_registry.url) as proxy:
        ref = _push(bulky, proxy.host_port, "node/down:v1")
        mp = mounter.mount(ref, "mnt", "--no-prefetch", "--read-timeout", "3")
        files = [(mp / os.fsdecode(p), ino) for p, ino in bulky.index.walk() if bulky.index.inode(ino).is_reg]
        proxy.faults.down = True
        start = time.monotonic()
        with pytest.raises(OSError) as exc:
            files[0][0].read_bytes()
        assert exc.value.errno == errno.EIO and time.monotonic() - start < 30
        log = "\n".join(p.read_text(errors="replace") for p in mounter.run_dir.glob("*/daemon.log"))
        assert "f00.bin" in log or "data/" in log  # the failure names the file
        # the registry comes back while a read waits: the read completes
        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(files[1][0].read_bytes()))
        t.start()
        time.sleep(1.0)
        proxy.faults.down = False
        t.join(30)
        assert result == [bulky.read(files[1][1])]
        # and the real registry process stopped and started again
        turbofs_registry.stop()
        time.sleep(0.5)
        turbofs_registry.start()
        assert files[2][0].read_bytes() == bulky.read(files[2][1])


def test_sigkill_leaves_a_mount_that_the_next_mount_cleans(mounter: Mounter, kitchen: LayoutImage) -> None:
    # the per-file mode leaves a dead FUSE mount; the erofs mode's version is in test_erofs.py
    mp = mounter.mount(f"oci:{kitchen.root}", "mnt", "--mode", "fuse")
    os.kill(mounter.pid(mp), signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(OSError) as exc:
        os.listdir(mp)
    assert exc.value.errno == errno.ENOTCONN
    mounter.mounts.remove(mp)
    mp = mounter.mount(f"oci:{kitchen.root}", "mnt", "--mode", "fuse")
    assert (mp / "etc" / "passwd").read_bytes().startswith(b"root:")
    # the dead mount is gone, not hidden under the new one
    assert sum(1 for line in Path("/proc/self/mounts").read_text().splitlines() if f" {mp} " in line) == 1
    mounter.umount(mp)
    assert not os.path.ismount(mp)


def test_sigterm_unmounts(mounter: Mounter, kitchen: LayoutImage) -> None:
    mp = mounter.mount(f"oci:{kitchen.root}")
    pid = mounter.pid(mp)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.ismount(mp):
        assert time.monotonic() < deadline, "SIGTERM did not unmount"
        time.sleep(0.05)
    mounter.mounts.remove(mp)
    with contextlib.suppress(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        raise AssertionError("the daemon did not exit")


def test_foreground_mode(tmp_path: Path, kitchen: LayoutImage) -> None:
    mp = tmp_path / "fg"
    mp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "turbofs.cli", "mount", f"oci:{kitchen.root}", str(mp), "--foreground",
                             "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "ready" in line, line
        assert (mp / "etc" / "passwd").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    assert proc.returncode == 0
    assert not os.path.ismount(mp)



# -- spare daemons (the snapshotter's DaemonMounter) -----------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_spare_daemon_takes_the_next_mount(tmp_path: Path, kitchen: LayoutImage) -> None:
    from turbofs.core.config import DaemonConfig
    from turbofs.mount import ctl as mountctl
    from turbofs.snapshotter.mounts import DaemonMounter

    cfg = DaemonConfig(cache_dir=tmp_path / "cache").validate()
    m = DaemonMounter(tmp_path / "run", cfg, spare=True, spare_delay=0.2)
    mps = [tmp_path / "a", tmp_path / "b"]
    try:
        first = m.spare_pid
        assert first is not None and m._spare is not None and m._spare.warm(30)
        m.mount(f"oci:{kitchen.root}", mps[0], plain_http=False)
        status = json.loads(mountctl.query(mps[0], "status", tmp_path / "run"))
        assert status["pid"] == first  # the spare became the daemon of the mount...
        assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mps[0])) == []  # ...and serves it
        assert "ready" in status["timeline"] and status["timeline"]["ready"] > status["timeline"]["started"]
        deadline = time.monotonic() + 30
        while m.spare_pid in (None, first) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = m.spare_pid
        assert second not in (None, first)  # the next spare, started after the delay
        # a spare that died is not used: the mount starts a daemon of its own
        os.kill(second, signal.SIGKILL)
        m.mount(f"oci:{kitchen.root}", mps[1], plain_http=False)
        pid_b = json.loads(mountctl.query(mps[1], "status", tmp_path / "run"))["pid"]
        assert pid_b not in (first, second) and (mps[1] / "etc" / "passwd").read_bytes()
        deadline = time.monotonic() + 30
        while m.spare_pid in (None, second) and time.monotonic() < deadline:
            time.sleep(0.05)
        third = m.spare_pid
        assert third is not None and _alive(third)
    finally:
        m.close()
        for mp in mps:
            with contextlib.suppress(Exception):
                m.unmount(mp)
    # closing the mounter lets the waiting spare go; the mounts' daemons went with their unmounts
    deadline = time.monotonic() + 10
    while _alive(third) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(third) and not _alive(first) and not _alive(pid_b)
