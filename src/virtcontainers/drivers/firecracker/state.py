"""What the Firecracker driver persists beyond the shared `HypervisorState` fields."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ConfigDict, Field

from ...persist import DriverState
from ...types import AGENT_VSOCK_PORT
from . import bodies
from .argv import JailerSpec

VSOCK_NAME = "kata.hvsock"


@dataclass
class Slot:
    """One placeholder drive: its API id, its empty file (root-relative), what occupies it."""

    drive_id: str
    placeholder: str
    read_only: bool = False  # fixed when the drive is created: a PATCH cannot change it
    device_id: str = ""
    attached: str = ""  # root-relative path of the attached disk


class FirecrackerState(DriverState):
    """The Firecracker driver's own state: its root (jailed or not), drive slots and vsock."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    network_ns: str = ""
    root: str = ""  # the VM root; "" means the VM directory
    mounts: list[str] = Field(default_factory=list)
    image: str = ""
    drive_offset: int = 0
    vsock_cid: int = bodies.GUEST_CID
    vsock_name: str = VSOCK_NAME  # inside the VM root, relative
    vsock_link: str = ""  # a host path outside the root that links to the socket
    agent_port: int = AGENT_VSOCK_PORT
    vmm_version: str = ""
    slots: list[Slot] = Field(default_factory=list)
    jailer: JailerSpec | None = None
    console_keeper: tuple[int, int | None] | None = None  # pid, start time
