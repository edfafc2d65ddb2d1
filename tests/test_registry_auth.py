"""Registry authentication: passwords, tokens, the gate, the client flow, and real clients.

* Units: password hashes, the users file, token signing and expiry, the signing key file,
  request-to-scope rules (and that they name the same repository as the app's router),
  scope grants, ``WWW-Authenticate`` parsing, Docker auth files.
* The real app in process (``server.app.start``): challenges, the token endpoint (GET and
  the OAuth2 POST form), wrong passwords, expired and forged tokens, pull versus push,
  anonymous pulls, HTTP Basic straight on ``/v2``, and :class:`turbofs.core.auth.RegistryAuth`
  with ``httpx.AsyncClient``; the sync ``httpx.Client`` against a mock registry.
* Real clients against ``turbofs serve --push-auth --users FILE`` on loopback: skopeo
  (``--dest-creds``, ``--creds``) and containerd's ``ctr images push --user``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from server.auth import (
    AUTH_KEY,
    InvalidToken,
    Policy,
    TokenSigner,
    UsersFile,
    check_username,
    hash_password,
    load_token_key,
    passwd_line,
    verify_password,
)
from tests.ocifixtures import TarEntry, write_oci_layout
from tests.registry_fixtures import free_port
from turbofs import cli
from turbofs.core.auth import (
    Access,
    Credentials,
    RegistryAuth,
    Scope,
    auth_for_registry,
    credentials_from_auth_file,
    lookup_credentials,
    parse_challenges,
    parse_scopes,
    required_access,
)
from turbofs.core.config import RegistryConfig
from turbofs.core.errors import AuthError, UsageError

T = TypeVar("T")
USER, PASSWORD = "alice", "s3cret:with colon"


@functools.cache
def _alice_line() -> str:
    return passwd_line(USER, PASSWORD)


def _users_file(directory: Path, *extra: str) -> Path:
    path = directory / "users"
    path.write_text("# registry users\n" + _alice_line() + "\n" + "".join(f"{e}\n" for e in extra))
    return path


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": Credentials(user, password).basic_header()}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _blob(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ======================================================================= passwords, users


def test_password_hash_roundtrip() -> None:
    encoded = hash_password("pässword")
    assert encoded.startswith("$scrypt$ln=15,r=8,p=1$")
    assert verify_password("pässword", encoded)
    assert not verify_password("password", encoded)
    assert not verify_password("", encoded)
    assert hash_password("pässword") != encoded  # a random salt each time


def test_password_hash_refuses_what_it_does_not_know() -> None:
    assert not verify_password("x", "$2y$05$abcdefghijklmnopqrstuuB4Jg3U9b1PTxIWHaQk9n2y9xv5aB3xu")  # bcrypt
    assert not verify_password("x", "plain")
    assert not verify_password("x", "$scrypt$ln=40,r=8,p=1$AAAA$AAAA")  # absurd cost
    assert not verify_password("x", "$scrypt$ln=10,r=8,p=1$!!!!$AAAA")
    with pytest.raises(UsageError):
        hash_password("")


@pytest.mark.parametrize("name", ["alice", "ci-bot@example.com", "x" * 255])
def test_username_ok(name: str) -> None:
    assert check_username(name) == name


@pytest.mark.parametrize("name", ["", "a:b", "a b", "#a", "a\tb", "x" * 256, "a\nb"])
def test_username_refused(name: str) -> None:
    with pytest.raises(UsageError):
        check_username(name)


def test_passwd_command_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
    assert cli.main(["passwd", "bob"]) == 0
    line = capsys.readouterr().out.strip()
    user, _, encoded = line.partition(":")
    assert user == "bob" and verify_password("hunter2", encoded)


def test_passwd_command_refuses_bad_input(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert cli.main(["passwd", "bob"]) == 2
    assert "password must not be empty" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert cli.main(["passwd", "a:b"]) == 2


def test_users_file_checks_and_reloads(tmp_path: Path) -> None:
    path = _users_file(tmp_path, "broken line", "bob:$2y$05$bcrypt", "")
    users = UsersFile(path)
    assert users.users() == [USER]
    assert users.check(USER, PASSWORD)
    assert users.check(USER, PASSWORD)  # from the cache of verified logins
    assert not users.check(USER, "wrong")
    assert not users.check("nobody", PASSWORD)
    assert not users.check("bob", "x")
    # a new user shows up without a restart; a removed one is gone
    path.write_text(passwd_line("carol", "pw") + "\n")
    assert users.users() == ["carol"]
    assert users.check("carol", "pw")
    assert not users.check(USER, PASSWORD)
    path.unlink()
    assert users.users() == []


# ================================================================================ tokens


def test_token_roundtrip_and_claims() -> None:
    signer = TokenSigner(b"k" * 32)
    token = signer.issue("alice", [Scope("repository", "a/b", ("pull", "push"))], 60)
    header, payload, _ = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "alice" and claims["aud"] == "turbofs" and claims["iss"] == "turbofs"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}]
    verified = signer.verify(token)
    assert verified.sub == "alice"
    assert verified.allows(Access("repository", "a/b", "push"))
    assert verified.allows(Access("repository", "a/b", "delete"))  # push covers delete
    assert not verified.allows(Access("repository", "a/c", "pull"))
    assert not verified.allows(Access("registry", "catalog", "*"))


def test_token_forgery_and_expiry_are_refused() -> None:
    now = [1_000_000.0]
    signer = TokenSigner(b"k" * 32, clock=lambda: now[0])
    token = signer.issue("", [Scope("repository", "a", ("pull",))], 60)
    signer.verify(token)
    header, payload, sig = token.split(".")
    forged_claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged_claims["access"][0]["actions"] = ["push"]
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).decode().rstrip("=")
    none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').decode().rstrip("=")
    for bad in (
        f"{header}.{forged}.{sig}",  # changed claims
        f"{none_header}.{payload}.",  # alg none
        f"{header}.{payload}",  # not three parts
        "garbage",
        TokenSigner(b"o" * 32, clock=lambda: now[0]).issue("", [], 60),  # another key
        "x" * 20000,
    ):
        with pytest.raises(InvalidToken):
            signer.verify(bad)
    now[0] += 59
    signer.verify(token)
    now[0] += 1
    with pytest.raises(InvalidToken, match="expired"):
        signer.verify(token)


def test_refresh_tokens_are_not_access_tokens() -> None:
    signer = TokenSigner(b"k" * 32)
    refresh = signer.issue("alice", [], 600, kind="refresh")
    assert signer.verify(refresh, kind="refresh").sub == "alice"
    with pytest.raises(InvalidToken):
        signer.verify(refresh)
    with pytest.raises(InvalidToken):
        signer.verify(signer.issue("alice", [], 600), kind="refresh")
    with pytest.raises(UsageError):
        TokenSigner(b"short")


def test_token_key_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    cfg = RegistryConfig(storage=tmp_path / "storage")
    key = load_token_key(cfg)
    path = tmp_path / "storage" / "token.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token_key(cfg) == key
    assert [p.name for p in path.parent.iterdir()] == ["token.key"]  # no temporary left
    own = tmp_path / "keys" / "signing"
    cfg2 = RegistryConfig(storage=tmp_path / "storage", token_key_file=own)
    assert load_token_key(cfg2) != key and own.exists()
    own.write_bytes(b"short")
    with pytest.raises(UsageError, match="too short"):
        load_token_key(cfg2)


# ========================================================================= scope rules


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/", None),
        ("GET", "/v2", None),
        ("GET", "/v2/_catalog", Access("registry", "catalog", "*")),
        ("GET", "/v2/a/b/manifests/latest", Access("repository", "a/b", "pull")),
        ("HEAD", "/v2/a/blobs/sha256:00", Access("repository", "a", "pull")),
        ("GET", "/v2/a/b/c/tags/list", Access("repository", "a/b/c", "pull")),
        ("GET", "/v2/a/referrers/sha256:00", Access("repository", "a", "pull")),
        ("PUT", "/v2/a/b/manifests/v1", Access("repository", "a/b", "push")),
        ("POST", "/v2/a/b/blobs/uploads/", Access("repository", "a/b", "push")),
        ("PATCH", "/v2/a/b/blobs/uploads/u1", Access("repository", "a/b", "push")),
        ("PUT", "/v2/a/b/blobs/uploads/u1", Access("repository", "a/b", "push")),
        ("GET", "/v2/a/b/blobs/uploads/u1", Access("repository", "a/b", "pull")),
        ("DELETE", "/v2/a/manifests/sha256:00", Access("repository", "a", "delete")),
        ("DELETE", "/v2/a/blobs/uploads/u1", Access("repository", "a", "delete")),
        ("POST", "/v2/a/b/_turbofs/batch", Access("repository", "a/b", "pull")),
        ("POST", "/v2/a/b/_turbofs/missing", Access("repository", "a/b", "push")),
        ("POST", "/v2/a/b/_turbofs/convert", Access("repository", "a/b", "push")),
        ("GET", "/v2/a/b/_turbofs/convert/0abc", Access("repository", "a/b", "push")),
        # names hold the section words; the last section wins
        ("GET", "/v2/x/manifests/y/blobs/sha256:00", Access("repository", "x/manifests/y", "pull")),
        ("PUT", "/v2/x/_turbofs/batch/manifests/t", Access("repository", "x/_turbofs/batch", "push")),
        ("GET", "/v2/_turbofs/info", None),
        ("GET", "/v2/nothing-here", None),
    ],
)
def test_required_access(method: str, path: str, expected: Access | None) -> None:
    assert required_access(method, path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a/b/manifests/latest",
        "/v2/a/blobs/sha256:00",
        "/v2/a/b/c/tags/list",
        "/v2/a/b/blobs/uploads/",
        "/v2/a/b/blobs/uploads/u1",
        "/v2/a/referrers/sha256:00",
        "/v2/x/manifests/y/blobs/sha256:00",
        "/v2/evil/manifests/x/tags/list",
        "/v2/a/blobs/uploads/x/manifests/t",
        "/v2/a/tags/list/manifests/t",
    ],
)
def test_required_access_names_the_routers_repository(path: str) -> None:
    """The gate and the handler must agree on the repository a path names."""
    from server.app import parse_v2_path

    route = parse_v2_path(path)
    access = required_access("GET", path)
    assert route is not None and access is not None
    assert access.name == route.name


def test_scope_parsing() -> None:
    assert Scope.parse("repository:a/b:pull,push") == Scope("repository", "a/b", ("pull", "push"))
    assert Scope.parse("repository(plugin):a:pull") == Scope("repository", "a", ("pull",))
    assert Scope.parse("repository:host:5000/a:pull").name == "host:5000/a"
    assert Scope.parse("registry:catalog:*") == Scope("registry", "catalog", ("*",))
    assert str(Scope("repository", "a", ("pull", "push"))) == "repository:a:pull,push"
    scopes = parse_scopes(["repository:a:pull repository:b:push", "bogus", "repository:c:pull"])
    assert [s.name for s in scopes] == ["a", "b", "c"]


def test_policy_grants() -> None:
    push_closed = Policy(RegistryConfig(push_auth=True, users_file=Path("u")))
    want = [Scope("repository", "a", ("pull", "push")), Scope("registry", "catalog", ("*",))]
    assert push_closed.grant(None, want) == [
        Scope("repository", "a", ("pull",)),
        Scope("registry", "catalog", ("*",)),
    ]
    assert push_closed.grant("alice", want) == want
    assert push_closed.grant(None, [Scope("repository", "a", ("*",))]) == [Scope("repository", "a", ("pull",))]
    assert push_closed.grant(None, [Scope("other", "x", ("pull",))]) == []
    all_closed = Policy(RegistryConfig(push_auth=True, pull_auth=True, users_file=Path("u")))
    assert all_closed.grant(None, want) == []
    assert all_closed.grant("alice", [Scope("repository", "a", ("delete",))]) == [
        Scope("repository", "a", ("delete",))
    ]


def test_push_needs_auth_off_loopback() -> None:
    assert not RegistryConfig().push_needs_auth
    assert RegistryConfig(host="0.0.0.0").push_needs_auth
    assert not RegistryConfig(host="0.0.0.0", push_auth=False).push_needs_auth
    assert RegistryConfig(push_auth=True).push_needs_auth
    with pytest.raises(UsageError, match="no users file"):
        RegistryConfig(host="0.0.0.0").validate()


def test_parse_challenges() -> None:
    got = parse_challenges(
        [
            'Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull,push",error="insufficient_scope"',
            'Basic realm="x y", Negotiate abc123, Bearer realm="r\\"q"',
        ]
    )
    assert [c.scheme for c in got] == ["bearer", "basic", "negotiate", "bearer"]
    assert got[0].params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a:pull,push",
        "error": "insufficient_scope",
    }
    assert got[1].params == {"realm": "x y"}
    assert got[3].params == {"realm": 'r"q'}
    assert parse_challenges(["Basic"]) == [parse_challenges(["basic"])[0]]


# ========================================================================= credentials


def _auth_json(path: Path, auths: dict[str, Any], **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **extra}))
    return path


def test_credentials_from_docker_config(tmp_path: Path) -> None:
    b64 = base64.b64encode(b"u1:p:1").decode()
    cfg = _auth_json(
        tmp_path / "config.json",
        {
            "reg.example:5000": {"auth": b64},
            "https://index.docker.io/v1/": {"username": "hub", "password": "hubpw"},
            "other.example": {"auth": "!!not base64"},
            "reg.example:5000/team": {"auth": base64.b64encode(b"team:tp").decode()},
        },
        credHelpers={"gcr.io": "gcloud"},
    )
    assert credentials_from_auth_file("reg.example:5000", cfg) == Credentials("u1", "p:1")
    assert credentials_from_auth_file("reg.example:5000", cfg, "team/app") == Credentials("team", "tp")
    assert credentials_from_auth_file("registry-1.docker.io", cfg) == Credentials("hub", "hubpw")
    assert credentials_from_auth_file("other.example", cfg) is None
    assert credentials_from_auth_file("gcr.io", cfg) is None  # helpers are not run
    assert credentials_from_auth_file("reg.example:5000", tmp_path / "missing.json") is None


def test_lookup_credentials_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker = _auth_json(tmp_path / "docker" / "config.json", {"h:1": {"username": "d", "password": "dp"}})
    containers = _auth_json(tmp_path / "auth.json", {"h:1": {"username": "c", "password": "cp"}})
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(docker.parent))
    assert lookup_credentials("h:1") == Credentials("d", "dp")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(containers))
    assert lookup_credentials("h:1") == Credentials("c", "cp")
    assert lookup_credentials("h:1", explicit="x:y") == Credentials("x", "y")
    assert lookup_credentials("h:2") is None
    assert Credentials.parse("u:p:q") == Credentials("u", "p:q")
    with pytest.raises(UsageError):
        Credentials.parse("nocolon")
    assert "p:q" not in repr(Credentials("u", "p:q"))


def test_auth_for_registry_prompts_for_a_missing_password() -> None:
    auth = auth_for_registry("h:1", "bob", prompt=lambda _msg: "pw")
    assert auth.credentials_for("h:1") == Credentials("bob", "pw")


# ================================================================ the app, in process


@contextlib.asynccontextmanager
async def _registry(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[str, Any]]:
    """The real registry app on a free loopback port: (base URL, app)."""
    from server.app import start

    settings.setdefault("users_file", _users_file(tmp_path))
    cfg = RegistryConfig(host="127.0.0.1", port=0, storage=tmp_path / "storage", **settings).validate()
    runner, port = await start(cfg)
    try:
        yield f"http://127.0.0.1:{port}", runner.app
    finally:
        await runner.cleanup()


def test_push_needs_a_token_pull_is_open(tmp_path: Path) -> None:
    async def go() -> None:
        async with _registry(tmp_path, push_auth=True) as (base, _app), httpx.AsyncClient(base_url=base) as c:
            host = base.removeprefix("http://")
            # a push without credentials: 401, the challenge, the OCI error body
            r = await c.post("/v2/team/app/blobs/uploads/")
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == (
                f'Bearer realm="http://{host}/token",service="turbofs",scope="repository:team/app:pull,push"'
            )
            assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
            # /v2/ itself asks for any credentials (clients learn the realm there)
            r = await c.get("/v2/")
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == f'Bearer realm="http://{host}/token",service="turbofs"'
            # pulls are open
            r = await c.get("/v2/team/app/manifests/latest")
            assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
            r = await c.head("/v2/team/app/manifests/latest")
            assert r.status_code == 404
            r = await c.put("/v2/team/app/manifests/latest", content=b"{}")
            assert r.status_code == 401 and r.headers["docker-distribution-api-version"] == "registry/2.0"
            r = await c.delete("/v2/team/app/manifests/latest")
            assert r.status_code == 401 and 'scope="repository:team/app:delete"' in r.headers["www-authenticate"]

            # an anonymous token carries the pull only
            r = await c.get("/token", params={"service": "turbofs", "scope": "repository:team/app:pull,push"})
            assert r.status_code == 200
            body = r.json()
            assert body["token"] == body["access_token"] and body["expires_in"] == 3600
            assert body["issued_at"].endswith("Z")
            anon = body["token"]
            r = await c.get("/v2/", headers=_bearer(anon))
            assert r.status_code == 200
            r = await c.post("/v2/team/app/blobs/uploads/", headers=_bearer(anon))
            assert r.status_code == 401
            assert r.headers["www-authenticate"].endswith(',error="insufficient_scope"')

            # a user's token carries pull and push
            r = await c.get(
                "/token",
                params=[("service", "turbofs"), ("scope", "repository:team/app:pull,push"), ("scope", "repository:other:pull")],
                headers=_basic(USER, PASSWORD),
            )
            assert r.status_code == 200 and r.json()["scope"] == "repository:team/app:pull,push repository:other:pull"
            token = r.json()["token"]
            data = b"layer bytes"
            r = await c.post(f"/v2/team/app/blobs/uploads/?digest={_blob(data)}", content=data, headers=_bearer(token))
            assert r.status_code == 201
            r = await c.post(f"/v2/elsewhere/blobs/uploads/?digest={_blob(data)}", content=data, headers=_bearer(token))
            assert r.status_code == 401  # the token names team/app only
            r = await c.head(f"/v2/team/app/blobs/{_blob(data)}")
            assert r.status_code == 200

            # wrong passwords and unknown users get nothing
            for user, password in ((USER, "wrong"), ("mallory", PASSWORD), ("", "")):
                r = await c.get("/token", params={"scope": "repository:team/app:push"}, headers=_basic(user, password))
                assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="turbofs"'
            r = await c.get("/token", headers={"Authorization": "Bearer x"})
            assert r.status_code == 401

            # HTTP Basic straight on /v2 requests
            r = await c.post("/v2/team/app/blobs/uploads/", headers=_basic(USER, PASSWORD))
            assert r.status_code == 202
            r = await c.post("/v2/team/app/blobs/uploads/", headers=_basic(USER, "wrong"))
            assert r.status_code == 401
            r = await c.post("/v2/team/app/blobs/uploads/", headers=_bearer("not.a.token"))
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]

    _run(go)


def test_expired_token_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with _registry(tmp_path, push_auth=True, token_ttl=30) as (base, app), httpx.AsyncClient(base_url=base) as c:
            auth = app[AUTH_KEY]
            r = await c.get("/token", params={"scope": "repository:a:push"}, headers=_basic(USER, PASSWORD))
            assert r.json()["expires_in"] == 30
            token = r.json()["token"]
            assert (await c.post("/v2/a/blobs/uploads/", headers=_bearer(token))).status_code == 202
            auth.signer.clock = lambda: time.time() + 31
            r = await c.post("/v2/a/blobs/uploads/", headers=_bearer(token))
            assert r.status_code == 401
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
            assert "expired" in r.json()["errors"][0]["message"]

    _run(go)


def test_pull_auth(tmp_path: Path) -> None:
    async def go() -> None:
        async with _registry(tmp_path, push_auth=True, pull_auth=True) as (base, _app), httpx.AsyncClient(base_url=base) as c:
            r = await c.get("/v2/a/manifests/v1")
            assert r.status_code == 401 and 'scope="repository:a:pull"' in r.headers["www-authenticate"]
            r = await c.head("/v2/a/manifests/v1")
            assert r.status_code == 401 and r.content == b""
            r = await c.get("/v2/_catalog")
            assert r.status_code == 401 and 'scope="registry:catalog:*"' in r.headers["www-authenticate"]
            r = await c.post("/v2/a/_turbofs/batch", json={})
            assert r.status_code == 401 and 'scope="repository:a:pull"' in r.headers["www-authenticate"]
            r = await c.get("/token", params={"scope": "repository:a:pull"})
            assert r.status_code == 200 and r.json()["scope"] == ""
            assert (await c.get("/v2/a/manifests/v1", headers=_bearer(r.json()["token"]))).status_code == 401
            r = await c.get(
                "/token", params=[("scope", "repository:a:pull"), ("scope", "registry:catalog:*")], headers=_basic(USER, PASSWORD)
            )
            token = r.json()["token"]
            assert (await c.get("/v2/a/manifests/v1", headers=_bearer(token))).status_code == 404
            r = await c.get("/v2/_catalog", headers=_bearer(token))
            assert r.status_code == 200 and r.json() == {"repositories": []}

    _run(go)


def test_turbofs_extensions_follow_pull_and_push(tmp_path: Path) -> None:
    async def go() -> None:
        async with _registry(tmp_path, push_auth=True) as (base, _app), httpx.AsyncClient(base_url=base) as c:
            # a batch fetch is a read: open when pulls are
            r = await c.post("/v2/a/_turbofs/batch", json={"ranges": []})
            assert r.status_code != 401
            for op in ("missing", "convert"):
                r = await c.post(f"/v2/a/_turbofs/{op}", json={})
                assert r.status_code == 401 and 'scope="repository:a:pull,push"' in r.headers["www-authenticate"]
                r = await c.post(f"/v2/a/_turbofs/{op}", json={}, headers=_basic(USER, PASSWORD))
                assert r.status_code != 401

    _run(go)


def test_oauth2_token_form(tmp_path: Path) -> None:
    async def go() -> None:
        async with _registry(tmp_path, push_auth=True) as (base, _app), httpx.AsyncClient(base_url=base) as c:
            form = {
                "grant_type": "password",
                "username": USER,
                "password": PASSWORD,
                "service": "turbofs",
                "client_id": "containerd-client",
                "scope": "repository:a:pull,push repository:b:pull",
                "access_type": "offline",
            }
            r = await c.post("/token", data=form)
            assert r.status_code == 200
            body = r.json()
            assert body["scope"] == "repository:a:pull,push repository:b:pull"
            assert (await c.post("/v2/a/blobs/uploads/", headers=_bearer(body["access_token"]))).status_code == 202
            refresh = body["refresh_token"]
            assert (await c.post("/v2/a/blobs/uploads/", headers=_bearer(refresh))).status_code == 401
            r = await c.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh, "scope": "repository:a:push"})
            assert r.status_code == 200 and r.json()["scope"] == "repository:a:push"
            assert r.json()["refresh_token"] == refresh
            r = await c.post("/token", data={**form, "password": "wrong"})
            assert r.status_code == 401 and r.json()["error"] == "invalid_grant"
            r = await c.post("/token", data={"grant_type": "refresh_token", "refresh_token": body["access_token"]})
            assert r.status_code == 401
            r = await c.post("/token", data={"grant_type": "authorization_code"})
            assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"

    _run(go)


def test_nothing_protected_installs_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with _registry(tmp_path, users_file=None) as (base, app), httpx.AsyncClient(base_url=base) as c:
            assert AUTH_KEY not in app
            assert (await c.get("/v2/")).status_code == 200
            assert (await c.post("/v2/a/blobs/uploads/")).status_code == 202
            assert (await c.get("/token")).status_code == 404
            assert not (tmp_path / "storage" / "token.key").exists()

    _run(go)


def test_registry_auth_async_client(tmp_path: Path) -> None:
    now = [0.0]
    auth = RegistryAuth(Credentials(USER, PASSWORD), clock=lambda: now[0])

    def token_fetches(r: httpx.Response) -> int:
        return sum(1 for h in r.history if h.request.url.path == "/token")

    async def go() -> None:
        async with _registry(tmp_path, push_auth=True, pull_auth=True) as (base, _app), httpx.AsyncClient(base_url=base, auth=auth) as c:
            data = b"some layer"
            r = await c.post(f"/v2/team/app/blobs/uploads/?digest={_blob(data)}", content=data)
            assert r.status_code == 201 and token_fetches(r) == 1 and len(r.history) == 2
            # cached: a second push of the same repository sends the token straight away
            r = await c.post(f"/v2/team/app/blobs/uploads/?digest={_blob(data)}", content=data)
            assert r.status_code == 201 and r.history == []
            # another action on the repository: a token asked for up front (the host is known)
            r = await c.get(f"/v2/team/app/blobs/{_blob(data)}")
            assert r.status_code == 200 and r.content == data and token_fetches(r) == 1 and len(r.history) == 1
            # a streamed upload gets its token before the body goes out
            async def body() -> AsyncIterator[bytes]:
                yield b"streamed"

            r = await c.post(f"/v2/team/app/blobs/uploads/?digest={_blob(b'streamed')}", content=body())
            assert r.status_code == 201 and r.history == []
            # expired tokens are fetched anew
            now[0] += 3600
            r = await c.get(f"/v2/team/app/blobs/{_blob(data)}")
            assert r.status_code == 200 and token_fetches(r) == 1
            # the ping works too
            assert (await c.get("/v2/")).status_code == 200

        async with _registry(tmp_path / "second", push_auth=True) as (base, _app):
            async with httpx.AsyncClient(base_url=base, auth=RegistryAuth(Credentials(USER, "wrong"))) as c:
                with pytest.raises(AuthError, match="refused user 'alice'"):
                    await c.post("/v2/a/blobs/uploads/")
            async with httpx.AsyncClient(base_url=base, auth=RegistryAuth()) as c:
                r = await c.post("/v2/a/blobs/uploads/")
                assert r.status_code == 401 and "insufficient_scope" in r.headers["www-authenticate"]
                assert (await c.get("/v2/")).status_code == 200  # anonymous token

    (tmp_path / "second").mkdir()
    _run(go)


# ------------------------------------------------------------- sync client, mock registry


class _MockRegistry(httpx.BaseTransport):
    """A registry as an httpx transport: bearer (or basic) auth; counts token requests.

    Unlike ``httpx.MockTransport`` it reads a request body only when it accepts the request,
    as a real server answering 401 early does, so a streamed body stays unread.
    """

    def __init__(self, *, scheme: str = "bearer", realm: str = "https://auth.example/token") -> None:
        self.scheme = scheme
        self.realm = realm
        self.token_requests: list[httpx.Request] = []
        self.issued = 0
        self.seen_bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            self.token_requests.append(request)
            if request.headers.get("authorization") != Credentials("u", "p").basic_header():
                return httpx.Response(401, json={"details": "bad login"})
            self.issued += 1
            return httpx.Response(200, json={"token": f"T{self.issued}", "expires_in": 300})
        want = f"Bearer T{self.issued}" if self.scheme == "bearer" else Credentials("u", "p").basic_header()
        if request.headers.get("authorization") != want or (self.scheme == "bearer" and not self.issued):
            challenge = (
                f'Bearer realm="{self.realm}",service="mock",scope="repository:a:pull"'
                if self.scheme == "bearer"
                else 'Basic realm="mock"'
            )
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        self.seen_bodies.append(request.read())
        return httpx.Response(200, content=b"ok")


def test_registry_auth_sync_client_bearer() -> None:
    mock = _MockRegistry()
    with httpx.Client(transport=mock, auth=RegistryAuth(Credentials("u", "p"))) as c:
        r = c.get("https://reg.example/v2/a/manifests/v1")
        assert r.status_code == 200 and r.content == b"ok"
        (token_request,) = mock.token_requests
        assert token_request.url.params.get_list("scope") == ["repository:a:pull"]
        assert token_request.url.params["service"] == "mock"
        assert c.get("https://reg.example/v2/a/manifests/v1").status_code == 200
        assert len(mock.token_requests) == 1
    # a body that cannot be sent twice is not: the 401 goes back to the caller, and the
    # caller's retry carries a token from the start
    mock = _MockRegistry()
    with httpx.Client(transport=mock, auth=RegistryAuth(Credentials("u", "p"))) as c:
        r = c.put("https://reg.example/v2/a/manifests/v1", content=iter([b"stream"]))
        assert r.status_code == 401 and mock.token_requests == [] and mock.seen_bodies == []
        r = c.put("https://reg.example/v2/a/manifests/v1", content=iter([b"stream"]))
        assert r.status_code == 200 and len(r.history) == 1 and mock.seen_bodies == [b"stream"]
        # a token the server no longer takes is replaced once
        mock.issued += 1
        r = c.put("https://reg.example/v2/a/manifests/v1", content=b"again")
        assert r.status_code == 200 and len(mock.token_requests) == 2 and mock.seen_bodies[-1] == b"again"
        assert [h.status_code for h in r.history] == [401, 200]


def test_registry_auth_sync_client_refusals() -> None:
    mock = _MockRegistry()
    with httpx.Client(transport=mock, auth=RegistryAuth(Credentials("u", "bad"))) as c, pytest.raises(AuthError, match="bad login"):
        c.get("https://reg.example/v2/a/manifests/v1")
    insecure = _MockRegistry(realm="http://auth.example/token")
    with httpx.Client(transport=insecure, auth=RegistryAuth(Credentials("u", "p"))) as c, pytest.raises(AuthError, match="plain-http"):
        c.get("https://reg.example/v2/a/manifests/v1")
    assert insecure.token_requests == []


def test_registry_auth_sync_client_basic() -> None:
    mock = _MockRegistry(scheme="basic")
    with httpx.Client(transport=mock, auth=RegistryAuth(Credentials("u", "p"))) as c:
        r = c.put("https://reg.example/v2/a/manifests/v1", content=b"body")
        assert r.status_code == 200 and len(r.history) == 1 and mock.seen_bodies == [b"body"]
        r = c.put("https://reg.example/v2/a/manifests/v1", content=iter([b"x"]))  # sent with Basic up front
        assert r.status_code == 200 and r.history == []
    with httpx.Client(transport=mock, auth=RegistryAuth()) as c:
        assert c.get("https://reg.example/v2/a/manifests/v1").status_code == 401


# ======================================================= real clients, `turbofs serve`


@contextlib.contextmanager
def _turbofs_serve(tmp_path: Path, *flags: str) -> Iterator[str]:
    """``turbofs serve`` on a free loopback port with alice in its users file: HOST:PORT.

    Not ``turbofs_registry_factory``: this one passes the auth flags on the command line, and
    a registry with auth answers ``/v2/`` with 401, not the 200 that fixture waits for.
    """
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "turbofs.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--storage", str(tmp_path / "storage"), "--users", str(_users_file(tmp_path)), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"turbofs serve exited: {(tmp_path / 'serve.log').read_text()}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def _skopeo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def skopeo_env(tmp_path: Path) -> dict[str, str]:
    """An environment where skopeo finds no stored credentials of this machine."""
    auth = tmp_path / "empty-auth.json"
    auth.write_text("{}")
    return {**os.environ, "REGISTRY_AUTH_FILE": str(auth), "DOCKER_CONFIG": str(tmp_path / "no-docker")}


@pytest.fixture
def small_layout(tmp_path: Path) -> Path:
    layout = tmp_path / "src"
    write_oci_layout(layout, [[TarEntry("etc", "dir"), TarEntry("etc/motd", data=b"auth test\n")]])
    return layout


@needs_skopeo
def test_skopeo_push_needs_credentials(tmp_path: Path, small_layout: Path, skopeo_env: dict[str, str]) -> None:
    with _turbofs_serve(tmp_path, "--push-auth") as hostport:
        src, dest = f"oci:{small_layout}:latest", f"docker://{hostport}/team/app:v1"
        r = _skopeo("copy", "--dest-tls-verify=false", src, dest, env=skopeo_env)
        assert r.returncode != 0 and "unauthorized" in r.stderr.lower(), r.stderr
        r = _skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:wrong", src, dest, env=skopeo_env)
        assert r.returncode != 0 and "invalid username or password" in r.stderr, r.stderr
        r = _skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}", src, dest, env=skopeo_env)
        assert r.returncode == 0, r.stderr
        # pulls stay open
        r = _skopeo("inspect", "--tls-verify=false", dest, env=skopeo_env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["Name"] == f"{hostport}/team/app"


@needs_skopeo
def test_skopeo_pull_auth(tmp_path: Path, small_layout: Path, skopeo_env: dict[str, str]) -> None:
    with _turbofs_serve(tmp_path, "--push-auth", "--pull-auth") as hostport:
        ref = f"docker://{hostport}/team/app:v1"
        creds = f"{USER}:{PASSWORD}"
        r = _skopeo("copy", "--dest-tls-verify=false", "--dest-creds", creds, f"oci:{small_layout}:latest", ref, env=skopeo_env)
        assert r.returncode == 0, r.stderr
        r = _skopeo("inspect", "--tls-verify=false", ref, env=skopeo_env)
        assert r.returncode != 0 and "unauthorized" in r.stderr.lower(), r.stderr
        r = _skopeo("inspect", "--tls-verify=false", "--creds", creds, ref, env=skopeo_env)
        assert r.returncode == 0, r.stderr
        r = _skopeo("copy", "--src-tls-verify=false", "--src-creds", creds, ref, f"oci:{tmp_path / 'back'}:latest", env=skopeo_env)
        assert r.returncode == 0, r.stderr


@needs_skopeo
def test_ctr_push_with_user(tmp_path: Path, small_layout: Path, skopeo_env: dict[str, str]) -> None:
    from tests.containerd_fixtures import Containerd, require_containerd

    require_containerd()
    with _turbofs_serve(tmp_path, "--push-auth") as hostport, Containerd() as ctrd:
        src, dst = f"{hostport}/team/app:v1", f"{hostport}/team/copy:v1"
        r = _skopeo(
            "copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
            f"oci:{small_layout}:latest", f"docker://{src}", env=skopeo_env,
        )
        assert r.returncode == 0, r.stderr
        ctrd.ctr("images", "pull", "--plain-http", src)  # anonymous: pulls are open
        ctrd.ctr("images", "tag", src, dst)
        denied = ctrd.ctr("images", "push", "--plain-http", dst, check=False)
        assert denied.returncode != 0 and "insufficient_scope" in denied.stderr, denied.stderr
        wrong = ctrd.ctr("images", "push", "--plain-http", "--user", f"{USER}:wrong", dst, check=False)
        assert wrong.returncode != 0 and "401" in wrong.stderr, wrong.stderr
        ctrd.ctr("images", "push", "--plain-http", "--user", f"{USER}:{PASSWORD}", dst)
        r = _skopeo("inspect", "--tls-verify=false", f"docker://{dst}", env=skopeo_env)
        assert r.returncode == 0, r.stderr
