"""The bridge's rules on a host whose firewall drops forwarded traffic (as Docker sets it
up), with nftables and with the iptables fallback (nft made unavailable), each inside test
namespaces: "the host" with the bridge, "the world" it is linked to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_network import get, guest_get, guest_serve, serve

from net_support import namespaces, veth
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError
from virtcontainers.network import NetworkConfig, PortMapping, nat

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
        await veth(host, "up0", ["203.0.113.1/24"], world, "wan0", ["203.0.113.2/24"])
        host.run("iptables", "-P", "FORWARD", "DROP")
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
                # Routed both ways through the dropping FORWARD chain: outbound NAT and the
                # published port from outside; the host's own loopback too.
                await guest_serve(sb, 80, "g1")
                assert await guest_get(sb, "http://203.0.113.2:8090/") == "outside-world"
                assert get(world, "http://203.0.113.1:8080/") == "g1"
                assert get(host, "http://127.0.0.1:8080/") == "g1"
        finally:
            server.kill()
            server.wait()
        # Exactly this sandbox's rules are gone: the other's and the policy remain.
        for table in ("nat", "filter"):
            tagged = [r for r in host.run("iptables", "-t", table, "-S").splitlines() if "--" in r]
            assert len(tagged) == 1 and OTHER in tagged[0], tagged
        assert "-P FORWARD DROP" in host.run("iptables", "-S", "FORWARD")
        assert not host.ok("nft", "list", "table", "ip", "virtc")
        assert host.links() == ["lo", "up0"]
