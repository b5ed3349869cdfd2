"""Kernel command line for booting the guest assets with the agent as /init."""

from __future__ import annotations

from .. import host
from ..types import Param

FAST_BOOT_PARAMS: tuple[Param, ...] = (
    Param("tsc", "reliable"),
    Param("no_timer_check"),
    Param("rcupdate.rcu_expedited", "1"),
    Param("i8042.direct", "1"),
    Param("i8042.dumbkbd", "1"),
    Param("i8042.nopnp", "1"),
    Param("i8042.noaux", "1"),
    Param("noreplace-smp"),
    Param("reboot", "k"),
    Param("cryptomgr.notests"),
    Param("net.ifnames", "0"),
    Param("pci", "lastbus=0"),
    Param("iommu", "off"),
)
"""Kata's boot-time parameters (measured here: q35 TCG boot 2.0 s -> 1.6 s)."""

AGENT_READY_MARKER = "VC-AGENT-READY"
"""The line the agent prints on /dev/console once it serves requests."""


def loops_per_jiffy(kernel_hz: int, tsc_khz: int | None = None) -> int:
    """The guest's delay-loop calibration, known in advance: TSC cycles per jiffy.

    A guest's TSC runs at the host's constant rate, and x86 kernels count delays in TSC
    cycles. Given as `lpj=`, it spares every hot-added vCPU the kernel's calibration against
    the timer tick (under TCG ~80 ms of the ~130 ms it takes to online one). 0 when the
    kernel's HZ or a constant host TSC rate is unknown: the kernel then calibrates.
    """
    khz = host.constant_tsc_khz() if tsc_khz is None else tsc_khz
    if kernel_hz <= 0 or khz <= 0:
        return 0
    return khz * 1000 // kernel_hz


def default_kernel_params(
    console: str | None = "ttyS0",
    *,
    debug: bool = False,
    agent_port: int | None = None,
    hostname: str | None = None,
    fast_boot: bool = True,
    lpj: int = 0,
) -> list[Param]:
    """Parameters the guest assets expect: console, quiet, panic=1, fast boot, agent options.

    `console` None leaves it out. `hvc0` works only once the agent has loaded
    virtio_console, so kernel messages before that are lost there; ttyS0 (built in)
    shows everything. `lpj` (see `loops_per_jiffy`) is added when non-zero. The agent
    reads `vc.debug`, `vc.agent_port`, `vc.hostname`, `vc.channel` and `vc.scsi` (the QEMU
    driver's) from /proc/cmdline.
    """
    params: list[Param] = []
    if console:
        params.append(Param("console", console))
    if not debug:
        params.append(Param("quiet"))
    params.append(Param("panic", "1"))
    if fast_boot:
        params.extend(FAST_BOOT_PARAMS)
    if lpj > 0:
        params.append(Param("lpj", str(lpj)))
    if debug:
        params.append(Param("vc.debug", "1"))
    if agent_port is not None:
        params.append(Param("vc.agent_port", str(agent_port)))
    if hostname:
        params.append(Param("vc.hostname", hostname))
    return params
