"""A forced stop (`Sandbox.stop(force=True)`: the shim's VM once its last container is
deleted) kills the VMM and its driver's helper daemons at once, each through a pidfd of the
process that was started (never another one given its pid since), and meanwhile finds and
kills the VM directory's stray VMMs."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from virtcontainers import host, sandbox
from virtcontainers.drivers.helpers import Helpers
from virtcontainers.drivers.vmm_process import VMM_PROGRAMS, processes_using
from virtcontainers.factory import poolshare
from virtcontainers.persist import HypervisorState

MOCK_CFG = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}


class Driver:
    """What `_force_kill` reads of a driver: its saved state and its helpers."""

    def __init__(self, vmm: subprocess.Popen[bytes], helpers: list[dict[str, object]]) -> None:
        self.state = HypervisorState(pid=vmm.pid, pid_start_time=host.process_start_time(vmm.pid))
        self.helpers = Helpers()
        self.helpers.load(helpers)

    def save(self) -> HypervisorState:
        return self.state


def helper(
    kind: str, key: str, proc: subprocess.Popen[bytes], start_time: int | None
) -> dict[str, object]:
    return {"kind": kind, "key": key, "socket": "", "log_path": "", "pid": proc.pid,
            "start_time": start_time}  # fmt: skip


async def test_the_vmm_and_its_helpers_are_killed_together(tmp_path: Path) -> None:
    vmm, virtiofsd, keeper, other = (subprocess.Popen(["sleep", "60"]) for _ in range(4))
    try:
        start = host.process_start_time
        records = [
            helper("virtiofsd", "fs-share0", virtiofsd, start(virtiofsd.pid)),
            helper("console-log", "console", keeper, start(keeper.pid)),
            # A helper record whose pid is another process now (another start time).
            helper("virtiofsd", "fs-share1", other, (start(other.pid) or 0) - 1),
        ]
        await sandbox._force_kill(Driver(vmm, records), str(tmp_path))  # type: ignore[arg-type]
        for proc in (vmm, virtiofsd, keeper):
            assert proc.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (vmm, virtiofsd, keeper, other):
            p.kill()
            p.wait()


async def test_the_scan_for_strays_runs_meanwhile_and_skips_the_known_vmm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VMM of the VM directory nobody recorded (a stray) is killed by the same forced stop,
    found while the recorded VMM dies; the recorded one, named like a VMM in that directory
    too, is killed as the VMM, not reported as a stray."""
    vm_dir = str(tmp_path / "vm" / "sb1")
    os.makedirs(vm_dir)
    sleep = shutil.which("sleep")
    assert sleep is not None
    qemu = os.path.join(vm_dir, "qemu-system-x86_64")
    vmm, stray = (subprocess.Popen([qemu, "60"], executable=sleep) for _ in range(2))
    try:
        deadline = time.monotonic() + 10
        while len(processes_using(vm_dir, VMM_PROGRAMS)) < 2:  # both exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING):
            await sandbox._force_kill(Driver(vmm, []), vm_dir)  # type: ignore[arg-type]
        assert (vmm.wait(5), stray.wait(5)) == (-signal.SIGKILL, -signal.SIGKILL)
        strays = [r.getMessage() for r in caplog.records if "stray" in r.getMessage()]
        assert strays == [f"VM dir {vm_dir}: killing stray VMM process {stray.pid}"]
    finally:
        for p in (vmm, stray):
            p.kill()
            p.wait()


async def test_the_staged_share_is_released_in_a_thread_started_at_once(
    run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forced stop then runs the driver's stop, whose awaits on processes already dead
    do not suspend it: a release in a task began only once that was done; in a thread
    started at once, it runs meanwhile."""
    started = threading.Event()
    released: list[str] = []

    def release(directory: str) -> None:
        started.set()
        released.append(directory)

    monkeypatch.setattr(poolshare, "release_quietly", release)
    sb = sandbox.Sandbox("rel", "mock", run_root=run_root, **MOCK_CFG)
    sb.workload["share_dir"] = "/nonexistent/share"
    releasing = sb._release_share()
    assert started.wait(5), "the release waited for the event loop"
    await releasing
    assert released == ["/nonexistent/share"]
    sb.workload.clear()
    await sb._release_share()  # nothing staged: nothing to release
    assert released == ["/nonexistent/share"]
