"""Request bodies built from config and devices are valid for the Firecracker spec; the spec
validator (tests/fakes/spec.py) itself catches what the real server refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fakes.spec import ApiSpec, SpecError
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.firecracker import bodies
from virtcontainers.errors import ConfigError

SPECS = Path(__file__).resolve().parents[1] / "data" / "specs"


@pytest.fixture(scope="module")
def spec() -> ApiSpec:
    return ApiSpec.load(SPECS / "firecracker.yaml", strict=True)


def _cfg(**kw: Any) -> HypervisorConfig:
    cfg = HypervisorConfig(kernel_path="/k", initrd_path="/i", num_vcpus=2, memory_size=256)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _check(spec: ApiSpec, method: str, path: str, body: dict[str, Any], op_id: str) -> None:
    assert spec.validate(method, path, body).operation_id == op_id


def test_every_body_matches_the_spec(spec: ApiSpec) -> None:
    _check(spec, "PUT", "/logger", bodies.logger("firecracker.log", True), "putLogger")
    _check(spec, "PUT", "/metrics", bodies.metrics("metrics.json"), "putMetrics")
    mc = bodies.machine_config(_cfg())
    assert mc["vcpu_count"] == 2 and mc["mem_size_mib"] == 256
    _check(spec, "PUT", "/machine-config", mc, "putMachineConfiguration")
    huge = bodies.machine_config(_cfg(huge_pages=True))
    assert huge["huge_pages"] == "2M"
    _check(spec, "PUT", "/machine-config", huge, "putMachineConfiguration")
    bs = bodies.boot_source("/vmlinux", "/initrd", "console=ttyS0")
    _check(spec, "PUT", "/boot-source", bs, "putGuestBootSource")
    assert "initrd_path" not in bodies.boot_source("/vmlinux", "", "")
    d = bodies.drive("data-1", "/d.img", read_only=True, cache_type="Writeback")
    assert d["drive_id"] == "data_1"
    _check(spec, "PUT", "/drives/data_1", d, "putGuestDriveByID")
    _check(
        spec, "PATCH", "/drives/pool_0", bodies.drive_patch("pool_0", "/x"), "patchGuestDriveByID"
    )
    net = bodies.network_interface("eth-0", "tap0", "02:00:00:00:00:01")
    _check(spec, "PUT", "/network-interfaces/eth_0", net, "putGuestNetworkInterfaceByID")
    _check(spec, "PUT", "/vsock", bodies.vsock("kata.hvsock"), "putGuestVsock")
    _check(spec, "PUT", "/actions", bodies.action("InstanceStart"), "createSyncAction")
    _check(spec, "PATCH", "/vm", bodies.vm_state(paused=True), "patchVm")
    assert bodies.vm_state(paused=False) == {"state": "Resumed"}
    sc = bodies.snapshot_create("s", "m")
    _check(spec, "PUT", "/snapshot/create", sc, "createSnapshot")
    sl = bodies.snapshot_load(
        "s", "m", resume=True, vsock_override="v.sock", network_overrides=[("eth-0", "tap9")]
    )
    assert sl["network_overrides"] == [{"iface_id": "eth_0", "host_dev_name": "tap9"}]
    _check(spec, "PUT", "/snapshot/load", sl, "loadSnapshot")
    plain = bodies.snapshot_load("s", "m", resume=False)
    assert set(plain) == {"snapshot_path", "mem_backend", "resume_vm"}  # v1.12-safe fields only


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_vcpus": 33}, "num_vcpus must be 1..32"),
        ({"huge_pages": True, "memory_size": 255}, "must be even"),
    ],
)
def test_machine_config_limits(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        bodies.machine_config(_cfg(**kw))


def test_body_errors() -> None:
    with pytest.raises(ConfigError, match="cache_type"):
        bodies.drive("a", "/a", read_only=False, cache_type="None")
    with pytest.raises(ConfigError, match="CID"):
        bodies.vsock("v", guest_cid=2)


def test_spec_rejects_what_the_server_rejects(spec: ApiSpec) -> None:
    with pytest.raises(SpecError) as err:
        spec.validate("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 1, "x": 1})
    assert err.value.unknown_field == "x"
    with pytest.raises(SpecError, match="vcpu_count"):
        spec.validate("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 1})
    with pytest.raises(SpecError, match="'drive_id' is a required property"):
        spec.validate("PATCH", "/drives/a", {"path_on_host": "/x"})
    # $ref inside $ref: Drive -> RateLimiter -> TokenBucket
    bad_bucket = {"drive_id": "a", "is_root_device": False, "rate_limiter": {"ops": {"size": 1}}}
    with pytest.raises(SpecError, match="rate_limiter/ops: 'refill_time' is a required"):
        spec.validate("PUT", "/drives/a", bad_bucket)
    with pytest.raises(SpecError) as route:
        spec.validate("GET", "/nope")
    assert route.value.kind == "route"
    with pytest.raises(SpecError) as method:
        spec.validate("DELETE", "/vm")
    assert method.value.kind == "method"
    with pytest.raises(SpecError, match="body is required"):
        spec.validate("PUT", "/actions", None)
    with pytest.raises(SpecError, match="takes no request body"):
        spec.validate("GET", "/", {"a": 1})


def test_spec_not_strict_allows_unknown_fields() -> None:
    loose = ApiSpec.load(SPECS / "firecracker.yaml")
    assert loose.validate("PATCH", "/vm", {"state": "Paused", "x": 1}).operation_id == "patchVm"


def test_spec_loads_openapi3_with_base_path() -> None:
    api = ApiSpec.load(SPECS / "cloud-hypervisor.yaml")
    assert api.base_path == "/api/v1"
    assert api.validate("GET", "/api/v1/vmm.ping").operation_id
    with pytest.raises(SpecError):
        api.validate("PUT", "/api/v1/vm.create", {"cpus": {"boot_vcpus": "two"}})


def test_spec_load_refuses_other_yaml(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("a: 1\n")
    with pytest.raises(ValueError, match="not an OpenAPI"):
        ApiSpec.load(f)
