"""The turbofs extensions of the registry API (specification: ``docs/api.md``).

Everything under ``/v2/_turbofs/`` and ``/v2/<name>/_turbofs/``: ``info``, ``batch`` (many
byte ranges in one response, sent with sendfile(2)), ``missing`` and ``convert``. A client
that gets 404 from ``GET /v2/_turbofs/info`` uses the plain OCI API instead.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any, BinaryIO, Final

from aiohttp import web

from server import jsonbody
from server.convert import Converter
from server.offload import offload
from server.storage import Storage, is_tag
from turbofs.core import oci
from turbofs.core.config import (
    REGISTRY_MAX_CONVERT_BODY,
    REGISTRY_MAX_EXT_BODY,
    REGISTRY_MAX_MISSING_DIGESTS,
    RegistryConfig,
)
from turbofs.core.errors import FormatError

VERSION: Final = 1
_NAME: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
_NAME_RE: Final = re.compile(f"^{_NAME}$")
CONVERTER_KEY: Final = web.AppKey("turbofs_converter", Converter)


def _error(status: int, code: str, message: str, detail: Any = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return web.json_response({"errors": [body]}, status=status)


def setup(app: web.Application, storage: Storage, cfg: RegistryConfig) -> None:
    """Add the extension routes (before the OCI catch-all routes of the app)."""
    converter = Converter(storage, cfg)
    app[CONVERTER_KEY] = converter
    ext = _Extensions(storage, cfg, converter)
    app.router.add_get("/v2/_turbofs/info", ext.info)
    app.router.add_post(r"/v2/{name:" + _NAME + r"}/_turbofs/batch", ext.batch)
    app.router.add_post(r"/v2/{name:" + _NAME + r"}/_turbofs/missing", ext.missing)
    app.router.add_post(r"/v2/{name:" + _NAME + r"}/_turbofs/convert", ext.convert)
    app.router.add_get(r"/v2/{name:" + _NAME + r"}/_turbofs/convert/{job:[0-9a-f]+}", ext.convert_status)

    async def close_converter(_app: web.Application) -> None:
        await converter.close()

    app.on_cleanup.append(close_converter)


async def on_manifest_put(app: web.Application, repo: str, reference: str, digest: str, media_type: str) -> None:
    """Called by the OCI API after a manifest was stored: the automatic conversion hook."""
    converter = app.get(CONVERTER_KEY)
    if converter is not None:
        await converter.maybe_auto_convert(repo, reference, digest, media_type)


class _Extensions:
    def __init__(self, storage: Storage, cfg: RegistryConfig, converter: Converter) -> None:
        self.storage = storage
        self.cfg = cfg
        self.converter = converter

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": VERSION,
                "extensions": ["batch", "missing", "convert"],
                "max_batch_ranges": self.cfg.max_batch_ranges,
                "max_batch_bytes": self.cfg.max_batch_bytes,
            }
        )

    async def _json(self, request: web.Request, limit: int = REGISTRY_MAX_EXT_BODY) -> Any:
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        # read() returns what has arrived, not the whole body: read to the end
        pieces: list[bytes] = []
        size = 0
        while piece := await request.content.read(limit + 1 - size):
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        raw = b"".join(pieces)
        try:
            return await offload(jsonbody.loads, raw, "request body")
        except jsonbody.JsonError as exc:
            raise _Bad(str(exc)) from None

    async def batch(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            body = await self._json(request)
            ranges = _parse_ranges(body, self.cfg)
        except _Bad as exc:
            return _error(400, "BATCH_INVALID", str(exc))
        files: dict[str, BinaryIO] = {}
        try:
            # every blob opened first: no byte is sent unless the whole batch can be served
            plan = await offload(_open_plan, self.storage, name, ranges, files)
            if isinstance(plan, web.Response):
                return plan
            resp = web.StreamResponse(status=200, headers={"Content-Type": oci.TURBO_BATCH})
            resp.content_length = sum(n for _, _, n in plan)
            await resp.prepare(request)
            transport = request.transport
            for f, offset, length in plan:
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away")
                # loop.sendfile copies through the executor where the transport has no sendfile(2)
                await asyncio.get_running_loop().sendfile(transport, f, offset, length)
            await resp.write_eof()
            return resp
        finally:
            for f in files.values():
                f.close()  # read-only files: no I/O

    async def missing(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = await self._json(request)
            digests = body.get("digests") if isinstance(body, dict) else None
            if not isinstance(digests, list) or len(digests) > REGISTRY_MAX_MISSING_DIGESTS:
                raise _Bad(f'expected {{"digests": [...]}} with at most {REGISTRY_MAX_MISSING_DIGESTS} digests')
            for d in digests:
                oci.check_digest(d)
        except (_Bad, FormatError) as exc:
            return _error(400, "DIGEST_INVALID", str(exc))
        # blobs stored already are linked: the push needs no upload for them
        missing = await offload(self.storage.link_stored, name, digests)
        return web.json_response({"missing": missing})

    async def convert(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = await self._json(request, REGISTRY_MAX_CONVERT_BODY)
            if not isinstance(body, dict) or not isinstance(body.get("reference"), str):
                raise _Bad('expected {"reference": TAG_OR_DIGEST, "tag": TARGET_TAG}')
            reference = body["reference"]
            if not is_tag(reference) and not _is_digest(reference):
                raise _Bad(f"reference {reference[:140]!r} is neither a tag nor a digest")
            tag = body.get("tag")
            if tag is not None and not isinstance(tag, str):
                raise _Bad("tag must be a string")
            job = self.converter.submit(name, reference, tag)
        except _Bad as exc:
            return _error(400, "UNSUPPORTED", str(exc))
        except ValueError as exc:
            return _error(400, "MANIFEST_INVALID", str(exc))
        location = f"/v2/{name}/_turbofs/convert/{job.id}"
        return web.json_response(job.to_json(), status=202, headers={"Location": location})

    async def convert_status(self, request: web.Request) -> web.Response:
        job = self.converter.jobs.get(request.match_info["job"])
        if job is None or job.repo != request.match_info["name"]:
            return _error(404, "NAME_UNKNOWN", "no such conversion")
        return web.json_response(job.to_json())


class _Bad(Exception):
    pass


def _is_digest(value: str) -> bool:
    try:
        oci.check_digest(value)
    except FormatError:
        return False
    return True


def _open_plan(
    storage: Storage, name: str, ranges: list[tuple[str, int, int]], files: dict[str, BinaryIO]
) -> list[tuple[BinaryIO, int, int]] | web.Response:
    """Open the blobs of a batch (into ``files``, which the caller closes) and check each range;
    (file, offset, length) per range, or the error response."""
    plan: list[tuple[BinaryIO, int, int]] = []
    for digest, offset, length in ranges:
        f = files.get(digest)
        if f is None:
            path = storage.find_blob(name, digest)
            if path is None:
                return _error(404, "BLOB_UNKNOWN", f"blob {digest} is not in repository {name}", {"digest": digest})
            f = files[digest] = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        if offset + length > size:
            return _error(416, "RANGE_INVALID", f"range {offset}+{length} is past the end of {digest} ({size} bytes)")
        plan.append((f, offset, length))
    return plan


def _parse_ranges(body: Any, cfg: RegistryConfig) -> list[tuple[str, int, int]]:
    ranges = body.get("ranges") if isinstance(body, dict) else None
    if not isinstance(ranges, list) or not ranges:
        raise _Bad('expected {"ranges": [{"digest": D, "offset": N, "length": N}, ...]}')
    if len(ranges) > cfg.max_batch_ranges:
        raise _Bad(f"{len(ranges)} ranges is more than the limit of {cfg.max_batch_ranges}")
    out = []
    total = 0
    for r in ranges:
        if not isinstance(r, dict):
            raise _Bad("each range must be an object")
        digest, offset, length = r.get("digest"), r.get("offset"), r.get("length")
        try:
            oci.check_digest(digest)  # type: ignore[arg-type]
        except FormatError as exc:
            raise _Bad(str(exc)) from None
        # type() rather than isinstance: JSON true/false are bools, and bool is an int subclass
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
            raise _Bad(f"range of {digest}: offset and length must be integers, length > 0")
        total += length
        out.append((str(digest), offset, length))
    if total > cfg.max_batch_bytes:
        raise _Bad(f"{total} bytes is more than the limit of {cfg.max_batch_bytes} per batch")
    return out


__all__ = ["CONVERTER_KEY", "on_manifest_put", "setup"]
