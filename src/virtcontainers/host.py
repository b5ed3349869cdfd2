"""Host facts: memory, CPU flags, vCPU limits, socket paths, vsock CIDs, KVM usability (the
probe itself is in `kvm_probe`), `check()`."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import pids
from .errors import ConfigError, HostError
from .types import AGENT_VSOCK_PORT, Socket, VSock

if TYPE_CHECKING:
    from .kvm_probe import KvmProbe

MAX_SOCKET_PATH_LEN = 107
"""Longest usable Unix socket path: sizeof(sun_path) is 108 bytes including the final NUL."""

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
FIRST_CONTEXT_ID = 3
"""CIDs 0 (hypervisor), 1 (loopback) and 2 (host) are reserved."""
LAST_CONTEXT_ID = 2**32 - 2
"""The kernel refuses U32_MAX (VMADDR_CID_ANY) and anything wider than 32 bits."""
DEFAULT_CID_ATTEMPTS = 1024
"""The agent's vsock port (the seed's vSockPort)."""

DEFAULT_SOCKET_NAME = "kata.sock"
DEFAULT_SOCKET_DEVICE_ID = "channel0"
DEFAULT_SOCKET_ID = "charch0"
DEFAULT_SOCKET_CHANNEL_NAME = "agent.channel.0"

VIRTIOFSD_PATH = "/usr/lib/qemu/virtiofsd"


# -- ioctl numbers (asm-generic/ioctl.h) ------------------------------------------------------
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


def _ior(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


VHOST_VIRTIO = 0xAF
VHOST_VSOCK_SET_GUEST_CID = _iow(VHOST_VIRTIO, 0x60, 8)


# -- memory and CPU facts ---------------------------------------------------------------------
def _parse_go_uint(text: str) -> int | None:
    """Parse like Go's strconv.ParseUint(s, 0, 64): 0x/0o/0b prefixes, leading-0 octal."""
    if not text or text[0] in "+-" or text.strip() != text:
        return None
    try:
        if len(text) > 1 and text[0] == "0" and text[1].isdigit():
            value = int(text[1:], 8)
        else:
            value = int(text, 0)
    except ValueError:
        return None
    return value if 0 <= value < 2**64 else None


def host_memory_kib(meminfo_path: str = "/proc/meminfo") -> int:
    """Total host memory in KiB: the first well-formed `MemTotal: <n> kB` line."""
    try:
        with open(meminfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[0] != "MemTotal:" or parts[2] != "kB":
                    continue
                size = _parse_go_uint(parts[1])
                if size is not None:
                    return size
    except OSError as e:
        raise HostError(f"cannot read {meminfo_path}: {e.strerror or e}") from e
    raise HostError(f"unable to get MemTotal from {meminfo_path}")


def _arch(arch: str | None = None) -> str:
    import platform  # these imports are where used: listing reads pids only (`pid_is`)

    machine = (arch or platform.machine()).lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def running_on_vmm(cpuinfo_path: str = "/proc/cpuinfo", *, arch: str | None = None) -> bool:
    """True when the CPU flags say this host is itself a VM (the `hypervisor` flag).

    Only x86 exposes that flag; on arm64, ppc64le and s390x the answer is False.
    """
    if _arch(arch) in ("aarch64", "ppc64le", "s390x"):
        return False
    try:
        flags = _first_flags(cpuinfo_path)
    except OSError as e:
        raise HostError(f"cannot read {cpuinfo_path}: {e.strerror or e}") from e
    if flags is None:
        raise HostError(f"couldn't find 'flags' in {cpuinfo_path}")
    return "hypervisor" in flags


def _first_flags(cpuinfo_path: str) -> frozenset[str] | None:
    """The first `flags` line of cpuinfo (every CPU reports the same), None if there is none."""
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    return None


@functools.cache
def tsc_khz(
    cpuinfo: str = "/proc/cpuinfo", sysfs: str = "/sys/devices/system/cpu/cpu0/tsc_freq_khz"
) -> int:
    """The host TSC rate in kHz (sysfs when the kernel exports it, else cpuinfo), 0 if unknown."""
    try:
        with open(sysfs) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        pass
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "cpu MHz":
                    return int(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return 0


@functools.cache
def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The host CPU's flags from cpuinfo (empty if unreadable or absent); read once, as every
    sandbox start asks."""
    try:
        return _first_flags(cpuinfo_path) or frozenset()
    except OSError:
        return frozenset()


def constant_tsc_khz() -> int:
    """The host TSC rate if it is constant (the `constant_tsc` flag), else 0.

    A guest's TSC runs at this rate under TCG and, without TSC scaling, under KVM.
    """
    return tsc_khz() if "constant_tsc" in cpu_flags() else 0


def max_qemu_vcpus(*, arch: str | None = None) -> int:
    """The most vCPUs a QEMU VM may have on this architecture (govmm's MaxVCPUs).

    x86_64: 240, the KVM_MAX_VCPUS of the kernels govmm was written for (xAPIC-era limit;
    newer kernels allow more, but 240 keeps configs portable). arm64: the host's CPUs (the
    GIC setup bounds it by the host). ppc64le: 128. s390x: 248.
    """
    machine = _arch(arch)
    if machine == "aarch64":
        return os.cpu_count() or 1
    if machine in ("ppc64le", "ppc64"):
        return 128
    if machine == "s390x":
        return 248
    return 240


# -- sockets ----------------------------------------------------------------------------------
def host_dir(env: str, as_root: str, xdg: str, xdg_default: str, *sub: str) -> str:
    """A directory of ours: `$env`, else `as_root` for root, else `$xdg` (or `~/xdg_default`)
    joined with `sub` (the cache, data and store directories follow this rule)."""
    override = os.environ.get(env)
    if override:
        return os.path.abspath(override)
    if os.geteuid() == 0:
        return as_root
    base = os.environ.get(xdg) or os.path.join(os.path.expanduser("~"), xdg_default)
    return os.path.join(base, *sub)


def build_socket_path(*parts: str) -> str:
    """Join `parts` into a Unix socket path, refusing empty parts and paths over 107 bytes."""
    if not parts:
        raise ConfigError("socket path: no path elements given")
    for i, part in enumerate(parts):
        if not part:
            raise ConfigError(f"socket path: element {i} is empty in {list(parts)!r}")
    path = os.path.join(*parts)
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_LEN:
        raise ConfigError(
            f"socket path too long ({length} bytes, max {MAX_SOCKET_PATH_LEN}): {path}"
        )
    return path


def socket_listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket `path` (a live VMM's QMP)."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


VsockIoctl = Callable[[int, int], None]
"""Sets the guest CID on a vhost-vsock fd; raises OSError (EADDRINUSE when taken)."""


def _set_guest_cid(fd: int, cid: int) -> None:
    import struct

    fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))


def find_context_id(
    *,
    device: str = VHOST_VSOCK_DEVICE,
    ioctl: VsockIoctl | None = None,
    max_attempts: int = DEFAULT_CID_ATTEMPTS,
    start: int | None = None,
) -> tuple[int, int]:
    """Reserve a free vsock guest CID; return `(fd, cid)`.

    The fd stays open because it holds the reservation: the caller passes it to the VMM
    and closes it. Starts at a random CID and walks upwards (wrapping) past CIDs in use,
    for at most `max_attempts` tries.
    """
    set_cid = ioctl or _set_guest_cid
    if max_attempts < 1:
        raise ConfigError(f"find_context_id: max_attempts must be >= 1, got {max_attempts}")
    span = LAST_CONTEXT_ID - FIRST_CONTEXT_ID + 1
    if start is None:
        import secrets

        start = FIRST_CONTEXT_ID + secrets.randbelow(span)
    elif not FIRST_CONTEXT_ID <= start <= LAST_CONTEXT_ID:
        raise ConfigError(
            f"find_context_id: start CID {start} outside [{FIRST_CONTEXT_ID}, {LAST_CONTEXT_ID}]"
        )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise HostError(
            f"{device} not found: load the vhost-vsock module (modprobe vhost_vsock)"
        ) from e
    except OSError as e:
        raise HostError(f"cannot open {device}: {e.strerror or e}") from e
    try:
        cid = start
        for _ in range(max_attempts):
            try:
                set_cid(fd, cid)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise HostError(
                        f"VHOST_VSOCK_SET_GUEST_CID {cid} on {device} failed: {e.strerror or e}"
                    ) from e
            else:
                return fd, cid
            cid = FIRST_CONTEXT_ID + (cid - FIRST_CONTEXT_ID + 1) % span
        raise HostError(
            f"no free vsock context ID on {device} after {max_attempts} attempts "
            f"starting at {start}"
        )
    except BaseException:
        os.close(fd)
        raise


def generate_vm_socket(id: str, use_vsock: bool, store_path: str) -> Socket | VSock:
    """The agent endpoint for VM `id`: a vsock (reserving a CID) or a Unix socket path."""
    if use_vsock:
        fd, cid = find_context_id()
        return VSock(fd, cid, AGENT_VSOCK_PORT)
    path = build_socket_path(store_path, id, DEFAULT_SOCKET_NAME)
    return Socket(DEFAULT_SOCKET_DEVICE_ID, DEFAULT_SOCKET_ID, path, DEFAULT_SOCKET_CHANNEL_NAME)


# -- processes: in .pids (standard library only: the shim's start and delete import them) ----
process_start_time = pids.process_start_time
pid_is = pids.pid_is
pidfd_of = pids.pidfd_of
signal_process = pids.signal_process


def python_command(*args: str, site: bool = True) -> list[str]:
    """The argv of a child Python interpreter that runs `args` isolated (`-I`).

    Isolated mode keeps the working directory (and PYTHON* variables, user site-packages)
    off `sys.path`: root starting a child from a directory another user can write must not
    import that user's `virtcontainers/`. `site=False` adds `-S` (stdlib-only children).
    """
    return [sys.executable, "-I", *(() if site else ("-S",)), *args]


def kvm_usable() -> bool:
    """True when KVM can really run a guest here (see `kvm_probe`); cached."""
    from .kvm_probe import cached_kvm_probe

    return cached_kvm_probe().usable


# -- check ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckItem:
    """One line of the host report."""

    name: str
    ok: bool
    detail: str


@dataclass
class HostReport:
    """What this host can run: facts plus one `CheckItem` per requirement."""

    arch: str
    kernel: str
    cpus: int
    memory_kib: int | None
    running_on_vmm: bool | None
    kvm: KvmProbe
    accelerator: str
    items: list[CheckItem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (for `virtc check --json`)."""
        return asdict(self)

    def item(self, name: str) -> CheckItem:
        """The item called `name` (KeyError if absent)."""
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(name)


_QEMU_ARCH = {"x86_64": "x86_64", "aarch64": "aarch64", "ppc64le": "ppc64", "s390x": "s390x"}


def _binary_version(path: str, timeout: float = 3.0) -> str:
    import subprocess

    try:
        out = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _binary_item(name: str, env_var: str | None, candidates: list[str]) -> CheckItem:
    path: str | None = None
    source = ""
    if env_var and os.environ.get(env_var):
        path = os.environ[env_var]
        source = f" (from {env_var})"
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return CheckItem(name, False, f"{path}{source} is not an executable file")
    else:
        import shutil

        for cand in candidates:
            found = (
                shutil.which(cand)
                if os.sep not in cand
                else (cand if os.access(cand, os.X_OK) else None)
            )
            if found:
                path = found
                break
    if path is None:
        return CheckItem(name, False, f"not found (looked for {', '.join(candidates)})")
    version = _binary_version(path)
    return CheckItem(name, True, f"{path}{source}" + (f": {version}" if version else ""))


def _device_item(name: str, path: str, hint: str) -> CheckItem:
    if not os.path.exists(path):
        return CheckItem(name, False, f"{path} missing ({hint})")
    if not os.access(path, os.R_OK | os.W_OK):
        return CheckItem(name, False, f"{path} present but not read/writable by this user")
    return CheckItem(name, True, f"{path} present")


def _run_root_item() -> CheckItem:
    from . import persist

    try:
        root = persist.run_root()
    except ConfigError as e:
        return CheckItem("run root", False, str(e))
    probe = root
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    writable = os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)
    if probe == root:
        return CheckItem(
            "run root", writable, f"{root} {'writable' if writable else 'not writable'}"
        )
    return CheckItem(
        "run root",
        writable,
        f"{root} absent; {probe} "
        + ("writable: it can be created" if writable else "is not writable"),
    )


def check() -> HostReport:
    """Inspect this host: facts, the KVM probe, hypervisor binaries, devices, run root."""
    arch = _arch()
    uname = os.uname()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    items: list[CheckItem] = [
        CheckItem("arch", arch in _QEMU_ARCH, arch),
        CheckItem("kernel", True, f"{uname.sysname} {uname.release}"),
        CheckItem("cpus", cpus > 0, str(cpus)),
    ]
    memory: int | None
    try:
        memory = host_memory_kib()
        items.append(CheckItem("memory", True, f"{memory} KiB ({memory // 1024} MiB)"))
    except HostError as e:
        memory = None
        items.append(CheckItem("memory", False, str(e)))
    vmm: bool | None
    try:
        vmm = running_on_vmm()
        items.append(
            CheckItem("running on a VMM", True, "yes (nested virtualization)" if vmm else "no")
        )
    except HostError as e:
        vmm = None
        items.append(CheckItem("running on a VMM", False, str(e)))
    from .kvm_probe import cached_kvm_probe

    kvm = cached_kvm_probe()
    items.append(CheckItem("kvm", kvm.usable, kvm.reason))
    accel = "kvm" if kvm.usable else "tcg"
    items.append(
        CheckItem("accelerator", True, accel if kvm.usable else "tcg (KVM cannot run a guest)")
    )
    qemu_arch = _QEMU_ARCH.get(arch, arch)
    items.append(_binary_item("qemu", None, [f"qemu-system-{qemu_arch}"]))
    items.append(_binary_item("firecracker", "VC_FIRECRACKER", ["firecracker"]))
    items.append(_binary_item("cloud-hypervisor", "VC_CLOUD_HYPERVISOR", ["cloud-hypervisor"]))
    items.append(_binary_item("acrn-dm", None, ["acrn-dm"]))
    items.append(_binary_item("virtiofsd", None, [VIRTIOFSD_PATH, "virtiofsd"]))
    items.append(_binary_item("qemu-storage-daemon", None, ["qemu-storage-daemon"]))
    items.append(_device_item("vhost-vsock", VHOST_VSOCK_DEVICE, "modprobe vhost_vsock"))
    items.append(_device_item("vhost-net", "/dev/vhost-net", "modprobe vhost_net"))
    items.append(_run_root_item())
    return HostReport(
        arch=arch,
        kernel=uname.release,
        cpus=cpus,
        memory_kib=memory,
        running_on_vmm=vmm,
        kvm=kvm,
        accelerator=accel,
        items=items,
    )
