"""Errors of the registry, one class per error code of the OCI Distribution Specification.

::

    turbofs.core.errors.TurboError
     └── DistributionError          an error answered with the spec's JSON body
          ├── BlobUnknown            BLOB_UNKNOWN           404
          ├── BlobUploadInvalid      BLOB_UPLOAD_INVALID    400
          │    └── RangeInvalid      BLOB_UPLOAD_INVALID    416 (chunk out of order)
          ├── BlobUploadUnknown      BLOB_UPLOAD_UNKNOWN    404
          ├── DigestInvalid          DIGEST_INVALID         400
          ├── ManifestBlobUnknown    MANIFEST_BLOB_UNKNOWN  400
          ├── ManifestInvalid        MANIFEST_INVALID       400
          ├── ManifestUnknown        MANIFEST_UNKNOWN       404
          ├── NameInvalid            NAME_INVALID           400
          ├── NameUnknown            NAME_UNKNOWN           404
          ├── SizeInvalid            SIZE_INVALID           400 (413 when past a size limit)
          ├── Unauthorized           UNAUTHORIZED           401
          ├── Denied                 DENIED                 403
          ├── Unsupported            UNSUPPORTED            405 / 404 / 400
          │    └── BlobInUse         UNSUPPORTED            409 (blob delete while a manifest uses it)
          ├── TooManyRequests        TOOMANYREQUESTS        429
          └── StorageFull            UNKNOWN                507 (the storage's disk or quota is full)

Storage, auth and the extensions raise them; :func:`error_response` is the one place that
turns them into the spec's JSON body (``headers=`` adds e.g. ``WWW-Authenticate``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from turbofs.core.errors import TurboError


class DistributionError(TurboError):
    """An error with an OCI error code and an HTTP status."""

    code: ClassVar[str] = "UNKNOWN"
    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return entry


class BlobUnknown(DistributionError):
    code = "BLOB_UNKNOWN"
    status = 404


class BlobUploadInvalid(DistributionError):
    code = "BLOB_UPLOAD_INVALID"
    status = 400


class RangeInvalid(BlobUploadInvalid):
    """A chunk that does not start where the upload stands (the spec's 416)."""

    status = 416


class BlobUploadUnknown(DistributionError):
    code = "BLOB_UPLOAD_UNKNOWN"
    status = 404


class DigestInvalid(DistributionError):
    code = "DIGEST_INVALID"
    status = 400


class ManifestBlobUnknown(DistributionError):
    code = "MANIFEST_BLOB_UNKNOWN"
    status = 400


class ManifestInvalid(DistributionError):
    code = "MANIFEST_INVALID"
    status = 400


class ManifestUnknown(DistributionError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class NameInvalid(DistributionError):
    code = "NAME_INVALID"
    status = 400


class NameUnknown(DistributionError):
    code = "NAME_UNKNOWN"
    status = 404


class SizeInvalid(DistributionError):
    code = "SIZE_INVALID"
    status = 400


class Unauthorized(DistributionError):
    code = "UNAUTHORIZED"
    status = 401


class Denied(DistributionError):
    code = "DENIED"
    status = 403


class Unsupported(DistributionError):
    code = "UNSUPPORTED"
    status = 405


class BlobInUse(Unsupported):
    """Deleting a blob that a manifest of the repository references."""

    status = 409


class TooManyRequests(DistributionError):
    code = "TOOMANYREQUESTS"
    status = 429


class StorageFull(DistributionError):
    """A write failed for lack of space or quota (ENOSPC, EDQUOT). 507 Insufficient Storage
    says exactly that, and clients do not retry it as they retry 503 (the disk stays full)."""

    status = 507


def error_body(*errors: DistributionError) -> bytes:
    return json.dumps({"errors": [e.to_json() for e in errors]}).encode()


def error_response(error: DistributionError, *, head: bool = False) -> web.Response:
    """The HTTP response for ``error`` (no body for HEAD requests, as HTTP wants)."""
    body = error_body(error)
    resp = web.Response(
        status=error.status,
        body=None if head else body,
        content_type="application/json",
        headers=error.headers,
    )
    return resp
