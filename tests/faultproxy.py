"""An HTTP proxy in front of a real registry that injects faults: the transport seam for
end-to-end tests of the node daemon (delays, dropped connections, truncated or corrupted
bodies, 5xx answers). It runs its own event loop in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from aiohttp import web

from tests.registry_fixtures import free_port


@dataclass
class Faults:
    """What to do to blob answers (``/blobs/`` and ``/_turbofs/batch``); manifests pass."""

    corrupt: int = 0  # answers with one flipped byte
    error_503: int = 0  # answers replaced by 503
    drop: int = 0  # connections closed before any answer
    truncate: int = 0  # answers cut in half
    delay: float = 0.0  # seconds before every blob answer
    down: bool = False  # every request answered by a dropped connection


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = Faults()
        self.blob_requests = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._client = httpx.AsyncClient(timeout=60)
        self._ready.set()
        self._loop.run_forever()

    def _take(self, name: str) -> bool:
        left: int = getattr(self.faults, name)
        if left > 0:
            setattr(self.faults, name, left - 1)
            return True
        return False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        blobby = "/blobs/sha" in request.path or request.path.endswith("/_turbofs/batch")
        if self.faults.down or (blobby and self._take("drop")):
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPServiceUnavailable()
        if blobby:
            self.blob_requests += 1
            if self.faults.delay:
                await asyncio.sleep(self.faults.delay)
            if self._take("error_503"):
                return web.Response(status=503, text="injected")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        resp = await self._client.request(request.method, self.upstream + request.path_qs, headers=headers, content=body)
        data = resp.content
        if blobby and data and self._take("corrupt"):
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        out_headers = {k: v for k, v in resp.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
        if blobby and data and self._take("truncate"):
            out = web.StreamResponse(status=resp.status_code, headers=out_headers)
            out.content_length = len(data)
            await out.prepare(request)
            await out.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return out
        return web.Response(status=resp.status_code, body=data, headers=out_headers)

    def close(self) -> None:
        async def stop() -> None:
            await self._client.aclose()
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
