"""One set of layers through the three ways a tree is made from them, compared.

The layers (written with :mod:`tarfile`, PAX format) go (a) through the builder and a real
lazy mount (per-file FUSE and erofs), (b) through the snapshotter's layer applier, one
directory per layer, seen merged by an overlay mount of those directories, and (c) through
``umoci unpack``. Types, modes, owners, contents, symlink targets, hard links, xattrs and
mtimes must agree, with the differences that are ours by design (:mod:`turbofs.core.fstree`):
``trusted.*`` is never taken from an image, an empty xattr value is an xattr (umoci drops
both rules' cases the other way), ``LIBARCHIVE.xattr.*`` records are read (umoci ignores
them), and the applier's directories take the time of the unpack where a layer changes a
directory it does not list (as containerd's). A symlink chain of 30 links is followed; one
longer than :data:`~turbofs.core.config.MAX_SYMLINKS` is refused by the builder and the
applier alike.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from index_builder.builder import build
from tests.mount_fixtures import Mounter
from tests.ocifixtures import (
    EntryInfo,
    blob_path,
    can_mknod,
    diff_snapshots,
    probe_xattr,
    read_manifest,
    snapshot_tree,
    umoci_unpack,
    write_oci_layout,
)
from turbofs.core.config import MAX_SYMLINKS, BuildConfig
from turbofs.core.errors import UnsafeEntry
from turbofs.core.layers import LayerStream
from turbofs.core.tar import TarReader
from turbofs.snapshotter.apply import LayerApplier

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices, trusted.* and mounts need root"),
    pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed"),
]

T = 1_600_000_000
CAP = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
CHAIN = 30
#: xattrs that differ from umoci's by design: empty values and libarchive records are ours only
OURS_ONLY = {"user.empty": b"", "user.lib": b"from libarchive"}


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644, uid: int = 0,
           gid: int = 0, link: str = "", pax: dict[str, str] | None = None,
           dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, T
    info.linkname, info.pax_headers = link, pax or {}
    info.devmajor, info.devminor = dev
    info.size = len(data)
    return info, data


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _chain(base: str, n: int, end: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    """``base/l00`` -> ``l01`` -> ... -> ``l{n-1}`` -> ``end``: n symlinks to follow."""
    return [_entry(f"{base}/l{i:02d}", tarfile.SYMTYPE, link=f"l{i + 1:02d}" if i + 1 < n else end)
            for i in range(n)]


D = tarfile.DIRTYPE
LAYERS = [
    [
        _entry("etc", D, mode=0o755, pax={"SCHILY.xattr.user.dir": "etc"}),
        _entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        _entry("etc/motd", data=b"hello\n"),
        _entry("usr", D, mode=0o755),
        _entry("usr/bin", D, mode=0o750, uid=3, gid=4,
               pax={"SCHILY.xattr.user.a": "1\x002", "SCHILY.xattr.trusted.overlay.opaque": "y"}),
        _entry("usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, uid=1000, gid=1000,
               pax={"SCHILY.xattr.security.capability": CAP}),
        _entry("usr/bin/tool2", tarfile.LNKTYPE, link="usr/bin/tool", mode=0o4755, uid=1000, gid=1000),
        _entry("xattrs", data=b"x", pax={
            "SCHILY.xattr.user.full": "v", "SCHILY.xattr.user.empty": "", "SCHILY.xattr.trusted.t": "t",
            "SCHILY.xattr.trusted.overlay.redirect": "/etc",
            "LIBARCHIVE.xattr.user.lib": base64.b64encode(b"from libarchive").decode()}),
        _entry("dev", D, mode=0o755),
        _entry("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        _entry("run", D, mode=0o1777),
        _entry("run/fifo", tarfile.FIFOTYPE, mode=0o640),
        _entry("var", D, mode=0o750, uid=5, gid=5),
        _entry("var/cache", D, mode=0o755),
        _entry("var/cache/a", data=b"a"),
        _entry("opt", D, mode=0o755),
        _entry("opt/keep", D, mode=0o700),
        _entry("opt/keep/x", data=b"x"),
        _entry("big", data=bytes(range(256)) * 1200, mode=0o600, uid=4_000_000, gid=3_000_000),
        _entry("real", D, mode=0o755),
        _entry("chain", D, mode=0o755),
        *_chain("chain", CHAIN, "../real"),
        _entry("chain/l00/through", data=b"thirty links deep"),  # lands in real/
    ],
    [
        _entry("etc/.wh.motd", mode=0o600),
        _entry("var/.wh.cache", mode=0o600),
        _entry("opt/keep/.wh..wh..opq", mode=0o600),
        _entry("opt/keep/y", data=b"y"),
        _entry("usr/bin/new", data=b"new", mode=0o755, pax={"SCHILY.xattr.user.n": "n"}),
        _entry("run/fifo", data=b"now a file"),
        _entry("link", tarfile.SYMTYPE, link="/etc/passwd", uid=7, gid=7),
    ],
    [
        _entry("etc/passwd", data=b"root:x:0:0::/root:/bin/bash\n", mode=0o600),
        _entry("etc", D, mode=0o700, pax={"SCHILY.xattr.user.dir": "etc2", "SCHILY.xattr.user.e2": ""}),
    ],
]


def _layer_blobs(layout: Path) -> list[tuple[Path, dict[str, object]]]:
    _digest, manifest = read_manifest(layout, "latest")
    return [(blob_path(layout, str(d["digest"])), d) for d in manifest["layers"]]


def apply_layers(layout: Path, base: Path) -> list[Path]:
    """Each layer of ``layout`` applied in order, as the snapshotter does; bottom first."""
    dirs: list[Path] = []
    for i, (path, desc) in enumerate(_layer_blobs(layout)):
        dest = base / f"layer-{i}"
        dest.mkdir(parents=True)
        with path.open("rb") as f:
            stream = LayerStream(f, name=f"layer {i}", compression=None, digest=str(desc["digest"]),
                                 size=int(str(desc["size"])), diff_id=None, max_size=1 << 30)
            try:
                LayerApplier(dest, list(reversed(dirs)), what=f"layer {i}").apply(TarReader(stream.next_piece))
                stream.close_and_verify()
            finally:
                stream.abort()
        dirs.append(dest)
    return dirs


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points of read-only overlays made by :func:`mount_overlay`, unmounted at the end."""
    mounts: list[Path] = []
    yield mounts
    for mp in mounts:
        subprocess.run(["umount", "-l", str(mp)], check=False, capture_output=True)


def mount_overlay(layers: list[Path], mp: Path, mounts: list[Path]) -> Path:
    mp.mkdir()
    lower = ":".join(str(p) for p in reversed(layers))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(mp)], check=True)
    mounts.append(mp)
    return mp


def _not_dir(path: bytes, info: EntryInfo) -> bool:
    return info.type != "dir"


def _umoci_by_our_rule(tree: dict[bytes, EntryInfo], ours: dict[bytes, EntryInfo]) -> dict[bytes, EntryInfo]:
    """umoci's tree with the xattr rule of turbofs: no ``trusted.*``; the empty values and
    libarchive records umoci drops taken from ``ours`` (and checked there by the caller)."""
    out = {}
    for path, info in tree.items():
        kept = {k: v for k, v in info.xattrs if not k.startswith("trusted.")}
        if path in ours:
            kept.update({k: v for k, v in ours[path].xattrs if k in OURS_ONLY or k == "user.e2"})
        out[path] = EntryInfo(**{**info.__dict__, "xattrs": tuple(sorted(kept.items()))})
    return out


def test_builder_mount_applier_and_umoci_agree(tmp_path: Path, mounter: Mounter, overlay: list[Path]) -> None:
    if not can_mknod(tmp_path) or not probe_xattr(tmp_path, "trusted.turbofs-probe"):
        pytest.skip("needs mknod and trusted.* xattrs")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    layout = tmp_path / "src"
    write_oci_layout(layout, [_tar(layer) for layer in LAYERS], compression=["gzip", "none", "gzip"])

    # (c) the reference
    theirs = snapshot_tree(umoci_unpack(layout, "latest", tmp_path / "umoci"))
    # (a) built, then mounted lazily both ways
    build(f"oci:{layout}:latest", tmp_path / "turbo", BuildConfig(chunk_size=64 * 1024), progress=False)
    lazy = {mode: snapshot_tree(mounter.mount(f"oci:{tmp_path / 'turbo'}", mode, "--mode", mode, "--no-prefetch"))
            for mode in ("fuse", "erofs")}
    # (b) applied layer by layer, seen through overlayfs
    applied = snapshot_tree(mount_overlay(apply_layers(layout, tmp_path / "applied"), tmp_path / "merged", overlay))

    ours = lazy["fuse"]
    # the rule, on the entries that carry it
    assert dict(ours[b"xattrs"].xattrs) == {"user.full": b"v", **OURS_ONLY}
    assert not any(k.startswith("trusted.") for e in ours.values() for k, _ in e.xattrs)
    assert ("trusted.t", b"t") in theirs[b"xattrs"].xattrs  # umoci keeps what we refuse
    assert dict(ours[b"etc"].xattrs) == {"user.dir": b"etc2", "user.e2": b""}
    # the deep chain was followed, in every tree
    for tree in (theirs, ours, applied):
        assert tree[b"real/through"].type == "file" and tree[b"chain/l00"].target == b"l01"
    assert (tmp_path / "fuse" / "chain" / "l00" / "through").read_bytes() == b"thirty links deep"

    assert diff_snapshots(ours, lazy["erofs"]) == []
    assert diff_snapshots(_umoci_by_our_rule(theirs, ours), ours) == []
    assert diff_snapshots(ours, applied, compare_mtime_of=_not_dir) == []


@pytest.mark.parametrize("links", [MAX_SYMLINKS, MAX_SYMLINKS + 1])
def test_symlink_limit_is_the_same_everywhere(tmp_path: Path, links: int) -> None:
    layer = [_entry("real", D), _entry("chain", D), *_chain("chain", links - 1, "../real"),
             _entry("hop", tarfile.SYMTYPE, link="chain/l00"), _entry("hop/f", data=b"f")]
    layout = tmp_path / "src"
    write_oci_layout(layout, [_tar(layer)])
    if links > MAX_SYMLINKS:
        with pytest.raises(UnsafeEntry, match="symbolic links"):
            build(f"oci:{layout}:latest", tmp_path / "turbo", progress=False)
        with pytest.raises(UnsafeEntry, match="symbolic links"):
            apply_layers(layout, tmp_path / "applied")
        assert not (tmp_path / "turbo").exists()
        return
    build(f"oci:{layout}:latest", tmp_path / "turbo", progress=False)
    (applied,) = apply_layers(layout, tmp_path / "applied")
    assert (applied / "real/f").read_bytes() == b"f"
