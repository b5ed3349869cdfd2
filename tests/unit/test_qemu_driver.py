"""QemuHypervisor QMP sequences and failure handling against the fake QMP server.

A `sleep` process stands in for QEMU's pid; the fake QMP server listens on the VM's named
QMP socket, as QEMU would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fakes.qmp_server import Expect, FakeQMPServer, Hangup
from leaks import running
from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, CPUDevice
from virtcontainers.drivers.qemu import QemuHypervisor, machine_capabilities
from virtcontainers.drivers.qemu import hotplug as qhotplug
from virtcontainers.errors import (
    AssetError,
    ConfigError,
    HypervisorError,
    LaunchError,
    StateError,
    UnsupportedError,
    VMExitedError,
    VMTimeoutError,
)
from virtcontainers.hypervisor import VMState, new_hypervisor
from virtcontainers.types import Capabilities


@pytest.fixture
def assets(tmp_path: Path) -> HypervisorConfig:
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return HypervisorConfig(kernel_path=str(kernel), initrd_path=str(initrd), memory_size=256)


@pytest.fixture
def term_marker(tmp_path: Path) -> Path:
    return tmp_path / "got-sigterm"


@pytest.fixture
def dummy(term_marker: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Stands in for QEMU's process; notes a SIGTERM in `term_marker`."""
    script = f"trap 'echo term > {term_marker}; exit 0' TERM; while :; do sleep 0.05; done"
    proc = subprocess.Popen(["sh", "-c", script])
    yield proc
    proc.kill()
    proc.wait()


def fake_qemu(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


async def running_driver(
    run_root: str, config: HypervisorConfig, proc: subprocess.Popen[bytes]
) -> QemuHypervisor:
    """A driver that believes `proc` is its QEMU (as loaded from persisted state)."""
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("sb1", None, config)
    state = drv.save()
    state.pid = proc.pid
    state.pid_start_time = host.process_start_time(proc.pid)
    state.vm_state = VMState.RUNNING
    other = QemuHypervisor(run_root=run_root)
    other.load(state)
    return other


@pytest.fixture
async def fake(run_root: str) -> AsyncIterator[FakeQMPServer]:
    server = FakeQMPServer()
    yield server
    await server.close()


async def serve(server: FakeQMPServer, drv: QemuHypervisor) -> None:
    assert drv.paths is not None
    await server.listen(drv.paths.qmp_socket)


def test_registered_for_qemu() -> None:
    assert isinstance(new_hypervisor("qemu"), QemuHypervisor)


async def test_pause_resume_check_threads(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    fake.add(
        Expect("stop"),
        Expect("query-status", reply={"status": "paused", "running": False}),
        Expect("cont"),
        Expect("query-status", reply={"status": "running", "running": True}),
        Expect(
            "query-cpus-fast",
            reply=[
                {"cpu-index": 0, "thread-id": 101, "qom-path": "/machine/cpu0"},
                {"cpu-index": 1, "thread-id": 102, "qom-path": "/machine/cpu1"},
            ],
        ),
    )
    await serve(fake, drv)
    await drv.pause_sandbox()
    assert drv.state == VMState.PAUSED
    with pytest.raises(StateError, match="cannot pause VM sb1: it is paused"):
        await drv.pause_sandbox()
    await drv.check()
    await drv.resume_sandbox()
    with pytest.raises(StateError, match="resume"):
        await drv.resume_sandbox()
    await drv.check()
    assert await drv.get_thread_ids() == {0: 101, 1: 102}
    await drv.disconnect()
    fake.assert_done()


@pytest.mark.parametrize("status", ["guest-panicked", "internal-error"])
async def test_check_reports_bad_guest_state(
    run_root: str,
    assets: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    status: str,
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    fake.add(Expect("query-status", reply={"status": status, "running": False}))
    await serve(fake, drv)
    with pytest.raises(HypervisorError, match=f"sb1.*{status}"):
        await drv.check()
    await drv.disconnect()


async def test_check_after_process_death_is_vm_exited(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    fake.add(Expect("query-status", reply={"status": "running"}))
    await serve(fake, drv)
    await drv.check()
    dummy.kill()
    dummy.wait()
    with pytest.raises(VMExitedError, match=f"sandbox sb1: QEMU \\(pid {dummy.pid}\\) has exited"):
        await drv.check()
    with pytest.raises(VMExitedError):
        await drv.get_thread_ids()
    await drv.stop_sandbox()
    assert drv.paths is not None and not os.path.exists(drv.paths.vm_dir)


async def test_stop_sends_quit_then_removes_everything(
    run_root: str,
    assets: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    term_marker: Path,
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    fake.add(Expect("quit", then=dummy.kill))
    await serve(fake, drv)
    await drv.stop_sandbox()
    fake.assert_done()
    assert not running(dummy.pid)
    assert not term_marker.exists()  # ended by quit, no signal needed
    assert drv.state == VMState.STOPPED
    assert drv.paths is not None and not os.path.exists(drv.paths.vm_dir)
    await drv.stop_sandbox()  # idempotent
    assert fake.commands == ["quit"]


async def test_stop_with_refused_qmp_falls_back_to_sigterm(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes], term_marker: Path
) -> None:
    drv = await running_driver(run_root, assets, dummy)  # nothing listens on qmp.sock
    await drv.stop_sandbox()
    assert not running(dummy.pid)
    assert term_marker.exists()
    assert drv.paths is not None and not os.path.exists(drv.paths.vm_dir)


async def test_stop_when_qmp_hangs_up_on_quit(
    run_root: str,
    assets: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    term_marker: Path,
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    fake.add(Expect("quit", no_reply=True, hangup=True))
    await serve(fake, drv)
    await drv.stop_sandbox()
    assert not running(dummy.pid)
    assert term_marker.exists()


async def test_reused_pid_is_never_signalled(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes]
) -> None:
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("sb1", None, assets)
    state = drv.save()
    state.pid = dummy.pid
    state.pid_start_time = (host.process_start_time(dummy.pid) or 0) + 1  # another process
    state.vm_state = VMState.RUNNING
    other = QemuHypervisor(run_root=run_root)
    other.load(state)
    with pytest.raises(VMExitedError, match="sb1"):
        await other.check()
    await other.stop_sandbox()
    assert dummy.poll() is None  # untouched


async def test_stale_pid_leading_another_session_spares_its_members(
    run_root: str, assets: HypervisorConfig
) -> None:
    """QEMU died long ago and its pid now leads another session (a login shell): stopping
    the sandbox signals neither that leader nor any member of its session."""
    shell = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert shell.stdout is not None
        job = int(shell.stdout.readline())  # a job of that shell: same session
        job_start = host.process_start_time(job)
        drv = QemuHypervisor(run_root=run_root)
        await drv.create_sandbox("sb1", None, assets)
        state = drv.save()
        state.pid = shell.pid
        state.pid_start_time = (host.process_start_time(shell.pid) or 0) + 1  # the dead QEMU
        state.vm_state = VMState.RUNNING
        other = QemuHypervisor(run_root=run_root)
        other.load(state)
        await other.stop_sandbox()
        assert shell.poll() is None and host.pid_is(job, job_start)
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


async def test_save_sandbox_migrates_to_devices_state_path(
    run_root: str,
    assets: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    assets.boot_to_be_template = True
    assets.memory_path = str(tmp_path / "mem")
    assets.devices_state_path = str(tmp_path / "state")
    drv = await running_driver(run_root, assets, dummy)
    caps = {
        "capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ]
    }
    fake.add(
        Expect("stop"),
        Expect("migrate-set-capabilities", arguments=caps),
        Expect("getfd", arguments={"fdname": "migration"}),  # the file, not its path
        Expect(
            "migrate",
            arguments={"uri": "fd:migration"},
            events=[
                {"event": "MIGRATION", "data": {"status": "setup"}},
                {"event": "MIGRATION", "data": {"status": "completed"}},
            ],
        ),
    )
    await serve(fake, drv)
    await drv.pause_sandbox()
    await drv.save_sandbox()
    fake.assert_done()
    await drv.disconnect()


async def test_save_sandbox_reports_failed_migration(
    run_root: str,
    assets: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    assets.boot_to_be_template = True
    assets.memory_path = str(tmp_path / "mem")
    assets.devices_state_path = str(tmp_path / "state")
    drv = await running_driver(run_root, assets, dummy)
    fake.add(
        Expect("migrate-set-capabilities"),
        Expect("getfd"),
        Expect("migrate", events=[{"event": "MIGRATION", "data": {"status": "failed"}}]),
        Expect("query-migrate", reply={"status": "failed", "error-desc": "disk full"}),
    )
    await serve(fake, drv)
    with pytest.raises(HypervisorError, match="migration failed: disk full"):
        await drv.save_sandbox()
    await drv.disconnect()


async def test_incoming_migration_waits_for_the_clone_memory(
    run_root: str,
    assets: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    """A clone's memory may still be being copied while QEMU starts: the incoming migration,
    the first thing that reads guest memory, is asked for only once the copy is done."""
    assets.boot_from_template = True
    assets.memory_path = str(tmp_path / "mem")
    assets.devices_state_path = str(tmp_path / "state")
    (tmp_path / "state").write_bytes(b"QEVM")
    (tmp_path / "mem").write_bytes(b"")
    drv = await running_driver(run_root, assets, dummy)
    fake.add(
        Expect("migrate-set-capabilities"),
        Expect("getfd"),
        Expect(
            "migrate-incoming",
            arguments={"uri": "fd:migration"},
            events=[{"event": "MIGRATION", "data": {"status": "completed"}}],
        ),
        Expect("cont"),
    )
    await serve(fake, drv)
    await drv._attach()
    copied = asyncio.get_running_loop().create_future()
    drv.memory_ready = copied
    incoming = asyncio.ensure_future(drv._incoming_migration(5))
    await asyncio.sleep(0.3)
    assert not incoming.done()
    assert "migrate-incoming" not in fake.commands, "migrated before the memory was copied"
    copied.set_result(None)
    await incoming
    fake.assert_done()
    await drv.disconnect()


async def test_to_grpc_from_grpc_reattaches(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    data = await drv.to_grpc()
    fake.add(Expect("query-status", reply={"status": "running"}))
    await serve(fake, drv)
    other = QemuHypervisor(run_root=run_root)
    config = HypervisorConfig.from_dict(drv.hypervisor_config().to_dict())
    await other.from_grpc(config, data)
    assert fake.connections == 0  # QMP waits for the first command
    assert other.get_pids() == [dummy.pid]
    assert other.id == "sb1" and other.state == VMState.RUNNING
    await other.check()
    assert fake.connections == 1
    await other.disconnect()
    with pytest.raises(StateError, match="qemu: unreadable VM state"):
        await QemuHypervisor(run_root=run_root).from_grpc(config, b"{not json")
    dummy.kill()
    dummy.wait()
    with pytest.raises(VMExitedError, match=f"QEMU \\(pid {dummy.pid}\\) has exited"):
        await QemuHypervisor(run_root=run_root).from_grpc(config, data)


async def test_qmp_hangup_while_process_lives_is_an_error(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running_driver(run_root, assets, dummy)
    fake.add(Expect("query-status", no_reply=True, hangup=True), Hangup())
    await serve(fake, drv)
    with pytest.raises(HypervisorError) as exc:
        await drv.check()
    assert not isinstance(exc.value, VMExitedError)
    await drv.disconnect()


def test_capabilities_per_machine() -> None:
    q35 = machine_capabilities("q35")
    micro = machine_capabilities("microvm")
    for cap in (
        Capabilities.BLOCK_DEVICE,
        Capabilities.PAUSE,
        Capabilities.MULTI_QUEUE,
        Capabilities.VSOCK,
    ):
        assert cap in q35 and cap in micro
    assert Capabilities.TEMPLATE in q35 and Capabilities.FS_SHARING in q35
    assert Capabilities.FS_SHARING not in micro  # no share was ever shown to work there
    hotplug = (
        Capabilities.BLOCK_DEVICE_HOTPLUG
        | Capabilities.NET_DEVICE_HOTPLUG
        | Capabilities.CPU_HOTPLUG
        | Capabilities.MEMORY_HOTPLUG
        | Capabilities.VFIO_HOTPLUG
        | Capabilities.VIRTIO_MEM
    )
    assert not (micro & hotplug)
    # q35/pc advertise exactly the hotplug that hotplug.py implements.
    assert q35 & hotplug == hotplug & qhotplug.IMPLEMENTED
    # pc claims only the hotplug shown on real QEMU (tests/integration/test_sandbox.py).
    pc = machine_capabilities("pc")
    shown = Capabilities.BLOCK_DEVICE_HOTPLUG | Capabilities.CPU_HOTPLUG
    assert pc & hotplug == shown | Capabilities.MEMORY_HOTPLUG
    assert pc & ~hotplug == q35 & ~hotplug & ~Capabilities.VHOST_USER_HOTPLUG


async def test_capabilities_follow_config(run_root: str, assets: HypervisorConfig) -> None:
    assets.hypervisor_machine_type = "microvm"
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("m1", None, assets)
    assert drv.capabilities() == machine_capabilities("microvm")
    await drv.stop_sandbox()


async def test_create_prepares_private_vm_dir_and_launches_nothing(
    run_root: str, assets: HypervisorConfig
) -> None:
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("sb1", None, assets)
    assert drv.paths is not None
    mode = os.stat(drv.paths.vm_dir).st_mode
    assert stat.S_IMODE(mode) == 0o700
    assert drv.get_pids() == []
    assert drv.hypervisor_config().num_vcpus == 1  # validated, defaults filled
    assert drv.root_ports == ["rp0", "rp1"]
    assert await drv.get_sandbox_console("sb1") == os.path.join(drv.paths.vm_dir, "console.sock")
    await drv.stop_sandbox()
    assert not os.path.exists(drv.paths.vm_dir)


async def test_create_missing_kernel(run_root: str, assets: HypervisorConfig) -> None:
    assets.kernel_path = "/nonexistent/vmlinuz"
    drv = QemuHypervisor(run_root=run_root)
    with pytest.raises(AssetError, match="kernel /nonexistent/vmlinuz does not exist"):
        await drv.create_sandbox("sb1", None, assets)
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))
    assert drv.state == VMState.NEW


async def test_create_missing_initrd(run_root: str, assets: HypervisorConfig) -> None:
    assets.initrd_path = "/nonexistent/initrd"
    with pytest.raises(AssetError, match="initrd /nonexistent/initrd"):
        await QemuHypervisor(run_root=run_root).create_sandbox("sb1", None, assets)


async def test_create_non_executable_qemu(
    run_root: str, assets: HypervisorConfig, tmp_path: Path
) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_text("not a program")
    assets.hypervisor_path = str(qemu)
    with pytest.raises(AssetError, match=f"QEMU binary {qemu} is not executable"):
        await QemuHypervisor(run_root=run_root).create_sandbox("sb1", None, assets)
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))


async def test_create_validates_config(run_root: str) -> None:
    with pytest.raises(ConfigError, match="Missing kernel path"):
        await QemuHypervisor(run_root=run_root).create_sandbox("sb1", None, HypervisorConfig())


async def test_early_exit_is_launch_error_and_leaves_nothing(
    run_root: str, assets: HypervisorConfig, tmp_path: Path
) -> None:
    assets.hypervisor_path = fake_qemu(
        tmp_path, 'echo "qemu: bogus option -frobnicate" >&2\nexit 3'
    )
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("sb1", None, assets)
    with pytest.raises(LaunchError) as exc:
        await drv.start_sandbox(10)
    err = exc.value
    assert err.exit_code == 3
    assert err.argv[0] == assets.hypervisor_path
    assert "bogus option -frobnicate" in err.log_tail
    assert "sb1" in str(err)
    assert drv.state == VMState.STOPPED
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))


async def test_start_timeout_kills_and_leaves_nothing(
    run_root: str, assets: HypervisorConfig, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    assets.hypervisor_path = fake_qemu(tmp_path, f"echo $$ > {pidfile}\nexec sleep 60")
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("sb1", None, assets)
    with pytest.raises(VMTimeoutError, match=r"sb1.*within 0.3s"):
        await drv.start_sandbox(0.3)
    pid = int(pidfile.read_text())
    assert not running(pid)
    assert drv.state == VMState.STOPPED
    assert not os.path.exists(os.path.join(run_root, "vm", "sb1"))


async def test_add_device_only_before_start(run_root: str, assets: HypervisorConfig) -> None:
    drv = QemuHypervisor(run_root=run_root)
    with pytest.raises(StateError, match="cold-plug"):
        await drv.add_device(BlockDrive(id="d0", path="/data/d.img"))
    await drv.create_sandbox("sb1", None, assets)
    d0 = BlockDrive(id="d0", path="/data/d.img")
    d1 = BlockDrive(id="d1", path="/data/e.img")
    await drv.add_device(d0)
    await drv.add_device(d1)
    assert (d0.scsi_addr, d1.scsi_addr) == ("0:0", "1:0")
    assert (d0.index, d1.index) == (0, 1)
    with pytest.raises(UnsupportedError, match="qemu does not support cold-plugging CPUDevice"):
        await drv.add_device(CPUDevice(amount=1))
    await drv.stop_sandbox()


async def test_hotplug_on_microvm_is_unsupported(
    run_root: str, assets: HypervisorConfig, dummy: subprocess.Popen[bytes]
) -> None:
    assets.hypervisor_machine_type = "microvm"
    drv = await running_driver(run_root, assets, dummy)
    with pytest.raises(UnsupportedError, match=r"qemu does not support resize_vcpus.*microvm"):
        await drv.resize_vcpus(2)
    with pytest.raises(UnsupportedError, match="qemu does not support hotplugging BlockDrive"):
        await drv.hotplug_add_device(BlockDrive(id="d0", path="/data/d.img"))
    await drv.disconnect()


@pytest.mark.parametrize("bad", ["../escape", "a,b", "has space", ""])
async def test_create_refuses_bad_ids(run_root: str, assets: HypervisorConfig, bad: str) -> None:
    with pytest.raises(ConfigError, match="sandbox: invalid id"):
        await QemuHypervisor(run_root=run_root).create_sandbox(bad, None, assets)
    assert os.listdir(run_root) == []


async def test_create_refuses_a_dir_in_use_and_bad_config_leaves_nothing(
    run_root: str, assets: HypervisorConfig, fake: FakeQMPServer
) -> None:
    first = QemuHypervisor(run_root=run_root)
    await first.create_sandbox("sb1", None, assets)
    await serve(fake, first)  # something answers on sb1's QMP socket: a live VM
    with pytest.raises(StateError, match="already uses"):
        await QemuHypervisor(run_root=run_root).create_sandbox("sb1", None, assets)
    await fake.close()
    await first.stop_sandbox()

    assets.cpu_features = "pmu=off -device evil"
    with pytest.raises(ConfigError, match="cpu_features"):
        await QemuHypervisor(run_root=run_root).create_sandbox("sb2", None, assets)
    assert os.listdir(os.path.join(run_root, "vm")) == []
