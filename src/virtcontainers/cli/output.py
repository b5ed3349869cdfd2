"""What commands print: JSON, tables, one-line results, progress; and running coroutines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .app import Globals

T = TypeVar("T")


def emit_json(data: Any) -> None:
    """Print JSON to stdout (machine-readable output)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def line(text: str, *, err: bool = False) -> None:
    """Print one line as it is (no markup) to stdout, or to stderr with `err`."""
    (sys.stderr if err else sys.stdout).write(text + "\n")


def say(g: Globals, data: dict[str, Any], text: str) -> None:
    """A command's result: `data` as JSON with --json, else `text`."""
    if g.json:
        emit_json(data)
    else:
        line(text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """Print rows as left-aligned columns under `headers` (and a `title` line above)."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        line(title)
    for r in cells:
        line("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop. SIGTERM and SIGHUP cancel it as
    SIGINT does, so its clean-up runs (a VM is stopped, not left behind); then `Terminated`."""
    import asyncio

    return asyncio.run(_stoppable(coro))


async def _stoppable(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio
    import signal

    from .app import Terminated

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[int] = []

    def stop(signo: int) -> None:
        if not got and task is not None:
            got.append(signo)
            task.cancel()

    installed = []
    for signo in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signo) is signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            continue
        try:
            loop.add_signal_handler(signo, stop, signo)
        except (RuntimeError, ValueError):  # not the main thread: signals are not ours
            break
        installed.append(signo)
    try:
        result = await coro
    except asyncio.CancelledError:
        if not got:
            raise
        raise Terminated(got[0]) from None
    finally:
        for signo in installed:
            loop.remove_signal_handler(signo)
    if got:
        raise Terminated(got[0])
    return result


def with_spinner(label: str, make: Callable[[], Awaitable[T]], quiet: bool = False) -> T:
    """Run `make()`, with a spinner and the elapsed time on stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        return run_async(_await(make))
    import asyncio

    from rich.console import Console

    start = time.monotonic()

    async def body() -> T:
        with Console(stderr=True).status(f"{label} (0.0 s)") as status:
            task = asyncio.ensure_future(_await(make))
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=0.1)
                    status.update(f"{label} ({time.monotonic() - start:.1f} s)")
            finally:  # cancelled (a signal): `make` cleans up before we return
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
            return task.result()

    return run_async(body())


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()
