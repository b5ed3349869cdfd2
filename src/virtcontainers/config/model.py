"""HypervisorConfig: the VM's configuration, its fields (with their units), validation and
assets.

Mirrors the seed's `HypervisorConfig` (snake_case fields, zero defaults); loading Kata's
`configuration.toml` lives in `toml.py`, applying annotations in `annotations.py`.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..devices import BLOCK_DRIVERS, FS_CACHE_MODES
from ..errors import AssetError, ConfigError
from ..types import Asset, AssetType, HypervisorType, Param

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
VIRTIO_FS_CACHE_VALUES = ("", *FS_CACHE_MODES)

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

#: Fields kept for Kata compatibility that no driver acts on: a non-default value is refused
#: by `validate()` rather than silently ignored.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "msize_9p": "no driver mounts 9p shares in the guest (the guest's mount chooses msize)",
    "virtio_fs_cache_size": "no driver has a virtio-fs DAX window (QEMU 7.2's "
    "vhost-user-fs-pci has no cache size, nor has Cloud Hypervisor's fs device)",
    "guest_hook_path": "the guest agent runs no OCI hooks",
    "selinux_process_label": "no driver labels its VMM process",
    "vhost_user_store_path": "vhost-user sockets live in the VM directory",
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
    """vCPUs the guest boots with (count; 0: 1). Kata: default_vcpus."""
    default_max_vcpus: int = 0
    """Most vCPUs the guest can reach by hotplug (count; 0: the host's maximum). Kata:
    default_maxvcpus.
    """
    memory_size: int = 0
    """Guest memory at boot (MiB; 0: 2048). Kata: default_memory."""
    default_bridges: int = 0
    """PCI bridges cold-plugged on the `pc` machine for hotplug (count, at most 5; 0: 1)."""
    msize_9p: int = 0
    """9p `msize`, the largest 9p message (bytes; 0: 8192 unless virtio-fs). No driver mounts
    9p shares in the guest, so validate() refuses any other value.
    """
    mem_slots: int = 0
    """Memory hotplug slots (count, at most 256; 0: the driver's default, 10 on QEMU)."""
    mem_offset: int = 0
    """Extra guest address space added to maxmem, e.g. for NVDIMM images (MiB; 0: none). Kata:
    memory_offset.
    """
    virtio_fs_cache_size: int = 0
    """virtio-fs DAX window (MiB; 0: no DAX). No driver has one: validate() refuses others."""
    kernel_params: list[Param] = field(default_factory=list)
    """Extra guest kernel command-line parameters (`key=value` or `key`)."""
    hypervisor_params: list[Param] = field(default_factory=list)
    """Extra VMM options (`-key value` for QEMU); trusted configuration only."""
    kernel_path: str = ""
    """Guest kernel (host path). Kata: kernel."""
    image_path: str = ""
    """Guest root image (host path; exclusive with initrd_path). Kata: image."""
    initrd_path: str = ""
    """Guest initrd (host path; exclusive with image_path). Kata: initrd."""
    firmware_path: str = ""
    """Guest firmware, e.g. OVMF (host path; empty: the VMM's default). Kata: firmware."""
    kernel_path_list: list[str] = field(default_factory=list)
    """Globs a `kernel` annotation must match (empty: refuse all). Kata style: valid_kernel_paths.
    """
    image_path_list: list[str] = field(default_factory=list)
    """Globs an `image` annotation must match; a block device only by exact name. Kata style:
    valid_image_paths.
    """
    initrd_path_list: list[str] = field(default_factory=list)
    """Globs an `initrd` annotation must match (empty: refuse all). Kata style: valid_initrd_paths.
    """
    firmware_path_list: list[str] = field(default_factory=list)
    """Globs a `firmware` annotation must match (empty: refuse all). Kata style:
    valid_firmware_paths.
    """
    machine_accelerators: str = ""
    """Extra `-machine` flags, comma-separated (plain flags or key=value)."""
    cpu_features: str = ""
    """Extra `-cpu` features, comma-separated (`+flag`, `-flag`, `flag=value`)."""
    hypervisor_path: str = ""
    """VMM binary (host path). Kata: path."""
    hypervisor_path_list: list[str] = field(default_factory=list)
    """Globs a `path` annotation must match (empty: refuse all). Kata: valid_hypervisor_paths."""
    hypervisor_ctl_path_list: list[str] = field(default_factory=list)
    """Globs a `ctlpath` annotation must match. Kata: valid_ctlpaths."""
    hypervisor_ctl_path: str = ""
    """VMM control binary, ACRN's acrnctl (host path). Kata: ctlpath."""
    jailer_path: str = ""
    """Firecracker's jailer (host path; empty: no jailer)."""
    jailer_path_list: list[str] = field(default_factory=list)
    """Globs a `jailer_path` annotation must match. Kata: valid_jailer_paths."""
    block_device_driver: str = ""
    """How disks reach the guest: virtio-scsi, virtio-blk, virtio-blk-ccw, virtio-mmio or nvdimm
    ('' : virtio-scsi).
    """
    hypervisor_machine_type: str = ""
    """QEMU machine type: q35, pc or microvm ('' : q35). Kata: machine_type."""
    memory_path: str = ""
    """VM template: file backing the guest memory (host path)."""
    devices_state_path: str = ""
    """VM template: saved device state (host path)."""
    entropy_source: str = ""
    """Host file feeding the guest's virtio-rng (host path; '' : none)."""
    shared_fs: str = ""
    """Shared file system: virtio-fs or virtio-9p ('' : the driver's default)."""
    virtio_fs_daemon: str = ""
    """virtiofsd binary (host path; '' : /usr/lib/qemu/virtiofsd)."""
    virtio_fs_daemon_list: list[str] = field(default_factory=list)
    """Globs a `virtio_fs_daemon` annotation must match. Kata: valid_virtio_fs_daemon_paths."""
    virtio_fs_cache: str = ""
    """virtiofsd cache mode of the shares of host directories (volumes, a bundle's bind mounts,
    shares a caller adds): none, auto or always ('' : auto). A container's root share is
    always served with `always` (nothing on the host writes under it but `virtc cp`, which
    makes the guest drop its caches)."""
    virtio_fs_extra_args: list[str] = field(default_factory=list)
    """Extra virtiofsd arguments, allowlisted (see VIRTIOFSD_*_OPTIONS); placed before the
    project's own.
    """
    file_backed_mem_root_dir: str = ""
    """Directory whose files back guest memory (host path; '' : anonymous memory). Kata:
    file_mem_backend.
    """
    pflash: list[str] = field(default_factory=list)
    """Flash images for the guest firmware (host paths). Kata: pflashes."""
    file_backed_mem_root_list: list[str] = field(default_factory=list)
    """Globs a `file_mem_backend` annotation must match. Kata: valid_file_mem_backends."""
    block_device_cache_set: bool = False
    """Set the disks' cache flags below (else the VMM's defaults)."""
    block_device_cache_direct: bool = False
    """Disks bypass the host page cache (O_DIRECT), when block_device_cache_set."""
    block_device_cache_noflush: bool = False
    """Disks ignore guest flush requests, when block_device_cache_set."""
    disable_block_device_use: bool = False
    """Do not use block devices for the container root file system."""
    enable_iothreads: bool = False
    """Serve virtio-scsi from its own I/O thread."""
    debug: bool = False
    """Debug output from the VMM and virtiofsd. Kata: enable_debug."""
    mem_prealloc: bool = False
    """Allocate all guest memory at start. Kata: enable_mem_prealloc."""
    huge_pages: bool = False
    """Back guest memory with huge pages. Kata: enable_hugepages."""
    virtio_mem: bool = False
    """Resize memory with virtio-mem instead of DIMMs. Kata: enable_virtio_mem."""
    iommu: bool = False
    """Give the guest a vIOMMU (q35 only). Kata: enable_iommu."""
    iommu_platform: bool = False
    """Virtio devices use the platform IOMMU (`iommu_platform=on`; QEMU refuses it with
    vhost-user devices). Kata: enable_iommu_platform.
    """
    realtime: bool = False
    """With mlock: lock guest memory (`-overcommit mem-lock=on`)."""
    mlock: bool = False
    """Lock guest memory in RAM (Kata's enable_swap = not mlock)."""
    disable_nesting_checks: bool = False
    """Skip the nested-host adjustment (QEMU on a host that is a VM: no guest PMU, as Kata)."""
    use_vsock: bool = False
    """Reach the agent over vhost-vsock instead of a serial port."""
    disable_image_nvdimm: bool = False
    """Attach the root image as a virtio-blk disk, not an NVDIMM."""
    hotplug_vfio_on_root_bus: bool = False
    """Hotplug VFIO devices on the root bus."""
    pcie_root_port: int = 0
    """Empty pcie-root-ports cold-plugged on q35 for hotplug (count, at most 16; 0: 2)."""
    boot_to_be_template: bool = False
    """Boot this VM to be saved as a VM template."""
    boot_from_template: bool = False
    """Boot this VM from a VM template (memory_path, devices_state_path)."""
    disable_vhost_net: bool = False
    """Serve NICs from QEMU's user space instead of the vhost-net kernel module."""
    enable_vhost_user_store: bool = False
    """Serve block devices through vhost-user (qemu-storage-daemon)."""
    vhost_user_store_path: str = ""
    """Directory of vhost-user device sockets (host path). Sockets live in the VM directory:
    validate() refuses it.
    """
    vhost_user_store_path_list: list[str] = field(default_factory=list)
    """Globs a `vhost_user_store_path` annotation must match. Kata: valid_vhost_user_store_paths."""
    guest_hook_path: str = ""
    """Guest directory of OCI hooks (guest path). The agent runs none: validate() refuses it."""
    vm_id: str = ""
    """The VM's id (set by the sandbox)."""
    selinux_process_label: str = ""
    """SELinux label for the VMM process. No driver sets one: validate() refuses it."""
    enable_annotations: list[str] = field(default_factory=list)
    """Regular expressions of the annotation names that may be applied (empty: none)."""
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

        from .. import host

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
        self._check_unsupported()
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

    def _check_unsupported(self) -> None:
        """Refuse a non-default value in a field no driver acts on (no silent no-ops)."""
        for name, why in UNSUPPORTED_FIELDS.items():
            value = getattr(self, name)
            default = DEFAULT_MSIZE_9P if name == "msize_9p" else type(value)()
            if value and value != default:
                raise ConfigError(f"{name} {value!r} is not supported: {why}; leave it unset")

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

    def runas_user(self) -> str:
        """The unprivileged host user the VMM drops to (`runas` in hypervisor_params: QEMU's
        `-runas`, Firecracker's jailer `--uid/--gid`), or ""; `ConfigError` if no such user."""
        users = [p.value for p in self.hypervisor_params if p.key.lstrip("-") == "runas"]
        if not users:
            return ""
        user = users[-1]
        import pwd

        try:
            pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise ConfigError(f"hypervisor_params: runas names no host user: {user!r}") from None
        return user

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
        from .toml import load_toml

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
#: `machine_accelerators` or `cpu_features` value (settable by annotation) must not reach them.
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
        if key in UNSAFE_MACHINE_OPTIONS:  # no CPU property has these names either
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
