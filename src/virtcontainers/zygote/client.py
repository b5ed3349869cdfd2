"""Hand a command over to the zygote, from the entry points (`virtc`, the shim's start and
delete), before they import anything else: this module imports the standard library's C
modules only (`_socket`, `_signal`), as its whole point is start-up time.

`delegate()` returns the command's exit status once a worker ran it, or None when no zygote
took it (none running, $VIRTC_NO_ZYGOTE set, refused, wrong owner...): the caller then runs
the command itself, exactly as it would have without a zygote. Nothing has run when None
is returned: the worker starts only after the zygote's ACCEPT reached this process.
"""

from __future__ import annotations

import _socket
import os
import struct
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs every command
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # `signal` imports enum: 5 ms more for each command

from . import protocol  # noqa: E402 (after the TYPE_CHECKING choice of `_signal`)

DEFAULT_RUN_ROOT = "/run/vc"
"""`persist.DEFAULT_ROOT_RUN_ROOT`: root's run root (not imported: `persist` is not cheap)."""
RUN_ROOT_ENV = "VC_RUN_ROOT"
FACTORY_DIR = "factory"
"""`factory.paths.factory_dir()`'s name under the run root (`test_zygote` checks they agree)."""
ACCEPT_TIMEOUT = 30.0
"""How long a zygote may take to accept (a wedged one: the command then runs here)."""
FORWARDED = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGWINCH,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
"""Signals this process passes on to its worker (a terminal's, a supervisor's)."""
EXIT_LOST = 125
"""The exit status when the worker's status never came (its zygote side died)."""
_UCRED = struct.Struct("3i")


def socket_in(run_root: str) -> str:
    return os.path.join(run_root, FACTORY_DIR, protocol.SOCKET_NAME)


def default_run_root() -> str | None:
    """The run root `persist.run_root()` picks, when it is cheap to know: $VC_RUN_ROOT, or
    /run/vc for root (None otherwise: no zygote serves other users)."""
    root = os.environ.get(RUN_ROOT_ENV)
    if root:
        return root if root.startswith("/") else None
    return DEFAULT_RUN_ROOT if os.geteuid() == 0 else None


def delegate(entry: str, argv: list[str], sockets: list[str]) -> int | None:
    """Run `argv` (argv[0] first) in a worker of the first zygote of `sockets` that takes it;
    its exit status, or None when none did (the caller runs the command itself)."""
    if os.environ.get(protocol.DISABLE_ENV):
        return None
    for path in sockets:
        sock = _connect(path)
        if sock is None:
            continue
        try:
            pid = _hand_over(sock, entry, argv)
        except (OSError, protocol.ProtocolError):
            pid = None
        if pid is None:
            sock.close()
            continue
        return _wait(sock)
    return None


def _connect(path: str) -> _socket.socket | None:
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        sock.settimeout(ACCEPT_TIMEOUT)
        sock.connect(path)
        # The zygote runs commands as its own user: only a zygote of ours gets our
        # environment and terminal (a socket someone else planted does not).
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size)
        )
        if uid != os.geteuid():
            raise OSError(f"zygote at {path} runs as uid {uid}")
    except OSError:
        sock.close()
        return None
    return sock


def _hand_over(sock: _socket.socket, entry: str, argv: list[str]) -> int | None:
    """Send the request with fds 0-2; the worker's pid once accepted, None if refused."""
    mask = os.umask(0)
    os.umask(mask)
    req = protocol.Request(entry, argv, dict(os.environ), os.getcwd(), mask)
    data = protocol.encode_request(req)
    fds = struct.pack("3i", 0, 1, 2)
    sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    if sent < len(data):
        sock.sendall(data[sent:])
    reply = _read(sock, protocol.ACCEPT_SIZE)
    if reply[:1] != protocol.ACCEPT or len(reply) != protocol.ACCEPT_SIZE:
        return None
    return int(struct.unpack("!I", reply[1:])[0])


def _read(sock: _socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _wait(sock: _socket.socket) -> int:
    """Forward signals to the worker until its exit status comes; return it (or die of the
    signal that killed the worker, as a shell reports a killed command)."""

    def forward(signum: int, _frame: object) -> None:
        try:  # noqa: SIM105 (contextlib is not imported here)
            sock.send(bytes((signum,)))
        except OSError:
            pass

    sock.settimeout(None)
    for sig in FORWARDED:
        _signal.signal(sig, forward)
    try:
        status = _read(sock, protocol.STATUS_SIZE)
    except OSError:
        status = b""
    finally:
        for sig in FORWARDED:
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    sock.close()
    if len(status) != protocol.STATUS_SIZE:
        sys.stderr.write("virtc zygote: the worker's exit status was lost (zygote gone?)\n")
        return EXIT_LOST
    kind, value = protocol.decode_status(status)
    if kind == protocol.KILLED:
        sys.stdout.flush()
        _signal.signal(value, _signal.SIG_DFL)
        os.kill(os.getpid(), value)
        return 128 + value  # a signal whose default is not to end the process
    return value


def virtc_sockets(args: list[str]) -> list[str]:
    """Where `virtc ARGS` finds its zygote: under `--run-root` if given before the command,
    else under the default run root. None for `factory` commands, which start and stop it."""
    i = 0
    root = None
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-", "--"):
        word = args[i]
        if word.startswith("--run-root="):
            root = word.partition("=")[2]
        elif word == "--run-root" and i + 1 < len(args):
            root = args[i + 1]
        i += 2 if word in ("-H", "--hypervisor", "--run-root") else 1
    if i >= len(args) or args[i] == "factory":
        return []
    root = root or default_run_root()
    return [socket_in(root)] if root and root.startswith("/") else []


SHIM_CONFIG_ENV = "VC_SHIM_CONFIG"
SHIM_CONFIG_PATH = "/etc/virtcontainers/configuration.toml"
"""`shim.config.DEFAULT_PATH`."""


def shim_sockets() -> list[str]:
    """Where the shim finds a zygote: under the default run root, else beside the VM cache
    server its configuration names (`[factory] vm_cache_endpoint`)."""
    root = default_run_root()
    if root is not None and os.path.exists(socket_in(root)):
        return [socket_in(root)]
    try:
        with open(os.environ.get(SHIM_CONFIG_ENV) or SHIM_CONFIG_PATH, "rb") as f:
            data = f.read()
        if b"vm_cache_endpoint" not in data:  # the usual case: no TOML parser to import
            return []
        import tomllib

        factory = tomllib.loads(data.decode()).get("factory")
        endpoint = factory.get("vm_cache_endpoint") if isinstance(factory, dict) else None
    except (OSError, ValueError):
        return []
    if isinstance(endpoint, str) and endpoint.startswith("/"):
        return [os.path.join(os.path.dirname(endpoint), protocol.SOCKET_NAME)]
    return []
