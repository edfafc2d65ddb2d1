"""The client of containerd's API: ``turbofs pull`` (lazily) and ``turbofs run``.

``pull`` gives containerd a turbo image without downloading a layer:

1. read the manifest and config from the registry (:func:`turbofs.snapshotter.fetch_image`:
   verified against their digests, fetched again after a corrupt answer);
2. under a lease, write both into containerd's content store with the labels its own
   unpacker would set (the config references the top snapshot,
   ``containerd.io/gc.ref.snapshot.<snapshotter>``);
3. create or update the image record;
4. Prepare, with no parent, a snapshot labelled with the image's *top* chain ID
   (``containerd.io/snapshot.ref``) and the turbofs labels; the snapshotter mounts the image
   and answers ALREADY_EXISTS, so containerd sees the image unpacked.

Only the top: a container needs no more, and the chain IDs below must stay free, or a plain
image sharing base layers, pulled later, would stack on snapshots without files (a turbo
image is flattened). ``run`` then runs ``ctr run`` with the image's entrypoint and command.

containerd's address, namespace and snapshotter follow ctr's conventions (flag, then
``CONTAINERD_ADDRESS``/``_NAMESPACE``/``_SNAPSHOTTER``, then the defaults).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from turbofs.core import oci
from turbofs.core.config import (
    CONTAINERD_LEASE_TTL,
    CONTAINERD_RETRY_FOR,
    CONTAINERD_TIMEOUT,
    CONTAINERD_WRITE_PIECE,
)
from turbofs.core.errors import NotFound, TurboError, UsageError
from turbofs.core.registry import Reference
from turbofs.proto import (
    CONTENT,
    IMAGES,
    LEASE_HEADER,
    LEASES,
    NAMESPACE_HEADER,
    SNAPSHOTS,
    content_pb2,
    images_pb2,
    leases_pb2,
    snapshots_pb2,
    types_pb2,
    unary,
    unix_target,
)
from turbofs.proto import stream_stream as _stream_stream
from turbofs.snapshotter import labels as L
from turbofs.snapshotter.remote import TurboImage, fetch_image

DEFAULT_ADDRESS: Final = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE: Final = "default"
DEFAULT_SNAPSHOTTER: Final = "turbofs"

R = TypeVar("R", bound=Message)


class ContainerdError(TurboError):
    """containerd answered with an error (its gRPC code and message are kept)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where containerd is and which namespace and snapshotter to use."""

    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    snapshotter: str = DEFAULT_SNAPSHOTTER

    @classmethod
    def from_env(cls, address: str | None = None, namespace: str | None = None, snapshotter: str | None = None) -> Target:
        return cls(
            address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS,
            namespace or os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
            snapshotter or os.environ.get("CONTAINERD_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER,
        )


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.Call) else None


def _details(exc: grpc.RpcError) -> str:
    return (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)


def _retryable(exc: grpc.RpcError) -> bool:
    code = _code(exc)
    text = _details(exc)
    return code is grpc.StatusCode.UNAVAILABLE or (
        code is grpc.StatusCode.UNKNOWN and ("connection" in text or "transport" in text)
    )


class Containerd:
    """A connection to containerd's gRPC socket, in one namespace."""

    def __init__(self, target: Target, *, timeout: float = CONTAINERD_TIMEOUT) -> None:
        path = target.address.removeprefix("unix://").removeprefix("unix:")
        if not os.path.exists(path):
            raise ContainerdError(f"containerd is not listening on {path} (set --address or CONTAINERD_ADDRESS)")
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(unix_target(target.address))
        self.lease_id: str | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        md: tuple[tuple[str, str | bytes], ...] = ((NAMESPACE_HEADER, self.target.namespace),)
        if self.lease_id:
            md += ((LEASE_HEADER, self.lease_id),)
        return md

    def call(self, service: str, method: str, request: Message, reply: type[R], *, retry: bool = False) -> R:
        """One unary call; UNAVAILABLE is retried for a while when ``retry``."""
        fn = unary(self.channel, service, method, reply)
        deadline = time.monotonic() + CONTAINERD_RETRY_FOR
        delay = 0.1
        while True:
            try:
                return fn(request, timeout=self.timeout, metadata=self._metadata())
            except grpc.RpcError as exc:
                if retry and _retryable(exc) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                raise ContainerdError(f"containerd {method}: {_details(exc)}", _code(exc)) from None

    def lookup(self, service: str, method: str, request: Message, reply: type[R], *, retry: bool = False) -> R | None:
        """Like :meth:`call`, but None where containerd answers NOT_FOUND."""
        try:
            return self.call(service, method, request, reply, retry=retry)
        except ContainerdError as exc:
            if exc.code is grpc.StatusCode.NOT_FOUND:
                return None
            raise

    # -- leases ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """A lease that protects what is written under it; deleted on exit."""
        expire = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=CONTAINERD_LEASE_TTL)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        lease_id = f"turbofs-pull-{secrets.token_hex(6)}"
        self.call(LEASES, "Create", leases_pb2.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": expire}),
                  leases_pb2.CreateResponse, retry=True)
        self.lease_id = lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = None
            with contextlib.suppress(ContainerdError):
                self.call(LEASES, "Delete", leases_pb2.DeleteRequest(id=lease_id), Empty)

    # -- content -----------------------------------------------------------------------

    def content_info(self, digest: str) -> content_pb2.Info | None:
        found = self.lookup(CONTENT, "Info", content_pb2.InfoRequest(digest=digest), content_pb2.InfoResponse)
        return found.info if found is not None else None

    def put_content(self, digest: str, data: bytes, labels: dict[str, str]) -> None:
        """Write a blob into the content store (or only set its labels if it is there). Bytes
        that do not match ``digest`` are refused here (DigestMismatch), never handed on."""
        oci.verify_bytes(data, digest, f"content {digest} for containerd")
        if self.content_info(digest) is None:
            ref = f"turbofs-{digest}"
            reqs: list[content_pb2.WriteContentRequest] = []
            for off in range(0, max(len(data), 1), CONTAINERD_WRITE_PIECE):
                reqs.append(content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, total=len(data), expected=digest, offset=off,
                    data=data[off : off + CONTAINERD_WRITE_PIECE]))
            reqs.append(content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=ref, total=len(data), expected=digest, offset=len(data), labels=labels))
            write = _stream_stream(self.channel, CONTENT, "Write", content_pb2.WriteContentResponse)
            try:
                for _ in write(iter(reqs), timeout=self.timeout, metadata=self._metadata()):
                    pass
                return
            except grpc.RpcError as exc:
                if _code(exc) is not grpc.StatusCode.ALREADY_EXISTS:
                    raise ContainerdError(f"containerd content write of {digest}: {_details(exc)}", _code(exc)) from None
        info = content_pb2.Info(digest=digest, labels=labels)
        self.call(CONTENT, "Update", content_pb2.UpdateRequest(
            info=info, update_mask=FieldMask(paths=[f"labels.{k}" for k in labels])), content_pb2.UpdateResponse)

    # -- images ------------------------------------------------------------------------

    def put_image(self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str] | None = None) -> None:
        image = images_pb2.Image(name=name, labels=labels or {},
                                 target=types_pb2.Descriptor(media_type=media_type, digest=digest, size=size))
        try:
            self.call(IMAGES, "Create", images_pb2.CreateImageRequest(image=image), images_pb2.CreateImageResponse)
        except ContainerdError as exc:
            if exc.code is not grpc.StatusCode.ALREADY_EXISTS:
                raise
            self.call(IMAGES, "Update", images_pb2.UpdateImageRequest(image=image), images_pb2.UpdateImageResponse)

    def image(self, name: str) -> images_pb2.Image | None:
        found = self.lookup(IMAGES, "Get", images_pb2.GetImageRequest(name=name), images_pb2.GetImageResponse)
        return found.image if found is not None else None

    # -- snapshots ---------------------------------------------------------------------

    def snapshot(self, key: str) -> snapshots_pb2.Info | None:
        found = self.lookup(SNAPSHOTS, "Stat", snapshots_pb2.StatSnapshotRequest(snapshotter=self.target.snapshotter, key=key),
                            snapshots_pb2.StatSnapshotResponse, retry=True)
        return found.info if found is not None else None

    def prepare_remote(self, chain_id: str, parent: str, labels: dict[str, str]) -> None:
        """Prepare the snapshot of ``chain_id``; the snapshotter must answer ALREADY_EXISTS."""
        key = f"extract-{secrets.token_hex(8)}-{chain_id}"
        req = snapshots_pb2.PrepareSnapshotRequest(snapshotter=self.target.snapshotter, key=key, parent=parent,
                                                   labels={**labels, L.TARGET: chain_id})
        try:
            self.call(SNAPSHOTS, "Prepare", req, snapshots_pb2.PrepareSnapshotResponse, retry=True)
        except ContainerdError as exc:
            if exc.code is grpc.StatusCode.ALREADY_EXISTS:
                return
            raise ContainerdError(f"snapshotter {self.target.snapshotter!r} could not prepare layer {chain_id}: {exc}",
                                  exc.code) from None
        # an ordinary empty snapshot: this snapshotter is no turbofs snapshotter
        with contextlib.suppress(ContainerdError):
            self.call(SNAPSHOTS, "Remove", snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.target.snapshotter, key=key),
                      Empty)
        raise UsageError(f"snapshotter {self.target.snapshotter!r} prepared an empty snapshot for {chain_id} instead of "
                         "mounting the turbo image: is it the turbofs snapshotter ([proxy_plugins] in containerd's config)?")


@dataclass
class PullResult:
    name: str
    image: TurboImage
    seconds: float
    layers: int
    already: int
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.name}: turbo image {self.image.manifest_digest} ready "
                f"({self.layers} layers, top {self.image.top[:19]}, {self.seconds:.2f} s)")


def image_name(ref: str) -> str:
    """The name containerd records for ``ref``: ``REGISTRY/REPO:TAG`` or ``...@DIGEST``."""
    return str(Reference.parse(ref))


def pull(
    ref: str,
    target: Target,
    *,
    plain_http: bool = False,
    platform: str | None = None,
    name: str | None = None,
) -> PullResult:
    """Give containerd the turbo image ``ref``, lazily (see the module docstring)."""
    t0 = time.monotonic()
    ctrd = Containerd(target)  # fails at once when containerd is not there
    try:
        img = fetch_image(ref, scheme="http" if plain_http else None, platform=platform)
    except BaseException:
        ctrd.close()
        raise
    t1 = time.monotonic()
    name = name or image_name(ref)
    gc_label = L.GC_SNAPSHOT_PREFIX + target.snapshotter
    already = 0
    with ctrd, ctrd.lease():
        ctrd.put_content(img.config_digest, img.config, {gc_label: img.top})
        ctrd.put_content(img.manifest_digest, img.manifest, {L.GC_CONFIG: img.config_digest})
        ctrd.put_image(name, img.media_type, img.manifest_digest, len(img.manifest))
        t2 = time.monotonic()
        labels = {L.IMAGE_REF: str(img.reference), L.MANIFEST: img.manifest_digest}
        if ctrd.snapshot(img.top) is not None:  # pulled before, or unpacked from the plain image
            already = 1
        else:
            ctrd.prepare_remote(img.top, "", labels)
    t3 = time.monotonic()
    return PullResult(name, img, t3 - t0, len(img.chain), already,
                      {"registry": t1 - t0, "content": t2 - t1, "snapshots": t3 - t2})


def run_args(img: TurboImage, command: Sequence[str], entrypoint: Sequence[str] | None = None) -> list[str]:
    """``ctr run``'s arguments, which replace the image's Entrypoint and Cmd: Entrypoint +
    (``command`` or the image's Cmd). An ``entrypoint`` given replaces the image's, and
    then the image's Cmd is not used (Docker's rule)."""
    conf: dict[str, Any] = img.image_config()
    if entrypoint is not None:
        args = [*entrypoint, *command]
    else:
        entry = list(conf.get("Entrypoint") or [])
        args = entry + (list(command) if command else list(conf.get("Cmd") or []))
    if not args:
        raise UsageError(f"{img.pinned}: the image has no Entrypoint or Cmd; give a command after --")
    return args


def ctr_run_argv(target: Target, name: str, container_id: str, args: Sequence[str], *, rm: bool = False,
                 tty: bool = False, detach: bool = False, ctr: str = "ctr") -> list[str]:
    argv = [ctr, "--address", target.address, "--namespace", target.namespace, "run", "--snapshotter", target.snapshotter]
    if rm:
        argv.append("--rm")
    if tty:
        argv.append("--tty")
    if detach:
        argv.append("--detach")
    return [*argv, name, container_id, *args]


def run(
    ref: str,
    target: Target,
    command: Sequence[str] = (),
    *,
    rm: bool = False,
    container_id: str | None = None,
    tty: bool = False,
    detach: bool = False,
    entrypoint: Sequence[str] | None = None,
    plain_http: bool = False,
    platform: str | None = None,
) -> int:
    """Pull ``ref`` lazily, then run a container of it with ``ctr run`` (its output streams
    to ours); the container's exit status (with ``detach``, ctr's once the task started)."""
    ctr = shutil.which("ctr")
    if ctr is None:
        raise NotFound("ctr is not installed (Debian package containerd)")
    result = pull(ref, target, plain_http=plain_http, platform=platform)
    args = run_args(result.image, command, entrypoint)
    cid = container_id or f"turbofs-{secrets.token_hex(4)}"
    return subprocess.call(ctr_run_argv(target, result.name, cid, args, rm=rm, tty=tty, detach=detach, ctr=ctr))


__all__ = [
    "Containerd",
    "ContainerdError",
    "PullResult",
    "Target",
    "ctr_run_argv",
    "image_name",
    "pull",
    "run",
    "run_args",
]
