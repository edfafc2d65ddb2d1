"""Every default of turbofs, in one place, as typed configuration objects.

Configuration is loaded from TOML (``/etc/turbofs/config.toml`` or ``--config``), one table
per part (``[build]``, later ``[registry]``, ``[daemon]``...), and command-line flags override
it. Each default carries one line of reason; the measurements behind them are in
``bench/README.md``. Limits that are not settings sit in the "Fixed limits" block.
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

# -- ``turbofs build`` ([build]) -------------------------------------------------------------

#: Uncompressed chunk size: the smallest startup working set per chunk counted (bench/README.md, "workingset").
DEFAULT_CHUNK_SIZE: Final = 256 * KiB
#: zstd level 3: level 6 saves 4% of the bytes for a third slower build (bench/README.md, "Build").
DEFAULT_ZSTD_LEVEL: Final = 3
#: Chunk blobs are cut content-defined between these sizes, so a one-file change re-uploads one blob.
DEFAULT_BLOB_MIN: Final = 512 * KiB
DEFAULT_BLOB_AVG: Final = 1 * MiB
DEFAULT_BLOB_MAX: Final = 4 * MiB
DEFAULT_MAX_LAYER_SIZE: Final = 64 * GiB  # uncompressed bytes of one layer: refuse a tar bomb
DEFAULT_MAX_IMAGE_SIZE: Final = 256 * GiB  # uncompressed bytes of all layers
DEFAULT_MAX_ENTRIES: Final = 10_000_000  # tar entries over all layers: bounds the index in memory
DEFAULT_MAX_CONFIG_SIZE: Final = 8 * MiB  # manifests, configs, index.json read by the builder
DEFAULT_PATH_MAX: Final = 4096  # Linux's PATH_MAX: longer names cannot be presented
#: Files smaller than a chunk wait in memory up to this many bytes, then in a spool file.
DEFAULT_SMALL_FILES_MEMORY: Final = 1 * GiB
DEFAULT_TAG: Final = "latest"

# -- ``turbofs serve`` ([registry]) ----------------------------------------------------------

#: The embedded registry listens on loopback unless told otherwise.
DEFAULT_REGISTRY_HOST: Final = "127.0.0.1"
DEFAULT_REGISTRY_PORT: Final = 5050
DEFAULT_REGISTRY_STORAGE: Final = Path("/var/lib/turbofs/registry")
DEFAULT_MAX_MANIFEST_SIZE: Final = 4 * MiB  # as distribution's limit
DEFAULT_MAX_BLOB_SIZE: Final = 64 * GiB
DEFAULT_UPLOAD_TTL: Final = 3600.0  # seconds an idle upload session lives
DEFAULT_TOKEN_TTL: Final = 3600.0  # seconds a bearer token is valid
DEFAULT_MAX_BATCH_RANGES: Final = 4096  # ranges in one batched fetch: bounds a request's work
DEFAULT_MAX_BATCH_BYTES: Final = 256 * MiB  # bytes of one batched answer
DEFAULT_CONVERT_TAG_SUFFIX: Final = "-turbo"  # server-side conversion: TAG -> TAG-turbo

# -- the node daemon, ``turbofs mount`` ([daemon]) -------------------------------------------

#: The disk tier, shared by every mount of the node: uncompressed, verified chunks.
DEFAULT_CACHE_DIR: Final = Path("/var/lib/turbofs/cache")
DEFAULT_DISK_CACHE_BYTES: Final = 16 * GiB
#: No fsync per cache file: a torn file fails its check and is a miss, never bad data.
DEFAULT_DISK_CACHE_FSYNC: Final = False
#: Decompressed chunks in daemon memory; the page cache keeps what the kernel was served.
DEFAULT_RAM_CACHE_BYTES: Final = 256 * MiB
#: A read that waits on the network this long fails with EIO and names the cause.
DEFAULT_READ_TIMEOUT: Final = 30.0
#: One background fetch, all retries, so that a chunk never stays "fetching".
DEFAULT_FETCH_TIMEOUT: Final = 120.0
#: Demand and readahead fetches in flight at once; prefetch has its own budget.
DEFAULT_DEMAND_PARALLEL: Final = 16
#: After this many sequential reads of a file, its next chunks are fetched ahead.
DEFAULT_READAHEAD_TRIGGER: Final = 2
DEFAULT_READAHEAD_CHUNKS: Final = 4
DEFAULT_PREFETCH: Final = True
DEFAULT_PREFETCH_PARALLEL: Final = 4
DEFAULT_PREFETCH_BANDWIDTH: Final = 0  # bytes/s over the network; 0: no cap
#: Compressed bytes per prefetch fetch: about one blob, so usually one range.
DEFAULT_PREFETCH_BATCH_BYTES: Final = 4 * MiB
#: The background prefetch starts a batch only after this long without a read: its batches
#: would otherwise queue ahead of demand reads and take CPU from the starting process.
DEFAULT_PREFETCH_QUIET: Final = 0.5
#: Smaller batches for a recorded startup keep its chunks arriving in the order it reads them.
DEFAULT_PREFETCH_STARTUP_BATCH_BYTES: Final = 1 * MiB
#: erofs mode: push each recorded-startup chunk into the image file's page cache (FUSE
#: notify_store) so erofs never asks the daemon for it (bench/README.md, "Cold start").
DEFAULT_STARTUP_NOTIFY_STORE: Final = True
DEFAULT_PREFETCH_BACKOFF: Final = 1.0  # seconds after a failed prefetch fetch, doubled per failure
DEFAULT_PREFETCH_BACKOFF_MAX: Final = 60.0
#: Prefetch stops at this share of the disk bound, rather than evict what it fetched first.
DEFAULT_PREFETCH_DISK_SHARE: Final = 0.8
#: "erofs": kernel erofs over one FUSE-served file (far fewer FUSE requests); "fuse": one
#: FUSE request per lookup, getattr and read; "auto": erofs where the kernel has it.
MOUNT_MODES: Final = ("auto", "erofs", "fuse")
DEFAULT_MOUNT_MODE: Final = "auto"
#: Built erofs metadata kept per index in ``<cache_dir>/erofs/``, least recently used out.
DEFAULT_EROFS_META_CACHE_BYTES: Final = 512 * MiB
#: The erofs mount's own readahead (0: the kernel's); the FUSE file under it has 1 MiB,
#: which is what sets the request size (bench/README.md, "erofs readahead and caching").
DEFAULT_EROFS_READAHEAD_KB: Final = 0
#: No "directio": it multiplies FUSE reads and defeats the startup page-cache push.
DEFAULT_EROFS_MOUNT_OPTIONS: Final = ""

# -- ``turbofs snapshotter`` ([snapshotter]) -------------------------------------------------

DEFAULT_SNAPSHOTTER_ADDRESS: Final = Path("/run/turbofs/snapshotter.sock")
DEFAULT_SNAPSHOTTER_ROOT: Final = Path("/var/lib/turbofs/snapshotter")
#: The mount daemons' state (pid, control socket, log): mounts do not survive a reboot.
DEFAULT_SNAPSHOTTER_RUN_DIR: Final = Path("/run/turbofs/snapshotter")
#: The name containerd knows the snapshotter by (``[proxy_plugins.NAME]``).
DEFAULT_SNAPSHOTTER_NAME: Final = "turbofs"
#: The turbo twin of a plain image CRI pulls: same repository, tag + suffix (as --auto-convert writes).
DEFAULT_TURBO_TAG_SUFFIX: Final = DEFAULT_CONVERT_TAG_SUFFIX
#: containerd waits on the snapshotter's registry calls: fewer retries than a mount's.
DEFAULT_SNAPSHOTTER_REGISTRY_RETRIES: Final = 2
DEFAULT_SNAPSHOTTER_REGISTRY_TIMEOUT: Final = 30.0
DEFAULT_SNAPSHOTTER_WORKERS: Final = 16  # gRPC worker threads

# -- Fixed limits: bounds and tunables that are not settings, one line of reason each ---------

# layers, tar streams and trees (turbofs.core.tar, .layers, .fstree; the builder; apply)
#: Symlinks followed while resolving one path inside a root: Linux's MAXSYMLINKS.
MAX_SYMLINKS: Final = 40
#: A pax header or GNU long name larger than this is refused (no real one comes close).
TAR_MAX_META_SIZE: Final = 16 << 20
#: Bytes read from a layer blob, or written to a file being applied, at a time.
LAYER_READ_BLOCK: Final = 1 << 20
#: Decompressed pieces queued between a layer's reader thread and its tar parser.
LAYER_QUEUE_DEPTH: Final = 8
#: Chunks queued for hashing and compression per build worker (bounds the pieces read ahead).
BUILD_CHUNKS_QUEUED_PER_WORKER: Final = 4

# the registry client (turbofs.core.registry, .auth, .image)
#: Retries of a request that is safe to repeat (connection lost, 408, 425, 429, 5xx).
CLIENT_RETRIES: Final = 5
#: First backoff in seconds, doubled per retry up to the maximum, with full jitter.
CLIENT_BACKOFF: Final = 0.2
CLIENT_BACKOFF_MAX: Final = 5.0
#: A ``Retry-After`` (429, 503) asking to wait longer than this many seconds ends the retries.
CLIENT_RETRY_AFTER_MAX: Final = 60.0
#: HTTP statuses a request is retried on (timeouts, rate limits, transient server errors).
CLIENT_RETRY_STATUS: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Seconds one request may take, and its connect phase.
CLIENT_TIMEOUT: Final = 60.0
CLIENT_CONNECT_TIMEOUT: Final = 10.0
#: Connections kept open to one registry (parallel range GETs and uploads share them).
CLIENT_MAX_CONNECTIONS: Final = 32
#: Range GETs (or HEADs) in flight per call to a registry without the turbofs extensions.
CLIENT_PARALLEL: Final = 8
#: Batched-fetch bounds assumed when the registry's ``/v2/_turbofs/info`` states none.
CLIENT_BATCH_RANGES: Final = 1024
CLIENT_BATCH_BYTES: Final = 64 * MiB
#: Seconds after a failed ``/v2/_turbofs/info`` before it is asked again (meanwhile: plain ranges).
CLIENT_CAPS_RETRY: Final = 2.0
#: Bytes per piece of a streamed blob upload.
CLIENT_UPLOAD_PIECE: Final = 1 * MiB
#: Largest manifest and image config accepted: both are JSON read whole into memory.
CLIENT_MAX_MANIFEST: Final = 4 * MiB
CLIENT_MAX_CONFIG: Final = 8 * MiB
#: Image indexes nested deeper than this are refused (a loop of indexes ends here).
MAX_INDEX_DEPTH: Final = 2
#: A turbofs index payload is refused unread when it claims more than this many times its
#: compressed size (real indexes are ~4x; zstd makes ~30,000x of zeros: a decompression bomb)...
INDEX_MAX_RATIO: Final = 128
#: ...unless it claims at most this many bytes (the refs of a large sparse file compress to nothing).
INDEX_RATIO_FREE: Final = 32 * MiB
#: No index payload is larger than this, at any ratio (10 million entries take about 2 GiB).
INDEX_MAX_PAYLOAD: Final = 4 * GiB
#: A cached token is renewed once less than this share of its lifetime (at most the margin) is left.
TOKEN_REFRESH_FRACTION: Final = 0.1
TOKEN_REFRESH_MAX_MARGIN: Final = 30.0
#: Blobs ``turbofs push`` uploads at once.
PUSH_PARALLEL: Final = 4

# the node core (turbofs.node)
#: The RAM tier's entry limit (lru-dict needs one), far above what its byte bound lets in.
RAM_CACHE_MAX_ENTRIES: Final = 1 << 22
#: Disk-tier usage is counted in file-system blocks of this size.
DISK_CACHE_BLOCK: Final = 4096
#: Free space the disk tier leaves on its file system (this share of it, at most the maximum):
#: it evicts its own chunks, or writes no more, rather than fill the disk of other users.
DISK_CACHE_RESERVE_SHARE: Final = 0.05
DISK_CACHE_RESERVE_MAX: Final = 1 * GiB
#: Seconds between summary lines of failed cache writes (the first failure is logged at once).
DISK_CACHE_WRITE_LOG_INTERVAL: Final = 60.0
#: A temporary file in the node's cache folder (chunks, erofs metadata) of a dead process,
#: or one this many seconds old, was left by a crash and is removed.
CACHE_STALE_TEMP: Final = 3600.0
#: Files whose read pattern the reader remembers, to detect sequential reads.
READER_SEQ_TRACKED_FILES: Final = 4096
#: Source failures younger than this (seconds) are named in a read timeout's message.
READER_RECENT_FAILURE: Final = 120.0
#: Seconds a chunk's failed fetch (or a read's timeout on it) is remembered: reads of it meanwhile
#: fail at once with that cause, so one user read() (several FUSE reads) waits once, not per request.
READER_FAILURE_MEMORY: Final = 3.0
#: Seconds the prefetch keeps retrying while every fetch fails; then it ends "incomplete"
#: (cause: fetch), and reads still fetch what they need.
PREFETCH_GIVE_UP: Final = 120.0
#: A prefetch batch is held decompressed until on disk: at most this many times its compressed bound.
PREFETCH_BATCH_EXPANSION: Final = 4
#: Seconds of the prefetch bandwidth cap that may be spent at once after an idle spell.
PREFETCH_BUCKET_BURST: Final = 0.25
#: Fetch latency buckets (seconds): a local registry answers in a millisecond, a remote one in tens.
FETCH_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: glibc's mmap threshold, pinned at its starting value: chunk-sized blocks get mappings of
#: their own, given back to the kernel when freed, instead of staying in heap arenas.
MALLOC_MMAP_THRESHOLD: Final = 128 * KiB
#: Malloc arenas for the loop and worker threads (glibc's 8 per core each keep free space resident).
MALLOC_ARENA_MAX: Final = 2
#: Free space at the top of a heap beyond this is given back at once.
MALLOC_TRIM_THRESHOLD: Final = 1 * MiB

# the presentations and the mount daemon (turbofs.mount, turbofs.erofs)
#: Seconds the kernel keeps FUSE entries and attributes: the image never changes.
FUSE_ATTR_TIMEOUT: Final = 3600.0
#: Readahead of a FUSE mount's bdi: 1 MiB FUSE reads instead of the kernel's 128 KiB.
FUSE_READAHEAD_KB: Final = 1024
#: Bytes per read when the erofs metadata region is read into the page cache before mounting.
EROFS_WARM_STEP: Final = 1 * MiB
#: Bytes of the erofs image file fetched ahead of sequential reads of it.
EROFS_READAHEAD_BYTES: Final = 1 * MiB
#: Seconds a stop of the page-cache push waits for a push under way (a stuck one is left).
PAGE_CACHE_STOP_WAIT: Final = 2.0
#: Seconds ``turbofs mount`` waits for its daemon's "ready".
MOUNT_READY_TIMEOUT: Final = 120.0
#: Seconds ``turbofs umount`` waits for the daemon to exit before sending SIGTERM.
UMOUNT_TIMEOUT: Final = 30.0
#: Seconds a mount waits for a spare daemon still importing: still ahead of a new process.
SPARE_WAIT: Final = 5.0
#: Bytes of a control socket command (single words) and connections waiting to be accepted.
CONTROL_MAX_COMMAND: Final = 1024
CONTROL_BACKLOG: Final = 16

# the snapshotter (turbofs.snapshotter)
#: Uncompressed bytes of one layer a placeholder may become: a decompression bomb stops there.
SNAPSHOTTER_MAX_LAYER_SIZE: Final = DEFAULT_MAX_LAYER_SIZE
#: Image lookups the resolver keeps (a manifest digest names immutable bytes).
RESOLVER_CACHE_ENTRIES: Final = 256
#: Seconds "no turbo image" (or a failed lookup) is remembered: a twin being converted shows up
#: after this, and a registry that is down is not asked again for every layer.
RESOLVER_NEGATIVE_TTL: Final = 60.0
#: Times a manifest, config, index or layer whose bytes fail their digest (a corrupt answer,
#: a transient fault) is fetched again before the mismatch is reported.
RESOLVER_DIGEST_REFETCHES: Final = 3
#: A layer blob is downloaded in ranges of this many bytes, this many at a time.
LAYER_DOWNLOAD_PIECE: Final = 8 * MiB
LAYER_DOWNLOAD_PARALLEL: Final = 4
#: Seconds an unmount waits for the daemon to exit by itself before it gets SIGTERM.
UNMOUNT_WAIT: Final = 3.0
#: Seconds after a spare daemon is used before the next starts, so its start does not compete
#: with the container the mount is for.
SPARE_REFILL_DELAY: Final = 10.0
#: Snapshots per List answer message.
SNAPSHOTTER_LIST_BATCH: Final = 100
#: ``turbofs pull``: seconds a containerd call is retried while containerd's connection to a
#: (re)started snapshotter backs off; seconds one call may take.
CONTAINERD_RETRY_FOR: Final = 20.0
CONTAINERD_TIMEOUT: Final = 120.0
#: Bytes per message of a write into containerd's content store.
CONTAINERD_WRITE_PIECE: Final = 1 * MiB
#: Seconds the lease of a ``turbofs pull`` lives if the pull dies before deleting it.
CONTAINERD_LEASE_TTL: Final = 3600.0

# the registry server (server)
#: Bytes per read of a request body streamed to disk, and per read of a blob copied or hashed.
REGISTRY_IO_CHUNK: Final = 1 * MiB
#: Catalog page when the client gives no ``n``; the largest page of any list answered.
REGISTRY_CATALOG_PAGE: Final = 1000
REGISTRY_MAX_PAGE: Final = 10_000
#: JSON request bodies of the turbofs extensions (batch, missing), and of a conversion request.
REGISTRY_MAX_EXT_BODY: Final = 8 * MiB
REGISTRY_MAX_CONVERT_BODY: Final = 64 * KiB
#: Digests one ``missing`` query may ask about (a large image has tens of thousands of blobs).
REGISTRY_MAX_MISSING_DIGESTS: Final = 100_000
#: Deepest nesting of a JSON request body or manifest (OCI documents and batch bodies need < 10).
REGISTRY_MAX_JSON_DEPTH: Final = 64
#: Most digits of an integer in a JSON request body or manifest: uint64 needs 20, and longer
#: ones cost quadratic time to convert (past 4300 Python refuses them with a ValueError).
REGISTRY_MAX_JSON_INT_DIGITS: Final = 20
#: Most significant digits of a bound in a Range or Content-Range header: 20 hold any uint64
#: (a longer first-pos is past every blob, a longer last-pos means "to the end").
REGISTRY_MAX_RANGE_DIGITS: Final = 20
#: Ranges of one multi-range GET; past it the Range header is ignored (200), as RFC 9110 14.2 allows.
REGISTRY_MAX_RANGES: Final = 128
#: Ranges closer than this are merged into one part (about the size of one part's header).
REGISTRY_RANGE_MERGE_GAP: Final = 128
#: Folder of the storage where blobs whose bytes no longer match their digest are moved.
REGISTRY_QUARANTINE_DIR: Final = "quarantine"
#: Size of the token signing key made on first start, and the shortest key accepted.
TOKEN_KEY_SIZE: Final = 32
TOKEN_MIN_KEY_SIZE: Final = 16
#: Lifetime of the refresh tokens handed out for ``offline_token``/``access_type=offline``.
REFRESH_TOKEN_TTL: Final = 30 * 24 * 3600.0
#: Longest bearer token looked at (ours are a few hundred bytes).
MAX_TOKEN_LENGTH: Final = 16 * KiB
#: scrypt cost of new password hashes: N = 2**15, r = 8, p = 1 (32 MiB); hashes carry their cost.
SCRYPT_LOG_N: Final = 15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
#: Highest scrypt cost a users-file hash may ask for (bounds the memory and time of a login).
SCRYPT_MAX_LOG_N: Final = 20
#: Basic logins remembered as verified, so clients sending Basic on every request skip scrypt.
VERIFIED_LOGINS_CACHE: Final = 1024

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
    #: hand the next mount to it, saving its start on the way to a ready mount
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
