"""Where base VMs come from: the `FactoryBase` interface and its direct and template bases."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from .template import CLONE_TIMEOUT, TemplateStore
from .vm import DEFAULT_BOOT_TIMEOUT, VM, boot_vm
from .vmconfig import VMConfig


@dataclass(frozen=True)
class VMStatus:
    """One VM a factory holds."""

    id: str
    pid: int
    cpu: int
    memory_mb: int
    state: str
    created_at: float


@dataclass
class FactoryStatus:
    """What a factory (base) holds and has done."""

    base: str
    pid: int = 0
    size: int = 0
    vms: list[VMStatus] = field(default_factory=list)
    booting: int = 0
    handed_out: int = 0
    waiting: int = 0
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "pid": self.pid,
            "size": self.size,
            "ready": len(self.vms),
            "vms": [vars(v) for v in self.vms],
            "booting": self.booting,
            "handed_out": self.handed_out,
            "waiting": self.waiting,
            "last_error": self.last_error,
        }


def vm_status(vm: VM) -> VMStatus:
    return VMStatus(vm.id, vm.pid(), vm.cpu, vm.memory_mb, vm.state.value, vm.created_at)


class FactoryBase(abc.ABC):
    """A source of base VMs, all made from one base config."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short description: "direct", "template:<name>", "cache(<base>)", ..."""

    @abc.abstractmethod
    def config(self) -> VMConfig:
        """The base config every VM of this source is made from."""

    @abc.abstractmethod
    async def get_base_vm(self, *, id: str | None = None, timeout: float) -> VM:
        """A new VM of the base config, running or paused, its agent ready or about to be."""

    async def status(self) -> FactoryStatus:
        return FactoryStatus(base=self.name)

    async def close(self) -> None:
        """Release what the source holds (pooled VMs, connections)."""
        return None


class DirectBase(FactoryBase):
    """Boots every VM from scratch."""

    def __init__(self, vm_config: VMConfig, *, run_root: str | None = None) -> None:
        self._config = vm_config.copy()
        self._config.validate()
        self.run_root = run_root

    @property
    def name(self) -> str:
        return "direct"

    def config(self) -> VMConfig:
        return self._config.copy()

    async def get_base_vm(
        self, *, id: str | None = None, timeout: float = DEFAULT_BOOT_TIMEOUT
    ) -> VM:
        return await boot_vm(self._config, id=id, run_root=self.run_root, timeout=timeout)


class TemplateBase(FactoryBase):
    """Clones every VM from one template (checked when the base is made)."""

    def __init__(self, store: TemplateStore, template: str) -> None:
        self.store = store
        self.template = template
        info = store.get(template)
        store.verify(info)
        self._config = VMConfig.of(info.base_config(), info.hypervisor)

    @property
    def name(self) -> str:
        return f"template:{self.template}"

    def config(self) -> VMConfig:
        return self._config.copy()

    async def get_base_vm(self, *, id: str | None = None, timeout: float = CLONE_TIMEOUT) -> VM:
        return await self.store.clone(self.template, id=id, timeout=timeout, fresh_identity=False)
