"""QEMU hotplug QMP sequences against the scripted fake QMP server.

A `sleep` process stands in for QEMU; the fake server listens on the VM's QMP socket.
"""

from __future__ import annotations

import asyncio
import socket as pysocket
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fakes.qmp_server import Expect, FakeQMPServer
from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    CPUDevice,
    MemoryHotplug,
    NetworkEndpoint,
    SerialPort,
    SharedFS,
    VFIODevice,
    VhostUserDevice,
)
from virtcontainers.drivers.qemu import QemuHypervisor, machine_capabilities, pci, resize
from virtcontainers.drivers.qemu import hotplug as qhotplug
from virtcontainers.drivers.qemu.rollback import Rollback
from virtcontainers.drivers.qemu.state import Dimm, Plugged, QemuState
from virtcontainers.errors import (
    ConfigError,
    HypervisorError,
    StateError,
    UnsupportedError,
    VMTimeoutError,
)
from virtcontainers.persist import Bridge
from virtcontainers.types import Capabilities, MemoryDevice, Socket, VMState

GIB = 1 << 30


@pytest.fixture
def config(tmp_path: Path) -> HypervisorConfig:
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return HypervisorConfig(
        kernel_path=str(kernel),
        initrd_path=str(initrd),
        memory_size=256,
        num_vcpus=1,
        default_max_vcpus=2,
        mem_slots=2,
        pcie_root_port=2,
    )


@pytest.fixture
def dummy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
async def fake() -> AsyncIterator[FakeQMPServer]:
    server = FakeQMPServer()
    yield server
    await server.close()


async def running(
    run_root: str,
    config: HypervisorConfig,
    proc: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    accel: str = "tcg",
) -> QemuHypervisor:
    """A driver that believes `proc` is its running QEMU, talking to `fake`."""
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("hp1", None, config)
    drv.argv = drv.build_launch().argv
    state = drv.save()
    state.pid = proc.pid
    state.pid_start_time = host.process_start_time(proc.pid)
    state.vm_state = VMState.RUNNING
    state.driver_state(QemuState).accel = accel
    other = QemuHypervisor(run_root=run_root)
    other.load(state)
    other.hotplug.unplug_timeout = 2.0
    assert other.paths is not None
    await fake.listen(other.paths.qmp_socket)
    return other


def deleted(qdev: str) -> dict[str, Any]:
    return {
        "event": "DEVICE_DELETED",
        "data": {"device": qdev, "path": f"/machine/peripheral/{qdev}"},
    }


def query_pci(qdev: str, port: str = "rp0", port_slot: int = 1) -> list[dict[str, Any]]:
    """A `query-pci` answer with `qdev` at slot 0 behind root port `port`."""
    return [
        {
            "bus": 0,
            "devices": [
                {"bus": 0, "slot": 0, "function": 0, "qdev_id": ""},
                {
                    "bus": 0,
                    "slot": port_slot,
                    "function": 0,
                    "qdev_id": port,
                    "pci_bridge": {
                        "bus": {"number": 0, "secondary": 1, "subordinate": 1},
                        "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": qdev}],
                    },
                },
            ],
        }
    ]


def image(tmp_path: Path, name: str = "d0") -> str:
    path = tmp_path / f"{name}.img"
    path.write_bytes(b"\0" * 4096)
    return str(path)


# -- pure pieces -----------------------------------------------------------------------------
def test_pci_take_release_and_path() -> None:
    bridges = [Bridge(id="rp0", type="pcie-root-port"), Bridge(id="rp1", type="pcie-root-port")]
    assert pci.take(bridges, "a", "vm") == pci.Placement("rp0", 0)
    assert pci.take(bridges, "b", "vm").bus == "rp1"
    with pytest.raises(HypervisorError, match=r"no free pcie-root-port for c .*all 2 are in use"):
        pci.take(bridges, "c", "vm")
    pci.release(bridges, "a")
    assert pci.take(bridges, "c", "vm").bus == "rp0"
    pc = [Bridge(id="pci-bridge-0", type="pci-bridge")]
    first = pci.take(pc, "x", "vm")
    assert (first.bus, first.slot, first.addr) == ("pci-bridge-0", 1, "0x01")
    assert pci.take(pc, "y", "vm").addr == "0x02"
    assert pci.pci_path(query_pci("blk-d0", port_slot=3), "blk-d0") == "03/00"
    assert pci.pci_path(query_pci("blk-d0"), "rp0") == "01"
    assert pci.pci_path(query_pci("blk-d0"), "nothing") == ""
    with pytest.raises(HypervisorError, match=r"nowhere to hot-add z: .*set pcie_root_port"):
        pci.take([], "z", "vm")


def test_memory_limits_from_argv() -> None:
    assert resize.memory_limits(["q", "-m", "256M,slots=3,maxmem=4G"]) == (3, 4096)
    assert resize.memory_limits(["q", "-m", "256M,slots=10,maxmem=24105M"]) == (10, 24105)
    assert resize.memory_limits(["q"]) == (0, 0)


def test_capabilities_match_implementation() -> None:
    q35 = machine_capabilities("q35")
    assert Capabilities.BLOCK_DEVICE_HOTPLUG in qhotplug.IMPLEMENTED
    for cap in (
        Capabilities.BLOCK_DEVICE_HOTPLUG,
        Capabilities.NET_DEVICE_HOTPLUG,
        Capabilities.CPU_HOTPLUG,
        Capabilities.MEMORY_HOTPLUG,
        Capabilities.VIRTIO_MEM,
        Capabilities.VFIO_HOTPLUG,
        Capabilities.VHOST_USER_HOTPLUG,
    ):
        assert (cap in q35) == (cap in qhotplug.IMPLEMENTED)
        assert cap not in machine_capabilities("microvm")


# -- block -----------------------------------------------------------------------------------
async def test_virtio_blk_add_and_remove(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    path = image(tmp_path)
    fake.add(
        Expect(
            "blockdev-add",
            {
                "node-name": "d0",
                "driver": "raw",
                "read-only": True,
                "file": {"driver": "file", "filename": path},
            },
        ),
        Expect(
            "device_add",
            {
                "driver": "virtio-blk-pci",
                "drive": "d0",
                "serial": "d0",
                "id": "blk-d0",
                "bus": "rp0",
            },
        ),
        Expect("query-pci", reply=query_pci("blk-d0")),
        # Removal: a DEVICE_DELETED of another device and one naming only a child's path
        # must not end the wait.
        Expect(
            "device_del",
            {"id": "blk-d0"},
            events=[
                deleted("net-other"),
                {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/blk-d0/x"}},
                deleted("blk-d0"),
            ],
        ),
        Expect("blockdev-del", {"node-name": "d0"}),
    )
    drive = BlockDrive(id="d0", path=path, driver="virtio-blk", read_only=True)
    assert await drv.hotplug_add_device(drive) is drive
    assert (drive.pci_path, drive.index, drive.scsi_addr) == ("01/00", 0, "")
    assert drv.hotplug.block_indexes == [0]
    assert drv.hotplug.bridges[0].devices_addr == {0: "blk-d0"}
    with pytest.raises(ConfigError, match="BlockDrive d0 is already hot-added"):
        await drv.hotplug_add_device(drive)
    await drv.hotplug_remove_device(drive)
    assert drive.pci_path == "" and drv.hotplug.block_indexes == []
    assert not drv.hotplug.bridges[0].devices_addr
    with pytest.raises(StateError, match="BlockDrive d0 from VM hp1: it was never hot-added"):
        await drv.hotplug_remove_device(drive)
    fake.assert_done()
    await drv.disconnect()


async def test_failed_device_add_rolls_back(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect("blockdev-add"),
        Expect("device_add", error=("GenericError", "Bus 'rp0' does not support hotplugging")),
        Expect("blockdev-del", {"node-name": "d0"}),
    )
    drive = BlockDrive(id="d0", path=image(tmp_path), driver="virtio-blk")
    with pytest.raises(
        HypervisorError, match=r"hotplugging block drive d0 failed: .*does not support hotplugging"
    ):
        await drv.hotplug_add_device(drive)
    assert drive.pci_path == "" and drive.index == -1
    assert drv.hotplug.block_indexes == [] and all(not b.devices_addr for b in drv.hotplug.bridges)
    assert drv.hotplug.plugged == {}
    fake.assert_done()
    await drv.disconnect()


async def test_device_del_that_never_completes_leaves_the_device_recorded(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    drv.hotplug.unplug_timeout = 0.3
    fake.add(
        Expect("blockdev-add"),
        Expect("device_add"),
        Expect("query-pci", reply=query_pci("blk-d0")),
        Expect("device_del", {"id": "blk-d0"}),  # the guest never lets go
        # Retried: still pending, QEMU says so; then the guest finally releases it.
        Expect(
            "device_del",
            error=("GenericError", "Device blk-d0 is already in the process of unplug"),
            events=[deleted("blk-d0")],
        ),
        Expect("blockdev-del", {"node-name": "d0"}),
    )
    drive = BlockDrive(id="d0", path=image(tmp_path), driver="virtio-blk")
    await drv.hotplug_add_device(drive)
    with pytest.raises(
        VMTimeoutError,
        match=r"did not release device blk-d0 within 0\.3s; it is still attached",
    ):
        await drv.hotplug_remove_device(drive)
    # No half state: still recorded, port and index held, backend not deleted.
    assert "BlockDrive:d0" in drv.hotplug.plugged
    assert drv.hotplug.bridges[0].devices_addr == {0: "blk-d0"} and drv.hotplug.block_indexes == [0]
    assert drive.pci_path == "01/00"
    await drv.hotplug_remove_device(drive)
    assert drv.hotplug.plugged == {} and drv.hotplug.block_indexes == []
    fake.assert_done()
    await drv.disconnect()


async def test_device_gone_meanwhile_counts_as_removed(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    drv.hotplug.plugged = {
        rec.key: rec
        for rec in [
            Plugged("BlockDrive:d0", "blk-d0", backend_kind="blockdev", backend="d0", index=0)
        ]
    }
    fake.add(
        Expect("device_del", error=("DeviceNotFound", "Device 'blk-d0' not found")),
        Expect("blockdev-del", {"node-name": "d0"}),
    )
    await drv.hotplug_remove_device(BlockDrive(id="d0", path="/x/d0.img"))
    fake.assert_done()
    await drv.disconnect()


async def test_scsi_hd_add_picks_a_free_scsi_id(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    drv.devices.append(BlockDrive(id="cold", path="/x/c.img", scsi_addr="0:0", index=0))
    drv.hotplug.block_indexes.append(0)
    fake.add(
        Expect("blockdev-add"),
        Expect(
            "device_add",
            {
                "driver": "scsi-hd",
                "id": "scsi-d1",
                "drive": "d1",
                "bus": "scsi0.0",
                "channel": 0,
                "scsi-id": 1,
                "lun": 0,
                "serial": "d1",
            },
        ),
        Expect("device_del", {"id": "scsi-d1"}, events=[deleted("scsi-d1")]),
        Expect("blockdev-del", {"node-name": "d1"}),
    )
    drive = BlockDrive(id="d1", path=image(tmp_path, "d1"))  # config default: virtio-scsi
    await drv.hotplug_add_device(drive)
    assert (drive.scsi_addr, drive.index, drive.pci_path) == ("1:0", 1, "")
    assert all(not b.devices_addr for b in drv.hotplug.bridges)  # no root port used
    await drv.hotplug_remove_device(drive)
    assert drv.hotplug.block_indexes == [0]
    fake.assert_done()
    await drv.disconnect()


async def test_block_refusals(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running(run_root, config, dummy, fake)
    with pytest.raises(ConfigError, match=r"block drive d0: /nope/d0\.img does not exist"):
        await drv.hotplug_add_device(BlockDrive(id="d0", path="/nope/d0.img"))
    with pytest.raises(UnsupportedError, match="qemu does not support hotplugging block drives"):
        await drv.hotplug_add_device(BlockDrive(id="d0", path="/nope/d", driver="nvdimm"))
    with pytest.raises(UnsupportedError, match="qemu does not support hotplugging SerialPort"):
        await drv.hotplug_add_device(SerialPort(Socket("c", "c", "/tmp/x.sock", "port")))
    assert fake.commands == []
    await drv.disconnect()


# -- network ---------------------------------------------------------------------------------
async def test_network_add_and_remove(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running(run_root, config, dummy, fake)
    macs: list[str] = []

    def device_args(args: Mapping[str, Any]) -> bool:
        macs.append(str(args["mac"]))
        return dict(args) == {
            "driver": "virtio-net-pci",
            "netdev": "netdev-n0",
            "mac": args["mac"],
            "mq": True,
            "vectors": 6,
            "romfile": "",
            "status": False,
            "guest_announce": False,
            "id": "net-n0",
            "bus": "rp0",
        }

    fake.add(
        Expect(
            "netdev_add",
            {
                "type": "tap",
                "id": "netdev-n0",
                "ifname": "tap0",
                "script": "no",
                "downscript": "no",
                "vhost": True,
                "queues": 2,
            },
        ),
        Expect("device_add", device_args),
        Expect("query-pci", reply=query_pci("net-n0")),
        Expect("device_del", {"id": "net-n0"}, events=[deleted("net-n0")]),
        Expect("netdev_del", {"id": "netdev-n0"}),
    )
    ep = NetworkEndpoint(id="n0", tap_name="tap0", queues=2, vhost=True)
    await drv.hotplug_add_device(ep)
    assert ep.mac == macs[0] and ep.pci_path == "01/00"
    await drv.hotplug_remove_device(ep)
    fake.assert_done()
    await drv.disconnect()


# -- VFIO ------------------------------------------------------------------------------------
def vfio_sysfs(tmp_path: Path, bound_to: str | None = "vfio-pci") -> str:
    dev = tmp_path / "sys" / "0000:01:00.0"
    dev.mkdir(parents=True)
    if bound_to:
        drv = tmp_path / "drivers" / bound_to
        drv.mkdir(parents=True)
        (dev / "driver").symlink_to(drv)
    return str(dev)


async def test_vfio_add_and_remove_on_a_root_port(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect(
            "device_add",
            {"driver": "vfio-pci", "host": "0000:01:00.0", "id": "vfio-gpu", "bus": "rp0"},
        ),
        Expect("query-pci", reply=query_pci("vfio-gpu")),
        Expect("device_del", {"id": "vfio-gpu"}, events=[deleted("vfio-gpu")]),
    )
    dev = VFIODevice(id="gpu", bdf="01:00.0", sysfs_dev=vfio_sysfs(tmp_path))
    await drv.hotplug_add_device(dev)
    assert dev.pci_path == "01/00"
    await drv.hotplug_remove_device(dev)
    assert all(not b.devices_addr for b in drv.hotplug.bridges)
    fake.assert_done()
    await drv.disconnect()


async def test_vfio_refusals(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    config.hotplug_vfio_on_root_bus = True
    drv = await running(run_root, config, dummy, fake)
    bound = VFIODevice(id="gpu", bdf="0000:01:00.0", sysfs_dev=vfio_sysfs(tmp_path))
    with pytest.raises(UnsupportedError, match="VFIO on the root bus of q35"):
        await drv.hotplug_add_device(bound)
    unbound = VFIODevice(id="nic", bdf="0000:01:00.0", sysfs_dev=vfio_sysfs(tmp_path / "u", None))
    with pytest.raises(ConfigError, match=r"nic: host device 0000:01:00\.0 is bound to no driver"):
        await drv.hotplug_add_device(unbound)
    other = VFIODevice(id="nic", bdf="0000:01:00.0", sysfs_dev=vfio_sysfs(tmp_path / "o", "e1000e"))
    with pytest.raises(ConfigError, match="bound to e1000e, not vfio-pci"):
        await drv.hotplug_add_device(other)
    missing = VFIODevice(id="nic", bdf="0000:01:00.0", sysfs_dev=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="no host PCI device at"):
        await drv.hotplug_add_device(missing)
    assert fake.commands == []
    await drv.disconnect()


async def test_vfio_on_the_pc_root_bus(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    config.hypervisor_machine_type = "pc"
    config.hotplug_vfio_on_root_bus = True
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect(
            "device_add",
            {"driver": "vfio-pci", "host": "0000:01:00.0", "id": "vfio-gpu", "bus": "pci.0"},
        ),
        Expect("query-pci", reply=[{"bus": 0, "devices": [{"slot": 6, "qdev_id": "vfio-gpu"}]}]),
    )
    dev = VFIODevice(id="gpu", bdf="0000:01:00.0", sysfs_dev=vfio_sysfs(tmp_path))
    await drv.hotplug_add_device(dev)
    assert dev.pci_path == "06"
    fake.assert_done()
    await drv.disconnect()


async def test_pc_machine_uses_bridge_slots(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    config.hypervisor_machine_type = "pc"
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect("blockdev-add"),
        Expect(
            "device_add",
            lambda a: a["bus"] == "pci-bridge-0" and a["addr"] == "0x01" and a["id"] == "blk-d0",
        ),
        Expect("query-pci", reply=query_pci("blk-d0", port="pci-bridge-0", port_slot=2)),
    )
    drive = BlockDrive(id="d0", path=image(tmp_path), driver="virtio-blk")
    await drv.hotplug_add_device(drive)
    assert drive.pci_path == "02/00"
    fake.assert_done()
    await drv.disconnect()


# -- vhost-user and virtio-fs ----------------------------------------------------------------
async def test_vhost_user_needs_shared_memory(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    share = SharedFS(id="s0", source=str(tmp_path), mount_tag="t0")
    with pytest.raises(UnsupportedError, match="hotplugging shared fs s0: vhost-user needs shared"):
        await drv.hotplug_add_device(share)
    vu = VhostUserDevice(id="v0", socket_path=str(tmp_path / "vu.sock"))
    with pytest.raises(UnsupportedError, match="vhost-user needs shared guest memory"):
        await drv.hotplug_add_device(vu)
    ninep = SharedFS(id="s1", source=str(tmp_path), mount_tag="t1", fs_type="virtio-9p")
    with pytest.raises(UnsupportedError, match="hotplugging a virtio-9p share"):
        await drv.hotplug_add_device(ninep)
    assert drv.get_pids() == [dummy.pid]
    assert fake.commands == []
    await drv.disconnect()


async def test_external_vhost_user_blk(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    config.enable_vhost_user_store = True
    drv = await running(run_root, config, dummy, fake)
    path = str(tmp_path / "vu.sock")
    missing = VhostUserDevice(id="v0", socket_path=path)
    with pytest.raises(ConfigError, match=f"no backend listens on {path}"):
        await drv.hotplug_add_device(missing)
    listener = pysocket.socket(pysocket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    fake.add(
        Expect(
            "chardev-add",
            {
                "id": "char-vhost-blk-v0",
                "backend": {
                    "type": "socket",
                    "data": {"addr": {"type": "unix", "data": {"path": path}}, "server": False},
                },
            },
        ),
        Expect("device_add", error=("GenericError", "vhost-user-blk: init failed")),
        Expect("chardev-remove", {"id": "char-vhost-blk-v0"}),
    )
    try:
        with pytest.raises(HypervisorError, match="vhost-user-blk: init failed"):
            await drv.hotplug_add_device(VhostUserDevice(id="v0", socket_path=path))
    finally:
        listener.close()
    assert drv.hotplug.plugged == {} and all(not b.devices_addr for b in drv.hotplug.bridges)
    fake.assert_done()
    await drv.disconnect()


@pytest.fixture
def vhost_fs_backend(tmp_path: Path) -> Iterator[str]:
    """A listening socket standing in for an external virtio-fs backend."""
    path = str(tmp_path / "vfs.sock")
    listener = pysocket.socket(pysocket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    yield path
    listener.close()


async def test_cancelled_device_add_removes_the_device_before_its_chardev(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    vhost_fs_backend: str,
) -> None:
    """QEMU made the device but the add was cancelled while awaiting the reply: the rollback
    removes the device (waiting for DEVICE_DELETED) before the chardev it holds, and the
    caller still sees its CancelledError."""
    config.shared_fs = "virtio-fs"
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect("chardev-add"),
        Expect("device_add", delay=0.5),
        Expect("device_del", {"id": "vhost-fs-v0"}, events=[deleted("vhost-fs-v0")]),
        Expect("chardev-remove", {"id": "char-vhost-fs-v0"}),
    )
    dev = VhostUserDevice(id="v0", socket_path=vhost_fs_backend, backend="fs", tag="t0")
    task = asyncio.create_task(drv.hotplug_add_device(dev))
    while "device_add" not in fake.commands:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert drv.hotplug.plugged == {} and all(not b.devices_addr for b in drv.hotplug.bridges)
    fake.assert_done()
    await drv.disconnect()


async def test_a_failed_rollback_never_hides_the_error_that_caused_it(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    vhost_fs_backend: str,
) -> None:
    config.shared_fs = "virtio-fs"
    drv = await running(run_root, config, dummy, fake)
    drv.hotplug.unplug_timeout = 0.3
    fake.add(
        Expect("chardev-add"),
        Expect("device_add"),
        Expect("query-pci", error=("GenericError", "query-pci broke")),
        Expect("device_del", {"id": "vhost-fs-v0"}),  # the guest never lets go
        Expect("chardev-remove", error=("GenericError", "Chardev 'char-vhost-fs-v0' is busy")),
    )
    dev = VhostUserDevice(id="v0", socket_path=vhost_fs_backend, backend="fs", tag="t0")
    with pytest.raises(HypervisorError, match="query-pci broke") as exc:
        await drv.hotplug_add_device(dev)
    notes = "\n".join(getattr(exc.value, "__notes__", []))
    assert "did not release device vhost-fs-v0 within 0.3s" in notes
    assert "Chardev 'char-vhost-fs-v0' is busy" in notes
    assert drv.hotplug.plugged == {}
    fake.assert_done()
    await drv.disconnect()


async def test_rollback_keeps_the_error_and_lets_a_cancellation_through() -> None:
    async def fail(what: BaseException) -> None:
        raise what

    # Every undo step runs; their failures become notes of the error that caused them.
    ran: list[str] = []
    with pytest.raises(asyncio.CancelledError) as cancelled:
        async with Rollback() as undo:
            undo.callback(ran.append, "first")
            undo.push_async_callback(fail, StateError("undo 2"))
            undo.push_async_callback(fail, HypervisorError("undo 3"))
            raise asyncio.CancelledError()
    assert ran == ["first"]
    assert cancelled.value.__notes__ == [
        "undoing it failed too: HypervisorError: undo 3",
        "undoing it failed too: StateError: undo 2",
    ]
    # A cancellation that interrupts the undo of an ordinary error is not swallowed.
    with pytest.raises(asyncio.CancelledError) as again:
        async with Rollback() as undo:
            undo.push_async_callback(fail, asyncio.CancelledError())
            raise HypervisorError("add failed")
    assert isinstance(again.value.__context__, HypervisorError)
    # Success: nothing is undone.
    async with Rollback() as undo:
        undo.callback(ran.append, "undone")
        undo.pop_all()
    assert ran == ["first"]


async def test_virtiofsd_that_dies_at_start_is_reported_and_rolled_back(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    daemon = tmp_path / "fake-virtiofsd"
    daemon.write_text("#!/bin/sh\necho 'virtiofsd: cannot open shared dir' >&2\nexit 7\n")
    daemon.chmod(0o755)
    config.shared_fs = "virtio-fs"
    config.virtio_fs_daemon = str(daemon)
    drv = await running(run_root, config, dummy, fake)
    share = SharedFS(id="s0", source=str(tmp_path), mount_tag="t0")
    with pytest.raises(HypervisorError) as exc:
        await drv.hotplug_add_device(share)
    assert "virtiofsd for fs-s0 exited during start-up" in str(exc.value)
    assert "cannot open shared dir" in str(exc.value) and "exit code 7" in str(exc.value)
    assert drv.get_pids() == [dummy.pid] and drv.hotplug.plugged == {}
    assert fake.commands == []
    await drv.disconnect()


# -- vCPUs -----------------------------------------------------------------------------------
def cpu_slots(plugged: int = 1, total: int = 2) -> list[dict[str, Any]]:
    slots = []
    for core in reversed(range(total)):
        slot: dict[str, Any] = {
            "props": {"core-id": core, "thread-id": 0, "node-id": 0, "socket-id": 0},
            "vcpus-count": 1,
            "type": "max-x86_64-cpu",
        }
        if core < plugged:
            slot["qom-path"] = f"/machine/unattached/device[{core}]"
        slots.append(slot)
    return slots


async def test_vcpu_add_remove_with_kvm(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running(run_root, config, dummy, fake, accel="kvm")
    cpu = {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0}
    fake.add(
        Expect("query-hotpluggable-cpus", reply=cpu_slots()),
        Expect("device_add", {"driver": "max-x86_64-cpu", "id": "cpu-0-1-0", **cpu}),
        Expect("query-hotpluggable-cpus", reply=cpu_slots(2)),
        # QEMU 7.2 names only the lapic child in DEVICE_DELETED: the device tree decides.
        Expect(
            "device_del",
            {"id": "cpu-0-1-0"},
            events=[
                {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/cpu-0-1-0/lapic"}}
            ],
        ),
        Expect("qom-list", {"path": "/machine/peripheral"}, reply=[{"name": "cpu-0-1-0"}]),
        Expect("qom-list", {"path": "/machine/peripheral"}, reply=[{"name": "rp0"}]),
    )
    assert await drv.resize_vcpus(2) == (1, 2)
    assert drv.hotplug.vcpus == ["cpu-0-1-0"]
    assert [v.id for v in drv.save().hotplugged_vcpus] == ["cpu-0-1-0"]
    assert await drv.hotplug_remove_device(CPUDevice(amount=1)) == 1
    assert drv.hotplug.vcpus == []
    fake.assert_done()
    await drv.disconnect()


async def test_vcpu_limits(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect("query-hotpluggable-cpus", reply=cpu_slots()),
        Expect("query-hotpluggable-cpus", reply=cpu_slots()),
        Expect("query-hotpluggable-cpus", reply=cpu_slots(2)),
    )
    with pytest.raises(ConfigError, match="cannot resize VM hp1 to 3 vCPUs: its maximum is 2"):
        await drv.resize_vcpus(3)
    with pytest.raises(ConfigError, match="to 0 vCPUs: it booted with 1"):
        await drv.resize_vcpus(0)
    drv.hotplug.vcpus.append("cpu-0-1-0")
    with pytest.raises(UnsupportedError, match="hot-removing vCPUs from VM hp1 under TCG"):
        await drv.resize_vcpus(1)
    assert drv.hotplug.vcpus == ["cpu-0-1-0"]
    fake.assert_done()
    await drv.disconnect()


# -- memory ----------------------------------------------------------------------------------
def dimm_info(qdev: str, slot: int, size_mb: int) -> dict[str, Any]:
    return {
        "type": "dimm",
        "data": {"id": qdev, "slot": slot, "addr": 4 * GIB, "size": size_mb << 20},
    }


async def test_pc_dimm_resize(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect(
            "object-add",
            {"qom-type": "memory-backend-ram", "id": "mem-dimm0", "size": 256 << 20},
        ),
        Expect("device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "mem-dimm0"}),
        Expect("query-memory-devices", reply=[dimm_info("dimm0", 0, 256)]),
        Expect("object-add", lambda a: a["id"] == "mem-dimm1" and a["size"] == 128 << 20),
        Expect("device_add", error=("GenericError", "not enough space")),
        Expect("object-del", {"id": "mem-dimm1"}),
    )
    assert await drv.resize_memory(500, 128, True) == (
        512,
        MemoryDevice(slot=0, size_mb=256, addr=4 * GIB, probe=True),
    )
    assert drv.hotplug.memory_mb == 256 and drv.hotplug.dimms[0].id == "dimm0"
    assert await drv.resize_memory(512, 128, False) == (512, MemoryDevice(-1, 0))
    with pytest.raises(HypervisorError, match="not enough space"):
        await drv.hotplug_add_device(MemoryHotplug(size_mb=128))
    assert drv.hotplug.memory_mb == 256 and len(drv.hotplug.dimms) == 1
    with pytest.raises(UnsupportedError, match="shrinking memory from 512 to 256 MiB"):
        await drv.resize_memory(256, 128, False)
    with pytest.raises(ConfigError, match=r"would exceed maxmem"):
        await drv.resize_memory(10_000_000, 128, False)
    drv.hotplug.dimms.append(Dimm(id="dimm1", slot=1, size_mb=128))
    with pytest.raises(HypervisorError, match=r"no free memory slot \(all 2 are in use"):
        await drv.resize_memory(2048, 128, False)
    with pytest.raises(UnsupportedError, match="hot-removing memory DIMMs"):
        await drv.hotplug_remove_device(MemoryHotplug(size_mb=128))
    fake.assert_done()
    await drv.disconnect()


async def test_dimm_backend_follows_shared_memory(config: HypervisorConfig) -> None:
    assert resize.dimm_backend(config, "m", 128)["qom-type"] == "memory-backend-ram"
    config.enable_vhost_user_store = True
    config.mem_prealloc = True
    assert resize.dimm_backend(config, "m", 128) == {
        "id": "m",
        "size": 128 << 20,
        "qom-type": "memory-backend-memfd",
        "share": True,
        "prealloc": True,
    }


def virtio_mem(size_mb: int, requested_mb: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "virtio-mem",
            "data": {
                "id": "virtiomem0",
                "memaddr": 4 * GIB,
                "block-size": 2 << 20,
                "max-size": 1 * GIB,
                "size": size_mb << 20,
                "requested-size": requested_mb << 20,
            },
        }
    ]


async def test_virtio_mem_resize(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    config.virtio_mem = True
    drv = await running(run_root, config, dummy, fake)
    drv.hotplug.unplug_timeout = 0.5
    set_size = {"path": "/machine/peripheral/virtiomem0", "property": "requested-size"}
    fake.add(
        Expect("query-memory-devices", reply=virtio_mem(0, 0)),
        Expect("qom-set", {**set_size, "value": 302 << 20}),
        Expect("query-memory-devices", reply=virtio_mem(100, 302)),  # the guest is plugging
        Expect("query-memory-devices", reply=virtio_mem(302, 302)),
        Expect("query-memory-devices", reply=virtio_mem(302, 302)),
        Expect("query-memory-devices", reply=virtio_mem(302, 302)),
        Expect("query-memory-devices", reply=virtio_mem(302, 302)),
        Expect("qom-set", {**set_size, "value": 0}),
        # The guest never gives the memory back: polled until the timeout (count varies).
        *[Expect("query-memory-devices", reply=virtio_mem(302, 0)) for _ in range(50)],
    )
    new_mb, dev = await drv.resize_memory(557, 128, False)  # rounded up to the 2 MiB block
    assert (new_mb, dev) == (558, MemoryDevice(slot=-1, size_mb=302, addr=4 * GIB))
    with pytest.raises(ConfigError, match="booted with 256 MiB"):
        await drv.resize_memory(128, 128, False)
    with pytest.raises(ConfigError, match="holds at most 1024 MiB"):
        await drv.resize_memory(4096, 128, False)
    with pytest.raises(VMTimeoutError, match="the guest has plugged 302 of the requested 0 MiB"):
        await drv.resize_memory(256, 128, False)
    assert fake.failures == []
    assert fake.commands.count("qom-set") == 2
    await drv.disconnect()


# -- machine and persistence -----------------------------------------------------------------
async def test_microvm_refuses_every_hotplug(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    config.hypervisor_machine_type = "microvm"
    drv = await running(run_root, config, dummy, fake)
    for call, op in (
        (drv.resize_memory(512, 128, False), "resize_memory"),
        (drv.resize_vcpus(2), "resize_vcpus"),
        (drv.hotplug_add_device(CPUDevice(amount=1)), "hotplugging CPUDevice"),
        (drv.hotplug_remove_device(BlockDrive(id="d", path="/x/d")), "hot-removing BlockDrive"),
    ):
        with pytest.raises(UnsupportedError, match=f"qemu does not support {op}: the microvm"):
            await call
    assert fake.commands == []
    await drv.disconnect()


async def test_records_survive_save_and_load(
    run_root: str,
    config: HypervisorConfig,
    dummy: subprocess.Popen[bytes],
    fake: FakeQMPServer,
    tmp_path: Path,
) -> None:
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect("netdev_add"),
        Expect("device_add"),
        Expect("query-pci", reply=query_pci("net-n0")),
        Expect("device_del", {"id": "net-n0"}, events=[deleted("net-n0")]),
        Expect("netdev_del", {"id": "netdev-n0"}),
    )
    await drv.hotplug_add_device(NetworkEndpoint(id="n0", tap_name="tap0", mac="02:00:00:00:00:01"))
    state = drv.save()
    await drv.disconnect()
    other = QemuHypervisor(run_root=run_root)
    other.load(state)
    assert other.hotplug.bridges[0].devices_addr == {0: "net-n0"}
    await other.hotplug_remove_device(NetworkEndpoint(id="n0", tap_name="tap0"))
    assert not other.hotplug.bridges[0].devices_addr
    fake.assert_done()
    await other.disconnect()


async def test_device_del_is_repeated_until_the_guest_acts(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    # A guest still booting drops the first eject request; the second one is honoured.
    drv = await running(run_root, config, dummy, fake)
    drv.hotplug.unplug_retry = 0.2
    drv.hotplug.plugged = {
        rec.key: rec
        for rec in [
            Plugged("NetworkEndpoint:n0", "net-n0", backend_kind="netdev", backend="netdev-n0")
        ]
    }
    fake.add(
        Expect("device_del", {"id": "net-n0"}),
        Expect("device_del", {"id": "net-n0"}, events=[deleted("net-n0")]),
        Expect("netdev_del", {"id": "netdev-n0"}),
    )
    await drv.hotplug_remove_device(NetworkEndpoint(id="n0", tap_name="tap0"))
    assert drv.hotplug.plugged == {}
    fake.assert_done()
    await drv.disconnect()


async def test_hotplugged_virtio_device_gets_iommu_platform(
    run_root: str, config: HypervisorConfig, dummy: subprocess.Popen[bytes], fake: FakeQMPServer
) -> None:
    config.iommu_platform = True
    drv = await running(run_root, config, dummy, fake)
    fake.add(
        Expect("netdev_add", lambda args: args["id"] == "netdev-n0"),
        Expect(
            "device_add",
            lambda args: (
                args["driver"] == "virtio-net-pci"
                and args["iommu_platform"] is True
                and args["disable-legacy"] == "on"
            ),
        ),
        Expect("query-pci", reply=query_pci("net-n0")),
    )
    await drv.hotplug_add_device(NetworkEndpoint(id="n0", tap_name="tap0"))
    fake.assert_done()
    await drv.disconnect()
