"""A spare mount daemon: a process started ahead of need, its interpreter up and the
daemon's modules imported, waiting for the arguments of one ``turbofs mount``.

``python -m turbofs.mount.spare EVENTS_FD`` writes ``spare`` to ``EVENTS_FD`` (the pipe the
mount's ``ready`` comes through too), then reads one line from stdin, ``{"argv": [...],
"log": PATH}``, and becomes that mount's daemon (``turbofs ARGV --foreground --ready-fd
EVENTS_FD``, output to ``PATH``); end of input instead: it exits. Its starter
(:class:`turbofs.mount.ctl.SpareDaemon`) saves the interpreter start on the way to a ready mount.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m turbofs.mount.spare EVENTS_FD", file=sys.stderr)
        return 2
    events = int(argv[0])
    from turbofs import cli
    from turbofs.mount import daemon  # the imports are the point

    os.write(events, b"spare\n")
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    daemon.handed_now()
    try:
        req = json.loads(line)
        args = [str(a) for a in req["argv"]]
        log_path = str(req["log"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"turbofs spare daemon: bad request {line[:200]!r}: {exc}", file=sys.stderr)
        return 2
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # as a daemon started for the mount: no input
    os.close(devnull)
    return cli.main([*args, "--foreground", "--ready-fd", str(events)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
