"""``turbofs push``: put a turbo image into a registry, sending only what it lacks.

The source is a turbo image in an OCI layout, or any image ``turbofs build`` accepts (it is
converted first, into a temporary layout). Chunk blobs are content-defined, so a new version
of an image shares almost all its blobs with the previous one: the registry is asked which
blobs it lacks (one query to a turbofs registry, HEAD requests to any other) and only those
are uploaded, several at a time. The manifest goes last, so a tag never points at an image
whose blobs are not all there.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from tqdm import tqdm

from index_builder.builder import build
from turbofs.core import oci
from turbofs.core.config import PUSH_PARALLEL, BuildConfig
from turbofs.core.errors import FormatError, NotFound, single_error
from turbofs.core.image import LayoutImage, open_layout_image
from turbofs.core.oci import split_path_ref
from turbofs.core.registry import Reference, RegistryClient


@dataclass
class PushResult:
    reference: str
    manifest_digest: str
    blobs_total: int
    blobs_sent: int
    bytes_total: int
    bytes_sent: int
    seconds: float
    built: bool

    def summary(self) -> str:
        pct = 100.0 * self.bytes_sent / self.bytes_total if self.bytes_total else 0.0
        rate = self.bytes_sent / 1e6 / self.seconds if self.seconds else 0.0
        return (
            f"pushed {self.reference} ({self.manifest_digest})\n"
            f"sent {self.blobs_sent} of {self.blobs_total} blobs, {self.bytes_sent / 1e6:.2f} MB of "
            f"{self.bytes_total / 1e6:.2f} MB ({pct:.2f}%) in {self.seconds:.2f} s ({rate:.0f} MB/s)"
        )


def _local_turbo_image(source: str) -> LayoutImage | None:
    """The turbo image named by ``source`` if it is one already, else None (to be built)."""
    if source.startswith(("oci-archive:", "docker-archive:", "dir:")):
        return None
    try:
        path, tag = split_path_ref(source.removeprefix("oci:"))
    except NotFound:
        return None
    if not (path / "index.json").is_file():
        return None
    try:
        return open_layout_image(path, tag)
    except FormatError as exc:
        if "not a turbo image" in str(exc):
            return None
        raise


async def push_image(
    img: LayoutImage,
    target: Reference,
    *,
    client: RegistryClient,
    parallel: int = PUSH_PARALLEL,
    progress: bool = False,
) -> tuple[str, int, int, int, int]:
    """Upload what the registry lacks, then the manifest. Returns (digest, blobs, sent, bytes, sent bytes)."""
    repo = target.repository
    m = img.manifest
    descs = [m.config, m.index, *m.blobs]
    sizes = {d.digest: d.size for d in descs}
    missing = await client.missing_blobs(repo, list(sizes))
    to_send = sum(sizes[d] for d in missing)
    bar = tqdm(total=to_send, unit="B", unit_scale=True, desc="push", disable=not progress, file=sys.stderr)
    sem = trio.Semaphore(parallel)

    async def send(digest: str) -> None:
        async with sem:
            await client.upload_blob(repo, digest, img.blob_path(digest), progress=bar.update)

    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                for digest in missing:
                    nursery.start_soon(send, digest)
    finally:
        bar.close()
    digest = await client.put_manifest(repo, target.tag or m.digest, m.raw, oci.OCI_MANIFEST)
    if target.digest and target.digest != digest:
        raise FormatError(f"pushed manifest {digest} differs from the requested {target.digest}")
    return digest, len(sizes), len(missing), sum(sizes.values()), to_send


def push(
    source: str,
    target: str,
    *,
    build_config: BuildConfig | None = None,
    auth: httpx.Auth | None = None,
    scheme: str | None = None,
    parallel: int = PUSH_PARALLEL,
    progress: bool | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PushResult:
    """Push ``source`` (a turbo layout, or any image to convert first) to ``target``."""
    ref = Reference.parse(target)
    show = sys.stderr.isatty() if progress is None else progress
    start = time.monotonic()
    img = _local_turbo_image(source)
    tmp: Path | None = None
    try:
        if img is None:
            tmp = Path(tempfile.mkdtemp(prefix="turbofs-push-"))
            cfg = build_config or BuildConfig()
            build(source, tmp / "image", cfg, progress=show)
            img = open_layout_image(tmp / "image", cfg.tag)
        layout_img = img

        async def run() -> tuple[str, int, int, int, int]:
            async with RegistryClient(ref.registry, scheme=scheme, auth=auth, transport=transport) as client:
                return await push_image(layout_img, ref, client=client, parallel=parallel, progress=show)

        digest, blobs, sent, total, sent_bytes = trio.run(run)  # the CLI runs trio
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return PushResult(str(ref), digest, blobs, sent, total, sent_bytes, time.monotonic() - start, tmp is not None)
