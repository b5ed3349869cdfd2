"""apply_annotations: what is applied, and the attacks it must refuse (CVE-2020-27151 class)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtcontainers.config import (
    ANNOTATION_PREFIX,
    KNOWN_ANNOTATIONS,
    HypervisorConfig,
    apply_annotations,
    glob_match,
)
from virtcontainers.errors import ConfigError
from virtcontainers.types import Asset, AssetType, Param

P = ANNOTATION_PREFIX
QEMU = "/usr/bin/qemu-system-x86_64"
KATA_QEMU_FULL = (
    Path(__file__).resolve().parent.parent / "data" / "kata-config" / "configuration-qemu-full.toml"
)


def base(**overrides: Any) -> HypervisorConfig:
    cfg = HypervisorConfig(
        kernel_path="/usr/share/vc/vmlinuz",
        initrd_path="/usr/share/vc/initrd.img",
        hypervisor_path=QEMU,
        enable_annotations=[".*"],
        hypervisor_path_list=[QEMU],
    )
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def refused(cfg: HypervisorConfig, annotations: dict[str, str], needle: str) -> None:
    """Assert the annotations are refused with `needle` in the message and nothing changed."""
    before = cfg.to_dict()
    with pytest.raises(ConfigError) as err:
        apply_annotations(cfg, annotations)
    assert needle in str(err.value)
    assert cfg.to_dict() == before


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


# -- what is applied ----------------------------------------------------------------------------
def test_applies_typed_values() -> None:
    cfg = base()
    apply_annotations(
        cfg,
        {
            P + "default_vcpus": "2",
            P + "default_max_vcpus": "8",
            P + "default_memory": "512",
            P + "memory_slots": "4",
            P + "memory_offset": "1024",
            P + "default_bridges": "2",
            P + "msize_9p": "16384",
            P + "pcie_root_port": "3",
            P + "virtio_fs_cache_size": "64",
            P + "enable_virtio_mem": "true",
            P + "enable_hugepages": "1",
            P + "enable_mem_prealloc": "True",
            P + "enable_iommu": "t",
            P + "enable_iommu_platform": "TRUE",
            P + "use_vsock": "true",
            P + "block_device_cache_set": "true",
            P + "block_device_cache_direct": "true",
            P + "block_device_cache_noflush": "true",
            P + "disable_block_device_use": "true",
            P + "enable_iothreads": "true",
            P + "hotplug_vfio_on_root_bus": "true",
            P + "disable_vhost_net": "true",
            P + "enable_vhost_user_store": "true",
            P + "disable_image_nvdimm": "true",
            P + "enable_swap": "false",
            P + "machine_type": "q35",
            P + "machine_accelerators": "nvdimm",
            P + "cpu_features": "pmu=off,vmx=off",
            P + "block_device_driver": "virtio-blk",
            P + "shared_fs": "virtio-fs",
            P + "virtio_fs_cache": "always",
            P + "guest_hook_path": "/usr/share/oci/hooks",
            P + "entropy_source": "/dev/random",
        },
    )
    assert (cfg.num_vcpus, cfg.default_max_vcpus, cfg.memory_size) == (2, 8, 512)
    assert (cfg.mem_slots, cfg.mem_offset, cfg.default_bridges) == (4, 1024, 2)
    assert (cfg.msize_9p, cfg.pcie_root_port, cfg.virtio_fs_cache_size) == (16384, 3, 64)
    assert cfg.virtio_mem and cfg.huge_pages and cfg.mem_prealloc and cfg.iommu
    assert cfg.iommu_platform and cfg.use_vsock and cfg.block_device_cache_set
    assert cfg.block_device_cache_direct and cfg.block_device_cache_noflush
    assert cfg.disable_block_device_use and cfg.enable_iothreads and cfg.hotplug_vfio_on_root_bus
    assert cfg.disable_vhost_net and cfg.enable_vhost_user_store and cfg.disable_image_nvdimm
    assert cfg.mlock is True
    assert cfg.hypervisor_machine_type == "q35"
    assert (cfg.machine_accelerators, cfg.cpu_features) == ("nvdimm", "pmu=off,vmx=off")
    assert (cfg.block_device_driver, cfg.shared_fs, cfg.virtio_fs_cache) == (
        "virtio-blk",
        "virtio-fs",
        "always",
    )
    assert cfg.guest_hook_path == "/usr/share/oci/hooks"
    assert cfg.entropy_source == "/dev/random"
    # Applied, but no driver acts on these: validate() names them instead of ignoring them.
    with pytest.raises(ConfigError, match=r"^msize_9p 16384 is not supported"):
        cfg.validate()
    cfg.msize_9p = cfg.virtio_fs_cache_size = 0
    cfg.guest_hook_path = ""
    cfg.validate()


def test_bool_false_and_enable_swap() -> None:
    cfg = base(huge_pages=True, mlock=True)
    apply_annotations(cfg, {P + "enable_hugepages": "false", P + "enable_swap": "true"})
    assert cfg.huge_pages is False
    assert cfg.mlock is False


def test_kernel_params_appended() -> None:
    cfg = base(kernel_params=[Param("console", "hvc0")])
    apply_annotations(cfg, {P + "kernel_params": "quiet  agent.log=debug"})
    assert cfg.kernel_params == [
        Param("console", "hvc0"),
        Param("quiet"),
        Param("agent.log", "debug"),
    ]


def test_virtio_fs_extra_args_appended() -> None:
    cfg = base(virtio_fs_extra_args=["--thread-pool-size=1"])
    apply_annotations(cfg, {P + "virtio_fs_extra_args": '["-o", "announce_submounts"]'})
    assert cfg.virtio_fs_extra_args == ["--thread-pool-size=1", "-o", "announce_submounts"]


VIRTIOFSD_ATTACKS = [
    ["-o", "source=/"],  # would share the host's / read-write (the last source= wins)
    ["-o", "announce_submounts,source=/"],
    ["-o", "modcaps=+sys_admin"],
    ["-o", "sandbox=chroot"],
    ["-o", "allow_root"],
    ["-o", "security_label"],  # wedges the share: a create is never answered
    ["-o", "cache=always"],
    ["-o", "xattrmap=:map::user.virtiofs.:"],
    ["-osource=/"],
    ["--socket-path=/tmp/evil.sock"],
    ["--fd=3"],
    ["--socket-group=users"],
    ["--daemonize"],
    ["-d", "-f"],
    ["--thread-pool-size=1", "-o"],
    ["--thread-pool-size=1 --fd=3"],
    ["--syslog=x"],
    ["source=/"],
]


@pytest.mark.parametrize("args", VIRTIOFSD_ATTACKS, ids=[" ".join(a) for a in VIRTIOFSD_ATTACKS])
def test_attack_virtio_fs_extra_args_outside_the_allowlist(args: list[str]) -> None:
    cfg = base()
    key = P + "virtio_fs_extra_args"
    refused(cfg, {key: json.dumps(args)}, f"annotation {key}: virtiofsd ")
    cfg.virtio_fs_extra_args = args  # the same list from the TOML file or the API
    with pytest.raises(ConfigError, match=r"^virtio_fs_extra_args: virtiofsd "):
        cfg.validate()


def test_virtio_fs_extra_args_allowlist_takes_kata_shipped_examples() -> None:
    cfg = base()
    args = ["--thread-pool-size=1", "-o", "announce_submounts,no_xattr", "-o", "log_level=warn"]
    apply_annotations(cfg, {P + "virtio_fs_extra_args": json.dumps(args)})
    cfg.validate()
    assert cfg.virtio_fs_extra_args == args


def test_other_prefixes_ignored() -> None:
    cfg = base(enable_annotations=[])
    before = cfg.to_dict()
    apply_annotations(
        cfg,
        {
            "io.katacontainers.config.runtime.sandbox_cgroup_only": "true",
            "io.katacontainers.config.agent.kernel_modules": "e1000e",
            "io.katacontainers.asset_hash_type": "sha512",
            "io.kubernetes.cri.container-type": "sandbox",
            "io.katacontainers.config.hypervisor": "no trailing dot",
        },
    )
    assert cfg.to_dict() == before


def test_allowed_hypervisor_path_registers_custom_asset() -> None:
    cfg = base(hypervisor_path_list=["/usr/bin/qemu-*", "/opt/vc/bin/qemu"])
    apply_annotations(cfg, {P + "path": "/opt/vc/bin/qemu"})
    assert cfg.hypervisor_path == "/opt/vc/bin/qemu"
    assert cfg.hypervisor_asset_path() == "/opt/vc/bin/qemu"
    assert cfg.custom_hypervisor_asset()


def test_guest_assets_in_their_allowlists_register_custom_assets(tmp_path: Path) -> None:
    kernel, initrd = guest_file(tmp_path, "vmlinuz"), guest_file(tmp_path, "initrd")
    cfg = base(kernel_path_list=[f"{tmp_path}/vm*"], initrd_path_list=[initrd])
    apply_annotations(cfg, {P + "kernel": kernel, P + "initrd": initrd})
    assert cfg.kernel_asset_path() == kernel
    assert cfg.initrd_asset_path() == initrd
    assert cfg.custom_kernel_asset() and cfg.custom_initrd_asset()


def guest_file(directory: Path, name: str) -> str:
    (directory / name).write_bytes(b"guest asset")
    return str(directory / name)


@pytest.mark.parametrize(
    ("name", "list_field"),
    [
        ("kernel", "kernel_path_list"),
        ("image", "image_path_list"),
        ("initrd", "initrd_path_list"),
        ("firmware", "firmware_path_list"),
    ],
)
def test_attack_guest_asset_outside_its_allowlist(name: str, list_field: str) -> None:
    # initrd=/etc/shadow would load that file into guest memory, readable by the guest.
    refused(base(), {P + name: "/etc/shadow"}, f"{P}{name}: path '/etc/shadow' is not allowed")
    refused(base(**{list_field: ["/srv/vc/*"]}), {P + name: "/etc/shadow"}, list_field)
    other = base(
        **{f: ["/etc/*"] for f in ("kernel_path_list", "image_path_list") if f != list_field}
    )
    refused(other, {P + name: "/etc/shadow"}, f"not allowed by {list_field}")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a block device needs root")
def test_attack_image_on_a_host_block_device(tmp_path: Path) -> None:
    # image=/dev/sda with disable_image_nvdimm=true would attach the host's disk to the guest.
    disk = tmp_path / "sda"
    os.mknod(disk, 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    attack = {P + "image": str(disk), P + "disable_image_nvdimm": "true"}
    cfg = base(image_path_list=[f"{tmp_path}/*"])
    refused(cfg, attack, f"annotation {P}image: {str(disk)!r} is a block device")
    # An operator who names the device exactly allows it.
    allowed = base(image_path_list=[str(disk)])
    apply_annotations(allowed, attack)
    assert allowed.image_asset_path() == str(disk) and allowed.disable_image_nvdimm


@pytest.mark.parametrize("kind", ["fifo", "directory", "char device", "missing"])
@pytest.mark.parametrize("name", ["kernel", "image", "initrd", "firmware"])
def test_attack_guest_asset_that_is_not_a_regular_file(
    tmp_path: Path, name: str, kind: str
) -> None:
    target = tmp_path / "asset"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "char device":
        target = Path("/dev/zero")
    cfg = base(**{f"{name}_path_list": [str(target)]})
    refused(cfg, {P + name: str(target)}, f"annotation {P}{name}: ")


def test_asset_hash_annotation_reads_only_regular_files(tmp_path: Path) -> None:
    # A hash annotation against a configured FIFO would block forever reading it.
    fifo = tmp_path / "initrd"
    os.mkfifo(fifo)
    cfg = base(initrd_path=str(fifo))
    refused(cfg, {P + "initrd_hash": "0" * 128}, f"annotation {P}initrd_hash: initrd")


def test_kata_shipped_config_allows_its_own_paths() -> None:
    cfg = HypervisorConfig.from_toml(KATA_QEMU_FULL)
    apply_annotations(
        cfg,
        {
            P + "path": QEMU,
            P + "virtio_fs_daemon": "/usr/libexec/kata-qemu/virtiofsd",
            P + "vhost_user_store_path": "/var/run/kata-containers/vhost-user",
            P + "file_mem_backend": "",
        },
    )
    assert cfg.hypervisor_asset_path() == QEMU
    assert cfg.vhost_user_store_path == "/var/run/kata-containers/vhost-user"


# -- enable_annotations -------------------------------------------------------------------------
def test_not_enabled_when_list_empty() -> None:
    refused(base(enable_annotations=[]), {P + "default_vcpus": "2"}, "not enabled")


def test_enable_annotations_uses_full_match(tmp_path: Path) -> None:
    kernel = guest_file(tmp_path, "k")
    cfg = base(enable_annotations=["kernel", "default_.*"], kernel_path_list=[kernel])
    refused(cfg, {P + "kernel_params": "init=/bin/sh"}, "kernel_params is not enabled")
    refused(cfg, {P + "path": "/usr/bin/qemu-system-x86_64"}, "path is not enabled")
    apply_annotations(cfg, {P + "default_memory": "1024", P + "kernel": kernel})
    assert cfg.memory_size == 1024
    assert cfg.kernel_asset_path() == kernel


def test_enable_annotations_alternation_is_full_match(tmp_path: Path) -> None:
    image = guest_file(tmp_path, "img")
    cfg = base(enable_annotations=["kernel|image"], image_path_list=[image])
    refused(cfg, {P + "kernel_params": "quiet"}, "not enabled")
    apply_annotations(cfg, {P + "image": image})
    assert cfg.image_asset_path() == image


def test_invalid_enable_annotations_regex() -> None:
    refused(base(enable_annotations=["("]), {P + "default_vcpus": "2"}, "enable_annotations")


@pytest.mark.parametrize(
    "name",
    [
        "valid_hypervisor_paths",
        "enable_annotations",
        "hypervisor_path_list",
        "jailer_path_list",
        "realtime",
        "Path",
        "",
        "path.extra",
    ],
)
def test_unknown_names_refused(name: str) -> None:
    refused(base(), {P + name: "/tmp/evil"}, "Unknown hypervisor annotation")


# -- host path attacks --------------------------------------------------------------------------
def test_attack_hypervisor_path_not_in_allowlist() -> None:
    refused(base(), {P + "path": "/tmp/evil"}, "not allowed by hypervisor_path_list")


def test_attack_empty_allowlist_refuses_everything() -> None:
    cfg = base(hypervisor_path_list=[])
    refused(cfg, {P + "path": QEMU}, "not allowed by hypervisor_path_list")


@pytest.mark.parametrize(
    ("name", "list_field"),
    [
        ("path", "hypervisor_path_list"),
        ("ctlpath", "hypervisor_ctl_path_list"),
        ("jailer_path", "jailer_path_list"),
        ("virtio_fs_daemon", "virtio_fs_daemon_list"),
        ("file_mem_backend", "file_backed_mem_root_list"),
        ("vhost_user_store_path", "vhost_user_store_path_list"),
    ],
)
def test_attack_each_path_annotation_has_its_allowlist(name: str, list_field: str) -> None:
    cfg = base(**{list_field: ["/opt/vc/*"]})
    refused(cfg, {P + name: "/tmp/evil"}, f"not allowed by {list_field}")
    # another annotation's allowlist does not count
    other = base(hypervisor_path_list=["/tmp/*"], jailer_path_list=["/tmp/*"])
    if name not in ("path", "jailer_path"):
        refused(other, {P + name: "/tmp/evil"}, f"not allowed by {list_field}")
    apply_annotations(cfg, {P + name: "/opt/vc/good"})


@pytest.mark.parametrize(
    "value",
    [
        "/opt/vc/bin/../../../tmp/evil",
        "/opt/vc/bin/..",
        "/opt/vc/bin/./qemu",
        "/opt/vc/bin//qemu",
        "/opt/vc/bin/qemu/",
        "//opt/vc/bin/qemu",
        "opt/vc/bin/qemu",
        "qemu",
    ],
)
def test_attack_traversal_and_relative_paths(value: str) -> None:
    cfg = base(hypervisor_path_list=["/opt/vc/bin/*", "/opt/vc/bin/qemu", "*", "qemu"])
    refused(cfg, {P + "path": value}, "not a normalized absolute path")


def test_attack_glob_star_does_not_cross_slash() -> None:
    cfg = base(hypervisor_path_list=["/opt/vc/*"])
    refused(cfg, {P + "path": "/opt/vc/sub/evil"}, "not allowed")
    assert not glob_match("/opt/*", "/opt/a/b")
    assert glob_match("/opt/*/b", "/opt/a/b")
    assert glob_match("/opt/qemu-[0-9]", "/opt/qemu-7")
    assert not glob_match("/opt/qemu-[0-9]", "/opt/qemu-x")


def test_attack_symlink_out_of_allowed_root(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    evil = tmp_path / "evil"
    evil.write_text("#!/bin/sh\n")
    (allowed / "qemu").symlink_to(evil)
    cfg = base(hypervisor_path_list=[f"{allowed}/*"])
    refused(cfg, {P + "path": str(allowed / "qemu")}, "resolves to")


def test_attack_symlinked_directory_out_of_allowed_root(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "qemu").write_text("x")
    (allowed / "sub").symlink_to(outside)
    cfg = base(hypervisor_path_list=[f"{allowed}/*/*"])
    refused(cfg, {P + "path": str(allowed / "sub" / "qemu")}, "resolves to")


def test_symlink_inside_allowed_root_accepted(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "qemu-7.2").write_text("x")
    (allowed / "qemu").symlink_to(allowed / "qemu-7.2")
    cfg = base(hypervisor_path_list=[f"{allowed}/qemu*"])
    apply_annotations(cfg, {P + "path": str(allowed / "qemu")})
    assert cfg.hypervisor_asset_path() == str(allowed / "qemu")


def test_allowlist_through_symlinked_directory_accepted(tmp_path: Path) -> None:
    # Like /var/run -> /run: the allowlist names the path through the link.
    real = tmp_path / "real"
    (real / "bin").mkdir(parents=True)
    (real / "bin" / "qemu").write_text("x")
    (tmp_path / "link").symlink_to(real)
    value = str(tmp_path / "link" / "bin" / "qemu")
    apply_annotations(
        cfg := base(hypervisor_path_list=[f"{tmp_path}/link/bin/*"]), {P + "path": value}
    )
    assert cfg.hypervisor_path == value
    exact = base(hypervisor_path_list=[value])
    apply_annotations(exact, {P + "path": value})
    assert exact.hypervisor_path == value


def test_empty_path_values() -> None:
    refused(base(hypervisor_path_list=[""]), {P + "path": ""}, "empty path")
    refused(base(jailer_path_list=["/usr/bin/jailer"]), {P + "jailer_path": ""}, "empty path")
    refused(base(), {P + "kernel": ""}, "empty path")
    refused(base(), {P + "file_mem_backend": ""}, "empty path is not allowed")
    cfg = base(file_backed_mem_root_dir="/dev/shm", file_backed_mem_root_list=[""])
    apply_annotations(cfg, {P + "file_mem_backend": ""})
    assert cfg.file_backed_mem_root_dir == ""


@pytest.mark.parametrize("value", ["vmlinuz", "/srv/../etc/shadow", "/srv/k\n"])
def test_attack_guest_asset_paths(value: str) -> None:
    refused(base(), {P + "kernel": value}, "annotation")


@pytest.mark.parametrize("value", ["/etc/shadow", "/dev/mem", "/dev/urandom/../mem", ""])
def test_attack_entropy_source(value: str) -> None:
    refused(base(), {P + "entropy_source": value}, "entropy source")


# -- hashes -------------------------------------------------------------------------------------
def test_hash_matching_file_accepted(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel bytes")
    cfg = base(kernel_path_list=[str(kernel)])
    apply_annotations(
        cfg, {P + "kernel": str(kernel), P + "kernel_hash": sha512(b"kernel bytes").upper()}
    )
    assert cfg.kernel_asset_path() == str(kernel)
    assert cfg.custom_assets()[AssetType.KERNEL] == Asset(
        AssetType.KERNEL, str(kernel), sha512(b"kernel bytes")
    )


def test_attack_hash_mismatch(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"tampered")
    annotations = {P + "kernel": str(kernel), P + "kernel_hash": sha512(b"kernel bytes")}
    refused(base(kernel_path_list=[str(kernel)]), annotations, "does not match")


def test_attack_hash_of_missing_file(tmp_path: Path) -> None:
    image = str(tmp_path / "none.img")
    annotations = {P + "image": image, P + "image_hash": sha512(b"")}
    refused(base(initrd_path="", image_path_list=[image]), annotations, "cannot use image")


def test_hash_applies_to_configured_path(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"vmm")
    cfg = base(hypervisor_path=str(qemu))
    refused(cfg, {P + "hypervisor_hash": sha512(b"other")}, "does not match")
    apply_annotations(cfg, {P + "hypervisor_hash": sha512(b"vmm")})
    assert cfg.custom_assets()[AssetType.HYPERVISOR].hash == sha512(b"vmm")


def test_hash_checks_the_annotated_path_not_the_old_one(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"good")
    new.write_bytes(b"evil")
    cfg = base(jailer_path=str(old), jailer_path_list=[f"{tmp_path}/*"])
    refused(cfg, {P + "jailer_path": str(new), P + "jailer_hash": sha512(b"good")}, "jailer")


@pytest.mark.parametrize(
    ("name", "field_name"),
    [
        ("kernel_hash", "kernel_path"),
        ("image_hash", "image_path"),
        ("initrd_hash", "initrd_path"),
        ("firmware_hash", "firmware_path"),
        ("hypervisor_hash", "hypervisor_path"),
        ("hypervisorctl_hash", "hypervisor_ctl_path"),
        ("jailer_hash", "jailer_path"),
    ],
)
def test_every_hash_annotation_checks_its_asset(tmp_path: Path, name: str, field_name: str) -> None:
    asset = tmp_path / "asset"
    asset.write_bytes(name.encode())
    cfg = base(**{field_name: str(asset)})
    refused(cfg, {P + name: sha512(b"x")}, "does not match")
    apply_annotations(cfg, {P + name: sha512(name.encode())})


@pytest.mark.parametrize("digest", ["", "abc", "g" * 128, "a" * 127, "a" * 129, "a" * 64])
def test_bad_hash_values(digest: str) -> None:
    refused(base(), {P + "kernel_hash": digest}, "not a sha512 hex digest")


def test_hash_without_any_path() -> None:
    refused(base(), {P + "firmware_hash": sha512(b"")}, "no firmware path")


# -- injection and parsing ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    ["quiet\ninit=/bin/sh", "quiet\x00init=/bin/sh", "a\rb", "a\tb", "=orphan", "ok =x"],
)
def test_attack_kernel_params_injection(value: str) -> None:
    refused(base(), {P + "kernel_params": value}, "kernel_params")


@pytest.mark.parametrize(
    "value", ['"-o"', "[1]", '["a", 2]', "{}", "not json", '["a\\nb"]', '["\\u0000"]']
)
def test_extra_args_must_be_json_string_list(value: str) -> None:
    refused(base(), {P + "virtio_fs_extra_args": value}, "virtio_fs_extra_args")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("default_vcpus", "-1"),
        ("default_vcpus", "+2"),
        ("default_vcpus", " 2"),
        ("default_vcpus", "2.0"),
        ("default_vcpus", "0x2"),
        ("default_vcpus", "1_000"),
        ("default_memory", ""),
        ("default_memory", "4294967296"),
        ("memory_slots", "٣"),
        ("enable_hugepages", "yes"),
        ("enable_hugepages", ""),
        ("use_vsock", "on"),
        ("enable_swap", "2"),
        ("block_device_driver", "ide"),
        ("shared_fs", "nfs"),
        ("virtio_fs_cache", "sometimes"),
        ("machine_type", "q35,accel=kvm"),
        ("machine_type", "q35 -x"),
        ("machine_type", ""),
        ("cpu_features", "pmu=off\n-x"),
        ("guest_hook_path", "hooks"),
    ],
)
def test_bad_values_refused(name: str, value: str) -> None:
    refused(base(), {P + name: value}, P + name)


def test_non_string_value_refused() -> None:
    refused(base(), {P + "default_vcpus": 2}, "must be a string")  # type: ignore[dict-item]


def test_all_or_nothing(tmp_path: Path) -> None:
    kernel = guest_file(tmp_path, "k")
    cfg = base(kernel_path_list=[kernel])
    refused(
        cfg,
        {
            P + "default_vcpus": "4",
            P + "kernel_params": "quiet",
            P + "kernel": kernel,
            P + "path": "/tmp/evil",
        },
        "/tmp/evil",
    )
    assert cfg.num_vcpus == 0 and cfg.kernel_params == [] and not cfg.custom_kernel_asset()


def test_annotations_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        apply_annotations(base(), [("a", "b")])  # type: ignore[arg-type]


def test_known_annotation_names_cover_kata() -> None:
    kata = {
        "path", "ctlpath", "jailer_path", "kernel", "image", "initrd", "firmware",
        "kernel_params", "machine_type", "machine_accelerators", "cpu_features",
        "default_vcpus", "default_max_vcpus", "default_memory", "memory_slots",
        "memory_offset", "enable_virtio_mem", "default_bridges", "block_device_driver",
        "block_device_cache_set", "block_device_cache_direct", "block_device_cache_noflush",
        "disable_block_device_use", "enable_iothreads", "enable_mem_prealloc",
        "enable_hugepages", "file_mem_backend", "shared_fs", "virtio_fs_daemon",
        "virtio_fs_cache", "virtio_fs_cache_size", "virtio_fs_extra_args", "msize_9p",
        "entropy_source", "enable_iommu", "enable_iommu_platform", "use_vsock",
        "hotplug_vfio_on_root_bus", "pcie_root_port", "disable_vhost_net",
        "enable_vhost_user_store", "vhost_user_store_path", "guest_hook_path", "enable_swap",
        "disable_image_nvdimm", "kernel_hash", "image_hash", "initrd_hash", "firmware_hash",
        "hypervisor_hash", "hypervisorctl_hash", "jailer_hash",
    }  # fmt: skip
    assert kata == KNOWN_ANNOTATIONS


# -- property: only ConfigError, never half-applied ----------------------------------------------
NAMES = [*sorted(KNOWN_ANNOTATIONS), "bogus", "valid_hypervisor_paths", "enable_annotations"]
VALUES = [
    "",
    "0",
    "1",
    "2",
    "true",
    "false",
    "-1",
    "99999999999",
    "quiet",
    "a=b c=d",
    "=x",
    "x\ny",
    "\x00",
    QEMU,
    "/opt/vc/bin/qemu",
    "/opt/vc/bin/../evil",
    "/tmp/evil",
    "relative",
    "/dev/urandom",
    "virtio-fs",
    "virtio-blk",
    "auto",
    "q35",
    '["-o", "x"]',
    "[1]",
    "a" * 128,
    sha512(b""),
]
values = st.sampled_from(VALUES) | st.text(max_size=16)
# A value each name accepts in the property's config, so that success paths are exercised too.
GOOD: dict[str, list[str]] = {
    "path": [QEMU, "/opt/vc/bin/qemu"],
    "virtio_fs_daemon": ["/opt/vc/bin/virtiofsd"],
    "kernel": ["/srv/vmlinuz"],
    "image": ["/srv/img"],
    "firmware": ["/srv/OVMF.fd"],
    "kernel_params": ["quiet", "a=b c"],
    "virtio_fs_extra_args": ['["-o", "x"]', "[]"],
    "entropy_source": ["/dev/urandom"],
    "machine_type": ["q35"],
    "machine_accelerators": ["nvdimm"],
    "cpu_features": ["pmu=off"],
    "block_device_driver": ["virtio-blk"],
    "shared_fs": ["virtio-fs"],
    "virtio_fs_cache": ["auto"],
    "guest_hook_path": ["/hooks"],
}


@st.composite
def annotation_maps(draw: st.DrawFn) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 9))
        if kind < 7:
            name = draw(st.sampled_from(NAMES))
            if name in GOOD:
                good = GOOD[name]
            elif name.startswith(("enable_", "disable_", "use_", "hotplug_", "block_device_c")):
                good = ["true", "false"]
            else:
                good = ["2", "4096"]
            value = draw(st.sampled_from(good)) if kind < 5 else draw(values)
            out[P + name] = value
        elif kind == 7:
            out[P + draw(st.text(max_size=12))] = draw(values)
        else:
            other = draw(st.sampled_from(["io.katacontainers.config.runtime.x", "other", P[:-1]]))
            out[other] = draw(values)
    return out


enables = st.sampled_from([[".*"], [".*"], [], ["default_.*", "kernel_params"], ["path|kernel"]])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(annotation_maps(), enables)
def test_property_only_config_error_and_never_half_applied(
    annotations: dict[str, str], enable: list[str]
) -> None:
    cfg = base(
        enable_annotations=enable,
        hypervisor_path_list=[QEMU, "/opt/vc/bin/*"],
        virtio_fs_daemon_list=["/opt/vc/bin/*"],
        kernel_params=[Param("console", "hvc0")],
    )
    before = cfg.to_dict()
    try:
        apply_annotations(cfg, annotations)
    except ConfigError:
        assert cfg.to_dict() == before
        return
    hv = {k[len(P) :]: v for k, v in annotations.items() if k.startswith(P)}
    if not hv:
        assert cfg.to_dict() == before
    if "path" in hv:
        assert cfg.hypervisor_asset_path() == hv["path"]
        assert hv["path"] == QEMU or glob_match("/opt/vc/bin/*", hv["path"])
        assert ".." not in hv["path"].split("/")
    else:
        assert cfg.hypervisor_asset_path() == QEMU
    for p in cfg.kernel_params:
        assert p.key and "\n" not in p.key + p.value and "\x00" not in p.key + p.value
    json.dumps(cfg.to_dict())
