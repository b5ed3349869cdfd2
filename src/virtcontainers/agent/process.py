"""Host handle of a process started in the guest by the agent (`AgentClient.start_process`).

Output arrives as the process writes it (OUTPUT notifications), stdin is streamed, the
exit comes as a notification too; see PROTOCOL.md, "Processes". Containers build on it:
a process can run in a root directory (chroot) and in new namespaces.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from ..errors import AgentError
from . import protocol as p

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .client import AgentClient

NAMESPACES = {
    "mount": 0x00020000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "pid": 0x20000000,
    "net": 0x40000000,
}
"""Namespaces a started process may get new ones of (their CLONE_NEW* flags)."""
MAX_BUFFER = 16 << 20
"""Output bytes kept per stream for a reader that falls behind; beyond it chunks are dropped
(counted in `OutputStream.dropped`), so a flooding guest cannot exhaust host memory."""
MAX_ID = 2**32 - 2


@dataclass(frozen=True)
class ExitStatus:
    """How a started process ended."""

    exit_code: int
    """Exit status, or -1 when a signal killed it."""
    signal: int = 0
    """The signal that killed it (0 if it exited)."""
    timed_out: bool = False
    """The agent killed it because its `timeout` expired."""

    @property
    def ok(self) -> bool:
        """True when the process exited with status 0."""
        return self.exit_code == 0


class OutputStream:
    """One output stream of a started process: `async for chunk in stream`, or `read()`.

    Chunks come in the order the process wrote them; the iteration ends when the process has
    exited (after its last chunk), or raises `AgentError` if the connection to the agent is
    lost first.
    """

    def __init__(self, name: str, limit: int = MAX_BUFFER) -> None:
        self.name = name
        self.limit = limit
        self.dropped = 0
        """Bytes dropped because more than `limit` were waiting to be read."""
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._end = False
        self._error: AgentError | None = None
        self._wakeup = asyncio.Event()

    def _put(self, data: bytes) -> None:
        if self._end or not data:
            return
        if self._size + len(data) > self.limit:
            self.dropped += len(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wakeup.set()

    def _finish(self, error: AgentError | None = None) -> None:
        if not self._end:
            self._end = True
            self._error = error
            self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._end:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        return data

    async def read(self) -> bytes:
        """Everything until the process exits."""
        return b"".join([chunk async for chunk in self])

    def read_nowait(self) -> bytes:
        """What has arrived and not been read yet, without waiting (b"" if nothing has)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data


class Process:
    """A process the agent started; made by `AgentClient.start_process` / `attach_process`.

    `stdout` and `stderr` are `OutputStream`s (with a terminal everything comes on
    `stdout`). A process that is not `detached` is killed when its connection closes; a
    detached one keeps running, its output kept in the guest (the newest 1 MiB per stream)
    for a later `attach_process(handle)` from any connection.
    """

    def __init__(
        self, client: AgentClient, handle: int, pid: int, *, tty: bool, detached: bool
    ) -> None:
        self.client = client
        self.handle = handle
        """The agent's name for the process (for `attach_process`)."""
        self.pid = pid
        """Its pid in the guest (as the agent sees it)."""
        self.tty = tty
        self.detached = detached
        self.stdout = OutputStream("stdout")
        self.stderr = OutputStream("stderr")
        self.dropped_in_guest = 0
        """Output bytes the guest dropped from its buffer before an attach (detached only)."""
        self.offsets = (0, 0)
        """After an attach: how many bytes stdout and stderr had written before the first one
        this handle delivers (more than asked for when the guest dropped them)."""
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = f"exited {self._exit.result()}" if self.done() else "running"
        return f"<Process {self.handle} pid {self.pid} {state}>"

    # -- from the client's reader -----------------------------------------------------------
    def _output(self, stream: int, data: bytes) -> None:
        (self.stdout if stream == p.STDOUT else self.stderr)._put(data)

    def _exited(self, status: ExitStatus) -> None:
        self.stdout._finish()
        self.stderr._finish()
        if not self._exit.done():
            self._exit.set_result(status)

    def _lost(self, err: AgentError) -> None:
        self.stdout._finish(err)
        self.stderr._finish(err)
        if not self._exit.done():
            self._exit.set_exception(err)
            self._exit.exception()  # nobody may wait: do not warn about it

    # -- operations -------------------------------------------------------------------------
    def done(self) -> bool:
        """True once the process has exited (and `returncode` is known)."""
        return self._exit.done() and self._exit.exception() is None

    @property
    def returncode(self) -> ExitStatus | None:
        """The exit status once known, else None."""
        return self._exit.result() if self.done() else None

    async def wait(self) -> ExitStatus:
        """Wait for the process to end. While it runs, an agent that stops answering (no reply
        to a liveness ping within the client's `request_timeout`) fails the wait."""
        return await self.client._await_watched(self._exit, f"wait for process {self.handle}")

    async def write_stdin(self, data: bytes | str) -> None:
        """Write to the process's stdin; returns once the guest has written it to the pipe
        (or terminal), so a writer cannot run ahead of a slow reader."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        await self._stdin(raw, close=False)

    async def close_stdin(self) -> None:
        """Close stdin (the process reads end of file; with a terminal, a ^D is sent); nothing
        to do if the process has already ended."""
        await self._stdin(b"", close=True)

    async def _stdin(self, data: bytes, *, close: bool) -> None:
        req = self._req().add(p.Tag.DATA, data)
        if close:
            req.add(p.Tag.CLOSE, 1)
        from .client import AgentRequestError  # the client imports this module

        op = f"{'close_stdin' if close else 'write_stdin'} of process {self.handle}"
        try:
            await self.client._call(op, p.MsgType.STDIN, req, long=True)
        except AgentRequestError as exc:
            # Closing the stdin of a process that has already ended (and been forgotten by
            # the agent) leaves nothing to do; written data that cannot arrive is an error.
            if not (close and not data and exc.errno == errno.ESRCH):
                raise

    async def signal(self, sig: int) -> None:
        """Send signal `sig` (1..64) to the process."""
        if isinstance(sig, bool) or not isinstance(sig, int) or not 1 <= sig <= 64:
            raise AgentError(f"signal: signal must be 1..64, got {sig!r}")
        req = self._req().add(p.Tag.SIGNAL, int(sig))
        await self.client._call(f"signal {sig} to process {self.handle}", p.MsgType.SIGNAL, req)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (the process gets SIGWINCH); needs `tty`."""
        _check_size(rows, cols, "resize")
        req = self._req().add(p.Tag.ROWS, rows).add(p.Tag.COLS, cols)
        await self.client._call(f"resize of process {self.handle}", p.MsgType.RESIZE, req)

    def _req(self) -> p.Fields:
        return p.Fields().add(p.Tag.PROC, self.handle)


class StartOptions(TypedDict, total=False):
    """The keyword arguments of `start_process` (all optional; see
    `AgentClient.start_process` for what each does)."""

    env: Mapping[str, str] | None
    cwd: str | None
    uid: int | None
    gid: int | None
    groups: Sequence[int] | None
    root: str | None
    namespaces: Collection[str]
    hostname: str | None
    tty: bool
    rows: int
    cols: int
    detach: bool
    timeout: float | None


def start_request(argv: Sequence[str], **options: Unpack[StartOptions]) -> p.Fields:
    """The START request for these arguments; `AgentError` naming the bad one."""
    unknown = sorted(set(options) - set(StartOptions.__annotations__))
    if unknown:
        raise AgentError(f"start: unknown options {', '.join(unknown)}")
    req = argv_fields("start", argv, options.get("env"))
    cwd, root = options.get("cwd"), options.get("root")
    for name, path in (("cwd", cwd), ("root", root)):
        if path is not None:
            if not path or "\0" in path:
                raise AgentError(f"start: {name} must be a non-empty path without NUL")
            req.add(p.Tag.CWD if name == "cwd" else p.Tag.ROOT, path)
    if root is not None and not root.startswith("/"):
        raise AgentError(f"start: root must be an absolute guest path, got {root!r}")
    for name, ident in (("uid", options.get("uid")), ("gid", options.get("gid"))):
        if ident is not None:
            _check_id(name, ident)
            req.add(p.Tag.UID if name == "uid" else p.Tag.GID, ident)
    for g in options.get("groups") or ():
        _check_id("group", g)
        req.add(p.Tag.GROUPS, g)
    namespaces = options.get("namespaces", ())
    bad = sorted(set(namespaces) - set(NAMESPACES))
    if bad or isinstance(namespaces, str):
        raise AgentError(
            f"start: unknown namespaces {bad or namespaces!r} (known: {', '.join(NAMESPACES)})"
        )
    flags = 0
    for ns in namespaces:
        flags |= NAMESPACES[ns]
    if flags:
        req.add(p.Tag.NAMESPACES, flags)
    hostname = options.get("hostname")
    if hostname is not None:
        if "uts" not in namespaces:
            raise AgentError("start: a hostname needs a new uts namespace")
        if not hostname or len(hostname) > 64 or "\0" in hostname:
            raise AgentError(f"start: hostname must be 1..64 characters, got {hostname!r}")
        req.add(p.Tag.HOSTNAME, hostname)
    if options.get("tty"):
        rows, cols = options.get("rows", 24), options.get("cols", 80)
        _check_size(rows, cols, "start")
        req.add(p.Tag.TTY, 1).add(p.Tag.ROWS, rows).add(p.Tag.COLS, cols)
    if options.get("detach"):
        req.add(p.Tag.DETACH, 1)
    timeout = options.get("timeout")
    if timeout is not None:
        if not timeout > 0:
            raise AgentError(f"start: timeout must be positive, got {timeout!r}")
        req.add(p.Tag.TIMEOUT_MS, max(1, round(timeout * 1000)))
    return req


def argv_fields(op: str, argv: Sequence[str], env: Mapping[str, str] | None) -> p.Fields:
    """argv and env fields of an EXEC or START request, checked."""
    if isinstance(argv, str | bytes) or not argv:
        raise AgentError(f"{op}: argv must be a non-empty sequence of strings")
    req = p.Fields()
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or "\0" in arg:
            raise AgentError(f"{op}: argv[{i}] must be a string without NUL bytes")
        req.add(p.Tag.ARGV, arg)
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise AgentError(f"{op}: bad environment variable name or value {key!r}")
        req.add(p.Tag.ENV, f"{key}={value}")
    return req


def status_of(f: p.Fields) -> ExitStatus:
    """The exit status fields of an EXITED notification or EXEC reply."""
    return ExitStatus(
        exit_code=f.int_(p.Tag.EXIT_CODE, -1),
        signal=f.int_(p.Tag.SIGNAL),
        timed_out=bool(f.int_(p.Tag.TIMED_OUT)),
    )


def _check_id(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise AgentError(f"start: {name} must be an integer 0..{MAX_ID}, got {value!r}")


def _check_size(rows: int, cols: int, op: str) -> None:
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 0xFFFF:
            raise AgentError(f"{op}: {name} must be 1..65535, got {v!r}")
