"""The zygote's accept loop: check who connects, fork a worker for each command.

The zygote itself only accepts: it reads nothing from a client and runs no command, so a
slow or hostile client cannot hold it. Each connection from a process of the zygote's own
user (SO_PEERCRED) gets a forked supervisor (`worker.supervise`); any other is refused and
logged. The zygote runs no thread, event loop or gRPC channel: a fork copies one thread,
and this is checked before every fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import struct

from ..unixsock import listen_private
from . import protocol

log = logging.getLogger("virtcontainers.zygote")

_UCRED = struct.Struct("3i")


class Stop(Exception):
    """SIGTERM or SIGINT: stop accepting and exit."""


def single_threaded() -> bool:
    return len(os.listdir("/proc/self/task")) == 1


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected."""
    pid, uid, gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def listen(path: str) -> socket.socket:
    """The zygote's socket at `path`, mode 0600 (a stale one from a dead zygote replaced)."""
    return listen_private(path, 64)


def serve(path: str, parent_fd: int | None = None) -> int:
    """Accept on `path` until SIGTERM/SIGINT or until `parent_fd` (a pipe from the VM cache
    server) reaches EOF: the server is gone, however it died. Removes the socket at exit."""

    def stop(_sig: int, _frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener = listen(path)
    ident = os.stat(path).st_ino
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    if parent_fd is not None:
        poller.register(parent_fd, select.POLLIN)
    log.info("zygote %d serving on %s", os.getpid(), path)
    try:
        while True:
            for fd, _ in poller.poll():
                if fd == parent_fd:
                    log.info("zygote: the VM cache server is gone; exiting")
                    return 0
                _accept(listener, parent_fd)
    except Stop:
        log.info("zygote: stopping")
        return 0
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ident:
                os.unlink(path)


def _accept(listener: socket.socket, parent_fd: int | None) -> None:
    try:
        conn, _ = listener.accept()
    except OSError as exc:
        log.warning("zygote: accept failed: %s", exc)
        return
    with conn:
        pid, uid, _ = peer_credentials(conn)
        if uid != os.geteuid():
            log.warning(
                "zygote: refused pid %d of uid %d (serves uid %d only)", pid, uid, os.geteuid()
            )
            with contextlib.suppress(OSError):
                conn.sendall(protocol.REFUSE + f"uid {uid} is not the zygote's".encode())
            return
        if not single_threaded():
            log.error("zygote: internal error: threads exist; not forking (pid %d)", pid)
            return
        child = os.fork()
        if child:
            return
        code = 1
        try:
            from .worker import supervise

            listener.close()
            if parent_fd is not None:
                os.close(parent_fd)
            code = supervise(conn, pid)
        except BaseException:
            log.exception("zygote worker for pid %d failed", pid)
        finally:
            os._exit(code)
