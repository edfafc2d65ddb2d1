"""The standing fault suite, fast part: real mounts (tests/mount_fixtures.py) over a real
``turbofs serve`` (tests/registry_fixtures.py), with faults injected between them by
tests/faultproxy.py, processes SIGKILLed, and disks filled.

What every test holds to: a read returns the reference bytes or fails with an error
(EIO, or ENOTCONN once the daemon is gone), never wrong bytes, and a failed read returns
within a generous bound (``FAIL_BOUND``: the read timeout under test plus slack for a
loaded 2-core machine); the tight bound on failure time is checked where it is enforced.
The long part (containers through the snapshotter under a random fault schedule) is
``python -m bench.chaos``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from index_builder.builder import build
from tests.faultproxy import FaultProxy, fault_proxy
from tests.mount_fixtures import Mounter
from tests.ocifixtures import TarEntry, pseudo_random, write_oci_layout
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from turbofs.core.config import BuildConfig
from turbofs.core.errors import DigestMismatch
from turbofs.core.image import LayoutImage, open_layout_image
from turbofs.snapshotter.remote import Resolver, fetch_image, presented

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting (FUSE with allow_other, tmpfs) needs root")
needs_erofs = pytest.mark.skipif("erofs" not in Path("/proc/filesystems").read_text(),
                                 reason="the kernel has no erofs")

CS = 64 * 1024
#: --read-timeout of the mounts under test (seconds)
READ_TIMEOUT = 2.0
#: a failed read must return within this (seconds): a hang guard, the read timeout plus
#: slack for retries and a loaded machine; the tight bound is tested where it is enforced
FAIL_BOUND = 60.0
#: errors a read may end with while faults are injected (never wrong bytes)
READ_ERRNOS = (errno.EIO,)
DEAD_ERRNOS = (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)


# -- the image and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def medley(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    """About 6.5 MB: 24 files of 4-5 chunks (incompressible) and 60 small ones."""
    base = tmp_path_factory.mktemp("medley")
    big = [TarEntry(f"data/b{i:02d}.bin", data=pseudo_random(i, 4 * CS - 1000 + 97 * i)) for i in range(24)]
    small = [TarEntry(f"etc/s{i:02d}.conf", data=pseudo_random(500 + i, 900 + 37 * i)) for i in range(60)]
    src = write_oci_layout(base / "src", [[TarEntry("data", "dir"), TarEntry("etc", "dir"), *big, *small]])
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(chunk_size=CS), progress=False)
    return open_layout_image(base / "turbo")


@pytest.fixture(scope="module")
def faults_registry(tmp_path_factory: pytest.TempPathFactory, medley: LayoutImage) -> Iterator[TurbofsRegistry]:
    """One registry for the fault-class tests, holding ``medley`` as ``faults/medley:v1``."""
    reg = TurbofsRegistry(tmp_path_factory.mktemp("faults-registry"))
    reg.start()
    try:
        skopeo_copy(f"oci:{medley.root}:latest", f"docker://{reg.host_port}/faults/medley:v1", "--preserve-digests")
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def proxy(faults_registry: TurbofsRegistry) -> Iterator[FaultProxy]:
    with fault_proxy(faults_registry.url) as p:
        yield p


Files = list[tuple[str, bytes]]


def files_of(img: LayoutImage) -> Files:
    """(path, reference bytes) of every regular file, in index order."""
    return [(os.fsdecode(p), img.read(ino)) for p, ino in img.index.walk() if img.index.inode(ino).is_reg]


def read_checked(path: Path, want: bytes, errnos: tuple[int, ...] = READ_ERRNOS) -> int:
    """Read ``path``: 0 if it gave ``want``, else the errno it failed with. Wrong bytes, an
    unexpected error or a read slower than FAIL_BOUND fail the test."""
    start = time.monotonic()
    try:
        got = path.read_bytes()
    except OSError as exc:
        took = time.monotonic() - start
        assert exc.errno in errnos, f"{path}: {exc!r} (expected one of {errnos})"
        assert took < FAIL_BOUND, f"{path}: failed after {took:.1f} s (bound {FAIL_BOUND} s)"
        return exc.errno or -1
    assert len(got) == len(want) and got == want, f"{path}: WRONG BYTES ({len(got)} read, {len(want)} expected)"
    return 0


def read_eventually(path: Path, want: bytes, bound: float = FAIL_BOUND) -> None:
    """Read ``path`` until it gives ``want`` (EIO in between: a failure the daemon still
    remembers); fail if it does not within ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while read_checked(path, want) != 0:
        assert time.monotonic() < deadline, f"{path}: still failing after {bound} s"
        time.sleep(0.5)


def mount_args(mode: str = "fuse", read_timeout: float = READ_TIMEOUT) -> tuple[str, ...]:
    return ("--no-prefetch", "--read-timeout", str(read_timeout), "--mode", mode)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (unmounted lazily on the way out)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# -- each fault class, passing: right bytes ---------------------------------------------------

TRANSIENT = ["drop", "reset", "truncate", "corrupt", "error_5xx", "error_503", "throttle", "stall", "stall_mid"]
#: blob answers in a row that get the fault: transport faults are retried by the client
#: (5 retries); a chunk that fails its digest twice fails the read, so corrupt bytes come once
TIMES = dict.fromkeys(TRANSIENT, 3) | {"corrupt": 1}


@needs_fuse
@needs_root
@pytest.mark.parametrize("fault", TRANSIENT)
def test_transient_fault_reads_right_bytes(fault: str, mounter: Mounter, medley: LayoutImage, proxy: FaultProxy) -> None:
    """``TIMES[fault]`` blob answers in a row get the fault; every read still returns the
    reference bytes (the client retries, a bad chunk is fetched again), and the faults
    really happened."""
    mp = mounter.mount(f"{proxy.host_port}/faults/medley:v1", "mnt", *mount_args(read_timeout=30))
    files = files_of(medley)
    proxy.faults.stall_seconds = 1.5
    proxy.faults.retry_after = 1
    proxy.faults.status_5xx = 502
    setattr(proxy.faults, fault, TIMES[fault])
    for path, want in files[:6] + files[-6:]:
        assert read_checked(mp / path, want, ()) == 0
    assert proxy.injected[fault] == TIMES[fault], proxy.injected


@needs_fuse
@needs_root
@needs_erofs
@pytest.mark.parametrize("fault", ["reset", "corrupt", "throttle"])
def test_transient_fault_reads_right_bytes_erofs(fault: str, mounter: Mounter, medley: LayoutImage,
                                                 proxy: FaultProxy) -> None:
    mp = mounter.mount(f"{proxy.host_port}/faults/medley:v1", "mnt", *mount_args("erofs", read_timeout=30))
    files = files_of(medley)
    proxy.faults.retry_after = 1
    setattr(proxy.faults, fault, TIMES[fault])
    for path, want in files[:6] + files[-6:]:
        assert read_checked(mp / path, want, ()) == 0
    assert proxy.injected[fault] == TIMES[fault], proxy.injected


# -- each fault class, persisting: EIO in bounded time, then right bytes again ----------------

PERSISTENT = ["drop", "reset", "truncate", "corrupt", "error_5xx", "stall", "stall_mid"]


@needs_fuse
@needs_root
@pytest.mark.parametrize(("fault", "mode"), [(f, "fuse") for f in PERSISTENT] + [
    pytest.param(f, "erofs", marks=needs_erofs) for f in ("reset", "corrupt", "stall")])
def test_persistent_fault_is_eio_then_recovers(fault: str, mode: str, mounter: Mounter, medley: LayoutImage,
                                               proxy: FaultProxy) -> None:
    """Every blob answer gets the fault: a read of data not yet local fails with EIO within
    FAIL_BOUND (never wrong bytes); once the faults stop (stalled requests cut), the same
    file reads right without a remount."""
    mp = mounter.mount(f"{proxy.host_port}/faults/medley:v1", "mnt", *mount_args(mode))
    files = files_of(medley)
    big = [(p, w) for p, w in files if p.startswith("data/")]
    path, want = big[len(big) // 2]
    setattr(proxy.faults, fault, 10**9)
    start = time.monotonic()
    assert read_checked(mp / path, want) == errno.EIO
    took = time.monotonic() - start
    assert proxy.injected[fault] >= 1
    setattr(proxy.faults, fault, 0)
    proxy.release_stalls()
    read_eventually(mp / path, want)
    print(f"{fault}/{mode}: EIO after {took:.1f} s")


# -- 429 Retry-After ----------------------------------------------------------------------


@needs_fuse
@needs_root
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_retry_after_is_honoured(form: str, mounter: Mounter, medley: LayoutImage, proxy: FaultProxy) -> None:
    """A 429 asking to wait N seconds: the retry of that request comes no sooner (an HTTP
    date has one-second resolution: one second of slack there), and the read succeeds."""
    mp = mounter.mount(f"{proxy.host_port}/faults/medley:v1", "mnt", *mount_args(read_timeout=30))
    path, want = next((p, w) for p, w in files_of(medley) if p.startswith("etc/"))  # one chunk: one request
    proxy.faults.retry_after = 3
    proxy.faults.retry_after_date = form == "http-date"
    proxy.faults.throttle = 1
    seen = len(proxy.events)
    assert read_checked(mp / path, want, ()) == 0
    events = proxy.events[seen:]
    throttled = [i for i, e in enumerate(events) if e.fault == "throttle"]
    assert len(throttled) == 1 and len(events) > throttled[0] + 1, events
    first, retry = events[throttled[0]], events[throttled[0] + 1]
    assert retry.path == first.path
    slack = 1.05 if form == "http-date" else 0.05
    assert retry.at - first.at >= 3 - slack, f"retried after {retry.at - first.at:.2f} s, asked 3 s"


# -- a corrupt config or index answer: fetched again, never handed on ----------------------


def test_corrupt_config_and_index_answers_are_fetched_again(medley: LayoutImage, proxy: FaultProxy) -> None:
    """The first answer for the image config blob (then for the index blob) has a flipped
    byte: what ``turbofs pull`` and the snapshotter resolve (fetch_image, Resolver.turbo,
    presented) is fetched again and right. A config that stays corrupt fails with a
    DigestMismatch naming its digest."""
    ref = f"{proxy.host_port}/faults/medley:v1"
    config = medley.manifest.config.digest
    proxy.faults.only_path = config
    proxy.faults.corrupt = 1
    img = fetch_image(ref, scheme="http")
    assert proxy.injected["corrupt"] == 1
    assert img.config == medley.blob_path(config).read_bytes() and img.config_digest == config
    resolver = Resolver(plain_http=[proxy.host_port])
    proxy.faults.corrupt = 1
    assert resolver.turbo(img.pinned, img.manifest_digest).config == img.config
    assert proxy.injected["corrupt"] == 2
    proxy.faults.only_path = medley.manifest.index.digest
    proxy.faults.corrupt = 1
    assert presented(img, retries=1)[1] == medley.index.n_inodes
    assert proxy.injected["corrupt"] == 3
    proxy.faults.only_path = config
    proxy.faults.corrupt = 10**9
    with pytest.raises(DigestMismatch, match=config):
        fetch_image(ref, scheme="http")


# -- the registry SIGKILLed and restarted in a loop while a reader reads -------------------


@needs_fuse
@needs_root
def test_registry_sigkill_loop_while_reading(mounter: Mounter, medley: LayoutImage,
                                             turbofs_registry: TurbofsRegistry) -> None:
    """The real registry process is SIGKILLed and restarted (same port, same storage) over
    and over while a reader walks every file: each read gives the reference bytes or EIO,
    and once the registry stays up every file reads right."""
    skopeo_copy(f"oci:{medley.root}:latest", f"docker://{turbofs_registry.host_port}/kill/medley:v1",
                "--preserve-digests")
    mp = mounter.mount(f"{turbofs_registry.host_port}/kill/medley:v1", "mnt", *mount_args())
    files = files_of(medley)
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        while not stop.is_set():
            time.sleep(0.4)
            turbofs_registry.kill()
            kills += 1
            time.sleep(0.6)
            turbofs_registry.start()

    outcomes: list[int] = []
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        for path, want in files:
            outcomes.append(read_checked(mp / path, want))
            time.sleep(0.1)
            if time.monotonic() > deadline:
                break
        while kills < 4 and time.monotonic() < deadline + 10:
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(30)
    turbofs_registry.start()
    assert kills >= 4 and outcomes
    for path, want in files:
        read_eventually(mp / path, want)
    print(f"{kills} kills; {outcomes.count(0)} reads right, {len(outcomes) - outcomes.count(0)} EIO")


# -- the mount daemon SIGKILLed with reads in flight --------------------------------------


@needs_fuse
@needs_root
@pytest.mark.parametrize("mode", ["fuse", pytest.param("erofs", marks=needs_erofs)])
def test_daemon_sigkill_then_remount_reuses_the_disk_cache(mode: str, mounter: Mounter, medley: LayoutImage,
                                                           proxy: FaultProxy) -> None:
    """SIGKILL of the mount daemon while a reader reads: reads give the reference bytes or
    fail (ENOTCONN/EIO), never wrong bytes; a new mount at the same place works and serves
    what the dead one fetched from the disk cache without asking the registry."""
    ref = f"{proxy.host_port}/faults/medley:v1"
    mp = mounter.mount(ref, "mnt", *mount_args(mode, read_timeout=30))
    files = files_of(medley)
    # the reader starts at the far end, away from what readahead of the first reads took
    first, second = files[:4], files[:3:-1]
    for path, want in first:
        assert read_checked(mp / path, want, ()) == 0
    proxy.faults.latency = 0.5  # each way: reads are in flight when the kill comes
    outcomes: list[int] = []

    def reader() -> None:
        for path, want in second:
            outcomes.append(read_checked(mp / path, want, DEAD_ERRNOS))

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.5)
    os.kill(mounter.pid(mp), signal.SIGKILL)
    t.join(FAIL_BOUND)
    assert not t.is_alive(), "a read hung after the daemon died"
    assert any(o != 0 for o in outcomes), "the daemon died after the reader was done: no read was in flight"
    mounter.mounts.remove(mp)
    proxy.faults.latency = 0.0
    mp = mounter.mount(ref, "mnt", *mount_args(mode, read_timeout=30))
    before = proxy.blob_requests
    for path, want in first:
        assert read_checked(mp / path, want, ()) == 0
    assert proxy.blob_requests == before, "chunks the dead daemon fetched were fetched again"
    for path, want in second:
        assert read_checked(mp / path, want, ()) == 0
    mounter.umount(mp)


# -- disk full -----------------------------------------------------------------------------


@needs_fuse
@needs_root
@pytest.mark.parametrize("mode", ["fuse", pytest.param("erofs", marks=needs_erofs)])
def test_cache_disk_full_still_reads_right(mode: str, tmp_path: Path, medley: LayoutImage, proxy: FaultProxy) -> None:
    """The cache folder is a 2 MB tmpfs (the image is ~6.5 MB) and the disk bound is far
    larger, so the file system fills: with the background prefetch on, every read still
    returns the reference bytes, twice over."""
    small = Mounter(tmp_path / "small")
    with tmpfs(small.cache_dir, "2m"):
        try:
            mp = small.mount(f"{proxy.host_port}/faults/medley:v1", "mnt", "--mode", mode, "--disk-cache-size", "1G",
                             "--read-timeout", "30")
            for _ in range(2):
                for path, want in files_of(medley):
                    assert read_checked(mp / path, want, ()) == 0
            st = os.statvfs(small.cache_dir)
            assert st.f_bavail * st.f_frsize < 512 * 1024, "the cache disk never filled: the test proved nothing"
            small.umount(mp)
        finally:
            small.cleanup()


def _blob_digests(img: LayoutImage) -> list[str]:
    return sorted(f"sha256:{p.name}" for p in (img.root / "blobs" / "sha256").iterdir())


def _push_argv(img: LayoutImage, ref: str) -> list[str]:
    return [sys.executable, "-m", "turbofs.cli", "push", f"oci:{img.root}:latest", ref, "--no-progress"]


@contextlib.contextmanager
def full_registry(tmp_path: Path) -> Iterator[tuple[TurbofsRegistry, Path]]:
    """A turbofs registry whose storage is a 3 MB tmpfs (and that folder)."""
    storage = tmp_path / "storage"
    with tmpfs(storage, "3m"):
        reg = TurbofsRegistry(tmp_path / "reg", storage)
        reg.start()
        try:
            yield reg, storage
        finally:
            reg.stop()


@needs_root
def test_registry_disk_full_during_push(tmp_path: Path, medley: LayoutImage) -> None:
    """The registry's storage is a 3 MB tmpfs and the image ~6.5 MB: the push fails, the
    tag does not appear, and every blob the registry answers for has exactly its digest's
    bytes. With room again, the same push completes and every blob is whole."""
    with full_registry(tmp_path) as (reg, storage):
        ref = f"{reg.host_port}/full/medley:v1"
        proc = subprocess.run(_push_argv(medley, ref), capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode != 0, "the push succeeded on a full disk"
        digests = _blob_digests(medley)
        with httpx.Client(base_url=reg.url, timeout=30) as http:
            assert http.get("/v2/full/medley/manifests/v1").status_code == 404
            served = 0
            for digest in digests:
                r = http.get(f"/v2/full/medley/blobs/{digest}")
                assert r.status_code in (200, 404), (digest, r.status_code)
                if r.status_code == 200:
                    served += 1
                    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest, f"{digest}: wrong bytes"
            assert served < len(digests)
        subprocess.run(["mount", "-o", "remount,size=64m", str(storage)], check=True)
        proc = subprocess.run(_push_argv(medley, ref), capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        with httpx.Client(base_url=reg.url, timeout=30) as http:
            for digest in digests:
                r = http.get(f"/v2/full/medley/blobs/{digest}")
                assert r.status_code == 200 and "sha256:" + hashlib.sha256(r.content).hexdigest() == digest


@needs_root
def test_registry_disk_full_is_a_clear_error(tmp_path: Path, medley: LayoutImage) -> None:
    """A push to a registry with a full disk says so: no traceback from the client, no
    anonymous 500 (the registry names the lack of space)."""
    with full_registry(tmp_path) as (reg, _):
        proc = subprocess.run(_push_argv(medley, f"{reg.host_port}/full/medley:v1"), capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "internal error" not in proc.stderr and "space" in proc.stderr.lower(), proc.stderr[-3000:]
        assert "Traceback" not in reg.log(), reg.log()[-3000:]


# -- concurrent pushes and deletes ----------------------------------------------------------


def _monolithic(http: httpx.Client, repo: str, digest: str, data: bytes) -> int:
    return http.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", content=data,
                     headers={"Content-Type": "application/octet-stream"}).status_code


def _chunked(http: httpx.Client, repo: str, digest: str, data: bytes) -> int:
    r = http.post(f"/v2/{repo}/blobs/uploads/")
    if r.status_code != 202:
        return r.status_code
    loc = r.headers["Location"]
    half = len(data) // 2
    for lo, hi in ((0, half), (half, len(data))):
        r = http.patch(loc, content=data[lo:hi], headers={"Content-Range": f"{lo}-{hi - 1}",
                                                          "Content-Type": "application/octet-stream"})
        if r.status_code != 202:
            return r.status_code
        loc = r.headers["Location"]
    sep = "&" if "?" in loc else "?"
    return http.put(f"{loc}{sep}digest={digest}").status_code


def _check_blob(http: httpx.Client, repo: str, digest: str, data: bytes, *, may_be_gone: bool) -> None:
    r = http.get(f"/v2/{repo}/blobs/{digest}")
    if may_be_gone and r.status_code == 404:
        return
    assert r.status_code == 200, r.status_code
    assert r.content == data, f"{digest}: wrong bytes served ({len(r.content)} bytes)"


def test_concurrent_pushes_of_the_same_blob(turbofs_registry: TurbofsRegistry) -> None:
    """32 uploads of the same blob at once (monolithic and chunked, two repositories): each
    answers 201 and the registry serves exactly the blob."""
    data = pseudo_random(77, 3 * 1024 * 1024 + 11)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    jobs: list[tuple[Callable[[httpx.Client, str, str, bytes], int], str]] = [
        (_monolithic if i % 2 else _chunked, f"race/r{i % 2}") for i in range(32)]
    with httpx.Client(base_url=turbofs_registry.url, timeout=60) as http, ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda job: job[0](http, job[1], digest, data), jobs))
        assert statuses == [201] * len(jobs), statuses
        for repo in ("race/r0", "race/r1"):
            _check_blob(http, repo, digest, data, may_be_gone=False)
    assert "Traceback" not in turbofs_registry.log()


def test_delete_racing_pushes(turbofs_registry: TurbofsRegistry) -> None:
    """Uploads, deletes and reads of one blob race for a few seconds: every answer is a
    success or 404 (never 5xx), every 200 carries exactly the blob, and a last upload
    leaves it whole."""
    data = pseudo_random(78, 2 * 1024 * 1024 + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    repo = "race/del"
    end = time.monotonic() + 6
    statuses: list[int] = []

    def pusher(i: int) -> None:
        with httpx.Client(base_url=turbofs_registry.url, timeout=60) as http:
            while time.monotonic() < end:
                statuses.append((_monolithic if i % 2 else _chunked)(http, repo, digest, data))

    def deleter() -> None:
        with httpx.Client(base_url=turbofs_registry.url, timeout=60) as http:
            while time.monotonic() < end:
                statuses.append(http.delete(f"/v2/{repo}/blobs/{digest}").status_code)
                time.sleep(0.01)

    def getter() -> None:
        with httpx.Client(base_url=turbofs_registry.url, timeout=60) as http:
            while time.monotonic() < end:
                _check_blob(http, repo, digest, data, may_be_gone=True)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(pusher, i) for i in range(4)] + [pool.submit(deleter) for _ in range(2)] + \
            [pool.submit(getter) for _ in range(2)]
        for f in futures:
            f.result()
    assert set(statuses) <= {201, 202, 404}, sorted(set(statuses))
    assert statuses.count(201) > 0 and statuses.count(202) > 0, "the race never happened"
    with httpx.Client(base_url=turbofs_registry.url, timeout=60) as http:
        assert _monolithic(http, repo, digest, data) == 201
        _check_blob(http, repo, digest, data, may_be_gone=False)
    assert "Traceback" not in turbofs_registry.log()

