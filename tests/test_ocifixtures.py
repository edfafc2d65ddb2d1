"""Self-tests of tests/ocifixtures.py against the real skopeo and umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard

from tests.ocifixtures import (
    EntryInfo,
    TarEntry,
    ToolError,
    blob_path,
    can_mknod,
    default_content,
    diff_snapshots,
    expected_tree,
    layer_tar_bytes,
    mtime_known,
    opaque,
    probe_xattr,
    read_blob,
    read_layer_tar,
    read_manifest,
    skopeo_inspect,
    snapshot_tree,
    umoci_unpack,
    whiteout,
    write_docker_archive,
    write_layer_tar,
    write_oci_archive,
    write_oci_layout,
)

needs_skopeo = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo binary not installed (apt-get install skopeo)"
)
needs_umoci = pytest.mark.skipif(
    shutil.which("umoci") is None, reason="umoci binary not installed (apt-get install umoci)"
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="umoci must run as root to keep owners, trusted.* xattrs and device nodes",
)

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # vfs cap v2, +ep


def mt(step: int) -> tuple[int, int]:
    """Distinct nanosecond mtimes."""
    return (1_600_000_000 + step, 111_111_111 * (step % 9) + step)


def three_layers() -> list[list[TarEntry]]:
    """Layers exercising whiteouts, opaque dirs, hardlinks, symlinks, devices, xattrs..."""
    base = [
        TarEntry("etc", "dir", mode=0o755, mtime=mt(1)),
        TarEntry(
            "etc/passwd",
            data=b"root:x:0:0::/root:/bin/sh\n",
            mtime=mt(2),
            xattrs={"user.k": b"v\x00\xff", "trusted.t": b"tt"},
        ),
        TarEntry("etc/shadow", data=b"secret", mode=0o640, gid=42, mtime=mt(3)),
        TarEntry("etc/alt", "symlink", linkname="passwd", uid=5, gid=6, mtime=mt(4)),
        # hardlink header metadata is ignored by unpackers: the inode is the target's
        TarEntry("etc/passwd.hl", "hardlink", linkname="etc/passwd", mode=0o600, mtime=mt(5)),
        TarEntry("usr", "dir", mode=0o755, mtime=mt(6)),
        TarEntry("usr/bin", "dir", mode=0o755, mtime=mt(7)),
        TarEntry(
            "usr/bin/ping",
            data=b"\x7fELF ping",
            mode=0o4755,
            mtime=mt(8),
            xattrs={"security.capability": CAP_NET_RAW},
        ),
        TarEntry("usr/bin/tool", data=b"v1", mode=0o2750, uid=1000, gid=1000, mtime=mt(9)),
        TarEntry("dev", "dir", mode=0o755, mtime=mt(10)),
        TarEntry("dev/null", "char", mode=0o666, devmajor=1, devminor=3, mtime=mt(11)),
        TarEntry("dev/sda", "block", mode=0o660, gid=6, devmajor=8, devminor=0, mtime=mt(12)),
        TarEntry("dev/initctl", "fifo", mode=0o600, mtime=mt(13)),
        TarEntry("tmp", "dir", mode=0o1777, mtime=mt(14)),
        TarEntry("cache", "dir", mode=0o700, uid=7, gid=8, mtime=mt(15), xattrs={"user.d": b"1"}),
        TarEntry("cache/old1", data=b"o1", mtime=mt(16)),
        TarEntry("cache/sub", "dir", mode=0o755, mtime=mt(16)),
        TarEntry("cache/sub/old2", data=b"o2", mtime=mt(16)),
        TarEntry(b"data/caf\xe9-latin1", data=b"latin-1 name", mtime=mt(17)),  # parent unlisted
        TarEntry(b"data/\xff\xfe-link", "symlink", linkname=b"caf\xe9-latin1", mtime=mt(18)),
        TarEntry("data/" + "long" * 40, data=b"long name", mtime=mt(19)),
    ]
    middle = [
        whiteout("etc/shadow"),
        opaque("cache"),
        TarEntry("cache/new", data=b"n", mtime=mt(20)),
        TarEntry("usr/bin/tool", data=b"v2", mode=0o755, mtime=mt(21)),  # replaces, dir unlisted
        TarEntry("usr/bin/tool2", "hardlink", linkname="usr/bin/tool", mtime=mt(22)),
        TarEntry("etc/passwd.lower", "hardlink", linkname="etc/passwd", mtime=mt(22)),
        TarEntry("etc", "dir", mode=0o750, mtime=mt(23), xattrs={"user.etc": b"e"}),
    ]
    top = [
        whiteout(b"data/\xff\xfe-link"),
        whiteout("usr/bin/tool2"),
        TarEntry("usr/bin/tool2", data=b"fresh", mtime=mt(24)),  # new file after whiteout
        TarEntry("dev", "dir", mode=0o711, uid=3, mtime=mt(25)),  # re-listed dir: metadata only
        TarEntry("opt/app/run.sh", data=b"#!/bin/sh\n", mode=0o755, mtime=(0, 0)),
    ]
    return [base, middle, top]


# --------------------------------------------------------------------------------------------
# tar writer
# --------------------------------------------------------------------------------------------


def test_layer_tar_round_trip_and_tarfile_agrees() -> None:
    entries = [e for layer in three_layers() for e in layer]
    data = layer_tar_bytes(entries)
    assert len(data) % 512 == 0 and data.endswith(b"\0" * 1024)
    back = read_layer_tar(data)
    assert len(back) == len(entries)
    for want, got in zip(entries, back, strict=True):
        assert got.name_bytes == want.name_bytes
        assert (got.type, got.mode, got.uid, got.gid) == (want.type, want.mode, want.uid, want.gid)
        assert got.mtime == want.mtime
        assert got.data == want.data
        assert got.linkname_bytes == want.linkname_bytes
        assert (got.devmajor, got.devminor) == (want.devmajor, want.devminor)
        assert got.xattrs == want.xattrs

    # the standard library's reader (an independent implementation) agrees on the PAX records
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as t:
        members = t.getmembers()
    assert len(members) == len(entries)
    by_name = {os.fsencode(m.name): m for m in members}
    latin = by_name[b"data/caf\xe9-latin1"]
    assert latin.pax_headers["mtime"] == "1600000017.888888905"
    ping = by_name[b"usr/bin/ping"]
    assert ping.mode == 0o4755
    raw_cap = ping.pax_headers["SCHILY.xattr.security.capability"]
    assert raw_cap.encode("utf-8", "surrogateescape") == CAP_NET_RAW
    assert by_name[b"dev/sda"].devmajor == 8 and by_name[b"dev/sda"].isblk()
    assert by_name[b"data/" + b"long" * 40].size == len(b"long name")
    assert os.fsencode(by_name[b"data/\xff\xfe-link"].linkname) == b"caf\xe9-latin1"


class _HeadAndCount:
    def __init__(self) -> None:
        self.head = bytearray()
        self.total = 0

    def write(self, data: bytes, /) -> int:
        if len(self.head) < 4096:
            self.head += data[: 4096 - len(self.head)]
        self.total += len(data)
        return len(data)


def test_huge_file_is_streamed_with_pax_size() -> None:
    size = 9 * 2**30 + 7  # beyond the 8 GiB of the ustar size field
    calls: list[int] = []
    zeros = bytes(1 << 20)

    def gen(offset: int, length: int) -> bytes:
        calls.append(length)
        return zeros[:length]

    sink = _HeadAndCount()
    write_layer_tar([TarEntry("big", size=size, content_gen=gen)], sink)
    assert max(calls) <= 1 << 20 and sum(calls) == size
    pax_len = int(bytes(sink.head[124:136]).rstrip(b"\0"), 8)
    records = bytes(sink.head[512 : 512 + pax_len])
    assert b" size=%d\n" % size in records
    padded = size + (-size % 512)
    assert sink.total == 512 + 512 * ((pax_len + 511) // 512) + 512 + padded + 1024


def test_default_content_is_slice_consistent() -> None:
    whole = default_content(0, 300_000)
    assert default_content(65_000, 70_000) == whole[65_000:135_000]
    assert default_content(131_072, 1) == whole[131_072:131_073]
    assert whole[:65_536] != whole[65_536:131_072]


def test_whiteout_and_opaque_names() -> None:
    assert whiteout("a/b/c").name == b"a/b/.wh.c"
    assert whiteout("top").name == b".wh.top"
    assert opaque("a/b/").name == b"a/b/.wh..wh..opq"


# --------------------------------------------------------------------------------------------
# OCI layout writer
# --------------------------------------------------------------------------------------------


def _decompress(path: Path, media_type: str) -> bytes:
    raw = path.read_bytes()
    if media_type.endswith("+gzip"):
        return gzip.decompress(raw)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def test_layout_is_deterministic_and_self_consistent(tmp_path: Path) -> None:
    layers: list[list[TarEntry] | bytes] = [*three_layers()]
    layers.append(layer_tar_bytes([TarEntry("prebuilt", data=b"p")]))
    kinds = ["gzip", "zstd", "none", "gzip"]
    one = write_oci_layout(tmp_path / "one", layers, compression=kinds, tag="v1")
    two = write_oci_layout(tmp_path / "two", layers, compression=kinds, tag="v1")
    assert one.manifest_digest == two.manifest_digest
    assert one.layer_digests == two.layer_digests

    layout = tmp_path / "one"
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    digest, manifest = read_manifest(layout, "v1")
    assert digest == one.manifest_digest
    assert [lay["mediaType"] for lay in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ]
    config = json.loads(read_blob(layout, one.config_digest))
    assert config["rootfs"] == {"type": "layers", "diff_ids": one.diff_ids}
    assert len(config["history"]) == 4
    for lay, diff_id in zip(manifest["layers"], one.diff_ids, strict=True):
        tar = _decompress(blob_path(layout, lay["digest"]), lay["mediaType"])
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        assert blob_path(layout, lay["digest"]).stat().st_size == lay["size"]

    # a second tag shares the layout; rewriting a tag replaces only that entry
    write_oci_layout(layout, [[TarEntry("x", data=b"x")]], tag="v2")
    write_oci_layout(layout, [[TarEntry("y", data=b"y")]], tag="v2")
    index = json.loads((layout / "index.json").read_bytes())
    tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert tags == ["v1", "v2"]
    assert read_manifest(layout, "v1")[0] == one.manifest_digest


@needs_skopeo
def test_skopeo_inspects_oci_layout(tmp_path: Path) -> None:
    info = write_oci_layout(
        tmp_path / "img",
        three_layers(),
        tag="1.0",
        config={
            "Entrypoint": ["/opt/app/run.sh"],
            "Cmd": ["--serve"],
            "Env": ["PATH=/usr/bin:/bin", "MODEL=tiny"],
            "WorkingDir": "/opt/app",
            "Labels": {"org.example": "yes"},
        },
    )
    ref = f"oci:{tmp_path / 'img'}:1.0"
    summary = skopeo_inspect(ref)
    assert summary["Digest"] == info.manifest_digest
    assert summary["Layers"] == info.layer_digests and len(summary["Layers"]) == 3
    assert summary["Env"] == ["PATH=/usr/bin:/bin", "MODEL=tiny"]
    assert summary["Labels"] == {"org.example": "yes"}
    assert (summary["Architecture"], summary["Os"]) == ("amd64", "linux")
    config = skopeo_inspect(ref, config=True)
    assert config["config"]["Entrypoint"] == ["/opt/app/run.sh"]
    assert config["config"]["WorkingDir"] == "/opt/app"
    assert config["rootfs"]["diff_ids"] == info.diff_ids
    raw = skopeo_inspect(ref, raw=True)
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    with pytest.raises(ToolError, match="no descriptor found"):
        skopeo_inspect(f"oci:{tmp_path / 'img'}:nosuchtag")


@needs_skopeo
def test_archives_are_readable_by_skopeo(tmp_path: Path) -> None:
    info = write_oci_layout(
        tmp_path / "img", three_layers(), compression=["gzip", "zstd", "none"], tag="t"
    )
    oci_archive = tmp_path / "img.oci.tar"
    write_oci_archive(tmp_path / "img", oci_archive)
    summary = skopeo_inspect(f"oci-archive:{oci_archive}:t")
    assert summary["Digest"] == info.manifest_digest
    assert summary["Layers"] == info.layer_digests

    docker_archive = tmp_path / "img.docker.tar"
    write_docker_archive(tmp_path / "img", "t", docker_archive, repo_tag="example.com/app:9")
    summary = skopeo_inspect(f"docker-archive:{docker_archive}")
    assert summary["Layers"] == info.diff_ids  # docker save layers are uncompressed
    by_tag = skopeo_inspect(f"docker-archive:{docker_archive}:example.com/app:9", config=True)
    assert by_tag["rootfs"]["diff_ids"] == info.diff_ids
    with tarfile.open(docker_archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        names = set(tar.getnames())
    assert manifest[0]["RepoTags"] == ["example.com/app:9"]
    assert manifest[0]["Config"] == info.config_digest.split(":")[1] + ".json"
    assert {"repositories", manifest[0]["Config"], *manifest[0]["Layers"]} <= names

    # Docker schema 2 media types: fine in a docker archive
    write_oci_layout(tmp_path / "dk", three_layers(), compression="gzip", docker_media_types=True)
    write_docker_archive(tmp_path / "dk", "latest", tmp_path / "dk.tar")
    raw = skopeo_inspect(f"docker-archive:{tmp_path / 'dk.tar'}", raw=True)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


# --------------------------------------------------------------------------------------------
# umoci reference unpack
# --------------------------------------------------------------------------------------------


@needs_umoci
@needs_root
def test_umoci_unpack_matches_model_and_known_facts(tmp_path: Path) -> None:
    if not probe_xattr(tmp_path) or not probe_xattr(tmp_path, "trusted.turbofs-probe"):
        pytest.skip(f"{tmp_path} does not keep user.*/trusted.* xattrs")
    if not can_mknod(tmp_path):
        pytest.skip("cannot create device nodes here (no CAP_MKNOD?)")
    layers = three_layers()
    write_oci_layout(tmp_path / "img", layers, compression=["gzip", "none", "gzip"])
    rootfs = umoci_unpack(tmp_path / "img", "latest", tmp_path / "bundle")
    assert rootfs == tmp_path / "bundle" / "rootfs"
    actual = snapshot_tree(rootfs)
    expected = expected_tree(layers)

    assert diff_snapshots(expected, actual, compare_mtime_of=mtime_known) == []
    # the unlisted parents are the only mtimes not compared
    assert {p for p, e in expected.items() if not mtime_known(p, e)} == {
        b"data",
        b"opt",
        b"opt/app",
    }

    # hand-checked facts, independent of the model
    assert set(actual) >= {b"etc/passwd", b"cache/new", b"usr/bin/tool2"}
    assert not {b"etc/shadow", b"cache/old1", b"cache/sub", b"data/\xff\xfe-link"} & set(actual)
    passwd = actual[b"etc/passwd"]
    assert passwd.link_group == b"etc/passwd" == actual[b"etc/passwd.hl"].link_group
    assert actual[b"etc/passwd.lower"].link_group == b"etc/passwd"
    assert passwd.mode == 0o644 and passwd.xattrs == (
        ("trusted.t", b"tt"),
        ("user.k", b"v\x00\xff"),
    )
    assert passwd.mtime_ns == 1_600_000_002_222_222_224
    assert actual[b"usr/bin/tool2"].link_group == b""  # whiteout broke the link
    assert actual[b"usr/bin/tool"].sha256 == hashlib.sha256(b"v2").hexdigest()
    ping = actual[b"usr/bin/ping"]
    assert ping.mode == 0o4755 and ping.xattrs == (("security.capability", CAP_NET_RAW),)
    assert actual[b"dev/null"] == EntryInfo(
        "char", 0o666, 0, 0, 0, 1_600_000_011_222_222_233, (), b"", (1, 3), "", b""
    )
    assert actual[b"dev/sda"].rdev == (8, 0) and actual[b"dev/sda"].type == "block"
    assert actual[b"dev/initctl"].type == "fifo"
    assert actual[b"dev"].mode == 0o711 and actual[b"dev"].uid == 3
    assert actual[b"tmp"].mode == 0o1777
    cache = actual[b"cache"]  # opaque keeps the directory's own metadata
    assert (cache.mode, cache.uid, cache.gid, cache.xattrs) == (0o700, 7, 8, (("user.d", b"1"),))
    assert actual[b"etc"].mtime_ns == 1_600_000_023_555_555_578
    assert actual[b"etc"].xattrs == (("user.etc", b"e"),)  # replaced, not merged
    alt = actual[b"etc/alt"]
    assert (alt.type, alt.target, alt.size, alt.uid, alt.gid) == ("symlink", b"passwd", 6, 5, 6)
    assert alt.mtime_ns == 1_600_000_004_444_444_448
    assert actual[b"data/caf\xe9-latin1"].size == len(b"latin-1 name")
    assert actual[b"data/" + b"long" * 40].size == len(b"long name")
    assert actual[b"opt/app/run.sh"].mtime_ns == 0
    assert actual[b"data"].mode == 0o755 and actual[b"data"].uid == 0


@needs_umoci
@needs_root
def test_umoci_zstd_and_docker_types(tmp_path: Path) -> None:
    """umoci 0.4.7 refuses zstd layers and Docker manifests; if a newer one accepts zstd, the
    result must still match the model."""
    layers = [[TarEntry("a", "dir", mode=0o755), TarEntry("a/f", data=b"zstd")]]
    write_oci_layout(tmp_path / "z", layers, compression="zstd")
    try:
        rootfs = umoci_unpack(tmp_path / "z", "latest", tmp_path / "zb")
    except ToolError as err:
        assert "mediatype" in str(err)
    else:
        assert diff_snapshots(expected_tree(layers), snapshot_tree(rootfs)) == []
    write_oci_layout(tmp_path / "d", layers, docker_media_types=True)
    with pytest.raises(ToolError):
        umoci_unpack(tmp_path / "d", "latest", tmp_path / "db")


# --------------------------------------------------------------------------------------------
# snapshots
# --------------------------------------------------------------------------------------------


def test_snapshot_tree_and_diff(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"hello")
    os.link(root / "d" / "f", root / "g")
    os.symlink(b"d/f", os.path.join(os.fsencode(root), b"s\xff"))
    os.utime(root / "d" / "f", ns=(0, 5_000_000_123))
    snap = snapshot_tree(root)
    assert sorted(snap) == [b"d", b"d/f", b"g", b"s\xff"]
    f = snap[b"d/f"]
    assert (f.size, f.mtime_ns, f.link_group) == (5, 5_000_000_123, b"d/f")
    assert f.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert snap[b"g"].link_group == b"d/f"
    assert snap[b"s\xff"].target == b"d/f" and snap[b"s\xff"].size == 3

    changed = dict(snap)
    del changed[b"g"]
    changed[b"new"] = snap[b"d"]
    changed[b"d/f"] = EntryInfo(**{**f.__dict__, "mode": 0o600, "mtime_ns": 1})
    diffs = diff_snapshots(snap, changed)
    assert "missing: b'g' (expected file)" in diffs
    assert "extra: b'new' (dir)" in diffs
    assert f"b'd/f': mode expected 0o{f.mode:o}, actual 0o600" in diffs
    assert any(d.startswith("b'd/f': mtime_ns") for d in diffs)
    assert len(diffs) == 4
    quiet = diff_snapshots(
        snap, changed, compare_mtime_of=lambda p, e: p != b"d/f", ignore_fields={"mode"}
    )
    assert len(quiet) == 2
    with pytest.raises(ValueError):
        diff_snapshots(snap, snap, ignore_fields={"colour"})

    if probe_xattr(tmp_path):
        os.setxattr(root / "d", "user.a", b"1")
        with_x = snapshot_tree(root)
        assert with_x[b"d"].xattrs == (("user.a", b"1"),)
        assert snapshot_tree(root, ignore_xattrs=lambda n: n.startswith("user."))[b"d"].xattrs == ()
        assert diff_snapshots(snap, with_x, ignore_xattrs=lambda n: n == "user.a") == []


@needs_umoci
@needs_root
def test_umoci_edge_cases_match_model(tmp_path: Path) -> None:
    if not probe_xattr(tmp_path):
        pytest.skip(f"{tmp_path} does not keep user.* xattrs")
    lower = [
        TarEntry("a/f", data=b"child listed before its dir", mtime=mt(1)),
        TarEntry("a", "dir", mode=0o750, uid=3, mtime=mt(2), xattrs={"user.a": b"1"}),
        TarEntry("b", "dir", mode=0o755, mtime=mt(2), xattrs={"user.a": b"1"}),
        TarEntry("file2dir", data=b"f", mtime=mt(3)),
        TarEntry("dir2file", "dir", mode=0o755, mtime=mt(3)),
        TarEntry("dir2file/c", data=b"c", mtime=mt(3)),
        TarEntry("tgt", data=b"target1", mtime=mt(4), xattrs={"user.t": b"1"}),
        TarEntry(
            "capuser",
            data=b"cu",
            mode=0o750,
            uid=1000,
            gid=1000,
            mtime=mt(4),
            xattrs={"security.capability": CAP_NET_RAW},
        ),
        TarEntry("biguid", data=b"u", uid=3_000_000, gid=4_000_000, mtime=mt(4)),
        TarEntry("longlink", "symlink", linkname="L" * 200, mtime=mt(5)),
        TarEntry("sym", "symlink", linkname="tgt", mtime=mt(6)),
        TarEntry("opq", "dir", mode=0o755, mtime=mt(6)),
        TarEntry("opq/old", data=b"o", mtime=mt(6)),
        TarEntry("x", "dir", mode=0o755, mtime=mt(6)),
        TarEntry("x/old", data=b"o", mtime=mt(6)),
    ]
    upper = [
        TarEntry("b", "dir", mode=0o700, mtime=mt(7), xattrs={"user.b": b"2"}),
        TarEntry("file2dir", "dir", mode=0o755, mtime=mt(7)),
        TarEntry("dir2file", data=b"now a file", mtime=mt(7)),
        TarEntry("hl", "hardlink", linkname="tgt", xattrs={"user.hl": b"x"}, mtime=mt(8)),
        TarEntry("hlsym", "hardlink", linkname="sym", mtime=mt(8)),
        TarEntry("opq/new", data=b"n", mtime=mt(8)),
        opaque("opq"),  # after the new entry: still only hides the lower layer
        whiteout("nonexistent"),
        TarEntry("x", "dir", mode=0o700, mtime=mt(8)),
        TarEntry("x/new", data=b"n", mtime=mt(8)),
        whiteout("x"),  # the quirk: x keeps x/new, but x's mtime becomes "now"
    ]
    top = [TarEntry("tgt", data=b"target2", mtime=mt(9))]
    layers = [lower, upper, top]
    write_oci_layout(tmp_path / "img", layers, compression=["none", "gzip", "gzip"])
    actual = snapshot_tree(umoci_unpack(tmp_path / "img", "latest", tmp_path / "bundle"))
    expected = expected_tree(layers)
    assert (
        diff_snapshots(
            expected, actual, compare_mtime_of=lambda p, e: p != b"x" and mtime_known(p, e)
        )
        == []
    )
    assert sorted(p for p in actual if p.startswith(b"x")) == [b"x", b"x/new"]
    assert actual[b"hl"].xattrs == (("user.t", b"1"),) and actual[b"hl"].link_group == b""
    assert actual[b"capuser"].xattrs == (("security.capability", CAP_NET_RAW),)
    assert (actual[b"biguid"].uid, actual[b"biguid"].gid) == (3_000_000, 4_000_000)
    assert actual[b"b"].xattrs == (("user.b", b"2"),)
    assert actual[b"a"].mode == 0o750 and actual[b"a"].mtime_ns == 1_600_000_002_222_222_224
