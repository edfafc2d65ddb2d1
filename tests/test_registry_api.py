"""The turbofs registry over HTTP: the OCI Distribution API, its error cases, and real clients.

Most tests talk to one server per module (``shared_turbofs_registry``, each test with its own
repository names); tests that need their own settings, a restart or a clean storage folder
start their own. skopeo proves interoperability: images go in and come back byte-identical,
and travel between turbofs and CNCF distribution.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from index_builder.builder import build
from server.app import parse_v2_path, start
from server.errors import DigestInvalid, ManifestInvalid, NameInvalid
from server.storage import Storage, check_name
from tests.ocifixtures import TarEntry, write_oci_layout
from tests.registry_fixtures import (
    DistributionRegistry,
    TurbofsRegistry,
    skopeo,
    skopeo_copy,
)
from turbofs.core.config import BuildConfig, RegistryConfig
from turbofs.core.oci import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)

Factory = Callable[..., TurbofsRegistry]
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def codes(resp: httpx.Response) -> list[str]:
    return [e["code"] for e in resp.json()["errors"]]


@pytest.fixture
def client(shared_turbofs_registry: TurbofsRegistry) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_turbofs_registry.url, timeout=30) as c:
        yield c


@pytest.fixture
def storage(shared_turbofs_registry: TurbofsRegistry) -> Path:
    return shared_turbofs_registry.storage


def push_blob(c: httpx.Client, repo: str, data: bytes) -> str:
    digest = sha256(data)
    r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert r.status_code == 201, r.text
    return digest


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


def image_manifest(
    c: httpx.Client, repo: str, layers: list[bytes], *, docker: bool = False, **extra: Any
) -> bytes:
    """Push a config and ``layers``; return the bytes of a manifest referencing them."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": len(layers)}).encode()
    for blob in [config, *layers]:
        push_blob(c, repo, blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": [descriptor(LAYER_TYPE, blob) for blob in layers],
        **extra,
    }
    return json.dumps(manifest, indent=1).encode()


def put_manifest(
    c: httpx.Client, repo: str, ref: str, data: bytes, media_type: str = OCI_MANIFEST
) -> httpx.Response:
    return c.put(f"/v2/{repo}/manifests/{ref}", content=data, headers={"Content-Type": media_type})


def raw_request(host_port: str, request: bytes) -> bytes:
    host, port = host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def stored_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- basics --------------------------------------------------------------------------------


def test_version_check(client: httpx.Client) -> None:
    r = client.get("/v2/")
    assert r.status_code == 200
    assert r.json() == {}
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert client.head("/v2/").status_code == 200
    r = client.get("/v2/nothing/here/at/all")
    assert r.status_code == 404 and codes(r) == ["UNSUPPORTED"]


def test_parse_v2_path() -> None:
    assert parse_v2_path("/v2/") is not None
    route = parse_v2_path("/v2/a/b/c/manifests/latest")
    assert route is not None and (route.kind, route.name, route.ref) == ("manifest", "a/b/c", "latest")
    route = parse_v2_path("/v2/a/blobs/uploads/")
    assert route is not None and (route.kind, route.name, route.ref) == ("upload", "a", "")
    route = parse_v2_path("/v2/x/blobs/blobs/sha256:00")
    assert route is not None and (route.kind, route.name) == ("blob", "x/blobs")
    route = parse_v2_path("/v2/x/tags/list")
    assert route is not None and route.kind == "tags"
    assert parse_v2_path("/v2/x/nothing") is None


def test_monolithic_upload_and_blob_get(client: httpx.Client) -> None:
    data = os.urandom(100_000)
    digest = sha256(data)
    r = client.post("/v2/mono/one/blobs/uploads/", params={"digest": digest}, content=data)
    assert r.status_code == 201
    assert r.headers["Location"] == f"/v2/mono/one/blobs/{digest}"
    assert r.headers["Docker-Content-Digest"] == digest
    r = client.head(f"/v2/mono/one/blobs/{digest}")
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(data)
    assert r.headers["Docker-Content-Digest"] == digest
    r = client.get(f"/v2/mono/one/blobs/{digest}")
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Type"] == "application/octet-stream"
    # blobs belong to repositories: another repository does not see it
    r = client.get(f"/v2/mono/other/blobs/{digest}")
    assert r.status_code == 404 and codes(r) == ["BLOB_UNKNOWN"]
    r = client.head(f"/v2/mono/other/blobs/{digest}")
    assert r.status_code == 404
    r = client.get("/v2/mono/one/blobs/sha256:1234")
    assert r.status_code == 400 and codes(r) == ["DIGEST_INVALID"]
    # an empty blob
    assert push_blob(client, "mono/one", b"") == sha256(b"")
    assert client.get(f"/v2/mono/one/blobs/{sha256(b'')}").content == b""


def test_chunked_upload(client: httpx.Client) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = sha256(data)
    r = client.post("/v2/chunked/blobs/uploads/")
    assert r.status_code == 202
    location = r.headers["Location"]
    uuid = r.headers["Docker-Upload-UUID"]
    assert location == f"/v2/chunked/blobs/uploads/{uuid}"
    assert r.headers["Range"] == "0-0"
    first, second, last = data[:1_000_000], data[1_000_000:2_500_000], data[2_500_000:]
    r = client.patch(
        location,
        content=first,
        headers={"Content-Range": f"0-{len(first) - 1}", "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(first) - 1}"
    location = r.headers["Location"]
    r = client.get(location)
    assert r.status_code == 204
    assert r.headers["Range"] == f"0-{len(first) - 1}"
    assert r.headers["Docker-Upload-UUID"] == uuid
    # a streamed chunk (no Content-Range, chunked transfer encoding), as docker clients send
    r = client.patch(location, content=iter([second[:700_000], second[700_000:]]))
    assert r.status_code == 202
    assert r.headers["Range"] == f"0-{len(first) + len(second) - 1}"
    assert client.head(f"/v2/chunked/blobs/{digest}").status_code == 404
    # the last chunk in the closing PUT
    r = client.put(location, params={"digest": digest}, content=last,
                   headers={"Content-Range": f"{2_500_000}-{len(data) - 1}"})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/v2/chunked/blobs/{digest}"
    assert client.get(f"/v2/chunked/blobs/{digest}").content == data
    # the session is gone
    r = client.get(location)
    assert r.status_code == 404 and codes(r) == ["BLOB_UPLOAD_UNKNOWN"]


def test_post_then_put_and_cancel(client: httpx.Client) -> None:
    data = b"post then put"
    location = client.post("/v2/ppp/blobs/uploads/").headers["Location"]
    r = client.put(location, params={"digest": sha256(data)}, content=data)
    assert r.status_code == 201
    # PUT without a digest
    location = client.post("/v2/ppp/blobs/uploads/").headers["Location"]
    r = client.put(location, content=data)
    assert r.status_code == 400 and codes(r) == ["DIGEST_INVALID"]
    # sessions belong to their repository
    r = client.get(location.replace("/v2/ppp/", "/v2/other/"))
    assert r.status_code == 404 and codes(r) == ["BLOB_UPLOAD_UNKNOWN"]
    # cancel
    r = client.delete(location)
    assert r.status_code == 204
    r = client.delete(location)
    assert r.status_code == 404 and codes(r) == ["BLOB_UPLOAD_UNKNOWN"]
    r = client.patch("/v2/ppp/blobs/uploads/not-a-uuid", content=b"x")
    assert r.status_code == 404 and codes(r) == ["BLOB_UPLOAD_UNKNOWN"]


def test_patch_out_of_order_is_416(client: httpx.Client) -> None:
    location = client.post("/v2/range416/blobs/uploads/").headers["Location"]
    r = client.patch(location, content=b"abcde", headers={"Content-Range": "5-9"})
    assert r.status_code == 416 and codes(r) == ["BLOB_UPLOAD_INVALID"]
    assert r.headers["Range"] == "0-0"
    assert r.headers["Location"] == location
    r = client.patch(location, content=b"abcde", headers={"Content-Range": "0-4"})
    assert r.status_code == 202 and r.headers["Range"] == "0-4"
    # overlapping, a gap, a range that disagrees with the body, garbage
    for value in ("3-7", "6-10", "5-20", "bogus", "9-5"):
        r = client.patch(location, content=b"fghij", headers={"Content-Range": value})
        assert r.status_code == 416, value
        assert codes(r) == ["BLOB_UPLOAD_INVALID"]
    r = client.get(location)
    assert r.headers["Range"] == "0-4"
    r = client.patch(location, content=b"fghij", headers={"Content-Range": "5-9"})
    assert r.status_code == 202 and r.headers["Range"] == "0-9"
    r = client.put(location, params={"digest": sha256(b"abcdefghij")})
    assert r.status_code == 201


def test_chunk_that_disagrees_with_its_content_range_is_refused(client: httpx.Client) -> None:
    """Issue 16, defect 10: a chunked PATCH (no Content-Length) whose body is not as long as
    its Content-Range says was accepted; every upload 416 carries Location and Range."""
    location = client.post("/v2/range416/chunked/blobs/uploads/").headers["Location"]

    def body(data: bytes) -> Iterator[bytes]:  # a generator: sent with chunked encoding
        yield data[:7]
        yield data[7:]

    for data in (b"x" * 20, b"y" * 5):  # longer, shorter
        r = client.patch(location, content=body(data), headers={"Content-Range": "0-9"})
        assert r.status_code == 416 and codes(r) == ["BLOB_UPLOAD_INVALID"], r.text
        assert r.headers["Location"] == location and r.headers["Range"] == "0-0"
    # nothing of them was kept
    assert client.get(location).headers["Range"] == "0-0"
    r = client.patch(location, content=body(b"abcdefghij"), headers={"Content-Range": "0-9"})
    assert r.status_code == 202 and r.headers["Range"] == "0-9"
    r = client.patch(location, content=body(b"KLMNOPQRS"), headers={"Content-Range": "10-19"})
    assert r.status_code == 416 and r.headers["Location"] == location and r.headers["Range"] == "0-9"
    # a Content-Length mismatch and a malformed Content-Range: 416 with both headers too
    for value in ("10-14", "bogus"):
        r = client.patch(location, content=b"klm", headers={"Content-Range": value})
        assert r.status_code == 416 and r.headers["Location"] == location and r.headers["Range"] == "0-9", value
    r = client.put(location, params={"digest": sha256(b"abcdefghijklm")}, content=body(b"klm"),
                   headers={"Content-Range": "10-12"})
    assert r.status_code == 201, r.text
    assert client.get(f"/v2/range416/chunked/blobs/{sha256(b'abcdefghijklm')}").content == b"abcdefghijklm"


def test_digest_mismatch_keeps_nothing(client: httpx.Client, storage: Path) -> None:
    data = os.urandom(50_000)
    wrong = sha256(b"something else")
    before = stored_files(storage)
    r = client.post("/v2/mismatch/blobs/uploads/", params={"digest": wrong}, content=data)
    assert r.status_code == 400 and codes(r) == ["DIGEST_INVALID"]
    # chunked, then a wrong digest at the end
    location = client.post("/v2/mismatch/blobs/uploads/").headers["Location"]
    assert client.patch(location, content=data).status_code == 202
    r = client.put(location, params={"digest": wrong})
    assert r.status_code == 400 and codes(r) == ["DIGEST_INVALID"]
    assert client.get(location).status_code == 404  # the session and its bytes are gone
    for digest in (wrong, sha256(data)):
        assert client.head(f"/v2/mismatch/blobs/{digest}").status_code == 404
    after = stored_files(storage)
    new = {p for p in after - before if not p.startswith("uploads/")}
    assert not any(sha256(data)[7:] in p or wrong[7:] in p for p in new)
    assert not any(p.startswith("blobs/") for p in new), new
    # malformed and unsupported digests
    for bad in ("sha256:abc", "md5:" + "0" * 32, "nonsense"):
        r = client.post("/v2/mismatch/blobs/uploads/", params={"digest": bad}, content=data)
        assert r.status_code == 400 and codes(r) == ["DIGEST_INVALID"], bad
    # sha512 works
    d512 = "sha512:" + hashlib.sha512(data).hexdigest()
    r = client.post("/v2/mismatch/blobs/uploads/", params={"digest": d512}, content=data)
    assert r.status_code == 201
    assert client.get(f"/v2/mismatch/blobs/{d512}").content == data


@pytest.mark.parametrize(
    "name",
    ["Upper", "a//b", "a..b", "-a", "a-", "a/", "_x", "a/_layers", "a@b", "x" * 256, "a/./b", "%2e%2e/x", "..%2Fx", "a/../../b"],
)
def test_invalid_names_are_refused(shared_turbofs_registry: TurbofsRegistry, name: str) -> None:
    for method, path in (
        ("GET", f"/v2/{name}/tags/list"),
        ("POST", f"/v2/{name}/blobs/uploads/"),
        ("GET", f"/v2/{name}/manifests/latest"),
        ("GET", f"/v2/{name}/blobs/sha256:{'0' * 64}"),
    ):
        raw = raw_request(
            shared_turbofs_registry.host_port,
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        )
        status = raw.split(b"\r\n", 1)[0]
        assert b" 400 " in status, (name, method, status)
        assert b"NAME_INVALID" in raw
    storage = shared_turbofs_registry.storage
    assert not (storage.parent / "b").exists()
    assert not any("Upper" in p or ".." in p for p in stored_files(storage))


def test_name_and_reference_grammar(tmp_path: Path) -> None:
    for good in ("a", "a/b", "library/debian", "a.b_c__d---e/f0", "x" * 255):
        assert check_name(good) == good
    for bad in ("", "../x", "a/../b", "/a", "A", "a b", "a\nb", "x" * 256):
        with pytest.raises(NameInvalid):
            check_name(bad)
    st = Storage(tmp_path / "s")
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    for tag in ("../x", ".hidden", "-x", "a" * 129, "a\n"):
        with pytest.raises(ManifestInvalid):
            st.put_manifest("repo", tag, manifest, OCI_INDEX)
    with pytest.raises(DigestInvalid):
        st.put_manifest("repo", "sha256:../../x", manifest, OCI_INDEX)
    assert st.put_manifest("repo", "A_b.c-1", manifest, OCI_INDEX) == sha256(manifest)
    assert st.tags("repo") == ["A_b.c-1"]
    assert not (tmp_path / "x").exists()


# -- manifests -----------------------------------------------------------------------------


def test_manifest_put_get_head_delete(client: httpx.Client) -> None:
    repo = "man/basic"
    manifest = image_manifest(client, repo, [os.urandom(1000), os.urandom(2000)])
    digest = sha256(manifest)
    r = put_manifest(client, repo, "v1", manifest)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["Location"] == f"/v2/{repo}/manifests/{digest}"
    for ref in ("v1", digest):
        r = client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200
        assert r.content == manifest  # stored exactly as pushed
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["ETag"] == f'"{digest}"'
        r = client.head(f"/v2/{repo}/manifests/{ref}")
        assert r.status_code == 200 and r.content == b""
        assert int(r.headers["Content-Length"]) == len(manifest)
        assert r.headers["Docker-Content-Digest"] == digest
    r = client.get(f"/v2/{repo}/manifests/v1", headers={"If-None-Match": f'"{digest}"'})
    assert r.status_code == 304
    # the manifest is a blob of the repository too
    assert client.get(f"/v2/{repo}/blobs/{digest}").content == manifest
    # by digest; a digest that does not match the bytes
    assert put_manifest(client, repo, digest, manifest).status_code == 201
    r = put_manifest(client, repo, sha256(b"other"), manifest)
    assert r.status_code == 400 and codes(r) == ["DIGEST_INVALID"]
    assert put_manifest(client, repo, "v2", manifest).status_code == 201
    assert client.get(f"/v2/{repo}/tags/list").json() == {"name": repo, "tags": ["v1", "v2"]}
    # delete a tag: the manifest stays
    assert client.delete(f"/v2/{repo}/manifests/v1").status_code == 202
    r = client.get(f"/v2/{repo}/manifests/v1")
    assert r.status_code == 404 and codes(r) == ["MANIFEST_UNKNOWN"]
    assert client.get(f"/v2/{repo}/manifests/{digest}").status_code == 200
    assert client.delete(f"/v2/{repo}/manifests/v1").status_code == 404
    # delete the manifest: its tags go too
    assert client.delete(f"/v2/{repo}/manifests/{digest}").status_code == 202
    for ref in (digest, "v2"):
        r = client.get(f"/v2/{repo}/manifests/{ref}")
        assert r.status_code == 404 and codes(r) == ["MANIFEST_UNKNOWN"]
    assert client.head(f"/v2/{repo}/manifests/{digest}").status_code == 404
    assert client.delete(f"/v2/{repo}/manifests/{digest}").status_code == 404
    assert client.get(f"/v2/{repo}/tags/list").json()["tags"] == []


def test_manifest_media_types(client: httpx.Client) -> None:
    repo = "man/types"
    docker = image_manifest(client, repo, [b"docker layer"], docker=True)
    assert put_manifest(client, repo, "docker", docker, DOCKER_MANIFEST).status_code == 201
    oci = image_manifest(client, repo, [b"oci layer"])
    assert put_manifest(client, repo, "oci", oci, OCI_MANIFEST).status_code == 201
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [dict(descriptor(OCI_MANIFEST, oci), platform={"os": "linux", "architecture": "amd64"})],
    }).encode()  # fmt: skip
    assert put_manifest(client, repo, "index", index, OCI_INDEX).status_code == 201
    mlist = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [dict(descriptor(DOCKER_MANIFEST, docker), platform={"os": "linux", "architecture": "amd64"})],
    }).encode()  # fmt: skip
    assert put_manifest(client, repo, "list", mlist, DOCKER_MANIFEST_LIST).status_code == 201
    for tag, body, mtype in (
        ("docker", docker, DOCKER_MANIFEST),
        ("oci", oci, OCI_MANIFEST),
        ("index", index, OCI_INDEX),
        ("list", mlist, DOCKER_MANIFEST_LIST),
    ):
        r = client.get(f"/v2/{repo}/manifests/{tag}")
        assert r.headers["Content-Type"] == mtype
        assert r.content == body
    # a generic Content-Type: the manifest's own mediaType decides
    assert put_manifest(client, repo, "generic", oci, "application/json").status_code == 201
    assert client.get(f"/v2/{repo}/manifests/generic").headers["Content-Type"] == OCI_MANIFEST


def test_manifest_validation(client: httpx.Client) -> None:
    repo = "man/invalid"
    good = image_manifest(client, repo, [b"layer"])
    obj = json.loads(good)
    cases: list[tuple[bytes, str, str]] = [
        (b"{not json", OCI_MANIFEST, "MANIFEST_INVALID"),
        (b"[1, 2]", OCI_MANIFEST, "MANIFEST_INVALID"),
        (good, DOCKER_MANIFEST, "MANIFEST_INVALID"),  # Content-Type disagrees with mediaType
        (good, "application/vnd.example+json", "MANIFEST_INVALID"),
        (json.dumps({**obj, "schemaVersion": 1}).encode(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (json.dumps({**obj, "config": {"digest": "sha256:xyz", "size": 1}}).encode(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (json.dumps({**obj, "layers": [descriptor(LAYER_TYPE, b"never pushed")]}).encode(), OCI_MANIFEST, "MANIFEST_BLOB_UNKNOWN"),
        (json.dumps({**obj, "layers": [{**obj["layers"][0], "size": 999}]}).encode(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor(OCI_MANIFEST, b"{}")]}).encode(), OCI_INDEX, "MANIFEST_BLOB_UNKNOWN"),
    ]  # fmt: skip
    for body, mtype, code in cases:
        r = put_manifest(client, repo, "t", body, mtype)
        assert r.status_code == 400, (body[:80], r.text)
        assert codes(r) == [code], (body[:80], r.text)
    # a blob of another repository does not count
    other = image_manifest(client, "man/elsewhere", [b"elsewhere layer"])
    r = put_manifest(client, repo, "t", other)
    assert r.status_code == 400 and codes(r) == ["MANIFEST_BLOB_UNKNOWN"]
    r = put_manifest(client, repo, ".badtag", good)
    assert r.status_code == 400 and codes(r) == ["MANIFEST_INVALID"]
    assert client.get(f"/v2/{repo}/tags/list").json()["tags"] == []


def test_deeply_nested_json_is_a_400(client: httpx.Client, shared_turbofs_registry: TurbofsRegistry) -> None:
    """Issue 16, defect 9: a deeply nested manifest answered 500 (RecursionError)."""
    repo = "man/deep"
    for depth in (100_000, 70):
        deep = b'{"schemaVersion": 2, "x": ' + b"[" * depth + b"]" * depth + b"}"
        r = put_manifest(client, repo, "v1", deep)
        assert r.status_code == 400 and codes(r) == ["MANIFEST_INVALID"], r.text
        assert "nested" in r.json()["errors"][0]["message"]
    # 64 levels (far more than any OCI document needs) are still fine for the parser
    ok = image_manifest(client, repo, [b"deep layer"], annotations={"a": "[" * 1000})
    assert put_manifest(client, repo, "v1", ok).status_code == 201
    assert "RecursionError" not in shared_turbofs_registry.log()


def test_manifest_numbers_past_the_limits_are_a_400(client: httpx.Client,
                                                     shared_turbofs_registry: TurbofsRegistry) -> None:
    """Issue 16: a manifest holding a 5000-digit number answered 500 (ValueError from
    json.loads); such numbers, NaN and Infinity are a 400 MANIFEST_INVALID."""
    ok = image_manifest(client, "man/numbers", [b"numbers layer"])
    assert put_manifest(client, "man/numbers", "v1", ok).status_code == 201
    for value, message in ((b"9" * 5000, "limit of 20"), (b"NaN", "NaN"), (b"-Infinity", "Infinity"),
                           (b"1e400", "out of range")):
        r = put_manifest(client, "man/numbers", "v2", ok[:-1] + b', "x": ' + value + b"}")
        assert r.status_code == 400 and codes(r) == ["MANIFEST_INVALID"], r.text
        assert message in r.json()["errors"][0]["message"]
    assert "Exceeds the limit" not in shared_turbofs_registry.log()


def test_referrers(client: httpx.Client) -> None:
    repo = "man/referrers"
    subject = image_manifest(client, repo, [b"subject layer"])
    sdigest = sha256(subject)
    assert put_manifest(client, repo, "v1", subject).status_code == 201
    r = client.get(f"/v2/{repo}/referrers/{sdigest}")
    assert r.status_code == 200 and r.json()["manifests"] == []
    sbom = image_manifest(
        client, repo, [b"sbom"], artifactType="application/vnd.example.sbom",
        subject=descriptor(OCI_MANIFEST, subject), annotations={"k": "v"},
    )  # fmt: skip
    r = put_manifest(client, repo, sha256(sbom), sbom)
    assert r.status_code == 201
    assert r.headers["OCI-Subject"] == sdigest
    r = client.get(f"/v2/{repo}/referrers/{sdigest}")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    index = r.json()
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [{
        "mediaType": OCI_MANIFEST, "digest": sha256(sbom), "size": len(sbom),
        "artifactType": "application/vnd.example.sbom", "annotations": {"k": "v"},
    }]  # fmt: skip
    r = client.get(f"/v2/{repo}/referrers/{sdigest}", params={"artifactType": "other"})
    assert r.json()["manifests"] == [] and r.headers["OCI-Filters-Applied"] == "artifactType"
    assert client.delete(f"/v2/{repo}/manifests/{sha256(sbom)}").status_code == 202
    assert client.get(f"/v2/{repo}/referrers/{sdigest}").json()["manifests"] == []
    assert client.get(f"/v2/{repo}/referrers/sha256:zz").status_code == 400


def test_limits_refuse_oversized_bodies(turbofs_registry_factory: Factory) -> None:
    # one limit from the TOML file, one from the environment
    reg = turbofs_registry_factory(
        env={"TURBOFS_REGISTRY_MAX_BLOB_SIZE": "65536"}, max_manifest_size=4096
    )
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        big = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                          "annotations": {"pad": "x" * 5000}}).encode()  # fmt: skip
        r = put_manifest(c, "limits", "big", big, OCI_INDEX)
        assert r.status_code == 413 and codes(r) == ["SIZE_INVALID"]
        # also without Content-Length (chunked transfer)
        r = c.put("/v2/limits/manifests/big", content=iter([big[:3000], big[3000:]]),
                  headers={"Content-Type": OCI_INDEX})  # fmt: skip
        assert r.status_code == 413 and codes(r) == ["SIZE_INVALID"]
        assert c.get("/v2/limits/manifests/big").status_code == 404
        blob = os.urandom(70_000)
        r = c.post("/v2/limits/blobs/uploads/", params={"digest": sha256(blob)}, content=blob)
        assert r.status_code == 413 and codes(r) == ["SIZE_INVALID"]
        location = c.post("/v2/limits/blobs/uploads/").headers["Location"]
        assert c.patch(location, content=blob[:60_000]).status_code == 202
        r = c.patch(location, content=blob[60_000:])
        assert r.status_code == 413 and codes(r) == ["SIZE_INVALID"]
        r = c.patch(location, content=iter([blob[60_000:]]))  # streamed: refused while reading
        assert r.status_code == 413 and codes(r) == ["SIZE_INVALID"]
        assert c.get(location).headers["Range"] == "0-59999"
        assert c.head(f"/v2/limits/blobs/{sha256(blob)}").status_code == 404
        assert not list((reg.storage / "blobs" / "sha256").iterdir())



@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs for the storage needs root")
def test_full_disk_is_a_507_and_keeps_nothing_half_written(tmp_path: Path) -> None:
    """Storage on a 1 MB tmpfs: an upload or manifest that does not fit is answered 507 with a
    message saying the storage is full (never a 500), no failed write leaves a session, a
    blob or a temporary file behind, and with room again the upload resumes to the right blob."""
    storage = tmp_path / "storage"
    storage.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(storage)], check=True)
    reg = TurbofsRegistry(tmp_path / "reg", storage)
    try:
        reg.start()
        with httpx.Client(base_url=reg.url, timeout=30) as c:

            def full(r: httpx.Response) -> bool:
                return r.status_code == 507 and "storage is full" in r.json()["errors"][0]["message"]

            manifest = image_manifest(c, "full/img", [])  # its config is pushed while there is room
            big = os.urandom(2 << 20)
            r = c.post("/v2/full/img/blobs/uploads/", params={"digest": sha256(big)}, content=big)
            assert full(r), r.text
            assert not list((storage / "uploads").iterdir()), "a failed monolithic upload left its session"
            location = c.post("/v2/full/img/blobs/uploads/").headers["Location"]
            r = c.patch(location, content=big)
            assert full(r), r.text
            [session] = (storage / "uploads").iterdir()
            kept = (session / "data").read_bytes()
            assert kept == big[: len(kept)]
            # fill what is left, then: no new session, no manifest, no temporary file
            with contextlib.suppress(OSError), open(storage / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
            assert full(c.post("/v2/full/img/blobs/uploads/"))
            assert [p.name for p in (storage / "uploads").iterdir()] == [session.name]
            assert full(put_manifest(c, "full/img", "v1", manifest, OCI_MANIFEST))
            assert c.get("/v2/full/img/manifests/v1").status_code == 404
            assert not [p for p in storage.rglob("*") if p.name.endswith(".tmp")]
            # room again: the session resumes where its Range says and gives the right blob
            (storage / "filler").unlink()
            subprocess.run(["mount", "-o", "remount,size=64m", str(storage)], check=True)
            offset = int(c.get(location).headers["Range"].split("-")[1]) + 1 if kept else 0
            assert offset == len(kept)
            r = c.patch(location, content=big[offset:],
                        headers={"Content-Range": f"{offset}-{len(big) - 1}"})  # fmt: skip
            assert r.status_code == 202, r.text
            assert c.put(r.headers["Location"], params={"digest": sha256(big)}).status_code == 201
            assert c.get(f"/v2/full/img/blobs/{sha256(big)}").content == big
            assert put_manifest(c, "full/img", "v1", manifest, OCI_MANIFEST).status_code == 201
        assert "Traceback" not in reg.log(), reg.log()[-3000:]
    finally:
        reg.stop()
        subprocess.run(["umount", "-l", str(storage)], check=False, capture_output=True)


def test_range_requests(client: httpx.Client) -> None:
    data = os.urandom(1 << 20)
    digest = push_blob(client, "ranges", data)
    url = f"/v2/ranges/blobs/{digest}"
    r = client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206
    assert r.content == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    r = client.get(url, headers={"Range": "bytes=-100"})
    assert r.status_code == 206 and r.content == data[-100:]
    r = client.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = client.get(url, headers={"Range": f"bytes=1000-{len(data) * 2}"})
    assert r.status_code == 206 and r.content == data[1000:]
    for bad in (f"bytes={len(data)}-", f"bytes={len(data) + 10}-{len(data) + 20}", "bytes=20-10", "items=0-1"):
        r = client.get(url, headers={"Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    r = client.head(url, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.headers["Content-Length"] == "100"
    r = client.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Accept-Ranges"] == "bytes"


def _multipart(resp: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges response."""
    ctype = resp.headers["Content-Type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    delimiter = b"--" + ctype.split("boundary=", 1)[1].encode()
    body = resp.content
    assert body.startswith(delimiter) and body.endswith(delimiter + b"--\r\n")
    parts = []
    for part in body.split(delimiter)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((fields["Content-Range"], data[:-2]))
    return parts


def test_multi_range_requests(client: httpx.Client) -> None:
    data = os.urandom(100_000)
    digest = push_blob(client, "ranges/multi", data)
    url = f"/v2/ranges/multi/blobs/{digest}"
    r = client.get(url, headers={"Range": "bytes=0-9, 5000-5099,-7,99990-"})
    assert r.status_code == 206
    assert int(r.headers["Content-Length"]) == len(r.content)
    size = len(data)
    # the overlapping last two are one part
    assert _multipart(r) == [
        (f"bytes 0-9/{size}", data[:10]),
        (f"bytes 5000-5099/{size}", data[5000:5100]),
        (f"bytes 99990-{size - 1}/{size}", data[99990:]),
    ]
    # ascending order; ranges closer than a part header merged
    r = client.get(url, headers={"Range": "bytes=9000-9099,100-199,250-299"})
    assert _multipart(r) == [(f"bytes 100-299/{size}", data[100:300]), (f"bytes 9000-9099/{size}", data[9000:9100])]
    r = client.head(url, headers={"Range": "bytes=0-9,20-29"})
    assert r.status_code == 206 and r.content == b""
    # unsatisfiable ranges are dropped; none left: 416
    r = client.get(url, headers={"Range": f"bytes=0-1,{size + 5}-{size + 9}"})
    assert r.status_code == 206 and r.content == data[:2]  # one left: no multipart
    assert r.headers["Content-Range"] == f"bytes 0-1/{size}"
    r = client.get(url, headers={"Range": f"bytes={size}-,{size + 5}-{size + 9}"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
    r = client.get(url, headers={"Range": "bytes=0-1,x-y"})
    assert r.status_code == 416


def test_multi_range_answers_are_bounded_by_the_blob(client: httpx.Client) -> None:
    """Issue 16, defect 1: ``bytes=0-,0-,...`` once answered a 206 of (ranges x blob size)."""
    data = os.urandom(300_000)
    digest = push_blob(client, "ranges/amplify", data)
    url = f"/v2/ranges/amplify/blobs/{digest}"
    # overlapping ranges under the count limit: coalesced into one, an ordinary 206
    r = client.get(url, headers={"Range": "bytes=" + ",".join(["0-"] * 100)})
    assert r.status_code == 206 and r.headers["Content-Range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    assert r.content == data
    # many small ranges: merged, the answer at most the blob plus the part headers
    spec = ",".join(f"{i * 2000}-{i * 2000 + 1500}" for i in range(120))
    r = client.get(url, headers={"Range": f"bytes={spec}"})
    assert r.status_code == 206 and int(r.headers["Content-Length"]) < len(data) + 120 * 200
    assert all(body == data[int(cr.split()[1].split("-")[0]) :][: len(body)] for cr, body in _multipart(r))
    # past the count limit the Range header is ignored (RFC 9110 14.2): the blob, once
    for header in ("bytes=" + ",".join(["0-"] * 2000), "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 3000, 15))):
        with client.stream("GET", url, headers={"Range": header}) as r:
            assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(data)
            assert r.read() == data
    r = client.head(url, headers={"Range": "bytes=" + ",".join(["0-"] * 2000)})
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(data)


def test_range_bounds_of_any_length(client: httpx.Client, shared_turbofs_registry: TurbofsRegistry) -> None:
    """Issue 16: a Range or Content-Range bound of thousands of digits (past Python's 4300-digit
    int limit) answered 500. Bounds of any length are numbers (RFC 9110 14.1.1): a first-pos
    past the blob is unsatisfiable, a last-pos or suffix past it means to the end."""
    data = os.urandom(1000)
    digest = push_blob(client, "ranges/digits", data)
    url = f"/v2/ranges/digits/blobs/{digest}"
    huge, zeros = "1" * 4400, "0" * 4400  # one bound per header: aiohttp takes 8 KiB a field
    for header, want in (
        (f"bytes={huge}-", None),
        (f"bytes={huge}-,2000-", None),
        (f"bytes={huge}-,0-1", [(0, 2)]),
        (f"bytes=0-9,10-{huge}", [(0, 1000)]),
        (f"bytes=0-1,-{huge}", [(0, 1000)]),
        (f"bytes={zeros}5-9,500-509", [(5, 10), (500, 510)]),
    ):
        r = client.get(url, headers={"Range": header})
        if want is None:
            assert r.status_code == 416, (header[:20], r.status_code)
            assert r.headers["Content-Range"] == f"bytes */{len(data)}"
        elif len(want) == 1:
            assert r.status_code == 206 and r.content == data[want[0][0] : want[0][1]], header[:20]
        else:
            assert r.status_code == 206
            assert _multipart(r) == [(f"bytes {a}-{b - 1}/{len(data)}", data[a:b]) for a, b in want]
    location = client.post("/v2/ranges/digits/blobs/uploads/").headers["Location"]
    for value in (f"0-{huge}", f"{huge}-5", f"0-1{zeros}"):
        r = client.patch(location, content=b"abcde", headers={"Content-Range": value})
        assert r.status_code == 416 and codes(r) == ["BLOB_UPLOAD_INVALID"], r.text
    # leading zeros are only zeros
    r = client.patch(location, content=b"abcde", headers={"Content-Range": f"{zeros[:4000]}0-{zeros[:4000]}4"})
    assert r.status_code == 202 and r.headers["Range"] == "0-4"
    assert "Exceeds the limit" not in shared_turbofs_registry.log()


def test_cross_repository_mount(client: httpx.Client) -> None:
    data = os.urandom(10_000)
    digest = push_blob(client, "mount/src", data)
    r = client.post("/v2/mount/dst/blobs/uploads/", params={"mount": digest, "from": "mount/src"})
    assert r.status_code == 201
    assert r.headers["Location"] == f"/v2/mount/dst/blobs/{digest}"
    assert r.headers["Docker-Content-Digest"] == digest
    assert client.get(f"/v2/mount/dst/blobs/{digest}").content == data
    # not mountable (the source lacks it, or no source): an upload session instead
    other = sha256(b"not there")
    for params in ({"mount": other, "from": "mount/src"}, {"mount": digest, "from": "mount/none"}, {"mount": digest}):
        r = client.post("/v2/mount/third/blobs/uploads/", params=params)
        assert r.status_code == 202, params
        assert r.headers["Location"].startswith("/v2/mount/third/blobs/uploads/")
    assert client.get(f"/v2/mount/third/blobs/{digest}").status_code == 404
    r = client.post("/v2/mount/dst/blobs/uploads/", params={"mount": digest, "from": "Bad/Name"})
    assert r.status_code == 400 and codes(r) == ["NAME_INVALID"]


def test_blob_delete(client: httpx.Client) -> None:
    digest = push_blob(client, "delete/blob", b"to be deleted")
    assert client.delete(f"/v2/delete/blob/blobs/{digest}").status_code == 202
    r = client.get(f"/v2/delete/blob/blobs/{digest}")
    assert r.status_code == 404 and codes(r) == ["BLOB_UNKNOWN"]
    r = client.delete(f"/v2/delete/blob/blobs/{digest}")
    assert r.status_code == 404 and codes(r) == ["BLOB_UNKNOWN"]


def test_blob_a_manifest_uses_cannot_be_deleted(client: httpx.Client) -> None:
    """Issue 16, defect 10: deleting a layer of a tagged image answered 202 and broke it."""
    repo = "delete/used"
    layer = os.urandom(3000)
    manifest = image_manifest(client, repo, [layer])
    config_digest = json.loads(manifest)["config"]["digest"]
    assert put_manifest(client, repo, "v1", manifest).status_code == 201
    for blob in (sha256(layer), config_digest, sha256(manifest)):
        r = client.delete(f"/v2/{repo}/blobs/{blob}")
        assert r.status_code == 409 and codes(r) == ["UNSUPPORTED"], blob
        assert r.json()["errors"][0]["detail"]["manifests"] == [sha256(manifest)]
        assert client.head(f"/v2/{repo}/blobs/{blob}").status_code == 200
    # the untagged manifest still holds them; once it is deleted they can go
    assert client.delete(f"/v2/{repo}/manifests/v1").status_code == 202
    assert client.delete(f"/v2/{repo}/blobs/{sha256(layer)}").status_code == 409
    assert client.delete(f"/v2/{repo}/manifests/{sha256(manifest)}").status_code == 202
    assert client.delete(f"/v2/{repo}/blobs/{sha256(layer)}").status_code == 202
    # another repository's manifests do not hold this one's links
    other = image_manifest(client, "delete/other", [layer])
    assert put_manifest(client, "delete/other", "v1", other).status_code == 201
    assert client.delete(f"/v2/{repo}/blobs/{config_digest}").status_code == 202


def test_tags_and_catalog_pagination(turbofs_registry: TurbofsRegistry) -> None:
    with httpx.Client(base_url=turbofs_registry.url, timeout=30) as c:
        r = c.get("/v2/_catalog")
        assert r.status_code == 200 and r.json() == {"repositories": []}
        r = c.get("/v2/pages/tags/list")
        assert r.status_code == 404 and codes(r) == ["NAME_UNKNOWN"]
        manifest = image_manifest(c, "pages", [b"x"])
        tags = ["a", "B", "c", "d1", "d2", "latest"]
        for tag in tags:
            assert put_manifest(c, "pages", tag, manifest).status_code == 201
        assert c.get("/v2/pages/tags/list").json()["tags"] == sorted(tags)
        seen: list[str] = []
        url: str | None = "/v2/pages/tags/list?n=4"
        while url:
            r = c.get(url)
            seen += r.json()["tags"]
            link = r.headers.get("Link")
            url = link.split(";")[0].strip("<>") if link else None
        assert seen == sorted(tags)
        r = c.get("/v2/pages/tags/list", params={"n": 2, "last": "a"})
        assert r.json()["tags"] == ["c", "d1"]
        assert r.headers["Link"] == '</v2/pages/tags/list?n=2&last=d1>; rel="next"'
        r = c.get("/v2/pages/tags/list", params={"n": 0})
        assert r.json()["tags"] == [] and "Link" not in r.headers
        r = c.get("/v2/pages/tags/list", params={"last": "d2"})
        assert r.json()["tags"] == ["latest"]
        assert c.get("/v2/pages/tags/list", params={"n": "-1"}).status_code == 400
        for name in ("x/y", "a", "z", "a/b/c"):
            push_blob(c, name, b"catalog")
        r = c.get("/v2/_catalog")
        assert r.json()["repositories"] == ["a", "a/b/c", "pages", "x/y", "z"]
        r = c.get("/v2/_catalog", params={"n": 2})
        assert r.json()["repositories"] == ["a", "a/b/c"]
        assert r.headers["Link"] == '</v2/_catalog?n=2&last=a/b/c>; rel="next"'
        r = c.get("/v2/_catalog", params={"n": 2, "last": "a/b/c"})
        assert r.json()["repositories"] == ["pages", "x/y"]


def test_concurrent_uploads_of_the_same_blob(client: httpx.Client, storage: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = sha256(data)
    results: list[int] = []
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
                repo = f"concurrent/r{i % 3}"
                if i % 2:
                    r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
                else:
                    loc = c.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
                    for off in range(0, len(data), 512 * 1024):
                        part = data[off : off + 512 * 1024]
                        rr = c.patch(loc, content=part,
                                     headers={"Content-Range": f"{off}-{off + len(part) - 1}"})  # fmt: skip
                        assert rr.status_code == 202
                    r = c.put(loc, params={"digest": digest})
                results.append(r.status_code)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [201] * 8
    for i in range(3):
        assert client.get(f"/v2/concurrent/r{i}/blobs/{digest}").content == data
    assert (storage / "blobs" / "sha256" / digest[7:]).read_bytes() == data
    assert not [p for p in (storage / "blobs" / "sha256").iterdir() if p.name.startswith(".")]


def test_upload_sessions_expire(turbofs_registry_factory: Factory) -> None:
    reg = turbofs_registry_factory(upload_ttl=1.0)
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        location = c.post("/v2/expire/blobs/uploads/").headers["Location"]
        assert c.patch(location, content=os.urandom(100_000)).status_code == 202
        assert len(list((reg.storage / "uploads").iterdir())) == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list((reg.storage / "uploads").iterdir()):
            time.sleep(0.1)
        assert list((reg.storage / "uploads").iterdir()) == []
        r = c.get(location)
        assert r.status_code == 404 and codes(r) == ["BLOB_UPLOAD_UNKNOWN"]
        # a session in use is not expired while its bytes keep coming
        location = c.post("/v2/expire/blobs/uploads/").headers["Location"]
        data = os.urandom(64 * 1024)

        def slow_body() -> Iterator[bytes]:
            for i in range(8):
                time.sleep(0.3)
                yield data[i * 8192 : (i + 1) * 8192]

        assert c.patch(location, content=slow_body()).status_code == 202
        r = c.put(location, params={"digest": sha256(data)})
        assert r.status_code == 201


def _wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_client_disconnect_mid_upload(client: httpx.Client, shared_turbofs_registry: TurbofsRegistry) -> None:
    reg = shared_turbofs_registry
    data = os.urandom(1 << 20)
    digest = sha256(data)
    location = client.post("/v2/dropped/blobs/uploads/").headers["Location"]
    with socket.create_connection(("127.0.0.1", reg.port)) as s:
        s.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: 0-{len(data) - 1}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        )
        s.sendall(data[:300_000])
        time.sleep(0.2)
    # the registry stays consistent: the session holds a prefix of what was sent, no blob
    offset = -1

    def settled() -> bool:
        nonlocal offset
        r = client.get(location)
        if r.status_code != 204:
            return False  # still busy with the dropped request
        offset = int(r.headers["Range"].split("-")[1]) + 1 if r.headers["Range"] != "0-0" else 0
        return True

    _wait_for(settled)
    assert 0 <= offset <= 300_000
    assert client.head(f"/v2/dropped/blobs/{digest}").status_code == 404
    assert not (reg.storage / "blobs" / "sha256" / digest[7:]).exists()
    # resume where it stands
    r = client.patch(location, content=data[offset:],
                     headers={"Content-Range": f"{offset}-{len(data) - 1}"})  # fmt: skip
    assert r.status_code == 202, r.text
    assert client.put(location, params={"digest": digest}).status_code == 201
    assert client.get(f"/v2/dropped/blobs/{digest}").content == data

    # a monolithic upload cut off: nothing is kept at all
    uploads = reg.storage / "uploads"
    before = set(uploads.iterdir())  # sessions other tests left open
    other = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", reg.port)) as s:
        s.sendall(
            f"POST /v2/dropped/blobs/uploads/?digest={sha256(other)} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(other)}\r\n\r\n".encode()
        )
        s.sendall(other[:200_000])
        time.sleep(0.2)
    _wait_for(lambda: set(uploads.iterdir()) <= before)
    assert client.head(f"/v2/dropped/blobs/{sha256(other)}").status_code == 404
    assert not (reg.storage / "blobs" / "sha256" / sha256(other)[7:]).exists()


def test_client_disconnect_mid_download(client: httpx.Client, shared_turbofs_registry: TurbofsRegistry) -> None:
    data = os.urandom(8 << 20)
    digest = push_blob(client, "download", data)
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", shared_turbofs_registry.port)) as s:
            s.sendall(f"GET /v2/download/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.recv(65536)
    r = client.get(f"/v2/download/blobs/{digest}", headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == data[100:]
    assert client.get(f"/v2/download/blobs/{digest}").content == data


def test_restart_keeps_everything(turbofs_registry: TurbofsRegistry) -> None:
    reg = turbofs_registry
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        layers = [os.urandom(5000), os.urandom(7000)]
        manifest = image_manifest(c, "restart/me", layers)
        assert put_manifest(c, "restart/me", "v1", manifest).status_code == 201
        location = c.post("/v2/restart/me/blobs/uploads/").headers["Location"]
        assert c.patch(location, content=b"half").status_code == 202
    url = reg.url
    reg.stop()
    assert reg.returncode == 0  # SIGTERM: a clean shutdown
    reg.start()
    assert reg.url == url
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        r = c.get("/v2/restart/me/manifests/v1")
        assert r.status_code == 200 and r.content == manifest
        for layer in layers:
            assert c.get(f"/v2/restart/me/blobs/{sha256(layer)}").content == layer
        assert c.get("/v2/_catalog").json()["repositories"] == ["restart/me"]
        # an upload session survives too, and can be finished
        assert c.get(location).headers["Range"] == "0-3"
        r = c.put(location, params={"digest": sha256(b"half and whole")}, content=b" and whole")
        assert r.status_code == 201


def test_in_process_server(tmp_path: Path) -> None:
    cfg = RegistryConfig(port=0, storage=tmp_path / "inproc").validate()

    async def main() -> None:
        runner, port = await start(cfg)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.get("/v2/")
                assert r.status_code == 200
                data = b"in process"
                r = await c.post("/v2/inproc/blobs/uploads/", params={"digest": sha256(data)}, content=data)
                assert r.status_code == 201
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert (tmp_path / "inproc" / "blobs" / "sha256" / sha256(b"in process")[7:]).exists()


def test_storage_import_and_gc(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", RegistryConfig(upload_ttl=3600))
    src = tmp_path / "blob"
    src.write_bytes(b"imported")
    with pytest.raises(DigestInvalid):
        st.import_blob(src, sha256(b"other"))
    assert src.exists() and st.blob_path(sha256(b"other")) is None
    st.import_blob(src, sha256(b"imported"))
    assert not src.exists()
    path = st.blob_path(sha256(b"imported"))
    assert path is not None and path.read_bytes() == b"imported"
    assert st.blob_size(sha256(b"imported")) == 8
    st.link_blob("r", sha256(b"imported"))
    assert st.repo_has_blob("r", sha256(b"imported"))
    loose = st.put_blob_bytes(b"loose")
    assert st.garbage_collect(grace=0) == 1
    assert st.blob_path(loose) is None
    assert st.blob_path(sha256(b"imported")) is not None
    st.unlink_blob("r", sha256(b"imported"))
    assert st.garbage_collect(grace=0) == 1


# -- real clients: skopeo ------------------------------------------------------------------


def _layers_of(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir() if not p.name.startswith(".")}


def _index_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_bytes())
    return str(index["manifests"][0]["digest"])


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-layer OCI image (gzip and zstd layers, which skopeo passes through unchanged;
    it would compress an uncompressed layer on its way into any registry)."""
    layout = tmp_path_factory.mktemp("plain") / "image"
    layers = [
        [TarEntry("etc/", type="dir", mode=0o755), TarEntry("etc/hostname", data=b"turbo\n")],
        [TarEntry("usr/bin/tool", data=os.urandom(400_000), mode=0o755), TarEntry("usr/lib/big", size=3_000_000)],
        [TarEntry("etc/hostname", data=b"changed\n"), TarEntry("link", type="symlink", linkname="etc/hostname")],
    ]
    write_oci_layout(layout, layers, compression=["gzip", "zstd", "gzip"])
    return layout


def _assert_same_image(src: Path, dest: Path) -> None:
    assert _index_digest(dest) == _index_digest(src)
    assert _layers_of(dest) == _layers_of(src)


def test_skopeo_round_trip_plain_image(turbofs_registry: TurbofsRegistry, plain_image: Path, tmp_path: Path) -> None:
    ref = f"docker://{turbofs_registry.host_port}/skopeo/plain:v1"
    skopeo_copy(f"oci:{plain_image}:latest", ref)
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", ref).stdout)
    assert raw["mediaType"] == OCI_MANIFEST and len(raw["layers"]) == 3
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", ref.rsplit(":", 1)[0]).stdout)
    assert tags["Tags"] == ["v1"]
    # pushing again finds every blob already there
    skopeo_copy(f"oci:{plain_image}:latest", ref)
    dest = tmp_path / "back"
    skopeo_copy(ref, f"oci:{dest}:latest")
    _assert_same_image(plain_image, dest)


def test_skopeo_round_trip_turbo_image(turbofs_registry: TurbofsRegistry, plain_image: Path, tmp_path: Path) -> None:
    turbo = tmp_path / "turbo"
    build(f"oci:{plain_image}:latest", turbo, BuildConfig(), progress=False)
    ref = f"docker://{turbofs_registry.host_port}/skopeo/turbo:latest"
    skopeo_copy(f"oci:{turbo}:latest", ref)
    dest = tmp_path / "back"
    skopeo_copy(ref, f"oci:{dest}:latest")
    _assert_same_image(turbo, dest)
    manifest = json.loads((turbo / "blobs" / "sha256" / _index_digest(turbo)[7:]).read_bytes())
    assert any(layer["mediaType"].startswith("application/vnd.turbofs.") for layer in manifest["layers"])


def test_skopeo_between_turbofs_and_distribution(
    turbofs_registry: TurbofsRegistry,
    distribution_registry: DistributionRegistry,
    plain_image: Path,
    tmp_path: Path,
) -> None:
    ours = f"docker://{turbofs_registry.host_port}"
    theirs = f"docker://{distribution_registry.host_port}"
    skopeo_copy(f"oci:{plain_image}:latest", f"{ours}/interop/image:v1")
    skopeo_copy(f"{ours}/interop/image:v1", f"{theirs}/interop/image:v1")
    skopeo_copy(f"{theirs}/interop/image:v1", f"{ours}/interop/back:v2")
    dest = tmp_path / "back"
    skopeo_copy(f"{ours}/interop/back:v2", f"oci:{dest}:latest")
    _assert_same_image(plain_image, dest)
    # the same manifest bytes on both registries
    with httpx.Client(timeout=30) as c:
        a = c.get(f"{turbofs_registry.url}/v2/interop/back/manifests/v2", headers={"Accept": OCI_MANIFEST})
        b = c.get(f"{distribution_registry.url}/v2/interop/image/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert a.status_code == b.status_code == 200
        assert a.content == b.content
        assert a.headers["Docker-Content-Digest"] == b.headers["Docker-Content-Digest"]
        assert a.headers["Content-Type"] == b.headers["Content-Type"] == OCI_MANIFEST
