"""The registry's one way off the event loop: ``await offload(fn, *args)``.

The registry process is asyncio (aiohttp). Nothing that blocks runs on the event loop: file
writes, fsyncs, links and renames, reads of whole files, hashing, scrypt. Each such call goes
through :func:`offload`, which runs it in the loop's default executor (a bounded thread pool).
What stays on the loop: sockets, and blob bytes sent with sendfile(2) (aiohttp's FileResponse
and ``loop.sendfile``), the kernel's own zero-copy path. Setup before the server listens
(folders, the token signing key) may block; it runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def offload(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in a worker thread; its result or exception.

    A thread cannot be stopped midway: when the awaiting task is cancelled, the cancellation
    is raised only once ``fn`` has returned, so the caller's cleanup (closing a file, releasing
    an upload session) never races it.
    """
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    fut = loop.run_in_executor(None, call)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: the cancellation is what the caller sees
        raise
