"""The Firecracker driver: one microVM per `firecracker` process (optionally under the jailer).

Start launches the process, waits for `GET /`, configures logger, metrics, machine, boot
source, drives (root image, cold-plugged disks, then a pool of empty placeholder drives that
"hotplug" later patches), network interfaces and the hybrid vsock, then `InstanceStart`.
Templates are Firecracker snapshots. Everything Firecracker cannot do raises
`UnsupportedError`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ... import host, persist
from ...devices import (
    VIRTIO_BLK_ID_BYTES,
    BlockDrive,
    Device,
    HybridVSockDevice,
    ImageDevice,
    NetworkEndpoint,
)
from ...errors import (
    ConfigError,
    HypervisorError,
    LaunchError,
    StateError,
    VMExitedError,
    VMTimeoutError,
)
from ...hypervisor import Hypervisor, VMState, register
from ...types import AGENT_VSOCK_PORT, Capabilities, HypervisorType, MemoryDevice, Socket, VSock
from ..handover import decode_state, encode_state
from ..vmm_process import VmmProcess, read_end, start_console_keeper, threads_named
from . import bodies
from .api import FirecrackerAPI, FirecrackerAPIError
from .argv import (
    JAIL_API_SOCKET,
    JailerSpec,
    check_vm_id,
    firecracker_argv,
    kernel_command_line,
    resource_id,
)
from .jail import VMRoot, cgroup_version, remove_cgroups
from .state import VSOCK_NAME, FirecrackerState, Slot

if TYPE_CHECKING:
    from ...config import HypervisorConfig
    from ...persist import HypervisorState

API_SOCKET = "fc.sock"
CONSOLE_LOG = "console.log"
FC_LOG = "firecracker.log"
METRICS = "metrics.json"
POOL_DIR = "drives"
DEFAULT_POOL_SIZE = 8
DEFAULT_RO_POOL_SIZE = 2
STOP_TIMEOUT = 3.0
KEEPER_GRACE = 1.0  # the console keeper exits once Firecracker has closed its stdout
API_TIMEOUT = 10.0
JAIL_USER = "nobody"
"""Who a jailed Firecracker runs as when hypervisor_params name no `runas` user."""
_VCPU_COMM = re.compile(r"^fc_vcpu (\d+)$")
# Fields the spec has that older Firecracker servers refuse as unknown.
_VSOCK_OVERRIDE_SINCE = (1, 16)
_NETWORK_OVERRIDES_SINCE = (1, 12)


@register(HypervisorType.FIRECRACKER)
class Firecracker(Hypervisor):
    """A Firecracker microVM."""

    #: Cap of console.log in bytes (then rotated to console.log.1); 0: no cap, Firecracker's
    #: stdout goes to console.log directly.
    console_log_max = 1 << 20

    def __init__(
        self,
        run_root: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        read_only_pool_size: int = DEFAULT_RO_POOL_SIZE,
    ) -> None:
        super().__init__(run_root)
        self.pool_size = pool_size
        self.read_only_pool_size = read_only_pool_size
        self._config: HypervisorConfig | None = None
        self.network_ns = ""
        self.vm_dir = ""
        self.root: VMRoot | None = None
        self.jailer: JailerSpec | None = None
        self.api: FirecrackerAPI | None = None
        self.api_socket = ""
        self.pid = 0
        self.pid_start_time: int | None = None
        self.argv: list[str] = []
        self.vmm_version = ""
        self._keeper: VmmProcess | None = None  # the console log keeper
        self._proc: VmmProcess | None = None
        self._image = ""
        self._cold_drives: list[BlockDrive] = []
        self._nets: list[NetworkEndpoint] = []
        self._vsock_cid = bodies.GUEST_CID
        self._vsock_name = VSOCK_NAME  # inside the VM root, relative
        self._vsock_link = ""  # a host path outside the root that links to the socket
        self._agent_port = AGENT_VSOCK_PORT
        self._slots: list[Slot] = []
        self._loaded_offset: int | None = None

    # -- paths -------------------------------------------------------------------------------
    def _cfg(self) -> HypervisorConfig:
        if self._config is None:
            raise StateError("firecracker: no config: call create_sandbox first")
        return self._config

    def _root(self) -> VMRoot:
        if self.root is None:
            raise StateError(f"firecracker VM {self.id or '<unnamed>'}: not created")
        return self.root

    @property
    def vsock_path(self) -> str:
        """Host path of the hybrid vsock Unix socket (`CONNECT <port>` multiplexer)."""
        return self._vsock_link or self._root().host(self._vsock_name)

    @property
    def console_path(self) -> str:
        """Firecracker's stdout and stderr, which carry the guest's serial console."""
        return os.path.join(self.vm_dir, CONSOLE_LOG)

    def generate_socket(self, id: str, use_vsock: bool) -> Socket | VSock:
        """The agent endpoint: a `Socket` whose `host_path` is the hybrid vsock UDS."""
        check_vm_id(id)
        if self.root is not None and self.id == id:
            path = self.vsock_path
        else:
            path = os.path.join(persist.vm_dir(id, self.run_root), VSOCK_NAME)
        return Socket("vsock", "hvsock", path, f"hybrid-vsock:{self._agent_port}")

    # -- create --------------------------------------------------------------------------------
    async def create_sandbox(
        self, id: str, network_ns: str | None, config: HypervisorConfig, stateful: bool = False
    ) -> None:
        if self.state != VMState.NEW:
            raise StateError(f"firecracker VM {self.id}: create_sandbox called twice")
        check_vm_id(id)
        config.validate()
        bodies.machine_config(config)  # vCPU/memory limits, early
        if network_ns and not os.path.isabs(network_ns):
            raise ConfigError(f"firecracker: network namespace must be a path, got {network_ns!r}")
        self.id = id
        self._config = config
        self.network_ns = network_ns or ""
        self.vm_dir = persist.vm_dir(id, self.run_root)
        self._binary()
        jailer_path = config.jailer_asset_path() if config.jailer_path else ""
        if jailer_path:
            jail_user = pwd.getpwnam(config.runas_user() or JAIL_USER)
            base = os.path.join(persist.run_root(self.run_root), "jail")
            self.jailer = JailerSpec(
                jailer=jailer_path,
                exec_file=self._binary(),
                chroot_base_dir=base,
                uid=jail_user.pw_uid,
                gid=jail_user.pw_gid,
                cgroup_version=cgroup_version(),
                netns=self.network_ns,
            )
            self.root = VMRoot(self.jailer.root(id), self.jailer.uid, self.jailer.gid, jailed=True)
            self.api_socket = host.build_socket_path(self.jailer.host_path(id, JAIL_API_SOCKET))
        else:
            self.root = VMRoot(self.vm_dir)
            self.api_socket = host.build_socket_path(self.vm_dir, API_SOCKET)
        host.build_socket_path(self.root.host(VSOCK_NAME))
        if config.image_path:
            self._image = config.image_asset_path()
        self.transition(VMState.CREATED, "create")

    def _binary(self) -> str:
        path = self._cfg().hypervisor_asset_path()
        if not path:
            raise ConfigError("firecracker: hypervisor_path is not set")
        if not os.access(path, os.X_OK):
            raise ConfigError(f"firecracker: hypervisor_path {path} is not an executable file")
        return path

    # -- start -------------------------------------------------------------------------------
    async def start_sandbox(self, timeout: float) -> None:
        if self.state != VMState.CREATED:
            raise StateError(
                f"cannot start firecracker VM {self.id or '<unnamed>'}: it is {self.state.value}"
            )
        deadline = time.monotonic() + timeout
        try:
            await self._launch(deadline)
            if self._cfg().boot_from_template:
                await self._load_template(deadline)
            else:
                await self._configure(deadline)
                await self._call("PUT", "/actions", bodies.action("InstanceStart"), deadline)
            self._link_vsock()
        except BaseException:
            await self._teardown()
            raise
        self.transition(VMState.RUNNING, "start")

    def _prepare_root(self) -> None:
        root = self._root()
        if self.jailer:
            # The jailer refuses nothing pre-created under <base>/firecracker/<id>/root.
            persist.ensure_dir(self.jailer.chroot_base_dir)
        persist.ensure_dir(self.vm_dir)
        root.create()
        root.touch(FC_LOG)
        root.touch(METRICS)
        self._slots = []
        for i in range(self.pool_size + self.read_only_pool_size):
            rel = f"{POOL_DIR}/pool_{i}"
            root.touch(rel)
            ro = i >= self.pool_size
            self._slots.append(Slot(drive_id=f"pool_{i}", placeholder=rel, read_only=ro))

    async def _launch(self, deadline: float) -> None:
        cfg = self._cfg()
        self._prepare_root()
        binary = self._binary()
        if self.jailer:
            argv = self.jailer.argv(self.id)
            cwd = self.vm_dir
        else:
            argv = firecracker_argv(binary, self.api_socket, self.id)
            if self.network_ns:
                nsenter = shutil.which("nsenter") or "nsenter"
                argv = [nsenter, f"--net={self.network_ns}", "--", *argv]
            cwd = self._root().path
        self.argv = argv
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.api_socket)
        out = await self._start_keeper()
        try:
            self._proc = await VmmProcess.spawn(
                "firecracker",
                argv,
                self.console_path,
                log_paths=self._log_paths(),
                cwd=cwd,
                stdout=out,
            )
        finally:
            if out is not None:
                os.close(out)  # Firecracker has its copy; the keeper sees EOF when it exits
        self.pid = self._proc.pid
        self.pid_start_time = self._proc.start_time
        self.api = FirecrackerAPI(self.api_socket, timeout=API_TIMEOUT)
        try:
            info = await self.api.wait_ready(deadline, self._raise_if_exited)
        except VMTimeoutError as e:
            raise VMTimeoutError(
                f"firecracker VM {self.id}: API not ready: {e}\n{self._log_tail()}".rstrip()
            ) from e
        self.vmm_version = str(info.get("vmm_version", ""))
        await self._call("PUT", "/logger", bodies.logger(FC_LOG, cfg.debug), deadline)
        await self._call("PUT", "/metrics", bodies.metrics(METRICS), deadline)

    async def _start_keeper(self) -> int | None:
        """Firecracker prints the guest console on its stdout: into a pipe whose keeper caps
        console.log. Returns the pipe's write end, or None (no cap)."""
        if self.console_log_max <= 0:
            return None

        async def spawn(argv: list[str], stdin: int) -> None:
            self._keeper = await VmmProcess.spawn("console keeper", argv, os.devnull, stdin=stdin)

        return await start_console_keeper(spawn, self.console_path, self.console_log_max)

    def _raise_if_exited(self) -> None:
        proc = self._proc
        if proc is not None and proc.is_child:
            if proc.exit_code is not None:
                raise LaunchError(
                    f"firecracker VM {self.id} exited during start-up",
                    exit_code=proc.exit_code,
                    argv=self.argv,
                    log_tail=self._log_tail(),
                )
        elif self.pid and not host.pid_is(self.pid, self.pid_start_time):
            raise VMExitedError(f"firecracker VM {self.id}: process {self.pid} is gone")

    def _log_paths(self) -> list[str]:
        """The VMM's stdout (the guest console) and, once its root exists, its own log."""
        paths = [self.console_path]
        if self.root is not None:
            paths.append(self.root.host(FC_LOG))
        return paths

    def _log_tail(self, lines: int = 20) -> str:
        out = []
        for path in self._log_paths():
            tail = (read_end(path, 8192) or "").splitlines()[-lines:]
            if tail:
                out.append(f"[{os.path.basename(path)}]\n" + "\n".join(tail))
        return "\n".join(out)

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, deadline: float | None = None
    ) -> Any:
        """One API request; a vanished process becomes `LaunchError`/`VMExitedError`."""
        if self.api is None:
            if not self.pid or not self.api_socket:
                raise StateError(f"firecracker VM {self.id or '<unnamed>'}: not running")
            self.api = FirecrackerAPI(self.api_socket, timeout=API_TIMEOUT)  # re-attach
        timeout = API_TIMEOUT
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise VMTimeoutError(f"firecracker VM {self.id}: timed out before {method} {path}")
        try:
            return await self.api.request(method, path, body, timeout=timeout)
        except (FirecrackerAPIError, VMTimeoutError) as e:
            if isinstance(e, FirecrackerAPIError) and e.status is not None:
                raise
            # A dropped connection usually means the process died: give it a moment to be
            # reaped, then report the exit (code, log tail) rather than the socket error.
            proc = self._proc
            if isinstance(e, FirecrackerAPIError) and proc is not None and proc.is_child:
                await proc.wait(1.0)
            self._raise_if_exited()
            raise

    async def _configure(self, deadline: float) -> None:
        cfg = self._cfg()
        root = self._root()
        await self._call("PUT", "/machine-config", bodies.machine_config(cfg), deadline)
        kernel, initrd = self._boot_files()
        boot_args = kernel_command_line(cfg.kernel_params)
        await self._call(
            "PUT", "/boot-source", bodies.boot_source(kernel, initrd, boot_args), deadline
        )
        cache = (
            "Writeback"
            if cfg.block_device_cache_set and not cfg.block_device_cache_noflush
            else "Unsafe"
        )
        if self._image:
            path = self._fc_file(self._image, "rootfs.img", shared=True)
            await self._put_drive("rootfs", path, read_only=True, cache=cache, deadline=deadline)
        for d in self._cold_drives:
            path = self._fc_file(d.path, f"{POOL_DIR}/cold_{resource_id(d.id)}", shared=True)
            await self._put_drive(d.id, path, read_only=d.read_only, cache=cache, deadline=deadline)
        for slot in self._slots:
            await self._put_drive(
                slot.drive_id,
                slot.placeholder,
                read_only=slot.read_only,
                cache=cache,
                deadline=deadline,
            )
        for n in self._nets:
            body = bodies.network_interface(n.id, n.tap_name, n.mac)
            await self._call("PUT", f"/network-interfaces/{body['iface_id']}", body, deadline)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root.host(self._vsock_name))
        body = bodies.vsock(self._vsock_name, self._vsock_cid)
        await self._call("PUT", "/vsock", body, deadline)

    async def _put_drive(
        self, drive_id: str, path: str, *, read_only: bool, cache: str, deadline: float
    ) -> None:
        body = bodies.drive(drive_id, path, read_only=read_only, cache_type=cache)
        await self._call("PUT", f"/drives/{body['drive_id']}", body, deadline)

    def _boot_files(self) -> tuple[str, str]:
        """Kernel (ELF vmlinux, extracted from a bzImage if need be) and initrd, as seen by
        Firecracker."""
        from ...guest.vmlinux import ensure_vmlinux

        cfg = self._cfg()
        kernel = ensure_vmlinux(cfg.kernel_asset_path())
        initrd = cfg.initrd_asset_path() if cfg.initrd_path else ""
        kernel = self._fc_file(kernel, "vmlinux", shared=False)
        if initrd:
            initrd = self._fc_file(initrd, "initrd.img", shared=False)
        return kernel, initrd

    def _fc_file(self, host_path: str, rel: str, *, shared: bool) -> str:
        """A host file as Firecracker must name it: inside the jail if jailed, else as is."""
        if not self.jailer:
            return host_path
        if not os.path.exists(host_path):
            raise ConfigError(f"firecracker: {host_path} does not exist")
        return self._root().bring(host_path, rel, shared=shared)

    # -- templates -----------------------------------------------------------------------------
    def _template_paths(self) -> tuple[str, str]:
        cfg = self._cfg()
        cfg.check_template_config()
        if not cfg.devices_state_path or not cfg.memory_path:
            raise ConfigError(
                "firecracker: templates need devices_state_path and memory_path to be set"
            )
        return cfg.devices_state_path, cfg.memory_path

    def _version_at_least(self, since: tuple[int, int]) -> bool:
        m = re.match(r"^v?(\d+)\.(\d+)", self.vmm_version)
        return m is not None and (int(m.group(1)), int(m.group(2))) >= since

    async def _load_template(self, deadline: float) -> None:
        state, mem = self._template_paths()
        for path, what in ((state, "devices_state_path"), (mem, "memory_path")):
            if not os.path.isfile(path):
                raise ConfigError(f"firecracker: template {what} {path} does not exist")
        if self._image:
            self._fc_file(self._image, "rootfs.img", shared=True)
        for d in self._cold_drives:
            self._fc_file(d.path, f"{POOL_DIR}/cold_{resource_id(d.id)}", shared=True)
        state = self._fc_file(state, "template.state", shared=False)
        mem = self._fc_file(mem, "template.mem", shared=True)
        overrides = [(n.id, n.tap_name) for n in self._nets]
        body = bodies.snapshot_load(
            state,
            mem,
            resume=True,
            network_overrides=overrides if self._version_at_least(_NETWORK_OVERRIDES_SINCE) else (),
        )
        # The vsock path in the snapshot is relative, so it resolves inside this VM's root;
        # name it explicitly where the server knows the field.
        if self._version_at_least(_VSOCK_OVERRIDE_SINCE):
            body["vsock_override"] = {"uds_path": self._vsock_name}
        await self._call("PUT", "/snapshot/load", body, deadline)

    async def save_sandbox(self) -> None:
        """Write the paused VM as a template: `PUT /snapshot/create` to devices_state_path and
        memory_path."""
        self._require(VMState.PAUSED, "save")
        state, mem = self._template_paths()
        for path in (state, mem):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if self.jailer:
            root = self._root()
            await self._call(
                "PUT",
                "/snapshot/create",
                bodies.snapshot_create("template.state.new", "template.mem.new"),
            )
            shutil.move(root.host("template.state.new"), state)
            shutil.move(root.host("template.mem.new"), mem)
        else:
            await self._call("PUT", "/snapshot/create", bodies.snapshot_create(state, mem))

    # -- pause / resume ------------------------------------------------------------------------
    def _require(self, state: VMState, operation: str) -> None:
        if self.state != state:
            raise StateError(
                f"cannot {operation} firecracker VM {self.id or '<unnamed>'}: "
                f"it is {self.state.value}"
            )

    async def pause_sandbox(self) -> None:
        self._require(VMState.RUNNING, "pause")
        await self._call("PATCH", "/vm", bodies.vm_state(paused=True))
        self.transition(VMState.PAUSED, "pause")

    async def resume_sandbox(self) -> None:
        self._require(VMState.PAUSED, "resume")
        await self._call("PATCH", "/vm", bodies.vm_state(paused=False))
        self.transition(VMState.RUNNING, "resume")

    # -- stop ----------------------------------------------------------------------------------
    async def stop_sandbox(self) -> None:
        """SIGTERM, wait, SIGKILL; reap; remove sockets, the VM directory and the jail."""
        await self._teardown()
        if self.state != VMState.NEW:
            self.state = VMState.STOPPED

    async def _teardown(self) -> None:
        if self.api is not None:
            await self.api.close()
            self.api = None
        await self._kill()
        await self.cleanup()

    async def _kill(self) -> None:
        """SIGTERM, wait, SIGKILL, wait: our child, or a VMM loaded from state (signalled only
        while it is still that process)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.stop(signal.SIGTERM, grace=STOP_TIMEOUT, kill_wait=STOP_TIMEOUT)
        self.pid = 0
        self.pid_start_time = None
        keeper, self._keeper = self._keeper, None
        if keeper is not None and not await keeper.wait(KEEPER_GRACE):  # exits at EOF
            await keeper.stop(signal.SIGTERM, grace=STOP_TIMEOUT, kill_wait=STOP_TIMEOUT)

    async def cleanup(self) -> None:
        """Remove the VM directory, the jail (the jailer never does) and its cgroups."""
        if self.pid and host.pid_is(self.pid, self.pid_start_time):
            return  # still running: stop_sandbox first
        if self.root is not None:
            if self.jailer:
                self.root.remove(self.jailer.jail_dir(self.id))
                if self.jailer.cgroups or self.jailer.parent_cgroup:
                    remove_cgroups(self.jailer.parent_cgroup or "firecracker", self.id)
            else:
                self.root.remove()
        if self._vsock_link and os.path.islink(self._vsock_link):
            with contextlib.suppress(OSError):
                os.unlink(self._vsock_link)
        if self.vm_dir:
            shutil.rmtree(self.vm_dir, ignore_errors=True)

    async def disconnect(self) -> None:
        if self.api is not None:
            await self.api.close()

    # -- devices -------------------------------------------------------------------------------
    async def add_device(self, device: Device) -> None:
        """Cold-plug before start: root image, disks, NICs (tap), the hybrid vsock."""
        self._require(VMState.CREATED, f"add {device.kind}")
        if isinstance(device, ImageDevice):
            self._image = device.path
        elif isinstance(device, BlockDrive):
            ids = {resource_id(d.id) for d in self._cold_drives} | {"rootfs"}
            rid = resource_id(device.id)
            if rid in ids or rid.startswith("pool_"):
                raise ConfigError(f"firecracker: drive id {device.id!r} ({rid}) is already used")
            self._cold_drives.append(device)
        elif isinstance(device, NetworkEndpoint):
            if device.fds:
                raise self.unsupported(
                    f"network interface {device.id} from open fds (macvtap)",
                    "firecracker opens a tap by name",
                )
            if device.queues > 1:
                raise self.unsupported(
                    f"{device.queues} queues on network interface {device.id}",
                    "firecracker's virtio-net has one queue pair",
                )
            rid = resource_id(device.id)
            if any(resource_id(n.id) == rid for n in self._nets):
                raise ConfigError(
                    f"firecracker: interface id {device.id!r} ({rid}) is already used"
                )
            self._nets.append(device)
        elif isinstance(device, HybridVSockDevice):
            self._set_vsock(device)
        else:
            raise self.unsupported(f"cold-plug of {device.kind}")

    def _set_vsock(self, device: HybridVSockDevice) -> None:
        """Firecracker binds the socket inside the VM root under the requested file name; a
        path elsewhere (e.g. outside the jail) becomes a symlink to it."""
        path = os.path.abspath(device.uds_path)
        name = os.path.basename(path)
        root = self._root()
        if not name or name in (API_SOCKET, CONSOLE_LOG, FC_LOG, METRICS, POOL_DIR):
            raise ConfigError(f"firecracker: hybrid vsock uds_path {path} clashes with VM files")
        host.build_socket_path(root.host(name))
        self._vsock_name = name
        self._vsock_link = "" if os.path.dirname(path) == root.path else path
        self._vsock_cid = device.context_id
        self._agent_port = device.port

    def _link_vsock(self) -> None:
        if not self._vsock_link:
            return
        os.makedirs(os.path.dirname(self._vsock_link), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._vsock_link)
        os.symlink(self._root().host(self._vsock_name), self._vsock_link)

    def block_serial(self, drive: BlockDrive) -> str:
        """Firecracker takes no serial: the guest reads the id it derives from the disk
        file, `<st_dev><st_rdev><st_ino>` cut to 20 bytes (as kvmtool does). The file it
        opens is `drive.path` itself (a jail gets a hard link or bind mount of it)."""
        try:
            st = os.stat(drive.path)
        except OSError as e:
            raise ConfigError(
                f"firecracker: drive {drive.id}: {drive.path}: {e.strerror or e}"
            ) from e
        return f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:VIRTIO_BLK_ID_BYTES]

    def get_virt_drive_offset(self) -> int:
        """Drives before the hotplug pool: the root image and cold-plugged disks."""
        if self._loaded_offset is not None:
            return self._loaded_offset
        return (1 if self._image else 0) + len(self._cold_drives)

    async def hotplug_add_device(self, device: Device) -> Any:
        """Attach a disk by patching a free placeholder drive; returns the drive with `index`."""
        if not isinstance(device, BlockDrive):
            raise self.unsupported(f"hotplug of {device.kind}")
        self._require_live(f"hotplug {device.id}")
        if any(s.device_id == device.id for s in self._slots):
            raise ConfigError(f"firecracker: drive {device.id!r} is already attached")
        free = [
            i
            for i, s in enumerate(self._slots)
            if not s.device_id and s.read_only == device.read_only
        ]
        if not free:
            kind = "read-only" if device.read_only else "read-write"
            total = sum(1 for s in self._slots if s.read_only == device.read_only)
            raise HypervisorError(
                f"firecracker VM {self.id}: all {total} {kind} hotplug drive slots are in use"
            )
        i = free[0]
        slot = self._slots[i]
        if not os.path.exists(device.path):
            raise ConfigError(f"firecracker: drive {device.id}: {device.path} does not exist")
        path = self._fc_file(device.path, f"{POOL_DIR}/disk_{i}", shared=True)
        try:
            await self._call(
                "PATCH", f"/drives/{slot.drive_id}", bodies.drive_patch(slot.drive_id, path)
            )
        except BaseException:
            if self.jailer:
                self._root().release(path)
            raise
        slot.device_id, slot.attached = device.id, path
        device.index = self.get_virt_drive_offset() + i
        return device

    async def hotplug_remove_device(self, device: Device) -> Any:
        """Detach a disk: patch its slot back to the empty placeholder file."""
        if not isinstance(device, BlockDrive):
            raise self.unsupported(f"hot-remove of {device.kind}")
        self._require_live(f"hot-remove {device.id}")
        for slot in self._slots:
            if slot.device_id == device.id:
                body = bodies.drive_patch(slot.drive_id, slot.placeholder)
                await self._call("PATCH", f"/drives/{slot.drive_id}", body)
                if self.jailer and slot.attached:
                    self._root().release(slot.attached)
                slot.device_id = slot.attached = ""
                device.index = -1
                return device
        raise ConfigError(f"firecracker VM {self.id}: drive {device.id!r} is not hotplugged")

    def _require_live(self, operation: str) -> None:
        if self.state not in (VMState.RUNNING, VMState.PAUSED):
            raise StateError(
                f"cannot {operation} on firecracker VM {self.id or '<unnamed>'}: "
                f"it is {self.state.value}"
            )

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        raise self.unsupported("memory hotplug")

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        raise self.unsupported("vCPU hotplug")

    # -- introspection -------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        caps = Capabilities.PAUSE | Capabilities.TEMPLATE | Capabilities.HYBRID_VSOCK
        if self._config is None or not self._config.disable_block_device_use:
            caps |= Capabilities.BLOCK_DEVICE | Capabilities.BLOCK_DEVICE_HOTPLUG
        return caps

    def hypervisor_config(self) -> HypervisorConfig:
        return self._cfg()

    async def get_sandbox_console(self, sandbox_id: str) -> str:
        """Firecracker prints the guest serial console on its stdout: this log file."""
        return self.console_path

    async def get_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id, from the tasks named `fc_vcpu N`."""
        if not self.pid:
            raise StateError(f"firecracker VM {self.id or '<unnamed>'}: not running")
        return vcpu_threads(self.pid)

    def get_pids(self) -> list[int]:
        """Firecracker first, then its console log keeper."""
        keeper = [self._keeper.pid] if self._keeper is not None else []
        return ([self.pid] if self.pid else []) + keeper

    async def check(self) -> None:
        """Healthy when the process is alive and `GET /` says Running or Paused."""
        proc = self._proc
        if proc is not None and proc.is_child and proc.exit_code is not None:
            raise VMExitedError(
                f"firecracker VM {self.id}: process {proc.pid} exited with code "
                f"{proc.exit_code}\n{self._log_tail()}".rstrip()
            )
        if not self.pid or not host.pid_is(self.pid, self.pid_start_time):
            raise VMExitedError(f"firecracker VM {self.id or '<unnamed>'}: process is not running")
        if self.api is None:
            self.api = FirecrackerAPI(self.api_socket, timeout=API_TIMEOUT)
        info = await self.api.describe(timeout=2.0)
        if info.get("state") not in ("Running", "Paused"):
            raise HypervisorError(f"firecracker VM {self.id}: state is {info.get('state')!r}")

    # -- persistence ---------------------------------------------------------------------------
    def save(self) -> HypervisorState:
        from ...persist import HypervisorState

        keeper = self._keeper
        own = FirecrackerState(
            network_ns=self.network_ns,
            root=self.root.path if self.root else "",
            mounts=list(self.root.mounts) if self.root else [],
            image=self._image,
            drive_offset=self.get_virt_drive_offset(),
            vsock_cid=self._vsock_cid,
            vsock_name=self._vsock_name,
            vsock_link=self._vsock_link,
            agent_port=self._agent_port,
            vmm_version=self.vmm_version,
            slots=[replace(s) for s in self._slots],
            jailer=replace(self.jailer) if self.jailer else None,
            console_keeper=(keeper.pid, keeper.start_time) if keeper is not None else None,
        )
        return HypervisorState(
            type=str(HypervisorType.FIRECRACKER),
            id=self.id,
            vm_state=self.state,
            pid=self.pid,
            pid_start_time=self.pid_start_time,
            api_socket=self.api_socket,
            block_index_map=[
                self.get_virt_drive_offset() + i for i, s in enumerate(self._slots) if s.device_id
            ],
            vm_dir=self.vm_dir,
            console_socket=self.console_path if self.vm_dir else "",
            agent_socket=self.vsock_path if self.root else "",
            config=self._config.to_dict() if self._config else {},
            driver=own,
        )

    def load(self, state: HypervisorState) -> None:
        from ...config import HypervisorConfig

        if state.type and state.type != str(HypervisorType.FIRECRACKER):
            raise StateError(f"firecracker: cannot load state of a {state.type} VM")
        own = state.driver_state(FirecrackerState)
        self.id = state.id
        self._config = HypervisorConfig.from_dict(state.config) if state.config else None
        self.pid = state.pid
        self.pid_start_time = state.pid_start_time
        self.api_socket = state.api_socket
        self.vm_dir = state.vm_dir
        self.network_ns = own.network_ns
        self.vmm_version = own.vmm_version
        self._image = own.image
        self._vsock_cid = own.vsock_cid
        self._vsock_name = own.vsock_name
        self._vsock_link = own.vsock_link
        self._agent_port = own.agent_port
        self._slots = [replace(s) for s in own.slots]
        self._loaded_offset = own.drive_offset
        self.jailer = replace(own.jailer) if own.jailer else None
        root_path = own.root or self.vm_dir
        if self.jailer:
            self.root = VMRoot(root_path, self.jailer.uid, self.jailer.gid, jailed=True)
        else:
            self.root = VMRoot(root_path)
        self.root.mounts = list(own.mounts)
        self._proc = (
            VmmProcess.attach("firecracker", self.pid, self.pid_start_time, self._log_paths())
            if self.pid
            else None
        )
        keeper = own.console_keeper
        self._keeper = VmmProcess.attach("console keeper", *keeper) if keeper else None
        self.api = None
        self.state = state.vm_state
        if self.state in (VMState.RUNNING, VMState.PAUSED) and not host.pid_is(
            self.pid, self.pid_start_time
        ):
            self.state = VMState.STOPPED

    async def to_grpc(self) -> bytes:
        """The persisted state as JSON: enough for another process to take the VM over."""
        return encode_state(self.save())

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        self.load(decode_state(data, "firecracker"))
        self._config = config


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> thread id of the tasks of `pid` named `fc_vcpu N`."""
    try:
        return threads_named(pid, _VCPU_COMM)
    except OSError as e:
        raise VMExitedError(f"firecracker process {pid}: /proc/{pid}/task: {e.strerror}") from e
