"""Errors of the erofs presentation, on the one hierarchy of :mod:`turbofs.core.errors`::

    TurboError
     └── ErofsError                 an image the erofs path cannot serve
          ├── ErofsUnsupported      the image holds something erofs cannot express
          │                         (an xattr without an erofs prefix, a name over 255 bytes...)
          └── ErofsCorrupt          generated metadata failed its own checks: never mounted

Either one means "serve this image with the per-file FUSE mode instead" when the mode was
chosen automatically, and a refused mount when erofs was asked for.
"""

from __future__ import annotations

from turbofs.core.errors import TurboError


class ErofsError(TurboError):
    """An image the erofs path cannot serve."""


class ErofsUnsupported(ErofsError):
    """The image holds something the erofs format cannot express."""


class ErofsCorrupt(ErofsError):
    """Erofs metadata that breaks the format or does not match its index."""
