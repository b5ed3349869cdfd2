"""virtcontainers: run lightweight VMs (sandboxes) through one hypervisor interface."""

from __future__ import annotations

from .config import HypervisorConfig, apply_annotations
from .errors import (
    AgentError,
    AssetError,
    ConfigError,
    HostError,
    HypervisorError,
    LaunchError,
    StateError,
    UnsupportedError,
    VCError,
    VMExitedError,
    VMTimeoutError,
)
from .hypervisor import Hypervisor, new_hypervisor
from .sandbox import Sandbox, SandboxInfo
from .types import (
    Asset,
    AssetType,
    Capabilities,
    DeviceType,
    HypervisorType,
    MemoryDevice,
    Param,
    Socket,
    VSock,
    deserialize_params,
    serialize_params,
)

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "Asset",
    "AssetError",
    "AssetType",
    "Capabilities",
    "ConfigError",
    "DeviceType",
    "HostError",
    "Hypervisor",
    "HypervisorConfig",
    "HypervisorError",
    "HypervisorType",
    "LaunchError",
    "MemoryDevice",
    "Param",
    "Sandbox",
    "SandboxInfo",
    "Socket",
    "StateError",
    "UnsupportedError",
    "VCError",
    "VMExitedError",
    "VMTimeoutError",
    "VSock",
    "__version__",
    "apply_annotations",
    "deserialize_params",
    "new_hypervisor",
    "serialize_params",
]
