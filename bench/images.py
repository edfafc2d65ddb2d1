"""Builders of realistic multi-layer OCI image layouts for tests and benchmarks.

Every image is made from real parts: a Debian bookworm root filesystem from
``debootstrap --variant=minbase``, real wheels from PyPI, and layers stacked
with umoci, so the layouts carry what real images carry (gzip layers, whiteouts,
hardlinks, symlinks, xattrs, setuid bits, files owned by other users).

Cache (``$TURBOFS_CACHE``, default ``~/.cache/turbofs``)::

    debootstrap/bookworm-minbase[-<hash of --include>].tar   root filesystems
    images/NAME/                                             OCI image layouts, tag "latest"
    images/NAME/bench-image.json                             sizes and build time

Each result is built in a temporary directory beside its final place and
renamed into place only when complete, so a cached result is always whole.
A lock file per result lets concurrent callers wait instead of building twice.

Images:

``sample``
    small (about 90 MB), three layers: Debian minbase; an app directory with a
    shell script, symlinks, a hardlink, a ``user.*`` xattr, a setuid file, a
    file owned by uid 1000 and 3 MiB of incompressible data; a layer that
    deletes ``/etc/motd`` and ``/etc/cron.daily/`` (whiteouts) and replaces
    ``/etc/issue`` and ``/app/VERSION``.
``python-1g``
    over 1 GB uncompressed: Debian minbase with python3; a virtualenv at
    ``/opt/venv`` holding torch (CPU), numpy, scipy, pandas and friends;
    ``/app/app.py``, which imports torch, runs one forward pass of a tiny model
    and prints ``READY <seconds since process start>``.
``python-5g``
    the same with torch 2.14.1's CUDA build and its nvidia-* wheels (cuBLAS, cuDNN,
    NCCL...) from the local package mirrors: about 5 GB uncompressed. The app runs on the
    CPU (no GPU needed); ``import torch`` loads the CUDA libraries all the same.
``python-10g``
    python-5g plus a fourth layer of model weights that the startup does not read:
    ``/models/model-0000N-of-0000M.safetensors``, about 4.5 GB of float16 values drawn from
    a normal distribution (seeded), compressible like real weights (gzip saves ~10%). Made
    from python-5g's layout (its blobs are hard-linked) with the layer, config and
    manifest written here (no umoci: it would unpack 6 GB first).

Building needs root (debootstrap, and umoci to keep ownership and setuid bits)
and the Debian packages that ``scripts/bootstrap.sh`` installs.

Command line: ``python -m bench.images NAME [--force]`` prints the layout path;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG = "latest"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
INFO_FILE = "bench-image.json"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Wheels installed into /opt/venv of python-1g. torch 2.13.0 is the CPU build
# that lies on this machine's disk; the others come from PyPI. All are cp311
# manylinux wheels, which match Debian bookworm's python3.11 and glibc 2.36.
# Override with TURBOFS_PY1G_REQUIREMENTS (whitespace separated).
PYTHON_1G_REQUIREMENTS: tuple[str, ...] = (
    "torch==2.13.0",
    "numpy",
    "scipy",
    "pandas",
    "pillow",
)
PYTHON_1G_MIN_BYTES = 1_000_000_000

# python-5g: the same app on the CUDA build of torch (2.14.1, from the local package
# mirrors, as pip.conf sets them) with its nvidia-* wheels: cuBLAS, cuDNN, NCCL...
# Override with TURBOFS_PY5G_REQUIREMENTS (whitespace separated).
PYTHON_5G_REQUIREMENTS: tuple[str, ...] = ("torch==2.14.1", "numpy", "scipy", "pandas", "pillow")
PYTHON_5G_MIN_BYTES = 4_000_000_000

# python-10g: python-5g plus unread model weights.
PYTHON_10G_WEIGHT_FILES = 9
PYTHON_10G_WEIGHT_FILE_BYTES = 512 * 1024 * 1024
PYTHON_10G_MIN_BYTES = 9_000_000_000

_T_START = time.monotonic()


class ImageBuildError(RuntimeError):
    """A step of an image build failed; the message says which and why."""


def _log(msg: str) -> None:
    print(f"bench.images [{time.monotonic() - _T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The root of the turbofs cache: ``$TURBOFS_CACHE`` or ``~/.cache/turbofs``."""
    env = os.environ.get("TURBOFS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turbofs"


def images_dir() -> Path:
    return cache_dir() / "images"


def image_path(name: str) -> Path:
    """Where the layout of image ``name`` lies once built (it may not exist yet)."""
    return images_dir() / name


# --------------------------------------------------------------------------- helpers


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PATH", DEFAULT_PATH)
    for extra in ("/usr/sbin", "/sbin"):
        if extra not in path.split(":"):
            path = f"{path}:{extra}"
    env["PATH"] = path
    env["DEBIAN_FRONTEND"] = "noninteractive"
    env["LC_ALL"] = "C"
    return env


def _run(cmd: Sequence[str | os.PathLike[str]], *, log: Path | None = None) -> None:
    """Run ``cmd``; on failure raise ImageBuildError with the tail of its output.

    With ``log`` the output goes to that file (for long, chatty commands),
    otherwise it is captured.
    """
    argv = [os.fspath(c) for c in cmd]
    try:
        if log is not None:
            with log.open("ab") as out:
                proc = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=_tool_env(), check=False,
                )
            output = _tail(log)
        else:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, env=_tool_env(), check=False,
            )
            output = (proc.stdout + proc.stderr).decode(errors="replace")
            output = "\n".join(output.splitlines()[-30:])
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{argv[0]} not found; run scripts/bootstrap.sh to install the tools"
        ) from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"command failed with exit status {proc.returncode}: {' '.join(argv)}\n{output}"
        )


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(f"{what} needs root (debootstrap and umoci keep ownership and modes)")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _replace_dir(new: Path, final: Path) -> None:
    """Move the complete directory ``new`` to ``final``, replacing what was there."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, trash)
        os.rename(new, final)
        _rmtree(trash)
    else:
        os.rename(new, final)


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- debootstrap


def _clean_rootfs(root: Path) -> None:
    """Drop what debootstrap leaves that an image should not carry (as Debian's images do)."""
    lists = root / "var/lib/apt/lists"
    if lists.is_dir():
        for entry in lists.iterdir():
            if entry.name not in ("partial", "lock"):
                _rmtree(entry)
    for cache in (root / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    archives = root / "var/cache/apt/archives"
    if archives.is_dir():
        for deb in archives.glob("*.deb"):
            deb.unlink()
    # debootstrap copies these from the build host.
    _write(root / "etc/hostname", "localhost\n")
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    _write(resolv, "")


def debootstrap_tarball(include: Sequence[str] = (), *, force: bool = False) -> Path:
    """A cached tar of ``debootstrap --variant=minbase bookworm`` (plus ``include``).

    Built once, then reused by every image that starts from it.
    """
    _require_root("debootstrap")
    name = f"{DEBIAN_SUITE}-minbase"
    if include:
        name += "-" + hashlib.sha256(",".join(sorted(include)).encode()).hexdigest()[:12]
    out_dir = cache_dir() / "debootstrap"
    final = out_dir / f"{name}.tar"
    with _locked(out_dir / f".{name}.lock"):
        if final.is_file() and not force:
            _log(f"debootstrap rootfs cached: {final}")
            return final
        mirror = os.environ.get("TURBOFS_DEBIAN_MIRROR", DEFAULT_MIRROR)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
        try:
            root = work / "rootfs"
            log = work / "debootstrap.out"
            cmd = ["debootstrap", "--variant=minbase"]
            if include:
                cmd.append("--include=" + ",".join(include))
            cmd += [DEBIAN_SUITE, str(root), mirror]
            _log(f"running {' '.join(cmd)} (log: {log})")
            started = time.monotonic()
            try:
                _run(cmd, log=log)
            except ImageBuildError as exc:
                inner_log = root / "debootstrap/debootstrap.log"
                inner = _tail(inner_log, 40)
                detail = f"\n--- debootstrap.log (tail) ---\n{inner}" if inner else ""
                kept = out_dir / f"{name}.failed.log"  # the work dir goes away; keep the logs
                with kept.open("wb") as fh:
                    for part in (log, inner_log):
                        with contextlib.suppress(OSError):
                            fh.write(part.read_bytes())
                raise ImageBuildError(f"debootstrap failed (full log: {kept}): {exc}{detail}") from exc
            _log(f"debootstrap done in {time.monotonic() - started:.1f}s")
            (out_dir / f"{name}.failed.log").unlink(missing_ok=True)
            _clean_rootfs(root)
            tmp_tar = work / "rootfs.tar"
            _run([
                "tar", "--create", "--file", tmp_tar, "--directory", root,
                "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
                "--sort=name", ".",
            ])
            os.replace(tmp_tar, final)
            _log(f"cached {final} ({final.stat().st_size / 1e6:.0f} MB)")
        finally:
            _rmtree(work)
    return final


# --------------------------------------------------------------------------- umoci


class UmociImage:
    """An OCI layout being built with umoci, one tag, through one runtime bundle.

    ``unpack`` once, change ``rootfs``, ``repack`` to add a layer; the bundle is
    refreshed after each repack so the next layer holds only the next changes.
    """

    def __init__(self, layout: Path, work: Path, tag: str = TAG) -> None:
        self.layout = layout
        self.bundle = work / "bundle"
        self.ref = f"{layout}:{tag}"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def init(self) -> None:
        _run(["umoci", "init", "--layout", self.layout])
        _run(["umoci", "new", "--image", self.ref])
        _run(["umoci", "unpack", "--image", self.ref, self.bundle])

    def repack(self, created_by: str, comment: str = "") -> None:
        cmd: list[str | os.PathLike[str]] = [
            "umoci", "repack", "--refresh-bundle", "--image", self.ref,
            "--history.created_by", created_by,
        ]
        if comment:
            cmd += ["--history.comment", comment]
        _run([*cmd, self.bundle])

    def config(
        self,
        *,
        entrypoint: Sequence[str],
        cmd: Sequence[str] = (),
        env: Sequence[str] = (),
        workingdir: str = "/",
        labels: Sequence[str] = (),
    ) -> None:
        argv: list[str | os.PathLike[str]] = [
            "umoci", "config", "--image", self.ref, "--author", "turbofs bench",
            "--config.workingdir", workingdir, "--history.created_by", "umoci config",
        ]
        for arg in entrypoint:
            argv += ["--config.entrypoint", arg]
        for arg in cmd:
            argv += ["--config.cmd", arg]
        for var in env:
            argv += ["--config.env", var]
        for label in labels:
            argv += ["--config.label", label]
        _run(argv)

    def finish(self) -> None:
        _run(["umoci", "gc", "--layout", self.layout])
        _rmtree(self.bundle)


def _extract_tarball(tarball: Path, dest: Path) -> None:
    _run([
        "tar", "--extract", "--file", tarball, "--directory", dest,
        "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*", "--acls",
    ])


# --------------------------------------------------------------------------- layout info


def _read_blob_json(layout: Path, digest: str) -> Any:
    algo, _, hexd = digest.partition(":")
    return json.loads((layout / "blobs" / algo / hexd).read_bytes())


def _uncompressed_size(blob: Path, media_type: str) -> int:
    opener: Callable[[Path], Any]
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        opener = gzip.open
    elif media_type.endswith(".tar") or media_type.endswith("rootfs.diff.tar"):
        opener = Path.open
    else:
        return -1
    total = 0
    with opener(blob) as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
    return total


def layout_info(layout: Path, tag: str = TAG) -> dict[str, Any]:
    """Sizes of the image ``tag`` in ``layout``: per layer and in total."""
    index = json.loads((layout / "index.json").read_text())
    manifests = [
        m for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if not manifests:
        raise ImageBuildError(f"no manifest tagged {tag!r} in {layout}")
    manifest = _read_blob_json(layout, manifests[0]["digest"])
    config = _read_blob_json(layout, manifest["config"]["digest"])
    history = [h for h in config.get("history", []) if not h.get("empty_layer")]
    layers = []
    for i, layer in enumerate(manifest["layers"]):
        algo, _, hexd = layer["digest"].partition(":")
        blob = layout / "blobs" / algo / hexd
        layers.append({
            "digest": layer["digest"],
            "media_type": layer["mediaType"],
            "compressed_bytes": layer["size"],
            "uncompressed_bytes": _uncompressed_size(blob, layer["mediaType"]),
            "created_by": history[i].get("created_by", "") if i < len(history) else "",
        })
    return {
        "tag": tag,
        "manifest_digest": manifests[0]["digest"],
        "layers": layers,
        "compressed_bytes": sum(x["compressed_bytes"] for x in layers),
        "uncompressed_bytes": sum(x["uncompressed_bytes"] for x in layers),
        "config": config.get("config", {}),
    }


# --------------------------------------------------------------------------- sample


SAMPLE_RUN_SH = """\
#!/bin/sh
# turbofs sample application: prints its version and a data file.
set -eu
echo "sample app $(cat /app/VERSION) says: ${GREETING:-hello} ${1:-world}"
cat /app/current
"""

SAMPLE_HELLO = "Hello from a turbofs sample image.\n"


def _debian_minbase_layer(image: UmociImage, include: Sequence[str] = ()) -> None:
    tarball = debootstrap_tarball(include)
    _log(f"layer 1: Debian {DEBIAN_SUITE} minbase from {tarball.name}")
    _extract_tarball(tarball, image.rootfs)
    extra = f" --include={','.join(include)}" if include else ""
    image.repack(f"debootstrap --variant=minbase{extra} {DEBIAN_SUITE}", "Debian base")


def build_sample(layout: Path, work: Path) -> None:
    """Build the ``sample`` image into ``layout`` (which must not exist yet)."""
    image = UmociImage(layout, work)
    image.init()
    _debian_minbase_layer(image)
    root = image.rootfs

    _log("layer 2: app files (script, symlinks, hardlink, xattr, setuid, uid 1000)")
    app = root / "app"
    _write(app / "run.sh", SAMPLE_RUN_SH, 0o755)
    _write(app / "VERSION", "1.0.0\n")
    hello = _write(app / "data/hello.txt", SAMPLE_HELLO)
    os.link(hello, app / "data/hello-hardlink.txt")
    os.symlink("data/hello.txt", app / "current")  # relative symlink
    (app / "bin").mkdir()
    os.symlink("/bin/sh", app / "bin/sh")  # absolute symlink, resolves inside the image
    xattr_file = _write(app / "data/with-xattr.txt", "this file carries a user.* xattr\n")
    try:
        os.setxattr(xattr_file, "user.turbofs.origin", b"bench sample layer 2")
    except OSError as exc:
        raise ImageBuildError(
            f"cannot set a user.* xattr under {work} ({exc}); put TURBOFS_CACHE on a "
            "filesystem that supports them"
        ) from exc
    suid = app / "bin/suid-true"
    shutil.copy2(root / "usr/bin/true", suid)
    suid.chmod(0o4755)
    owned = _write(app / "data/owned-by-1000.txt", "owned by uid/gid 1000\n", 0o640)
    os.chown(owned, 1000, 1000)
    _write(app / "data/naïve café.txt", "a name with spaces and non-ASCII\n")
    _write(app / "data/empty", "")
    _write(app / "data/random.bin", random.Random(20240601).randbytes(3 << 20))
    (app / "tmp").mkdir()
    (app / "tmp").chmod(0o1777)
    image.repack("turbofs bench: add /app", "app files")

    _log("layer 3: delete /etc/motd and /etc/cron.daily, replace /etc/issue and /app/VERSION")
    for gone in (root / "etc/motd", root / "etc/cron.daily"):
        if not gone.exists():
            raise ImageBuildError(f"expected {gone} in the Debian base layer")
    (root / "etc/motd").unlink()
    shutil.rmtree(root / "etc/cron.daily")
    _write(root / "etc/issue", "turbofs sample image \\n \\l\n")
    _write(app / "VERSION", "1.1.0\n")
    image.repack("turbofs bench: update", "deletes and replacements (whiteouts)")

    image.config(
        entrypoint=["/app/run.sh"],
        cmd=["world"],
        env=[f"PATH={DEFAULT_PATH}", "GREETING=hello", "LANG=C.UTF-8"],
        workingdir="/app",
        labels=["org.opencontainers.image.title=turbofs-sample"],
    )
    image.finish()


# --------------------------------------------------------------------------- python-1g


PY_VERSION = "3.11"
VENV = "/opt/venv"
VENV_SITE = f"{VENV}/lib/python{PY_VERSION}/site-packages"

PYTHON_1G_APP = '''\
"""turbofs benchmark app: from process start to one forward pass of a tiny model."""

import os
import time

_T0 = time.monotonic()


def since_process_start() -> float:
    """Seconds since this process started (from /proc), else since this module ran."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _T0


def main() -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    with torch.no_grad():
        out = model(torch.randn(8, 64))
    assert tuple(out.shape) == (8, 10), out.shape
    print(f"READY {since_process_start():.3f}", flush=True)


if __name__ == "__main__":
    main()
'''


def _python_1g_requirements() -> list[str]:
    env = os.environ.get("TURBOFS_PY1G_REQUIREMENTS")
    return env.split() if env else list(PYTHON_1G_REQUIREMENTS)


def _python_5g_requirements() -> list[str]:
    env = os.environ.get("TURBOFS_PY5G_REQUIREMENTS")
    return env.split() if env else list(PYTHON_5G_REQUIREMENTS)


def _install_venv(root: Path, work: Path, requirements: Sequence[str] | None = None) -> None:
    """Make /opt/venv in ``root``: a venv of the image's python3 with real wheels."""
    _run(["chroot", root, "/usr/bin/python3", "-m", "venv", "--without-pip", VENV])
    site = root / VENV_SITE.lstrip("/")
    if not site.is_dir():
        raise ImageBuildError(f"venv in the image has no {VENV_SITE}")
    reqs = list(requirements) if requirements is not None else _python_1g_requirements()
    log = work / "pip.out"
    _log(f"pip install --target {VENV_SITE} {' '.join(reqs)} (log: {log})")
    started = time.monotonic()
    _run(
        [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
            "--no-input", "--only-binary=:all:", "--target", site, *reqs,
        ],
        log=log,
    )
    _log(f"pip done in {time.monotonic() - started:.1f}s")
    # pip --target puts console scripts in <target>/bin with the host's
    # interpreter in their shebang: move them to the venv's bin and point them
    # at the venv's python, as a venv made inside the image would have them.
    target_bin = site / "bin"
    if target_bin.is_dir():
        venv_bin = root / VENV.lstrip("/") / "bin"
        for script in sorted(target_bin.iterdir()):
            data = script.read_bytes()
            if data.startswith(b"#!"):
                _, _, rest = data.partition(b"\n")
                data = f"#!{VENV}/bin/python3".encode() + b"\n" + rest
            dest = venv_bin / script.name
            dest.write_bytes(data)
            dest.chmod(0o755)
        shutil.rmtree(target_bin)


def build_python_1g(layout: Path, work: Path) -> None:
    """Build the ``python-1g`` image into ``layout`` (which must not exist yet)."""
    _build_python_image(layout, work, _python_1g_requirements(), "turbofs-python-1g")


def build_python_5g(layout: Path, work: Path) -> None:
    """Build the ``python-5g`` image (torch with CUDA) into ``layout``."""
    _build_python_image(layout, work, _python_5g_requirements(), "turbofs-python-5g")


def _build_python_image(layout: Path, work: Path, reqs: Sequence[str], title: str) -> None:
    image = UmociImage(layout, work)
    image.init()
    _debian_minbase_layer(image, include=("python3", "python3-venv", "ca-certificates"))
    root = image.rootfs

    _log(f"layer 2: virtualenv at {VENV}")
    _install_venv(root, work, reqs)
    image.repack(f"pip install --target {VENV_SITE} {' '.join(reqs)}", "venv")

    _log("layer 3: /app/app.py")
    _write(root / "app/app.py", PYTHON_1G_APP)
    image.repack("turbofs bench: add /app/app.py", "app")

    image.config(
        entrypoint=["/usr/bin/python3", "/app/app.py"],
        env=[
            f"PATH={VENV}/bin:{DEFAULT_PATH}",
            f"VIRTUAL_ENV={VENV}",
            f"PYTHONPATH={VENV_SITE}",
            "PYTHONUNBUFFERED=1",
            "LANG=C.UTF-8",
        ],
        workingdir="/app",
        labels=[f"org.opencontainers.image.title={title}"],
    )
    image.finish()


def _weights(seed: int, size: int, piece: int = 16 << 20) -> Iterator[bytes]:
    """``size`` bytes of float16 values from a normal distribution (sigma 0.02, like
    initialised transformer weights), in pieces."""
    import numpy as np

    rng = np.random.default_rng(seed)
    left = size
    while left > 0:
        n = min(piece, left)
        yield (rng.standard_normal(n // 2, dtype=np.float32) * 0.02).astype(np.float16).tobytes()[:n]
        left -= n


class DigestingWriter:
    """A write-only file that hashes (sha256) and counts what goes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return int(self.raw.write(data))

    def flush(self) -> None:
        self.raw.flush()


def build_python_10g(layout: Path, work: Path) -> None:
    """Build ``python-10g``: python-5g's layout plus a layer of model weights."""
    import tarfile

    from isal import igzip

    base = ensure_image("python-5g")
    index = json.loads((base / "index.json").read_text())
    (mdesc,) = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG]
    manifest = _read_blob_json(base, mdesc["digest"])
    config = _read_blob_json(base, manifest["config"]["digest"])
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (base / "blobs" / "sha256").iterdir():
        os.link(blob, blobs / blob.name)
    shutil.copy(base / "oci-layout", layout / "oci-layout")
    _log(f"layer 4: {PYTHON_10G_WEIGHT_FILES} weight files of {PYTHON_10G_WEIGHT_FILE_BYTES >> 20} MiB")
    tmp = work / "weights.tar.gz"
    mtime = 1_700_000_000
    with tmp.open("wb") as raw:
        gz_sink = DigestingWriter(raw)
        with igzip.IGzipFile(fileobj=gz_sink, mode="wb", compresslevel=1, mtime=0) as gz:  # type: ignore[no-untyped-call]
            tar_sink = DigestingWriter(gz)
            with tarfile.open(fileobj=tar_sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                d = tarfile.TarInfo("models")
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, mtime
                tar.addfile(d)
                n = PYTHON_10G_WEIGHT_FILES
                for i in range(n):
                    info = tarfile.TarInfo(f"models/model-{i + 1:05d}-of-{n:05d}.safetensors")
                    info.size, info.mode, info.mtime = PYTHON_10G_WEIGHT_FILE_BYTES, 0o644, mtime
                    tar.addfile(info, _ChainReader(_weights(1000 + i, info.size)))
                    _log(f"  weights {i + 1}/{n}")
    layer_digest = "sha256:" + gz_sink.sha.hexdigest()
    os.replace(tmp, blobs / gz_sink.sha.hexdigest())
    config = dict(config)
    config["rootfs"] = {"type": "layers", "diff_ids": [*config["rootfs"]["diff_ids"],
                                                       "sha256:" + tar_sink.sha.hexdigest()]}
    config["history"] = [*config.get("history", []), {
        "created": "2023-11-14T22:13:20Z", "created_by": "turbofs bench: add /models (unread weights)",
        "comment": "weights"}]
    config["config"] = dict(config.get("config", {}))
    config["config"]["Labels"] = {**config["config"].get("Labels", {}),
                                  "org.opencontainers.image.title": "turbofs-python-10g"}
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    (blobs / config_digest).write_bytes(config_bytes)
    manifest = dict(manifest)
    manifest["config"] = {**manifest["config"], "digest": "sha256:" + config_digest, "size": len(config_bytes)}
    manifest["layers"] = [*manifest["layers"], {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                                 "digest": layer_digest, "size": gz_sink.size}]
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    (blobs / manifest_digest).write_bytes(manifest_bytes)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + manifest_digest,
        "size": len(manifest_bytes), "annotations": {"org.opencontainers.image.ref.name": TAG}}]}))
    # the python-5g blobs that this image does not use (none today) would be garbage: none to remove


class _ChainReader:
    """A file-like ``read`` over an iterator of byte pieces (for tarfile.addfile)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            try:
                self.buf += next(self.pieces)
            except StopIteration:
                break
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _check_python_10g(info: dict[str, Any]) -> None:
    size = int(info["uncompressed_bytes"])
    if size < PYTHON_10G_MIN_BYTES:
        raise ImageBuildError(f"python-10g is only {size / 1e9:.2f} GB uncompressed (want >= 9 GB)")


def _check_python_1g(info: dict[str, Any]) -> None:
    size = int(info["uncompressed_bytes"])
    if size < PYTHON_1G_MIN_BYTES and "TURBOFS_PY1G_REQUIREMENTS" not in os.environ:
        raise ImageBuildError(
            f"python-1g is only {size / 1e9:.2f} GB uncompressed (want >= 1 GB)"
        )


def _check_python_5g(info: dict[str, Any]) -> None:
    size = int(info["uncompressed_bytes"])
    if size < PYTHON_5G_MIN_BYTES and "TURBOFS_PY5G_REQUIREMENTS" not in os.environ:
        raise ImageBuildError(f"python-5g is only {size / 1e9:.2f} GB uncompressed (want >= 4 GB)")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ImageSpec:
    name: str
    build: Callable[[Path, Path], None]
    description: str
    check: Callable[[dict[str, Any]], None] | None = None


IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec("sample", build_sample, "small Debian image with whiteouts, links, xattrs"),
        ImageSpec("python-1g", build_python_1g, "Debian + torch/numpy venv, > 1 GB", _check_python_1g),
        ImageSpec("python-5g", build_python_5g, "python-1g with torch's CUDA build and nvidia wheels, ~5 GB",
                  _check_python_5g),
        ImageSpec("python-10g", build_python_10g, "python-5g plus 4.5 GB of model weights the startup does not read",
                  _check_python_10g),
    )
}


def ensure_image(name: str, *, force: bool = False) -> Path:
    """Return the layout of image ``name``, building it first if it is not cached.

    The layout holds one image tagged ``latest``: ``oci:<path>:latest``.
    """
    try:
        spec = IMAGES[name]
    except KeyError:
        raise ImageBuildError(f"unknown image {name!r}; known: {', '.join(IMAGES)}") from None
    final = image_path(name)
    with _locked(images_dir() / f".{name}.lock"):
        if not force and (final / "index.json").is_file() and (final / INFO_FILE).is_file():
            _log(f"image cached: {final}")
            return final
        _require_root(f"building image {name}")
        work = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=images_dir()))
        try:
            layout = work / "layout"
            started = time.monotonic()
            _log(f"building image {name} in {work}")
            spec.build(layout, work)
            info = layout_info(layout)
            info["name"] = name
            info["build_seconds"] = round(time.monotonic() - started, 1)
            if spec.check is not None:
                spec.check(info)
            (layout / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            _replace_dir(layout, final)
            _log(
                f"image {name} built in {info['build_seconds']}s: {len(info['layers'])} layers, "
                f"{info['uncompressed_bytes'] / 1e6:.0f} MB uncompressed, "
                f"{info['compressed_bytes'] / 1e6:.0f} MB compressed"
            )
        finally:
            _rmtree(work)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.images",
        description="Build (or reuse) a benchmark OCI image layout and print its path.",
        epilog="Images: " + "; ".join(f"{s.name}: {s.description}" for s in IMAGES.values()),
    )
    parser.add_argument("name", choices=sorted(IMAGES), help="image to build")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        path = ensure_image(args.name, force=args.force)
    except ImageBuildError as exc:
        print(f"bench.images: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
