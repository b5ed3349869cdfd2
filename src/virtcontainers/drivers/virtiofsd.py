"""virtiofsd (QEMU's C daemon, Debian's qemu-system-common) serving one virtio-fs share, as
the QEMU and Cloud Hypervisor drivers run it (one of the VM's `Helpers`): where it lives, its
command line, its start-up (listening before the VMM connects) and the files it leaves
behind."""

from __future__ import annotations

import contextlib
import os
import socket as sock
from typing import TYPE_CHECKING

from ..config import VIRTIO_FS_CACHE_VALUES, check_virtiofsd_args
from ..errors import AssetError, ConfigError
from ..host import VIRTIOFSD_PATH

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from ..devices import SharedFS
    from .helpers import Helper, Helpers

#: Debian's virtiofsd (qemu-system-common), the one `virtc check` looks for.
DEFAULT_VIRTIOFSD = VIRTIOFSD_PATH
#: As root, the C virtiofsd locks a pid file named after its socket path here and leaves it.
PID_FILE_DIR = "/run/virtiofsd"
#: The helper kind (see `Helpers`) and process name.
KIND = "virtiofsd"
#: The cache mode of a container's root share: the guest keeps a file's pages across opens
#: (names and attributes `ROOT_TIMEOUT` s). With `auto` (pages dropped at
#: every open) each exec in a container re-reads its binary through the share (busybox's
#: 1 MB: ~0.16 s under TCG). Nothing on the host writes under a running container's root
#: except `virtc cp`, which then makes the guest drop its caches (`Container.copy_in`); host
#: directories (volumes) keep the config's mode: a guest under `always` never sees a file the
#: host rewrites in place.
ROOT_CACHE = "always"
#: Seconds a root share's names and attributes are kept (`always` alone: a day). A name the
#: guest holds in use (a file a container keeps open, a running binary) survives the cache
#: drop after `virtc cp`: looked up again after this, a copy that replaced it is seen then.
#: A file's pages stay cached while its size and times are unchanged. Given before the
#: config's extra arguments: a configured `timeout=` wins.
ROOT_TIMEOUT = 1
#: Seconds virtiofsd gets to create its socket.
START_TIMEOUT = 10.0


def daemon_path(cfg: HypervisorConfig, hypervisor: str) -> str:
    """The configured virtiofsd, else Debian's; `AssetError` naming `hypervisor` unless it is
    an executable file."""
    path = cfg.virtio_fs_daemon or DEFAULT_VIRTIOFSD
    if not os.path.isabs(path) or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise AssetError(
            f"{hypervisor}: virtio-fs daemon {path!r} is not an executable file (set "
            f"virtio_fs_daemon, or `apt-get install qemu-system-common` for {DEFAULT_VIRTIOFSD})"
        )
    return path


def key(share: SharedFS) -> str:
    """The helper key (and QEMU device id) of a share."""
    return f"fs-{share.id}"


def socket_path(vm_dir: str, share_id: str) -> str:
    """Where the daemon for share `share_id` listens."""
    return os.path.join(vm_dir, f"fs-{share_id}.sock")


def log_path(vm_dir: str, share_id: str) -> str:
    """Where the daemon for share `share_id` writes its output."""
    return os.path.join(vm_dir, f"virtiofsd-{share_id}.log")


def argv(
    cfg: HypervisorConfig,
    hypervisor: str,
    share: SharedFS,
    socket: str,
    listen_fd: int | None = None,
) -> list[str]:
    """virtiofsd's command line: serve `share` on `socket` (or on the listening socket it
    inherits as `listen_fd`) with the config's extra arguments (allowlisted), the share's
    cache mode (else the config's) and debug flag. The project's own options come last, so
    that even an option the allowlist missed cannot override them (virtiofsd's last one
    wins)."""
    cache = share.cache or cfg.virtio_fs_cache or "auto"
    if cache not in VIRTIO_FS_CACHE_VALUES:
        raise ConfigError(
            f"virtio_fs_cache: {cache!r} is not a virtiofsd cache mode "
            f"({', '.join(v for v in VIRTIO_FS_CACHE_VALUES if v)})"
        )
    source = served_dir(share)  # SharedFS refuses a comma in it (`-o` takes a comma list)
    check_virtiofsd_args("virtio_fs_extra_args", cfg.virtio_fs_extra_args)
    args = [daemon_path(cfg, hypervisor)]
    if share.cache == ROOT_CACHE:
        args += ["-o", f"timeout={ROOT_TIMEOUT}"]
    args += cfg.virtio_fs_extra_args
    where = f"--fd={listen_fd}" if listen_fd is not None else f"--socket-path={socket}"
    args += [where, "-o", f"source={source}", "-o", f"cache={cache}"]
    if cfg.debug:
        args.append("-d")
    return wrap(share, args)


# Run in the daemon's own mount namespace (it dies with the daemon: nothing to unmount, nothing
# left on the host): a read-only bind, or an overlay of the share's lower and upper directories.
_READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
_OVERLAY = (
    'mkdir -p "$2.work" "$2.merged" && '
    'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$2.work" "$2.merged" && '
    'shift 2 && exec "$@"'
)


def served_dir(share: SharedFS) -> str:
    """The directory the daemon serves: the overlay's mount point, else the source."""
    return share.source + ".merged" if share.lower else share.source


def wrap(share: SharedFS, argv: list[str]) -> list[str]:
    """`argv` (the daemon's) run so that it serves `share` read-only or as an overlay."""
    if not share.lower and not share.read_only:
        return argv
    if os.geteuid() != 0:
        what = "an overlay (image root)" if share.lower else "a read-only share"
        raise ConfigError(f"shared fs {share.id}: {what} needs root (mount namespaces)")
    for path in (share.source, share.lower, share.shifted):
        if any(c in path for c in ",:\n"):
            raise ConfigError(f"shared fs {share.id}: path {path!r} contains ',' ':' or a newline")
    prefix = ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c"]
    if share.lower:
        # metacopy: the shifted owners of a user namespace's root are metadata-only copies
        script = (
            _OVERLAY.replace('=$2.work"', '=$2.work,metacopy=on"') if share.id_shift else _OVERLAY
        )
        lower = f"{share.shifted}:{share.lower}" if share.shifted else share.lower
        return [*prefix, script, "vc-share", lower, share.source, *argv]
    return [*prefix, _READ_ONLY, "vc-share", share.source, *argv]


def check_source(share: SharedFS) -> None:
    """`ConfigError` unless the share's source is a directory."""
    if not os.path.isdir(share.source):
        raise ConfigError(f"shared fs {share.id}: source {share.source!r} is not a directory")


def pid_file(socket: str) -> str:
    """The pid file virtiofsd (as root) creates for `socket`."""
    return os.path.join(PID_FILE_DIR, socket.replace("/", ".") + ".pid")


async def start(
    helpers: Helpers,
    cfg: HypervisorConfig,
    share: SharedFS,
    socket: str,
    vm_dir: str,
    timeout: float = START_TIMEOUT,
) -> Helper:
    """Start virtiofsd for `share` as one of the VM's helpers and wait for its socket;
    nothing is left behind on failure."""
    check_source(share)
    return await helpers.start(
        KIND,
        key(share),
        argv(cfg, helpers.hypervisor, share, socket),
        socket=socket,
        log_path=log_path(vm_dir, share.id),
        timeout=timeout,
        leftovers=[pid_file(socket)],
    )


async def start_listening(
    helpers: Helpers, cfg: HypervisorConfig, share: SharedFS, socket: str, vm_dir: str
) -> Helper:
    """Start virtiofsd for `share` as one of the VM's helpers on a socket made listening here
    and handed to it (`--fd`): QEMU can connect at once, its vhost-user requests waiting in
    the socket until virtiofsd serves them, so the two start side by side. A virtiofsd that
    dies first closes the socket's last copy: QEMU's connection then fails (see the
    driver's launch error, which carries virtiofsd's log tail)."""
    check_source(share)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)  # a stale one
    listener = sock.socket(sock.AF_UNIX, sock.SOCK_STREAM)
    try:
        listener.bind(socket)
        listener.listen(1)
        fd = listener.fileno()
        args = argv(cfg, helpers.hypervisor, share, socket, listen_fd=fd)
        return await helpers.start(
            KIND,
            key(share),
            args,
            socket=socket,
            log_path=log_path(vm_dir, share.id),
            timeout=0,
            leftovers=[pid_file(socket)],
            pass_fds=[fd],
        )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket)
        raise
    finally:
        listener.close()  # virtiofsd holds its own copy
