"""Loading Kata's configuration.toml: every shipped file, key by key, and the errors."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from virtcontainers import host
from virtcontainers.config import UNSUPPORTED_FIELDS, HypervisorConfig, load_toml
from virtcontainers.errors import ConfigError
from virtcontainers.types import HypervisorType, Param

KATA_DIR = Path(__file__).resolve().parent.parent / "data" / "kata-config"
KATA_FILES = sorted(KATA_DIR.glob("*.toml"))

# Kata key -> HypervisorConfig field, written out independently of config.py's own table.
KATA_KEY_TO_FIELD = {
    "path": "hypervisor_path",
    "ctlpath": "hypervisor_ctl_path",
    "jailer_path": "jailer_path",
    "kernel": "kernel_path",
    "initrd": "initrd_path",
    "image": "image_path",
    "firmware": "firmware_path",
    "machine_type": "hypervisor_machine_type",
    "machine_accelerators": "machine_accelerators",
    "cpu_features": "cpu_features",
    "kernel_params": "kernel_params",
    "default_vcpus": "num_vcpus",
    "default_maxvcpus": "default_max_vcpus",
    "default_memory": "memory_size",
    "memory_slots": "mem_slots",
    "memory_offset": "mem_offset",
    "default_bridges": "default_bridges",
    "msize_9p": "msize_9p",
    "pcie_root_port": "pcie_root_port",
    "virtio_fs_cache_size": "virtio_fs_cache_size",
    "valid_hypervisor_paths": "hypervisor_path_list",
    "valid_ctlpaths": "hypervisor_ctl_path_list",
    "valid_jailer_paths": "jailer_path_list",
    "valid_virtio_fs_daemon_paths": "virtio_fs_daemon_list",
    "valid_file_mem_backends": "file_backed_mem_root_list",
    "valid_vhost_user_store_paths": "vhost_user_store_path_list",
    "valid_kernel_paths": "kernel_path_list",
    "valid_image_paths": "image_path_list",
    "valid_initrd_paths": "initrd_path_list",
    "valid_firmware_paths": "firmware_path_list",
    "enable_annotations": "enable_annotations",
    "pflashes": "pflash",
    "virtio_fs_extra_args": "virtio_fs_extra_args",
    "block_device_driver": "block_device_driver",
    "entropy_source": "entropy_source",
    "shared_fs": "shared_fs",
    "virtio_fs_daemon": "virtio_fs_daemon",
    "virtio_fs_cache": "virtio_fs_cache",
    "file_mem_backend": "file_backed_mem_root_dir",
    "vhost_user_store_path": "vhost_user_store_path",
    "guest_hook_path": "guest_hook_path",
    "block_device_cache_set": "block_device_cache_set",
    "block_device_cache_direct": "block_device_cache_direct",
    "block_device_cache_noflush": "block_device_cache_noflush",
    "disable_block_device_use": "disable_block_device_use",
    "enable_iothreads": "enable_iothreads",
    "enable_debug": "debug",
    "enable_mem_prealloc": "mem_prealloc",
    "enable_hugepages": "huge_pages",
    "enable_virtio_mem": "virtio_mem",
    "enable_iommu": "iommu",
    "enable_iommu_platform": "iommu_platform",
    "disable_nesting_checks": "disable_nesting_checks",
    "use_vsock": "use_vsock",
    "disable_image_nvdimm": "disable_image_nvdimm",
    "hotplug_vfio_on_root_bus": "hotplug_vfio_on_root_bus",
    "disable_vhost_net": "disable_vhost_net",
    "enable_vhost_user_store": "enable_vhost_user_store",
    "enable_swap": "mlock",
}


def expected_value(key: str, raw: Any) -> Any:
    if key == "kernel_params":
        return [Param(*[*w.split("=", 1), ""][:2]) for w in raw.split()]
    if key == "enable_swap":
        return not raw
    return raw


def only_section(path: Path) -> tuple[str, dict[str, Any]]:
    doc = tomllib.loads(path.read_text())
    ((name, table),) = doc["hypervisor"].items()
    return name, table


@pytest.fixture(autouse=True)
def fixed_max_vcpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "max_qemu_vcpus", lambda: 240)


def test_all_kata_files_present() -> None:
    names = {p.name for p in KATA_FILES}
    for hv in ("qemu", "qemu-virtiofs", "fc", "clh", "acrn"):
        assert f"configuration-{hv}.toml" in names
        assert f"configuration-{hv}-full.toml" in names
    assert (KATA_DIR / "SOURCES.md").is_file()


@pytest.mark.parametrize("path", KATA_FILES, ids=lambda p: p.name)
def test_kata_file_loads_every_key_into_its_field(path: Path) -> None:
    name, table = only_section(path)
    result = load_toml(path)
    assert result.unknown_keys == []
    assert result.hypervisor_type == HypervisorType.parse(name)
    assert result.source == str(path)
    cfg = result.config
    assert set(table) <= set(KATA_KEY_TO_FIELD), "test mapping misses a key of the file"
    for key, raw in table.items():
        assert getattr(cfg, KATA_KEY_TO_FIELD[key]) == expected_value(key, raw), key
    untouched = set(KATA_KEY_TO_FIELD.values()) - {KATA_KEY_TO_FIELD[k] for k in table}
    zero = HypervisorConfig()
    for field_name in untouched - {"mlock"}:
        assert getattr(cfg, field_name) == getattr(zero, field_name), field_name


@pytest.mark.parametrize("path", KATA_FILES, ids=lambda p: p.name)
def test_kata_file_validates(path: Path) -> None:
    cfg = HypervisorConfig.from_toml(path)
    # Kata's files set some fields no driver here acts on: validate() names them, then
    # accepts the file without them.
    for name in UNSUPPORTED_FIELDS:
        if getattr(cfg, name) not in (0, "", 8192):
            with pytest.raises(ConfigError, match=f"^{name} .* is not supported"):
                cfg.copy().validate()
            setattr(cfg, name, type(getattr(cfg, name))())
    cfg.validate()
    assert cfg.kernel_asset_path().startswith("/usr/share/kata-containers/")
    assert cfg.num_vcpus >= 1 and cfg.memory_size == 2048


def test_from_toml_accepts_str_path_and_text() -> None:
    path = KATA_DIR / "configuration-qemu-full.toml"
    by_path = HypervisorConfig.from_toml(str(path))
    by_text = HypervisorConfig.from_toml(path.read_text(), hypervisor="qemu")
    assert by_path == by_text
    assert by_path.pcie_root_port == 2
    assert by_path.cpu_features == "pmu=off"
    assert by_path.mlock is False  # enable_swap = true
    assert by_path.file_backed_mem_root_list == [""]


def test_missing_enable_swap_means_mlock_as_kata() -> None:
    cfg = HypervisorConfig.from_toml(KATA_DIR / "configuration-qemu.toml")
    assert cfg.mlock is True


SECTION = '[hypervisor.qemu]\nkernel = "/k"\n'


def test_kernel_params_string_becomes_params() -> None:
    cfg = HypervisorConfig.from_toml(SECTION + 'kernel_params = " quiet  console=ttyS0 a=b=c "\n')
    assert cfg.kernel_params == [Param("quiet"), Param("console", "ttyS0"), Param("a", "b=c")]


def test_csv_values_trimmed_as_kata() -> None:
    cfg = HypervisorConfig.from_toml(SECTION + 'cpu_features = " pmu=off, ,vmx=off,"\n')
    assert cfg.cpu_features == "pmu=off,vmx=off"


def test_negative_default_vcpus_means_host_cpus() -> None:
    cfg = HypervisorConfig.from_toml(SECTION + "default_vcpus = -1\n")
    assert cfg.num_vcpus == (os.cpu_count() or 1)


def test_unknown_keys_reported(caplog: pytest.LogCaptureFixture) -> None:
    text = SECTION + 'rootfs_type = "ext4"\ndefault_maxmemory = 0\n[runtime]\nfoo = 1\n'
    result = load_toml(text)
    assert result.unknown_keys == ["rootfs_type", "default_maxmemory"]
    assert result.config.kernel_path == "/k"
    with caplog.at_level(logging.WARNING, logger="virtcontainers.config"):
        cfg = HypervisorConfig.from_toml(text)
    assert cfg.kernel_path == "/k"
    assert "rootfs_type" in caplog.text and "default_maxmemory" in caplog.text
    with pytest.raises(ConfigError, match="rootfs_type, default_maxmemory"):
        HypervisorConfig.from_toml(text, strict=True)


def test_strict_accepts_kata_files() -> None:
    for path in KATA_FILES:
        HypervisorConfig.from_toml(path, strict=True)


def test_choose_among_several_sections() -> None:
    text = SECTION + '[hypervisor.firecracker]\nkernel = "/fc"\n'
    with pytest.raises(ConfigError, match="several hypervisor sections"):
        load_toml(text)
    result = load_toml(text, HypervisorType.FIRECRACKER)
    assert result.config.kernel_path == "/fc"
    assert result.hypervisor_type is HypervisorType.FIRECRACKER
    assert load_toml(text, "qemu").config.kernel_path == "/k"


@pytest.mark.parametrize(
    ("text", "hypervisor", "needle"),
    [
        ("[runtime]\nx = 1\n", None, "no [hypervisor.<name>] section"),
        ("hypervisor = 3\n", None, "no [hypervisor.<name>] section"),
        (SECTION, "clh", "no [hypervisor.clh] section (found: qemu)"),
        (SECTION, "vmware", "Unknown hypervisor type vmware"),
        ('[hypervisor.dragonball]\nkernel = "/k"\n', None, "Unknown hypervisor type dragonball"),
        ("[hypervisor.qemu\n", None, "<toml text>: invalid TOML"),
        (SECTION + 'default_vcpus = "2"\n', None, "<toml text>: hypervisor.qemu.default_vcpus"),
        (SECTION + "default_memory = true\n", None, "hypervisor.qemu.default_memory"),
        (SECTION + "default_memory = 2048.0\n", None, "hypervisor.qemu.default_memory"),
        (SECTION + "memory_slots = -1\n", None, "hypervisor.qemu.memory_slots"),
        (SECTION + "msize_9p = 4294967296\n", None, "hypervisor.qemu.msize_9p"),
        (SECTION + 'enable_debug = "yes"\n', None, "hypervisor.qemu.enable_debug"),
        (SECTION + "enable_swap = 1\n", None, "hypervisor.qemu.enable_swap"),
        (SECTION + 'enable_annotations = ".*"\n', None, "hypervisor.qemu.enable_annotations"),
        (SECTION + "pflashes = [1]\n", None, "hypervisor.qemu.pflashes"),
        (SECTION + 'kernel_params = ["quiet"]\n', None, "hypervisor.qemu.kernel_params"),
        (SECTION + "path = 5\n", None, "hypervisor.qemu.path"),
    ],
)
def test_toml_errors(text: str, hypervisor: str | None, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(text, hypervisor)
    assert needle in str(err.value)


def test_wrong_type_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(SECTION + 'default_bridges = "1"\n')
    with pytest.raises(ConfigError) as err:
        HypervisorConfig.from_toml(path)
    assert str(path) in str(err.value)
    assert "default_bridges" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read Kata configuration"):
        HypervisorConfig.from_toml(missing)
    with pytest.raises(ConfigError, match="cannot read Kata configuration"):
        HypervisorConfig.from_toml(str(missing))


def test_not_a_path() -> None:
    with pytest.raises(ConfigError, match="path or TOML text"):
        HypervisorConfig.from_toml(42)  # type: ignore[arg-type]
