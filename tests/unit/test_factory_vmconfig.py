"""Factory base configs: normalisation, differences, compatibility, serialisation."""

from __future__ import annotations

import json

import pytest
from test_factory_fakes import fake_config

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import random_mac
from virtcontainers.errors import ConfigError
from virtcontainers.factory import VMConfig, config_hash, differences, incompatibility
from virtcontainers.factory.vmconfig import BaseCheck
from virtcontainers.types import HypervisorType, Param


def test_size_and_identity_fields_do_not_make_configs_differ() -> None:
    base = fake_config(num_vcpus=1, memory_size=256)
    other = fake_config(
        num_vcpus=2,
        memory_size=1024,
        boot_from_template=True,
        memory_path="/t/memory",
        devices_state_path="/t/state",
        vm_id="x",
    )
    assert differences(base, other) == []
    assert config_hash(base) == config_hash(other)


def test_other_fields_are_named() -> None:
    base = fake_config()
    other = fake_config(kernel_path="/other/vmlinuz", kernel_params=[Param("quiet")])
    assert differences(base, other) == ["kernel_params", "kernel_path"]
    assert config_hash(base) != config_hash(other)


def test_defaults_are_filled_before_comparing() -> None:
    assert differences(fake_config(), fake_config(block_device_driver="virtio-scsi")) == []


def test_incompatibility_says_why() -> None:
    base = VMConfig.of(fake_config(), "qemu")
    assert incompatibility(base, VMConfig.of(fake_config(memory_size=4096), "qemu")) == ""
    why = incompatibility(base, VMConfig.of(fake_config(hypervisor_machine_type="pc"), "qemu"))
    assert "hypervisor_machine_type" in why
    why = incompatibility(base, VMConfig.of(fake_config(), "mock"))
    assert "hypervisor mock" in why


def test_many_differences_are_summarised() -> None:
    base = VMConfig.of(fake_config(), "qemu")
    req = VMConfig.of(
        fake_config(
            kernel_path="/k",
            initrd_path="/i",
            debug=True,
            mem_prealloc=True,
            realtime=True,
            mlock=True,
            enable_iothreads=True,
            disable_vhost_net=True,
        ),
        "qemu",
    )
    why = incompatibility(base, req)
    assert "and 2 more" in why


def test_vm_config_round_trips_through_json() -> None:
    vc = VMConfig.of(fake_config(kernel_params=[Param("a", "b")]), "qemu")
    back = VMConfig.from_json(vc.to_json())
    assert back.hypervisor is HypervisorType.QEMU
    assert back.config.to_dict() == vc.config.to_dict()


def test_vm_config_refuses_vsock_and_bad_input() -> None:
    with pytest.raises(ConfigError, match="use_vsock"):
        VMConfig.of(fake_config(use_vsock=True))
    with pytest.raises(ConfigError, match="Missing kernel path"):
        VMConfig.of(fake_config(kernel_path=""))
    with pytest.raises(ConfigError, match="not valid JSON"):
        VMConfig.from_json(b"{nope")
    with pytest.raises(ConfigError, match="expected a mapping"):
        VMConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match="Unknown hypervisor type"):
        VMConfig.from_dict({"hypervisor": "vmware", "config": {}})


def test_validated_copy_does_not_touch_the_caller_config() -> None:
    cfg = fake_config(memory_size=0)
    vc = VMConfig.of(cfg)
    assert cfg.memory_size == 0
    assert vc.config.memory_size == 2048


def test_random_macs_are_unicast_local_and_distinct() -> None:
    macs = {random_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac[:2], 16)
        assert first & 1 == 0  # unicast
        assert first & 2 == 2  # locally administered
        assert len(mac.split(":")) == 6


def test_base_check_serves_what_incompatibility_serves() -> None:
    check = BaseCheck(VMConfig.of(fake_config(), "qemu"))

    def sent(cfg: HypervisorConfig, hv: str = "qemu") -> str:
        return check.why_not(hv, json.dumps(cfg.to_dict()).encode())

    grown = fake_config(num_vcpus=4, memory_size=2048, vm_id="x")
    grown.validate()
    assert sent(grown) == ""  # validated, equal but for size and identity
    assert sent(fake_config()) == ""  # not validated: its defaults filled, then compared
    assert "initrd_path" in sent(fake_config(initrd_path="/other/initrd.img"))
    assert "hypervisor" in sent(grown, "firecracker")
    with pytest.raises(ConfigError, match="JSON"):
        check.why_not("qemu", b"{")
    with pytest.raises(ConfigError, match="nonsense"):
        check.why_not("qemu", b'{"nonsense": 1}')
