"""Unit tests for virtcontainers.host: host facts, socket paths, vsock CIDs, pids, KVM probe."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtcontainers import host, kvm_probe
from virtcontainers.errors import ConfigError, HostError
from virtcontainers.types import Socket, VSock

DATA = Path(__file__).resolve().parent.parent / "data" / "host"


@pytest.fixture(autouse=True)
def isolated_run_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the probe's cache file out of the real run root; probe afresh per test."""
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path / "run-root"))
    kvm_probe.cached_kvm_probe.cache_clear()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- host_memory_kib --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [("meminfo_ok", 24684092), ("meminfo_malformed", 2048), ("meminfo_hex", 1024)],
)
def test_host_memory_kib_fixtures(name: str, expected: int) -> None:
    assert host.host_memory_kib(str(DATA / name)) == expected


@pytest.mark.parametrize("name", ["meminfo_no_memtotal", "meminfo_other_units", "meminfo_empty"])
def test_host_memory_kib_without_memtotal_in_kb(name: str) -> None:
    path = str(DATA / name)
    with pytest.raises(HostError, match="MemTotal") as exc:
        host.host_memory_kib(path)
    assert path in str(exc.value)


def test_host_memory_kib_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(HostError) as exc:
        host.host_memory_kib(path)
    assert path in str(exc.value)


def test_host_memory_kib_real_proc_matches_sysconf() -> None:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    assert host.host_memory_kib() == pages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10", 10),
        ("0x10", 16),
        ("010", 8),
        ("0b11", 3),
        ("0", 0),
        ("+1", None),
        ("-1", None),
        ("1.5", None),
        ("", None),
        (str(2**64), None),
    ],
)
def test_parse_go_uint(text: str, expected: int | None) -> None:
    assert host._parse_go_uint(text) == expected


# -- running_on_vmm ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpuinfo_vmm", True),
        ("cpuinfo_bare_metal", False),
        ("cpuinfo_first_flags_decides", False),
        ("cpuinfo_empty_flags", False),
    ],
)
def test_running_on_vmm_fixtures(name: str, expected: bool) -> None:
    assert host.running_on_vmm(str(DATA / name), arch="x86_64") is expected


def test_running_on_vmm_without_flags_line() -> None:
    path = str(DATA / "cpuinfo_no_flags")
    with pytest.raises(HostError, match="flags") as exc:
        host.running_on_vmm(path, arch="x86_64")
    assert path in str(exc.value)


def test_running_on_vmm_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "cpuinfo")
    with pytest.raises(HostError) as exc:
        host.running_on_vmm(path, arch="x86_64")
    assert path in str(exc.value)


@pytest.mark.parametrize("arch", ["aarch64", "arm64", "ppc64le", "s390x"])
def test_running_on_vmm_is_false_where_unknowable(arch: str, tmp_path: Path) -> None:
    # Not even read: a missing file is no error there.
    assert host.running_on_vmm(str(tmp_path / "missing"), arch=arch) is False
    assert host.running_on_vmm(str(DATA / "cpuinfo_vmm"), arch=arch) is False


def test_running_on_vmm_real_proc_agrees_with_flags() -> None:
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert host.running_on_vmm() is ("hypervisor" in flags)


# -- max_qemu_vcpus ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "expected"),
    [("x86_64", 240), ("amd64", 240), ("ppc64le", 128), ("s390x", 248)],
)
def test_max_qemu_vcpus(arch: str, expected: int) -> None:
    assert host.max_qemu_vcpus(arch=arch) == expected


def test_max_qemu_vcpus_arm64_is_host_cpus() -> None:
    assert host.max_qemu_vcpus(arch="aarch64") == os.cpu_count()
    assert host.max_qemu_vcpus(arch="arm64") == os.cpu_count()


def test_max_qemu_vcpus_default_arch_here() -> None:
    assert host.max_qemu_vcpus() == host.max_qemu_vcpus(arch=os.uname().machine)


# -- socket paths -----------------------------------------------------------------------------
def test_build_socket_path_joins() -> None:
    assert host.build_socket_path("/run/vc", "vm", "abc", "kata.sock") == "/run/vc/vm/abc/kata.sock"


def test_build_socket_path_length_limit() -> None:
    base = "/tmp/"
    ok = base + "a" * (107 - len(base))
    assert len(ok) == 107
    assert host.build_socket_path(ok) == ok
    too_long = ok + "b"
    with pytest.raises(ConfigError) as exc:
        host.build_socket_path(too_long)
    assert "108" in str(exc.value) and too_long in str(exc.value)


def test_build_socket_path_counts_bytes_not_characters() -> None:
    path = "/tmp/" + "é" * 52  # 5 + 104 bytes, only 57 characters
    with pytest.raises(ConfigError, match="109 bytes"):
        host.build_socket_path(path)


@pytest.mark.parametrize("parts", [(), ("",), ("/run", "", "x.sock")])
def test_build_socket_path_refuses_empty(parts: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        host.build_socket_path(*parts)


def test_generate_vm_socket_unix() -> None:
    sock = host.generate_vm_socket("sb1", False, "/run/vc/vm")
    assert sock == Socket("channel0", "charch0", "/run/vc/vm/sb1/kata.sock", "agent.channel.0")


def test_generate_vm_socket_unix_too_long() -> None:
    with pytest.raises(ConfigError, match="too long"):
        host.generate_vm_socket("x" * 100, False, "/run/vc/vm")


def test_generate_vm_socket_vsock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "find_context_id", lambda: (77, 1234))
    assert host.generate_vm_socket("sb1", True, "/unused") == VSock(77, 1234, 1024)


# -- vsock context IDs ------------------------------------------------------------------------
class FakeVsock:
    """Records the CIDs tried; fails with `errors[cid]` (or EADDRINUSE when in `busy`)."""

    def __init__(self, busy: set[int] | None = None, always: int | None = None) -> None:
        self.busy = busy or set()
        self.always = always
        self.tried: list[int] = []
        self.fds: list[int] = []

    def __call__(self, fd: int, cid: int) -> None:
        fcntl.fcntl(fd, fcntl.F_GETFD)  # the fd must be open while we are called
        self.fds.append(fd)
        self.tried.append(cid)
        if self.always is not None:
            raise OSError(self.always, os.strerror(self.always))
        if cid in self.busy:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))


@pytest.fixture
def vsock_dev(tmp_path: Path) -> str:
    dev = tmp_path / "vhost-vsock"
    dev.write_bytes(b"")
    return str(dev)


def test_ioctl_number() -> None:
    assert host.VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60


def test_find_context_id_skips_busy_cids(vsock_dev: str) -> None:
    fake = FakeVsock(busy={100, 101, 102})
    before = fd_count()
    fd, cid = host.find_context_id(device=vsock_dev, ioctl=fake, start=100)
    try:
        assert cid == 103
        assert fake.tried == [100, 101, 102, 103]
        assert fd == fake.fds[-1]
        fcntl.fcntl(fd, fcntl.F_GETFD)  # left open: it holds the CID
        assert fd_count() == before + 1
    finally:
        os.close(fd)


def test_find_context_id_wraps_around(vsock_dev: str) -> None:
    last = host.LAST_CONTEXT_ID
    fake = FakeVsock(busy={last - 1, last, 3})
    fd, cid = host.find_context_id(device=vsock_dev, ioctl=fake, start=last - 1)
    os.close(fd)
    assert fake.tried == [last - 1, last, 3, 4]
    assert cid == 4


def test_find_context_id_bounded_attempts_closes_fd(vsock_dev: str) -> None:
    fake = FakeVsock(always=errno.EADDRINUSE)
    before = fd_count()
    with pytest.raises(HostError, match="after 7 attempts") as exc:
        host.find_context_id(device=vsock_dev, ioctl=fake, start=50, max_attempts=7)
    assert vsock_dev in str(exc.value)
    assert fake.tried == list(range(50, 57))
    assert fd_count() == before


def test_find_context_id_other_errors_stop_at_once(vsock_dev: str) -> None:
    fake = FakeVsock(always=errno.EPERM)
    before = fd_count()
    with pytest.raises(HostError, match="VHOST_VSOCK_SET_GUEST_CID 9 ") as exc:
        host.find_context_id(device=vsock_dev, ioctl=fake, start=9)
    assert os.strerror(errno.EPERM) in str(exc.value)
    assert fake.tried == [9]
    assert fd_count() == before


def test_find_context_id_real_ioctl_on_non_vsock_fd(vsock_dev: str) -> None:
    before = fd_count()
    with pytest.raises(HostError, match="VHOST_VSOCK_SET_GUEST_CID"):
        host.find_context_id(device=vsock_dev, start=3)  # a regular file: ENOTTY
    assert fd_count() == before


def test_find_context_id_random_start_in_range(vsock_dev: str) -> None:
    starts = set()
    for _ in range(20):
        fake = FakeVsock()
        fd, cid = host.find_context_id(device=vsock_dev, ioctl=fake)
        os.close(fd)
        assert host.FIRST_CONTEXT_ID <= cid <= host.LAST_CONTEXT_ID
        assert fake.tried == [cid]
        starts.add(cid)
    assert len(starts) > 1  # random, not a fixed start


def test_find_context_id_missing_device(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="modprobe vhost_vsock"):
        host.find_context_id(device=str(tmp_path / "vhost-vsock"), ioctl=FakeVsock())


@pytest.mark.parametrize(("kwargs"), [{"start": 2}, {"start": 2**32 - 1}, {"max_attempts": 0}])
def test_find_context_id_bad_arguments(vsock_dev: str, kwargs: dict[str, int]) -> None:
    before = fd_count()
    with pytest.raises(ConfigError):
        host.find_context_id(device=vsock_dev, ioctl=FakeVsock(), **kwargs)
    assert fd_count() == before


# -- processes --------------------------------------------------------------------------------
def _uptime_ticks() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")


def test_process_start_time_with_odd_comm(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (c) d"
    odd.symlink_to("/bin/sleep")
    before = _uptime_ticks()
    proc = subprocess.Popen([str(odd), "30"])
    try:
        start = host.process_start_time(proc.pid)
        after = _uptime_ticks()
        assert start is not None
        # Field 22 is the only field bound to lie between these two instants.
        assert before - 2 <= start <= after + 2
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            assert b"(a) b (c) d)" in f.read()  # the parser really met ')' and spaces
        assert host.pid_is(proc.pid, start)
        assert not host.pid_is(proc.pid, start + 1)
        assert not host.pid_is(proc.pid, None)
    finally:
        proc.kill()
        proc.wait()
    assert host.process_start_time(proc.pid) is None
    assert not host.pid_is(proc.pid, start)


def test_pid_is_false_for_zombie() -> None:
    proc = subprocess.Popen(["/bin/sleep", "30"])
    start = host.process_start_time(proc.pid)
    assert start is not None and host.pid_is(proc.pid, start)
    os.kill(proc.pid, signal.SIGKILL)
    for _ in range(200):  # wait for it to become a zombie, without reaping it
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.01)
    try:
        assert host.process_start_time(proc.pid) == start
        assert not host.pid_is(proc.pid, start)
    finally:
        proc.wait()


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 12345])
def test_process_start_time_invalid_pids(pid: int) -> None:
    assert host.process_start_time(pid) is None
    assert not host.pid_is(pid, 1)


def test_own_process_start_time() -> None:
    start = host.process_start_time(os.getpid())
    assert start is not None and 0 < start <= _uptime_ticks() + 2
    assert host.pid_is(os.getpid(), start)


# -- KVM probe: structures --------------------------------------------------------------------
def test_kvm_ioctl_numbers() -> None:
    # Values from <linux/kvm.h> on x86_64.
    assert kvm_probe.KVM_GET_API_VERSION == 0xAE00
    assert kvm_probe.KVM_CREATE_VM == 0xAE01
    assert kvm_probe.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert kvm_probe.KVM_CREATE_VCPU == 0xAE41
    assert kvm_probe.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm_probe.KVM_RUN == 0xAE80
    assert kvm_probe.KVM_GET_REGS == 0x8090AE81
    assert kvm_probe.KVM_SET_REGS == 0x4090AE82
    assert kvm_probe.KVM_GET_SREGS == 0x8138AE83
    assert kvm_probe.KVM_SET_SREGS == 0x4138AE84


def test_pack_memory_region_layout() -> None:
    buf = kvm_probe.pack_memory_region(1, 2, 0x1000, 0x10000, 0x7F0000001000)
    assert len(buf) == 32
    assert struct.unpack("<IIQQQ", buf) == (1, 2, 0x1000, 0x10000, 0x7F0000001000)


def test_pack_regs_layout() -> None:
    buf = kvm_probe.pack_regs(rip=0x1000)
    assert len(buf) == 144
    assert struct.unpack_from("<Q", buf, 16 * 8) == (0x1000,)
    assert struct.unpack_from("<Q", buf, 17 * 8) == (0x2,)
    regs = kvm_probe.unpack_regs(buf)
    assert regs["rip"] == 0x1000 and regs["rflags"] == 2 and regs["rcx"] == 0


def test_set_long_mode() -> None:
    sregs = bytearray(312)
    kvm_probe.set_long_mode(sregs, 0x2000)
    ctrl = kvm_probe.sregs_control(sregs)
    assert ctrl["cr3"] == 0x2000
    assert ctrl["cr0"] & 0x80000001 == 0x80000001  # PG | PE
    assert ctrl["cr4"] & 0x20  # PAE
    assert ctrl["efer"] & 0x500 == 0x500  # LME | LMA
    # cs: selector 8, type 0xb (code, read, accessed), present, s, l=1, g; db must be 0.
    base, limit, selector, type_, present, dpl, db, s, l_bit, g = struct.unpack_from(
        "<QIH8B", sregs, 0
    )[:10]
    assert (base, limit, selector, type_, present, dpl, db, s, l_bit, g) == (
        0,
        0xFFFFFFFF,
        8,
        0xB,
        1,
        0,
        0,
        1,
        1,
        1,
    )
    for i in range(1, 6):  # ds es fs gs ss
        assert struct.unpack_from("<H", sregs, i * 24 + 12) == (0x10,)


def test_sregs_size_checked() -> None:
    with pytest.raises(ValueError, match="312"):
        kvm_probe.set_long_mode(bytearray(100), 0)


def test_identity_page_tables() -> None:
    mem = bytearray(0x10000)
    cr3 = kvm_probe.write_identity_page_tables(mem, 0x2000)
    assert cr3 == 0x2000
    assert struct.unpack_from("<Q", mem, 0x2000) == (0x3003,)
    assert struct.unpack_from("<Q", mem, 0x3000) == (0x4003,)
    assert struct.unpack_from("<Q", mem, 0x4000) == (0x83,)


def test_probe_code() -> None:
    code = kvm_probe.probe_code(1000)
    assert code[0] == 0xB9 and struct.unpack_from("<I", code, 1) == (1000,)
    assert code[5:9] == b"\xff\xc9\x75\xfc"  # dec ecx; jnz back to the dec
    assert code[-5:] == bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])
    with pytest.raises(ValueError):
        kvm_probe.probe_code(0)


def _run_buffer(reason: int, io: tuple[int, int, int, int, int] | None = None) -> bytearray:
    buf = bytearray(4096)
    struct.pack_into("<I", buf, 8, reason)
    if io is not None:
        struct.pack_into("<BBHIQ", buf, 32, *io)
    return buf


def test_parse_kvm_run_io() -> None:
    buf = _run_buffer(2, (1, 1, 0x10, 1, 0x1000 - 8))
    buf[0x1000 - 8] = 0x42
    ex = kvm_probe.parse_kvm_run(buf)
    assert (ex.reason, ex.io_direction, ex.io_size, ex.io_port, ex.io_count) == (2, 1, 1, 0x10, 1)
    assert ex.io_data == b"\x42"


def test_parse_kvm_run_other_exit_keeps_detail() -> None:
    buf = _run_buffer(9)
    struct.pack_into("<Q", buf, 32, 0x80000021)
    ex = kvm_probe.parse_kvm_run(buf)
    assert ex.reason == 9 and ex.detail == 0x80000021 and ex.io_data == b""


def test_parse_kvm_run_data_offset_out_of_range() -> None:
    ex = kvm_probe.parse_kvm_run(_run_buffer(2, (1, 1, 0x10, 1, 10_000)))
    assert ex.io_data == b""


IO_OK = kvm_probe.KvmExit(2, 1, 1, 0x10, 1, b"\x42")
HLT = kvm_probe.KvmExit(5)


def test_check_probe_exits_success() -> None:
    result = kvm_probe.check_probe_exits(IO_OK, HLT, 0.004)
    assert result.usable
    assert "4 ms" in result.reason


@pytest.mark.parametrize(
    ("first", "second", "words"),
    [
        (kvm_probe.KvmExit(9, detail=0x21), None, ["KVM_RUN", "KVM_EXIT_FAIL_ENTRY (9)", "0x21"]),
        (kvm_probe.KvmExit(17, detail=1), None, ["KVM_EXIT_INTERNAL_ERROR (17)"]),
        (kvm_probe.KvmExit(8), None, ["KVM_EXIT_SHUTDOWN (8)"]),
        (kvm_probe.KvmExit(99), None, ["KVM_EXIT_99 (99)"]),
        (HLT, None, ["halted without"]),
        (kvm_probe.KvmExit(2, 1, 1, 0x11, 1, b"\x42"), HLT, ["wrong port I/O", "port 0x11"]),
        (kvm_probe.KvmExit(2, 1, 1, 0x10, 1, b"\x41"), HLT, ["wrong port I/O", "data 41"]),
        (kvm_probe.KvmExit(2, 0, 1, 0x10, 1, b"\x42"), HLT, ["direction 0"]),
        (IO_OK, kvm_probe.KvmExit(6), ["KVM_EXIT_HLT", "KVM_EXIT_MMIO (6)"]),
        (IO_OK, None, ["expected KVM_EXIT_HLT", "nothing"]),
    ],
)
def test_check_probe_exits_failures(
    first: kvm_probe.KvmExit, second: kvm_probe.KvmExit | None, words: list[str]
) -> None:
    result = kvm_probe.check_probe_exits(first, second)
    assert not result.usable
    assert result.reason.startswith("KVM_RUN:")
    for word in words:
        assert word in result.reason


def test_slow_guest_reason() -> None:
    result = kvm_probe.slow_guest_reason(750_000, 0.5)
    assert not result.usable
    assert result.reason.startswith("KVM_RUN:")
    assert "750,000 of 10,000,000" in result.reason
    assert "3,000,000 instructions/s" in result.reason


# -- KVM probe: report logic ------------------------------------------------------------------
def test_interpret_success() -> None:
    out = json.dumps({"usable": True, "reason": "ran a guest"}) + "\n"
    assert kvm_probe.interpret_probe_output(
        0, out, "step open\nstep KVM_RUN\n"
    ) == kvm_probe.KvmProbe(True, "ran a guest")


def test_interpret_failure_from_child() -> None:
    out = json.dumps({"usable": False, "reason": "KVM_CREATE_VM: EPERM"})
    assert kvm_probe.interpret_probe_output(0, out, "") == kvm_probe.KvmProbe(
        False, "KVM_CREATE_VM: EPERM"
    )


def test_interpret_timeout_names_last_step() -> None:
    result = kvm_probe.interpret_probe_output(
        None, "", "step open\nstep KVM_CREATE_VM\nstep KVM_RUN\n", timeout=5.0
    )
    assert not result.usable
    assert result.reason.startswith("KVM_RUN: probe timed out after 5.0 s")


def test_interpret_signal() -> None:
    result = kvm_probe.interpret_probe_output(
        -signal.SIGSEGV, "", "step open\nstep KVM_SET_SREGS\n"
    )
    assert not result.usable
    assert result.reason == "KVM_SET_SREGS: probe process killed by SIGSEGV"


def test_interpret_exit_code_with_stderr_tail() -> None:
    result = kvm_probe.interpret_probe_output(1, "", "step open\nTraceback...\nImportError: boom\n")
    assert not result.usable
    assert "open:" in result.reason and "code 1" in result.reason and "boom" in result.reason


@pytest.mark.parametrize(
    "stdout",
    ["not json", json.dumps({"usable": "yes", "reason": "x"}), json.dumps({"usable": True}), "[]"],
)
def test_interpret_garbage(stdout: str) -> None:
    result = kvm_probe.interpret_probe_output(0, stdout, "step KVM_RUN\n")
    assert not result.usable
    assert result.reason.startswith("KVM_RUN:")


def test_interpret_no_output() -> None:
    result = kvm_probe.interpret_probe_output(0, "", "")
    assert not result.usable and "start-up" in result.reason


# -- KVM probe: real runs ---------------------------------------------------------------------
PROBE_STEPS = (
    "open",
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "mmap guest memory",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_CREATE_VCPU",
    "KVM_GET_VCPU_MMAP_SIZE",
    "mmap kvm_run",
    "KVM_GET_SREGS",
    "KVM_SET_SREGS",
    "KVM_SET_REGS",
    "KVM_RUN",
    "KVM_GET_REGS",
    "start-up",
)


def test_real_kvm_probe() -> None:
    result = kvm_probe.kvm_probe()
    assert isinstance(result.usable, bool)
    assert result.reason
    if result.usable:
        assert "ran a 64-bit guest" in result.reason
    else:
        step = result.reason.split(":", 1)[0]
        assert step in PROBE_STEPS or step == "open /dev/kvm"
        if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
            # The device opens here: the failure lies in creating or running the guest.
            assert not result.reason.startswith("open")


def test_kvm_probe_missing_device(tmp_path: Path) -> None:
    result = kvm_probe.kvm_probe(str(tmp_path / "kvm"))
    assert result == kvm_probe.KvmProbe(
        False, f"open {tmp_path / 'kvm'}: no such device (KVM not available)"
    )


def test_kvm_probe_not_a_kvm_device() -> None:
    result = kvm_probe.kvm_probe("/dev/null")  # opens, but is no KVM: the first ioctl fails
    assert not result.usable
    assert result.reason.startswith("KVM_GET_API_VERSION: ENOTTY")


def test_kvm_probe_timeout_kills_child() -> None:
    before = set(os.listdir("/proc"))
    result = kvm_probe.kvm_probe("/dev/null", timeout=0.001)
    assert not result.usable
    assert "probe timed out after 0.001 s" in result.reason
    assert result.reason.split(":", 1)[0] in PROBE_STEPS
    children = [p for p in set(os.listdir("/proc")) - before if p.isdigit()]
    for pid in children:  # no probe child survives
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"_probe_child_main" not in f.read()


def test_kvm_probe_cache_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path))
    calls: list[str] = []
    verdict = kvm_probe.KvmProbe(False, "KVM_RUN: canned")

    def fake_probe(device: str = kvm_probe.KVM_DEVICE, timeout: float = 5.0) -> kvm_probe.KvmProbe:
        calls.append(device)
        return verdict

    monkeypatch.setattr(kvm_probe, "kvm_probe", fake_probe)
    monkeypatch.setattr(kvm_probe, "probe_cache_key", lambda device=kvm_probe.KVM_DEVICE: "key-1")
    assert kvm_probe._probe_with_file_cache() == verdict
    assert len(calls) == 1
    saved = json.loads((tmp_path / kvm_probe.PROBE_CACHE_FILE).read_text())
    assert saved == {"key": "key-1", "usable": False, "reason": "KVM_RUN: canned"}
    assert (tmp_path / kvm_probe.PROBE_CACHE_FILE).stat().st_mode & 0o777 == 0o600
    assert kvm_probe._probe_with_file_cache() == verdict
    assert len(calls) == 1  # answered from the file
    monkeypatch.setattr(kvm_probe, "probe_cache_key", lambda device=kvm_probe.KVM_DEVICE: "key-2")
    verdict = kvm_probe.KvmProbe(True, "ran a 64-bit guest")
    assert kvm_probe._probe_with_file_cache() == verdict
    assert len(calls) == 2  # another boot or /dev/kvm: probed again


def test_kvm_probe_cache_skips_transient(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path))
    monkeypatch.setattr(kvm_probe, "probe_cache_key", lambda device=kvm_probe.KVM_DEVICE: "k")
    timed_out = kvm_probe.interpret_probe_output(None, "", "step KVM_RUN\n", timeout=5.0)
    monkeypatch.setattr(kvm_probe, "kvm_probe", lambda device=kvm_probe.KVM_DEVICE: timed_out)
    assert kvm_probe._probe_with_file_cache() == timed_out
    assert not (tmp_path / kvm_probe.PROBE_CACHE_FILE).exists()


def test_probe_cache_key_tracks_device(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    key1 = kvm_probe.probe_cache_key(str(dev))
    dev.unlink()
    assert kvm_probe.probe_cache_key(str(dev)) is None
    dev.write_bytes(b"")
    os.utime(dev, ns=(1, 1))  # a recreated node gets a new ctime
    assert key1 is not None and kvm_probe.probe_cache_key(str(dev)) not in (None, key1)


def test_kvm_usable_matches_cached_probe() -> None:
    assert host.kvm_usable() is kvm_probe.cached_kvm_probe().usable


# -- check ------------------------------------------------------------------------------------
EXPECTED_ITEMS = {
    "arch",
    "kernel",
    "cpus",
    "memory",
    "running on a VMM",
    "kvm",
    "accelerator",
    "qemu",
    "firecracker",
    "cloud-hypervisor",
    "acrn-dm",
    "virtiofsd",
    "qemu-storage-daemon",
    "vhost-vsock",
    "vhost-net",
    "run root",
}


def test_check_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fc = tmp_path / "firecracker"
    fc.write_text("#!/bin/sh\necho 'Firecracker v9.9.9'\n")
    fc.chmod(0o755)
    monkeypatch.setenv("VC_FIRECRACKER", str(fc))
    monkeypatch.setenv("VC_CLOUD_HYPERVISOR", str(tmp_path / "missing-clh"))
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path / "run" / "vc"))
    report = host.check()
    assert {it.name for it in report.items} == EXPECTED_ITEMS
    assert all(it.detail for it in report.items)
    assert report.arch == os.uname().machine
    assert report.kernel == os.uname().release
    assert report.memory_kib == host.host_memory_kib()
    assert report.accelerator == ("kvm" if report.kvm.usable else "tcg")
    assert report.item("kvm").ok is report.kvm.usable
    fc_item = report.item("firecracker")
    assert fc_item.ok and "VC_FIRECRACKER" in fc_item.detail and "v9.9.9" in fc_item.detail
    clh_item = report.item("cloud-hypervisor")
    assert not clh_item.ok and "missing-clh" in clh_item.detail
    assert report.item("vhost-vsock").ok is os.path.exists("/dev/vhost-vsock")
    assert report.item("vhost-net").ok is os.path.exists("/dev/vhost-net")
    if os.access(host.VIRTIOFSD_PATH, os.X_OK):
        assert report.item("virtiofsd").ok
        assert host.VIRTIOFSD_PATH in report.item("virtiofsd").detail
    run_root = report.item("run root")
    assert run_root.ok and str(tmp_path / "run" / "vc") in run_root.detail
    qemu = report.item("qemu")
    qemu_bin = f"qemu-system-{os.uname().machine}"
    assert qemu.ok is (shutil.which(qemu_bin) is not None)
    if qemu.ok:
        assert "QEMU emulator version" in qemu.detail
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["accelerator"] == report.accelerator
    assert doc["kvm"] == {"usable": report.kvm.usable, "reason": report.kvm.reason}
    assert [i["name"] for i in doc["items"]] == [i.name for i in report.items]
    with pytest.raises(KeyError):
        report.item("nope")


def test_check_run_root_not_writable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    monkeypatch.setenv("VC_RUN_ROOT", str(ro / "file" / "vc"))  # parent is not a directory
    item = host._run_root_item()
    assert not item.ok and "not writable" in item.detail


def test_probe_child_entry_point_runs_in_fresh_interpreter() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", kvm_probe._CHILD_CODE, "/dev/null"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["usable"] is False and doc["reason"].startswith("KVM_GET_API_VERSION")
    assert "step open" in proc.stderr


def test_cpu_flags_and_constant_tsc_khz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2299.998\nflags\t\t: fpu tsc constant_tsc\n")
    assert host.cpu_flags(str(info)) == {"fpu", "tsc", "constant_tsc"}
    assert host.cpu_flags(str(tmp_path / "missing")) == frozenset()
    monkeypatch.setattr(host, "tsc_khz", lambda: 2_299_998)
    monkeypatch.setattr(host, "cpu_flags", lambda: frozenset({"constant_tsc"}))
    assert host.constant_tsc_khz() == 2_299_998
    monkeypatch.setattr(host, "cpu_flags", lambda: frozenset({"tsc"}))
    assert host.constant_tsc_khz() == 0  # a varying rate says nothing about the guest's
