"""Every default of turbofs, in one place, as typed configuration objects.

Configuration is loaded from TOML (``/etc/turbofs/config.toml`` or ``--config``), one table
per part (``[build]``, later ``[registry]``, ``[daemon]``...), and command-line flags override
it. The defaults below are the measured choices; ``docs/format.md`` and ``bench/README.md``
say why.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from turbofs.errors import UsageError

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

DEFAULT_CONFIG_PATH: Final = Path("/etc/turbofs/config.toml")

#: Uncompressed chunk size. Chosen by measurement (bench/README.md): 256 KiB keeps the
#: decompression wasted on a cold start small (a startup touches ~123 KB per 1 MiB chunk)
#: while zstd still compresses almost as well as with 1 MiB chunks.
DEFAULT_CHUNK_SIZE: Final = 256 * KiB
DEFAULT_ZSTD_LEVEL: Final = 3
#: Chunk blobs are cut where a chunk digest says so (content-defined, so one changed
#: chunk changes one blob) once they hold at least the minimum, and always at the maximum.
DEFAULT_BLOB_MIN: Final = 2 * MiB
DEFAULT_BLOB_AVG: Final = 4 * MiB
DEFAULT_BLOB_MAX: Final = 16 * MiB
DEFAULT_MAX_LAYER_SIZE: Final = 64 * GiB  # uncompressed bytes of one layer
DEFAULT_MAX_IMAGE_SIZE: Final = 256 * GiB  # uncompressed bytes of all layers
DEFAULT_MAX_ENTRIES: Final = 10_000_000  # tar entries over all layers
DEFAULT_MAX_CONFIG_SIZE: Final = 8 * MiB  # manifests, configs, index.json
DEFAULT_PATH_MAX: Final = 4096
#: Files smaller than a chunk wait in memory, up to this many bytes, then in a spool file,
#: until they are packed in path order at the end of the build.
DEFAULT_SMALL_FILES_MEMORY: Final = 1 * GiB
DEFAULT_TAG: Final = "latest"

T = TypeVar("T")


@dataclass
class BuildConfig:
    """Settings of ``turbofs build`` (TOML table ``[build]``)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    blob_min: int = DEFAULT_BLOB_MIN
    blob_avg: int = DEFAULT_BLOB_AVG
    blob_max: int = DEFAULT_BLOB_MAX
    max_layer_size: int = DEFAULT_MAX_LAYER_SIZE
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_config_size: int = DEFAULT_MAX_CONFIG_SIZE
    small_files_memory: int = DEFAULT_SMALL_FILES_MEMORY
    workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    tag: str = DEFAULT_TAG
    platform: str | None = None  # OS/ARCH[/VARIANT]; the host's by default

    def validate(self) -> BuildConfig:
        cs = self.chunk_size
        if cs < 4 * KiB or cs > 64 * MiB or cs & (cs - 1):
            raise UsageError(f"chunk size {cs} must be a power of two between 4 KiB and 64 MiB")
        if not 1 <= self.zstd_level <= 22:
            raise UsageError(f"zstd level {self.zstd_level} must be between 1 and 22")
        if not 0 < self.blob_min <= self.blob_avg <= self.blob_max:
            raise UsageError("blob sizes must satisfy 0 < blob_min <= blob_avg <= blob_max")
        for name in ("max_layer_size", "max_image_size", "max_entries", "max_config_size", "workers"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        return self


def _from_table(cls: type[T], table: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UsageError(f"{where}: unknown setting {key!r}")
        kwargs[name] = value
    return cls(**kwargs)


def load_toml(path: Path | None) -> dict[str, Any]:
    """The parsed config file; an absent default file is an empty config."""
    target = path or DEFAULT_CONFIG_PATH
    try:
        with open(target, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if path is not None:
            raise UsageError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {target}: {exc}") from None


def build_config(path: Path | None = None, **overrides: Any) -> BuildConfig:
    """The build settings: defaults, then the config file's ``[build]`` table, then flags."""
    table = load_toml(path).get("build", {})
    if not isinstance(table, dict):
        raise UsageError("[build] in the config file must be a table")
    cfg = _from_table(BuildConfig, table, "[build]")
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg.validate()
