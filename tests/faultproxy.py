"""An HTTP proxy in front of a real registry that injects faults: the transport seam for
end-to-end tests of the node daemon and for the chaos soak (bench/chaos.py). It runs its
own event loop in a thread.

Faults apply to blob answers (``/blobs/sha...`` and ``/_turbofs/batch``); manifests and the
rest pass unless the proxy is ``down``. Two ways to ask for them, both on :class:`Faults`:

* counts (``proxy.faults.corrupt = 2``): the next N blob answers get that fault;
* a seeded :class:`Schedule` (``proxy.faults.schedule = Schedule(seed, {"reset": 0.05})``):
  each blob answer that no count claimed draws one fault by its probability.

Fault classes: ``drop`` (connection closed before any answer), ``reset`` (TCP RST after
half the body), ``truncate`` (half the body, then FIN), ``corrupt`` (one flipped byte),
``error_5xx`` (``status_5xx``, default 500), ``error_503``, ``throttle`` (429 with
``Retry-After``: seconds, or an HTTP date when ``retry_after_date``), ``stall`` (accepted,
never answered until ``stall_seconds`` pass or the proxy closes), ``stall_mid`` (half the
body, then silence as long). ``latency`` is added to every request in both directions
(before it goes upstream and before its answer goes back); ``delay`` only before blob
answers (the older knob). Every injected fault is counted in ``proxy.injected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import httpx
from aiohttp import web

from tests.registry_fixtures import free_port

__all__ = ["FAULT_CLASSES", "FaultProxy", "Faults", "Schedule", "fault_proxy"]

#: Every fault a count or a schedule can name, in the order counts are taken.
FAULT_CLASSES: tuple[str, ...] = ("drop", "reset", "stall", "throttle", "error_503", "error_5xx",
                                  "truncate", "stall_mid", "corrupt")


class Schedule:
    """Random faults: each blob answer gets fault ``name`` with probability ``rates[name]``
    (at most one per answer), drawn from a generator seeded with ``seed``."""

    def __init__(self, seed: int, rates: Mapping[str, float]) -> None:
        unknown = set(rates) - set(FAULT_CLASSES)
        if unknown:
            raise ValueError(f"unknown fault classes {sorted(unknown)}; known: {', '.join(FAULT_CLASSES)}")
        if any(p < 0 for p in rates.values()) or sum(rates.values()) > 1:
            raise ValueError(f"fault probabilities must be >= 0 and sum to at most 1: {dict(rates)}")
        self.seed = seed
        self.rates = dict(rates)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        with self._lock:
            x = self._rng.random()
        for name, p in self.rates.items():
            if x < p:
                return name
            x -= p
        return None


@dataclass
class Faults:
    """What to do to blob answers (``/blobs/`` and ``/_turbofs/batch``); manifests pass."""

    corrupt: int = 0  # answers with one flipped byte
    error_503: int = 0  # answers replaced by 503
    drop: int = 0  # connections closed before any answer
    truncate: int = 0  # answers cut in half
    delay: float = 0.0  # seconds before every blob answer
    down: bool = False  # every request answered by a dropped connection
    reset: int = 0  # half the body, then a TCP reset
    error_5xx: int = 0  # answers replaced by status_5xx
    status_5xx: int = 500
    throttle: int = 0  # answers replaced by 429 with Retry-After
    retry_after: float = 1.0  # seconds a 429 asks to wait
    retry_after_date: bool = False  # send Retry-After as an HTTP date instead of seconds
    stall: int = 0  # requests accepted and never answered (for stall_seconds)
    stall_mid: int = 0  # half the body, then silence (for stall_seconds)
    stall_seconds: float = 3600.0
    latency: float = 0.0  # seconds added to every request, each way
    schedule: Schedule | None = None
    #: faults only for requests whose path contains this (None: every blob request)
    only_path: str | None = None


@dataclass
class Event:
    """One blob request the proxy saw: when (monotonic), its path, the fault it got."""

    at: float
    method: str
    path: str
    fault: str | None
    extra: dict[str, str] = field(default_factory=dict)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = Faults()
        self.blob_requests = 0
        self.injected: Counter[str] = Counter()
        self.events: list[Event] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start in 10 s")

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._closing = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256))
        self._ready.set()
        self._loop.run_forever()

    def _take(self, name: str) -> bool:
        left: int = getattr(self.faults, name)
        if left > 0:
            setattr(self.faults, name, left - 1)
            return True
        return False

    def _pick(self, path: str) -> str | None:
        """The fault for this blob request: a count first, else the schedule's draw."""
        if self.faults.only_path is not None and self.faults.only_path not in path:
            return None
        for name in FAULT_CLASSES:
            if self._take(name):
                return name
        return self.faults.schedule.draw() if self.faults.schedule is not None else None

    async def _silence(self) -> None:
        """Wait out a stall: ``stall_seconds``, or until the proxy closes."""
        assert self._closing is not None
        closing = self._closing
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing.wait(), self.faults.stall_seconds)

    @staticmethod
    def _abort(request: web.Request, *, rst: bool) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if rst and sock is not None:  # SO_LINGER 0: close() sends a RST, not a FIN
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()

    def _retry_after(self) -> str:
        if self.faults.retry_after_date:
            return email.utils.formatdate(time.time() + self.faults.retry_after, usegmt=True)
        return str(int(self.faults.retry_after)) if self.faults.retry_after == int(self.faults.retry_after) \
            else str(self.faults.retry_after)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        blobby = "/blobs/sha" in request.path or request.path.endswith("/_turbofs/batch")
        latency = self.faults.latency
        if latency:
            await asyncio.sleep(latency)
        fault = self._pick(request.path) if blobby and not self.faults.down else None
        if blobby:
            self.blob_requests += 1
            self.events.append(Event(time.monotonic(), request.method, request.path, fault,
                                     {"range": request.headers.get("Range", "")}))
        if fault is not None:
            self.injected[fault] += 1
        if self.faults.down or fault == "drop":
            self._abort(request, rst=False)
            raise web.HTTPServiceUnavailable()
        if blobby and self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if fault == "stall":
            await self._silence()
            self._abort(request, rst=False)
            raise web.HTTPServiceUnavailable()
        if fault == "error_503":
            return web.Response(status=503, text="injected")
        if fault == "error_5xx":
            return web.Response(status=self.faults.status_5xx, text="injected")
        if fault == "throttle":
            return web.Response(status=429, text="injected", headers={"Retry-After": self._retry_after()})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        try:
            resp = await self._client.request(request.method, self.upstream + request.path_qs, headers=headers,
                                              content=body)
        except httpx.HTTPError:  # the registry is down: the node sees its connection close
            self.injected["upstream_down"] += 1
            self._abort(request, rst=False)
            raise web.HTTPServiceUnavailable() from None
        data = resp.content
        if fault == "corrupt" and data:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        out_headers = {k: v for k, v in resp.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
        if latency:
            await asyncio.sleep(latency)
        if fault in ("truncate", "reset", "stall_mid") and data:
            out = web.StreamResponse(status=resp.status_code, headers=out_headers)
            out.content_length = len(data)
            await out.prepare(request)
            await out.write(data[: len(data) // 2])
            if fault == "stall_mid":
                await self._silence()
            self._abort(request, rst=fault == "reset")
            return out
        return web.Response(status=resp.status_code, body=data, headers=out_headers)

    def release_stalls(self) -> None:
        """End every stall now (their connections close), as a frozen registry that dies would."""

        def release() -> None:
            assert self._closing is not None
            self._closing.set()
            self._closing = asyncio.Event()

        self._loop.call_soon_threadsafe(release)

    def close(self) -> None:
        async def stop() -> None:
            if self._closing is not None:
                self._closing.set()
            await self._client.aclose()
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
