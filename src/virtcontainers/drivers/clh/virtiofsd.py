"""virtiofsd (the C daemon shipped with QEMU) serving one virtio-fs share to Cloud Hypervisor."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from ...devices import SharedFS
from ...errors import AssetError
from .. import virtiofsd as common
from ..vmm_process import VmmProcess, wait_for_path

if TYPE_CHECKING:
    from ...config import HypervisorConfig


def socket_path(vm_dir: str, share_id: str) -> str:
    """Where the daemon for `share_id` listens."""
    return os.path.join(vm_dir, f"fs-{share_id}.sock")


def argv(cfg: HypervisorConfig, share: SharedFS, sock: str) -> list[str]:
    """virtiofsd's command line for `share`."""
    return common.argv(cfg, "clh", share.source, sock)


async def start(
    cfg: HypervisorConfig, share: SharedFS, vm_dir: str, timeout: float
) -> tuple[VmmProcess, str]:
    """Launch the daemon for `share` and wait for its socket; returns (process, socket path)."""
    if not os.path.isdir(share.source):
        raise AssetError(f"clh: shared fs {share.id}: source {share.source!r} is not a directory")
    sock = socket_path(vm_dir, share.id)
    log = os.path.join(vm_dir, f"virtiofsd-{share.id}.log")
    proc = await VmmProcess.spawn("virtiofsd", argv(cfg, share, sock), log)
    try:
        await wait_for_path(sock, proc, timeout, "vhost-user socket")
    except BaseException:
        await proc.stop()
        remove_leftovers(sock)
        raise
    return proc, sock


def remove_leftovers(sock: str) -> None:
    """Remove the socket and the pid file a stopped daemon leaves behind."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.unlink(common.pid_file(sock))
