"""The turbo extensions (batch, missing, convert), the registry client, and ``turbofs push``,
against a real turbofs registry and Debian's docker-registry started by the fixtures."""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest

from index_builder.builder import build
from tests.imagecheck import snapshot_index
from tests.ocifixtures import TarEntry, diff_snapshots, pseudo_random, write_oci_layout
from tests.registry_fixtures import DistributionRegistry, TurbofsRegistry, skopeo_copy
from turbofs.core import oci
from turbofs.core.codec import decode_frame
from turbofs.core.config import BuildConfig
from turbofs.core.errors import FormatError, NotFound
from turbofs.core.image import load_index, open_layout_image, parse_manifest
from turbofs.core.registry import RegistryClient, RegistryError, retry_after
from turbofs.push import push

CS = 64 * 1024
# small blobs, so that a few-MB test image spreads over many of them, as a GB image does
T = TypeVar("T")
CFG: dict[str, Any] = {"chunk_size": CS, "blob_min": 64 * 1024, "blob_avg": 128 * 1024, "blob_max": 512 * 1024}




def _layers(variant: int = 0) -> list[list[TarEntry]]:
    small = [TarEntry(f"app/lib/m{i:03d}.py", data=pseudo_random(i, 500 + 97 * i)) for i in range(120)]
    if variant:
        small[60] = TarEntry("app/lib/m060.py", data=b"# changed\n" + pseudo_random(9999, 3000))
    return [
        [TarEntry("app", "dir"), TarEntry("app/lib", "dir"), *small],
        [TarEntry("models", "dir"), *[TarEntry(f"models/w{i}.bin", data=pseudo_random(1000 + i, 5 * CS + 17)) for i in range(12)]],
    ]


def _source(tmp_path: Path, variant: int = 0, name: str = "src") -> Path:
    return write_oci_layout(tmp_path / name, _layers(variant), config={"Entrypoint": ["/app/run"]}).layout


def _turbo(tmp_path: Path, variant: int = 0) -> Path:
    out = tmp_path / f"turbo{variant}"
    build(f"oci:{_source(tmp_path, variant, f'src{variant}')}:latest", out, BuildConfig(**CFG), progress=False)
    return out


def _client_run(registry: str, fn: Callable[[RegistryClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with RegistryClient(registry) as client:
            return await fn(client)

    return anyio.run(main, backend="trio")


def test_info_and_missing(turbofs_registry: TurbofsRegistry, tmp_path: Path) -> None:
    info = httpx.get(f"{turbofs_registry.url}/v2/_turbofs/info").json()
    assert set(info["extensions"]) == {"batch", "missing", "convert"}
    img = open_layout_image(_turbo(tmp_path))
    skopeo_copy(f"oci:{img.root}:latest", f"docker://{turbofs_registry.host_port}/a/turbo:v1", "--preserve-digests")
    digests = [d.digest for d in img.manifest.blobs]
    unknown = "sha256:" + "ab" * 32
    r = httpx.post(f"{turbofs_registry.url}/v2/a/turbo/_turbofs/missing", json={"digests": [*digests, unknown, unknown]})
    assert r.status_code == 200 and r.json() == {"missing": [unknown]}
    # a blob stored for another repository needs no upload: the registry links it
    r = httpx.post(f"{turbofs_registry.url}/v2/b/other/_turbofs/missing", json={"digests": [*digests[:2], unknown]})
    assert r.json() == {"missing": [unknown]}
    assert httpx.head(f"{turbofs_registry.url}/v2/b/other/blobs/{digests[0]}").status_code == 200
    bad = httpx.post(f"{turbofs_registry.url}/v2/a/turbo/_turbofs/missing", json={"digests": ["sha256:nothex"]})
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "DIGEST_INVALID"


def test_deeply_nested_bodies_are_a_400(turbofs_registry: TurbofsRegistry) -> None:
    """Issue 16, defect 9: deeply nested JSON answered 500 (RecursionError) on every endpoint."""
    deep = b"[" * 30_000 + b"]" * 30_000
    for endpoint, code in (("batch", "BATCH_INVALID"), ("missing", "DIGEST_INVALID"), ("convert", "UNSUPPORTED")):
        for body in (deep, b'{"ranges": ' + deep + b"}", b'{"digests": [' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"]}"):
            r = httpx.post(f"{turbofs_registry.url}/v2/deep/repo/_turbofs/{endpoint}", content=body)
            assert r.status_code == 400, (endpoint, r.text)
            assert r.json()["errors"][0]["code"] == code and "nested" in r.json()["errors"][0]["message"]
    assert "RecursionError" not in turbofs_registry.log()


def test_numbers_past_the_limits_are_a_400(turbofs_registry: TurbofsRegistry) -> None:
    """Issue 16: a 5000-digit number in an extension body answered 500 (ValueError from
    json.loads, past Python's int digit limit). Such numbers, NaN, Infinity, numbers that
    overflow to infinity, booleans as numbers and bodies that are not UTF-8 are a 400, as is a
    convert reference that is neither a tag nor a digest (once taken, the job failing later)."""
    d = "sha256:" + "c" * 64

    def batch(offset: str, length: str = "1") -> bytes:
        return f'{{"ranges": [{{"digest": "{d}", "offset": {offset}, "length": {length}}}]}}'.encode()

    cases = [
        ("batch", "BATCH_INVALID", batch("9" * 5000), "limit of 20"),
        ("batch", "BATCH_INVALID", batch("0", "-" + "1" * 5000), "limit of 20"),
        ("batch", "BATCH_INVALID", batch("NaN"), "NaN"),
        ("batch", "BATCH_INVALID", batch("0", "Infinity"), "Infinity"),
        ("batch", "BATCH_INVALID", batch("0", "1e999"), "out of range"),
        ("batch", "BATCH_INVALID", batch("true"), "must be integers"),
        ("batch", "BATCH_INVALID", json.dumps({"ranges": []}).encode("utf-16"), "not valid JSON"),
        ("missing", "DIGEST_INVALID", b'{"digests": [], "n": ' + b"9" * 5000 + b"}", "limit of 20"),
        ("convert", "UNSUPPORTED", b'{"reference": "v1", "n": ' + b"9" * 5000 + b"}", "limit of 20"),
        ("convert", "UNSUPPORTED", b'{"reference": "../v1"}', "neither a tag nor a digest"),
        ("convert", "UNSUPPORTED", b'{"reference": "sha256:12"}', "neither a tag nor a digest"),
    ]
    for endpoint, code, body, message in cases:
        r = httpx.post(f"{turbofs_registry.url}/v2/num/repo/_turbofs/{endpoint}", content=body)
        assert r.status_code == 400, (endpoint, message, r.text)
        error = r.json()["errors"][0]
        assert error["code"] == code and message in error["message"], (endpoint, error)
    # a 20-digit offset is a number: past the end of the blob (here: not in the repository)
    r = httpx.post(f"{turbofs_registry.url}/v2/num/repo/_turbofs/batch", content=batch("9" * 20))
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert "Exceeds the limit" not in turbofs_registry.log()


def test_a_large_request_body_is_read_whole(turbofs_registry: TurbofsRegistry) -> None:
    # 30,000 digests: a 2 MB body that arrives in many TCP segments (a big image's push asks
    # about thousands of blobs; the server once parsed only the part that had arrived)
    digests = [f"sha256:{i:064x}" for i in range(30_000)]

    def slowly() -> Iterator[bytes]:
        body = json.dumps({"digests": digests}).encode()
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = httpx.post(f"{turbofs_registry.url}/v2/big/push/_turbofs/missing", content=slowly(),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json() == {"missing": digests}
    # past the limit (8 MiB): refused as too large, whether or not a length was sent
    huge = b'{"digests": ["' + b"x" * (9 << 20) + b'"]}'
    r = httpx.post(f"{turbofs_registry.url}/v2/big/push/_turbofs/missing", content=iter([huge]))
    assert r.status_code == 413


def test_batch_fetch_serves_exact_chunks(turbofs_registry_factory: Callable[..., TurbofsRegistry], tmp_path: Path) -> None:
    reg = turbofs_registry_factory(max_batch_ranges=64)
    img = open_layout_image(_turbo(tmp_path))
    skopeo_copy(f"oci:{img.root}:latest", f"docker://{reg.host_port}/batch/img:v1", "--preserve-digests")
    chunks = list(img.index.chunks())
    ranges = [{"digest": img.index.blob(c.blob).oci_digest, "offset": c.offset, "length": c.clen} for c in chunks[:50]]
    r = httpx.post(f"{reg.url}/v2/batch/img/_turbofs/batch", json={"ranges": ranges})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/vnd.turbofs.batch.v1")
    body = r.content
    assert len(body) == sum(c.clen for c in chunks[:50])
    pos = 0
    for c in chunks[:50]:
        assert decode_frame(c, body[pos : pos + c.clen]).data  # verified against the chunk digest
        pos += c.clen
    url = f"{reg.url}/v2/batch/img/_turbofs/batch"
    first = ranges[0]
    past = dict(first, offset=img.index.blob(chunks[0].blob).size - 1, length=10)
    cases = [
        ({"ranges": [dict(first, digest="sha256:" + "cd" * 32)]}, 404, "BLOB_UNKNOWN"),
        ({"ranges": [past]}, 416, "RANGE_INVALID"),
        ({"ranges": [dict(first, length=0)]}, 400, "BATCH_INVALID"),
        # issue 16, defect 10: JSON true is no integer (bool is an int subclass in Python)
        ({"ranges": [dict(first, offset=True)]}, 400, "BATCH_INVALID"),
        ({"ranges": [dict(first, length=True)]}, 400, "BATCH_INVALID"),
        ({"ranges": [dict(first, offset=0.0)]}, 400, "BATCH_INVALID"),
        ({"ranges": [dict(first, offset="0")]}, 400, "BATCH_INVALID"),
        ({"ranges": [first] * 65}, 400, "BATCH_INVALID"),
        ({"nothing": 1}, 400, "BATCH_INVALID"),
    ]
    for payload, status, code in cases:
        r = httpx.post(url, json=payload)
        assert (r.status_code, r.json()["errors"][0]["code"]) == (status, code), payload
    # a blob of another repository is not served through this one
    skopeo_copy(f"oci:{img.root}:latest", f"docker://{reg.host_port}/batch/second:v1", "--preserve-digests")
    assert httpx.post(f"{reg.url}/v2/batch/nothere/_turbofs/batch", json={"ranges": ranges[:1]}).status_code == 404


@pytest.mark.parametrize("kind", ["turbofs", "distribution"])
def test_client_reads_a_turbo_image_from_any_registry(
    kind: str, turbofs_registry: TurbofsRegistry, distribution_registry: DistributionRegistry, tmp_path: Path
) -> None:
    """The node side needs only /v2/ manifests and blob Range requests: a turbo image copied
    into Debian's docker-registry with skopeo reads back whole, chunk by chunk."""
    reg = turbofs_registry if kind == "turbofs" else distribution_registry
    img = open_layout_image(_turbo(tmp_path))
    skopeo_copy(f"oci:{img.root}:latest", f"docker://{reg.host_port}/any/turbo:v1", "--preserve-digests")

    async def fetch_all(client: RegistryClient) -> tuple[bool, dict[bytes, bytes]]:
        raw, _mt, digest = await client.get_manifest("any/turbo", "v1")
        manifest = parse_manifest(raw, digest)
        index = load_index(manifest, await client.get_blob("any/turbo", manifest.index.digest))
        chunks = list(index.chunks())
        frames = await client.get_ranges(
            "any/turbo", [(index.blob(c.blob).oci_digest, c.offset, c.clen) for c in chunks]
        )
        plain = {c.id: decode_frame(c, f).data for c, f in zip(chunks, frames, strict=True)}
        files = {}
        for path, ino in index.walk():
            if index.inode(ino).is_reg:
                pieces = index.map_range(ino, 0, index.inode(ino).size)
                files[path] = b"".join(
                    bytes(p.length) if p.chunk is None else plain[p.chunk.id][p.chunk_offset : p.chunk_offset + p.length]
                    for p in pieces
                )
        return await client.has_extension("batch"), files

    batched, files = _client_run(reg.host_port, fetch_all)
    assert batched == (kind == "turbofs")
    for path, ino in img.index.walk():
        if img.index.inode(ino).is_reg:
            assert files[path] == img.read(ino), path


def test_push_builds_then_sends_only_what_changed(turbofs_registry: TurbofsRegistry, tmp_path: Path) -> None:
    target = f"{turbofs_registry.host_port}/team/app"
    first = push(f"oci:{_source(tmp_path)}:latest", f"{target}:v1", build_config=BuildConfig(**CFG), progress=False)
    assert first.built and first.blobs_sent == first.blobs_total and first.bytes_sent == first.bytes_total
    # the pushed image is the one a local build makes, byte for byte
    local = open_layout_image(_turbo(tmp_path))
    assert first.manifest_digest == local.manifest.digest
    skopeo_copy(f"docker://{target}:v1", f"oci:{tmp_path / 'back'}:v1")
    assert diff_snapshots(snapshot_index(local), snapshot_index(open_layout_image(tmp_path / "back", "v1"))) == []
    # one changed file: the index, the config and one or two chunk blobs travel, nothing else
    second = push(f"oci:{_turbo(tmp_path, 1)}", f"{target}:v2", progress=False)
    assert not second.built
    assert second.blobs_total > 20
    # config + index, and the chunk blobs around the change (content-defined cuts resync
    # within a pack or two and a blob or two)
    assert 2 <= second.blobs_sent <= 6
    assert second.bytes_sent < 0.1 * second.bytes_total
    again = push(f"oci:{tmp_path / 'turbo1'}", f"{target}:v3", progress=False)
    assert again.blobs_sent == 0 and again.bytes_sent == 0


def test_push_cli_to_a_standard_registry(distribution_registry: DistributionRegistry, tmp_path: Path) -> None:
    turbo = _turbo(tmp_path)
    target = f"{distribution_registry.host_port}/std/app:v1"
    proc = subprocess.run([sys.executable, "-m", "turbofs.cli", "push", f"oci:{turbo}", target, "--parallel", "3"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "sent" in proc.stdout and "of" in proc.stdout
    skopeo_copy(f"docker://{target}", f"oci:{tmp_path / 'back'}:v1")
    assert open_layout_image(tmp_path / "back", "v1").manifest.digest == open_layout_image(turbo).manifest.digest
    bad = subprocess.run([sys.executable, "-m", "turbofs.cli", "push", f"oci:{turbo}", "127.0.0.1:1/x:y"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "unreachable" in bad.stderr


def _wait_job(url: str, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, object] = httpx.get(url).json()
        if job["state"] in ("done", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_server_side_conversion(turbofs_registry_factory: Callable[..., TurbofsRegistry], tmp_path: Path) -> None:
    reg = turbofs_registry_factory(auto_convert=["auto/*"])
    src = _source(tmp_path)
    skopeo_copy(f"oci:{src}:latest", f"docker://{reg.host_port}/plain/app:v1", "--preserve-digests")
    r = httpx.post(f"{reg.url}/v2/plain/app/_turbofs/convert", json={"reference": "v1"})
    assert r.status_code == 202
    job = _wait_job(reg.url + r.headers["Location"])
    assert job["state"] == "done", job.get("error")
    # the registry's conversion equals a local build of the same image
    local = build(f"oci:{src}:latest", tmp_path / "local", BuildConfig(tag="v1-turbo"), progress=False)
    assert job["manifest"] == local.manifest_digest
    skopeo_copy(f"docker://{reg.host_port}/plain/app:v1-turbo", f"oci:{tmp_path / 'conv'}:x")
    assert open_layout_image(tmp_path / "conv", "x").index.n_inodes == open_layout_image(tmp_path / "local").index.n_inodes
    # errors are visible through the API
    r = httpx.post(f"{reg.url}/v2/plain/app/_turbofs/convert", json={"reference": "nope"})
    job = _wait_job(reg.url + r.headers["Location"])
    assert job["state"] == "failed" and "nope" in str(job["error"])
    r = httpx.post(f"{reg.url}/v2/plain/app/_turbofs/convert", json={"reference": "v1-turbo", "tag": "again"})
    job = _wait_job(reg.url + r.headers["Location"])
    assert job["state"] == "failed" and "already a turbo image" in str(job["error"])
    assert httpx.post(f"{reg.url}/v2/plain/app/_turbofs/convert", json={"ref": 1}).status_code == 400
    # automatic conversion for chosen repositories
    skopeo_copy(f"oci:{src}:latest", f"docker://{reg.host_port}/auto/app:v7", "--preserve-digests")
    deadline = time.monotonic() + 60
    while "v7-turbo" not in httpx.get(f"{reg.url}/v2/auto/app/tags/list").json().get("tags", []):
        assert time.monotonic() < deadline, "automatic conversion did not happen"
        time.sleep(0.2)
    skopeo_copy(f"oci:{src}:latest", f"docker://{reg.host_port}/manual/app:v7", "--preserve-digests")
    time.sleep(1)
    assert httpx.get(f"{reg.url}/v2/manual/app/tags/list").json()["tags"] == ["v7"]


# -- the client's retry helper and resolver, against an in-process transport ----------------


def _mock_client(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> RegistryClient:
    return RegistryClient("registry.test", scheme="http", transport=httpx.MockTransport(handler), **options)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_client_waits_out_retry_after(backend: str) -> None:
    """A 429 or 503 with ``Retry-After`` is retried no sooner than it asks, under trio and asyncio."""
    seen: list[float] = []
    when = email.utils.format_datetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2), usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "1"})
        if len(seen) == 2:
            return httpx.Response(503, headers={"Retry-After": when})
        return httpx.Response(200, json={"tags": ["v1"]})

    async def main() -> list[str]:
        async with _mock_client(handler, backoff=0.01) as client:
            return await client.tags("a/b")

    assert anyio.run(main, backend=backend) == ["v1"]
    assert len(seen) == 3 and seen[1] - seen[0] >= 0.95 and seen[2] - seen[0] >= 1.0


def test_client_retry_limits() -> None:
    """A Retry-After past ``retry_after_max`` ends the retries; answers not worth repeating
    are never repeated; others are, ``retries`` times."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if "slow" in request.url.path:
            return httpx.Response(503, headers={"Retry-After": "3600"})
        if "gone" in request.url.path:
            return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN", "message": "no"}]})
        return httpx.Response(500)

    async def main() -> None:
        async with _mock_client(handler, retries=2, backoff=0.001, retry_after_max=10) as client:
            for repo, status in (("slow/x", 503), ("gone/x", 404), ("broken/x", 500)):
                with pytest.raises(RegistryError) as info:
                    await client.tags(repo)
                assert info.value.status == status

    anyio.run(main, backend="trio")
    assert calls == ["/v2/slow/x/tags/list", "/v2/gone/x/tags/list"] + ["/v2/broken/x/tags/list"] * 3
    assert retry_after(httpx.Response(500, headers={"Retry-After": "5"})) is None
    assert retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None


def test_client_resolves_index_manifest_and_config() -> None:
    """An image index is followed to the platform's manifest; its config is checked (digest,
    size) and parsed, diff IDs included."""
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
        "layers": [],
    }).encode()
    other = manifest.replace(b'"layers"', b'"annotations": {}, "layers"')
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": oci.sha256_digest(other), "size": len(other),
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": oci.sha256_digest(manifest), "size": len(manifest),
         "platform": {"os": "linux", "architecture": "riscv64"}},
    ]}).encode()
    docs = {oci.sha256_digest(d): d for d in (manifest, other)}
    blobs = {oci.sha256_digest(config): config}

    def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[-1]
        if "/manifests/" in request.url.path:
            body = index if name == "v1" else docs[name]
            kind = oci.OCI_INDEX if name == "v1" else oci.OCI_MANIFEST
            return httpx.Response(200, content=body, headers={"Content-Type": kind})
        return httpx.Response(200, content=blobs[name])

    async def main() -> None:
        async with _mock_client(handler) as client:
            found = await client.get_image_manifest("a/b", "v1", "linux/riscv64")
            assert found.digest == oci.sha256_digest(manifest) and found.media_type == oci.OCI_MANIFEST
            got = await client.get_config("a/b", found)
            assert got.raw == config and got.diff_ids == ("sha256:" + "1" * 64,)
            with pytest.raises(NotFound, match="no manifest for platform"):
                await client.get_image_manifest("a/b", "v1", "windows/amd64")
            wrong_size = {**found.obj["config"], "size": len(config) + 1}
            with pytest.raises(FormatError, match="descriptor says"):
                await client.get_config("a/b", dataclasses.replace(found, obj={**found.obj, "config": wrong_size}))

    anyio.run(main, backend="trio")
