"""libvirt as a baseline: its daemons (started here when not running) and a domain built like
the driver's VM (same kernel, initrd, command line, CPU model, memory, root ports, agent port).

The Python bindings come from Debian's `python3-libvirt` (loaded from its own directory, nothing
else of the system's site-packages is imported): the PyPI `libvirt-python` must be compiled
against libvirt-dev. Calls are timed in-process, so no `virsh` start-up is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from _lib import MARKER, Skip

from virtcontainers.agent import AgentClient
from virtcontainers.host import socket_listening

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
RUN_DIR = "/run/libvirt"
LIBVIRT_SOCK = f"{RUN_DIR}/libvirt-sock"
VIRTLOGD_SOCK = f"{RUN_DIR}/virtlogd-sock"
KVM_DEVICE = "/dev/kvm"
QEMU_LOG_DIR = "/var/log/libvirt/qemu"
DAEMON_START_TIMEOUT = 15.0
INSTALL_HINT = (
    "apt-get install -y --no-install-recommends libvirt-daemon-system libvirt-clients "
    "python3-libvirt"
)


def load_bindings() -> ModuleType:
    """The `libvirt` module of Debian's python3-libvirt; `Skip` when it is not installed."""
    if "libvirt" in sys.modules:
        return sys.modules["libvirt"]
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}-x86_64-linux-gnu"
    ext = os.path.join(DIST_PACKAGES, f"libvirtmod.{tag}.so")
    py = os.path.join(DIST_PACKAGES, "libvirt.py")
    if not (os.path.exists(ext) and os.path.exists(py)):
        raise Skip(f"libvirt Python bindings for this Python not found ({ext}); {INSTALL_HINT}")
    for name, path in (("libvirtmod", ext), ("libvirt", py)):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise Skip(f"cannot load the libvirt bindings from {path}: {exc}") from exc
    return sys.modules["libvirt"]


def _kvm_hidden_from_qemu_user() -> bool:
    """True when /dev/kvm exists but libvirt's QEMU user (group kvm) may not open it.

    libvirt then finds KVM "enabled when probing but not available now", calls its cached
    QEMU capabilities outdated and probes QEMU again on every lookup (about 40 s per domain
    start here): a host quirk, not libvirt's normal cost.
    """
    try:
        st = os.stat(KVM_DEVICE)
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return False
    return not (st.st_mode & 0o006 == 0o006 or (st.st_gid == kvm_gid and st.st_mode & 0o060))


def _libvirtd_argv(binary: str, work_dir: str) -> tuple[list[str], str]:
    """libvirtd's command line; in a private mount namespace with a 0660 root:kvm /dev/kvm
    (the Debian default) when the host's is root-only. Returns (argv, note)."""
    if not _kvm_hidden_from_qemu_user():
        return [binary], ""
    node = os.path.join(work_dir, "kvm")
    st = os.stat(KVM_DEVICE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node)
    os.mknod(node, 0o660 | stat.S_IFCHR, st.st_rdev)
    os.chown(node, 0, grp.getgrnam("kvm").gr_gid)
    os.chmod(node, 0o660)
    script = f"mount --bind {node} {KVM_DEVICE} && exec {binary}"
    note = (
        f"libvirtd ran in a private mount namespace where {KVM_DEVICE} is 0660 root:kvm (the "
        "Debian default; the host's is 0600 root:root, which makes libvirt re-probe QEMU on "
        "every domain start); domains are type='qemu' (TCG) either way"
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], note


@contextlib.contextmanager
def daemons(work_dir: str) -> Iterator[list[str]]:
    """Make sure virtlogd and libvirtd answer; start (and afterwards stop) the missing ones.

    Yields notes on what was started and how.
    """
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    notes: list[str] = []
    try:
        for name, sock in (("virtlogd", VIRTLOGD_SOCK), ("libvirtd", LIBVIRT_SOCK)):
            if socket_listening(sock):
                notes.append(f"{name} was already running (not started by the benchmark)")
                continue
            binary = shutil.which(name) or f"/usr/sbin/{name}"
            if not os.path.exists(binary):
                raise Skip(f"{name} not installed; {INSTALL_HINT}")
            argv = [binary]
            if name == "libvirtd":
                argv, note = _libvirtd_argv(binary, work_dir)
                if note:
                    notes.append(note)
            log_path = os.path.join(work_dir, f"{name}.log")
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            started.append((name, proc))
            deadline = time.monotonic() + DAEMON_START_TIMEOUT
            while not socket_listening(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Skip(f"{name} did not start (exit code {proc.poll()}); see {log_path}")
                time.sleep(0.05)
            notes.append(f"{name} started by the benchmark and stopped after it")
        try:
            yield notes
        except BaseException:
            _report_daemons(started, work_dir)
            raise
    finally:
        for _name, proc in reversed(started):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _report_daemons(started: list[tuple[str, subprocess.Popen[bytes]]], work_dir: str) -> None:
    """After a failure: say whether the daemons started here are still alive, and their logs."""
    for name, proc in started:
        state = "running" if proc.poll() is None else f"exited with code {proc.returncode}"
        print(f"  {name} (pid {proc.pid}) {state}; end of its log:", file=sys.stderr)
        try:
            with open(os.path.join(work_dir, f"{name}.log"), "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
        except OSError:
            tail = "(no log)"
        print("    " + tail.replace("\n", "\n    "), file=sys.stderr)


@dataclass
class DomainSpec:
    """What the domain is made of: mirrors the driver's LaunchSpec for a q35 VM."""

    name: str
    kernel: str
    initrd: str
    cmdline: str
    console_path: str
    """A Unix socket we listen on; QEMU connects to it (nothing printed is lost)."""
    agent_path: str
    """The agent's virtio-serial port `agent.channel.0`, a socket QEMU listens on."""
    memory_mib: int = 256
    vcpus: int = 1
    max_vcpus: int = 1
    root_ports: int = 2
    machine: str = "q35"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    defaults: bool = False
    """libvirt's defaults (`defaults_domain_xml`) instead of a domain built like the driver's."""
    scsi: bool = False
    """Give the defaults domain a virtio-scsi controller (for SCSI disk hotplug)."""


def domain_xml(spec: DomainSpec) -> str:
    """The domain for `spec`: built like the driver's VM, or libvirt's defaults."""
    return defaults_domain_xml(spec) if spec.defaults else tuned_domain_xml(spec)


def _domain_head(spec: DomainSpec) -> tuple[ET.Element, ET.Element]:
    """A `type='qemu'` domain's size and direct kernel boot, and its <features> (ACPI)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu", placement="static", current=str(spec.vcpus)).text = str(
        spec.max_vcpus
    )
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    ET.SubElement(os_, "kernel").text = spec.kernel
    ET.SubElement(os_, "initrd").text = spec.initrd
    ET.SubElement(os_, "cmdline").text = spec.cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    return dom, features


def _console_and_agent(devices: ET.Element, spec: DomainSpec) -> None:
    """The serial console to our socket and the agent's virtio-serial channel."""
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="connect", path=spec.console_path)
    ET.SubElement(serial, "target", type="isa-serial", port="0")
    chan = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(chan, "source", mode="bind", path=spec.agent_path)
    ET.SubElement(chan, "target", type="virtio", name="agent.channel.0")


def _root_without_relabelling(dom: ET.Element) -> None:
    """QEMU runs as root with no relabelling (as libvirt-qemu it could not reach our sockets)."""
    sec = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(sec, "label").text = "+0:+0"


def defaults_domain_xml(spec: DomainSpec) -> str:
    """What `virt-install --machine q35 --boot kernel=..,initrd=..,kernel_args=..` writes:
    size, direct kernel boot, ACPI/APIC, the serial console and the agent channel; libvirt
    adds its default controllers (USB, SATA, root ports), input devices and memory balloon,
    and QEMU's default CPU model for TCG. One host setting is kept: QEMU runs as root with
    no relabelling (as libvirt-qemu it could not reach the benchmark's sockets)."""
    dom, features = _domain_head(spec)
    ET.SubElement(features, "apic")
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = spec.emulator
    if spec.scsi:  # what `virt-install --controller scsi,model=virtio-scsi` adds
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    _console_and_agent(devices, spec)
    _root_without_relabelling(dom)
    return ET.tostring(dom, encoding="unicode")


def tuned_domain_xml(spec: DomainSpec) -> str:
    """A transient `type='qemu'` (TCG) domain with direct kernel boot, built like the
    driver's VM (no USB, no balloon, controllers placed by hand)."""
    dom, _features = _domain_head(spec)
    ET.SubElement(dom, "cpu", mode="maximum", check="none")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = spec.emulator
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    for i in range(spec.root_ports):
        ET.SubElement(devices, "controller", type="pci", index=str(i + 1), model="pcie-root-port")
    # On pcie.0 like the driver's: libvirt would otherwise use up the root ports meant for
    # hotplug.
    scsi = ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    ET.SubElement(scsi, "address", type="pci", domain="0", bus="0", slot="5", function="0")
    vser = ET.SubElement(devices, "controller", type="virtio-serial", index="0")
    ET.SubElement(vser, "address", type="pci", domain="0", bus="0", slot="6", function="0")
    _console_and_agent(devices, spec)
    ET.SubElement(devices, "memballoon", model="none")
    # QEMU runs as root with no relabelling, like the driver's QEMU: libvirt skips work here.
    _root_without_relabelling(dom)
    return ET.tostring(dom, encoding="unicode")


def scsi_disk_xml(path: str, target: str, serial: str = "") -> str:
    """A raw file as a SCSI disk on the virtio-scsi controller (the driver's default bus)."""
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev=target, bus="scsi")
    if serial:
        ET.SubElement(disk, "serial").text = serial
    return ET.tostring(disk, encoding="unicode")


class Libvirt:
    """A connection to the system libvirtd (qemu:///system)."""

    def __init__(self) -> None:
        self.lv = load_bindings()
        self.conn: Any = self.lv.open("qemu:///system")
        if self.conn is None:
            raise Skip("cannot connect to qemu:///system")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def version(self) -> str:
        v = int(self.conn.getLibVersion())
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

    @property
    def live(self) -> int:
        return int(self.lv.VIR_DOMAIN_AFFECT_LIVE)

    def create(self, spec: DomainSpec) -> Any:
        """Start a transient domain (returns when QEMU runs the guest)."""
        return self.conn.createXML(domain_xml(spec), 0)

    def destroy(self, dom: Any) -> None:
        """Kill the domain's QEMU (SIGTERM, then SIGKILL); returns once it is gone. The log
        libvirt kept for the (transient) domain is removed too."""
        with contextlib.suppress(self.lv.libvirtError):
            name = dom.name()
            dom.destroy()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(QEMU_LOG_DIR, f"{name}.log"))


def qemu_pid(name: str) -> int:
    """The pid of a running domain's QEMU (libvirt's pid file)."""
    with open(f"{RUN_DIR}/qemu/{name}.pid", encoding="ascii") as f:
        return int(f.read().strip())


class ConsoleListener:
    """A listening Unix socket the domain's serial console connects to; waits for MARKER,
    then keeps reading (and dropping) the output, as the driver keeps logging its console:
    an unread socket would fill up and stall the guest's serial writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._sock.setblocking(False)
        self._conn: socket.socket | None = None
        self._drain: asyncio.Task[None] | None = None

    async def wait_marker(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if self._conn is None:
                self._conn, _ = await loop.sock_accept(self._sock)
            seen = b""
            while MARKER not in seen:
                chunk = await loop.sock_recv(self._conn, 4096)
                if not chunk:
                    raise RuntimeError("libvirt console closed before the ready marker")
                seen = seen[-len(MARKER) :] + chunk
        self._drain = asyncio.create_task(self._drain_output(self._conn))

    @staticmethod
    async def _drain_output(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while await loop.sock_recv(conn, 65536):
                pass

    def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self._conn is not None:
            self._conn.close()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def session(work_dir: str) -> Iterator[tuple[Libvirt, list[str]]]:
    """The daemons (started if needed) and a connection; yields (connection, notes)."""
    load_bindings()
    with daemons(work_dir) as notes:
        lv = Libvirt()
        try:
            yield lv, notes
        finally:
            lv.close()


class Domain:
    """A running transient domain booted to its agent (use `async with Domain.boot(...)`)."""

    def __init__(self, lv: Libvirt, spec: DomainSpec, console: ConsoleListener) -> None:
        self.lv = lv
        self.spec = spec
        self.console = console
        self.dom: Any = None
        self.agent: AgentClient | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def boot(
        cls, lv: Libvirt, spec: DomainSpec, timeout: float = 120.0
    ) -> AsyncIterator[Domain]:
        """Create the domain, wait for the marker and connect to its agent; destroy on exit."""
        d = cls(lv, spec, ConsoleListener(spec.console_path))
        try:
            d.dom = lv.create(spec)
            await d.console.wait_marker(timeout)
            d.agent = await AgentClient.connect(spec.agent_path, timeout)
            yield d
        finally:
            if d.agent is not None:
                await d.agent.close()
            if d.dom is not None:
                lv.destroy(d.dom)
            d.console.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spec.agent_path)
