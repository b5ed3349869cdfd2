"""The mock driver: config validation, lifecycle state machine, device records, seed values."""

from __future__ import annotations

import os

import pytest

from virtcontainers import Capabilities, ConfigError, HypervisorType, Socket, StateError
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, CPUDevice, MemoryHotplug, SharedFS
from virtcontainers.errors import UnsupportedError
from virtcontainers.hypervisor import Hypervisor, VMState, new_hypervisor


def cfg(**kw: object) -> HypervisorConfig:
    c = HypervisorConfig(kernel_path="/boot/vmlinuz", initrd_path="/boot/initrd.img")
    for k, v in kw.items():
        setattr(c, k, v)
    return c


async def running(**kw: object) -> Hypervisor:
    hv = new_hypervisor("mock")
    await hv.create_sandbox("sb1", None, cfg(**kw))
    await hv.start_sandbox(5)
    return hv


def test_registry_builds_mock() -> None:
    hv = new_hypervisor(HypervisorType.MOCK)
    assert hv.hypervisor_type is HypervisorType.MOCK
    with pytest.raises(ConfigError, match="Unknown hypervisor type vmware"):
        new_hypervisor("vmware")


async def test_create_validates_config_with_seed_messages() -> None:
    hv = new_hypervisor("mock")
    with pytest.raises(ConfigError, match="Missing kernel path"):
        await hv.create_sandbox("x", None, HypervisorConfig())
    with pytest.raises(ConfigError, match="Missing image and initrd path"):
        await hv.create_sandbox("x", None, HypervisorConfig(kernel_path="/k"))
    assert hv.state is VMState.NEW
    c = cfg()
    await hv.create_sandbox("x", None, c)
    assert (c.num_vcpus, c.memory_size, c.block_device_driver) == (1, 2048, "virtio-scsi")
    assert hv.hypervisor_config() is c


async def test_lifecycle_state_machine() -> None:
    hv = new_hypervisor("mock")
    with pytest.raises(StateError, match="cannot start"):
        await hv.start_sandbox(5)
    await hv.create_sandbox("sb", None, cfg())
    with pytest.raises(StateError, match="cannot pause VM sb: it is created"):
        await hv.pause_sandbox()
    with pytest.raises(StateError, match=r"^mock: cannot resume VM sb: it is created$"):
        await hv.resume_sandbox()
    await hv.start_sandbox(5)
    assert hv.state is VMState.RUNNING
    with pytest.raises(StateError, match="cannot save"):
        await hv.save_sandbox()
    await hv.pause_sandbox()
    with pytest.raises(StateError, match="cannot pause VM sb: it is paused"):
        await hv.pause_sandbox()
    with pytest.raises(UnsupportedError, match="mock does not support save_sandbox"):
        await hv.save_sandbox()  # no memory to save: no TEMPLATE capability either
    assert Capabilities.TEMPLATE not in hv.capabilities()
    await hv.resume_sandbox()
    await hv.stop_sandbox()
    assert hv.state is VMState.STOPPED
    await hv.stop_sandbox()  # idempotent
    with pytest.raises(StateError):
        await hv.start_sandbox(5)
    with pytest.raises(StateError, match="stopped"):
        await hv.check()


async def test_devices_are_recorded() -> None:
    hv = new_hypervisor("mock")
    await hv.create_sandbox("sb", None, cfg())
    drive = BlockDrive("d0", "/tmp/d0.img")
    await hv.add_device(drive)
    assert hv.cold_devices == [drive]  # type: ignore[attr-defined]
    await hv.start_sandbox(5)
    with pytest.raises(StateError, match="cold-plug"):
        await hv.add_device(BlockDrive("d1", "/tmp/d1.img"))
    hot = BlockDrive("d2", "/tmp/d2.img")
    assert await hv.hotplug_add_device(hot) is hot
    with pytest.raises(ConfigError, match="already plugged"):
        await hv.hotplug_add_device(BlockDrive("d2", "/tmp/other.img"))
    await hv.hotplug_remove_device(hot)
    with pytest.raises(ConfigError, match="not plugged"):
        await hv.hotplug_remove_device(hot)
    with pytest.raises(UnsupportedError, match="mock does not support hotplug of SharedFS"):
        await hv.hotplug_add_device(SharedFS("fs", "/srv", "tag"))


async def test_cpu_and_memory_hotplug() -> None:
    hv = await running(num_vcpus=1, default_max_vcpus=4, memory_size=512)
    assert await hv.hotplug_add_device(CPUDevice(2)) == 2
    assert await hv.resize_vcpus(4) == (3, 4)
    with pytest.raises(ConfigError, match=r"1\.\.4"):
        await hv.resize_vcpus(5)
    assert await hv.hotplug_remove_device(CPUDevice(1)) == 1
    size, dev = await hv.resize_memory(1000, 128, True)
    assert size == 1024
    assert dev.size_mb == 512 and dev.probe
    assert await hv.hotplug_add_device(MemoryHotplug(256)) == 256
    with pytest.raises(UnsupportedError, match="mock does not support hot-removing memory"):
        await hv.hotplug_remove_device(MemoryHotplug(256))


async def test_seed_mock_values() -> None:
    hv = await running()
    assert await hv.get_thread_ids() == {0: os.getpid()}
    assert hv.get_pids() == [0]
    assert hv.generate_socket("sb1", False) == Socket("", "", "/tmp/socket", "socket")
    assert await hv.get_sandbox_console("sb1") == ""
    assert hv.get_virt_drive_offset() == 0
    with pytest.raises(UnsupportedError, match="not supported by VM cache"):
        await hv.to_grpc()
    with pytest.raises(UnsupportedError, match="from_grpc"):
        await hv.from_grpc(cfg(), b"{}")
    state = hv.save()
    assert state.type == "mock"
    assert Capabilities.FS_SHARING not in hv.capabilities()


async def test_context_manager_stops() -> None:
    hv = await running()
    async with hv:
        assert hv.state is VMState.RUNNING
    assert hv.state is VMState.STOPPED
