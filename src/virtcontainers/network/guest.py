"""Configure the guest's network from what the host read in the sandbox's namespace.

For now this runs the initrd's busybox (`ip`, `arp`, `hostname`) through the agent's exec,
one shell script per call, and writes /etc/hosts, /etc/resolv.conf and /etc/hostname with
the agent's file request. `configure_guest_network` is the one entry point, so a dedicated
agent request can replace the script without touching its callers.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from ..errors import AgentError
from .model import GuestNetwork, Interface

if TYPE_CHECKING:
    from ..agent import AgentClient

NIC_WAIT = 30.0
"""Longest wait for a (hotplugged) NIC to show up in the guest, in seconds."""

_FIND = """\
find_nic() {
  i=0
  while :; do
    for d in /sys/class/net/*; do
      read -r a < "$d/address" 2>/dev/null && [ "$a" = "$1" ] && { echo "${d##*/}"; return 0; }
    done
    i=$((i + 1)); [ "$i" -gt "$2" ] && { echo "no network interface with MAC $1" >&2; return 1; }
    sleep 0.1
  done
}
set -e
"""


def guest_script(net: GuestNetwork, *, wait: float = NIC_WAIT) -> str:
    """The busybox shell script that sets the guest up as `net` says."""
    q = shlex.quote
    lines = [_FIND, "ip link set dev lo up"]
    if net.hostname:
        lines.append(f"hostname {q(net.hostname)}")
    devs: dict[str, str] = {}
    for n, iface in enumerate(net.interfaces):
        var = f"dev{n}"
        devs[iface.name] = f'"${var}"'
        d = devs[iface.name]
        lines += [
            f"{var}=$(find_nic {q(iface.mac.lower())} {int(wait * 10)})",
            # The host already made sure the addresses are unique on the link.
            f"echo 0 > /proc/sys/net/ipv6/conf/${var}/accept_dad",
            f"ip link set dev {d} mtu {iface.mtu} up",
        ]
        for a in iface.addresses:
            lines.append(f"ip -{a.family} addr add {q(str(a))} dev {d}")
    for r in net.routes:
        if r.device and r.device not in devs:
            continue
        cmd = f"ip -{r.family} route replace {q(r.dest or 'default')}"
        if r.gateway:
            cmd += f" via {q(r.gateway)}"
        if r.device:
            cmd += f" dev {devs[r.device]}"
        lines.append(cmd)
    for nb in net.neighbours:
        if nb.device in devs and ":" not in nb.ip:  # busybox sets ARP (IPv4) entries only
            lines.append(f"arp -i {devs[nb.device]} -s {q(nb.ip)} {q(nb.mac)}")
    return "\n".join(lines) + "\n"


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
) -> None:
    """Bring the guest's interfaces up as `net` describes (found by MAC, waiting up to
    `wait` seconds for hotplugged ones), with routes, static neighbours, hostname and, with
    `files`, /etc/hosts, /etc/resolv.conf and /etc/hostname (a container binds all three).
    `AgentError` says what the guest refused."""
    res = await agent.exec(["/bin/sh", "-c", guest_script(net, wait=wait)], timeout=wait + 30)
    if not res.ok:
        raise AgentError(
            "configuring the guest network failed "
            f"(exit {res.exit_code}): {res.stderr.decode(errors='replace').strip()}"
        )
    if files:
        await agent.write_file("/etc/hosts", hosts_file(net))
        await agent.write_file("/etc/resolv.conf", resolv_conf(net))
        await agent.write_file("/etc/hostname", f"{net.hostname}\n" if net.hostname else "")


def only(net: GuestNetwork, iface: Interface) -> GuestNetwork:
    """`net` narrowed to one interface and the routes and neighbours that use it."""
    return GuestNetwork(
        interfaces=[iface],
        routes=[r for r in net.routes if r.device == iface.name],
        neighbours=[n for n in net.neighbours if n.device == iface.name],
    )
