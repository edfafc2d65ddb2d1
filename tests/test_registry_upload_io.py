"""What an upload costs the turbofs registry in disk flushes, and in what order they come.

A client that uploads blob after blob (skopeo 1.9 does: HEAD, POST, PATCH, PUT, one blob at a
time) waits for every flush the registry makes before it answers. The registry makes durable
what it acknowledges, and nothing more:

* starting a session (POST) and appending to it (PATCH) flush nothing: an upload that a crash
  interrupts is restarted by the client anyway;
* finishing it (PUT ?digest=, or a monolithic POST ?digest=) flushes the bytes before the blob
  gets its name in ``blobs/`` (so a crash can never leave a blob whose bytes are not the ones
  its digest names), then the folders that received the new names; three flushes in all;
* a blob the registry holds already is only linked into the repository: one flush (the
  repository's folder), its bytes are not flushed again;
* the first blob of a repository also flushes the folders that received the repository's new
  folders (``repositories/``, ...), once.

The server runs as its own process; ``strace -f -y`` attached to it records the flushing system
calls (with the path of each file descriptor) and the links and renames, so the test sees what
the kernel was asked, without touching the server's code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.registry_fixtures import TurbofsRegistry

#: every system call that asks the kernel to make written data or names durable
SYNC_CALLS = ("fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "msync")
TRACED = (*SYNC_CALLS, "link", "linkat", "rename", "renameat", "renameat2")
ATTACH_TIMEOUT = 20.0

_CALL_RE = re.compile(r"^(?:\[pid\s+)?\d+\]?\s+(?P<call>\w+)\((?P<args>.*)")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def traced(pid: int, out: Path) -> Iterator[list[tuple[str, str]]]:
    """Trace process ``pid`` (all its threads, and new ones) while the block runs; the list
    yielded is filled, on exit, with the (system call, arguments) seen, in order."""
    calls: list[tuple[str, str]] = []
    argv = ["strace", "-f", "-y", "-s", "512", "-e", f"trace={','.join(TRACED)}", "-o", str(out), "-p", str(pid)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + ATTACH_TIMEOUT
    try:
        # strace says "Process PID attached" once every thread is stopped and traced
        while f"Process {pid} attached".encode() not in seen:
            left = deadline - time.monotonic()
            if proc.poll() is not None or left <= 0:
                raise AssertionError(f"strace did not attach to {pid}: {seen.decode(errors='replace')}")
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                seen += os.read(proc.stderr.fileno(), 4096)
        yield calls
    finally:
        proc.send_signal(signal.SIGINT)  # detaches and flushes its output
        proc.communicate(timeout=30)
    for line in out.read_text(errors="replace").splitlines():
        m = _CALL_RE.match(line)
        if m is not None:
            calls.append((m["call"], m["args"]))


def fd_path(args: str) -> str:
    """The path strace -y gives the first argument, a file descriptor (``7</a/b>`` -> /a/b)."""
    m = re.match(r"\d+<(.*?)>[,)]", args)
    return m[1] if m is not None else ""


def syncs(calls: list[tuple[str, str]]) -> list[str]:
    """The paths of the files and folders flushed (``sync``, ``syncfs``... give "")."""
    return [fd_path(args) for call, args in calls if call in SYNC_CALLS]


def first(calls: list[tuple[str, str]], pred: Callable[[str, str], object]) -> int:
    """Index of the first call for which ``pred(call, args)`` is true."""
    for i, (call, args) in enumerate(calls):
        if pred(call, args):
            return i
    raise AssertionError(f"no such call in {calls}")


def test_chunked_upload_flushes_only_what_it_acknowledges(turbofs_registry: TurbofsRegistry, tmp_path: Path) -> None:
    reg = turbofs_registry
    assert reg.proc is not None
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = sha256(data)
    hexd = digest.split(":")[1]
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        first_blob = b"the repository exists from now on"
        r = c.post("/v2/io/one/blobs/uploads/", params={"digest": sha256(first_blob)}, content=first_blob)
        assert r.status_code == 201, r.text
        with traced(reg.proc.pid, tmp_path / "open.trace") as opening:
            r = c.post("/v2/io/one/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["Location"]
            for start in range(0, len(data), 1 << 20):
                piece = data[start : start + (1 << 20)]
                r = c.patch(loc, content=piece, headers={"Content-Range": f"{start}-{start + len(piece) - 1}"})
                assert r.status_code == 202, r.text
                loc = r.headers["Location"]
        with traced(reg.proc.pid, tmp_path / "finish.trace") as finishing:
            r = c.put(loc, params={"digest": digest})
            assert r.status_code == 201, r.text
        assert c.get(f"/v2/io/one/blobs/{digest}").content == data

    assert syncs(opening) == [], "starting and appending to an upload must not flush"

    flushes = syncs(finishing)
    assert len(flushes) <= 3, flushes
    # the bytes are flushed before the blob gets its name, and that name is flushed after
    data_flush = first(finishing, lambda call, args: call in SYNC_CALLS and re.search(r"/uploads/[^/]+/data$", fd_path(args)))
    named = first(finishing, lambda call, args: call.startswith(("link", "rename")) and f'/blobs/sha256/{hexd}"' in args)
    assert data_flush < named, finishing
    first_dir = first(finishing, lambda call, args: call in SYNC_CALLS and fd_path(args).endswith("/blobs/sha256"))
    assert first_dir > named, finishing
    first(finishing, lambda call, args: call in SYNC_CALLS and fd_path(args).endswith("/io/one/_layers/sha256"))


def test_monolithic_upload_and_known_blob(turbofs_registry: TurbofsRegistry, tmp_path: Path) -> None:
    reg = turbofs_registry
    assert reg.proc is not None
    data = os.urandom(1024 * 1024)
    digest = sha256(data)
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        with traced(reg.proc.pid, tmp_path / "mono.trace") as mono:
            r = c.post("/v2/io/a/blobs/uploads/", params={"digest": digest}, content=data)
            assert r.status_code == 201, r.text
        # the same bytes again, into another repository: the blob is there already
        with traced(reg.proc.pid, tmp_path / "again.trace") as again:
            r = c.post("/v2/io/b/blobs/uploads/", params={"digest": digest}, content=data)
            assert r.status_code == 201, r.text
        for repo in ("io/a", "io/b"):
            assert c.get(f"/v2/{repo}/blobs/{digest}").content == data

    # a new repository: its new folders are flushed where they were created, once each
    storage = str(reg.storage)
    folders = syncs(mono)
    assert folders[0].startswith(f"{storage}/uploads/") and folders[0].endswith("/data"), folders
    assert sorted(folders[1:]) == sorted(
        f"{storage}/{sub}"
        for sub in ("blobs/sha256", "repositories", "repositories/io", "repositories/io/a",
                    "repositories/io/a/_layers", "repositories/io/a/_layers/sha256")
    ), folders
    # nothing new to make durable but the repository's link to the blob (and io/b's folders):
    # neither the bytes nor blobs/ are flushed again
    assert sorted(syncs(again)) == sorted(
        f"{storage}/{sub}"
        for sub in ("repositories/io", "repositories/io/b", "repositories/io/b/_layers",
                    "repositories/io/b/_layers/sha256")
    ), syncs(again)


def test_a_rejected_upload_names_nothing(turbofs_registry: TurbofsRegistry, tmp_path: Path) -> None:
    reg = turbofs_registry
    assert reg.proc is not None
    digest = sha256(b"something else")
    with httpx.Client(base_url=reg.url, timeout=30) as c:
        with traced(reg.proc.pid, tmp_path / "bad.trace") as calls:
            r = c.post("/v2/io/bad/blobs/uploads/", params={"digest": digest}, content=b"not the promised bytes")
            assert r.status_code == 400, r.text
            assert r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert c.head(f"/v2/io/bad/blobs/{digest}").status_code == 404
    assert not [a for call, a in calls if call.startswith(("link", "rename")) and "/blobs/sha256/" in a]
    assert syncs(calls) == []
