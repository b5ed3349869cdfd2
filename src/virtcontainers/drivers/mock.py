"""The mock driver: a VM that exists only in memory, for testing code built on `Hypervisor`.

It validates its config, enforces the lifecycle state machine, records devices and returns
the seed's mock values for thread ids, pids and the agent socket.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field

from ..devices import (
    BlockDrive,
    CPUDevice,
    Device,
    MemoryHotplug,
    NetworkEndpoint,
    VFIODevice,
    VhostUserDevice,
)
from ..errors import ConfigError, StateError
from ..hypervisor import Hypervisor, VMState, register
from ..persist import DriverState
from ..types import Capabilities, HypervisorType, MemoryDevice, Socket, VSock

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from ..persist import HypervisorState

_HOTPLUGGABLE = (BlockDrive, NetworkEndpoint, VFIODevice, VhostUserDevice)


class MockState(DriverState):
    """The mock driver's own state: the ids (and kinds) of its hot-added devices."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    hotplugged: dict[str, str] = Field(default_factory=dict)


@register(HypervisorType.MOCK)
class MockHypervisor(Hypervisor):
    """An in-memory hypervisor that obeys the same rules as the real drivers."""

    def __init__(self, run_root: str | None = None) -> None:
        super().__init__(run_root)
        self.mock_pid = 0
        self._config: HypervisorConfig | None = None
        self.cold_devices: list[Device] = []
        self.hotplugged: dict[str, Device] = {}
        self.vcpus = 0
        self.memory_mb = 0
        self.restored_ids: set[str] = set()

    def _cfg(self) -> HypervisorConfig:
        if self._config is None:
            raise StateError("mock VM has no config: call create_sandbox first")
        return self._config

    async def create_sandbox(
        self, id: str, network_ns: str | None, config: HypervisorConfig, stateful: bool = False
    ) -> None:
        config.validate()
        if not id:
            raise ConfigError("sandbox id must not be empty")
        self.transition(VMState.CREATED, "create")
        self.id = id
        self._config = config
        self.vcpus = config.num_vcpus
        self.memory_mb = config.memory_size

    async def start_sandbox(self, timeout: float) -> None:
        if timeout <= 0:
            raise ConfigError(f"start timeout must be positive, got {timeout}")
        self.transition(VMState.RUNNING, "start")

    async def stop_sandbox(self) -> None:
        if self.state in (VMState.STOPPED, VMState.NEW):
            return
        self.transition(VMState.STOPPED, "stop")

    async def pause_sandbox(self) -> None:
        self.transition(VMState.PAUSED, "pause")

    async def resume_sandbox(self) -> None:
        self.require_state("resume", VMState.PAUSED)
        self.transition(VMState.RUNNING, "resume")

    async def save_sandbox(self) -> None:
        """The mock keeps no guest memory or device state to save: no VM templates."""
        self.require_state("save", VMState.PAUSED)
        raise self.unsupported("save_sandbox (VM templates)", "a mock VM has no memory to save")

    async def add_device(self, device: Device) -> None:
        self.require_state("cold-plug a device into", VMState.CREATED)
        self.cold_devices.append(device)

    async def hotplug_add_device(self, device: Device) -> Any:
        self.require_state("hotplug a device into", VMState.RUNNING, VMState.PAUSED)
        if isinstance(device, CPUDevice):
            old, new = await self.resize_vcpus(self.vcpus + device.amount)
            return new - old
        if isinstance(device, MemoryHotplug):
            await self.resize_memory(self.memory_mb + device.size_mb, 128, device.probe)
            return device.size_mb
        if not isinstance(device, _HOTPLUGGABLE):
            raise self.unsupported(f"hotplug of {device.kind}")
        dev_id = device.id
        if dev_id in self.hotplugged:
            raise ConfigError(f"device id {dev_id!r} is already plugged into VM {self.id}")
        self.hotplugged[dev_id] = device
        return device

    async def hotplug_remove_device(self, device: Device) -> Any:
        self.require_state("hot-remove a device from", VMState.RUNNING, VMState.PAUSED)
        if isinstance(device, CPUDevice):
            old, new = await self.resize_vcpus(self.vcpus - device.amount)
            return old - new
        if isinstance(device, MemoryHotplug):
            raise self.unsupported("hot-removing memory", "the mock, like a pc-dimm VM, only grows")
        if not isinstance(device, _HOTPLUGGABLE):
            raise self.unsupported(f"hot-removal of {device.kind}")
        if device.id in self.restored_ids:
            self.restored_ids.discard(device.id)
        elif self.hotplugged.pop(device.id, None) is None:
            raise ConfigError(f"device id {device.id!r} is not plugged into VM {self.id}")
        return device

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        self.require_state("resize memory of", VMState.RUNNING, VMState.PAUSED)
        if mem_mb <= 0:
            raise ConfigError(f"memory size must be positive, got {mem_mb} MiB")
        if block_size_mb > 0 and mem_mb % block_size_mb:
            mem_mb += block_size_mb - mem_mb % block_size_mb
        added = max(0, mem_mb - self.memory_mb)
        self.memory_mb = max(self.memory_mb, mem_mb)
        return self.memory_mb, MemoryDevice(slot=0, size_mb=added, addr=0, probe=probe)

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        self.require_state("resize vCPUs of", VMState.RUNNING, VMState.PAUSED)
        cfg = self._cfg()
        if not 1 <= vcpus <= cfg.default_max_vcpus:
            raise ConfigError(f"vCPU count must be 1..{cfg.default_max_vcpus}, got {vcpus}")
        old, self.vcpus = self.vcpus, vcpus
        return old, vcpus

    async def get_sandbox_console(self, sandbox_id: str) -> str:
        return ""

    async def disconnect(self) -> None:
        return None

    def capabilities(self) -> Capabilities:
        return (
            Capabilities.BLOCK_DEVICE
            | Capabilities.BLOCK_DEVICE_HOTPLUG
            | Capabilities.NET_DEVICE_HOTPLUG
            | Capabilities.CPU_HOTPLUG
            | Capabilities.MEMORY_HOTPLUG
            | Capabilities.VFIO_HOTPLUG
            | Capabilities.VHOST_USER_HOTPLUG
            | Capabilities.PAUSE
        )

    def hypervisor_config(self) -> HypervisorConfig:
        return self._cfg()

    async def get_thread_ids(self) -> dict[int, int]:
        return {0: os.getpid()}

    async def cleanup(self) -> None:
        return None

    def get_pids(self) -> list[int]:
        return [self.mock_pid]

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        raise self.unsupported("from_grpc", "mockHypervisor is not supported by VM cache")

    async def to_grpc(self) -> bytes:
        raise self.unsupported("to_grpc", "mockHypervisor is not supported by VM cache")

    async def check(self) -> None:
        if self.state is VMState.STOPPED:
            raise StateError(f"mock VM {self.id} is stopped")

    def save(self) -> HypervisorState:
        from ..persist import HypervisorState

        cfg = self._config.to_dict() if self._config is not None else {}
        plugged = {k: v.kind for k, v in self.hotplugged.items()}
        plugged.update({k: "restored" for k in self.restored_ids})
        return HypervisorState(
            type=str(HypervisorType.MOCK),
            id=self.id,
            vm_state=self.state,
            pid=self.mock_pid,
            config=cfg,
            driver=MockState(hotplugged=plugged),
        )

    def load(self, state: HypervisorState) -> None:
        from ..config import HypervisorConfig

        own = state.driver_state(MockState)
        self.mock_pid = state.pid
        self.id = state.id
        self.state = state.vm_state
        self.restored_ids = set(own.hotplugged)
        if state.config:
            self._config = HypervisorConfig.from_dict(state.config)
            self.vcpus = self._config.num_vcpus
            self.memory_mb = self._config.memory_size

    def generate_socket(self, id: str, use_vsock: bool) -> Socket | VSock:
        return Socket(device_id="", id="", host_path="/tmp/socket", name="socket")

    def get_virt_drive_offset(self) -> int:
        return 0
