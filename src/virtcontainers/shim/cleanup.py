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

from .main import SHIM_START_TIME, Flags, group_id, socket_path

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
        asyncio.run(_stop_sandbox(_recorded_sandbox(bundle) or group))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(flags.address, flags.namespace, group))
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.ismount(rootfs):
        subprocess.run(["umount", "-l", rootfs], check=False)
    response = shim_pb2.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL, exited_at=now())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


def _recorded_sandbox(bundle: str) -> str:
    """The sandbox id the shim recorded in the bundle (a VM from the VM cache), or ""."""
    from .vm import SANDBOX_FILE

    try:
        with open(os.path.join(bundle, SANDBOX_FILE)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _kill_shim(bundle: str) -> None:
    """SIGKILL the shim server of this bundle if it still runs: the process `start` recorded
    (pid and start time), never another one that got its pid since."""
    from ..host import signal_process

    try:
        with open(os.path.join(bundle, "shim.pid")) as f:
            pid = int(f.read().strip())
        with open(os.path.join(bundle, SHIM_START_TIME)) as f:
            start_time = int(f.read().strip())
    except (OSError, ValueError):
        return  # no server recorded (or not by this version): nothing known to kill
    signal_process(pid, start_time, signal.SIGKILL)


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
