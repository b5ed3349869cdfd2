"""A process's stdio as containerd hands it over: FIFO paths (fifo:// or bare), `file://`
(stdout and stderr appended to one file) and `binary://` (a logging program reading the output
on fds 3 and 4, saying it is ready by closing fd 5)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from .main import spawn

OPEN_TIMEOUT = 30.0
STDIN_GRACE = 0.1


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

    async def read_stdin(self, grace: float = STDIN_GRACE) -> bytes:
        """All of stdin (until its writer closes it); b"" without stdin.

        A client whose stdin is already at its end never opens the FIFO (ctr closes its pending
        open) and may not send CloseIO: a writer that has not connected within `grace`
        seconds, or a CloseIO, means no input.
        """
        if not self.stdio.stdin:
            return b""
        path = _path(self.stdio.stdin)[1]
        opening = asyncio.ensure_future(asyncio.to_thread(_open_read, path))
        closed = asyncio.ensure_future(self._stdin_closed.wait())
        done, _ = await asyncio.wait(
            {opening, closed}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
        closed.cancel()
        if opening not in done:
            # Release the blocked open by connecting a writer ourselves (it reads EOF).
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            os.close(await opening)
            return b""
        return await asyncio.to_thread(_read_all, opening.result())

    def close_stdin(self) -> None:
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


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


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
