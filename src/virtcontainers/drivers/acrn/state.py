"""What the ACRN driver persists beyond the shared `HypervisorState` fields."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from ...persist import DriverState


class AcrnState(DriverState):
    """The ACRN driver's own state: VM name, binaries and the block slot pool."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    name: str = ""
    binary: str = ""
    ctl: str = ""
    pool: list[int] = Field(default_factory=list)  # PCI slots of the pre-created block devices
    pool_used: dict[int, str] = Field(default_factory=dict)  # slot -> device id
    cold_disks: int = 0
