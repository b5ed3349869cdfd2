"""Core value types: hypervisor kinds, params (the seed's exact rules), assets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtcontainers import (
    Asset,
    AssetType,
    Capabilities,
    ConfigError,
    DeviceType,
    HypervisorType,
    Param,
    deserialize_params,
    serialize_params,
)


@pytest.mark.parametrize("name", ["qemu", "firecracker", "acrn", "clh", "mock"])
def test_hypervisor_type_parse_and_str(name: str) -> None:
    member = HypervisorType.parse(name)
    assert str(member) == name
    assert member.value == name


@pytest.mark.parametrize("bad", ["", "QEMU", "kvm", "qemu "])
def test_hypervisor_type_unknown(bad: str) -> None:
    with pytest.raises(ConfigError) as exc:
        HypervisorType.parse(bad)
    assert str(exc.value) == f"Unknown hypervisor type {bad}"


def test_serialize_params_seed_rules() -> None:
    params = [
        Param("", ""),
        Param("", "value-only"),
        Param("key-only", ""),
        Param("k", "v"),
    ]
    assert serialize_params(params, "=") == ["value-only", "key-only", "k=v"]
    assert serialize_params(params, "") == ["value-only", "key-only", "k", "v"]
    assert serialize_params([Param("a", "b")], ": ") == ["a: b"]


def test_deserialize_params_seed_rules() -> None:
    assert deserialize_params(["", "a=b", "c", "d=e=f", "=x"]) == [
        Param("a", "b"),
        Param("c", ""),
        Param("d", "e=f"),
        Param("", "x"),
    ]


keys = st.text(alphabet=st.characters(blacklist_characters="="), min_size=1)


@given(st.lists(st.tuples(keys, st.text())))
def test_params_round_trip(pairs: list[tuple[str, str]]) -> None:
    params = [Param(k, v) for k, v in pairs]
    assert deserialize_params(serialize_params(params, "=")) == params


def test_device_type_seed_order() -> None:
    assert [m.name for m in DeviceType] == [
        "IMG",
        "FS",
        "NET",
        "BLOCK",
        "SERIAL_PORT",
        "VSOCK_PCI",
        "VFIO",
        "VHOST_USER",
        "CPU",
        "MEMORY",
        "HYBRID_VSOCK",
    ]


def test_capabilities_flags() -> None:
    caps = Capabilities.BLOCK_DEVICE | Capabilities.FS_SHARING
    assert Capabilities.BLOCK_DEVICE in caps
    assert Capabilities.MULTI_QUEUE not in caps
    assert caps.names() == ["block_device", "fs_sharing"]


def test_asset_valid(tmp_path: Path) -> None:
    f = tmp_path / "vmlinuz"
    f.write_bytes(b"kernel bytes")
    digest = hashlib.sha512(b"kernel bytes").hexdigest()
    assert Asset(AssetType.KERNEL, str(f)).valid()
    assert Asset(AssetType.KERNEL, str(f), digest).valid()
    assert Asset(AssetType.KERNEL, str(f), digest.upper()).valid()
    assert not Asset(AssetType.KERNEL, str(f), "0" * 128).valid()
    assert not Asset(AssetType.KERNEL, "relative/vmlinuz").valid()
    assert not Asset(AssetType.KERNEL, "").valid()
    assert not Asset(AssetType.KERNEL, str(tmp_path / "missing"), digest).valid()


def test_asset_type_strings() -> None:
    assert str(AssetType.HYPERVISOR_CTL) == "hypervisorctl"
    assert f"{AssetType.KERNEL}" == "kernel"
