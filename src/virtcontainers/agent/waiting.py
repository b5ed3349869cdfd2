"""Waiting on the guest agent while watching the VM: a VM that dies during the wait is
reported at once, not when the wait's own timeout runs out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import VCError

T = TypeVar("T")


async def wait_watched(
    aw: Awaitable[T],
    check: Callable[[], Awaitable[object]],
    interval: float,
    *,
    discard: Callable[[T], Awaitable[object]] | None = None,
) -> T:
    """Await `aw`, calling `check()` every `interval` seconds until it completes.

    An exception from `check()` (or a cancellation) cancels `aw` and propagates; a result
    `aw` produced meanwhile goes to `discard` (e.g. to close a connection nobody will use).
    """
    task = asyncio.ensure_future(aw)
    handed_over = False
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                handed_over = True
                return task.result()
            await check()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, VCError):
                await task
        elif (
            not handed_over
            and discard is not None
            and not task.cancelled()
            and task.exception() is None
        ):
            await discard(task.result())
