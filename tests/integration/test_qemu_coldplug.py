"""Cold-plugged devices on real QEMU: disks (virtio-blk, virtio-scsi), a tap NIC in a network
namespace, the RNG, and memory options under the seccomp sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qemu_hotplug_support import VM, booted, make_config, netns_with_tap

from virtcontainers.devices import BlockDrive, NetworkEndpoint
from virtcontainers.guest import AGENT_READY_MARKER
from virtcontainers.types import Param

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


AGENT_DEBUG = [Param("vc.debug", "1")]  # the agent logs each module it loads to the console


def scsi_loaded_before_ready(vm: VM) -> bool:
    """From the console: did the agent load virtio_scsi before printing its ready marker?"""
    log = Path(vm.drv.paths.console_log).read_text(errors="replace")
    assert AGENT_READY_MARKER in log and "loaded virtio_scsi" in log, log
    return log.index("loaded virtio_scsi") < log.index(AGENT_READY_MARKER)


def disk(tmp_path: Path, name: str, size_mib: int) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    return str(path)


async def test_disks_virtio_blk_and_scsi(run_root: str, guest_assets: Any, tmp_path: Path) -> None:
    blk = BlockDrive(id="d0", path=disk(tmp_path, "a.img", 8), driver="virtio-blk")
    scsi = BlockDrive(id="d1", path=disk(tmp_path, "b.img", 16), read_only=True)
    # block_device_driver defaults to virtio-scsi
    cfg = make_config(guest_assets, kernel_params=list(AGENT_DEBUG))
    async with booted(run_root, cfg, devices=(blk, scsi)) as vm:
        assert scsi.scsi_addr == "0:0"
        assert "vc.scsi=late" not in vm.drv.argv[vm.drv.argv.index("-append") + 1]
        # vda: 8 MiB in 512-byte sectors; the scsi disk: 16 MiB, read-only.
        await vm.wait_for("cat /sys/block/vda/size", str(8 << 11))
        await vm.wait_for("cat /sys/block/sda/size", str(16 << 11))
        assert (await vm.sh("cat /sys/block/sda/ro")).strip() == "1"
        assert (await vm.sh("cat /sys/block/vda/ro")).strip() == "0"
        await vm.sh("echo written > /dev/vda")
        # A cold-plugged SCSI disk is there when the agent is ready: its driver loads before.
        assert scsi_loaded_before_ready(vm)
    with open(blk.path, "rb") as f:
        assert f.read(8) == b"written\n"


async def test_scsi_driver_after_ready_without_scsi_disks(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    """No SCSI disk cold-plugged: virtio_scsi (and its scan of the empty bus) loads after the
    ready marker, and a SCSI disk hot-added right after boot is still found and usable."""
    cfg = make_config(guest_assets, kernel_params=list(AGENT_DEBUG))
    async with booted(run_root, cfg) as vm:
        assert "vc.scsi=late" in vm.drv.argv[vm.drv.argv.index("-append") + 1]
        drive = BlockDrive(id="late", path=disk(tmp_path, "late.img", 8))
        await vm.drv.hotplug_add_device(drive)
        res = await vm.agent.wait_hardware(block_serial=vm.drv.block_serial(drive), timeout=30)
        assert res.device is not None and res.device.startswith("sd")
        await vm.sh(f"echo hot > {res.dev_path}")
        with open(drive.path, "rb") as f:
            assert f.read(4) == b"hot\n"
        assert not scsi_loaded_before_ready(vm)
        await vm.drv.hotplug_remove_device(drive)


async def test_module_parameters_from_kernel_command_line(run_root: str, guest_assets: Any) -> None:
    """`module.param=value` on the kernel command line reaches a module the agent loads (the
    kernel applies it to built-in code only), '-' standing for '_' in the name."""
    params = [Param("fuse.max_user_bgreq", "17"), Param("virtio-net.napi_tx", "0")]
    async with booted(run_root, make_config(guest_assets, kernel_params=params)) as vm:
        await vm.wait_for("cat /sys/module/fuse/parameters/max_user_bgreq", "17")
        await vm.wait_for("cat /sys/module/virtio_net/parameters/napi_tx", "N")


async def test_tap_nic_in_network_namespace(run_root: str, guest_assets: Any) -> None:
    mac = "02:00:00:aa:bb:01"
    # iommu_platform: every virtio device (the NIC, the agent's serial bus, the SCSI
    # controller) offers VIRTIO_F_ACCESS_PLATFORM (feature bit 33) and the guest takes it.
    cfg = make_config(guest_assets, iommu_platform=True)
    async with netns_with_tap() as ns:
        ep = NetworkEndpoint(id="eth0", tap_name=ns.tap, mac=mac)
        async with booted(run_root, cfg, devices=(ep,), network_ns=ns.path) as vm:
            await vm.wait_for("cat /sys/class/net/eth0/address", mac)
            assert len([a for a in vm.drv.argv if "iommu_platform=on" in a]) >= 3
            # Polled: the SCSI controller's driver loads after the ready marker (no disk).
            await vm.wait_for("cut -c34 /sys/bus/virtio/devices/*/features | sort -u", "1")


async def test_rng_prealloc_under_seccomp(run_root: str, guest_assets: Any) -> None:
    cfg = make_config(guest_assets, entropy_source="/dev/urandom", mem_prealloc=True)
    async with booted(run_root, cfg) as vm:
        argv = vm.drv.argv
        assert "-sandbox" in argv and "virtio-rng-pci,rng=rng0,id=rng-dev0" in argv
        await vm.wait_for("cat /sys/class/misc/hw_random/rng_current", "virtio_rng.0")
        await vm.drv.check()


async def test_viommu(run_root: str, guest_assets: Any) -> None:
    async with booted(run_root, make_config(guest_assets, iommu=True)) as vm:
        assert "DMAR: IOMMU enabled" in await vm.sh("dmesg")
