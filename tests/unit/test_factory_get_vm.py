"""Factory.get_vm: fresh identity, growth by hotplug, and every fallback to a direct boot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
import test_factory_fakes
from test_factory_fakes import FakeHV, fake_config

from virtcontainers.agent.protocol import MsgType
from virtcontainers.errors import ConfigError, LaunchError
from virtcontainers.factory import (
    VM,
    DirectBase,
    Factory,
    FactoryError,
    VMCache,
    VMConfig,
)
from virtcontainers.factory.base import FactoryBase
from virtcontainers.hypervisor import VMState
from virtcontainers.types import Capabilities

fake_hv = test_factory_fakes.fake_hv


class BrokenBase(FactoryBase):
    """A base whose every VM request fails."""

    def __init__(self, config: VMConfig, error: Exception) -> None:
        self._config = config
        self.error = error
        self.calls = 0

    @property
    def name(self) -> str:
        return "broken"

    def config(self) -> VMConfig:
        return self._config.copy()

    async def get_base_vm(self, *, id: str | None = None, timeout: float) -> VM:
        self.calls += 1
        raise self.error


async def cached_factory(run_root: str, size: int = 1, **cfg: object) -> Factory:
    base = DirectBase(VMConfig.of(fake_config(**cfg), "mock"), run_root=run_root)
    return await Factory.cached(base, size, run_root=run_root)


async def test_vm_from_the_pool_is_resumed_reseeded_and_its_clock_set(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    async with await cached_factory(run_root) as factory:
        assert isinstance(factory.base, VMCache)
        await factory.base.wait_full(5)
        before = time.time()
        vm = await factory.get_vm(fake_config())
        try:
            assert vm.state is VMState.RUNNING
            agent = fake_hv.agents[vm.id]
            assert len(agent.entropy) == 1 and len(agent.entropy[0]) == 64
            assert len(agent.clock_set) == 1 and agent.clock_set[0] >= before - 1
            res = await (await vm.agent()).exec(["echo", "ok"])
            assert res.stdout == b"ok\n"
        finally:
            await vm.stop()


async def test_ping_entropy_and_clock_go_to_the_agent_in_one_round_trip(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    """All three are sent before the first answer: a pooled VM's guest answers them in turn."""
    async with await cached_factory(run_root) as factory:
        assert isinstance(factory.base, VMCache)
        await factory.base.wait_full(5)
        (pooled,) = (await factory.base.status()).vms
        agent = fake_hv.agents[pooled.id]
        agent.silent = True  # reads and records every request, answers none
        seen = len(agent.requests)
        get = asyncio.create_task(factory.get_vm(fake_config(), timeout=30))
        try:
            async with asyncio.timeout(5):
                while {MsgType.PING, MsgType.ADD_ENTROPY, MsgType.SET_TIME} - {
                    r.type for r in agent.requests[seen:]
                }:
                    await asyncio.sleep(0.01)
        finally:
            get.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await get
    assert fake_hv.running == {}


async def test_bigger_request_is_grown_by_hotplug(fake_hv: type[FakeHV], run_root: str) -> None:
    async with await cached_factory(run_root) as factory:
        vm = await factory.get_vm(fake_config(num_vcpus=3, memory_size=700))
        try:
            assert vm.cpu == 3
            assert vm.memory_mb == 768  # rounded up to the 128 MiB memory block
            assert vm.hypervisor.vcpus == 3  # type: ignore[attr-defined]
            assert vm.hypervisor.memory_mb == 768  # type: ignore[attr-defined]
            online = [r for r in fake_hv.agents[vm.id].requests if r.type == MsgType.ONLINE]
            assert online, "the guest was not asked to online the new CPUs and memory"
        finally:
            await vm.stop()


async def test_smaller_request_gets_the_base_vm_as_is(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with await cached_factory(run_root, num_vcpus=2, memory_size=512) as factory:
        vm = await factory.get_vm(fake_config(num_vcpus=1, memory_size=256))
        try:
            assert (vm.cpu, vm.memory_mb) == (2, 512)
            assert "more than the 1 vCPU / 256 MiB requested" in caplog.text
        finally:
            await vm.stop()


async def test_other_config_falls_back_to_a_direct_boot_saying_why(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with await cached_factory(run_root) as factory:
        vm = await factory.get_vm(fake_config(kernel_path="/other/vmlinuz"))
        try:
            assert vm.origin == "direct (fallback)"
            assert vm.hypervisor.hypervisor_config().kernel_path == "/other/vmlinuz"
            assert "booting a VM directly" in caplog.text and "kernel_path" in caplog.text
            assert factory.base.handed_out == 0  # type: ignore[attr-defined]
        finally:
            await vm.stop()


async def test_missing_hotplug_falls_back_and_is_remembered(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake_hv.caps = Capabilities.PAUSE | Capabilities.TEMPLATE
    async with await cached_factory(run_root) as factory:
        vm = await factory.get_vm(fake_config(num_vcpus=2))
        try:
            assert vm.origin == "direct (fallback)" and vm.cpu == 2
            assert "vCPU hotplug is not available" in caplog.text
        finally:
            await vm.stop()
        taken = factory.base.handed_out  # type: ignore[attr-defined]
        vm = await factory.get_vm(fake_config(memory_size=1024))
        try:
            assert vm.origin == "direct (fallback)" and vm.memory_mb == 1024
            assert "memory hotplug is not available" in caplog.text
            # Known from the first VM: no pooled VM was wasted this time.
            assert factory.base.handed_out == taken  # type: ignore[attr-defined]
        finally:
            await vm.stop()
        # Same size still comes from the pool.
        vm = await factory.get_vm(fake_config())
        try:
            assert vm.origin == "direct"  # made by the cache's direct base
            assert factory.base.handed_out == taken + 1  # type: ignore[attr-defined]
        finally:
            await vm.stop()


async def test_failing_base_falls_back_or_raises(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    vmc = VMConfig.of(fake_config(), "mock")
    base = BrokenBase(vmc, FactoryError("pool is empty"))
    factory = Factory(base, run_root=run_root)
    vm = await factory.get_vm()
    try:
        assert vm.origin == "direct (fallback)"
        assert "broken failed: pool is empty" in caplog.text
    finally:
        await vm.stop()
    strict = Factory(base, fallback=False, run_root=run_root)
    with pytest.raises(FactoryError, match="pool is empty"):
        await strict.get_vm()


async def test_non_vc_errors_of_the_base_are_not_swallowed(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    base = BrokenBase(VMConfig.of(fake_config(), "mock"), RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        await Factory(base, run_root=run_root).get_vm()


async def test_base_vm_that_cannot_be_prepared_is_stopped_then_direct(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await cached_factory(run_root) as factory:
        await factory.base.wait_full(5)  # type: ignore[attr-defined]
        pooled = factory.base._ready[0]  # type: ignore[attr-defined]
        await fake_hv.agents.pop(pooled.id).stop()  # its agent dies
        vm = await factory.get_vm(timeout=1.0)
        try:
            assert vm.origin == "direct (fallback)"
            assert pooled.id not in fake_hv.running
            assert f"preparing VM {pooled.id}" in caplog.text
        finally:
            await vm.stop()


async def test_direct_boot_failure_is_reported_and_leaves_nothing(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    factory = Factory.direct(fake_config(), "mock", run_root=run_root)
    fake_hv.fail_start = 1
    with pytest.raises(LaunchError, match="failed to launch"):
        await factory.get_vm()
    vm = await factory.get_vm(id="named")
    try:
        assert vm.id == "named"
    finally:
        await vm.stop()


async def test_bad_request_config_is_a_config_error(fake_hv: type[FakeHV], run_root: str) -> None:
    factory = Factory.direct(fake_config(), "mock", run_root=run_root)
    with pytest.raises(ConfigError, match="Missing kernel path"):
        await factory.get_vm(fake_config(kernel_path=""))
    with pytest.raises(ConfigError, match="use_vsock"):
        await factory.get_vm(
            VMConfig(VMConfig.of(fake_config()).hypervisor, fake_config(use_vsock=True))
        )


async def test_guest_that_never_onlines_hot_added_cpus_gets_a_direct_boot(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake_hv.guest_lags = True
    async with await cached_factory(run_root) as factory:
        vm = await factory.get_vm(fake_config(num_vcpus=2), timeout=0.5)
        try:
            assert vm.origin == "direct (fallback)" and vm.cpu == 2
            assert "the guest has 1 CPUs" in caplog.text
        finally:
            await vm.stop()
