"""The QEMU driver: importing this package registers `QemuHypervisor` for `HypervisorType.QEMU`."""

from __future__ import annotations

from .driver import QemuHypervisor, machine_capabilities

__all__ = ["QemuHypervisor", "machine_capabilities"]
