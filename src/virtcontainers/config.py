"""HypervisorConfig: the VM's configuration, its validation, assets, annotations and TOML loading.

Mirrors the seed's `HypervisorConfig` (snake_case fields, zero defaults) and adds what the Go
runtime spread over other packages: loading Kata's `configuration.toml` and applying
`io.katacontainers.config.hypervisor.*` annotations safely (allowlists, sha512 checks,
all-or-nothing).
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import fnmatch
import json
import logging
import os
import posixpath
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .devices import BLOCK_DRIVERS
from .errors import AssetError, ConfigError
from .types import Asset, AssetType, HypervisorType, Param, params_from_string, sha512_file

log = logging.getLogger(__name__)

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 2048
DEFAULT_BRIDGES = 1
DEFAULT_BLOCK_DRIVER = "virtio-scsi"
DEFAULT_MSIZE_9P = 8192

VIRTIO_FS = "virtio-fs"
VIRTIO_9P = "virtio-9p"
#: Shared file systems Kata's shipped configurations use ("" means the driver's default).
SHARED_FS_VALUES = ("", VIRTIO_9P, VIRTIO_FS)
#: virtiofsd `cache=` modes documented in Kata's configuration files ("" means the default).
VIRTIO_FS_CACHE_VALUES = ("", "none", "auto", "always")

U32_MAX = 2**32 - 1
#: Kata's cap on cold-plugged PCI bridges (`maxPCIBridges`).
MAX_BRIDGES = 5
#: QEMU refuses more than 256 memory hotplug slots (ACPI_MAX_RAM_SLOTS).
MAX_MEM_SLOTS = 256
#: Bounds for `memory_size` in MiB: below the minimum no Linux guest boots; above, it is a typo.
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 4 * 1024 * 1024
#: The Linux 9p client refuses an msize below 4 KiB; its virtio transport caps it below 4 MiB.
MIN_MSIZE_9P = 4096
MAX_MSIZE_9P = 4 * 1024 * 1024
#: q35's root bus has 32 slots, shared with every cold-plugged device: at most 16 root ports.
MAX_PCIE_ROOT_PORTS = 16
#: Bounds of the other numeric fields, inclusive (MiB where the field is a size). Every
#: integer field is bounded here or in `_check_values` (vCPUs by the host, memory_size,
#: msize_9p): the drivers size command lines and tables by them.
INT_FIELD_MAX: dict[str, int] = {
    "default_bridges": MAX_BRIDGES,
    "mem_slots": MAX_MEM_SLOTS,
    "mem_offset": MAX_MEMORY_MIB,
    "virtio_fs_cache_size": MAX_MEMORY_MIB,
    "pcie_root_port": MAX_PCIE_ROOT_PORTS,
}

#: virtiofsd (QEMU's C daemon) `-o` options `virtio_fs_extra_args` may carry: tuning and
#: feature flags only. What the share is (`source`), how it is confined (`sandbox`, `modcaps`,
#: `allow_root`), where it listens (`--socket-path`, `--fd`) and the cache mode
#: (`virtio_fs_cache`) are the project's to set.
VIRTIOFSD_FLAG_OPTIONS = frozenset(
    {
        *(
            f"{pre}{name}"
            for pre in ("", "no_")
            for name in (
                "flock",
                "posix_lock",
                "readdirplus",
                "writeback",
                "xattr",
                "posix_acl",
                "killpriv_v2",
                "allow_direct_io",
            )
        ),
        "announce_submounts",
        # security_label is left out: with it, QEMU 7.2's virtiofsd never answers a create.
        "no_security_label",
    }
)
#: virtiofsd `-o name=value` options allowed in `virtio_fs_extra_args`, with their values.
VIRTIOFSD_VALUE_OPTIONS: dict[str, re.Pattern[str]] = {
    "log_level": re.compile(r"debug|info|warn|err"),
    "max_idle_threads": re.compile(r"[0-9]{1,4}"),
    "timeout": re.compile(r"[0-9]{1,6}"),
}
#: virtiofsd long options (`--name=value`, or a bare `--name`) allowed in `virtio_fs_extra_args`.
VIRTIOFSD_LONG_OPTIONS: dict[str, re.Pattern[str] | None] = {
    "thread-pool-size": re.compile(r"[0-9]{1,4}"),
    "rlimit-nofile": re.compile(r"[0-9]{1,7}"),
    "syslog": None,
}

#: Host paths an `entropy_source` annotation may name (QEMU reads the file into the guest).
SAFE_ENTROPY_SOURCES = ("/dev/urandom", "/dev/random", "/dev/hwrng")

ANNOTATION_PREFIX = "io.katacontainers.config.hypervisor."

_Kind = Literal["int", "str", "bool", "strlist", "params"]
_KIND_OF_TYPE: dict[str, _Kind] = {
    "int": "int",
    "str": "str",
    "bool": "bool",
    "list[str]": "strlist",
    "list[Param]": "params",
}
_KIND_TEXT = {
    "int": "an integer",
    "str": "a string",
    "bool": "a boolean",
    "strlist": "a list of strings",
    "params": "a list of {key, value} parameters",
}


@dataclass
class HypervisorConfig:
    """Everything needed to build one VM; unset numbers are 0, strings "", lists empty.

    Call `validate()` before use: it checks the values and fills the seed's defaults in place.
    Custom assets (from `add_custom_asset()` or annotations) take precedence over the
    `*_path` fields in `asset_path()` and friends.
    """

    num_vcpus: int = 0
    default_max_vcpus: int = 0
    memory_size: int = 0
    default_bridges: int = 0
    msize_9p: int = 0
    mem_slots: int = 0
    mem_offset: int = 0
    virtio_fs_cache_size: int = 0
    kernel_params: list[Param] = field(default_factory=list)
    hypervisor_params: list[Param] = field(default_factory=list)
    kernel_path: str = ""
    image_path: str = ""
    initrd_path: str = ""
    firmware_path: str = ""
    kernel_path_list: list[str] = field(default_factory=list)
    image_path_list: list[str] = field(default_factory=list)
    initrd_path_list: list[str] = field(default_factory=list)
    firmware_path_list: list[str] = field(default_factory=list)
    machine_accelerators: str = ""
    cpu_features: str = ""
    hypervisor_path: str = ""
    hypervisor_path_list: list[str] = field(default_factory=list)
    hypervisor_ctl_path_list: list[str] = field(default_factory=list)
    hypervisor_ctl_path: str = ""
    jailer_path: str = ""
    jailer_path_list: list[str] = field(default_factory=list)
    block_device_driver: str = ""
    hypervisor_machine_type: str = ""
    memory_path: str = ""
    devices_state_path: str = ""
    entropy_source: str = ""
    shared_fs: str = ""
    virtio_fs_daemon: str = ""
    virtio_fs_daemon_list: list[str] = field(default_factory=list)
    virtio_fs_cache: str = ""
    virtio_fs_extra_args: list[str] = field(default_factory=list)
    file_backed_mem_root_dir: str = ""
    pflash: list[str] = field(default_factory=list)
    file_backed_mem_root_list: list[str] = field(default_factory=list)
    block_device_cache_set: bool = False
    block_device_cache_direct: bool = False
    block_device_cache_noflush: bool = False
    disable_block_device_use: bool = False
    enable_iothreads: bool = False
    debug: bool = False
    mem_prealloc: bool = False
    huge_pages: bool = False
    virtio_mem: bool = False
    iommu: bool = False
    iommu_platform: bool = False
    realtime: bool = False
    mlock: bool = False
    disable_nesting_checks: bool = False
    use_vsock: bool = False
    disable_image_nvdimm: bool = False
    hotplug_vfio_on_root_bus: bool = False
    pcie_root_port: int = 0
    boot_to_be_template: bool = False
    boot_from_template: bool = False
    disable_vhost_net: bool = False
    enable_vhost_user_store: bool = False
    vhost_user_store_path: str = ""
    vhost_user_store_path_list: list[str] = field(default_factory=list)
    guest_hook_path: str = ""
    vm_id: str = ""
    selinux_process_label: str = ""
    enable_annotations: list[str] = field(default_factory=list)
    _custom_assets: dict[AssetType, Asset] = field(default_factory=dict, init=False, repr=False)

    # -- validation ------------------------------------------------------------------------
    def check_template_config(self) -> None:
        """Refuse inconsistent VM-template settings, with the seed's messages."""
        if self.boot_to_be_template and self.boot_from_template:
            raise ConfigError("Cannot set both 'to be' and 'from' vm tempate")
        if self.boot_to_be_template or self.boot_from_template:
            if self.memory_path == "":
                raise ConfigError("Missing MemoryPath for vm template")
            if self.boot_from_template and self.devices_state_path == "":
                raise ConfigError("Missing DevicesStatePath to load from vm template")

    def validate(self) -> None:
        """Check the config (seed's messages first) and fill the seed's defaults in place.

        Also refuses values a VMM would fail on later (out-of-range numbers, unknown drivers,
        relative host paths, ...). On error nothing is modified.
        """
        self._check_types()
        if self.kernel_path == "":
            raise ConfigError("Missing kernel path")
        if self.image_path == "" and self.initrd_path == "":
            raise ConfigError("Missing image and initrd path")
        self.check_template_config()

        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not 0 <= value <= U32_MAX:
                raise ConfigError(f"{name} must be between 0 and {U32_MAX}, got {value}")

        from . import host

        max_vcpus = host.max_qemu_vcpus()
        filled = self.copy()
        if filled.num_vcpus == 0:
            filled.num_vcpus = DEFAULT_VCPUS
        if filled.memory_size == 0:
            filled.memory_size = DEFAULT_MEMORY_MIB
        if filled.default_bridges == 0:
            filled.default_bridges = DEFAULT_BRIDGES
        if filled.block_device_driver == "":
            filled.block_device_driver = DEFAULT_BLOCK_DRIVER
        if filled.default_max_vcpus == 0:
            filled.default_max_vcpus = max_vcpus
        if filled.msize_9p == 0 and filled.shared_fs != VIRTIO_FS:
            filled.msize_9p = DEFAULT_MSIZE_9P
        filled._check_values(max_vcpus)
        self._assign_from(filled)

    def _check_types(self) -> None:
        for name, kind in _FIELD_KINDS.items():
            _check_kind(name, kind, getattr(self, name))
        assets = self._custom_assets
        if not isinstance(assets, dict):
            raise ConfigError("custom assets must be a dict of AssetType to Asset")
        for atype, asset in assets.items():
            if not isinstance(atype, AssetType) or not isinstance(asset, Asset):
                raise ConfigError(f"custom asset {atype!r} must map an AssetType to an Asset")

    def _check_values(self, max_vcpus: int) -> None:
        """Range and enum checks on a config whose defaults are filled."""
        if self.default_max_vcpus > max_vcpus:
            raise ConfigError(
                f"default_max_vcpus {self.default_max_vcpus} exceeds the host maximum of "
                f"{max_vcpus} vCPUs"
            )
        if self.num_vcpus > self.default_max_vcpus:
            raise ConfigError(
                f"num_vcpus {self.num_vcpus} exceeds default_max_vcpus {self.default_max_vcpus}"
            )
        if not MIN_MEMORY_MIB <= self.memory_size <= MAX_MEMORY_MIB:
            raise ConfigError(
                f"memory_size {self.memory_size} MiB is out of range "
                f"({MIN_MEMORY_MIB}..{MAX_MEMORY_MIB} MiB)"
            )
        for name, maximum in INT_FIELD_MAX.items():
            value = getattr(self, name)
            if value > maximum:
                raise ConfigError(f"{name} {value} exceeds the maximum of {maximum}")
        if self.msize_9p and not MIN_MSIZE_9P <= self.msize_9p <= MAX_MSIZE_9P:
            raise ConfigError(
                f"msize_9p {self.msize_9p} is out of range ({MIN_MSIZE_9P}..{MAX_MSIZE_9P})"
            )
        _check_choice("block_device_driver", self.block_device_driver, BLOCK_DRIVERS)
        _check_choice("shared_fs", self.shared_fs, SHARED_FS_VALUES)
        _check_choice("virtio_fs_cache", self.virtio_fs_cache, VIRTIO_FS_CACHE_VALUES)
        if self.image_path and self.initrd_path:
            raise ConfigError(
                f"Cannot set both image_path {self.image_path!r} and initrd_path "
                f"{self.initrd_path!r}: a VM boots from one of them"
            )
        for name in _HOST_PATH_FIELDS:
            _check_host_path(name, getattr(self, name))
        for i, path in enumerate(self.pflash):
            _check_host_path(f"pflash[{i}]", path)
        for atype, asset in self._custom_assets.items():
            _check_host_path(f"custom {atype} asset", asset.path)
        for name in ("kernel_params", "hypervisor_params"):
            for p in getattr(self, name):
                if _has_control(p.key) or _has_control(p.value):
                    raise ConfigError(f"{name}: parameter {p.key}={p.value!r} has a control char")
        for p in self.kernel_params:
            # The kernel splits its command line on spaces: one would smuggle a parameter in.
            if any(c.isspace() or c == '"' for c in p.key + p.value) or "=" in p.key:
                raise ConfigError(
                    f"kernel_params: parameter {p.key!r}={p.value!r} contains a space, a quote "
                    "or '=' in its name"
                )
        check_virtiofsd_args("virtio_fs_extra_args", self.virtio_fs_extra_args)
        for pattern in self.enable_annotations:
            _compile_annotation_pattern(pattern)
        _check_option_list("machine_accelerators", self.machine_accelerators, _MACHINE_OPT_RE)
        _check_option_list("cpu_features", self.cpu_features, _CPU_FEATURE_RE)

    # -- kernel parameters and assets ------------------------------------------------------
    def add_kernel_param(self, param: Param) -> None:
        """Append a guest kernel parameter; its key must not be empty."""
        if not param.key:
            raise ConfigError("Empty kernel parameter")
        self.kernel_params.append(param)

    def add_custom_asset(self, asset: Asset | None) -> None:
        """Register an asset that overrides the configured path of its type.

        None or an empty path is a no-op; an invalid asset (relative path, hash mismatch)
        raises `AssetError`.
        """
        if asset is None or not asset.path:
            return
        try:
            ok = asset.valid()
        except ValueError:  # e.g. a NUL byte in the path
            ok = False
        if not ok:
            raise AssetError(f"Invalid {asset.type} at {asset.path}")
        log.debug("Using custom %s asset %s", asset.type, asset.path)
        self._custom_assets[asset.type] = asset

    def custom_assets(self) -> dict[AssetType, Asset]:
        """A copy of the registered custom assets."""
        return dict(self._custom_assets)

    def asset_path(self, asset_type: AssetType | str) -> str:
        """The path for `asset_type`: the custom asset if any, else the configured field."""
        atype = _parse_asset_type(asset_type)
        custom = self._custom_assets.get(atype)
        if custom is not None:
            return custom.path
        return str(getattr(self, _ASSET_FIELDS[atype]))

    def _is_custom(self, atype: AssetType) -> bool:
        return atype in self._custom_assets

    def kernel_asset_path(self) -> str:
        """The guest kernel path."""
        return self.asset_path(AssetType.KERNEL)

    def image_asset_path(self) -> str:
        """The guest image path."""
        return self.asset_path(AssetType.IMAGE)

    def initrd_asset_path(self) -> str:
        """The guest initrd path."""
        return self.asset_path(AssetType.INITRD)

    def hypervisor_asset_path(self) -> str:
        """The VMM binary path."""
        return self.asset_path(AssetType.HYPERVISOR)

    def hypervisor_ctl_asset_path(self) -> str:
        """The VMM control binary path (ACRN's acrnctl)."""
        return self.asset_path(AssetType.HYPERVISOR_CTL)

    def jailer_asset_path(self) -> str:
        """The jailer binary path (Firecracker)."""
        return self.asset_path(AssetType.JAILER)

    def firmware_asset_path(self) -> str:
        """The guest firmware path."""
        return self.asset_path(AssetType.FIRMWARE)

    def custom_kernel_asset(self) -> bool:
        """True when the kernel comes from a custom asset."""
        return self._is_custom(AssetType.KERNEL)

    def custom_image_asset(self) -> bool:
        """True when the image comes from a custom asset."""
        return self._is_custom(AssetType.IMAGE)

    def custom_initrd_asset(self) -> bool:
        """True when the initrd comes from a custom asset."""
        return self._is_custom(AssetType.INITRD)

    def custom_hypervisor_asset(self) -> bool:
        """True when the VMM binary comes from a custom asset."""
        return self._is_custom(AssetType.HYPERVISOR)

    # -- copies and (de)serialization ------------------------------------------------------
    def copy(self) -> HypervisorConfig:
        """A deep copy (lists, params and custom assets included)."""
        return _copy.deepcopy(self)

    def _assign_from(self, other: HypervisorConfig) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field, params as `{key, value}` and custom assets."""
        out: dict[str, Any] = {}
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if kind == "params":
                out[name] = [{"key": p.key, "value": p.value} for p in value]
            elif kind == "strlist":
                out[name] = list(value)
            else:
                out[name] = value
        out["custom_assets"] = {
            str(t.value): {"path": a.path, "hash": a.hash} for t, a in self._custom_assets.items()
        }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HypervisorConfig:
        """Rebuild a config from `to_dict()` output; unknown keys and wrong types raise.

        Missing keys keep their zero default. Custom assets are restored as recorded
        (absolute paths are required; their files are not re-hashed).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"HypervisorConfig data must be a mapping, got {type(data).__name__}")
        cfg = cls()
        for key, value in data.items():
            if key == "custom_assets":
                cfg._custom_assets = _decode_custom_assets(value)
                continue
            kind = _FIELD_KINDS.get(key) if isinstance(key, str) else None
            if kind is None:
                raise ConfigError(f"Unknown HypervisorConfig key {key!r}")
            if kind == "params":
                setattr(cfg, key, _decode_params(key, value))
            else:
                _check_kind(key, kind, value)
                if kind == "int" and not 0 <= value <= U32_MAX:
                    raise ConfigError(f"{key} must be between 0 and {U32_MAX}, got {value}")
                setattr(cfg, key, list(value) if kind == "strlist" else value)
        return cfg

    # -- TOML ------------------------------------------------------------------------------
    @classmethod
    def from_toml(
        cls,
        path_or_text: str | os.PathLike[str],
        hypervisor: HypervisorType | str | None = None,
        *,
        strict: bool = False,
    ) -> HypervisorConfig:
        """Load a Kata `configuration.toml`'s `[hypervisor.<name>]` section.

        Keys that map to no field are logged as a warning (or raise `ConfigError` when
        `strict`); use `load_toml()` to get them as a list. See `load_toml()` for details.
        """
        result = load_toml(path_or_text, hypervisor)
        if result.unknown_keys and strict:
            raise ConfigError(
                f"{result.source}: unknown keys in [hypervisor.{result.hypervisor_type}]: "
                + ", ".join(result.unknown_keys)
            )
        return result.config


def _check_kind(name: str, kind: _Kind, value: Any) -> None:
    ok: bool
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "strlist":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, list) and all(
            isinstance(p, Param) and isinstance(p.key, str) and isinstance(p.value, str)
            for p in value
        )
    if not ok:
        raise ConfigError(f"{name} must be {_KIND_TEXT[kind]}, got {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"Unknown {name} {value!r} (one of {shown})")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _check_host_path(name: str, path: str) -> None:
    if not path:
        return
    if not os.path.isabs(path):
        raise ConfigError(f"{name} must be an absolute path, got {path!r}")
    if _has_control(path):
        raise ConfigError(f"{name} {path!r} contains a control character")


#: One `-machine` option: a flag or key=value without paths (no `/`, `,` or spaces).
_MACHINE_OPT_RE = re.compile(r"[A-Za-z0-9_.-]+(=[A-Za-z0-9_.:-]*)?")
#: One `-cpu` feature: `+flag`, `-flag`, `flag` or `flag=value`.
_CPU_FEATURE_RE = re.compile(r"[+-]?[A-Za-z0-9_.-]+(=[A-Za-z0-9_.:-]*)?")
#: Machine properties naming host files, guest boot images or backing objects: a
#: `machine_accelerators` value (settable by annotation) must not reach them.
UNSAFE_MACHINE_OPTIONS = frozenset(
    {
        "kernel",
        "initrd",
        "append",
        "dtb",
        "dumpdtb",
        "firmware",
        "memory-backend",
        "confidential-guest-support",
        "memory-encryption",
        "pflash0",
        "pflash1",
        "accel",
        "type",
    }
)


def _check_option_list(name: str, value: str, token: re.Pattern[str]) -> None:
    """Refuse a comma list that would smuggle extra QEMU options (paths, objects, images)."""
    if not value:
        return
    for item in value.split(","):
        if not token.fullmatch(item):
            raise ConfigError(
                f"{name}: option {item!r} in {value!r} is not a plain flag or key=value"
            )
        key = item.lstrip("+-").split("=", 1)[0].replace("_", "-")
        if name == "machine_accelerators" and key in UNSAFE_MACHINE_OPTIONS:
            raise ConfigError(f"{name}: option {key!r} in {value!r} is not allowed")


def check_virtiofsd_args(name: str, args: Iterable[str]) -> None:
    """Refuse any virtiofsd argument outside the allowlist (`VIRTIOFSD_*_OPTIONS`).

    `-o` takes its options as the next argument (a comma list); long options are written
    `--name=value`. `name` (a field or an annotation) leads the error message.
    """
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "-o":
            if i + 1 >= len(items):
                raise ConfigError(f"{name}: virtiofsd '-o' needs an option list after it")
            for opt in items[i + 1].split(","):
                _check_virtiofsd_option(name, opt)
            i += 2
            continue
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key in VIRTIOFSD_LONG_OPTIONS:
                pattern = VIRTIOFSD_LONG_OPTIONS[key]
                if pattern is None and not eq:
                    i += 1
                    continue
                if pattern is not None and eq and pattern.fullmatch(value):
                    i += 1
                    continue
        raise ConfigError(
            f"{name}: virtiofsd argument {arg!r} is not allowed (allowed: -o with "
            f"{', '.join(sorted([*VIRTIOFSD_FLAG_OPTIONS, *VIRTIOFSD_VALUE_OPTIONS]))}; "
            f"{', '.join('--' + k for k in VIRTIOFSD_LONG_OPTIONS)})"
        )


def _check_virtiofsd_option(name: str, opt: str) -> None:
    key, eq, value = opt.partition("=")
    if not eq and key in VIRTIOFSD_FLAG_OPTIONS:
        return
    pattern = VIRTIOFSD_VALUE_OPTIONS.get(key)
    if eq and pattern is not None and pattern.fullmatch(value):
        return
    raise ConfigError(f"{name}: virtiofsd option '-o {opt}' is not allowed")


def _compile_annotation_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise ConfigError(f"enable_annotations: invalid regular expression {pattern!r}: {e}") from e


def _parse_asset_type(value: AssetType | str) -> AssetType:
    if isinstance(value, AssetType):
        return value
    try:
        return AssetType(value)
    except ValueError:
        raise ConfigError(f"Unknown asset type {value}") from None


def _decode_params(name: str, value: Any) -> list[Param]:
    if not isinstance(value, list):
        raise ConfigError(
            f"{name} must be a list of {{key, value}} objects, got {_describe(value)}"
        )
    out: list[Param] = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, Mapping)
            or set(item) != {"key", "value"}
            or not isinstance(item["key"], str)
            or not isinstance(item["value"], str)
        ):
            raise ConfigError(
                f"{name}[{i}] must be an object with string 'key' and 'value', "
                f"got {_describe(item)}"
            )
        out.append(Param(item["key"], item["value"]))
    return out


def _decode_custom_assets(value: Any) -> dict[AssetType, Asset]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"custom_assets must be an object, got {_describe(value)}")
    out: dict[AssetType, Asset] = {}
    for tname, entry in value.items():
        key = f"custom_assets.{tname}"
        if not isinstance(tname, str):
            raise ConfigError(f"{key}: asset type must be a string")
        atype = _parse_asset_type(tname)
        if not isinstance(entry, Mapping) or not set(entry) <= {"path", "hash"}:
            raise ConfigError(f"{key} must be an object with 'path' and 'hash', got {entry!r}")
        path = entry.get("path")
        digest = entry.get("hash")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ConfigError(f"{key}.path must be an absolute path, got {path!r}")
        if digest is not None and not isinstance(digest, str):
            raise ConfigError(f"{key}.hash must be a string or null, got {_describe(digest)}")
        out[atype] = Asset(atype, path, digest)
    return out


_FIELD_KINDS: dict[str, _Kind] = {
    f.name: _KIND_OF_TYPE[str(f.type)]
    for f in dataclasses.fields(HypervisorConfig)
    if not f.name.startswith("_")
}
_INT_FIELDS = tuple(n for n, k in _FIELD_KINDS.items() if k == "int")

_ASSET_FIELDS: dict[AssetType, str] = {
    AssetType.KERNEL: "kernel_path",
    AssetType.IMAGE: "image_path",
    AssetType.INITRD: "initrd_path",
    AssetType.HYPERVISOR: "hypervisor_path",
    AssetType.HYPERVISOR_CTL: "hypervisor_ctl_path",
    AssetType.JAILER: "jailer_path",
    AssetType.FIRMWARE: "firmware_path",
}

#: Fields holding host paths: when set they must be absolute.
_HOST_PATH_FIELDS = (
    *_ASSET_FIELDS.values(),
    "memory_path",
    "devices_state_path",
    "entropy_source",
    "virtio_fs_daemon",
    "file_backed_mem_root_dir",
    "vhost_user_store_path",
)


# == TOML ====================================================================================

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


# == annotations =============================================================================

_BOOL_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_BOOL_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_UINT_RE = re.compile(r"[0-9]+")
_SHA512_RE = re.compile(r"[0-9a-fA-F]{128}")
_MACHINE_TYPE_RE = re.compile(r"[A-Za-z0-9._-]+")

#: Annotation name -> field, for booleans.
_ANNOT_BOOL = {
    "enable_virtio_mem": "virtio_mem",
    "block_device_cache_set": "block_device_cache_set",
    "block_device_cache_direct": "block_device_cache_direct",
    "block_device_cache_noflush": "block_device_cache_noflush",
    "disable_block_device_use": "disable_block_device_use",
    "enable_iothreads": "enable_iothreads",
    "enable_mem_prealloc": "mem_prealloc",
    "enable_hugepages": "huge_pages",
    "enable_iommu": "iommu",
    "enable_iommu_platform": "iommu_platform",
    "use_vsock": "use_vsock",
    "hotplug_vfio_on_root_bus": "hotplug_vfio_on_root_bus",
    "disable_vhost_net": "disable_vhost_net",
    "enable_vhost_user_store": "enable_vhost_user_store",
    "disable_image_nvdimm": "disable_image_nvdimm",
}
#: Annotation name -> field, for unsigned 32-bit numbers.
_ANNOT_UINT = {
    "default_vcpus": "num_vcpus",
    "default_max_vcpus": "default_max_vcpus",
    "default_memory": "memory_size",
    "memory_slots": "mem_slots",
    "memory_offset": "mem_offset",
    "default_bridges": "default_bridges",
    "msize_9p": "msize_9p",
    "virtio_fs_cache_size": "virtio_fs_cache_size",
    "pcie_root_port": "pcie_root_port",
}
#: Annotation name -> (field, allowed values or None for free text).
_ANNOT_STR: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "machine_accelerators": ("machine_accelerators", None),
    "cpu_features": ("cpu_features", None),
    "guest_hook_path": ("guest_hook_path", None),
    "block_device_driver": ("block_device_driver", BLOCK_DRIVERS),
    "shared_fs": ("shared_fs", SHARED_FS_VALUES),
    "virtio_fs_cache": ("virtio_fs_cache", VIRTIO_FS_CACHE_VALUES),
}
#: Annotation name -> (asset type, field, allowlist field). Every asset path needs an
#: allowlist match; guest assets (kernel, image, initrd, firmware) must also be regular files
#: (QEMU reads them into guest memory or attaches them as disks).
_ANNOT_ASSET: dict[str, tuple[AssetType, str, str]] = {
    "path": (AssetType.HYPERVISOR, "hypervisor_path", "hypervisor_path_list"),
    "ctlpath": (AssetType.HYPERVISOR_CTL, "hypervisor_ctl_path", "hypervisor_ctl_path_list"),
    "jailer_path": (AssetType.JAILER, "jailer_path", "jailer_path_list"),
    "kernel": (AssetType.KERNEL, "kernel_path", "kernel_path_list"),
    "image": (AssetType.IMAGE, "image_path", "image_path_list"),
    "initrd": (AssetType.INITRD, "initrd_path", "initrd_path_list"),
    "firmware": (AssetType.FIRMWARE, "firmware_path", "firmware_path_list"),
}
#: Guest assets: an annotation may only name a regular file (an image may also be a block
#: device, when its allowlist names that device exactly, without wildcards).
_GUEST_ASSET_LISTS = {
    AssetType.KERNEL: "kernel_path_list",
    AssetType.IMAGE: "image_path_list",
    AssetType.INITRD: "initrd_path_list",
    AssetType.FIRMWARE: "firmware_path_list",
}
#: Annotation name -> (field, allowlist field) for other host paths.
_ANNOT_PATH = {
    "virtio_fs_daemon": ("virtio_fs_daemon", "virtio_fs_daemon_list"),
    "file_mem_backend": ("file_backed_mem_root_dir", "file_backed_mem_root_list"),
    "vhost_user_store_path": ("vhost_user_store_path", "vhost_user_store_path_list"),
}
#: Annotation name -> the asset whose file must have that sha512.
_ANNOT_HASH = {
    "kernel_hash": AssetType.KERNEL,
    "image_hash": AssetType.IMAGE,
    "initrd_hash": AssetType.INITRD,
    "firmware_hash": AssetType.FIRMWARE,
    "hypervisor_hash": AssetType.HYPERVISOR,
    "hypervisorctl_hash": AssetType.HYPERVISOR_CTL,
    "jailer_hash": AssetType.JAILER,
}
_ANNOT_SPECIAL = ("kernel_params", "virtio_fs_extra_args", "enable_swap", "machine_type")
_ANNOT_OTHER = ("entropy_source",)

#: Every hypervisor annotation name `apply_annotations()` understands.
KNOWN_ANNOTATIONS: frozenset[str] = frozenset(
    (
        *_ANNOT_BOOL,
        *_ANNOT_UINT,
        *_ANNOT_STR,
        *_ANNOT_ASSET,
        *_ANNOT_PATH,
        *_ANNOT_HASH,
        *_ANNOT_SPECIAL,
        *_ANNOT_OTHER,
    )
)


def apply_annotations(config: HypervisorConfig, annotations: Mapping[str, str]) -> None:
    """Apply `io.katacontainers.config.hypervisor.<name>` annotations to `config`, or none.

    Rules (the CVE-2020-27151 class of attack is an annotation making the runtime run a host
    binary of the caller's choice):

    - a name is refused unless a regular expression of `config.enable_annotations` matches
      it entirely; unknown names are refused;
    - host paths (`path`, `ctlpath`, `jailer_path`, `kernel`, `image`, `initrd`, `firmware`,
      `virtio_fs_daemon`, `file_mem_backend`, `vhost_user_store_path`) must be normalized
      absolute paths matching a glob of their allowlist (`*`, `?`, `[...]` never cross `/`;
      an empty allowlist refuses all), and their symlink-resolved target must match one too;
    - guest assets (`kernel`, `image`, `initrd`, `firmware`, and the file their `*_hash`
      checks) must be regular files; an image may be a block device only when
      `image_path_list` names it exactly;
    - `virtio_fs_extra_args` must be a JSON list of allowlisted virtiofsd options;
    - `<asset>_hash` makes the asset's file (after this call's path changes) pass a sha512
      check; path annotations for assets also register custom assets;
    - `entropy_source` may only name /dev/urandom, /dev/random or /dev/hwrng;
    - values with control characters, bad numbers or booleans, and `*_extra_args` that are
      not a JSON list of strings are refused.

    Annotations outside the hypervisor prefix are ignored (other layers own them). Any
    refusal raises `ConfigError` naming the annotation and leaves `config` unchanged.
    """
    if not isinstance(annotations, Mapping):
        raise ConfigError(f"annotations must be a mapping, got {_describe(annotations)}")
    wanted: list[tuple[str, str, str]] = []
    for key, value in annotations.items():
        if not isinstance(key, str) or not key.startswith(ANNOTATION_PREFIX):
            continue
        if not isinstance(value, str):
            raise ConfigError(f"annotation {key}: value must be a string, got {_describe(value)}")
        wanted.append((key, key[len(ANNOTATION_PREFIX) :], value))
    if not wanted:
        return

    config._check_types()
    new = config.copy()
    patterns = [_compile_annotation_pattern(p) for p in _str_list(config.enable_annotations)]
    hashes: list[tuple[str, AssetType, str]] = []
    for key, name, value in wanted:
        if name not in KNOWN_ANNOTATIONS:
            raise ConfigError(f"Unknown hypervisor annotation {key}")
        if not any(p.fullmatch(name) for p in patterns):
            raise ConfigError(
                f"annotation {key} is not enabled (enable_annotations = "
                f"{list(config.enable_annotations)!r})"
            )
        if name in _ANNOT_HASH:
            hashes.append((key, _ANNOT_HASH[name], value))
        else:
            _apply_one(new, key, name, value)
    for key, atype, digest in hashes:
        _apply_hash(new, key, atype, digest)
    config._assign_from(new)


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"enable_annotations must be a list of strings, got {_describe(value)}")
    return value


def _apply_one(cfg: HypervisorConfig, key: str, name: str, value: str) -> None:
    if name == "virtio_fs_extra_args":
        extra = _json_str_list(key, value)
        check_virtiofsd_args(f"annotation {key}", extra)
        cfg.virtio_fs_extra_args = [*cfg.virtio_fs_extra_args, *extra]
        return
    if _has_control(value):
        raise ConfigError(f"annotation {key}: value {value!r} contains a control character")
    if name in _ANNOT_BOOL:
        setattr(cfg, _ANNOT_BOOL[name], _parse_bool(key, value))
    elif name == "enable_swap":
        cfg.mlock = not _parse_bool(key, value)
    elif name in _ANNOT_UINT:
        setattr(cfg, _ANNOT_UINT[name], _parse_uint(key, value))
    elif name in _ANNOT_STR:
        fname, allowed = _ANNOT_STR[name]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"annotation {key}: unknown value {value!r} (one of {allowed})")
        if fname == "guest_hook_path" and value and not value.startswith("/"):
            raise ConfigError(f"annotation {key}: {value!r} is not an absolute guest path")
        setattr(cfg, fname, value)
    elif name == "machine_type":
        if not _MACHINE_TYPE_RE.fullmatch(value):
            raise ConfigError(f"annotation {key}: invalid machine type {value!r}")
        cfg.hypervisor_machine_type = value
    elif name == "kernel_params":
        for param in params_from_string(value):
            try:
                cfg.add_kernel_param(param)
            except ConfigError as e:
                raise ConfigError(f"annotation {key}: {e} in {value!r}") from None
    elif name == "entropy_source":
        if value not in SAFE_ENTROPY_SOURCES:
            raise ConfigError(
                f"annotation {key}: entropy source {value!r} refused "
                f"(one of {', '.join(SAFE_ENTROPY_SOURCES)})"
            )
        cfg.entropy_source = value
    elif name in _ANNOT_PATH:
        fname, list_name = _ANNOT_PATH[name]
        _check_allowed_path(key, value, getattr(cfg, list_name), list_name)
        setattr(cfg, fname, value)
    else:
        atype, asset_field, asset_list = _ANNOT_ASSET[name]
        if not value:
            raise ConfigError(f"annotation {key}: empty path")
        allowlist = getattr(cfg, asset_list)
        _check_allowed_path(key, value, allowlist, asset_list)
        if atype in _GUEST_ASSET_LISTS:
            _check_guest_file(key, atype, value, allowlist)
        setattr(cfg, asset_field, value)
        cfg._custom_assets[atype] = Asset(atype, value)


def _apply_hash(cfg: HypervisorConfig, key: str, atype: AssetType, digest: str) -> None:
    if not _SHA512_RE.fullmatch(digest):
        raise ConfigError(f"annotation {key}: {digest!r} is not a sha512 hex digest")
    path = cfg.asset_path(atype)
    if not path:
        raise ConfigError(f"annotation {key}: no {atype} path to check")
    if atype in _GUEST_ASSET_LISTS:
        _check_guest_file(key, atype, path, getattr(cfg, _GUEST_ASSET_LISTS[atype]))
    try:
        actual = sha512_file(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"annotation {key}: cannot read {atype} {path}: {e}") from None
    if actual != digest.lower():
        raise ConfigError(f"annotation {key}: sha512 of {atype} {path} does not match")
    cfg._custom_assets[atype] = Asset(atype, path, digest.lower())


def _parse_bool(key: str, value: str) -> bool:
    if value in _BOOL_TRUE:
        return True
    if value in _BOOL_FALSE:
        return False
    raise ConfigError(f"annotation {key}: {value!r} is not a boolean (true or false)")


def _parse_uint(key: str, value: str) -> int:
    if not _UINT_RE.fullmatch(value) or int(value) > U32_MAX:
        raise ConfigError(f"annotation {key}: {value!r} is not an integer in 0..{U32_MAX}")
    return int(value)


def _json_str_list(key: str, value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"annotation {key}: not a JSON list of strings: {e}") from None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ConfigError(f"annotation {key}: must be a JSON list of strings, got {value!r}")
    for arg in parsed:
        if _has_control(arg):
            raise ConfigError(f"annotation {key}: argument {arg!r} contains a control character")
    return parsed


def _check_clean_path(key: str, path: str) -> None:
    """A normalized absolute path: no `..`, `.`, `//` or trailing `/`."""
    if not path.startswith("/") or posixpath.normpath(path) != path or path.startswith("//"):
        raise ConfigError(f"annotation {key}: {path!r} is not a normalized absolute path")


def _check_allowed_path(key: str, path: str, allowlist: list[str], list_name: str) -> None:
    """Refuse `path` unless it and its symlink-resolved target match a glob of `allowlist`."""
    if path == "":
        if "" in allowlist:
            return
        raise ConfigError(f"annotation {key}: empty path is not allowed by {list_name}")
    _check_clean_path(key, path)
    if not any(glob_match(p, path) for p in allowlist):
        raise ConfigError(
            f"annotation {key}: path {path!r} is not allowed by {list_name} {allowlist!r}"
        )
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"annotation {key}: cannot resolve {path!r}: {e}") from None
    if real == path:
        return
    if not any(glob_match(p, real) or glob_match(_resolve_pattern(p), real) for p in allowlist):
        raise ConfigError(
            f"annotation {key}: path {path!r} resolves to {real!r}, outside {list_name} "
            f"{allowlist!r}"
        )


def _check_guest_file(key: str, atype: AssetType, path: str, allowlist: list[str]) -> None:
    """Refuse a guest asset that is not a regular file (a device, a FIFO, a directory...).

    Only an image may be a block device, and only one its allowlist names exactly.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"annotation {key}: cannot use {atype} {path!r}: {e}") from None
    if stat.S_ISREG(st.st_mode):
        return
    if atype is AssetType.IMAGE and stat.S_ISBLK(st.st_mode):
        real = os.path.realpath(path)
        if path in allowlist or real in allowlist:
            return
        raise ConfigError(
            f"annotation {key}: {path!r} is a block device; image_path_list must name it "
            "exactly (not by a wildcard) to allow it"
        )
    raise ConfigError(f"annotation {key}: {atype} {path!r} is not a regular file")


def glob_match(pattern: str, path: str) -> bool:
    """glob(3)-style match of a whole path: wildcards match within one `/` component only."""
    if pattern == path:
        return True
    pattern_parts = pattern.split("/")
    path_parts = path.split("/")
    if len(pattern_parts) != len(path_parts):
        return False
    return all(fnmatch.fnmatchcase(s, p) for p, s in zip(pattern_parts, path_parts, strict=True))


def _resolve_pattern(pattern: str) -> str:
    """The pattern with the symlinks of its literal leading directories resolved."""
    if not pattern.startswith("/"):
        return pattern
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            prefix = "/".join(parts[:i]) or "/"
            rest = "/".join(parts[i:])
            try:
                return posixpath.join(os.path.realpath(prefix), rest)
            except (OSError, ValueError):
                return pattern
    try:
        return os.path.realpath(pattern)
    except (OSError, ValueError):
        return pattern
