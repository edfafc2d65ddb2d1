"""Bad input to ``turbofs build``: a clear error, a non-zero exit, and no output left behind."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from index_builder.builder import build
from tests.ocifixtures import TarEntry, blob_path, layer_tar_bytes, write_oci_layout
from turbofs.core.config import BuildConfig
from turbofs.core.errors import (
    DigestMismatch,
    LimitExceeded,
    NotFound,
    SourceError,
    TurboError,
    UnsafeEntry,
)
from turbofs.core.oci import sha256_digest

GOOD = [[TarEntry("etc", "dir"), TarEntry("etc/a", data=b"a" * 1000), TarEntry("bin", "dir"), TarEntry("bin/x", data=b"x")]]


def _raw_tar(*members: tuple[str, str, bytes]) -> bytes:
    """A tar written with tarfile, for entries our fixture writer refuses on purpose."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = data.decode()
                tf.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = data.decode()
                tf.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
    return buf.getvalue()


def _edit_manifest(layout: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the (only) manifest with ``edit`` and point index.json at the new one."""
    index = json.loads((layout / "index.json").read_bytes())
    desc = index["manifests"][0]
    manifest = json.loads(blob_path(layout, desc["digest"]).read_bytes())
    edit(manifest)
    raw = json.dumps(manifest).encode()
    digest = sha256_digest(raw)
    blob_path(layout, digest).write_bytes(raw)
    desc.update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))


def _replace_layer(layout: Path, blob: bytes, *, fix_diff_id: bytes | None = None) -> None:
    digest = sha256_digest(blob)
    blob_path(layout, digest).write_bytes(blob)

    def edit(m: dict[str, Any]) -> None:
        m["layers"][0].update(digest=digest, size=len(blob))
        if fix_diff_id is not None:
            config = json.loads(blob_path(layout, m["config"]["digest"]).read_bytes())
            config["rootfs"]["diff_ids"][0] = sha256_digest(fix_diff_id)
            raw = json.dumps(config).encode()
            blob_path(layout, sha256_digest(raw)).write_bytes(raw)
            m["config"].update(digest=sha256_digest(raw), size=len(raw))

    _edit_manifest(layout, edit)


def _expect_failure(src: Path | str, out: Path, exc: type[TurboError], match: str, **cfg: Any) -> None:
    spec = src if isinstance(src, str) else f"oci:{src}"
    with pytest.raises(exc, match=match):
        build(spec, out, BuildConfig(**cfg), progress=False)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def _layout(tmp_path: Path, layers: list[list[TarEntry]] | None = None, compression: str = "gzip") -> Path:
    return write_oci_layout(tmp_path / "src", layers or GOOD, compression=compression).layout


def test_truncated_gzip_layer(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    tar = layer_tar_bytes(GOOD[0])
    _replace_layer(layout, gzip.compress(tar)[:-40], fix_diff_id=tar)
    _expect_failure(layout, tmp_path / "out", SourceError, "truncated gzip")


def test_truncated_uncompressed_tar(tmp_path: Path) -> None:
    layout = _layout(tmp_path, compression="none")
    full = layer_tar_bytes(GOOD[0])
    tar = full[: full.index(b"a" * 1000) + 500]  # cut inside a file's data
    _replace_layer(layout, tar, fix_diff_id=tar)
    _expect_failure(layout, tmp_path / "out", SourceError, "layer sha256:.*(truncated|unexpected end|ends after)")


def test_layer_that_is_not_a_tar(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    junk = b"this is not a tar archive at all " * 100
    _replace_layer(layout, gzip.compress(junk), fix_diff_id=junk)
    _expect_failure(layout, tmp_path / "out", SourceError, "not a valid tar archive")


def test_layer_that_is_not_gzip(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    tar = layer_tar_bytes(GOOD[0])
    _replace_layer(layout, tar, fix_diff_id=tar)  # media type still says +gzip
    _expect_failure(layout, tmp_path / "out", SourceError, "not valid gzip data")


def test_layer_digest_mismatch(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    manifest = json.loads(blob_path(layout, json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]).read_bytes())
    path = blob_path(layout, manifest["layers"][0]["digest"])
    data = bytearray(path.read_bytes())
    data[-10] ^= 1  # inside the gzip trailer: decompression would still look fine to a lax reader
    path.write_bytes(bytes(data))
    _expect_failure(layout, tmp_path / "out", SourceError, "sha256|gzip")


def test_diff_id_mismatch(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    tar = layer_tar_bytes(GOOD[0])
    _replace_layer(layout, gzip.compress(tar), fix_diff_id=tar + b"\0" * 512)
    _expect_failure(layout, tmp_path / "out", DigestMismatch, "diff_ids")


def test_missing_layer_blob(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    manifest = json.loads(blob_path(layout, json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]).read_bytes())
    blob_path(layout, manifest["layers"][0]["digest"]).unlink()
    _expect_failure(layout, tmp_path / "out", NotFound, "blob sha256:[0-9a-f]{64} is missing")


def test_missing_manifest_and_wrong_tag(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    _expect_failure(f"oci:{layout}:nope", tmp_path / "out", NotFound, "no image tagged 'nope'")
    index = json.loads((layout / "index.json").read_text())
    blob_path(layout, index["manifests"][0]["digest"]).unlink()
    _expect_failure(layout, tmp_path / "out", NotFound, "is missing")
    _expect_failure(f"oci:{tmp_path / 'nothing-here'}", tmp_path / "out", NotFound, "no such file")


def test_tampered_manifest(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    path = blob_path(layout, index["manifests"][0]["digest"])
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion": 2'))
    _expect_failure(layout, tmp_path / "out", TurboError, "digest|bytes")


def test_unsupported_media_type(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    _edit_manifest(layout, lambda m: m["layers"][0].update(mediaType="application/vnd.example.weird"))
    _expect_failure(layout, tmp_path / "out", SourceError, "unsupported media type 'application/vnd.example.weird'")
    layout2 = write_oci_layout(tmp_path / "src2", GOOD).layout
    _edit_manifest(layout2, lambda m: m.update(mediaType="application/vnd.example.manifest"))
    _expect_failure(layout2, tmp_path / "out", SourceError, "unsupported manifest media type")


def test_bad_config(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    raw = b"{not json"

    def edit(m: dict[str, Any]) -> None:
        blob_path(layout, sha256_digest(raw)).write_bytes(raw)
        m["config"].update(digest=sha256_digest(raw), size=len(raw))

    _edit_manifest(layout, edit)
    _expect_failure(layout, tmp_path / "out", SourceError.__base__, "not valid JSON")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([("../escape", "file", b"x")], r"'\.\.'"),
        ([("a/../../escape", "file", b"x")], r"'\.\.'"),
        ([("/etc/passwd", "file", b"x")], "absolute path"),
        ([("a", "file", b"x"), ("b", "hardlink", b"../a")], r"'\.\.'"),
        ([("a", "file", b"x"), ("b", "hardlink", b"/a")], "absolute path"),
    ],
)
def test_entries_that_escape_the_root(tmp_path: Path, members: list[tuple[str, str, bytes]], match: str) -> None:
    layout = _layout(tmp_path)
    tar = _raw_tar(*members)
    _replace_layer(layout, gzip.compress(tar), fix_diff_id=tar)
    _expect_failure(layout, tmp_path / "out", UnsafeEntry, match)


def test_hardlink_to_missing_target(tmp_path: Path) -> None:
    layout = _layout(tmp_path, [[TarEntry("a", data=b"x"), TarEntry("b", "hardlink", linkname="nope")]])
    _expect_failure(layout, tmp_path / "out", SourceError, "hardlink target 'nope' does not exist")


def test_symlink_escape_is_stored_not_followed(tmp_path: Path) -> None:
    """A symlink pointing outside is stored as it is; entries below it stay inside the root."""
    layout = _layout(tmp_path)
    tar = _raw_tar(("up", "symlink", b"../../../../etc"), ("up/passwd", "file", b"inside"))
    _replace_layer(layout, gzip.compress(tar), fix_diff_id=tar)
    build(f"oci:{layout}", tmp_path / "out", BuildConfig(), progress=False)
    from turbofs.core.image import open_layout_image

    img = open_layout_image(tmp_path / "out")
    assert img.index.readlink(img.index.resolve("up")) == b"../../../../etc"
    assert img.read(img.index.resolve("etc/passwd")) == b"inside"


def test_layer_size_limit_stops_a_bomb_early(tmp_path: Path) -> None:
    entries = [TarEntry("zeros", size=200 * 1024**2, content_gen=lambda off, n: bytes(n))]
    layout = _layout(tmp_path, [entries])
    _expect_failure(layout, tmp_path / "out", LimitExceeded, "more than 10485760 uncompressed bytes", max_layer_size=10 * 1024**2)


def test_image_size_and_entry_limits(tmp_path: Path) -> None:
    layers = [[TarEntry(f"f{i}", data=b"x" * 1000) for i in range(50)], [TarEntry("g", data=b"y" * 5000)]]
    layout = _layout(tmp_path, layers)
    _expect_failure(layout, tmp_path / "out", LimitExceeded, "limit|more than", max_image_size=60_000)
    _expect_failure(layout, tmp_path / "out", LimitExceeded, "more than 20 entries", max_entries=20)


def test_cli_reports_errors(tmp_path: Path) -> None:
    layout = _layout(tmp_path, [[TarEntry("a", data=b"x"), TarEntry("b", "hardlink", linkname="missing")]])
    proc = subprocess.run([sys.executable, "-m", "turbofs.cli", "build", f"oci:{layout}", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("turbofs: error: layer sha256:") and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    bad = subprocess.run([sys.executable, "-m", "turbofs.cli", "build", str(layout), "-o", str(tmp_path / "o2"),
                          "--chunk-size", "3000"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "power of two" in bad.stderr


def test_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(SourceError) as _:
        build(f"oci:{layout}", out, BuildConfig(), progress=False)
    assert (out / "keep").read_text() == "mine"
    build(f"oci:{layout}", out, BuildConfig(), force=True, progress=False)
    assert not (out / "keep").exists() and (out / "index.json").exists()
