"""Pause + resume, block hotplug until the guest sees the disk, vCPU hotplug: virtcontainers
(the `Sandbox` API) vs libvirt (`virDomainSuspend`/`Resume`, `attachDevice`, `setVcpus`).

Every VM is a q35 TCG guest of the same Debian kernel package and initrd, 1 vCPU of 2,
256 MiB. virtcontainers is a `Sandbox` as a user gets it (`Sandbox(memory_size=256)`: its
guest assets, its kernel command line). libvirt runs in two domains, as in `cold_boot`:
`libvirt` ("libvirt (defaults)", the baseline of the targets) is what a libvirt user writes
for this kernel: the packaged bzImage, `console=ttyS0`, libvirt's default devices plus the
virtio-scsi controller the SCSI disks need; `libvirt_same_cmdline` ("libvirt (same
cmdline)") is built like the Sandbox's VM and boots its kernel (the ELF vmlinux) with its
command line, so only the management layer differs.

Block hotplug: a 16 MiB raw file as a SCSI disk; `attach` is the API call, `visible` is
until the guest has the disk's /dev node; the disk is removed again (not timed) before the
next run. vCPU hotplug: `attach` is the API call, `online` is until the guest has 2 vCPUs
online (the agent onlines the new one as soon as the guest's kernel lists it). vCPU
hot-removal is refused under TCG (QEMU 7.2 corrupts itself), so every vCPU run boots fresh
VMs (not timed). One detector serves all: the guest agent's hardware wait (one request,
answered on the guest kernel's uevents), which `Sandbox.add_disk` and `Sandbox.resize` make
themselves before they return (so their `attach` is their `visible`/`online`, checked after
the clock stops); for libvirt and `qemu_driver` (the driver's `hotplug_add_device` /
`resize_vcpus` alone, which return when QEMU has the device) the benchmark sends the same
request just before the API call and stops the clock at its answer.

Pause/resume is also measured on the QEMU driver alone (`qemu_driver`: no Sandbox state
written), which shows what persisting the state costs, and on a sandbox whose run root is
on a tmpfs (`virtcontainers_tmpfs`, /dev/shm: where /run usually is; here /run and /tmp are
on the disk).

    .venv/bin/python benchmarks/lifecycle.py [--runs 10] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import _libvirt
from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    add_metrics,
    add_ratio,
    alternate,
    main,
    new_result,
    temp_run_root,
)
from cold_boot import DEFAULTS_CMDLINE, LABELS

from virtcontainers.agent import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import UnsupportedError
from virtcontainers.guest import ensure_assets
from virtcontainers.sandbox import Sandbox
from virtcontainers.types import Capabilities, serialize_params

TITLE = "Pause/resume, block and vCPU hotplug (q35, TCG)"
TMPFS = "/dev/shm"
GUEST_TIMEOUT = 30.0
DISK_MIB = 16


MAX_VCPUS = 2


def sandbox_config() -> HypervisorConfig:
    """What a user asks for; the Sandbox fills in its guest assets and kernel parameters."""
    return HypervisorConfig(
        memory_size=256, num_vcpus=1, default_max_vcpus=MAX_VCPUS, hypervisor_machine_type="q35"
    )


async def sandbox_cmdline(run_root: str) -> tuple[str, HypervisorConfig]:
    """The kernel command line and the filled-in config of a Sandbox (created, not started)."""
    sb = Sandbox("cmdline", "qemu", sandbox_config(), run_root=run_root)
    await sb.create()
    try:
        hv = sb.hypervisor
        assert isinstance(hv, QemuHypervisor)
        return " ".join(serialize_params(hv.build_launch().kernel_params, "=")), sb.config
    finally:
        await sb.stop()


class Setup:
    """What every candidate needs: run root, libvirt connection, the shared VM shape."""

    def __init__(self, run_root: str, lv: _libvirt.Libvirt, cmdline: str, cfg: HypervisorConfig):
        self.run_root = run_root
        self.lv = lv
        self.cmdline = cmdline
        self.cfg = cfg
        """The Sandbox's filled-in config: its kernel, initrd and shape, for libvirt."""
        self.bzimage = ensure_assets().bzimage
        self._n = 0

    def next_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def sandbox(self, run_root: str | None = None) -> Sandbox:
        return Sandbox(
            self.next_id("lc"), "qemu", sandbox_config(), run_root=run_root or self.run_root
        )

    def domain_spec(self, defaults: bool) -> _libvirt.DomainSpec:
        n = self.next_id("lvd" if defaults else "lvs")
        return _libvirt.DomainSpec(
            name=f"vcbench-{os.getpid()}-{n}",
            kernel=self.bzimage if defaults else self.cfg.kernel_path,
            initrd=self.cfg.initrd_path,
            cmdline=DEFAULTS_CMDLINE if defaults else self.cmdline,
            console_path=os.path.join(self.run_root, f"{n}.console"),
            agent_path=os.path.join(self.run_root, f"{n}.agent"),
            memory_mib=self.cfg.memory_size,
            vcpus=self.cfg.num_vcpus,
            max_vcpus=MAX_VCPUS,
            defaults=defaults,
            scsi=True,
        )

    def disk(self) -> str:
        path = os.path.join(self.run_root, f"{self.next_id('disk')}.img")
        with open(path, "wb") as f:
            f.truncate(DISK_MIB << 20)
        return path

    @contextlib.asynccontextmanager
    async def booted_sandbox(self, run_root: str | None = None) -> AsyncIterator[Sandbox]:
        sb = self.sandbox(run_root)
        try:
            await sb.start()
            yield sb
        finally:
            await sb.stop()

    def booted_domain(
        self, defaults: bool
    ) -> contextlib.AbstractAsyncContextManager[_libvirt.Domain]:
        return _libvirt.Domain.boot(self.lv, self.domain_spec(defaults))


# -- guest-side checks (the same for both) --------------------------------------------------
async def guest_out(agent: AgentClient, argv: list[str]) -> str:
    res = await agent.exec(argv)
    return res.stdout.decode()


async def scsi_disks(agent: AgentClient) -> set[str]:
    return {d for d in (await guest_out(agent, ["ls", "/sys/block"])).split() if d.startswith("sd")}


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` (each poll is an agent round trip) until true."""
    deadline = time.monotonic() + GUEST_TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"guest: {what} not seen within {GUEST_TIMEOUT:g}s")


async def cpus_online(agent: AgentClient, expect: str) -> bool:
    await agent.online(cpus=True, memory=False)
    return (await guest_out(agent, ["cat", "/sys/devices/system/cpu/online"])).strip() == expect


# -- pause / resume ---------------------------------------------------------------------------
def pause_vc(sb: Sandbox) -> Candidate:
    async def run(_i: int) -> Sample:
        t0 = time.perf_counter()
        await sb.pause()
        t1 = time.perf_counter()
        await sb.resume()
        t2 = time.perf_counter()
        return {"pause": t1 - t0, "resume": t2 - t1, "pause_resume": t2 - t0}

    return run


def pause_driver(sb: Sandbox) -> Candidate:
    """The driver's pause/resume alone (no state persisted): where the Sandbox's time goes."""

    async def run(_i: int) -> Sample:
        hv = sb.hypervisor
        t0 = time.perf_counter()
        await hv.pause_sandbox()
        t1 = time.perf_counter()
        await hv.resume_sandbox()
        t2 = time.perf_counter()
        return {"pause": t1 - t0, "resume": t2 - t1, "pause_resume": t2 - t0}

    return run


def pause_libvirt(d: _libvirt.Domain) -> Candidate:
    async def run(_i: int) -> Sample:
        t0 = time.perf_counter()
        d.dom.suspend()
        t1 = time.perf_counter()
        d.dom.resume()
        t2 = time.perf_counter()
        return {"pause": t1 - t0, "resume": t2 - t1, "pause_resume": t2 - t0}

    return run


# -- block hotplug ----------------------------------------------------------------------------
async def detect(
    agent: AgentClient,
    call: Callable[[], object],
    *,
    block_serial: str | None = None,
    cpus: int | None = None,
) -> Sample:
    """Time `call` (the management API) and, with the guest agent's hardware wait started
    just before it (the detector `Sandbox.add_disk`/`resize` use inside), until the guest
    has the hardware: `attach` and the second metric (`visible`/`online`, named by the
    caller) from one t0."""
    waiter = asyncio.create_task(
        agent.wait_hardware(block_serial=block_serial, cpus=cpus, timeout=GUEST_TIMEOUT)
    )
    await asyncio.sleep(0)  # the request is on the wire before the hotplug starts
    t0 = time.perf_counter()
    try:
        res = call()
        if asyncio.iscoroutine(res):
            await res
    except BaseException:
        waiter.cancel()
        raise
    t1 = time.perf_counter()
    await waiter
    t2 = time.perf_counter()
    return {"attach": t1 - t0, "seen": t2 - t0}


def block_vc(setup: Setup, sb: Sandbox) -> Candidate:
    async def run(_i: int) -> Sample:
        agent = await sb.agent()
        path = setup.disk()
        before = await scsi_disks(agent)
        t0 = time.perf_counter()
        drive = await sb.add_disk(path)  # returns once the guest has the disk's /dev node
        t1 = time.perf_counter()
        if not await _more(agent, before):  # checked, not timed
            raise RuntimeError("add_disk returned but the guest lists no new disk")
        await sb.remove_disk(drive)
        await wait_until(lambda: _same(agent, before), "disk removal")
        os.unlink(path)
        return {"attach": t1 - t0, "visible": t1 - t0}

    return run


def block_driver(setup: Setup, sb: Sandbox) -> Candidate:
    """The QEMU driver's hotplug alone: returns once QEMU has the device (like libvirt)."""

    async def run(_i: int) -> Sample:
        hv = sb.hypervisor
        agent = await sb.agent()
        path = setup.disk()
        drive = BlockDrive(id=setup.next_id("drv"), path=path)
        before = await scsi_disks(agent)
        # The driver gives each drive its id as serial.
        t = await detect(agent, lambda: hv.hotplug_add_device(drive), block_serial=drive.id[:20])
        await hv.hotplug_remove_device(drive)
        await wait_until(lambda: _same(agent, before), "disk removal")
        os.unlink(path)
        return {"attach": t["attach"], "visible": t["seen"]}

    return run


def block_libvirt(setup: Setup, d: _libvirt.Domain) -> Candidate:
    async def run(_i: int) -> Sample:
        assert d.agent is not None
        agent = d.agent
        path = setup.disk()
        serial = setup.next_id("lvdisk")
        xml = _libvirt.scsi_disk_xml(path, "sdb", serial)
        before = await scsi_disks(agent)
        t = await detect(
            agent, lambda: d.dom.attachDeviceFlags(xml, setup.lv.live), block_serial=serial
        )
        d.dom.detachDeviceFlags(xml, setup.lv.live)
        await wait_until(lambda: _same(agent, before), "disk removal")
        await _wait_detached(d, path)
        os.unlink(path)
        return {"attach": t["attach"], "visible": t["seen"]}

    return run


async def _more(agent: AgentClient, before: set[str]) -> bool:
    return bool(await scsi_disks(agent) - before)


async def _same(agent: AgentClient, before: set[str]) -> bool:
    return await scsi_disks(agent) == before


async def _wait_detached(d: _libvirt.Domain, path: str) -> None:
    """libvirt finishes a detach when QEMU reports DEVICE_DELETED; wait for its XML to say so."""
    deadline = time.monotonic() + GUEST_TIMEOUT
    while path in d.dom.XMLDesc(0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirt still lists {path} after the detach")
        await asyncio.sleep(0.01)


# -- vCPU hotplug -----------------------------------------------------------------------------
def vcpu_vc(setup: Setup) -> Candidate:
    async def run(_i: int) -> Sample:
        async with setup.booted_sandbox() as sb:
            agent = await sb.agent()
            t0 = time.perf_counter()
            await sb.resize(vcpus=2)  # returns once the guest has both vCPUs online
            t1 = time.perf_counter()
            if not await cpus_online(agent, "0-1"):  # checked, not timed
                raise RuntimeError("resize returned but the guest has not 2 vCPUs online")
        return {"attach": t1 - t0, "online": t1 - t0}

    return run


def vcpu_driver(setup: Setup) -> Candidate:
    async def run(_i: int) -> Sample:
        async with setup.booted_sandbox() as sb:
            agent = await sb.agent()
            t = await detect(agent, lambda: sb.hypervisor.resize_vcpus(2), cpus=2)
        return {"attach": t["attach"], "online": t["seen"]}

    return run


def vcpu_libvirt(setup: Setup, defaults: bool) -> Candidate:
    async def run(_i: int) -> Sample:
        async with setup.booted_domain(defaults) as d:
            assert d.agent is not None
            t = await detect(d.agent, lambda: d.dom.setVcpusFlags(2, setup.lv.live), cpus=2)
        return {"attach": t["attach"], "online": t["seen"]}

    return run


# -- the benchmark ----------------------------------------------------------------------------
def _prefixed(cands: dict[str, Candidate], prefix: str) -> dict[str, Candidate]:
    """Candidates whose metric names carry the operation (pause, block, vcpu)."""

    def wrap(c: Candidate) -> Candidate:
        async def run(i: int) -> Sample:
            return {f"{prefix}_{k}": v for k, v in (await c(i)).items()}

        return run

    return {name: wrap(c) for name, c in cands.items()}


LV, LVS = "libvirt", "libvirt_same_cmdline"
VC, DRV, TMPFS_VC = "virtcontainers", "qemu_driver", "virtcontainers_tmpfs"


async def bench(opts: Options) -> Result:
    """Pause/resume and block hotplug on one VM of each; vCPU hotplug on fresh VMs per run."""
    result = new_result("lifecycle", TITLE, opts, unit="s")
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in (VC, LV, LVS, DRV, TMPFS_VC)}

    def merge(new: dict[str, dict[str, list[float]]]) -> None:
        for cand, metrics in new.items():
            samples[cand].update(metrics)

    async with (
        temp_run_root() as run_root,
        temp_run_root(base=TMPFS) as tmpfs_root,
    ):
        cmdline, cfg = await sandbox_cmdline(run_root)
        result["kernel_cmdline"] = cmdline
        result["defaults_cmdline"] = DEFAULTS_CMDLINE
        result["labels"] = dict(LABELS)
        with _libvirt.session(run_root) as (lv, notes):
            result["notes"] += notes
            result["libvirt_version"] = lv.version()
            result["run_root_fs"] = {
                "virtcontainers": fs_type(run_root),
                "tmpfs": fs_type(tmpfs_root),
            }
            setup = Setup(run_root, lv, cmdline, cfg)
            async with (
                setup.booted_sandbox() as sb,
                setup.booted_domain(defaults=True) as dom,
                setup.booted_domain(defaults=False) as dom_same,
                setup.booted_sandbox(tmpfs_root) as sb_tmpfs,
            ):
                no_cpu = unsupported(sb, Capabilities.CPU_HOTPLUG, "vCPU hotplug")
                no_block = unsupported(sb, Capabilities.BLOCK_DEVICE_HOTPLUG, "block hotplug")
                print("pause + resume", flush=True)
                pr = {
                    VC: pause_vc(sb),
                    LV: pause_libvirt(dom),
                    LVS: pause_libvirt(dom_same),
                    DRV: pause_driver(sb),
                    TMPFS_VC: pause_vc(sb_tmpfs),
                }
                merge(await alternate(_prefixed(pr, "pause"), opts.scaled(3), opts.warmup))
                if no_block:
                    result["skipped"]["block hotplug"] = no_block
                    print(f"block hotplug skipped: {no_block}")
                else:
                    print("block hotplug", flush=True)
                    bl = {
                        VC: block_vc(setup, sb),
                        LV: block_libvirt(setup, dom),
                        LVS: block_libvirt(setup, dom_same),
                        DRV: block_driver(setup, sb),
                    }
                    merge(await alternate(_prefixed(bl, "block"), opts.runs, opts.warmup))
            if no_cpu:
                result["skipped"]["vCPU hotplug"] = no_cpu
                print(f"vCPU hotplug skipped: {no_cpu}")
            else:
                print("vCPU hotplug (fresh VMs every run)", flush=True)
                vc = {
                    VC: vcpu_vc(setup),
                    LV: vcpu_libvirt(setup, defaults=True),
                    LVS: vcpu_libvirt(setup, defaults=False),
                    DRV: vcpu_driver(setup),
                }
                merge(await alternate(_prefixed(vc, "vcpu"), opts.runs, opts.warmup, settle=0.5))
    add_metrics(result, samples)
    targeted = ("pause_pause_resume", "block_visible", "vcpu_online")
    for metric, label in (
        ("pause_pause_resume", "pause + resume"),
        ("pause_pause", "pause"),
        ("pause_resume", "resume"),
        ("block_visible", "block hotplug until the guest sees it"),
        ("vcpu_online", "vCPU hotplug until online in the guest"),
    ):
        for den, target in ((LV, 0.5 if metric in targeted else None), (LVS, None)):
            add_ratio(
                result,
                f"{label}: virtcontainers / {LABELS[den]}",
                (VC, metric),
                (den, metric),
                target=target,
            )
    for metric, label in (
        ("pause_pause_resume", "pause + resume"),
        ("block_attach", "block hotplug API call"),
        ("block_visible", "block hotplug until the guest sees it"),
        ("vcpu_attach", "vCPU hotplug API call"),
        ("vcpu_online", "vCPU hotplug until online in the guest"),
    ):
        add_ratio(
            result,
            f"{label}: QEMU driver alone / {LABELS[LVS]}",
            (DRV, metric),
            (LVS, metric),
        )
    add_ratio(
        result,
        f"pause + resume: virtcontainers, run root on tmpfs / {LABELS[LV]}",
        (TMPFS_VC, "pause_pause_resume"),
        (LV, "pause_pause_resume"),
    )
    add_ratio(
        result,
        "pause + resume: virtcontainers / its QEMU driver alone",
        (VC, "pause_pause_resume"),
        (DRV, "pause_pause_resume"),
    )
    return result


def fs_type(path: str) -> str:
    """The filesystem type `path` lives on (from /proc/mounts: longest matching mount)."""
    best, kind = "", "?"
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def unsupported(sb: Sandbox, cap: Capabilities, what: str) -> str:
    """Why the sandbox cannot do `what` ("" when it can)."""
    try:
        sb.hypervisor.require(cap, what)
    except UnsupportedError as exc:
        return f"the QEMU driver cannot do it yet: {exc}"
    return ""


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
