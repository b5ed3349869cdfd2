"""`containerd-shim-virtc-v2 delete`: clean up after a shim that is gone (SIGKILLed, or found
dead when containerd restarts): stop its VM, unmount the bundle's rootfs, remove its socket,
and print the DeleteResponse containerd reads from stdout.

containerd also runs it each time a shim's connection closes, a normal `ctr run --rm`
included (and waits for it before it removes the bundle): after a shim's Shutdown it waits for
the shim to exit and, when the shim recorded that it cleaned up after itself (`CLEAN_EXIT`),
prints the response the shim left. That, the end of every container, is `after_clean_exit`,
which the binary tries before anything else: no zygote, and no import but `select` and
`_signal`."""

from __future__ import annotations

import os
import select
import sys

from .main import (
    CLEAN_EXIT,
    SANDBOX_FILE,
    SHIM_START_TIME,
    Flags,
    UsageError,
    group_id,
    parse,
    socket_path,
)

TYPE_CHECKING = False  # not typing's: importing typing costs `delete`
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # `signal` imports enum

SHIM_EXIT_WAIT = 2.0
"""Seconds a running shim server gets to exit before `delete` kills it (one that answered a
Shutdown exits at once)."""


def after_clean_exit(args: list[str]) -> bool:
    """`delete` (command line `args`) for a bundle whose shim server `start` forked (so the
    container is that shim's own, not a pod's later one): wait for the server's exit as
    `delete` does and, when it left its clean-exit record and no root mounted, print that
    response. False when the full `delete` must run (nothing printed)."""
    try:
        flags = parse(args)
    except UsageError:
        return False
    bundle = flags.bundle or os.getcwd()
    if flags.action != "delete" or not (flags.namespace and flags.id):
        return False
    if not os.path.exists(os.path.join(bundle, "shim.pid")):
        return False
    _end_shim(bundle)
    response = _clean_exit(bundle)
    if response is None or os.path.ismount(os.path.join(bundle, "rootfs")):
        return False
    sys.stdout.buffer.write(response)
    sys.stdout.flush()
    return True


def delete(flags: Flags) -> int:
    bundle = flags.bundle or os.getcwd()
    try:
        group = group_id(flags.id, bundle)
    except Exception:
        group = flags.id
    if group == flags.id:
        # The container's own VM (a pod's VM belongs to its sandbox container's shim).
        _end_shim(bundle)
        response = _clean_exit(bundle)
        sandbox = _recorded_sandbox(bundle) or group
        if response is None and _sandbox_exists(sandbox):
            import asyncio

            asyncio.run(_stop_sandbox(sandbox))
        import contextlib

        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(flags.address, flags.namespace, group))
    else:
        response = None
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.ismount(rootfs):
        import subprocess

        subprocess.run(["umount", "-l", rootfs], check=False)
    sys.stdout.buffer.write(response or delete_response())
    sys.stdout.flush()
    return 0


def delete_response() -> bytes:
    """The DeleteResponse of a shim's end: killed, now."""
    from .proto.containerd.runtime.v2.task import shim_pb2

    response = shim_pb2.DeleteResponse(pid=0, exit_status=128 + _signal.SIGKILL)
    response.exited_at.GetCurrentTime()
    return response.SerializeToString()


def _clean_exit(bundle: str) -> bytes | None:
    """The response the shim server left as it exited having cleaned up (`CLEAN_EXIT`)."""
    try:
        with open(os.path.join(bundle, CLEAN_EXIT), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _recorded_sandbox(bundle: str) -> str:
    """The sandbox id the shim recorded in the bundle (a VM from the VM cache), or ""."""
    try:
        with open(os.path.join(bundle, SANDBOX_FILE)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _end_shim(bundle: str, wait: float = SHIM_EXIT_WAIT) -> None:
    """Until the shim server of this bundle has exited: given `wait` seconds to exit by itself
    (it is ending after a Shutdown), then SIGKILLed. Only the process `start` recorded (pid and
    start time), never another one that got its pid since."""
    from ..pids import pidfd_of

    try:
        with open(os.path.join(bundle, "shim.pid")) as f:
            pid = int(f.read().strip())
        with open(os.path.join(bundle, SHIM_START_TIME)) as f:
            start_time = int(f.read().strip())
    except (OSError, ValueError):
        return  # no server recorded (or not by this version): nothing known to end
    fd = pidfd_of(pid, start_time)
    if fd is None:
        return
    try:
        # A pidfd turns readable when its process exits.
        if not select.select([fd], [], [], wait)[0]:
            try:  # noqa: SIM105 (contextlib is not imported on this path)
                _signal.pidfd_send_signal(fd, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([fd], [], [], wait)
    finally:
        os.close(fd)


def _sandbox_exists(sandbox_id: str) -> bool:
    """Whether the sandbox has persisted state (`Sandbox.attach` finds nothing otherwise)."""
    from ..errors import VCError
    from ..persist import StateStore, run_root

    try:
        return StateStore(run_root()).exists(sandbox_id)
    except VCError:
        return False


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
        import logging

        logging.getLogger(__name__).error("stopping sandbox %s: %s", sandbox_id, e)
