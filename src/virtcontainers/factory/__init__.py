"""The VM factory: VM templates, a VM cache (local or served over gRPC) and plain boots.

`Factory.get_vm(config)` hands out a running VM with a ready agent, made by one of the
strategies: `template` (clone a saved VM), `cache` (take a VM from a pool refilled in the
background) or `direct` (boot one). A config the factory's base cannot serve falls back to a
direct boot, with a log line saying why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _lazy_exports

if TYPE_CHECKING:
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

# The names load on first use (PEP 562, as the package's own): `virtc run --factory` needs
# the cache client, not the template store, the daemon or the in-process cache.
_MODULE_OF = {
    "AgentEndpoint": "..agent.endpoint",
    "random_mac": "..devices",
    **dict.fromkeys(("adopt_vm", "factory_vm", "sandbox_from_factory"), ".adopt"),
    **dict.fromkeys(
        ("DirectBase", "FactoryBase", "FactoryStatus", "TemplateBase", "VMStatus"), ".base"
    ),
    "VMCache": ".cache",
    **dict.fromkeys(("DaemonSpec", "daemon_status", "start_daemon", "stop_daemon"), ".daemon"),
    **dict.fromkeys(
        ("CacheUnavailableError", "FactoryError", "TemplateError", "TemplateMismatchError"),
        ".errors",
    ),
    "Factory": ".factory",
    **dict.fromkeys(("TemplateEntry", "TemplateInfo", "TemplateStore"), ".template"),
    **dict.fromkeys(("VM", "boot_vm"), ".vm"),
    **dict.fromkeys(("VMConfig", "config_hash", "differences", "incompatibility"), ".vmconfig"),
}


__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF, globals())


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
