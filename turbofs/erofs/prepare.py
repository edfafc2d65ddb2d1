"""The checked erofs metadata of an index, ready to mount: loaded from the node's cache
folder (:mod:`turbofs.erofs.cache`) or built (and left there), checked either way."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from turbofs.core import format as fmt
from turbofs.core.config import DEFAULT_EROFS_META_CACHE_BYTES
from turbofs.erofs import cache as meta_cache
from turbofs.erofs.check import check_erofs
from turbofs.erofs.errors import ErofsCorrupt
from turbofs.erofs.writer import ErofsImage, build_erofs

log = logging.getLogger("turbofs.erofs")


def prepare_image(index: fmt.Index, *, cache_dir: Path | None = None,
                  cache_bytes: int = DEFAULT_EROFS_META_CACHE_BYTES) -> ErofsImage:
    """The checked erofs image of ``index``, from ``<cache_dir>/erofs/`` or built. Raises
    ErofsError: never mount it then. Cached metadata is checked like fresh metadata; one that
    fails is rebuilt, so a damaged cache costs a build, never a wrong mount."""
    ms: dict[str, float] = {"load_ms": 0.0, "build_ms": 0.0, "check_ms": 0.0, "store_ms": 0.0}
    t0 = time.monotonic()

    def took(step: str, since: float) -> float:
        now = time.monotonic()
        ms[step] += (now - since) * 1000
        return now

    image: ErofsImage | None = None
    key = b""
    if cache_dir is not None:
        key = index.payload_sha256()
        image = meta_cache.load(cache_dir, index, key)
    t = took("load_ms", t0)
    hit = image is not None
    if image is not None:
        try:
            check_erofs(image)
        except ErofsCorrupt as exc:
            assert cache_dir is not None
            log.warning("cached erofs metadata failed its checks, removing it and building it again: %s", exc)
            meta_cache.discard(cache_dir, key)
            image, hit = None, False
        t = took("check_ms", t)
    if image is None:
        image = build_erofs(index)
        t = took("build_ms", t)
        check_erofs(image)
        t = took("check_ms", t)
        if cache_dir is not None:
            meta_cache.store(cache_dir, image, key, max_bytes=cache_bytes)
            t = took("store_ms", t)
    image.drop_source()  # the decoded index columns; the metadata itself is a few MB
    image.stats.update({"meta_cache_hit": int(hit), **{k: round(v) for k, v in ms.items()}})
    log.info("erofs metadata of %d inodes: %d bytes, %s in %.3f s", index.n_inodes, image.meta_size,
             "loaded from the cache and checked" if hit else "built and checked", t - t0)
    return image


__all__ = ["prepare_image"]
