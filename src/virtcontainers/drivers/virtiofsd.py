"""virtiofsd (QEMU's C daemon, Debian's qemu-system-common) as every driver that serves
virtio-fs shares runs it: where it lives, its command line, the pid file it leaves behind."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..config import check_virtiofsd_args
from ..errors import AssetError, ConfigError

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from ..devices import SharedFS

DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: As root, the C virtiofsd locks a pid file named after its socket path here and leaves it.
PID_FILE_DIR = "/run/virtiofsd"


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


def argv(cfg: HypervisorConfig, hypervisor: str, source: str, socket: str) -> list[str]:
    """virtiofsd's command line: serve `source` on `socket` with the config's extra arguments
    (allowlisted), cache mode and debug flag. The project's own options come last, so that
    even an option the allowlist missed cannot override them (virtiofsd's last one wins)."""
    check_virtiofsd_args("virtio_fs_extra_args", cfg.virtio_fs_extra_args)
    args = [daemon_path(cfg, hypervisor), *cfg.virtio_fs_extra_args]
    args += [f"--socket-path={socket}", "-o", f"source={source}"]
    args += ["-o", f"cache={cfg.virtio_fs_cache or 'auto'}"]
    if cfg.debug:
        args.append("-d")
    return args


def pid_file(socket: str) -> str:
    """The pid file virtiofsd (as root) creates for `socket`."""
    return os.path.join(PID_FILE_DIR, socket.replace("/", ".") + ".pid")


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
    for path in (share.source, share.lower):
        if any(c in path for c in ",:\n"):
            raise ConfigError(f"shared fs {share.id}: path {path!r} contains ',' ':' or a newline")
    prefix = ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c"]
    if share.lower:
        return [*prefix, _OVERLAY, "vc-share", share.lower, share.source, *argv]
    return [*prefix, _READ_ONLY, "vc-share", share.source, *argv]
