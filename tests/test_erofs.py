"""The erofs presentation: generated metadata against fsck.erofs, dump.erofs and its own
checks; kernel mounts of materialized images (corrupted ones included); and real ``turbofs
mount --mode erofs`` mounts, compared entry by entry with the index and the per-file mode."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from index_builder.builder import build
from tests.faultproxy import fault_proxy
from tests.imagecheck import snapshot_index
from tests.mount_fixtures import Mounter
from tests.ocifixtures import TarEntry, diff_snapshots, snapshot_tree, write_oci_layout
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from tests.test_build import kitchen_sink_layers
from turbofs import format as fmt
from turbofs.config import BuildConfig
from turbofs.erofs import ErofsCorrupt, ErofsImage, ErofsUnsupported, build_erofs, check_erofs
from turbofs.erofs import ondisk as d
from turbofs.errors import TurboError
from turbofs.image import LayoutImage, open_layout_image
from turbofs.node import erofsfs

CS = 64 * 1024

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
needs_erofs = pytest.mark.skipif(not erofsfs.kernel_has_erofs(), reason="this kernel has no erofs")
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
needs_erofs_utils = pytest.mark.skipif(shutil.which("fsck.erofs") is None or shutil.which("dump.erofs") is None,
                                       reason="erofs-utils is not installed")
mounts = [needs_root, needs_erofs]


def _build(base: Path, layers: list[list[TarEntry]], chunk_size: int = CS) -> LayoutImage:
    src = write_oci_layout(base / "src", layers)
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(chunk_size=chunk_size), progress=False)
    return open_layout_image(base / "turbo")


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    return _build(tmp_path_factory.mktemp("kitchen"), kitchen_sink_layers())


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    """The Debian ``sample`` image of bench/images.py, converted with the default settings."""
    from bench.images import ImageBuildError, ensure_image

    try:
        layout = ensure_image("sample")
    except ImageBuildError as exc:
        pytest.skip(f"cannot build the sample image: {exc}")
    out = tmp_path_factory.mktemp("sample") / "turbo"
    build(f"oci:{layout}:latest", out, BuildConfig(), progress=False)
    return open_layout_image(out)


def _image_bytes(img: LayoutImage, image: ErofsImage) -> bytes:
    buf = io.BytesIO()
    image.write_to(buf, img.read_chunk)
    return buf.getvalue()


def _shm_dir() -> Path:
    """A tmpfs folder: file-backed erofs cannot use tmpfs files, so mounts take a loop device."""
    base = Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("/dev/shm is missing")
    path = base / f"turbofs-erofs-test-{os.getpid()}"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def kernel_mount(image_file: Path, mp: Path) -> Iterator[str]:
    mp.mkdir(parents=True, exist_ok=True)
    how = erofsfs.mount_erofs(image_file, mp)
    try:
        yield how
    finally:
        erofsfs.umount(mp)


# -- the writer and its checks (no root) ------------------------------------------------


def test_metadata_passes_its_own_checks(kitchen: LayoutImage) -> None:
    image = build_erofs(kitchen.index)
    check_erofs(image)
    assert image.meta_size == image.meta_blocks * d.BLOCK_SIZE
    assert image.chunk_blocks[0] == image.meta_blocks
    assert image.size == image.total_blocks * d.BLOCK_SIZE
    magic, *_ = struct.unpack_from("<I", image.meta, d.SUPER_OFFSET)
    assert magic == d.MAGIC
    # the build depends on the index only
    assert build_erofs(kitchen.index).meta == image.meta
    # every chunk has a file to name in messages
    assert all(image.owner(c) is not None for c in range(kitchen.index.n_chunks))


def test_reads_map_to_metadata_chunks_and_zeros(kitchen: LayoutImage) -> None:
    image = build_erofs(kitchen.index)
    whole = _image_bytes(kitchen, image)
    assert len(whole) == image.size
    rng = random.Random(3)
    cuts = [(0, 4096), (image.meta_size - 10, 20), (image.size - 5, 100), (image.size, 10), (0, image.size)]
    cuts += [(rng.randrange(image.size), rng.choice([1, 4096, 65536, 1 << 20])) for _ in range(200)]
    for off, length in cuts:
        parts = []
        for e in image.read(off, length):
            if e.data is not None:
                parts.append(e.data)
            elif e.chunk is not None:
                parts.append(kitchen.read_chunk(e.chunk)[e.chunk_offset : e.chunk_offset + e.length])
            else:
                parts.append(bytes(e.length))
        assert b"".join(parts) == whole[off : off + length], (off, length)


def _mutations(image: ErofsImage) -> list[tuple[str, int, bytes]]:
    """(what, position, new bytes) edits that each break the metadata."""
    root = image.root_nid * d.SLOT
    first_child = image.nids[1] * d.SLOT
    return [
        ("magic", d.SUPER_OFFSET, b"\0"),
        ("block size", d.SUPER_OFFSET + 12, b"\x0d"),
        ("root nid", d.SUPER_OFFSET + 14, b"\x01\x00"),
        ("block count", d.SUPER_OFFSET + 36, b"\x00\x00\x00\x00"),
        ("root inode format", root, b"\x0f"),
        ("root mode", root + 4, struct.pack("<H", 0o100644)),
        ("root xattr count", root + 2, b"\xff\x00"),
        ("child size", first_child + 8, struct.pack("<Q", 1 << 40)),
        ("child uid", first_child + 24, b"\x07"),
        ("child mtime", first_child + 32, b"\x01"),
        ("child nlink", first_child + 44, b"\x09"),
    ]


def test_corrupt_metadata_is_refused(kitchen: LayoutImage) -> None:
    image = build_erofs(kitchen.index)
    for what, pos, new in _mutations(image):
        meta = bytearray(image.meta)
        meta[pos : pos + len(new)] = new
        with pytest.raises(ErofsCorrupt):
            check_erofs(dataclasses.replace(image, meta=bytes(meta)))
        assert what
    # a dirent that names another inode, a file map that points elsewhere
    for raw in _dirent_and_map_positions(image):
        meta = bytearray(image.meta)
        meta[raw] ^= 0x20
        with pytest.raises(ErofsCorrupt):
            check_erofs(dataclasses.replace(image, meta=bytes(meta)))
    with pytest.raises(ErofsCorrupt):  # truncated
        check_erofs(dataclasses.replace(image, meta=image.meta[: d.BLOCK_SIZE], meta_blocks=1))
    with pytest.raises(ErofsCorrupt):  # a data region that does not match the chunks
        check_erofs(dataclasses.replace(image, total_blocks=image.total_blocks + 1))
    # random damage never escapes as another exception
    rng = random.Random(5)
    for _ in range(500):
        meta = bytearray(image.meta)
        meta[rng.randrange(len(meta))] ^= 1 << rng.randrange(8)
        with contextlib.suppress(ErofsCorrupt):
            check_erofs(dataclasses.replace(image, meta=bytes(meta)))


def _dirent_and_map_positions(image: ErofsImage) -> list[int]:
    """The byte positions of the first child dirent's nid (in the root directory) and of the
    first chunk-map entry of a chunk-based file."""
    out = []
    root = image.root_nid * d.SLOT
    fmt_word, icount = struct.unpack_from("<HH", image.meta, root)
    data = root + d.INODE_EXT_SIZE + d.ibody_size(icount)
    if (fmt_word >> 1) & 7 == d.LAYOUT_FLAT_INLINE:
        out.append(data + 2 * d.DIRENT.size)  # "." and ".." come first in the kitchen root
    for nid in image.nids:
        pos = nid * d.SLOT
        fmt_word, icount, mode, _, size = struct.unpack_from("<HHHHQ", image.meta, pos)
        if mode & 0o170000 != 0o100000 or not size:
            continue
        if (fmt_word >> 1) & 7 == d.LAYOUT_FLAT_PLAIN:
            out.append(pos + 16)  # the data's block address
            break
        entry = pos + d.INODE_EXT_SIZE + d.ibody_size(icount)
        if struct.unpack_from("<I", image.meta, entry)[0] != d.NULL_ADDR:
            out.append(entry)  # the first chunk's block address
            break
    assert len(out) == 2
    return out


def test_what_erofs_cannot_express_is_refused(tmp_path: Path) -> None:
    img = _build(tmp_path, [[TarEntry("f", data=b"x", xattrs={"system.nfs4_acl": b"acl"})]])
    with pytest.raises(ErofsUnsupported, match=r"system\.nfs4_acl"):
        build_erofs(img.index)


def _piece(seed: int, size: int = CS) -> bytes:
    return hashlib.sha256(b"%d" % seed).digest() * (size // 32)


def _acl() -> bytes:
    """A POSIX ACL in its xattr form: user::rwx user:1000:r-x group::r-x mask::r-x other::r--."""
    entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 5, 1000), (0x04, 5, 0xFFFFFFFF), (0x10, 5, 0xFFFFFFFF),
               (0x20, 4, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def layouts_layers() -> list[list[TarEntry]]:
    """Every data layout and metadata corner the writer has."""
    cap = b"\x01\x00\x00\x02" + bytes(16)
    entries = [TarEntry("d", "dir", xattrs={"user.big": b"v" * 3000})]
    entries += [TarEntry(f"d/bin{i}", data=b"#!%d" % i, mode=0o755, xattrs={"security.capability": cap})
                for i in range(40)]  # a shared xattr
    entries += [
        TarEntry("d/contiguous", data=_piece(1) + _piece(2) + b"tail"),  # one flat extent
        TarEntry("d/reordered", data=_piece(2) + _piece(1) + b"other tail"),  # chunk-based
        TarEntry("d/holey", data=_piece(3) + bytes(2 * CS) + _piece(4, 4096)),  # chunk-based with holes
        TarEntry("d/" + "n" * 255, data=b"long name"),
        TarEntry("d/link", "symlink", linkname="x" * 4000),  # a target in a block of its own
        TarEntry("d/-before-dot", data=b"sorts before '.'"),
        TarEntry("d/sub", "dir"),
        TarEntry("d/dev", "char", devmajor=4095, devminor=1048575),
        TarEntry("d/acl", data=b"acl", xattrs={"system.posix_acl_access": _acl()}),
        TarEntry("d/acldir", "dir", xattrs={"system.posix_acl_default": _acl(), "system.posix_acl_access": _acl()}),
    ]
    entries += [TarEntry(f"d/sub/f{i:04d}", data=b"") for i in range(600)]  # several directory blocks
    entries += [TarEntry(f"x/f{i}", data=b"%d" % i, xattrs={"user.v": _piece(100 + i, 1504)})
                for i in range(8)]  # inline xattrs that cross block boundaries
    entries += [
        TarEntry("x/empty-dir", "dir"),
        TarEntry("x/one-chunk", data=_piece(5)),
        TarEntry("x/reordered-link", "hardlink", linkname="d/reordered"),
    ]
    return [entries]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    return _build(tmp_path_factory.mktemp("layouts"), layouts_layers())


def test_layouts_pass_the_checks(layouts: LayoutImage) -> None:
    image = build_erofs(layouts.index)
    check_erofs(image)
    assert image.stats["shared_xattrs"] == 2  # the capability, and the access ACL of a file and a directory
    kinds = {}
    for name in ("contiguous", "reordered", "holey", "link", "sub"):
        pos = image.nids[layouts.index.resolve(f"d/{name}")] * d.SLOT
        kinds[name] = (struct.unpack_from("<H", image.meta, pos)[0] >> 1) & 7
    assert kinds == {"contiguous": d.LAYOUT_FLAT_PLAIN, "reordered": d.LAYOUT_CHUNK_BASED,
                     "holey": d.LAYOUT_CHUNK_BASED, "link": d.LAYOUT_FLAT_PLAIN, "sub": d.LAYOUT_FLAT_INLINE}
    crossing = 0
    for i in range(8):
        pos = image.nids[layouts.index.resolve(f"x/f{i}")] * d.SLOT
        crossing += pos // d.BLOCK_SIZE != (pos + d.INODE_EXT_SIZE + 12 + 1512) // d.BLOCK_SIZE
    assert crossing >= 2


# -- erofs-utils -----------------------------------------------------------------------


def _fsck_extract(img: LayoutImage, image_file: Path, out: Path) -> None:
    proc = subprocess.run(["fsck.erofs", f"--extract={out}", str(image_file)], capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # erofs-utils 1.5 extracts contents, types and targets (not xattrs or hardlinks; and it writes
    # a file's data extents back to back, dropping holes): those must match
    idx = img.index
    for path, ino in idx.walk():
        node = idx.inode(ino)
        got = out / os.fsdecode(path)
        st = got.lstat()
        assert stat_kind(st.st_mode) == stat_kind(node.mode), path
        if node.is_symlink:
            assert os.readlink(got) == os.fsdecode(idx.readlink(ino))
        elif node.is_reg and all(c != fmt.HOLE for c, _ in idx.file_refs(ino)):
            assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(img.read(ino)).digest(), path


def stat_kind(mode: int) -> int:
    return mode & 0o170000


@needs_erofs_utils
@pytest.mark.parametrize("which", ["kitchen", "layouts", "sample"])
def test_fsck_erofs_accepts_the_image(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    img: LayoutImage = request.getfixturevalue(which)
    image = build_erofs(img.index)
    image_file = tmp_path / "image.erofs"
    with open(image_file, "wb") as f:
        image.write_to(f, img.read_chunk)
    subprocess.run(["fsck.erofs", str(image_file)], check=True, capture_output=True)
    _fsck_extract(img, image_file, tmp_path / "extracted")
    out = subprocess.run(["dump.erofs", "-s", str(image_file)], check=True, capture_output=True, text=True).stdout
    assert f"Filesystem inode count:                       {img.index.n_inodes}" in out
    path, ino = next((p, i) for p, i in img.index.walk() if img.index.inode(i).is_reg and img.index.inode(i).nlink == 1)
    shown = subprocess.run(["dump.erofs", f"--path=/{os.fsdecode(path)}", str(image_file)], check=True,
                           capture_output=True, text=True).stdout
    assert f"Size: {img.index.inode(ino).size} " in shown
    assert f"Uid: {img.index.inode(ino).uid} " in shown


# -- the kernel, from materialized image files ---------------------------------------------


@pytest.mark.parametrize("which", ["kitchen", "layouts", "sample"])
@needs_root
@needs_erofs
def test_kernel_mount_of_the_image_file(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    img: LayoutImage = request.getfixturevalue(which)
    image = build_erofs(img.index)
    shm = _shm_dir()
    image_file = shm / f"{which}.erofs"
    try:
        with open(image_file, "wb") as f:
            image.write_to(f, img.read_chunk)
        with kernel_mount(image_file, tmp_path / "mnt") as how:
            assert how == "loop"  # tmpfs files cannot back erofs directly: the fallback
            assert diff_snapshots(snapshot_index(img), snapshot_tree(tmp_path / "mnt")) == []
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@needs_root
@needs_erofs
def test_kernel_sees_what_the_checks_let_through(kitchen: LayoutImage, tmp_path: Path) -> None:
    """Seeded damage to the metadata: an image the checks accept shows exactly the index's tree
    in the kernel; one they refuse may mount, fail or show another tree (the reason to check),
    and the kernel survives all of them."""
    image = build_erofs(kitchen.index)
    data = _image_bytes(kitchen, image)[image.meta_size :]
    want = snapshot_index(kitchen)
    rng = random.Random(7)
    shm = _shm_dir()
    mp = tmp_path / "mnt"
    outcomes: dict[str, int] = {}
    accepted = refused = 0
    try:
        while accepted < 12 or refused < 12:
            meta = bytearray(image.meta)
            for _ in range(rng.choice([1, 1, 2, 4])):
                meta[rng.randrange(d.SUPER_OFFSET, len(meta))] ^= 1 << rng.randrange(8)
            try:
                check_erofs(dataclasses.replace(image, meta=bytes(meta)))
                ok = True
            except ErofsCorrupt:
                ok = False
            if (ok and accepted >= 12) or (not ok and refused >= 12):
                continue
            accepted, refused = accepted + ok, refused + (not ok)
            image_file = shm / "fuzz.erofs"
            image_file.write_bytes(bytes(meta) + data)
            try:
                ctx = kernel_mount(image_file, mp)
                ctx.__enter__()
            except OSError:
                assert not ok
                outcomes["mount refused"] = outcomes.get("mount refused", 0) + 1
                continue
            try:
                diff = diff_snapshots(want, snapshot_tree(mp))
                if ok:
                    assert diff == []
                outcome = "same tree" if not diff else "other tree"
            except OSError:
                assert not ok
                outcome = "errors"
            finally:
                ctx.__exit__(None, None, None)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert outcomes.get("same tree", 0) >= 12


# -- real mounts: turbofs mount --mode erofs ---------------------------------------------


def _erofs_mounts_under(base: Path) -> list[str]:
    return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in ln]


def _requests(status: dict[str, Any]) -> int:
    return sum(status.get("fuse_requests", {}).values())


@needs_fuse
@needs_root
@needs_erofs
def test_erofs_mount_is_faithful(mounter: Mounter, kitchen: LayoutImage) -> None:
    mp = mounter.mount(f"oci:{kitchen.root}", "mnt", "--mode", "erofs")
    entry = erofsfs.mount_entry(mp)
    assert entry is not None and entry[0] == "erofs"
    status = mounter.status(mp)
    assert status["mode"] == "erofs" and status["erofs"]["backing"] == "file"
    assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
    assert os.statvfs(mp).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as exc:
        (mp / "new-file").write_text("x")
    assert exc.value.errno == errno.EROFS
    mounter.umount(mp)
    assert not os.path.ismount(mp)
    assert _erofs_mounts_under(mounter.base) == []  # the private FUSE mount went too


@needs_fuse
@needs_root
@needs_erofs
@pytest.mark.parametrize("which", ["kitchen", "layouts", "sample"])
def test_both_modes_present_the_same_tree(which: str, request: pytest.FixtureRequest, mounter: Mounter) -> None:
    """An image through both modes: the same entries (type, mode, owner, mtime, xattrs,
    hardlinks, devices, bytes) as the index, and far fewer FUSE requests through erofs."""
    img: LayoutImage = request.getfixturevalue(which)
    ref = f"oci:{img.root}"
    via_erofs = mounter.mount(ref, "erofs", "--mode", "erofs", "--no-prefetch")
    via_fuse = mounter.mount(ref, "fuse", "--mode", "fuse", "--no-prefetch")
    assert mounter.status(via_fuse)["mode"] == "fuse"
    want = snapshot_index(img)
    got_erofs = snapshot_tree(via_erofs)
    got_fuse = snapshot_tree(via_fuse)
    assert diff_snapshots(want, got_erofs) == []
    assert diff_snapshots(want, got_fuse) == []
    assert any(e.type == "char" for e in got_erofs.values())
    erofs_requests = _requests(mounter.status(via_erofs))
    fuse_requests = _requests(mounter.status(via_fuse))
    if which == "sample":
        assert erofs_requests * 5 < fuse_requests, (erofs_requests, fuse_requests)
    mounter.umount(via_erofs)
    mounter.umount(via_fuse)


@needs_fuse
@needs_root
@needs_erofs
def test_registry_mount_is_lazy(mounter: Mounter, kitchen: LayoutImage, turbofs_registry: TurbofsRegistry) -> None:
    with fault_proxy(turbofs_registry.url) as proxy:
        skopeo_copy(f"oci:{kitchen.root}:latest", f"docker://{proxy.host_port}/node/erofs:v1", "--preserve-digests")
        proxy.blob_requests = 0
        mp = mounter.mount(f"{proxy.host_port}/node/erofs:v1", "mnt", "--mode", "erofs", "--no-prefetch")
        assert proxy.blob_requests == 2  # config and index: the metadata comes from the index
        assert (mp / "etc" / "passwd").read_bytes().startswith(b"root:")
        assert proxy.blob_requests <= 4
        assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
        mounter.umount(mp)


@needs_fuse
@needs_root
@needs_erofs
@pytest.mark.skipif(shutil.which("losetup") is None, reason="no loop device tools")
def test_loop_device_fallback(kitchen: LayoutImage, tmp_path: Path) -> None:
    """A kernel without file-backed erofs: the FUSE file backs a loop device, and the daemon
    still ends with the mount (the loop device is released with it)."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    code = ("import sys; from turbofs.node import erofsfs; erofsfs.TRY_FILE_BACKED = False; "
            "from turbofs.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "mount", f"oci:{kitchen.root}", str(mp), "--foreground",
                             "--mode", "erofs", "--run-dir", str(tmp_path / "run"), "--cache-dir",
                             str(tmp_path / "cache")], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "ready" in line, line + proc.stderr.read()
        entry = erofsfs.mount_entry(mp)
        assert entry is not None and entry[0] == "erofs" and entry[1].startswith(b"/dev/loop"), entry
        assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
        loop = entry[1].decode()
        erofsfs.umount(mp)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert _erofs_mounts_under(tmp_path) == []
    backing = Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")
    deadline = time.monotonic() + 5
    while backing.exists() and time.monotonic() < deadline:  # autoclear runs after the last close
        time.sleep(0.05)
    assert not backing.exists()


@needs_fuse
@needs_root
@needs_erofs
def test_unexpressible_image_refused_or_served_per_file(mounter: Mounter, tmp_path: Path) -> None:
    img = _build(tmp_path / "odd", [[TarEntry("f", data=b"x", xattrs={"system.nfs4_acl": b"acl"})]])
    (tmp_path / "mnt").mkdir()
    refused = mounter.cli("mount", f"oci:{img.root}", str(tmp_path / "mnt"), "--mode", "erofs",
                          "--run-dir", str(mounter.run_dir), check=False)
    assert refused.returncode == 1 and "system.nfs4_acl" in refused.stderr, refused.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    mp = mounter.mount(f"oci:{img.root}", "mnt")  # auto: the per-file mode
    assert mounter.status(mp)["mode"] == "fuse"
    assert (mp / "f").read_bytes() == b"x"
    mounter.umount(mp)


@needs_fuse
@needs_root
@needs_erofs
def test_daemon_refuses_metadata_that_fails_its_checks(
    monkeypatch: pytest.MonkeyPatch, kitchen: LayoutImage, tmp_path: Path
) -> None:
    from turbofs.config import DaemonConfig
    from turbofs.node import daemon

    def corrupted(index: Any) -> ErofsImage:
        image = build_erofs(index)
        meta = bytearray(image.meta)
        meta[image.nids[1] * d.SLOT + 24] ^= 1  # the first child's uid
        return dataclasses.replace(image, meta=bytes(meta))

    monkeypatch.setattr(erofsfs, "build_erofs", corrupted)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cfg = DaemonConfig(cache_dir=tmp_path / "cache", prefetch=False, mode="erofs").validate()
    req = daemon.MountRequest(ref=f"oci:{kitchen.root}", mountpoint=mp, cfg=cfg, run_dir=tmp_path / "run")
    with pytest.raises(TurboError, match="refusing to serve it as erofs: erofs metadata check failed"):
        daemon.run_foreground(req)
    assert not os.path.ismount(mp)
    assert _erofs_mounts_under(tmp_path) == []


@needs_fuse
@needs_root
@needs_erofs
def test_failed_kernel_mount_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, kitchen: LayoutImage, tmp_path: Path
) -> None:
    from turbofs.config import DaemonConfig
    from turbofs.node import daemon

    def refused(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(erofsfs, "mount_erofs", refused)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cfg = DaemonConfig(cache_dir=tmp_path / "cache", prefetch=False, mode="erofs").validate()
    req = daemon.MountRequest(ref=f"oci:{kitchen.root}", mountpoint=mp, cfg=cfg, run_dir=tmp_path / "run")
    with pytest.raises(TurboError, match=r"cannot mount erofs at .*: Operation not permitted"):
        daemon.run_foreground(req)
    assert _erofs_mounts_under(tmp_path) == []  # the private FUSE mount is gone too


@needs_fuse
@needs_root
@needs_erofs
def test_sigkill_leaves_an_erofs_mount_that_the_next_mount_cleans(mounter: Mounter, kitchen: LayoutImage) -> None:
    mp = mounter.mount(f"oci:{kitchen.root}", "mnt", "--mode", "erofs", "--no-prefetch")
    os.kill(mounter.pid(mp), signal.SIGKILL)
    time.sleep(0.5)
    # data nobody read before cannot come: an error, never wrong bytes
    with pytest.raises(OSError) as exc:
        (mp / "lib" / "libz.so.1").read_bytes()
    assert exc.value.errno == errno.EIO
    mounter.mounts.remove(mp)
    mp = mounter.mount(f"oci:{kitchen.root}", "mnt", "--mode", "erofs")
    assert (mp / "lib" / "libz.so.1").read_bytes() == kitchen.read(kitchen.index.resolve("lib/libz.so.1"))
    assert len(_erofs_mounts_under(mp)) == 1  # the dead one was removed, not stacked on
    mounter.umount(mp)


@needs_fuse
@needs_root
@needs_erofs
def test_sigterm_unmounts_erofs(mounter: Mounter, kitchen: LayoutImage) -> None:
    mp = mounter.mount(f"oci:{kitchen.root}", "mnt", "--mode", "erofs")
    pid = mounter.pid(mp)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.ismount(mp):
        assert time.monotonic() < deadline, "SIGTERM did not unmount"
        time.sleep(0.05)
    mounter.mounts.remove(mp)
    assert _erofs_mounts_under(mounter.base) == []


def test_mode_setting_is_checked() -> None:
    from turbofs.config import DaemonConfig
    from turbofs.errors import UsageError

    assert DaemonConfig().mode == "auto"
    with pytest.raises(UsageError):
        DaemonConfig(mode="kernel").validate()
    proc = subprocess.run([sys.executable, "-m", "turbofs.cli", "mount", "x", "/nonexistent", "--mode", "nfs"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--mode" in proc.stderr
