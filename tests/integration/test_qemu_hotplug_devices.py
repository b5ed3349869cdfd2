"""Device hotplug on real QEMU (q35, TCG), each step checked from inside the guest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from qemu_hotplug_support import VM, booted, make_config, netns_with_tap

from virtcontainers.devices import BlockDrive, NetworkEndpoint, VFIODevice
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import ConfigError, HypervisorError, StateError
from virtcontainers.types import Capabilities

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

BLOCK = 4096
MAC = "52:54:00:12:34:56"


def disk(tmp_path: Path, name: str, size_mib: int, pattern: bytes) -> str:
    """A sparse raw disk image with `pattern` in its second 4 KiB block."""
    path = tmp_path / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
        f.seek(BLOCK)
        f.write(pattern)
    return str(path)


def cmdline_of(pid: int) -> bytes:
    """A live process's command line (b"" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


async def guest_block_with_serial(vm: VM, serial: str) -> str:
    """Name of the virtio-blk disk whose serial is `serial` ("" if none)."""
    return (
        await vm.sh(
            'for d in /sys/block/vd*; do [ -e $d/serial ] && [ "$(cat $d/serial)" = '
            f"'{serial}' ] && basename $d; done; true"
        )
    ).strip()


async def read_block(vm: VM, dev: str, n: int) -> str:
    return (
        await vm.sh(f"dd if=/dev/{dev} bs={BLOCK} skip=1 count=1 2>/dev/null | head -c {n}")
    ).strip()


async def test_block_scsi_net_hotplug_and_errors(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    blk = disk(tmp_path, "blk", 64, b"virtio-blk-pattern")
    scsi = disk(tmp_path, "scsi", 48, b"scsi-hd-pattern")
    spare = disk(tmp_path, "spare", 8, b"spare")
    cfg = make_config(guest_assets, pcie_root_port=2)
    async with netns_with_tap() as ns, booted(run_root, cfg, network_ns=ns.path) as vm:
        drv = vm.drv
        caps = drv.capabilities()
        assert Capabilities.BLOCK_DEVICE_HOTPLUG in caps
        assert Capabilities.NET_DEVICE_HOTPLUG in caps

        # virtio-blk on a pcie-root-port: visible with its size and content.
        d1 = BlockDrive(id="disk1", path=blk, driver="virtio-blk")
        assert await drv.hotplug_add_device(d1) is d1
        assert d1.index == drv.get_virt_drive_offset() == 0
        assert d1.pci_path.endswith("/00") and len(d1.pci_path) == 5
        await vm.wait_for("ls /sys/block | grep -c ^vd", "1")
        name = await guest_block_with_serial(vm, "disk1")
        assert name.startswith("vd")
        assert (await vm.sh(f"cat /sys/block/{name}/size")).strip() == str(64 << 11)
        assert await read_block(vm, name, 18) == "virtio-blk-pattern"

        # scsi-hd on the virtio-scsi controller.
        d2 = BlockDrive(id="disk2", path=scsi, driver="virtio-scsi")
        await drv.hotplug_add_device(d2)
        assert d2.scsi_addr == "0:0"
        assert d2.index == 1
        assert d2.pci_path == ""
        await vm.wait_for("ls /sys/block | grep ^sd", "sda")
        assert (await vm.sh("cat /sys/block/sda/size")).strip() == str(48 << 11)
        assert await read_block(vm, "sda", 15) == "scsi-hd-pattern"

        # A NIC on the tap of the namespace QEMU runs in.
        nic = NetworkEndpoint(id="nic1", tap_name=ns.tap, mac=MAC)
        await drv.hotplug_add_device(nic)
        assert nic.pci_path.endswith("/00") and nic.pci_path != d1.pci_path
        await vm.wait_for("cat /sys/class/net/eth*/address", MAC)

        # Both root ports are taken (scsi-hd sits on the controller): a clear error, and
        # nothing half-added.
        extra = BlockDrive(id="disk3", path=spare, driver="virtio-blk")
        with pytest.raises(HypervisorError, match="no free pcie-root-port for blk-disk3"):
            await drv.hotplug_add_device(extra)
        assert extra.pci_path == "" and 2 not in drv.hotplug.block_indexes

        # Removals: each device disappears from the guest.
        await drv.hotplug_remove_device(d1)
        await vm.wait_for("ls /sys/block | grep -c ^vd; true", "0")
        assert d1.pci_path == "" and 0 not in drv.hotplug.block_indexes
        await drv.hotplug_remove_device(d2)
        await vm.wait_for("ls /sys/block | grep -c ^sd; true", "0")
        await drv.hotplug_remove_device(nic)
        await vm.wait_for("ls /sys/class/net | grep -c ^eth; true", "0")
        with pytest.raises(StateError, match=r"nic1 .*never hot-added"):
            await drv.hotplug_remove_device(nic)

        # The backends went too: the same ids can be added again (the port freed above
        # takes the drive that was refused).
        await drv.hotplug_add_device(extra)
        await vm.wait_for("ls /sys/block | grep -c ^vd", "1")
        await drv.hotplug_add_device(d2)
        await vm.wait_for("ls /sys/block | grep ^sd", "sda")
        assert drv.hotplug.block_indexes == [0, 1]


async def test_vfio_refused_by_qemu_leaves_nothing(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    # A host device "bound to vfio-pci" that does not exist: real QEMU must refuse it.
    sysfs = tmp_path / "0000:7f:1f.7"
    (tmp_path / "drivers" / "vfio-pci").mkdir(parents=True)
    sysfs.mkdir()
    (sysfs / "driver").symlink_to(tmp_path / "drivers" / "vfio-pci")
    cfg = make_config(guest_assets, pcie_root_port=1)
    async with booted(run_root, cfg) as vm:
        drv = vm.drv
        dev = VFIODevice(id="gpu0", bdf="0000:7f:1f.7", sysfs_dev=str(sysfs))
        with pytest.raises(HypervisorError, match=r"hotplugging VFIO device gpu0.*device_add"):
            await drv.hotplug_add_device(dev)
        assert all(not b.devices_addr for b in drv.hotplug.bridges)
        peripherals = await drv._execute("qom-list", {"path": "/machine/peripheral"})
        assert "vfio-gpu0" not in {p["name"] for p in peripherals}
        # Not bound to vfio-pci at all: refused before QEMU is asked.
        os.unlink(sysfs / "driver")
        with pytest.raises(ConfigError, match=r"gpu0: host device 0000:7f:1f\.7 is bound to no"):
            await drv.hotplug_add_device(dev)
        # The one root port is still free for a real device.
        img = disk(tmp_path, "after", 8, b"after-vfio")
        await drv.hotplug_add_device(BlockDrive(id="after", path=img, driver="virtio-blk"))
        await vm.wait_for("ls /sys/block | grep -c ^vd", "1")


async def test_vhost_user_blk_served_by_storage_daemon(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    img = disk(tmp_path, "vu", 32, b"vhost-user-blk-pattern")
    cfg = make_config(guest_assets, pcie_root_port=1, enable_vhost_user_store=True)
    async with booted(run_root, cfg) as vm:
        drv = vm.drv
        assert Capabilities.VHOST_USER_HOTPLUG in drv.capabilities()
        assert any("memory-backend-memfd" in a and "share=on" in a for a in drv.argv)
        qemu_pid = drv.get_pids()[0]
        drive = BlockDrive(id="vu0", path=img)
        await drv.hotplug_add_device(drive)
        pids = drv.get_pids()
        [daemon] = drv.helpers.pids("qemu-storage-daemon")
        assert pids[0] == qemu_pid and daemon in pids
        assert len(pids) == 3  # QEMU, its console log keeper, the daemon
        with open(f"/proc/{daemon}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        assert cmdline[0].endswith(b"qemu-storage-daemon")
        assert any(b"vhost-user-blk" in a for a in cmdline)
        await vm.wait_for("ls /sys/block | grep -c ^vd", "1")
        assert (await vm.sh("cat /sys/block/vda/size")).strip() == str(32 << 11)
        assert await read_block(vm, "vda", 22) == "vhost-user-blk-pattern"
        # The guest writes through the daemon into the host file.
        await vm.sh(
            f"printf guest-wrote | dd of=/dev/vda bs={BLOCK} seek=2 conv=notrunc,fsync 2>/dev/null"
        )
        with open(img, "rb") as f:
            f.seek(2 * BLOCK)
            assert f.read(11) == b"guest-wrote"

        # Another process takes the VM over from its persisted state and removes the drive.
        state = drv.save()
        await drv.disconnect()
        other = QemuHypervisor(run_root=run_root)
        other.load(state)
        assert other.get_pids() == pids
        await other.hotplug_remove_device(BlockDrive(id="vu0", path=img))
        await vm.wait_for("ls /sys/block | grep -c ^vd; true", "0")
        assert other.get_pids() == [p for p in pids if p != daemon]
        assert b"qemu-storage-daemon" not in cmdline_of(daemon)
        await other.disconnect()
