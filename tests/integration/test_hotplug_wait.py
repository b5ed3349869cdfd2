"""The agent's WAIT on real QEMU (q35, TCG): hot-added disks are found by serial through
kernel uevents, and waits for hardware that never comes time out with a clear error."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from virtcontainers import sandbox as sandbox_mod
from virtcontainers.agent import AgentRequestError
from virtcontainers.errors import VCError, VMTimeoutError
from virtcontainers.sandbox import Sandbox

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("driver", ["virtio-scsi", "virtio-blk"])
async def test_wait_names_the_hot_added_disk(leak_check: str, driver: str) -> None:
    disk = os.path.join(leak_check, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    async with Sandbox(
        "wait1", run_root=leak_check, memory_size=256, block_device_driver=driver
    ) as sb:
        agent = await sb.agent()
        await sb.add_disk(disk, "waitdisk")
        res = await agent.wait_hardware(block_serial="waitdisk", timeout=5)
        assert res.device is not None and res.dev_path == f"/dev/{res.device}"
        assert res.device.startswith("sd" if driver == "virtio-scsi" else "vd")
        r = await sb.exec(["sh", "-c", f"test -b {res.dev_path} && ls /sys/block"])
        assert r.exit_code == 0 and res.device in r.stdout.decode().split()
        # Hot-added after the wait began: the uevent (or the fallback timer) ends it.
        other = os.path.join(leak_check, "other.img")
        with open(other, "wb") as f:
            f.truncate(8 << 20)
        await sb.add_disk(other, "otherdisk")
        res2 = await agent.wait_hardware(block_serial="otherdisk", timeout=5)
        assert res2.device not in (None, res.device)


async def test_wait_for_missing_hardware_times_out(
    leak_check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Sandbox("wait2", run_root=leak_check, memory_size=256, num_vcpus=1) as sb:
        agent = await sb.agent()
        with pytest.raises(AgentRequestError) as info:
            await agent.wait_hardware(block_serial="never-there", cpus=2, timeout=0.3)
        assert info.value.errno == errno.ETIMEDOUT
        assert "no block device with serial 'never-there'" in info.value.message
        assert "1 of 2 CPUs online" in info.value.message
        monkeypatch.setattr(sandbox_mod, "GUEST_SETTLE_TIMEOUT", 0.3)
        with pytest.raises(VMTimeoutError, match=r"hotplugged disk ghost within 0.3s \(wait: "):
            async with sb._guest_sees("disk ghost", block_serial="ghost"):
                pass
        assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"


async def test_failed_hotplug_cancels_the_wait(leak_check: str) -> None:
    """add_disk sends the guest wait before the hotplug; a refused hotplug cancels it at once:
    the caller gets the hotplug's error (not a timeout) and the sandbox goes on working."""
    async with Sandbox("wait3", run_root=leak_check, memory_size=256, num_vcpus=1) as sb:
        missing = os.path.join(leak_check, "no-such-disk.img")
        started = asyncio.get_running_loop().time()
        with pytest.raises(VCError, match=r"no-such-disk\.img") as info:
            await sb.add_disk(missing, "ghost")
        assert not isinstance(info.value, VMTimeoutError)
        assert asyncio.get_running_loop().time() - started < sandbox_mod.GUEST_SETTLE_TIMEOUT
        assert "ghost" not in sb.disks
        disk = os.path.join(leak_check, "real.img")
        with open(disk, "wb") as f:
            f.truncate(8 << 20)
        drive = await sb.add_disk(disk, "real")
        assert (await sb.exec(["sh", "-c", "ls /sys/block | grep -c sd"])).stdout == b"1\n"
        await sb.remove_disk(drive)
        os.unlink(disk)
