"""HypervisorConfig: fields, validate(), assets, kernel params, dict round trip."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtcontainers import host
from virtcontainers.config import INT_FIELD_MAX, UNSUPPORTED_FIELDS, HypervisorConfig
from virtcontainers.devices import BLOCK_DRIVERS
from virtcontainers.errors import AssetError, ConfigError
from virtcontainers.types import Asset, AssetType, Param

API_FIELDS = [
    "num_vcpus",
    "default_max_vcpus",
    "memory_size",
    "default_bridges",
    "msize_9p",
    "mem_slots",
    "mem_offset",
    "virtio_fs_cache_size",
    "kernel_params",
    "hypervisor_params",
    "kernel_path",
    "image_path",
    "initrd_path",
    "firmware_path",
    "machine_accelerators",
    "cpu_features",
    "hypervisor_path",
    "hypervisor_path_list",
    "hypervisor_ctl_path_list",
    "hypervisor_ctl_path",
    "jailer_path",
    "jailer_path_list",
    "block_device_driver",
    "hypervisor_machine_type",
    "memory_path",
    "devices_state_path",
    "entropy_source",
    "shared_fs",
    "virtio_fs_daemon",
    "virtio_fs_daemon_list",
    "virtio_fs_cache",
    "virtio_fs_extra_args",
    "file_backed_mem_root_dir",
    "pflash",
    "file_backed_mem_root_list",
    "block_device_cache_set",
    "block_device_cache_direct",
    "block_device_cache_noflush",
    "disable_block_device_use",
    "enable_iothreads",
    "debug",
    "mem_prealloc",
    "huge_pages",
    "virtio_mem",
    "iommu",
    "iommu_platform",
    "realtime",
    "mlock",
    "disable_nesting_checks",
    "use_vsock",
    "disable_image_nvdimm",
    "hotplug_vfio_on_root_bus",
    "pcie_root_port",
    "boot_to_be_template",
    "boot_from_template",
    "disable_vhost_net",
    "enable_vhost_user_store",
    "vhost_user_store_path",
    "vhost_user_store_path_list",
    "guest_hook_path",
    "vm_id",
    "selinux_process_label",
    "enable_annotations",
    # beyond the seed: allowlists for the guest-asset annotations (Kata's valid_*_paths style)
    "kernel_path_list",
    "image_path_list",
    "initrd_path_list",
    "firmware_path_list",
]

MAX_VCPUS = 16


@pytest.fixture(autouse=True)
def fixed_max_vcpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the host's vCPU limit deterministic."""
    monkeypatch.setattr(host, "max_qemu_vcpus", lambda: MAX_VCPUS)


def minimal(**overrides: Any) -> HypervisorConfig:
    cfg = HypervisorConfig(kernel_path="/k/vmlinuz", initrd_path="/k/initrd.img")
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


# -- fields -----------------------------------------------------------------------------------
def test_every_api_field_exists_with_zero_default() -> None:
    cfg = HypervisorConfig()
    public = [f.name for f in dataclasses.fields(cfg) if not f.name.startswith("_")]
    assert sorted(public) == sorted(API_FIELDS)
    for name in API_FIELDS:
        value = getattr(cfg, name)
        assert value in (0, "", [], False), name
        assert not isinstance(value, float)


def test_list_defaults_are_not_shared() -> None:
    a, b = HypervisorConfig(), HypervisorConfig()
    a.kernel_params.append(Param("quiet"))
    a.pflash.append("/x")
    assert b.kernel_params == [] and b.pflash == []


# -- validate: the seed's messages --------------------------------------------------------------
def test_validate_missing_kernel_path() -> None:
    with pytest.raises(ConfigError, match=r"^Missing kernel path$"):
        HypervisorConfig(image_path="/img").validate()


def test_validate_missing_image_and_initrd() -> None:
    with pytest.raises(ConfigError, match=r"^Missing image and initrd path$"):
        HypervisorConfig(kernel_path="/k").validate()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"boot_to_be_template": True, "boot_from_template": True, "memory_path": "/m"},
            "Cannot set both 'to be' and 'from' vm tempate",
        ),
        ({"boot_to_be_template": True}, "Missing MemoryPath for vm template"),
        ({"boot_from_template": True}, "Missing MemoryPath for vm template"),
        (
            {"boot_from_template": True, "memory_path": "/m"},
            "Missing DevicesStatePath to load from vm template",
        ),
    ],
)
def test_template_messages(changes: dict[str, Any], message: str) -> None:
    cfg = minimal(**changes)
    with pytest.raises(ConfigError) as direct:
        cfg.check_template_config()
    assert str(direct.value) == message
    with pytest.raises(ConfigError) as via_validate:
        cfg.validate()
    assert str(via_validate.value) == message


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"boot_to_be_template": True, "memory_path": "/m"},
        {"boot_from_template": True, "memory_path": "/m", "devices_state_path": "/s"},
    ],
)
def test_template_config_accepted(changes: dict[str, Any]) -> None:
    cfg = minimal(**changes)
    cfg.check_template_config()
    cfg.validate()
    assert cfg.num_vcpus == 1


def test_kernel_checked_before_template() -> None:
    cfg = HypervisorConfig(boot_to_be_template=True, boot_from_template=True)
    with pytest.raises(ConfigError, match="Missing kernel path"):
        cfg.validate()


# -- validate: defaults -------------------------------------------------------------------------
def test_validate_fills_seed_defaults() -> None:
    cfg = minimal()
    cfg.validate()
    assert cfg.num_vcpus == 1
    assert cfg.memory_size == 2048
    assert cfg.default_bridges == 1
    assert cfg.block_device_driver == "virtio-scsi"
    assert cfg.default_max_vcpus == MAX_VCPUS
    assert cfg.msize_9p == 8192


def test_validate_uses_host_max_vcpus_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "max_qemu_vcpus", lambda: 3)
    cfg = minimal()
    cfg.validate()
    assert cfg.default_max_vcpus == 3


def test_validate_no_msize_for_virtio_fs() -> None:
    cfg = minimal(shared_fs="virtio-fs")
    cfg.validate()
    assert cfg.msize_9p == 0


def test_validate_keeps_explicit_values() -> None:
    cfg = minimal(
        num_vcpus=2,
        default_max_vcpus=4,
        memory_size=256,
        default_bridges=2,
        block_device_driver="virtio-blk",
        msize_9p=8192,
        shared_fs="virtio-9p",
    )
    cfg.validate()
    assert (cfg.num_vcpus, cfg.default_max_vcpus, cfg.memory_size) == (2, 4, 256)
    assert (cfg.default_bridges, cfg.block_device_driver, cfg.msize_9p) == (2, "virtio-blk", 8192)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("msize_9p", 65536),
        ("virtio_fs_cache_size", 1024),
        ("guest_hook_path", "/usr/share/oci/hooks"),
        ("selinux_process_label", "system_u:system_r:container_t:s0"),
        ("vhost_user_store_path", "/var/run/kata-containers/vhost-user"),
    ],
)
def test_fields_no_driver_acts_on_are_refused_not_ignored(name: str, value: Any) -> None:
    assert name in UNSUPPORTED_FIELDS
    cfg = minimal(**{name: value})
    with pytest.raises(ConfigError, match=rf"^{name} {value!r} is not supported: .*leave it unset"):
        cfg.validate()
    setattr(cfg, name, HypervisorConfig().__getattribute__(name))
    cfg.validate()  # the default is accepted


def test_validate_is_idempotent() -> None:
    cfg = minimal()
    cfg.validate()
    once = cfg.to_dict()
    cfg.validate()
    assert cfg.to_dict() == once


@pytest.mark.parametrize("driver", BLOCK_DRIVERS)
def test_validate_accepts_every_block_driver(driver: str) -> None:
    cfg = minimal(block_device_driver=driver)
    cfg.validate()
    assert cfg.block_device_driver == driver


# -- validate: values a VMM would fail on -------------------------------------------------------
INT_FIELDS = [f.name for f in dataclasses.fields(HypervisorConfig) if str(f.type) == "int"]


@pytest.mark.parametrize("value", [2**32 - 1, 2**23 + 1])
@pytest.mark.parametrize("name", INT_FIELDS)
def test_every_numeric_field_is_bounded(name: str, value: int) -> None:
    # pcie_root_port=4294967295 used to pass and make the QEMU argv builder allocate
    # 4 billion root ports; mem_offset went straight into maxmem.
    cfg = minimal(**{name: value})
    if name == "num_vcpus":
        cfg.default_max_vcpus = MAX_VCPUS
    with pytest.raises(ConfigError, match=rf"^{name} {value} "):
        cfg.validate()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"num_vcpus": -1}, "num_vcpus"),
        ({"memory_size": -5}, "memory_size"),
        ({"mem_slots": 2**32}, "mem_slots"),
        ({"pcie_root_port": -1}, "pcie_root_port"),
        ({"num_vcpus": 8, "default_max_vcpus": 4}, "num_vcpus 8 exceeds default_max_vcpus 4"),
        ({"num_vcpus": MAX_VCPUS + 1}, f"num_vcpus {MAX_VCPUS + 1}"),
        ({"default_max_vcpus": MAX_VCPUS + 1}, f"default_max_vcpus {MAX_VCPUS + 1}"),
        ({"memory_size": 1}, "memory_size 1"),
        ({"memory_size": 2**31}, f"memory_size {2**31}"),
        ({"default_bridges": 6}, "default_bridges 6"),
        ({"mem_slots": 257}, "mem_slots 257"),
        ({"msize_9p": 100}, "msize_9p 100"),
        ({"block_device_driver": "ide"}, "block_device_driver 'ide'"),
        ({"shared_fs": "nfs"}, "shared_fs 'nfs'"),
        ({"shared_fs": "none"}, "shared_fs 'none'"),
        ({"virtio_fs_cache": "sometimes"}, "virtio_fs_cache 'sometimes'"),
        ({"image_path": "/img"}, "image_path '/img' and initrd_path"),
        ({"kernel_path": "vmlinuz"}, "kernel_path must be an absolute path"),
        ({"initrd_path": "./initrd"}, "initrd_path must be an absolute path"),
        ({"hypervisor_path": "qemu"}, "hypervisor_path must be an absolute path"),
        ({"jailer_path": "bin/jailer"}, "jailer_path must be an absolute path"),
        ({"firmware_path": "OVMF.fd"}, "firmware_path must be an absolute path"),
        ({"virtio_fs_daemon": "virtiofsd"}, "virtio_fs_daemon must be an absolute path"),
        ({"pflash": ["/ok", "rel"]}, "pflash[1] must be an absolute path"),
        ({"hypervisor_path": "/usr/bin/qemu\n-x"}, "hypervisor_path"),
        ({"kernel_params": [Param("init", "/bin/sh\nx")]}, "kernel_params"),
        ({"enable_annotations": ["("]}, "enable_annotations"),
        ({"num_vcpus": "2"}, "num_vcpus must be an integer"),
        ({"num_vcpus": True}, "num_vcpus must be an integer"),
        ({"debug": 1}, "debug must be a boolean"),
        ({"kernel_path": None}, "kernel_path must be a string"),
        ({"pflash": "/x"}, "pflash must be a list of strings"),
        ({"kernel_params": ["quiet"]}, "kernel_params must be a list"),
    ],
)
def test_validate_refuses(changes: dict[str, Any], needle: str) -> None:
    cfg = minimal(**changes)
    before = cfg.copy()
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert needle in str(err.value)
    assert cfg == before, "a failed validate() must not fill defaults"


def test_validate_refuses_relative_custom_asset_path() -> None:
    cfg = minimal()
    cfg._custom_assets[AssetType.KERNEL] = Asset(AssetType.KERNEL, "rel/vmlinuz")
    with pytest.raises(ConfigError, match="custom kernel asset must be an absolute path"):
        cfg.validate()


# -- kernel params ------------------------------------------------------------------------------
def test_add_kernel_param() -> None:
    cfg = HypervisorConfig()
    cfg.add_kernel_param(Param("console", "ttyS0"))
    cfg.add_kernel_param(Param("quiet"))
    assert cfg.kernel_params == [Param("console", "ttyS0"), Param("quiet", "")]


def test_add_kernel_param_empty_key() -> None:
    cfg = HypervisorConfig()
    with pytest.raises(ConfigError, match=r"^Empty kernel parameter$"):
        cfg.add_kernel_param(Param("", "value"))
    assert cfg.kernel_params == []


# -- assets -------------------------------------------------------------------------------------
ASSET_GETTERS = {
    AssetType.KERNEL: ("kernel_path", HypervisorConfig.kernel_asset_path),
    AssetType.IMAGE: ("image_path", HypervisorConfig.image_asset_path),
    AssetType.INITRD: ("initrd_path", HypervisorConfig.initrd_asset_path),
    AssetType.HYPERVISOR: ("hypervisor_path", HypervisorConfig.hypervisor_asset_path),
    AssetType.HYPERVISOR_CTL: ("hypervisor_ctl_path", HypervisorConfig.hypervisor_ctl_asset_path),
    AssetType.JAILER: ("jailer_path", HypervisorConfig.jailer_asset_path),
    AssetType.FIRMWARE: ("firmware_path", HypervisorConfig.firmware_asset_path),
}


@pytest.mark.parametrize("atype", list(AssetType))
def test_asset_paths_fall_back_to_fields_and_custom_takes_precedence(atype: AssetType) -> None:
    field_name, getter = ASSET_GETTERS[atype]
    cfg = HypervisorConfig()
    setattr(cfg, field_name, f"/configured/{atype}")
    assert getter(cfg) == f"/configured/{atype}"
    assert cfg.asset_path(atype) == f"/configured/{atype}"
    assert cfg.asset_path(str(atype)) == f"/configured/{atype}"
    cfg.add_custom_asset(Asset(atype, f"/custom/{atype}"))
    assert getter(cfg) == f"/custom/{atype}"
    assert cfg.asset_path(atype) == f"/custom/{atype}"
    assert getattr(cfg, field_name) == f"/configured/{atype}"


def test_custom_asset_flags() -> None:
    cfg = HypervisorConfig()
    flags = {
        AssetType.KERNEL: cfg.custom_kernel_asset,
        AssetType.IMAGE: cfg.custom_image_asset,
        AssetType.INITRD: cfg.custom_initrd_asset,
        AssetType.HYPERVISOR: cfg.custom_hypervisor_asset,
    }
    for atype, flag in flags.items():
        assert not flag()
        cfg.add_custom_asset(Asset(atype, f"/custom/{atype}"))
        assert flag()
    assert set(cfg.custom_assets()) == set(flags)


def test_add_custom_asset_none_or_empty_is_noop() -> None:
    cfg = HypervisorConfig(kernel_path="/k")
    cfg.add_custom_asset(None)
    cfg.add_custom_asset(Asset(AssetType.KERNEL, ""))
    assert not cfg.custom_kernel_asset()
    assert cfg.kernel_asset_path() == "/k"


def test_add_custom_asset_relative_path() -> None:
    cfg = HypervisorConfig()
    with pytest.raises(AssetError) as err:
        cfg.add_custom_asset(Asset(AssetType.KERNEL, "boot/vmlinuz"))
    assert str(err.value) == "Invalid kernel at boot/vmlinuz"
    assert not cfg.custom_kernel_asset()


def test_add_custom_asset_nul_in_path() -> None:
    cfg = HypervisorConfig()
    with pytest.raises(AssetError, match="Invalid initrd"):
        cfg.add_custom_asset(Asset(AssetType.INITRD, "/a\x00b", "ab" * 64))
    assert not cfg.custom_initrd_asset()


def test_add_custom_asset_hash(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    image.write_bytes(b"guest image")
    good = hashlib.sha512(b"guest image").hexdigest()
    bad = hashlib.sha512(b"other").hexdigest()
    cfg = HypervisorConfig()
    with pytest.raises(AssetError, match=f"^Invalid image at {image}$"):
        cfg.add_custom_asset(Asset(AssetType.IMAGE, str(image), bad))
    assert not cfg.custom_image_asset()
    cfg.add_custom_asset(Asset(AssetType.IMAGE, str(image), good))
    assert cfg.image_asset_path() == str(image)


def test_asset_path_unknown_type() -> None:
    with pytest.raises(ConfigError, match="Unknown asset type bios"):
        HypervisorConfig().asset_path("bios")


# -- copy, to_dict, from_dict -------------------------------------------------------------------
def full_config() -> HypervisorConfig:
    cfg = minimal(
        num_vcpus=2,
        kernel_params=[Param("console", "ttyS0"), Param("quiet")],
        hypervisor_params=[Param("", "-no-reboot")],
        hypervisor_path_list=["/usr/bin/qemu-*"],
        debug=True,
        pcie_root_port=3,
    )
    cfg.add_custom_asset(Asset(AssetType.KERNEL, "/custom/vmlinuz"))
    cfg._custom_assets[AssetType.IMAGE] = Asset(AssetType.IMAGE, "/custom/img", "ab" * 64)
    return cfg


def test_copy_is_deep() -> None:
    cfg = full_config()
    dup = cfg.copy()
    assert dup == cfg
    dup.kernel_params.append(Param("x"))
    dup.hypervisor_path_list.append("/y")
    dup.add_custom_asset(Asset(AssetType.INITRD, "/z"))
    assert cfg.kernel_params == [Param("console", "ttyS0"), Param("quiet")]
    assert cfg.hypervisor_path_list == ["/usr/bin/qemu-*"]
    assert not cfg.custom_initrd_asset()


def test_to_dict_is_json_and_round_trips() -> None:
    cfg = full_config()
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["kernel_params"] == [
        {"key": "console", "value": "ttyS0"},
        {"key": "quiet", "value": ""},
    ]
    assert data["custom_assets"]["image"] == {"path": "/custom/img", "hash": "ab" * 64}
    back = HypervisorConfig.from_dict(data)
    assert back == cfg
    assert back.kernel_asset_path() == "/custom/vmlinuz"
    assert back.custom_image_asset()


def test_from_dict_missing_keys_take_defaults() -> None:
    assert HypervisorConfig.from_dict({}) == HypervisorConfig()
    assert HypervisorConfig.from_dict({"num_vcpus": 4}).num_vcpus == 4


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"vcpus": 1}, "'vcpus'"),
        ({"_custom_assets": {}}, "'_custom_assets'"),
        ({"num_vcpus": "1"}, "num_vcpus"),
        ({"num_vcpus": True}, "num_vcpus"),
        ({"num_vcpus": 1.0}, "num_vcpus"),
        ({"num_vcpus": -1}, "num_vcpus"),
        ({"mem_offset": 2**32}, "mem_offset"),
        ({"debug": "true"}, "debug"),
        ({"debug": 1}, "debug"),
        ({"kernel_path": 7}, "kernel_path"),
        ({"pflash": "/x"}, "pflash"),
        ({"pflash": ["/x", 2]}, "pflash"),
        ({"kernel_params": "quiet"}, "kernel_params"),
        ({"kernel_params": [["console", "ttyS0"]]}, "kernel_params[0]"),
        ({"kernel_params": [{"key": "a"}]}, "kernel_params[0]"),
        ({"kernel_params": [{"key": "a", "value": 1}]}, "kernel_params[0]"),
        ({"kernel_params": [{"key": "a", "value": "b", "x": 1}]}, "kernel_params[0]"),
        ({"custom_assets": []}, "custom_assets"),
        ({"custom_assets": {"bios": {"path": "/x"}}}, "Unknown asset type bios"),
        ({"custom_assets": {"kernel": {"path": "rel"}}}, "custom_assets.kernel.path"),
        ({"custom_assets": {"kernel": {"path": "/k", "hash": 5}}}, "custom_assets.kernel.hash"),
        ({"custom_assets": {"kernel": {"path": "/k", "size": 5}}}, "custom_assets.kernel"),
        ({"custom_assets": {"kernel": "/k"}}, "custom_assets.kernel"),
    ],
)
def test_from_dict_refuses(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        HypervisorConfig.from_dict(data)
    assert needle in str(err.value)


def test_from_dict_refuses_non_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        HypervisorConfig.from_dict([("num_vcpus", 1)])  # type: ignore[arg-type]


# -- properties ---------------------------------------------------------------------------------
u32 = st.integers(min_value=0, max_value=2**32 - 1)
params = st.lists(st.builds(Param, st.text(max_size=8), st.text(max_size=8)), max_size=3)
str_lists = st.lists(st.text(max_size=8), max_size=3)
KIND_STRATEGY: dict[str, st.SearchStrategy[Any]] = {
    "int": u32,
    "str": st.text(max_size=12),
    "bool": st.booleans(),
    "list[str]": str_lists,
    "list[Param]": params,
}
asset_maps = st.dictionaries(
    st.sampled_from(list(AssetType)),
    st.tuples(
        st.text(max_size=10).map(lambda s: "/" + s),
        st.none() | st.text(alphabet="0123456789abcdef", min_size=128, max_size=128),
    ),
    max_size=3,
)


@st.composite
def configs(draw: st.DrawFn) -> HypervisorConfig:
    cfg = HypervisorConfig()
    for f in dataclasses.fields(cfg):
        if not f.name.startswith("_"):
            setattr(cfg, f.name, draw(KIND_STRATEGY[str(f.type)]))
    for atype, (path, digest) in draw(asset_maps).items():
        cfg._custom_assets[atype] = Asset(atype, path, digest)
    return cfg


@settings(max_examples=150, deadline=None)
@given(configs())
def test_property_dict_round_trip(cfg: HypervisorConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    back = HypervisorConfig.from_dict(data)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


INTERESTING_STR = st.sampled_from(
    [
        "",
        "/usr/bin/qemu",
        "relative/path",
        "/dev/urandom",
        "virtio-fs",
        "virtio-9p",
        "none",
        "auto",
        "virtio-blk",
        "nvdimm",
        "bogus",
        "/with\nnewline",
        "(",
    ]
)
WRONG_TYPE = st.sampled_from([None, 1.5, b"bytes", -1, True, "7", ["x"]])
WILD_KIND: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(min_value=-3, max_value=2**33) | st.sampled_from([0, 1, 2, 16, 17, 4096]),
    "str": INTERESTING_STR | st.text(max_size=6),
    "bool": st.booleans(),
    "list[str]": st.lists(INTERESTING_STR | st.text(max_size=4), max_size=3),
    "list[Param]": st.lists(st.builds(Param, INTERESTING_STR, INTERESTING_STR), max_size=2),
}


FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(HypervisorConfig)}
FIELD_TYPES.pop("_custom_assets")


@st.composite
def wild_configs(draw: st.DrawFn) -> HypervisorConfig:
    """A valid base with a few fields set to odd values (sometimes of the wrong type)."""
    cfg = minimal()
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_TYPES)), max_size=4, unique=True)):
        strategy = WILD_KIND[FIELD_TYPES[name]]
        value = draw(WRONG_TYPE) if draw(st.integers(0, 15)) == 0 else draw(strategy)
        setattr(cfg, name, value)
    return cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wild_configs())
def test_property_validate_raises_only_config_error(cfg: HypervisorConfig) -> None:
    before = cfg.copy()
    try:
        cfg.validate()
    except ConfigError:
        assert cfg == before, "failed validate() changed the config"
        return
    assert 1 <= cfg.num_vcpus <= cfg.default_max_vcpus <= MAX_VCPUS
    assert cfg.memory_size >= 32
    assert 1 <= cfg.default_bridges <= 5
    for name, maximum in INT_FIELD_MAX.items():
        assert 0 <= getattr(cfg, name) <= maximum, name
    assert cfg.msize_9p <= 4 * 1024 * 1024
    assert cfg.block_device_driver in BLOCK_DRIVERS
    assert cfg.shared_fs in ("", "virtio-9p", "virtio-fs")
    assert cfg.msize_9p >= 4096 or cfg.shared_fs == "virtio-fs"
    assert not (cfg.image_path and cfg.initrd_path)
    assert cfg.kernel_path.startswith("/")
