"""One suite, every driver: lifecycle, pause/resume, each hotplug the capabilities claim,
stop idempotence, state save/load, and `UnsupportedError` for every operation they deny."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from backends import BACKENDS, Backend

from leaks import LeakCheck, running
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    NetworkEndpoint,
    VFIODevice,
    VhostUserDevice,
)
from virtcontainers.errors import UnsupportedError
from virtcontainers.hypervisor import Hypervisor, VMState, new_hypervisor
from virtcontainers.persist import HypervisorState
from virtcontainers.types import Capabilities

pytestmark = pytest.mark.integration


@dataclass
class Env:
    backend: Backend
    root: str
    tmp: str
    drivers: list[Hypervisor]

    def config(self) -> HypervisorConfig:
        return self.backend.make_config(self.tmp)

    def driver(self) -> Hypervisor:
        hv = new_hypervisor(self.backend.kind, run_root=self.root)
        self.drivers.append(hv)
        return hv

    async def running(self, id: str = "conf1") -> Hypervisor:
        hv = self.driver()
        await hv.create_sandbox(id, None, self.config())
        await hv.start_sandbox(60)
        return hv

    def disk(self, name: str = "disk.img") -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return path


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
async def env(request: pytest.FixtureRequest, run_root: str) -> AsyncIterator[Env]:
    tmp = tempfile.mkdtemp(prefix="conf-", dir="/tmp")
    check = LeakCheck(run_root, parents=("vm", "sbs", "acrn"))
    e = Env(request.param, run_root, tmp, [])
    try:
        yield e
    finally:
        for hv in e.drivers:
            with contextlib.suppress(Exception):
                await hv.stop_sandbox()
            with contextlib.suppress(Exception):
                await hv.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    await check.verify()


async def test_lifecycle(env: Env) -> None:
    hv = env.driver()
    cfg = env.config()
    await hv.create_sandbox("conf1", None, cfg)
    assert hv.state is VMState.CREATED
    assert hv.hypervisor_config().num_vcpus == 1
    await hv.start_sandbox(60)
    assert hv.state is VMState.RUNNING
    await hv.check()
    pids = hv.get_pids()
    if not env.backend.vcpu_threads:
        with pytest.raises(UnsupportedError):
            await hv.get_thread_ids()
    elif env.backend.real_process:
        assert pids and running(pids[0])
        threads = await hv.get_thread_ids()
        assert threads, "no vCPU threads reported"
        tasks = set(os.listdir(f"/proc/{pids[0]}/task"))
        assert {str(t) for t in threads.values()} <= tasks
    if Capabilities.PAUSE in hv.capabilities():
        await hv.pause_sandbox()
        assert hv.state is VMState.PAUSED
        await hv.resume_sandbox()
        assert hv.state is VMState.RUNNING
        await hv.check()
    await hv.stop_sandbox()
    assert hv.state is VMState.STOPPED
    await hv.stop_sandbox()  # idempotent
    await hv.cleanup()
    if env.backend.real_process:
        assert not running(pids[0])


def _add_tap(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        ip.link("add", ifname=name, kind="tuntap", mode="tap")


def _del_tap(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ip, contextlib.suppress(Exception):
        ip.link("del", ifname=name)


@contextlib.asynccontextmanager
async def host_tap(name: str) -> AsyncIterator[str]:
    """A tap device in the host namespace (pyroute2's sync API runs its own loop: a thread)."""
    await asyncio.to_thread(_add_tap, name)
    try:
        yield name
    finally:
        await asyncio.to_thread(_del_tap, name)


async def test_claimed_hotplug_works(env: Env) -> None:
    hv = await env.running()
    caps = hv.capabilities()
    skip = env.backend.no_hotplug_check
    checked = 0
    if Capabilities.BLOCK_DEVICE_HOTPLUG in caps:
        drive = BlockDrive("cdisk0", env.disk())
        await hv.hotplug_add_device(drive)
        await hv.hotplug_remove_device(drive)
        checked += 1
    if Capabilities.NET_DEVICE_HOTPLUG in caps:
        async with host_tap("vcconf0") as tap:
            nic = NetworkEndpoint("cnic0", tap, mac="02:00:00:00:00:42")
            await hv.hotplug_add_device(nic)
            await hv.hotplug_remove_device(nic)
        checked += 1
    if Capabilities.CPU_HOTPLUG in caps:
        assert await hv.resize_vcpus(2) == (1, 2)
        if "cpu_remove" in skip:  # this backend can only hot-add vCPUs here: it must say so
            with pytest.raises(UnsupportedError):
                await hv.resize_vcpus(1)
        else:
            old, new = await hv.resize_vcpus(1)
            assert (old, new) == (2, 1)
        checked += 1
    if Capabilities.MEMORY_HOTPLUG in caps:
        target = hv.hypervisor_config().memory_size + 128
        size, dev = await hv.resize_memory(target, 128, False)
        assert size >= target
        assert dev.size_mb >= 128
        checked += 1
    if Capabilities.VFIO_HOTPLUG in caps and "vfio" not in skip:
        vfio = VFIODevice("cvfio0", "0000:99:00.0")
        await hv.hotplug_add_device(vfio)
        await hv.hotplug_remove_device(vfio)
        checked += 1
    if Capabilities.VHOST_USER_HOTPLUG in caps and "vhost_user" not in skip:
        vu = VhostUserDevice("cvu0", os.path.join(env.tmp, "vu.sock"))
        await hv.hotplug_add_device(vu)
        await hv.hotplug_remove_device(vu)
        checked += 1
    await hv.check()
    await hv.stop_sandbox()
    hotplug_caps = (
        Capabilities.BLOCK_DEVICE_HOTPLUG
        | Capabilities.NET_DEVICE_HOTPLUG
        | Capabilities.CPU_HOTPLUG
        | Capabilities.MEMORY_HOTPLUG
        | Capabilities.VFIO_HOTPLUG
        | Capabilities.VHOST_USER_HOTPLUG
    )
    claimed = set((caps & hotplug_caps).names())
    assert checked == len(claimed - {f"{k}_hotplug" for k in skip})


async def test_denied_operations_raise_unsupported(env: Env) -> None:
    hv = await env.running()
    caps = hv.capabilities()
    denied: list[tuple[Capabilities, Callable[[], Awaitable[object]]]] = [
        (
            Capabilities.BLOCK_DEVICE_HOTPLUG,
            lambda: hv.hotplug_add_device(BlockDrive("ddisk", env.disk("d.img"))),
        ),
        (
            Capabilities.NET_DEVICE_HOTPLUG,
            lambda: hv.hotplug_add_device(NetworkEndpoint("dnic", "vcdenied0")),
        ),
        (Capabilities.CPU_HOTPLUG, lambda: hv.resize_vcpus(2)),
        (Capabilities.MEMORY_HOTPLUG, lambda: hv.resize_memory(512, 128, False)),
        (
            Capabilities.VFIO_HOTPLUG,
            lambda: hv.hotplug_add_device(VFIODevice("dvfio", "0000:99:00.0")),
        ),
        (
            Capabilities.VHOST_USER_HOTPLUG,
            lambda: hv.hotplug_add_device(VhostUserDevice("dvu", "/tmp/none.sock")),
        ),
        (Capabilities.PAUSE, hv.pause_sandbox),
    ]
    refused = 0
    for cap, op in denied:
        if cap in caps:
            continue
        with pytest.raises(UnsupportedError) as exc:
            await op()
        assert str(env.backend.kind) in str(exc.value)
        refused += 1
    assert hv.state is VMState.RUNNING  # refusals change nothing
    await hv.check()
    await hv.stop_sandbox()
    all_caps = {c for c, _ in denied}
    assert refused == len([c for c in all_caps if c not in caps])


async def test_state_save_load_reattach(env: Env) -> None:
    hv = await env.running()
    state = hv.save()
    assert state.type == str(env.backend.kind)
    restored = HypervisorState.model_validate_json(state.model_dump_json())
    other = env.driver()
    other.load(restored)
    if env.backend.real_process:
        assert other.get_pids()[:1] == hv.get_pids()[:1]
        await other.check()
        pid = hv.get_pids()[0]
        await other.stop_sandbox()
        await other.cleanup()
        assert not running(pid)
    await hv.stop_sandbox()  # the original notices the VM is gone; still idempotent


async def test_grpc_round_trip(env: Env) -> None:
    hv = await env.running()
    if not env.backend.vm_cache:
        with pytest.raises(UnsupportedError):
            await hv.to_grpc()
        await hv.stop_sandbox()
        return
    data = await hv.to_grpc()
    assert isinstance(data, bytes) and data
    other = env.driver()
    await other.from_grpc(env.config(), data)
    assert other.get_pids()[:1] == hv.get_pids()[:1]
    await other.check()
    await other.stop_sandbox()
    await hv.stop_sandbox()
