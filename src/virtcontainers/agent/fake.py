"""An in-process stand-in for the guest agent, speaking the real protocol on a Unix socket.

For unit tests and for VMMs that run no guest (the mock driver): exec is served by
a handler (default: a few shell-free built-ins such as echo, cat, true, false,
sleep, exit), files live in a dict, and hardware waits look at `block_devices` and
`cpus_online` (tests change them to play a hotplug). With `hybrid_port` it first expects the hybrid
vsock `CONNECT <port>` line, like Firecracker's and Cloud Hypervisor's sockets.

Started processes (START) run the same handler at once with empty stdin; their stdout and
stderr come as one OUTPUT each, then EXITED. Stdin written to them is recorded in
`stdin_seen`, resizes in `resizes`; a signal ends the handler (EXITED with that signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from . import protocol as p
from .client import ExecResult

VERSION = "vc-fake-agent 0.1.0"
WAIT_RECHECK = 0.01
"""How often a pending WAIT looks at the fake hardware again."""


@dataclass
class ExecRequest:
    """An exec as the fake agent received it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    stdin: bytes
    timeout: float | None


ExecHandler = Callable[[ExecRequest], Awaitable[ExecResult]]


class ExecFailed(Exception):
    """Raised by an exec handler to make the agent answer with an error (like ENOENT)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


async def builtin_exec(req: ExecRequest) -> ExecResult:
    """Tiny built-in commands, enough to exercise a sandbox without a guest."""
    cmd, args = req.argv[0], req.argv[1:]
    if cmd == "echo":
        return ExecResult(0, (" ".join(args) + "\n").encode(), b"")
    if cmd == "cat":
        return ExecResult(0, req.stdin, b"")
    if cmd == "true":
        return ExecResult(0, b"", b"")
    if cmd == "false":
        return ExecResult(1, b"", b"")
    if cmd == "exit":
        return ExecResult(int(args[0]) if args else 0, b"", b"")
    if cmd == "sleep":
        await asyncio.sleep(float(args[0]) if args else 0)
        return ExecResult(0, b"", b"")
    if cmd == "env":
        return ExecResult(0, "".join(f"{k}={v}\n" for k, v in req.env.items()).encode(), b"")
    raise ExecFailed(errno.ENOENT, f"exec {cmd}: No such file or directory")


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)


@dataclass(eq=False)
class _Proc:
    handle: int
    conn: _Conn
    tty: bool
    task: asyncio.Task[None] | None = None
    signal: int = 0


class FakeAgent:
    """Serve the agent protocol on `path` until `stop()`; an async context manager."""

    def __init__(
        self,
        path: str,
        *,
        exec_handler: ExecHandler | None = None,
        hybrid_port: int | None = None,
        version: str = VERSION,
    ) -> None:
        self.path = path
        self.exec_handler: ExecHandler = exec_handler or builtin_exec
        self.hybrid_port = hybrid_port
        self.version = version
        self.files: dict[str, tuple[bytes, int]] = {}
        self.requests: list[p.Frame] = []
        """Every request frame received, in order (tests inspect it)."""
        self.clock_set: list[float] = []
        self.entropy: list[bytes] = []
        self.garbage_seen = 0
        self.block_devices: dict[str, str] = {}
        """The fake guest's block devices, serial -> name (`sda`): what WAIT looks for."""
        self.cpus_online = 1
        """The fake guest's online CPUs: what WAIT compares a wanted count with."""
        self.stdin_seen: dict[int, bytes] = {}
        """Bytes written to each started process's stdin, by handle."""
        self.resizes: list[tuple[int, int, int]] = []
        """(handle, rows, cols) of every RESIZE."""
        self._procs: dict[int, _Proc] = {}
        self._next_handle = 1
        self.silent = False
        """A hung guest: every request but HELLO is read (and recorded) and never answered."""
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._started = time.monotonic()

    async def start(self) -> FakeAgent:
        """Listen on the socket path."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def stop(self) -> None:
        """Stop listening, drop every connection and remove the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            await self._drop(conn)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def drop_connections(self) -> None:
        """Close every client connection abruptly (the VM died), keep listening."""
        for conn in list(self._conns):
            await self._drop(conn)

    async def __aenter__(self) -> FakeAgent:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _drop(self, conn: _Conn) -> None:
        for task in conn.tasks.values():
            task.cancel()
        conn.writer.close()
        with contextlib.suppress(Exception):
            await conn.writer.wait_closed()
        self._conns.discard(conn)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self.hybrid_port is not None:
                line = await reader.readline()
                if line.strip() != f"CONNECT {self.hybrid_port}".encode():
                    return  # like a VMM whose guest has nothing on that port
                writer.write(b"OK 1073741824\n")
            decoder = p.FrameDecoder()
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    return
                before = decoder.skipped
                try:
                    frames = decoder.feed(data)
                except p.ProtocolError:
                    decoder = p.FrameDecoder()
                    continue
                if decoder.skipped != before:
                    self.garbage_seen += decoder.skipped - before
                for frame in frames:
                    self.requests.append(frame)
                    if self.silent and frame.type != p.MsgType.HELLO:
                        continue
                    task = asyncio.get_running_loop().create_task(self._handle(conn, frame))
                    conn.tasks[frame.id] = task
                    task.add_done_callback(functools.partial(_forget, conn, frame.id))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            await self._drop(conn)

    def _send(self, conn: _Conn, type_: int, id_: int, f: p.Fields | None = None) -> None:
        if not conn.writer.is_closing():
            conn.writer.write(p.encode_frame(type_, id_, f.encode() if f else b""))

    def _error(self, conn: _Conn, id_: int, err: int, message: str) -> None:
        f = p.Fields().add(p.Tag.ERRNO, err).add(p.Tag.MESSAGE, message)
        self._send(conn, p.MsgType.ERROR, id_, f)

    async def _handle(self, conn: _Conn, frame: p.Frame) -> None:
        try:
            f = p.Fields.decode(frame.payload)
        except p.ProtocolError as exc:
            self._error(conn, frame.id, errno.EBADMSG, str(exc))
            return
        reply = frame.type | p.REPLY
        t = frame.type
        if t in (p.MsgType.HELLO, p.MsgType.PING):
            out = p.Fields()
            if t == p.MsgType.HELLO:
                out.add(p.Tag.NONCE, f.bytes_(p.Tag.NONCE)).add(p.Tag.PROTO, p.PROTO_VERSION)
            out.add(p.Tag.VERSION, self.version)
            out.add(p.Tag.UPTIME_NS, int((time.monotonic() - self._started) * 1e9))
            out.add(p.Tag.RUNNING, len(conn.tasks) - 1)
            self._send(conn, reply, frame.id, out)
        elif t == p.MsgType.EXEC:
            await self._exec(conn, frame.id, f)
        elif t == p.MsgType.READ_FILE:
            path = f.str_(p.Tag.PATH)
            if path not in self.files:
                self._error(conn, frame.id, errno.ENOENT, f"read_file {path}: No such file")
                return
            data, mode = self.files[path]
            out = p.Fields().add(p.Tag.DATA, data).add(p.Tag.MODE, mode)
            self._send(conn, reply, frame.id, out)
        elif t == p.MsgType.WRITE_FILE:
            path = f.str_(p.Tag.PATH)
            self.files[path] = (f.bytes_(p.Tag.DATA), f.int_(p.Tag.MODE, 0o644))
            self._send(conn, reply, frame.id)
        elif t == p.MsgType.SET_TIME:
            self.clock_set.append(f.int_(p.Tag.SEC) + f.int_(p.Tag.NSEC) / 1e9)
            self._send(conn, reply, frame.id)
        elif t == p.MsgType.ADD_ENTROPY:
            self.entropy.append(f.bytes_(p.Tag.DATA))
            self._send(conn, reply, frame.id)
        elif t == p.MsgType.CANCEL:
            task = conn.tasks.get(f.int_(p.Tag.TARGET))
            if task is not None:
                task.cancel()
            self._send(conn, reply, frame.id, p.Fields().add(p.Tag.FOUND, int(task is not None)))
        elif t == p.MsgType.WAIT:
            await self._wait(conn, frame.id, f)
        elif t in (p.MsgType.START, p.MsgType.STDIN, p.MsgType.SIGNAL, p.MsgType.RESIZE):
            await self._process_request(conn, frame.id, t, f)
        elif t == p.MsgType.ATTACH:
            self._error(conn, frame.id, errno.ESRCH, "attach: the fake keeps no processes")
        elif t == p.MsgType.ONLINE:
            out = p.Fields().add(p.Tag.CPUS, 0).add(p.Tag.MEM_BLOCKS, 0)
            self._send(conn, reply, frame.id, out)
        else:
            self._error(conn, frame.id, errno.ENOSYS, f"unknown request type 0x{t:02x}")

    async def _exec(self, conn: _Conn, id_: int, f: p.Fields) -> None:
        argv = [a.decode() for a in f.all(p.Tag.ARGV)]
        if not argv:
            self._error(conn, id_, errno.EINVAL, "exec: argv is empty")
            return
        env = dict(e.decode().split("=", 1) for e in f.all(p.Tag.ENV))
        timeout_ms = f.int_(p.Tag.TIMEOUT_MS)
        cwd = f.get(p.Tag.CWD)
        req = ExecRequest(
            argv=argv,
            env=env,
            cwd=cwd.decode() if cwd is not None else None,
            stdin=f.bytes_(p.Tag.STDIN),
            timeout=timeout_ms / 1000 if timeout_ms else None,
        )
        try:
            res = await asyncio.wait_for(self.exec_handler(req), req.timeout)
        except TimeoutError:
            res = ExecResult(-1, b"", b"", signal=9, timed_out=True)
        except ExecFailed as exc:
            self._error(conn, id_, exc.errno, exc.message)
            return
        except asyncio.CancelledError:
            # Cancelled by a CANCEL request: answer like a killed process, as the agent does.
            self._send(conn, p.MsgType.EXEC | p.REPLY, id_, _result(ExecResult(-1, b"", b"", 9)))
            raise
        self._send(conn, p.MsgType.EXEC | p.REPLY, id_, _result(res))

    async def _process_request(self, conn: _Conn, id_: int, t: int, f: p.Fields) -> None:
        reply = t | p.REPLY
        if t == p.MsgType.START:
            argv = [a.decode() for a in f.all(p.Tag.ARGV)]
            if not argv:
                self._error(conn, id_, errno.EINVAL, "start: argv is empty")
                return
            env = dict(e.decode().split("=", 1) for e in f.all(p.Tag.ENV))
            cwd = f.get(p.Tag.CWD)
            req = ExecRequest(argv, env, cwd.decode() if cwd else None, b"", None)
            handle, self._next_handle = self._next_handle, self._next_handle + 1
            proc = _Proc(handle, conn, bool(f.int_(p.Tag.TTY)))
            self._procs[handle] = proc
            self.stdin_seen[handle] = b""
            self._send(conn, reply, id_, p.Fields().add(p.Tag.PROC, handle).add(p.Tag.PID, 1000))
            proc.task = asyncio.get_running_loop().create_task(self._run(proc, req))
            return
        known = self._procs.get(f.int_(p.Tag.PROC))
        if known is None:
            self._error(conn, id_, errno.ESRCH, "no such process")
            return
        proc = known
        if t == p.MsgType.STDIN:
            self.stdin_seen[proc.handle] += f.bytes_(p.Tag.DATA)
        elif t == p.MsgType.SIGNAL:
            proc.signal = f.int_(p.Tag.SIGNAL)
            if proc.task is not None:
                proc.task.cancel()
        elif not proc.tty:
            self._error(conn, id_, errno.ENOTTY, "resize: no terminal")
            return
        else:
            self.resizes.append((proc.handle, f.int_(p.Tag.ROWS), f.int_(p.Tag.COLS)))
        self._send(conn, reply, id_)

    async def _run(self, proc: _Proc, req: ExecRequest) -> None:
        """A started process: the handler's output as notifications, then its exit."""
        try:
            res = await self.exec_handler(req)
        except ExecFailed as exc:
            res = ExecResult(127, b"", exc.message.encode())
        except asyncio.CancelledError:
            res = ExecResult(-1, b"", b"", signal=proc.signal or 9)
        for stream, data in ((p.STDOUT, res.stdout), (p.STDERR, res.stderr)):
            if data:
                out = p.Fields().add(p.Tag.PROC, proc.handle).add(p.Tag.STREAM, stream)
                self._send(proc.conn, p.MsgType.OUTPUT, 0, out.add(p.Tag.DATA, data))
        end = p.Fields().add(p.Tag.PROC, proc.handle).add(p.Tag.EXIT_CODE, res.exit_code)
        end.add(p.Tag.SIGNAL, res.signal).add(p.Tag.TIMED_OUT, 0)
        self._send(proc.conn, p.MsgType.EXITED, 0, end)
        self._procs.pop(proc.handle, None)

    async def _wait(self, conn: _Conn, id_: int, f: p.Fields) -> None:
        """Like the agent: validate, then re-check every `WAIT_RECHECK` until met or expired."""
        try:
            timeout_ms = f.int_(p.Tag.TIMEOUT_MS)
            cpus = f.int_(p.Tag.WANT_CPUS)
            memory = f.int_(p.Tag.MEMORY)
        except p.ProtocolError as exc:
            self._error(conn, id_, errno.EINVAL, f"wait: {exc}")
            return
        serial = f.get(p.Tag.SERIAL)
        if not 1 <= timeout_ms <= p.MAX_WAIT_MS:
            self._error(conn, id_, errno.EINVAL, "wait: timeout_ms is required: 1..600000")
            return
        if not 0 <= cpus <= p.MAX_WANT_CPUS or memory not in (0, 1):
            self._error(conn, id_, errno.EINVAL, "wait: cpus or memory out of range")
            return
        if serial is not None and not 0 < len(serial) <= p.MAX_SERIAL:
            self._error(conn, id_, errno.EINVAL, "wait: serial must be 1..255 bytes")
            return
        if serial is None and not cpus and not memory:
            self._error(conn, id_, errno.EINVAL, "wait: nothing to wait for")
            return
        wanted = serial.decode(errors="replace") if serial is not None else None
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            name = self.block_devices.get(wanted) if wanted is not None else None
            have_block = wanted is None or name is not None
            if have_block and self.cpus_online >= cpus:
                out = p.Fields()
                if name is not None:
                    out.add(p.Tag.DEVICE, name).add(p.Tag.PATH, f"/dev/{name}")
                if cpus:
                    out.add(p.Tag.CPUS_ONLINE, self.cpus_online)
                self._send(conn, p.MsgType.WAIT | p.REPLY, id_, out.add(p.Tag.MEM_BLOCKS, 0))
                return
            if time.monotonic() >= deadline:
                missing = [] if have_block else [f"no block device with serial {wanted!r}"]
                if self.cpus_online < cpus:
                    missing.append(f"{self.cpus_online} of {cpus} CPUs online")
                self._error(conn, id_, errno.ETIMEDOUT, "wait: timed out: " + "; ".join(missing))
                return
            await asyncio.sleep(WAIT_RECHECK)


def _forget(conn: _Conn, id_: int, _task: asyncio.Task[None]) -> None:
    conn.tasks.pop(id_, None)


def _result(res: ExecResult) -> p.Fields:
    return (
        p.Fields()
        .add(p.Tag.EXIT_CODE, res.exit_code)
        .add(p.Tag.SIGNAL, res.signal)
        .add(p.Tag.TIMED_OUT, int(res.timed_out))
        .add(p.Tag.TRUNCATED, 0)
        .add(p.Tag.STDOUT, res.stdout)
        .add(p.Tag.STDERR, res.stderr)
    )
