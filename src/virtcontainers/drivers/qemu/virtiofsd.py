"""virtiofsd (QEMU's C daemon, Debian's qemu-system-common) serving one virtio-fs share."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...devices import SharedFS
from ...errors import AssetError, ConfigError
from .argv import check_path
from .helpers import Helper, Helpers

if TYPE_CHECKING:
    from ...config import HypervisorConfig

KIND = "virtiofsd"
DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: As root, the C virtiofsd locks a pid file named after its socket path here and leaves it.
PID_FILE_DIR = "/run/virtiofsd"
START_TIMEOUT = 10.0
CACHE_MODES = ("auto", "always", "none")


def daemon_path(cfg: HypervisorConfig) -> str:
    """The configured virtiofsd, else Debian's; `AssetError` unless it is executable."""
    path = cfg.virtio_fs_daemon or DEFAULT_VIRTIOFSD
    if not os.path.isabs(path) or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise AssetError(
            f"qemu: virtio-fs daemon {path!r} is not an executable file (set virtio_fs_daemon, "
            "or `apt-get install qemu-system-common` for /usr/lib/qemu/virtiofsd)"
        )
    return path


def key(share: SharedFS) -> str:
    """The helper key (and QEMU device id) of a share."""
    return f"fs-{share.id}"


def argv(cfg: HypervisorConfig, share: SharedFS, socket: str) -> list[str]:
    """virtiofsd's command line for `share`, listening on `socket`."""
    cache = cfg.virtio_fs_cache or "auto"
    if cache not in CACHE_MODES:
        raise ConfigError(
            f"virtio_fs_cache: {cache!r} is not a virtiofsd cache mode ({', '.join(CACHE_MODES)})"
        )
    source = check_path(f"shared fs {share.id} source", share.source)
    args = [daemon_path(cfg), f"--socket-path={socket}", "-o", f"source={source}"]
    args += ["-o", f"cache={cache}"]
    if cfg.debug:
        args.append("-d")
    return args + list(cfg.virtio_fs_extra_args)


def pid_file(socket: str) -> str:
    """The pid file virtiofsd (as root) creates for `socket`."""
    return os.path.join(PID_FILE_DIR, socket.replace("/", ".") + ".pid")


async def start(
    helpers: Helpers,
    cfg: HypervisorConfig,
    share: SharedFS,
    socket: str,
    log_path: str,
    timeout: float = START_TIMEOUT,
) -> Helper:
    """Start virtiofsd for `share` and wait for its socket."""
    if not os.path.isdir(share.source):
        raise ConfigError(f"shared fs {share.id}: source {share.source} is not a directory")
    return await helpers.start(
        KIND,
        key(share),
        argv(cfg, share, socket),
        socket=socket,
        log_path=log_path,
        timeout=timeout,
        leftovers=[pid_file(socket)],
    )
