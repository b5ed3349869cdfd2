"""virtcontainers: run lightweight VMs (sandboxes) through one hypervisor interface.

The public names load on first use (PEP 562): `import virtcontainers` costs next to nothing,
so `virtc --version` and a containerd shim's `start` do not pay for pydantic, asyncio or the
drivers they never touch. `from virtcontainers import Sandbox` works as before.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs more than the rest
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

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
    from .inventory import SandboxInfo
    from .sandbox import Sandbox
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

_MODULE_OF = {
    **dict.fromkeys(("HypervisorConfig", "apply_annotations"), ".config"),
    **dict.fromkeys(
        (
            "AgentError",
            "AssetError",
            "ConfigError",
            "HostError",
            "HypervisorError",
            "LaunchError",
            "StateError",
            "UnsupportedError",
            "VCError",
            "VMExitedError",
            "VMTimeoutError",
        ),
        ".errors",
    ),
    **dict.fromkeys(("Hypervisor", "new_hypervisor"), ".hypervisor"),
    "Sandbox": ".sandbox",
    "SandboxInfo": ".inventory",
    **dict.fromkeys(
        (
            "Asset",
            "AssetType",
            "Capabilities",
            "DeviceType",
            "HypervisorType",
            "MemoryDevice",
            "Param",
            "Socket",
            "VSock",
            "deserialize_params",
            "serialize_params",
        ),
        ".types",
    ),
}


def _lazy_exports(
    package: str, module_of: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose public names load on first use: a
    name of `module_of` is imported from its module (relative to `package`), then cached in
    `namespace` (the package's globals)."""

    def getattr_(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *module_of})

    return getattr_, dir_


__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF, globals())


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
