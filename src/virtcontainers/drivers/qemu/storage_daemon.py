"""qemu-storage-daemon exporting one host file as a vhost-user-blk device."""

from __future__ import annotations

import os
import shutil

from ...devices import BlockDrive
from ...errors import AssetError, ConfigError
from ..helpers import Helper, Helpers
from .argv import check_path

KIND = "qemu-storage-daemon"
BINARY = "qemu-storage-daemon"
START_TIMEOUT = 10.0


def binary_path() -> str:
    """The daemon binary (`VC_QEMU_STORAGE_DAEMON` overrides the PATH lookup)."""
    path = os.environ.get("VC_QEMU_STORAGE_DAEMON") or shutil.which(BINARY) or ""
    if not path or not os.access(path, os.X_OK):
        raise AssetError(
            f"qemu: {BINARY} not found (needed for vhost-user-blk with enable_vhost_user_store; "
            "`apt-get install qemu-system-common`)"
        )
    return path


def key(drive: BlockDrive) -> str:
    """The helper key (and QEMU device id) of a vhost-user-blk drive."""
    return f"vublk-{drive.id}"


def argv(binary: str, drive: BlockDrive, socket: str) -> list[str]:
    """The daemon's command line: the file as a block node, exported on `socket`."""
    path = check_path(f"block drive {drive.id}", drive.path)
    sock = check_path(f"block drive {drive.id} socket", socket)
    ro = "on" if drive.read_only else "off"
    return [
        binary,
        "--blockdev",
        f"driver=file,node-name=file0,filename={path},read-only={ro}",
        "--blockdev",
        f"driver={drive.format},node-name=disk0,file=file0,read-only={ro}",
        "--export",
        "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
        f"addr.path={sock},writable={'off' if drive.read_only else 'on'}",
    ]


async def start(
    helpers: Helpers, drive: BlockDrive, socket: str, log_path: str, timeout: float = START_TIMEOUT
) -> Helper:
    """Start the daemon for `drive` and wait until it listens on `socket`."""
    if not os.path.exists(drive.path):
        raise ConfigError(f"block drive {drive.id}: {drive.path} does not exist")
    return await helpers.start(
        KIND,
        key(drive),
        argv(binary_path(), drive, socket),
        socket=socket,
        log_path=log_path,
        timeout=timeout,
    )
