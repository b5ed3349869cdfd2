"""Cold boot to agent-ready and teardown: virtcontainers vs raw QEMU vs libvirt (two domains).

All boot the same kernel (one Debian kernel package) and initrd, 1 vCPU (2 max), 256 MiB,
q35 under TCG, and are timed to
the same point: the agent's `VC-AGENT-READY` line on the serial console (`boot`); then to the
agent's first answer over its virtio-serial port (`agent`). virtcontainers is timed from
`create_sandbox` (config validation, VM directory, argv) to the marker; raw QEMU runs the
exact argv the driver builds (see `boot.py`), timed from `Popen`; libvirt is timed from
`createXML`, in two versions. `libvirt` ("libvirt (defaults)" in the report) is the
domain a libvirt user writes for this kernel (what `virt-install --boot
kernel=..,initrd=..,kernel_args="console=ttyS0"` produces: the kernel as its package ships
it, the compressed bzImage; libvirt's default devices, controllers and CPU model, and the
minimal command line `console=ttyS0`, all the agent needs to boot and print its marker): the
baseline of the "<= 0.8x libvirt" target. virtcontainers boots the ELF vmlinux its asset
build extracts from that bzImage, through the kernel's PVH entry (no decompression in the
guest).
`libvirt_same_cmdline` ("libvirt (same cmdline)") is a domain built like the driver's VM and
given the driver's own kernel (the ELF vmlinux) and tuned command line (Kata's fast-boot
parameters, `quiet`): it measures launch overhead alone.

`teardown` is stop-until-reaped: the driver's `stop_sandbox` + `cleanup` (QMP quit, reap,
files removed), SIGTERM + wait for raw QEMU, `virDomainDestroy` until the QEMU pid is gone
for libvirt. Where the time goes: `create` (virtcontainers: `create_sandbox` + agent port,
before QEMU starts) and `launch` (until QMP is connected: the driver's `start_sandbox`; raw:
QEMU's QMP greeting).

    .venv/bin/python benchmarks/cold_boot.py [--runs 10] [--quick]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import boot
from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    Skip,
    add_metrics,
    add_ratio,
    alternate,
    main,
    new_result,
    temp_run_root,
    wait_gone,
)

from virtcontainers.agent import AgentClient
from virtcontainers.devices import SerialPort
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.guest import ensure_assets
from virtcontainers.types import serialize_params

MACHINE = "q35"
BOOT_TIMEOUT = 120.0
AGENT_TIMEOUT = 30.0
TITLE = "Cold boot to agent-ready (q35, TCG)"
BOOT_RUNS_FACTOR = 2
SETTLE_S = 0.5
"""Pause before each boot: the previous VM's teardown (libvirt's above all) finishes first."""
"""The headline number: twice the suite's runs (a TCG boot varies by tens of percent here)."""


def agent_socket(drv: QemuHypervisor) -> str:
    """The host end of the agent's virtio-serial port."""
    for dev in drv.devices:
        if isinstance(dev, SerialPort):
            return dev.socket.host_path
    raise RuntimeError(f"VM {drv.id} has no agent port")


async def agent_ready(path: str) -> None:
    """Connect to the agent (hello answered) and hang up."""
    client = await AgentClient.connect(path, AGENT_TIMEOUT)
    await client.close()


async def vc_boot(run_root: str, vm_id: str) -> Sample:
    """virtcontainers' QEMU driver: create -> start -> marker -> agent; then stop, reaped."""
    t0 = time.perf_counter()
    drv = await boot.prepare(run_root, vm_id, MACHINE)
    t_create = time.perf_counter() - t0
    try:
        await drv.start_sandbox(BOOT_TIMEOUT)
        t_launch = time.perf_counter() - t0
        assert drv.paths is not None
        await boot.wait_marker(drv.paths.console_socket, drv.paths.console_log, BOOT_TIMEOUT)
        t_boot = time.perf_counter() - t0
        await agent_ready(agent_socket(drv))
        t_agent = time.perf_counter() - t0
    except BaseException:
        await drv.stop_sandbox()
        raise
    pid = drv.get_pids()[0]
    t1 = time.perf_counter()
    await drv.stop_sandbox()
    await drv.cleanup()
    t_down = time.perf_counter() - t1
    if os.path.exists(f"/proc/{pid}") or os.path.exists(drv.paths.vm_dir):
        raise RuntimeError(f"VM {vm_id}: QEMU {pid} or its directory survived stop_sandbox")
    return {
        "boot": t_boot,
        "agent": t_agent,
        "teardown": t_down,
        "create": t_create,
        "launch": t_launch,
    }


def spawn(argv: list[str], pass_fds: list[int], log_path: str) -> subprocess.Popen[bytes]:
    """Start QEMU the plain way: inherited fds, stdout and stderr to a log."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


async def raw_boot(run_root: str, vm_id: str) -> Sample:
    """The driver's exact argv started with Popen; SIGTERM + wait to tear down."""
    drv = await boot.prepare(run_root, vm_id, MACHINE)  # VM directory and argv only: not timed
    assert drv.paths is not None
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    proc: subprocess.Popen[bytes] | None = None
    try:
        launch = drv.build_launch(qmp_fd=theirs.fileno())
        t0 = time.perf_counter()
        proc = spawn(launch.argv, launch.pass_fds, drv.paths.qemu_log)
        theirs.close()
        if not await asyncio.get_running_loop().sock_recv(ours, 4096):  # chardevs are up
            raise RuntimeError(f"raw QEMU exited early ({proc.wait()}), see {drv.paths.qemu_log}")
        t_launch = time.perf_counter() - t0
        await boot.wait_marker(drv.paths.console_socket, drv.paths.console_log, BOOT_TIMEOUT)
        t_boot = time.perf_counter() - t0
        await agent_ready(agent_socket(drv))
        t_agent = time.perf_counter() - t0
        t1 = time.perf_counter()
        proc.terminate()
        await asyncio.to_thread(proc.wait)
        t_down = time.perf_counter() - t1
        return {"boot": t_boot, "agent": t_agent, "teardown": t_down, "launch": t_launch}
    finally:
        theirs.close()
        ours.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        await drv.stop_sandbox()


async def kernel_cmdline(run_root: str) -> tuple[str, int]:
    """The driver's kernel command line and max vCPUs for this config (for libvirt)."""
    drv = await boot.prepare(run_root, "cmdline", MACHINE)
    try:
        launch = drv.build_launch()
        argv = launch.argv
        smp = argv[argv.index("-smp") + 1]
        max_vcpus = int(smp.split("maxcpus=")[1].split(",")[0])
        return " ".join(serialize_params(launch.kernel_params, "=")), max_vcpus
    finally:
        await drv.stop_sandbox()


LABELS = {
    "libvirt": "libvirt (defaults)",
    "libvirt_same_cmdline": "libvirt (same cmdline)",
}
DEFAULTS_CMDLINE = "console=ttyS0"
"""All the agent needs to boot and print its marker on the serial console (it reads
`vc.*` options only when present; `quiet`, `panic=1` and the fast-boot set are tuning)."""

LIBVIRT_DEFAULTS_NOTE = (
    "libvirt (defaults) (see _libvirt.defaults_domain_xml): transient, type='qemu', q35, same "
    "kernel as packaged (the bzImage; virtcontainers boots the ELF vmlinux extracted from it) "
    f"and initrd, command line `{DEFAULTS_CMDLINE}`, 1 of 2 vCPUs, 256 MiB, ACPI and "
    "APIC, the serial console to a socket and the agent channel; everything else is "
    "libvirt's default: it adds a qemu-xhci USB controller, the SATA controller, PS/2 "
    "input, a virtio memory balloon, pcie-root-ports for them and the virtio-serial "
    "controller, and QEMU's default CPU model for TCG (qemu64). Kept from the host setup: "
    "QEMU runs as root with no relabelling (as libvirt-qemu it cannot reach the benchmark's "
    "sockets), as for the other libvirt candidate"
)

LIBVIRT_DOMAIN_NOTE = (
    "libvirt (same cmdline) (see _libvirt.tuned_domain_xml): transient, type='qemu', q35, "
    "same kernel, initrd and command line as the driver, <cpu mode='maximum'> (-cpu max), "
    "1 of 2 vCPUs, 256 MiB, 2 pcie-root-ports, virtio-scsi and virtio-serial on pcie.0, "
    "the agent channel, the serial console to a socket; no USB, no balloon; QEMU runs as "
    "root with no relabelling (static DAC label): the leanest libvirt setup comparable to "
    "the driver's VM. Not replicated: the driver's maxmem/slots (libvirt needs a NUMA "
    "topology for them)"
)


def libvirt_candidate(
    lv: Any, work: str, cmdline: str, max_vcpus: int, *, defaults: bool = False
) -> Candidate:
    """A candidate booting transient libvirt domains: built like the driver's VM, or
    (`defaults`) libvirt's defaults."""
    import _libvirt

    cfg = boot.make_config(MACHINE)
    kernel = ensure_assets().bzimage if defaults else cfg.kernel_path
    counter = iter(range(1_000_000))

    async def libvirt_boot(_i: int) -> Sample:
        n = next(counter)
        tag = f"lv{'d' if defaults else 's'}{n}"
        console = _libvirt.ConsoleListener(os.path.join(work, f"{tag}.console"))
        spec = _libvirt.DomainSpec(
            name=f"vcbench-{os.getpid()}-{tag}",
            kernel=kernel,
            initrd=cfg.initrd_path,
            cmdline=cmdline,
            console_path=console.path,
            agent_path=os.path.join(work, f"{tag}.agent"),
            memory_mib=cfg.memory_size,
            vcpus=cfg.num_vcpus,
            max_vcpus=max_vcpus,
            defaults=defaults,
        )
        dom = None
        try:
            t0 = time.perf_counter()
            dom = lv.create(spec)
            await console.wait_marker(BOOT_TIMEOUT)
            t_boot = time.perf_counter() - t0
            await agent_ready(spec.agent_path)
            t_agent = time.perf_counter() - t0
            pid = _libvirt.qemu_pid(spec.name)
            t1 = time.perf_counter()
            lv.destroy(dom)
            await wait_gone(pid)
            t_down = time.perf_counter() - t1
            dom = None
            return {"boot": t_boot, "agent": t_agent, "teardown": t_down}
        finally:
            if dom is not None:
                lv.destroy(dom)
            console.close()
            if os.path.exists(spec.agent_path):
                os.unlink(spec.agent_path)

    return libvirt_boot


def driver_candidate(fn: Callable[[str, str], Any], run_root: str, prefix: str) -> Candidate:
    counter = iter(range(1_000_000))

    async def run(_i: int) -> Sample:
        sample: Sample = await fn(run_root, f"{prefix}{next(counter)}")
        return sample

    return run


async def bench(opts: Options) -> Result:
    """Alternate virtcontainers, raw QEMU and (when available) both libvirt domains."""
    import contextlib

    result = new_result("cold_boot", TITLE, opts, unit="s")
    result["runs"] = opts.scaled(BOOT_RUNS_FACTOR)
    async with temp_run_root() as run_root:
        cmdline, max_vcpus = await kernel_cmdline(run_root)
        result["kernel_cmdline"] = cmdline
        candidates: dict[str, Candidate] = {
            "virtcontainers": driver_candidate(vc_boot, run_root, "vc"),
            "raw_qemu": driver_candidate(raw_boot, run_root, "raw"),
        }
        with contextlib.ExitStack() as stack:
            try:
                import _libvirt

                lv, notes = stack.enter_context(_libvirt.session(run_root))
                result["notes"] += notes
                result["libvirt_version"] = lv.version()
                candidates["libvirt"] = libvirt_candidate(
                    lv, run_root, DEFAULTS_CMDLINE, max_vcpus, defaults=True
                )
                candidates["libvirt_same_cmdline"] = libvirt_candidate(
                    lv, run_root, cmdline, max_vcpus
                )
                result["defaults_cmdline"] = DEFAULTS_CMDLINE
                result["labels"] = dict(LABELS)
                result["notes"] += [LIBVIRT_DEFAULTS_NOTE, LIBVIRT_DOMAIN_NOTE]
            except Skip as exc:
                result["skipped"]["libvirt"] = str(exc)
            samples = await alternate(
                candidates, opts.scaled(BOOT_RUNS_FACTOR), opts.warmup, settle=SETTLE_S
            )
    add_metrics(result, samples)
    vc, raw = "virtcontainers", "raw_qemu"
    lvd, lvs = "libvirt", "libvirt_same_cmdline"
    names = {vc: "virtcontainers", raw: "raw QEMU", lvd: LABELS[lvd], lvs: LABELS[lvs]}
    for metric, what, pairs in (
        ("boot", "boot", ((vc, raw, 1.05), (vc, lvd, 0.8), (vc, lvs, None), (lvs, lvd, None))),
        ("agent", "agent answer", ((vc, raw, None), (vc, lvd, None), (vc, lvs, None))),
        ("teardown", "teardown", ((vc, raw, None), (vc, lvd, None), (vc, lvs, None))),
    ):
        for num, den, target in pairs:
            add_ratio(
                result,
                f"{what}: {names[num]} / {names[den]}",
                (num, metric),
                (den, metric),
                target=target,
            )
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
