"""`containerd-shim-virtc-v2`: the binary containerd runs for runtime `io.containerd.virtc.v2`.

containerd 1.6's shim protocol (runtime/v2/README.md): every call has the bundle as its working
directory and the flags -namespace, -address, -publish-binary, -id (and -bundle, -debug).
`start` starts the shim server (or finds the pod's running one) and prints its address;
`delete` cleans up after a shim that is gone and prints a DeleteResponse. The server is a
child `start` forks (its own session, /dev/null as stdio, the listening socket as fd 3): no
second interpreter start-up, as Go's shims need (Go cannot fork), on every container's path.

Only the standard library is imported here, and at import only what the interpreter has
loaded anyway: `start` and `delete` run for every container, and json's or hashlib's import
(re, enum, OpenSSL) costs more than the rest of the client before it hands the command to a
zygote (or `delete` finds the shim gone clean).
"""

from __future__ import annotations

import gc
import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `start` more

if TYPE_CHECKING:
    import socket

SHIM_START_TIME = "shim.start_time"
"""Bundle file: the shim server's start time (clock ticks since boot), beside shim.pid."""
CLEAN_EXIT = "shim.clean-exit"
"""Bundle file: the DeleteResponse `delete` prints, written by the shim server as it exits
having stopped its VM and unmounted every root it mounted (`delete` has nothing to do)."""
SANDBOX_FILE = "virtc-sandbox"
"""In the bundle: the id of the sandbox running it when that is not the shim's (a VM from the
VM cache keeps its own), for `delete` after the shim is gone."""
#: containerd's annotations (CRI) that put a pod's containers behind one shim and VM.
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
LISTEN_FD = 3
BINARY = "containerd-shim-virtc-v2"
RUNTIME = "io.containerd.virtc.v2"
MAX_SOCKET_PATH = 107


class UsageError(Exception):
    """Bad command line or bundle; the message names what is at fault."""


class Flags:
    """The command line (a plain class: dataclasses cost `start` and `delete` an import)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.debug = False
        self.action = ""


_VALUED = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}


def parse(argv: list[str]) -> Flags:
    """Go `flag` syntax: -name value, -name=value, --name value; then the action."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            rest = argv[i:]
            if len(rest) > 1:
                raise UsageError(f"unexpected arguments after {rest[0]}: {' '.join(rest[1:])}")
            flags.action = rest[0] if rest else ""
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name == "debug":
            flags.debug = not eq or value.lower() in ("1", "true", "t")
        elif name in ("v", "version"):
            flags.action = "version"
            return flags
        elif name in _VALUED:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            if name != "socket":
                setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return flags


def group_id(container_id: str, bundle: str) -> str:
    """The id of the shim (and VM) a container belongs to: its pod's sandbox id for a CRI
    container, its own id otherwise."""
    import json

    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = json.load(f).get("annotations") or {}
    except FileNotFoundError:
        raise UsageError(f"bundle {bundle} has no config.json") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"bundle {bundle}: unreadable config.json: {e}") from e
    if annotations.get(CONTAINER_TYPE) == "container" and annotations.get(SANDBOX_ID):
        return str(annotations[SANDBOX_ID])
    return container_id


def socket_path(containerd_address: str, namespace: str, group: str) -> str:
    """The shim's socket: beside containerd's own socket (in its state), named as containerd
    names its shims' sockets (sha256 of address, namespace and id)."""
    import hashlib

    digest = hashlib.sha256(f"{containerd_address}/{namespace}/{group}".encode()).hexdigest()
    base = os.path.join(os.path.dirname(os.path.abspath(containerd_address)), "s")
    path = os.path.join(base, digest)
    if len(path) > MAX_SOCKET_PATH:
        path = os.path.join("/run/containerd/s", digest)
    return path


def _connectable(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def start(flags: Flags) -> int:
    bundle = os.getcwd()
    group = group_id(flags.id, bundle)
    path = socket_path(flags.address, flags.namespace, group)
    address = f"unix://{path}"
    if group != flags.id or _connectable(path):
        if not _connectable(path):
            raise UsageError(f"pod sandbox {group}: no shim is serving {path}")
        write_file(os.path.join(bundle, "address"), address)
        print(address, end="")
        return 0
    from ..unixsock import listen_private

    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    listener = listen_private(path, 128)  # a stale socket there: nobody answered on it
    try:
        pid = _fork_server(flags, listener)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        listener.close()
    from ..pids import process_start_time

    write_file(os.path.join(bundle, "shim.pid"), str(pid))
    # With the pid, `delete` knows the server again (never another process given its pid).
    write_file(os.path.join(bundle, SHIM_START_TIME), str(process_start_time(pid)))
    write_file(os.path.join(bundle, "address"), address)
    print(address, end="")
    return 0


def _fork_server(flags: Flags, listener: socket.socket) -> int:
    """Fork the shim server (this process has no threads: `start` runs nothing but this
    module); returns its pid. The child never returns: it serves, then exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        # containerd reads `start`'s output to its end: the server keeps none of its pipes.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if listener.fileno() != LISTEN_FD:
            os.dup2(listener.fileno(), LISTEN_FD, inheritable=False)
        os.closerange(LISTEN_FD + 1, os.sysconf("SC_OPEN_MAX"))
        from .daemon import serve

        code = serve(flags, LISTEN_FD)
    finally:
        os._exit(code)


def spawn(argv: list[str], fds: list[int], env: dict[str, str] | None = None) -> int:
    """Start `argv` (an absolute path first) with /dev/null as stdio and `fds` as its fds 3,
    4, ... (posix_spawn: safe with threads); returns its pid."""
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    try:
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, i, os.devnull, os.O_RDWR, 0) for i in (0, 1, 2)
        ]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
        env = dict(os.environ) if env is None else env
        return os.posix_spawn(argv[0], argv, env, file_actions=actions)
    finally:
        for fd in high:
            os.close(fd)


def write_file(path: str, data: str | bytes) -> None:
    """Write a bundle file whole (a temp file renamed over it: readers never see half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point: `start` and `delete` run in a zygote's worker when one takes them (the
    shim server `start` forks then has everything imported), else here."""
    if argv is None:
        args = sys.argv[1:]
        if "delete" in args:
            from .cleanup import after_clean_exit

            if after_clean_exit(args):
                return 0
        if "start" in args or "delete" in args:
            from ..zygote.client import delegate, shim_sockets

            code = delegate("shim", [sys.argv[0], *args], shim_sockets())
            if code is not None:
                return code
    return run_local(sys.argv[1:] if argv is None else argv)


def run_local(args: list[str]) -> int:
    """Run the shim command `args` in this process."""
    # No cycle collection while modules load (dozens of passes over what is imported):
    # `start` and `delete` are short-lived, the server turns it back on once its first
    # Create has imported what it needs (daemon.py).
    gc.disable()
    try:
        flags = parse(args)
        if not flags.namespace and flags.action in ("start", "delete"):
            raise UsageError("shim namespace cannot be empty (-namespace)")
        if not flags.id and flags.action in ("start", "delete"):
            raise UsageError("shim id cannot be empty (-id)")
        if flags.action == "version":
            from .. import __version__

            print(f"{BINARY}:\n  Version: {__version__}\n  Runtime: {RUNTIME}")
            return 0
        if flags.action == "start":
            return start(flags)
        if flags.action == "delete":
            from .cleanup import delete

            return delete(flags)
        raise UsageError(
            f"unknown action {flags.action!r}: use start or delete"
            if flags.action
            else "no action given: use start or delete"
        )
    except UsageError as e:
        print(f"{BINARY}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
