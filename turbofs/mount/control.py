"""The daemon's control socket, ``<state>/control.sock``: the server side of
:func:`turbofs.mount.ctl.query`.

One command a connection (a line: ``status``, ``metrics``, ``trace``); the answer is
written back whole and the connection closed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from turbofs.core.config import CONTROL_BACKLOG, CONTROL_MAX_COMMAND


async def serve_control(path: Path, answer: Callable[[str], Awaitable[str]],
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the unix socket ``path`` (owner only) and answer each command with
    ``answer(command)``; ``task_status.started()`` once it listens."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(CONTROL_BACKLOG)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
            while b"\n" not in data and len(data) < CONTROL_MAX_COMMAND:
                piece = await stream.receive_some(CONTROL_MAX_COMMAND)
                if not piece:
                    break
                data += piece
            reply = await answer(data.strip().decode(errors="replace"))
            await stream.send_all(reply.encode())
            await stream.aclose()

    await trio.serve_listeners(handle, [listener])


__all__ = ["serve_control"]
