"""The cold-start benchmark's small variant, end to end, so that it cannot rot.

``python -m bench.coldstart --images sample --runs 1 --rate none``: the two network
namespaces and their veth (unshaped), both registries, a fresh snapshotter + containerd per
run, ``ctr images pull`` + ``ctr run`` against ``turbofs run`` of the ``sample`` image (a
command that reads a few files and prints READY), the working-set run without prefetch,
the JSON, the Markdown table and the chart. About half a minute here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.coldstart import app_seconds, markdown, parse_rate, summarize, with_app_times

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_parse_rate_and_summary() -> None:
    assert parse_rate("1gbit") == 10**9 and parse_rate("500mbit") == 5 * 10**8 and parse_rate("none") is None
    assert app_seconds("READY 1.500") == 1.5 and app_seconds("READY 0") is None and app_seconds("READY") is None
    rows = [
        with_app_times({"path": "standard", "ready_s": 10.0, "warm_s": 2.0, "bytes_at_ready": 100, "bytes_total": 100,
                   "ready_line": "READY 1.5"}),
        with_app_times({"path": "turbofs", "ready_s": 4.0, "warm_s": 2.5, "bytes_at_ready": 40, "bytes_total": 110,
                   "on_demand_bytes_at_ready": 30, "prefetch_s": 9.0, "peak_rss_kib": 2048, "ready_line": "READY 3"}),
    ]  # fmt: skip
    s = summarize(rows, 125_000_000, 10**9)
    assert s["gain"] == 2.5 and s["lower_bound_s"] == 3.0  # 2 s warm + 1 Gbit of working set
    assert s["standard"]["before_app_s"]["median"] == 8.5 and s["turbofs"]["app_s"]["median"] == 3.0
    ws = {"ready_s": 5.0, "working_set_bytes": 125_000_000,
          "fetch": {"demand_fetches": 7.0, "demand_fetch_seconds_sum": 1.0}}  # fmt: skip
    table = markdown({"link": {"rate_bps": 10**9}, "runs": 1, "images": [
        {"image": "x", "uncompressed_bytes": 10**9, "compressed_bytes": 4 * 10**8, "summary": s, "working_set": ws}]})
    assert "| x: 1.00 GB (0.40 GB gz) | 10.0 s (10.0-10.0) | 4.0 s (4.0-4.0) | 2.5x (turbofs) | 3.0 s |" in table
    assert "* x: standard 8.5 s before the app + 1.5 s app" in table


def _require_node() -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmark needs root")
    tools = ("containerd", "ctr", "runc", "docker-registry", "skopeo", "umoci", "ip", "nsenter")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in tools if shutil.which(t, path=path) is None]
    if missing:
        pytest.skip(f"missing: {', '.join(missing)}")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    if Path("/run/netns/tfscold-node").exists():
        pytest.skip("another cold-start benchmark is running (its namespaces exist)")


@pytest.mark.timeout(300)
def test_coldstart_small_variant(tmp_path: Path) -> None:
    _require_node()
    out = tmp_path / "coldstart.json"
    argv = [sys.executable, "-m", "bench.coldstart", "--images", "sample", "--runs", "1", "--rate", "none",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    (img,) = res["images"]
    by_path = {r["path"]: r for r in img["runs"]}
    assert set(by_path) == {"standard", "turbofs", "turbofs+trace", "turbofs+trace-nopush", "turbofs-fuse+trace"}
    for row in by_path.values():
        assert row["ready_line"].startswith("READY") and 0 < row["ready_s"] < 120 and row["warm_s"] > 0
        assert row["bytes_at_ready"] > 0
    # the standard path downloads the whole compressed image; turbofs fetches it all by the end
    assert by_path["standard"]["bytes_total"] >= img["compressed_bytes"]
    for name in ("turbofs", "turbofs+trace", "turbofs+trace-nopush", "turbofs-fuse+trace"):
        turbo = by_path[name]
        assert turbo["prefetch_state"] == "done" and turbo["peak_rss_kib"] > 0 and 0 < turbo["prefetch_s"] < 120
        assert turbo["at_ready"]["daemon_cpu_s"] > 0 and sum(turbo["at_ready"]["fuse_requests"].values()) > 0
    assert by_path["turbofs-fuse+trace"]["mode"] == "fuse"
    # the recorded startup's chunks went into the page cache, unless the variant turned it off
    pushed, not_pushed = by_path["turbofs+trace"]["erofs"], by_path["turbofs+trace-nopush"]["erofs"]
    assert pushed["startup_notify_store"] == 1 and pushed["stored_chunks"] > 0
    assert pushed["stored_chunks"] + pushed["store_errors"] >= img["working_set"]["trace"]["chunks"]
    assert not not_pushed.get("startup_notify_store") and not not_pushed.get("stored_chunks")
    # the traced image's mount fetched the recorded startup first
    ws = img["working_set"]
    assert ws["trace"]["chunks"] > 0
    assert by_path["turbofs+trace"]["prefetch"]["startup_chunks"] == ws["trace"]["chunks"]
    assert by_path["turbofs"]["prefetch"]["startup_chunks"] == 0
    assert 0 < ws["working_set_bytes"] < img["turbo_layout_bytes"]
    assert res["link"]["rate_bps"] is None and "| sample: " in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not Path("/run/netns/tfscold-node").exists() and not Path("/run/netns/tfscold-reg").exists()
