"""A client of the OCI Distribution API, with the turbofs extensions where a registry has them.

All network I/O of turbofs goes through :class:`RegistryClient`: manifests, blobs, byte
ranges (one batched request to a turbofs registry, parallel ``Range`` GETs to any other),
uploads, and the extension queries. It runs under asyncio or trio (httpx + anyio). Retries
with exponential backoff and jitter cover connection errors, 429 and 5xx answers for
requests that are safe to repeat; authentication is an ``httpx.Auth`` (see
:mod:`turbofs.core.auth`). Tests inject faults through ``transport``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import httpx

from turbofs.core import oci
from turbofs.core.errors import DigestMismatch, FormatError, NotFound, TurboError, UsageError

DEFAULT_ACCEPT: Final = ", ".join(
    [oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST, oci.DOCKER_MANIFEST_LIST]
)
DEFAULT_RETRIES: Final = 5
DEFAULT_BACKOFF: Final = 0.2  # seconds, doubled per attempt, with full jitter
DEFAULT_BACKOFF_MAX: Final = 5.0
DEFAULT_TIMEOUT: Final = 60.0
UPLOAD_PIECE: Final = 1 << 20
#: Image indexes nested deeper than this are refused.
MAX_INDEX_DEPTH: Final = 2
#: Media type of a batched range answer: the ranges' bytes back to back, in request order.
BATCH_MEDIA_TYPE: Final = "application/vnd.turbofs.batch.v1"

_REPO_RE: Final = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class RegistryError(TurboError):
    """The registry answered with an error (the OCI error code and message are kept)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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
    if resp.status_code == 404:
        err: RegistryError = _NotFoundError(text, resp.status_code, code)
    else:
        err = RegistryError(text, resp.status_code, code)
    return err


class _NotFoundError(RegistryError, NotFound):
    pass


_RETRY_STATUS: Final = frozenset({408, 425, 429, 500, 502, 503, 504})


class RegistryClient:
    """One registry (``host[:port]``), any repository in it."""

    def __init__(
        self,
        registry: str,
        *,
        scheme: str | None = None,
        auth: httpx.Auth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        max_connections: int = 32,
    ) -> None:
        self.registry = registry
        self.base = f"{scheme or default_scheme(registry)}://{registry}"
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._http = httpx.AsyncClient(
            base_url=self.base,
            auth=auth,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=True,
        )
        self._caps: dict[str, Any] | None = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the retry loop ---------------------------------------------------------------

    async def _request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        ok: Sequence[int] = (200,),
        retry: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if not retry or attempt >= self.retries:
                    raise RegistryError(f"{what}: {self.registry} unreachable: {exc!r}") from None
            else:
                if resp.status_code in ok:
                    return resp
                if not retry or resp.status_code not in _RETRY_STATUS or attempt >= self.retries:
                    raise _error_from(resp, what)
            attempt += 1
            await anyio.sleep(random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt)))

    async def _request_body(
        self, method: str, url: str, what: str, *, max_size: int | None = None,
        too_big: type[TurboError] = FormatError, **kwargs: Any,
    ) -> bytes:
        """The body of a 200 answer, with :meth:`_request`'s retries (a connection lost in
        the middle of the body is retried too), read by :func:`_read_body`: never kept on the
        response object. For blobs and byte ranges, whose bodies are big."""
        attempt = 0
        while True:
            try:
                async with self._http.stream(method, url, **kwargs) as resp:
                    if resp.status_code == 200:
                        return await _read_body(resp, what, max_size, too_big=too_big)
                    await resp.aread()  # an error document: small
                    if resp.status_code not in _RETRY_STATUS or attempt >= self.retries:
                        raise _error_from(resp, what)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise RegistryError(f"{what}: {self.registry} unreachable: {exc!r}") from None
            attempt += 1
            await anyio.sleep(random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt)))

    # -- discovery --------------------------------------------------------------------

    async def ping(self) -> None:
        await self._request("GET", "/v2/", "version check")

    async def capabilities(self) -> dict[str, Any]:
        """The turbofs extensions of this registry, or ``{}`` for a standard registry."""
        if self._caps is None:
            try:
                resp = await self._request("GET", "/v2/_turbofs/info", "turbofs extensions", ok=(200, 404))
                self._caps = resp.json() if resp.status_code == 200 else {}
            except (RegistryError, json.JSONDecodeError):
                self._caps = {}
            if not isinstance(self._caps, dict):
                self._caps = {}
        return self._caps

    async def has_extension(self, name: str) -> bool:
        return name in (await self.capabilities()).get("extensions", [])

    # -- manifests --------------------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str, *, max_size: int = 4 << 20) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest; checked against a digest reference."""
        what = f"manifest {repo}:{reference}" if ":" not in reference else f"manifest {repo}@{reference}"
        resp = await self._request("GET", f"/v2/{repo}/manifests/{reference}", what, headers={"Accept": DEFAULT_ACCEPT})
        data = resp.content
        if len(data) > max_size:
            raise FormatError(f"{what}: {len(data)} bytes is over the limit of {max_size}")
        digest = oci.sha256_digest(data)
        if reference.startswith("sha256:") or reference.startswith("sha512:"):
            oci.verify_bytes(data, reference, what)
            digest = reference
        else:
            header = resp.headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != digest:
                raise DigestMismatch(f"{what}: content has digest {digest}, registry says {header}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type or media_type == "application/json":
            media_type = str(oci.parse_json(data, what).get("mediaType", ""))
        return data, media_type, digest

    async def get_image_manifest(
        self, repo: str, reference: str, platform: str | None = None
    ) -> tuple[bytes, str, str, dict[str, Any]]:
        """(bytes, media type, digest, parsed JSON) of the image manifest of ``reference``,
        following an image index to the manifest for ``platform`` (the host's by default)."""
        for _ in range(MAX_INDEX_DEPTH + 1):
            raw, media_type, digest = await self.get_manifest(repo, reference)
            obj = oci.parse_json(raw, f"manifest {self.registry}/{repo}@{digest}")
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
            return raw, media_type or oci.OCI_MANIFEST, digest, obj
        raise FormatError(f"{self.registry}/{repo}: image indexes nested more than {MAX_INDEX_DEPTH} deep")

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
        data = await self._request_body("GET", f"/v2/{repo}/blobs/{digest}", f"blob {digest}", max_size=max_size)
        oci.verify_bytes(data, digest, f"blob {digest} from {self.registry}/{repo}")
        return data

    async def get_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a blob (not verified: chunks carry their own digest)."""
        if length <= 0:
            return b""
        what = f"blob {digest} bytes {offset}-{offset + length - 1}"
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        attempt = 0
        while True:
            try:
                async with self._http.stream("GET", f"/v2/{repo}/blobs/{digest}", headers=headers) as resp:
                    if resp.status_code == 206:
                        data = await _read_body(resp, what, length, too_big=RegistryError)
                    elif resp.status_code == 200:
                        # a registry that ignores Range: read up to what we need, then drop it
                        data = await _read_window(resp.aiter_bytes(), offset, length)
                    elif resp.status_code in _RETRY_STATUS and attempt < self.retries:
                        data = None
                    else:
                        await resp.aread()
                        raise _error_from(resp, what)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise RegistryError(f"{what}: {self.registry} unreachable: {exc!r}") from None
                data = None
            if data is not None:
                if len(data) != length:
                    raise RegistryError(f"{what}: got {len(data)} bytes, expected {length}")
                return data
            attempt += 1
            await anyio.sleep(random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt)))

    async def get_ranges(self, repo: str, ranges: Sequence[tuple[str, int, int]], *, parallel: int = 8) -> list[bytes]:
        """Many (digest, offset, length) ranges: one batched request where the registry has the
        turbofs batch extension, parallel Range GETs otherwise. Results in request order."""
        if not ranges:
            return []
        if await self.has_extension("batch"):
            caps = await self.capabilities()
            limit_n = int(caps.get("max_batch_ranges", 1024))
            limit_b = int(caps.get("max_batch_bytes", 64 << 20))
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
        sem = anyio.Semaphore(parallel)

        async def one(i: int) -> None:
            async with sem:
                digest, off, length = ranges[i]
                results[i] = await self.get_range(repo, digest, off, length)

        async with anyio.create_task_group() as tg:
            for i in range(len(ranges)):
                tg.start_soon(one, i)
        return results

    async def _batch(self, repo: str, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        body = {"ranges": [{"digest": d, "offset": o, "length": n} for d, o, n in ranges]}
        total = sum(n for _, _, n in ranges)
        data = await self._request_body(
            "POST", f"/v2/{repo}/_turbofs/batch", f"batched fetch of {len(ranges)} ranges",
            max_size=total, too_big=RegistryError, json=body, headers={"Accept": BATCH_MEDIA_TYPE},
        )
        if len(data) != total:
            raise RegistryError(f"batched fetch: got {len(data)} bytes, expected {total}")
        out = []
        pos = 0
        for _, _, n in ranges:
            out.append(data[pos : pos + n])
            pos += n
        return out

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
        """Upload a blob: open a session, then one PUT streaming the content."""
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        attempt = 0
        while True:
            resp = await self._request("POST", f"/v2/{repo}/blobs/uploads/", f"upload {digest}", ok=(202,))
            location = resp.headers.get("Location")
            if not location:
                raise RegistryError(f"upload {digest}: registry gave no upload location")
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                if isinstance(source, bytes):
                    for i in range(0, len(source), UPLOAD_PIECE):
                        piece = source[i : i + UPLOAD_PIECE]
                        sent += len(piece)
                        if progress:
                            progress(len(piece))
                        yield piece
                    return
                async with await anyio.open_file(source, "rb") as f:
                    while piece := await f.read(UPLOAD_PIECE):
                        sent += len(piece)
                        if progress:
                            progress(len(piece))
                        yield piece

            try:
                # the location may carry its own query (session state): append, never replace
                url = f"{location}{'&' if '?' in location else '?'}digest={digest}"
                await self._request(
                    "PUT", url, f"upload {digest}", ok=(201,), retry=False, content=body(),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                )
                return
            except RegistryError as exc:
                if progress and sent:
                    progress(-sent)
                if attempt >= self.retries or (exc.status and exc.status not in _RETRY_STATUS):
                    raise
            attempt += 1
            await anyio.sleep(random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt)))

    async def missing_blobs(self, repo: str, digests: Sequence[str], *, parallel: int = 8) -> list[str]:
        """The digests the repository lacks (one query to a turbofs registry, HEADs otherwise)."""
        if not digests:
            return []
        if await self.has_extension("missing"):
            resp = await self._request(
                "POST", f"/v2/{repo}/_turbofs/missing", "missing-blob query", json={"digests": list(digests)}
            )
            missing = resp.json().get("missing", [])
            return [d for d in digests if d in set(missing)]
        present: dict[str, bool] = {}
        sem = anyio.Semaphore(parallel)

        async def one(d: str) -> None:
            async with sem:
                present[d] = await self.blob_exists(repo, d)

        async with anyio.create_task_group() as tg:
            for d in dict.fromkeys(digests):
                tg.start_soon(one, d)
        return [d for d in digests if not present[d]]

    # -- listing ----------------------------------------------------------------------

    async def tags(self, repo: str) -> list[str]:
        resp = await self._request("GET", f"/v2/{repo}/tags/list", f"tags of {repo}")
        return list(resp.json().get("tags") or [])


async def _read_body(
    resp: httpx.Response, what: str, max_size: int | None = None, *, too_big: type[TurboError] = FormatError
) -> bytes:
    """A streamed response's body, read without storing it on ``resp``.

    An httpx response sits in a reference cycle (it and its stream refer to each other), so
    a body kept on it (``resp.content``, ``resp.aread()``) lives until Python's cyclic
    garbage collector runs, which big byte strings do not trigger: the node daemon held
    ~70 MiB of finished 4 MiB batch bodies this way (measured with tracemalloc; peak RSS
    277 MiB for four fetches in flight, 84 MiB once bodies were not kept).
    """
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
