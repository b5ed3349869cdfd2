"""The Cloud Hypervisor driver: one `cloud-hypervisor` process per VM, driven over its REST API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

from ... import host, persist
from ...devices import (
    BlockDrive,
    CPUDevice,
    Device,
    HybridVSockDevice,
    ImageDevice,
    MemoryHotplug,
    NetworkEndpoint,
    SharedFS,
    VFIODevice,
    VhostUserDevice,
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
from ...types import AGENT_VSOCK_PORT, Capabilities, HypervisorType, MemoryDevice, Socket, VSock
from .. import virtiofsd
from ..handover import decode_state, encode_state
from ..helpers import Helper, Helpers
from ..vmm_process import VmmProcess, threads_named
from .api import ClhApi
from .state import ClhState, DaemonRecord, VsockRecord
from .vmconfig import (
    MIB,
    FsShare,
    VmDevices,
    disk_config,
    fs_config,
    hotplug_memory_mb,
    net_config,
    pci_path_from_bdf,
    vfio_config,
    vm_config,
)

if TYPE_CHECKING:
    from ...config import HypervisorConfig
    from ...persist import HypervisorState

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/bin/cloud-hypervisor"
API_SOCKET = "clh-api.sock"
SERIAL_SOCKET = "console.sock"
VSOCK_SOCKET = "clh.vsock"
DEFAULT_CID = 3
_VCPU_COMM = re.compile(r"^vcpu(\d+)$")
_READY_POLL = 0.02


@register(HypervisorType.CLH)
class CloudHypervisor(Hypervisor):
    """A VM run by Cloud Hypervisor (`cloud-hypervisor --api-socket ...`)."""

    api_timeout = 10.0
    """Seconds allowed for one ordinary API call."""
    snapshot_timeout = 120.0
    """Seconds allowed for `vm.snapshot` / `vm.restore` (they copy guest memory)."""
    stop_grace = 5.0
    """Seconds a VMM gets to exit after `vmm.shutdown`, and again after SIGTERM."""
    daemon_timeout = 5.0
    """Seconds virtiofsd gets to create its socket."""

    def __init__(self, run_root: str | None = None) -> None:
        super().__init__(run_root)
        self._config: HypervisorConfig | None = None
        self.vm_dir = ""
        self.api_socket = ""
        self.serial_socket = ""
        self.binary = ""
        self.network_ns = ""
        self._cold = VmDevices()
        self._cold_shares: list[SharedFS] = []
        self._proc: VmmProcess | None = None
        self._api: ClhApi | None = None
        self.helpers = Helpers("clh")
        """virtiofsd of each virtio-fs share."""
        self._hotplugged: dict[str, str] = {}
        self._hotplug_mb = 0
        self._shared_memory = False
        self.hotplugged_vcpus = 0
        self.hotplugged_memory_mb = 0
        self._mem_slot = 0

    # -- helpers ---------------------------------------------------------------------------
    def _cfg(self) -> HypervisorConfig:
        if self._config is None:
            raise StateError("clh: the VM has no config: call create_sandbox first")
        return self._config

    def _client(self) -> ClhApi:
        if self._api is None:
            if not self.api_socket:
                raise StateError(f"clh: VM {self.id or '<unnamed>'} has no API socket")
            self._api = ClhApi(self.api_socket, self.api_timeout, self._death_note)
        return self._api

    async def _death_note(self) -> str | None:
        """Describe the VMM's death (exit code, log tail) if it is gone, else None."""
        proc = self._proc
        if proc is None or not await proc.wait(0.5):
            return None
        code = proc.exit_code
        tail = proc.log_tail().rstrip()
        text = "exited" + (f" with code {code}" if code is not None else "")
        return text + (f"\n--- log tail ---\n{tail}" if tail else "")

    def hybrid_vsock(self) -> HybridVSockDevice:
        """The VM's vsock: the host socket that proxies guest vsock ports, CID and agent port."""
        if self._cold.vsock is None:
            raise StateError("clh: the VM has no vsock: call create_sandbox first")
        return self._cold.vsock

    def generate_socket(self, id: str, use_vsock: bool) -> Socket | VSock:
        """The agent endpoint as a `Socket` whose `host_path` is the hybrid vsock socket.

        Cloud Hypervisor has no virtio-serial ports and proxies guest vsock ports through one
        Unix socket, so no vhost-vsock CID is reserved whatever `use_vsock` says.
        """
        check_id("clh sandbox", id)
        if self.id == id and self._cold.vsock is not None:
            path, port = self._cold.vsock.uds_path, self._cold.vsock.port
        else:
            path = os.path.join(persist.vm_dir(id, self.run_root), VSOCK_SOCKET)
            port = AGENT_VSOCK_PORT
        return Socket("vsock", "hvsock", path, f"hybrid-vsock:{port}")

    # -- lifecycle -------------------------------------------------------------------------
    async def create_sandbox(
        self, id: str, network_ns: str | None, config: HypervisorConfig, stateful: bool = False
    ) -> None:
        """Validate the config, pick paths and reserve the default vsock; launches nothing."""
        check_id("clh sandbox", id)
        config.validate()
        binary = config.hypervisor_asset_path() or DEFAULT_BINARY
        if not os.path.isabs(binary) or not os.access(binary, os.X_OK):
            raise AssetError(f"clh: hypervisor binary {binary!r} is not an executable file")
        if network_ns and not os.path.exists(network_ns):
            raise ConfigError(f"clh: network namespace {network_ns!r} does not exist")
        vm_dir = persist.vm_dir(id, self.run_root)
        api_socket = host.build_socket_path(vm_dir, API_SOCKET)
        serial_socket = host.build_socket_path(vm_dir, SERIAL_SOCKET)
        vsock_path = host.build_socket_path(vm_dir, VSOCK_SOCKET)
        self.transition(VMState.CREATED, "create")
        self.id = id
        self._config = config
        self.binary = binary
        self.network_ns = network_ns or ""
        self.vm_dir, self.api_socket, self.serial_socket = vm_dir, api_socket, serial_socket
        self._cold = VmDevices(vsock=HybridVSockDevice(vsock_path, DEFAULT_CID, AGENT_VSOCK_PORT))
        self._hotplug_mb = hotplug_memory_mb(config, host.host_memory_kib() // 1024)
        self._shared_memory = Capabilities.FS_SHARING in self.capabilities()

    async def add_device(self, device: Device) -> None:
        """Cold-plug a device into the VmConfig (before start)."""
        self.require_state(f"cold-plug {device.kind}", VMState.CREATED)
        cfg = self._cfg()
        if isinstance(device, ImageDevice):
            self._cold.disks.insert(0, BlockDrive("rootimg", device.path, read_only=True))
        elif isinstance(device, BlockDrive):
            self.require(Capabilities.BLOCK_DEVICE, "block devices")
            self._cold.disks.append(device)
        elif isinstance(device, NetworkEndpoint):
            self._check_nic(device)
            self._cold.nets.append(device)
        elif isinstance(device, SharedFS):
            self._check_share(device, "cold-plug")
            self._cold_shares.append(device)
        elif isinstance(device, HybridVSockDevice):
            self._cold.vsock = device
        elif isinstance(device, VFIODevice):
            self._cold.vfio.append(device)
        elif isinstance(device, VhostUserDevice):
            if device.backend == "scsi":
                raise self.unsupported("vhost-user-scsi devices")
            if device.backend == "fs" and not self._shared_memory:
                raise self.unsupported("vhost-user-fs", f"shared_fs is {cfg.shared_fs!r}")
            self._cold.vhost_user.append(device)
        else:
            raise self.unsupported(f"cold-plug of {device.kind}")

    def _check_nic(self, nic: NetworkEndpoint) -> None:
        """Cloud Hypervisor is given a tap by name (its API takes fds only as SCM_RIGHTS,
        which this client does not send)."""
        if nic.fds:
            raise self.unsupported(
                f"network interface {nic.id} from open fds (macvtap)",
                "cloud hypervisor is given a tap by name",
            )

    def _check_share(self, share: SharedFS, operation: str) -> None:
        self.require(Capabilities.FS_SHARING, f"{operation} of shared fs {share.id}")
        if share.fs_type != "virtio-fs":
            raise self.unsupported(f"{operation} of {share.fs_type} share {share.id}")

    def _vmm_argv(self) -> list[str]:
        cfg = self._cfg()
        argv = [
            self.binary,
            "--api-socket",
            f"path={self.api_socket}",
            "--log-file",
            os.path.join(self.vm_dir, "cloud-hypervisor.log"),
        ]
        if cfg.debug:
            argv.append("-v")
        if self.network_ns:
            argv = ["nsenter", f"--net={self.network_ns}", "--", *argv]
        return argv

    def vm_config(self) -> dict[str, Any]:
        """The `VmConfig` body `vm.create` will send (cold-plugged devices included)."""
        cfg = self._cfg()
        devices = VmDevices(
            disks=list(self._cold.disks),
            nets=list(self._cold.nets),
            fs=[
                FsShare(s.id, s.mount_tag, virtiofsd.socket_path(self.vm_dir, s.id))
                for s in self._cold_shares
            ],
            vfio=list(self._cold.vfio),
            vhost_user=list(self._cold.vhost_user),
            vsock=self._cold.vsock,
        )
        return vm_config(
            cfg,
            devices,
            serial_socket=self.serial_socket,
            hotplug_mb=self._hotplug_mb,
            shared_memory=self._shared_memory,
        )

    async def start_sandbox(self, timeout: float) -> None:
        """Launch cloud-hypervisor, create and boot the VM (or restore a template) in `timeout`."""
        if timeout <= 0:
            raise ConfigError(f"clh: start timeout must be positive, got {timeout}")
        self.require_state("start", VMState.CREATED)
        cfg = self._cfg()
        deadline = time.monotonic() + timeout
        persist.ensure_dir(self.vm_dir)
        step = "launching cloud-hypervisor"
        try:
            async with asyncio.timeout(timeout):
                step = "starting virtiofsd"
                for share in self._cold_shares:
                    sock = virtiofsd.socket_path(self.vm_dir, share.id)
                    wait = min(self.daemon_timeout, timeout)
                    await virtiofsd.start(self.helpers, cfg, share, sock, self.vm_dir, wait)
                step = "launching cloud-hypervisor"
                self._proc = await VmmProcess.spawn(
                    "cloud-hypervisor",
                    self._vmm_argv(),
                    os.path.join(self.vm_dir, "cloud-hypervisor.out"),
                    log_paths=[os.path.join(self.vm_dir, "cloud-hypervisor.log")],
                )
                step = "waiting for the API socket"
                await self._wait_ready(deadline)
                api = self._client()
                if cfg.boot_from_template:
                    step = "restoring the template"
                    await api.restore(
                        "file://" + self._prepare_restore_dir(),
                        timeout=_left(deadline, self.snapshot_timeout),
                    )
                    step = "resuming the restored VM"
                    await api.call("PUT", "vm.resume", timeout=_left(deadline, self.api_timeout))
                else:
                    step = "vm.create"
                    await api.create(self.vm_config(), timeout=_left(deadline, self.api_timeout))
                    step = "vm.boot"
                    await api.boot(timeout=_left(deadline, self.api_timeout))
                step = "vm.info"
                info = await api.info(timeout=_left(deadline, self.api_timeout))
                if info["state"] != "Running":
                    raise HypervisorError(
                        f"clh: VM {self.id} is {info['state']} after boot, expected Running"
                    )
        except TimeoutError as e:
            await self._teardown()
            if isinstance(e, VMTimeoutError):
                raise
            raise VMTimeoutError(
                f"clh: VM {self.id} did not start within {timeout:g}s (stuck {step})"
            ) from e
        except BaseException:
            await self._teardown()
            raise
        self.transition(VMState.RUNNING, "start")

    async def _wait_ready(self, deadline: float) -> None:
        """Poll `vmm.ping` until it answers; `LaunchError` with the log tail if the VMM dies."""
        proc = self._proc
        assert proc is not None
        probe = ClhApi(self.api_socket, timeout=1.0)
        try:
            while True:
                if not proc.alive():
                    await proc.wait(1.0)
                    raise proc.launch_error("exited before its API socket answered")
                if os.path.exists(self.api_socket):
                    try:
                        await probe.ping(timeout=_left(deadline, 1.0))
                        return
                    except VMTimeoutError:
                        raise
                    except HypervisorError:
                        pass
                if time.monotonic() >= deadline:
                    raise VMTimeoutError(
                        f"clh: API socket {self.api_socket} did not answer vmm.ping in time"
                    )
                await asyncio.sleep(_READY_POLL)
        finally:
            await probe.close()

    def _prepare_restore_dir(self) -> str:
        """A private view of the template snapshot whose config names this VM's sockets.

        Every file of the snapshot is symlinked except `config.json`, which is rewritten so
        that clones of one template do not fight over the template's socket paths.
        """
        src = self._cfg().devices_state_path
        conf_path = os.path.join(src, "config.json")
        try:
            with open(conf_path, encoding="utf-8") as f:
                conf = json.load(f)
        except (OSError, ValueError) as e:
            raise AssetError(f"clh: template state {conf_path} is unreadable: {e}") from e
        dst = os.path.join(self.vm_dir, "restore")
        os.makedirs(dst, exist_ok=True)
        for name in os.listdir(src):
            if name != "config.json":
                os.symlink(os.path.join(src, name), os.path.join(dst, name))
        if isinstance(conf.get("serial"), dict) and conf["serial"].get("mode") == "Socket":
            conf["serial"]["socket"] = self.serial_socket
        if isinstance(conf.get("vsock"), dict) and self._cold.vsock is not None:
            conf["vsock"]["socket"] = self._cold.vsock.uds_path
        sockets = {s.id: virtiofsd.socket_path(self.vm_dir, s.id) for s in self._cold_shares}
        for fs in conf.get("fs") or []:
            if isinstance(fs, dict) and fs.get("id") in sockets:
                fs["socket"] = sockets[fs["id"]]
        with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
            json.dump(conf, f)
        return dst

    async def stop_sandbox(self) -> None:
        """`vmm.shutdown`, then SIGTERM, then SIGKILL; reap; stop virtiofsd; remove the VM dir."""
        if self.state in (VMState.NEW, VMState.STOPPED):
            return
        try:
            await self._teardown()
        finally:
            self.state = VMState.STOPPED

    async def _teardown(self) -> None:
        """Stop every process of this VM and remove its directory; safe to call twice."""
        proc = self._proc
        errors: list[BaseException] = []
        if proc is not None:
            if proc.alive() and os.path.exists(self.api_socket):
                with contextlib.suppress(HypervisorError, OSError):
                    await self._client().shutdown_vmm(timeout=min(2.0, self.stop_grace))
            try:
                if not await proc.wait(self.stop_grace):
                    await proc.stop(grace=self.stop_grace)
                else:
                    await proc.stop(grace=0)
            except HypervisorError as e:
                errors.append(e)
        try:
            await self.helpers.stop_all()
        except HypervisorError as e:
            errors.append(e)
        if self._api is not None:
            await self._api.close()
            self._api = None
        if not errors:
            self._proc = None
            if self.vm_dir:
                shutil.rmtree(self.vm_dir, ignore_errors=True)
        if errors:
            raise HypervisorError(f"clh: VM {self.id}: stop left processes behind: {errors[0]}")

    async def pause_sandbox(self) -> None:
        """`vm.pause`."""
        self.require(Capabilities.PAUSE, "pause")
        self.require_state("pause", VMState.RUNNING)
        await self._client().pause()
        self.transition(VMState.PAUSED, "pause")

    async def resume_sandbox(self) -> None:
        """`vm.resume`."""
        self.require(Capabilities.PAUSE, "resume")
        self.require_state("resume", VMState.PAUSED)
        await self._client().resume()
        self.transition(VMState.RUNNING, "resume")

    async def save_sandbox(self) -> None:
        """Pause (if running) and `vm.snapshot` into `devices_state_path`, for templates."""
        self.require(Capabilities.TEMPLATE, "save")
        self.require_state("save", VMState.RUNNING, VMState.PAUSED)
        dest = self._cfg().devices_state_path
        if not dest:
            raise ConfigError("clh: save needs devices_state_path (the snapshot directory)")
        if self.state == VMState.RUNNING:
            await self.pause_sandbox()
        os.makedirs(dest, exist_ok=True)
        await self._client().snapshot("file://" + dest, timeout=self.snapshot_timeout)

    # -- devices ---------------------------------------------------------------------------
    async def hotplug_add_device(self, device: Device) -> Any:
        """Hot-add a disk, NIC, virtio-fs share, VFIO device, vCPUs or memory."""
        self.require_state(f"hotplug {device.kind}", VMState.RUNNING)
        cfg = self._cfg()
        if isinstance(device, CPUDevice):
            _old, new = await self.resize_vcpus(self._vcpus() + device.amount)
            return new
        if isinstance(device, MemoryHotplug):
            current = cfg.memory_size + self.hotplugged_memory_mb
            _size, mdev = await self.resize_memory(current + device.size_mb, 0, device.probe)
            return mdev
        if (
            isinstance(device, BlockDrive | NetworkEndpoint | VFIODevice | SharedFS)
            and device.id in self._hotplugged
        ):
            raise ConfigError(f"clh: a device with id {device.id!r} is already hotplugged")
        if isinstance(device, BlockDrive):
            self.require(Capabilities.BLOCK_DEVICE_HOTPLUG, "block device hotplug")
            info = await self._client().add("disk", disk_config(device, cfg))
            device.pci_path = _pci_path(info)
            self._hotplugged[device.id] = "disk"
            return device
        if isinstance(device, NetworkEndpoint):
            self.require(Capabilities.NET_DEVICE_HOTPLUG, "network device hotplug")
            self._check_nic(device)
            info = await self._client().add("net", net_config(device, cfg))
            device.pci_path = _pci_path(info)
            self._hotplugged[device.id] = "net"
            return device
        if isinstance(device, VFIODevice):
            self.require(Capabilities.VFIO_HOTPLUG, "VFIO hotplug")
            info = await self._client().add("device", vfio_config(device, cfg))
            device.pci_path = _pci_path(info)
            self._hotplugged[device.id] = "vfio"
            return device
        if isinstance(device, SharedFS):
            self._check_share(device, "hotplug")
            sock = virtiofsd.socket_path(self.vm_dir, device.id)
            await virtiofsd.start(self.helpers, cfg, device, sock, self.vm_dir, self.daemon_timeout)
            try:
                share = FsShare(device.id, device.mount_tag, sock)
                await self._client().add("fs", fs_config(share))
            except BaseException:
                await self.helpers.stop(virtiofsd.key(device))
                raise
            self._hotplugged[device.id] = "fs"
            return device
        raise self.unsupported(f"hotplug of {device.kind}")

    async def hotplug_remove_device(self, device: Device) -> Any:
        """`vm.remove-device` (and stop the share's virtiofsd), or shrink vCPUs / memory."""
        self.require_state(f"hot-remove {device.kind}", VMState.RUNNING)
        cfg = self._cfg()
        if isinstance(device, CPUDevice):
            _old, new = await self.resize_vcpus(max(1, self._vcpus() - device.amount))
            return new
        if isinstance(device, MemoryHotplug):
            current = cfg.memory_size + self.hotplugged_memory_mb
            _size, mdev = await self.resize_memory(current - device.size_mb, 0, device.probe)
            return mdev
        caps = {
            BlockDrive: Capabilities.BLOCK_DEVICE_HOTPLUG,
            NetworkEndpoint: Capabilities.NET_DEVICE_HOTPLUG,
            VFIODevice: Capabilities.VFIO_HOTPLUG,
            SharedFS: Capabilities.FS_SHARING,
        }
        cap = caps.get(type(device))
        if cap is None or not isinstance(
            device, BlockDrive | NetworkEndpoint | VFIODevice | SharedFS
        ):
            raise self.unsupported(f"hot-remove of {device.kind}")
        self.require(cap, f"hot-remove of {device.kind}")
        await self._client().remove_device(device.id)
        self._hotplugged.pop(device.id, None)
        if isinstance(device, SharedFS):
            await self.helpers.stop(virtiofsd.key(device), grace=self.stop_grace)
        return device

    def _vcpus(self) -> int:
        return self._cfg().num_vcpus + self.hotplugged_vcpus

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """`vm.resize` with `desired_vcpus` (capped at max_vcpus); returns (old, new)."""
        self.require(Capabilities.CPU_HOTPLUG, "vCPU resize")
        self.require_state("resize vCPUs of", VMState.RUNNING)
        if vcpus < 1:
            raise ConfigError(f"clh: cannot resize VM {self.id} to {vcpus} vCPUs (minimum 1)")
        cfg = self._cfg()
        limit = max(cfg.default_max_vcpus, cfg.num_vcpus)
        if vcpus > limit:
            log.info("clh: VM %s: %d vCPUs requested, capped at max %d", self.id, vcpus, limit)
            vcpus = limit
        old = self._vcpus()
        if vcpus != old:
            await self._client().resize(vcpus=vcpus)
            self.hotplugged_vcpus = vcpus - cfg.num_vcpus
        return old, vcpus

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """`vm.resize` with `desired_ram`, rounded up to `block_size_mb` (128 MiB if 0).

        Returns the new size and a `MemoryDevice` whose `size_mb` is the change (negative when
        virtio-mem shrank the guest). ACPI hotplug cannot give memory back.
        """
        self.require(Capabilities.MEMORY_HOTPLUG, "memory resize")
        self.require_state("resize memory of", VMState.RUNNING)
        cfg = self._cfg()
        if mem_mb <= 0:
            raise ConfigError(f"clh: cannot resize VM {self.id} memory to {mem_mb} MiB")
        block = block_size_mb if block_size_mb > 0 else 128
        new = -(-mem_mb // block) * block
        maximum = cfg.memory_size + self._hotplug_mb
        if new > maximum:
            raise ConfigError(
                f"clh: VM {self.id}: {new} MiB exceeds the memory maximum of {maximum} MiB"
            )
        new = max(new, cfg.memory_size)
        current = cfg.memory_size + self.hotplugged_memory_mb
        if new < current and not cfg.virtio_mem:
            raise self.unsupported(
                "shrinking memory with ACPI hotplug", "enable virtio_mem to give memory back"
            )
        if new != current:
            await self._client().resize(ram_bytes=new * MIB)
            self.hotplugged_memory_mb = new - cfg.memory_size
            self._mem_slot += 1
        return new, MemoryDevice(slot=self._mem_slot, size_mb=new - current, probe=probe)

    # -- introspection ---------------------------------------------------------------------
    async def get_sandbox_console(self, sandbox_id: str) -> str:
        """The serial console's Unix socket."""
        if not self.serial_socket:
            raise StateError("clh: the VM has no console: call create_sandbox first")
        return self.serial_socket

    async def disconnect(self) -> None:
        """Close the API connection; the VM keeps running."""
        if self._api is not None:
            await self._api.close()
            self._api = None

    def capabilities(self) -> Capabilities:
        """What this driver implements for the configured VM."""
        caps = (
            Capabilities.BLOCK_DEVICE_HOTPLUG
            | Capabilities.NET_DEVICE_HOTPLUG
            | Capabilities.CPU_HOTPLUG
            | Capabilities.VFIO_HOTPLUG
            | Capabilities.PAUSE
            | Capabilities.TEMPLATE
            | Capabilities.HYBRID_VSOCK
            | Capabilities.MULTI_QUEUE
        )
        cfg = self._config
        if cfg is None or not cfg.disable_block_device_use:
            caps |= Capabilities.BLOCK_DEVICE
        else:
            caps &= ~Capabilities.BLOCK_DEVICE_HOTPLUG
        if cfg is None or cfg.shared_fs != "virtio-9p":
            caps |= Capabilities.FS_SHARING
        if cfg is None or self._hotplug_mb > 0:
            caps |= Capabilities.MEMORY_HOTPLUG
            if cfg is not None and cfg.virtio_mem:
                caps |= Capabilities.VIRTIO_MEM
        return caps

    def hypervisor_config(self) -> HypervisorConfig:
        """The validated config this VM was created with."""
        return self._cfg()

    async def get_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id, from the VMM's threads named `vcpu<N>`."""
        proc = self._proc
        if proc is None or not proc.alive():
            raise StateError(f"clh: VM {self.id or '<unnamed>'} has no running VMM")
        return vcpu_threads(proc.pid)

    async def cleanup(self) -> None:
        """Remove what a stopped VM left behind (its directory, the API connection)."""
        if self.state in (VMState.RUNNING, VMState.PAUSED):
            raise StateError(f"clh: cannot clean up VM {self.id}: it is {self.state.value}")
        await self._teardown()

    def get_pids(self) -> list[int]:
        """The cloud-hypervisor pid, then the virtiofsd pids."""
        pids = [self._proc.pid] if self._proc is not None else []
        return pids + self.helpers.pids(virtiofsd.KIND)

    async def check(self) -> None:
        """Raise unless the VMM process lives and its VM is Running or Paused."""
        proc = self._proc
        if proc is None:
            raise StateError(f"clh: VM {self.id or '<unnamed>'} is not started")
        if not proc.alive():
            raise VMExitedError(
                f"clh: VM {self.id}: cloud-hypervisor (pid {proc.pid}) is gone"
                + (f"\n--- log tail ---\n{proc.log_tail()}" if proc.log_tail() else "")
            )
        info = await self._client().info()
        if info["state"] not in ("Running", "Paused"):
            raise HypervisorError(f"clh: VM {self.id} is {info['state']}")

    def get_virt_drive_offset(self) -> int:
        """First virtio-blk index free for hotplug: 1 when the root image is a disk, else 0."""
        cfg = self._cfg()
        image_on_disk = bool(cfg.image_asset_path()) and cfg.disable_image_nvdimm
        cold = any(d.id == "rootimg" for d in self._cold.disks)
        return 1 if image_on_disk or cold else 0

    # -- persistence -----------------------------------------------------------------------
    def save(self) -> HypervisorState:
        """What another process needs to re-attach to this VM."""
        from ...persist import HotpluggedVCPU, HypervisorState

        cfg = self._cfg()
        proc = self._proc
        daemons = [
            DaemonRecord(
                id=h.key.removeprefix("fs-"), pid=h.pid, start_time=h.start_time, socket=h.socket
            )
            for h in self.helpers
        ]
        vsock = self._cold.vsock
        return HypervisorState(
            type=str(HypervisorType.CLH),
            id=self.id,
            vm_state=self.state,
            pid=proc.pid if proc else 0,
            pid_start_time=proc.start_time if proc else None,
            api_socket=self.api_socket,
            hotplugged_vcpus=[
                HotpluggedVCPU(id=str(cfg.num_vcpus + i)) for i in range(self.hotplugged_vcpus)
            ],
            hotplugged_memory=self.hotplugged_memory_mb,
            virtiofsd_pid=next(iter(self.helpers.pids(virtiofsd.KIND)), 0),
            vm_dir=self.vm_dir,
            console_socket=self.serial_socket,
            agent_socket=vsock.uds_path if vsock else "",
            config=cfg.to_dict(),
            driver=ClhState(
                binary=self.binary,
                virtiofsd=daemons,
                hotplugged=dict(self._hotplugged),
                hotplug_mb=self._hotplug_mb,
                shared_memory=self._shared_memory,
                vsock=VsockRecord(cid=vsock.context_id, port=vsock.port) if vsock else None,
                mem_slot=self._mem_slot,
            ),
        )

    def load(self, state: HypervisorState) -> None:
        """Adopt a VM saved by `save()` (possibly in another process); I/O re-attaches lazily."""
        from ...config import HypervisorConfig

        if state.type and state.type != str(HypervisorType.CLH):
            raise StateError(f"clh: cannot load state of a {state.type} VM")
        own = state.driver_state(ClhState)
        self._config = HypervisorConfig.from_dict(state.config)
        self.id = state.id
        self.state = state.vm_state
        self.binary = own.binary
        self.vm_dir = state.vm_dir
        self.api_socket = state.api_socket
        self.serial_socket = state.console_socket
        logs = [
            os.path.join(self.vm_dir, "cloud-hypervisor.out"),
            os.path.join(self.vm_dir, "cloud-hypervisor.log"),
        ]
        self._proc = (
            VmmProcess.attach("cloud-hypervisor", state.pid, state.pid_start_time, logs)
            if state.pid
            else None
        )
        self.helpers.load(
            [
                Helper(
                    kind=virtiofsd.KIND,
                    key=f"fs-{d.id}",
                    socket=d.socket,
                    log_path=virtiofsd.log_path(self.vm_dir, d.id),
                    pid=d.pid,
                    start_time=d.start_time,
                    leftovers=[d.socket, virtiofsd.pid_file(d.socket)],
                ).to_dict()
                for d in own.virtiofsd
            ]
        )
        self._hotplugged = dict(own.hotplugged)
        self._hotplug_mb = own.hotplug_mb
        self._shared_memory = own.shared_memory
        self._mem_slot = own.mem_slot
        self.hotplugged_vcpus = len(state.hotplugged_vcpus)
        self.hotplugged_memory_mb = state.hotplugged_memory
        vsock = own.vsock
        self._cold = VmDevices(
            vsock=HybridVSockDevice(state.agent_socket, vsock.cid, vsock.port)
            if vsock and state.agent_socket
            else None
        )
        self._api = None

    async def to_grpc(self) -> bytes:
        """The saved state as JSON bytes, for a VM cache handing this VM to another process."""
        return encode_state(self.save())

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Take over the VM described by `to_grpc()` bytes and check that it answers."""
        self.load(decode_state(data, "clh"))
        self._config = config
        await self.check()


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> thread id for the threads of `pid` whose name is `vcpu<N>`."""
    try:
        return threads_named(pid, _VCPU_COMM)
    except FileNotFoundError:
        return {}


def _pci_path(info: dict[str, Any] | None) -> str:
    if not info or not isinstance(info.get("bdf"), str):
        return ""
    return pci_path_from_bdf(str(info["bdf"]))


def _left(deadline: float, cap: float) -> float:
    """Seconds left before `deadline`, at most `cap`, and never less than a tick."""
    return max(0.05, min(cap, deadline - time.monotonic()))
