"""Cloud Hypervisor request bodies built from HypervisorConfig, validated against the spec.

The spec is used in strict mode (no unknown fields): the real server silently ignores unknown
fields, so a misspelt key would otherwise only show up as a missing feature in a guest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fakes.spec import ApiSpec, SpecError
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    HybridVSockDevice,
    NetworkEndpoint,
    VFIODevice,
    VhostUserDevice,
)
from virtcontainers.drivers.clh import vmconfig
from virtcontainers.drivers.clh.vmconfig import FsShare, VmDevices
from virtcontainers.errors import ConfigError
from virtcontainers.types import Param

SPEC = Path(__file__).resolve().parents[1] / "data" / "specs" / "cloud-hypervisor.yaml"
MIB = 1 << 20


@pytest.fixture(scope="module")
def spec() -> ApiSpec:
    return ApiSpec.load(SPEC, strict=True)


def check(spec: ApiSpec, schema: str, body: dict[str, Any]) -> None:
    spec.validate_value({"$ref": f"#/components/schemas/{schema}"}, body, schema)


def config(**kw: Any) -> HypervisorConfig:
    cfg = HypervisorConfig(kernel_path="/k/vmlinux", initrd_path="/k/initrd.img", **kw)
    cfg.validate()
    return cfg


def build(cfg: HypervisorConfig, devices: VmDevices | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"serial_socket": "/run/vc/vm/x/console.sock", "hotplug_mb": 0}
    args["shared_memory"] = False
    args.update(kw)
    return vmconfig.vm_config(cfg, devices or VmDevices(), **args)


def test_minimal_config_is_valid_and_complete(spec: ApiSpec) -> None:
    body = build(config(num_vcpus=2, default_max_vcpus=8, memory_size=512))
    check(spec, "VmConfig", body)
    assert spec.find("PUT", "/api/v1/vm.create")[0].body_schema is not None
    assert body["payload"]["kernel"] == "/k/vmlinux"
    assert body["payload"]["initramfs"] == "/k/initrd.img"
    assert "firmware" not in body["payload"]
    assert body["cpus"] == {"boot_vcpus": 2, "max_vcpus": 8}
    assert body["memory"]["size"] == 512 * MIB
    assert "hotplug_size" not in body["memory"]
    assert body["serial"] == {"mode": "Socket", "socket": "/run/vc/vm/x/console.sock"}
    assert body["console"] == {"mode": "Off"}
    assert body["rng"] == {"src": "/dev/urandom"}
    assert body["iommu"] is False
    for key in ("disks", "net", "fs", "devices", "vsock", "pmem"):
        assert key not in body


def test_cmdline_has_base_quiet_and_user_params() -> None:
    cfg = config(kernel_params=[Param("agent.log", "debug"), Param("init", "/init")])
    cmdline = build(cfg)["payload"]["cmdline"].split()
    assert cmdline[0] == "console=ttyS0"
    assert "quiet" in cmdline and "debug" not in cmdline
    assert cmdline[-2:] == ["agent.log=debug", "init=/init"]
    assert "debug" in build(config(debug=True))["payload"]["cmdline"].split()


def test_memory_hotplug_acpi_and_virtio_mem(spec: ApiSpec) -> None:
    acpi = build(config(memory_size=1024), hotplug_mb=2048, shared_memory=True)
    check(spec, "VmConfig", acpi)
    assert acpi["memory"] == {
        "size": 1024 * MIB,
        "shared": True,
        "hugepages": False,
        "prefault": False,
        "hotplug_size": 2048 * MIB,
        "hotplug_method": "Acpi",
    }
    vmem = build(config(virtio_mem=True, huge_pages=True, mem_prealloc=True), hotplug_mb=128)
    check(spec, "VmConfig", vmem)
    assert vmem["memory"]["hotplug_method"] == "VirtioMem"
    assert vmem["memory"]["hugepages"] is True and vmem["memory"]["prefault"] is True


def test_hotplug_region_is_whole_blocks_of_host_memory() -> None:
    cfg = config(memory_size=2048)
    assert vmconfig.hotplug_memory_mb(cfg, 24000) == 21888  # (24000-2048) // 128 * 128
    assert vmconfig.hotplug_memory_mb(cfg, 2100) == 0
    assert vmconfig.hotplug_memory_mb(cfg, 1000) == 0


def test_devices_validate_against_their_schemas(spec: ApiSpec) -> None:
    cfg = config(
        iommu=True,
        iommu_platform=True,
        block_device_cache_set=True,
        block_device_cache_direct=True,
        entropy_source="/dev/random",
    )
    devices = VmDevices(
        disks=[
            BlockDrive("d0", "/img/raw.img"),
            BlockDrive("d1", "/img/q.qcow2", format="qcow2", read_only=True),
        ],
        nets=[NetworkEndpoint("n0", "tap0", mac="02:AA:00:00:00:01", queues=4)],
        fs=[FsShare("fs0", "kataShared", "/run/vc/vm/x/fs-fs0.sock")],
        vfio=[VFIODevice("v0", "0000:01:00.0")],
        vhost_user=[
            VhostUserDevice("vb", "/run/vu/blk.sock", backend="blk"),
            VhostUserDevice("vn", "/run/vu/net.sock", backend="net", mac="02:00:00:00:00:09"),
            VhostUserDevice("vf", "/run/vu/fs.sock", backend="fs", tag="tag2"),
        ],
        vsock=HybridVSockDevice("/run/vc/vm/x/clh.vsock", 3, 1024),
    )
    body = build(cfg, devices, shared_memory=True)
    check(spec, "VmConfig", body)
    assert body["iommu"] is True
    assert body["rng"] == {"src": "/dev/random"}
    d0, d1, vb = body["disks"]
    assert d0 == {
        "path": "/img/raw.img",
        "readonly": False,
        "id": "d0",
        "serial": "d0",  # what the guest reads as the disk's serial
        "direct": True,
        "iommu": True,
    }
    assert d1["image_type"] == "Qcow2" and d1["readonly"] is True
    assert vb == {"vhost_user": True, "vhost_socket": "/run/vu/blk.sock", "id": "vb"}
    n0, vn = body["net"]
    assert n0 == {
        "tap": "tap0",
        "id": "n0",
        "num_queues": 8,
        "mac": "02:aa:00:00:00:01",
        "iommu": True,
    }
    assert vn["vhost_user"] is True and vn["mac"] == "02:00:00:00:00:09"
    assert [f["tag"] for f in body["fs"]] == ["kataShared", "tag2"]
    assert body["devices"] == [
        {"path": "/sys/bus/pci/devices/0000:01:00.0", "id": "v0", "iommu": True}
    ]
    assert body["vsock"] == {"cid": 3, "socket": "/run/vc/vm/x/clh.vsock", "id": "vsock0"}
    for name, schema in (("disks", "DiskConfig"), ("net", "NetConfig"), ("fs", "FsConfig")):
        for entry in body[name]:
            check(spec, schema, entry)


def test_hotplug_bodies_match_their_endpoints(spec: ApiSpec) -> None:
    cfg = config()
    cases = [
        ("/vm.add-disk", vmconfig.disk_config(BlockDrive("d9", "/img/x"), cfg)),
        ("/vm.add-net", vmconfig.net_config(NetworkEndpoint("n9", "tap9"), cfg)),
        ("/vm.add-fs", vmconfig.fs_config(FsShare("f9", "t9", "/s.sock"))),
        ("/vm.add-device", vmconfig.vfio_config(VFIODevice("v9", "01:00.0"), cfg)),
    ]
    for path, body in cases:
        spec.validate("PUT", "/api/v1" + path, body)
    spec.validate("PUT", "/api/v1/vm.resize", {"desired_vcpus": 2, "desired_ram": 1 << 30})
    spec.validate("PUT", "/api/v1/vm.remove-device", {"id": "d9"})


def test_root_image_as_pmem_or_disk(spec: ApiSpec) -> None:
    img = HypervisorConfig(kernel_path="/k/vmlinux", image_path="/img/rootfs.img")
    img.validate()
    body = build(img)
    check(spec, "VmConfig", body)
    assert body["pmem"] == [{"file": "/img/rootfs.img", "discard_writes": True, "id": "rootfs"}]
    assert "root=/dev/pmem0p1" in body["payload"]["cmdline"]
    assert "initramfs" not in body["payload"]
    img.disable_image_nvdimm = True
    body = build(img, VmDevices(disks=[BlockDrive("d0", "/img/data")]))
    check(spec, "VmConfig", body)
    assert [d["id"] for d in body["disks"]] == ["rootfs", "d0"]
    assert body["disks"][0]["readonly"] is True
    assert "root=/dev/vda1" in body["payload"]["cmdline"]


def test_strict_spec_catches_a_misspelt_field(spec: ApiSpec) -> None:
    body = build(config())
    body["memory"]["hotplug_sizes"] = 1
    with pytest.raises(SpecError, match="hotplug_sizes"):
        check(spec, "VmConfig", body)
    body = build(config())
    body["cpus"]["boot_vcpus"] = 0
    with pytest.raises(SpecError, match="boot_vcpus"):
        check(spec, "VmConfig", body)


def test_vhost_user_scsi_is_refused() -> None:
    with pytest.raises(ConfigError, match="backend 'scsi'"):
        vmconfig.vhost_user_configs(VhostUserDevice("s", "/run/s.sock", backend="scsi"))


@pytest.mark.parametrize(
    ("bdf", "path"),
    [("0000:00:05.0", "05"), ("0000:00:1f.0", "1f"), ("0000:02:01.0", "02/01")],
)
def test_pci_path_from_bdf(bdf: str, path: str) -> None:
    assert vmconfig.pci_path_from_bdf(bdf) == path


def test_pci_path_from_bdf_refuses_garbage() -> None:
    with pytest.raises(ConfigError, match="cannot parse PCI address"):
        vmconfig.pci_path_from_bdf("not-a-bdf")
