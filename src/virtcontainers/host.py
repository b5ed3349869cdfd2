"""Host facts: memory, CPU flags, vCPU limits, socket paths, vsock CIDs, KVM probe, `check()`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import mmap
import os
import platform
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError, HostError, VCError
from .types import AGENT_VSOCK_PORT, Socket, VSock

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

KVM_DEVICE = "/dev/kvm"
KVM_PROBE_TIMEOUT = 5.0
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

KVMIO = 0xAE
KVM_API_VERSION = 12
_MEMORY_REGION = struct.Struct(
    "=IIQQQ"
)  # slot, flags, guest_phys_addr, memory_size, userspace_addr
_REGS = struct.Struct("=18Q")  # rax..r15, rip, rflags
_SEGMENT = struct.Struct("=QIH8BBB")  # base, limit, selector, type..avl, unusable, padding
_SREGS_SIZE = 8 * _SEGMENT.size + 2 * 16 + 7 * 8 + 4 * 8
_RUN_HEADER = struct.Struct("=BB6xIBBHQQ")  # ..., exit_reason, ..., cr8, apic_base
_RUN_IO = struct.Struct("=BBHIQ")  # direction, size, port, count, data_offset (offset 32)
_RUN_UNION_OFFSET = 32

KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(KVMIO, 0x04)
KVM_CREATE_VCPU = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _iow(KVMIO, 0x46, _MEMORY_REGION.size)
KVM_RUN = _io(KVMIO, 0x80)
KVM_GET_REGS = _ior(KVMIO, 0x81, _REGS.size)
KVM_SET_REGS = _iow(KVMIO, 0x82, _REGS.size)
KVM_GET_SREGS = _ior(KVMIO, 0x83, _SREGS_SIZE)
KVM_SET_SREGS = _iow(KVMIO, 0x84, _SREGS_SIZE)

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_IO_OUT = 1
KVM_EXIT_NAMES = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    11: "KVM_EXIT_SET_TPR",
    12: "KVM_EXIT_TPR_ACCESS",
    16: "KVM_EXIT_NMI",
    17: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
    29: "KVM_EXIT_X86_RDMSR",
    30: "KVM_EXIT_X86_WRMSR",
    37: "KVM_EXIT_NOTIFY",
    39: "KVM_EXIT_MEMORY_FAULT",
}

PROBE_PORT = 0x10
PROBE_VALUE = 0x42
PROBE_CODE_ADDR = 0x1000
PROBE_PAGE_TABLES_ADDR = 0x2000
PROBE_MEM_SIZE = 0x10000
PROBE_ITERATIONS = 10_000_000
"""Guest loop length: ~5 ms under hardware virtualization, seconds when KVM emulates."""
PROBE_RUN_BUDGET = 0.5
"""Seconds the probe guest gets to finish its loop (~100x slack over hardware speed)."""
PROBE_CACHE_FILE = "kvm-probe.json"

_REG_NAMES = [
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
]
_CONTROL = struct.Struct("=7Q")  # cr0, cr2, cr3, cr4, cr8, efer, apic_base
_CONTROL_OFFSET = 8 * _SEGMENT.size + 2 * 16
_CR0_PE, _CR0_MP, _CR0_ET, _CR0_NE = 1 << 0, 1 << 1, 1 << 4, 1 << 5
_CR0_WP, _CR0_AM, _CR0_PG = 1 << 16, 1 << 18, 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10


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


VsockIoctl = Callable[[int, int], None]
"""Sets the guest CID on a vhost-vsock fd; raises OSError (EADDRINUSE when taken)."""


def _set_guest_cid(fd: int, cid: int) -> None:
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


# -- processes --------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the comm field), or None if unreadable."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is "(...)" and may itself contain spaces and ')': split after the LAST ')'.
    close = data.rfind(b")")
    if close < 0:
        return None
    return data[close + 1 :].decode("ascii", "replace").split()


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def pid_is(pid: int, start_time: int | None) -> bool:
    """True when `pid` is alive (not a zombie) and is the process that started at `start_time`.

    Guards every signal sent to a persisted pid: a reused pid has another start time.
    """
    if start_time is None:
        return False
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return False
    try:
        return int(fields[19]) == start_time
    except ValueError:
        return False


def pidfd_of(pid: int, start_time: int | None) -> int | None:
    """A pidfd on `pid` while it is the process that started at `start_time`, else None.

    The pidfd pins that process: a signal sent through it (`signal.pidfd_send_signal`) never
    reaches another process that got the number meanwhile. The caller closes it.
    """
    if pid <= 0 or not pid_is(pid, start_time):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if not pid_is(pid, start_time):  # reused between the check and the open
        os.close(fd)
        return None
    return fd


def signal_process(pid: int, start_time: int | None, sig: int) -> bool:
    """Send `sig` to `pid` if it is still the process that started at `start_time` (through
    a pidfd, see `pidfd_of`); False when that process is gone."""
    fd = pidfd_of(pid, start_time)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True


def python_command(*args: str, site: bool = True) -> list[str]:
    """The argv of a child Python interpreter that runs `args` isolated (`-I`).

    Isolated mode keeps the working directory (and PYTHON* variables, user site-packages)
    off `sys.path`: root starting a child from a directory another user can write must not
    import that user's `virtcontainers/`. `site=False` adds `-S` (stdlib-only children).
    """
    return [sys.executable, "-I", *(() if site else ("-S",)), *args]


# -- KVM probe --------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvmProbe:
    """Whether KVM can run guest code here, and why (the failing step when it cannot)."""

    usable: bool
    reason: str


def exit_reason_name(reason: int) -> str:
    """`KVM_EXIT_*` name for an exit reason number (or `KVM_EXIT_<n>` when unknown)."""
    return KVM_EXIT_NAMES.get(reason, f"KVM_EXIT_{reason}")


def pack_memory_region(slot: int, flags: int, guest_addr: int, size: int, user_addr: int) -> bytes:
    """struct kvm_userspace_memory_region."""
    return _MEMORY_REGION.pack(slot, flags, guest_addr, size, user_addr)


def pack_regs(*, rip: int, rflags: int = 0x2) -> bytes:
    """struct kvm_regs with every general register zero."""
    values = [0] * 18
    values[16] = rip
    values[17] = rflags
    return _REGS.pack(*values)


def unpack_regs(buf: bytes | bytearray) -> dict[str, int]:
    """struct kvm_regs as a name -> value dict."""
    return dict(zip(_REG_NAMES, _REGS.unpack(bytes(buf)), strict=True))


def set_long_mode(sregs: bytearray, pml4_addr: int) -> None:
    """Put kvm_sregs in 64-bit long mode with paging (CR3 = `pml4_addr`), flat segments."""
    _check_sregs(sregs)
    # base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable, padding
    code = (0, 0xFFFFFFFF, 0x8, 0xB, 1, 0, 0, 1, 1, 1, 0, 0, 0)
    data = (0, 0xFFFFFFFF, 0x10, 0x3, 1, 0, 0, 1, 0, 1, 0, 0, 0)
    _SEGMENT.pack_into(sregs, 0, *code)
    for i in range(1, 6):  # ds, es, fs, gs, ss
        _SEGMENT.pack_into(sregs, i * _SEGMENT.size, *data)
    ctrl = list(_CONTROL.unpack_from(sregs, _CONTROL_OFFSET))
    ctrl[0] = _CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_AM | _CR0_PG
    ctrl[2] = pml4_addr
    ctrl[3] = _CR4_PAE
    ctrl[5] = _EFER_LME | _EFER_LMA
    _CONTROL.pack_into(sregs, _CONTROL_OFFSET, *ctrl)


def sregs_control(sregs: bytes | bytearray) -> dict[str, int]:
    """The control registers of kvm_sregs (cr0, cr2, cr3, cr4, cr8, efer, apic_base)."""
    _check_sregs(sregs)
    names = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
    return dict(zip(names, _CONTROL.unpack_from(sregs, _CONTROL_OFFSET), strict=True))


def _check_sregs(sregs: bytes | bytearray) -> None:
    if len(sregs) != _SREGS_SIZE:
        raise ValueError(f"kvm_sregs must be {_SREGS_SIZE} bytes, got {len(sregs)}")


def write_identity_page_tables(mem: bytearray | mmap.mmap, base: int) -> int:
    """Identity-map the first 2 MiB with one large page; tables at `base` (3 pages). Returns CR3."""
    pml4, pdpt, pd = base, base + 0x1000, base + 0x2000
    present_rw = 0x3
    struct.pack_into("<Q", mem, pml4, pdpt | present_rw)
    struct.pack_into("<Q", mem, pdpt, pd | present_rw)
    struct.pack_into("<Q", mem, pd, 0x0 | present_rw | 0x80)  # PS: 2 MiB page at 0
    return pml4


def probe_code(iterations: int) -> bytes:
    """64-bit guest: count `iterations` down in ecx, then `out 0x10, 0x42`, then `hlt`."""
    if not 0 < iterations < 2**32:
        raise ValueError(f"iterations must fit in 32 bits, got {iterations}")
    return (
        b"\xb9"
        + struct.pack("<I", iterations)  # mov ecx, iterations
        + b"\xff\xc9"  # loop: dec ecx
        + b"\x75\xfc"  # jnz loop
        + bytes([0xB0, PROBE_VALUE])  # mov al, 0x42
        + bytes([0xE6, PROBE_PORT])  # out 0x10, al
        + b"\xf4"  # hlt
    )


@dataclass(frozen=True)
class KvmExit:
    """The parts of struct kvm_run the probe reads after KVM_RUN."""

    reason: int
    io_direction: int = 0
    io_size: int = 0
    io_port: int = 0
    io_count: int = 0
    io_data: bytes = b""
    detail: int = 0  # first u64 of the union: entry-failure reason, internal suberror, ...


def parse_kvm_run(run: bytes | bytearray | mmap.mmap) -> KvmExit:
    """Decode exit_reason and, for KVM_EXIT_IO, the I/O details and data from struct kvm_run."""
    exit_reason = _RUN_HEADER.unpack_from(run, 0)[2]
    (detail,) = struct.unpack_from("=Q", run, _RUN_UNION_OFFSET)
    if exit_reason != KVM_EXIT_IO:
        return KvmExit(exit_reason, detail=detail)
    direction, size, port, count, data_offset = _RUN_IO.unpack_from(run, _RUN_UNION_OFFSET)
    end = data_offset + size * count
    data = bytes(run[data_offset:end]) if data_offset > 0 and end <= len(run) else b""
    return KvmExit(exit_reason, direction, size, port, count, data, detail)


def check_probe_exits(first: KvmExit, second: KvmExit | None, elapsed: float = 0.0) -> KvmProbe:
    """Judge the exits of the probe guest: `out 0x10, 0x42` after its loop, then `hlt`."""
    expected = bytes([PROBE_VALUE])
    if first.reason == KVM_EXIT_HLT:
        return KvmProbe(False, "KVM_RUN: guest halted without doing its port write")
    if first.reason != KVM_EXIT_IO:
        return KvmProbe(False, f"KVM_RUN: unexpected exit {_describe_exit(first)}")
    got = (first.io_direction, first.io_port, first.io_size, first.io_count, first.io_data)
    if got != (KVM_EXIT_IO_OUT, PROBE_PORT, 1, 1, expected):
        return KvmProbe(
            False,
            f"KVM_RUN: wrong port I/O (direction {first.io_direction}, port {first.io_port:#x}, "
            f"size {first.io_size}, count {first.io_count}, data {first.io_data.hex() or '-'}; "
            f"expected out {PROBE_PORT:#x} = {PROBE_VALUE:#x})",
        )
    if second is None or second.reason != KVM_EXIT_HLT:
        after = _describe_exit(second) if second else "nothing"
        return KvmProbe(False, f"KVM_RUN: expected KVM_EXIT_HLT after the port write, got {after}")
    return KvmProbe(
        True,
        f"ran a 64-bit guest at hardware speed ({PROBE_ITERATIONS:,} loop iterations in "
        f"{elapsed * 1000:.0f} ms, then out {PROBE_PORT:#x} = {PROBE_VALUE:#x} and hlt)",
    )


def slow_guest_reason(iterations_done: int, budget: float) -> KvmProbe:
    """The verdict when the guest loop did not finish within `budget` seconds."""
    rate = 2 * iterations_done / budget if budget > 0 else 0.0
    return KvmProbe(
        False,
        f"KVM_RUN: guest ran only {iterations_done:,} of {PROBE_ITERATIONS:,} loop iterations "
        f"in {budget:g} s (~{rate:,.0f} instructions/s): KVM emulates guest instructions "
        "instead of running them, so an ordinary guest cannot run (use TCG)",
    )


def _describe_exit(ex: KvmExit) -> str:
    text = f"{exit_reason_name(ex.reason)} ({ex.reason})"
    if ex.reason in (9, 17):  # FAIL_ENTRY: hardware reason; INTERNAL_ERROR: suberror
        text += f", detail {ex.detail:#x}"
    return text


class _ProbeFailure(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")


class _Deadline(Exception):
    """Raised by the probe's interval timer to interrupt a KVM_RUN that takes too long."""


def _ioctl_int(fd: int, request: int, arg: int, step: str) -> int:
    try:
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as e:
        raise _ProbeFailure(step, _errno_text(e)) from e


def _ioctl_buf(fd: int, request: int, buf: bytes | bytearray, step: str) -> None:
    try:
        if isinstance(buf, bytearray):
            fcntl.ioctl(fd, request, buf, True)
        else:
            fcntl.ioctl(fd, request, buf)
    except OSError as e:
        raise _ProbeFailure(step, _errno_text(e)) from e


def _errno_text(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name} ({e.strerror or e})"


def _kvm_run(vcpu: int, run: mmap.mmap) -> KvmExit:
    for _ in range(100):
        try:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
        except InterruptedError:
            continue
        except OSError as e:
            raise _ProbeFailure("KVM_RUN", _errno_text(e)) from e
        return parse_kvm_run(run)
    raise _ProbeFailure("KVM_RUN", "interrupted 100 times in a row")


def _on_deadline(_signum: int, _frame: object) -> None:
    raise _Deadline


def _run_guest(vcpu: int, run: mmap.mmap, budget: float) -> KvmProbe:
    """KVM_RUN the probe guest under an interval timer of `budget` seconds."""
    previous = signal.signal(signal.SIGALRM, _on_deadline)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, budget)
        first = _kvm_run(vcpu, run)
        second = _kvm_run(vcpu, run) if first.reason == KVM_EXIT_IO else None
        signal.setitimer(signal.ITIMER_REAL, 0)
        return check_probe_exits(first, second, time.monotonic() - start)
    except _Deadline:
        regs = bytearray(_REGS.size)
        _ioctl_buf(vcpu, KVM_GET_REGS, regs, "KVM_GET_REGS")
        remaining = unpack_regs(regs)["rcx"] & 0xFFFFFFFF
        return slow_guest_reason(PROBE_ITERATIONS - remaining, budget)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _probe_in_process(
    device: str = KVM_DEVICE,
    progress: Callable[[str], None] | None = None,
    budget: float = PROBE_RUN_BUDGET,
) -> KvmProbe:
    """Run the probe guest in this process (call it only in a disposable child: it uses SIGALRM)."""
    note = progress or (lambda _step: None)
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    try:
        note("open")
        try:
            kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return KvmProbe(False, f"open {device}: no such device (KVM not available)")
        except PermissionError as e:
            return KvmProbe(False, f"open {device}: permission denied ({_errno_text(e)})")
        except OSError as e:
            return KvmProbe(False, f"open {device}: {_errno_text(e)}")
        fds.append(kvm)
        note("KVM_GET_API_VERSION")
        version = _ioctl_int(kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            return KvmProbe(False, f"KVM_GET_API_VERSION: got {version}, need {KVM_API_VERSION}")
        note("KVM_CREATE_VM")
        vm = _ioctl_int(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        fds.append(vm)
        if _arch() != "x86_64":
            note("KVM_CREATE_VCPU")
            fds.append(_ioctl_int(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU"))
            return KvmProbe(
                True, f"created a VM and a vCPU (the guest-code probe is x86_64 only; {_arch()})"
            )

        note("mmap guest memory")
        mem = mmap.mmap(-1, PROBE_MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        maps.append(mem)
        code = probe_code(PROBE_ITERATIONS)
        mem[PROBE_CODE_ADDR : PROBE_CODE_ADDR + len(code)] = code
        cr3 = write_identity_page_tables(mem, PROBE_PAGE_TABLES_ADDR)
        anchor = ctypes.c_char.from_buffer(mem)
        user_addr = ctypes.addressof(anchor)
        del anchor
        note("KVM_SET_USER_MEMORY_REGION")
        region = pack_memory_region(0, 0, 0, PROBE_MEM_SIZE, user_addr)
        _ioctl_buf(vm, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        note("KVM_CREATE_VCPU")
        vcpu = _ioctl_int(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
        fds.append(vcpu)
        note("KVM_GET_VCPU_MMAP_SIZE")
        run_size = _ioctl_int(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        if run_size < _RUN_UNION_OFFSET + _RUN_IO.size:
            return KvmProbe(False, f"KVM_GET_VCPU_MMAP_SIZE: implausible size {run_size}")
        note("mmap kvm_run")
        try:
            run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            return KvmProbe(False, f"mmap kvm_run: {_errno_text(e)}")
        maps.append(run)
        note("KVM_GET_SREGS")
        sregs = bytearray(_SREGS_SIZE)
        _ioctl_buf(vcpu, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        set_long_mode(sregs, cr3)
        note("KVM_SET_SREGS")
        _ioctl_buf(vcpu, KVM_SET_SREGS, bytes(sregs), "KVM_SET_SREGS")
        note("KVM_SET_REGS")
        _ioctl_buf(vcpu, KVM_SET_REGS, pack_regs(rip=PROBE_CODE_ADDR), "KVM_SET_REGS")
        note("KVM_RUN")
        return _run_guest(vcpu, run, budget)
    except _ProbeFailure as e:
        return KvmProbe(False, str(e))
    finally:
        for m in reversed(maps):
            m.close()
        for fd in reversed(fds):
            os.close(fd)


def _probe_child_main(device: str) -> None:
    """Entry point of the probe child: progress lines on stderr, the result as JSON on stdout."""

    def progress(step: str) -> None:
        sys.stderr.write(f"step {step}\n")
        sys.stderr.flush()

    result = _probe_in_process(device, progress)
    sys.stdout.write(json.dumps(asdict(result)) + "\n")
    sys.stdout.flush()


_TIMEOUT_MARK = "probe timed out"
_KILLED_MARK = "probe process killed by"
_CHILD_CODE = (
    "import sys; from virtcontainers.host import _probe_child_main; _probe_child_main(sys.argv[1])"
)


def interpret_probe_output(
    returncode: int | None, stdout: str, stderr: str, *, timeout: float | None = None
) -> KvmProbe:
    """Turn what the probe child did (exit status, output; None = timed out) into a KvmProbe."""
    steps = [ln[5:].strip() for ln in stderr.splitlines() if ln.startswith("step ")]
    last = steps[-1] if steps else "start-up"
    if returncode is None:
        return KvmProbe(
            False, f"{last}: {_TIMEOUT_MARK} after {timeout} s (the guest never exited)"
        )
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        return KvmProbe(False, f"{last}: {_KILLED_MARK} {sig}")
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if returncode != 0 or not lines:
        tail = " | ".join(ln for ln in stderr.splitlines() if not ln.startswith("step "))[-300:]
        return KvmProbe(
            False, f"{last}: probe process exited with code {returncode}: {tail or 'no output'}"
        )
    try:
        doc = json.loads(lines[-1])
        usable, reason = doc["usable"], doc["reason"]
    except (ValueError, KeyError, TypeError):
        return KvmProbe(False, f"{last}: unreadable probe output {lines[-1][:200]!r}")
    if not isinstance(usable, bool) or not isinstance(reason, str) or not reason:
        return KvmProbe(False, f"{last}: malformed probe result {lines[-1][:200]!r}")
    return KvmProbe(usable, reason)


def kvm_probe(device: str = KVM_DEVICE, timeout: float = KVM_PROBE_TIMEOUT) -> KvmProbe:
    """Run real 64-bit guest code under KVM, in a child process bounded by `timeout`.

    `/dev/kvm` opening, KVM_CREATE_VM and even a few guest instructions succeeding do not
    mean an ordinary guest can run: a KVM that emulates instructions (e.g. kvm-pvm on a
    nested host) runs a handful of them but hangs a real kernel. So the guest counts down a
    10-million-iteration loop (milliseconds on hardware virtualization) and must finish
    within `PROBE_RUN_BUDGET`. A hang or crash only costs the child.
    """
    if not os.path.exists(device):
        return KvmProbe(False, f"open {device}: no such device (KVM not available)")
    try:
        proc = subprocess.run(
            python_command("-c", _CHILD_CODE, device),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return interpret_probe_output(None, "", err, timeout=timeout)
    except OSError as e:
        return KvmProbe(False, f"start-up: cannot start the probe process: {_errno_text(e)}")
    return interpret_probe_output(proc.returncode, proc.stdout, proc.stderr)


def probe_cache_key(device: str = KVM_DEVICE) -> str | None:
    """What the probe verdict depends on: this boot, the kernel and the /dev/kvm node."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id = f.read().strip()
        st = os.stat(device)
    except OSError:
        return None
    return f"{boot_id}:{os.uname().release}:{st.st_rdev}:{st.st_ino}:{st.st_ctime_ns}"


def _probe_with_file_cache(device: str = KVM_DEVICE) -> KvmProbe:
    """`kvm_probe()`, reusing a verdict saved by an earlier process during this boot."""
    from . import persist

    key = probe_cache_key(device)
    try:
        path = os.path.join(persist.run_root(), PROBE_CACHE_FILE)
    except ConfigError:
        return kvm_probe(device)
    if key is not None:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if doc.get("key") == key and isinstance(doc.get("usable"), bool):
                return KvmProbe(doc["usable"], str(doc["reason"]))
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    result = kvm_probe(device)
    if key is not None and not _is_transient(result):
        doc = {"key": key, "usable": result.usable, "reason": result.reason}
        with contextlib.suppress(VCError, OSError):
            persist.atomic_write(path, json.dumps(doc).encode())
    return result


def _is_transient(result: KvmProbe) -> bool:
    """Verdicts that may change on a retry (timeouts, crashes) are not saved."""
    return not result.usable and (_TIMEOUT_MARK in result.reason or _KILLED_MARK in result.reason)


@functools.cache
def cached_kvm_probe() -> KvmProbe:
    """The KVM probe verdict, computed once per process (and once per boot via the run root)."""
    return _probe_with_file_cache()


def kvm_usable() -> bool:
    """True when KVM can really run a guest here (see `kvm_probe`); cached."""
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
