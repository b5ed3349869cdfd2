"""Network namespaces made by a test (never the host's): create, wire, run commands in.

Every name carries a random suffix; everything is removed when the test ends. The host's
own namespace is checked to be exactly as it was (`host_untouched`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS, netns


@dataclass
class Namespace:
    name: str

    @property
    def path(self) -> str:
        return os.path.join("/var/run/netns", self.name)

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> str:
        """Run a command in this namespace (`input` on its stdin); its stdout."""
        res = subprocess.run(
            ["nsenter", f"--net={self.path}", "--", *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} in {self.name}: exit {res.returncode}: {res.stderr}")
        return res.stdout

    def ok(self, *argv: str, timeout: float = 60) -> bool:
        return (
            subprocess.run(
                ["nsenter", f"--net={self.path}", "--", *argv],
                capture_output=True,
                timeout=timeout,
                check=False,
            ).returncode
            == 0
        )

    def popen(self, *argv: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["nsenter", f"--net={self.path}", "--", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def links(self) -> list[str]:
        """Interface names (pyroute2 runs in a thread of its own: callable from a loop)."""

        def names() -> list[str]:
            with NetNS(self.path) as ns:
                return sorted(str(link.get("IFLA_IFNAME")) for link in ns.get_links())

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(names).result()


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _create(made: list[Namespace], count: int, prefix: str) -> None:
    for _ in range(count):
        ns = Namespace(unique(prefix))
        netns.create(ns.name)
        made.append(ns)
        with NetNS(ns.path) as n:
            n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")


def _remove(made: list[Namespace]) -> None:
    for ns in made:
        with contextlib.suppress(OSError):
            netns.remove(ns.name)


@contextlib.asynccontextmanager
async def namespaces(count: int, prefix: str = "vctn") -> AsyncIterator[list[Namespace]]:
    """`count` fresh namespaces with loopback up, removed afterwards (pyroute2's blocking
    API runs an event loop of its own: it is called from worker threads)."""
    made: list[Namespace] = []
    try:
        await asyncio.to_thread(_create, made, count, prefix)
        yield made
    finally:
        await asyncio.to_thread(_remove, made)


async def veth(*args: Any, **kwargs: Any) -> None:
    """`make_veth` off the event loop."""
    await asyncio.to_thread(make_veth, *args, **kwargs)


def make_veth(
    a: Namespace,
    a_name: str,
    a_addrs: list[str],
    b: Namespace,
    b_name: str,
    b_addrs: list[str],
    *,
    mtu: int = 1500,
    b_gateway: str = "",
) -> None:
    """A veth pair `a_name` in `a` and `b_name` in `b`, with addresses ("ip/len"), up."""
    with NetNS(a.path) as na:
        fd = os.open(b.path, os.O_RDONLY)
        try:
            na.link("add", ifname=a_name, kind="veth", peer={"ifname": b_name, "net_ns_fd": fd})
        finally:
            os.close(fd)
    for ns, name, addrs in ((a, a_name, a_addrs), (b, b_name, b_addrs)):
        with NetNS(ns.path) as n:
            idx = n.link_lookup(ifname=name)[0]
            n.link("set", index=idx, mtu=mtu)
            for addr in addrs:
                ip, _, plen = addr.partition("/")
                if ":" in ip:  # no duplicate address detection: usable at once
                    n.addr("add", index=idx, address=ip, prefixlen=int(plen), flags=0x02)
                else:
                    n.addr("add", index=idx, address=ip, prefixlen=int(plen))
            n.link("set", index=idx, state="up")
            if ns is b and b_gateway:
                n.route("add", dst="0.0.0.0/0", gateway=b_gateway)


def host_snapshot() -> tuple[list[str], str, list[str]]:
    """The host namespace's interfaces, nftables ruleset and our namespaces (vc-*)."""
    with IPRoute() as ipr:
        links = sorted(
            f"{link.get('IFLA_IFNAME')} {link.get('IFLA_ADDRESS')} {link.get('IFLA_MASTER')}"
            for link in ipr.get_links()
        )
    rules = subprocess.run(
        ["nft", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    ours = sorted(n for n in os.listdir("/var/run/netns") if n.startswith("vc-"))
    return links, rules, ours


@pytest.fixture
def host_untouched() -> Iterator[None]:
    """Fails the test if the host's namespace gained or lost an interface or a rule."""
    before = host_snapshot()
    yield
    after = host_snapshot()
    assert after[0] == before[0], "host interfaces changed"
    assert after[1] == before[1], "host nftables ruleset changed"
    assert after[2] == before[2], f"sandbox namespaces left behind {before[2]} {after[2]}"
