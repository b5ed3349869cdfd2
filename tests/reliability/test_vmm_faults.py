"""The VMM (QEMU, under TCG) SIGKILLed at each stage: the layer notices at once, names the
sandbox that died, and cleanup leaves no process, socket, fd or directory behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from rel_support import assert_clean, sandbox_kw

from leaks import processes_mentioning
from virtcontainers.drivers.qemu import hotplug
from virtcontainers.errors import HypervisorError, VMExitedError
from virtcontainers.hypervisor import VMState
from virtcontainers.sandbox import Sandbox
from virtcontainers.types import Capabilities

pytestmark = pytest.mark.integration

# Bounds against hangs only (a boot takes ~2.5 s here); far below BOOT_TIMEOUT, so a layer
# that waited for its timeouts instead of noticing the death fails.
NOTICE = 20.0


def vmm_pid(sb: Sandbox) -> int:
    return sb.hypervisor.get_pids()[0]


async def test_killed_while_booting(leak_check: str, guest_assets: Any) -> None:
    sb = Sandbox("boot1", "qemu", run_root=leak_check, **sandbox_kw(guest_assets))
    starting = asyncio.ensure_future(sb.start())
    while sb._hv is None or not sb.hypervisor.get_pids():
        assert not starting.done(), starting.exception()
        await asyncio.sleep(0.01)
    pid = vmm_pid(sb)
    # Into firmware/kernel boot (QMP is up; under load that can take seconds), before the
    # agent is up.
    while sb.hypervisor._qmp is None:  # type: ignore[attr-defined]
        assert not starting.done(), starting.exception()
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VMExitedError, match=rf"sandbox boot1: QEMU \(pid {pid}\) has exited"):
        await asyncio.wait_for(starting, NOTICE)
    assert sb.state is VMState.STOPPED
    assert_clean(leak_check)


async def test_killed_while_running(sandbox: Sandbox, leak_check: str) -> None:
    pid = vmm_pid(sandbox)
    assert (await sandbox.exec(["echo", "up"])).stdout == b"up\n"
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VMExitedError, match=r"sandbox sb1: QEMU .*killed by signal 9"):
        await asyncio.wait_for(sandbox.exec(["echo", "again"]), NOTICE)
    with pytest.raises(VMExitedError, match="sandbox sb1"):
        await asyncio.wait_for(sandbox.pause(), NOTICE)
    [info] = Sandbox.list(leak_check)
    assert (info.id, info.state, info.pid) == ("sb1", "dead", pid)
    await sandbox.stop()
    assert_clean(leak_check)


async def test_killed_while_paused(sandbox: Sandbox, leak_check: str) -> None:
    await sandbox.pause()
    os.kill(vmm_pid(sandbox), signal.SIGKILL)
    with pytest.raises(VMExitedError, match="sandbox sb1"):
        await asyncio.wait_for(sandbox.resume(), NOTICE)
    # Not "it is paused": the death is what matters.
    with pytest.raises(VMExitedError, match="sandbox sb1"):
        await asyncio.wait_for(sandbox.exec(["true"]), NOTICE)
    assert Sandbox.list(leak_check)[0].state == "dead"
    await sandbox.stop()
    assert_clean(leak_check)


async def test_killed_mid_template_save(leak_check: str, guest_assets: Any, tmp_path: Path) -> None:
    memory, state = tmp_path / "memory", tmp_path / "state"
    os.mkfifo(state)  # nobody reads it: the migration stays in flight until QEMU dies
    kw = sandbox_kw(
        guest_assets,
        boot_to_be_template=True,
        memory_path=str(memory),
        devices_state_path=str(state),
    )
    async with Sandbox("tpl1", "qemu", run_root=leak_check, **kw) as sb:
        await sb.pause()
        saving = asyncio.ensure_future(sb.hypervisor.save_sandbox())
        await asyncio.sleep(1.0)
        assert not saving.done()
        status = await sb.hypervisor._execute("query-migrate")  # type: ignore[attr-defined]
        assert status["status"] in ("setup", "active")
        os.kill(vmm_pid(sb), signal.SIGKILL)
        with pytest.raises(HypervisorError, match="tpl1"):
            await asyncio.wait_for(saving, NOTICE)
        with pytest.raises(VMExitedError, match="sandbox tpl1"):
            await sb.hypervisor.check()
    # Nothing holds the state file once QEMU is gone (QEMU got it as an fd: no helper).
    assert processes_mentioning(str(state)) == []
    assert_clean(leak_check)


@pytest.mark.skipif(
    Capabilities.BLOCK_DEVICE_HOTPLUG not in hotplug.IMPLEMENTED,
    reason="QEMU block hotplug is not implemented",
)
async def test_killed_mid_hotplug(sandbox: Sandbox, leak_check: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    drive = await sandbox.add_disk(str(disk), "d0")
    # Kill QEMU right after it accepted `device_del`, inside the wait for the guest.
    hp = sandbox.hypervisor.hotplug  # type: ignore[attr-defined]
    real_execute = hp._execute  # the driver's QMP execute, as hotplug was given it

    async def execute_then_die(command: str, *args: Any, **kwargs: Any) -> Any:
        result = await real_execute(command, *args, **kwargs)
        if command == "device_del":
            os.kill(vmm_pid(sandbox), signal.SIGKILL)
        return result

    hp._execute = execute_then_die
    with pytest.raises(HypervisorError, match="sb1"):
        await asyncio.wait_for(sandbox.remove_disk(drive), NOTICE)
    assert "d0" in sandbox.disks  # not forgotten: the removal did not happen
    with pytest.raises(VMExitedError, match="sandbox sb1"):
        await sandbox.hypervisor.check()
    await sandbox.stop()
    assert_clean(leak_check)
