"""The `acrn-dm` command line: PCI slots, console, disks, NICs, kernel, memory, vCPUs, name.

Slot layout: 0 hostbridge, 1 LPC (with `-l com1,stdio`), 2 reserved (ACRN's GVT-g slot),
then the virtio-console (the sandbox console socket), agent serial ports, the root image,
cold-plugged disks, a pool of `nodisk` virtio-blk slots that `acrnctl blkrescan` fills at
hotplug time, and the NICs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...devices import BlockDrive, NetworkEndpoint, SerialPort
from ...errors import ConfigError
from ...types import Param, join_params

if TYPE_CHECKING:
    from ...config import HypervisorConfig

HOSTBRIDGE_SLOT = 0
LPC_SLOT = 1
RESERVED_SLOT = 2  # ACRN hard-codes GVT-g here
MAX_SLOT = 31
BLK_POOL_SIZE = 8
MAX_VM_NAME = 31
NODISK = "nodisk"

BASE_KERNEL_PARAMS = (
    Param("tsc", "reliable"),
    Param("no_timer_check"),
    Param("nohpet"),
    Param("console", "tty0"),
    Param("console", "ttyS0"),
    Param("console", "hvc0"),
    Param("log_buf_len", "16M"),
    Param("consoleblank", "0"),
)
ROOT_PARAMS = (Param("root", "/dev/vda1"), Param("rw"), Param("rootwait"))


def vm_name(sandbox_id: str) -> str:
    """The ACRN VM name for a sandbox: its id, or a stable digest when the id is too long."""
    if len(sandbox_id) <= MAX_VM_NAME:
        return sandbox_id
    return "vc-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:24]


@dataclass
class AcrnLayout:
    """The argv and where each device landed."""

    argv: list[str]
    pool_slots: list[int] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)


class _Slots:
    def __init__(self) -> None:
        self.next = RESERVED_SLOT + 1

    def take(self, what: str) -> int:
        if self.next > MAX_SLOT:
            raise ConfigError(f"acrn: no PCI slot left for {what} (slots 0..{MAX_SLOT} used)")
        slot = self.next
        self.next += 1
        return slot


def kernel_params(cfg: HypervisorConfig) -> list[Param]:
    """The guest command line: ACRN's base set, root device, quiet/debug, then the config's."""
    params = list(BASE_KERNEL_PARAMS)
    if cfg.image_asset_path():
        params += ROOT_PARAMS
    params.append(Param("debug") if cfg.debug else Param("quiet"))
    params += list(cfg.kernel_params)
    return params


def _check_arg(what: str, value: str) -> None:
    if not value or any(c in value for c in ",\n\0 "):
        raise ConfigError(f"acrn: {what} {value!r} is empty or contains ',', a space or newline")


def build(
    cfg: HypervisorConfig,
    *,
    binary: str,
    name: str,
    uuid: str,
    console_socket: str,
    serial_ports: list[SerialPort],
    disks: list[BlockDrive],
    nets: list[NetworkEndpoint],
    pool_size: int = BLK_POOL_SIZE,
) -> AcrnLayout:
    """The full `acrn-dm` argv for one VM (the VM name comes last)."""
    argv = [binary, "-A", "-m", f"{cfg.memory_size}M"]
    argv += ["--cpu_affinity", ",".join(str(i) for i in range(cfg.num_vcpus))]
    argv += ["-U", uuid]
    layout = AcrnLayout(argv)
    argv += ["-s", f"{HOSTBRIDGE_SLOT}:0,hostbridge"]
    argv += ["-s", f"{LPC_SLOT}:0,lpc", "-l", "com1,stdio"]
    slots = _Slots()
    _check_arg("console socket", console_socket)
    slot = slots.take("the console")
    argv += ["-s", f"{slot},virtio-console,@socket:console={console_socket}"]
    layout.slots["console"] = slot
    for port in serial_ports:
        _check_arg("serial port socket", port.socket.host_path)
        slot = slots.take(f"serial port {port.socket.name}")
        argv += ["-s", f"{slot},virtio-console,socket:{port.socket.name}={port.socket.host_path}"]
        layout.slots[port.socket.name] = slot
    image = cfg.image_asset_path()
    if image:
        _check_arg("image", image)
        slot = slots.take("the root image")
        argv += ["-s", f"{slot},virtio-blk,{image}"]
        layout.slots["rootfs"] = slot
    for drive in disks:
        _check_arg(f"block drive {drive.id} path", drive.path)
        slot = slots.take(f"block drive {drive.id}")
        ro = ",ro" if drive.read_only else ""
        argv += ["-s", f"{slot},virtio-blk,{drive.path}{ro}"]
        layout.slots[drive.id] = slot
    for _ in range(pool_size):
        slot = slots.take("the hotplug disk pool")
        argv += ["-s", f"{slot},virtio-blk,{NODISK}"]
        layout.pool_slots.append(slot)
    for ep in nets:
        slot = slots.take(f"network endpoint {ep.id}")
        mac = f",mac={ep.mac.lower()}" if ep.mac else ""
        argv += ["-s", f"{slot},virtio-net,tap={ep.tap_name}{mac}"]
        layout.slots[ep.id] = slot
    kernel = cfg.kernel_asset_path()
    _check_arg("kernel", kernel)
    argv += ["-k", kernel]
    initrd = cfg.initrd_asset_path()
    if initrd:
        _check_arg("initrd", initrd)
        argv += ["-r", initrd]
    argv += ["-B", join_params(kernel_params(cfg))]
    argv.append(name)
    return layout
