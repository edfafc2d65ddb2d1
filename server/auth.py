"""Registry authentication: the bearer-token flow of the OCI/Docker registries (stub)."""

from __future__ import annotations

from aiohttp import web

from turbofs.config import RegistryConfig


def setup(app: web.Application, cfg: RegistryConfig) -> None:
    """Install the auth middleware and the token endpoint (no-op until implemented)."""
