"""``containerd.services.snapshots.v1.Snapshots`` over gRPC on a unix socket: translates
requests to :class:`~turbofs.snapshotter.core.Snapshotter` calls and errors to status codes
(:func:`turbofs.snapshotter.errors.status_code`, the one place). A failing call never stops
the server: containerd gets the code and a message naming the cause, and the log says it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from turbofs.core.config import SNAPSHOTTER_LIST_BATCH, SnapshotterConfig, daemon_config
from turbofs.proto import SNAPSHOTS, serialize, types_pb2
from turbofs.proto import snapshots_pb2 as pb
from turbofs.snapshotter.core import Mount, Snapshotter
from turbofs.snapshotter.errors import status_code
from turbofs.snapshotter.mounts import DaemonMounter
from turbofs.snapshotter.remote import Resolver
from turbofs.snapshotter.store import Snapshot

log = logging.getLogger("turbofs.snapshotter")

Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


def _timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def info_message(snap: Snapshot) -> pb.Info:
    return pb.Info(name=snap.name, parent=snap.parent, kind=snap.kind,  # type: ignore[arg-type]
                   created_at=_timestamp(snap.created), updated_at=_timestamp(snap.updated), labels=snap.labels)


def _mounts(mounts: list[Mount]) -> list[types_pb2.Mount]:
    return [types_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class SnapshotsService:
    """One method per RPC, each ``(request, context) -> reply``."""

    def __init__(self, sn: Snapshotter) -> None:
        self.sn = sn

    def Prepare(self, req: pb.PrepareSnapshotRequest, ctx: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        return pb.PrepareSnapshotResponse(mounts=_mounts(self.sn.prepare(req.key, req.parent, dict(req.labels))))

    def View(self, req: pb.ViewSnapshotRequest, ctx: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        return pb.ViewSnapshotResponse(mounts=_mounts(self.sn.view(req.key, req.parent, dict(req.labels))))

    def Mounts(self, req: pb.MountsRequest, ctx: grpc.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(req.key)))

    def Commit(self, req: pb.CommitSnapshotRequest, ctx: grpc.ServicerContext) -> Empty:
        self.sn.commit(req.name, req.key, dict(req.labels))
        return Empty()

    def Remove(self, req: pb.RemoveSnapshotRequest, ctx: grpc.ServicerContext) -> Empty:
        self.sn.remove(req.key)
        return Empty()

    def Stat(self, req: pb.StatSnapshotRequest, ctx: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_message(self.sn.stat(req.key)))

    def Update(self, req: pb.UpdateSnapshotRequest, ctx: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        snap = self.sn.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_message(snap))

    def List(self, req: pb.ListSnapshotsRequest, ctx: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        snaps = self.sn.walk(list(req.filters))
        for i in range(0, len(snaps), SNAPSHOTTER_LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_message(s) for s in snaps[i : i + SNAPSHOTTER_LIST_BATCH]])

    def Usage(self, req: pb.UsageRequest, ctx: grpc.ServicerContext) -> pb.UsageResponse:
        u = self.sn.usage(req.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    def Cleanup(self, req: pb.CleanupRequest, ctx: grpc.ServicerContext) -> Empty:
        self.sn.cleanup()
        return Empty()


def _abort(name: str, exc: Exception, ctx: grpc.ServicerContext) -> NoReturn:
    """Log a failed call and answer it with the status code of ``exc``."""
    code = status_code(exc)
    level = logging.ERROR if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
    log.log(level, "%s: %s: %s", name, code.name, exc, exc_info=code is grpc.StatusCode.INTERNAL)
    ctx.abort(code, str(exc) or type(exc).__name__)


def _guard(name: str, fn: Callable[[Req, grpc.ServicerContext], Rep]) -> Callable[[Req, grpc.ServicerContext], Rep]:
    def call(req: Req, ctx: grpc.ServicerContext) -> Rep:
        try:
            return fn(req, ctx)
        except Exception as exc:
            _abort(name, exc, ctx)

    return call


def _guard_stream(name: str, fn: Callable[[Req, grpc.ServicerContext], Iterator[Rep]]) -> Callable[[Req, grpc.ServicerContext], Iterator[Rep]]:
    def call(req: Req, ctx: grpc.ServicerContext) -> Iterator[Rep]:
        try:
            yield from fn(req, ctx)
        except Exception as exc:
            _abort(name, exc, ctx)

    return call


def generic_handler(service: SnapshotsService) -> grpc.GenericRpcHandler:
    """The method table of the Snapshots service, each method guarded."""
    unary: dict[str, tuple[Any, type[Message]]] = {
        "Prepare": (service.Prepare, pb.PrepareSnapshotRequest),
        "View": (service.View, pb.ViewSnapshotRequest),
        "Mounts": (service.Mounts, pb.MountsRequest),
        "Commit": (service.Commit, pb.CommitSnapshotRequest),
        "Remove": (service.Remove, pb.RemoveSnapshotRequest),
        "Stat": (service.Stat, pb.StatSnapshotRequest),
        "Update": (service.Update, pb.UpdateSnapshotRequest),
        "Usage": (service.Usage, pb.UsageRequest),
        "Cleanup": (service.Cleanup, pb.CleanupRequest),
    }
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            _guard(name, fn), request_deserializer=req.FromString, response_serializer=serialize)
        for name, (fn, req) in unary.items()
    }
    handlers["List"] = grpc.unary_stream_rpc_method_handler(
        _guard_stream("List", service.List), request_deserializer=pb.ListSnapshotsRequest.FromString,
        response_serializer=serialize)
    return grpc.method_handlers_generic_handler(SNAPSHOTS, handlers)


class SnapshotterServer:
    """The snapshotter and its gRPC server on ``cfg.address``; ``start()``, ``stop()``."""

    def __init__(self, cfg: SnapshotterConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        dcfg = daemon_config(config_path)
        self.snapshotter = Snapshotter(
            cfg.root,
            DaemonMounter(cfg.run_dir, dcfg, config_path, spare=cfg.spare_daemon),
            Resolver(plain_http=cfg.plain_http, retries=cfg.registry_retries, timeout=cfg.registry_timeout,
                     turbo_tag_suffix=cfg.turbo_tag_suffix),
            cri_lookup=cfg.cri_lookup,
        )
        self.server = grpc.server(ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="snapshots"))
        self.server.add_generic_rpc_handlers((generic_handler(SnapshotsService(self.snapshotter)),))

    def start(self) -> None:
        self.snapshotter.recover()
        address = self.cfg.address
        address.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            address.unlink()
        old = os.umask(0o077)  # the socket: root (containerd) only
        try:
            if self.server.add_insecure_port(f"unix:{address}") == 0:
                raise OSError(f"cannot listen on unix socket {address}")
            self.server.start()
        finally:
            os.umask(old)
        os.chmod(address, 0o600)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving; the turbofs mounts stay (running containers use them)."""
        self.server.stop(grace).wait()
        self.snapshotter.close()
        with contextlib.suppress(FileNotFoundError):
            self.cfg.address.unlink()


def serve(cfg: SnapshotterConfig, config_path: Path | None = None) -> None:
    """Run the snapshotter until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per registry request otherwise
    srv = SnapshotterServer(cfg, config_path)
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: stopping (turbofs mounts stay)", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    srv.start()
    print(f"turbofs snapshotter listening on unix:{cfg.address} (root {cfg.root})", flush=True)
    try:
        done.wait()
    finally:
        srv.stop()


__all__ = ["SnapshotsService", "SnapshotterServer", "generic_handler", "info_message", "serve"]
