"""Loading the `[hypervisor.<name>]` section of a Kata `configuration.toml` into a
`HypervisorConfig` (Kata's key names, its mappings, unknown keys reported)."""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from ..types import HypervisorType, params_from_string
from .model import U32_MAX, HypervisorConfig, _describe

log = logging.getLogger(__name__)

#: Kata `[hypervisor.<name>]` key -> (field, how to read it). Special readers:
#: "params" (space-separated kernel command line), "csv" (comma list, trimmed as Kata does),
#: "vcpus" (negative means every host CPU), "swap" (enable_swap = not mlock, as Kata maps it).
_TomlKind = Literal["int", "str", "bool", "strlist", "params", "csv", "vcpus", "swap"]
_TOML_KEYS: dict[str, tuple[str, _TomlKind]] = {
    "path": ("hypervisor_path", "str"),
    "ctlpath": ("hypervisor_ctl_path", "str"),
    "jailer_path": ("jailer_path", "str"),
    "kernel": ("kernel_path", "str"),
    "initrd": ("initrd_path", "str"),
    "image": ("image_path", "str"),
    "firmware": ("firmware_path", "str"),
    "machine_type": ("hypervisor_machine_type", "str"),
    "machine_accelerators": ("machine_accelerators", "csv"),
    "cpu_features": ("cpu_features", "csv"),
    "kernel_params": ("kernel_params", "params"),
    "default_vcpus": ("num_vcpus", "vcpus"),
    "default_maxvcpus": ("default_max_vcpus", "int"),
    "default_memory": ("memory_size", "int"),
    "memory_slots": ("mem_slots", "int"),
    "memory_offset": ("mem_offset", "int"),
    "default_bridges": ("default_bridges", "int"),
    "msize_9p": ("msize_9p", "int"),
    "pcie_root_port": ("pcie_root_port", "int"),
    "virtio_fs_cache_size": ("virtio_fs_cache_size", "int"),
    "valid_hypervisor_paths": ("hypervisor_path_list", "strlist"),
    "valid_ctlpaths": ("hypervisor_ctl_path_list", "strlist"),
    "valid_jailer_paths": ("jailer_path_list", "strlist"),
    "valid_kernel_paths": ("kernel_path_list", "strlist"),
    "valid_image_paths": ("image_path_list", "strlist"),
    "valid_initrd_paths": ("initrd_path_list", "strlist"),
    "valid_firmware_paths": ("firmware_path_list", "strlist"),
    "valid_virtio_fs_daemon_paths": ("virtio_fs_daemon_list", "strlist"),
    "valid_file_mem_backends": ("file_backed_mem_root_list", "strlist"),
    "valid_vhost_user_store_paths": ("vhost_user_store_path_list", "strlist"),
    "enable_annotations": ("enable_annotations", "strlist"),
    "pflashes": ("pflash", "strlist"),
    "virtio_fs_extra_args": ("virtio_fs_extra_args", "strlist"),
    "block_device_driver": ("block_device_driver", "str"),
    "entropy_source": ("entropy_source", "str"),
    "shared_fs": ("shared_fs", "str"),
    "virtio_fs_daemon": ("virtio_fs_daemon", "str"),
    "virtio_fs_cache": ("virtio_fs_cache", "str"),
    "file_mem_backend": ("file_backed_mem_root_dir", "str"),
    "vhost_user_store_path": ("vhost_user_store_path", "str"),
    "guest_hook_path": ("guest_hook_path", "str"),
    "block_device_cache_set": ("block_device_cache_set", "bool"),
    "block_device_cache_direct": ("block_device_cache_direct", "bool"),
    "block_device_cache_noflush": ("block_device_cache_noflush", "bool"),
    "disable_block_device_use": ("disable_block_device_use", "bool"),
    "enable_iothreads": ("enable_iothreads", "bool"),
    "enable_debug": ("debug", "bool"),
    "enable_mem_prealloc": ("mem_prealloc", "bool"),
    "enable_hugepages": ("huge_pages", "bool"),
    "enable_virtio_mem": ("virtio_mem", "bool"),
    "enable_iommu": ("iommu", "bool"),
    "enable_iommu_platform": ("iommu_platform", "bool"),
    "disable_nesting_checks": ("disable_nesting_checks", "bool"),
    "use_vsock": ("use_vsock", "bool"),
    "disable_image_nvdimm": ("disable_image_nvdimm", "bool"),
    "hotplug_vfio_on_root_bus": ("hotplug_vfio_on_root_bus", "bool"),
    "disable_vhost_net": ("disable_vhost_net", "bool"),
    "enable_vhost_user_store": ("enable_vhost_user_store", "bool"),
    "enable_swap": ("mlock", "swap"),
}

#: The Kata TOML key for each field it fills (for error messages and documentation).
TOML_KEY_FOR_FIELD: dict[str, str] = {f: k for k, (f, _) in _TOML_KEYS.items()}


@dataclass(frozen=True)
class TomlLoadResult:
    """What `load_toml()` read: the config, the keys it could not place, and where from."""

    config: HypervisorConfig
    unknown_keys: list[str]
    hypervisor_type: HypervisorType
    source: str


def load_toml(
    path_or_text: str | os.PathLike[str], hypervisor: HypervisorType | str | None = None
) -> TomlLoadResult:
    """Read the `[hypervisor.<name>]` section of a Kata `configuration.toml`.

    `path_or_text` is a path (a `PathLike`, or a `str` without a newline) or the TOML text
    itself (a `str` containing a newline). With `hypervisor=None` the file must hold exactly
    one `[hypervisor.*]` section. Every known Kata key lands in its field (raw, no defaults:
    `validate()` fills those); keys that map to no field are returned in `unknown_keys` and
    logged as a warning. Other sections (`[runtime]`, `[agent.*]`, ...) belong to other layers
    and are not read. Kata's mappings are kept: `enable_swap = true` means `mlock = False`
    (so a file without it yields `mlock = True`), and a negative `default_vcpus` means every
    host CPU. Unreadable files, bad TOML and values of the wrong type raise `ConfigError`
    naming the file and the key.
    """
    text, source = _read_toml_source(path_or_text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from e
    sections = doc.get("hypervisor")
    if not isinstance(sections, dict) or not sections:
        raise ConfigError(f"{source}: no [hypervisor.<name>] section")
    if hypervisor is None:
        if len(sections) != 1:
            raise ConfigError(
                f"{source}: several hypervisor sections ({', '.join(sorted(sections))}); "
                "name the one to load"
            )
        name = next(iter(sections))
    else:
        name = str(HypervisorType.parse(hypervisor))
        if name not in sections:
            raise ConfigError(
                f"{source}: no [hypervisor.{name}] section (found: {', '.join(sorted(sections))})"
            )
    htype = HypervisorType.parse(name)
    table = sections[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: hypervisor.{name} must be a table")

    cfg = HypervisorConfig()
    # Kata maps a missing enable_swap to mlock = true.
    cfg.mlock = True
    unknown: list[str] = []
    for key, value in table.items():
        spec = _TOML_KEYS.get(key)
        if spec is None:
            unknown.append(key)
            continue
        fname, kind = spec
        setattr(cfg, fname, _read_toml_value(source, name, key, kind, value))
    if unknown:
        log.warning(
            "%s: [hypervisor.%s] keys with no HypervisorConfig field, ignored: %s",
            source,
            name,
            ", ".join(unknown),
        )
    return TomlLoadResult(cfg, unknown, htype, source)


def _read_toml_source(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return path_or_text, "<toml text>"
    if not isinstance(path_or_text, str | os.PathLike):
        raise ConfigError(f"from_toml needs a path or TOML text, got {_describe(path_or_text)}")
    path = Path(path_or_text)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read Kata configuration {path}: {e}") from e


def _read_toml_value(source: str, section: str, key: str, kind: _TomlKind, value: Any) -> Any:
    where = f"{source}: hypervisor.{section}.{key}"
    if kind in ("int", "vcpus"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {_describe(value)}")
        if kind == "vcpus" and value < 0:
            return os.cpu_count() or 1
        if not 0 <= value <= U32_MAX:
            raise ConfigError(f"{where} must be between 0 and {U32_MAX}, got {value}")
        return value
    if kind in ("bool", "swap"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be a boolean, got {_describe(value)}")
        return not value if kind == "swap" else value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {_describe(value)}")
        return list(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {_describe(value)}")
    if kind == "params":
        return params_from_string(value)
    if kind == "csv":
        return ",".join(p.strip() for p in value.split(",") if p.strip())
    return value
