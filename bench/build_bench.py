"""Build benchmark: throughput, peak memory and output size of ``turbofs build``.

What it measures, on a realistic image (``python-1g`` from :mod:`bench.images`, about
1.4 GB of uncompressed layers in three gzip layers):

1. **Throughput with the defaults** (``BuildConfig()``): ``--runs`` builds, each in its own
   subprocess, reported as median, min and max. MB/s is uncompressed layer bytes read over
   the seconds that :func:`index_builder.builder.build` reports (interpreter start and
   imports excluded; the wall time of the whole subprocess is recorded too). The layer blobs
   are read once before the first run, so every run reads its input from the page cache:
   these are **warm-cache** figures. Peak RSS is the ``ru_maxrss`` of the build subprocess
   (from ``os.wait4``), which includes the Python interpreter.
2. **A sweep** over chunk sizes (64 KiB .. 4 MiB at zstd level 3) and zstd levels (1, 3, 6
   at the default chunk size): compressed size, compression ratio, chunks, blobs, index
   size, MB/s and peak RSS. Each sweep point is one build (the point equal to the defaults
   reuses the median of step 1), so its MB/s is noisier than step 1's.
3. **Single-core ceilings** of the build's stages on the image's own bytes: gzip inflate
   (ISA-L and zlib), sha256, and zstd compression of chunk-sized pieces at each level. They
   say what bounds the build on this machine.

The builds of the sweep are kept under ``$TURBOFS_CACHE/bench/builds/`` (one OCI layout per
variant, with a ``.json`` stamp beside it), where :mod:`bench.workingset` finds them.

Command line::

    python -m bench.build_bench [--runs 3] [--image python-1g] [--no-sweep] [--no-ceilings]

Results go to ``bench/results/build.json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import zstandard
from isal import isal_zlib

from bench.images import cache_dir, ensure_image
from turbofs.core.config import DEFAULT_CHUNK_SIZE, BuildConfig, KiB, MiB

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
TAG: Final = "latest"

CHUNK_SIZES: Final = (64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 4 * MiB)
LEVELS: Final = (1, 3, 6)
SWEEP_LEVEL: Final = 3
#: Bytes of the largest layer used by the single-core ceilings.
CEILING_SAMPLE: Final = 256 * MiB

_T_START = time.monotonic()


def log(msg: str) -> None:
    print(f"bench [{time.monotonic() - _T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- shared helpers


def size_label(n: int) -> str:
    """``65536`` -> ``"64K"``, ``1048576`` -> ``"1M"``."""
    if n % MiB == 0:
        return f"{n // MiB}M"
    if n % KiB == 0:
        return f"{n // KiB}K"
    return str(n)


def median_min_max(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "zstandard": zstandard.__version__,
    }
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return info


def code_state() -> dict[str, Any]:
    """The commit the figures were measured at, and which source files differed from it."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return proc.stdout if proc.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "turbofs", "index_builder", "server")
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        # porcelain lines are "XY PATH"
        "uncommitted": [line[3:] for line in changed.splitlines() if len(line) > 3],
    }


def new_results(benchmark: str, **fields: Any) -> dict[str, Any]:
    """The head of a results file: the benchmark, the machine and the code measured, ``fields``."""
    return {"benchmark": benchmark, "machine": machine_info(), "code": code_state(), **fields}


def save_results(path: Path, data: dict[str, Any], module: str, argv: Sequence[str] | None) -> None:
    """Record the command line (``python -m MODULE ARGS``) in ``data``, write it to ``path``."""
    data["command"] = " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])
    log(f"results in {write_results(path, data)}")


def write_results(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` (through a temporary file and a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def _layout_json(layout: Path, digest: str) -> dict[str, Any]:
    algo, hexd = digest.split(":", 1)
    obj: dict[str, Any] = json.loads((layout / "blobs" / algo / hexd).read_bytes())
    return obj


def source_manifest(layout: Path, tag: str = TAG) -> tuple[str, dict[str, Any]]:
    """The digest and parsed manifest of the image tagged ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_bytes())
    for desc in index.get("manifests", []):
        if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            digest = str(desc["digest"])
            return digest, _layout_json(layout, digest)
    raise SystemExit(f"{layout}: no image tagged {tag!r}")


def source_config(layout: Path, tag: str = TAG) -> dict[str, Any]:
    """The image config (``config`` member of the OCI config JSON) of a source layout."""
    _, manifest = source_manifest(layout, tag)
    cfg = _layout_json(layout, manifest["config"]["digest"])
    inner: dict[str, Any] = cfg.get("config") or {}
    return inner


def layer_paths(layout: Path, tag: str = TAG) -> list[Path]:
    _, manifest = source_manifest(layout, tag)
    out = []
    for layer in manifest["layers"]:
        algo, hexd = str(layer["digest"]).split(":", 1)
        out.append(layout / "blobs" / algo / hexd)
    return out


def warm_layers(layout: Path) -> int:
    """Read every layer blob once, so that builds read their input from the page cache."""
    total = 0
    for path in layer_paths(layout):
        with open(path, "rb") as f:
            while block := f.read(8 * MiB):
                total += len(block)
    return total


# --------------------------------------------------------------------------- variants


@functools.cache
def _layout(image: str) -> Path:
    return ensure_image(image)


def builds_dir() -> Path:
    return cache_dir() / "bench" / "builds"


def variant_dir(image: str, chunk_size: int, level: int) -> Path:
    return builds_dir() / f"{image}-{size_label(chunk_size)}-z{level}"


def _stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def build_subprocess(layout: Path, out: Path, chunk_size: int, level: int) -> dict[str, Any]:
    """Build one variant in a subprocess; its BuildResult figures, wall time and peak RSS."""
    argv = [
        sys.executable, "-m", "bench.build_bench", "worker",
        "--source", str(layout), "--out", str(out),
        "--chunk-size", str(chunk_size), "--level", str(level),
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    proc.stdout.close()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build of {out.name} failed with exit status {proc.returncode}")
    result: dict[str, Any] = json.loads(stdout)
    result["wall_seconds"] = round(wall, 3)
    result["cpu_user_seconds"] = round(usage.ru_utime, 3)
    result["cpu_system_seconds"] = round(usage.ru_stime, 3)
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    result["cpu_utilisation"] = round((usage.ru_utime + usage.ru_stime) / wall, 2)
    from turbofs.core.format import REVISION

    digest, _ = source_manifest(layout)
    stamp = {"source": str(layout), "source_manifest": digest, "chunk_size": chunk_size,
             "zstd_level": level, "format_revision": REVISION, "result": result}
    _stamp_path(out).write_text(json.dumps(stamp, indent=2) + "\n")
    return result


def ensure_variant(image: str, chunk_size: int, level: int, *, rebuild: bool = False) -> Path:
    """The turbo image of ``image`` built with this chunk size and level, built if missing.

    A kept build is reused when its stamp names the same source manifest and the index
    revision this code writes, and it opens.
    """
    from turbofs.core.format import REVISION
    from turbofs.core.image import open_layout_image

    layout = _layout(image)
    out = variant_dir(image, chunk_size, level)
    digest, _ = source_manifest(layout)
    if not rebuild:
        try:
            stamp = json.loads(_stamp_path(out).read_text())
            if (
                stamp.get("source_manifest") == digest
                and stamp.get("format_revision") == REVISION
                and stamp.get("chunk_size") == chunk_size
                and open_layout_image(out, TAG).index.chunk_size == chunk_size
            ):
                return out
        except Exception as exc:  # a missing or unreadable build is rebuilt
            log(f"{out.name}: not reusable ({type(exc).__name__}: {exc})")
    log(f"building {out.name}")
    build_subprocess(layout, out, chunk_size, level)
    return out


def worker(source: Path, out: Path, chunk_size: int, level: int) -> int:
    """Build in this process and print the BuildResult figures as JSON (used by the parent)."""
    from index_builder.builder import build

    cfg = BuildConfig(chunk_size=chunk_size, zstd_level=level)
    res = build(f"oci:{source}:{TAG}", out, cfg, force=True, progress=False)
    fields = {
        "chunk_size": chunk_size,
        "zstd_level": level,
        "workers": cfg.workers,
        "files": res.files,
        "directories": res.directories,
        "symlinks": res.symlinks,
        "file_bytes": res.file_bytes,
        "input_bytes": res.input_bytes,
        "chunks": res.chunks,
        "chunk_bytes": res.chunk_bytes,
        "padding_bytes": res.padding,
        "compressed_bytes": res.compressed_bytes,
        "compression_ratio": round(res.compression_ratio, 4),
        "blobs": res.blobs,
        "index_bytes": res.index_bytes,
        "seconds": round(res.seconds, 3),
        "mb_per_s": round(res.throughput, 1),
    }
    print(json.dumps(fields))
    return 0


# --------------------------------------------------------------------------- ceilings


def _rate(nbytes: int, fn: Callable[[], object]) -> float:
    """MB/s of ``fn`` over ``nbytes``, from CPU time of this thread (best of 2)."""
    best = float("inf")
    for _ in range(2):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return nbytes / 1e6 / best


def _inflate(data: bytes, decompressobj: Callable[[int], Any]) -> None:
    """Gunzip ``data`` in 1 MiB steps with a zlib-like module's decompressor (output discarded)."""
    d = decompressobj(31)
    pos = 0
    while pos < len(data):
        d.decompress(data[pos : pos + MiB], MiB * 8)
        while d.unconsumed_tail:
            d.decompress(d.unconsumed_tail, MiB * 8)
        pos += MiB


def ceilings(layout: Path) -> dict[str, Any]:
    """Single-core MB/s of each stage, on the start of the largest layer."""
    layer = max(layer_paths(layout), key=lambda p: p.stat().st_size)
    with open(layer, "rb") as f:
        d = isal_zlib.decompressobj(31)
        parts: list[bytes] = []
        got = 0
        gz_parts: list[bytes] = []
        while got < CEILING_SAMPLE:
            block = f.read(MiB)
            if not block:
                break
            gz_parts.append(block)
            piece = d.decompress(block)
            parts.append(piece)
            got += len(piece)
        inflated = b"".join(parts)
        raw = inflated[:CEILING_SAMPLE]
        gz = b"".join(gz_parts)
        del inflated
    # the tar stream holds headers too; a file-content-like sample is good enough here
    out: dict[str, Any] = {
        "sample_uncompressed_bytes": len(raw),
        "sample_gzip_bytes": len(gz),
        "note": "single-thread CPU MB/s of uncompressed bytes, best of 2",
        "gunzip_isal": round(_rate(got, lambda: _inflate(gz, isal_zlib.decompressobj)), 1),
        "gunzip_zlib": round(_rate(got, lambda: _inflate(gz, zlib.decompressobj)), 1),
        "sha256": round(_rate(len(raw), lambda: hashlib.sha256(raw).digest()), 1),
    }
    csize = DEFAULT_CHUNK_SIZE
    for level in LEVELS:
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)

        def compress(c: zstandard.ZstdCompressor = cctx) -> None:
            for i in range(0, len(raw), csize):
                c.compress(raw[i : i + csize])

        out[f"zstd{level}_{size_label(csize)}_chunks"] = round(_rate(len(raw), compress), 1)
    sample_tar = _tar_parse_rate(raw)
    if sample_tar is not None:
        out["tar_parse"] = sample_tar
    return out


def _tar_parse_rate(raw: bytes) -> float | None:
    """MB/s of walking a tar stream's headers and reading its members (stdlib tarfile)."""
    import io

    def walk() -> None:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tf:
            try:
                for m in tf:
                    if m.isreg():
                        fobj = tf.extractfile(m)
                        if fobj is not None:
                            while fobj.read(DEFAULT_CHUNK_SIZE):
                                pass
            except tarfile.ReadError:
                pass  # the sample ends mid-member

    try:
        return round(_rate(len(raw), walk), 1)
    except tarfile.TarError:
        return None


# --------------------------------------------------------------------------- main


def _summary(r: dict[str, Any]) -> str:
    return (
        f"{size_label(r['chunk_size']):>4} z{r['zstd_level']}: {r['mb_per_s']:6.1f} MB/s "
        f"({r['seconds']:.1f} s), {r['compressed_bytes'] / 1e6:7.1f} MB compressed "
        f"(x{r['compression_ratio']:.2f}), {r['chunks']} chunks, {r['blobs']} blobs, "
        f"index {r['index_bytes'] / 1e6:.2f} MB, RSS {r['peak_rss_mib']:.0f} MiB"
    )


def run(image: str, runs: int, sweep: bool, with_ceilings: bool) -> dict[str, Any]:
    layout = ensure_image(image)
    digest, _ = source_manifest(layout)
    defaults = BuildConfig()
    log(f"warming the page cache with the layer blobs of {layout}")
    warm_layers(layout)
    data: dict[str, Any] = {
        "benchmark": "build",
        "image": image,
        "source_layout": str(layout),
        "source_manifest": digest,
        "machine": machine_info(),
        "code": code_state(),
        "cache": "warm: layer blobs read once before the first build; no page cache drop",
        "defaults": {"chunk_size": defaults.chunk_size, "zstd_level": defaults.zstd_level,
                     "workers": defaults.workers},
    }
    default_out = variant_dir(image, defaults.chunk_size, defaults.zstd_level)
    default_runs = []
    for i in range(runs):
        r = build_subprocess(layout, default_out, defaults.chunk_size, defaults.zstd_level)
        log(f"default run {i + 1}/{runs}: {_summary(r)}")
        default_runs.append(r)
    if default_runs:
        median_run = sorted(default_runs, key=lambda r: r["mb_per_s"])[len(default_runs) // 2]
        data["default_runs"] = default_runs
        data["default_summary"] = {
            "runs": len(default_runs),
            "mb_per_s": median_min_max([r["mb_per_s"] for r in default_runs]),
            "seconds": median_min_max([r["seconds"] for r in default_runs]),
            "wall_seconds": median_min_max([r["wall_seconds"] for r in default_runs]),
            "peak_rss_mib": median_min_max([r["peak_rss_mib"] for r in default_runs]),
            "cpu_utilisation": median_min_max([r["cpu_utilisation"] for r in default_runs]),
            "input_bytes": median_run["input_bytes"],
            "compressed_bytes": median_run["compressed_bytes"],
            "compression_ratio": median_run["compression_ratio"],
        }
    if sweep:
        points = [(cs, SWEEP_LEVEL) for cs in CHUNK_SIZES]
        points += [(DEFAULT_CHUNK_SIZE, lv) for lv in LEVELS if lv != SWEEP_LEVEL]
        table = []
        for cs, lv in points:
            if default_runs and (cs, lv) == (defaults.chunk_size, defaults.zstd_level):
                r = dict(median_run)
                r["from"] = f"median of the {len(default_runs)} default runs"
            else:
                r = build_subprocess(layout, variant_dir(image, cs, lv), cs, lv)
                r["from"] = "one run"
            log(f"sweep: {_summary(r)}")
            table.append(r)
        data["sweep"] = table
    if with_ceilings:
        log("single-core ceilings of the build stages")
        data["ceilings"] = ceilings(layout)
        log(f"ceilings: {data['ceilings']}")
    data["total_seconds"] = round(time.monotonic() - _T_START, 1)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.build_bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="(internal) build once in this process, print JSON")
    w.add_argument("--source", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--chunk-size", type=int, required=True)
    w.add_argument("--level", type=int, required=True)
    parser.add_argument("--runs", type=int, default=3, help="builds with the defaults (default 3)")
    parser.add_argument("--image", default="python-1g", help="bench.images name (default python-1g)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the chunk size / level sweep")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the single-core ceilings")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "build.json")
    args = parser.parse_args(argv)
    if args.cmd == "worker":
        return worker(args.source, args.out, args.chunk_size, args.level)
    data = run(args.image, args.runs, not args.no_sweep, not args.no_ceilings)
    save_results(args.output, data, "bench.build_bench", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
