"""The shim's configuration: the Kata-style configuration.toml the library reads, from
$VC_SHIM_CONFIG, the runtime options' config path, or /etc/virtcontainers/configuration.toml;
its `[factory]` section (Kata's keys) makes the shim take its VMs from a template or from the
VM cache server."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from ..config import HypervisorConfig, load_toml
from ..errors import ConfigError

DEFAULT_PATH = "/etc/virtcontainers/configuration.toml"
DEFAULT_TEMPLATE = "default"
"""The template `enable_template` uses without a `template_path`: `<run root>/templates/default`."""


@dataclass
class FactoryConfig:
    """Kata's `[factory]`: `enable_template` clones each VM from the template at
    `template_path` (a template directory: `<template store>/<name>`, as `virtc template
    create` makes it; made with --virtio-fs for containers); `vm_cache_number` > 0 takes VMs
    from the VM cache server at `vm_cache_endpoint` (`virtc factory init`; default: the run
    root's)."""

    enable_template: bool = False
    template_path: str = ""
    vm_cache_number: int = 0
    vm_cache_endpoint: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_template or self.vm_cache_number > 0

    def template(self) -> tuple[str | None, str]:
        """(template store root or None for the default, template name)."""
        if not self.template_path:
            return None, DEFAULT_TEMPLATE
        path = os.path.normpath(self.template_path)
        return os.path.dirname(path), os.path.basename(path)

    @classmethod
    def from_toml(cls, doc: dict[str, object], source: str) -> FactoryConfig:
        section = doc.get("factory", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: [factory] must be a table")
        types = {"enable_template": bool, "template_path": str, "vm_cache_number": int}
        types["vm_cache_endpoint"] = str
        for key, value in section.items():
            want = types.get(key)
            if want is None:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in [factory] (known: {', '.join(types)})"
                )
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{source}: [factory] {key} must be a {want.__name__}")
        cfg = cls(**section)
        if cfg.vm_cache_number < 0:
            raise ConfigError(f"{source}: [factory] vm_cache_number must not be negative")
        if cfg.enable_template and cfg.vm_cache_number > 0:
            raise ConfigError(
                f"{source}: [factory] enable_template and vm_cache_number: use one of them"
            )
        for key in ("template_path", "vm_cache_endpoint"):
            value = getattr(cfg, key)
            if value and not os.path.isabs(value):
                raise ConfigError(f"{source}: [factory] {key} must be an absolute path")
        return cfg


@dataclass
class ShimConfig:
    hypervisor: str = "qemu"
    hypervisor_config: HypervisorConfig | None = None
    source: str = ""
    factory: FactoryConfig = field(default_factory=FactoryConfig)

    @classmethod
    def load(cls, path: str = "") -> ShimConfig:
        """The configuration at `path`, else $VC_SHIM_CONFIG, else the default path if it
        exists; the library's defaults (QEMU) without one. A named file must exist."""
        path = path or os.environ.get("VC_SHIM_CONFIG", "")
        if not path:
            if not os.path.exists(DEFAULT_PATH):
                return cls()
            path = DEFAULT_PATH
        result = load_toml(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:  # load_toml read it a moment ago
            raise ConfigError(f"{path}: {e}") from e
        factory = FactoryConfig.from_toml(doc, path)
        return cls(result.hypervisor_type.value, result.config, result.source, factory)
