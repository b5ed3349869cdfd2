"""`VMCache`: a pool of N ready VMs from a base, refilled in the background.

Pooled VMs have a ready agent and are paused (no CPU used while they wait). A caller that
finds the pool empty waits for the next VM, up to its timeout. A failing base is retried with
exponential back-off; waiting callers see the last failure in their error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os

from ..errors import ConfigError, VCError
from ..hypervisor import VMState
from .base import FactoryBase, FactoryStatus, vm_status
from .errors import FactoryError
from .ledger import Ledger
from .vm import DEFAULT_BOOT_TIMEOUT, VM, new_vm_id, stop_quietly
from .vmconfig import VMConfig

log = logging.getLogger(__name__)

DEFAULT_GET_TIMEOUT = 60.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
REFILL_DELAY = 2.0
"""Seconds the VM cache server waits before refilling after a take that left a VM in the
pool: making a VM (a clone's memory copy, QEMU's start) competes for the CPUs with the VM
just handed out while its container starts (architecture 6.6)."""


class VMCache(FactoryBase):
    """Keeps `size` VMs of `base` ready; `get_base_vm` takes one."""

    def __init__(
        self,
        base: FactoryBase,
        size: int,
        *,
        concurrency: int = 1,
        paused: bool = True,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        ledger: Ledger | None = None,
        stage_root: str | None = None,
        refill_delay: float = 0.0,
    ) -> None:
        """`stage_root`: the run root under which each pooled VM gets its staged share (see
        `poolshare`) before it is pooled; None: VMs are pooled without one. `refill_delay`:
        seconds a take that leaves a VM in the pool waits before refilling (see
        `REFILL_DELAY`); a take that empties it, or a waiting caller, refills at once."""
        if size < 1:
            raise ConfigError(f"VM cache size must be at least 1, got {size}")
        if concurrency < 1:
            raise ConfigError(f"VM cache concurrency must be at least 1, got {concurrency}")
        if not refill_delay >= 0:
            raise ConfigError(f"VM cache refill delay must be >= 0 seconds, got {refill_delay}")
        self.base = base
        self.size = size
        self.concurrency = concurrency
        self.paused = paused
        self.boot_timeout = boot_timeout
        self.ledger = ledger
        self.stage_root = stage_root
        self.refill_delay = refill_delay
        self.handed_out = 0
        self.last_error = ""
        self._ready: collections.deque[VM] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[VM]] = collections.deque()
        self._fillers: set[asyncio.Task[None]] = set()
        self._making = 0
        """VMs being made right now (fillers that have not delivered or failed yet)."""
        self._failures = 0
        self._retry: asyncio.TimerHandle | None = None
        self._deferred: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def name(self) -> str:
        return f"cache({self.base.name})"

    def config(self) -> VMConfig:
        return self.base.config()

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def booting(self) -> int:
        return self._making

    # -- filling ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start filling the pool (returns at once; see `wait_full`)."""
        if self._closed:
            raise FactoryError("the VM cache is closed")
        self._started = True
        self._kick()

    async def wait_full(self, timeout: float) -> None:
        """Wait until `size` VMs are ready; `FactoryError` (with the last failure) if not."""
        try:
            async with asyncio.timeout(timeout):
                while len(self._ready) < self.size:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise FactoryError(
                f"VM cache has {len(self._ready)} of {self.size} VMs after {timeout:g}s"
                + (f" (last failure: {self.last_error})" if self.last_error else "")
            ) from None

    def _kick(self, waiter: bool = False) -> None:
        if waiter and self._retry is not None and not self._making:
            # A new caller gets one fresh attempt even while the base is backing off.
            self._retry.cancel()
            self._retry = None
        if self._closed or not self._started or self._retry is not None:
            return
        waiting = sum(1 for w in self._waiters if not w.done())
        want = self.size + waiting - len(self._ready) - self._making
        while want > 0 and self._making < self.concurrency:
            self._making += 1
            task = asyncio.get_running_loop().create_task(self._fill(), name="vm-cache-fill")
            self._fillers.add(task)
            task.add_done_callback(self._filler_done)
            want -= 1

    def _refill_after_take(self) -> None:
        """Refill for a take: at once if the pool is empty now, else after `refill_delay`."""
        if not self._ready or self.refill_delay <= 0:
            self._kick()
        elif self._deferred is None:
            self._deferred = asyncio.get_running_loop().call_later(
                self.refill_delay, self._deferred_kick
            )

    def _deferred_kick(self) -> None:
        self._deferred = None
        self._kick()

    def _filler_done(self, task: asyncio.Task[None]) -> None:
        self._fillers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("VM cache filler crashed: %r", task.exception())

    async def _fill(self) -> None:
        try:
            await self._make_one()
        finally:
            self._making -= 1
            self._changed.set()
            self._kick()

    async def _make_one(self) -> None:
        vm_id = new_vm_id()
        if self.ledger is not None:
            self.ledger.add(vm_id)
        vm: VM | None = None
        try:
            vm = await self.base.get_base_vm(id=vm_id, timeout=self.boot_timeout)
            await vm.wait_agent(self.boot_timeout)
            if self.stage_root is not None:
                await vm.stage_share(self.stage_root)
            if self.paused and vm.state is VMState.RUNNING:
                await vm.quiesce()
            else:
                await vm.close_agent()
            if self.ledger is not None:
                self.ledger.add(vm.id, vm.pid())
        except asyncio.CancelledError:
            await stop_quietly(vm)
            self._forget(vm_id)
            raise
        except Exception as exc:
            await stop_quietly(vm)
            self._forget(vm_id)
            self._failed(exc)
            return
        self._failures = 0
        self.last_error = ""
        self._deliver(vm)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.last_error = str(exc).split("\n", 1)[0] or type(exc).__name__
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        level = logging.WARNING if isinstance(exc, VCError) else logging.ERROR
        log.log(level, "VM cache: making a VM failed (retrying in %.1fs): %s", delay, exc)
        if self._retry is None and not self._closed:
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._kick()

    def _deliver(self, vm: VM) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(vm)
                return
        self._ready.append(vm)
        self._changed.set()

    def _forget(self, vm_id: str) -> None:
        if self.ledger is not None:
            self.ledger.remove(vm_id)

    # -- taking -----------------------------------------------------------------------------
    async def take(self, timeout: float = DEFAULT_GET_TIMEOUT) -> VM:
        """A VM out of the pool, still listed in the ledger: the caller must `handed_off`
        or `discard` it. Waits up to `timeout` seconds when the pool is empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closed:
                raise FactoryError("the VM cache is closed")
            if self._ready:
                vm = self._ready.popleft()
                self._refill_after_take()
            else:
                vm = await self._wait(deadline, timeout)
            if await self._healthy(vm):
                return vm

    async def _wait(self, deadline: float, timeout: float) -> VM:
        fut: asyncio.Future[VM] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._kick(waiter=True)
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    return await fut
                except asyncio.CancelledError:
                    if fut.done() and not fut.cancelled():
                        self._give_back(fut.result())
                    raise
        except TimeoutError:
            raise FactoryError(
                f"no VM became ready within {timeout:g}s"
                + (f" (last failure: {self.last_error})" if self.last_error else "")
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def _give_back(self, vm: VM) -> None:
        """Return a VM whose taker went away before it got it."""
        if self._closed:
            asyncio.get_running_loop().create_task(self.discard(vm))
            return
        self._deliver(vm)

    async def _healthy(self, vm: VM) -> bool:
        try:
            await vm.hypervisor.check()
        except VCError as exc:
            log.warning("VM cache: dropping VM %s: %s", vm.id, exc)
            await self.discard(vm)
            return False
        return True

    def handed_off(self, vm: VM) -> None:
        """The VM now belongs to someone else: stop tracking it."""
        self.handed_out += 1
        self._forget(vm.id)

    async def discard(self, vm: VM) -> None:
        """Stop a taken VM that will not be handed out after all."""
        await stop_quietly(vm)
        self._forget(vm.id)

    async def get_base_vm(
        self, *, id: str | None = None, timeout: float = DEFAULT_GET_TIMEOUT
    ) -> VM:
        vm = await self.take(timeout)
        self.handed_off(vm)
        return vm

    # -- status / close ---------------------------------------------------------------------
    async def status(self) -> FactoryStatus:
        return FactoryStatus(
            base=self.base.name,
            pid=os.getpid(),
            size=self.size,
            vms=[vm_status(vm) for vm in self._ready],
            booting=self._making,
            handed_out=self.handed_out,
            waiting=sum(1 for w in self._waiters if not w.done()),
            last_error=self.last_error,
        )

    async def close(self) -> None:
        """Stop filling, stop every pooled VM, fail waiting callers. Idempotent."""
        self._closed = True
        for timer in (self._retry, self._deferred):
            if timer is not None:
                timer.cancel()
        self._retry = self._deferred = None
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(FactoryError("the VM cache was closed"))
                fut.exception()
        self._waiters.clear()
        fillers = list(self._fillers)
        for task in fillers:
            task.cancel()
        await asyncio.gather(*fillers, return_exceptions=True)
        while self._ready:
            await self.discard(self._ready.popleft())
        await self.base.close()
