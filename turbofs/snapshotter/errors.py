"""The snapshotter's errors, and the one place where errors become gRPC status codes.

::

    TurboError (turbofs.core.errors)
     ├── NotFound ─────────────────── NOT_FOUND           a snapshot, image or manifest that does not exist
     ├── UsageError ───────────────── INVALID_ARGUMENT    bad keys, labels, filters
     ├── FormatError, DigestMismatch ─ FAILED_PRECONDITION a corrupt manifest, config or index
     ├── AuthError ────────────────── PERMISSION_DENIED   the registry refused the credentials
     ├── RegistryError (401/403) ──── PERMISSION_DENIED
     ├── RegistryError (other) ────── UNAVAILABLE         the registry is down or failing
     └── SnapshotError               (this module) carries its own code:
          ├── AlreadyExists ───────── ALREADY_EXISTS      also "this remote snapshot is ready"
          ├── FailedPrecondition ──── FAILED_PRECONDITION wrong kind, has children, placeholder without a layer
          ├── LayerFailed ─────────── the cause's code     a placeholder's layer could not be fetched or applied
          └── MountFailed ─────────── UNAVAILABLE         a turbofs mount could not be started

containerd's proxy maps the codes back (``errdefs.FromGRPC``); ALREADY_EXISTS on a Prepare with
``containerd.io/snapshot.ref`` means "skip the unpack". Anything else that escapes is a bug:
INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import errno

import grpc

from turbofs.core.errors import (
    AuthError,
    FormatError,
    NotFound,
    SourceError,
    TurboError,
    UsageError,
)
from turbofs.core.registry import RegistryError


class SnapshotError(TurboError):
    """An error with its own gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class AlreadyExists(SnapshotError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class MountFailed(SnapshotError):
    code = grpc.StatusCode.UNAVAILABLE


class LayerFailed(SnapshotError):
    """A placeholder could not become a real layer: its code is the cause's (a registry that
    is down: UNAVAILABLE; a digest mismatch or an unsafe entry: FAILED_PRECONDITION; a full
    disk: RESOURCE_EXHAUSTED; anything else: UNKNOWN)."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(cause, TurboError):
            self.code = status_code(cause)
        else:
            self.code = grpc.StatusCode.UNKNOWN


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code containerd should see for ``exc``."""
    if isinstance(exc, SnapshotError):
        return exc.code
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, AuthError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, RegistryError):
        if exc.status in (401, 403):
            return grpc.StatusCode.PERMISSION_DENIED
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, (FormatError, SourceError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, TurboError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


__all__ = ["AlreadyExists", "FailedPrecondition", "LayerFailed", "MountFailed", "SnapshotError", "status_code"]
