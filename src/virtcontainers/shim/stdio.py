"""A process's stdio as containerd hands it over: FIFO paths (fifo:// or bare), `file://`
(stdout and stderr appended to one file) and `binary://` (a logging program reading the output
on fds 3 and 4, saying it is ready by closing fd 5). Output is copied as the process writes it,
stdin as the client writes it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .main import spawn

OPEN_TIMEOUT = 30.0
STDIN_GRACE = 0.1
STDIN_CHUNK = 1 << 16


class StdioError(Exception):
    """A stdio URI that cannot be used; the message names it."""


@dataclass(frozen=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


def _path(uri: str) -> tuple[str, str]:
    """(scheme, path) of a stdio URI; a bare path is a FIFO."""
    if "://" not in uri:
        return "fifo", uri
    parts = urlsplit(uri)
    if parts.scheme not in ("fifo", "file", "binary"):
        raise StdioError(f"unsupported stdio URI scheme {parts.scheme!r} in {uri}")
    if not parts.path:
        raise StdioError(f"stdio URI {uri} has no path")
    return parts.scheme, parts.path


class ProcessIO:
    """Open output targets of one process; `write_*` copy into them, `close` ends them."""

    def __init__(self, stdio: Stdio) -> None:
        self.stdio = stdio
        self._out: int | None = None
        self._err: int | None = None
        self._logger: int | None = None  # the logging binary's pid
        self._stdin_closed = asyncio.Event()

    @classmethod
    async def open(cls, stdio: Stdio, container_id: str, namespace: str) -> ProcessIO:
        io = cls(stdio)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await io._open(container_id, namespace)
        except TimeoutError as e:
            await io.close()
            raise StdioError(f"no reader opened the output FIFOs of {container_id}") from e
        except BaseException:
            await io.close()
            raise
        return io

    async def _open(self, container_id: str, namespace: str) -> None:
        kinds = {_path(u)[0] for u in (self.stdio.stdout, self.stdio.stderr) if u}
        if kinds - {"fifo"} and len(kinds) > 1:
            raise StdioError("stdout and stderr must use the same kind of URI")
        scheme, path = _path(self.stdio.stdout or self.stdio.stderr) if kinds else ("", "")
        if scheme == "file":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            self._err = os.dup(self._out)
        elif scheme == "binary":
            uri = self.stdio.stdout or self.stdio.stderr
            await self._wait_ready(self._start_logger(uri, container_id, namespace))
        else:
            if self.stdio.stdout:
                self._out = await _open_fifo(_path(self.stdio.stdout)[1])
            if self.stdio.stderr and not self.stdio.terminal:
                self._err = await _open_fifo(_path(self.stdio.stderr)[1])

    def _start_logger(self, uri: str, container_id: str, namespace: str) -> int:
        parts = urlsplit(uri)
        args: list[str] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            args += [key, value] if value else [key]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        env = dict(os.environ, CONTAINER_ID=container_id, CONTAINER_NAMESPACE=namespace)
        try:
            self._logger = spawn([parts.path, *args], [out_r, err_r, ready_w], env)
        except OSError as e:
            for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
                os.close(fd)
            raise StdioError(f"logging binary {parts.path}: {e}") from e
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
        self._out, self._err = out_w, err_w
        return ready_r

    async def _wait_ready(self, ready_r: int) -> None:
        """The logger closes fd 5 (or exits) when it is ready to read."""

        def wait() -> None:
            while os.read(ready_r, 64):
                pass

        try:
            await asyncio.to_thread(wait)
        finally:
            os.close(ready_r)

    async def write_stdout(self, data: bytes) -> None:
        await _write(self._out, data)

    async def write_stderr(self, data: bytes) -> None:
        await _write(self._err if self._err is not None else self._out, data)

    async def copy_output(self, stream: AsyncIterator[bytes], stderr: bool = False) -> None:
        """Copy a process's output stream to stdout (or stderr) chunk by chunk, as written."""
        async for chunk in stream:
            await (self.write_stderr if stderr else self.write_stdout)(chunk)

    async def copy_stdin(
        self,
        write: Callable[[bytes], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
        grace: float = STDIN_GRACE,
    ) -> None:
        """Copy stdin to `write` as the client writes it, then `close()` it: at the FIFO's
        end, or at a CloseIO once what was written is read. Without stdin, just `close()`.

        A client whose stdin is already at its end never opens the FIFO (ctr closes its pending
        open) and may not send CloseIO: a writer that has not connected within `grace`
        seconds means no input. Cancelling it stops the copy (the process has ended).
        """
        if self.stdio.stdin:
            path = _path(self.stdio.stdin)[1]
            fd = await self._open_stdin(path, grace)
            try:
                await self._copy_stdin(fd, write)
            finally:
                os.close(fd)
        await close()

    async def _open_stdin(self, path: str, grace: float) -> int:
        """The FIFO opened for reading: once its writer connects, or (released by a writer of
        our own, so it reads to an end) after `grace` seconds without one or at a CloseIO."""
        opening = asyncio.ensure_future(asyncio.to_thread(_open_read, path))
        closed = asyncio.ensure_future(self._stdin_closed.wait())
        try:
            first = asyncio.FIRST_COMPLETED
            await asyncio.wait({opening, closed}, timeout=grace, return_when=first)
        except asyncio.CancelledError:
            await _release(path, opening)
            os.close(await opening)
            raise
        finally:
            closed.cancel()
        await _release(path, opening)
        return await opening

    async def _copy_stdin(self, fd: int, write: Callable[[bytes], Awaitable[None]]) -> None:
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = os.read(fd, STDIN_CHUNK)
            except BlockingIOError:
                if self._stdin_closed.is_set():
                    return  # CloseIO, and nothing more is waiting
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _wake, readable)
                closed = asyncio.ensure_future(self._stdin_closed.wait())
                waiters: set[asyncio.Future[Any]] = {readable, closed}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_reader(fd)
                    closed.cancel()
                continue
            if not data:
                return
            await write(data)

    def close_stdin(self) -> None:
        """CloseIO: the process gets the end of its stdin once what was written is read."""
        self._stdin_closed.set()

    async def close(self) -> None:
        for fd in {self._out, self._err} - {None}:
            assert fd is not None
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out = self._err = None
        if self._logger is not None:
            pid, self._logger = self._logger, None
            # The logger exits once both pipes are closed (as containerd's loggers do).
            await asyncio.to_thread(os.waitpid, pid, 0)


async def _open_fifo(path: str) -> int:
    return await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CLOEXEC)


def _open_read(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _release(path: str, opening: asyncio.Future[int]) -> None:
    """End a blocked open for reading of a FIFO by connecting (and closing) a writer."""
    while not opening.done():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:  # ENXIO: the opening thread is not in open() yet
            await asyncio.sleep(0.01)
            continue
        await asyncio.wait({opening}, timeout=1)


async def _write(fd: int | None, data: bytes) -> None:
    if fd is None or not data:
        return

    def write_all() -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BrokenPipeError:
                return  # the reader went away: output is dropped, as runc's shim does

    await asyncio.to_thread(write_all)
