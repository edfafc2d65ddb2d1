"""Shared pytest fixtures: real registry servers (see tests/registry_fixtures.py)."""

from tests.containerd_fixtures import containerd, containerd_factory  # noqa: F401
from tests.mount_fixtures import mounter  # noqa: F401
from tests.registry_fixtures import (
    distribution_registry,
    shared_turbofs_registry,
    turbofs_registry,
    turbofs_registry_factory,
)
from tests.snapshotter_fixtures import snapshotter_containerd, turbofs_snapshotter  # noqa: F401

__all__ = [
    "distribution_registry",
    "shared_turbofs_registry",
    "turbofs_registry",
    "turbofs_registry_factory",
]
