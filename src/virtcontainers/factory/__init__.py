"""The VM factory: VM templates, a VM cache (local or served over gRPC) and plain boots.

`Factory.get_vm(config)` hands out a running VM with a ready agent, made by one of the
strategies: `template` (clone a saved VM), `cache` (take a VM from a pool refilled in the
background) or `direct` (boot one). A config the factory's base cannot serve falls back to a
direct boot, with a log line saying why.
"""

from __future__ import annotations

from ..agent.endpoint import AgentEndpoint
from ..devices import random_mac
from .adopt import adopt_vm, factory_vm, sandbox_from_factory
from .base import DirectBase, FactoryBase, FactoryStatus, TemplateBase, VMStatus
from .cache import VMCache
from .daemon import DaemonSpec, daemon_status, start_daemon, stop_daemon
from .errors import CacheUnavailableError, FactoryError, TemplateError, TemplateMismatchError
from .factory import Factory
from .template import TemplateEntry, TemplateInfo, TemplateStore
from .vm import VM, boot_vm
from .vmconfig import VMConfig, config_hash, differences, incompatibility

__all__ = [
    "VM",
    "AgentEndpoint",
    "CacheUnavailableError",
    "DaemonSpec",
    "DirectBase",
    "Factory",
    "FactoryBase",
    "FactoryError",
    "FactoryStatus",
    "TemplateBase",
    "TemplateEntry",
    "TemplateError",
    "TemplateInfo",
    "TemplateMismatchError",
    "TemplateStore",
    "VMCache",
    "VMConfig",
    "VMStatus",
    "adopt_vm",
    "boot_vm",
    "config_hash",
    "daemon_status",
    "differences",
    "factory_vm",
    "incompatibility",
    "random_mac",
    "sandbox_from_factory",
    "start_daemon",
    "stop_daemon",
]
