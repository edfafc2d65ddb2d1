"""The one error hierarchy of turbofs.

::

    TurboError                      every error turbofs raises on purpose
     ├── FormatError                an index, manifest or layout that breaks the turbofs format
     ├── SourceError                an input image that cannot be converted
     │    ├── DigestMismatch        bytes whose digest differs from the one that names them
     │    ├── UnsafeEntry           a layer entry that would escape the root or is malformed
     │    └── LimitExceeded         a layer or image past a configured size limit
     ├── NotFound                  a path, blob, tag or manifest that does not exist
     ├── AuthError                 a registry or token service refused the credentials
     └── UsageError                bad command-line or configuration values

Every error carries a message meant for a person: it names the file, blob or entry and
the cause. The CLI prints ``turbofs: error: <message>`` and exits with status 1 (2 for
usage errors).
"""

from __future__ import annotations


class TurboError(Exception):
    """Base of all turbofs errors."""

    exit_code = 1


class FormatError(TurboError):
    """Bytes that claim to be turbofs data but break the format."""


class SourceError(TurboError):
    """An input image that cannot be converted."""


class DigestMismatch(SourceError):
    """Content does not match the digest that names it."""


class UnsafeEntry(SourceError):
    """A layer entry with a path that escapes the root, or another malformed entry."""


class LimitExceeded(SourceError):
    """A configured size or count limit was passed (for example a decompression bomb)."""


class NotFound(TurboError):
    """A path, blob, tag or manifest that does not exist."""


class AuthError(TurboError):
    """A registry or its token service refused the credentials (or sent no usable token)."""


class UsageError(TurboError):
    """Bad command-line arguments or configuration values."""

    exit_code = 2
