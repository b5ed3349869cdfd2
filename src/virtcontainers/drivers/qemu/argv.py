"""The QEMU command line: a pure function of a `LaunchSpec`, so every argv can be unit-tested."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...devices import (
    BlockDrive,
    Device,
    ImageDevice,
    NetworkEndpoint,
    SerialPort,
    SharedFS,
    UserNetwork,
    VSockDevice,
)
from ...errors import ConfigError, UnsupportedError
from ...guest.params import FAST_BOOT_PARAMS
from ...types import Param, serialize_params
from .. import virtiofsd

if TYPE_CHECKING:
    from ...config import HypervisorConfig

MACHINE_TYPES = ("q35", "pc", "microvm")
DEFAULT_MACHINE = "q35"
DEFAULT_ROOT_PORTS = 2
DEFAULT_MEM_SLOTS = 10

DEBUG_PARAMS: tuple[Param, ...] = (
    Param("debug"),
    Param("systemd.show_status", "true"),
    Param("systemd.log_level", "debug"),
)
NON_DEBUG_PARAMS: tuple[Param, ...] = (Param("quiet"), Param("systemd.show_status", "false"))

NVDIMM_ROOT_PARAMS: tuple[Param, ...] = (
    Param("root", "/dev/pmem0p1"),
    Param("rootflags", "dax,data=ordered,errors=remount-ro ro"),
    Param("rootfstype", "ext4"),
)
VIRTIO_BLK_ROOT_PARAMS: tuple[Param, ...] = (
    Param("root", "/dev/vda1"),
    Param("rootflags", "data=ordered,errors=remount-ro ro"),
    Param("rootfstype", "ext4"),
)

SANDBOX_OPTS = ("obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny")

CONSOLE_CHARDEV = "console0"
CONSOLE_LOG_FDSET = 1
QMP_CHARDEV = "qmp"
QMP_NAMED_CHARDEV = "qmp-named"
SCSI_CONTROLLER = "scsi0"
SERIAL_CONTROLLER = "serial0"
VIRTIO_MEM_ID = "virtiomem0"
VIRTIO_MEM_ALIGN_MIB = 2  # virtio-mem's default block size on x86 (a THP)
NIC_NO_ROM = "romfile="
"""virtio-net-pci without its option ROM (efi-virtio.rom, iPXE): the guest never boots from
the network, and SeaBIOS would run the ROM's init on every boot (~30 ms of CPU under TCG)."""
NIC_LINK_ALWAYS_UP: dict[str, bool] = {"status": False, "guest_announce": False}
"""virtio-net without the link-status feature (nor the announcements that need it): the link
is always up for the guest. With it, the driver turned the carrier off, then on from a
worker once it had read the status, and Linux's link watch, run for the first event, held
the second back up to a second: the interface stayed `operstate` down for that long after
being brought up (7 of 8 bridge starts, checked right after the start returned)."""


@dataclass(frozen=True)
class VMPaths:
    """The files of one VM, all inside its VM directory."""

    vm_dir: str

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.vm_dir, "qmp.sock")

    @property
    def console_socket(self) -> str:
        return os.path.join(self.vm_dir, "console.sock")

    @property
    def console_log(self) -> str:
        return os.path.join(self.vm_dir, "console.log")

    @property
    def qemu_log(self) -> str:
        return os.path.join(self.vm_dir, "qemu.log")

    def virtiofsd_socket(self, fs_id: str) -> str:
        return virtiofsd.socket_path(self.vm_dir, fs_id)


@dataclass
class LaunchSpec:
    """Everything the command line depends on (resolved paths, host facts, cold-plugged devices)."""

    config: HypervisorConfig
    name: str
    uuid: str
    paths: VMPaths
    qemu: str
    kernel: str
    initrd: str = ""
    image: str = ""
    image_size: int = 0
    accel: str = "tcg"
    qmp_fd: int | None = None
    host_memory_mib: int = 0
    host_cpus: int = 1
    devices: Sequence[Device] = ()
    console: str = "ttyS0"  # guest console device: "ttyS0" (isa serial) or "hvc0" (virtconsole)
    host_tsc_khz: int = 0  # the host's TSC rate, which a TCG guest's TSC runs at
    #: The host is itself a VM: as Kata does, the guest gets no PMU (unless
    #: disable_nesting_checks), which nested KVM handles badly.
    nested: bool = False
    #: Where QEMU writes the console log: this pipe (to a keeper that caps its size), or,
    #: when None, console.log itself (uncapped; for command lines run by hand).
    console_log_fd: int | None = None


@dataclass
class Launch:
    """A rendered command line and the fds QEMU must inherit."""

    argv: list[str]
    pass_fds: list[int] = field(default_factory=list)
    kernel_params: list[Param] = field(default_factory=list)


def machine_type(config: HypervisorConfig) -> str:
    """The configured machine type (default q35), refusing ones this driver does not build."""
    machine = config.hypervisor_machine_type or DEFAULT_MACHINE
    if machine not in MACHINE_TYPES:
        raise ConfigError(
            f"hypervisor_machine_type: unsupported QEMU machine {machine!r} "
            f"(one of {', '.join(MACHINE_TYPES)})"
        )
    return machine


def check_path(name: str, value: str) -> str:
    """Refuse a path QEMU would split on (',' starts a new option) or that is not absolute."""
    if "," in value or "\n" in value:
        raise ConfigError(f"{name}: path {value!r} contains ',' or a newline (QEMU option syntax)")
    if value and not os.path.isabs(value):
        raise ConfigError(f"{name}: path {value!r} must be absolute")
    return value


def check_opt(name: str, value: str) -> str:
    """Refuse a free-form option value that would inject extra QEMU options."""
    if "\n" in value or " " in value:
        raise ConfigError(f"{name}: {value!r} contains whitespace")
    return value


def dedupe_params(params: Iterable[Param]) -> list[Param]:
    """Drop earlier duplicates of a key so the last one wins, keeping the survivors' order."""
    items = list(params)
    last = {p.key or p.value: i for i, p in enumerate(items)}
    return [p for i, p in enumerate(items) if last[p.key or p.value] == i]


def kernel_params(spec: LaunchSpec) -> list[Param]:
    """Ordered guest kernel parameters: arch defaults, debug switch, root, then the user's."""
    cfg = spec.config
    machine = machine_type(cfg)
    params: list[Param] = [Param("console", spec.console)]
    params.extend(FAST_BOOT_PARAMS)
    if machine == "microvm":
        params.remove(Param("pci", "lastbus=0"))
    if spec.accel == "tcg" and spec.host_tsc_khz:
        # Under TCG the kernel's quick PIT calibration of the TSC often fails; microvm,
        # without HPET or PM timer, then hangs (3 of 4 boots here), q35 falls back to a
        # calibration against the PIT or HPET that takes 130-220 ms instead of ~10 (5 of 8
        # boots): the largest single spread between boots. The rate is known, so give it.
        params.append(Param("tsc_early_khz", str(spec.host_tsc_khz)))
    if cfg.iommu:
        params.remove(Param("iommu", "off"))
        params += [Param("intel_iommu", "on"), Param("iommu", "pt")]
    params.extend(DEBUG_PARAMS if cfg.debug else NON_DEBUG_PARAMS)
    params.append(Param("panic", "1"))
    params.append(Param("nr_cpus", str(max_vcpus(spec))))
    if spec.image:
        if image_as_nvdimm(spec):
            params.extend(NVDIMM_ROOT_PARAMS)
        else:
            params.extend(VIRTIO_BLK_ROOT_PARAMS)
    if uses_scsi(spec) and not scsi_disks_at_boot(spec):
        params.append(SCSI_LATE_PARAM)
    params.extend(cfg.kernel_params)
    return dedupe_params(params)


SCSI_LATE_PARAM = Param("vc.scsi", "late")
"""Tells the agent no SCSI disk is cold-plugged: it loads virtio_scsi after its ready marker
(the driver's scan of the empty bus took 170-250 ms of the boot's vCPU under TCG)."""


def scsi_disks_at_boot(spec: LaunchSpec) -> bool:
    """Whether a drive on the virtio-scsi controller is cold-plugged."""
    return any(
        isinstance(d, BlockDrive) and block_driver(spec, d) == "virtio-scsi" for d in spec.devices
    )


def image_as_nvdimm(spec: LaunchSpec) -> bool:
    """The root image goes on an nvdimm (DAX) unless disabled or the machine has no slots."""
    return not spec.config.disable_image_nvdimm and machine_type(spec.config) != "microvm"


def max_vcpus(spec: LaunchSpec) -> int:
    """Hotpluggable vCPU ceiling: the config's maximum bounded by the host, never below boot."""
    cfg = spec.config
    if machine_type(cfg) == "microvm":
        return cfg.num_vcpus
    ceiling = cfg.default_max_vcpus or spec.host_cpus
    return max(cfg.num_vcpus, min(ceiling, spec.host_cpus))


def mib_ceil(nbytes: int) -> int:
    return -(-nbytes // (1 << 20))


def max_memory_mib(spec: LaunchSpec) -> int:
    """maxmem: at most the host's memory (never below boot memory) plus nvdimm/offset space."""
    cfg = spec.config
    base = max(cfg.memory_size, spec.host_memory_mib or cfg.memory_size)
    extra = cfg.mem_offset
    if spec.image and image_as_nvdimm(spec):
        extra += mib_ceil(spec.image_size)
    return base + extra


def virtio(machine: str, kind: str) -> str:
    """The device model name for a virtio device: PCI on q35/pc, virtio-mmio on microvm."""
    return f"{kind}-device" if machine == "microvm" else f"{kind}-pci"


class _Argv:
    """Accumulates `-opt value` pairs."""

    def __init__(self, qemu: str, iommu_platform: bool = False) -> None:
        self.items: list[str] = [qemu]
        self.pass_fds: list[int] = []
        self.iommu_platform = iommu_platform

    def add(self, opt: str, *parts: str) -> None:
        self.items.append(opt)
        if opt == "-device" and self.iommu_platform and parts and is_virtio(parts[0]):
            props = iommu_platform_props(parts[0]).items()
            parts = (*parts, *(f"{k}={'on' if v is True else v}" for k, v in props))
        if parts:
            self.items.append(",".join(p for p in parts if p))


def is_virtio(model: str) -> bool:
    """Whether a QEMU device model is a virtio device (it takes `iommu_platform`)."""
    return model.startswith(("virtio-", "vhost-"))


def iommu_platform_props(model: str) -> dict[str, bool | str]:
    """Device properties (QMP types) for `iommu_platform`: the IOMMU feature needs a
    modern-only device (QEMU refuses it on a transitional one, as q35's root bus makes)."""
    if model.startswith("vhost-user-"):
        # QEMU refuses it unless the backend translates guest IOVAs: virtiofsd and
        # qemu-storage-daemon do not.
        raise UnsupportedError("qemu", f"iommu_platform with a {model} device")
    props: dict[str, bool | str] = {"iommu_platform": True}
    if model.endswith("-pci"):
        props["disable-legacy"] = "on"
    return props


def build(spec: LaunchSpec) -> Launch:
    """Render the full QEMU command line for `spec`."""
    cfg = spec.config
    machine = machine_type(cfg)
    qemu = check_path("hypervisor_path", spec.qemu)
    a = _Argv(qemu, cfg.iommu_platform)
    a.add("-name", f"sandbox-{check_opt('id', spec.name)}", "debug-threads=on")
    a.add("-uuid", spec.uuid)
    _machine(a, spec, machine)
    _cpu(a, spec)
    _memory(a, spec, machine)
    a.add("-nodefaults")
    a.add("-nographic")
    a.add("-no-user-config")
    a.add("-no-reboot")
    _monitors(a, spec)
    _console(a, spec, machine)
    _boot(a, spec)
    _iommu(a, spec, machine)
    _buses(a, spec, machine)
    _image(a, spec, machine)
    _rng(a, spec, machine)
    for dev in spec.devices:
        cold_plug(a, spec, machine, dev)
    if cfg.boot_from_template:
        a.add("-incoming", "defer")
    _sandbox(a, spec)
    a.items += hypervisor_params(cfg.hypervisor_params)
    return Launch(argv=a.items, pass_fds=a.pass_fds, kernel_params=kernel_params(spec))


def hypervisor_params(params: Sequence[Param]) -> list[str]:
    """User-given extra QEMU options: `-key value` (a leading dash is added when missing)."""
    out: list[str] = []
    for p in params:
        if not p.key:
            raise ConfigError(f"hypervisor_params: option without a name (value {p.value!r})")
        out.append(p.key if p.key.startswith("-") else f"-{p.key}")
        if p.value:
            out.append(p.value)
    return out


def _machine(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    cfg = spec.config
    opts = [machine]
    if machine == "microvm":
        # acpi=on: the distribution kernel finds virtio-mmio devices only through ACPI.
        # Under TCG the guest needs the emulated PIT/PIC to calibrate its clock.
        tcg = spec.accel == "tcg"
        opts += [f"pit={'on' if tcg else 'off'}", f"pic={'on' if tcg else 'off'}"]
        opts += ["rtc=on", "isa-serial=on", "acpi=on"]
    elif spec.image and image_as_nvdimm(spec):
        opts.append("nvdimm=on")
    if cfg.machine_accelerators:
        opts.append(check_opt("machine_accelerators", cfg.machine_accelerators))
    if _memory_backend(spec):
        opts.append("memory-backend=ram0")
    if cfg.iommu and spec.accel == "kvm":
        opts.append("kernel-irqchip=split")  # KVM's in-kernel irqchip cannot remap
    a.add("-machine", *opts)
    if spec.accel == "kvm":
        a.add("-accel", "kvm")
    else:
        a.add("-accel", "tcg", "thread=multi")


def _cpu(a: _Argv, spec: LaunchSpec) -> None:
    cfg = spec.config
    model = "host" if spec.accel == "kvm" else "max"
    feats = check_opt("cpu_features", cfg.cpu_features) if cfg.cpu_features else ""
    nested = "pmu=off" if spec.nested and not cfg.disable_nesting_checks else ""
    a.add("-cpu", model, feats, nested)
    a.add("-smp", str(cfg.num_vcpus), f"maxcpus={max_vcpus(spec)}")


def shared_memory(cfg: HypervisorConfig) -> bool:
    """Whether guest RAM is a shared mapping, as vhost-user devices need (also for hotplug)."""
    return bool(
        cfg.shared_fs == "virtio-fs"
        or cfg.file_backed_mem_root_dir
        or cfg.enable_vhost_user_store
        or cfg.huge_pages
        or cfg.boot_to_be_template
    )


def virtio_mem_size_mib(spec: LaunchSpec) -> int:
    """Size of the virtio-mem region: the room between boot memory and the host's memory."""
    cfg = spec.config
    size = max(cfg.memory_size, spec.host_memory_mib or cfg.memory_size) - cfg.memory_size
    return size - size % VIRTIO_MEM_ALIGN_MIB


def _memory_backend(spec: LaunchSpec) -> list[str]:
    """The options of an explicit RAM backend, or [] when plain anonymous RAM will do."""
    cfg = spec.config
    size = f"size={cfg.memory_size}M"
    prealloc = ["prealloc=on"] if cfg.mem_prealloc else []
    if cfg.boot_to_be_template or cfg.boot_from_template:
        path = check_path("memory_path", cfg.memory_path)
        # A clone maps the template's file copy-on-write, unless vhost-user devices must
        # see its memory: then memory_path is the clone's own copy, mapped shared.
        shared = cfg.boot_to_be_template or cfg.shared_fs == "virtio-fs"
        share = "share=on" if shared else "share=off"
        return ["memory-backend-file", "id=ram0", size, f"mem-path={path}", share, *prealloc]
    if cfg.huge_pages:
        root = check_path(
            "file_backed_mem_root_dir", cfg.file_backed_mem_root_dir or "/dev/hugepages"
        )
        return ["memory-backend-file", "id=ram0", size, f"mem-path={root}", "share=on", *prealloc]
    if shared_memory(cfg):
        # vhost-user backends (virtiofsd, qemu-storage-daemon) map guest RAM: it is shared.
        if cfg.file_backed_mem_root_dir:
            root = check_path("file_backed_mem_root_dir", cfg.file_backed_mem_root_dir)
            return [
                "memory-backend-file",
                "id=ram0",
                size,
                f"mem-path={root}",
                "share=on",
                *prealloc,
            ]
        return ["memory-backend-memfd", "id=ram0", size, "share=on", *prealloc]
    if prealloc:
        return ["memory-backend-ram", "id=ram0", size, *prealloc]
    return []


def _memory(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    cfg = spec.config
    if machine == "microvm":
        a.add("-m", f"{cfg.memory_size}M")
    else:
        slots = cfg.mem_slots or DEFAULT_MEM_SLOTS
        a.add("-m", f"{cfg.memory_size}M", f"slots={slots}", f"maxmem={max_memory_mib(spec)}M")
    backend = _memory_backend(spec)
    if backend:
        a.add("-object", *backend)
    if cfg.virtio_mem:
        _virtio_mem(a, spec, machine)


def _virtio_mem(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    """A virtio-mem device (requested size 0) spanning the hotpluggable room, for resizing."""
    cfg = spec.config
    if machine == "microvm":
        raise UnsupportedError("qemu", "virtio_mem on the microvm machine type", "use q35")
    size = virtio_mem_size_mib(spec)
    if size <= 0:
        raise ConfigError(
            f"virtio_mem: no room for a virtio-mem device above memory_size {cfg.memory_size} MiB "
            f"(host memory {spec.host_memory_mib} MiB)"
        )
    if shared_memory(cfg):
        backend = ["memory-backend-memfd", f"id={VIRTIO_MEM_ID}-ram", f"size={size}M", "share=on"]
    else:
        backend = ["memory-backend-ram", f"id={VIRTIO_MEM_ID}-ram", f"size={size}M", "reserve=off"]
    a.add("-object", *backend)
    a.add(
        "-device",
        "virtio-mem-pci",
        f"id={VIRTIO_MEM_ID}",
        f"memdev={VIRTIO_MEM_ID}-ram",
        "requested-size=0",
    )


def _monitors(a: _Argv, spec: LaunchSpec) -> None:
    if spec.qmp_fd is not None:
        a.add("-chardev", "socket", f"id={QMP_CHARDEV}", f"fd={spec.qmp_fd}")
        a.add("-mon", f"chardev={QMP_CHARDEV}", "mode=control")
        a.pass_fds.append(spec.qmp_fd)
    path = check_path("qmp socket", spec.paths.qmp_socket)
    a.add("-chardev", "socket", f"id={QMP_NAMED_CHARDEV}", f"path={path}", "server=on", "wait=off")
    a.add("-mon", f"chardev={QMP_NAMED_CHARDEV}", "mode=control")


def _console(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    sock = check_path("console socket", spec.paths.console_socket)
    if spec.console_log_fd is None:
        log = [f"logfile={check_path('console log', spec.paths.console_log)}"]
    else:
        # An fd set (QEMU dups the fd; it refuses O_TRUNC on one, so append).
        a.add("-add-fd", f"fd={spec.console_log_fd}", f"set={CONSOLE_LOG_FDSET}")
        a.pass_fds.append(spec.console_log_fd)
        log = [f"logfile=/dev/fdset/{CONSOLE_LOG_FDSET}", "logappend=on"]
    a.add(
        "-chardev",
        "socket",
        f"id={CONSOLE_CHARDEV}",
        f"path={sock}",
        "server=on",
        "wait=off",
        *log,
    )
    if spec.console == "hvc0":
        a.add("-device", virtio(machine, "virtio-serial"), "id=console-serial0")
        a.add("-device", "virtconsole", f"chardev={CONSOLE_CHARDEV}", "id=console0")
    elif spec.console == "ttyS0":
        a.add("-serial", f"chardev:{CONSOLE_CHARDEV}")
    else:
        raise ConfigError(f"console: unknown guest console {spec.console!r} (ttyS0 or hvc0)")


def _boot(a: _Argv, spec: LaunchSpec) -> None:
    cfg = spec.config
    firmware = cfg.firmware_asset_path()
    if firmware:
        a.add("-bios", check_path("firmware_path", firmware))
    for i, flash in enumerate(cfg.pflash):
        a.add(
            "-drive", "if=pflash", "format=raw", f"unit={i}", f"file={check_path('pflash', flash)}"
        )
    a.add("-kernel", check_path("kernel_path", spec.kernel))
    if spec.initrd:
        a.add("-initrd", check_path("initrd_path", spec.initrd))
    a.items += ["-append", " ".join(serialize_params(kernel_params(spec), "="))]
    if cfg.realtime and cfg.mlock:
        a.add("-overcommit", "mem-lock=on")


def _iommu(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    """A vIOMMU (q35 only): intel-iommu with interrupt remapping."""
    if not spec.config.iommu:
        return
    if machine != "q35":
        raise ConfigError(f"iommu: a vIOMMU needs the q35 machine type, not {machine}")
    a.add("-device", "intel-iommu", "intremap=on", "device-iotlb=on")


def root_port_ids(spec: LaunchSpec) -> list[str]:
    """Ids of the empty pcie-root-ports cold-plugged on q35 for later hotplug."""
    if machine_type(spec.config) != "q35":
        return []
    count = spec.config.pcie_root_port or DEFAULT_ROOT_PORTS
    return [f"rp{i}" for i in range(count)]


def bridge_ids(spec: LaunchSpec) -> list[str]:
    """Ids of the pci-bridges cold-plugged on pc for later hotplug."""
    if machine_type(spec.config) != "pc":
        return []
    return [f"pci-bridge-{i}" for i in range(spec.config.default_bridges or 1)]


def uses_scsi(spec: LaunchSpec) -> bool:
    """Whether a virtio-scsi controller is needed (block driver or a scsi cold-plugged drive)."""
    cfg = spec.config
    if cfg.disable_block_device_use:
        return any(isinstance(d, BlockDrive) and d.driver == "virtio-scsi" for d in spec.devices)
    if cfg.block_device_driver == "virtio-scsi":
        return True
    return any(isinstance(d, BlockDrive) and d.driver == "virtio-scsi" for d in spec.devices)


def _buses(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    for i, rp in enumerate(root_port_ids(spec)):
        a.add("-device", "pcie-root-port", f"id={rp}", "bus=pcie.0", f"chassis={i + 1}")
    for i, br in enumerate(bridge_ids(spec)):
        a.add("-device", "pci-bridge", f"id={br}", "bus=pci.0", f"chassis_nr={i + 1}", "shpc=on")
    if uses_scsi(spec):
        iothread = []
        if spec.config.enable_iothreads:
            a.add("-object", "iothread", "id=iothread-scsi0")
            iothread = ["iothread=iothread-scsi0"]
        a.add("-device", virtio(machine, "virtio-scsi"), f"id={SCSI_CONTROLLER}", *iothread)
    if any(isinstance(d, SerialPort) for d in spec.devices):
        a.add("-device", virtio(machine, "virtio-serial"), f"id={SERIAL_CONTROLLER}")


def _image(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    if not spec.image:
        return
    path = check_path("image_path", spec.image)
    if image_as_nvdimm(spec):
        a.add(
            "-object",
            "memory-backend-file",
            "id=image-mem0",
            f"mem-path={path}",
            f"size={spec.image_size}",
            "readonly=on",
            "share=on",
        )
        a.add("-device", "nvdimm", "id=image-nv0", "memdev=image-mem0", "unarmed=on")
    else:
        a.add("-blockdev", *_blockdev("image0", path, "raw", True, spec))
        a.add("-device", virtio(machine, "virtio-blk"), "drive=image0", "id=image-blk0")


def _rng(a: _Argv, spec: LaunchSpec, machine: str) -> None:
    source = spec.config.entropy_source
    if not source:
        return
    a.add("-object", "rng-random", "id=rng0", f"filename={check_path('entropy_source', source)}")
    a.add("-device", virtio(machine, "virtio-rng"), "rng=rng0", "id=rng-dev0")


def _sandbox(a: _Argv, spec: LaunchSpec) -> None:
    cfg = spec.config
    opts = list(SANDBOX_OPTS)
    if cfg.runas_user():
        # `-runas` (hypervisor_params) calls setuid() after the filter is in place: SIGSYS
        # with elevateprivileges=deny (measured). Once it has run, no privilege is left.
        opts[opts.index("elevateprivileges=deny")] = "elevateprivileges=allow"
    a.add("-sandbox", "on", *opts)


def _blockdev(node: str, path: str, fmt: str, read_only: bool, spec: LaunchSpec) -> list[str]:
    cfg = spec.config
    opts = [f"node-name={node}", f"driver={fmt}", f"file.driver={_file_driver(path)}"]
    opts.append(f"file.filename={path}")
    if read_only:
        opts.append("read-only=on")
    if cfg.block_device_cache_set:
        opts.append(f"cache.direct={'on' if cfg.block_device_cache_direct else 'off'}")
        opts.append(f"cache.no-flush={'on' if cfg.block_device_cache_noflush else 'off'}")
    return opts


def _file_driver(path: str) -> str:
    """`host_device` for block special files, `file` for regular ones."""
    import stat

    try:
        return "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        return "file"


def block_driver(spec: LaunchSpec, drive: BlockDrive) -> str:
    """The effective driver of a drive: its own, else the config's block_device_driver."""
    return drive.driver or spec.config.block_device_driver or "virtio-scsi"


def cold_plug(a: _Argv, spec: LaunchSpec, machine: str, dev: Device) -> None:
    """Render one cold-plugged device."""
    if isinstance(dev, SerialPort):
        s = dev.socket
        path = check_path(f"serial port {s.name}", s.host_path)
        a.add("-chardev", "socket", f"id={s.id}", f"path={path}", "server=on", "wait=off")
        a.add(
            "-device",
            "virtserialport",
            f"bus={SERIAL_CONTROLLER}.0",
            f"chardev={s.id}",
            f"name={s.name}",
            f"id={s.device_id}",
        )
    elif isinstance(dev, VSockDevice):
        v = dev.vsock
        a.add(
            "-device",
            virtio(machine, "vhost-vsock"),
            f"id=vsock-{v.context_id}",
            f"guest-cid={v.context_id}",
            f"vhostfd={v.vhost_fd}",
        )
        a.pass_fds.append(v.vhost_fd)
    elif isinstance(dev, BlockDrive):
        _cold_block(a, spec, machine, dev)
    elif isinstance(dev, NetworkEndpoint):
        _cold_net(a, spec, machine, dev)
    elif isinstance(dev, UserNetwork):
        fwd = [f"hostfwd={f}" for f in dev.host_forwards]
        a.add("-netdev", "user", f"id=netdev-{dev.id}", f"net={dev.net}", *fwd)
        a.add(
            "-device",
            virtio(machine, "virtio-net"),
            f"netdev=netdev-{dev.id}",
            f"id=net-{dev.id}",
            f"mac={dev.mac}",
            *_nic_props(machine),
        )
    elif isinstance(dev, SharedFS):
        _cold_fs(a, spec, machine, dev)
    elif isinstance(dev, ImageDevice):
        raise ConfigError("image device: pass it through LaunchSpec.image, not as a device")
    else:
        raise UnsupportedError("qemu", f"cold-plugging {dev.kind}")


def _cold_block(a: _Argv, spec: LaunchSpec, machine: str, drive: BlockDrive) -> None:
    path = check_path(f"block drive {drive.id}", drive.path)
    a.add("-blockdev", *_blockdev(drive.id, path, drive.format, drive.read_only, spec))
    driver = block_driver(spec, drive)
    if driver == "virtio-scsi":
        scsi_id, _, lun = (drive.scsi_addr or "0:0").partition(":")
        a.add(
            "-device",
            "scsi-hd",
            f"bus={SCSI_CONTROLLER}.0",
            "channel=0",
            f"scsi-id={scsi_id}",
            f"lun={lun or '0'}",
            f"drive={drive.id}",
            f"id=scsi-{drive.id}",
        )
    elif driver in ("virtio-blk", "virtio-mmio"):
        a.add("-device", virtio(machine, "virtio-blk"), f"drive={drive.id}", f"id=blk-{drive.id}")
    else:
        raise UnsupportedError("qemu", f"block driver {driver!r} for drive {drive.id}")


def _cold_net(a: _Argv, spec: LaunchSpec, machine: str, ep: NetworkEndpoint) -> None:
    netdev = ["tap", f"id=netdev-{ep.id}"]
    if ep.fds:  # queues QEMU is handed open (a macvtap's /dev/tapN)
        netdev.append("fds=" + ":".join(str(fd) for fd in ep.fds))
        a.pass_fds.extend(ep.fds)
    else:
        netdev += [f"ifname={ep.tap_name}", "script=no", "downscript=no"]
    if ep.vhost and not spec.config.disable_vhost_net:
        netdev.append("vhost=on")
    if ep.queues > 1 and not ep.fds:
        netdev.append(f"queues={ep.queues}")
    a.add("-netdev", *netdev)
    dev = [virtio(machine, "virtio-net"), f"netdev=netdev-{ep.id}", f"id=net-{ep.id}"]
    if ep.mac:
        dev.append(f"mac={ep.mac}")
    if ep.queues > 1 and machine != "microvm":
        dev += ["mq=on", f"vectors={2 * ep.queues + 2}"]
    a.add("-device", *dev, *_nic_props(machine))


def _nic_props(machine: str) -> list[str]:
    """No option ROM on a PCI NIC (microvm's virtio-mmio NIC has no ROM property); the link
    always up."""
    link = [f"{k}={'on' if v else 'off'}" for k, v in NIC_LINK_ALWAYS_UP.items()]
    return link if machine == "microvm" else [NIC_NO_ROM, *link]


def _cold_fs(a: _Argv, spec: LaunchSpec, machine: str, fs: SharedFS) -> None:
    if machine == "microvm":
        raise UnsupportedError(
            "qemu", f"{fs.fs_type} share {fs.id} on the microvm machine type", "use q35"
        )
    if fs.fs_type == "virtio-9p":
        src = check_path(f"shared fs {fs.id}", fs.source)
        a.add("-fsdev", "local", f"id=fsdev-{fs.id}", f"path={src}", "security_model=none")
        a.add(
            "-device",
            virtio(machine, "virtio-9p"),
            f"fsdev=fsdev-{fs.id}",
            f"mount_tag={fs.mount_tag}",
            f"id=fs-{fs.id}",
        )
        return
    sock = check_path(f"shared fs {fs.id} socket", spec.paths.virtiofsd_socket(fs.id))
    if not _memory_backend(spec):
        raise ConfigError(
            f"shared fs {fs.id}: virtio-fs needs shared guest memory; set shared_fs = 'virtio-fs'"
        )
    a.add("-chardev", "socket", f"id=char-fs-{fs.id}", f"path={sock}")
    dev = [virtio(machine, "vhost-user-fs"), f"chardev=char-fs-{fs.id}", f"tag={fs.mount_tag}"]
    dev.append(f"id=fs-{fs.id}")
    a.add("-device", *dev)
