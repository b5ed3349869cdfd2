"""The bridge's rules on a host whose firewall drops forwarded traffic (as Docker sets it
up), with nftables and with the iptables fallback (nft made unavailable), each inside test
namespaces: "the host" with the bridge, "the world" it is linked to."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from test_network import get, get_fails, guest_get, guest_serve, link_to_world, serve

from net_support import namespaces
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError
from virtcontainers.network import NetworkConfig, PortMapping, nat
from virtcontainers.network.netlink import loopback_return6

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check", "host_untouched")]

OTHER = "virtc:someone-else"
"""Another sandbox's rules, which must neither be touched nor have their port taken."""


@pytest.mark.parametrize("backend", ["nft", "iptables"])
async def test_forward_drop_policy_and_iptables_fallback(
    backend: str, run_root: str, guest_assets: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    if backend == "iptables":
        monkeypatch.setattr(nat, "nft_available", lambda: False)
    async with namespaces(2) as (host, world):
        await link_to_world(host, world)
        host.run("iptables", "-P", "FORWARD", "DROP")
        host.run("ip6tables", "-P", "FORWARD", "DROP")
        decoys = [
            ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8081"],
            ["-t", "filter", "-A", "FORWARD", "-i", "nowhere0"],
        ]
        for d in decoys:
            host.run("iptables", *d, "-m", "comment", "--comment", OTHER, "-j", "RETURN")
        server = serve(world, tmp_path, 8090, "outside-world")
        try:
            # A port another sandbox's iptables rule publishes is refused before anything.
            taken = NetworkConfig(
                mode="bridge", host_netns=host.path, ports=[PortMapping(8081, 80)]
            )
            refused = f"8081/tcp is already published by sandbox {OTHER[6:]}"
            refusing = Sandbox(run_root=run_root, network=taken, memory_size=256)
            try:
                with pytest.raises(ConfigError, match=refused):
                    await refusing.start()
            finally:
                await refusing.stop()
            assert host.links() == ["lo", "up0"]

            cfg = NetworkConfig(mode="bridge", host_netns=host.path, ports=[PortMapping(8080, 80)])
            async with Sandbox(run_root=run_root, network=cfg, memory_size=256) as sb:
                mine = f"virtc:{sb.id}"
                nat_rules = host.run("iptables", "-t", "nat", "-S")
                nft_table = host.ok("nft", "list", "table", "ip", "virtc")
                if backend == "iptables":
                    assert mine in nat_rules and "DNAT" in nat_rules and not nft_table
                else:
                    assert mine not in nat_rules and nft_table
                forward = host.run("iptables", "-S", "FORWARD")
                assert forward.count(mine) == 2 and "-P FORWARD DROP" in forward
                forward6 = host.run("ip6tables", "-S", "FORWARD")
                assert forward6.count(mine) == 2 and "-P FORWARD DROP" in forward6
                nat6 = host.run("ip6tables", "-t", "nat", "-S")
                assert (mine in nat6) == (backend == "iptables")
                # Routed both ways through the dropping FORWARD chain: outbound NAT and the
                # published port from outside; the host's own loopback too.
                await guest_serve(sb, 80, "g1")
                assert await guest_get(sb, "http://203.0.113.2:8090/") == "outside-world"
                assert get(world, "http://203.0.113.1:8080/") == "g1"
                assert get(host, "http://127.0.0.1:8080/") == "g1"
                # The same over IPv6 (NAT66 and the published port from outside).
                assert await guest_get(sb, "http://[2001:db8:77::2]:8090/") == "outside-world"
                assert get(world, "http://[2001:db8:77::1]:8080/") == "g1"
        finally:
            server.kill()
            server.wait()
        assert mine not in host.run("ip6tables", "-S") + host.run("ip6tables", "-t", "nat", "-S")
        # Exactly this sandbox's rules are gone: the other's and the policy remain.
        for table in ("nat", "filter"):
            tagged = [r for r in host.run("iptables", "-t", table, "-S").splitlines() if "--" in r]
            assert len(tagged) == 1 and OTHER in tagged[0], tagged
        assert "-P FORWARD DROP" in host.run("iptables", "-S", "FORWARD")
        assert not host.ok("nft", "list", "table", "ip", "virtc")
        assert host.links() == ["lo", "up0"]


HOST_FIREWALL = """
table inet hostfw {
	chain input {
		type filter hook input priority filter; policy drop;
		iifname "lo" accept
		ct state established,related accept
		icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		iifname "nowhere0" accept comment "virtc:someone-else"
	}
}
"""
"""A pure nftables host firewall (no iptables): forward and input drop by policy; loopback
is trusted and neighbour discovery let in, as firewalls commonly do."""


async def test_ipv6_bridge_nat66_published_ports_under_pure_nftables_firewall(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    """`--net bridge` over IPv6 in a "host" namespace with a pure nftables firewall that
    drops forwarded traffic: the guest gets a ULA address and a default route; NAT66 reaches
    a "world" namespace that has no route back; a published port answers over IPv6 from the
    world, from the host's own IPv6 address and from ::1; the loopback-return path gives a
    guest no way around the host's input policy; the firewall is left exactly as it was."""
    async with namespaces(2) as (host, world):
        await link_to_world(host, world)
        host.run("nft", "-f", "-", input=HOST_FIREWALL)
        before = host.run("nft", "list", "table", "inet", "hostfw")
        world_server = serve(world, tmp_path, 8090, "outside-world")
        host_server = serve(host, tmp_path, 9099, "host-private")
        cfg = NetworkConfig(
            mode="bridge",
            host_netns=host.path,
            ports=[PortMapping(8080, 80), PortMapping.parse("[::1]:8081:80")],
        )
        try:
            async with Sandbox(run_root=run_root, network=cfg, memory_size=256) as sb:
                assert sb.network is not None
                ip6, gw6 = sb.network.summary()["ip6"], sb.network.summary()["gateway6"]
                assert ip6.startswith("fd") and gw6.startswith("fd")
                assert ip6 in (await sb.exec("ip -6 addr")).stdout.decode()
                assert f"default via {gw6}" in (await sb.exec("ip -6 route")).stdout.decode()
                # Our accept rules sit at the head of the host's forward chain, tagged.
                forward = host.run("nft", "list", "chain", "inet", "hostfw", "forward")
                assert forward.count(f'"virtc:{sb.id}"') == 6, forward

                await guest_serve(sb, 80, "g1")
                # NAT66 and NAT44 out through the dropping forward chain.
                assert await guest_get(sb, "http://[2001:db8:77::2]:8090/") == "outside-world"
                assert await guest_get(sb, "http://203.0.113.2:8090/") == "outside-world"
                # The published port over IPv6: from the world, the host's address, ::1.
                assert get(world, "http://[2001:db8:77::1]:8080/") == "g1"
                assert get(host, "http://[2001:db8:77::1]:8080/") == "g1"
                assert get(host, "http://[::1]:8080/") == "g1"
                assert get(host, "http://[::1]:8081/") == "g1"
                assert get(world, "http://203.0.113.1:8080/") == "g1"
                assert get(host, "http://127.0.0.1:8080/") == "g1"
                # [::1]:8081 is published on ::1 only.
                assert get_fails(world, "http://[2001:db8:77::1]:8081/")
                # The host's input policy holds for the guest, also by the loopback-return
                # address (whose answers are handed to lo, which the firewall trusts).
                back = str(loopback_return6(ipaddress.IPv6Network(gw6 + "/64", strict=False)))
                for target in (f"[{gw6}]", f"[{back}]"):
                    url = f"http://{target}:9099/"
                    r = await sb.exec(["wget", "-q", "-O", "-", url], timeout=5)
                    assert r.timed_out and b"host-private" not in r.stdout, target
        finally:
            for server in (world_server, host_server):
                server.kill()
                server.wait()
        # Exactly our rules are gone: the host's firewall is as it was, our tables too.
        assert host.run("nft", "list", "table", "inet", "hostfw") == before
        assert host.run("nft", "list", "ruleset").count("table") == 1
        assert host.links() == ["lo", "up0"]
