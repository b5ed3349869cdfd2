"""The VM factory: VM templates, a VM cache (local or served over gRPC) and plain boots.

`Factory.get_vm(config)` hands out a running VM with a ready agent, made by one of the
strategies: `template` (clone a saved VM), `cache` (take a VM from a pool refilled in the
background) or `direct` (boot one). A config the factory's base cannot serve falls back to a
direct boot, with a log line saying why.
"""

from __future__ import annotations

from .errors import CacheUnavailableError, FactoryError, TemplateError, TemplateMismatchError
from .template import TemplateEntry, TemplateInfo, TemplateStore
from .vm import VM, AgentEndpoint, boot_vm, random_mac
from .vmconfig import VMConfig, config_hash, differences, incompatibility

__all__ = [
    "VM",
    "AgentEndpoint",
    "CacheUnavailableError",
    "FactoryError",
    "TemplateEntry",
    "TemplateError",
    "TemplateInfo",
    "TemplateMismatchError",
    "TemplateStore",
    "VMConfig",
    "boot_vm",
    "config_hash",
    "differences",
    "incompatibility",
    "random_mac",
]
