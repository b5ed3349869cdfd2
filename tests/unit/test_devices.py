"""Typed device specs validate their own fields and name the field at fault."""

from __future__ import annotations

import pytest

from virtcontainers import ConfigError, DeviceType, Socket, VSock
from virtcontainers.devices import (
    BlockDrive,
    CPUDevice,
    HybridVSockDevice,
    ImageDevice,
    MemoryHotplug,
    NetworkEndpoint,
    SerialPort,
    SharedFS,
    VFIODevice,
    VhostUserDevice,
    VSockDevice,
)


def test_each_device_knows_its_type() -> None:
    sock = Socket("channel0", "charch0", "/run/vc/vm/x/kata.sock", "agent.channel.0")
    devices = [
        (ImageDevice("/img.raw"), DeviceType.IMG),
        (BlockDrive("d0", "/disk.img"), DeviceType.BLOCK),
        (SharedFS("fs0", "/srv", "shared"), DeviceType.FS),
        (NetworkEndpoint("eth0", "tap0"), DeviceType.NET),
        (VFIODevice("gpu", "0000:01:00.0"), DeviceType.VFIO),
        (VhostUserDevice("vu0", "/run/vu.sock"), DeviceType.VHOST_USER),
        (SerialPort(sock), DeviceType.SERIAL_PORT),
        (VSockDevice(VSock(3, 42, 1024)), DeviceType.VSOCK_PCI),
        (HybridVSockDevice("/run/vc/hv.sock"), DeviceType.HYBRID_VSOCK),
        (CPUDevice(2), DeviceType.CPU),
        (MemoryHotplug(256), DeviceType.MEMORY),
    ]
    for dev, kind in devices:
        assert dev.device_type is kind


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (lambda: BlockDrive("bad id", "/d.img"), "invalid id 'bad id'"),
        (lambda: BlockDrive("d0", "rel.img"), "path must be an absolute host path"),
        (lambda: BlockDrive("d0", "/a,b.img"), "contains ','"),
        (lambda: BlockDrive("d0", "/d.img", format="vmdk"), "unknown format 'vmdk'"),
        (lambda: BlockDrive("d0", "/d.img", driver="ide"), "unknown driver 'ide'"),
        (lambda: SharedFS("fs0", "/srv", "tag", fs_type="nfs"), "unknown type 'nfs'"),
        (lambda: NetworkEndpoint("n0", "tap-name-far-too-long"), "invalid tap name"),
        (lambda: NetworkEndpoint("n0", "tap0", mac="zz:00:00:00:00:00"), "invalid MAC"),
        (lambda: NetworkEndpoint("n0", "tap0", mac="01:00:00:00:00:00"), "multicast"),
        (lambda: NetworkEndpoint("n0", "tap0", queues=0), "queues must be 1..256"),
        (lambda: VFIODevice("v0", "01:00"), "invalid PCI address"),
        (lambda: VhostUserDevice("vu", "/s.sock", backend="gpu"), "unknown backend 'gpu'"),
        (lambda: VhostUserDevice("vu", "/s.sock", backend="fs"), "needs a mount tag"),
        (lambda: VSockDevice(VSock(3, 2, 1024)), "invalid guest CID 2"),
        (lambda: HybridVSockDevice("/hv.sock", port=0), "invalid port 0"),
        (lambda: CPUDevice(0), "amount must be positive"),
        (lambda: MemoryHotplug(-1), "size_mb must be positive"),
        (lambda: ImageDevice(""), "image: path must be an absolute host path"),
    ],
)
def test_invalid_devices_name_the_field(factory: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        factory()  # type: ignore[operator]
    assert fragment in str(exc.value)


def test_vfio_short_bdf_gets_domain() -> None:
    dev = VFIODevice("v0", "01:00.1")
    assert dev.bdf == "0000:01:00.1"
    assert dev.sysfs_dev == "/sys/bus/pci/devices/0000:01:00.1"
