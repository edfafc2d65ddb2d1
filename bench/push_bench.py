"""Push benchmark: ``turbofs push`` of the 1.4 GB ``python-1g`` image, and what a one-file
change costs to push again, side by side with skopeo and CNCF distribution.

Images:

* **v1**: ``python-1g`` from :mod:`bench.images` (three gzip layers, 1,382 MB of tar, 424 MB
  compressed), as the cached OCI layout.
* **v2**: v1 with ONE file changed inside the big venv layer: the layer's tar stream is
  rewritten with :mod:`tarfile` (every other member copied as it is), ``--file`` (default
  ``torch/version.py`` of the venv's site-packages) gets one more line, the tar is gzipped
  again (ISA-L, level 1), and a new config (diff_id) and manifest make a new OCI layout in
  the work folder. The other blobs are hard links to the cached v1 (which is never
  modified).

Per run (``--runs``, default 3), each with fresh registries on loopback (two ``turbofs
serve``, one distribution ``docker-registry``):

1. ``turbofs build oci:v1`` (the conversion alone, timed) to a layout L1;
2. ``turbofs push oci:L1 .../bench/py:v1``: **dedup off**, the registry is empty and
   everything is sent; MB/s = bytes sent / seconds of the command;
3. ``turbofs push oci:L1 .../bench/py:v1-again``: **dedup on**, nothing to send;
4. ``turbofs build oci:v2`` (the conversion of v2 alone, timed);
5. ``turbofs push oci:v2 .../bench/py:v2``: the real command for a new version: it converts
   v2, asks which blobs the registry lacks and sends only those. Bytes sent are taken from
   the registry's storage folder (the blobs that appeared, the manifest included; the
   command's own count is kept too). The upload part alone is timed on a second turbofs
   registry that holds v1: ``turbofs push`` of the layout built in step 4;
6. distribution with skopeo: ``skopeo copy oci:v1 docker://.../bench/py:v1``, then the same
   for v2 (skopeo skips the blobs the registry has): bytes re-uploaded = the blobs that
   appeared in the storage folder (the whole changed layer);
7. ``turbofs push`` to distribution as well (L1, then ``oci:v2``): dedup by HEAD requests
   on a registry without the turbofs extensions.

Command line::

    python -m bench.push_bench [--runs 3] [--file PATH_IN_LAYER] [--keep]

Results go to ``bench/results/push.json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from isal import igzip

from bench.build_bench import REPO_ROOT, RESULTS_DIR, log, new_results, save_results
from bench.images import ensure_image
from bench.registry_bench import (
    Server,
    require_tools,
    servers_running,
    skopeo_copy,
    start_distribution,
    start_turbofs,
    stats,
    tool_versions,
)
from turbofs.core.config import MiB

IMAGE: Final = "python-1g"
REPO: Final = "bench/py"
DEFAULT_FILE: Final = "opt/venv/lib/python3.11/site-packages/torch/version.py"
CHANGE: Final = b"\n# turbofs push benchmark: the one changed line\n"
TURBOFS: Final = [sys.executable, "-m", "turbofs.cli"]
_SENT_RE: Final = re.compile(
    r"sent (\d+) of (\d+) blobs, ([\d.]+) MB of ([\d.]+) MB \(([\d.]+)%\) in ([\d.]+) s"
)


# --------------------------------------------------------------------------- v2 of the image


class _HashingWriter:
    """A write-only file object that hashes what goes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


@dataclass
class ChangedImage:
    layout: str
    layer_index: int
    old_layer: str
    new_layer: str
    new_layer_bytes: int
    new_layer_tar_bytes: int
    changed_file: str
    old_file_bytes: int
    new_file_bytes: int
    seconds: float


def _blob(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _put_json(layout: Path, obj: Any) -> tuple[str, int]:
    data = json.dumps(obj, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return digest, len(data)


def _norm(name: str) -> str:
    return name.removeprefix("./").lstrip("/")


def make_one_file_change(src: Path, dest: Path, target: str) -> ChangedImage:
    """Write a new OCI layout at ``dest``: the image of ``src`` with file ``target`` changed.

    The layer holding ``target`` is the largest layer (the venv); it is rewritten as a tar
    stream, gzipped at level 1. ``src`` is only read.
    """
    t0 = time.monotonic()
    index = json.loads((src / "index.json").read_bytes())
    desc = index["manifests"][0]
    manifest = json.loads(_blob(src, desc["digest"]).read_bytes())
    config = json.loads(_blob(src, manifest["config"]["digest"]).read_bytes())
    layers = manifest["layers"]
    li = max(range(len(layers)), key=lambda i: int(layers[i]["size"]))
    if not str(layers[li]["mediaType"]).endswith("gzip"):
        raise SystemExit(f"layer {li} of {src} is not gzip: {layers[li]['mediaType']}")
    (dest / "blobs" / "sha256").mkdir(parents=True)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    tmp = dest / "blobs" / "sha256" / ".layer.tmp"
    old_size = new_size = -1
    gz_in: BinaryIO = igzip.open(_blob(src, layers[li]["digest"]), "rb")  # type: ignore[no-untyped-call]
    with gz_in, open(tmp, "wb") as raw:
        gz_out: BinaryIO = igzip.open(raw, "wb", compresslevel=1)  # type: ignore[no-untyped-call]
        diff = _HashingWriter(gz_out)
        tin = tarfile.open(fileobj=gz_in, mode="r|")
        tout = tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT, copybufsize=MiB)  # type: ignore[call-overload]
        with tin, tout:
            for m in tin:
                if m.isreg():
                    f = tin.extractfile(m)
                    assert f is not None
                    if _norm(m.name) == target and old_size < 0:
                        data = f.read()
                        new = data + CHANGE
                        old_size, new_size = len(data), len(new)
                        m.size = len(new)
                        tout.addfile(m, io.BytesIO(new))
                    else:
                        tout.addfile(m, f)
                else:
                    tout.addfile(m)
        gz_out.close()
    if old_size < 0:
        tmp.unlink()
        raise SystemExit(f"{target} is not a regular file of layer {li} ({layers[li]['digest']})")
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    new_layer = "sha256:" + h.hexdigest()
    tmp.rename(_blob(dest, new_layer))
    for d in layers:
        if d is not layers[li]:
            _link(_blob(src, d["digest"]), _blob(dest, d["digest"]))
    config["rootfs"]["diff_ids"][li] = "sha256:" + diff.hash.hexdigest()
    cfg_digest, cfg_size = _put_json(dest, config)
    old_layer = layers[li]["digest"]
    layers[li] = {**layers[li], "digest": new_layer, "size": _blob(dest, new_layer).stat().st_size}
    manifest["config"] = {**manifest["config"], "digest": cfg_digest, "size": cfg_size}
    m_digest, m_size = _put_json(dest, manifest)
    new_desc = {"mediaType": desc["mediaType"], "digest": m_digest, "size": m_size,
                "annotations": {"org.opencontainers.image.ref.name": "latest"}}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [new_desc]}))
    return ChangedImage(str(dest), li, old_layer, new_layer, int(layers[li]["size"]), diff.size,
                        target, old_size, new_size, round(time.monotonic() - t0, 1))


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# --------------------------------------------------------------------------- commands


def timed(argv: Sequence[str], what: str) -> tuple[float, str]:
    """Run a command; (wall seconds, stdout). Raise with its output if it fails."""
    t0 = time.monotonic()
    proc = subprocess.run(list(argv), cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def convert(source: Path, out: Path) -> dict[str, Any]:
    seconds, stdout = timed([*TURBOFS, "build", f"oci:{source}:latest", "-o", str(out), "--no-progress"],
                            f"turbofs build {source}")
    m = re.search(r"time\s+([\d.]+) s", stdout)
    return {"wall_seconds": round(seconds, 2), "build_seconds": float(m[1]) if m else None}


def turbofs_push(source: str, server: Server, ref: str) -> dict[str, Any]:
    """``turbofs push``; its figures, and the blob bytes that appeared in the storage folder."""
    before = server.blob_sizes()
    seconds, stdout = timed([*TURBOFS, "push", source, f"{server.host_port}/{ref}", "--no-progress"],
                            f"turbofs push {source} {ref}")
    after = server.blob_sizes()
    new = {d: n for d, n in after.items() if d not in before}
    m = _SENT_RE.search(stdout)
    if m is None:
        raise RuntimeError(f"unexpected output of turbofs push:\n{stdout}")
    return {
        "wall_seconds": round(seconds, 2),
        "blobs_sent": int(m[1]),
        "blobs_total": int(m[2]),
        "reported_mb_sent": float(m[3]),
        "reported_mb_total": float(m[4]),
        "reported_seconds": float(m[6]),
        "stored_new_blobs": len(new),
        "stored_new_bytes": sum(new.values()),
        "stored_new_blob_sizes": sorted(new.values(), reverse=True),
    }


def skopeo_push(layout: Path, server: Server, ref: str) -> dict[str, Any]:
    before = server.blob_sizes()
    seconds = skopeo_copy(f"oci:{layout}:latest", f"docker://{server.host_port}/{ref}")
    after = server.blob_sizes()
    new = {d: n for d, n in after.items() if d not in before}
    return {"wall_seconds": round(seconds, 2), "stored_new_blobs": len(new),
            "stored_new_bytes": sum(new.values())}


# --------------------------------------------------------------------------- main


def one_run(run_no: int, work: Path, v1: Path, v2: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run": run_no}
    rdir = work / f"run{run_no}"
    starters = [lambda: start_turbofs(rdir / "turbofs"), lambda: start_turbofs(rdir / "turbofs2"),
                lambda: start_distribution(rdir / "distribution")]
    with servers_running(starters) as (tf, tf2, dist):
        l1 = rdir / "v1-turbo"
        out["convert_v1"] = convert(v1, l1)
        log(f"run {run_no}: converted v1 in {out['convert_v1']['wall_seconds']} s")
        out["push_v1_dedup_off"] = p = turbofs_push(f"oci:{l1}:latest", tf, f"{REPO}:v1")
        p["mb_per_s"] = round(p["stored_new_bytes"] / 1e6 / p["wall_seconds"], 1)
        p["mb_per_s_reported_seconds"] = round(p["stored_new_bytes"] / 1e6 / p["reported_seconds"], 1)
        log(f"run {run_no}: turbofs push v1 (dedup off): {p['stored_new_bytes'] / 1e6:.1f} MB in "
            f"{p['wall_seconds']} s, {p['mb_per_s']} MB/s")
        out["push_v1_dedup_on"] = p = turbofs_push(f"oci:{l1}:latest", tf, f"{REPO}:v1-again")
        log(f"run {run_no}: turbofs push v1 again (dedup on): {p['stored_new_bytes']} bytes in {p['wall_seconds']} s")
        l2 = rdir / "v2-turbo"
        out["convert_v2"] = convert(v2, l2)
        log(f"run {run_no}: converted v2 in {out['convert_v2']['wall_seconds']} s")
        out["push_v2"] = p = turbofs_push(f"oci:{v2}:latest", tf, f"{REPO}:v2")
        log(f"run {run_no}: turbofs push oci:v2 (convert + send missing): {p['stored_new_bytes'] / 1e6:.2f} MB "
            f"in {p['stored_new_blobs']} blobs, {p['wall_seconds']} s")
        # the upload part alone: a second registry that holds v1 gets the pre-built v2
        turbofs_push(f"oci:{l1}:latest", tf2, f"{REPO}:v1")
        out["push_v2_upload_only"] = p = turbofs_push(f"oci:{l2}:latest", tf2, f"{REPO}:v2")
        log(f"run {run_no}: turbofs push of the pre-built v2 to a registry with v1: "
            f"{p['stored_new_bytes'] / 1e6:.2f} MB in {p['wall_seconds']} s")

        out["skopeo_v1"] = p = skopeo_push(v1, dist, f"{REPO}:v1")
        p["mb_per_s"] = round(p["stored_new_bytes"] / 1e6 / p["wall_seconds"], 1)
        out["skopeo_v1_again"] = skopeo_push(v1, dist, f"{REPO}:v1-again")
        out["skopeo_v2"] = p = skopeo_push(v2, dist, f"{REPO}:v2")
        log(f"run {run_no}: skopeo to distribution: v1 {out['skopeo_v1']['stored_new_bytes'] / 1e6:.1f} MB in "
            f"{out['skopeo_v1']['wall_seconds']} s; v2 re-uploaded {p['stored_new_bytes'] / 1e6:.1f} MB in "
            f"{p['wall_seconds']} s")
        out["turbofs_to_distribution_v1"] = p = turbofs_push(f"oci:{l1}:latest", dist, "bench/turbo:v1")
        p["mb_per_s"] = round(p["stored_new_bytes"] / 1e6 / p["wall_seconds"], 1)
        out["turbofs_to_distribution_v2"] = p = turbofs_push(f"oci:{v2}:latest", dist, "bench/turbo:v2")
        log(f"run {run_no}: turbofs push to distribution: v1 {out['turbofs_to_distribution_v1']['wall_seconds']} s, "
            f"v2 sent {p['stored_new_bytes'] / 1e6:.2f} MB in {p['wall_seconds']} s")
        out["turbo_image_bytes"] = {"v1": _turbo_bytes(l1), "v2": _turbo_bytes(l2)}
        out["rss_final_mib"] = {"turbofs": round(tf.rss_kb() / 1024, 1), "turbofs2": round(tf2.rss_kb() / 1024, 1),
                                "distribution": round(dist.rss_kb() / 1024, 1)}
    shutil.rmtree(rdir, ignore_errors=True)
    return out


def _turbo_bytes(layout: Path) -> int:
    index = json.loads((layout / "index.json").read_bytes())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_bytes())
    return int(manifest["config"]["size"]) + sum(int(d["size"]) for d in manifest["layers"])


def summarise(runs: list[dict[str, Any]], plain: dict[str, Any]) -> dict[str, Any]:
    turbo_total = runs[0]["turbo_image_bytes"]["v2"]

    def col(*keys: str) -> list[float]:
        vals = []
        for r in runs:
            v: Any = r
            for k in keys:
                v = v[k]
            vals.append(float(v))
        return vals

    def fig(case: str, key: str, digits: int, scale: float = 1.0) -> dict[str, float]:
        return stats([v * scale for v in col(case, key)], digits)

    def pct(values: list[float], whole: float, digits: int) -> dict[str, float]:
        return stats([100 * v / whole for v in values], digits)

    sent_v2 = col("push_v2", "stored_new_bytes")
    dist_v2 = col("skopeo_v2", "stored_new_bytes")
    return {
        "turbo_image_bytes": turbo_total,
        "plain_image_compressed_bytes": plain["compressed_bytes"],
        "plain_image_uncompressed_bytes": plain["uncompressed_bytes"],
        "convert_v1_seconds": fig("convert_v1", "wall_seconds", 2),
        "convert_v2_seconds": fig("convert_v2", "wall_seconds", 2),
        "push_v1_dedup_off": {
            "mb_sent": fig("push_v1_dedup_off", "stored_new_bytes", 1, 1e-6),
            "seconds": fig("push_v1_dedup_off", "wall_seconds", 2),
            "mb_per_s": fig("push_v1_dedup_off", "mb_per_s", 1),
            "mb_per_s_reported_seconds": fig("push_v1_dedup_off", "mb_per_s_reported_seconds", 1),
        },
        "push_v1_dedup_on": {
            "bytes_sent": fig("push_v1_dedup_on", "stored_new_bytes", 0),
            "seconds": fig("push_v1_dedup_on", "wall_seconds", 2),
        },
        "push_v2_one_file_change": {
            "bytes_sent": stats(sent_v2, 0),
            "blobs_sent": fig("push_v2", "stored_new_blobs", 0),
            "pct_of_turbo_image": pct(sent_v2, turbo_total, 3),
            "pct_of_plain_compressed": pct(sent_v2, plain["compressed_bytes"], 3),
            "pct_of_plain_uncompressed": pct(sent_v2, plain["uncompressed_bytes"], 3),
            "wall_seconds": fig("push_v2", "wall_seconds", 2),
            "upload_only_seconds": fig("push_v2_upload_only", "wall_seconds", 2),
            "upload_only_bytes_sent": fig("push_v2_upload_only", "stored_new_bytes", 0),
        },
        "skopeo_distribution": {
            "v1_mb": fig("skopeo_v1", "stored_new_bytes", 1, 1e-6),
            "v1_seconds": fig("skopeo_v1", "wall_seconds", 2),
            "v1_mb_per_s": fig("skopeo_v1", "mb_per_s", 1),
            "v1_again_bytes": fig("skopeo_v1_again", "stored_new_bytes", 0),
            "v1_again_seconds": fig("skopeo_v1_again", "wall_seconds", 2),
            "v2_bytes_reuploaded": stats(dist_v2, 0),
            "v2_pct_of_plain_compressed": pct(dist_v2, plain["compressed_bytes"], 2),
            "v2_seconds": fig("skopeo_v2", "wall_seconds", 2),
        },
        "turbofs_push_to_distribution": {
            "v1_mb_per_s": fig("turbofs_to_distribution_v1", "mb_per_s", 1),
            "v1_seconds": fig("turbofs_to_distribution_v1", "wall_seconds", 2),
            "v2_bytes_sent": fig("turbofs_to_distribution_v2", "stored_new_bytes", 0),
            "v2_seconds": fig("turbofs_to_distribution_v2", "wall_seconds", 2),
        },
        "ratio_reuploaded_turbofs_to_skopeo": round(statistics.median(sent_v2) / statistics.median(dist_v2), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_tools("skopeo", "docker-registry")
    v1 = ensure_image(IMAGE)
    info = json.loads((v1 / "bench-image.json").read_text())
    plain = {"compressed_bytes": int(info["compressed_bytes"]), "uncompressed_bytes": int(info["uncompressed_bytes"])}
    work = Path(tempfile.mkdtemp(prefix="turbofs-push-bench-"))
    data = new_results(
        "push",
        tools=tool_versions(),
        settings={"runs": args.runs, "changed_file": args.file, "change": CHANGE.decode()},
        plain_image={"layout": str(v1), "manifest": info["manifest_digest"], **plain},
    )
    try:
        log(f"work folder {work}; writing v2 of {IMAGE} with {args.file} changed")
        v2 = work / "v2"
        changed = make_one_file_change(v1, v2, args.file)
        data["v2"] = asdict(changed)
        log(f"v2 written in {changed.seconds} s: layer {changed.layer_index} "
            f"{changed.new_layer_bytes / 1e6:.1f} MB gzip; {args.file} {changed.old_file_bytes} -> "
            f"{changed.new_file_bytes} bytes")
        runs = [one_run(i + 1, work, v1, v2) for i in range(args.runs)]
        data["runs"] = runs
        data["summary"] = summarise(runs, plain)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.push_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions, each with fresh registries (default 3)")
    parser.add_argument("--file", default=DEFAULT_FILE, help=f"file of the venv layer to change (default {DEFAULT_FILE})")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "push.json")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    data = run(args)
    data["total_seconds"] = round(time.monotonic() - t0, 1)
    log("summary: " + json.dumps(data["summary"], indent=1))
    save_results(args.output, data, "bench.push_bench", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
