"""Sandbox networking on real QEMU, with real traffic, inside namespaces the test makes.

Each test builds its own namespaces (the "outside" world, the sandbox's), links and rules;
traffic flows only between them and the guests; the host's namespace is checked untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS

from net_support import Namespace, namespaces, veth
from virtcontainers import Sandbox
from virtcontainers.guest import AGENT_READY_MARKER
from virtcontainers.network import NetworkConfig, PortMapping
from virtcontainers.types import Param

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check", "host_untouched")]

OUT4, IN4 = "192.168.77.1", "192.168.77.2"
OUT6, IN6 = "fd77::1", "fd77::2"
NEIGH_IP, NEIGH_MAC = "192.168.77.9", "02:00:00:77:00:09"
NEIGH6_IP = "fd77::9"
MTU = 2000


def mac_of(ns: Namespace, name: str) -> str:
    with NetNS(ns.path) as n:
        return str(n.get_links(n.link_lookup(ifname=name)[0])[0].get("IFLA_ADDRESS"))


def add_neigh(ns: Namespace) -> None:
    with NetNS(ns.path) as n:
        idx = n.link_lookup(ifname="eth0")[0]
        n.neigh("add", dst=NEIGH_IP, lladdr=NEIGH_MAC, ifindex=idx, state=0x80)
        n.neigh("add", dst=NEIGH6_IP, lladdr=NEIGH_MAC, ifindex=idx, state=0x80, family=10)


def serve(ns: Namespace, tmp: Path, port: int, text: str) -> Any:
    """busybox httpd in `ns` serving `text` as /index.html on `port`."""
    root = tmp / f"www{port}"
    root.mkdir()
    (root / "index.html").write_text(text)
    return ns.popen("busybox", "httpd", "-f", "-p", str(port), "-h", str(root))


async def guest_serve(sb: Sandbox, port: int, text: str) -> None:
    r = await sb.exec(
        f"mkdir -p /www{port} && echo {text} > /www{port}/index.html && "
        f"httpd -p {port} -h /www{port}"
    )
    assert r.ok, r.stderr


async def guest_get(sb: Sandbox, url: str) -> str:
    # (busybox 1.35's wget crashes with -T: the exec's timeout bounds it instead)
    r = await sb.exec(["wget", "-q", "-O", "-", url], timeout=30)
    assert r.ok, f"guest wget {url}: {r.stderr!r}"
    return r.stdout.decode().strip()


FETCH = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=10).read().decode())"


def get(ns: Namespace, url: str) -> str:
    """GET `url` from namespace `ns`."""
    return ns.run(sys.executable, "-c", FETCH, url).strip()


def get_fails(ns: Namespace, url: str) -> bool:
    return not ns.ok(sys.executable, "-c", FETCH, url)


async def second_endpoint_comes_and_goes(
    sb: Sandbox, out: Namespace, sbns: Namespace, served: str
) -> None:
    """A veth eth1 put into `sbns` is hot-added to `sb` (on tap1_vc), reaches the guest's
    server (answering `served`) from `out`, then is removed, its tap with it."""
    await veth(out, "vth1", ["192.168.78.1/24"], sbns, "eth1", ["192.168.78.2/24"])
    iface = await sb.add_network("eth1")
    assert iface.tap == "tap1_vc"
    assert get(out, "http://192.168.78.2/") == served
    await sb.remove_network("eth1")
    assert "tap1_vc" not in sbns.links()
    assert get_fails(out, "http://192.168.78.2/")


async def test_namespace_endpoint_tcfilter_guest_config_and_hotplug(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    async with namespaces(2) as (out, sbns):
        await veth(
            out,
            "vth0",
            [f"{OUT4}/24", f"{OUT6}/64"],
            sbns,
            "eth0",
            [f"{IN4}/24", f"{IN6}/64"],
            mtu=MTU,
            b_gateway=OUT4,
        )
        await asyncio.to_thread(add_neigh, sbns)
        mac = await asyncio.to_thread(mac_of, sbns, "eth0")
        server = serve(out, tmp_path, 8081, "from-outside")
        cfg = NetworkConfig(
            mode="ns",
            netns_path=sbns.path,
            hostname="sbx-net",
            dns=["192.168.77.53"],
            dns_search=["example.test"],
            extra_hosts={"outside.test": OUT4},
        )
        try:
            async with Sandbox(run_root=run_root, network=cfg, num_vcpus=2, memory_size=512) as sb:
                # The tap joined to the endpoint with tc in the sandbox's namespace.
                assert "tap0_vc" in sbns.links()
                filters = sbns.run("tc", "filter", "show", "dev", "eth0", "ingress")
                assert "mirred (Egress Redirect to device tap0_vc)" in filters
                # The tap only carries the guest's frames: the host speaks no IPv6 on it.
                assert sbns.run("ip", "-6", "addr", "show", "dev", "tap0_vc").strip() == ""

                # Guest side: the same MAC, MTU, addresses, routes, neighbour, names.
                dev = (await sb.exec(f"grep -l {mac} /sys/class/net/*/address")).stdout.decode()
                assert dev.count("/address") == 1, f"no single guest link has {mac}: {dev!r}"
                dev = dev.strip().split("/")[-2]
                state = await sb.exec(
                    f"cat /sys/class/net/{dev}/address /sys/class/net/{dev}/operstate"
                )
                assert state.stdout.decode().split() == [mac, "up"], state
                assert (await sb.exec(f"cat /sys/class/net/{dev}/mtu")).stdout.strip() == b"2000"
                queues = (await sb.exec(f"ls /sys/class/net/{dev}/queues")).stdout.split()
                assert sorted(queues) == [b"rx-0", b"rx-1", b"tx-0", b"tx-1"]
                addrs = (await sb.exec(f"ip addr show dev {dev}")).stdout.decode()
                assert f"{IN4}/24" in addrs and f"{IN6}/64" in addrs
                routes = (await sb.exec("ip route")).stdout.decode()
                assert f"default via {OUT4}" in routes
                assert NEIGH_MAC in (await sb.exec("arp -n")).stdout.decode()
                # Both static neighbours are read from the namespace and set in the guest.
                assert sb.network is not None
                found = {(nb.ip, nb.family) for nb in sb.network.guest().neighbours}
                assert found == {(NEIGH_IP, 4), (NEIGH6_IP, 6)}
                neigh6 = (await sb.exec("ip -6 neigh show")).stdout.decode()
                assert f"{NEIGH6_IP} dev {dev} lladdr {NEIGH_MAC}" in neigh6, neigh6
                assert "PERMANENT" in neigh6
                assert (await sb.exec("hostname")).stdout.strip() == b"sbx-net"
                hosts = (await sb.read_file("/etc/hosts")).decode()
                assert f"{OUT4}\toutside.test" in hosts and f"{IN4}\tsbx-net" in hosts
                resolv = (await sb.read_file("/etc/resolv.conf")).decode()
                assert resolv == "nameserver 192.168.77.53\nsearch example.test\n"
                assert (await sb.exec("ip link show lo")).stdout.count(b"UP") >= 1

                # TCP both ways, over IPv4 and IPv6, by name (/etc/hosts).
                await guest_serve(sb, 80, "from-guest")
                assert get(out, f"http://{IN4}/") == "from-guest"
                assert get(out, f"http://[{IN6}]/") == "from-guest"
                assert await guest_get(sb, "http://outside.test:8081/") == "from-outside"
                assert await guest_get(sb, f"http://[{OUT6}]:8081/") == "from-outside"

                # MTU: a 2000-byte packet with DF set crosses; one byte more is refused.
                out.run("ping", "-c", "2", "-W", "5", "-M", "do", "-s", str(MTU - 28), IN4)
                assert not out.ok(
                    "ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(MTU - 27), IN4
                )
                out.run("ping", "-6", "-c", "2", "-W", "5", "-M", "do", "-s", str(MTU - 48), IN6)

                # Hotplug: a second endpoint put into the namespace carries traffic.
                await second_endpoint_comes_and_goes(sb, out, sbns, "from-guest")
                # The first endpoint still works.
                assert get(out, f"http://{IN4}/") == "from-guest"
            # Stopped: our tap and the endpoint's qdisc are gone, the endpoint stays.
            assert sbns.links() == ["eth0", "eth1", "lo"]
            assert "ingress" not in sbns.run("tc", "qdisc", "show", "dev", "eth0")
        finally:
            server.kill()
            server.wait()


def _ip_of(sb: Sandbox) -> str:
    assert sb.network is not None
    return str(sb.network.summary()["ip"])


async def test_bridge_nat_published_ports_and_two_sandboxes(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    """`--net bridge` with the bridge, NAT and ports in a test namespace ("the host") that
    is linked to a second one ("the outside world") which has no route back to sandboxes."""
    async with namespaces(2) as (host, world):
        await veth(host, "up0", ["203.0.113.1/24"], world, "wan0", ["203.0.113.2/24"])
        server = serve(world, tmp_path, 8090, "outside-world")
        web = NetworkConfig(mode="bridge", host_netns=host.path, ports=[PortMapping(8080, 80)])
        plain = NetworkConfig(mode="bridge", host_netns=host.path)
        one = Sandbox(run_root=run_root, network=web, memory_size=256)
        two = Sandbox(run_root=run_root, network=plain, memory_size=256)
        try:
            await asyncio.gather(one.start(), two.start())
            ip1, ip2 = _ip_of(one), _ip_of(two)
            # The veths' ends on the bridge carry only the guests' frames: no IPv6 of their
            # own (the bridge itself has the gateway's addresses).
            assert one.network is not None and one.network.host_veth in host.links()
            assert host.run("ip", "-6", "addr", "show", "dev", one.network.host_veth).strip() == ""
            assert ip1.startswith("10.213.0.") and ip2.startswith("10.213.0.") and ip1 != ip2
            assert Sandbox.info(one.id, run_root).ip == ip1
            await guest_serve(one, 80, "g1")

            # The published port, on the host's loopback and its other address, from the
            # host itself, from outside, and from the other sandbox (hairpin).
            assert get(host, "http://127.0.0.1:8080/") == "g1"
            assert get(host, "http://203.0.113.1:8080/") == "g1"
            assert get(world, "http://203.0.113.1:8080/") == "g1"
            assert await guest_get(two, "http://203.0.113.1:8080/") == "g1"
            # Sandboxes on one bridge reach each other; outbound NAT reaches the world.
            assert await guest_get(two, f"http://{ip1}/") == "g1"
            assert await guest_get(one, "http://203.0.113.2:8090/") == "outside-world"
            assert await guest_get(two, "http://203.0.113.2:8090/") == "outside-world"
            # The guest's DNS comes from the host's resolv.conf; its name from the id.
            assert (await one.read_file("/etc/resolv.conf")).decode().startswith("nameserver")
            assert (await one.exec("hostname")).stdout.strip() == one.id.encode()
            # Each sandbox's rules carry its id.
            rules = host.run("nft", "list", "table", "ip", "virtc")
            assert f'"virtc:{one.id}"' in rules and f'"virtc:{two.id}"' in rules
            await one.stop()
            rules = host.run("nft", "list", "table", "ip", "virtc")
            assert one.id not in rules and f'"virtc:{two.id}"' in rules
            assert await guest_get(two, "http://203.0.113.2:8090/") == "outside-world"
        finally:
            await asyncio.gather(one.stop(), two.stop())
            server.kill()
            server.wait()
        # Nothing is left in the "host": no bridge, veth, rule or sandbox namespace.
        assert host.links() == ["lo", "up0"]
        assert host.run("nft", "list", "ruleset").strip() == ""


async def test_a_bridge_guest_is_sent_none_of_the_hosts_own_link_chatter(run_root: str) -> None:
    """A new bridge sends no duplicate address detection or router solicitation (it is the
    gateway), and its multicast listener reports (MLDv2, IGMPv3: read by routers and
    snooping switches only) are not redirected to the guest: the old code queued 5-7 such
    frames for each guest until its link came up, handled by its vCPU in the start's NETWORK
    request. ARP, neighbour discovery and traffic still reach it."""
    async with namespaces(1) as (host,):
        net = NetworkConfig(mode="bridge", host_netns=host.path)
        sb = Sandbox(run_root=run_root, network=net, memory_size=256)
        try:
            await sb.start()
            # The bridge's delayed frames (its address checks, the reports' repetitions)
            # come within ~2 s of its creation.
            await asyncio.sleep(3)
            rx = "cat /sys/class/net/eth0/statistics/rx_packets"
            before = await sb.exec(rx)
            assert before.ok and before.stdout.strip() == b"0", before.stdout
            assert sb.network is not None
            for ping in (
                f"ping -c 1 -W 5 {sb.network.gateway}",
                f"ping -c 1 -W 5 {sb.network.gateway6}",
            ):
                r = await sb.exec(ping, timeout=30)
                assert r.ok, (ping, r.stdout, r.stderr)
            assert int((await sb.exec(rx)).stdout) >= 2  # the replies (and the resolutions')
        finally:
            await sb.stop()
        assert host.links() == ["lo"]


def virtc(ns: Namespace, run_root: str, *args: str) -> str:
    """`virtc ARGS` run inside namespace `ns`; its stdout."""
    env = {**os.environ, "VC_RUN_ROOT": run_root, "COLUMNS": "200"}
    res = subprocess.run(
        ["nsenter", f"--net={ns.path}", "--", sys.executable, "-m", "virtcontainers.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, f"virtc {args}: {res.stderr}"
    return res.stdout


async def test_cli_user_and_bridge_networks_with_published_ports(run_root: str) -> None:
    """`virtc create --net user|bridge -p`, run inside a test namespace: the ports reach
    busybox httpd in the guests; inspect and list show addresses and ports."""
    async with namespaces(1) as (host,):
        ids = []
        try:
            for net, port in (("user", "127.0.0.1:18201:80"), ("bridge", "18202:80")):
                sid = f"clinet{net}"
                ids.append(sid)
                await asyncio.to_thread(
                    virtc, host, run_root, "create", "--name", sid, "--net", net, "-p", port,
                    "--memory", "256M",
                )  # fmt: skip
                # Started by another invocation: the NIC and the guest's config still come.
                await asyncio.to_thread(virtc, host, run_root, "start", sid)
                await asyncio.to_thread(
                    virtc,
                    host,
                    run_root,
                    "exec",
                    sid,
                    "--",
                    "sh",
                    "-c",
                    f"mkdir /www && echo {net}-guest > /www/index.html && httpd -p 80 -h /www",
                )
            assert get(host, "http://127.0.0.1:18201/") == "user-guest"
            assert get(host, "http://127.0.0.1:18202/") == "bridge-guest"
            user = json.loads(await asyncio.to_thread(virtc, host, run_root, "inspect", ids[0]))
            assert user["network"]["ip"] == "10.0.2.15"
            assert user["network"]["ports"] == ["127.0.0.1:18201:80/tcp"]
            br = json.loads(await asyncio.to_thread(virtc, host, run_root, "inspect", ids[1]))
            assert br["network"]["ip"].startswith("10.213.0.")
            assert br["network"]["ports"] == ["18202:80/tcp"]
            listing = await asyncio.to_thread(virtc, host, run_root, "list")
            assert "10.0.2.15" in listing and br["network"]["ip"] in listing
        finally:
            for sid in ids:
                await asyncio.to_thread(virtc, host, run_root, "stop", sid)
        assert host.links() == ["lo"]
        assert host.run("nft", "list", "ruleset").strip() == ""


async def test_macvtap_model(run_root: str, guest_assets: Any, tmp_path: Path) -> None:
    """Kata's macvtap model: QEMU gets the macvtap's queues as fds (at start, and passed over
    QMP for a hotplugged endpoint); the guest takes the endpoint's MAC; removing or stopping
    gives the endpoint its MAC back."""
    async with namespaces(2) as (out, sbns):
        await veth(out, "vth0", [f"{OUT4}/24"], sbns, "eth0", [f"{IN4}/24"], b_gateway=OUT4)
        mac = await asyncio.to_thread(mac_of, sbns, "eth0")
        server = serve(out, tmp_path, 8081, "from-outside")
        cfg = NetworkConfig(mode="ns", netns_path=sbns.path, model="macvtap", dns=[])
        try:
            async with Sandbox(run_root=run_root, network=cfg, num_vcpus=2, memory_size=256) as sb:
                assert "mvt0_vc" in sbns.links()
                assert await asyncio.to_thread(mac_of, sbns, "mvt0_vc") == mac
                assert await asyncio.to_thread(mac_of, sbns, "eth0") != mac
                r = await sb.exec(f"grep -l {mac} /sys/class/net/*/address")
                assert r.ok and b"/sys/class/net/eth" in r.stdout
                await guest_serve(sb, 80, "via-macvtap")
                assert get(out, f"http://{IN4}/") == "via-macvtap"
                assert await guest_get(sb, f"http://{OUT4}:8081/") == "from-outside"

                # Hotplug: a second endpoint, its two queues passed to the running QEMU.
                await veth(out, "vth1", ["192.168.78.1/24"], sbns, "eth1", ["192.168.78.2/24"])
                mac1 = await asyncio.to_thread(mac_of, sbns, "eth1")
                iface = await sb.add_network("eth1")
                assert iface.tap == "mvt1_vc" and "mvt1_vc" in sbns.links()
                r = await sb.exec(f"grep -l {mac1} /sys/class/net/*/address")
                assert r.ok, r
                dev = r.stdout.decode().strip().split("/")[-2]
                queues = (await sb.exec(f"ls /sys/class/net/{dev}/queues")).stdout.split()
                assert sorted(queues) == [b"rx-0", b"rx-1", b"tx-0", b"tx-1"]
                assert get(out, "http://192.168.78.2/") == "via-macvtap"
                await sb.remove_network("eth1")
                assert "mvt1_vc" not in sbns.links()
                assert await asyncio.to_thread(mac_of, sbns, "eth1") == mac1
                assert get_fails(out, "http://192.168.78.2/")
                assert get(out, f"http://{IN4}/") == "via-macvtap"
            # The endpoints are as they were: MAC, address and default route.
            assert sbns.links() == ["eth0", "eth1", "lo"]
            assert "192.168.78.2/24" in sbns.run("ip", "-o", "addr", "show", "dev", "eth1")
            assert await asyncio.to_thread(mac_of, sbns, "eth0") == mac
            assert f"{IN4}/24" in sbns.run("ip", "-o", "addr", "show", "dev", "eth0")
            assert f"default via {OUT4}" in sbns.run("ip", "route")
        finally:
            server.kill()
            server.wait()


async def link_to_world(host: Namespace, world: Namespace) -> None:
    """A dual-stack veth from the test's "host" (`up0`: 203.0.113.1, 2001:db8:77::1) to its
    "world" (`wan0`: .2 and ::2), documentation prefixes both."""
    await veth(
        host,
        "up0",
        ["203.0.113.1/24", "2001:db8:77::1/64"],
        world,
        "wan0",
        ["203.0.113.2/24", "2001:db8:77::2/64"],
    )


DUAL_STACK_SERVERS = """
import http.server, os, socket, threading
os.chdir("/tmp")
with open("index.html", "w") as f:
    f.write("g1")

def echo():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 53))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data.upper(), peer)

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

threading.Thread(target=echo, daemon=True).start()
Server(("::", 80), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

UDP_ASK = """
import socket, sys
host, port, text, tries = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
for _ in range(tries):  # datagrams may be lost while the guest is busy
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(text, (host, port))
        try:
            print(s.recvfrom(2048)[0].decode())
            break
        except (TimeoutError, ConnectionRefusedError):
            continue
"""


def udp_ask(ns: Namespace, host: str, port: int, text: str, tries: int = 10) -> str:
    """A datagram to `host`:`port` from namespace `ns`, sent again (up to `tries` times) until
    an answer comes within 2 s; the answer ("" if none came)."""
    return ns.run(sys.executable, "-c", UDP_ASK, host, str(port), text, str(tries)).strip()


@pytest.mark.timeout(900)
async def test_ipv6_hairpin_and_udp_over_ipv6_through_published_ports(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    """Two sandboxes on one dual-stack bridge in a test "host" linked to a "world": UDP over
    IPv6 through a published port (from the world to the host's IPv6 address, and from the
    host's ::1), over IPv4 too; the other sandbox reaches the first's published TCP port by
    the host's IPv6 address (IPv6 hairpin) and the first directly by its IPv6 address."""
    from virtcontainers.images import ImageStore
    from virtcontainers.images.build import debian_image

    store = ImageStore(str(tmp_path / "images"))
    (image,) = await asyncio.to_thread(store.import_archive, debian_image())
    async with namespaces(2) as (host, world):
        await link_to_world(host, world)
        ports = [PortMapping(8080, 80), PortMapping.parse("5353:53/udp")]
        one = Sandbox(
            run_root=run_root,
            network=NetworkConfig(mode="bridge", host_netns=host.path, ports=ports),
            image=image.name,
            image_store=store.root,
            memory_size=512,
        )
        two = Sandbox(
            run_root=run_root,
            network=NetworkConfig(mode="bridge", host_netns=host.path),
            memory_size=256,
        )
        try:
            await asyncio.gather(one.start(), two.start())
            ctr = await one.create_container(["python3", "-c", DUAL_STACK_SERVERS])
            await ctr.start(detach=True)
            assert one.network is not None and two.network is not None
            ip6 = one.network.summary()["ip6"]
            assert ip6 and ip6 != two.network.summary()["ip6"]
            # Both servers are up once the TCP one answers on the guest's own address.
            for _ in range(60):
                up = await two.exec(["wget", "-q", "-O", "-", f"http://[{ip6}]/"], timeout=10)
                if up.ok:
                    break
                await asyncio.sleep(1)

            # UDP through the published port: over IPv6 from the world and from ::1 on the
            # host itself, over IPv4 from the world.
            assert udp_ask(world, "2001:db8:77::1", 5353, "over-v6") == "OVER-V6"
            assert udp_ask(host, "::1", 5353, "loop-v6") == "LOOP-V6"
            assert udp_ask(world, "203.0.113.1", 5353, "over-v4") == "OVER-V4"
            # Nothing answers on a port that is not published for UDP.
            assert udp_ask(world, "2001:db8:77::1", 8080, "tcp-only", tries=2) == ""
            # IPv6 hairpin: the other sandbox by the host's IPv6 address and the published
            # port; and the first sandbox directly by its IPv6 address on the bridge.
            assert await guest_get(two, "http://[2001:db8:77::1]:8080/") == "g1"
            assert await guest_get(two, f"http://[{ip6}]/") == "g1"
            assert get(world, "http://[2001:db8:77::1]:8080/") == "g1"
        finally:
            await asyncio.gather(one.stop(), two.stop())
        assert host.links() == ["lo", "up0"]
        assert host.run("nft", "list", "ruleset").strip() == ""


async def test_background_drivers_wait_for_the_starts_network_request(run_root: str) -> None:
    """The drivers a start does not need (the SCSI controller's with its bus scan,
    filesystems) begin loading in the guest only once the start's NETWORK request is
    answered: under TCG their loading (and the kernel's work for it, not niced) held the one
    vCPU while that request waited. They still all load. The agent's debug log on the
    console stamps each (guest clock, ms): a load's start is its end less its time."""
    debug = [Param("vc.debug", "1")]
    async with Sandbox(
        "bgload", run_root=run_root, network=NetworkConfig(mode="none"), kernel_params=debug
    ) as sb:
        path = Path(sb.hypervisor.console_log)  # type: ignore[attr-defined]
        for _ in range(600):
            log = path.read_text(errors="replace")
            if "all modules loaded" in log:
                break
            await asyncio.sleep(0.1)
    assert "all modules loaded" in log, log[-3000:]
    after_ready = log[log.index(AGENT_READY_MARKER) :]
    net = re.search(r"network id=\d+: \d+ links in (\d+) ms \(from (\d+):", after_ready)
    assert net is not None, after_ready[-3000:]
    answered = int(net[2]) + int(net[1])
    # The request's own CPU time is logged too: at most its wall time, loopback's within it.
    cpu = re.search(r"the agent's CPU (\d+) us: loopback (\d+), links up", after_ready)
    assert cpu is not None, after_ready[-3000:]
    assert 0 < int(cpu[2]) <= int(cpu[1]) <= (int(net[1]) + 1) * 1000, cpu[0]
    first = re.search(r"vc-agent: loaded (\S+) in (\d+) ms at (\d+)", after_ready)
    assert first is not None, after_ready[-3000:]
    started = int(first[3]) - int(first[2])
    assert started >= answered, (
        f"{first[1]} loading from {started} ms, NETWORK answered at {answered}"
    )
