"""The KVM probe: whether KVM can really run a guest here, found by running one.

`/dev/kvm` existing does not mean KVM works (a nested or emulating KVM may hang a real
kernel), so a child process builds a VM with 64-bit page tables and runs a tight loop of
guest code under a time budget. The verdict is cached per process and, through the run root,
per boot. `host.kvm_usable()` is the public question; `host.check()` reports the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import ConfigError, VCError
from .host import _arch, _io, _ior, _iow, python_command

KVM_DEVICE = "/dev/kvm"
KVM_PROBE_TIMEOUT = 5.0

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
    "import sys; from virtcontainers.kvm_probe import _probe_child_main; "
    "_probe_child_main(sys.argv[1])"
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
