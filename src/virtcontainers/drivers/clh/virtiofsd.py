"""virtiofsd (the C daemon shipped with QEMU) serving one virtio-fs share to Cloud Hypervisor."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from ...devices import SharedFS
from ...errors import AssetError
from ..vmm_process import VmmProcess, wait_for_path

if TYPE_CHECKING:
    from ...config import HypervisorConfig

DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# The C virtiofsd locks a pid file named after its socket path here (as root), and leaves it.
PID_FILE_DIR = "/run/virtiofsd"


def daemon_path(cfg: HypervisorConfig) -> str:
    """The configured virtiofsd binary, else Debian's; `AssetError` when it is not executable."""
    path = cfg.virtio_fs_daemon or DEFAULT_VIRTIOFSD
    if not os.path.isabs(path) or not os.access(path, os.X_OK):
        raise AssetError(
            f"clh: virtio-fs daemon {path!r} is not an executable file "
            "(set virtio_fs_daemon, or install qemu-system-common for /usr/lib/qemu/virtiofsd)"
        )
    return path


def socket_path(vm_dir: str, share_id: str) -> str:
    """Where the daemon for `share_id` listens."""
    return os.path.join(vm_dir, f"fs-{share_id}.sock")


def argv(cfg: HypervisorConfig, share: SharedFS, sock: str) -> list[str]:
    """virtiofsd's command line for `share`."""
    args = [
        daemon_path(cfg),
        f"--socket-path={sock}",
        "-o",
        f"source={share.source}",
        "-o",
        f"cache={cfg.virtio_fs_cache or 'auto'}",
    ]
    if cfg.debug:
        args.append("-d")
    args += list(cfg.virtio_fs_extra_args)
    return args


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
    pid_file = os.path.join(PID_FILE_DIR, sock.replace("/", ".") + ".pid")
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.unlink(pid_file)
