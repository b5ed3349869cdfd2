"""The real C agent's NETWORK request, run as an ordinary process inside a network namespace
and a UTS namespace the test makes (never the host's): what it configures is read back
through rtnetlink, and bad requests change nothing."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS
from test_agent_native import NativeAgent

from net_support import Namespace, _create, _remove
from virtcontainers.agent import AgentClient, AgentRequestError
from virtcontainers.agent import protocol as p
from virtcontainers.guest import initrd
from virtcontainers.network.guest import configure_guest_network
from virtcontainers.network.model import Address, GuestNetwork, Interface, Neighbour, Route

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build it"),
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and rtnetlink changes need root"),
]

MAC, PEER_MAC = "02:aa:00:00:00:01", "02:aa:00:00:00:02"
IFA_F_TENTATIVE = 0x40
NUD_PERMANENT = 0x80


class NetAgent(NativeAgent):
    """The agent inside namespace `ns` and a UTS namespace of its own, its /etc under
    `root/etc`."""

    def __init__(self, binary: str, workdir: str, ns: Namespace) -> None:
        self.ns = ns
        self.root = Path(workdir, "root")
        (self.root / "etc").mkdir(parents=True)
        wrap = ["nsenter", f"--net={ns.path}", "--", "unshare", "--uts", "--"]
        super().__init__(workdir, binary=binary, wrap=wrap, args=["--sysroot", str(self.root)])


@pytest.fixture(scope="module")
def binary() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vc-netagent-", dir="/tmp")
    try:
        initrd.compile_agent(os.path.join(d, "init"), d)
        yield os.path.join(d, "init")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(binary: str) -> Iterator[NetAgent]:
    made: list[Namespace] = []
    d = tempfile.mkdtemp(prefix="vc-netagent-", dir="/tmp")
    try:
        _create(made, 1, "vcan")
        a = NetAgent(binary, d, made[0])
        try:
            yield a
        finally:
            a.stop()
    finally:
        _remove(made)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def client(agent: NetAgent) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(agent.path, 5) as c:
        yield c
    assert agent.proc.poll() is None


def in_ns(ns: Namespace, fn: str, *args: object, **kw: object) -> object:
    """One pyroute2 call in `ns` (from a thread of its own: pyroute2 runs its own loop)."""
    out: list[object] = []

    def run() -> None:
        with NetNS(ns.path) as n:
            out.append(getattr(n, fn)(*args, **kw))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def add_veth(ns: Namespace, name: str = "vth0", mac: str = MAC) -> None:
    in_ns(ns, "link", "add", ifname=name, kind="veth", address=mac,
          peer={"ifname": f"{name}p", "address": PEER_MAC})  # fmt: skip


def index(ns: Namespace, name: str) -> int:
    found = in_ns(ns, "link_lookup", ifname=name)
    assert isinstance(found, list) and found, f"no {name} in {ns.name}"
    return int(found[0])


def link(ns: Namespace, name: str) -> object:
    return in_ns(ns, "get_links", index(ns, name))[0]  # type: ignore[index]


def addresses(ns: Namespace, name: str) -> dict[str, int]:
    """address/prefix -> IFA flags."""
    return {
        f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}": int(a.get("IFA_FLAGS") or a["flags"])
        for a in in_ns(ns, "get_addr", index=index(ns, name))  # type: ignore[attr-defined]
    }


def routes(ns: Namespace, family: int) -> set[tuple[str, str]]:
    return {
        (f"{r.get('RTA_DST') or 'default'}/{r['dst_len']}", str(r.get("RTA_GATEWAY") or ""))
        for r in in_ns(ns, "get_routes", family=family, table=254)  # type: ignore[attr-defined]
    }


def neighbours(ns: Namespace) -> dict[str, tuple[str, int]]:
    return {
        str(n.get("NDA_DST")): (str(n.get("NDA_LLADDR")), int(n["state"]))
        for n in in_ns(ns, "get_neighbours")  # type: ignore[attr-defined]
    }


NET = GuestNetwork(
    interfaces=[
        Interface("eth0", "veth", MAC.upper(), 1400,
                  [Address("10.1.0.2", 24), Address("fd00::2", 64)])
    ],
    routes=[
        Route(gateway="10.1.0.1", device="eth0"),
        Route("10.7.0.0/16", "10.1.0.9", 4, "eth0"),
        Route("fd07::/48", "", 6, "eth0"),
        Route(gateway="fd00::1", family=6, device="eth0"),
        Route("10.8.0.0/16", "10.1.0.1", 4, "other0"),  # not the guest's: left out
    ],
    neighbours=[
        Neighbour("10.1.0.9", "02:00:00:00:00:09", "eth0"),
        Neighbour("fd00::9", "02:00:00:00:00:0a", "eth0"),
    ],
    hostname="box",
    dns=["10.1.0.53"],
    dns_search=["a.test"],
    extra_hosts={"db": "10.1.0.7"},
)  # fmt: skip


async def test_one_request_configures_links_routes_neighbours_names_and_files(
    agent: NetAgent, client: AgentClient
) -> None:
    ns = agent.ns
    await asyncio.to_thread(add_veth, ns)
    in_ns(ns, "link", "set", index=index(ns, "lo"), state="down")
    names = await configure_guest_network(client, NET)
    assert names == ["vth0"]
    eth = link(ns, "vth0")
    assert eth.get("IFLA_MTU") == 1400 and eth["flags"] & 1  # type: ignore[attr-defined]
    assert link(ns, "lo")["flags"] & 1  # type: ignore[index]
    addrs = addresses(ns, "vth0")
    assert {"10.1.0.2/24", "fd00::2/64"} <= set(addrs)
    assert not addrs["fd00::2/64"] & IFA_F_TENTATIVE, "IPv6 address still doing DAD"
    assert {("default/0", "10.1.0.1"), ("10.7.0.0/16", "10.1.0.9")} <= routes(ns, socket.AF_INET)
    assert not any(d.startswith("10.8.") for d, _ in routes(ns, socket.AF_INET))
    assert {("default/0", "fd00::1"), ("fd07::/48", "")} <= routes(ns, socket.AF_INET6)
    neigh = neighbours(ns)
    assert neigh["10.1.0.9"] == ("02:00:00:00:00:09", NUD_PERMANENT)
    assert neigh["fd00::9"] == ("02:00:00:00:00:0a", NUD_PERMANENT)
    assert (await client.exec(["hostname"])).stdout == b"box\n"
    etc = agent.root / "etc"
    assert (etc / "hostname").read_text() == "box\n"
    assert (etc / "resolv.conf").read_text() == "nameserver 10.1.0.53\nsearch a.test\n"
    hosts = (etc / "hosts").read_text().splitlines()
    assert hosts[2:] == ["10.1.0.2\tbox", "fd00::2\tbox", "10.1.0.7\tdb"]
    # Again: every step replaces, so a second identical request succeeds.
    assert await configure_guest_network(client, NET) == ["vth0"]


async def test_a_hotplugged_nic_is_waited_for_and_a_missing_one_times_out(
    agent: NetAgent, client: AgentClient
) -> None:
    net = GuestNetwork(interfaces=[Interface("eth1", "veth", MAC, 1500, [])])
    with pytest.raises(AgentRequestError, match=f"no interface with MAC {MAC}") as e:
        await configure_guest_network(client, net, files=False, wait=0.3)
    assert e.value.errno == errno.ETIMEDOUT
    late = asyncio.get_running_loop().call_later(
        0.5, lambda: threading.Thread(target=add_veth, args=(agent.ns,)).start()
    )
    try:
        assert await configure_guest_network(client, net, files=False, wait=20) == ["vth0"]
    finally:
        late.cancel()
    assert link(agent.ns, "vth0")["flags"] & 1  # type: ignore[index]


def sub(**kw: str | int) -> bytes:
    """A nested payload (a link, route or neighbour) from tag names."""
    f = p.Fields()
    for k, v in kw.items():
        f.add(p.Tag[k.upper()], v)
    return f.encode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([(p.Tag.LINK, sub(mac="02:aa:00:00:00"))], "link 0: mac"),
        ([(p.Tag.LINK, sub(mac=MAC, mtu=67))], "link 0: mtu"),
        ([(p.Tag.LINK, sub(mac=MAC, address="10.1.0.2"))], "link 0: address 0"),
        ([(p.Tag.LINK, sub(mac=MAC, address="10.1.0.2/33"))], "link 0: address 0"),
        ([(p.Tag.LINK, sub(mac=MAC, address="fd00::zz/64"))], "link 0: address 0"),
        ([(p.Tag.LINK, sub(mac=MAC)), (p.Tag.LINK, sub(mac=MAC))], "link 1: mac given twice"),
        ([(p.Tag.ROUTE, sub(gateway="10.1.0.1", mac="02:bb:00:00:00:01"))], "route 0: mac names"),
        ([(p.Tag.ROUTE, sub(dest="10.0.0.0/8"))], "route 0: needs a gateway or a link"),
        ([(p.Tag.ROUTE, sub(dest="10.0.0.0/8", gateway="fd00::1"))], "route 0: no family"),
        ([(p.Tag.NEIGH, sub(dest="10.1.0.9", lladdr="02:00:00:00:00:09"))], "neighbour 0: mac"),
        ([(p.Tag.LINK, b"\x01\x00\xff")], "malformed"),
        ([(p.Tag.TIMEOUT_MS, p.MAX_WAIT_MS + 1)], "timeout_ms"),
        ([(p.Tag.HOSTNAME, "h" * 65)], "hostname"),
    ],
)  # fmt: skip
async def test_bad_requests_are_refused_before_anything_changes(
    agent: NetAgent, client: AgentClient, fields: list[tuple[int, bytes | str | int]], message: str
) -> None:
    await asyncio.to_thread(add_veth, agent.ns)
    req = p.fields(*fields, (p.Tag.HOSTNAME, "changed"), (p.Tag.HOSTS, "x"))
    with pytest.raises(AgentRequestError, match=message) as e:
        await client._call("network", p.MsgType.NETWORK, req)
    assert e.value.errno == errno.EINVAL
    assert (await client.exec(["hostname"])).stdout != b"changed\n"
    assert not (agent.root / "etc" / "hosts").exists()
    assert not link(agent.ns, "vth0")["flags"] & 1  # type: ignore[index]


async def test_what_the_kernel_refuses_names_the_step(agent: NetAgent, client: AgentClient) -> None:
    await asyncio.to_thread(add_veth, agent.ns)
    net = GuestNetwork(
        interfaces=[Interface("eth0", "veth", MAC, 1500, [Address("10.1.0.2", 24)])],
        routes=[Route(gateway="10.9.9.1", device="eth0")],
    )
    with pytest.raises(AgentRequestError, match=r"route 0 \(default via 10.9.9.1\)") as e:
        await configure_guest_network(client, net, files=False)
    assert e.value.errno == errno.ENETUNREACH
