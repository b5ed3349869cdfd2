"""ACRN driver against the fake `acrn-dm` and `acrnctl` processes (no ACRN host can run here).

The fake device model validates the real flag syntax and records its argv and slots; the fake
acrnctl applies `blkrescan` to that record and refuses bad slots. Every test ends with a leak
check (processes, children, files under the run root, fds).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from fakes.clh.launcher import write_launcher
from leaks import LeakCheck, running
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    CPUDevice,
    HybridVSockDevice,
    MemoryHotplug,
    NetworkEndpoint,
    SerialPort,
    SharedFS,
)
from virtcontainers.drivers.acrn import Acrn, UuidAllocator
from virtcontainers.drivers.acrn.state import AcrnState
from virtcontainers.errors import (
    ConfigError,
    HypervisorError,
    LaunchError,
    StateError,
    UnsupportedError,
    VMExitedError,
    VMTimeoutError,
)
from virtcontainers.hypervisor import VMState, new_hypervisor
from virtcontainers.types import Capabilities, Socket

pytestmark = pytest.mark.integration


@dataclass
class AcrnEnv:
    root: str
    tmp: str
    records: str

    def file(self, name: str, data: bytes = b"x" * 512) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def config(self, dm_env: dict[str, str] | None = None, **overrides: Any) -> HypervisorConfig:
        env = {"FAKE_ACRN_DIR": self.records, **(dm_env or {})}
        n = len(os.listdir(self.tmp))
        dm = write_launcher(
            os.path.join(self.tmp, f"acrn-dm-{n}"), "tests.fakes.acrn.acrn_dm", env=env
        )
        ctl = write_launcher(
            os.path.join(self.tmp, f"acrnctl-{n}"), "tests.fakes.acrn.acrnctl", env=env
        )
        cfg = HypervisorConfig(
            kernel_path=self.file("vmlinuz"),
            image_path=self.file("rootfs.img"),
            hypervisor_path=dm,
            hypervisor_ctl_path=ctl,
            memory_size=512,
            num_vcpus=2,
            default_max_vcpus=8,
            block_device_driver="virtio-blk",
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    def record(self, name: str = "vm1") -> dict[str, Any]:
        with open(os.path.join(self.records, f"{name}.json")) as f:
            return dict(json.load(f))

    def ctl_log(self) -> list[dict[str, str]]:
        path = os.path.join(self.records, "acrnctl.log")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f]

    async def create(self, cfg: HypervisorConfig, id: str = "vm1") -> Acrn:
        h = new_hypervisor("acrn", run_root=self.root)
        assert isinstance(h, Acrn)
        await h.create_sandbox(id, None, cfg)
        return h

    async def start(self, cfg: HypervisorConfig, id: str = "vm1") -> Acrn:
        h = await self.create(cfg, id)
        await h.start_sandbox(20)
        return h


@pytest.fixture
async def env(run_root: str) -> AsyncIterator[AcrnEnv]:
    tmp = tempfile.mkdtemp(prefix="acrnt-", dir="/tmp")
    records = os.path.join(tmp, "records")
    os.mkdir(records)
    check = LeakCheck(run_root)
    try:
        yield AcrnEnv(run_root, tmp, records)
        await check.verify()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def test_full_lifecycle(env: AcrnEnv) -> None:
    h = await env.create(env.config())
    assert h.state is VMState.CREATED and h.get_pids() == []
    agent = os.path.join(env.root, "vm", "vm1", "kata.sock")
    await h.add_device(SerialPort(Socket("channel0", "charch0", agent, "agent.channel.0")))
    await h.add_device(NetworkEndpoint("eth0", "tap0", mac="02:00:00:00:00:07"))
    await h.start_sandbox(20)
    assert str(h.state) == "running"
    [pid] = h.get_pids()
    rec = env.record()
    assert rec["pid"] == pid and rec["name"] == "vm1"
    assert rec["uuid"] == h.uuid and rec["memsize"] == "512M" and rec["cpu_affinity"] == "0,1"
    assert rec["argv"] == h.argv()[1:]
    emuls = [v["emul"] for v in rec["slots"].values()]
    assert emuls.count("virtio-console") == 2 and "virtio-net" in emuls
    assert UuidAllocator(env.root).in_use() == {h.uuid: "vm1"}
    console = await h.get_sandbox_console("vm1")
    assert os.path.exists(console) and os.path.exists(agent)
    await h.check()

    await h.stop_sandbox()
    assert str(h.state) == "stopped"
    assert not running(pid)
    assert env.record()["exited"] is True  # it got SIGINT and shut down cleanly
    assert not os.path.exists(h.vm_dir)
    assert UuidAllocator(env.root).in_use() == {}
    await h.stop_sandbox()  # idempotent
    await h.cleanup()


async def test_two_vms_get_distinct_uuids(env: AcrnEnv) -> None:
    a = await env.start(env.config(), "vma")
    b = await env.start(env.config(), "vmb")
    assert a.uuid != b.uuid
    assert {env.record("vma")["uuid"], env.record("vmb")["uuid"]} == {a.uuid, b.uuid}
    await a.stop_sandbox()
    c = await env.create(env.config(), "vmc")
    assert c.uuid == a.uuid  # released by vma, reused only now
    await c.cleanup()  # never started: cleanup gives the UUID back
    await b.stop_sandbox()
    assert UuidAllocator(env.root).in_use() == {}


async def test_block_hotplug_through_acrnctl(env: AcrnEnv) -> None:
    h = await env.start(env.config())
    assert h.capabilities() == Capabilities.BLOCK_DEVICE | Capabilities.BLOCK_DEVICE_HOTPLUG
    first_pool_slot = h.save().driver_state(AcrnState).pool[0]
    d1 = BlockDrive("d1", env.file("d1.img"))
    d2 = BlockDrive("d2", env.file("d2.img"))
    await h.hotplug_add_device(d1)
    await h.hotplug_add_device(d2)
    assert d1.index == h.get_virt_drive_offset() == 1 and d2.index == 2
    assert int(d1.pci_path, 16) == first_pool_slot
    assert env.ctl_log() == [
        {"cmd": "blkrescan", "vm": "vm1", "arg": f"{first_pool_slot},{d1.path}"},
        {"cmd": "blkrescan", "vm": "vm1", "arg": f"{first_pool_slot + 1},{d2.path}"},
    ]
    assert env.record()["slots"][f"{first_pool_slot}:0"]["current"] == d1.path
    assert h.save().block_index_map == [0, 1]
    with pytest.raises(ConfigError, match="already hotplugged"):
        await h.hotplug_add_device(BlockDrive("d1", env.file("d1b.img")))
    await h.hotplug_remove_device(d1)
    assert env.record()["slots"][f"{first_pool_slot}:0"]["current"] == "nodisk"
    assert h.save().block_index_map == [1]
    with pytest.raises(ConfigError, match="not hotplugged"):
        await h.hotplug_remove_device(d1)
    d3 = BlockDrive("d3", env.file("d3.img"))
    await h.hotplug_add_device(d3)  # takes the freed slot
    assert d3.pci_path == d1.pci_path
    await h.stop_sandbox()


async def test_hotplug_pool_exhaustion(env: AcrnEnv) -> None:
    h = await env.start(env.config())
    for i in range(8):
        await h.hotplug_add_device(BlockDrive(f"d{i}", env.file(f"d{i}.img")))
    with pytest.raises(HypervisorError, match="all 8 hotplug disk slots are in use"):
        await h.hotplug_add_device(BlockDrive("d8", env.file("d8.img")))
    await h.stop_sandbox()


async def test_acrnctl_refusal_is_reported(env: AcrnEnv) -> None:
    h = await env.start(env.config())
    state = h.save()
    state.driver_state(AcrnState).pool[0] = 3  # the console's slot: acrnctl must refuse it
    h.load(state)
    with pytest.raises(HypervisorError) as ei:
        await h.hotplug_add_device(BlockDrive("d1", env.file("d1.img")))
    text = str(ei.value)
    assert "blkrescan vm1 3," in text and "exit code 1" in text
    assert "slot 3 of VM vm1 is not a virtio-blk device" in text
    assert h.save().block_index_map == []
    await h.stop_sandbox()


async def test_acrnctl_hang_times_out(env: AcrnEnv) -> None:
    cfg = env.config()
    h = await env.start(cfg)
    hang = write_launcher(
        os.path.join(env.tmp, "acrnctl-hang"),
        "tests.fakes.acrn.acrnctl",
        env={"FAKE_ACRN_DIR": env.records, "FAKE_ACRNCTL_HANG": "1"},
    )
    h.ctl = hang
    h.ctl_timeout = 0.5
    with pytest.raises(VMTimeoutError, match=r"did not finish within 0\.5s"):
        await h.hotplug_add_device(BlockDrive("d1", env.file("d1.img")))
    await h.stop_sandbox()


async def test_bad_argv_is_a_launch_error_with_the_log_tail(env: AcrnEnv) -> None:
    h = await env.create(env.config())
    os.unlink(h.hypervisor_config().kernel_path)  # acrn-dm cannot open the kernel
    with pytest.raises(LaunchError) as ei:
        await h.start_sandbox(20)
    assert ei.value.exit_code == 1
    assert "cannot open kernel" in ei.value.log_tail
    assert ei.value.argv[-1] == "vm1"
    assert not os.path.exists(h.vm_dir)
    await h.cleanup()
    assert UuidAllocator(env.root).in_use() == {}


async def test_hang_at_start_times_out_and_leaves_nothing(env: AcrnEnv) -> None:
    h = await env.create(env.config(dm_env={"FAKE_ACRN_HANG": "1"}))
    with pytest.raises(VMTimeoutError, match="console socket"):
        await h.start_sandbox(1.5)
    assert h.get_pids() == []
    await h.cleanup()


async def test_stop_escalates_to_sigkill(env: AcrnEnv) -> None:
    h = await env.start(env.config(dm_env={"FAKE_ACRN_IGNORE_SIGINT": "1"}))
    h.stop_grace = 0.3
    pid = h.get_pids()[0]
    await h.stop_sandbox()
    assert not running(pid)
    assert env.record()["exited"] is False  # it never handled SIGINT: it was killed


async def test_crash_is_seen_by_check_and_hotplug(env: AcrnEnv) -> None:
    h = await env.start(env.config(dm_env={"FAKE_ACRN_CRASH_AFTER": "0.2"}))
    pid = h.get_pids()[0]
    for _ in range(100):
        if not running(pid):
            break
        await asyncio.sleep(0.05)
    with pytest.raises(VMExitedError, match="acrn-dm is not running"):
        await h.check()
    with pytest.raises(VMExitedError):
        await h.hotplug_add_device(BlockDrive("d1", env.file("d1.img")))
    await h.stop_sandbox()


async def test_everything_else_is_unsupported(env: AcrnEnv) -> None:
    h = await env.create(env.config())
    share = os.path.join(env.tmp, "share")
    os.mkdir(share)
    with pytest.raises(UnsupportedError, match="acrn does not support cold-plug of SharedFS"):
        await h.add_device(SharedFS("fs", share, "tag"))
    with pytest.raises(UnsupportedError, match="cold-plug of HybridVSockDevice"):
        await h.add_device(HybridVSockDevice(os.path.join(env.tmp, "v.sock")))
    await h.start_sandbox(20)
    cases = [
        (h.pause_sandbox(), "pause"),
        (h.resume_sandbox(), "resume"),
        (h.save_sandbox(), "save"),
        (h.resize_vcpus(2), "vCPU resize"),
        (h.resize_memory(1024, 128, False), "memory resize"),
        (h.hotplug_add_device(NetworkEndpoint("e1", "tap1")), "hotplug of NetworkEndpoint"),
        (h.hotplug_add_device(CPUDevice(1)), "hotplug of CPUDevice"),
        (h.hotplug_add_device(MemoryHotplug(128)), "hotplug of MemoryHotplug"),
        (h.hotplug_add_device(SharedFS("fs", share, "t")), "hotplug of SharedFS"),
        (h.hotplug_remove_device(NetworkEndpoint("e1", "tap1")), "hot-remove of NetworkEndpoint"),
        (h.get_thread_ids(), "vCPU thread ids"),
        (h.to_grpc(), "VM cache hand-over (to_grpc)"),
        (h.from_grpc(h.hypervisor_config(), b"{}"), "VM cache hand-over (from_grpc)"),
    ]
    for coro, operation in cases:
        with pytest.raises(UnsupportedError) as ei:
            await coro
        assert ei.value.hypervisor == "acrn" and ei.value.operation == operation
    assert h.state is VMState.RUNNING
    await h.stop_sandbox()


async def test_network_namespace_is_refused(env: AcrnEnv) -> None:
    h = Acrn(run_root=env.root)
    with pytest.raises(UnsupportedError, match="network namespaces"):
        await h.create_sandbox("vm1", "/var/run/netns/x", env.config())
    with pytest.raises(StateError):
        await h.start_sandbox(5)


_ATTACH_SCRIPT = r"""
import asyncio, json, sys
from virtcontainers.drivers.acrn import Acrn
from virtcontainers.devices import BlockDrive
from virtcontainers.persist import StateStore

async def main():
    h = Acrn(run_root=sys.argv[1])
    h.load(StateStore(sys.argv[1]).load_hypervisor("vm1"))
    await h.check()
    disk = BlockDrive("late", sys.argv[2])
    await h.hotplug_add_device(disk)
    out = {"pids": h.get_pids(), "uuid": h.uuid, "pci": disk.pci_path, "index": disk.index}
    await h.stop_sandbox()
    out["after"] = h.state.value
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_save_load_reattach_from_a_second_process(env: AcrnEnv) -> None:
    from virtcontainers.persist import StateStore

    h = await env.start(env.config())
    await h.hotplug_add_device(BlockDrive("early", env.file("early.img")))
    pid = h.get_pids()[0]
    store = StateStore(env.root)
    store.save_hypervisor("vm1", h.save())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ATTACH_SCRIPT,
        env.root,
        env.file("late.img"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["pids"] == [pid] and result["uuid"] == h.uuid
    assert result["index"] == 2  # the second pool slot: the first is still taken by "early"
    assert result["after"] == "stopped"
    assert not running(pid)
    assert env.record()["exited"] is True  # stopped with SIGINT by the other process
    assert UuidAllocator(env.root).in_use() == {}
    await h.stop_sandbox()  # reaps our child
    store.delete("vm1")
    os.rmdir(os.path.join(env.root, "sbs"))


async def test_load_never_signals_a_reused_pid(env: AcrnEnv) -> None:
    h = await env.start(env.config())
    pid = h.get_pids()[0]
    state = h.save()
    assert state.pid_start_time is not None
    state.pid_start_time += 999
    other = Acrn(run_root=env.root)
    other.load(state)
    other.vm_dir = ""  # this handle must not touch the live VM's files either
    other.id = ""
    with pytest.raises(VMExitedError):
        await other.check()
    await other.stop_sandbox()
    assert running(pid)
    os.kill(pid, 0)
    await h.stop_sandbox()
    assert not running(pid)
    assert env.record()["exited"] is True
