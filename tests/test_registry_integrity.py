"""Registry integrity (issue 16, defect 8): a blob whose stored bytes no longer match its
digest is found (full-blob GET, manifest GET, an upload of the same blob, ``turbofs scrub``),
moved to ``quarantine/`` (never served again: HEAD/GET 404), and repaired by the next upload
of the right bytes, end to end with a real ``turbofs serve``, ``turbofs push`` and skopeo.

Each test here fails on the registry before the fix: the corrupt bytes were served with a
200, an upload of the right bytes answered 201 and kept the bad file, and no scrub existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from index_builder.builder import build
from tests.ocifixtures import TarEntry, pseudo_random, write_oci_layout
from tests.registry_fixtures import TurbofsRegistry, skopeo_copy
from turbofs.core.config import BuildConfig
from turbofs.core.image import open_layout_image
from turbofs.core.oci import OCI_MANIFEST

CS = 64 * 1024
CFG = BuildConfig(chunk_size=CS, blob_min=64 * 1024, blob_avg=128 * 1024, blob_max=512 * 1024)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored(reg: TurbofsRegistry, digest: str) -> Path:
    return reg.storage / "blobs" / "sha256" / digest.split(":", 1)[1]


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte in place (same file, same size), as a failing disk would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def quarantined(reg: TurbofsRegistry) -> list[Path]:
    return sorted((reg.storage / "quarantine").rglob("*.*"))


def turbofs_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turbofs.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def upload(c: httpx.Client, repo: str, data: bytes) -> httpx.Response:
    return c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)}, content=data)


def test_full_get_of_a_corrupt_blob_is_cut_and_the_blob_quarantined(turbofs_registry: TurbofsRegistry) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = sha256(data)
    with httpx.Client(base_url=turbofs_registry.url, timeout=30) as c:
        assert upload(c, "integ/get", data).status_code == 201
        flip_byte(stored(turbofs_registry, digest), len(data) // 2)
        # Range reads are not checked here (the node checks every chunk); the full read is:
        # the body is cut short, never complete with wrong bytes
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(f"/v2/integ/get/blobs/{digest}")
        for method in ("HEAD", "GET"):
            r = c.request(method, f"/v2/integ/get/blobs/{digest}")
            assert r.status_code == 404, method
        assert c.get(f"/v2/integ/get/blobs/{digest}").json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert len(quarantined(turbofs_registry)) == 1
        assert "does not match its digest" in turbofs_registry.log()
        # the next upload of the right bytes repairs it; the repository link was kept
        assert upload(c, "integ/get", data).status_code == 201
        assert c.get(f"/v2/integ/get/blobs/{digest}").content == data
        r = c.get(f"/v2/integ/get/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]


@pytest.mark.parametrize("how", ["monolithic", "chunked"])
def test_an_upload_of_the_right_bytes_repairs_a_corrupt_blob(turbofs_registry: TurbofsRegistry, how: str) -> None:
    data = os.urandom(200_000)
    digest = sha256(data)
    with httpx.Client(base_url=turbofs_registry.url, timeout=30) as c:
        assert upload(c, "integ/up", data).status_code == 201
        flip_byte(stored(turbofs_registry, digest), 7)
        # the registry does not know yet; a client that uploads anyway repairs it
        if how == "monolithic":
            assert upload(c, "integ/up", data).status_code == 201
        else:
            location = c.post("/v2/integ/up2/blobs/uploads/").headers["Location"]
            assert c.patch(location, content=data, headers={"Content-Range": f"0-{len(data) - 1}"}).status_code == 202
            assert c.put(location, params={"digest": digest}).status_code == 201
        assert stored(turbofs_registry, digest).read_bytes() == data
        assert c.get(f"/v2/integ/up/blobs/{digest}").content == data
        assert len(quarantined(turbofs_registry)) == 1


def test_a_corrupt_manifest_is_not_served_and_a_put_repairs_it(turbofs_registry: TurbofsRegistry) -> None:
    with httpx.Client(base_url=turbofs_registry.url, timeout=30) as c:
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        layer = os.urandom(1000)
        for blob in (config, layer):
            assert upload(c, "integ/man", blob).status_code == 201
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer), "size": len(layer)}],
        }).encode()  # fmt: skip
        url = "/v2/integ/man/manifests/v1"
        headers = {"Content-Type": OCI_MANIFEST}
        assert c.put(url, content=manifest, headers=headers).status_code == 201
        flip_byte(stored(turbofs_registry, sha256(manifest)), 30)
        r = c.get(url)
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert c.head(url).status_code == 404
        assert c.put(url, content=manifest, headers=headers).status_code == 201
        r = c.get(url)
        assert r.status_code == 200 and r.content == manifest


def test_scrub_quarantines_and_the_next_push_repairs(turbofs_registry: TurbofsRegistry, tmp_path: Path) -> None:
    layers = [[TarEntry("data", "dir"), *[TarEntry(f"data/f{i}.bin", data=pseudo_random(i, 3 * CS + 11)) for i in range(10)]]]
    src = write_oci_layout(tmp_path / "src", layers).layout
    turbo = tmp_path / "turbo"
    build(f"oci:{src}:latest", turbo, CFG, progress=False)
    img = open_layout_image(turbo)
    chunk_blobs = [d.digest for d in img.manifest.blobs]
    assert len(chunk_blobs) >= 3
    target = f"{turbofs_registry.host_port}/integ/app:v1"
    first = turbofs_cli("push", f"oci:{turbo}", target)
    assert first.returncode == 0, first.stderr
    storage = str(turbofs_registry.storage)

    victims = [chunk_blobs[1], img.manifest.index.digest]
    for v in victims:
        flip_byte(stored(turbofs_registry, v), 100)
    # the registry still claims the blob: a push sends nothing, nothing is repaired
    again = turbofs_cli("push", f"oci:{turbo}", target)
    assert again.returncode == 0 and f"sent 0 of {len(chunk_blobs) + 2} blobs" in again.stdout, again.stdout

    dry = turbofs_cli("scrub", "--storage", storage, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert all(f"BAD {v} (integ/app): left in place" in dry.stdout for v in victims), dry.stdout
    assert all(stored(turbofs_registry, v).exists() for v in victims)

    scrub = turbofs_cli("scrub", "--storage", storage)
    assert scrub.returncode == 1, scrub.stdout + scrub.stderr
    assert f"{len(chunk_blobs) + 3} blobs" in scrub.stdout and "2 bad" in scrub.stdout, scrub.stdout
    with httpx.Client(base_url=turbofs_registry.url, timeout=30) as c:
        for v in victims:
            assert not stored(turbofs_registry, v).exists()
            r = c.head(f"/v2/integ/app/blobs/{v}")
            assert r.status_code == 404, v
        assert len(quarantined(turbofs_registry)) == 2
        # the image is whole again after one more push, which now sends exactly those blobs
        repair = turbofs_cli("push", f"oci:{turbo}", target)
        assert repair.returncode == 0 and f"sent 2 of {len(chunk_blobs) + 2} blobs" in repair.stdout, repair.stdout
        for v in victims:
            assert c.head(f"/v2/integ/app/blobs/{v}").status_code == 200
    clean = turbofs_cli("scrub", "--storage", storage)
    assert clean.returncode == 0 and "0 bad" in clean.stdout, clean.stdout
    # a real pull (skopeo checks every digest) gives back the pushed image, blob for blob
    back = tmp_path / "back"
    skopeo_copy(f"docker://{target}", f"oci:{back}:v1")
    for d in [*chunk_blobs, img.manifest.index.digest]:
        assert (back / "blobs" / "sha256" / d.split(":", 1)[1]).read_bytes() == (turbo / "blobs" / "sha256" / d.split(":", 1)[1]).read_bytes()


def test_scrub_refuses_a_folder_that_is_no_storage(tmp_path: Path) -> None:
    r = turbofs_cli("scrub", "--storage", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "not a registry storage folder" in r.stderr
