"""The ACRN driver: `acrn-dm` per VM; block hotplug through `acrnctl blkrescan`; little else.

ACRN has no control API beyond `acrnctl`: pause, resize, templates, VM cache hand-over and
every hotplug but block devices raise `UnsupportedError` naming acrn and the operation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING, Any

from ... import host, persist
from ...devices import (
    BlockDrive,
    Device,
    ImageDevice,
    NetworkEndpoint,
    SerialPort,
    check_id,
)
from ...errors import (
    AssetError,
    ConfigError,
    HypervisorError,
    StateError,
    VMExitedError,
    VMTimeoutError,
)
from ...hypervisor import Hypervisor, VMState, register
from ...types import Capabilities, HypervisorType, MemoryDevice
from ..vmm_process import VmmProcess, wait_for_path
from . import argv as acrn_argv
from .state import AcrnState
from .uuids import UuidAllocator

if TYPE_CHECKING:
    from ...config import HypervisorConfig
    from ...persist import HypervisorState

DEFAULT_BINARY = "/usr/bin/acrn-dm"
DEFAULT_CTL = "/usr/bin/acrnctl"
CONSOLE_SOCKET = "console.sock"
CAPABILITIES = Capabilities.BLOCK_DEVICE | Capabilities.BLOCK_DEVICE_HOTPLUG


@register(HypervisorType.ACRN)
class Acrn(Hypervisor):
    """A VM run by ACRN's device model, `acrn-dm`."""

    stop_grace = 5.0
    """Seconds acrn-dm gets to exit after SIGINT before SIGKILL."""
    ctl_timeout = 10.0
    """Seconds one `acrnctl` command may take."""

    def __init__(self, run_root: str | None = None) -> None:
        super().__init__(run_root)
        self._config: HypervisorConfig | None = None
        self.vm_dir = ""
        self.console_socket = ""
        self.name = ""
        self.uuid = ""
        self.binary = ""
        self.ctl = ""
        self._disks: list[BlockDrive] = []
        self._nets: list[NetworkEndpoint] = []
        self._ports: list[SerialPort] = []
        self._pool: list[int] = []
        self._pool_used: dict[int, str] = {}  # pool index -> device id
        self._proc: VmmProcess | None = None
        self._cold_disks: int | None = None  # set by load(): the disks are not persisted
        self._uuids = UuidAllocator(run_root)

    # -- helpers ---------------------------------------------------------------------------
    def _cfg(self) -> HypervisorConfig:
        if self._config is None:
            raise StateError("acrn: the VM has no config: call create_sandbox first")
        return self._config

    # -- lifecycle -------------------------------------------------------------------------
    async def create_sandbox(
        self, id: str, network_ns: str | None, config: HypervisorConfig, stateful: bool = False
    ) -> None:
        """Validate the config, check the binaries and reserve a VM UUID; launches nothing."""
        check_id("acrn sandbox", id)
        if network_ns:
            raise self.unsupported("network namespaces", "acrn-dm runs in the host namespace")
        config.validate()
        binary = config.hypervisor_asset_path() or DEFAULT_BINARY
        ctl = config.hypervisor_ctl_asset_path() or DEFAULT_CTL
        for what, path in (("acrn-dm", binary), ("acrnctl", ctl)):
            if not os.path.isabs(path) or not os.access(path, os.X_OK):
                raise AssetError(f"acrn: {what} binary {path!r} is not an executable file")
        vm_dir = persist.vm_dir(id, self.run_root)
        console = host.build_socket_path(vm_dir, CONSOLE_SOCKET)
        self.uuid = self._uuids.allocate(id)
        self.transition(VMState.CREATED, "create")
        self.id, self._config, self.binary, self.ctl = id, config, binary, ctl
        self.vm_dir, self.console_socket = vm_dir, console
        self.name = acrn_argv.vm_name(id)

    async def add_device(self, device: Device) -> None:
        """Cold-plug a disk, NIC or agent serial port (before start)."""
        self.require_state(f"cold-plug {device.kind}", VMState.CREATED)
        if isinstance(device, ImageDevice):
            self._disks.insert(0, BlockDrive("rootimg", device.path))
        elif isinstance(device, BlockDrive):
            self._disks.append(device)
        elif isinstance(device, NetworkEndpoint):
            self._nets.append(device)
        elif isinstance(device, SerialPort):
            self._ports.append(device)
        else:
            raise self.unsupported(f"cold-plug of {device.kind}")

    def argv(self) -> list[str]:
        """The acrn-dm command line this VM starts with."""
        layout = acrn_argv.build(
            self._cfg(),
            binary=self.binary,
            name=self.name,
            uuid=self.uuid,
            console_socket=self.console_socket,
            serial_ports=self._ports,
            disks=self._disks,
            nets=self._nets,
        )
        self._pool = layout.pool_slots
        return layout.argv

    async def start_sandbox(self, timeout: float) -> None:
        """Launch acrn-dm and wait for its console socket, within `timeout` seconds."""
        if timeout <= 0:
            raise ConfigError(f"acrn: start timeout must be positive, got {timeout}")
        self.require_state("start", VMState.CREATED)
        argv = self.argv()
        persist.ensure_dir(self.vm_dir)
        try:
            self._proc = await VmmProcess.spawn(
                "acrn-dm", argv, os.path.join(self.vm_dir, "acrn-dm.log")
            )
            self._uuids.set_owner(self.uuid, self._proc.pid, self._proc.start_time)
            await wait_for_path(self.console_socket, self._proc, timeout, "console socket")
        except BaseException:
            await self._teardown(release_uuid=False)
            raise
        self.transition(VMState.RUNNING, "start")

    async def stop_sandbox(self) -> None:
        """SIGINT, wait, SIGKILL; reap; remove the VM directory; give the UUID back."""
        if self.state in (VMState.NEW, VMState.STOPPED):
            return
        try:
            await self._teardown(release_uuid=True)
        finally:
            self.state = VMState.STOPPED

    async def _teardown(self, release_uuid: bool) -> None:
        if self._proc is not None:
            await self._proc.stop(first=signal.SIGINT, grace=self.stop_grace)
            self._proc = None
        if self.vm_dir:
            shutil.rmtree(self.vm_dir, ignore_errors=True)
        self._pool_used.clear()
        if release_uuid and self.id:
            self._uuids.release(self.id)

    async def pause_sandbox(self) -> None:
        """ACRN cannot pause a VM."""
        raise self.unsupported("pause")

    async def resume_sandbox(self) -> None:
        """ACRN cannot resume a VM."""
        raise self.unsupported("resume")

    async def save_sandbox(self) -> None:
        """ACRN cannot save VM state (no templates)."""
        raise self.unsupported("save")

    # -- devices ---------------------------------------------------------------------------
    async def _acrnctl(self, *args: str) -> None:
        cmd = [self.ctl, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as e:
            raise HypervisorError(f"acrn: cannot run {' '.join(cmd)}: {e.strerror}") from e
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.ctl_timeout)
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise VMTimeoutError(
                f"acrn: {' '.join(cmd)} did not finish within {self.ctl_timeout:g}s"
            ) from e
        if proc.returncode != 0:
            text = out.decode("utf-8", "replace").strip()
            raise HypervisorError(
                f"acrn: {' '.join(cmd)} failed with exit code {proc.returncode}: {text}"
            )

    def _check_alive(self, operation: str) -> None:
        if self._proc is None or not self._proc.alive():
            raise VMExitedError(f"acrn: cannot {operation} VM {self.id}: acrn-dm is not running")

    async def hotplug_add_device(self, device: Device) -> Any:
        """Put a block drive into a free `nodisk` slot with `acrnctl blkrescan`."""
        if not isinstance(device, BlockDrive):
            raise self.unsupported(f"hotplug of {device.kind}")
        self.require_state("hotplug a block drive into", VMState.RUNNING)
        self._check_alive("hotplug a block drive into")
        if device.id in self._pool_used.values():
            raise ConfigError(f"acrn: block drive {device.id!r} is already hotplugged")
        if "," in device.path or not os.path.exists(device.path):
            raise ConfigError(f"acrn: block drive {device.id}: no usable file at {device.path!r}")
        free = [i for i in range(len(self._pool)) if i not in self._pool_used]
        if not free:
            raise HypervisorError(
                f"acrn: VM {self.id}: all {len(self._pool)} hotplug disk slots are in use"
            )
        index = free[0]
        slot = self._pool[index]
        await self._acrnctl("blkrescan", self.name, f"{slot},{device.path}")
        self._pool_used[index] = device.id
        device.index = self.get_virt_drive_offset() + index
        device.pci_path = f"{slot:02x}"
        return device

    async def hotplug_remove_device(self, device: Device) -> Any:
        """Empty the drive's slot again (`acrnctl blkrescan <vm> <slot>,nodisk`)."""
        if not isinstance(device, BlockDrive):
            raise self.unsupported(f"hot-remove of {device.kind}")
        self.require_state("hot-remove a block drive from", VMState.RUNNING)
        self._check_alive("hot-remove a block drive from")
        index = next((i for i, d in self._pool_used.items() if d == device.id), None)
        if index is None:
            raise ConfigError(f"acrn: block drive {device.id!r} is not hotplugged in VM {self.id}")
        slot = self._pool[index]
        await self._acrnctl("blkrescan", self.name, f"{slot},{acrn_argv.NODISK}")
        del self._pool_used[index]
        return device

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """ACRN cannot hotplug memory."""
        raise self.unsupported("memory resize")

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """ACRN cannot hotplug vCPUs."""
        raise self.unsupported("vCPU resize")

    # -- introspection ---------------------------------------------------------------------
    async def get_sandbox_console(self, sandbox_id: str) -> str:
        """The virtio-console socket."""
        if not self.console_socket:
            raise StateError("acrn: the VM has no console: call create_sandbox first")
        return self.console_socket

    async def disconnect(self) -> None:
        """Nothing to drop: ACRN keeps no control connection."""

    def capabilities(self) -> Capabilities:
        """Block devices and their hotplug, nothing else."""
        return CAPABILITIES

    def hypervisor_config(self) -> HypervisorConfig:
        """The validated config this VM was created with."""
        return self._cfg()

    async def get_thread_ids(self) -> dict[int, int]:
        """ACRN runs vCPUs in the hypervisor, not as host threads."""
        raise self.unsupported("vCPU thread ids", "vCPUs are not host threads under ACRN")

    async def cleanup(self) -> None:
        """Remove what a stopped VM left behind; releases the UUID of a never-started VM."""
        if self.state in (VMState.RUNNING, VMState.PAUSED):
            raise StateError(f"acrn: cannot clean up VM {self.id}: it is {self.state.value}")
        await self._teardown(release_uuid=True)

    def get_pids(self) -> list[int]:
        """The acrn-dm pid."""
        return [self._proc.pid] if self._proc is not None else []

    async def check(self) -> None:
        """Raise unless acrn-dm is running."""
        if self._proc is None:
            raise StateError(f"acrn: VM {self.id or '<unnamed>'} is not started")
        self._check_alive("check")

    def get_virt_drive_offset(self) -> int:
        """Index of the first hotplug pool drive (after the root image and cold disks)."""
        cfg = self._cfg()
        cold = len(self._disks) if self._cold_disks is None else self._cold_disks
        return cold + (1 if cfg.image_asset_path() else 0)

    async def to_grpc(self) -> bytes:
        """ACRN VMs cannot be handed over through a VM cache."""
        raise self.unsupported("VM cache hand-over (to_grpc)")

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """ACRN VMs cannot be handed over through a VM cache."""
        raise self.unsupported("VM cache hand-over (from_grpc)")

    # -- persistence -----------------------------------------------------------------------
    def save(self) -> HypervisorState:
        """What another process needs to re-attach (pid, UUID, slots, paths, config)."""
        from ...persist import HypervisorState

        proc = self._proc
        port = self._ports[0].socket.host_path if self._ports else ""
        return HypervisorState(
            type=str(HypervisorType.ACRN),
            id=self.id,
            vm_state=self.state,
            pid=proc.pid if proc else 0,
            pid_start_time=proc.start_time if proc else None,
            uuid=self.uuid,
            block_index_map=sorted(self._pool_used),
            vm_dir=self.vm_dir,
            console_socket=self.console_socket,
            agent_socket=port,
            config=self._cfg().to_dict(),
            driver=AcrnState(
                name=self.name,
                binary=self.binary,
                ctl=self.ctl,
                pool=list(self._pool),
                pool_used=dict(self._pool_used),
                cold_disks=len(self._disks) if self._cold_disks is None else self._cold_disks,
            ),
        )

    def load(self, state: HypervisorState) -> None:
        """Adopt a VM saved by `save()` (possibly in another process)."""
        from ...config import HypervisorConfig

        if state.type and state.type != str(HypervisorType.ACRN):
            raise StateError(f"acrn: cannot load state of a {state.type} VM")
        own = state.driver_state(AcrnState)
        self._config = HypervisorConfig.from_dict(state.config)
        self.id = state.id
        self.state = state.vm_state
        self.name = own.name
        self.binary = own.binary
        self.ctl = own.ctl
        self.uuid = state.uuid
        self.vm_dir = state.vm_dir
        self.console_socket = state.console_socket
        self._pool = list(own.pool)
        self._pool_used = dict(own.pool_used)
        self._cold_disks = own.cold_disks
        log = os.path.join(self.vm_dir, "acrn-dm.log")
        self._proc = (
            VmmProcess.attach("acrn-dm", state.pid, state.pid_start_time, [log])
            if state.pid
            else None
        )
