"""Interactive serial console: relay a terminal to the guest console's Unix socket."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import tty
from collections.abc import Iterator

from ..errors import HypervisorError

HISTORY_BYTES = 16384


def attach_console(path: str, escape: str = "]", history: str | None = None) -> None:
    """Relay stdin/stdout to the console socket until Ctrl-<escape> is typed or it closes.

    The tail of `history` (the console log) is shown first, so the boot log is visible.
    """
    if not path:
        raise HypervisorError("this sandbox has no console socket")
    esc = bytes([ord(escape.upper()) & 0x1F])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise HypervisorError(f"cannot connect to console {path}: {e.strerror}") from e
    if history:
        _show_tail(history)
    sys.stderr.write(f"Connected to {path}. Escape: Ctrl-{escape}\r\n")
    sys.stderr.flush()
    try:
        with raw_terminal():
            _relay(sock, sys.stdin.fileno(), esc)
    finally:
        sock.close()
        sys.stderr.write("\r\nDisconnected.\n")


@contextlib.contextmanager
def raw_terminal(enable: bool = True) -> Iterator[None]:
    """Our terminal (stdin) in raw mode inside the block, so keys reach the guest as typed;
    nothing when `enable` is false or stdin is not a terminal."""
    if not enable or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _show_tail(log: str) -> None:
    """The console log's tail, its control characters shown visibly (the live console that
    follows is the guest's to drive, as on a serial line; the history is only text)."""
    from ..drivers.vmm_process import read_end
    from .logs import terminal_safe

    data = read_end(log, HISTORY_BYTES)
    if data:
        text = terminal_safe(data).replace("\n", "\r\n")
        os.write(sys.stdout.fileno(), text.encode())


def _relay(sock: socket.socket, stdin_fd: int, esc: bytes) -> None:
    out_fd = sys.stdout.fileno()
    while True:
        ready, _, _ = select.select([sock.fileno(), stdin_fd], [], [])
        if sock.fileno() in ready:
            data = sock.recv(65536)
            if not data:
                return
            with contextlib.suppress(BlockingIOError):
                os.write(out_fd, data)
        if stdin_fd in ready:
            data = os.read(stdin_fd, 4096)
            if not data:
                return
            if esc in data:
                before = data.split(esc, 1)[0]
                if before:
                    sock.sendall(before)
                return
            sock.sendall(data)
