"""Snapshot labels the snapshotter reads and writes, and image chain IDs.

containerd passes a snapshotter only the labels named ``containerd.io/snapshot/...`` and
``containerd.io/snapshot.ref`` (``snapshots.FilterInheritedLabels``), so the turbofs labels
live under that prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

#: The chain ID a Prepare wants committed (a remote snapshotter answers ALREADY_EXISTS once
#: it has it).
TARGET: Final = "containerd.io/snapshot.ref"

#: Set by ``turbofs pull``: the image reference and the turbo manifest to mount.
IMAGE_REF: Final = "containerd.io/snapshot/turbofs.image-ref"
MANIFEST: Final = "containerd.io/snapshot/turbofs.manifest-digest"

#: Set by the snapshotter on the snapshots it made remote.
REMOTE: Final = "containerd.io/snapshot/turbofs.remote"  # "top" or "placeholder"
REMOTE_IMAGE: Final = "containerd.io/snapshot/turbofs.image"  # REGISTRY/REPO@DIGEST mounted
REMOTE_TOP: Final = "top"
#: Set on a placeholder that became a real layer: the layer blob it was made from.
MATERIALIZED: Final = "containerd.io/snapshot/turbofs.materialized"
REMOTE_PLACEHOLDER: Final = "placeholder"

#: Set by containerd's CRI plugin (``disable_snapshot_annotations = false``) and by any
#: client using containerd's ``snapshotters.AppendInfoHandlerWrapper``.
CRI_IMAGE_REF: Final = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST: Final = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER: Final = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS: Final = "containerd.io/snapshot/cri.image-layers"

#: On the image config in containerd's content store: keeps the top snapshot from garbage
#: collection (``containerd.io/gc.ref.snapshot.<snapshotter>``), as containerd's unpacker does.
GC_SNAPSHOT_PREFIX: Final = "containerd.io/gc.ref.snapshot."
#: On a manifest in the content store: keeps its config.
GC_CONFIG: Final = "containerd.io/gc.ref.content.config"


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of each layer: ``C0 = D0``, ``Ci = sha256(C(i-1) + " " + Di)``."""
    out: list[str] = []
    for diff in diff_ids:
        if not out:
            out.append(diff)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
    return out


__all__ = [
    "CRI_IMAGE_LAYERS",
    "CRI_IMAGE_REF",
    "CRI_LAYER",
    "CRI_MANIFEST",
    "GC_CONFIG",
    "GC_SNAPSHOT_PREFIX",
    "IMAGE_REF",
    "MANIFEST",
    "MATERIALIZED",
    "REMOTE",
    "REMOTE_IMAGE",
    "REMOTE_PLACEHOLDER",
    "REMOTE_TOP",
    "TARGET",
    "chain_ids",
]
