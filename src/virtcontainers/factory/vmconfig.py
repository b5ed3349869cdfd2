"""What a factory makes (a hypervisor type and a base config) and how two configs compare.

A factory VM can serve a request whose config equals the base config in every field except
the ones listed in `RESIZABLE_FIELDS` (grown by hotplug after hand-out) and
`IDENTITY_FIELDS` (set per VM).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..config import HypervisorConfig
from ..errors import ConfigError
from ..types import HypervisorType

RESIZABLE_FIELDS = frozenset({"num_vcpus", "memory_size"})
IDENTITY_FIELDS = frozenset(
    {"boot_to_be_template", "boot_from_template", "memory_path", "devices_state_path", "vm_id"}
)


@dataclass
class VMConfig:
    """A hypervisor type plus the (validated) config every VM of a factory is made from."""

    hypervisor: HypervisorType
    config: HypervisorConfig

    @classmethod
    def of(cls, config: HypervisorConfig, hypervisor: HypervisorType | str = "qemu") -> VMConfig:
        """A validated copy of `config` for `hypervisor`."""
        vc = cls(HypervisorType.parse(hypervisor), config.copy())
        vc.validate()
        return vc

    def validate(self) -> None:
        """Validate (filling defaults) and refuse what factory VMs cannot have."""
        self.config.validate()
        if self.config.use_vsock:
            raise ConfigError(
                "use_vsock: factory VMs reach their agent over virtio-serial; "
                "vhost-vsock is not supported by the VM factory"
            )

    def copy(self) -> VMConfig:
        return VMConfig(self.hypervisor, self.config.copy())

    def to_dict(self) -> dict[str, Any]:
        return {"hypervisor": str(self.hypervisor), "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> VMConfig:
        if not isinstance(data, dict) or "config" not in data:
            raise ConfigError("VM config: expected a mapping with 'hypervisor' and 'config'")
        return cls(
            HypervisorType.parse(str(data.get("hypervisor", "qemu"))),
            HypervisorConfig.from_dict(data["config"]),
        )

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VMConfig:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"VM config: not valid JSON: {exc}") from exc
        return cls.from_dict(doc)


def normalized(config: HypervisorConfig) -> dict[str, Any]:
    """The config's fields that must match between a factory base and a request."""
    cfg = config.copy()
    cfg.boot_to_be_template = cfg.boot_from_template = False
    cfg.memory_path = cfg.devices_state_path = ""
    cfg.validate()
    doc = cfg.to_dict()
    for name in RESIZABLE_FIELDS | IDENTITY_FIELDS:
        doc.pop(name, None)
    return doc


def config_hash(config: HypervisorConfig) -> str:
    """sha256 of the normalized config (hex)."""
    text = json.dumps(normalized(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def differences(base: HypervisorConfig, requested: HypervisorConfig) -> list[str]:
    """Names of the fields (other than size and identity) where the two configs differ."""
    a, b = normalized(base), normalized(requested)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def incompatibility(base: VMConfig, requested: VMConfig) -> str:
    """Why a base VM cannot serve `requested` ("" when it can)."""
    if base.hypervisor != requested.hypervisor:
        return f"hypervisor {requested.hypervisor} differs from the factory's {base.hypervisor}"
    if base.config.to_dict() == requested.config.to_dict():
        return ""  # equal configs: no need to validate both
    diff = differences(base.config, requested.config)
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        return f"config differs from the factory's base config in {shown}"
    return ""


class BaseCheck:
    """`incompatibility` against one fixed base, for many requests: the base is normalized
    once, and a request sent as the JSON of an already validated config (the VM cache
    server's GetBaseVM) that equals it outside the size and identity fields is served
    without being validated again; any other is checked in full."""

    def __init__(self, base: VMConfig) -> None:
        self.base = base.copy()
        self._doc = normalized(self.base.config)

    def why_not(self, hypervisor: str, config_json: bytes) -> str:
        """Why the base cannot serve the config `config_json` of `hypervisor` ("" if it can);
        `ConfigError` if it is no valid config."""
        try:
            doc = json.loads(config_json)
        except ValueError as exc:
            raise ConfigError(f"VM config: not valid JSON: {exc}") from exc
        requested = VMConfig.from_dict({"hypervisor": hypervisor, "config": doc})
        if requested.hypervisor == self.base.hypervisor and self._doc == {
            k: v for k, v in doc.items() if k not in RESIZABLE_FIELDS | IDENTITY_FIELDS
        }:
            return ""
        requested.validate()
        return incompatibility(self.base, requested)
