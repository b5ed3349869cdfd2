"""The capability table of every hypervisor (and QEMU machine type), built from the drivers."""

from __future__ import annotations

from ..hypervisor import new_hypervisor
from ..types import Capabilities, HypervisorType

QEMU_MACHINES = ("q35", "microvm", "pc")
COLUMNS = [c for c in Capabilities if c.name and c.value]


def capability_rows() -> list[tuple[str, Capabilities]]:
    """(label, capabilities) for each driver; QEMU once per machine type."""
    from ..drivers.qemu.driver import machine_capabilities

    rows = [(f"qemu ({m})", machine_capabilities(m)) for m in QEMU_MACHINES]
    for kind in HypervisorType:
        if kind is not HypervisorType.QEMU:
            rows.append((str(kind), new_hypervisor(kind).capabilities()))
    return rows


def markdown_table() -> str:
    """The table as Markdown (what the README shows)."""
    header = "| hypervisor | " + " | ".join(c.name.lower() for c in COLUMNS if c.name) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [header, sep]
    for label, caps in capability_rows():
        marks = " | ".join("yes" if c in caps else "-" for c in COLUMNS)
        lines.append(f"| {label} | {marks} |")
    return "\n".join(lines) + "\n"
