"""What a driver persists so that another process can re-attach to its VM (`HypervisorState`),
with its parts. Kept apart from the state store (`persist`), which reads and writes documents
without pydantic: listing sandboxes must not pay for building these models."""

from __future__ import annotations

import builtins
import os
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import StateError
from .types import VMState


class Bridge(BaseModel):
    """A PCI/PCIe bridge of the VM and the devices plugged into it (slot -> device id)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    id: str = ""
    type: str = ""
    addr: int = Field(default=0, ge=0)
    devices_addr: dict[int, str] = Field(default_factory=dict)


class HotpluggedVCPU(BaseModel):
    """A hot-added vCPU, by the id the hypervisor knows it under."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    id: str


class DriverState(BaseModel):
    """A driver's own part of `HypervisorState`: each driver subclasses it with its typed fields
    (`drivers/<name>/state.py`). Read back from a file it holds the fields as loaded, until the
    driver parses them with `HypervisorState.driver_state`."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    def __eq__(self, other: object) -> bool:
        """Equal when the fields are, whether parsed by the driver's model or not yet."""
        if not isinstance(other, DriverState):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]


_M = TypeVar("_M", bound=DriverState)


class HypervisorState(BaseModel):
    """What a driver persists so that another process can re-attach to its VM: the fields
    every driver shares, and the driver's own typed part in `driver`."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    type: str = ""
    id: str = ""
    vm_state: VMState = VMState.NEW
    pid: int = Field(default=0, ge=0)
    pid_start_time: int | None = None
    uuid: str = ""
    api_socket: str = ""
    block_index_map: list[int] = Field(default_factory=list)
    hotplugged_vcpus: list[HotpluggedVCPU] = Field(default_factory=list)
    hotplugged_memory: int = Field(default=0, ge=0)
    virtiofsd_pid: int = Field(default=0, ge=0)
    pcie_root_port: int = Field(default=0, ge=0)
    bridges: list[Bridge] = Field(default_factory=list)
    hotplug_vfio_on_root_bus: bool = False
    vm_dir: str = ""
    qmp_socket: str = ""
    console_socket: str = ""
    agent_socket: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    driver: SerializeAsAny[DriverState] = Field(default_factory=DriverState)

    @model_validator(mode="before")
    @classmethod
    def _previous_format(cls, data: Any) -> Any:
        """Read a state written before `id`, `vm_state` and `driver` existed: everything
        driver-specific was in a free-form `extra` dict, the VM state under `vm_state` (QEMU)
        or `state` (the others), and Firecracker's VM id in `uuid`."""
        if not isinstance(data, dict) or "extra" not in data:
            return data
        data = dict(data)
        extra = dict(data.pop("extra") or {})
        old_id = str(extra.pop("id", "") or "")
        if data.get("type") == "firecracker":
            old_id, data["uuid"] = str(data.get("uuid") or old_id), ""
        data.setdefault("id", old_id or os.path.basename(str(data.get("vm_dir") or "")))
        old_state = extra.pop("vm_state", None) or extra.pop("state", None)
        data.setdefault("vm_state", old_state or VMState.RUNNING.value)
        data.setdefault("driver", extra)
        return data

    @field_validator("hotplugged_vcpus", mode="before")
    @classmethod
    def _vcpu_ids(cls, value: Any) -> Any:
        """Accept plain id strings as well as `{"id": ...}` entries."""
        if isinstance(value, list):
            return [{"id": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("block_index_map")
    @classmethod
    def _indexes(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("block indexes must be >= 0")
        return sorted(set(value))

    def driver_state(self, model: builtins.type[_M]) -> _M:
        """The driver's part parsed as `model`; `StateError` naming the driver and the field
        at fault when it does not fit."""
        if isinstance(self.driver, model):
            return self.driver
        try:
            return model.model_validate(self.driver.model_dump())
        except ValidationError as e:
            what = f"{self.type or 'hypervisor'} VM {self.id!r}"
            raise StateError(f"{what}: invalid saved driver state: {e}") from e
