"""Registry authentication, client side, and the request-to-scope rules both sides share.

The Docker "token authentication specification" flow: a ``401`` with a ``Bearer`` challenge
(realm, service, scope), a ``GET realm?service=&scope=`` with Basic credentials if any, then
the request again with ``Authorization: Bearer TOKEN``. A ``Basic`` challenge means the
credentials go straight on the request.

- :func:`required_access`: the action a registry request needs; ``server/auth.py`` enforces
  exactly these rules, and clients ask for the right token before the first ``401``.
- :class:`Scope`, :func:`parse_scopes`, :func:`parse_challenges`: the spec's strings.
- :class:`Credentials`, :func:`lookup_credentials`: ``user:password`` or the auth files.
- :class:`RegistryAuth`: an :class:`httpx.Auth` for sync and async clients; tokens cached per
  (realm, service, scope) and refreshed before they expire.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from turbofs.core.config import TOKEN_REFRESH_FRACTION, TOKEN_REFRESH_MAX_MARGIN
from turbofs.core.errors import AuthError, UsageError

log = logging.getLogger(__name__)

PULL: Final = "pull"
PUSH: Final = "push"
DELETE: Final = "delete"
ALL: Final = "*"
REPOSITORY: Final = "repository"
REGISTRY: Final = "registry"
#: The scope of ``GET /v2/_catalog``.
CATALOG: Final = "catalog"

#: The sections of the API that follow a repository name. The name is everything between
#: ``/v2/`` and the last of these (names contain slashes).
_REPO_PATH: Final = re.compile(
    r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags|referrers|_turbofs)(?:/(?P<rest>.*))?$"
)
_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: The turbofs extensions (``/v2/NAME/_turbofs/OP``) and the action each needs. A batch
#: fetch is a read even though it is a POST; asking which blobs are missing and converting
#: are part of pushing.
TURBOFS_EXTENSION_ACTIONS: Final = {"batch": PULL, "missing": PUSH, "convert": PUSH}


def covers(granted: Iterable[str], action: str) -> bool:
    """Whether granted actions allow ``action``: itself, ``*``, or ``push`` for ``delete``."""
    have = set(granted)
    return action in have or ALL in have or (action == DELETE and PUSH in have)


@dataclass(frozen=True)
class Access:
    """One action on one resource, what a single request needs."""

    type: str
    name: str
    action: str

    def challenge_scope(self) -> Scope:
        """The scope to ask for: pushing needs pulling too (clients check blobs before upload)."""
        actions = (PULL, PUSH) if self.action == PUSH else (self.action,)
        return Scope(self.type, self.name, actions)


@dataclass(frozen=True)
class Scope:
    """A resource scope of the token spec: ``repository:samalba/my-app:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse ``type[(class)]:name:action[,action...]``; the name may hold colons (ports)."""
        rtype, sep1, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep1 and sep2 and rtype and name):
            raise ValueError(f"malformed scope {text!r}")
        rtype = rtype.split("(", 1)[0]  # "repository(plugin)" -> "repository"
        acts = tuple(dict.fromkeys(a.strip() for a in actions.split(",") if a.strip()))
        return cls(rtype, name, acts)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes from repeated ``scope`` parameters, each possibly space-separated (OAuth2 form).

    Malformed entries are skipped: a token server grants nothing for what it cannot read.
    """
    out: list[Scope] = []
    for value in values:
        for item in value.split():
            try:
                out.append(Scope.parse(item))
            except ValueError:
                log.debug("ignoring malformed scope %r", item)
    return out


def required_access(method: str, path: str, name: str | None = None) -> Access | None:
    """The action a registry API request needs, or None where any valid credentials do.

    ``GET``/``HEAD`` pull; ``POST``/``PUT``/``PATCH`` push; ``DELETE`` needs ``delete`` (which
    ``push`` covers); ``/v2/_catalog`` needs ``registry:catalog:*``; ``/v2/NAME/_turbofs/OP``
    as :data:`TURBOFS_EXTENSION_ACTIONS` says. ``name`` (the server's matched name) overrides the
    name parsed from ``path``."""
    if path in ("/v2", "/v2/"):
        return None
    if path.rstrip("/") == "/v2/_catalog":
        return Access(REGISTRY, CATALOG, ALL)
    m = _REPO_PATH.match(path)
    if m is None:
        return None
    kind, rest = m["kind"], m["rest"] or ""
    method = method.upper()
    if kind == "_turbofs":
        op = rest.split("/", 1)[0]
        action = TURBOFS_EXTENSION_ACTIONS.get(op) or (PULL if method in _READ_METHODS else PUSH)
    elif method in _READ_METHODS:
        action = PULL
    elif method == "DELETE":
        action = DELETE
    else:
        action = PUSH
    return Access(REPOSITORY, name or m["name"], action)


# -- challenges -------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: scheme (lower case) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: ``key=value`` or ``key="quoted \\" value"``; a token not followed by ``=`` starts a new challenge.
_PARAM_RE: Final = re.compile(
    r"[ \t,]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*(\"(?:[^\"\\]|\\.)*\"|[^\s,\"]*)"
)


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` values (RFC 7235): several challenges, quoted parameters."""
    out: list[Challenge] = []
    for header in headers:
        pos, n = 0, len(header)
        while pos < n:
            while pos < n and header[pos] in " \t,":
                pos += 1
            m = _TOKEN_RE.match(header, pos)
            if m is None:
                break
            scheme, pos = m.group().lower(), m.end()
            params: dict[str, str] = {}
            while (pm := _PARAM_RE.match(header, pos)) is not None:
                value = pm.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[pm.group(1).lower()] = value
                pos = pm.end()
            if not params:
                # a bare scheme, or one with a token68 ("Negotiate abc=="): skip to the next comma
                rest = header[pos:].lstrip(" \t")
                if rest and not rest.startswith(","):
                    comma = header.find(",", pos)
                    pos = n if comma < 0 else comma + 1
            out.append(Challenge(scheme, params))
    return out


# -- credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or access token used as a password)."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """``user:password`` as given to ``--creds``/``--user`` (the password may hold colons)."""
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise UsageError("credentials must be given as USER:PASSWORD")
        return cls(user, password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


_DOCKER_HUB_ALIASES: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


def _normalize_registry_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``host:5000/ns`` keeps its path."""
    k = key.strip()
    for prefix in ("https://", "http://"):
        if k.startswith(prefix):
            k = k[len(prefix) :]
    k = k.rstrip("/")
    for suffix in ("/v1", "/v2"):
        k = k.removesuffix(suffix)
    host, sep, rest = k.partition("/")
    if host in _DOCKER_HUB_ALIASES:
        host = "docker.io"
    return host + sep + rest


def auth_file_candidates() -> list[Path]:
    """Auth files in the order skopeo and docker read them (containers' first, then Docker's)."""
    out: list[Path] = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(env))
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(runtime) / "containers" / "auth.json")
    docker_dir = os.environ.get("DOCKER_CONFIG")
    out.append(Path(docker_dir) / "config.json" if docker_dir else Path.home() / ".docker" / "config.json")
    return out


def credentials_from_auth_file(host: str, path: Path, repository: str | None = None) -> Credentials | None:
    """Credentials for ``host`` (``name:port``) in one Docker-style ``config.json``/``auth.json``.

    Reads ``auths[KEY].auth`` (base64 ``user:password``) or ``username``/``password``; a key
    ``host/namespace`` matches repositories under it (most specific first). Credential helpers
    (``credHelpers``, ``credsStore``) are not run: give the credentials explicitly instead.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read registry auth file %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        return None
    want = _normalize_registry_key(host)
    auths = data.get("auths")
    entries = (
        {_normalize_registry_key(k): v for k, v in auths.items() if isinstance(v, dict)}
        if isinstance(auths, dict) else {}
    )
    keys = [want]
    if repository:
        parts = repository.split("/")
        keys = [f"{want}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + keys
    for key in keys:
        entry = entries.get(key)
        if entry is None:
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                raw = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                log.warning("%s: auths[%s].auth is not base64 of user:password", path, key)
                continue
            user, sep, password = raw.partition(":")
            if sep:
                return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
        if entry.get("identitytoken"):
            log.debug("%s: identity tokens (auths[%s].identitytoken) are not supported", path, key)
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict) and any(_normalize_registry_key(k) == want for k in helpers):
        log.debug("%s: credential helper for %s ignored (not supported); use --creds", path, host)
    elif data.get("credsStore"):
        log.debug("%s: credsStore %r ignored (not supported); use --creds", path, data["credsStore"])
    return None


def lookup_credentials(
    host: str,
    *,
    explicit: Credentials | str | None = None,
    auth_files: Iterable[Path] | None = None,
    repository: str | None = None,
) -> Credentials | None:
    """The credentials for a registry ``host``: explicit ones, else the first auth file's entry."""
    if isinstance(explicit, str):
        return Credentials.parse(explicit)
    if explicit is not None:
        return explicit
    for path in auth_file_candidates() if auth_files is None else auth_files:
        found = credentials_from_auth_file(host, path, repository)
        if found is not None:
            log.debug("credentials for %s from %s", host, path)
            return found
    return None


def auth_for_registry(
    host: str,
    creds: str | Credentials | None = None,
    *,
    prompt: Callable[[str], str] | None = None,
) -> RegistryAuth:
    """The :class:`RegistryAuth` for a client command talking to registry ``host``.

    ``creds`` is ``USER:PASSWORD``, or ``USER`` alone with the password asked through
    ``prompt`` (``getpass.getpass`` on a terminal); without it the auth files are looked up
    when the registry first asks (:func:`lookup_credentials`), and anonymous tokens are used
    when they hold nothing for ``host``.
    """
    if isinstance(creds, str) and ":" not in creds:
        if prompt is None:
            import getpass
            import sys

            if not sys.stdin.isatty():
                raise UsageError("credentials must be given as USER:PASSWORD (no terminal to ask on)")
            prompt = getpass.getpass
        creds = Credentials(creds, prompt(f"password for {creds} at {host}: "))
    if creds is not None:
        fixed = lookup_credentials(host, explicit=creds)
        want = _normalize_registry_key(host)
        return RegistryAuth(lambda h: fixed if _normalize_registry_key(h) == want else lookup_credentials(h))
    return RegistryAuth(lambda h: lookup_credentials(h))


# -- the httpx flow ---------------------------------------------------------------------

#: Lifetime of a token whose response gives none (the spec's default).
DEFAULT_TOKEN_LIFETIME: Final = 60.0


@dataclass
class _Token:
    value: str
    expires_at: float  # on the monotonic clock, refresh margin already taken off


@dataclass(frozen=True)
class _HostState:
    scheme: str  # "bearer" or "basic"
    realm: str = ""
    service: str = ""


CredentialSource = Credentials | Callable[[str], Credentials | None] | None
_Step = Generator[tuple[httpx.Request, bool], httpx.Response, None]


class RegistryAuth(httpx.Auth):
    """The registry token flow as an :class:`httpx.Auth`, for sync and async clients.

    ``credentials`` is fixed :class:`Credentials`, a function from a host (``name:port``) to
    credentials, or None (anonymous). What a host asked for is remembered and tokens are cached,
    so later requests carry a token from the start: a streamed upload that gets a ``401`` is not
    repeated (the caller's retry finds the token cached). A rejected login raises
    :class:`~turbofs.core.errors.AuthError`."""

    def __init__(
        self,
        credentials: CredentialSource = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._credentials = credentials
        self._clock = clock
        self._hosts: dict[str, _HostState] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._creds_cache: dict[str, Credentials | None] = {}

    # httpx entry points --------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request)
        step = _advance(flow, None)
        while step is not None:
            response = yield step[0]
            if step[1]:
                response.read()
            step = _advance(flow, response)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request)
        step = _advance(flow, None)
        while step is not None:
            response = yield step[0]
            if step[1]:
                await response.aread()
            step = _advance(flow, response)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise NotImplementedError("RegistryAuth drives its flow from sync_auth_flow/async_auth_flow")

    # state ---------------------------------------------------------------------------

    def credentials_for(self, host: str) -> Credentials | None:
        if isinstance(self._credentials, Credentials) or self._credentials is None:
            return self._credentials
        if host not in self._creds_cache:
            self._creds_cache[host] = self._credentials(host)
        return self._creds_cache[host]

    def forget(self) -> None:
        """Drop every cached token and what was learned about hosts."""
        self._hosts.clear()
        self._tokens.clear()
        self._creds_cache.clear()

    def _cached(self, key: tuple[str, str, str]) -> str | None:
        tok = self._tokens.get(key)
        if tok is None or self._clock() >= tok.expires_at:
            self._tokens.pop(key, None)
            return None
        return tok.value

    # the flow ------------------------------------------------------------------------

    def _flow(self, request: httpx.Request) -> _Step:
        """Yields (request, read its body?) and receives responses."""
        host = request.url.netloc.decode("ascii")
        access = required_access(request.method, request.url.path)
        ours = [str(access.challenge_scope())] if access else []
        creds = self.credentials_for(host)
        state = self._hosts.get(host)
        sent: str | None = None
        if request.headers.get("Authorization") is None and state is not None:
            if state.scheme == "basic" and creds is not None:
                sent = creds.basic_header()
            elif state.scheme == "bearer" and ours:
                token = yield from self._token(request, state, ours, creds, host)
                sent = f"Bearer {token}"
            if sent is not None:
                request.headers["Authorization"] = sent

        response = yield request, False
        if response.status_code != 401:
            return
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            state = _HostState("bearer", bearer.params["realm"], bearer.params.get("service", ""))
            self._hosts[host] = state
            if not _replayable(request):
                # the body is gone: hand the 401 back; a retry gets its token up front
                return
            scopes = bearer.params["scope"].split() if bearer.params.get("scope") else ours
            if sent is not None:
                # the token we sent was refused (expired, key changed, too narrow): fetch anew
                for key in {self._key(state, scopes), self._key(state, ours)}:
                    self._tokens.pop(key, None)
            token = yield from self._token(request, state, scopes, creds, host, also=ours)
            # always send again after a token request: httpx answers the caller with the
            # last response, which must not be the token service's
            request.headers["Authorization"] = f"Bearer {token}"
            yield request, False
        elif basic is not None and creds is not None:
            self._hosts[host] = _HostState("basic")
            header = creds.basic_header()
            if header != sent and _replayable(request):
                request.headers["Authorization"] = header
                yield request, False

    @staticmethod
    def _key(state: _HostState, scopes: list[str]) -> tuple[str, str, str]:
        return (state.realm, state.service, " ".join(sorted(scopes)))

    def _token(
        self,
        request: httpx.Request,
        state: _HostState,
        scopes: list[str],
        creds: Credentials | None,
        host: str,
        also: list[str] | None = None,
    ) -> Generator[tuple[httpx.Request, bool], httpx.Response, str]:
        """A token for ``scopes`` from the cache, or from the realm (yields that request)."""
        key = self._key(state, scopes)
        cached = self._cached(key)
        if cached is not None:
            return cached
        params: list[tuple[str, str | int | float | bool | None]] = []
        if state.service:
            params.append(("service", state.service))
        params += [("scope", s) for s in scopes]
        if creds is not None:
            params.append(("account", creds.username))
        realm = httpx.URL(state.realm)
        url = realm.copy_merge_params(params) if params else realm
        headers = {"Accept": "application/json"}
        if creds is not None:
            if realm.scheme == "http" and request.url.scheme == "https":
                raise AuthError(
                    f"registry {host} sends credentials to a plain-http token service {state.realm}: refused"
                )
            headers["Authorization"] = creds.basic_header()
        token_request = httpx.Request("GET", url, headers=headers, extensions=request.extensions)
        response = yield token_request, True
        if response.status_code in (401, 403):
            who = f"user {creds.username!r}" if creds else "anonymous access"
            raise AuthError(
                f"registry {host}: token service {state.realm} refused {who} "
                f"(HTTP {response.status_code}): {_error_text(response)}"
            )
        if response.status_code != 200:
            raise AuthError(
                f"registry {host}: token service {state.realm} answered HTTP {response.status_code}: "
                f"{_error_text(response)}"
            )
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            value = None
            lifetime = 0.0
        if not isinstance(value, str) or not value:
            raise AuthError(f"registry {host}: token service {state.realm} sent no token")
        margin = min(TOKEN_REFRESH_MAX_MARGIN, lifetime * TOKEN_REFRESH_FRACTION)
        tok = _Token(value, self._clock() + max(0.0, lifetime - margin))
        self._tokens[key] = tok
        if also:
            self._tokens[self._key(state, also)] = tok
        return value


def _advance(flow: _Step, response: httpx.Response | None) -> tuple[httpx.Request, bool] | None:
    """The flow's next (request, read its body?) after ``response``; None once it is done."""
    try:
        return next(flow) if response is None else flow.send(response)
    except StopIteration:
        return None


def _replayable(request: httpx.Request) -> bool:
    """Whether the request body can be sent again (bytes in memory, or no body)."""
    return isinstance(request.stream, httpx.ByteStream)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors and isinstance(errors, list) and isinstance(errors[0], dict):
            return str(errors[0].get("message") or errors[0].get("code"))
        if isinstance(body, dict) and body.get("details"):
            return str(body["details"])
    except ValueError:
        pass
    return response.text[:200] or response.reason_phrase
