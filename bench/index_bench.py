"""Index benchmark: size, encode and load time, and lookup latency of turbofs indexes.

1. **A synthetic index of 100,000 files**, shaped like a large Python environment:
   about 10,000 directories under ``/opt/venv/lib/python3.11/site-packages`` (package
   directories with real-looking module names, each with its ``__pycache__``), ``.py``
   files and their ``.cpython-311.pyc`` twins, some ``.so``, ``.pyi`` and data files,
   ``*.dist-info`` directories, a few hundred symlinks and a few hundred files with
   xattrs. Sizes follow a log-normal law (median about 4 KiB, capped at two chunks), so
   every file has one or two chunk references; small files are packed into shared 256 KiB
   chunks at 4 KiB-aligned offsets, as the builder packs them. The generator is seeded:
   every run encodes the same index.
2. **The real index** of the ``python-1g`` image built with the defaults (the build is
   taken from :mod:`bench.build_bench`'s cache, or built).

For each: encoded size (and decompressed payload size), ``encode`` time (synthetic only,
median of 3), ``Index.from_bytes`` time (median, min and max of 20), and per-call latency
in microseconds (median and p99 of 20,000 individually timed calls; ``perf_counter_ns``
adds about 0.1 us) of ``resolve`` of the deepest file path, ``lookup`` in the largest
directory, ``inode`` (getattr), ``listdir`` of a typical directory and ``map_range`` of a
4 KiB read and of a whole two-chunk file.

Command line::

    python -m bench.index_bench [--files 100000] [--dirs 10000] [--image python-1g | --no-real]

Results go to ``bench/results/index.json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import random
import stat
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.build_bench import (
    RESULTS_DIR,
    TAG,
    code_state,
    ensure_variant,
    log,
    machine_info,
    median_min_max,
    save_results,
)
from turbofs.core.config import DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, KiB
from turbofs.core.format import ALIGN, HEADER_SIZE, Blob, Chunk, Index, InodeSpec, encode

LOAD_REPEATS: Final = 20
ENCODE_REPEATS: Final = 3
LATENCY_CALLS: Final = 20_000
SEED: Final = 20240611
BLOB_TARGET: Final = 4 << 20  # compressed bytes per synthetic blob
SITE_PACKAGES: Final = (b"opt", b"venv", b"lib", b"python3.11", b"site-packages")

# Names seen in real site-packages directories.
_PACKAGES: Final = (
    "torch", "numpy", "scipy", "pandas", "sklearn", "transformers", "tokenizers", "safetensors",
    "huggingface_hub", "PIL", "matplotlib", "sympy", "networkx", "jinja2", "markupsafe",
    "fsspec", "filelock", "requests", "urllib3", "certifi", "idna", "charset_normalizer",
    "yaml", "regex", "tqdm", "packaging", "setuptools", "pip", "wheel", "typing_extensions",
    "pydantic", "pydantic_core", "fastapi", "starlette", "uvicorn", "anyio", "sniffio", "h11",
    "httpx", "httpcore", "click", "rich", "pygments", "mpmath", "dateutil", "pytz", "tzdata",
    "six", "attr", "attrs", "jsonschema", "referencing", "rpds", "triton", "onnx", "onnxruntime",
    "accelerate", "datasets", "pyarrow", "multiprocess", "dill", "xxhash", "aiohttp", "yarl",
    "multidict", "frozenlist", "aiosignal", "psutil", "cv2", "skimage", "imageio", "tifffile",
    "lazy_loader", "threadpoolctl", "joblib", "numba", "llvmlite", "protobuf", "google",
    "grpc", "tensorboard", "absl", "werkzeug", "flask", "itsdangerous", "blinker", "sentencepiece",
    "einops", "timm", "torchvision", "torchaudio", "opt_einsum", "ml_dtypes", "jax", "jaxlib",
    "kiwisolver", "cycler", "fontTools", "pyparsing", "contourpy", "nvidia", "cuda", "cudnn",
)
_MODULES: Final = (
    "core", "utils", "_internal", "tests", "testing", "ops", "nn", "functional", "linalg",
    "io", "random", "fft", "special", "sparse", "stats", "optimize", "signal", "interpolate",
    "integrate", "ndimage", "spatial", "cluster", "distributions", "autograd", "jit", "onnx",
    "quantization", "backends", "cuda", "mps", "cpu", "distributed", "fx", "export", "compiler",
    "_dynamo", "_inductor", "_prims", "_refs", "_decomp", "_subclasses", "masked", "nested",
    "modules", "parallel", "utils_data", "dataloader", "sampler", "datapipes", "iter", "map",
    "models", "pipelines", "tokenization", "configuration", "generation", "integrations",
    "kernels", "templates", "codegen", "runtime", "serialization", "hub", "benchmark",
    "profiler", "package", "ao", "nn_intrinsic", "qat", "dynamic", "reference", "fused",
    "frame", "series", "groupby", "indexes", "arrays", "dtypes", "computation", "window",
    "reshape", "tools", "plotting", "formats", "parsers", "json", "excel", "sql", "clipboard",
    "api", "base", "common", "compat", "errors", "types", "typing", "helpers", "config",
    "extensions", "plugins", "schema", "validators", "converters", "handlers", "transforms",
    "layers", "losses", "metrics", "optim", "lr_scheduler", "init", "quantized", "cpp",
    "include", "lib", "share", "data", "fixtures", "resources", "locale", "static", "vendor",
)
_STEMS: Final = (
    "__init__", "_version", "version", "conftest", "setup", "main", "__main__", "base", "core",
    "utils", "helpers", "common", "compat", "exceptions", "errors", "types", "typing", "constants",
    "config", "registry", "factory", "module", "functional", "container", "linear", "conv",
    "pooling", "activation", "normalization", "dropout", "sparse", "rnn", "transformer", "loss",
    "init", "parameter", "graph", "node", "interpreter", "tracer", "proxy", "passes", "lowering",
    "codecache", "scheduler", "ir", "lowering_rules", "decompositions", "meta_registrations",
    "test_basic", "test_api", "test_io", "test_utils", "test_regression", "test_indexing",
    "test_reductions", "test_dtypes", "test_linalg", "test_random", "test_sparse", "test_stats",
    "frame", "series", "generic", "indexing", "ops", "array", "dtype", "cast", "missing",
    "algorithms", "sorting", "nanops", "accessor", "apply", "arraylike", "shared_docs",
    "printing", "format", "style", "writers", "readers", "parsers", "tokenizer", "decoder",
    "encoder", "processor", "pipeline", "trainer", "callbacks", "optimization", "modeling",
    "configuration_utils", "modeling_utils", "tokenization_utils", "file_utils", "hub",
)
_DATA_EXT: Final = (".json", ".txt", ".csv", ".pem", ".typed", ".h", ".cuh", ".npz", ".dat", ".tzif")


@dataclass
class Synthetic:
    inodes: list[InodeSpec]
    chunks: list[Chunk]
    blobs: list[Blob]
    prefetch: list[int]
    files: int
    directories: int
    symlinks: int
    with_xattrs: int
    file_bytes: int
    two_ref_files: int
    deepest_file: bytes
    largest_dir: bytes
    largest_dir_entries: int
    typical_dir: bytes
    two_chunk_file: bytes
    small_file: bytes
    stats: dict[str, Any] = field(default_factory=dict)


class _Tree:
    """A directory tree being generated: directories as name -> child maps."""

    def __init__(self) -> None:
        self.dirs: dict[tuple[bytes, ...], dict[bytes, tuple[str, int]]] = {(): {}}
        self.files: dict[tuple[bytes, ...], int] = {}  # path -> size
        self.links: dict[tuple[bytes, ...], bytes] = {}
        self.xattrs: dict[tuple[bytes, ...], tuple[tuple[bytes, bytes], ...]] = {}

    def mkdir(self, path: tuple[bytes, ...]) -> bool:
        if path in self.dirs:
            return False
        parent = path[:-1]
        if parent not in self.dirs:
            self.mkdir(parent)
        if path[-1] in self.dirs[parent]:
            return False
        self.dirs[parent][path[-1]] = ("d", 0)
        self.dirs[path] = {}
        return True

    def add_file(self, path: tuple[bytes, ...], size: int) -> bool:
        entries = self.dirs[path[:-1]]
        if path[-1] in entries:
            return False
        entries[path[-1]] = ("f", size)
        self.files[path] = size
        return True

    def add_link(self, path: tuple[bytes, ...], target: bytes) -> bool:
        entries = self.dirs[path[:-1]]
        if path[-1] in entries:
            return False
        entries[path[-1]] = ("l", 0)
        self.links[path] = target
        return True


def _size(rng: random.Random, chunk_size: int, ext: str) -> int:
    median = {".so": 96 * KiB, ".pyc": 3 * KiB, ".py": 4 * KiB}.get(ext, 2 * KiB)
    size = int(math.exp(rng.gauss(math.log(median), 1.2)))
    return max(1, min(size, 2 * chunk_size))


def synthesize(n_files: int, n_dirs: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Synthetic:
    """A seeded, realistic tree of ``n_files`` regular files in about ``n_dirs`` directories."""
    rng = random.Random(SEED)
    tree = _Tree()
    tree.mkdir(SITE_PACKAGES)
    for extra in ((b"usr", b"bin"), (b"usr", b"lib", b"x86_64-linux-gnu"), (b"etc",), (b"app",)):
        tree.mkdir(extra)
    # package directories: half of the directory budget; each gets a __pycache__
    source_dirs: list[tuple[bytes, ...]] = []
    for name in _PACKAGES:
        pkg = (*SITE_PACKAGES, name.encode())
        tree.mkdir(pkg)
        source_dirs.append(pkg)
        version = f"{rng.randint(0, 3)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
        info = (*SITE_PACKAGES, f"{name}-{version}.dist-info".encode())
        tree.mkdir(info)
        for meta in ("METADATA", "RECORD", "WHEEL", "INSTALLER", "top_level.txt", "LICENSE"):
            tree.add_file((*info, meta.encode()), _size(rng, chunk_size, ".txt"))
    while len(tree.dirs) + len(source_dirs) < n_dirs:
        # prefer deepening recent directories a little, as real packages nest 3-8 deep
        parent = source_dirs[-rng.randint(1, min(len(source_dirs), 40))] if rng.random() < 0.6 else rng.choice(source_dirs)
        if len(parent) > len(SITE_PACKAGES) + 9:
            continue
        child = (*parent, rng.choice(_MODULES).encode())
        if tree.mkdir(child):
            source_dirs.append(child)
    for d in source_dirs:
        tree.mkdir((*d, b"__pycache__"))
    # files: .py + .pyc pairs, some extension modules, stubs and data
    budget = n_files - len(tree.files)
    weights = [rng.paretovariate(1.3) for _ in source_dirs]
    total_w = sum(weights)
    for d, w in zip(source_dirs, weights, strict=True):
        if len(tree.files) >= n_files:
            break
        want = max(1, round(w / total_w * budget))
        tree.add_file((*d, b"__init__.py"), _size(rng, chunk_size, ".py"))
        tree.add_file((*d, b"__pycache__", b"__init__.cpython-311.pyc"), _size(rng, chunk_size, ".pyc"))
        for _ in range(want // 2):
            stem = rng.choice(_STEMS)
            if rng.random() < 0.3:
                stem = f"{stem}_{rng.choice(_MODULES)}"
            kind = rng.random()
            if kind < 0.04:
                name = f"{stem}.cpython-311-x86_64-linux-gnu.so"
                tree.add_file((*d, name.encode()), _size(rng, chunk_size, ".so"))
                continue
            if kind < 0.10:
                ext = rng.choice(_DATA_EXT) if kind < 0.08 else ".pyi"
                tree.add_file((*d, (stem + ext).encode()), _size(rng, chunk_size, ext))
                continue
            if tree.add_file((*d, f"{stem}.py".encode()), _size(rng, chunk_size, ".py")):
                tree.add_file((*d, b"__pycache__", f"{stem}.cpython-311.pyc".encode()), _size(rng, chunk_size, ".pyc"))
    # top up or trim to exactly n_files
    i = 0
    while len(tree.files) < n_files:
        d = source_dirs[i % len(source_dirs)]
        tree.add_file((*d, f"{rng.choice(_STEMS)}_{i}.py".encode()), _size(rng, chunk_size, ".py"))
        i += 1
    while len(tree.files) > n_files:
        path = next(reversed(tree.files))
        del tree.files[path]
        del tree.dirs[path[:-1]][path[-1]]
    # symlinks (shared-library versions, bin entry points) and xattrs
    libdir = (b"usr", b"lib", b"x86_64-linux-gnu")
    for j in range(300):
        tree.add_link((*libdir, f"libexample{j}.so.1".encode()), f"libexample{j}.so.1.{j % 7}.0".encode())
    for j in range(200):
        tree.add_link((b"usr", b"bin", f"tool{j}".encode()), f"../../opt/venv/bin/tool{j}".encode())
    file_paths = list(tree.files)
    for path in rng.sample(file_paths, 400):
        tree.xattrs[path] = ((b"security.selinux", b"system_u:object_r:lib_t:s0\0"),)
    for path in rng.sample(file_paths, 40):
        tree.xattrs[path] = ((b"security.capability", bytes(20)), (b"user.pax.flags", b"em"))

    # inode numbers in depth-first name order, as the builder assigns them
    order: list[tuple[bytes, ...]] = []
    stack: list[tuple[bytes, ...]] = [()]
    while stack:
        d = stack.pop()
        order.append(d)
        kids = sorted((entry_name, entry[0]) for entry_name, entry in tree.dirs[d].items())
        order.extend((*d, entry_name) for entry_name, etype in kids if etype != "d")
        stack.extend((*d, entry_name) for entry_name, etype in reversed(kids) if etype == "d")
    ino_of = {path: i for i, path in enumerate(order)}

    # chunks: small files packed in path order at 4 KiB alignment, large files cut in pieces
    chunks: list[Chunk] = []
    refs: dict[tuple[bytes, ...], tuple[tuple[int, int], ...]] = {}
    pack_fill = 0
    blob_fill = 0
    blob_sizes: list[int] = [0]

    def new_chunk(ulen: int) -> int:
        nonlocal blob_fill
        clen = max(64, ulen // 3)
        if blob_fill + clen > BLOB_TARGET and blob_fill:
            blob_sizes.append(0)
            blob_fill = 0
        cid = len(chunks)
        chunks.append(Chunk(cid, rng.randbytes(32), len(blob_sizes) - 1, blob_fill, clen, ulen))
        blob_fill += clen
        blob_sizes[-1] += clen
        return cid

    pending_pack: list[tuple[tuple[bytes, ...], int, int]] = []  # path, offset, size

    def close_pack() -> None:
        nonlocal pack_fill
        if pending_pack:
            cid = new_chunk(pack_fill)
            for path, off, _sz in pending_pack:
                refs[path] = ((cid, off),)
            pending_pack.clear()
        pack_fill = 0

    two_ref = 0
    for path in order:
        size = tree.files.get(path)
        if size is None:
            continue
        if size >= chunk_size:
            pieces = []
            for start in range(0, size, chunk_size):
                pieces.append((new_chunk(min(chunk_size, size - start)), 0))
            refs[path] = tuple(pieces)
            two_ref += len(pieces) == 2
            continue
        off = -(-pack_fill // ALIGN) * ALIGN
        if off + size > chunk_size:
            close_pack()
            off = 0
        pending_pack.append((path, off, size))
        pack_fill = off + size
    close_pack()
    blobs = [Blob(hashlib.sha256(b"blob%d" % i).digest(), sz) for i, sz in enumerate(blob_sizes)]

    specs: list[InodeSpec] = []
    base_mtime = 1_718_000_000 * 1_000_000_000
    for path in order:
        mtime = base_mtime + rng.randint(0, 10**15)
        if path in tree.dirs:
            children = tuple((name, ino_of[(*path, name)]) for name in tree.dirs[path])
            specs.append(InodeSpec(mode=stat.S_IFDIR | 0o755, mtime_ns=mtime, children=children))
        elif path in tree.links:
            specs.append(InodeSpec(mode=stat.S_IFLNK | 0o777, mtime_ns=mtime, target=tree.links[path]))
        else:
            so = path[-1].endswith(b".so")
            specs.append(
                InodeSpec(
                    mode=stat.S_IFREG | (0o755 if so else 0o644), mtime_ns=mtime,
                    size=tree.files[path], refs=refs[path], xattrs=tree.xattrs.get(path, ()),
                )
            )
    file_list = [p for p in order if p in tree.files]
    deepest = max(file_list, key=lambda p: (len(p), p))
    largest = max(tree.dirs, key=lambda d: len(tree.dirs[d]))
    sizes = sorted(len(v) for v in tree.dirs.values())
    median_entries = sizes[len(sizes) // 2]
    typical = next(d for d in tree.dirs if len(tree.dirs[d]) == median_entries)
    two_chunk = next(p for p in file_list if len(refs[p]) == 2)
    small = next(p for p in file_list if tree.files[p] < 8 * KiB and len(p) > 6)
    # prefetch: chunks of the files under torch first, as a startup recording would list them
    hot = sorted({cid for p in file_list if b"torch" in p[:7] for cid, _ in refs[p]})
    hot_set = set(hot)
    prefetch = hot + [c.id for c in chunks if c.id not in hot_set]
    return Synthetic(
        inodes=specs, chunks=chunks, blobs=blobs, prefetch=prefetch,
        files=len(tree.files), directories=len(tree.dirs) - 1, symlinks=len(tree.links),
        with_xattrs=len(tree.xattrs), file_bytes=sum(tree.files.values()), two_ref_files=two_ref,
        deepest_file=b"/".join(deepest), largest_dir=b"/".join(largest),
        largest_dir_entries=len(tree.dirs[largest]), typical_dir=b"/".join(typical),
        two_chunk_file=b"/".join(two_chunk), small_file=b"/".join(small),
        stats={"median_dir_entries": median_entries, "max_depth": max(len(p) for p in file_list)},
    )


# --------------------------------------------------------------------------- timing


def _latency_us(fn: Callable[[], object], calls: int = LATENCY_CALLS) -> dict[str, float]:
    """Median and p99 of individually timed calls, in microseconds."""
    for _ in range(min(calls, 1000)):
        fn()  # warm up
    samples = []
    clock = time.perf_counter_ns
    gc.collect()
    for _ in range(calls):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    samples.sort()
    return {
        "median_us": round(samples[len(samples) // 2] / 1000, 2),
        "p99_us": round(samples[int(len(samples) * 0.99)] / 1000, 2),
        "calls": calls,
    }


def _seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {k: round(v * 1000, 2) for k, v in median_min_max(values).items()}


def measure_index(blob: bytes, *, deep: bytes, big_dir: bytes, big_name: bytes, typical_dir: bytes,
                  small_file: bytes, two_chunk_file: bytes | None) -> dict[str, Any]:
    """Load time and per-call latencies of one encoded index."""
    plen = int.from_bytes(blob[16:24], "little")  # header: magic(8) version(2) flags(2) hsize(4) plen(8)
    loads = _seconds(lambda: Index.from_bytes(blob), LOAD_REPEATS)
    idx = Index.from_bytes(blob)
    deep_ino = idx.resolve(deep)
    big_ino = idx.resolve(big_dir)
    typical_ino = idx.resolve(typical_dir)
    small_ino = idx.resolve(small_file)
    out: dict[str, Any] = {
        "encoded_bytes": len(blob),
        "payload_bytes": plen,
        "header_bytes": HEADER_SIZE,
        "inodes": idx.n_inodes,
        "dirents": idx.n_dirents,
        "chunk_refs": idx.n_refs,
        "chunks": idx.n_chunks,
        "blobs": idx.n_blobs,
        "load_ms": _ms(loads),
        "load_repeats": LOAD_REPEATS,
        "paths": {
            "deep_file": "/" + deep.decode(errors="backslashreplace"),
            "deep_file_depth": deep.count(b"/") + 1,
            "largest_dir": "/" + big_dir.decode(errors="backslashreplace"),
            "largest_dir_entries": len(idx.listdir(big_ino)),
            "typical_dir": "/" + typical_dir.decode(errors="backslashreplace"),
            "typical_dir_entries": len(idx.listdir(typical_ino)),
            "small_file": "/" + small_file.decode(errors="backslashreplace"),
        },
        "latency": {
            "resolve_deep_path": _latency_us(lambda: idx.resolve(deep)),
            "lookup_in_largest_dir": _latency_us(lambda: idx.lookup(big_ino, big_name)),
            "inode_getattr": _latency_us(lambda: idx.inode(deep_ino)),
            "listdir_typical_dir": _latency_us(lambda: idx.listdir(typical_ino)),
            "map_range_4k": _latency_us(lambda: idx.map_range(small_ino, 0, 4096)),
        },
    }
    if two_chunk_file is not None:
        two_ino = idx.resolve(two_chunk_file)
        size = idx.inode(two_ino).size
        out["paths"]["two_chunk_file"] = "/" + two_chunk_file.decode(errors="backslashreplace")
        out["latency"]["map_range_two_chunk_file"] = _latency_us(lambda: idx.map_range(two_ino, 0, size))
    t0 = time.perf_counter()
    n = sum(1 for _ in idx.walk())
    out["walk_all_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    out["walk_entries"] = n
    return out


def bench_synthetic(n_files: int, n_dirs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    syn = synthesize(n_files, n_dirs)
    gen_s = time.perf_counter() - t0
    log(f"synthesized {syn.files} files, {syn.directories} directories in {gen_s:.1f} s")
    blob = b""

    def do_encode() -> None:
        nonlocal blob
        blob = encode(chunk_size=DEFAULT_CHUNK_SIZE, inodes=syn.inodes, chunks=syn.chunks,
                      blobs=syn.blobs, prefetch=syn.prefetch)

    enc = _seconds(do_encode, ENCODE_REPEATS)
    log(f"encoded: {len(blob) / 1e6:.2f} MB in {statistics.median(enc):.2f} s")
    big_idx = Index.from_bytes(blob)
    big_entries = big_idx.listdir(big_idx.resolve(syn.largest_dir))
    big_name = big_entries[len(big_entries) * 2 // 3][0]
    res = measure_index(blob, deep=syn.deepest_file, big_dir=syn.largest_dir, big_name=big_name,
                        typical_dir=syn.typical_dir, small_file=syn.small_file,
                        two_chunk_file=syn.two_chunk_file)
    res["shape"] = {
        "files": syn.files, "directories": syn.directories, "symlinks": syn.symlinks,
        "files_with_xattrs": syn.with_xattrs, "file_bytes": syn.file_bytes,
        "files_with_two_chunk_refs": syn.two_ref_files, "chunk_size": DEFAULT_CHUNK_SIZE,
        "seed": SEED, **syn.stats,
    }
    res["generate_seconds"] = round(gen_s, 2)
    res["encode_ms"] = _ms(enc)
    res["encode_repeats"] = ENCODE_REPEATS
    Index.from_bytes(blob).verify()
    return res


def bench_real(image: str) -> dict[str, Any]:
    from turbofs.core.image import open_layout_image

    out = ensure_variant(image, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL)
    img = open_layout_image(out, TAG)
    blob = img.blob_path(img.manifest.index.digest).read_bytes()
    idx = img.index
    files = [(p, ino) for p, ino in idx.walk() if idx.inode(ino).is_reg]
    deep = max(files, key=lambda f: (f[0].count(b"/"), f[0]))[0]
    dirs = [(p, ino) for p, ino in idx.walk() if idx.inode(ino).is_dir]
    big_dir, big_ino = max(dirs, key=lambda d: len(idx.listdir(d[1])))
    entries = idx.listdir(big_ino)
    counts = sorted((len(idx.listdir(ino)), p) for p, ino in dirs)
    typical = counts[len(counts) // 2][1]
    small = next(p for p, ino in files if 0 < idx.inode(ino).size < 8 * KiB and p.endswith(b".py"))
    two = next((p for p, ino in files if len(idx.file_refs(ino)) == 2), None)
    res = measure_index(blob, deep=deep, big_dir=big_dir, big_name=entries[len(entries) * 2 // 3][0],
                        typical_dir=typical, small_file=small, two_chunk_file=two)
    res["image"] = image
    res["layout"] = str(out)
    res["files"] = len(files)
    res["directories"] = len(dirs)
    opens = _seconds(lambda: open_layout_image(out, TAG), LOAD_REPEATS)
    res["open_layout_image_ms"] = _ms(opens)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dirs", type=int, default=10_000)
    parser.add_argument("--image", default="python-1g", help="real image whose index to load too")
    parser.add_argument("--no-real", action="store_true", help="skip the real image's index")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "index.json")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    data: dict[str, Any] = {
        "benchmark": "index",
        "machine": machine_info(),
        "code": code_state(),
        "synthetic": bench_synthetic(args.files, args.dirs),
    }
    s = data["synthetic"]
    log(f"synthetic: load {s['load_ms']} ms, resolve {s['latency']['resolve_deep_path']} us")
    if not args.no_real:
        data["real"] = bench_real(args.image)
        r = data["real"]
        log(f"real {args.image}: {r['encoded_bytes'] / 1e6:.2f} MB, load {r['load_ms']} ms")
    data["total_seconds"] = round(time.monotonic() - t0, 1)
    save_results(args.output, data, "bench.index_bench", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
