"""`containerd-shim-virtc-v2 delete`: clean up after a shim that is gone (SIGKILLed, or found
dead when containerd restarts): stop its VM, unmount the bundle's rootfs, remove its socket,
and print the DeleteResponse containerd reads from stdout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys

from .main import Flags, group_id, socket_path

log = logging.getLogger(__name__)


def delete(flags: Flags) -> int:
    from .events import now
    from .proto.containerd.runtime.v2.task import shim_pb2

    bundle = flags.bundle or os.getcwd()
    try:
        group = group_id(flags.id, bundle)
    except Exception:
        group = flags.id
    if group == flags.id:
        # The container's own VM (a pod's VM belongs to its sandbox container's shim).
        _kill_shim(bundle)
        asyncio.run(_stop_sandbox(group))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(flags.address, flags.namespace, group))
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.ismount(rootfs):
        subprocess.run(["umount", "-l", rootfs], check=False)
    response = shim_pb2.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL, exited_at=now())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


def _kill_shim(bundle: str) -> None:
    """SIGKILL a shim server that still runs for this bundle (pid file written by start)."""
    try:
        with open(os.path.join(bundle, "shim.pid")) as f:
            pid = int(f.read().strip())
        pidfd = os.pidfd_open(pid)  # pinned before the check: a reused pid is never hit
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"containerd-shim-virtc-v2" in cmdline or b"virtcontainers.shim" in cmdline:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass
    finally:
        os.close(pidfd)


async def _stop_sandbox(sandbox_id: str) -> None:
    from ..errors import VCError
    from ..sandbox import Sandbox

    try:
        sb = await Sandbox.attach(sandbox_id)
    except VCError:
        return  # no such sandbox: nothing to stop
    try:
        await sb.stop(force=True)
    except VCError as e:
        log.error("stopping sandbox %s: %s", sandbox_id, e)
