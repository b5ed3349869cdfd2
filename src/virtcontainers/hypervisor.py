"""The `Hypervisor` interface every driver implements, its lifecycle states and the registry."""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, StateError, UnsupportedError
from .types import Capabilities, HypervisorType, MemoryDevice, Socket, VSock
from .types import VMState as VMState  # noqa: PLC0414 (re-exported; persist needs it below)

if TYPE_CHECKING:
    from .config import HypervisorConfig
    from .devices import BlockDrive, Device
    from .persist import HypervisorState


_TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.NEW: frozenset({VMState.CREATED}),
    VMState.CREATED: frozenset({VMState.RUNNING, VMState.STOPPED}),
    VMState.RUNNING: frozenset({VMState.PAUSED, VMState.STOPPED}),
    VMState.PAUSED: frozenset({VMState.RUNNING, VMState.STOPPED}),
    VMState.STOPPED: frozenset(),
}


_DEVICE_METHODS = {
    "add_device": "cold-plug",
    "hotplug_add_device": "hotplug",
    "hotplug_remove_device": "hot-remove",
}


def _checking_device(
    method: Callable[[Any, Any], Awaitable[Any]], operation: str
) -> Callable[[Any, Any], Awaitable[Any]]:
    """`method`, refusing with `ConfigError` an argument that is not a `Device` (a `Socket`
    from `generate_socket`, say) instead of failing deep inside on a missing attribute."""

    @functools.wraps(method)
    async def checked(self: Hypervisor, device: Any) -> Any:
        from .devices import Device

        if not isinstance(device, Device):
            hint = " (wrap it: SerialPort(socket))" if isinstance(device, Socket) else ""
            raise ConfigError(
                f"{self.hypervisor_type}: cannot {operation} a {type(device).__name__}: "
                f"not a device (use the classes of virtcontainers.devices){hint}"
            )
        return await method(self, device)

    return checked


def check_transition(current: VMState, target: VMState, operation: str, vm: str) -> None:
    """Raise `StateError` unless `current -> target` is a legal lifecycle step."""
    if target not in _TRANSITIONS[current]:
        raise StateError(f"cannot {operation} VM {vm or '<unnamed>'}: it is {current.value}")


class Hypervisor(abc.ABC):
    """One VM driven by one VMM. Mirrors the seed's hypervisor interface, async where it does I/O.

    Operations a VMM cannot do raise `UnsupportedError`; `capabilities()` says so in advance.
    """

    hypervisor_type: HypervisorType

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every driver's device methods refuse what is not a device, naming its type."""
        super().__init_subclass__(**kwargs)
        for name, operation in _DEVICE_METHODS.items():
            method = cls.__dict__.get(name)
            if method is not None:
                setattr(cls, name, _checking_device(method, operation))

    def __init__(self, run_root: str | None = None) -> None:
        self.run_root = run_root
        self.id = ""
        self.state = VMState.NEW

    # -- lifecycle ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_sandbox(
        self, id: str, network_ns: str | None, config: HypervisorConfig, stateful: bool = False
    ) -> None:
        """Validate the config and prepare the VM; launches nothing."""

    @abc.abstractmethod
    async def start_sandbox(self, timeout: float) -> None:
        """Launch the VMM and wait until the VM runs, within `timeout` seconds."""

    @abc.abstractmethod
    async def stop_sandbox(self) -> None:
        """Stop the VM and reap its processes. Idempotent."""

    @abc.abstractmethod
    async def pause_sandbox(self) -> None:
        """Freeze the guest's vCPUs."""

    @abc.abstractmethod
    async def save_sandbox(self) -> None:
        """Save the VM's device state for use as a template."""

    @abc.abstractmethod
    async def resume_sandbox(self) -> None:
        """Resume a paused guest."""

    # -- devices -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_device(self, device: Device) -> None:
        """Cold-plug a device before start."""

    @abc.abstractmethod
    async def hotplug_add_device(self, device: Device) -> Any:
        """Hot-add a device to the running VM; returns driver-specific details."""

    @abc.abstractmethod
    async def hotplug_remove_device(self, device: Device) -> Any:
        """Hot-remove a device from the running VM."""

    @abc.abstractmethod
    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """Grow or shrink guest memory to `mem_mb`; returns the new size and the added device."""

    @abc.abstractmethod
    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """Set the number of online vCPUs; returns (old, new)."""

    # -- introspection -----------------------------------------------------------------------
    @abc.abstractmethod
    async def get_sandbox_console(self, sandbox_id: str) -> str:
        """The console's host address (a Unix socket path or a pty)."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Drop the control connection without touching the VM."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this VMM, with its configured machine, supports."""

    @abc.abstractmethod
    def hypervisor_config(self) -> HypervisorConfig:
        """The (validated) config this VM was created with."""

    @abc.abstractmethod
    async def get_thread_ids(self) -> dict[int, int]:
        """Map of vCPU index to host thread id."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Release host resources (files, sockets, fds) left after stop."""

    @abc.abstractmethod
    def get_pids(self) -> list[int]:
        """Host pids of the VM's processes; the VMM's first."""

    @abc.abstractmethod
    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Take over a running VM described by `to_grpc()` bytes (from a VM cache).

        The name is the seed's (fromGrpc); the bytes are JSON, not protobuf: the driver's
        saved `HypervisorState` (see `drivers/handover.py`)."""

    @abc.abstractmethod
    async def to_grpc(self) -> bytes:
        """Serialize what another process needs to take this VM over.

        The name is the seed's (toGrpc); the bytes are JSON, not protobuf: the driver's
        saved `HypervisorState` (see `drivers/handover.py`), which the VM cache's gRPC
        message carries as an opaque field."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise if the VM is not healthy."""

    @abc.abstractmethod
    def save(self) -> HypervisorState:
        """Snapshot of the state to persist."""

    @abc.abstractmethod
    def load(self, state: HypervisorState) -> None:
        """Restore from persisted state (re-attach happens on the next I/O call)."""

    def generate_socket(self, id: str, use_vsock: bool) -> Socket | VSock:
        """The host endpoint for the agent channel."""
        from . import host, persist

        return host.generate_vm_socket(id, use_vsock, persist.vm_root(self.run_root))

    @abc.abstractmethod
    def get_virt_drive_offset(self) -> int:
        """Index of the first virtio-blk drive available for hotplug."""

    def block_serial(self, drive: BlockDrive) -> str:
        """The serial the guest will read for `drive` once hot-added: its id, which the
        drivers set as the disk's serial (cut to the 20 bytes virtio-blk has). A VMM that
        cannot set it says what the guest sees instead."""
        from .devices import VIRTIO_BLK_ID_BYTES

        return drive.id[:VIRTIO_BLK_ID_BYTES]

    # -- helpers -----------------------------------------------------------------------------
    def unsupported(self, operation: str, reason: str = "") -> UnsupportedError:
        """An `UnsupportedError` naming this hypervisor and `operation`."""
        return UnsupportedError(str(self.hypervisor_type), operation, reason)

    def require(self, capability: Capabilities, operation: str) -> None:
        """Raise `UnsupportedError` unless `capability` is in `capabilities()`."""
        if capability not in self.capabilities():
            raise self.unsupported(operation)

    def require_state(self, operation: str, *allowed: VMState) -> None:
        """Raise `StateError` naming the hypervisor, the VM and its state unless the VM is in
        one of the `allowed` states."""
        if self.state not in allowed:
            raise StateError(
                f"{self.hypervisor_type!s}: cannot {operation} VM {self.id or '<unnamed>'}: "
                f"it is {self.state.value}"
            )

    def transition(self, target: VMState, operation: str) -> None:
        """Move to `target` or raise `StateError` for an illegal step."""
        check_transition(self.state, target, operation, self.id)
        self.state = target

    async def __aenter__(self) -> Hypervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop_sandbox()
        finally:
            await self.cleanup()


_REGISTRY: dict[HypervisorType, Callable[..., Hypervisor]] = {}
_DRIVER_MODULES = {
    HypervisorType.QEMU: "virtcontainers.drivers.qemu",
    HypervisorType.FIRECRACKER: "virtcontainers.drivers.firecracker",
    HypervisorType.CLH: "virtcontainers.drivers.clh",
    HypervisorType.ACRN: "virtcontainers.drivers.acrn",
    HypervisorType.MOCK: "virtcontainers.drivers.mock",
}


def register(kind: HypervisorType) -> Callable[[type[Hypervisor]], type[Hypervisor]]:
    """Class decorator: make a driver class the one `new_hypervisor(kind)` builds."""

    def deco(cls: type[Hypervisor]) -> type[Hypervisor]:
        cls.hypervisor_type = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def new_hypervisor(kind: HypervisorType | str, run_root: str | None = None) -> Hypervisor:
    """Build a driver for `kind` ("qemu", "firecracker", "clh", "acrn", "mock")."""
    import importlib

    htype = HypervisorType.parse(kind)
    if htype not in _REGISTRY:
        importlib.import_module(_DRIVER_MODULES[htype])
    return _REGISTRY[htype](run_root=run_root)
