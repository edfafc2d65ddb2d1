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

from turbofs.snapshotter.core import Mount, Snapshotter, Usage
from turbofs.snapshotter.remote import Resolver, TurboImage, fetch_image
from turbofs.snapshotter.service import SnapshotterServer, serve

__all__ = ["Mount", "Resolver", "Snapshotter", "SnapshotterServer", "TurboImage", "Usage", "fetch_image", "serve"]
