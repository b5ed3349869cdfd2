"""Typed device specs: each knows its `DeviceType` and validates its own fields on creation."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ConfigError
from .types import AGENT_VSOCK_PORT, DeviceType, Socket, VSock

_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_BDF_RE = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")

BLOCK_DRIVERS = ("virtio-scsi", "virtio-blk", "virtio-blk-ccw", "virtio-mmio", "nvdimm")
SHARED_FS_TYPES = ("virtio-fs", "virtio-9p")
#: virtiofsd `cache=` modes (Kata's `virtio_fs_cache` values).
FS_CACHE_MODES = ("none", "auto", "always")
VHOST_USER_KINDS = ("blk", "scsi", "net", "fs")


def check_id(kind: str, value: str) -> None:
    """Refuse device ids that a VMM would reject or that could inject options."""
    if not _ID_RE.match(value):
        raise ConfigError(
            f"{kind}: invalid id {value!r} (1-64 characters of letters, digits, '_', '.', '-')"
        )


def check_abs_path(kind: str, name: str, value: str) -> None:
    """Refuse an empty or relative host path, or one with a comma (QEMU option separator)."""
    if not value or not os.path.isabs(value):
        raise ConfigError(f"{kind}: {name} must be an absolute host path, got {value!r}")
    if "," in value or "\n" in value:
        raise ConfigError(f"{kind}: {name} {value!r} contains ',' or a newline")


def random_mac() -> str:
    """A random locally administered unicast MAC address."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


class Device:
    """Base of all device specs."""

    device_type: ClassVar[DeviceType]

    @property
    def kind(self) -> str:
        """A short name for messages."""
        return type(self).__name__


@dataclass
class ImageDevice(Device):
    """The guest root filesystem image."""

    device_type: ClassVar[DeviceType] = DeviceType.IMG
    path: str

    def __post_init__(self) -> None:
        check_abs_path("image", "path", self.path)


VIRTIO_BLK_ID_BYTES = 20
"""Length of a virtio-blk serial (the device id the guest reads, /sys/block/vdX/serial)."""


@dataclass
class BlockDrive(Device):
    """A host file or block device attached as a guest disk."""

    device_type: ClassVar[DeviceType] = DeviceType.BLOCK
    id: str
    path: str
    format: str = "raw"
    read_only: bool = False
    driver: str = ""  # "" means the config's block_device_driver
    index: int = -1  # drive index assigned by the driver (vda=0 ...)
    pci_path: str = ""  # filled in by the driver after hotplug
    scsi_addr: str = ""  # "<scsi-id>:<lun>" filled in for virtio-scsi drives

    def __post_init__(self) -> None:
        check_id("block drive", self.id)
        check_abs_path(f"block drive {self.id}", "path", self.path)
        if self.format not in ("raw", "qcow2"):
            raise ConfigError(f"block drive {self.id}: unknown format {self.format!r}")
        if self.driver and self.driver not in BLOCK_DRIVERS:
            raise ConfigError(
                f"block drive {self.id}: unknown driver {self.driver!r} "
                f"(one of {', '.join(BLOCK_DRIVERS)})"
            )


@dataclass
class SharedFS(Device):
    """A host directory shared into the guest (virtio-fs or 9p)."""

    device_type: ClassVar[DeviceType] = DeviceType.FS
    id: str
    source: str
    mount_tag: str
    fs_type: str = "virtio-fs"
    read_only: bool = False
    """The guest cannot write: the daemon serves a read-only bind of `source`."""
    lower: str = ""
    """When set, the guest sees an overlay: `lower` read-only underneath, `source` the
    writable upper directory (a container's root over its image); nothing changes `lower`."""
    id_shift: int = 0
    """With `lower`: a root for a user namespace mapping container id 0 to this id. The
    overlay is mounted with `metacopy=on` and stacks `shifted` over `lower`; `source`, the
    upper directory, is given this owner when the share is plugged."""
    shifted: str = ""
    """With `id_shift`: `lower`'s owners shifted by it, metadata-only copies
    (`ImageStore.shifted_rootfs`), made once per image and shift."""
    cache: str = ""
    """Its daemon's cache mode (one of `FS_CACHE_MODES`); "": the config's `virtio_fs_cache`.
    A container's root is served with "always" (see `drivers.virtiofsd.ROOT_CACHE`)."""

    def __post_init__(self) -> None:
        check_id("shared fs", self.id)
        if self.cache and self.cache not in FS_CACHE_MODES:
            raise ConfigError(
                f"shared fs {self.id}: unknown cache mode {self.cache!r} "
                f"(one of {', '.join(FS_CACHE_MODES)})"
            )
        check_abs_path(f"shared fs {self.id}", "source", self.source)
        if self.lower:
            check_abs_path(f"shared fs {self.id}", "lower", self.lower)
        if self.shifted:
            check_abs_path(f"shared fs {self.id}", "shifted", self.shifted)
            if not self.lower or not self.id_shift:
                raise ConfigError(f"shared fs {self.id}: shifted needs lower and id_shift")
        check_id(f"shared fs {self.id} mount tag", self.mount_tag)
        if self.fs_type not in SHARED_FS_TYPES:
            raise ConfigError(
                f"shared fs {self.id}: unknown type {self.fs_type!r} "
                f"(one of {', '.join(SHARED_FS_TYPES)})"
            )


@dataclass
class NetworkEndpoint(Device):
    """A guest NIC backed by a host tap device."""

    device_type: ClassVar[DeviceType] = DeviceType.NET
    id: str
    tap_name: str
    mac: str = ""
    queues: int = 1
    vhost: bool = False
    pci_path: str = ""
    fds: list[int] = field(default_factory=list)
    """Open queue fds of the tap (a macvtap's /dev/tapN, one per queue) instead of opening
    `tap_name`; the VMM takes them (cold-plug only) and the driver closes its copies."""

    def __post_init__(self) -> None:
        check_id("network endpoint", self.id)
        if not _IFNAME_RE.match(self.tap_name):
            raise ConfigError(
                f"network endpoint {self.id}: invalid tap name {self.tap_name!r} (1-15 characters)"
            )
        if self.mac and not _MAC_RE.match(self.mac):
            raise ConfigError(f"network endpoint {self.id}: invalid MAC address {self.mac!r}")
        if self.mac and int(self.mac[:2], 16) & 1:
            raise ConfigError(f"network endpoint {self.id}: MAC {self.mac} is a multicast address")
        if not 1 <= self.queues <= 256:
            raise ConfigError(
                f"network endpoint {self.id}: queues must be 1..256, got {self.queues}"
            )
        if self.fds and len(self.fds) != self.queues:
            raise ConfigError(
                f"network endpoint {self.id}: {len(self.fds)} fds for {self.queues} queues"
            )


_HOSTFWD_RE = re.compile(
    r"^(tcp|udp):(\d{1,3}(\.\d{1,3}){3})?:\d{1,5}-(\d{1,3}(\.\d{1,3}){3})?:\d{1,5}$"
)


@dataclass
class UserNetwork(Device):
    """A guest NIC on QEMU's user-mode network stack (no host interface, no root needed).

    The guest is `guest_ip` on `net`, the gateway `.2`, the DNS server `.3`; each
    `host_forwards` entry is a QEMU hostfwd rule, `tcp|udp:[HOSTIP]:HOSTPORT-[GUESTIP]:PORT`.
    """

    device_type: ClassVar[DeviceType] = DeviceType.NET
    id: str
    mac: str
    net: str = "10.0.2.0/24"
    host_forwards: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_id("user network", self.id)
        if not _MAC_RE.match(self.mac) or int(self.mac[:2], 16) & 1:
            raise ConfigError(f"user network {self.id}: invalid unicast MAC {self.mac!r}")
        for fwd in self.host_forwards:
            if not _HOSTFWD_RE.match(fwd):
                raise ConfigError(f"user network {self.id}: invalid host forward {fwd!r}")


@dataclass
class VFIODevice(Device):
    """A host PCI device passed through with VFIO."""

    device_type: ClassVar[DeviceType] = DeviceType.VFIO
    id: str
    bdf: str
    sysfs_dev: str = ""
    is_pcie: bool = True
    pci_path: str = ""

    def __post_init__(self) -> None:
        check_id("vfio device", self.id)
        if not _BDF_RE.match(self.bdf):
            raise ConfigError(
                f"vfio device {self.id}: invalid PCI address {self.bdf!r} (expected DDDD:BB:DD.F)"
            )
        if len(self.bdf) == 7:
            self.bdf = "0000:" + self.bdf
        if not self.sysfs_dev:
            self.sysfs_dev = f"/sys/bus/pci/devices/{self.bdf}"


@dataclass
class VhostUserDevice(Device):
    """A device served by a vhost-user backend over a Unix socket."""

    device_type: ClassVar[DeviceType] = DeviceType.VHOST_USER
    id: str
    socket_path: str
    backend: str = "blk"
    mac: str = ""
    tag: str = ""  # for fs
    pci_path: str = ""

    def __post_init__(self) -> None:
        check_id("vhost-user device", self.id)
        check_abs_path(f"vhost-user device {self.id}", "socket_path", self.socket_path)
        if self.backend not in VHOST_USER_KINDS:
            raise ConfigError(
                f"vhost-user device {self.id}: unknown backend {self.backend!r} "
                f"(one of {', '.join(VHOST_USER_KINDS)})"
            )
        if self.backend == "net" and self.mac and not _MAC_RE.match(self.mac):
            raise ConfigError(f"vhost-user device {self.id}: invalid MAC address {self.mac!r}")
        if self.backend == "fs" and not self.tag:
            raise ConfigError(f"vhost-user device {self.id}: fs needs a mount tag")


@dataclass
class SerialPort(Device):
    """A virtio-serial port backed by a host Unix socket (the agent channel)."""

    device_type: ClassVar[DeviceType] = DeviceType.SERIAL_PORT
    socket: Socket

    def __post_init__(self) -> None:
        check_abs_path(f"serial port {self.socket.name}", "host_path", self.socket.host_path)
        if not self.socket.name or not _ID_RE.match(self.socket.name):
            raise ConfigError(f"serial port: invalid port name {self.socket.name!r}")


@dataclass
class VSockDevice(Device):
    """A vhost-vsock PCI device holding a reserved guest CID."""

    device_type: ClassVar[DeviceType] = DeviceType.VSOCK_PCI
    vsock: VSock

    def __post_init__(self) -> None:
        if self.vsock.context_id < 3 or self.vsock.context_id > 0xFFFFFFFF - 1:
            raise ConfigError(f"vsock: invalid guest CID {self.vsock.context_id} (3..2^32-2)")
        if self.vsock.vhost_fd < 0:
            raise ConfigError(f"vsock: invalid vhost fd {self.vsock.vhost_fd}")


@dataclass
class HybridVSockDevice(Device):
    """A Firecracker/Cloud Hypervisor style vsock: a host Unix socket multiplexing ports."""

    device_type: ClassVar[DeviceType] = DeviceType.HYBRID_VSOCK
    uds_path: str
    context_id: int = 3
    port: int = AGENT_VSOCK_PORT

    def __post_init__(self) -> None:
        check_abs_path("hybrid vsock", "uds_path", self.uds_path)
        if self.context_id < 3:
            raise ConfigError(f"hybrid vsock: invalid guest CID {self.context_id} (>= 3)")
        if not 0 < self.port < 2**32:
            raise ConfigError(f"hybrid vsock: invalid port {self.port}")


@dataclass
class CPUDevice(Device):
    """A request to hot-add or remove `amount` vCPUs."""

    device_type: ClassVar[DeviceType] = DeviceType.CPU
    amount: int

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ConfigError(f"cpu device: amount must be positive, got {self.amount}")


@dataclass
class MemoryHotplug(Device):
    """A request to hot-add or remove `size_mb` MiB of guest memory."""

    device_type: ClassVar[DeviceType] = DeviceType.MEMORY
    size_mb: int
    slot: int = -1
    probe: bool = False
    addr: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size_mb <= 0:
            raise ConfigError(f"memory device: size_mb must be positive, got {self.size_mb}")


AnyDevice = (
    ImageDevice
    | BlockDrive
    | SharedFS
    | NetworkEndpoint
    | UserNetwork
    | VFIODevice
    | VhostUserDevice
    | SerialPort
    | VSockDevice
    | HybridVSockDevice
    | CPUDevice
    | MemoryHotplug
)
