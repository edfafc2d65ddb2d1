"""A client of the OCI Distribution API, with the turbofs extensions where a registry has them.

All network I/O of turbofs goes through :class:`RegistryClient`: manifests (an image index
followed to one platform) and image configs, blobs, byte ranges (one batched request to a
turbofs registry, parallel ``Range`` GETs to any other), uploads, and the extension queries.
It is written against anyio, so it runs under trio (the mount daemon, the CLI, and the
snapshotter's worker threads) and asyncio alike. Every request goes through one retry helper
(:meth:`RegistryClient._retrying`): exponential backoff with full jitter, ``Retry-After``
honoured. Authentication is an ``httpx.Auth`` (:mod:`turbofs.core.auth`); tests inject faults
through ``transport``.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread
import httpx

from turbofs.core import oci
from turbofs.core.config import (
    CLIENT_BACKOFF,
    CLIENT_BACKOFF_MAX,
    CLIENT_BATCH_BYTES,
    CLIENT_BATCH_RANGES,
    CLIENT_CAPS_RETRY,
    CLIENT_CONNECT_TIMEOUT,
    CLIENT_MAX_CONFIG,
    CLIENT_MAX_CONNECTIONS,
    CLIENT_MAX_MANIFEST,
    CLIENT_PARALLEL,
    CLIENT_RETRIES,
    CLIENT_RETRY_AFTER_MAX,
    CLIENT_RETRY_STATUS,
    CLIENT_TIMEOUT,
    CLIENT_UPLOAD_PIECE,
    MAX_INDEX_DEPTH,
)
from turbofs.core.errors import (
    DigestMismatch,
    FormatError,
    NotFound,
    TurboError,
    UsageError,
    single_error,
)
from turbofs.core.image import ImageConfig, ImageManifest, parse_config

DEFAULT_ACCEPT: Final = ", ".join(
    [oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST, oci.DOCKER_MANIFEST_LIST]
)
#: Media type of a batched range answer: the ranges' bytes back to back, in request order.

_REPO_RE: Final = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

T = TypeVar("T")


class RegistryError(TurboError):
    """The registry answered with an error (the OCI error code and message are kept), or
    could not be reached (``status`` 0). ``retry_after``: the seconds a 429 or 503 answer
    asked the client to wait, if it said."""

    def __init__(self, message: str, status: int = 0, code: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class _NotFoundError(RegistryError, NotFound):
    pass


class _Unreachable(RegistryError):
    """The connection failed (refused, reset, timed out): worth another try."""


@dataclass(frozen=True)
class Reference:
    """``REGISTRY/REPO[:TAG][@DIGEST]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest = text
        for scheme in ("docker://", "http://", "https://"):
            rest = rest.removeprefix(scheme)
        digest = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            try:
                oci.check_digest(digest)
            except FormatError as exc:
                raise UsageError(f"{text}: {exc}") from None
        if "/" not in rest:
            raise UsageError(f"{text}: expected REGISTRY/REPOSITORY[:TAG][@DIGEST]")
        registry, path = rest.split("/", 1)
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
        if not _REPO_RE.match(path):
            raise UsageError(f"{text}: invalid repository name {path!r}")
        if tag is not None and not _TAG_RE.match(tag):
            raise UsageError(f"{text}: invalid tag {tag!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def reference(self) -> str:
        """The digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def default_scheme(registry: str) -> str:
    """Plain HTTP for loopback registries, HTTPS for everything else."""
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    host = host.strip("[]")
    return "http" if host in ("localhost", "::1") or host.startswith("127.") else "https"


def retry_after(resp: httpx.Response) -> float | None:
    """The seconds a 429 or 503 answer asks to wait: ``Retry-After`` in seconds or as an
    HTTP date; None where it says nothing usable."""
    value = resp.headers.get("Retry-After", "").strip() if resp.status_code in (429, 503) else ""
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _error_from(resp: httpx.Response, what: str) -> RegistryError:
    code = ""
    message = resp.reason_phrase
    try:
        errors = resp.json().get("errors") or []
        if errors:
            code = str(errors[0].get("code", ""))
            message = str(errors[0].get("message", message))
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, httpx.ResponseNotRead):
        pass
    text = f"{what}: registry answered {resp.status_code}" + (f" {code}" if code else "") + f": {message}"
    cls = _NotFoundError if resp.status_code == 404 else RegistryError
    return cls(text, resp.status_code, code, retry_after(resp))


class RegistryClient:
    """One registry (``host[:port]``), any repository in it."""

    def __init__(
        self,
        registry: str,
        *,
        scheme: str | None = None,
        auth: httpx.Auth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = CLIENT_TIMEOUT,
        retries: int = CLIENT_RETRIES,
        backoff: float = CLIENT_BACKOFF,
        backoff_max: float = CLIENT_BACKOFF_MAX,
        retry_after_max: float = CLIENT_RETRY_AFTER_MAX,
        max_connections: int = CLIENT_MAX_CONNECTIONS,
        caps_retry: float = CLIENT_CAPS_RETRY,
    ) -> None:
        self.registry = registry
        self.base = f"{scheme or default_scheme(registry)}://{registry}"
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self._http = httpx.AsyncClient(
            base_url=self.base,
            auth=auth,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CLIENT_CONNECT_TIMEOUT)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=True,
        )
        self._caps: dict[str, Any] | None = None  # None: no definitive answer yet
        self.caps_retry = caps_retry
        self._caps_failed = -float("inf")  # time.monotonic() of the last failed ask

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the one retry helper -----------------------------------------------------------

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """``attempt()``, tried again (up to ``retries`` times) while it fails in a way worth
        repeating: the connection failed, or the registry answered 408, 425, 429 or 5xx. The
        pause doubles per try from ``backoff`` up to ``backoff_max``, with full jitter; a
        ``Retry-After`` is waited out, or ends the retries if it asks for more than
        ``retry_after_max`` seconds."""
        tries = 0
        while True:
            try:
                return await attempt()
            except httpx.TransportError as exc:
                err: RegistryError = _Unreachable(f"{what}: {self.registry} unreachable: {exc!r}")
            except RegistryError as exc:
                err = exc
            if not retry or tries >= self.retries or not (isinstance(err, _Unreachable) or err.status in CLIENT_RETRY_STATUS):
                raise err from None
            tries += 1
            pause = random.uniform(0, min(self.backoff_max, self.backoff * 2**tries))
            if err.retry_after is not None:
                if err.retry_after > self.retry_after_max:
                    raise err from None
                pause = max(pause, err.retry_after)
            await anyio.sleep(pause)

    async def _request(
        self, method: str, url: str, what: str, *, ok: Sequence[int] = (200,), retry: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """One request whose answer (small: its body is read) must have a status in ``ok``."""

        async def attempt() -> httpx.Response:
            resp = await self._http.request(method, url, **kwargs)
            if resp.status_code not in ok:
                raise _error_from(resp, what)
            return resp

        return await self._retrying(what, attempt, retry=retry)

    async def _stream(
        self, method: str, url: str, what: str, read: Callable[[httpx.Response], Awaitable[T]],
        *, ok: Sequence[int] = (200,), **kwargs: Any,
    ) -> T:
        """One request whose answer ``read`` consumes as it streams (a connection lost in the
        middle of the body is retried too). For blobs and ranges, whose bodies are big."""

        async def attempt() -> T:
            async with self._http.stream(method, url, **kwargs) as resp:
                if resp.status_code in ok:
                    return await read(resp)
                await resp.aread()  # an error document: small
                raise _error_from(resp, what)

        return await self._retrying(what, attempt)

    # -- discovery --------------------------------------------------------------------

    async def ping(self) -> None:
        await self._request("GET", "/v2/", "version check")

    async def capabilities(self) -> dict[str, Any]:
        """The turbofs extensions of this registry, or ``{}`` for a standard registry.

        Only a definitive answer is kept (200, or a 4xx that is not worth repeating: a
        registry without the extensions). After a failure (unreachable, 5xx, 429) the
        answer is ``{}`` for ``caps_retry`` seconds, then the registry is asked again."""
        if self._caps is not None:
            return self._caps
        if time.monotonic() - self._caps_failed < self.caps_retry:
            return {}
        try:
            # one try: the caller's own request (ranges) has the retries
            resp = await self._request("GET", "/v2/_turbofs/info", "turbofs extensions", ok=(200,), retry=False)
        except _Unreachable:
            self._caps_failed = time.monotonic()
            return {}
        except RegistryError as exc:
            if exc.status in CLIENT_RETRY_STATUS:
                self._caps_failed = time.monotonic()
                return {}
            self._caps = {}  # 404 (a standard registry), 401, 403...: the answer stands
            return self._caps
        try:
            caps = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            caps = None
        self._caps = caps if isinstance(caps, dict) else {}
        return self._caps

    async def has_extension(self, name: str) -> bool:
        return name in (await self.capabilities()).get("extensions", [])

    # -- manifests and configs: the one resolver -----------------------------------------

    async def get_manifest(self, repo: str, reference: str, *, max_size: int = CLIENT_MAX_MANIFEST) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest; checked against a digest reference."""
        what = f"manifest {repo}:{reference}" if ":" not in reference else f"manifest {repo}@{reference}"

        async def read(resp: httpx.Response) -> tuple[bytes, httpx.Headers]:
            return await _read_body(resp, what, max_size), resp.headers

        data, headers = await self._stream(
            "GET", f"/v2/{repo}/manifests/{reference}", what, read, headers={"Accept": DEFAULT_ACCEPT}
        )
        digest = oci.sha256_digest(data)
        if reference.startswith("sha256:") or reference.startswith("sha512:"):
            oci.verify_bytes(data, reference, what)
            digest = reference
        else:
            header = headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != digest:
                raise DigestMismatch(f"{what}: content has digest {digest}, registry says {header}")
        media_type = headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type or media_type == "application/json":
            media_type = str(oci.parse_json(data, what).get("mediaType", ""))
        return data, media_type, digest

    async def get_image_manifest(self, repo: str, reference: str, platform: str | None = None) -> ImageManifest:
        """The image manifest of ``reference``, following an image index to the manifest for
        ``platform`` (the host's by default)."""
        for _ in range(MAX_INDEX_DEPTH + 1):
            raw, media_type, digest = await self.get_manifest(repo, reference)
            where = f"{self.registry}/{repo}@{digest}"
            obj = oci.parse_json(raw, f"manifest {where}")
            if media_type in oci.INDEX_TYPES or (not media_type and "manifests" in obj):
                want = oci.parse_platform(platform)
                subs = [oci.Descriptor.from_json(d, f"image index {digest}") for d in obj.get("manifests") or []]
                chosen = [d for d in subs if oci.platform_matches(d.platform, *want)]
                if not chosen:
                    have = ", ".join(f"{(d.platform or {}).get('os')}/{(d.platform or {}).get('architecture')}" for d in subs)
                    raise NotFound(
                        f"{self.registry}/{repo}:{reference}: no manifest for platform "
                        f"{'/'.join(p for p in want if p)} (has {have or 'none'})"
                    )
                reference = chosen[0].digest
                continue
            return ImageManifest(digest, media_type or oci.OCI_MANIFEST, raw, obj, where)
        raise FormatError(f"{self.registry}/{repo}: image indexes nested more than {MAX_INDEX_DEPTH} deep")

    async def get_config(self, repo: str, manifest: ImageManifest) -> ImageConfig:
        """The image config ``manifest`` names, checked (size limit, size, digest) and parsed."""
        desc = manifest.config
        raw = await self.get_blob(repo, desc.digest, max_size=CLIENT_MAX_CONFIG)
        return parse_config(raw, desc, f"image config {desc.digest} of {manifest.where}")

    async def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        await self._request(
            "PUT", f"/v2/{repo}/manifests/{reference}", f"push manifest {repo}:{reference}",
            ok=(200, 201), content=data, headers={"Content-Type": media_type},
        )
        return oci.sha256_digest(data)

    # -- blobs ------------------------------------------------------------------------

    async def blob_exists(self, repo: str, digest: str) -> bool:
        resp = await self._request("HEAD", f"/v2/{repo}/blobs/{digest}", f"blob {digest}", ok=(200, 404))
        return resp.status_code == 200

    async def get_blob(self, repo: str, digest: str, *, max_size: int | None = None) -> bytes:
        """A whole blob, verified against its digest."""
        what = f"blob {digest}"

        async def read(resp: httpx.Response) -> bytes:
            return await _read_body(resp, what, max_size)

        data = await self._stream("GET", f"/v2/{repo}/blobs/{digest}", what, read)
        oci.verify_bytes(data, digest, f"blob {digest} from {self.registry}/{repo}")
        return data

    async def get_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a blob (not verified: chunks carry their own digest)."""
        if length <= 0:
            return b""
        what = f"blob {digest} bytes {offset}-{offset + length - 1}"

        async def read(resp: httpx.Response) -> bytes:
            if resp.status_code == 206:
                return await _read_body(resp, what, length, too_big=RegistryError)
            # a registry that ignores Range: read up to what we need, then drop it
            return await _read_window(resp.aiter_bytes(), offset, length)

        data = await self._stream(
            "GET", f"/v2/{repo}/blobs/{digest}", what, read, ok=(200, 206),
            headers={"Range": f"bytes={offset}-{offset + length - 1}"},
        )
        if len(data) != length:
            raise RegistryError(f"{what}: got {len(data)} bytes, expected {length}")
        return data

    async def get_ranges(
        self, repo: str, ranges: Sequence[tuple[str, int, int]], *, parallel: int = CLIENT_PARALLEL
    ) -> list[bytes]:
        """Many (digest, offset, length) ranges: one batched request where the registry has the
        turbofs batch extension, parallel Range GETs otherwise. Results in request order."""
        if not ranges:
            return []
        if await self.has_extension("batch"):
            caps = await self.capabilities()
            limit_n = int(caps.get("max_batch_ranges", CLIENT_BATCH_RANGES))
            limit_b = int(caps.get("max_batch_bytes", CLIENT_BATCH_BYTES))
            out: list[bytes] = []
            start = 0
            while start < len(ranges):
                end, total = start, 0
                while end < len(ranges) and end - start < limit_n and (end == start or total + ranges[end][2] <= limit_b):
                    total += ranges[end][2]
                    end += 1
                out.extend(await self._batch(repo, ranges[start:end]))
                start = end
            return out
        results: list[bytes] = [b""] * len(ranges)

        async def one(i: int) -> None:
            digest, off, length = ranges[i]
            results[i] = await self.get_range(repo, digest, off, length)

        await _gather(one, range(len(ranges)), parallel)
        return results

    async def _batch(self, repo: str, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        body = {"ranges": [{"digest": d, "offset": o, "length": n} for d, o, n in ranges]}
        total = sum(n for _, _, n in ranges)
        what = f"batched fetch of {len(ranges)} ranges"

        async def read(resp: httpx.Response) -> bytes:
            return await _read_body(resp, what, total, too_big=RegistryError)

        data = await self._stream(
            "POST", f"/v2/{repo}/_turbofs/batch", what, read, json=body, headers={"Accept": oci.TURBO_BATCH}
        )
        if len(data) != total:
            raise RegistryError(f"batched fetch: got {len(data)} bytes, expected {total}")
        out = []
        pos = 0
        for _, _, n in ranges:
            out.append(data[pos : pos + n])
            pos += n
        return out

    async def download_blob(
        self, repo: str, digest: str, size: int, dest: Path, *, piece: int, parallel: int = CLIENT_PARALLEL
    ) -> None:
        """Blob ``digest`` of ``size`` bytes into the file ``dest`` (fsynced), by ranges of
        ``piece`` bytes, ``parallel`` at a time, hashed as written. Raises DigestMismatch
        (``dest`` is left to the caller) if the bytes are not the blob."""
        h = oci.hasher(digest)
        step = piece * parallel
        async with await anyio.open_file(dest, "wb") as out:
            for start in range(0, size, step):
                ranges = [(digest, off, min(piece, size - off)) for off in range(start, min(size, start + step), piece)]
                for data in await self.get_ranges(repo, ranges, parallel=parallel):
                    h.update(data)
                    await out.write(data)
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
        actual = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if actual != digest:
            raise DigestMismatch(f"blob {digest} from {self.registry}/{repo}: content has digest {actual}")

    # -- uploads ----------------------------------------------------------------------

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        resp = await self._request(
            "POST", f"/v2/{repo}/blobs/uploads/", f"mount {digest}", ok=(201, 202),
            params={"mount": digest, "from": from_repo},
        )
        if resp.status_code == 202 and "Location" in resp.headers:  # not mounted: drop the session
            await self._request("DELETE", resp.headers["Location"], "cancel upload", ok=(204, 404), retry=False)
        return resp.status_code == 201

    async def upload_blob(
        self,
        repo: str,
        digest: str,
        source: Path | bytes,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """Upload a blob: open a session, then one PUT streaming the content. A failed try
        starts over with a new session (a streamed body cannot be sent twice)."""
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        what = f"upload {digest}"

        async def attempt() -> None:
            resp = await self._request("POST", f"/v2/{repo}/blobs/uploads/", what, ok=(202,), retry=False)
            location = resp.headers.get("Location")
            if not location:
                raise RegistryError(f"{what}: registry gave no upload location")
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                async for piece in _pieces(source):
                    sent += len(piece)
                    if progress:
                        progress(len(piece))
                    yield piece

            # the location may carry its own query (session state): append, never replace
            url = f"{location}{'&' if '?' in location else '?'}digest={digest}"
            try:
                await self._request(
                    "PUT", url, what, ok=(201,), retry=False, content=body(),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                )
            except RegistryError:
                if progress and sent:
                    progress(-sent)
                raise

        await self._retrying(what, attempt)

    async def missing_blobs(self, repo: str, digests: Sequence[str], *, parallel: int = CLIENT_PARALLEL) -> list[str]:
        """The digests the repository lacks (one query to a turbofs registry, HEADs otherwise)."""
        if not digests:
            return []
        if await self.has_extension("missing"):
            resp = await self._request(
                "POST", f"/v2/{repo}/_turbofs/missing", "missing-blob query", json={"digests": list(digests)}
            )
            missing = set(resp.json().get("missing", []))
            return [d for d in digests if d in missing]
        present: dict[str, bool] = {}

        async def one(d: str) -> None:
            present[d] = await self.blob_exists(repo, d)

        await _gather(one, dict.fromkeys(digests), parallel)
        return [d for d in digests if not present[d]]

    # -- listing ----------------------------------------------------------------------

    async def tags(self, repo: str) -> list[str]:
        resp = await self._request("GET", f"/v2/{repo}/tags/list", f"tags of {repo}")
        return list(resp.json().get("tags") or [])


async def _gather(fn: Callable[[Any], Awaitable[None]], items: Any, parallel: int) -> None:
    """``fn(item)`` for every item, at most ``parallel`` at a time."""
    sem = anyio.Semaphore(parallel)

    async def one(item: Any) -> None:
        async with sem:
            await fn(item)

    with single_error():
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(one, item)



async def _pieces(source: Path | bytes) -> AsyncIterator[bytes]:
    """``source`` (bytes, or a file read without blocking the loop) in upload pieces."""
    if isinstance(source, bytes):
        for i in range(0, len(source), CLIENT_UPLOAD_PIECE):
            yield source[i : i + CLIENT_UPLOAD_PIECE]
        return
    async with await anyio.open_file(source, "rb") as f:
        while piece := await f.read(CLIENT_UPLOAD_PIECE):
            yield piece


async def _read_body(
    resp: httpx.Response, what: str, max_size: int | None = None, *, too_big: type[TurboError] = FormatError
) -> bytes:
    """A streamed response's body, read without storing it on ``resp``: a response sits in a
    reference cycle, so a body kept on it lives until the cyclic garbage collector runs."""
    pieces: list[bytes] = []
    size = 0
    async for piece in resp.aiter_bytes():
        size += len(piece)
        if max_size is not None and size > max_size:
            raise too_big(f"{what}: the answer is over the limit of {max_size} bytes")
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


async def _read_window(chunks: AsyncIterator[bytes], offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of a stream, reading no further than needed."""
    out = bytearray()
    pos = 0
    end = offset + length
    async for chunk in chunks:
        lo, hi = max(offset, pos), min(end, pos + len(chunk))
        if lo < hi:
            out += chunk[lo - pos : hi - pos]
        pos += len(chunk)
        if pos >= end:
            break
    return bytes(out)
