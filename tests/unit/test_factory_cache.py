"""VMCache: filling, taking, waiting, refilling, back-off, cancellation, closing, ledger."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import pytest
import test_factory_fakes
from test_factory_fakes import FakeHV, fake_config

from virtcontainers.errors import ConfigError
from virtcontainers.factory import VM, DirectBase, FactoryError, VMCache, VMConfig
from virtcontainers.factory import cache as cache_mod
from virtcontainers.factory.base import FactoryBase
from virtcontainers.factory.ledger import Ledger
from virtcontainers.hypervisor import VMState

fake_hv = test_factory_fakes.fake_hv


def direct_base(run_root: str) -> DirectBase:
    return DirectBase(VMConfig.of(fake_config(), "mock"), run_root=run_root)


class SlowBase(FactoryBase):
    """Wraps a base; every VM takes `delay` seconds; counts calls and concurrency."""

    def __init__(self, inner: FactoryBase, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.calls = 0
        self.active = 0
        self.max_active = 0

    @property
    def name(self) -> str:
        return "slow"

    def config(self) -> VMConfig:
        return self.inner.config()

    async def get_base_vm(self, *, id: str | None = None, timeout: float) -> VM:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            return await self.inner.get_base_vm(id=id, timeout=timeout)
        finally:
            self.active -= 1


@pytest.fixture
async def pool(fake_hv: type[FakeHV], run_root: str) -> AsyncIterator[VMCache]:
    c = VMCache(direct_base(run_root), 2)
    try:
        yield c
    finally:
        await c.close()


async def test_fills_to_size_with_paused_vms(pool: VMCache, fake_hv: type[FakeHV]) -> None:
    await pool.start()
    await pool.wait_full(5)
    st = await pool.status()
    assert st.size == 2 and len(st.vms) == 2 and st.booting == 0
    assert {v.state for v in st.vms} == {"paused"}
    assert len({v.id for v in st.vms}) == 2
    assert fake_hv.started == 2


async def test_take_hands_out_distinct_vms_and_refills(
    pool: VMCache, fake_hv: type[FakeHV]
) -> None:
    await pool.start()
    await pool.wait_full(5)
    vms = [await pool.get_base_vm(timeout=5) for _ in range(3)]
    try:
        assert len({vm.id for vm in vms}) == 3
        assert pool.handed_out == 3
        await pool.wait_full(5)
        assert fake_hv.started == 5
        st = await pool.status()
        assert not {v.id for v in st.vms} & {vm.id for vm in vms}
    finally:
        for vm in vms:
            await vm.stop()


async def test_a_take_that_leaves_a_vm_refills_after_the_delay(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    """A refill would compete with the VM just taken while its container starts."""
    cache = VMCache(direct_base(run_root), 2, refill_delay=0.5)
    await cache.start()
    await cache.wait_full(5)
    try:
        vm = await cache.take(5)
        await asyncio.sleep(0.2)
        assert cache.booting == 0 and fake_hv.started == 2
        await cache.wait_full(5)
        assert fake_hv.started == 3
        await vm.stop()
    finally:
        await cache.close()


async def test_a_take_that_empties_the_pool_refills_at_once(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    cache = VMCache(direct_base(run_root), 2, refill_delay=30)
    await cache.start()
    await cache.wait_full(5)
    try:
        vms = [await cache.take(5) for _ in range(2)]
        await cache.wait_full(5)  # long before the 30 s the first take deferred its refill
        assert fake_hv.started == 4
        for vm in vms:
            await vm.stop()
    finally:
        await cache.close()


async def test_close_cancels_a_deferred_refill(fake_hv: type[FakeHV], run_root: str) -> None:
    cache = VMCache(direct_base(run_root), 2, refill_delay=0.2)
    await cache.start()
    await cache.wait_full(5)
    vm = await cache.take(5)
    await cache.close()
    await asyncio.sleep(0.4)
    assert fake_hv.started == 2 and cache.booting == 0
    await vm.stop()
    assert fake_hv.running == {}


async def test_concurrent_callers_get_distinct_vms(fake_hv: type[FakeHV], run_root: str) -> None:
    base = SlowBase(direct_base(run_root), 0.05)
    cache = VMCache(base, 1, concurrency=2)
    await cache.start()
    try:
        vms = await asyncio.gather(*(cache.get_base_vm(timeout=10) for _ in range(6)))
        assert len({vm.id for vm in vms}) == 6
        assert base.max_active <= 2
        for vm in vms:
            await vm.stop()
    finally:
        await cache.close()


async def test_waiter_times_out_with_the_last_failure(fake_hv: type[FakeHV], run_root: str) -> None:
    fake_hv.fail_start = 100
    cache = VMCache(direct_base(run_root), 1)
    await cache.start()
    try:
        with pytest.raises(FactoryError, match=r"no VM became ready within 0.3s.*failed to launch"):
            await cache.get_base_vm(timeout=0.3)
        assert "failed to launch" in (await cache.status()).last_error
        with pytest.raises(FactoryError, match=r"1 VMs|0 of 1 VMs"):
            await cache.wait_full(0.1)
    finally:
        await cache.close()


async def test_failing_base_backs_off_then_recovers(
    fake_hv: type[FakeHV], run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "BACKOFF_FIRST", 0.05)
    fake_hv.fail_start = 3
    cache = VMCache(direct_base(run_root), 1)
    await cache.start()
    try:
        await cache.wait_full(5)
        st = await cache.status()
        assert len(st.vms) == 1 and st.last_error == ""
    finally:
        await cache.close()


async def test_back_off_grows_and_a_new_caller_gets_a_fresh_attempt(
    fake_hv: type[FakeHV], run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "BACKOFF_FIRST", 30.0)
    fake_hv.fail_start = 1
    cache = VMCache(direct_base(run_root), 1)
    await cache.start()
    try:
        for _ in range(100):
            if cache.last_error:
                break
            await asyncio.sleep(0.01)
        assert cache.last_error
        # The next attempt is 30 s away, but a caller does not have to wait for it.
        vm = await cache.get_base_vm(timeout=5)
        await vm.stop()
    finally:
        await cache.close()


async def test_cancelled_waiter_gives_its_vm_back(fake_hv: type[FakeHV], run_root: str) -> None:
    base = SlowBase(direct_base(run_root), 0.2)
    cache = VMCache(base, 1)
    await cache.start()
    try:
        waiter = asyncio.create_task(cache.get_base_vm(timeout=10))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await cache.wait_full(5)
        st = await cache.status()
        assert len(st.vms) == 1 and st.waiting == 0
        assert cache.handed_out == 0
    finally:
        await cache.close()
    assert fake_hv.running == {}


async def test_vm_delivered_to_a_waiter_cancelled_at_that_moment_is_not_lost(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    cache = VMCache(direct_base(run_root), 1)
    await cache.start()
    await cache.wait_full(5)
    try:
        vm = await cache.take(5)  # the pool is empty now; its refill takes >= 0.3 s
        waiter = asyncio.create_task(cache.take(5))
        while not cache._waiters:
            await asyncio.sleep(0)
        # The race: a VM is given to the waiter, and the waiter is cancelled before it runs.
        cache._deliver(vm)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert list(cache._ready) == [vm]
        assert cache.handed_out == 0
    finally:
        await cache.close()
    assert fake_hv.running == {}


async def test_dead_pooled_vm_is_dropped_not_handed_out(
    pool: VMCache, fake_hv: type[FakeHV]
) -> None:
    await pool.start()
    await pool.wait_full(5)
    first = pool._ready[0]
    await first.hypervisor.stop_sandbox()  # dies while pooled
    vm = await pool.get_base_vm(timeout=5)
    try:
        assert vm.id != first.id
        assert vm.state is VMState.PAUSED
    finally:
        await vm.stop()


async def test_close_stops_pooled_and_booting_vms_and_fails_waiters(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    base = SlowBase(direct_base(run_root), 0.3)
    cache = VMCache(base, 2, concurrency=2)
    await cache.start()
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(cache.get_base_vm(timeout=10))
    await asyncio.sleep(0.05)
    await cache.close()
    with pytest.raises(FactoryError, match="closed"):
        await waiter
    assert fake_hv.running == {}
    with pytest.raises(FactoryError, match="closed"):
        await cache.get_base_vm(timeout=1)
    with pytest.raises(FactoryError, match="closed"):
        await cache.start()
    await cache.close()  # idempotent


async def test_ledger_lists_exactly_the_vms_the_cache_owns(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    path = os.path.join(run_root, "pool.json")
    cache = VMCache(direct_base(run_root), 2, ledger=Ledger(path, run_root))

    def listed() -> set[str]:
        with open(path) as f:
            return {e["id"] for e in json.load(f)["vms"]}

    await cache.start()
    await cache.wait_full(5)
    assert listed() == {v.id for v in cache._ready}
    vm = await cache.take(5)
    assert vm.id in listed()  # taken but not handed off yet
    cache.handed_off(vm)
    assert vm.id not in listed()
    other = await cache.take(5)
    await cache.discard(other)
    assert other.id not in listed()
    assert other.id not in fake_hv.running
    await cache.close()
    assert listed() == set()
    await vm.stop()


def test_bad_sizes_are_refused(run_root: str) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        VMCache(direct_base(run_root), 0)
    with pytest.raises(ConfigError, match="concurrency"):
        VMCache(direct_base(run_root), 1, concurrency=0)
    with pytest.raises(ConfigError, match="refill delay"):
        VMCache(direct_base(run_root), 1, refill_delay=-1)


async def test_refill_failures_are_logged_with_the_reason(
    fake_hv: type[FakeHV], run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake_hv.fail_start = 1
    cache = VMCache(direct_base(run_root), 1)
    await cache.start()
    try:
        await cache.wait_full(5)
    finally:
        await cache.close()
    failures = [r for r in caplog.records if "making a VM failed" in r.getMessage()]
    assert failures and "failed to launch" in failures[0].getMessage()
