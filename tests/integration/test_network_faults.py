"""Bad network input and faults: clear errors before anything is made, nothing left behind.

The mock driver stands in for the VMM (no guest is needed): the host side — namespaces,
veths, the bridge, nftables rules, address leases — is real, made inside a namespace the
test creates ("the host").
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from pyroute2 import NetNS

from leaks import children
from net_support import Namespace, namespaces
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError, HypervisorError
from virtcontainers.network import NetworkConfig, PortMapping, netlink
from virtcontainers.network.netlink import call_in_netns, scan

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check", "host_untouched")]


def state_of(ns: Namespace) -> tuple[list[str], str, list[str]]:
    """What a sandbox could leave: interfaces and rules in `ns`, sandbox namespaces."""
    return (
        ns.links(),
        ns.run("nft", "list", "ruleset"),
        sorted(n for n in os.listdir("/var/run/netns") if n.startswith("vc-")),
    )


MOCK_CFG = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}


def mock(run_root: str, network: NetworkConfig | str) -> Sandbox:
    """A mock-VM sandbox with a real network."""
    return Sandbox(hypervisor="mock", run_root=run_root, network=network, **MOCK_CFG)


def add_routed_link(ns: Namespace, address: str) -> None:
    ip, _, plen = address.partition("/")
    with NetNS(ns.path) as n:
        n.link("add", ifname="tv0", kind="veth", peer={"ifname": "tv1"})  # no dummy module here
        idx = n.link_lookup(ifname="tv0")[0]
        n.addr("add", index=idx, address=ip, prefixlen=int(plen), flags=0x02)  # no DAD
        n.link("set", index=idx, state="up")


def bridge(ns: Namespace, *ports: str, **kw: Any) -> NetworkConfig:
    return NetworkConfig(
        mode="bridge", host_netns=ns.path, ports=[PortMapping.parse(p) for p in ports], **kw
    )


async def test_bad_input_is_refused_before_anything_is_made(run_root: str) -> None:
    async with namespaces(1) as (host,):
        before = state_of(host)
        # A host port held by a socket in the host namespace.
        held = call_in_netns(host.path, socket.create_server, ("0.0.0.0", 18080))
        try:
            with pytest.raises(ConfigError, match=r"host port 18080/tcp is in use"):
                await mock(run_root, bridge(host, "18080:80")).start()
        finally:
            held.close()
        assert state_of(host) == before
        # A port another sandbox publishes.
        async with mock(run_root, bridge(host, "18081:80")) as a:
            with pytest.raises(
                ConfigError, match=rf"18081/tcp is already published by sandbox {a.id}"
            ):
                await mock(run_root, bridge(host, "18081:81")).start()
            with pytest.raises(ConfigError, match=r"bridge vc0 already serves 10.213.0.0/16"):
                await mock(run_root, bridge(host, subnet="10.9.0.0/24")).start()
        assert state_of(host) == before
        # A subnet that overlaps a route of the host.
        await asyncio.to_thread(add_routed_link, host, "10.77.0.1/24")
        before = state_of(host)
        with pytest.raises(
            ConfigError, match=r"subnet 10.77.0.0/16 overlaps the route to 10.77.0.0/24"
        ):
            await mock(run_root, bridge(host, subnet="10.77.0.0/16")).start()
        # A bridge name Linux cannot take; a malformed port; a namespace that is gone.
        with pytest.raises(ConfigError, match=r"bridge name 'vc-bridge-too-long'"):
            await mock(
                run_root,
                bridge(host, bridge="vc-bridge-too-long"),
            ).start()
        with pytest.raises(ConfigError, match=r"published port '8080'"):
            await mock(
                run_root,
                NetworkConfig.parse("bridge", ["8080"]),
            ).start()
        with pytest.raises(
            ConfigError, match=r"network namespace /var/run/netns/vctn-gone does not exist"
        ):
            await mock(run_root, "ns:/var/run/netns/vctn-gone").start()
        assert state_of(host) == before
        assert Sandbox.list(run_root) == []


async def test_ipv6_subnet_clear_of_routes_and_ports_held_on_ipv6(run_root: str) -> None:
    """The bridge's IPv6 subnet: the first default that no route overlaps, an asked one
    refused when a route overlaps it or the bridge serves another; a port held by an IPv6
    socket is refused for a port published without an address; `none` for IPv4 only."""
    async with namespaces(1) as (host,):
        await asyncio.to_thread(add_routed_link, host, "fd5c:76c1:a7e3::1/64")
        before = state_of(host)
        with pytest.raises(
            ConfigError,
            match=r"IPv6 subnet fd5c:76c1:a7e3::/64 overlaps the route to fd5c:76c1:a7e3::/64",
        ):
            await mock(run_root, bridge(host, subnet6="fd5c:76c1:a7e3::/64")).start()
        held = call_in_netns(
            host.path,
            functools.partial(socket.create_server, ("::1", 18085), family=socket.AF_INET6),
        )
        try:
            with pytest.raises(ConfigError, match=r"host port 18085/tcp is in use"):
                await mock(run_root, bridge(host, "18085:80")).start()
            # Published on IPv4 only, the port is free.
            async with mock(run_root, bridge(host, "127.0.0.1:18085:80")) as sb:
                assert sb.network is not None
                assert sb.network.address6.startswith("fd5c:76c1:a7e3:1::")
                assert sb.network.gateway6 == "fd5c:76c1:a7e3:1::1"
                # The endpoint recorded from the plan is what a scan of its namespace finds.
                found, routes, _ = call_in_netns(sb.network.netns_path, scan)
                assert [(i.name, i.kind, i.mac, i.mtu, i.addresses) for i in found] == [
                    (i.name, i.kind, i.mac, i.mtu, i.addresses) for i in sb.network.interfaces
                ]
                assert routes == sb.network.routes and len(routes) == 2
                with pytest.raises(
                    ConfigError, match=r"bridge vc0 already serves fd5c:76c1:a7e3:1::/64"
                ):
                    await mock(run_root, bridge(host, subnet6="fd00:9::/64")).start()
                async with mock(run_root, bridge(host, subnet6="none")) as v4only:
                    assert v4only.network is not None and not v4only.network.address6
        finally:
            held.close()
        assert state_of(host) == before


def add_link(ns: Namespace, name: str) -> None:
    with NetNS(ns.path) as n:
        n.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})


async def test_bridge_made_while_booting_fails_the_start_and_undoes_all(run_root: str) -> None:
    """The bridge and rules are made while the VM boots: when that fails (here an interface
    took the bridge's name between create and start), the start fails with that error and
    the namespace, veth, lease and sandbox made before the launch are gone."""
    async with namespaces(1) as (host,):
        sb = mock(run_root, bridge(host, "18097:80"))
        await sb.create()
        assert "vc-" + sb.id in state_of(host)[2]
        await asyncio.to_thread(add_link, host, "vc0")
        before = state_of(host)
        with pytest.raises(ConfigError, match=r"bridge vc0: an interface of that name exists"):
            await sb.start()
        assert state_of(host) == (
            [n for n in before[0] if not n.startswith("vcv")],
            before[1],
            [n for n in before[2] if n != "vc-" + sb.id],
        )
        assert Sandbox.list(run_root) == []
        assert not os.path.exists(os.path.join(run_root, "net"))


def links_in(path: str) -> list[str]:
    with NetNS(path) as n:
        return sorted(str(link.get("IFLA_IFNAME")) for link in n.get_links())


def inner_state(path: str) -> tuple[list[str], bool, str]:
    """In a sandbox's namespace: the inner veth's addresses, whether tap0_vc is up, and the
    veth's ingress filters."""
    with NetNS(path) as n:
        eth = n.link_lookup(ifname="eth0")[0]
        addrs = [str(a.get("IFA_ADDRESS")) for a in n.get_addr(index=eth)]
        (tap,) = n.get_links(n.link_lookup(ifname="tap0_vc")[0])
    tc = subprocess.run(
        ["ip", "netns", "exec", os.path.basename(path), "tc", "filter", "show", "dev", "eth0",
         "ingress"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(a for a in addrs if not a.startswith("fe80")), tap["state"] == "up", tc


def link_in(path: str, name: str) -> tuple[str, int]:
    """MAC and MTU of interface `name` in the namespace at `path`."""
    with NetNS(path) as n:
        (link,) = n.get_links(n.link_lookup(ifname=name)[0])
    return str(link.get("IFLA_ADDRESS")), int(link.get("IFLA_MTU"))


def delete_link_in(path: str, name: str) -> None:
    with NetNS(path) as n:
        n.link("del", index=n.link_lookup(ifname=name)[0])


async def test_before_launch_only_the_tap_then_the_inner_end_while_booting(
    run_root: str,
) -> None:
    """Before the VMM is launched a bridge sandbox's namespace gets only the tap (up: all
    QEMU opens); the veth, its inner addresses and its tc redirect to the tap come while
    the VM boots. When that half fails (here the tap vanished before the start), the start
    fails naming it and everything made is undone."""
    async with namespaces(1) as (host,):
        before = state_of(host)
        sb = mock(run_root, bridge(host))
        try:
            await sb.create()
            assert sb.network is not None
            path = sb.network.netns_path
            assert await asyncio.to_thread(links_in, path) == ["lo", "tap0_vc"]
            assert sb.network.host_veth not in state_of(host)[0]
            eth = sb.network.interfaces[0]
            assert (await asyncio.to_thread(link_in, path, "tap0_vc"))[1] == eth.mtu
            await sb.start()
            # The inner end is made as recorded before the launch (the guest's NIC took that
            # MAC and MTU then).
            assert await asyncio.to_thread(link_in, path, "eth0") == (eth.mac, eth.mtu)
            assert sb.network.host_veth in state_of(host)[0]
            addrs, tap_up, tc = await asyncio.to_thread(inner_state, path)
            assert tap_up
            want = sorted(a.ip for a in sb.network.interfaces[0].addresses)
            assert addrs == want and len(want) == 2
            assert "mirred (Egress Redirect to device tap0_vc)" in tc
        finally:
            await sb.stop()
        assert state_of(host) == before

        broken = mock(run_root, bridge(host))
        try:
            await broken.create()
            assert broken.network is not None
            await asyncio.to_thread(delete_link_in, broken.network.netns_path, "tap0_vc")
            gone = "tap tap0_vc is not in the sandbox's namespace"
            with pytest.raises(ConfigError, match=gone):
                await broken.start()
        finally:
            await broken.stop()  # a no-op when the failed start undid it all
        assert state_of(host) == before
        assert Sandbox.list(run_root) == []


def test_a_namespace_whose_tap_fails_is_not_left() -> None:
    """`create_netns` makes the tap in the new namespace's own thread: when that fails, the
    error names the tap and no namespace is left."""
    name = f"vc-tapfail-{secrets.token_hex(3)}"
    with pytest.raises(HypervisorError, match=r"cannot bring tap tap0_vc up \(mtu 70000\)"):
        netlink.create_netns(name, lambda: netlink.make_tap("tap0_vc", 1, 70000))
    assert not os.path.exists(netlink.netns_path(name))


async def test_fifty_cycles_leave_nothing(run_root: str) -> None:
    async with namespaces(1) as (host,):
        before = state_of(host)
        kids = len(children())
        for _ in range(50):
            async with mock(run_root, bridge(host, "18090:80")) as sb:
                assert sb.network is not None and sb.network.address
        assert state_of(host) == before
        assert len(children()) == kids
        assert not os.path.exists(os.path.join(run_root, "net"))


KILLED_MID_SETUP = """
import asyncio, os, signal, sys
from virtcontainers import Sandbox
from virtcontainers.network import NetworkConfig, PortMapping
from virtcontainers.network import nat

real = nat.add_rules
def add_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # the manager dies with the rules made
nat.add_rules = add_then_die
cfg = NetworkConfig(mode="bridge", host_netns=sys.argv[1], ports=[PortMapping(18095, 80)])
sb = Sandbox(sys.argv[2], hypervisor="mock", run_root=sys.argv[3], network=cfg,
             kernel_path="/boot/vmlinuz", initrd_path="/boot/initrd.img")
asyncio.run(sb.start())
"""


async def test_manager_killed_mid_setup_then_stop_removes_its_own(run_root: str) -> None:
    async with namespaces(1) as (host,):
        before = state_of(host)
        async with mock(run_root, bridge(host, "18096:80")) as other:
            kept = state_of(host)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                textwrap.dedent(KILLED_MID_SETUP),
                host.path,
                "vict1m",
                run_root,
            )
            assert await proc.wait() == -signal.SIGKILL
            links, rules, spaces = state_of(host)
            assert (
                '"virtc:vict1m"' in rules
                and "vc-vict1m" in spaces
                and len(links) == len(kept[0]) + 1
            )
            res = subprocess.run(
                [sys.executable, "-m", "virtcontainers.cli", "stop", "vict1m"],
                env={**os.environ, "VC_RUN_ROOT": run_root},
                capture_output=True,
                text=True,
                check=False,
            )
            assert res.returncode == 0, res.stderr
            assert state_of(host) == kept  # the other sandbox's pieces are untouched
            assert other.network is not None and other.network.address
        assert state_of(host) == before
