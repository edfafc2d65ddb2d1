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
from tests.mount_fixtures import (
    Mounter,
    assert_read_only,
    build_layout,
    foreground_mount,
    wait_unmounted,
)
from tests.ocifixtures import TarEntry, diff_snapshots, snapshot_tree
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from tests.test_build import kitchen_sink_layers
from turbofs.core import format as fmt
from turbofs.core.config import BuildConfig
from turbofs.core.errors import FormatError, TurboError
from turbofs.core.image import LayoutImage, open_layout_image
from turbofs.erofs import (
    ErofsCorrupt,
    ErofsImage,
    ErofsUnsupported,
    build_erofs,
    check_erofs,
    prepare_image,
)
from turbofs.erofs import ondisk as d
from turbofs.erofs import prepare as erofs_prepare
from turbofs.mount import kernel
from turbofs.mount.erofsfile import IMAGE_INO
from turbofs.mount.pagecache import PageCacheStore

CS = 64 * 1024

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
needs_erofs = pytest.mark.skipif(not kernel.kernel_has_erofs(), reason="this kernel has no erofs")
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
needs_erofs_utils = pytest.mark.skipif(shutil.which("fsck.erofs") is None or shutil.which("dump.erofs") is None,
                                       reason="erofs-utils is not installed")
mounts = [needs_root, needs_erofs]


def _build(base: Path, layers: list[list[TarEntry]], chunk_size: int = CS) -> LayoutImage:
    return build_layout(base, layers, chunk_size)


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
    how = kernel.mount_erofs(image_file, mp)
    try:
        yield how
    finally:
        kernel.umount(mp)


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


def test_bulk_accessors_match_the_per_entry_ones(layouts: LayoutImage, kitchen: LayoutImage) -> None:
    for img in (layouts, kitchen):
        idx = img.index
        cols = idx.inode_columns()
        names, dirent_inos = idx.dirent_columns()
        ref_chunks, ref_offsets = idx.ref_columns()
        xattrs = idx.xattr_records()
        assert idx.chunk_list() == list(idx.chunks())
        for ino in range(idx.n_inodes):
            node = idx.inode(ino)
            got = (cols["mode"][ino], cols["uid"][ino], cols["gid"][ino], cols["nlink"][ino],
                   cols["mtime_sec"][ino] * 1_000_000_000 + cols["mtime_nsec"][ino], cols["size"][ino],
                   cols["parent"][ino])
            assert got == (node.mode, node.uid, node.gid, node.nlink, node.mtime_ns, node.size, node.parent)
            a, b = cols["a"][ino], cols["b"][ino]
            if node.is_dir:
                assert list(zip(names[a : a + b], dirent_inos[a : a + b], strict=True)) == idx.listdir(ino)
            elif node.is_reg:
                assert list(zip(ref_chunks[a : a + b], ref_offsets[a : a + b], strict=True)) == idx.file_refs(ino)
            start, count = cols["xattr_start"][ino], cols["xattr_count"][ino]
            assert dict(xattrs[start : start + count]) == idx.xattrs(ino)
        # the portable path (big-endian machines) reads the same columns as the typed views
        for table, words, wide, size in ((idx._inodes, (0, 1, 2, 3, 6, 7, 8, 9, 12, 13), (-3, 5), 56),
                                         (idx._dirents, (0, 1, 2), (), 12), (idx._refs, (0, 1), (), 8)):
            assert (idx._table_columns(table, words, wide, size, native=False)
                    == idx._table_columns(table, words, wide, size, native=True))
        assert idx.payload_sha256() == hashlib.sha256(idx._payload).digest()


def test_bulk_accessors_refuse_a_corrupt_index(kitchen: LayoutImage) -> None:
    payload = bytearray(kitchen.index._payload)
    idx = fmt.Index(bytes(payload))
    base = payload.find(bytes(idx._inodes))  # the inode table; the root's record first
    second = base + 56  # inode 1's record
    cases = {
        "unknown type": (second + 0, struct.pack("<I", 0o070000)),
        "nanoseconds": (second + 24, struct.pack("<I", 1_000_000_000)),
        "parent": (second + 36, struct.pack("<I", idx.n_inodes)),
        "entries": (base + 48, struct.pack("<I", idx.n_dirents)),  # the root's dirent range
    }
    for what, (pos, raw) in cases.items():
        bad = bytearray(payload)
        bad[pos : pos + len(raw)] = raw
        damaged = fmt.Index(bytes(bad))  # opening reads no record but the root's mode
        with pytest.raises(FormatError, match=r"type|nanoseconds|parent|entries"):
            damaged.inode_columns()
        assert what


def test_metadata_cache(kitchen: LayoutImage, tmp_path: Path) -> None:
    """A second prepare loads what the first stored; a damaged file is a miss, and one that
    passes its sha256 but not the checks is refused and rebuilt: never served."""
    from turbofs.erofs import cache as meta_cache

    idx = kitchen.index
    fresh = build_erofs(idx)
    first = prepare_image(idx, cache_dir=tmp_path)
    assert first.stats["meta_cache_hit"] == 0 and first.meta == fresh.meta
    path = meta_cache.cache_path(tmp_path, idx.payload_sha256())
    assert path.is_file() and not list(path.parent.glob(".tmp.*"))
    second = prepare_image(idx, cache_dir=tmp_path)
    assert second.stats["meta_cache_hit"] == 1 and second.stats["build_ms"] == 0
    assert (second.meta, second.nids, second.chunk_owner, second.chunk_blocks, second.total_blocks) == (
        fresh.meta, fresh.nids, fresh.chunk_owner, fresh.chunk_blocks, fresh.total_blocks)
    # torn: the sha256 says so
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    assert prepare_image(idx, cache_dir=tmp_path).stats["meta_cache_hit"] == 0
    assert path.read_bytes() == raw  # stored again
    # consistent bytes that say something else (a uid): the checks refuse it, it is rebuilt
    meta = bytearray(fresh.meta)
    meta[fresh.nids[1] * d.SLOT + 24] ^= 1
    path.write_bytes(meta_cache.encode(dataclasses.replace(fresh, meta=bytes(meta)), idx.payload_sha256()))
    again = prepare_image(idx, cache_dir=tmp_path)
    assert again.stats["meta_cache_hit"] == 0 and again.meta == fresh.meta
    assert path.read_bytes() == raw
    # another index's file, another writer version: misses
    with pytest.raises(ValueError, match="another index"):
        meta_cache.decode(raw, idx, bytes(32))
    assert meta_cache.load(tmp_path, idx, bytes(32)) is None
    # the folder stays under its bound: least recently used out
    other = tmp_path / "erofs" / f"{'ab' * 32}.w1.meta"
    other.write_bytes(b"x" * 1000)
    os.utime(other, (1, 1))
    meta_cache.store(tmp_path, fresh, idx.payload_sha256(), max_bytes=len(raw) + 10)
    assert not other.exists() and path.exists()


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


def _o_direct_read(path: Path, size: int) -> bytes:
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, d.align(max(size, 1), d.BLOCK_SIZE))  # page aligned, as O_DIRECT wants
        n = os.preadv(fd, [buf], 0)
        return bytes(buf[:n])
    finally:
        os.close(fd)


@needs_root
@needs_erofs
def test_o_direct_works_on_loop_backed_erofs_only(
    kitchen: LayoutImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux 6.18's file-backed erofs has no direct I/O: open(O_DIRECT) fails with EINVAL
    (the flag is checked at open, whatever the ``directio`` mount option says). On a block
    device (the loop fallback) erofs reads O_DIRECT through the block layer. Documented in
    turbofs/mount/erofsmount.py; a user who needs O_DIRECT mounts with ``--mode fuse``."""
    image = build_erofs(kitchen.index)
    image_file = tmp_path / "kitchen.erofs"  # on a disk file system: file-backed works
    with open(image_file, "wb") as f:
        image.write_to(f, kitchen.read_chunk)
    ino = kitchen.index.resolve("lib/libz.so.1")
    want = kitchen.read(ino)
    for options in ("", "directio"):
        with kernel_mount(image_file, tmp_path / "mnt") as how:
            assert how == "file"
            if options:
                subprocess.run(["mount", "-o", f"remount,ro,{options}", str(tmp_path / "mnt")], check=True)
            with pytest.raises(OSError) as exc:
                _o_direct_read(tmp_path / "mnt" / "lib" / "libz.so.1", len(want))
            assert exc.value.errno == errno.EINVAL
            assert (tmp_path / "mnt" / "lib" / "libz.so.1").read_bytes() == want  # buffered reads work
    monkeypatch.setattr(kernel, "TRY_FILE_BACKED", False)
    with kernel_mount(image_file, tmp_path / "mnt") as how:
        assert how == "loop"
        assert _o_direct_read(tmp_path / "mnt" / "lib" / "libz.so.1", len(want)) == want


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
    entry = kernel.mount_entry(mp)
    assert entry is not None and entry[0] == "erofs"
    status = mounter.status(mp)
    assert status["mode"] == "erofs" and status["erofs"]["backing"] == "file"
    assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
    assert_read_only(mp, "etc/passwd")
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
    code = ("import sys; from turbofs.mount import kernel; kernel.TRY_FILE_BACKED = False; "
            "from turbofs.cli import main; sys.exit(main(sys.argv[1:]))")
    with foreground_mount([sys.executable, "-c", code, "mount", f"oci:{kitchen.root}", str(mp), "--foreground",
                           "--mode", "erofs", "--run-dir", str(tmp_path / "run"), "--cache-dir",
                           str(tmp_path / "cache")]) as proc:
        entry = kernel.mount_entry(mp)
        assert entry is not None and entry[0] == "erofs" and entry[1].startswith(b"/dev/loop"), entry
        assert diff_snapshots(snapshot_index(kitchen), snapshot_tree(mp)) == []
        loop = entry[1].decode()
        kernel.umount(mp)
        proc.wait(15)
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
    from turbofs.core.config import DaemonConfig
    from turbofs.mount import daemon
    from turbofs.mount.ctl import MountRequest

    def corrupted(index: Any) -> ErofsImage:
        image = build_erofs(index)
        meta = bytearray(image.meta)
        meta[image.nids[1] * d.SLOT + 24] ^= 1  # the first child's uid
        return dataclasses.replace(image, meta=bytes(meta))

    monkeypatch.setattr(erofs_prepare, "build_erofs", corrupted)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cfg = DaemonConfig(cache_dir=tmp_path / "cache", prefetch=False, mode="erofs").validate()
    req = MountRequest(ref=f"oci:{kitchen.root}", mountpoint=mp, cfg=cfg, run_dir=tmp_path / "run")
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
    from turbofs.core.config import DaemonConfig
    from turbofs.mount import daemon
    from turbofs.mount.ctl import MountRequest

    def refused(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(kernel, "mount_erofs", refused)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cfg = DaemonConfig(cache_dir=tmp_path / "cache", prefetch=False, mode="erofs").validate()
    req = MountRequest(ref=f"oci:{kitchen.root}", mountpoint=mp, cfg=cfg, run_dir=tmp_path / "run")
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
    os.kill(mounter.pid(mp), signal.SIGTERM)
    wait_unmounted(mp, what="SIGTERM did not unmount")
    mounter.mounts.remove(mp)
    assert _erofs_mounts_under(mounter.base) == []


def test_mode_setting_is_checked() -> None:
    from turbofs.core.config import DaemonConfig
    from turbofs.core.errors import UsageError

    assert DaemonConfig().mode == "auto"
    with pytest.raises(UsageError):
        DaemonConfig(mode="kernel").validate()
    proc = subprocess.run([sys.executable, "-m", "turbofs.cli", "mount", "x", "/nonexistent", "--mode", "nfs"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--mode" in proc.stderr


# -- a recorded startup's chunks pushed into the image file's page cache ------------------

STARTUP_FILES: dict[str, bytes] = {
    "app/main.bin": _piece(101, 3 * CS + 5000),  # several chunks, a partial last block
    "app/lib.so": _piece(102, 2 * CS),
    **{f"app/conf{i}.txt": _piece(110 + i, 700 + 1500 * i) for i in range(6)},  # packed small files
}
OTHER_FILES: dict[str, bytes] = {"data/later.bin": _piece(120, 4 * CS), "data/note.txt": b"not in the startup\n"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    """An image built with a recorded startup (a path list) that reads STARTUP_FILES."""
    from tests.ocifixtures import write_oci_layout
    from turbofs.core import trace

    base = tmp_path_factory.mktemp("traced")
    entries = [TarEntry(name, "dir", mode=0o755) for name in ("app", "data")]
    entries += [TarEntry(p, data=b) for p, b in {**STARTUP_FILES, **OTHER_FILES}.items()]
    src = write_oci_layout(base / "src", [entries])
    startup = trace.StartupTrace(paths=[os.fsencode("/" + p) for p in STARTUP_FILES])
    build(f"oci:{src.layout}:latest", base / "turbo", BuildConfig(chunk_size=CS), progress=False,
          startup_trace=startup)
    return open_layout_image(base / "turbo")


def test_startup_chunks_reach_the_hook_once_with_their_bytes(traced: LayoutImage, tmp_path: Path) -> None:
    """The reader calls its startup-chunk subscribers for each chunk of the startup phase (verified
    bytes), never for the background phase's chunks; the store pushes each at its blocks."""
    import trio

    from tests.test_node_core import _cfg
    from turbofs.node.cache import ChunkCache
    from turbofs.node.prefetch import Prefetcher
    from turbofs.node.reader import ChunkReader
    from turbofs.node.source import open_image

    index = traced.index
    startup = index.startup_chunks()
    assert startup and len(startup) < index.n_chunks
    image = build_erofs(index)
    pushed: list[tuple[int, int, bytes]] = []
    store = PageCacheStore(image, IMAGE_INO, notify=lambda ino, off, data: pushed.append((ino, off, bytes(data))))
    store.put(index.chunk(startup[0]), b"early")  # before the FUSE file is live: not pushed
    store.go_live()
    seen: list[tuple[int, bytes]] = []

    def hook(chunk: fmt.Chunk, data: bytes) -> None:
        seen.append((chunk.id, data))
        store.put(chunk, data)

    async def run() -> None:
        opened = await open_image(str(traced.root))
        cfg = _cfg(tmp_path / "cache")
        try:
            async with ChunkReader(opened.index, opened.source, ChunkCache.from_config(cfg), cfg) as reader:
                reader.subscribe_startup_chunks(hook)
                await Prefetcher(reader).run()
        finally:
            await opened.source.aclose()

    trio.run(run)
    ids = [cid for cid, _ in seen]
    assert sorted(ids) == sorted(startup) and len(set(ids)) == len(ids)  # each once, nothing else
    for cid, data in seen:
        assert hashlib.sha256(data).digest() == index.chunk(cid).digest
    deadline = time.monotonic() + 10  # the pushes run in the store's thread
    while image.stats["stored_chunks"] < len(startup) and time.monotonic() < deadline:
        time.sleep(0.01)
    store.stop()
    assert image.stats["stored_chunks"] == len(startup) == len(pushed)
    for (ino, off, data), (cid, chunk_data) in zip(pushed, seen, strict=True):
        assert ino == IMAGE_INO
        assert off == image.chunk_blocks[cid] * d.BLOCK_SIZE and len(data) % d.BLOCK_SIZE == 0
        want = b"".join(e.data if e.data is not None else
                        (chunk_data[e.chunk_offset : e.chunk_offset + e.length] if e.chunk else bytes(e.length))
                        for e in image.read(off, len(data)))
        assert data == want  # what a FUSE read of those bytes would answer
    store.put(index.chunk(startup[0]), b"x")  # after stop: ignored
    assert image.stats["stored_chunks"] == len(startup)


def _mount_with(mounter: Mounter, img: LayoutImage, name: str, settings: str) -> Path:
    cfg = mounter.base / f"{name}.toml"
    cfg.write_text(f"[daemon]\n{settings}\n")
    mp = mounter.base / name
    mp.mkdir()
    mounter.cli("--config", str(cfg), "mount", f"oci:{img.root}", str(mp), "--mode", "erofs",
                "--run-dir", str(mounter.run_dir), "--cache-dir", str(mounter.base / f"{name}-cache"))
    mounter.mounts.append(mp)
    return mp


def _after_startup_phase(mounter: Mounter, mp: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status = mounter.status(mp)
        p, e = status.get("prefetch", {}), status["erofs"]
        if p.get("startup_seconds") is not None and (
            not e.get("startup_notify_store") or e["stored_chunks"] + e["store_errors"] >= p["startup_chunks"]
        ):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


@needs_fuse
@needs_root
@needs_erofs
def test_startup_chunks_pushed_into_the_page_cache_spare_fuse_reads(mounter: Mounter, traced: LayoutImage) -> None:
    """With ``startup_notify_store``, reading the startup's files after the startup phase
    sends no FUSE read (the kernel has their bytes), and the bytes are right; without it,
    the same reads go to the daemon."""
    reads: dict[bool, int] = {}
    for on in (True, False):
        mp = _mount_with(mounter, traced, f"store-{on}", f"startup_notify_store = {str(on).lower()}\nprefetch_quiet = 30")
        status = _after_startup_phase(mounter, mp)
        n_startup = status["prefetch"]["startup_chunks"]
        assert n_startup == len(traced.index.startup_chunks())
        if on:
            assert status["erofs"]["stored_chunks"] == n_startup and status["erofs"]["store_errors"] == 0
        else:
            assert "stored_chunks" not in status["erofs"]
        before = status["fuse_requests"].get("read", 0)
        for path, data in STARTUP_FILES.items():
            assert (mp / path).read_bytes() == data
        reads[on] = mounter.status(mp)["fuse_requests"].get("read", 0) - before
        # files outside the startup still come through the daemon, right
        assert (mp / "data" / "later.bin").read_bytes() == OTHER_FILES["data/later.bin"]
        mounter.umount(mp)
    assert reads[True] == 0, reads
    assert reads[False] > 0, reads
