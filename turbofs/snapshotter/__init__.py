"""The containerd remote snapshotter of turbofs (``turbofs snapshotter``).

::

    containerd ──gRPC (proxy plugin)──> service.py   Snapshots API <-> core calls, errors -> codes
                                          └─ core.py     local (overlayfs-like) and remote snapshots
                                               ├─ store.py    SQLite metadata under --root
                                               ├─ remote.py   which turbo image a Prepare is about
                                               ├─ mounts.py   one turbofs mount per image (mount/check/unmount)
                                               ├─ apply.py    a layer into overlayfs diff format (placeholders made real)
                                               ├─ filters.py  containerd's filter syntax (List)
                                               └─ labels.py   the labels read and written, chain IDs

``turbofs pull`` (:mod:`turbofs.containerd`) drives it through containerd so that a turbo
image is "unpacked" without downloading a layer; README.md ("Put a node on turbofs") says how
to install it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from turbofs.snapshotter.core import Mount, Snapshotter, Usage
    from turbofs.snapshotter.remote import Resolver, TurboImage, fetch_image
    from turbofs.snapshotter.service import SnapshotterServer, serve

#: Where each name lives. Imported on first use: ``turbofs pull`` and ``run`` need only
#: ``labels`` and ``remote``, not the server, the store or the layer applier.
_WHERE = {
    "Mount": "core", "Snapshotter": "core", "Usage": "core",
    "Resolver": "remote", "TurboImage": "remote", "fetch_image": "remote",
    "SnapshotterServer": "service", "serve": "service",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["Mount", "Resolver", "Snapshotter", "SnapshotterServer", "TurboImage", "Usage", "fetch_image", "serve"]
