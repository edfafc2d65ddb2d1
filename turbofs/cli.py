"""The ``turbofs`` command line: parse, build the configuration, call the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from turbofs import __version__
from turbofs.core.config import build_config
from turbofs.core.errors import TurboError, UsageError


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 256K, 4M, 10G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named flags, as overrides for a ``*_config`` loader (None: not given)."""
    return {name: getattr(args, name) for name in names}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbofs", description="Turbo images: lazy-loading containers.")
    p.add_argument("--version", action="version", version=f"turbofs {__version__}")
    p.add_argument("--config", type=Path, help="config file (default /etc/turbofs/config.toml if present)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build",
        help="convert an image into a turbo image (OCI layout)",
        description="Convert SOURCE into a turbo image written as an OCI image layout at --output. "
        "SOURCE is oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REF], dir:ROOTFS, "
        "or a path recognised by its content.",
    )
    b.add_argument("source")
    b.add_argument("-o", "--output", type=Path, required=True, help="output OCI layout directory")
    b.add_argument("--tag", help="tag of the turbo image in the output layout (default: latest)")
    b.add_argument("--force", action="store_true", help="replace --output if it exists")
    b.add_argument("--chunk-size", type=_size, help="uncompressed chunk size, a power of two (default 256K)")
    b.add_argument("--level", type=int, dest="zstd_level", help="zstd level (default 3)")
    b.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")
    b.add_argument("--workers", type=int, help="compression threads (default: number of CPUs)")
    b.add_argument("--max-layer-size", type=_size, help="refuse layers larger than this uncompressed")
    b.add_argument("--max-image-size", type=_size, help="refuse images larger than this uncompressed")
    b.add_argument("--max-entries", type=int, help="refuse images with more tar entries than this")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    b.add_argument("--verify", action="store_true", help="decode and check the written index")
    b.add_argument("--startup-trace", type=Path, metavar="FILE",
                   help="a recorded start (from `turbofs trace`, or a list of image paths): its chunks "
                   "are stored and prefetched first")

    s = sub.add_parser(
        "serve",
        help="run the turbofs registry (OCI Distribution API + turbo extensions)",
        description="Serve a registry with local storage. Listens on 127.0.0.1 by default; on any "
        "other address pushing needs a token (--users).",
    )
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 5050; 0 picks a free one)")
    s.add_argument("--storage", type=Path, help="storage folder (default /var/lib/turbofs/registry)")
    s.add_argument("--users", type=Path, dest="users_file", help="users file (lines of user:hash)")
    s.add_argument("--push-auth", action=argparse.BooleanOptionalAction, default=None,
                   help="require a token to push (default: when not on loopback)")
    s.add_argument("--pull-auth", action=argparse.BooleanOptionalAction, default=None,
                   help="require a token to pull (default: no)")
    s.add_argument("--auto-convert", action="append", metavar="REPO_GLOB",
                   help="convert plain images pushed to matching repositories into turbo images")

    pu = sub.add_parser(
        "push",
        help="push an image to a registry as a turbo image, sending only what it lacks",
        description="Push SOURCE (a turbo image layout, or any image 'turbofs build' accepts, "
        "converted first) to REGISTRY/REPO[:TAG].",
    )
    pu.add_argument("source")
    pu.add_argument("target", metavar="REGISTRY/REPO[:TAG]")
    pu.add_argument("--parallel", type=int, default=4, help="blobs uploaded at once (default 4)")
    pu.add_argument("--creds", metavar="USER[:PASSWORD]", help="registry credentials (default: ~/.docker/config.json)")
    pu.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS (default for loopback)")
    pu.add_argument("--chunk-size", type=_size, help="chunk size when converting (default 256K)")
    pu.add_argument("--level", type=int, dest="zstd_level", help="zstd level when converting (default 3)")
    pu.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    sc = sub.add_parser(
        "scrub",
        help="check every blob of a registry's storage against its digest; set bad ones aside",
        description="Hash every blob in the registry's storage folder. A blob whose bytes no longer "
        "match its digest is moved to STORAGE/quarantine/ (not served any more: HEAD and GET answer "
        "404, so clients upload it again and that upload repairs it). Safe while the registry runs. "
        "Exit status 0: all blobs good; 1: bad blobs found (listed).",
    )
    sc.add_argument("--storage", type=Path, help="storage folder (default: the registry's, /var/lib/turbofs/registry)")
    sc.add_argument("--dry-run", action="store_true", help="only report bad blobs; move nothing")

    pw = sub.add_parser(
        "passwd",
        help="print a users-file line (user:hash) for the registry",
        description="Read USER's password from stdin (one line), or prompt twice on a terminal, and "
        "print 'USER:HASH' for the registry's users file (turbofs serve --users FILE).",
    )
    pw.add_argument("user")

    m = sub.add_parser(
        "mount",
        help="mount a turbo image lazily (FUSE); returns once the mount is ready",
        description="Mount REF (REGISTRY/REPO:TAG, REGISTRY/REPO@DIGEST, or a local turbo layout "
        "[oci:]DIR[:TAG]) read-only at MOUNTPOINT. Only the manifest and the index are fetched "
        "before the mount is ready; file data comes on demand and by background prefetch.",
    )
    m.add_argument("ref")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--foreground", action="store_true", help="run the daemon in this process")
    m.add_argument("--wait", action="store_true", help="return only once the whole image is prefetched")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--creds", metavar="USER[:PASSWORD]", help="registry credentials (default: ~/.docker/config.json)")
    m.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry (default for loopback)")
    m.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")
    m.add_argument("--cache-dir", type=Path, help="disk cache folder (default /var/lib/turbofs/cache)")
    m.add_argument("--disk-cache-size", type=_size, dest="disk_cache_bytes", help="disk cache bound (default 16G)")
    m.add_argument("--ram-cache-size", type=_size, dest="ram_cache_bytes", help="RAM cache bound (default 256M)")
    m.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch the whole image in the background (default: yes)")
    m.add_argument("--prefetch-bandwidth", type=_size, help="cap for background prefetch, bytes/s (default: none)")
    m.add_argument("--read-timeout", type=float, help="seconds a read waits for the registry before EIO (default 30)")
    m.add_argument("--run-dir", type=Path, help="state folder of mounts (default /run/turbofs/mounts)")
    m.add_argument("--mode", choices=("auto", "erofs", "fuse"),
                   help="erofs: the kernel mounts erofs metadata built from the index; fuse: every "
                   "file through FUSE (default auto: erofs where the kernel has it)")

    def mount_target(q: argparse.ArgumentParser) -> argparse.ArgumentParser:
        q.add_argument("mountpoint", type=Path)
        q.add_argument("--run-dir", type=Path, help="state folder of mounts (default /run/turbofs/mounts)")
        return q

    mount_target(sub.add_parser("umount", help="unmount a turbofs mount and stop its daemon"))
    st = mount_target(sub.add_parser("status", help="the state of a turbofs mount: prefetch progress, caches, errors"))
    st.add_argument("--metrics", action="store_true", help="Prometheus text instead of JSON")

    tr = mount_target(sub.add_parser(
        "trace",
        help="write what a mount has read so far as a startup trace (for build --startup-trace)",
        description="Ask the daemon of MOUNTPOINT which chunks reads have used since it mounted, in "
        "first-use order, and write them as a startup trace (JSON). Mount the image, start its process "
        "once, then `turbofs trace`: `turbofs build --startup-trace FILE` stores the trace in the index "
        "so that every cold start fetches those chunks first.",
    ))
    tr.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")

    sn = sub.add_parser(
        "snapshotter",
        help="serve the containerd snapshotter (proxy plugin) on a unix socket",
        description="Serve containerd.services.snapshots.v1.Snapshots on --address for containerd's "
        "[proxy_plugins.turbofs] (type = \"snapshot\"). Turbo images become lazy turbofs mounts, one per "
        "image, shared by their containers; plain images unpack as with containerd's overlayfs "
        "snapshotter. Settings: the [snapshotter] table of the config file (mounts: [daemon]).",
    )
    sn.add_argument("--address", type=Path, help="unix socket to listen on (default /run/turbofs/snapshotter.sock)")
    sn.add_argument("--root", type=Path, help="state folder (default /var/lib/turbofs/snapshotter)")
    sn.add_argument("--run-dir", type=Path, help="state of its mount daemons (default /run/turbofs/snapshotter)")

    def containerd_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--address", "-a", help="containerd's socket (default $CONTAINERD_ADDRESS or /run/containerd/containerd.sock)")
        q.add_argument("--namespace", "-n", help="containerd namespace (default $CONTAINERD_NAMESPACE or default)")
        q.add_argument("--snapshotter", help="snapshotter name in containerd (default $CONTAINERD_SNAPSHOTTER or turbofs)")
        q.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry (default for loopback)")
        q.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")

    pl = sub.add_parser(
        "pull",
        help="give containerd a turbo image lazily (no layer is downloaded)",
        description="Put REF's manifest and config into containerd's content store, create the image "
        "record, and have the turbofs snapshotter mount the image lazily; then 'ctr run --snapshotter "
        "turbofs REF ...' starts at once.",
    )
    pl.add_argument("ref", metavar="REGISTRY/REPO[:TAG|@DIGEST]")
    containerd_flags(pl)

    rn = sub.add_parser(
        "run",
        help="pull a turbo image lazily and run a container of it (through ctr run)",
        description="'turbofs pull REF', then 'ctr run --snapshotter turbofs REF ID ARGS' with ARGS the "
        "image's Entrypoint followed by CMD (or the image's Cmd); env, working directory and user come "
        "from the image. The container's output streams here; the exit status is the container's.",
    )
    rn.add_argument("ref", metavar="REGISTRY/REPO[:TAG|@DIGEST]")
    rn.add_argument("cmd", nargs="*", metavar="CMD", help="command and arguments (after --)")
    rn.add_argument("--rm", action="store_true", help="remove the container when it exits")
    rn.add_argument("--name", help="container ID (default turbofs-RANDOM)")
    rn.add_argument("--tty", "-t", action="store_true", help="allocate a terminal")
    rn.add_argument("--detach", "-d", action="store_true", help="start the container in the background")
    rn.add_argument("--entrypoint", help="replace the image's Entrypoint (and drop its Cmd); '' for none")
    containerd_flags(rn)
    return p


def _cmd_mount(args: argparse.Namespace) -> int:
    from turbofs.core import oci
    from turbofs.core.config import daemon_config
    from turbofs.mount import ctl as mountctl

    cfg = daemon_config(args.config, **_flags(args, "cache_dir", "disk_cache_bytes", "ram_cache_bytes", "prefetch",
                                              "prefetch_bandwidth", "read_timeout", "mode"))
    if not args.mountpoint.is_dir() and not mountctl.is_stale_mount(str(args.mountpoint)):
        raise UsageError(f"{args.mountpoint}: mountpoint is not a directory")
    req = mountctl.MountRequest(
        ref=args.ref,
        mountpoint=args.mountpoint.absolute(),
        cfg=cfg,
        run_dir=args.run_dir or mountctl.DEFAULT_RUN_DIR,
        auth=None if oci.split_local_ref(args.ref) else _client_auth(args.ref, args.creds),
        scheme="http" if args.plain_http else None,
        platform=args.platform,
    )
    if args.foreground:
        from turbofs.mount.daemon import run_foreground

        run_foreground(req, args.ready_fd)
        return 0
    argv = list(sys.argv[1:]) if args.argv is None else list(args.argv)
    pid = mountctl.mount_background([a for a in argv if a != "--wait"], req, wait=args.wait)
    print(f"mounted {args.ref} at {req.mountpoint} (daemon pid {pid})")
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    from turbofs.mount import ctl as mountctl

    mountctl.unmount(args.mountpoint.absolute(), args.run_dir or mountctl.DEFAULT_RUN_DIR)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from turbofs.mount import ctl as mountctl

    print(mountctl.query(args.mountpoint.absolute(), "metrics" if args.metrics else "status",
                       args.run_dir or mountctl.DEFAULT_RUN_DIR))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from turbofs.core.oci import atomic_write
    from turbofs.core.trace import parse
    from turbofs.mount import ctl as mountctl

    text = mountctl.query(args.mountpoint.absolute(), "trace", args.run_dir or mountctl.DEFAULT_RUN_DIR)
    trace = parse(text.encode(), name=f"trace of {args.mountpoint}")  # checks what the daemon sent
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write(args.output, text.encode())
    print(f"{len(trace.chunks)} chunks of {len(trace.files)} files", file=sys.stderr)
    return 0


def _cmd_snapshotter(args: argparse.Namespace) -> int:
    from turbofs.core.config import snapshotter_config
    from turbofs.snapshotter.service import serve

    cfg = snapshotter_config(args.config, address=args.address, root=args.root, run_dir=args.run_dir)
    serve(cfg, args.config)
    return 0


def _containerd_target(args: argparse.Namespace) -> Any:
    from turbofs.containerd import Target

    return Target.from_env(args.address, args.namespace, args.snapshotter)


def _cmd_pull(args: argparse.Namespace) -> int:
    from turbofs.containerd import pull

    result = pull(args.ref, _containerd_target(args), plain_http=args.plain_http, platform=args.platform)
    print(result.summary())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from turbofs.containerd import run

    entrypoint = None if args.entrypoint is None else ([args.entrypoint] if args.entrypoint else [])
    return run(args.ref, _containerd_target(args), args.cmd, rm=args.rm, container_id=args.name, tty=args.tty,
               detach=args.detach, entrypoint=entrypoint, plain_http=args.plain_http, platform=args.platform)


def _cmd_passwd(args: argparse.Namespace) -> int:
    import getpass

    from server.auth import check_username, passwd_line
    from turbofs.core.errors import UsageError

    check_username(args.user)
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    print(passwd_line(args.user, password))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from turbofs.push import push

    cfg = build_config(args.config, **_flags(args, "chunk_size", "zstd_level"))
    result = push(
        args.source,
        args.target,
        build_config=cfg,
        auth=_client_auth(args.target, args.creds),
        scheme="http" if args.plain_http else None,
        parallel=args.parallel,
        progress=args.progress,
    )
    print(result.summary())
    return 0


def _client_auth(target: str, creds: str | None) -> Any:
    """Registry credentials for a client command: --creds, else the Docker config file."""
    from turbofs.core.auth import auth_for_registry
    from turbofs.core.registry import Reference

    return auth_for_registry(Reference.parse(target).registry, creds)


def _cmd_scrub(args: argparse.Namespace) -> int:
    from server.storage import Storage
    from turbofs.core.config import registry_config

    cfg = registry_config(args.config, **_flags(args, "storage"))
    if not (cfg.storage / "blobs").is_dir():
        raise UsageError(f"{cfg.storage} is not a registry storage folder (no blobs/ in it)")
    report = Storage(cfg.storage, cfg).scrub(dry_run=args.dry_run)
    for digest, moved in sorted(report.bad.items()):
        repos = ", ".join(report.links[digest]) or "no repository"
        where = "left in place (dry run)" if args.dry_run else f"moved to {moved}" if moved else "repaired meanwhile"
        print(f"BAD {digest} ({repos}): {where}")
    print(f"scrub: {report.checked} blobs, {report.bytes} bytes checked, {len(report.bad)} bad")
    return 1 if report.bad else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.app import serve
    from turbofs.core.config import registry_config

    cfg = registry_config(args.config, **_flags(args, "host", "port", "storage", "users_file", "push_auth", "pull_auth",
                                                "auto_convert"))
    serve(cfg)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from index_builder.builder import build

    cfg = build_config(args.config, **_flags(args, "tag", "chunk_size", "zstd_level", "platform", "workers",
                                             "max_layer_size", "max_image_size", "max_entries"))
    trace = None
    if args.startup_trace is not None:
        from turbofs.core.trace import load

        trace = load(args.startup_trace)
    result = build(args.source, args.output, cfg, force=args.force, progress=args.progress, startup_trace=trace)
    if args.verify:
        from turbofs.core.image import open_layout_image

        open_layout_image(args.output, result.tag).index.verify()
    print(result.summary())
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": _cmd_build, "serve": _cmd_serve, "passwd": _cmd_passwd, "push": _cmd_push, "mount": _cmd_mount,
    "umount": _cmd_umount, "status": _cmd_status, "trace": _cmd_trace, "snapshotter": _cmd_snapshotter,
    "pull": _cmd_pull, "run": _cmd_run, "scrub": _cmd_scrub,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return _COMMANDS[args.command](args)
    except TurboError as exc:
        print(f"turbofs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("turbofs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
