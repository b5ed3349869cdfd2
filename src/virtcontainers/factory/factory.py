"""`Factory`: one `get_vm(config)` over the template, cache and direct strategies.

A VM from the base gets resumed, a fresh identity (RNG reseeded, clock set through the
agent) and, when the request asks for more vCPUs or memory than the base has, the difference
hot-added. A request the base cannot serve (another config, hotplug missing, the base
failing) is booted directly instead, with a log line saying why (unless `fallback=False`).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from .. import persist
from ..config import HypervisorConfig
from ..errors import VCError
from ..hypervisor import VMState
from ..types import Capabilities, HypervisorType
from .base import DirectBase, FactoryBase, FactoryStatus, TemplateBase
from .errors import CacheMismatchError, FactoryError
from .template import TemplateStore
from .vm import DEFAULT_BOOT_TIMEOUT, VM, boot_vm, stop_quietly
from .vmconfig import VMConfig, incompatibility

log = logging.getLogger(__name__)


class _CannotServe(Exception):
    """A base VM cannot be made into the requested one (e.g. hotplug missing)."""


class Factory:
    """Hands out ready VMs: `vm = await factory.get_vm(config)`; close it when done."""

    def __init__(
        self, base: FactoryBase, *, fallback: bool = True, run_root: str | None = None
    ) -> None:
        self.base = base
        self.fallback = fallback
        self.run_root = run_root
        self._caps: Capabilities | None = None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def direct(
        cls,
        config: HypervisorConfig,
        hypervisor: HypervisorType | str = HypervisorType.QEMU,
        *,
        run_root: str | None = None,
    ) -> Factory:
        """A factory that boots every VM (the baseline strategy)."""
        return cls(
            DirectBase(VMConfig.of(config, hypervisor), run_root=run_root), run_root=run_root
        )

    @classmethod
    def from_template(
        cls,
        template: str,
        *,
        store: TemplateStore | None = None,
        run_root: str | None = None,
        fallback: bool = True,
    ) -> Factory:
        """A factory that clones template `template` (checked now: `TemplateError` if bad)."""
        store = store or TemplateStore(run_root=run_root)
        return cls(TemplateBase(store, template), fallback=fallback, run_root=store.run_root)

    @classmethod
    async def cached(
        cls,
        base: FactoryBase,
        size: int,
        *,
        concurrency: int = 1,
        fallback: bool = True,
        run_root: str | None = None,
    ) -> Factory:
        """A factory over an in-process pool of `size` VMs of `base`, filling from now on."""
        from . import poolshare
        from .cache import VMCache  # the in-process pool: not for the cache server's clients

        stage_root = persist.run_root(run_root) if poolshare.wanted(base.config()) else None
        cache = VMCache(base, size, concurrency=concurrency, stage_root=stage_root)
        await cache.start()
        return cls(cache, fallback=fallback, run_root=run_root)

    @classmethod
    async def connect(
        cls,
        socket_path: str | None = None,
        *,
        run_root: str | None = None,
        fallback: bool = True,
        timeout: float = 5.0,
        want: VMConfig | None = None,
    ) -> Factory:
        """A factory over the VM cache server at `socket_path` (default: the run root's).
        `want`: the config it will be asked for, checked by the server as it hands out a VM
        instead of its config being read now (see `RemoteCache.connect`)."""
        from .rpc.client import RemoteCache

        remote = await RemoteCache.connect(
            socket_path, run_root=run_root, timeout=timeout, want=want
        )
        return cls(remote, fallback=fallback, run_root=run_root)

    # -- use --------------------------------------------------------------------------------
    def config(self) -> VMConfig:
        return self.base.config()

    async def get_vm(
        self,
        config: HypervisorConfig | VMConfig | None = None,
        *,
        id: str | None = None,
        timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> VM:
        """A running VM with a ready agent for `config` (default: the base config)."""
        base = self.base.config()
        if config is None:
            request = base
        elif isinstance(config, VMConfig):
            request = config.copy()
            request.validate()
        else:
            request = VMConfig.of(config, base.hypervisor)
        reason = incompatibility(base, request) or self._hotplug_missing(base, request)
        if reason:
            return await self._direct(request, id, timeout, reason, logging.INFO)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            vm = await self.base.get_base_vm(id=id, timeout=timeout)
        except CacheMismatchError as exc:
            return await self._direct(request, id, timeout, str(exc), logging.INFO)
        except VCError as exc:
            if not self.fallback or isinstance(self.base, DirectBase):
                raise  # a direct boot is what just failed
            return await self._direct(request, id, timeout, f"{self.base.name} failed: {exc}")
        try:
            # A remote base's sizes are known once it has handed out a VM.
            base = self.base.config()
            await self._prepare(vm, base, request, max(0.1, deadline - loop.time()))
        except _CannotServe as exc:
            await stop_quietly(vm)
            return await self._direct(request, id, timeout, str(exc), logging.INFO)
        except VCError as exc:
            await stop_quietly(vm)
            if not self.fallback:
                raise
            return await self._direct(
                request, id, timeout, f"preparing VM {vm.id} from {self.base.name} failed: {exc}"
            )
        except BaseException:
            await stop_quietly(vm)
            raise
        return vm

    def _hotplug_missing(self, base: VMConfig, request: VMConfig) -> str:
        """Why growing a base VM to `request` cannot work (known after the first VM)."""
        if self._caps is None:
            return ""
        return _growth_blocker(self._caps, base, request)

    async def _prepare(self, vm: VM, base: VMConfig, request: VMConfig, timeout: float) -> None:
        self._caps = vm.hypervisor.capabilities()
        blocker = _growth_blocker(self._caps, base, request)
        if blocker:
            raise _CannotServe(blocker)
        if vm.state is VMState.PAUSED:
            await vm.resume()
        await vm.wait_agent(timeout, fresh_identity=True)
        add_cpu = request.config.num_vcpus - vm.cpu
        add_mem = request.config.memory_size - vm.memory_mb
        if add_cpu > 0 or add_mem > 0:
            _, mem_kib = await vm.guest_resources()
            old_mem = vm.memory_mb
            await vm.add_cpus(add_cpu)
            await vm.add_memory(add_mem)
            # Hotplugged memory shows in MemTotal nearly in full: allow 10% for its memmap.
            want_kib = mem_kib + ((vm.memory_mb - old_mem) << 10) * 9 // 10
            await vm.wait_online(vm.cpu, want_kib, timeout)
        if add_cpu < 0 or add_mem < 0:
            log.info(
                "factory: VM %s has %d vCPU / %d MiB, more than the %d vCPU / %d MiB requested",
                vm.id,
                vm.cpu,
                vm.memory_mb,
                request.config.num_vcpus,
                request.config.memory_size,
            )

    async def _direct(
        self,
        request: VMConfig,
        id: str | None,
        timeout: float,
        reason: str,
        level: int = logging.WARNING,
    ) -> VM:
        log.log(level, "factory: booting a VM directly: %s", reason)
        return await boot_vm(
            request, id=id, run_root=self.run_root, timeout=timeout, origin="direct (fallback)"
        )

    async def status(self) -> FactoryStatus:
        return await self.base.status()

    async def close(self) -> None:
        """Release the base (a local cache stops its pooled VMs)."""
        await self.base.close()

    async def __aenter__(self) -> Factory:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _growth_blocker(caps: Capabilities, base: VMConfig, request: VMConfig) -> str:
    want_cpu = request.config.num_vcpus > base.config.num_vcpus
    want_mem = request.config.memory_size > base.config.memory_size
    if want_cpu and Capabilities.CPU_HOTPLUG not in caps:
        return (
            f"{request.config.num_vcpus} vCPUs requested, the factory's VMs have "
            f"{base.config.num_vcpus} and vCPU hotplug is not available"
        )
    if want_mem and Capabilities.MEMORY_HOTPLUG not in caps:
        return (
            f"{request.config.memory_size} MiB requested, the factory's VMs have "
            f"{base.config.memory_size} MiB and memory hotplug is not available"
        )
    return ""


__all__ = ["Factory", "FactoryError"]
