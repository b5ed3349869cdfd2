"""A listening Unix socket only its owner may connect to (standard library only: the shim's
`start` and the zygote use it before anything else is imported)."""

from __future__ import annotations

import contextlib
import os
import socket


def listen_private(path: str, backlog: int) -> socket.socket:
    """Listen at `path`, mode 0600 from the start (a stale socket there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock
