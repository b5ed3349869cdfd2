"""Hotplug for the QEMU driver: devices, vCPUs and memory on a running VM.

The driver delegates every hotplug operation here. `IMPLEMENTED` lists the hotplug
capabilities this module really provides; the driver advertises a hotplug capability only
when both the machine type allows it and it is in `IMPLEMENTED`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...types import Capabilities, MemoryDevice

if TYPE_CHECKING:
    from ...devices import Device
    from .driver import QemuHypervisor

#: Hotplug capabilities implemented so far (none yet: every operation raises UnsupportedError).
IMPLEMENTED = Capabilities.NONE


class Hotplug:
    """Hotplug operations on one running QEMU VM (uses the driver's QMP session and lock)."""

    def __init__(self, driver: QemuHypervisor) -> None:
        self.driver = driver

    async def add_device(self, device: Device) -> Any:
        raise self.driver.unsupported(f"hotplugging {device.kind}", "not implemented yet")

    async def remove_device(self, device: Device) -> Any:
        raise self.driver.unsupported(f"hot-removing {device.kind}", "not implemented yet")

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        raise self.driver.unsupported("resize_memory", "not implemented yet")

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        raise self.driver.unsupported("resize_vcpus", "not implemented yet")
