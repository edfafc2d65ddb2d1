"""The erofs presentation of a turbo image: metadata built from the index at mount time.

``build_erofs(index)`` lays out superblock, inodes, directories, xattrs and chunk maps whose
block addresses point into a data region made of the turbo chunks themselves;
``check_erofs(image)`` parses the result independently and compares it with the index,
so an image whose metadata is wrong is refused before the kernel sees it;
``prepare_image(index)`` gives the checked metadata, from the node's cache or built.
"""

from turbofs.erofs.check import check_erofs
from turbofs.erofs.errors import ErofsCorrupt, ErofsError, ErofsUnsupported
from turbofs.erofs.prepare import prepare_image
from turbofs.erofs.writer import ErofsImage, Extent, build_erofs

__all__ = [
    "ErofsCorrupt", "ErofsError", "ErofsImage", "ErofsUnsupported", "Extent", "build_erofs", "check_erofs",
    "prepare_image",
]
