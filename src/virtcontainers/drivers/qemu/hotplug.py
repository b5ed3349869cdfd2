"""Hotplug for the QEMU driver: devices, vCPUs and memory on a running VM.

The driver delegates every hotplug operation here. `IMPLEMENTED` lists the hotplug
capabilities this module really provides; the driver advertises a hotplug capability only
when both the machine type allows it and it is in `IMPLEMENTED`.

Every add is all-or-nothing: a failed (or cancelled) step undoes the earlier ones (device,
backend, helper daemon, PCI port) through one `Rollback`, whose own failures never hide the
error that caused it. Every removal is `device_del`, then the wait for QEMU's confirmation,
then the backend's removal; a guest that never releases the device leaves it attached and
recorded, so the removal can be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ...devices import (
    BlockDrive,
    CPUDevice,
    Device,
    MemoryHotplug,
    NetworkEndpoint,
    SharedFS,
    VFIODevice,
    VhostUserDevice,
    random_mac,
)
from ...errors import (
    ConfigError,
    HypervisorError,
    StateError,
    UnsupportedError,
    VMTimeoutError,
)
from ...types import Capabilities, MemoryDevice
from .. import virtiofsd
from ..helpers import is_socket
from . import argv as qargv
from . import pci, resize, storage_daemon
from .qmp import QMP, QMPCommandError
from .rollback import Rollback
from .state import Dimm, HotplugState, Plugged

if TYPE_CHECKING:
    from ...config import HypervisorConfig
    from ...persist import Bridge, HypervisorState
    from ..helpers import Helpers
    from .driver import QemuHypervisor

log = logging.getLogger(__name__)

#: Hotplug capabilities this module implements (each is exercised on real QEMU in the tests,
#: VFIO against the fake QMP server and a real QEMU refusing a missing host device).
IMPLEMENTED = (
    Capabilities.BLOCK_DEVICE_HOTPLUG
    | Capabilities.NET_DEVICE_HOTPLUG
    | Capabilities.CPU_HOTPLUG
    | Capabilities.MEMORY_HOTPLUG
    | Capabilities.VIRTIO_MEM
    | Capabilities.VFIO_HOTPLUG
    | Capabilities.VHOST_USER_HOTPLUG
)

UNPLUG_TIMEOUT = 30.0
"""Seconds to wait for the guest to release a device after `device_del`."""
UNPLUG_RETRY = 3.0
"""Seconds between repeated `device_del` requests while waiting."""

#: How each kind of backend is removed: QMP command and the name of its id argument.
BACKEND_DEL: dict[str, tuple[str, str]] = {
    "blockdev": ("blockdev-del", "node-name"),
    "netdev": ("netdev_del", "id"),
    "chardev": ("chardev-remove", "id"),
    "object": ("object-del", "id"),
}


def device_key(device: Device) -> str:
    """The record key of a device: its kind and id (vCPUs and memory have none)."""
    return f"{device.kind}:{getattr(device, 'id', '')}"


Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""Runs one QMP command on the live VM (raises `QMPCommandError` when QEMU refuses it)."""
Session = Callable[[], Awaitable[QMP]]
"""The live QMP session, for waiting on its events."""


class Hotplug:
    """Hotplug operations on one running QEMU VM, and everything they change: the devices,
    vCPUs and DIMMs added, the memory added, the drive indexes and PCI ports in use.

    QMP is reached only through `execute` and `session`; the VM itself (`vm`) is only read,
    for its id, config, paths and cold-plugged devices.
    """

    def __init__(
        self, vm: QemuHypervisor, helpers: Helpers, execute: Execute, session: Session
    ) -> None:
        self._vm = vm
        self._execute = execute
        self._session = session
        self.helpers = helpers
        self.unplug_timeout = UNPLUG_TIMEOUT
        self.unplug_retry = UNPLUG_RETRY
        self.plugged: dict[str, Plugged] = {}
        #: Hot-added pc-dimms.
        self.dimms: list[Dimm] = []
        #: QEMU ids of the hot-added vCPUs, oldest first.
        self.vcpus: list[str] = []
        #: MiB of memory hot-added (pc-dimms, or virtio-mem's requested size).
        self.memory_mb = 0
        #: Drive indexes in use (cold-plugged drives included).
        self.block_indexes: list[int] = []
        #: Cold-plugged hotplug targets: pcie-root-ports (q35) or pci-bridges (pc), with the
        #: devices placed on them.
        self.bridges: list[Bridge] = []
        self._lock = asyncio.Lock()

    # -- entry points ------------------------------------------------------------------------
    async def add_device(self, device: Device) -> Any:
        """Hot-add `device`; returns the device (with pci_path / scsi_addr / mac filled), the
        number of vCPUs added for a `CPUDevice`, or a `MemoryDevice` for `MemoryHotplug`."""
        op = f"hotplugging {device.kind}"
        self.check_machine(op)
        if isinstance(device, CPUDevice):
            old, new = await self.resize_vcpus(self.current_vcpus() + device.amount)
            return new - old
        if isinstance(device, MemoryHotplug):
            async with self._lock:
                if self.config.virtio_mem:
                    current = int(self.config.memory_size) + self.memory_mb
                    _, dev = await resize.resize_memory(
                        self, current + device.size_mb, 0, device.probe
                    )
                    return dev
                return await resize.add_dimm(self, device.size_mb, device.probe)
        async with self._lock:
            key = device_key(device)
            if key in self.plugged:
                raise ConfigError(
                    f"qemu: {device.kind} {key.split(':', 1)[1]} is already hot-added to VM "
                    f"{self.vm_id}"
                )
            if isinstance(device, BlockDrive):
                if self.config.enable_vhost_user_store:
                    # Every hot-added drive is then served by its own qemu-storage-daemon.
                    return await self._add_vhost_user_drive(device)
                return await self._add_block(device)
            if isinstance(device, NetworkEndpoint):
                return await self._add_net(device)
            if isinstance(device, VFIODevice):
                return await self._add_vfio(device)
            if isinstance(device, SharedFS):
                return await self._add_fs(device)
            if isinstance(device, VhostUserDevice):
                return await self._add_vhost_user(device)
        raise self.unsupported(
            op,
            "only block, network, VFIO, virtio-fs, vhost-user "
            "devices, vCPUs and memory can be hot-added",
        )

    async def remove_device(self, device: Device) -> Any:
        """Hot-remove a device added by `add_device` (vCPUs: the number removed)."""
        op = f"hot-removing {device.kind}"
        self.check_machine(op)
        if isinstance(device, CPUDevice):
            old, new = await self.resize_vcpus(self.current_vcpus() - device.amount)
            return old - new
        if isinstance(device, MemoryHotplug):
            raise self.unsupported(
                "hot-removing memory DIMMs", "shrink memory with resize_memory and virtio_mem"
            )
        async with self._lock:
            key = device_key(device)
            rec = self.plugged.get(key)
            if rec is None:
                raise StateError(
                    f"qemu: cannot hot-remove {device.kind} {key.split(':', 1)[1]} from VM "
                    f"{self.vm_id}: it was never hot-added"
                )
            await self._remove(rec, f"{op} {key.split(':', 1)[1]}")
            if isinstance(device, (BlockDrive, NetworkEndpoint, VFIODevice, VhostUserDevice)):
                device.pci_path = ""
            return device

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """Grow (pc-dimm or virtio-mem) or shrink (virtio-mem) guest memory to `mem_mb`."""
        self.check_machine("resize_memory")
        async with self._lock:
            return await resize.resize_memory(self, mem_mb, block_size_mb, probe)

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """Hot-add or hot-remove vCPUs until `vcpus` are present; returns (old, new)."""
        self.check_machine("resize_vcpus")
        async with self._lock:
            return await resize.resize_vcpus(self, vcpus)

    # -- state -------------------------------------------------------------------------------
    @property
    def vm_id(self) -> str:
        return self._vm.id

    @property
    def config(self) -> HypervisorConfig:
        return self._vm.hypervisor_config()

    @property
    def accel(self) -> str:
        return self._vm.accel

    def unsupported(self, operation: str, reason: str = "") -> UnsupportedError:
        return self._vm.unsupported(operation, reason)

    def launch_argv(self) -> list[str]:
        """QEMU's command line (as launched, or as it would be)."""
        return self._vm.argv or self._vm.build_launch().argv

    def boot_dimms(self) -> int:
        """Memory slots taken at boot (the root image as an nvdimm)."""
        return 1 if self._vm.image and not self.config.disable_image_nvdimm else 0

    def current_vcpus(self) -> int:
        return int(self.config.num_vcpus) + len(self.vcpus)

    def check_machine(self, op: str) -> str:
        """The machine type, refusing microvm (it has no hotplug of any kind)."""
        machine = qargv.machine_type(self.config)
        if machine == "microvm":
            raise self.unsupported(op, "the microvm machine type has no hotplug (use q35)")
        return machine

    def save(self) -> HotplugState:
        """The records kept in the driver's state (vCPUs, memory, drive indexes and bridges
        are saved in the shared `HypervisorState` fields)."""
        return HotplugState(
            devices=[replace(p) for p in self.plugged.values()],
            dimms=[replace(d) for d in self.dimms],
        )

    def load(self, saved: HotplugState, state: HypervisorState) -> None:
        self.plugged = {rec.key: replace(rec) for rec in saved.devices}
        self.dimms = [replace(d) for d in saved.dimms]
        self.vcpus = [v.id for v in state.hotplugged_vcpus]
        self.memory_mb = state.hotplugged_memory
        self.block_indexes = list(state.block_index_map)
        self.bridges = [b.model_copy(deep=True) for b in state.bridges]

    # -- QMP helpers -------------------------------------------------------------------------
    async def execute(
        self, op: str, command: str, arguments: Mapping[str, Any] | None = None
    ) -> Any:
        """Run a QMP command; QEMU's refusal becomes a `HypervisorError` naming `op`."""
        try:
            return await self._execute(command, dict(arguments or {}))
        except QMPCommandError as exc:
            raise self._refused(op, exc) from exc

    def _refused(self, op: str, exc: QMPCommandError) -> HypervisorError:
        return HypervisorError(f"qemu: VM {self.vm_id}: {op} failed: {exc}")

    async def device_del(
        self, qdev: str, op: str, gone: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """`device_del`, then wait for DEVICE_DELETED naming `qdev` (or for `gone()`).

        The request is repeated every `unplug_retry` seconds: a guest still booting drops the
        eject request (seen here for devices added right after start). `VMTimeoutError` if the
        guest does not release the device within `unplug_timeout`: it then stays attached.
        An id QEMU no longer knows counts as removed (an earlier request may have completed).
        """
        qmp = await self._session()
        deadline = time.monotonic() + self.unplug_timeout
        with qmp.events("DEVICE_DELETED") as events:
            while True:
                if not await self._request_unplug(qdev, op):
                    return
                retry_at = min(deadline, time.monotonic() + self.unplug_retry)
                while (now := time.monotonic()) < retry_at:
                    try:
                        poll = min(0.25, retry_at - now) if gone else retry_at - now
                        event = await events.wait(timeout=poll)
                    except VMTimeoutError:
                        event = None
                    if event is not None and event.get("data", {}).get("device") == qdev:
                        return
                    if gone is not None and await gone():
                        return
                if time.monotonic() >= deadline:
                    raise VMTimeoutError(
                        f"qemu: VM {self.vm_id}: {op}: the guest did not release device "
                        f"{qdev} within {self.unplug_timeout:g}s; it is still attached (retry "
                        "the removal)"
                    )

    async def _request_unplug(self, qdev: str, op: str) -> bool:
        """Send `device_del`; False when QEMU no longer has the device."""
        try:
            await self._execute("device_del", {"id": qdev})
        except QMPCommandError as exc:
            if exc.error_class == "DeviceNotFound":
                return False
            if "in progress" not in exc.desc and "process of unplug" not in exc.desc:
                raise self._refused(op, exc) from exc
        return True

    async def in_peripherals(self, qdev: str) -> bool:
        """Whether QEMU still has a user-created device with id `qdev`."""
        children = await self._execute("qom-list", {"path": "/machine/peripheral"})
        return any(c.get("name") == qdev for c in children)

    # -- devices -----------------------------------------------------------------------------
    async def _device_add(self, op: str, device: Mapping[str, Any], undo: Rollback) -> None:
        """`device_add`, undone by `device_del` (and the wait for DEVICE_DELETED) unless QEMU
        refused it: a lost reply or a cancelled await may leave the device made, holding its
        backend, which can only be removed after it."""
        qdev = str(device["id"])
        refused = False

        async def unplug() -> None:
            if not refused:  # an id QEMU does not know counts as removed
                await self.device_del(qdev, f"{op}: removing device {qdev} again")

        undo.push_async_callback(unplug)
        try:
            await self._execute("device_add", dict(device))
        except QMPCommandError as exc:
            refused = True
            raise self._refused(op, exc) from exc

    async def _plug_pci(
        self,
        op: str,
        rec: Plugged,
        device: Mapping[str, Any],
        undo: Rollback,
    ) -> str:
        """`device_add` on a free port/slot (released again on failure); returns the pci_path."""
        bridges = self.bridges
        place = pci.take(bridges, rec.qdev, self.vm_id)
        undo.callback(pci.release, bridges, rec.qdev)
        args = {**device, "id": rec.qdev, "bus": place.bus}
        if self.config.iommu_platform and qargv.is_virtio(str(device["driver"])):
            args.update(qargv.iommu_platform_props(str(device["driver"])))
        if place.addr:
            args["addr"] = place.addr
        await self._device_add(op, args, undo)
        return pci.pci_path(await self.execute(op, "query-pci"), rec.qdev)

    async def _add_backend(
        self,
        op: str,
        rec: Plugged,
        kind: str,
        name: str,
        command: str,
        args: Mapping[str, Any],
        undo: Rollback,
    ) -> None:
        await self.execute(op, command, args)
        rec.backend_kind, rec.backend = kind, name
        undo.push_async_callback(self._del_backend, rec)

    async def _del_backend(self, rec: Plugged) -> None:
        if not rec.backend_kind:
            return
        command, arg = BACKEND_DEL[rec.backend_kind]
        await self.execute(
            f"removing {rec.backend_kind} {rec.backend}", command, {arg: rec.backend}
        )

    async def _remove(self, rec: Plugged, op: str) -> None:
        await self.device_del(rec.qdev, op)
        # The device is gone from the guest: from here on, forget it whatever else fails.
        del self.plugged[rec.key]
        pci.release(self.bridges, rec.qdev)
        if rec.index >= 0 and rec.index in self.block_indexes:
            self.block_indexes.remove(rec.index)
        try:
            await self._del_backend(rec)
        finally:
            if rec.helper:
                # virtiofsd exits by itself once its vhost-user connection is gone.
                grace = 1.0 if rec.helper.startswith("fs-") else 0.0
                await self.helpers.stop(rec.helper, grace=grace)

    def _block_index(self, drive: BlockDrive) -> int:
        used = set(self.block_indexes)
        index = drive.index
        if index < 0 or index in used:
            index = self._vm.get_virt_drive_offset()
            while index in used:
                index += 1
        return index

    def _scsi_addr(self) -> str:
        used = {d.scsi_addr for d in self._vm.devices if isinstance(d, BlockDrive)}
        used |= {p.scsi_addr for p in self.plugged.values()}
        n = 0
        while f"{n}:0" in used:
            n += 1
        return f"{n}:0"

    async def _add_block(self, drive: BlockDrive) -> BlockDrive:
        op = f"hotplugging block drive {drive.id}"
        cfg = self.config
        driver = drive.driver or cfg.block_device_driver or "virtio-scsi"
        if driver not in ("virtio-blk", "virtio-scsi"):
            raise self.unsupported(
                f"hotplugging block drives with driver {driver!r}", "use virtio-blk or virtio-scsi"
            )
        if not os.path.exists(drive.path):
            raise ConfigError(f"block drive {drive.id}: {drive.path} does not exist")
        qargv.check_path(f"block drive {drive.id}", drive.path)
        scsi = driver == "virtio-scsi"
        rec = Plugged(device_key(drive), f"{'scsi' if scsi else 'blk'}-{drive.id}")
        rec.index = self._block_index(drive)
        node: dict[str, Any] = {
            "node-name": drive.id,
            "driver": drive.format,
            "read-only": drive.read_only,
            "file": {"driver": qargv._file_driver(drive.path), "filename": drive.path},
        }
        if cfg.block_device_cache_set:
            node["cache"] = {
                "direct": cfg.block_device_cache_direct,
                "no-flush": cfg.block_device_cache_noflush,
            }
        async with Rollback() as undo:
            await self._add_backend(op, rec, "blockdev", drive.id, "blockdev-add", node, undo)
            serial = self._vm.block_serial(drive)
            if scsi:
                rec.scsi_addr = drive.scsi_addr or self._scsi_addr()
                scsi_id, _, lun = rec.scsi_addr.partition(":")
                dev = {
                    "driver": "scsi-hd",
                    "id": rec.qdev,
                    "drive": drive.id,
                    "bus": f"{qargv.SCSI_CONTROLLER}.0",
                    "channel": 0,
                    "scsi-id": int(scsi_id),
                    "lun": int(lun or 0),
                    "serial": serial,
                }
                await self._device_add(op, dev, undo)
            else:
                dev = {"driver": "virtio-blk-pci", "drive": drive.id, "serial": serial}
                drive.pci_path = await self._plug_pci(op, rec, dev, undo)
            undo.pop_all()
        drive.index = rec.index
        drive.scsi_addr = rec.scsi_addr
        self.block_indexes.append(rec.index)
        self.plugged[rec.key] = rec
        return drive

    async def _add_net(self, ep: NetworkEndpoint) -> NetworkEndpoint:
        op = f"hotplugging network endpoint {ep.id}"
        rec = Plugged(device_key(ep), f"net-{ep.id}")
        netdev: dict[str, Any] = {"type": "tap", "id": f"netdev-{ep.id}"}
        fd_names = [f"netdev-{ep.id}-q{i}" for i in range(len(ep.fds))]
        if fd_names:  # queues opened by the caller (a macvtap's /dev/tapN): named copies
            netdev["fds"] = ":".join(fd_names)
        else:
            netdev.update({"ifname": ep.tap_name, "script": "no", "downscript": "no"})
        if ep.vhost and not self.config.disable_vhost_net:
            netdev["vhost"] = True
        if ep.queues > 1 and not fd_names:
            netdev["queues"] = ep.queues
        mac = ep.mac or random_mac()
        # No option ROM (as cold-plugged NICs): nothing boots from it, QEMU need not load it.
        dev: dict[str, Any] = {"driver": "virtio-net-pci", "netdev": netdev["id"], "mac": mac}
        dev["romfile"] = ""
        dev.update(qargv.NIC_LINK_ALWAYS_UP)
        if ep.queues > 1:
            dev.update({"mq": True, "vectors": 2 * ep.queues + 2})
        async with Rollback() as undo:
            if fd_names:
                # getfd and netdev_add on one QMP session: netdev_add takes (and so
                # removes) the named fds; whichever it did not take are closed on failure.
                qmp = await self._session()
                undo.push_async_callback(self._close_fds, fd_names)
                for fd, name in zip(ep.fds, fd_names, strict=True):
                    await qmp.pass_fd(fd, name)
            await self._add_backend(op, rec, "netdev", netdev["id"], "netdev_add", netdev, undo)
            ep.pci_path = await self._plug_pci(op, rec, dev, undo)
            undo.pop_all()
        ep.mac = mac
        self.plugged[rec.key] = rec
        return ep

    async def _close_fds(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(HypervisorError, QMPCommandError):
                await self._execute("closefd", {"fdname": name})

    async def _add_vfio(self, dev: VFIODevice) -> VFIODevice:
        op = f"hotplugging VFIO device {dev.id} ({dev.bdf})"
        machine = self.check_machine(op)
        bound = os.path.basename(os.path.realpath(os.path.join(dev.sysfs_dev, "driver")))
        if not os.path.exists(dev.sysfs_dev):
            raise ConfigError(f"vfio device {dev.id}: no host PCI device at {dev.sysfs_dev}")
        if bound != "vfio-pci":
            raise ConfigError(
                f"vfio device {dev.id}: host device {dev.bdf} is bound to "
                f"{bound if os.path.exists(os.path.join(dev.sysfs_dev, 'driver')) else 'no driver'}"
                ", not vfio-pci"
            )
        rec = Plugged(device_key(dev), f"vfio-{dev.id}")
        args = {"driver": "vfio-pci", "host": dev.bdf}
        if self.config.hotplug_vfio_on_root_bus and machine == "q35":
            raise self.unsupported(
                "hotplugging VFIO on the root bus of q35",
                "pcie.0 takes no hotplug; unset hotplug_vfio_on_root_bus",
            )
        async with Rollback() as undo:
            if self.config.hotplug_vfio_on_root_bus:
                await self._device_add(op, {**args, "id": rec.qdev, "bus": "pci.0"}, undo)
                dev.pci_path = pci.pci_path(await self.execute(op, "query-pci"), rec.qdev)
            else:
                dev.pci_path = await self._plug_pci(op, rec, args, undo)
            undo.pop_all()
        self.plugged[rec.key] = rec
        return dev

    def _require_shared_memory(self, op: str) -> None:
        if not qargv.shared_memory(self.config):
            raise self.unsupported(
                op,
                "vhost-user needs shared guest memory: set shared_fs = 'virtio-fs' or "
                "enable_vhost_user_store before the VM starts",
            )

    async def _add_vhost_user_chardev(
        self,
        op: str,
        rec: Plugged,
        socket: str,
        device: Mapping[str, Any],
        undo: Rollback,
    ) -> str:
        chardev_id = f"char-{rec.qdev}"
        chardev = {
            "id": chardev_id,
            "backend": {
                "type": "socket",
                "data": {"addr": {"type": "unix", "data": {"path": socket}}, "server": False},
            },
        }
        await self._add_backend(op, rec, "chardev", chardev_id, "chardev-add", chardev, undo)
        return await self._plug_pci(op, rec, {**device, "chardev": chardev_id}, undo)

    async def _add_fs(self, share: SharedFS) -> SharedFS:
        op = f"hotplugging shared fs {share.id}"
        if share.fs_type != "virtio-fs":
            raise self.unsupported(
                f"hotplugging a {share.fs_type} share", "QMP cannot add a 9p fsdev; use virtio-fs"
            )
        self._require_shared_memory(op)
        paths = self._vm.paths
        assert paths is not None
        rec = Plugged(device_key(share), virtiofsd.key(share))
        sock = paths.virtiofsd_socket(share.id)
        async with Rollback() as undo:
            await virtiofsd.start(self.helpers, self.config, share, sock, paths.vm_dir)
            rec.helper = virtiofsd.key(share)
            undo.push_async_callback(self.helpers.stop, rec.helper)
            dev = {"driver": "vhost-user-fs-pci", "tag": share.mount_tag}
            await self._add_vhost_user_chardev(op, rec, sock, dev, undo)
            undo.pop_all()
        self.plugged[rec.key] = rec
        return share

    async def _add_vhost_user_drive(self, drive: BlockDrive) -> BlockDrive:
        """A block drive served by our own qemu-storage-daemon as vhost-user-blk."""
        op = f"hotplugging block drive {drive.id} as vhost-user-blk"
        self._require_shared_memory(op)
        paths = self._vm.paths
        assert paths is not None
        rec = Plugged(device_key(drive), storage_daemon.key(drive))
        rec.index = self._block_index(drive)
        sock = os.path.join(paths.vm_dir, f"{storage_daemon.key(drive)}.sock")
        async with Rollback() as undo:
            await storage_daemon.start(
                self.helpers, drive, sock, os.path.join(paths.vm_dir, f"qsd-{drive.id}.log")
            )
            rec.helper = storage_daemon.key(drive)
            undo.push_async_callback(self.helpers.stop, rec.helper)
            dev = {"driver": "vhost-user-blk-pci"}
            drive.pci_path = await self._add_vhost_user_chardev(op, rec, sock, dev, undo)
            undo.pop_all()
        drive.index = rec.index
        self.block_indexes.append(rec.index)
        self.plugged[rec.key] = rec
        return drive

    async def _add_vhost_user(self, dev: VhostUserDevice) -> VhostUserDevice:
        """A vhost-user device whose backend (someone else's) already listens on its socket."""
        op = f"hotplugging vhost-user-{dev.backend} device {dev.id}"
        models = {"blk": {"driver": "vhost-user-blk-pci"}, "fs": {"driver": "vhost-user-fs-pci"}}
        if dev.backend not in models:
            raise self.unsupported(
                f"hotplugging vhost-user-{dev.backend} devices", "only blk and fs are supported"
            )
        self._require_shared_memory(op)
        if not is_socket(dev.socket_path):
            raise ConfigError(
                f"vhost-user device {dev.id}: no backend listens on {dev.socket_path}"
            )
        qargv.check_path(f"vhost-user device {dev.id} socket", dev.socket_path)
        rec = Plugged(device_key(dev), f"vhost-{dev.backend}-{dev.id}")
        model = dict(models[dev.backend])
        if dev.backend == "fs":
            model["tag"] = dev.tag
        async with Rollback() as undo:
            dev.pci_path = await self._add_vhost_user_chardev(op, rec, dev.socket_path, model, undo)
            undo.pop_all()
        self.plugged[rec.key] = rec
        return dev
