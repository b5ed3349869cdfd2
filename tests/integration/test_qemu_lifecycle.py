"""Real QEMU (TCG) through QemuHypervisor: lifecycle, agent round trips and failure paths."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu_hotplug_support import make_config

from leaks import running
from virtcontainers import host
from virtcontainers.agent import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import SerialPort
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import (
    AssetError,
    ConfigError,
    LaunchError,
    VMExitedError,
    VMTimeoutError,
)
from virtcontainers.hypervisor import VMState
from virtcontainers.types import Param, Socket

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

BOOT_TIMEOUT = 60.0


@dataclass
class VM:
    drv: QemuHypervisor
    agent_socket: str


async def create(run_root: str, config: HypervisorConfig, id: str = "sb1") -> VM:
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox(id, None, config)
    sock = drv.generate_socket(id, use_vsock=False)
    assert isinstance(sock, Socket)
    await drv.add_device(SerialPort(sock))
    return VM(drv, sock.host_path)


@pytest.fixture
async def vm(run_root: str, guest_assets: Any) -> AsyncIterator[VM]:
    v = await create(run_root, make_config(guest_assets))
    try:
        await v.drv.start_sandbox(BOOT_TIMEOUT)
        yield v
    finally:
        await v.drv.stop_sandbox()
        await v.drv.cleanup()


async def test_lifecycle_agent_pause_resume_threads_check_stop(vm: VM) -> None:
    drv = vm.drv
    assert drv.state == VMState.RUNNING
    pid = drv.get_pids()[0]
    agent = await AgentClient.connect(vm.agent_socket, BOOT_TIMEOUT)
    try:
        await agent.ping()
        res = await agent.exec(["sh", "-c", "echo hello; cat /proc/cmdline"])
        assert res.exit_code == 0
        assert res.stdout.startswith(b"hello\n")
        assert b"panic=1" in res.stdout and b"console=ttyS0" in res.stdout

        await drv.pause_sandbox()
        assert drv.state == VMState.PAUSED
        await drv.check()
        assert (await drv._execute("query-status"))["status"] == "paused"
        # A paused guest cannot answer.
        pending = asyncio.ensure_future(agent.exec(["echo", "after-resume"]))
        await asyncio.sleep(1.0)
        assert not pending.done()
        await drv.resume_sandbox()
        res = await asyncio.wait_for(pending, 30)
        assert res.stdout == b"after-resume\n"
        assert (await drv._execute("query-status"))["status"] == "running"
    finally:
        await agent.close()

    threads = await drv.get_thread_ids()
    assert list(threads) == [0]
    tasks = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    assert set(threads.values()) <= tasks
    assert pid not in threads.values()
    await drv.check()
    with open(drv.console_log, "rb") as f:
        assert b"VC-AGENT-READY" in f.read()
    vm_dir = drv.paths.vm_dir if drv.paths else ""

    await drv.stop_sandbox()
    assert drv.state == VMState.STOPPED
    assert not os.path.exists(f"/proc/{pid}") or not host.pid_is(pid, host.process_start_time(pid))
    assert not os.path.exists(vm_dir)
    await drv.stop_sandbox()  # twice: no error


async def test_two_vcpus_have_two_threads(run_root: str, guest_assets: Any) -> None:
    v = await create(run_root, make_config(guest_assets, num_vcpus=2, default_max_vcpus=2))
    try:
        await v.drv.start_sandbox(BOOT_TIMEOUT)
        threads = await v.drv.get_thread_ids()
        assert sorted(threads) == [0, 1]
        assert len(set(threads.values())) == 2
        tasks = {int(t) for t in os.listdir(f"/proc/{v.drv.get_pids()[0]}/task")}
        assert set(threads.values()) <= tasks
    finally:
        await v.drv.stop_sandbox()


async def test_missing_kernel_is_clear_and_leaves_nothing(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-vmlinuz")
    drv = QemuHypervisor(run_root=run_root)
    with pytest.raises(AssetError, match=f"kernel {missing} does not exist"):
        await drv.create_sandbox("sb1", None, make_config(guest_assets, kernel_path=missing))
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))
    await drv.stop_sandbox()


async def test_non_executable_qemu(run_root: str, guest_assets: Any, tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_bytes(b"\x7fELF not really")
    fake.chmod(0o644)
    drv = QemuHypervisor(run_root=run_root)
    with pytest.raises(AssetError, match=f"{fake} is not executable"):
        await drv.create_sandbox("sb1", None, make_config(guest_assets, hypervisor_path=str(fake)))


async def test_comma_in_kernel_path_refused(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    odd = tmp_path / "vmlinuz,if=none"
    odd.symlink_to(guest_assets.kernel)
    drv = QemuHypervisor(run_root=run_root)
    with pytest.raises(ConfigError, match="contains ','"):
        await drv.create_sandbox("sb1", None, make_config(guest_assets, kernel_path=str(odd)))


async def test_qemu_exiting_early_is_launch_error_with_log(
    run_root: str, guest_assets: Any
) -> None:
    cfg = make_config(guest_assets, hypervisor_params=[Param("-frobnicate", "now")])
    v = await create(run_root, cfg)
    with pytest.raises(LaunchError) as exc:
        await v.drv.start_sandbox(BOOT_TIMEOUT)
    err = exc.value
    assert err.exit_code == 1
    assert "-frobnicate" in err.argv
    assert "frobnicate" in err.log_tail  # QEMU's own complaint
    assert "sb1" in str(err)
    assert v.drv.state == VMState.STOPPED
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))


async def test_start_timeout_cleans_up(run_root: str, guest_assets: Any) -> None:
    v = await create(run_root, make_config(guest_assets))
    with pytest.raises(VMTimeoutError, match="sb1"):
        await v.drv.start_sandbox(0.001)
    assert v.drv.state == VMState.STOPPED
    assert v.drv.get_pids() == []
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))


async def test_sigkill_is_reported_as_exited(vm: VM) -> None:
    drv = vm.drv
    pid = drv.get_pids()[0]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VMExitedError, match=rf"sandbox sb1: QEMU \(pid {pid}\) has exited"):
        await drv.check()
    with pytest.raises(VMExitedError, match="sb1"):
        await drv.pause_sandbox()
    await drv.stop_sandbox()
    await drv.cleanup()
    assert not os.path.exists(os.path.join(vm.drv.run_root or "", "vm", "sb1"))


async def test_stop_while_another_client_holds_qmp(vm: VM, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU serves one client per QMP socket: when another holds it (or QEMU hangs), stop
    gives up on the graceful quit and terminates the VM rather than leaving it running."""
    drv = vm.drv
    pids = drv.get_pids()
    assert drv.paths is not None
    await drv.disconnect()
    monkeypatch.setattr("virtcontainers.drivers.qemu.driver.QMP_ATTACH_TIMEOUT", 0.5)
    holder = socket.socket(socket.AF_UNIX)
    try:
        holder.connect(drv.paths.qmp_socket)
        assert b"QMP" in holder.recv(4096)  # it has the monitor: the next client waits
        await drv.stop_sandbox()
    finally:
        holder.close()
    assert drv.state is VMState.STOPPED and drv.get_pids() == []
    assert not any(running(pid) for pid in pids)
    assert not os.path.exists(drv.paths.vm_dir)


STOP_FROM_OTHER_PROCESS = """
import asyncio, json, sys
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.persist import HypervisorState

async def main():
    state = HypervisorState.model_validate(json.load(open(sys.argv[1])))
    drv = QemuHypervisor()
    drv.load(state)
    await drv.check()
    threads = await drv.get_thread_ids()
    print(json.dumps({"pids": drv.get_pids(), "threads": threads}))
    await drv.stop_sandbox()

asyncio.run(main())
"""


async def test_second_process_loads_state_and_stops_vm(
    vm: VM, tmp_path: Path, run_root: str
) -> None:
    drv = vm.drv
    pids = drv.get_pids()
    pid, keeper = pids[0], drv.helpers.pids("console-log")
    assert pids == [pid, *keeper] and len(keeper) == 1
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(drv.save().model_dump(mode="json")))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STOP_FROM_OTHER_PROCESS,
        str(state_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out)
    assert seen["pids"] == pids  # QEMU and the console log keeper, adopted from the state
    assert list(seen["threads"]) == ["0"]
    # The other process stopped it: the VM (with its keeper) is gone, its directory removed.
    assert not host.pid_is(pid, host.process_start_time(pid))
    assert not running(keeper[0])
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))
    with pytest.raises(VMExitedError):
        await drv.check()
    await drv.stop_sandbox()


async def test_load_in_same_process_reattaches_over_named_socket(vm: VM, run_root: str) -> None:
    state = vm.drv.save()
    other = QemuHypervisor(run_root=run_root)
    other.load(state)
    await other.check()
    assert await other.get_thread_ids() == await vm.drv.get_thread_ids()
    await other.pause_sandbox()
    assert (await vm.drv._execute("query-status"))["status"] == "paused"
    await other.resume_sandbox()
    await other.disconnect()


async def test_microvm_boots_and_runs_agent(run_root: str, guest_assets: Any) -> None:
    v = await create(run_root, make_config(guest_assets, hypervisor_machine_type="microvm"))
    try:
        await v.drv.start_sandbox(BOOT_TIMEOUT)
        agent = await AgentClient.connect(v.agent_socket, BOOT_TIMEOUT)
        try:
            res = await agent.exec(["cat", "/proc/cmdline"])
            assert res.exit_code == 0 and b"console=ttyS0" in res.stdout
        finally:
            await agent.close()
        await v.drv.check()
        assert "microvm" in v.drv.argv[v.drv.argv.index("-machine") + 1]
    finally:
        await v.drv.stop_sandbox()


async def test_context_manager_stops_and_cleans(run_root: str, guest_assets: Any) -> None:
    v = await create(run_root, make_config(guest_assets))
    async with v.drv as drv:
        await drv.start_sandbox(BOOT_TIMEOUT)
        pid = drv.get_pids()[0]
    assert not host.pid_is(pid, host.process_start_time(pid))
    assert v.drv.state == VMState.STOPPED
