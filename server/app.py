"""The turbofs registry: the OCI Distribution API over :class:`server.storage.Storage`.

The endpoints are listed in docs/api.md ("The OCI Distribution API"), plus the referrers API
(``GET /v2/<name>/referrers/<digest>``). Routing is one catch-all route (``/v2/{tail:.*}``)
split by :func:`parse_v2_path`, so names may contain slashes; routes other modules add in
their ``setup`` (auth, turbo extensions) are registered first and win. Errors become the
spec's JSON body in one middleware. ``app[STORAGE_KEY]`` is the :class:`Storage`,
``app[CONFIG_KEY]`` the :class:`RegistryConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from aiohttp import ClientPayloadError, hdrs, web

from server import auth, turbo_ext
from server.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    DigestInvalid,
    DistributionError,
    ManifestUnknown,
    RangeInvalid,
    SizeInvalid,
    StorageFull,
    Unsupported,
    error_response,
)
from server.offload import offload
from server.storage import Storage, check_blob_digest, check_name, file_id
from turbofs.core.config import (
    REGISTRY_CATALOG_PAGE,
    REGISTRY_IO_CHUNK,
    REGISTRY_MAX_PAGE,
    REGISTRY_MAX_RANGE_DIGITS,
    REGISTRY_MAX_RANGES,
    REGISTRY_RANGE_MERGE_GAP,
    RegistryConfig,
)
from turbofs.core.errors import UsageError
from turbofs.core.oci import OCI_INDEX

log = logging.getLogger("turbofs.registry")

STORAGE_KEY: Final = web.AppKey("storage", Storage)
CONFIG_KEY: Final = web.AppKey("config", RegistryConfig)

API_VERSION_HEADER: Final[str] = "Docker-Distribution-API-Version"
#: errno values of a write that failed for lack of space or quota: answered 507, not 500
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
API_VERSION: Final = "registry/2.0"

# -- routing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What a /v2/ path asks for. kind: base, catalog, tags, manifest, blob, upload, referrers.

    ``ref`` is the tag or digest (manifest), the digest (blob, referrers), or the upload id
    ("" for ``POST .../blobs/uploads/``).
    """

    kind: str
    name: str = ""
    ref: str = ""


_ROUTES: Final = (
    ("tags", re.compile(r"(?P<name>.+)/tags/list")),
    ("manifest", re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
    ("upload", re.compile(r"(?P<name>.+)/blobs/uploads/?(?P<ref>[^/]*)")),
    ("blob", re.compile(r"(?P<name>.+)/blobs/(?P<ref>[^/]+)")),
    ("referrers", re.compile(r"(?P<name>.+)/referrers/(?P<ref>[^/]+)")),
)


def parse_v2_path(path: str) -> Route | None:
    """Split a request path (``/v2/...``, decoded) into a :class:`Route`; None if unknown.

    The name is not validated here (auth middleware may call this to learn the repository
    and the kind of access a request needs).
    """
    if path in ("/v2", "/v2/"):
        return Route("base")
    if not path.startswith("/v2/"):
        return None
    tail = path[4:]
    if tail in ("_catalog", "_catalog/"):
        return Route("catalog")
    for kind, pattern in _ROUTES:
        m = pattern.fullmatch(tail)
        if m is not None:
            return Route(kind, m["name"], m.groupdict().get("ref") or "")
    return None


# -- helpers -----------------------------------------------------------------------------


def _storage(request: web.Request) -> Storage:
    return request.app[STORAGE_KEY]


def _config(request: web.Request) -> RegistryConfig:
    return request.app[CONFIG_KEY]


def _upload_location(name: str, uuid: str) -> str:
    return f"/v2/{name}/blobs/uploads/{uuid}"


def _upload_headers(name: str, uuid: str, offset: int) -> dict[str, str]:
    # The spec's Range is inclusive ("0-<last byte>"); like distribution we answer "0-0" for an
    # empty upload.
    return {
        "Location": _upload_location(name, uuid),
        "Range": f"0-{max(offset - 1, 0)}",
        "Docker-Upload-UUID": uuid,
        hdrs.CONTENT_LENGTH: "0",
    }


def _blob_created(name: str, digest: str) -> web.Response:
    return web.Response(
        status=201,
        headers={
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": digest,
            hdrs.CONTENT_LENGTH: "0",
        },
    )


# ASCII digits only: \d also matches other scripts' digits, which int() would take
_CONTENT_RANGE_RE: Final = re.compile(r"(?:bytes[ =])?([0-9]+)-([0-9]+)(?:/(?:[0-9]+|\*))?")


def _digits_key(digits: str) -> tuple[int, str]:
    """Orders strings of ASCII digits as the numbers they spell, without converting them."""
    significant = digits.lstrip("0")
    return len(significant), significant


def _content_range(request: web.Request) -> tuple[int, int] | None:
    value = request.headers.get(hdrs.CONTENT_RANGE)
    if value is None:
        return None
    m = _CONTENT_RANGE_RE.fullmatch(value.strip())
    first, last = (_digits_key(m[1]), _digits_key(m[2])) if m else ((0, ""), (0, ""))
    # a bound past REGISTRY_MAX_RANGE_DIGITS is past any upload (and int() refuses 4300 digits,
    # leading zeros included: only the significant ones are converted)
    if m is None or last < first or last[0] > REGISTRY_MAX_RANGE_DIGITS:
        raise RangeInvalid(f"invalid Content-Range {value[:100]!r}", detail={"contentRange": value[:100]})
    return int(first[1] or "0"), int(last[1] or "0")


def _check_body_size(request: web.Request, offset: int = 0) -> None:
    limit = _config(request).max_blob_size
    length = request.content_length
    if length is not None and offset + length > limit:
        raise SizeInvalid(
            f"blob is larger than the limit of {limit} bytes",
            status=413,
            detail={"limit": limit},
        )


def _body(request: web.Request) -> AsyncIterator[bytes]:
    return request.content.iter_chunked(REGISTRY_IO_CHUNK)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes."""
    length = request.content_length
    too_big = SizeInvalid(
        f"body is larger than the limit of {limit} bytes", status=413, detail={"limit": limit}
    )
    if length is not None and length > limit:
        raise too_big
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(REGISTRY_IO_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def _page_args(request: web.Request, default: int | None) -> tuple[int | None, str | None]:
    raw_n = request.query.get("n")
    n: int | None = default
    if raw_n is not None and raw_n != "":
        try:
            n = int(raw_n)
        except ValueError:
            n = -1
        if n < 0:
            raise Unsupported(f"invalid page size n={raw_n!r}", status=400, detail={"n": raw_n[:50]})
        n = min(n, REGISTRY_MAX_PAGE)
    last = request.query.get("last") or None
    return n, last


def _paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    if last is not None:
        items = [i for i in items if i > last]
    if n is None:
        return items, False
    return items[:n], n > 0 and len(items) > n


def _json(obj: object, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(obj, status=status, headers=headers)


# -- handlers ----------------------------------------------------------------------------

Handler = Callable[[web.Request, Route], Awaitable[web.StreamResponse]]


async def _base(request: web.Request, route: Route) -> web.StreamResponse:
    return _json({})


async def _catalog(request: web.Request, route: Route) -> web.StreamResponse:
    repos = await offload(_storage(request).repositories)
    n, last = _page_args(request, REGISTRY_CATALOG_PAGE)
    page, more = _paginate(repos, n, last)
    headers = {}
    if more:
        headers["Link"] = f'</v2/_catalog?n={n}&last={page[-1]}>; rel="next"'
    return _json({"repositories": page}, headers=headers)


async def _tags(request: web.Request, route: Route) -> web.StreamResponse:
    tags = await offload(_storage(request).tags, route.name)
    n, last = _page_args(request, None)
    page, more = _paginate(tags, n, last)
    headers = {}
    if more:
        headers["Link"] = f'</v2/{route.name}/tags/list?n={n}&last={page[-1]}>; rel="next"'
    return _json({"name": route.name, "tags": page}, headers=headers)


def _etag_matches(request: web.Request, etag: str) -> bool:
    value = request.headers.get(hdrs.IF_NONE_MATCH)
    if value is None:
        return False
    candidates = [v.strip().removeprefix("W/") for v in value.split(",")]
    return "*" in candidates or etag in candidates


async def _get_manifest(request: web.Request, route: Route) -> web.StreamResponse:
    storage = _storage(request)
    if request.method == hdrs.METH_HEAD:
        info = await offload(storage.manifest_info, route.name, route.ref)
        if info is None:
            raise ManifestUnknown(
                f"manifest {route.ref} is not in {route.name}", detail={"reference": route.ref}
            )
        media_type, digest, size = info
        data = None
    else:
        found = await offload(storage.get_manifest, route.name, route.ref)
        if found is None:
            raise ManifestUnknown(
                f"manifest {route.ref} is not in {route.name}", detail={"reference": route.ref}
            )
        data, media_type, digest = found
        size = len(data)
    etag = f'"{digest}"'
    headers = {
        hdrs.CONTENT_TYPE: media_type,
        "Docker-Content-Digest": digest,
        hdrs.ETAG: etag,
    }
    if _etag_matches(request, etag):
        return web.Response(status=304, headers=headers)
    if data is None:
        headers[hdrs.CONTENT_LENGTH] = str(size)
        return web.Response(headers=headers)
    return web.Response(body=data, headers=headers)


async def _put_manifest(request: web.Request, route: Route) -> web.StreamResponse:
    storage = _storage(request)
    check_name(route.name)
    data = await _read_limited(request, _config(request).max_manifest_size)
    content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
    result = await offload(
        storage.put_manifest_info, route.name, route.ref, data, content_type
    )
    headers = {
        "Location": f"/v2/{route.name}/manifests/{result.digest}",
        "Docker-Content-Digest": result.digest,
        hdrs.CONTENT_LENGTH: "0",
    }
    if result.subject is not None:
        headers["OCI-Subject"] = result.subject
    try:
        await turbo_ext.on_manifest_put(request.app, route.name, route.ref, result.digest, result.media_type)
    except Exception:  # the push succeeded; a failing hook must not turn it into an error
        log.exception("manifest hook failed for %s:%s", route.name, route.ref)
    return web.Response(status=201, headers=headers)


async def _delete_manifest(request: web.Request, route: Route) -> web.StreamResponse:
    await offload(_storage(request).delete_manifest, route.name, route.ref)
    return web.Response(status=202, headers={hdrs.CONTENT_LENGTH: "0"})


_RANGE_SPEC_RE: Final = re.compile(r"([0-9]*)-([0-9]*)")
#: what a Range bound of more than REGISTRY_MAX_RANGE_DIGITS digits stands for: more than
#: any blob size (it is only compared with sizes, never used as an offset)
_PAST_ANY_BLOB: Final = 10**REGISTRY_MAX_RANGE_DIGITS


def _range_bound(digits: str) -> int:
    length, significant = _digits_key(digits)
    return int(significant or "0") if length <= REGISTRY_MAX_RANGE_DIGITS else _PAST_ANY_BLOB


def _parse_ranges(value: str, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable ranges of a ``bytes=`` Range header as (start, end exclusive), in
    the order given; [] if none is satisfiable; None if the header is malformed. Bounds of
    any length are taken (RFC 9110 14.1.1): a longer first-pos than any blob size is
    unsatisfiable, a longer last-pos or suffix-length means to the end."""
    unit, _, specs = value.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    out: list[tuple[int, int]] = []
    for spec in specs.split(","):
        m = _RANGE_SPEC_RE.fullmatch(spec.strip(" \t"))  # OWS around the commas
        if m is None or (not m[1] and not m[2]):
            return None
        if not m[1]:  # suffix: the last N bytes
            n = _range_bound(m[2])
            if n > 0 and size > 0:
                out.append((max(size - n, 0), size))
            continue
        if m[2] and _digits_key(m[2]) < _digits_key(m[1]):
            return None  # last-pos before first-pos
        start = _range_bound(m[1])
        if start < size:
            end = _range_bound(m[2]) + 1 if m[2] else size
            out.append((start, min(end, size)))
    return out


async def _sendfile(request: web.Request, f: BinaryIO, offset: int, count: int) -> None:
    """Send ``count`` bytes of ``f`` from ``offset`` on the response already started (after
    what the response wrote so far; asyncio flushes that first)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    await asyncio.get_running_loop().sendfile(transport, f, offset, count)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` in ascending order, those that overlap or lie closer than
    REGISTRY_RANGE_MERGE_GAP merged (RFC 9110 15.3.7.2 allows both): the parts of the answer
    never hold a byte twice, so it is never larger than the blob plus the part headers."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + REGISTRY_RANGE_MERGE_GAP:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _open_sized(path: Path) -> tuple[BinaryIO, int]:
    f = open(path, "rb")
    return f, os.fstat(f.fileno()).st_size


async def _multi_range(
    request: web.Request, path: Path, digest: str, header: str
) -> web.StreamResponse:
    """Answer a Range header with several ranges: 206 multipart/byteranges of the coalesced
    ranges, each part sent with sendfile(2) like a single range. More than REGISTRY_MAX_RANGES
    ranges: the header is ignored and the whole blob sent (RFC 9110 14.2)."""
    if header.count(",") >= REGISTRY_MAX_RANGES:
        return await _whole_blob(request, path, digest)
    f, size = await offload(_open_sized, path)
    with f:  # closing a file opened for reading does no I/O
        parsed = _parse_ranges(header, size)
        if not parsed:
            # like FileResponse for one range: 416 with the size, no body
            return web.Response(status=416, headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})
        ranges = _coalesce(parsed)
        if len(ranges) == 1:  # one range left: an ordinary 206, as for a single range
            start, end = ranges[0]
            resp = web.StreamResponse(
                status=206,
                headers={
                    hdrs.CONTENT_TYPE: "application/octet-stream",
                    hdrs.CONTENT_RANGE: f"bytes {start}-{end - 1}/{size}",
                    "Docker-Content-Digest": digest,
                    hdrs.ACCEPT_RANGES: "bytes",
                },
            )
            resp.content_length = end - start
            await resp.prepare(request)
            if request.method != hdrs.METH_HEAD:
                await _sendfile(request, f, start, end - start)
                await resp.write_eof()
            return resp
        boundary = secrets.token_hex(16)
        heads = [
            (f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
             f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n").encode()
            for start, end in ranges
        ]  # fmt: skip
        heads[0] = heads[0][2:]  # no CRLF before the first boundary
        tail = f"\r\n--{boundary}--\r\n".encode()
        resp = web.StreamResponse(
            status=206,
            headers={
                hdrs.CONTENT_TYPE: f"multipart/byteranges; boundary={boundary}",
                "Docker-Content-Digest": digest,
                hdrs.ACCEPT_RANGES: "bytes",
            },
        )
        resp.content_length = sum(len(h) for h in heads) + sum(e - s for s, e in ranges) + len(tail)
        await resp.prepare(request)
        if request.method == hdrs.METH_HEAD:
            return resp
        for head, (start, end) in zip(heads, ranges, strict=True):
            await resp.write(head)
            await _sendfile(request, f, start, end - start)
        await resp.write(tail)
        await resp.write_eof()
        return resp


def _read_hashed(f: BinaryIO, h: Any) -> bytes:
    piece = f.read(REGISTRY_IO_CHUNK)
    h.update(piece)
    return piece


async def _whole_blob(request: web.Request, path: Path, digest: str) -> web.StreamResponse:
    """Send the whole blob, hashing it on the way. The last piece is held back until the
    digest is checked: on a mismatch the blob is quarantined and the connection cut, so the
    client sees a short body and never the whole of a wrong blob."""
    storage = _storage(request)
    f, size = await offload(_open_sized, path)
    with f:
        resp = web.StreamResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: "application/octet-stream",
                "Docker-Content-Digest": digest,
                hdrs.ACCEPT_RANGES: "bytes",
            },
        )
        resp.content_length = size
        await resp.prepare(request)
        if request.method == hdrs.METH_HEAD:
            return resp
        h = hashlib.new(digest.split(":", 1)[0])
        held = b""
        read = 0
        while piece := await offload(_read_hashed, f, h):
            if held:
                await resp.write(held)
            held = piece
            read += len(piece)
        if read != size or f"{h.name}:{h.hexdigest()}" != digest:
            fid = file_id(os.fstat(f.fileno()))
            await offload(storage.quarantine_blob, digest, fid)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write(held)
        await resp.write_eof()
        return resp


async def _get_blob(request: web.Request, route: Route) -> web.StreamResponse:
    storage = _storage(request)
    digest = check_blob_digest(route.ref)
    path = await offload(storage.find_blob, route.name, digest)
    if path is None:
        raise BlobUnknown(f"blob {digest} is not in {route.name}", detail={"digest": digest})
    range_header = request.headers.get(hdrs.RANGE, "")
    if "," in range_header:
        return await _multi_range(request, path, digest, range_header)
    if not range_header and request.method == hdrs.METH_GET:
        return await _whole_blob(request, path, digest)
    # FileResponse sends with sendfile(2) and answers one Range itself (206, 416, HEAD).
    return web.FileResponse(
        path,
        headers={
            hdrs.CONTENT_TYPE: "application/octet-stream",
            "Docker-Content-Digest": digest,
        },
    )


async def _delete_blob(request: web.Request, route: Route) -> web.StreamResponse:
    digest = check_blob_digest(route.ref)
    await offload(_storage(request).unlink_blob, route.name, digest)
    return web.Response(status=202, headers={hdrs.CONTENT_LENGTH: "0"})


async def _start_upload(request: web.Request, route: Route) -> web.StreamResponse:
    if route.ref:
        raise Unsupported("POST to an upload session is not allowed", status=405)
    storage = _storage(request)
    name = check_name(route.name)
    query = request.query
    mount = query.get("mount")
    if mount is not None:
        digest = check_blob_digest(mount)
        source = query.get("from")
        if source:
            mounted = await offload(storage.mount_blob, name, check_name(source), digest)
            if mounted:
                return _blob_created(name, digest)
        # not mountable: an ordinary upload session (202), as the spec says
    elif "digest" in query:
        digest = check_blob_digest(query["digest"])
        _check_body_size(request)
        uuid = await offload(storage.new_upload, name)
        try:
            await storage.upload_append(uuid, _body(request), 0, repo=name)
            await offload(storage.upload_finish, uuid, digest, repo=name)
        except BaseException:
            with contextlib.suppress(DistributionError, OSError):
                await offload(storage.upload_cancel, uuid)
            raise
        return _blob_created(name, digest)
    uuid = await offload(storage.new_upload, name)
    return web.Response(status=202, headers=_upload_headers(name, uuid, 0))


async def _append(request: web.Request, route: Route) -> int:
    """Stream the request body into upload ``route.ref``; return the new offset. A 416 carries
    the upload's Location and Range, as the distribution spec wants."""
    storage = _storage(request)
    try:
        crange = _content_range(request)
        start = expected = None
        length = request.content_length
        if crange is not None:
            start, expected = crange[0], crange[1] - crange[0] + 1
            if length is not None and expected != length:
                raise RangeInvalid(
                    f"Content-Range {crange[0]}-{crange[1]} does not match Content-Length {length}",
                    detail={"contentRange": list(crange), "contentLength": length},
                )
        if length is not None:
            status = await offload(storage.upload_status, route.ref, repo=route.name)
            if start is not None and start != status.offset:
                raise RangeInvalid(
                    f"chunk starts at {start} but the upload is at {status.offset}",
                    detail={"offset": status.offset, "start": start},
                )
            _check_body_size(request, status.offset)
        return await storage.upload_append(
            route.ref, _body(request), start, repo=route.name, expected_length=expected
        )
    except RangeInvalid as exc:
        offset = exc.detail.get("offset") if isinstance(exc.detail, dict) else None
        if not isinstance(offset, int):
            with contextlib.suppress(DistributionError, OSError):
                offset = (await offload(storage.upload_status, route.ref, repo=route.name)).offset
        if isinstance(offset, int):
            headers = _upload_headers(route.name, route.ref, offset)
            del headers[hdrs.CONTENT_LENGTH]
            exc.headers.update(headers)
        raise


async def _patch_upload(request: web.Request, route: Route) -> web.StreamResponse:
    check_name(route.name)
    offset = await _append(request, route)
    return web.Response(status=202, headers=_upload_headers(route.name, route.ref, offset))


async def _put_upload(request: web.Request, route: Route) -> web.StreamResponse:
    storage = _storage(request)
    check_name(route.name)
    raw = request.query.get("digest")
    if not raw:
        raise DigestInvalid("the digest query parameter is missing")
    digest = check_blob_digest(raw)
    if request.body_exists:
        await _append(request, route)
    await offload(storage.upload_finish, route.ref, digest, repo=route.name)
    return _blob_created(route.name, digest)


async def _upload_status(request: web.Request, route: Route) -> web.StreamResponse:
    status = await offload(_storage(request).upload_status, route.ref, repo=route.name)
    return web.Response(status=204, headers=_upload_headers(route.name, route.ref, status.offset))


async def _cancel_upload(request: web.Request, route: Route) -> web.StreamResponse:
    await offload(_storage(request).upload_cancel, route.ref, repo=route.name)
    return web.Response(status=204)


async def _referrers(request: web.Request, route: Route) -> web.StreamResponse:
    digest = check_blob_digest(route.ref)
    artifact_type = request.query.get("artifactType") or None
    found = await offload(_storage(request).referrers, route.name, digest, artifact_type)
    headers: dict[str, str] = {hdrs.CONTENT_TYPE: OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
    return web.Response(body=json.dumps(index).encode(), headers=headers)


_HANDLERS: Final[dict[str, dict[str, Handler]]] = {
    "base": {"GET": _base, "HEAD": _base},
    "catalog": {"GET": _catalog},
    "tags": {"GET": _tags},
    "manifest": {
        "GET": _get_manifest,
        "HEAD": _get_manifest,
        "PUT": _put_manifest,
        "DELETE": _delete_manifest,
    },
    "blob": {"GET": _get_blob, "HEAD": _get_blob, "DELETE": _delete_blob},
    "upload": {
        "POST": _start_upload,
        "PATCH": _patch_upload,
        "PUT": _put_upload,
        "GET": _upload_status,
        "DELETE": _cancel_upload,
    },
    "referrers": {"GET": _referrers},
}


async def _dispatch(request: web.Request) -> web.StreamResponse:
    route = parse_v2_path(request.path)
    if route is None:
        raise Unsupported(f"no such endpoint: {request.path[:200]}", status=404)
    methods = _HANDLERS[route.kind]
    handler = methods.get(request.method)
    if handler is None:
        raise Unsupported(
            f"method {request.method} is not allowed here",
            status=405,
            headers={hdrs.ALLOW: ", ".join(sorted(methods))},
        )
    if route.name:
        check_name(route.name)
    return await handler(request, route)


# -- middleware, signals, background tasks ---------------------------------------------


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except DistributionError as exc:
        return error_response(exc, head=request.method == hdrs.METH_HEAD)
    except (web.HTTPException, asyncio.CancelledError):
        raise
    except (ConnectionError, ClientPayloadError) as exc:
        # the client went away or sent a broken body; what arrived of an upload is kept in its
        # session (a monolithic upload was dropped already)
        log.info("%s %s: request body broken off: %r", request.method, request.path, exc)
        broken = BlobUploadInvalid(f"request body incomplete: {exc}")
        return error_response(broken, head=request.method == hdrs.METH_HEAD)
    except OSError as exc:
        if exc.errno not in _FULL_ERRNOS:
            log.exception("internal error on %s %s", request.method, request.path)
            err = DistributionError(f"internal error: {type(exc).__name__}", status=500)
            return error_response(err, head=request.method == hdrs.METH_HEAD)
        # the write that failed removed what it had written; the client may try again later
        log.warning("%s %s: registry storage is full: %s", request.method, request.path, exc.strerror)
        full = StorageFull(f"registry storage is full: {exc.strerror or 'no space left'}")
        return error_response(full, head=request.method == hdrs.METH_HEAD)
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        err = DistributionError(f"internal error: {type(exc).__name__}", status=500)
        return error_response(err, head=request.method == hdrs.METH_HEAD)


async def _add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[API_VERSION_HEADER] = API_VERSION


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    """Expire idle upload sessions in the background while the app runs."""
    storage = app[STORAGE_KEY]
    interval = min(max(app[CONFIG_KEY].upload_ttl / 4, 0.05), 60.0)
    with contextlib.suppress(OSError):
        await offload(storage.clean_temporary_files, 60.0)

    async def expire_forever() -> None:
        while True:
            try:
                expired = await offload(storage.expire_uploads)
                if expired:
                    log.info("expired %d idle upload session(s)", expired)
            except Exception:
                log.exception("expiring upload sessions failed")
            await asyncio.sleep(interval)

    task = asyncio.create_task(expire_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(cfg: RegistryConfig, storage: Storage | None = None) -> web.Application:
    """The registry as an aiohttp application (auth and turbo extensions included)."""
    if storage is None:
        try:
            storage = Storage(cfg.storage, cfg)
        except OSError as exc:
            raise UsageError(f"cannot use the storage folder {cfg.storage}: {exc}") from None
    app = web.Application(middlewares=[_error_middleware])
    app[STORAGE_KEY] = storage
    app[CONFIG_KEY] = cfg
    app.on_response_prepare.append(_add_api_version)
    app.cleanup_ctx.append(_housekeeping)
    auth.setup(app, cfg)
    turbo_ext.setup(app, storage, cfg)
    app.router.add_route("*", "/v2", _dispatch)
    app.router.add_route("*", "/v2/{tail:.*}", _dispatch)
    return app


async def start(cfg: RegistryConfig, storage: Storage | None = None) -> tuple[web.AppRunner, int]:
    """Start serving in the running event loop; return (runner, bound port).

    Stop with ``await runner.cleanup()``.
    """
    app = create_app(cfg, storage)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    return runner, port


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(cfg: RegistryConfig) -> None:
    runner, port = await start(cfg)
    try:
        print(
            f"turbofs registry listening on {url_for(cfg.host, port)} (storage {cfg.storage})",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(cfg: RegistryConfig) -> None:
    """Run the registry until SIGTERM or SIGINT (blocking)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING, stream=sys.stderr, format="turbofs registry: %(levelname)s %(message)s"
        )
    asyncio.run(_serve(cfg))
