"""Firecracker and jailer command lines, id rules and the guest kernel command line."""

from __future__ import annotations

import itertools

import pytest

from virtcontainers.drivers.firecracker.argv import (
    JailerSpec,
    check_vm_id,
    firecracker_argv,
    kernel_command_line,
    resource_id,
)
from virtcontainers.errors import ConfigError
from virtcontainers.types import Param


def test_firecracker_argv() -> None:
    assert firecracker_argv("/usr/bin/firecracker", "/run/vc/vm/a/fc.sock", "vm-1") == [
        "/usr/bin/firecracker", "--api-sock", "/run/vc/vm/a/fc.sock", "--id", "vm-1",
    ]  # fmt: skip
    assert firecracker_argv("/fc", "/s", "a", ["--level", "Debug"])[-2:] == ["--level", "Debug"]


@pytest.mark.parametrize("bad", ["", "a_b", "a b", "a/b", "x" * 65, "--api-sock"])
def test_vm_id_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid VM id"):
        check_vm_id(bad)
    with pytest.raises(ConfigError):
        firecracker_argv("/fc", "/s", bad)


def test_vm_id_accepted() -> None:
    assert check_vm_id("a" * 64) == "a" * 64
    assert check_vm_id("Sandbox-0f3a") == "Sandbox-0f3a"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("rootfs", "rootfs"), ("data-1", "data_1"), ("a.b-c", "a_b_c"), ("X_9", "X_9")],
)
def test_resource_id_sanitized(name: str, expected: str) -> None:
    assert resource_id(name) == expected


@pytest.mark.parametrize("bad", ["", "x" * 65])
def test_resource_id_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="API resource id"):
        resource_id(bad)


def test_kernel_command_line_defaults_and_overrides() -> None:
    line = kernel_command_line([])
    assert line.startswith("console=ttyS0 reboot=k panic=1 pci=off")
    assert "i8042.noaux" in line.split()
    line = kernel_command_line([Param("panic", "0"), Param("quiet", ""), Param("init", "/init")])
    words = line.split()
    assert "panic=0" in words and "panic=1" not in words
    assert words[-2:] == ["quiet", "init=/init"]
    assert kernel_command_line([], defaults=[Param("a", "1")]) == "a=1"


def _spec(**kw: object) -> JailerSpec:
    args: dict[str, object] = {
        "jailer": "/usr/bin/jailer",
        "exec_file": "/usr/bin/firecracker",
        "chroot_base_dir": "/srv/jail",
    }
    args.update(kw)
    return JailerSpec(**args)  # type: ignore[arg-type]


def test_jailer_argv_minimal() -> None:
    assert _spec(uid=123, gid=456).argv("vm1") == [
        "/usr/bin/jailer", "--id", "vm1", "--exec-file", "/usr/bin/firecracker",
        "--uid", "123", "--gid", "456", "--chroot-base-dir", "/srv/jail",
        "--cgroup-version", "1", "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


def test_jailer_argv_everything() -> None:
    spec = _spec(
        cgroup_version=2,
        netns="/var/run/netns/n1",
        parent_cgroup="vc",
        cgroups=["cpu.weight=50"],
        resource_limits=["no-file=1024", "fsize=1000000"],
        daemonize=True,
        new_pid_ns=True,
    )
    argv = spec.argv("vm1", ["--level", "Debug"])
    sep = argv.index("--")
    head, tail = argv[:sep], argv[sep + 1 :]
    assert tail == ["--api-sock", "/run/firecracker.socket", "--level", "Debug"]
    pairs = list(itertools.pairwise(head))
    for pair in [
        ("--cgroup-version", "2"),
        ("--netns", "/var/run/netns/n1"),
        ("--parent-cgroup", "vc"),
        ("--cgroup", "cpu.weight=50"),
        ("--resource-limit", "no-file=1024"),
        ("--resource-limit", "fsize=1000000"),
    ]:
        assert pair in pairs
    assert "--daemonize" in head and "--new-pid-ns" in head
    assert "--id" in head and "--id" not in tail  # the jailer passes --id itself


def test_jail_layout() -> None:
    spec = _spec()
    assert spec.jail_dir("vm1") == "/srv/jail/firecracker/vm1"
    assert spec.root("vm1") == "/srv/jail/firecracker/vm1/root"
    assert spec.host_path("vm1", "/run/firecracker.socket") == (
        "/srv/jail/firecracker/vm1/root/run/firecracker.socket"
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"jailer": "jailer"}, "jailer must be an absolute path"),
        ({"chroot_base_dir": ""}, "chroot_base_dir must be an absolute path"),
        ({"netns": "n1"}, "netns must be an absolute path"),
        ({"cgroup_version": 3}, "cgroup_version must be 1 or 2"),
        ({"uid": -1}, "uid/gid"),
        ({"cgroups": ["cpu.shares"]}, "must be <name>=<value>"),
        ({"resource_limits": ["nproc=5"]}, "unknown resource limit"),
    ],
)
def test_jailer_spec_refuses(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spec(**kw)
