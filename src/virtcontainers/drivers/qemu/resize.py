"""vCPU and memory resizing of a running QEMU VM (called by `Hotplug` under its lock).

vCPUs: `query-hotpluggable-cpus` + `device_add`/`device_del` of the CPU model's driver.
Memory: one `pc-dimm` per growth step (`object-add` + `device_add`), or, with `virtio_mem`,
the boot-time virtio-mem device's `requested-size` (grows and shrinks).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, HypervisorError, VMTimeoutError
from ...types import MemoryDevice
from . import argv as qargv
from .rollback import Rollback
from .state import Dimm

if TYPE_CHECKING:
    from ...config import HypervisorConfig
    from .hotplug import Hotplug

MIB = 1 << 20
VIRTIO_MEM_PATH = f"/machine/peripheral/{qargv.VIRTIO_MEM_ID}"
POLL_INTERVAL = 0.1
TOPOLOGY = ("socket-id", "die-id", "cluster-id", "core-id", "thread-id")


# -- vCPUs -----------------------------------------------------------------------------------
def _slot_order(slot: dict[str, Any]) -> tuple[int, ...]:
    props = slot.get("props", {})
    return tuple(int(props.get(k, 0)) for k in TOPOLOGY)


def cpu_id(props: dict[str, Any]) -> str:
    """QEMU device id of a hot-added vCPU, from its topology (e.g. `cpu-0-1-0`)."""
    parts = [str(props[k]) for k in ("socket-id", "die-id", "core-id", "thread-id") if k in props]
    return "cpu-" + "-".join(parts)


async def resize_vcpus(hp: Hotplug, vcpus: int) -> tuple[int, int]:
    """Add or remove hot-added vCPUs until `vcpus` are present; returns (old, new)."""
    boot = int(hp.config.num_vcpus)
    old = hp.current_vcpus()
    slots = await hp.execute("resize_vcpus", "query-hotpluggable-cpus")
    maxcpus = sum(int(s.get("vcpus-count", 1)) for s in slots)
    if vcpus > maxcpus:
        raise ConfigError(
            f"qemu: cannot resize VM {hp.vm_id} to {vcpus} vCPUs: its maximum is {maxcpus} "
            "(maxcpus, from default_max_vcpus and the host's CPUs)"
        )
    if vcpus < boot:
        raise ConfigError(
            f"qemu: cannot resize VM {hp.vm_id} to {vcpus} vCPUs: it booted with {boot} and "
            "only hot-added vCPUs can be removed"
        )
    if vcpus > old:
        await _add_vcpus(hp, slots, vcpus - old)
    elif vcpus < old:
        await _remove_vcpus(hp, old - vcpus)
    return old, hp.current_vcpus()


async def _add_vcpus(hp: Hotplug, slots: list[dict[str, Any]], count: int) -> None:
    free = sorted((s for s in slots if not s.get("qom-path")), key=_slot_order)
    added = 0
    for slot in free:
        if added >= count:
            break
        qdev = cpu_id(slot["props"])
        args = {"driver": slot["type"], "id": qdev, **slot["props"]}
        try:
            await hp.execute(f"hot-adding vCPU {qdev}", "device_add", args)
        except HypervisorError as exc:
            raise HypervisorError(f"{exc} (added {added} of {count} vCPUs)") from exc
        hp.vcpus.append(qdev)
        added += int(slot.get("vcpus-count", 1))


async def _remove_vcpus(hp: Hotplug, count: int) -> None:
    if hp.accel == "tcg":
        # Measured with QEMU 7.2: after a vCPU unplug under multi-threaded TCG the next
        # device_add aborts QEMU ("double free or corruption"); single-threaded TCG aborts at
        # the unplug itself (qemu_thread_join). Refuse rather than take the VM down.
        raise hp.unsupported(
            f"hot-removing vCPUs from VM {hp.vm_id} under TCG",
            "QEMU 7.2 corrupts its own state when a TCG vCPU is unplugged; it works with KVM",
        )
    for _ in range(count):
        qdev = hp.vcpus[-1]

        async def gone(qdev: str = qdev) -> bool:
            # QEMU 7.2 announces a vCPU's removal only with its lapic child's path: check the
            # device tree instead of waiting for a DEVICE_DELETED that names the vCPU.
            return not await hp.in_peripherals(qdev)

        await hp.device_del(qdev, f"hot-removing vCPU {qdev}", gone)
        hp.vcpus.pop()


# -- memory ----------------------------------------------------------------------------------
def memory_limits(argv: list[str]) -> tuple[int, int]:
    """(slots, maxmem MiB) from QEMU's `-m` option ((0, 0) when it has none)."""
    for i, item in enumerate(argv[:-1]):
        if item == "-m":
            slots = maxmem = 0
            for part in argv[i + 1].split(",")[1:]:
                name, _, value = part.partition("=")
                if name == "slots":
                    slots = int(value)
                elif name == "maxmem":
                    maxmem = _mib(value)
            return slots, maxmem
    return 0, 0


def _mib(value: str) -> int:
    units = {"M": 1, "G": 1024, "T": 1024 * 1024}
    if value[-1:].upper() in units:
        return int(value[:-1]) * units[value[-1].upper()]
    return int(value) // MIB


def dimm_backend(cfg: HypervisorConfig, obj_id: str, size_mb: int) -> dict[str, Any]:
    """`object-add` arguments of a DIMM's RAM, shared like the boot RAM when vhost-user needs it."""
    args: dict[str, Any] = {"id": obj_id, "size": size_mb * MIB}
    if cfg.huge_pages or cfg.file_backed_mem_root_dir:
        root = cfg.file_backed_mem_root_dir or "/dev/hugepages"
        args.update({"qom-type": "memory-backend-file", "mem-path": root, "share": True})
    elif qargv.shared_memory(cfg):
        args.update({"qom-type": "memory-backend-memfd", "share": True})
    else:
        args["qom-type"] = "memory-backend-ram"
    if cfg.mem_prealloc:
        args["prealloc"] = True
    return args


async def resize_memory(
    hp: Hotplug, mem_mb: int, block_size_mb: int, probe: bool
) -> tuple[int, MemoryDevice]:
    """Bring guest memory to `mem_mb` MiB; returns (new size, the device that changed)."""
    cfg = hp.config
    if mem_mb <= 0:
        raise ConfigError(f"qemu: resize_memory of VM {hp.vm_id}: {mem_mb} MiB is not a size")
    if cfg.virtio_mem:
        return await _resize_virtio_mem(hp, mem_mb)
    current = int(cfg.memory_size) + hp.memory_mb
    if mem_mb == current:
        return current, MemoryDevice(slot=-1, size_mb=0, probe=probe)
    if mem_mb < current:
        raise hp.unsupported(
            f"shrinking memory from {current} to {mem_mb} MiB with pc-dimm",
            "DIMMs are not hot-removed; enable virtio_mem to shrink",
        )
    add = mem_mb - current
    if block_size_mb > 0:
        add = -(-add // block_size_mb) * block_size_mb
    dev = await add_dimm(hp, add, probe)
    return current + add, dev


async def add_dimm(hp: Hotplug, size_mb: int, probe: bool) -> MemoryDevice:
    """Hot-add one pc-dimm of `size_mb` MiB; the slot and guest address come from QEMU."""
    cfg = hp.config
    op = f"hot-adding {size_mb} MiB of memory to VM {hp.vm_id}"
    if size_mb <= 0:
        raise ConfigError(f"qemu: {op}: the size must be positive")
    slots, maxmem = memory_limits(hp.launch_argv())
    used = len(hp.dimms) + hp.boot_dimms()
    if used >= slots:
        raise HypervisorError(
            f"qemu: {op}: no free memory slot (all {slots} are in use; raise mem_slots)"
        )
    current = int(cfg.memory_size) + hp.memory_mb
    if maxmem and current + size_mb > maxmem:
        raise ConfigError(f"qemu: {op}: {current} + {size_mb} MiB would exceed maxmem {maxmem} MiB")
    n = 1 + max((int(d.id[4:]) for d in hp.dimms), default=-1)
    qdev, obj = f"dimm{n}", f"mem-dimm{n}"
    async with Rollback() as undo:
        await hp.execute(op, "object-add", dimm_backend(cfg, obj, size_mb))
        undo.push_async_callback(hp.execute, f"removing {obj}", "object-del", {"id": obj})
        await hp.execute(op, "device_add", {"driver": "pc-dimm", "id": qdev, "memdev": obj})
        undo.pop_all()
    info = await _memory_device(hp, qdev)
    slot = int(info.get("slot", -1)) if info else -1
    addr = int(info.get("addr", 0)) if info else 0
    hp.dimms.append(Dimm(id=qdev, slot=slot, size_mb=size_mb, addr=addr))
    hp.memory_mb += size_mb
    return MemoryDevice(slot=slot, size_mb=size_mb, addr=addr, probe=probe)


async def _memory_device(hp: Hotplug, qdev: str) -> dict[str, Any] | None:
    for dev in await hp.execute("query-memory-devices", "query-memory-devices"):
        data: dict[str, Any] = dev.get("data", {})
        if data.get("id") == qdev:
            return data
    return None


async def _resize_virtio_mem(hp: Hotplug, mem_mb: int) -> tuple[int, MemoryDevice]:
    cfg = hp.config
    op = f"resizing the memory of VM {hp.vm_id} to {mem_mb} MiB with virtio-mem"
    info = await _memory_device(hp, qargv.VIRTIO_MEM_ID)
    if info is None:
        raise hp.unsupported(op, "the VM was started without a virtio-mem device")
    block = max(1, int(info["block-size"]) // MIB)
    want = mem_mb - int(cfg.memory_size)
    if want < 0:
        raise ConfigError(
            f"qemu: {op}: it booted with {cfg.memory_size} MiB; only memory added since can "
            "be removed"
        )
    want = -(-want // block) * block
    limit = int(info["max-size"]) // MIB
    if want > limit:
        raise ConfigError(
            f"qemu: {op}: needs {want} MiB of virtio-mem, the device holds at most {limit} MiB "
            f"(memory_size {cfg.memory_size} MiB + {limit} MiB)"
        )
    await hp.execute(
        op, "qom-set", {"path": VIRTIO_MEM_PATH, "property": "requested-size", "value": want * MIB}
    )
    hp.memory_mb = want
    deadline = time.monotonic() + hp.unplug_timeout
    while True:
        info = await _memory_device(hp, qargv.VIRTIO_MEM_ID) or {}
        size = int(info.get("size", 0)) // MIB
        if size == want:
            break
        if time.monotonic() >= deadline:
            raise VMTimeoutError(
                f"qemu: {op}: the guest has plugged {size} of the requested {want} MiB after "
                f"{hp.unplug_timeout:g}s (its virtio-mem driver keeps trying)"
            )
        await asyncio.sleep(POLL_INTERVAL)
    addr = int(info.get("memaddr", 0))
    return int(cfg.memory_size) + want, MemoryDevice(slot=-1, size_mb=want, addr=addr)
