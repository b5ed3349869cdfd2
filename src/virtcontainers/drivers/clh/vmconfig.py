"""Cloud Hypervisor request bodies (`VmConfig`, `DiskConfig`, ...) from our config and devices.

Pure functions: the unit tests validate their output against the official OpenAPI spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...devices import (
    VIRTIO_BLK_ID_BYTES,
    BlockDrive,
    HybridVSockDevice,
    NetworkEndpoint,
    VFIODevice,
    VhostUserDevice,
)
from ...errors import ConfigError
from ...types import Param, join_params

if TYPE_CHECKING:
    from ...config import HypervisorConfig

MIB = 1 << 20
# virtio-mem and ACPI hotplug both want the hotpluggable region in whole 128 MiB blocks.
HOTPLUG_ALIGN_MB = 128
FS_QUEUE_SIZE = 1024
DEFAULT_ENTROPY = "/dev/urandom"

# Parameters every guest gets (the serial port is the console; Kata's fast-boot set).
BASE_KERNEL_PARAMS = (
    Param("console", "ttyS0"),
    Param("reboot", "k"),
    Param("panic", "1"),
    Param("tsc", "reliable"),
    Param("no_timer_check"),
    Param("noreplace-smp"),
    Param("cryptomgr.notests"),
    Param("net.ifnames", "0"),
    Param("iommu", "off"),
)
DEBUG_KERNEL_PARAMS = (Param("debug"),)
QUIET_KERNEL_PARAMS = (Param("quiet"),)
PMEM_ROOT_PARAMS = (
    Param("root", "/dev/pmem0p1"),
    Param("rootflags", "dax,data=ordered,errors=remount-ro"),
    Param("ro"),
    Param("rootfstype", "ext4"),
)
DISK_ROOT_PARAMS = (
    Param("root", "/dev/vda1"),
    Param("rootflags", "data=ordered,errors=remount-ro"),
    Param("ro"),
    Param("rootfstype", "ext4"),
)


@dataclass
class FsShare:
    """A virtio-fs share as Cloud Hypervisor sees it: a tag and virtiofsd's socket."""

    id: str
    tag: str
    socket: str


@dataclass
class VmDevices:
    """Everything cold-plugged into the VM at `vm.create`."""

    disks: list[BlockDrive] = field(default_factory=list)
    nets: list[NetworkEndpoint] = field(default_factory=list)
    fs: list[FsShare] = field(default_factory=list)
    vfio: list[VFIODevice] = field(default_factory=list)
    vhost_user: list[VhostUserDevice] = field(default_factory=list)
    vsock: HybridVSockDevice | None = None


def hotplug_memory_mb(cfg: HypervisorConfig, host_memory_mb: int) -> int:
    """MiB of hotpluggable memory to reserve: up to host memory, in whole 128 MiB blocks."""
    spare = host_memory_mb - cfg.memory_size
    return max(0, spare // HOTPLUG_ALIGN_MB * HOTPLUG_ALIGN_MB)


def kernel_params(cfg: HypervisorConfig, use_pmem_root: bool) -> list[Param]:
    """The guest command line: base, root device, debug or quiet, then the config's own."""
    params = list(BASE_KERNEL_PARAMS)
    if cfg.image_asset_path():
        params += PMEM_ROOT_PARAMS if use_pmem_root else DISK_ROOT_PARAMS
    params += DEBUG_KERNEL_PARAMS if cfg.debug else QUIET_KERNEL_PARAMS
    params += list(cfg.kernel_params)
    return params


def disk_config(drive: BlockDrive, cfg: HypervisorConfig) -> dict[str, Any]:
    """`DiskConfig` for a host file or block device."""
    body: dict[str, Any] = {
        "path": drive.path,
        "readonly": drive.read_only,
        "id": drive.id,
        "serial": drive.id[:VIRTIO_BLK_ID_BYTES],  # what the guest reads (Sandbox.add_disk)
    }
    if cfg.block_device_cache_set and cfg.block_device_cache_direct:
        body["direct"] = True
    if cfg.iommu_platform:
        body["iommu"] = True
    if drive.format == "qcow2":
        body["image_type"] = "Qcow2"
    return body


def net_config(ep: NetworkEndpoint, cfg: HypervisorConfig) -> dict[str, Any]:
    """`NetConfig` for a tap-backed NIC (one RX and one TX virtqueue per queue pair)."""
    body: dict[str, Any] = {"tap": ep.tap_name, "id": ep.id, "num_queues": 2 * ep.queues}
    if ep.mac:
        body["mac"] = ep.mac.lower()
    if cfg.iommu_platform:
        body["iommu"] = True
    return body


def fs_config(share: FsShare) -> dict[str, Any]:
    """`FsConfig` for a virtio-fs share served by virtiofsd on `share.socket`."""
    return {
        "tag": share.tag,
        "socket": share.socket,
        "num_queues": 1,
        "queue_size": FS_QUEUE_SIZE,
        "id": share.id,
    }


def vfio_config(dev: VFIODevice, cfg: HypervisorConfig) -> dict[str, Any]:
    """`DeviceConfig` for a VFIO passthrough device (by its sysfs path)."""
    body: dict[str, Any] = {"path": dev.sysfs_dev, "id": dev.id}
    if cfg.iommu:
        body["iommu"] = True
    return body


def vsock_config(dev: HybridVSockDevice) -> dict[str, Any]:
    """`VsockConfig`: the guest CID and the host socket that proxies guest ports."""
    return {"cid": dev.context_id, "socket": dev.uds_path, "id": "vsock0"}


def vhost_user_configs(dev: VhostUserDevice) -> tuple[str, dict[str, Any]]:
    """(`VmConfig` list name, body) for a cold-plugged vhost-user device."""
    if dev.backend == "blk":
        return "disks", {"vhost_user": True, "vhost_socket": dev.socket_path, "id": dev.id}
    if dev.backend == "net":
        body: dict[str, Any] = {
            "vhost_user": True,
            "vhost_socket": dev.socket_path,
            "id": dev.id,
            "num_queues": 2,
        }
        if dev.mac:
            body["mac"] = dev.mac.lower()
        return "net", body
    if dev.backend == "fs":
        return "fs", fs_config(FsShare(dev.id, dev.tag, dev.socket_path))
    raise ConfigError(
        f"clh: vhost-user device {dev.id}: backend {dev.backend!r} is not supported "
        "(blk, net or fs)"
    )


def vm_config(
    cfg: HypervisorConfig,
    devices: VmDevices,
    *,
    serial_socket: str,
    hotplug_mb: int,
    shared_memory: bool,
) -> dict[str, Any]:
    """The full `VmConfig` for `vm.create`."""
    kernel = cfg.kernel_asset_path()
    initrd = cfg.initrd_asset_path()
    image = cfg.image_asset_path()
    use_pmem = bool(image) and not cfg.disable_image_nvdimm
    payload: dict[str, Any] = {
        "kernel": kernel,
        "cmdline": join_params(kernel_params(cfg, use_pmem)),
    }
    if initrd:
        payload["initramfs"] = initrd
    firmware = cfg.firmware_asset_path()
    if firmware:
        payload["firmware"] = firmware

    memory: dict[str, Any] = {
        "size": cfg.memory_size * MIB,
        "shared": shared_memory,
        "hugepages": cfg.huge_pages,
        "prefault": cfg.mem_prealloc,
    }
    if hotplug_mb > 0:
        memory["hotplug_size"] = hotplug_mb * MIB
        memory["hotplug_method"] = "VirtioMem" if cfg.virtio_mem else "Acpi"

    body: dict[str, Any] = {
        "payload": payload,
        "cpus": {
            "boot_vcpus": cfg.num_vcpus,
            "max_vcpus": max(cfg.default_max_vcpus, cfg.num_vcpus),
        },
        "memory": memory,
        "rng": {"src": cfg.entropy_source or DEFAULT_ENTROPY},
        "serial": {"mode": "Socket", "socket": serial_socket},
        "console": {"mode": "Off"},
        "iommu": cfg.iommu,
    }

    disks = [disk_config(d, cfg) for d in devices.disks]
    nets = [net_config(n, cfg) for n in devices.nets]
    fs = [fs_config(s) for s in devices.fs]
    if image:
        if use_pmem:
            body["pmem"] = [{"file": image, "discard_writes": True, "id": "rootfs"}]
        else:
            disks.insert(0, {"path": image, "readonly": True, "id": "rootfs"})
    for dev in devices.vhost_user:
        kind, entry = vhost_user_configs(dev)
        {"disks": disks, "net": nets, "fs": fs}[kind].append(entry)
    if disks:
        body["disks"] = disks
    if nets:
        body["net"] = nets
    if fs:
        body["fs"] = fs
    if devices.vfio:
        body["devices"] = [vfio_config(d, cfg) for d in devices.vfio]
    if devices.vsock is not None:
        body["vsock"] = vsock_config(devices.vsock)
    return body


def pci_path_from_bdf(bdf: str) -> str:
    """Guest PCI path (`<slot>` on the root bus, as Kata spells it) from `0000:00:05.0`."""
    try:
        domain, bus, devfn = bdf.split(":")
        slot, _fn = devfn.split(".")
        int(domain, 16), int(bus, 16), int(slot, 16)
    except ValueError as e:
        raise ConfigError(f"clh: cannot parse PCI address {bdf!r} from the VMM") from e
    if int(bus, 16) != 0:
        return f"{int(bus, 16):02x}/{int(slot, 16):02x}"
    return f"{int(slot, 16):02x}"
