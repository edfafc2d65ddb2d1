"""Startup working set of a real image, and what each chunk size costs to serve it.

Method:

1. Unpack the image's root filesystem with ``umoci unpack`` (cached under
   ``$TURBOFS_CACHE/bench/rootfs/``, keyed by the source manifest digest).
2. For each readahead setting of the pass list (``--readahead``; by default the device's own
   setting, 128 KiB and 0): set the ``read_ahead_kb`` of the block device that holds the
   root filesystem, ``sync`` and drop the page cache (``echo 3 > /proc/sys/vm/drop_caches``),
   start the image's entrypoint in the root filesystem (private mount namespace with
   ``/proc`` and ``/sys``, chroot, the image's Env and WorkingDir, plus
   ``PYTHONDONTWRITEBYTECODE=1`` so the cached tree stays unchanged), and put the readahead
   setting back as soon as the app exits.
3. For every regular file of the root filesystem, ``mincore(2)`` on a read-only mapping says
   which 4 KiB pages are in the page cache. Those pages are the working set. It includes
   what kernel readahead brought in around each read and each page fault (that is why the
   passes differ): the 0 KiB pass is close to the pages the app really touched, the
   128 KiB pass is what a FUSE mount with the kernel's default readahead would be asked
   for, and the device default (8 MiB on this machine) shows how much readahead inflates it.
4. For each built variant (chunk sizes 64 KiB .. 4 MiB at zstd level 3, built by
   :func:`bench.build_bench.ensure_variant`), each resident run of pages is mapped through
   the turbofs index (``resolve`` + ``map_range``): file bytes used, distinct chunks
   touched, compressed bytes to fetch (and how many contiguous byte ranges of blobs that
   is), uncompressed bytes to decompress, and the waste factor (decompressed / used).
   The zstd decompression of exactly those chunks is timed (thread CPU seconds, median of
   3, frames already in memory), alone and with the sha256 check that the reader does.

Needs root (umoci, chroot, mount, drop_caches). If the page cache cannot be dropped, the
residency is read after the run anyway and the results say so (it then also holds pages
that earlier activity left in the cache).

Command line::

    python -m bench.workingset [--image python-1g] [--readahead device,128,0]

Results go to ``bench/results/workingset.json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import hashlib
import mmap
import os
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zstandard

from bench.build_bench import (
    CHUNK_SIZES,
    RESULTS_DIR,
    SWEEP_LEVEL,
    TAG,
    code_state,
    ensure_variant,
    log,
    machine_info,
    save_results,
    size_label,
    source_config,
    source_manifest,
)
from bench.images import cache_dir, ensure_image
from turbofs.core.errors import NotFound
from turbofs.core.format import Chunk, Index
from turbofs.core.image import LayoutImage, open_layout_image

PAGE: Final = mmap.PAGESIZE
APP_TIMEOUT: Final = 600
DECOMPRESS_REPEATS: Final = 3
TOP_FILES: Final = 20
DEFAULT_PASSES: Final = ("device", "128", "0")

_t0 = time.monotonic()

# --------------------------------------------------------------------------- mincore

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_LOW_BIT: Final = bytes(b & 1 for b in range(256))


def resident_runs(path: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) runs of a file's bytes whose pages are in the page cache.

    Lengths are clipped to the file size. The mapping itself reads nothing.
    """
    if size == 0:
        return []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore {path}: {os.strerror(err)}")
            flags = bytes(vec)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    bits = flags.translate(_LOW_BIT)  # mincore sets bit 0; other bits are reserved
    runs: list[tuple[int, int]] = []
    pos = bits.find(1)
    while pos >= 0:
        end = bits.find(0, pos)
        if end < 0:
            end = len(bits)
        off = pos * PAGE
        runs.append((off, min(size, end * PAGE) - off))
        pos = bits.find(1, end)
    return runs


@dataclass
class ResidentFile:
    path: bytes  # relative to the root, no leading slash
    size: int
    runs: list[tuple[int, int]]

    @property
    def resident(self) -> int:
        return sum(length for _, length in self.runs)


def scan_tree(root: Path) -> tuple[list[ResidentFile], dict[str, int]]:
    """Every regular file under ``root`` with resident pages (hardlinks once)."""
    seen: set[tuple[int, int]] = set()
    found: list[ResidentFile] = []
    stats = {"files": 0, "bytes": 0}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            stats["files"] += 1
            stats["bytes"] += st.st_size
            runs = resident_runs(full, st.st_size)
            if runs:
                rel = os.fsencode(os.path.relpath(full, root))
                found.append(ResidentFile(rel, st.st_size, runs))
    return found, stats


# --------------------------------------------------------------------------- the rootfs


def unpacked_rootfs(image: str) -> Path:
    """The image's root filesystem unpacked by umoci (cached); returns the rootfs dir."""
    layout = ensure_image(image)
    digest, _ = source_manifest(layout)
    base = cache_dir() / "bench" / "rootfs"
    final = base / f"{image}-{digest.split(':', 1)[1][:16]}"
    if (final / "rootfs").is_dir():
        return final / "rootfs"
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    log(f"umoci unpack {layout}:{TAG} -> {final}")
    try:
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:{TAG}", str(tmp)],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)
    return final / "rootfs"


# --------------------------------------------------------------------------- readahead, caches


def readahead_file(path: Path) -> Path | None:
    """The ``read_ahead_kb`` file of the block device under ``path``, or None."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None  # overlay, tmpfs...: no block device of its own
    sysdev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sysdev / "partition").exists():
        sysdev = sysdev.resolve().parent
    candidate = sysdev / "queue" / "read_ahead_kb"
    if candidate.exists():
        return candidate
    bdi = Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb")
    return bdi if bdi.exists() else None


def drop_caches() -> str | None:
    """Sync and drop the page cache; None on success, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- the app


@dataclass
class AppRun:
    argv: list[str]
    wall_seconds: float
    ready_seconds: float | None
    output: str


def app_command(image_config: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
    argv = list(image_config.get("Entrypoint") or []) + list(image_config.get("Cmd") or [])
    if not argv:
        raise SystemExit("the image has neither Entrypoint nor Cmd")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    for item in image_config.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return argv, env, str(image_config.get("WorkingDir") or "/")


def run_app(rootfs: Path, image_config: dict[str, Any]) -> AppRun:
    """Start the image's entrypoint in ``rootfs``, as a container would, and wait for it."""
    argv, env, workdir = app_command(image_config)
    # host sh and unshare (absolute paths) do the mounts in a private mount namespace,
    # which vanishes with the process: nothing is left mounted on any exit path
    script = (
        'set -e; r="$1"; w="$2"; shift 2; '
        'mount -t proc proc "$r/proc"; '
        'if [ -d "$r/sys" ]; then mount --bind /sys "$r/sys"; fi; '
        'exec /usr/bin/unshare --root="$r" --wd="$w" "$@"'
    )
    cmd = [
        "/usr/bin/unshare", "--mount", "--propagation", "private",
        "/bin/sh", "-c", script, "sh", str(rootfs), workdir, *argv,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=APP_TIMEOUT, check=False
    )
    wall = time.monotonic() - t0
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"the app failed with exit status {proc.returncode}:\n{out[-3000:]}")
    ready = None
    for line in out.splitlines():
        if line.startswith("READY "):
            with contextlib.suppress(IndexError, ValueError):
                ready = float(line.split()[1])
    return AppRun(argv, round(wall, 3), ready, out.strip()[-500:])


# --------------------------------------------------------------------------- mapping


@dataclass
class VariantCost:
    chunk_size: int
    zstd_level: int
    used_bytes: int = 0  # file bytes of the working set that live in chunks
    hole_bytes: int = 0  # file bytes of the working set that are holes (no chunk)
    chunks: dict[int, Chunk] = field(default_factory=dict)
    files_missing: int = 0
    bytes_missing: int = 0

    def summary(self, index: Index, frames: dict[int, bytes]) -> dict[str, Any]:
        touched = sorted(self.chunks.values(), key=lambda c: (c.blob, c.offset))
        clen = sum(c.clen for c in touched)
        ulen = sum(c.ulen for c in touched)
        ranges = 0
        prev: Chunk | None = None
        for c in touched:
            if prev is None or c.blob != prev.blob or c.offset != prev.offset + prev.clen:
                ranges += 1
            prev = c
        image_clen = sum(c.clen for c in index.chunks())
        dec, dec_sha = time_decompression(touched, frames)
        return {
            "chunk_size": self.chunk_size,
            "label": size_label(self.chunk_size),
            "zstd_level": self.zstd_level,
            "used_bytes": self.used_bytes,
            "hole_bytes": self.hole_bytes,
            "chunks_touched": len(touched),
            "chunks_in_image": index.n_chunks,
            "compressed_bytes": clen,
            "image_compressed_bytes": image_clen,
            "fetch_fraction": round(clen / image_clen, 4) if image_clen else 0.0,
            "fetch_ranges": ranges,
            "blobs_touched": len({c.blob for c in touched}),
            "blobs_in_image": index.n_blobs,
            "uncompressed_bytes": ulen,
            "waste_factor": round(ulen / self.used_bytes, 3) if self.used_bytes else None,
            "used_per_chunk_bytes": round(self.used_bytes / len(touched)) if touched else 0,
            "decompress_cpu_seconds": round(dec, 4),
            "decompress_sha256_cpu_seconds": round(dec_sha, 4),
            "decompress_mb_per_s": round(ulen / 1e6 / dec, 1) if dec > 0 else None,
            "files_not_in_image": self.files_missing,
            "bytes_not_in_image": self.bytes_missing,
        }


def map_working_set(img: LayoutImage, files: Sequence[ResidentFile], level: int) -> VariantCost:
    index = img.index
    cost = VariantCost(index.chunk_size, level)
    for rf in files:
        try:
            ino = index.resolve(rf.path)
        except NotFound:
            cost.files_missing += 1
            cost.bytes_missing += rf.resident
            continue
        if not index.inode(ino).is_reg:
            cost.files_missing += 1
            cost.bytes_missing += rf.resident
            continue
        for off, length in rf.runs:
            for piece in index.map_range(ino, off, length):
                if piece.chunk is None:
                    cost.hole_bytes += piece.length
                else:
                    cost.used_bytes += piece.length
                    cost.chunks[piece.chunk.id] = piece.chunk
    return cost


def load_frames(img: LayoutImage, chunks: Sequence[Chunk]) -> dict[int, bytes]:
    """The compressed frame of each chunk, read from the layout's blobs."""
    frames: dict[int, bytes] = {}
    by_blob: dict[int, list[Chunk]] = {}
    for c in chunks:
        by_blob.setdefault(c.blob, []).append(c)
    for blob_id, members in by_blob.items():
        with open(img.blob_path(img.index.blob(blob_id).oci_digest), "rb") as f:
            for c in sorted(members, key=lambda c: c.offset):
                f.seek(c.offset)
                frames[c.id] = f.read(c.clen)
    return frames


def time_decompression(chunks: Sequence[Chunk], frames: dict[int, bytes]) -> tuple[float, float]:
    """Median thread CPU seconds to decompress ``chunks``, without and with sha256 checks."""
    dctx = zstandard.ZstdDecompressor()

    def once(check: bool) -> float:
        t0 = time.thread_time()
        for c in chunks:
            data = dctx.decompress(frames[c.id], max_output_size=c.ulen)
            if check and hashlib.sha256(data).digest() != c.digest:
                raise SystemExit(f"chunk {c.id} does not match its digest")
        return time.thread_time() - t0

    plain = statistics.median(once(False) for _ in range(DECOMPRESS_REPEATS))
    checked = statistics.median(once(True) for _ in range(DECOMPRESS_REPEATS))
    return plain, checked


# --------------------------------------------------------------------------- passes


def _parse_pass(text: str, device_kb: int | None) -> int | None:
    if text == "device":
        return device_kb
    return int(text)


def measure_pass(
    rootfs: Path, image_config: dict[str, Any], ra_file: Path | None, ra_kb: int | None
) -> dict[str, Any]:
    """One cold start at one readahead setting: its page-cache working set."""
    original: str | None = None
    if ra_file is not None:
        original = ra_file.read_text().strip()
    notes: list[str] = []
    try:
        if ra_file is not None and ra_kb is not None:
            ra_file.write_text(f"{ra_kb}\n")
        dropped = drop_caches()
        if dropped is not None:
            notes.append(f"page cache NOT dropped ({dropped}): the residency also holds earlier reads")
        app = run_app(rootfs, image_config)
    finally:
        if ra_file is not None and original is not None:
            ra_file.write_text(f"{original}\n")
    t0 = time.monotonic()
    files, totals = scan_tree(rootfs)
    scan_seconds = time.monotonic() - t0
    resident = sum(f.resident for f in files)
    top = sorted(files, key=lambda f: f.resident, reverse=True)[:TOP_FILES]
    return {
        "readahead_kb": ra_kb if ra_kb is not None else (int(original) if original else None),
        "page_cache_dropped": not notes,
        "notes": notes,
        "app": {"argv": app.argv, "wall_seconds": app.wall_seconds,
                "ready_seconds": app.ready_seconds, "output_tail": app.output},
        "tree_files": totals["files"],
        "tree_bytes": totals["bytes"],
        "resident_files": len(files),
        "resident_bytes": resident,
        "resident_runs": sum(len(f.runs) for f in files),
        "scan_seconds": round(scan_seconds, 2),
        "top_files": [
            {"path": "/" + f.path.decode(errors="backslashreplace"), "size": f.size, "resident_bytes": f.resident}
            for f in top
        ],
        "_files": files,
    }


def _print_table(ws: dict[str, Any]) -> None:
    log(
        f"readahead {ws['readahead_kb']} KiB: app {ws['app']['wall_seconds']} s "
        f"(READY {ws['app']['ready_seconds']}), {ws['resident_files']} files, "
        f"{ws['resident_bytes'] / 1e6:.1f} MB resident of {ws['tree_bytes'] / 1e6:.0f} MB"
    )
    for v in ws["variants"]:
        log(
            f"  {v['label']:>4}: {v['chunks_touched']:5d} chunks, fetch {v['compressed_bytes'] / 1e6:7.1f} MB "
            f"({v['fetch_ranges']} ranges), decompress {v['uncompressed_bytes'] / 1e6:7.1f} MB "
            f"= x{v['waste_factor']} of {v['used_bytes'] / 1e6:.1f} MB used, "
            f"{v['decompress_cpu_seconds']:.3f} s CPU"
        )


def run(image: str, passes: Sequence[str], chunk_sizes: Sequence[int], level: int) -> dict[str, Any]:
    layout = ensure_image(image)
    digest, _ = source_manifest(layout)
    image_config = source_config(layout)
    variants: list[tuple[int, LayoutImage]] = []
    for cs in chunk_sizes:
        out = ensure_variant(image, cs, level)
        variants.append((cs, open_layout_image(out, TAG)))
    rootfs = unpacked_rootfs(image)
    ra_file = readahead_file(rootfs)
    device_kb = int(ra_file.read_text().strip()) if ra_file is not None else None
    data: dict[str, Any] = {
        "benchmark": "workingset",
        "image": image,
        "source_manifest": digest,
        "machine": machine_info(),
        "code": code_state(),
        "rootfs": str(rootfs),
        "readahead_file": str(ra_file) if ra_file else None,
        "device_readahead_kb": device_kb,
        "page_size": PAGE,
        "method": (
            "umoci-unpacked rootfs; sync + drop_caches; entrypoint run in a chroot with /proc "
            "and /sys; mincore() of every regular file; resident 4 KiB pages mapped through "
            "each variant's index. Resident pages include kernel readahead around reads and "
            "page faults (read_ahead_kb of the rootfs device, set per pass)."
        ),
        "passes": [],
    }
    for text in passes:
        if ra_file is None and text != "device":
            log(f"readahead pass {text} skipped: no block device readahead setting for {rootfs}")
            continue
        ra_kb = _parse_pass(text, device_kb)
        log(f"cold start with readahead {ra_kb} KiB")
        ws = measure_pass(rootfs, image_config, ra_file, ra_kb)
        files: list[ResidentFile] = ws.pop("_files")
        ws["variants"] = []
        for _cs, img in variants:
            cost = map_working_set(img, files, level)
            frames = load_frames(img, list(cost.chunks.values()))
            ws["variants"].append(cost.summary(img.index, frames))
        _print_table(ws)
        data["passes"].append(ws)
    data["total_seconds"] = round(time.monotonic() - _t0, 1)
    return data


def _iter_sizes(text: str) -> Iterator[int]:
    units = {"K": 1024, "M": 1024 * 1024}
    for part in text.split(","):
        part = part.strip().upper()
        yield int(part[:-1]) * units[part[-1]] if part[-1] in units else int(part)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workingset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="python-1g")
    parser.add_argument(
        "--readahead", default=",".join(DEFAULT_PASSES),
        help="comma-separated read_ahead_kb values, one cold start each; 'device' = leave as is",
    )
    parser.add_argument(
        "--chunk-sizes", default=",".join(size_label(c) for c in CHUNK_SIZES),
        help="variants to map the working set onto (default 64K,128K,256K,512K,1M,4M)",
    )
    parser.add_argument("--level", type=int, default=SWEEP_LEVEL, help="zstd level of the variants")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "workingset.json")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.workingset needs root (umoci, chroot, mount, drop_caches)")
    passes = [p.strip() for p in args.readahead.split(",") if p.strip()]
    data = run(args.image, passes, list(_iter_sizes(args.chunk_sizes)), args.level)
    save_results(args.output, data, "bench.workingset", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
