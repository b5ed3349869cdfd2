"""`QemuHypervisor`: the `Hypervisor` implementation for QEMU (lifecycle, QMP, state).

Hotplug lives in `hotplug.py`; the command line in `argv.py`; the process in `process.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import time
import uuid as uuidlib
from collections.abc import Awaitable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ... import host, persist
from ...devices import (
    BlockDrive,
    Device,
    ImageDevice,
    NetworkEndpoint,
    SerialPort,
    SharedFS,
    UserNetwork,
    VSockDevice,
    check_id,
)
from ...errors import (
    AssetError,
    ConfigError,
    HypervisorError,
    LaunchError,
    StateError,
    VMExitedError,
    VMTimeoutError,
)
from ...hypervisor import Hypervisor, VMState, check_transition, register
from ...types import Capabilities, HypervisorType, MemoryDevice
from .. import virtiofsd
from ..handover import decode_state, encode_state
from ..helpers import Helper, Helpers
from ..vmm_process import VmmProcess, log_tail, start_console_keeper
from . import argv as qargv
from .hotplug import IMPLEMENTED as HOTPLUG_IMPLEMENTED
from .hotplug import Hotplug
from .qmp import QMP, QMPDisconnectedError
from .state import HelperRecord, QemuState

if TYPE_CHECKING:
    from ...config import HypervisorConfig

log = logging.getLogger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"
QMP_ATTACH_TIMEOUT = 5.0
CONSOLE_KEEPER = "console-log"  # the helper kind (and key) of the console log keeper
QUIT_TIMEOUT = 3.0
TERM_TIMEOUT = 3.0
KILL_TIMEOUT = 5.0
EXIT_REPORT_TIMEOUT = 5.0
HANGUP_GRACE = 1.0
MIGRATION_TIMEOUT = 60.0
MIGRATION_FD = "migration"
"""The name QEMU knows the device-state file under (`getfd`, then `migrate fd:...`)."""
BAD_STATUSES = ("guest-panicked", "internal-error", "io-error", "shutdown")

_BASE_CAPS = Capabilities.BLOCK_DEVICE | Capabilities.MULTI_QUEUE
_BASE_CAPS |= Capabilities.PAUSE | Capabilities.VSOCK
_HOTPLUG_CAPS = (
    Capabilities.BLOCK_DEVICE_HOTPLUG
    | Capabilities.NET_DEVICE_HOTPLUG
    | Capabilities.CPU_HOTPLUG
    | Capabilities.MEMORY_HOTPLUG
    | Capabilities.VIRTIO_MEM
    | Capabilities.VFIO_HOTPLUG
    | Capabilities.VHOST_USER_HOTPLUG
)
#: What each machine type can do, as shown on real QEMU (tests/integration: q35 everywhere;
#: pc: disk, vCPU and pc-dimm hotplug in test_sandbox; microvm: boot and agent, with no
#: shared filesystem tested); hotplug flags are further limited by hotplug.py.
MACHINE_CAPS: dict[str, Capabilities] = {
    "q35": _BASE_CAPS | Capabilities.FS_SHARING | Capabilities.TEMPLATE | _HOTPLUG_CAPS,
    "pc": _BASE_CAPS
    | Capabilities.FS_SHARING
    | Capabilities.TEMPLATE
    | Capabilities.BLOCK_DEVICE_HOTPLUG
    | Capabilities.CPU_HOTPLUG
    | Capabilities.MEMORY_HOTPLUG,
    "microvm": _BASE_CAPS,
}


def machine_capabilities(machine: str) -> Capabilities:
    """Capabilities of a QEMU machine type, counting only the hotplug that is implemented."""
    caps = MACHINE_CAPS[machine]
    return (caps & ~_HOTPLUG_CAPS) | (caps & _HOTPLUG_CAPS & HOTPLUG_IMPLEMENTED)


@register(HypervisorType.QEMU)
class QemuHypervisor(Hypervisor):
    """One QEMU VM."""

    #: Guest console: "ttyS0" (built-in UART: the kernel's messages from the first line, and
    #: QEMU logs it to console.log with or without a client) or "hvc0" (virtconsole: the
    #: guest drops output while no host client is connected, so console.log stays empty).
    console = "ttyS0"
    #: Cap of console.log in bytes (then it is rotated to console.log.1); 0: no cap, QEMU
    #: writes console.log itself.
    console_log_max = 1 << 20

    def __init__(self, run_root: str | None = None) -> None:
        super().__init__(run_root)
        self.config: HypervisorConfig | None = None
        self.paths: qargv.VMPaths | None = None
        self.uuid = ""
        self.network_ns: str | None = None
        self.stateful = False
        self.accel = ""
        self.qemu_path = ""
        self.kernel = ""
        self.initrd = ""
        self.image = ""
        self.devices: list[Device] = []
        self.argv: list[str] = []
        self.agent_socket = ""
        #: Helper processes: virtiofsd and qemu-storage-daemon for devices, the console keeper.
        self.helpers = Helpers()
        self.hotplug = Hotplug(self, self.helpers, self._execute, self._attach)
        self._proc: VmmProcess | None = None
        self._pid = 0
        self._pid_start: int | None = None
        self._qmp: QMP | None = None
        self._owned_fds: list[int] = []
        #: A clone's: what must be done before the incoming migration, which reads guest
        #: memory (its copy being filled while QEMU starts: see factory.template).
        self.memory_ready: Awaitable[None] | None = None

    # -- create / start ----------------------------------------------------------------------
    async def create_sandbox(
        self, id: str, network_ns: str | None, config: HypervisorConfig, stateful: bool = False
    ) -> None:
        check_transition(self.state, VMState.CREATED, "create", id)
        check_id("sandbox", id)  # it names the VM directory and QEMU's -name option
        config.validate()
        qargv.machine_type(config)  # refuse unknown machine types early
        qemu = self._resolve_qemu(config)
        kernel = _existing_asset("kernel", config.kernel_asset_path())
        initrd = config.initrd_asset_path()
        if initrd:
            _existing_asset("initrd", initrd)
        image = config.image_asset_path()
        if image:
            _existing_asset("image", image)
        if config.boot_from_template:
            _existing_asset("devices_state_path", config.devices_state_path)
            _existing_asset("memory_path", config.memory_path)
        for name, path in (("kernel_path", kernel), ("initrd_path", initrd), ("image_path", image)):
            qargv.check_path(name, path)
        if network_ns and not os.path.exists(network_ns):
            raise ConfigError(f"network namespace {network_ns} does not exist")

        self.id = id
        self.config = config
        self.network_ns = network_ns
        self.stateful = stateful
        self.qemu_path = qemu
        self.kernel, self.initrd, self.image = kernel, initrd, image
        self.uuid = str(uuidlib.uuid4())
        self.accel = "kvm" if host.kvm_usable() else "tcg"
        if self.accel == "tcg":
            log.info("sandbox %s: KVM is not usable on this host; QEMU uses TCG (emulation)", id)
        self.paths = qargv.VMPaths(persist.vm_dir(id, self.run_root))
        for sock in (self.paths.qmp_socket, self.paths.console_socket):
            host.build_socket_path(sock)
        if host.socket_listening(self.paths.qmp_socket):
            raise StateError(f"sandbox {id}: a running VM already uses {self.paths.vm_dir}")
        persist.ensure_dir(os.path.dirname(self.paths.vm_dir))  # 0700, whatever the umask
        os.makedirs(self.paths.vm_dir, mode=0o700, exist_ok=True)
        try:
            os.chmod(self.paths.vm_dir, 0o700)
            spec = self._spec()
            qargv.build(spec)  # a config QEMU cannot take fails here, not at start
        except BaseException:
            shutil.rmtree(self.paths.vm_dir, ignore_errors=True)
            raise
        self.hotplug.bridges = [
            persist.Bridge(id=i, type="pcie-root-port") for i in qargv.root_port_ids(spec)
        ] + [persist.Bridge(id=i, type="pci-bridge") for i in qargv.bridge_ids(spec)]
        self.state = VMState.CREATED

    def _resolve_qemu(self, config: HypervisorConfig) -> str:
        path = config.hypervisor_asset_path() or shutil.which(DEFAULT_QEMU) or ""
        if not path:
            raise AssetError(f"QEMU binary {DEFAULT_QEMU} not found in PATH; set hypervisor_path")
        if not os.path.isfile(path):
            raise AssetError(f"QEMU binary {path} does not exist")
        if not os.access(path, os.X_OK):
            raise AssetError(f"QEMU binary {path} is not executable")
        return path

    def _spec(
        self, qmp_fd: int | None = None, console_log_fd: int | None = None
    ) -> qargv.LaunchSpec:
        assert self.config is not None and self.paths is not None
        image_size = 0
        if self.image:
            try:
                image_size = os.path.getsize(self.image)
            except OSError as exc:
                raise AssetError(f"image {self.image}: {exc.strerror}") from exc
        return qargv.LaunchSpec(
            config=self.config,
            name=self.id,
            uuid=self.uuid,
            paths=self.paths,
            qemu=self.qemu_path,
            kernel=self.kernel,
            initrd=self.initrd,
            image=self.image,
            image_size=image_size,
            accel=self.accel or "tcg",
            qmp_fd=qmp_fd,
            host_memory_mib=host.host_memory_kib() // 1024,
            host_cpus=os.cpu_count() or 1,
            nested=host.running_on_vmm(),
            devices=list(self.devices),
            console=self.console,
            host_tsc_khz=host.tsc_khz(),
            console_log_fd=console_log_fd,
        )

    def build_launch(
        self, qmp_fd: int | None = None, console_log_fd: int | None = None
    ) -> qargv.Launch:
        """The command line `start_sandbox` will run (for inspection and benchmarks)."""
        self._require_config("build the command line")
        return qargv.build(self._spec(qmp_fd, console_log_fd))

    async def start_sandbox(self, timeout: float) -> None:
        check_transition(self.state, VMState.RUNNING, "start", self.id)
        assert self.config is not None and self.paths is not None
        deadline = time.monotonic() + timeout
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._start_virtiofsd(max(0.1, deadline - time.monotonic()))
            log_fd = await self._start_console_log()
            launch = self.build_launch(qmp_fd=theirs.fileno(), console_log_fd=log_fd)
            self.argv = launch.argv
            self._proc = await VmmProcess.spawn(
                "qemu",
                launch.argv,
                self.paths.qemu_log,
                pass_fds=launch.pass_fds,
                cwd=self.paths.vm_dir,
                netns=self.network_ns,
            )
        except BaseException:
            ours.close()
            await self.helpers.stop_all()
            await self._release(remove_dir=True)
            self.state = VMState.STOPPED
            raise
        finally:
            theirs.close()
        self._pid, self._pid_start = self._proc.pid, self._proc.start_time
        self._close_owned_fds()  # QEMU holds its own copies now
        qmp = QMP(f"{self.id}")
        try:
            await qmp.connect(ours, timeout=max(0.0, deadline - time.monotonic()))
            self._qmp = qmp
            if self.config.boot_from_template:
                await self._incoming_migration(max(0.1, deadline - time.monotonic()))
        except QMPDisconnectedError:
            await self._fail_launch("QEMU exited during start-up")
        except VMTimeoutError:
            tail = self._console_tail()
            await self._teardown()
            raise VMTimeoutError(
                f"sandbox {self.id}: QEMU did not become ready within {timeout:g}s"
                + (f"\n--- console tail ---\n{tail}" if tail else "")
            ) from None
        except BaseException:
            await self._teardown()
            raise
        self.state = VMState.RUNNING

    async def _start_virtiofsd(self, timeout: float) -> None:
        """One virtiofsd per cold-plugged virtio-fs share, on a socket listening before QEMU
        connects (QEMU need not wait for virtiofsd's start-up: see `start_listening`)."""
        assert self.config is not None and self.paths is not None
        for dev in self.devices:
            if isinstance(dev, SharedFS) and dev.fs_type == "virtio-fs":
                sock = self.paths.virtiofsd_socket(dev.id)
                vm_dir = self.paths.vm_dir
                await virtiofsd.start_listening(self.helpers, self.config, dev, sock, vm_dir)

    async def _start_console_log(self) -> int | None:
        """QEMU writes the console log into a pipe (`logfile=/dev/fdset/N`) whose keeper caps
        console.log (see console_keeper): the pipe's write end, or None (no cap)."""
        assert self.paths is not None
        if self.console_log_max <= 0:
            return None
        log_path = self.paths.qemu_log

        def spawn(argv: list[str], stdin: int) -> Awaitable[Helper]:
            return self.helpers.start(
                CONSOLE_KEEPER,
                CONSOLE_KEEPER,
                argv,
                socket="",
                log_path=log_path,
                timeout=0,
                stdin=stdin,
            )

        fd = await start_console_keeper(spawn, self.paths.console_log, self.console_log_max)
        self._owned_fds.append(fd)
        return fd

    async def _fail_launch(self, message: str) -> None:
        assert self._proc is not None
        proc = self._proc
        await proc.wait(EXIT_REPORT_TIMEOUT)
        code = proc.exit_code
        tail = proc.log_tail()
        console = self._console_tail()
        if console:
            tail += f"\n--- console tail ---\n{console}"
        for helper in self.helpers.dead():
            tail += f"\n--- {helper.kind} for {helper.key} exited: log tail ---\n"
            tail += log_tail(helper.log_path)
        argv = proc.argv
        await self._teardown()
        raise LaunchError(
            f"sandbox {self.id}: {message}" + ("" if code is not None else " (still running)"),
            exit_code=code,
            argv=argv,
            log_tail=tail,
        )

    async def _incoming_migration(self, timeout: float) -> None:
        assert self.config is not None
        qmp = self._require_qmp()
        await qmp.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "x-ignore-shared", "state": True},
                    {"capability": "events", "state": True},
                ]
            },
        )
        await _pass_file(qmp, self.config.devices_state_path, os.O_RDONLY)
        if self.memory_ready is not None:
            await self.memory_ready
        with qmp.events("MIGRATION") as events:
            await qmp.execute("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})
            await self._wait_migration(events, timeout)
        await qmp.execute("cont")

    async def _wait_migration(self, events: Any, timeout: float) -> None:
        event = await events.wait(
            lambda e: e["data"]["status"] in ("completed", "failed", "cancelled"),
            timeout=timeout,
            what="(migration end)",
        )
        status = event["data"]["status"]
        if status != "completed":
            detail = ""
            with contextlib.suppress(HypervisorError):
                info = await self._require_qmp().execute("query-migrate")
                detail = f": {info.get('error-desc', '')}"
            raise HypervisorError(f"sandbox {self.id}: migration {status}{detail}")

    # -- stop / cleanup ----------------------------------------------------------------------
    async def stop_sandbox(self) -> None:
        if self.state in (VMState.STOPPED, VMState.NEW):
            self.state = VMState.STOPPED
            await self._release(remove_dir=self.paths is not None)
            return
        proc = self._process()
        if proc is not None and proc.alive():
            try:
                qmp = await self._attach_or_none()
            except VMTimeoutError:
                # Hung, or another client holds the QMP socket: no graceful quit, but stop.
                log.warning("sandbox %s: QMP does not answer; terminating QEMU", self.id)
                qmp = None
            if qmp is not None:
                with contextlib.suppress(HypervisorError):
                    await qmp.execute("quit", timeout=QUIT_TIMEOUT)
                    await proc.wait(QUIT_TIMEOUT)
            await proc.stop(signal.SIGTERM, TERM_TIMEOUT, KILL_TIMEOUT)
        await self._teardown()

    async def _teardown(self) -> None:
        """Kill whatever is left, reap, and remove every file of this VM."""
        proc = self._proc
        if proc is not None and proc.alive():
            await proc.stop(signal.SIGTERM, 0.5, KILL_TIMEOUT)
        await self.helpers.stop_all(grace=HANGUP_GRACE)  # virtiofsd exits once QEMU is gone
        await self._release(remove_dir=True)
        self._pid, self._pid_start = 0, None
        self.state = VMState.STOPPED

    async def _release(self, *, remove_dir: bool) -> None:
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            self._proc.close()
            self._proc = None
        self._close_owned_fds()
        if remove_dir and self.paths is not None:
            shutil.rmtree(self.paths.vm_dir, ignore_errors=True)

    def _close_owned_fds(self) -> None:
        for fd in self._owned_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned_fds.clear()

    async def cleanup(self) -> None:
        proc = self._process()
        running = proc is not None and proc.alive()
        await self._release(remove_dir=not running)

    async def disconnect(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self._proc is not None and not self._proc.is_child:
            self._proc.close()  # adopted again on the next call
            self._proc = None

    # -- pause / resume / save ---------------------------------------------------------------
    async def pause_sandbox(self) -> None:
        check_transition(self.state, VMState.PAUSED, "pause", self.id)
        await self._execute("stop")
        self.state = VMState.PAUSED

    async def resume_sandbox(self) -> None:
        check_transition(self.state, VMState.RUNNING, "resume", self.id)
        await self._execute("cont")
        self.state = VMState.RUNNING

    async def save_sandbox(self) -> None:
        cfg = self._require_config("save")
        if self.state not in (VMState.RUNNING, VMState.PAUSED):
            raise StateError(f"cannot save VM {self.id}: it is {self.state.value}")
        if not cfg.devices_state_path:
            raise ConfigError(f"sandbox {self.id}: devices_state_path is needed to save a template")
        qmp = await self._attach()
        await self._execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "x-ignore-shared", "state": True},
                    {"capability": "events", "state": True},
                ]
            },
        )
        await _pass_file(qmp, cfg.devices_state_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        with qmp.events("MIGRATION") as events:
            await self._execute("migrate", {"uri": f"fd:{MIGRATION_FD}"})
            await self._wait_migration(events, MIGRATION_TIMEOUT)

    # -- devices -----------------------------------------------------------------------------
    async def add_device(self, device: Device) -> None:
        if self.state != VMState.CREATED:
            raise StateError(
                f"cannot cold-plug {device.kind} into VM {self.id or '<unnamed>'}: it is "
                f"{self.state.value} (use hotplug_add_device on a running VM)"
            )
        if isinstance(device, ImageDevice):
            _existing_asset("image", device.path)
            if self.image and self.image != device.path:
                raise ConfigError(f"sandbox {self.id} already has the image {self.image}")
            self.image = device.path
            return
        if isinstance(device, SharedFS) and device.fs_type == "virtio-fs":
            virtiofsd.daemon_path(self._require_config("cold-plug a virtio-fs share"), "qemu")
        if isinstance(device, BlockDrive):
            self._assign_block_slot(device)
        if not isinstance(
            device,
            (SerialPort, VSockDevice, BlockDrive, NetworkEndpoint, UserNetwork, SharedFS),
        ):
            raise self.unsupported(f"cold-plugging {device.kind}")
        if isinstance(device, SerialPort):
            host.build_socket_path(device.socket.host_path)
        if isinstance(device, VSockDevice):
            self._owned_fds.append(device.vsock.vhost_fd)
        if isinstance(device, NetworkEndpoint):
            self._owned_fds.extend(device.fds)
        self.devices.append(device)
        # Render now so a bad device fails here rather than at start.
        qargv.build(self._spec())

    def _assign_block_slot(self, drive: BlockDrive) -> None:
        assert self.config is not None
        driver = drive.driver or self.config.block_device_driver
        if driver == "virtio-scsi":
            used = {d.scsi_addr for d in self.devices if isinstance(d, BlockDrive)}
            n = 0
            while f"{n}:0" in used:
                n += 1
            drive.scsi_addr = drive.scsi_addr or f"{n}:0"
        if drive.index < 0:
            drive.index = self.get_virt_drive_offset() + len(self.hotplug.block_indexes)
        self.hotplug.block_indexes.append(drive.index)

    async def hotplug_add_device(self, device: Device) -> Any:
        self._require_running("hotplug a device")
        return await self.hotplug.add_device(device)

    async def hotplug_remove_device(self, device: Device) -> Any:
        self._require_running("hot-remove a device")
        return await self.hotplug.remove_device(device)

    async def resize_memory(
        self, mem_mb: int, block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        self._require_running("resize memory")
        return await self.hotplug.resize_memory(mem_mb, block_size_mb, probe)

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        self._require_running("resize vCPUs")
        return await self.hotplug.resize_vcpus(vcpus)

    # -- introspection -----------------------------------------------------------------------
    async def get_sandbox_console(self, sandbox_id: str) -> str:
        if self.paths is None:
            raise StateError(f"VM {sandbox_id}: not created, it has no console")
        return self.paths.console_socket

    def capabilities(self) -> Capabilities:
        machine = qargv.DEFAULT_MACHINE
        if self.config is not None:
            machine = qargv.machine_type(self.config)
        return machine_capabilities(machine)

    def hypervisor_config(self) -> HypervisorConfig:
        return self._require_config("read the config")

    async def get_thread_ids(self) -> dict[int, int]:
        cpus = await self._execute("query-cpus-fast")
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}

    def get_pids(self) -> list[int]:
        pid = self._proc.pid if self._proc is not None else self._pid
        return ([pid] if pid else []) + self.helpers.pids()

    async def check(self) -> None:
        if self.state not in (VMState.RUNNING, VMState.PAUSED):
            raise StateError(f"VM {self.id or '<unnamed>'} is {self.state.value}, not running")
        status = await self._execute("query-status")
        if status.get("status") in BAD_STATUSES:
            raise HypervisorError(
                f"sandbox {self.id}: QEMU reports the guest as {status['status']}"
            )

    def get_virt_drive_offset(self) -> int:
        if self.config is None or not self.image:
            return 0
        nvdimm = not self.config.disable_image_nvdimm and (
            qargv.machine_type(self.config) != "microvm"
        )
        return 0 if nvdimm else 1

    @property
    def root_ports(self) -> list[str]:
        """Ids of the cold-plugged pcie-root-ports (q35), in bus order."""
        return [b.id for b in self.hotplug.bridges if b.type == "pcie-root-port"]

    @property
    def console_log(self) -> str:
        """The guest console's log file (everything the guest printed)."""
        if self.paths is None:
            raise StateError(f"VM {self.id or '<unnamed>'}: not created")
        return self.paths.console_log

    # -- persistence -------------------------------------------------------------------------
    def save(self) -> persist.HypervisorState:
        cfg = self._require_config("save state")
        assert self.paths is not None
        pids = self.get_pids()
        return persist.HypervisorState(
            type=str(HypervisorType.QEMU),
            pid=pids[0] if pids else 0,
            pid_start_time=self._proc.start_time if self._proc else self._pid_start,
            uuid=self.uuid,
            api_socket=self.paths.qmp_socket,
            block_index_map=list(self.hotplug.block_indexes),
            hotplugged_vcpus=[persist.HotpluggedVCPU(id=v) for v in self.hotplug.vcpus],
            hotplugged_memory=self.hotplug.memory_mb,
            virtiofsd_pid=next(iter(self.helpers.pids(virtiofsd.KIND)), 0),
            pcie_root_port=len(self.root_ports),
            bridges=[b.model_copy(deep=True) for b in self.hotplug.bridges],
            hotplug_vfio_on_root_bus=cfg.hotplug_vfio_on_root_bus,
            vm_dir=self.paths.vm_dir,
            qmp_socket=self.paths.qmp_socket,
            console_socket=self.paths.console_socket,
            agent_socket=self.agent_socket,
            config=cfg.to_dict(),
            id=self.id,
            vm_state=self.state,
            driver=QemuState(
                accel=self.accel,
                qemu_path=self.qemu_path,
                kernel=self.kernel,
                initrd=self.initrd,
                image=self.image,
                argv=list(self.argv),
                helpers=[HelperRecord(**h) for h in self.helpers.save()],
                hotplug=self.hotplug.save(),
            ),
        )

    def load(self, state: persist.HypervisorState) -> None:
        from ...config import HypervisorConfig

        if state.type and state.type != str(HypervisorType.QEMU):
            raise StateError(f"cannot load {state.type} state into the QEMU driver")
        own = state.driver_state(QemuState)
        self.config = HypervisorConfig.from_dict(state.config)
        self.paths = qargv.VMPaths(state.vm_dir)
        self.id = state.id or os.path.basename(state.vm_dir)
        self.uuid = state.uuid
        self._pid = state.pid
        self._pid_start = state.pid_start_time
        self._proc = None
        self._qmp = None
        self.helpers.load([asdict(h) for h in own.helpers])
        self.hotplug.load(own.hotplug, state)
        self.agent_socket = state.agent_socket
        self.accel = own.accel
        self.qemu_path = own.qemu_path
        self.kernel = own.kernel
        self.initrd = own.initrd
        self.image = own.image
        self.argv = list(own.argv)
        self.state = state.vm_state

    async def to_grpc(self) -> bytes:
        return encode_state(self.save())

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Take over a running VM handed out by the VM cache server. QMP is attached on the
        first command, as after `load`: QEMU serves one QMP client at a time and the server
        closes its own only once its answer is out, so attaching here waited for that."""
        self.load(decode_state(data, "qemu"))
        self.config = config
        self._raise_if_exited()

    # -- QMP plumbing ------------------------------------------------------------------------
    def _process(self) -> VmmProcess | None:
        """Our process handle, attached to the persisted pid (only alive while it is still
        that process)."""
        if self._proc is None and self._pid:
            logs = [self.paths.qemu_log] if self.paths else []
            self._proc = VmmProcess.attach("qemu", self._pid, self._pid_start, logs)
        return self._proc

    def _require_qmp(self) -> QMP:
        if self._qmp is None:
            raise StateError(f"VM {self.id}: no QMP session")
        return self._qmp

    async def _attach_or_none(self) -> QMP | None:
        """The QMP session, re-attaching over the named socket; None if QEMU refuses (gone)."""
        if self._qmp is not None and self._qmp.connected:
            return self._qmp
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self.paths is None:
            return None
        qmp = QMP(f"{self.id}")
        try:
            await qmp.connect(self.paths.qmp_socket, timeout=QMP_ATTACH_TIMEOUT)
        except QMPDisconnectedError:
            return None
        self._qmp = qmp
        return qmp

    async def _attach(self) -> QMP:
        qmp = await self._attach_or_none()
        if qmp is None:
            proc = self._process()
            if proc is not None:
                await proc.wait(HANGUP_GRACE)  # a refused QMP is usually a dying QEMU
            self._raise_if_exited()
            raise HypervisorError(
                f"sandbox {self.id}: cannot connect to QMP at "
                f"{self.paths.qmp_socket if self.paths else '<no VM dir>'}"
            )
        return qmp

    async def _execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        """Run a QMP command on the live VM; a dead QEMU becomes `VMExitedError`."""
        if self.state in (VMState.NEW, VMState.CREATED, VMState.STOPPED):
            raise StateError(
                f"cannot run {command} on VM {self.id or '<unnamed>'}: it is {self.state.value}"
            )
        self._raise_if_exited()
        qmp = await self._attach()
        try:
            return await qmp.execute(command, arguments, timeout=timeout)
        except QMPDisconnectedError:
            proc = self._process()
            if proc is not None:
                await proc.wait(HANGUP_GRACE)  # a dying QEMU closes QMP just before it exits
            self._raise_if_exited()
            raise

    def _raise_if_exited(self) -> None:
        proc = self._process()
        if proc is not None and proc.alive():
            return
        code = proc.exit_code if proc is not None else None
        detail = f" with exit code {code}" if code is not None and code >= 0 else ""
        if code is not None and code < 0:
            detail = f" (killed by signal {-code})"
        tail = self._console_tail(5)
        raise VMExitedError(
            f"sandbox {self.id}: QEMU (pid {self._pid}) has exited{detail}"
            + (f"\n--- console tail ---\n{tail}" if tail else "")
        )

    def _console_tail(self, lines: int = 10) -> str:
        return log_tail(self.paths.console_log, lines) if self.paths else ""

    def _require_config(self, operation: str) -> HypervisorConfig:
        if self.config is None:
            raise StateError(f"cannot {operation}: VM {self.id or '<unnamed>'} is not created")
        return self.config

    def _require_running(self, operation: str) -> None:
        if self.state not in (VMState.RUNNING, VMState.PAUSED):
            raise StateError(
                f"cannot {operation} on VM {self.id or '<unnamed>'}: it is {self.state.value}"
            )


async def _pass_file(qmp: QMP, path: str, flags: int) -> None:
    """Open the device-state file `path` here and pass it to QEMU as `MIGRATION_FD`: no
    shell ever reads the path (any name is safe) and QEMU keeps `-sandbox spawn=deny`.

    Opened without waiting (a FIFO with no peer yet: O_NONBLOCK, or O_RDWR to write), then
    handed over in blocking mode.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"devices_state_path {path}: {e.strerror or e}") from e
    try:
        os.set_blocking(fd, True)
        await qmp.pass_fd(fd, MIGRATION_FD)
    finally:
        os.close(fd)


def _existing_asset(name: str, path: str) -> str:
    if not path:
        raise ConfigError(f"{name}: no path given")
    if not os.path.isabs(path):
        raise ConfigError(f"{name}: {path!r} must be an absolute path")
    if not os.path.exists(path):
        raise AssetError(f"{name} {path} does not exist")
    if not os.path.isfile(path) and not os.path.exists(os.path.realpath(path)):
        raise AssetError(f"{name} {path} is not a file")
    return path
