"""The turbofs extensions of the registry API (``/v2/<name>/_turbofs/...``) (stub)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from turbofs.config import RegistryConfig


def setup(app: web.Application, storage: Any, cfg: RegistryConfig) -> None:
    """Add the extension routes (no-op until implemented)."""
