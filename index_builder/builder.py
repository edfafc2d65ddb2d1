"""``turbofs build``: convert a container image into a turbo image (an OCI image layout).

The steps, each in its own module::

    sources.open_source     the input image: config + layer blobs
    core.layers.LayerStream one layer as verified, decompressed tar bytes
    read_layer (here)       tar entries (core.tar, core.fstree) -> tree operations;
                            file data -> chunker
    tree.Tree               the layers flattened with the OCI whiteout rules
    chunker.ChunkStore      digest-addressed zstd chunks, small files packed, blobs
    format.encode           the index blob
    (here)                  manifest, config, index.json; written to a temporary
                            directory that is renamed into place only when complete
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from index_builder.chunker import ChunkStore, Digest, LargeData, SmallData
from index_builder.sources import LayerRef, SourceImage, open_source, synthetic_diff_id
from index_builder.tree import Node, Op, Tree, child, link_target
from turbofs.core import format as fmt
from turbofs.core import oci
from turbofs.core.config import DEFAULT_PATH_MAX, BuildConfig
from turbofs.core.errors import LimitExceeded, SourceError, UnsafeEntry
from turbofs.core.fstree import classify, keep_xattr, pax_xattrs, resolve, show, split_path
from turbofs.core.layers import LayerStream
from turbofs.core.tar import TarEntry, TarError, TarReader
from turbofs.core.trace import StartupTrace

log = logging.getLogger("turbofs.build")


@dataclass
class BuildResult:
    output: Path
    tag: str
    manifest_digest: str
    index_digest: str
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    other: int = 0
    file_bytes: int = 0  # content of the final tree (hardlinks once)
    input_bytes: int = 0  # uncompressed layer bytes read
    chunks: int = 0
    chunk_bytes: int = 0  # unique uncompressed chunk bytes
    compressed_bytes: int = 0
    blobs: int = 0
    index_bytes: int = 0
    seconds: float = 0.0
    layers: int = 0
    startup_chunks: int = 0  # chunks of the recorded startup trace found in the image
    extra: dict[str, Any] = field(default_factory=dict)

    padding: int = 0  # alignment zeros inside packed chunks

    @property
    def dedup_ratio(self) -> float:
        """File bytes over the file data that the chunks store (alignment not counted)."""
        stored = self.chunk_bytes - self.padding
        return self.file_bytes / stored if stored > 0 else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.chunk_bytes / self.compressed_bytes if self.compressed_bytes else 1.0

    @property
    def throughput(self) -> float:
        """MB/s of uncompressed input."""
        return self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        mb = 1e6
        return "\n".join(
            [
                f"turbo image   {self.output}:{self.tag}",
                f"manifest      {self.manifest_digest}",
                f"index         {self.index_digest} ({self.index_bytes / mb:.2f} MB)",
                f"entries       {self.files} files, {self.directories} directories, "
                f"{self.symlinks} symlinks, {self.other} other ({self.layers} layers)",
                f"content       {self.file_bytes / mb:.1f} MB in files, {self.input_bytes / mb:.1f} MB of layer tar read",
                f"chunks        {self.chunks} unique, {self.chunk_bytes / mb:.1f} MB -> "
                f"{self.compressed_bytes / mb:.1f} MB compressed in {self.blobs} blobs",
                f"ratios        dedup x{self.dedup_ratio:.2f}, compression x{self.compression_ratio:.2f}",
                f"time          {self.seconds:.2f} s, {self.throughput:.0f} MB/s",
            ]
            + ([f"startup       {self.startup_chunks} chunks of the recorded start go first"]
               if self.startup_chunks else [])
        )


# -- layer entries -----------------------------------------------------------------------

def _entry_op(e: TarEntry, tar: TarReader, store: ChunkStore, what_layer: str) -> Op | None:
    parts = split_path(e.name, what_layer, DEFAULT_PATH_MAX)
    special = classify(parts)
    if special == "meta":
        return None
    if special is not None:
        return Op(special, parts)  # the marker's own type and content do not matter
    what = f"{what_layer}: {show(e.name)}"
    common: dict[str, Any] = {
        "mode": e.mode, "uid": e.uid, "gid": e.gid, "mtime_ns": e.mtime_ns, "xattrs": pax_xattrs(e.pax, what),
    }
    if e.type == "file":
        data = store.add_file(tar.read, e.size, what)
        return Op("file", parts, size=e.size, data=data, **common)
    if e.type == "hardlink":
        target = split_path(e.linkname, f"{what} (hardlink target)", DEFAULT_PATH_MAX)
        if not target:
            raise UnsafeEntry(f"{what}: hardlink to the root directory")
        return Op("hardlink", parts, target=b"/".join(target))
    if e.type == "symlink":
        return Op("symlink", parts, target=e.linkname, **common)
    if e.type in ("char", "block"):
        return Op(e.type, parts, rdev=(e.devmajor, e.devminor), **common)
    return Op(e.type, parts, **common)  # dir, fifo


class _Budget:
    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.entries = 0
        self.bytes = 0


def read_layer(
    ref: LayerRef,
    store: ChunkStore,
    budget: _Budget,
    on_read: Callable[[int], object] | None = None,
) -> list[Op]:
    """Stream one layer: its entries as operations, its file data into the chunk store."""
    cfg = budget.cfg
    name = ref.name
    what_layer = f"layer {name}"
    remaining = cfg.max_image_size - budget.bytes
    if remaining <= 0:
        raise LimitExceeded(f"image is larger than the limit of {cfg.max_image_size} bytes")
    f = ref.open()
    stream = LayerStream(
        f,
        name=name,
        compression=ref.compression,
        digest=ref.digest,
        size=ref.size,
        diff_id=ref.diff_id,
        max_size=min(cfg.max_layer_size, remaining),
        on_read=on_read,
    )
    ops: list[Op] = []
    try:
        tar = TarReader(stream.next_piece)
        try:
            for entry in tar:
                budget.entries += 1
                if budget.entries > cfg.max_entries:
                    raise LimitExceeded(f"{what_layer}: more than {cfg.max_entries} entries in the image")
                op = _entry_op(entry, tar, store, what_layer)
                if op is not None:
                    ops.append(op)
        except TarError as exc:
            raise SourceError(f"{what_layer}: not a valid tar archive ({exc})") from None
        stream.close_and_verify()
        budget.bytes += stream.uncompressed_size
    finally:
        stream.abort()
        f.close()
    return ops


# -- root directories ----------------------------------------------------------------------


def _read_rootfs(root: Path, tree: Tree, store: ChunkStore, budget: _Budget) -> None:
    seen: dict[tuple[int, int], bytes] = {}
    st = os.lstat(root)
    tree.apply(Op("dir", (), mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                  xattrs=_fs_xattrs(root)), str(root))
    stack: list[tuple[Path, tuple[bytes, ...]]] = [(root, ())]
    while stack:
        dpath, dparts = stack.pop()
        with os.scandir(dpath) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in entries:
            budget.entries += 1
            if budget.entries > budget.cfg.max_entries:
                raise LimitExceeded(f"{root}: more than {budget.cfg.max_entries} entries")
            path = Path(entry.path)
            parts = (*dparts, os.fsencode(entry.name))
            what = f"{root}: {show(parts)}"
            st = entry.stat(follow_symlinks=False)
            common: dict[str, Any] = {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid,
                                      "mtime_ns": st.st_mtime_ns, "xattrs": _fs_xattrs(path)}
            mode = st.st_mode
            if not stat.S_ISDIR(mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    tree.apply(Op("hardlink", parts, target=seen[key]), what)
                    continue
                seen[key] = b"/".join(parts)
            if stat.S_ISDIR(mode):
                tree.apply(Op("dir", parts, **common), what)
                stack.append((path, parts))
            elif stat.S_ISREG(mode):
                budget.bytes += st.st_size
                if budget.bytes > budget.cfg.max_image_size:
                    raise LimitExceeded(f"{root}: more than {budget.cfg.max_image_size} bytes")
                with open(path, "rb") as fh:
                    data = store.add_file(fh.read, st.st_size, what)
                tree.apply(Op("file", parts, size=st.st_size, data=data, **common), what)
            elif stat.S_ISLNK(mode):
                tree.apply(Op("symlink", parts, target=os.fsencode(os.readlink(path)), **common), what)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = "char" if stat.S_ISCHR(mode) else "block"
                tree.apply(Op(kind, parts, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **common), what)
            elif stat.S_ISFIFO(mode):
                tree.apply(Op("fifo", parts, **common), what)
            else:
                print(f"turbofs: warning: {what}: sockets cannot be stored; skipped", file=sys.stderr)


def _fs_xattrs(path: Path) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    for name in names:
        if not keep_xattr(os.fsencode(name)):
            continue
        try:
            out.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(sorted(out))


# -- assembling the index ------------------------------------------------------------------

_HOT_SUFFIXES = (b".so", b".py", b".pyc", b".pth", b".json", b".cfg", b".conf", b".ini")


def _is_hot(path: tuple[bytes, ...], node: Node) -> bool:
    """Files a process start is likely to read: executables, libraries, Python sources."""
    name = path[-1] if path else b""
    return bool(node.mode & 0o111) or name.endswith(_HOT_SUFFIXES) or b".so." in name


def _resolve(fut: Future[Digest]) -> Digest:
    return fut.result()


def _startup_digests(
    trace: StartupTrace, tree: Tree, file_refs: dict[int, list[tuple[Digest, int]]], present: set[bytes]
) -> list[bytes]:
    """The chunk digests of ``trace`` that this image has, in trace order, each once: the
    trace's chunks, then the chunks of its paths (symlinks followed inside the image)."""
    out: dict[bytes, None] = {}
    for d in trace.chunks:
        if d in present:
            out[d] = None
    for raw in trace.paths:
        try:
            found = resolve(tree.root, raw.split(b"/"), child, link_target, f"startup trace: {show(raw)}")
        except UnsafeEntry:  # a symlink loop
            found = None
        if found is None or not stat.S_ISREG(found[1].mode):
            log.warning("startup trace: %s is not a regular file of the image; skipped", show(raw))
            continue
        for digest, _off in file_refs.get(id(found[1]), ()):
            if digest is not None:
                out[digest] = None
    return list(out)


def _assemble(
    tree: Tree, store: ChunkStore, cfg: BuildConfig, writer: oci.LayoutWriter, result: BuildResult,
    startup_trace: StartupTrace | None = None,
) -> bytes:
    # inode numbers in depth-first name order; hardlinked names share one
    order: list[Node] = []
    ino_of: dict[int, int] = {}
    paths: dict[int, tuple[bytes, ...]] = {}
    for path, node in tree.walk():
        if id(node) not in ino_of:
            ino_of[id(node)] = len(order)
            order.append(node)
            paths[id(node)] = path
    small = [n.data for n in order if isinstance(n.data, SmallData)]
    packed = store.pack_small(small)
    # file refs as (digest, offset) pieces
    file_refs: dict[int, list[tuple[Digest, int]]] = {}
    for node in order:
        if isinstance(node.data, LargeData):
            file_refs[id(node)] = [(_resolve(f), 0) for f in node.data.pieces]
        elif isinstance(node.data, SmallData):
            fut, off = packed[id(node.data)]
            file_refs[id(node)] = [(_resolve(fut), off)]
    # chunks in the order files first use them
    layout: list[bytes] = []
    seen: set[bytes] = set()
    hot: set[bytes] = set()
    for node in order:
        for digest, _off in file_refs.get(id(node), ()):
            if digest is not None and digest not in seen:
                seen.add(digest)
                layout.append(digest)
            if digest is not None and (isinstance(node.data, SmallData) or _is_hot(paths[id(node)], node)):
                hot.add(digest)
    # a recorded startup: its chunks go first, in first-use order, both in the blobs (so
    # fetching them is a few long ranges) and in the prefetch order
    startup = _startup_digests(startup_trace, tree, file_refs, seen) if startup_trace is not None else []
    if startup:
        first = set(startup)
        layout = startup + [d for d in layout if d not in first]
        result.startup_chunks = len(startup)
    chunks, blobs = store.write_blobs(layout, writer)
    chunk_id = {c.digest: c.id for c in chunks}
    # prefetch: the recorded startup, then chunks of small files and likely-hot files, then
    # the rest, in layout order
    n_first = len(startup)
    prefetch = (
        [chunk_id[d] for d in layout[:n_first]]
        + [chunk_id[d] for d in layout[n_first:] if d in hot]
        + [chunk_id[d] for d in layout[n_first:] if d not in hot]
    )
    specs: list[fmt.InodeSpec] = []
    for node in order:
        fmt_bits = stat.S_IFMT(node.mode)
        children: tuple[tuple[bytes, int], ...] = ()
        if node.children is not None:
            children = tuple((name, ino_of[id(child)]) for name, child in node.children.items())
            result.directories += 1
        elif fmt_bits == stat.S_IFREG:
            result.files += 1
            result.file_bytes += node.size
        elif fmt_bits == stat.S_IFLNK:
            result.symlinks += 1
        else:
            result.other += 1
        refs = tuple(
            (fmt.HOLE if d is None else chunk_id[d], off) for d, off in file_refs.get(id(node), ())
        )
        specs.append(
            fmt.InodeSpec(
                mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns,
                size=node.size if fmt_bits == stat.S_IFREG else 0, rdev=node.rdev,
                target=node.target, xattrs=node.xattrs, refs=refs, children=children,
            )
        )
    result.directories -= 1  # the root
    result.chunks = len(chunks)
    result.blobs = len(blobs)
    result.chunk_bytes = sum(c.ulen for c in chunks)
    result.compressed_bytes = sum(c.clen for c in chunks)
    result.padding = store.padding
    index_blob = fmt.encode(
        chunk_size=cfg.chunk_size, inodes=specs, chunks=chunks, blobs=blobs, prefetch=prefetch,
        startup=[chunk_id[d] for d in startup],
    )
    result.extra["blob_descriptors"] = [
        oci.Descriptor(oci.TURBO_CHUNKS, b.oci_digest, b.size) for b in blobs
    ]
    return index_blob


# -- the build ---------------------------------------------------------------------------


def _rootfs_config(index_blob: bytes) -> bytes:
    osname, arch, variant = oci.host_platform()
    cfg: dict[str, Any] = {
        "architecture": arch,
        "os": osname,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [synthetic_diff_id(index_blob)]},
    }
    if variant:
        cfg["variant"] = variant
    return oci.canonical_json(cfg)


def build(
    source: str | SourceImage,
    output: Path,
    cfg: BuildConfig | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
    startup_trace: StartupTrace | None = None,
) -> BuildResult:
    """Convert ``source`` into a turbo image at ``output`` (an OCI image layout).

    ``startup_trace``: a recorded start (:mod:`turbofs.core.trace`) whose chunks go first in the
    blobs and in the index's prefetch order, and into its startup section.

    Nothing appears at ``output`` unless the whole image was written and verified.
    """
    cfg = (cfg or BuildConfig()).validate()
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not force:
        raise SourceError(f"{output} already exists (use --force to replace it)")
    start = time.monotonic()
    src = open_source(source, cfg) if isinstance(source, str) else source
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    store: ChunkStore | None = None
    bar: tqdm[Any] | None = None
    try:
        writer = oci.LayoutWriter(tmp)
        store = ChunkStore(tmp / ".work", cfg)
        tree = Tree()
        budget = _Budget(cfg)
        show_bar = sys.stderr.isatty() if progress is None else progress
        total = sum(layer.size or 0 for layer in src.layers) or None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="layers", disable=not show_bar, file=sys.stderr)
        if src.rootfs is not None:
            _read_rootfs(src.rootfs, tree, store, budget)
        for layer in src.layers:
            ops = read_layer(layer, store, budget, bar.update if show_bar else None)
            tree.apply_layer(ops, layer.name)
        bar.close()
        result = BuildResult(output, cfg.tag, "", "", layers=max(1, len(src.layers)))
        result.input_bytes = budget.bytes
        index_blob = _assemble(tree, store, cfg, writer, result, startup_trace)
        index_digest = writer.add_blob(index_blob)
        config = src.config if src.rootfs is None else _rootfs_config(index_blob)
        config_digest = writer.add_blob(config)
        annotations = {
            oci.ANN_TURBO_VERSION: str(fmt.VERSION),
            oci.ANN_TURBO_INDEX: index_digest,
            oci.ANN_TURBO_CHUNK_SIZE: str(cfg.chunk_size),
        }
        if src.manifest_digest:
            annotations[oci.ANN_TURBO_SOURCE] = src.manifest_digest
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": oci.TURBO_INDEX, "digest": index_digest, "size": len(index_blob)}]
            + [d.to_json() for d in result.extra.pop("blob_descriptors")],
            "annotations": annotations,
        }
        manifest_bytes = oci.canonical_json(manifest)
        manifest_digest = writer.add_blob(manifest_bytes)
        writer.finish(
            [oci.Descriptor(oci.OCI_MANIFEST, manifest_digest, len(manifest_bytes), {oci.ANN_REF_NAME: cfg.tag})]
        )
        store.close()
        store = None
        shutil.rmtree(tmp / ".work")
        oci.publish_dir(tmp, output, force=force)
        result.manifest_digest = manifest_digest
        result.index_digest = index_digest
        result.index_bytes = len(index_blob)
        result.seconds = time.monotonic() - start
        return result
    except BaseException:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if store is not None:
            store.close()
        if isinstance(source, str):
            src.close()
