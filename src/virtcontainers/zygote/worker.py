"""A zygote's worker: a supervisor forked per command, and the command's process it forks.

The supervisor (a child of the zygote, its own session) reads the request, checks the
client has the zygote's privileges and takes on its ids and limits (`credentials`), joins
the client's namespaces and cgroup (`namespaces`), forks the command's process, answers ACCEPT,
then relays: signals from the client go to the command, the command's exit status goes back,
and a client that disappears has its command interrupted (SIGINT, as Ctrl-C: the command
cleans up its VM), then killed after `GRACE` seconds. The command's process (`become`) takes
the client's fds 0-2, environment, cwd, umask and argv, and runs the normal entry point.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import NoReturn

from . import credentials, namespaces, protocol
from .client import FORWARDED
from .proctitle import set_title
from .server import single_threaded

log = logging.getLogger("virtcontainers.zygote")

REQUEST_TIMEOUT = 10.0
GRACE = 60.0
"""Seconds a command whose client is gone has to clean up after SIGINT before SIGKILL."""
_RESET = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGWINCH)
_kept: list[object] = []
"""The zygote's stdio objects, kept alive (never closed) once replaced in a command."""


def supervise(conn: socket.socket, peer_pid: int) -> int:
    """Serve one client (the process `peer_pid`) on `conn`; the exit code of this process."""
    os.setsid()
    for sig in (*_RESET, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        req, fds = read_request(conn)
    except (OSError, protocol.ProtocolError) as exc:
        log.warning("zygote: bad request from pid %d: %s", peer_pid, exc)
        return 1
    try:
        credentials.take_on(peer_pid)
        joined = namespaces.join(peer_pid)
    except namespaces.Refused as exc:
        log.warning("zygote: refused pid %d: %s", peer_pid, exc)
        with contextlib.suppress(OSError):
            conn.sendall(protocol.REFUSE + str(exc).encode())
        return 0
    go_r, go_w = os.pipe()
    _flush()
    if not single_threaded():
        log.error("zygote: internal error: the supervisor has threads; not forking")
        return 1
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        become(req, fds, conn, go_r)
    os.close(go_r)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(protocol.encode_accept(pid))
    except OSError:  # the client gave up: the command has not started
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return 1
    os.write(go_w, b"g")
    os.close(go_w)
    log.info(
        "zygote: worker %d runs %s for pid %d%s",
        pid,
        " ".join([os.path.basename(req.argv[0]), *req.argv[1:]])[:300],
        peer_pid,
        f" (joined {', '.join(joined)})" if joined else "",
    )
    kind, value = relay(conn, pid)
    with contextlib.suppress(OSError):
        conn.sendall(protocol.encode_status(kind, value))
    return 0


def read_request(conn: socket.socket) -> tuple[protocol.Request, list[int]]:
    """The request and the client's fds 0-2 (as fds of this process)."""
    head, fds, flags, _ = socket.recv_fds(conn, protocol.header_size(), 3)
    try:
        if flags & socket.MSG_CTRUNC or len(fds) != 3:
            raise protocol.ProtocolError(f"expected 3 fds with the request, got {len(fds)}")
        head += _read(conn, protocol.header_size() - len(head))
        body = _read(conn, protocol.body_size(head))
        return protocol.decode_request(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise protocol.ProtocolError("the client closed the connection mid-request")
        data += chunk
    return data


def relay(conn: socket.socket, pid: int) -> tuple[int, int]:
    """Forward the client's signals to `pid` until it exits; (EXITED, code) or (KILLED, sig)."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(conn, select.POLLIN)
    conn.setblocking(False)
    deadline: float | None = None
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            events = poller.poll(wait)
            if any(fd == pidfd for fd, _ in events):
                break
            if events:
                try:
                    data = conn.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the client is gone
                    poller.unregister(conn)
                    os.kill(pid, signal.SIGINT)
                    deadline = time.monotonic() + GRACE
                for sig in data:
                    if sig in FORWARDED:
                        os.kill(pid, sig)
            elif deadline is not None:
                os.kill(pid, signal.SIGKILL)
                deadline = None
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    conn.setblocking(True)
    if os.WIFSIGNALED(status):
        return protocol.KILLED, os.WTERMSIG(status)
    return protocol.EXITED, os.waitstatus_to_exitcode(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def become(req: protocol.Request, fds: list[int], conn: socket.socket, go: int) -> NoReturn:
    """In the command's process: wait for the supervisor's go, take the client's place and
    run the entry point; never returns."""
    code = 1
    try:
        if os.read(go, 1) != b"g":
            os._exit(1)
        for handler in list(log.handlers):  # the zygote's log file is not the command's
            log.removeHandler(handler)
        high = [os.dup(fd) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, i)
        conn.detach()  # closed below with every fd of the zygote's
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.environ.clear()
        os.environ.update(req.env)
        set_title(req.argv)
        os.chdir(req.cwd)
        os.umask(req.umask)
        sys.argv = list(req.argv)
        _stdio()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in _RESET:
            signal.signal(sig, signal.SIG_DFL)
        gc.enable()
        code = _run(req)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        _flush()
        os._exit(code)


def _run(req: protocol.Request) -> int:
    try:
        if req.entry == "virtc":
            from ..cli.app import run

            return run(req.argv[1:])
        from ..shim.main import run_local

        return run_local(req.argv[1:])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _stdio() -> None:
    """New sys.stdin/stdout/stderr on fds 0-2, as the interpreter makes them at start-up
    (line-buffered stdout on a terminal, $PYTHONIOENCODING and $PYTHONUNBUFFERED obeyed)."""
    enc, _, errors = os.environ.get("PYTHONIOENCODING", "").partition(":")
    enc = enc or "utf-8"
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    _kept.extend((sys.stdin, sys.stdout, sys.stderr))
    streams = []
    for fd, mode in ((0, "r"), (1, "w"), (2, "w")):
        tty = os.isatty(fd)
        raw = io.FileIO(fd, mode, closefd=False)
        buffered: io.BufferedIOBase
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        streams.append(
            io.TextIOWrapper(
                buffered,
                encoding=enc,
                errors=errors or ("backslashreplace" if fd == 2 else "surrogateescape"),
                line_buffering=fd == 2 or (fd == 1 and tty),
                write_through=unbuffered and fd != 0,
            )
        )
    sys.stdin, sys.stdout, sys.stderr = streams
    for name, stream in zip(("__stdin__", "__stdout__", "__stderr__"), streams, strict=True):
        setattr(sys, name, stream)
