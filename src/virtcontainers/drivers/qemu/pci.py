"""Where hotplugged PCI devices go: a free pcie-root-port (q35) or pci-bridge slot (pc).

Occupancy lives in the driver's persisted `Bridge.devices_addr` (slot -> QEMU device id), so
another process that re-attaches knows which ports are taken. `pci_path` reads QEMU's own
`query-pci` answer to report where a device ended up ("01/00": port slot / device slot).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import HypervisorError
from ...persist import Bridge

ROOT_PORT = "pcie-root-port"
PCI_BRIDGE = "pci-bridge"
#: Usable device slots on a pci-bridge (slot 0 is skipped, as QEMU's SHPC reserves it).
BRIDGE_SLOTS = range(1, 32)


@dataclass(frozen=True)
class Placement:
    """A device's bus and (on a pci-bridge) its slot; `addr` is "" when QEMU chooses."""

    bus: str
    slot: int

    @property
    def addr(self) -> str:
        return "" if self.slot == 0 else f"{self.slot:#04x}"


def take(bridges: Sequence[Bridge], qdev: str, vm: str) -> Placement:
    """Reserve a free root port (one device each) or bridge slot for device `qdev`."""
    for b in bridges:
        if b.type == ROOT_PORT and not b.devices_addr:
            b.devices_addr[0] = qdev
            return Placement(b.id, 0)
    for b in bridges:
        if b.type == PCI_BRIDGE:
            for slot in BRIDGE_SLOTS:
                if slot not in b.devices_addr:
                    b.devices_addr[slot] = qdev
                    return Placement(b.id, slot)
    if not bridges:
        raise HypervisorError(
            f"qemu: VM {vm}: nowhere to hot-add {qdev}: the VM was made without a hotplug "
            "port (set pcie_root_port on q35, default_bridges on pc)"
        )
    ports = sum(1 for b in bridges if b.type == ROOT_PORT)
    if ports:
        raise HypervisorError(
            f"qemu: VM {vm}: no free pcie-root-port for {qdev} (all {ports} are in use; "
            "raise pcie_root_port)"
        )
    raise HypervisorError(
        f"qemu: VM {vm}: no free PCI slot for {qdev} "
        f"({len(bridges)} bridge(s) full or none; raise default_bridges)"
    )


def release(bridges: Iterable[Bridge], qdev: str) -> None:
    """Free whatever port or slot `qdev` held (no-op if it held none)."""
    for b in bridges:
        for slot, owner in list(b.devices_addr.items()):
            if owner == qdev:
                del b.devices_addr[slot]


def pci_path(buses: Sequence[Mapping[str, Any]], qdev: str) -> str:
    """The slot chain from the root bus to `qdev` in a `query-pci` answer ("" if absent)."""

    def walk(devices: Sequence[Mapping[str, Any]], chain: list[int]) -> list[int] | None:
        for dev in devices:
            here = [*chain, int(dev["slot"])]
            if dev.get("qdev_id") == qdev:
                return here
            bridge = dev.get("pci_bridge")
            if bridge:
                found = walk(bridge.get("devices", []), here)
                if found is not None:
                    return found
        return None

    for bus in buses:
        if int(bus.get("bus", 0)) != 0:
            continue
        found = walk(bus.get("devices", []), [])
        if found is not None:
            return "/".join(f"{s:02x}" for s in found)
    return ""
