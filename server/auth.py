"""Registry authentication: users, signed bearer tokens, the ``/token`` endpoint, the gate.

The Docker/Distribution token flow with the registry as its own token service (docs/api.md,
"Authentication"); ``POST /token`` takes the OAuth2 form containerd tries first too.

- **Users**: ``RegistryConfig.users_file``, one ``user:HASH`` line each (:func:`hash_password`:
  scrypt, random salt), read again when it changes.
- **Tokens**: JWTs signed with HMAC-SHA256 (:class:`TokenSigner`) under a key in
  ``token_key_file`` or ``<storage>/token.key`` (32 random bytes, 0600, made on first start);
  the ``access`` claim lists ``{"type", "name", "actions"}``.
- **Rights** (:class:`Policy`): a user may pull, push and delete anything; anyone may pull
  unless ``pull_auth`` and push unless ``push_needs_auth``. A token grants only the requested
  actions the requester may have.
- **The gate** (:func:`setup`'s middleware) maps each ``/v2`` request to its action
  (:func:`turbofs.core.auth.required_access`, shared with the client) and lets it through if
  open to anyone or allowed by its token or Basic credentials; else ``401`` with the challenge
  and ``UNAUTHORIZED``. ``/v2/`` needs any valid credentials; other paths are not gated.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from server.errors import Unauthorized, error_response
from server.offload import offload
from turbofs.core.auth import (
    ALL,
    CATALOG,
    DELETE,
    PULL,
    PUSH,
    REGISTRY,
    REPOSITORY,
    Access,
    Scope,
    covers,
    parse_scopes,
    required_access,
)
from turbofs.core.config import (
    MAX_TOKEN_LENGTH,
    REFRESH_TOKEN_TTL,
    SCRYPT_LOG_N,
    SCRYPT_MAX_LOG_N,
    SCRYPT_P,
    SCRYPT_R,
    TOKEN_KEY_SIZE,
    TOKEN_MIN_KEY_SIZE,
    VERIFIED_LOGINS_CACHE,
    RegistryConfig,
)
from turbofs.core.errors import UsageError

log = logging.getLogger("turbofs.registry.auth")

SERVICE: Final = "turbofs"
ISSUER: Final = "turbofs"
TOKEN_PATH: Final = "/token"
KEY_FILE_NAME: Final = "token.key"
_SALT_SIZE: Final = 16
_HASH_SIZE: Final = 32

USER_KEY: Final = web.RequestKey("turbofs_user", str)
"""The authenticated user of a request (``""`` for anonymous), set by the gate."""


# -- passwords --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=_HASH_SIZE, maxmem=128 * r * (n + p + 2) + (1 << 20)
    )


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    """``$scrypt$ln=15,r=8,p=1$SALT$HASH`` (PHC string form, base64 without padding)."""
    if not password:
        raise UsageError("the password must not be empty")
    salt = secrets.token_bytes(_SALT_SIZE)
    digest = _scrypt(password, salt, log_n, SCRYPT_R, SCRYPT_P)
    return f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


_SCRYPT_RE: Final = re.compile(r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")


def is_supported_hash(encoded: str) -> bool:
    m = _SCRYPT_RE.match(encoded)
    return m is not None and 1 <= int(m[1]) <= SCRYPT_MAX_LOG_N and 1 <= int(m[2]) <= 32 and 1 <= int(m[3]) <= 16


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a hash from :func:`hash_password` (constant-time compare)."""
    m = _SCRYPT_RE.match(encoded)
    if m is None or not is_supported_hash(encoded):
        return False
    try:
        salt, want = _unb64(m[4]), _unb64(m[5])
    except (binascii.Error, ValueError):
        return False
    got = _scrypt(password, salt, int(m[1]), int(m[2]), int(m[3]))
    return hmac.compare_digest(got, want)


_USERNAME_RE: Final = re.compile(r"^[^\s:#\x00-\x1f\x7f][^\s:\x00-\x1f\x7f]{0,254}$")


def check_username(user: str) -> str:
    """A user name for the users file: 1-255 characters, no colon, whitespace or control."""
    if not _USERNAME_RE.match(user):
        raise UsageError(
            f"invalid user name {user!r}: 1-255 characters without ':', spaces or control characters, "
            "not starting with '#'"
        )
    return user


def passwd_line(user: str, password: str) -> str:
    """The users-file line ``user:HASH`` (what ``turbofs passwd USER`` prints)."""
    return f"{check_username(user)}:{hash_password(password)}"


# A hash of a random password, verified for unknown users so that a wrong user name takes
# as long as a wrong password.
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


class UsersFile:
    """The users file, read again whenever it changes (mtime, size or inode).

    Its methods block (file reads, scrypt): the gate calls them through ``offload``, so
    ``_lock`` guards the parsed users and the cache of verified logins against worker threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._secret = secrets.token_bytes(32)
        self._verified: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def _reload(self) -> None:
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._stamp != (0, 0, 0):
                log.warning("users file %s does not exist: nobody can log in", self.path)
            self._stamp, self._users = (0, 0, 0), {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        users: dict[str, str] = {}
        for lineno, raw in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, encoded = line.partition(":")
            if not sep or not _USERNAME_RE.match(user):
                log.warning("%s:%d: not a user:hash line, ignored", self.path, lineno)
                continue
            if not is_supported_hash(encoded):
                log.warning(
                    "%s:%d: user %r has an unsupported password hash (make one with "
                    "'turbofs passwd %s'), ignored", self.path, lineno, user, user,
                )
                continue
            users[user] = encoded
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("users file %s is writable by others than its owner", self.path)
        self._stamp, self._users = stamp, users
        self._verified.clear()
        log.info("users file %s: %d users", self.path, len(users))

    def users(self) -> list[str]:
        self._reload()
        return sorted(self._users)

    def exists(self, user: str) -> bool:
        self._reload()
        return user in self._users

    def check(self, user: str, password: str) -> bool:
        """Whether the user exists and the password is right (slow: scrypt, unless cached)."""
        with self._lock:
            self._reload_locked()
            encoded = self._users.get(user)
            key = b""
            if encoded is not None:
                key = hmac.digest(self._secret, b"\0".join((user.encode(), password.encode(), encoded.encode())), "sha256")
                if key in self._verified:
                    self._verified.move_to_end(key)
                    return True
        if encoded is None:
            verify_password(password, _dummy_hash())
            return False
        if not verify_password(password, encoded):
            return False
        with self._lock:
            self._verified[key] = None
            while len(self._verified) > VERIFIED_LOGINS_CACHE:
                self._verified.popitem(last=False)
        return True


# -- tokens -----------------------------------------------------------------------------


class InvalidToken(Exception):
    """A bearer token that is malformed, forged, expired or of the wrong kind."""


@dataclass(frozen=True)
class TokenClaims:
    sub: str
    iat: float
    exp: float
    access: tuple[Scope, ...]
    kind: str = "access"  # or "refresh"

    def allows(self, access: Access) -> bool:
        return any(
            s.type == access.type and s.name == access.name and covers(s.actions, access.action)
            for s in self.access
        )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_JWT_HEADER: Final = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())


class TokenSigner:
    """Issues and checks compact JWTs (HS256) with the claims of the Distribution token spec."""

    def __init__(
        self,
        key: bytes,
        *,
        service: str = SERVICE,
        issuer: str = ISSUER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < TOKEN_MIN_KEY_SIZE:
            raise UsageError(f"the token signing key must have at least {TOKEN_MIN_KEY_SIZE} bytes")
        self._key = key
        self.service = service
        self.issuer = issuer
        self.clock = clock

    def _sign(self, signing_input: str) -> str:
        return _b64url(hmac.digest(self._key, signing_input.encode("ascii"), "sha256"))

    def issue(self, sub: str, access: Iterable[Scope], ttl: float, *, kind: str = "access") -> str:
        now = self.clock()
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": self.service,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_urlsafe(12),
            "access": [s.to_json() for s in access],
        }
        if kind != "access":
            claims["kind"] = kind
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{_JWT_HEADER}.{payload}"
        return f"{signing_input}.{self._sign(signing_input)}"

    def verify(self, token: str, *, kind: str = "access") -> TokenClaims:
        """The claims of a token this signer issued; :class:`InvalidToken` otherwise."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("malformed token")
        header_b64, payload_b64, signature = parts
        if not hmac.compare_digest(self._sign(f"{header_b64}.{payload_b64}"), signature):
            raise InvalidToken("bad token signature")
        try:
            header = json.loads(_unb64url(header_b64))
            claims = json.loads(_unb64url(payload_b64))
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed token") from None
        if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
            raise InvalidToken("malformed token")
        if claims.get("iss") != self.issuer or claims.get("aud") != self.service:
            raise InvalidToken("token for another service")
        if claims.get("kind", "access") != kind:
            raise InvalidToken(f"not an {kind} token")
        now = self.clock()
        try:
            exp, iat, nbf = float(claims["exp"]), float(claims["iat"]), float(claims.get("nbf", 0))
            sub = str(claims["sub"])
            access = tuple(
                Scope(str(a["type"]), str(a["name"]), tuple(str(x) for x in a["actions"]))
                for a in claims.get("access") or []
            )
        except (KeyError, TypeError, ValueError):
            raise InvalidToken("malformed token claims") from None
        if now >= exp:
            raise InvalidToken("token expired")
        if nbf > now + 60:
            raise InvalidToken("token not valid yet")
        return TokenClaims(sub=sub, iat=iat, exp=exp, access=access, kind=kind)


def token_key_path(cfg: RegistryConfig) -> Path:
    return Path(cfg.token_key_file) if cfg.token_key_file else Path(cfg.storage) / KEY_FILE_NAME


def load_token_key(cfg: RegistryConfig) -> bytes:
    """The signing key: read from its file, or made (32 random bytes, mode 0600) if absent.

    Creation is atomic (a temporary file linked into place), so registries sharing a key file
    that start together agree on one key.
    """
    path = token_key_path(cfg)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(TOKEN_KEY_SIZE))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                log.info("made token signing key %s", path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
        key = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read token signing key {path}: {exc.strerror}") from None
    if len(key) < TOKEN_MIN_KEY_SIZE:
        raise UsageError(f"token signing key {path} is too short ({len(key)} bytes, at least {TOKEN_MIN_KEY_SIZE})")
    if path.stat().st_mode & 0o077:
        log.warning("token signing key %s is readable by others than its owner (chmod 600)", path)
    return key


# -- policy -----------------------------------------------------------------------------

_REPO_ACTIONS: Final = (PULL, PUSH, DELETE)


class Policy:
    """Who may do what: users everything; anyone what the configuration leaves open."""

    def __init__(self, cfg: RegistryConfig) -> None:
        self.pull_open = not cfg.pull_auth
        self.push_open = not cfg.push_needs_auth

    @property
    def anything_protected(self) -> bool:
        return not (self.pull_open and self.push_open)

    def open(self, access: Access) -> bool:
        """Whether anyone, without credentials, may do ``access``."""
        return covers(self.allowed(None, access.type, access.name), access.action)

    def allowed(self, user: str | None, rtype: str, name: str) -> tuple[str, ...]:
        """The actions ``user`` (None: anonymous) may take on a resource; ``*`` means all."""
        if rtype == REPOSITORY:
            if user is not None or (self.pull_open and self.push_open):
                return (ALL,)
            return (PULL,) if self.pull_open else (PUSH, DELETE) if self.push_open else ()
        if rtype == REGISTRY and name == CATALOG:
            return (ALL,) if user is not None or self.pull_open else ()
        return ()

    def grant(self, user: str | None, scopes: Sequence[Scope]) -> list[Scope]:
        """The requested scopes cut down to what ``user`` may have (empty ones dropped)."""
        out: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            may = self.allowed(user, scope.type, scope.name)
            if not may:
                continue
            acts = out.setdefault((scope.type, scope.name), [])
            for action in scope.actions:
                granted: list[str]
                if action == ALL and ALL not in may:
                    granted = [a for a in (*_REPO_ACTIONS, ALL) if a in may]
                elif covers(may, action):
                    granted = [action]
                else:
                    granted = []
                acts.extend(a for a in granted if a not in acts)
        return [Scope(t, n, tuple(a)) for (t, n), a in out.items() if a]


# -- the gate and the token endpoint ----------------------------------------------------

_HOST_RE: Final = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _basic(header: str) -> tuple[str, str] | None:
    """(user, password) from ``Basic BASE64``; None if the header is not Basic."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    user, _, password = raw.partition(":")
    return user, password


class Authenticator:
    """The auth state of one registry app: users, signer, policy; the middleware and endpoint."""

    def __init__(
        self,
        cfg: RegistryConfig,
        *,
        users: UsersFile | None = None,
        signer: TokenSigner | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = Policy(cfg)
        if users is None:
            if cfg.users_file is None:
                raise UsageError("authentication is required but no users file is configured")
            users = UsersFile(cfg.users_file)
        self.users = users
        self.signer = signer or TokenSigner(load_token_key(cfg))
        self.token_ttl = float(cfg.token_ttl)

    # credentials ---------------------------------------------------------------------

    async def check_user(self, user: str, password: str) -> bool:
        """The users-file check (scrypt), off the event loop."""
        if not user:
            return False
        return await offload(self.users.check, user, password)

    def realm(self, request: web.Request) -> str:
        host = request.host
        if not _HOST_RE.match(host):
            host = f"{self.cfg.host}:{self.cfg.port}"
        return f"{request.scheme}://{host}{TOKEN_PATH}"

    def challenge(
        self,
        request: web.Request,
        access: Access | None,
        message: str,
        error: str | None = None,
    ) -> web.Response:
        """``401`` with the Bearer challenge and the OCI ``UNAUTHORIZED`` error body."""
        params = [f'realm="{self.realm(request)}"', f'service="{self.signer.service}"']
        detail: list[dict[str, Any]] | None = None
        if access is not None:
            scope = access.challenge_scope()
            params.append(f'scope="{scope}"')
            detail = [scope.to_json()]
        if error:
            params.append(f'error="{error}"')
        headers = {
            "WWW-Authenticate": "Bearer " + ",".join(params),
            "Docker-Distribution-API-Version": "registry/2.0",
        }
        err = Unauthorized(message, detail=detail, headers=headers)
        return error_response(err, head=request.method == "HEAD")

    # the gate ------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not (path == "/v2" or path.startswith("/v2/")):
            return await handler(request)
        matched = request.match_info.get("name")
        access = required_access(request.method, path, matched if isinstance(matched, str) else None)
        if access is not None and self.policy.open(access):
            request[USER_KEY] = ""
            return await handler(request)
        what = (
            f"{access.action} access to {access.type} {access.name}"
            if access is not None else "access to the registry"
        )
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            try:
                claims = self.signer.verify(value.strip())
            except InvalidToken as exc:
                return self.challenge(request, access, f"{exc}: {what} needs a valid token", "invalid_token")
            if access is not None and not claims.allows(access):
                return self.challenge(
                    request, access, f"the token does not grant {what}", "insufficient_scope"
                )
            request[USER_KEY] = claims.sub
            return await handler(request)
        basic = _basic(header)
        if basic is not None:
            user, password = basic
            if not await self.check_user(user, password):
                return self.challenge(request, access, "invalid username or password")
            if access is not None and not covers(self.policy.allowed(user, access.type, access.name), access.action):
                return self.challenge(request, access, f"user {user!r} may not have {what}")
            request[USER_KEY] = user
            return await handler(request)
        return self.challenge(request, access, f"authentication required: {what}")

    # the token endpoint ---------------------------------------------------------------

    def _token_body(self, user: str | None, scopes: Sequence[Scope], *, offline: bool) -> dict[str, Any]:
        granted = self.policy.grant(user, scopes)
        now = self.signer.clock()
        token = self.signer.issue(user or "", granted, self.token_ttl)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": int(self.token_ttl),
            "issued_at": _iso(now),
            "scope": " ".join(str(s) for s in granted),
        }
        if offline and user is not None:
            body["refresh_token"] = self.signer.issue(user, [], REFRESH_TOKEN_TTL, kind="refresh")
        log.debug("token for %s: %s", user or "anonymous", body["scope"] or "no access")
        return body

    def _login_failed(self, message: str) -> web.Response:
        err = Unauthorized(message, headers={"WWW-Authenticate": f'Basic realm="{self.signer.service}"'})
        return error_response(err)

    async def token_get(self, request: web.Request) -> web.StreamResponse:
        """``GET /token?service=&scope=&offline_token=`` with optional HTTP Basic credentials."""
        user: str | None = None
        header = request.headers.get("Authorization")
        if header:
            basic = _basic(header)
            if basic is None:
                return self._login_failed("the token service takes HTTP Basic credentials")
            if not await self.check_user(*basic):
                return self._login_failed("invalid username or password")
            user = basic[0]
        scopes = parse_scopes(request.query.getall("scope", []))
        offline = request.query.get("offline_token", "").lower() == "true"
        return web.json_response(self._token_body(user, scopes, offline=offline))

    async def token_post(self, request: web.Request) -> web.StreamResponse:
        """The OAuth2 form: ``grant_type=password`` (username, password) or ``refresh_token``."""
        form = await request.post()

        def field(name: str) -> str:
            value = form.get(name, "")
            return value if isinstance(value, str) else ""

        grant_type = field("grant_type")
        if grant_type == "password":
            user = field("username")
            if not await self.check_user(user, field("password")):
                return self._oauth_error(401, "invalid_grant", "invalid username or password")
        elif grant_type == "refresh_token":
            try:
                claims = self.signer.verify(field("refresh_token"), kind="refresh")
            except InvalidToken as exc:
                return self._oauth_error(401, "invalid_grant", str(exc))
            user = claims.sub
            if not await offload(self.users.exists, user):
                return self._oauth_error(401, "invalid_grant", f"user {user!r} no longer exists")
        else:
            return self._oauth_error(400, "unsupported_grant_type", f"grant_type {grant_type!r}")
        scopes = parse_scopes([field("scope")])
        body = self._token_body(user, scopes, offline=field("access_type") == "offline")
        if grant_type == "refresh_token":
            body["refresh_token"] = field("refresh_token")
        return web.json_response(body)

    @staticmethod
    def _oauth_error(status: int, code: str, description: str) -> web.Response:
        return web.json_response({"error": code, "error_description": description}, status=status)


AUTH_KEY: Final = web.AppKey("turbofs_auth", Authenticator)


def setup(app: web.Application, cfg: RegistryConfig) -> Authenticator | None:
    """Install the gate (middleware) and ``GET``/``POST /token`` when anything is protected.

    With pulls and pushes both open (the loopback default) nothing is installed and None is
    returned; otherwise the :class:`Authenticator` (also at ``app[AUTH_KEY]``).
    """
    policy = Policy(cfg)
    if not policy.anything_protected:
        log.info("registry auth off: pull and push are open to anyone")
        return None
    auth = Authenticator(cfg)
    app[AUTH_KEY] = auth
    app.middlewares.append(auth.middleware)
    app.router.add_get(TOKEN_PATH, auth.token_get)
    app.router.add_post(TOKEN_PATH, auth.token_post)
    log.info(
        "registry auth on: pull %s, push %s; users from %s; tokens at %s",
        "open" if policy.pull_open else "needs a token",
        "open" if policy.push_open else "needs a token",
        cfg.users_file, TOKEN_PATH,
    )
    return auth
