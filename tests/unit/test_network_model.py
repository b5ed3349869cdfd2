"""Parsing and validation of network requests, and the guest files they produce."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent_network_native import NET

from virtcontainers.errors import ConfigError
from virtcontainers.network import (
    NetworkConfig,
    PortMapping,
)
from virtcontainers.network.guest import hosts_file, resolv_conf
from virtcontainers.network.sandbox_net import host_dns


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", PortMapping(8080, 80)),
        ("127.0.0.1:8080:80/udp", PortMapping(8080, 80, "udp", "127.0.0.1")),
        ("1:65535/tcp", PortMapping(1, 65535)),
        ("[::1]:8080:80", PortMapping(8080, 80, "tcp", "::1")),
        ("[fd00:0::5]:53:53/udp", PortMapping(53, 53, "udp", "fd00::5")),
    ],
)
def test_port_specs(spec: str, expected: PortMapping) -> None:
    assert PortMapping.parse(spec) == expected
    assert PortMapping.parse(str(expected)) == expected
    assert expected.families == (
        (4, 6) if not expected.host_ip else (6,) if spec.startswith("[") else (4,)
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("80", "expected"),
        ("a:80", "expected"),
        ("8080:80/sctp", "expected"),
        ("0:80", "host port 0"),
        ("8080:70000", "guest port 70000"),
        ("300.1.1.1:80:80", "not an IP address"),
        ("::1:80:80", "expected"),
        ("[127.0.0.1]:80:80", "in brackets"),
        ("[fe80::zz]:80:80", "expected"),
    ],
)
def test_bad_port_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        PortMapping.parse(spec)
    assert spec in str(e.value)


def test_network_specs() -> None:
    assert NetworkConfig.parse("none").mode == "none"
    cfg = NetworkConfig.parse("bridge:br-test", ["8080:80"], subnet="10.9.0.0/24")
    assert (cfg.mode, cfg.bridge, cfg.subnet) == ("bridge", "br-test", "10.9.0.0/24")
    assert cfg.ports == [PortMapping(8080, 80)]
    assert NetworkConfig.parse("ns:/var/run/netns/x").netns_path == "/var/run/netns/x"
    back = NetworkConfig.from_dict(cfg.to_dict())
    assert back == cfg


@pytest.mark.parametrize(
    ("text", "ports", "subnet", "message"),
    [
        ("wifi", [], "", "network mode 'wifi'"),
        ("ns", [], "", "needs a namespace path"),
        ("none", ["80:80"], "", "need --net bridge or --net user"),
        ("bridge:a-very-long-bridge", [], "", "bridge name 'a-very-long-bridge'"),
        ("bridge", [], "10.0.0.1/24", "subnet '10.0.0.1/24'"),
        ("bridge", [], "10.0.0.0/30", "prefix must be /8 to /29"),
        ("bridge", [], "fd00::/64", "not an IPv4 subnet"),
        ("bridge", [], "banana", "subnet 'banana'"),
        ("bridge", ["80:80", "80:81"], "", "host port 80 given twice"),
        ("user:x", [], "", "takes no argument"),
    ],
)
def test_bad_network_specs(text: str, ports: list[str], subnet: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetworkConfig.parse(text, ports, subnet=subnet)


@pytest.mark.parametrize(
    ("subnet6", "message"),
    [
        ("10.0.0.0/24", "IPv6 subnet '10.0.0.0/24': not an IPv6 subnet"),
        ("fd00::1/64", "IPv6 subnet 'fd00::1/64': .*host bits"),
        ("fd00::/32", "prefix must be /48 to /112"),
        ("fd00::/120", "prefix must be /48 to /112"),
    ],
)
def test_bad_ipv6_subnets(subnet6: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetworkConfig.parse("bridge", subnet6=subnet6)
    assert NetworkConfig.parse("bridge", subnet6="none").subnet6 == "none"
    assert NetworkConfig.parse("bridge", subnet6="fd00:1::/64").subnet6 == "fd00:1::/64"


def test_user_mode_publishes_ipv4_only() -> None:
    with pytest.raises(ConfigError, match=r"\[::1\]:8080:80/tcp: --net user publishes on IPv4"):
        NetworkConfig.parse("user", ["[::1]:8080:80"])


def test_guest_files() -> None:
    assert hosts_file(NET).splitlines()[2:] == ["10.1.0.2\tbox", "fd00::2\tbox", "10.1.0.7\tdb"]
    assert resolv_conf(NET) == "nameserver 10.1.0.53\nsearch a.test\n"


def test_host_dns_drops_loopback_servers(tmp_path: pytest.TempPathFactory) -> None:
    conf = tmp_path / "resolv.conf"  # type: ignore[operator]
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch a b\n")
    assert host_dns(str(conf)) == (["10.0.0.2"], ["a", "b"])
    assert host_dns(str(conf) + ".missing") == ([], [])


@pytest.mark.parametrize(
    ("hypervisor", "network", "message"),
    [
        ("acrn", "bridge", "acrn does not support sandbox networking"),
        ("firecracker", "user", "firecracker does not support --net user"),
        ("clh", "user", "clh does not support --net user"),
        (
            "firecracker",
            NetworkConfig(mode="ns", netns_path="/proc/self/ns/net", model="macvtap"),
            "firecracker does not support the macvtap network model",
        ),
    ],
)
async def test_networks_a_vmm_cannot_take_are_refused_before_anything(
    hypervisor: str, network: NetworkConfig | str, message: str, tmp_path: Path
) -> None:
    from virtcontainers import Sandbox
    from virtcontainers.errors import UnsupportedError

    assets = {name: tmp_path / name for name in ("vmlinux", "initrd.img")}
    for path in assets.values():
        path.write_bytes(b"x")
    run_root = tmp_path / "run"
    sb = Sandbox(
        hypervisor=hypervisor,
        run_root=str(run_root),
        network=network,
        kernel_path=str(assets["vmlinux"]),
        initrd_path=str(assets["initrd.img"]),
    )
    with pytest.raises(UnsupportedError, match=message):
        await sb.create()
    assert not run_root.exists() or not any(run_root.rglob("*.json"))


def test_opening_a_tap_that_is_not_there_names_it_and_makes_none() -> None:
    """TUNSETIFF on a missing name would make a fresh tap: `open_tap` refuses first."""
    from virtcontainers.network import netlink

    with pytest.raises(ConfigError, match="tap vcnone9_vc is not in the sandbox's namespace"):
        netlink.call_in_netns("", netlink.open_tap, "vcnone9_vc", 2)
    assert not netlink.link_exists("vcnone9_vc")


@pytest.mark.parametrize("request_", ["user", NetworkConfig(mode="user")])
def test_a_factory_vm_refuses_user_mode_networking(request_: NetworkConfig | str) -> None:
    from virtcontainers.sandbox import hot_network

    with pytest.raises(ConfigError, match="--net user: a VM from the factory cannot take"):
        hot_network(request_)
    assert hot_network("none").mode == "none"
