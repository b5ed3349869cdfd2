"""A forced stop (`Sandbox.stop(force=True)`: the shim's VM once its last container is
deleted) kills the VMM and its driver's helper daemons at once, each through a pidfd of the
process that was started (never another one given its pid since)."""

from __future__ import annotations

import signal
import subprocess

from virtcontainers import host, sandbox
from virtcontainers.drivers.helpers import Helpers
from virtcontainers.persist import HypervisorState


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


async def test_the_vmm_and_its_helpers_are_killed_together() -> None:
    vmm, virtiofsd, keeper, other = (subprocess.Popen(["sleep", "60"]) for _ in range(4))
    try:
        start = host.process_start_time
        records = [
            helper("virtiofsd", "fs-share0", virtiofsd, start(virtiofsd.pid)),
            helper("console-log", "console", keeper, start(keeper.pid)),
            # A helper record whose pid is another process now (another start time).
            helper("virtiofsd", "fs-share1", other, (start(other.pid) or 0) - 1),
        ]
        await sandbox._force_kill(Driver(vmm, records))  # type: ignore[arg-type]
        for proc in (vmm, virtiofsd, keeper):
            assert proc.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (vmm, virtiofsd, keeper, other):
            p.kill()
            p.wait()
