"""What the QEMU driver persists beyond the shared `HypervisorState` fields (its `driver` part)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from ...persist import DriverState


@dataclass
class Plugged:
    """A hot-added device as recorded (and persisted) until it is removed."""

    key: str  # "<DeviceKind>:<id>"
    qdev: str  # QEMU device id
    backend_kind: str = ""  # a key of hotplug.BACKEND_DEL, or ""
    backend: str = ""
    helper: str = ""  # key of the helper daemon serving it, or ""
    index: int = -1  # block drive index
    scsi_addr: str = ""


@dataclass
class Dimm:
    """A hot-added pc-dimm: QEMU device id, slot, size and guest physical address."""

    id: str
    slot: int = -1
    size_mb: int = 0
    addr: int = 0


@dataclass
class HelperRecord:
    """A helper daemon (virtiofsd, qemu-storage-daemon, console keeper) by pid + start time."""

    kind: str
    key: str
    socket: str = ""
    log_path: str = ""
    pid: int = 0
    start_time: int | None = None
    leftovers: list[str] = field(default_factory=list)


class HotplugState(BaseModel):
    """`Hotplug`'s records: hot-added devices and DIMMs (vCPUs, memory and block indexes are
    the shared `HypervisorState` fields)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    devices: list[Plugged] = Field(default_factory=list)
    dimms: list[Dimm] = Field(default_factory=list)


class QemuState(DriverState):
    """The QEMU driver's own state: how QEMU was launched, its helpers and hotplug records."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    accel: str = ""
    qemu_path: str = ""
    kernel: str = ""
    initrd: str = ""
    image: str = ""
    argv: list[str] = Field(default_factory=list)
    helpers: list[HelperRecord] = Field(default_factory=list)
    hotplug: HotplugState = Field(default_factory=HotplugState)
