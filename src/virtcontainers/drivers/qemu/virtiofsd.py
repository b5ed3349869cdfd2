"""virtiofsd (QEMU's C daemon, Debian's qemu-system-common) serving one virtio-fs share."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...devices import SharedFS
from ...errors import ConfigError
from .. import virtiofsd as common
from .argv import check_path
from .helpers import Helper, Helpers

if TYPE_CHECKING:
    from ...config import HypervisorConfig

KIND = "virtiofsd"
START_TIMEOUT = 10.0
CACHE_MODES = ("auto", "always", "none")


def daemon_path(cfg: HypervisorConfig) -> str:
    """The configured virtiofsd, else Debian's; `AssetError` unless it is executable."""
    return common.daemon_path(cfg, "qemu")


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
    source = check_path(f"shared fs {share.id} source", common.served_dir(share))
    return common.wrap(share, common.argv(cfg, "qemu", source, socket))


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
        leftovers=[common.pid_file(socket)],
    )
