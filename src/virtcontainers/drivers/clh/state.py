"""What the Cloud Hypervisor driver persists beyond the shared `HypervisorState` fields."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ConfigDict, Field

from ...persist import DriverState


@dataclass
class DaemonRecord:
    """A virtiofsd serving one share: its id, pid + start time and socket."""

    id: str
    pid: int
    socket: str
    start_time: int | None = None


@dataclass
class VsockRecord:
    """The hybrid vsock device: guest CID and the agent's port."""

    cid: int
    port: int


class ClhState(DriverState):
    """The Cloud Hypervisor driver's own state: binary, virtiofsd daemons, hotplug records."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    binary: str = ""
    virtiofsd: list[DaemonRecord] = Field(default_factory=list)
    hotplugged: dict[str, str] = Field(default_factory=dict)  # device id -> API id
    hotplug_mb: int = 0
    shared_memory: bool = False
    vsock: VsockRecord | None = None
    mem_slot: int = 0
