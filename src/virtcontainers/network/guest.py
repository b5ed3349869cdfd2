"""Configure the guest's network from what the host read in the sandbox's namespace.

One agent request (NETWORK, carried out by the agent over rtnetlink) sets interfaces,
addresses, routes, neighbours, loopback and the hostname, and replaces /etc/hosts and
/etc/resolv.conf; `configure_guest_network` is the one entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import GuestNetwork, Interface

if TYPE_CHECKING:
    from ..agent import AgentClient

NIC_WAIT = 30.0
"""Longest wait for a (hotplugged) NIC to show up in the guest, in seconds."""


def hosts_file(net: GuestNetwork) -> str:
    """/etc/hosts: localhost, the guest's own addresses under its hostname, extra hosts."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if net.hostname:
        mine = [a.ip for i in net.interfaces for a in i.addresses] or ["127.0.1.1"]
        lines += [f"{ip}\t{net.hostname}" for ip in mine]
    lines += [f"{ip}\t{name}" for name, ip in net.extra_hosts.items()]
    return "\n".join(lines) + "\n"


def resolv_conf(net: GuestNetwork) -> str:
    lines = [f"nameserver {ip}" for ip in net.dns]
    if net.dns_search:
        lines.append("search " + " ".join(net.dns_search))
    return "\n".join(lines) + "\n" if lines else ""


async def configure_guest_network(
    agent: AgentClient, net: GuestNetwork, *, files: bool = True, wait: float = NIC_WAIT
) -> list[str]:
    """Bring the guest's interfaces up as `net` describes (found by MAC, waiting up to
    `wait` seconds for hotplugged ones), with routes, static neighbours, hostname and, with
    `files`, /etc/hosts, /etc/resolv.conf and /etc/hostname (a container binds all three).
    Returns the guest's interface names; `AgentRequestError` says what the guest refused."""
    if not files:
        return await agent.configure_network(net, wait=wait)
    return await agent.configure_network(
        net, hosts=hosts_file(net), resolv=resolv_conf(net), wait=wait
    )


def only(net: GuestNetwork, iface: Interface) -> GuestNetwork:
    """`net` narrowed to one interface and the routes and neighbours that use it."""
    return GuestNetwork(
        interfaces=[iface],
        routes=[r for r in net.routes if r.device == iface.name],
        neighbours=[n for n in net.neighbours if n.device == iface.name],
    )
