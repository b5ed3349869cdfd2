"""The zygote's wire format on its Unix socket (stream), shared by client and server.

Client -> server, once: MAGIC, a u32 length, then length-prefixed fields (entry point, cwd,
umask, argc, argv..., environ...), with the client's fds 0, 1 and 2 as SCM_RIGHTS.
Server -> client: ACCEPT + u32 worker pid, or REFUSE + a reason (the client then runs the
command itself); later EXIT + (kind, value): the worker's exit code or the signal killing it.
Client -> server after ACCEPT: one byte per signal to forward; closing the connection asks
the worker to end (the client is gone).
"""

from __future__ import annotations

import struct

MAGIC = b"VZ1\0"
SOCKET_NAME = "zygote.sock"
"""In the VM cache server's directory (`<run root>/factory/`, mode 0700)."""
DISABLE_ENV = "VIRTC_NO_ZYGOTE"
"""Set (non-empty) in a command's environment: the command runs in its own process."""
ENTRIES = ("virtc", "shim")
"""What a worker can run: the `virtc` CLI or `containerd-shim-virtc-v2`."""
ACCEPT = b"Y"
REFUSE = b"N"
EXIT = b"X"
EXITED, KILLED = 0, 1
"""EXIT kinds: an exit code, or the number of the signal that killed the worker."""
MAX_REQUEST = 1 << 20
_U32 = struct.Struct("!I")
_STATUS = struct.Struct("!cii")
STATUS_SIZE = _STATUS.size
ACCEPT_SIZE = 1 + _U32.size


class ProtocolError(Exception):
    """A malformed message; the text says what is wrong with it."""


class Request:
    """A command to run: which entry point, its argv, environment, cwd and umask."""

    def __init__(
        self, entry: str, argv: list[str], env: dict[str, str], cwd: str, umask: int
    ) -> None:
        self.entry = entry
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.umask = umask


def encode_request(req: Request) -> bytes:
    fields = [req.entry, req.cwd, str(req.umask), str(len(req.argv)), *req.argv]
    fields += [f"{k}={v}" for k, v in req.env.items()]
    body = b"".join(
        _U32.pack(len(b)) + b for b in (f.encode("utf-8", "surrogateescape") for f in fields)
    )
    return MAGIC + _U32.pack(len(body)) + body


def header_size() -> int:
    return len(MAGIC) + _U32.size


def body_size(header: bytes) -> int:
    """The body's length from the first `header_size()` bytes."""
    if header[: len(MAGIC)] != MAGIC:
        raise ProtocolError("not a zygote request (bad magic)")
    (size,) = _U32.unpack_from(header, len(MAGIC))
    if size > MAX_REQUEST:
        raise ProtocolError(f"request of {size} bytes is too large (max {MAX_REQUEST})")
    return int(size)


def decode_request(body: bytes) -> Request:
    fields: list[str] = []
    pos = 0
    while pos < len(body):
        if pos + _U32.size > len(body):
            raise ProtocolError("truncated field length")
        (n,) = _U32.unpack_from(body, pos)
        pos += _U32.size
        if pos + n > len(body):
            raise ProtocolError("truncated field")
        fields.append(body[pos : pos + n].decode("utf-8", "surrogateescape"))
        pos += n
    if len(fields) < 4:
        raise ProtocolError(f"request has {len(fields)} fields, expected at least 4")
    entry, cwd, umask, argc = fields[:4]
    if entry not in ENTRIES:
        raise ProtocolError(f"unknown entry point {entry!r} (known: {', '.join(ENTRIES)})")
    try:
        n_argv, mask = int(argc), int(umask)
    except ValueError:
        raise ProtocolError(f"bad argc {argc!r} or umask {umask!r}") from None
    if not 0 <= n_argv <= len(fields) - 4 or not 0 <= mask <= 0o777:
        raise ProtocolError(f"bad argc {argc!r} or umask {umask!r}")
    argv = fields[4 : 4 + n_argv]
    env: dict[str, str] = {}
    for item in fields[4 + n_argv :]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ProtocolError(f"bad environment entry {item[:40]!r}")
        env[key] = value
    if not cwd.startswith("/"):
        raise ProtocolError(f"cwd {cwd!r} is not absolute")
    return Request(entry, argv, env, cwd, mask)


def encode_accept(pid: int) -> bytes:
    return ACCEPT + _U32.pack(pid)


def encode_status(kind: int, value: int) -> bytes:
    return _STATUS.pack(EXIT, kind, value)


def decode_status(data: bytes) -> tuple[int, int]:
    tag, kind, value = _STATUS.unpack(data)
    if tag != EXIT or kind not in (EXITED, KILLED):
        raise ProtocolError(f"bad exit status message {data!r}")
    return int(kind), int(value)
