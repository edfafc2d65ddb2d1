"""Counters, gauges and histograms of the node daemon, rendered in the Prometheus text
exposition format (0.0.4) without a dependency. Metrics are updated from the trio thread;
values owned by other threads (the disk cache's counters) are read at render time through
collector callbacks.

:class:`NodeMetrics` holds the daemon's metrics; :class:`MeteredTransport` wraps an httpx
transport to count registry requests and the failures the client retries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeVar

import httpx

from turbofs.core.config import CLIENT_RETRY_STATUS, FETCH_LATENCY_BUCKETS

_NAME_RE: Final = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _series(name: str, labelnames: Sequence[str], values: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in zip(labelnames, values, strict=True)]
    if extra:
        parts.append(extra)
    return f"{name}{{{','.join(parts)}}}" if parts else name


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label == "le":
                raise ValueError(f"invalid label name {label!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> Labels:
        try:
            if len(labels) == len(self.labelnames):
                return tuple([str(labels[k]) for k in self.labelnames])
        except KeyError:
            pass
        raise ValueError(f"{self.name}: labels {sorted(labels)}, expected {sorted(self.labelnames)}")

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}", *self.samples()]


class _Valued(_Metric):
    """A metric with one value per label set; or, with ``collect``, values kept elsewhere
    (another thread's counts) and read at render time."""

    #: an unlabelled series is shown (as 0) before its first update
    _starts_at_zero = False

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        collect: Callable[[], Iterable[tuple[Labels, float]]] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {}
        self._collect = collect
        if self._starts_at_zero and not self.labelnames:
            self._values[()] = 0.0

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        if self._collect is not None:
            return dict(self._collect()).get(key, 0.0)
        return self._values.get(key, 0.0)

    def samples(self) -> Iterable[str]:
        items = dict(self._collect()) if self._collect is not None else self._values
        for key, v in sorted(items.items()):
            yield f"{_series(self.name, self.labelnames, key)} {_fmt(v)}"


class Counter(_Valued):
    """A value that only goes up (per label set)."""

    kind = "counter"
    _starts_at_zero = True

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Valued):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = FETCH_LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        counts[i] += 1
        total[0] += value

    def count(self, **labels: str) -> int:
        data = self._data.get(self._key(labels))
        return sum(data[0]) if data else 0

    def samples(self) -> Iterable[str]:
        for key, (counts, total) in sorted(self._data.items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = 'le="' + _fmt(bound) + '"'
                yield f"{_series(self.name + '_bucket', self.labelnames, key, le)} {running}"
            yield f"{_series(self.name + '_sum', self.labelnames, key)} {_fmt(total[0])}"
            yield f"{_series(self.name + '_count', self.labelnames, key)} {running}"


M = TypeVar("M", bound=_Metric)


class Registry:
    """A set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: M) -> M:
        """Register ``metric`` (its name must be new) and return it."""
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class NodeMetrics(Registry):
    """The node daemon's metrics. Labels: ``kind`` is demand | readahead | prefetch, ``tier``
    is ram | disk, ``source`` is network | disk."""

    def __init__(self) -> None:
        super().__init__()
        add = self.add
        self.fetch_seconds = add(Histogram(
            "turbofs_fetch_seconds", "Latency of one fetch of chunks from the chunk source.", ["kind"]))
        self.fetch_bytes = add(Counter(
            "turbofs_fetch_bytes_total", "Compressed bytes fetched from the chunk source.", ["kind"]))
        self.fetch_chunks = add(Counter("turbofs_fetch_chunks_total", "Chunks fetched from the chunk source.", ["kind"]))
        self.cache_hits = add(Counter("turbofs_cache_hits_total", "Chunk lookups answered by a cache tier.", ["tier"]))
        self.cache_misses = add(Counter(
            "turbofs_cache_misses_total", "Chunk lookups a cache tier could not answer.", ["tier"]))
        self.http_requests = add(Counter(
            "turbofs_registry_requests_total", "HTTP requests to the registry, by status class.", ["code"]))
        self.retries = add(Counter(
            "turbofs_registry_retries_total",
            "Registry answers and connection errors the client retries (429, 5xx, timeouts, resets)."))
        self.digest_failures = add(Counter(
            "turbofs_digest_failures_total", "Chunks whose bytes did not match their digest.", ["source"]))
        self.refetches = add(Counter("turbofs_refetches_total", "Chunks fetched again after a digest failure."))
        self.errors = add(Counter("turbofs_read_errors_total", "Reads that failed (each became EIO).", ["kind"]))
        self.remembered_failures = add(Counter(
            "turbofs_read_remembered_failures_total",
            "Reads failed at once by a chunk failure seconds old (counted in turbofs_read_errors_total too)."))
        self.readahead_chunks = add(Counter("turbofs_readahead_chunks_total", "Chunks fetched ahead of sequential reads."))
        self.reads = add(Counter("turbofs_reads_total", "Reads served."))
        self.read_bytes = add(Counter("turbofs_read_bytes_total", "Bytes returned by reads."))
        self.read_waits = add(Counter(
            "turbofs_read_waits_total", "Reads that waited for chunks (on the disk tier or the registry).", ["on"]))
        self.read_wait_seconds = add(Counter(
            "turbofs_read_wait_seconds_total", "Seconds reads spent waiting for chunks.", ["on"]))
        self._prefetch: dict[str, Callable[[], dict[str, float]]] = {}
        add(Gauge("turbofs_prefetch", "Background prefetch of each image: chunks and compressed bytes done and total.",
                  ["image", "what"], collect=self._collect_prefetch))

    def track_prefetch(self, image: str, figures: Callable[[], dict[str, float]]) -> None:
        """Export a prefetcher's figures (``{"chunks_done": ..., ...}``) under its image name."""
        self._prefetch[image] = figures

    def _collect_prefetch(self) -> list[tuple[Labels, float]]:
        return [((image, what), value) for image, fn in self._prefetch.items() for what, value in fn().items()]


class MeteredTransport(httpx.AsyncBaseTransport):
    """An httpx transport that counts requests, statuses and retried failures, then delegates."""

    def __init__(self, inner: httpx.AsyncBaseTransport, metrics: NodeMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            resp = await self.inner.handle_async_request(request)
        except httpx.TransportError:
            self.metrics.http_requests.inc(code="error")
            self.metrics.retries.inc()
            raise
        self.metrics.http_requests.inc(code=f"{resp.status_code // 100}xx")
        if resp.status_code in CLIENT_RETRY_STATUS:  # retried unless the client's attempts ran out
            self.metrics.retries.inc()
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()


__all__ = [
    "Counter",
    "Gauge",
    "Histogram",
    "MeteredTransport",
    "NodeMetrics",
    "Registry",
]
