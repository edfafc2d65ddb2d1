"""The layer applier (``turbofs/snapshotter/apply.py``) on hand-made layers.

The reference is containerd's own unpack: the same image imported into a private containerd
with its overlayfs snapshotter, whose per-layer ``fs`` folders are overlayfs's diff format
(containerd writes each layer straight into the new snapshot's upper folder). Each layer we
apply, on the layers we applied below it, must give the same tree: types, modes, owners,
sizes, contents, symlink targets, device numbers, hard link groups, xattrs (the
``trusted.overlay.opaque`` markers included), whiteout devices, and the mtimes of what the
layer lists. Then what containerd's applier does not cover: same-layer whiteouts (OCI: they
hide only lower layers) and entries that try to leave the root.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd_fixtures import ContainerdFactory
from tests.ocifixtures import (
    EntryInfo,
    TarEntry,
    can_mknod,
    diff_snapshots,
    layer_tar_bytes,
    opaque,
    probe_xattr,
    snapshot_tree,
    whiteout,
    write_oci_archive,
    write_oci_layout,
)
from turbofs.core.errors import UnsafeEntry
from turbofs.core.tar import TarReader
from turbofs.snapshotter.apply import OPAQUE_XATTR, LayerApplier


def _pieces(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def apply_tar(data: bytes, dest: Path, parents: list[Path]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    it = _pieces(data)
    LayerApplier(dest, parents, what="layer test").apply(TarReader(lambda: next(it, b"")))


T = (1_600_000_000, 123_456_789)

LAYERS: list[list[TarEntry]] = [
    [
        TarEntry("etc", "dir", mode=0o755, mtime=T, xattrs={"user.dir": b"etc"}),
        TarEntry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mtime=T),
        TarEntry("etc/motd", data=b"hello\n", mtime=T),
        TarEntry("usr", "dir", mode=0o755, mtime=T),
        TarEntry("usr/bin", "dir", mode=0o750, uid=3, gid=4, mtime=T, xattrs={"user.a": b"1\x002", "trusted.t": b"x"}),
        TarEntry("usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, uid=1000, gid=1000, mtime=T,
                 xattrs={"user.b": b"b"}),
        TarEntry("usr/bin/tool2", "hardlink", linkname="usr/bin/tool", mode=0o4755, uid=1000, gid=1000, mtime=T),
        TarEntry("bin", "symlink", linkname="usr/bin", mtime=T),
        TarEntry("dev/null", "char", mode=0o666, devmajor=1, devminor=3, mtime=T),  # implicit parent
        TarEntry("dev/sda", "block", mode=0o660, gid=6, devmajor=8, devminor=0, mtime=T),
        TarEntry("run", "dir", mode=0o1777, mtime=T),
        TarEntry("run/fifo", "fifo", mode=0o640, mtime=T),
        TarEntry("var", "dir", mode=0o750, uid=5, gid=5, mtime=T),
        TarEntry("var/cache", "dir", mode=0o755, mtime=T),
        TarEntry("var/cache/a", data=b"a", mtime=T),
        TarEntry("var/cache/b", data=b"b", mtime=T),
        TarEntry("opt/keep", "dir", mode=0o700, mtime=T),
        TarEntry("opt/keep/x", data=b"x", mtime=T),
        TarEntry(b"caf\xe9", data=b"latin-1 name", mtime=T),
        TarEntry("big", size=3 << 20, mtime=T),
    ],
    [
        whiteout("etc/motd"),  # parent etc: not listed, as the lower layer has it
        whiteout("var/cache"),
        TarEntry("var/cache", "dir", mode=0o711, mtime=T),  # after its whiteout: opaque
        TarEntry("var/cache/c", data=b"c", mtime=T),
        opaque("opt/keep"),
        TarEntry("opt/keep/y", data=b"y", mtime=T),
        TarEntry("usr/bin/new", data=b"new", mode=0o755, mtime=T, xattrs={"user.n": b"n"}),
        TarEntry("usr/bin/new2", "hardlink", linkname="usr/bin/new", mode=0o755, mtime=T),
        TarEntry("bin/via-link", data=b"through a lower symlink", mtime=T),
        TarEntry("run/fifo", data=b"now a file", mtime=T),
        TarEntry("link", "symlink", linkname="/etc/passwd", uid=7, gid=7, mtime=T),
    ],
    [
        whiteout("usr/bin/tool2"),
        TarEntry("etc/passwd", data=b"root:x:0:0::/root:/bin/bash\n", mode=0o600, mtime=T),
        whiteout("no/such/thing"),
        opaque("var"),
    ],
]


def _containerd_layers(containerd_factory: ContainerdFactory, tmp_path: Path) -> list[Path]:
    """containerd's overlayfs snapshot folders of the image of LAYERS, bottom first."""
    layout = tmp_path / "layout"
    write_oci_layout(layout, LAYERS, compression=["gzip", "zstd", "none"])
    archive = tmp_path / "image.tar"
    write_oci_archive(layout, archive)
    c = containerd_factory()
    c.ctr("images", "import", "--snapshotter", "overlayfs", "--index-name", "test/apply:latest", str(archive))
    top = c.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout
    chain = [line.split()[0] for line in top.splitlines()[1:] if line.strip()]
    parents = {line.split()[0]: line.split()[1] if len(line.split()) > 2 else "" for line in top.splitlines()[1:]}
    (head,) = [k for k in chain if k not in parents.values()]
    out = c.ctr("snapshots", "--snapshotter", "overlayfs", "view", "--mounts", "apply-view", head).stdout
    m = re.search(r"lowerdir=([^\s\"]+)", out)
    assert m, out
    dirs = [Path(p) for p in m.group(1).split(":")]
    # the view holds no lease: containerd's garbage collector may have removed it already
    rm = c.ctr("snapshots", "--snapshotter", "overlayfs", "rm", "apply-view", check=False)
    assert rm.returncode == 0 or "not found" in rm.stderr, rm.stderr
    return list(reversed(dirs))


def _listed(layer: list[TarEntry]) -> set[bytes]:
    return {e.name_bytes.rstrip(b"/") for e in layer if b".wh." not in e.name_bytes}


def test_layers_match_containerds_unpack(containerd_factory: ContainerdFactory, tmp_path: Path) -> None:
    if not can_mknod(tmp_path) or not probe_xattr(tmp_path, "trusted.turbofs-probe"):
        pytest.skip("needs mknod and trusted.* xattrs (root outside a user namespace)")
    theirs = _containerd_layers(containerd_factory, tmp_path)
    assert len(theirs) == len(LAYERS)
    ours: list[Path] = []
    for i, layer in enumerate(LAYERS):
        dest = tmp_path / f"ours-{i}"
        apply_tar(layer_tar_bytes(layer), dest, list(reversed(ours)))
        ours.append(dest)
        listed = _listed(layer)

        def mtime_known(path: bytes, info: EntryInfo, listed: set[bytes] = listed) -> bool:
            # a parent the layer does not list and a whiteout device get the time of the unpack
            return path in listed

        want, have = snapshot_tree(theirs[i]), snapshot_tree(dest)
        if i == 1:
            # "var/cache" whited out, then made again in the same layer: OCI says the lower
            # one is gone, so ours is opaque; containerd 1.6 lets the lower files show through
            assert not want[b"var/cache"].xattrs and have[b"var/cache"].xattrs == ((OPAQUE_XATTR, b"y"),)
            have[b"var/cache"] = want[b"var/cache"].__class__(**{**have[b"var/cache"].__dict__, "xattrs": ()})
        diffs = diff_snapshots(want, have, compare_mtime_of=mtime_known)
        assert not diffs, f"layer {i}:\n" + "\n".join(diffs)

    # the points of the exercise, spelled out
    up = ours[1]
    assert stat.S_ISCHR(os.lstat(up / "etc/motd").st_mode) and os.lstat(up / "etc/motd").st_rdev == 0
    assert os.getxattr(up / "var/cache", OPAQUE_XATTR) == b"y" and os.getxattr(up / "opt/keep", OPAQUE_XATTR) == b"y"
    assert os.getxattr(up / "etc", "user.dir") == b"etc"  # an implicit parent as the lower has it
    assert os.stat(up / "usr/bin/new").st_ino == os.stat(up / "usr/bin/new2").st_ino
    assert os.stat(ours[0] / "usr/bin/tool").st_mode & 0o7777 == 0o4755


def test_same_layer_whiteouts_hide_only_lower_layers(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    apply_tar(layer_tar_bytes([TarEntry("d", "dir"), TarEntry("d/old", data=b"o"), TarEntry("f", data=b"1")]), lower, [])
    up = tmp_path / "up"
    apply_tar(layer_tar_bytes([
        TarEntry("d", "dir", mode=0o700), TarEntry("d/new", data=b"n"), whiteout("d"),  # dir, then its whiteout
        TarEntry("f", data=b"2"), whiteout("f"),  # a file of this layer stays
        whiteout("g"), TarEntry("g", "symlink", linkname="f"),  # a whiteout, then an entry: the entry
    ]), up, [lower])
    assert (up / "d/new").read_bytes() == b"n" and os.getxattr(up / "d", OPAQUE_XATTR) == b"y"
    assert (up / "f").read_bytes() == b"2"
    assert os.readlink(up / "g") == "f"


def _raw_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.pax_headers = kind, linkname, pax or {}
    return info


@pytest.mark.parametrize(("members", "message"), [
    ([(_info("../evil"), b"x")], "escape the root"),
    ([(_info("a/../../evil"), b"x")], "escape the root"),
    ([(_info("/etc/evil"), b"x")], "absolute path"),
    ([(_info("a"), b"x"), (_info("b", tarfile.LNKTYPE, "../a"), b"")], "escape the root"),
    ([(_info("b", tarfile.LNKTYPE, "/etc/passwd"), b"")], "absolute path"),
    ([(_info("b", tarfile.LNKTYPE, "etc/passwd"), b"")], "not a file of this layer"),
    ([(_info("f"), b"x"), (_info("f/g"), b"y")], "not a directory"),
])
def test_unsafe_entries_are_refused(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], message: str) -> None:
    with pytest.raises(UnsafeEntry, match=re.escape(message)):
        apply_tar(_raw_tar(members), tmp_path / "dest", [])


def test_trusted_xattrs_are_not_taken_from_a_layer(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    apply_tar(_raw_tar([(_info("d", tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.opaque": "y",
                                                            "SCHILY.xattr.user.ok": "1",
                                                            "SCHILY.xattr.user.empty": ""}), b"")]), dest, [])
    assert sorted(os.listxattr(dest / "d")) == ["user.empty", "user.ok"]  # an empty value is a value


def test_symlinks_cannot_lead_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    apply_tar(_raw_tar([
        (_info("abs", tarfile.SYMTYPE, str(outside)), b""),
        (_info("abs/planted"), b"1"),
        (_info("up", tarfile.SYMTYPE, "../../../../.."), b""),
        (_info("up/planted2"), b"2"),
        (_info("loop", tarfile.SYMTYPE, "loop"), b""),
    ]), dest, [])
    assert not list(outside.iterdir())
    assert (dest / outside.relative_to("/") / "planted").read_bytes() == b"1"  # inside the root
    assert (dest / "planted2").read_bytes() == b"2"
    with pytest.raises(UnsafeEntry, match="symbolic links"):
        apply_tar(_raw_tar([(_info("loop/x"), b"x")]), dest, [])
