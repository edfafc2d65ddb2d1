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

import contextlib
from collections.abc import Iterator


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

def first_error(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The error that a group of failures (a task group's) stands for: its first TurboError,
    else its first other error; None where it holds anything but errors (a cancellation)."""
    leaves: list[Exception] = []
    todo: list[BaseException] = [group]
    while todo:
        exc = todo.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            todo[:0] = exc.exceptions
        elif isinstance(exc, Exception):
            leaves.append(exc)
        else:
            return None
    return next((e for e in leaves if isinstance(e, TurboError)), leaves[0] if leaves else None)


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Around a nursery or task group: raise the one error its failures stand for
    (:func:`first_error`) instead of the group; a group holding a cancellation stays as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        cause = first_error(group)
        if cause is None:
            raise
        raise cause from None
