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
from typing import Any, Final, Protocol, TypeVar

from turbofs.core.errors import UsageError

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

DEFAULT_CONFIG_PATH: Final = Path("/etc/turbofs/config.toml")

#: Uncompressed chunk size. Chosen by measurement (bench/README.md, "workingset"): for the
#: python-1g startup, 256 KiB chunks fetch 62 MB and decompress 1.5x what is used, against
#: 82 MB and 2.1x with 1 MiB chunks; 128 KiB saves only 10% more for 65% more chunks.
DEFAULT_CHUNK_SIZE: Final = 256 * KiB
DEFAULT_ZSTD_LEVEL: Final = 3
#: Chunk blobs are cut where a chunk digest says so (content-defined, so one changed
#: chunk changes one blob) once they hold at least the minimum, and always at the maximum.
#: A one-file change re-uploads one blob plus the index and the manifest: blobs of 1 MiB
#: on average keep that near half a percent of a 1 GB image (bench/README.md, "push").
DEFAULT_BLOB_MIN: Final = 512 * KiB
DEFAULT_BLOB_AVG: Final = 1 * MiB
DEFAULT_BLOB_MAX: Final = 4 * MiB
DEFAULT_MAX_LAYER_SIZE: Final = 64 * GiB  # uncompressed bytes of one layer
DEFAULT_MAX_IMAGE_SIZE: Final = 256 * GiB  # uncompressed bytes of all layers
DEFAULT_MAX_ENTRIES: Final = 10_000_000  # tar entries over all layers
DEFAULT_MAX_CONFIG_SIZE: Final = 8 * MiB  # manifests, configs, index.json
DEFAULT_PATH_MAX: Final = 4096
#: Files smaller than a chunk wait in memory, up to this many bytes, then in a spool file,
#: until they are packed in path order at the end of the build.
DEFAULT_SMALL_FILES_MEMORY: Final = 1 * GiB
DEFAULT_TAG: Final = "latest"

#: The embedded registry: loopback only unless told otherwise.
DEFAULT_REGISTRY_HOST: Final = "127.0.0.1"
DEFAULT_REGISTRY_PORT: Final = 5050
DEFAULT_REGISTRY_STORAGE: Final = Path("/var/lib/turbofs/registry")
DEFAULT_MAX_MANIFEST_SIZE: Final = 4 * MiB
DEFAULT_MAX_BLOB_SIZE: Final = 64 * GiB
DEFAULT_UPLOAD_TTL: Final = 3600.0  # seconds an idle upload session lives
DEFAULT_TOKEN_TTL: Final = 3600.0
DEFAULT_MAX_BATCH_RANGES: Final = 4096
DEFAULT_MAX_BATCH_BYTES: Final = 256 * MiB
DEFAULT_CONVERT_TAG_SUFFIX: Final = "-turbo"

#: The node daemon (``turbofs mount``, TOML table ``[daemon]``); turbofs/node/cache.py says why.
#: The chunk cache on disk, shared by every image and mount of the node: uncompressed
#: chunks (a hit costs half the CPU of a zstd frame, measured: 180 vs 385 us per 256 KiB).
DEFAULT_CACHE_DIR: Final = Path("/var/lib/turbofs/cache")
DEFAULT_DISK_CACHE_BYTES: Final = 16 * GiB
#: fsync each cache file before its rename: off, because every cache file is verified
#: against its digest when read back (a torn file after a crash is a miss, not bad data),
#: and fsync made a cache write ~8x slower here (501 vs 62 us per 256 KiB chunk).
DEFAULT_DISK_CACHE_FSYNC: Final = False
#: Decompressed chunks kept in daemon memory (peers' users complain about daemon RAM; a
#: startup touches tens to hundreds of MB, and the kernel page cache keeps what FUSE served).
DEFAULT_RAM_CACHE_BYTES: Final = 256 * MiB
#: A read that waits on the network this long fails (EIO) with an error naming the cause.
DEFAULT_READ_TIMEOUT: Final = 30.0
#: Upper bound of one background fetch (all retries), so a chunk never stays "fetching".
DEFAULT_FETCH_TIMEOUT: Final = 120.0
#: Demand (and readahead) fetches in flight at once; prefetch has its own budget.
DEFAULT_DEMAND_PARALLEL: Final = 16
#: After this many sequential reads of a file, the next chunks are fetched ahead.
DEFAULT_READAHEAD_TRIGGER: Final = 2
DEFAULT_READAHEAD_CHUNKS: Final = 4
DEFAULT_PREFETCH: Final = True
DEFAULT_PREFETCH_PARALLEL: Final = 4
DEFAULT_PREFETCH_BANDWIDTH: Final = 0  # bytes/s over the network; 0: no cap
#: Compressed bytes per prefetch fetch (chunks of the prefetch order, adjacent in their
#: blob most of the time, so usually one range): about one average blob.
DEFAULT_PREFETCH_BATCH_BYTES: Final = 4 * MiB
#: The background prefetch (after a recorded startup's chunks, which go first) starts a
#: batch only once no read has come for this long (cached or not): its batches share the
#: link and its queue with reads, so a read queued behind them waits (measured: ~12 ms per
#: demand fetch with the prefetch running flat out vs ~1.6 ms without; cold start of
#: python-5g 27 s vs 8 s), and its decompression, hashing and disk writes take CPU from the
#: starting process (a traced python-1g start served wholly from the startup phase still
#: took 17.7 s of app time vs 11.6 s while the rest of the image streamed in behind it, on
#: 2 busy cores; bench/README.md, cold start).
DEFAULT_PREFETCH_QUIET: Final = 0.5
#: Compressed bytes per fetch of a recorded startup's chunks: they are adjacent in the
#: blobs, and smaller batches keep them arriving in the order the startup reads them.
DEFAULT_PREFETCH_STARTUP_BATCH_BYTES: Final = 1 * MiB
#: erofs mode: push each recorded-startup chunk, once in, into the kernel's page cache of
#: the image file (FUSE notify_store), so erofs's reads of it never reach the daemon. On:
#: with the cold path's CPU per byte down (frame digests, spare daemons), a start waits on
#: FUSE round trips more than on the CPU, and the push takes them away. Measured side by
#: side on the 1 Gbit/s link (bench/README.md, "Cold start"): python-5g READY 5.7 -> 4.5-4.7 s
#: (FUSE reads at READY ~5,500 -> ~700, the app's own time 4.4 -> 3.3 s), python-1g 3.0 ->
#: 2.5 s. Costs: the whole recorded startup lands in the page cache at once (reclaimable;
#: ~0.8 GB for python-5g), and ~0.3-1 s more daemon CPU by READY. Earlier, when the path
#: was CPU-bound (session 2's code), it did not bring READY forward.
DEFAULT_STARTUP_NOTIFY_STORE: Final = True
DEFAULT_PREFETCH_BACKOFF: Final = 1.0  # seconds after a failed prefetch fetch, doubled per failure
DEFAULT_PREFETCH_BACKOFF_MAX: Final = 60.0
#: Prefetch stops once it has written this share of the disk cache bound (it would
#: otherwise evict what it fetched first, the most useful chunks).
DEFAULT_PREFETCH_DISK_SHARE: Final = 0.8
#: How a mount presents the image: "erofs" (the kernel mounts erofs metadata built from the
#: index, served as one FUSE file; far fewer FUSE requests), "fuse" (one FUSE request per
#: lookup/getattr/read of each file), or "auto": erofs where the kernel has it, else fuse.
MOUNT_MODES: Final = ("auto", "erofs", "fuse")
DEFAULT_MOUNT_MODE: Final = "auto"
#: Erofs metadata generated from an index is kept in ``<cache_dir>/erofs/`` (one file per
#: index, a few MB per 100,000 files), so a second mount of an image skips the build; least
#: recently used files go beyond this many bytes (turbofs/erofs/cache.py).
DEFAULT_EROFS_META_CACHE_BYTES: Final = 512 * MiB
#: Readahead of the files of an erofs mount (its bdi's read_ahead_kb; 0: leave the kernel's
#: 128 KiB). The FUSE image file under it has its own, 1 MiB (the mount's ``readahead_kb``):
#: with erofs reading that file buffered, the FUSE file's readahead sets the request size
#: (128 KiB there: 7.8x the FUSE reads of a 434 MB file, +0.9 s of daemon CPU), and erofs's
#: own 1 MiB changed neither requests nor CPU (bench/erofs_bench.py, bench/README.md "erofs
#: readahead and caching"): the kernel's value stays.
DEFAULT_EROFS_READAHEAD_KB: Final = 0
#: Options of the erofs mount. "directio" (erofs reads the image file with O_DIRECT) saves
#: one page-cache copy of what is read (~0.5 GB for python-1g's startup files) but took
#: 3.3-5.4x the FUSE reads and 0.4-1.2 s more daemon CPU for them, and it would defeat the
#: startup page-cache push (``startup_notify_store``): off (same measurement).
DEFAULT_EROFS_MOUNT_OPTIONS: Final = ""

#: The containerd snapshotter (``turbofs snapshotter``, TOML table ``[snapshotter]``).
DEFAULT_SNAPSHOTTER_ADDRESS: Final = Path("/run/turbofs/snapshotter.sock")
DEFAULT_SNAPSHOTTER_ROOT: Final = Path("/var/lib/turbofs/snapshotter")
#: State folders of the snapshotter's mount daemons (pid, control socket, log); mounts do
#: not survive a reboot, and neither does /run.
DEFAULT_SNAPSHOTTER_RUN_DIR: Final = Path("/run/turbofs/snapshotter")
#: The name containerd knows the snapshotter by (``[proxy_plugins.NAME]``).
DEFAULT_SNAPSHOTTER_NAME: Final = "turbofs"
#: Where the snapshotter looks for the turbo twin of a plain image that containerd's CRI
#: pulls: the same repository, the tag plus this suffix (what ``turbofs serve
#: --auto-convert`` writes).
DEFAULT_TURBO_TAG_SUFFIX: Final = DEFAULT_CONVERT_TAG_SUFFIX
#: Registry calls the snapshotter makes while containerd waits: fewer retries than a mount.
DEFAULT_SNAPSHOTTER_REGISTRY_RETRIES: Final = 2
DEFAULT_SNAPSHOTTER_REGISTRY_TIMEOUT: Final = 30.0
DEFAULT_SNAPSHOTTER_WORKERS: Final = 16

# -- Fixed limits: bounds and tunables that are not settings, one line of reason each ---------

# layers, tar streams and trees (turbofs.core.tar, .layers, .fstree; the builder; apply)

# the registry client (turbofs.core.registry, .auth, .image)

# the node core (turbofs.node)

# the presentations and the mount daemon (turbofs.mount, turbofs.erofs)

# the snapshotter (turbofs.snapshotter)

# the registry server (server)

T = TypeVar("T")


class _Validated(Protocol):
    def validate(self) -> Any: ...


C = TypeVar("C", bound=_Validated)


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


@dataclass
class RegistryConfig:
    """Settings of ``turbofs serve`` (TOML table ``[registry]``, env ``TURBOFS_REGISTRY_*``)."""

    host: str = DEFAULT_REGISTRY_HOST
    port: int = DEFAULT_REGISTRY_PORT  # 0: any free port (printed at start)
    storage: Path = DEFAULT_REGISTRY_STORAGE
    #: htpasswd-style file of "user:hash" lines (hashes from ``turbofs passwd``).
    users_file: Path | None = None
    #: None: pushing needs a token when listening on anything but loopback.
    push_auth: bool | None = None
    pull_auth: bool = False
    #: file holding the token signing key; created (0600) in the storage folder if unset.
    token_key_file: Path | None = None
    token_ttl: float = DEFAULT_TOKEN_TTL
    max_manifest_size: int = DEFAULT_MAX_MANIFEST_SIZE
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE
    upload_ttl: float = DEFAULT_UPLOAD_TTL
    max_batch_ranges: int = DEFAULT_MAX_BATCH_RANGES
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    #: repositories (glob patterns) whose plain images are converted to turbo images on push
    auto_convert: list[str] = field(default_factory=list)
    convert_tag_suffix: str = DEFAULT_CONVERT_TAG_SUFFIX

    @property
    def loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")

    @property
    def push_needs_auth(self) -> bool:
        return self.push_auth if self.push_auth is not None else not self.loopback_only

    def validate(self) -> RegistryConfig:
        self.storage = Path(self.storage)
        if self.users_file is not None:
            self.users_file = Path(self.users_file)
        if self.token_key_file is not None:
            self.token_key_file = Path(self.token_key_file)
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port} out of range")
        for name in ("max_manifest_size", "max_blob_size", "upload_ttl", "token_ttl",
                     "max_batch_ranges", "max_batch_bytes"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        if (self.push_needs_auth or self.pull_auth) and self.users_file is None:
            raise UsageError(
                "authentication is required (listening on "
                f"{self.host}) but no users file is configured: set users_file or --users"
            )
        return self


@dataclass
class DaemonConfig:
    """Settings of the node daemon, ``turbofs mount`` (TOML table ``[daemon]``)."""

    #: None: no disk cache (chunks live in RAM only and prefetch does nothing).
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    disk_cache_bytes: int = DEFAULT_DISK_CACHE_BYTES
    disk_cache_fsync: bool = DEFAULT_DISK_CACHE_FSYNC
    ram_cache_bytes: int = DEFAULT_RAM_CACHE_BYTES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    demand_parallel: int = DEFAULT_DEMAND_PARALLEL
    readahead_trigger: int = DEFAULT_READAHEAD_TRIGGER
    readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS  # 0: no readahead
    prefetch: bool = DEFAULT_PREFETCH
    prefetch_parallel: int = DEFAULT_PREFETCH_PARALLEL
    prefetch_bandwidth: int = DEFAULT_PREFETCH_BANDWIDTH
    prefetch_batch_bytes: int = DEFAULT_PREFETCH_BATCH_BYTES
    prefetch_startup_batch_bytes: int = DEFAULT_PREFETCH_STARTUP_BATCH_BYTES
    prefetch_quiet: float = DEFAULT_PREFETCH_QUIET  # seconds; 0: only while no read waits
    prefetch_backoff: float = DEFAULT_PREFETCH_BACKOFF
    prefetch_backoff_max: float = DEFAULT_PREFETCH_BACKOFF_MAX
    prefetch_disk_share: float = DEFAULT_PREFETCH_DISK_SHARE
    startup_notify_store: bool = DEFAULT_STARTUP_NOTIFY_STORE  # erofs mode only
    mode: str = DEFAULT_MOUNT_MODE

    def validate(self) -> DaemonConfig:
        if self.mode not in MOUNT_MODES:
            raise UsageError(f"mode {self.mode!r} must be one of {', '.join(MOUNT_MODES)}")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        for name in ("disk_cache_bytes", "ram_cache_bytes", "read_timeout", "fetch_timeout",
                     "demand_parallel", "prefetch_parallel", "prefetch_batch_bytes", "prefetch_startup_batch_bytes",
                     "prefetch_backoff", "prefetch_backoff_max"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        for name in ("readahead_trigger", "readahead_chunks", "prefetch_bandwidth", "prefetch_quiet"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must not be negative")
        if not 0 < self.prefetch_disk_share <= 1:
            raise UsageError("prefetch_disk_share must be in (0, 1]")
        return self


@dataclass
class SnapshotterConfig:
    """Settings of ``turbofs snapshotter`` (TOML table ``[snapshotter]``).

    The turbofs mounts it starts take their settings from the ``[daemon]`` table of the
    same file (cache folder and bounds, prefetch...).
    """

    address: Path = DEFAULT_SNAPSHOTTER_ADDRESS
    root: Path = DEFAULT_SNAPSHOTTER_ROOT
    run_dir: Path = DEFAULT_SNAPSHOTTER_RUN_DIR
    #: registries (host[:port]) reached over plain HTTP; loopback ones always are
    plain_http: list[str] = field(default_factory=list)
    #: act on containerd CRI's labels (cri.image-ref, cri.manifest-digest): mount the image
    #: lazily when it, or its turbo twin, is a turbo image
    cri_lookup: bool = True
    turbo_tag_suffix: str = DEFAULT_TURBO_TAG_SUFFIX
    registry_retries: int = DEFAULT_SNAPSHOTTER_REGISTRY_RETRIES
    registry_timeout: float = DEFAULT_SNAPSHOTTER_REGISTRY_TIMEOUT
    workers: int = DEFAULT_SNAPSHOTTER_WORKERS
    #: keep one mount daemon started ahead of need (interpreter up, modules imported) and
    #: hand the next mount to it: ~0.2 s less from a lazy pull to a ready mount
    spare_daemon: bool = True

    def validate(self) -> SnapshotterConfig:
        self.address = Path(self.address)
        self.root = Path(self.root)
        self.run_dir = Path(self.run_dir)
        if len(os.fsencode(self.address)) > 107:
            raise UsageError(f"snapshotter address {self.address} is too long for a unix socket")
        if self.registry_retries < 0:
            raise UsageError("registry_retries must not be negative")
        for name in ("registry_timeout", "workers"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        if not isinstance(self.plain_http, list) or not all(isinstance(r, str) for r in self.plain_http):
            raise UsageError("plain_http must be a list of registry names")
        return self


def snapshotter_config(path: Path | None = None, **overrides: Any) -> SnapshotterConfig:
    """The snapshotter settings: defaults, the config file's ``[snapshotter]`` table, flags."""
    return _load(SnapshotterConfig, "snapshotter", path, overrides)


def daemon_config(path: Path | None = None, **overrides: Any) -> DaemonConfig:
    """The daemon settings: defaults, then the config file's ``[daemon]`` table, then flags."""
    return _load(DaemonConfig, "daemon", path, overrides)


_ENV_PREFIX: Final = "TURBOFS_REGISTRY_"


def registry_config(path: Path | None = None, **overrides: Any) -> RegistryConfig:
    """Registry settings: defaults, the ``[registry]`` table, ``TURBOFS_REGISTRY_*``, then flags."""
    known = {f.name: f for f in dataclasses.fields(RegistryConfig)}
    env: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith(_ENV_PREFIX):
            name = key[len(_ENV_PREFIX) :].lower()
            if name not in known:
                raise UsageError(f"environment variable {key}: unknown registry setting")
            env[name] = _parse_env(name, value, known[name].type)
    return _load(RegistryConfig, "registry", path, overrides, env)


def _parse_env(name: str, value: str, type_name: object) -> Any:
    text = str(type_name)
    try:
        if "bool" in text:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith("list"):
            return [v for v in value.split(",") if v]
    except ValueError:
        raise UsageError(f"TURBOFS_REGISTRY_{name.upper()}: invalid value {value!r}") from None
    return value


def _from_table(cls: type[T], table: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UsageError(f"{where}: unknown setting {key!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _load(cls: type[C], table_name: str, path: Path | None, overrides: dict[str, Any],
          extra: dict[str, Any] | None = None) -> C:
    """Defaults, then the config file's table, then ``extra`` (environment), then flags."""
    table = load_toml(path).get(table_name, {})
    if not isinstance(table, dict):
        raise UsageError(f"[{table_name}] in the config file must be a table")
    cfg = _from_table(cls, {**table, **(extra or {})}, f"[{table_name}]")
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


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
    return _load(BuildConfig, "build", path, overrides)
