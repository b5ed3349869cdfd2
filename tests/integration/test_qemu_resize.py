"""vCPU and memory resizing on real QEMU (q35, TCG), checked from inside the guest."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from qemu_hotplug_support import VM, booted, make_config

from virtcontainers.devices import CPUDevice, MemoryHotplug
from virtcontainers.errors import ConfigError, HypervisorError, UnsupportedError
from virtcontainers.types import Capabilities, MemoryDevice

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


async def online_cpus(vm: VM, expect: str, timeout: float = 30.0) -> None:
    """Online hot-added vCPUs (the guest registers them a moment after device_add) until
    /sys/devices/system/cpu/online reads `expect`."""
    deadline = time.monotonic() + timeout
    online = ""
    while time.monotonic() < deadline:
        await vm.agent.online(cpus=True, memory=False)
        online = (await vm.sh("cat /sys/devices/system/cpu/online")).strip()
        if online == expect:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"guest CPUs online: {online!r}, expected {expect!r}")


async def mem_total_mib(vm: VM) -> int:
    out = await vm.sh("grep MemTotal /proc/meminfo")
    return int(out.split()[1]) // 1024


async def online_memory(vm: VM, expect_mib: int, timeout: float = 30.0) -> None:
    """Online hot-added memory blocks (the guest registers them asynchronously) until
    MemTotal reads `expect_mib`."""
    deadline = time.monotonic() + timeout
    total = 0
    while time.monotonic() < deadline:
        await vm.agent.online(cpus=False, memory=True)
        total = await mem_total_mib(vm)
        if total == expect_mib:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"guest MemTotal {total} MiB, expected {expect_mib} MiB")


async def test_vcpus_and_dimm_memory(run_root: str, guest_assets: Any) -> None:
    cfg = make_config(guest_assets, num_vcpus=1, default_max_vcpus=2, mem_slots=2)
    async with booted(run_root, cfg) as vm:
        drv = vm.drv
        caps = drv.capabilities()
        assert Capabilities.CPU_HOTPLUG in caps and Capabilities.MEMORY_HOTPLUG in caps

        # vCPUs: up to maxcpus, onlined by the agent.
        assert await drv.resize_vcpus(2) == (1, 2)
        assert len(drv.hotplug.vcpus) == 1
        assert [v.id for v in drv.save().hotplugged_vcpus] == drv.hotplug.vcpus
        assert len(await drv.get_thread_ids()) == 2
        await online_cpus(vm, "0-1")
        assert (await vm.sh("nproc")).strip() == "2"
        with pytest.raises(ConfigError, match="to 3 vCPUs: its maximum is 2"):
            await drv.resize_vcpus(3)
        with pytest.raises(ConfigError, match="booted with 1"):
            await drv.resize_vcpus(0)
        assert await drv.resize_vcpus(2) == (2, 2)
        # QEMU 7.2 under TCG corrupts itself when a vCPU is unplugged (the next device_add
        # aborts it): the driver refuses, and the VM stays healthy with both vCPUs.
        with pytest.raises(UnsupportedError, match="hot-removing vCPUs from VM hp1 under TCG"):
            await drv.resize_vcpus(1)
        with pytest.raises(UnsupportedError, match="under TCG"):
            await drv.hotplug_remove_device(CPUDevice(amount=1))
        assert len(drv.hotplug.vcpus) == 1
        await drv.check()
        assert (await vm.sh("nproc")).strip() == "2"

        # Memory: a pc-dimm; the guest sees it once its blocks are online.
        before = await mem_total_mib(vm)
        new_mb, dev = await drv.resize_memory(512, 128, False)
        assert new_mb == 512
        assert dev.slot == 0 and dev.size_mb == 256 and dev.addr >= 4 << 30 and not dev.probe
        assert drv.hotplug.memory_mb == 256
        await online_memory(vm, before + 256)
        # Aligned up to the guest's block size.
        new_mb, dev = await drv.resize_memory(600, 128, True)
        assert (new_mb, dev.slot, dev.size_mb, dev.probe) == (640, 1, 128, True)
        await online_memory(vm, before + 384)
        assert await drv.resize_memory(640, 128, False) == (640, MemoryDevice(-1, 0))
        # Limits: both slots are used; shrinking DIMMs is not offered; maxmem is enforced.
        with pytest.raises(HypervisorError, match="no free memory slot \\(all 2 are in use"):
            await drv.hotplug_add_device(MemoryHotplug(size_mb=128))
        with pytest.raises(UnsupportedError, match="qemu does not support shrinking memory"):
            await drv.resize_memory(512, 128, False)
        assert drv.hotplug.memory_mb == 384


async def test_virtio_mem_grows_and_shrinks(run_root: str, guest_assets: Any) -> None:
    cfg = make_config(guest_assets, virtio_mem=True)
    async with booted(run_root, cfg) as vm:
        drv = vm.drv
        assert Capabilities.VIRTIO_MEM in drv.capabilities()
        before = await mem_total_mib(vm)
        new_mb, dev = await drv.resize_memory(512, 128, False)
        assert new_mb == 512 and dev.size_mb == 256 and dev.slot == -1 and dev.addr > 0
        await online_memory(vm, before + 256)
        new_mb, dev = await drv.resize_memory(384, 128, False)
        assert new_mb == 384 and dev.size_mb == 128
        assert drv.hotplug.memory_mb == 128
        await online_memory(vm, before + 128)
        dev = await drv.hotplug_add_device(MemoryHotplug(size_mb=64))
        assert dev.size_mb == 192 and drv.hotplug.memory_mb == 192
        with pytest.raises(ConfigError, match="booted with 256 MiB"):
            await drv.resize_memory(128, 128, False)
        with pytest.raises(ConfigError, match="the device holds at most"):
            await drv.resize_memory(10_000_000, 128, False)
        assert drv.hotplug.memory_mb == 192
