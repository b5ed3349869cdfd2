"""Applying `io.katacontainers.config.hypervisor.*` annotations to a `HypervisorConfig`
safely: names enabled by regular expression, host paths by allowlist, guest assets regular
files, sha512 checks, all or nothing."""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from typing import Any

from ..devices import BLOCK_DRIVERS
from ..errors import ConfigError
from ..types import Asset, AssetType, params_from_string, sha512_file
from .model import (
    SAFE_ENTROPY_SOURCES,
    SHARED_FS_VALUES,
    U32_MAX,
    VIRTIO_FS_CACHE_VALUES,
    HypervisorConfig,
    _compile_annotation_pattern,
    _describe,
    _has_control,
    check_virtiofsd_args,
)

ANNOTATION_PREFIX = "io.katacontainers.config.hypervisor."

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
