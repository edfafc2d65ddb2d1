"""The presentations of a mounted turbo image and the mount daemon's life cycle: per-file
FUSE, the erofs file with its kernel mount, the control socket, spare daemons.

Kept free of imports here, so that ``turbofs.mount.ctl`` (used by the CLI and the
snapshotter) loads without pyfuse3 or trio.
"""
