"""The shim's configuration: the Kata-style configuration.toml the library reads, from
$VC_SHIM_CONFIG, the runtime options' config path, or /etc/virtcontainers/configuration.toml."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import HypervisorConfig, load_toml

DEFAULT_PATH = "/etc/virtcontainers/configuration.toml"


@dataclass
class ShimConfig:
    hypervisor: str = "qemu"
    hypervisor_config: HypervisorConfig | None = None
    source: str = ""

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
        return cls(result.hypervisor_type.value, result.config, result.source)
