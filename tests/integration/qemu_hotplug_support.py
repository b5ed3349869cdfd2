"""Shared pieces of the QEMU integration tests: a small guest's config, booting a VM with an
agent, polling the guest, and a network namespace with a tap device."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import NetNS

from net_support import namespaces
from virtcontainers.agent import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import Device, SerialPort
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.types import Socket

BOOT_TIMEOUT = 60.0
GUEST_TIMEOUT = 30.0


def make_config(guest_assets: Any, **overrides: Any) -> HypervisorConfig:
    kw: dict[str, Any] = {
        "kernel_path": guest_assets.kernel,
        "initrd_path": guest_assets.initrd,
        "memory_size": 256,
        "num_vcpus": 1,
    }
    kw.update(overrides)
    return HypervisorConfig(**kw)


@dataclass
class VM:
    drv: QemuHypervisor
    agent: AgentClient

    async def sh(self, script: str) -> str:
        """Run a shell script in the guest; its stdout (a non-zero exit fails the test)."""
        res = await self.agent.exec(["sh", "-c", script], timeout=GUEST_TIMEOUT)
        assert res.exit_code == 0, f"guest: {script!r} -> {res.exit_code}: {res.stderr!r}"
        return res.stdout.decode()

    async def wait_for(self, script: str, expect: str, timeout: float = GUEST_TIMEOUT) -> str:
        """Poll `script` in the guest until its stripped output equals `expect`."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            res = await self.agent.exec(["sh", "-c", script], timeout=GUEST_TIMEOUT)
            out = res.stdout.decode().strip()
            if out == expect:
                return out
            await asyncio.sleep(0.2)
        raise AssertionError(f"guest: {script!r} gave {out!r}, expected {expect!r}")


@contextlib.asynccontextmanager
async def booted(
    run_root: str,
    config: HypervisorConfig,
    *,
    devices: tuple[Device, ...] = (),
    network_ns: str | None = None,
    id: str = "hp1",
) -> AsyncIterator[VM]:
    """A running VM with its agent connected; stopped and cleaned up afterwards."""
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox(id, network_ns, config)
    sock = drv.generate_socket(id, use_vsock=False)
    assert isinstance(sock, Socket)
    await drv.add_device(SerialPort(sock))
    for dev in devices:
        await drv.add_device(dev)
    agent: AgentClient | None = None
    try:
        await drv.start_sandbox(BOOT_TIMEOUT)
        agent = await AgentClient.connect(sock.host_path, BOOT_TIMEOUT)
        yield VM(drv, agent)
    finally:
        if agent is not None:
            await agent.close()
        await drv.stop_sandbox()
        await drv.cleanup()


@dataclass
class TapNS:
    name: str
    path: str
    tap: str


def _add_tap(path: str, tap: str) -> None:
    with NetNS(path) as ns:
        ns.link("add", ifname=tap, kind="tuntap", mode="tap")
        (index,) = ns.link_lookup(ifname=tap)
        ns.link("set", index=index, state="up")


@contextlib.asynccontextmanager
async def netns_with_tap() -> AsyncIterator[TapNS]:
    """A fresh network namespace (`net_support.namespaces`) holding an up tap device; both
    removed afterwards. pyroute2's synchronous API runs its own event loop: a worker thread."""
    tap = "vctap0"
    async with namespaces(1, "vct") as (ns,):
        await asyncio.to_thread(_add_tap, ns.path, tap)
        yield TapNS(ns.name, ns.path, tap)
