"""Outbound NAT (IPv4 and IPv6) and published ports with nftables (iptables where nft is
absent), each rule tagged with its sandbox.

Rules live in our tables (`ip virtc`, `ip6 virtc`, `netdev virtc`) of the bridge's namespace,
every rule with the comment `virtc:<sandbox id>`, so a sandbox's cleanup deletes exactly its
own (and a table once it is empty). libnftables (or the `nft` program) applies each change as
one transaction. Without either, the same NAT goes into iptables' and ip6tables' nat tables
(`iptables-restore --noflush`), with the same comments.

A firewall whose forward chain drops would drop the sandbox's routed traffic whatever our
tables say: a packet must pass every base chain on the forward hook, and a drop in any of them
is final. So the sandbox's addresses get tagged accept rules inserted at the head of the
host's own forward chains that may drop: iptables' FORWARD (Docker sets its policy to DROP),
through iptables, and any other nftables base chain on the forward hook (a pure nftables
firewall), through nft. Removal deletes exactly the rules carrying the sandbox's tag.

Published ports are DNAT rules in both the prerouting chain (traffic from outside) and the
output chain (connections made on this host, to any of its addresses). A port given without
an address is published on IPv4 and IPv6. Connections arriving by loopback, or from another
sandbox on the bridge (hairpin), are masqueraded so the guest's answer comes back the same
way. No userland proxy is involved:
- 127.0.0.1: route_localnet on the bridge lets the answer, un-NATed to 127.0.0.1, be
  routed in.
- ::1: IPv6 has no route_localnet: an answer un-NATed to ::1 is dropped unless it arrives
  on the loopback interface. So connections from ::1 are masqueraded to the bridge's
  loopback-return address (netlink.loopback_return6), and an ingress rule on the sandbox's
  bridge port hands TCP/UDP for that address to `lo` (its MAC rewritten for lo's), where
  conntrack un-NATs the answer to ::1 and the kernel delivers it. A guard drops anything on
  `lo` for that address that is not such an answer, so a guest cannot reach the host's
  services as if it were local.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, HypervisorError
from . import netlink
from .model import PortMapping

TABLE = "virtc"
NFT_TIMEOUT = 30.0
IPTABLES_TIMEOUT = 30.0


def tag(sandbox_id: str) -> str:
    """The comment every rule of `sandbox_id` carries."""
    return f"virtc:{sandbox_id}"


class _LibNftables:
    """libnftables (what the `nft` program is built on) through ctypes: no process per
    command. Its netlink socket belongs to the namespace of the thread that makes it."""

    OUTPUT_JSON = 1 << 4

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib

    def run(self, commands: str, json_output: bool) -> tuple[int, str, str]:
        lib = self.lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise HypervisorError("libnftables: cannot make a context")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            if json_output:
                lib.nft_ctx_output_set_flags(ctx, self.OUTPUT_JSON)
            rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
            return rc, out, err
        finally:
            lib.nft_ctx_free(ctx)


@functools.cache
def _libnftables() -> _LibNftables | None:
    try:
        return _LibNftables()
    except OSError:
        return None


def _nft_binary() -> str | None:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def nft_available() -> bool:
    """Whether nftables can be driven here (libnftables or the `nft` program)."""
    return _libnftables() is not None or _nft_binary() is not None


def nft(commands: str, *, json_output: bool = False) -> str:
    """Run nft commands (one transaction) in the calling thread's namespace; the output.

    libnftables when it is installed, else the `nft` program; `HypervisorError` with nft's
    message when it refuses."""
    lib = _libnftables()
    if lib is not None:
        rc, out, err = lib.run(commands, json_output)
    else:
        binary = _nft_binary()
        if not binary:
            raise HypervisorError("nft not found: install nftables (apt-get install nftables)")
        res = subprocess.run(
            [binary, *(["-j"] if json_output else []), "-f", "-"],
            input=commands,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
        rc, out, err = res.returncode, res.stdout, res.stderr
    if rc != 0:
        first = commands.strip().splitlines()[0] if commands.strip() else ""
        raise HypervisorError(f"nft {first!r}... failed: {err.strip()}")
    return out


def _iptables_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def iptables(*args: str, restore: str | None = None, version: int = 4) -> str:
    """Run `iptables ARGS` (or, given `restore`, feed it to `iptables-restore --noflush` as
    one transaction) in the calling thread's namespace; the output. `version` 6: ip6tables."""
    tool = "iptables" if version == 4 else "ip6tables"
    name = f"{tool}-restore" if restore is not None else tool
    binary = _iptables_binary(name)
    if not binary:
        raise HypervisorError(
            f"{name} not found: install nftables or iptables (apt-get install nftables)"
        )
    argv = [binary, "-w", *(["--noflush"] if restore is not None else args)]
    res = subprocess.run(
        argv,
        input=restore,
        capture_output=True,
        text=True,
        timeout=IPTABLES_TIMEOUT,
        check=False,
    )
    if res.returncode != 0:
        what = " ".join(args) if restore is None else restore.strip().splitlines()[1]
        raise HypervisorError(f"{name} {what!r}... failed: {res.stderr.strip()}")
    return res.stdout


@dataclass(frozen=True)
class Bridge:
    """The bridge a sandbox is on: its name, subnets (`subnet6` None without IPv6) and the
    sandbox's port on it (the host end of its veth)."""

    name: str
    subnet: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network | None
    port: str


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _iptables_rules(table: str, version: int = 4) -> list[str]:
    """The `-A CHAIN ...` lines of an iptables (`version` 6: ip6tables) table ([] without it)."""
    if not _iptables_binary("iptables" if version == 4 else "ip6tables"):
        return []
    out = iptables("-t", table, "-S", version=version)
    return [line for line in out.splitlines() if line.startswith("-A ")]


def _comment_of(line: str) -> str:
    words = shlex.split(line)
    return words[words.index("--comment") + 1] if "--comment" in words else ""


def _forward_drops(version: int = 4) -> bool:
    """Whether iptables' (ip6tables') FORWARD chain, if there is one, does not accept by
    policy, or has rules of its own that may drop."""
    binary = _iptables_binary("iptables" if version == 4 else "ip6tables")
    if not binary:
        return False
    if _libnftables() is not None and "nft" in os.path.basename(os.path.realpath(binary)):
        return _nft_chain_drops("ip" if version == 4 else "ip6", "filter", "FORWARD")
    lines = iptables("-t", "filter", "-S", "FORWARD", version=version).splitlines()
    return any(line.startswith("-A ") for line in lines) or "-P FORWARD ACCEPT" not in lines


def _nft_chain_drops(family: str, table: str, chain: str) -> bool:
    """`_forward_drops` for iptables-nft, whose chains are nftables': read through libnftables
    (no process to start). A chain that does not exist accepts."""
    try:
        out = nft(f"list chain {family} {table} {chain}", json_output=True)
    except HypervisorError as e:
        if "No such file or directory" in str(e):
            return False
        raise
    items = json.loads(out)["nftables"]
    policy = next((i["chain"].get("policy", "accept") for i in items if "chain" in i), "accept")
    return policy != "accept" or any("rule" in i for i in items)


def _forward_rules(sandbox_id: str, address: IPAddress, bridge: str) -> list[str]:
    """iptables-restore lines: what `address` sends, and answers and published-port
    connections to it, are forwarded (inserted ahead of the chain's own rules)."""
    c = f'-m comment --comment "{tag(sandbox_id)}"'
    host = f"{address}/{address.max_prefixlen}"
    return [
        "*filter",
        f"-I FORWARD -i {bridge} -s {host} {c} -j ACCEPT",
        f"-I FORWARD -o {bridge} -d {host} -m conntrack "
        f"--ctstate RELATED,ESTABLISHED,DNAT {c} -j ACCEPT",
        "COMMIT",
    ]


def _published(ports: list[PortMapping], version: int) -> list[PortMapping]:
    return [p for p in ports if version in p.families]


def _iptables_nat_rules(
    sandbox_id: str,
    address: IPAddress,
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network,
    bridge: str,
    ports: list[PortMapping],
) -> list[str]:
    """iptables-restore lines (for the address's version) for what `add_rules` makes with nft
    (connections from ::1 aside: they need nftables' netdev family)."""
    c = f'-m comment --comment "{tag(sandbox_id)}"'
    host = f"{address}/{address.max_prefixlen}"
    lines = ["*nat", f"-A POSTROUTING -s {host} ! -o {bridge} {c} -j MASQUERADE"]
    ports = _published(ports, address.version)
    if ports:
        for src in ("127.0.0.0/8",) * (address.version == 4) + (str(subnet),):
            lines.append(
                f"-A POSTROUTING -o {bridge} -s {src} -d {host} "
                f"-m conntrack --ctstate DNAT {c} -j MASQUERADE"
            )
    target = f"[{address}]" if address.version == 6 else str(address)
    for p in ports:
        where = f"-d {p.host_ip}" if p.host_ip else "-m addrtype --dst-type LOCAL"
        rule = (
            f"{where} -p {p.protocol} -m {p.protocol} --dport {p.host_port} {c} "
            f"-j DNAT --to-destination {target}:{p.guest_port}"
        )
        lines.append(f"-A PREROUTING {rule}")
        lines.append(f"-A OUTPUT {rule}")
    lines.append("COMMIT")
    return lines


def _iptables_ports() -> dict[tuple[str, int], str]:
    """(protocol, host port) -> tag of every published port in iptables' nat tables."""
    taken: dict[tuple[str, int], str] = {}
    for version in (4, 6):
        for line in _iptables_rules("nat", version):
            m = re.search(r"^-A PREROUTING .*-p (\w+) .*--dport (\d+)", line)
            comment = _comment_of(line)
            if m and comment.startswith("virtc:"):
                taken[(m.group(1), int(m.group(2)))] = comment
    return taken


def _iptables_remove(sandbox_id: str) -> int:
    """Delete every iptables and ip6tables rule (nat and filter tables) tagged with
    `sandbox_id`."""
    count = 0
    for version in (4, 6):
        lines: list[str] = []
        for table in ("nat", "filter"):
            mine = [r for r in _iptables_rules(table, version) if _comment_of(r) == tag(sandbox_id)]
            if mine:
                count += len(mine)
                lines += [f"*{table}", *("-D" + r[2:] for r in mine), "COMMIT"]
        if lines:
            iptables(restore="\n".join(lines) + "\n", version=version)
    return count


OUR_TABLES = (("ip", TABLE), ("ip6", TABLE), ("netdev", TABLE))


def _ruleset() -> list[dict[str, Any]]:
    """The namespace's whole nftables ruleset, as nft's JSON items."""
    items: list[dict[str, Any]] = json.loads(nft("list ruleset", json_output=True))["nftables"]
    return items


def _rules(items: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every rule of our tables."""
    items = _ruleset() if items is None else items
    return [
        item["rule"]
        for item in items
        if "rule" in item and (item["rule"]["family"], item["rule"]["table"]) in OUR_TABLES
    ]


def _rule_ports(rule: dict[str, Any]) -> tuple[str, int] | None:
    """(protocol, port) a DNAT rule matches on, if it is one."""
    for e in rule.get("expr", []):
        m = e.get("match")
        if not m:
            continue
        payload = m.get("left", {}).get("payload", {})
        if payload.get("field") == "dport" and isinstance(m.get("right"), int):
            return str(payload.get("protocol")), int(m["right"])
    return None


def check_ports_free(sandbox_id: str, ports: list[PortMapping]) -> None:
    """`ConfigError` naming the first host port that a socket or another sandbox holds."""
    if not ports:
        return
    taken = _iptables_ports()
    for r in _rules() if nft_available() else []:
        where = _rule_ports(r)
        if where and r.get("chain") == "prerouting":
            taken[where] = r.get("comment", "")
    taken = {k: v for k, v in taken.items() if v != tag(sandbox_id)}
    ipv6 = netlink.ipv6_enabled()
    for p in ports:
        owner = taken.get((p.protocol, p.host_port))
        if owner:
            raise ConfigError(
                f"published port {p}: host port {p.host_port}/{p.protocol} is already "
                f"published by sandbox {owner.removeprefix('virtc:')}"
            )
        for version in p.families:
            if version == 4 or ipv6:
                _check_bind(p, version)


def _check_bind(p: PortMapping, version: int) -> None:
    """`ConfigError` if `p`'s host port cannot be bound (in use, or not an address here)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if p.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        if version == 6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((p.host_ip or ("0.0.0.0" if version == 4 else "::"), p.host_port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"published port {p}: host port {p.host_port}/{p.protocol} is in use"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"published port {p}: {p.host_ip} is not an address of this host"
                ) from None
            raise


def add_rules(
    sandbox_id: str,
    bridge: Bridge,
    address: ipaddress.IPv4Address,
    address6: ipaddress.IPv6Address | None,
    ports: list[PortMapping],
) -> None:
    """Masquerade what the sandbox's addresses send out of any interface but the bridge;
    DNAT each published port to them; let the host's dropping forward chains pass their
    traffic. One transaction per firewall: all of it or nothing (what was added is removed if
    a later one refuses)."""
    if not nft_available():
        restore = _iptables_nat_rules(sandbox_id, address, bridge.subnet, bridge.name, ports)
        restore += _forward_rules(sandbox_id, address, bridge.name)
        iptables(restore="\n".join(restore) + "\n")
        if address6 is None or bridge.subnet6 is None:
            return
        restore = _iptables_nat_rules(sandbox_id, address6, bridge.subnet6, bridge.name, ports)
        restore += _forward_rules(sandbox_id, address6, bridge.name)
        try:
            iptables(restore="\n".join(restore) + "\n", version=6)
        except BaseException:
            _iptables_remove(sandbox_id)
            raise
        return
    items = _ruleset()
    lines = _nft_nat(sandbox_id, bridge.name, address, bridge.subnet, ports)
    if address6 is not None and bridge.subnet6 is not None:
        lines += _nft_nat(sandbox_id, bridge.name, address6, bridge.subnet6, ports)
        if _published(ports, 6):
            lines += _nft_loopback6(sandbox_id, bridge, address6)
    lines += _nft_forward(sandbox_id, items, bridge.name, address, address6)
    nft("\n".join(lines) + "\n")
    try:
        for version, addr in ((4, address), (6, address6)):
            if addr is not None and _forward_drops(version):
                restore = _forward_rules(sandbox_id, addr, bridge.name)
                iptables(restore="\n".join(restore) + "\n", version=version)
    except BaseException:
        remove_rules(sandbox_id)
        raise


def _nft_nat(
    sandbox_id: str,
    bridge: str,
    address: IPAddress,
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network,
    ports: list[PortMapping],
) -> list[str]:
    """nft commands for one address family: our nat table, outbound masquerade, DNAT of the
    published ports, masquerade of hairpin and loopback connections to them."""
    fam, ip = ("ip", "ip") if address.version == 4 else ("ip6", "ip6")
    c = f'comment "{tag(sandbox_id)}"'
    t = f"{fam} {TABLE}"
    lines = [
        f"add table {t}",
        f"add chain {t} prerouting {{ type nat hook prerouting priority -100; }}",
        f"add chain {t} output {{ type nat hook output priority -100; }}",
        f"add chain {t} postrouting {{ type nat hook postrouting priority 100; }}",
        f'add rule {t} postrouting {ip} saddr {address} oifname != "{bridge}" masquerade {c}',
    ]
    ports = _published(ports, address.version)
    if ports:
        srcs = f"{{ 127.0.0.0/8, {subnet} }}" if address.version == 4 else str(subnet)
        lines.append(
            f'add rule {t} postrouting oifname "{bridge}" {ip} daddr {address} '
            f"{ip} saddr {srcs} ct status dnat masquerade {c}"
        )
    target = str(address) if address.version == 4 else f"[{address}]"
    for p in ports:
        where = f"{ip} daddr {p.host_ip}" if p.host_ip else "fib daddr type local"
        rule = f"{where} {p.protocol} dport {p.host_port} dnat to {target}:{p.guest_port} {c}"
        lines.append(f"add rule {t} prerouting {rule}")
        lines.append(f"add rule {t} output {rule}")
    return lines


def _nft_loopback6(sandbox_id: str, bridge: Bridge, address6: ipaddress.IPv6Address) -> list[str]:
    """Published ports reached from ::1 (see the module's docstring): masquerade to the
    loopback-return address, answers to it handed to `lo` at the sandbox's bridge port, and
    the guard on `lo`."""
    assert bridge.subnet6 is not None
    back = netlink.loopback_return6(bridge.subnet6)
    c = f'comment "{tag(sandbox_id)}"'
    t = f"ip6 {TABLE}"
    n = f"netdev {TABLE}"
    return [
        f'add rule {t} postrouting oifname "{bridge.name}" ip6 daddr {address6} '
        f"ip6 saddr ::1 ct status dnat snat to {back} {c}",
        f"add chain {t} loopback {{ type filter hook prerouting priority -150; }}",
        f'add rule {t} loopback iifname "lo" ip6 daddr {back} ct direction reply accept {c}',
        f'add rule {t} loopback iifname "lo" ip6 daddr {back} drop {c}',
        f"add table {n}",
        f"add chain {n} {bridge.port} "
        f'{{ type filter hook ingress device "{bridge.port}" priority 0; }}',
        f"add rule {n} {bridge.port} ip6 daddr {back} meta l4proto {{ tcp, udp }} "
        f'ether daddr set 00:00:00:00:00:00 meta pkttype set host fwd to "lo" {c}',
    ]


def _host_forward_chains(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(family, table, chain) of the host's nftables base chains on the forward hook that may
    drop (policy drop, or rules of their own), iptables' FORWARD aside (kept to iptables,
    which would no longer read a chain holding native nft rules)."""
    chains: list[tuple[str, str, str]] = []
    ruled = {
        (r["rule"]["family"], r["rule"]["table"], r["rule"]["chain"]) for r in items if "rule" in r
    }
    for item in items:
        ch = item.get("chain")
        if not ch or ch.get("hook") != "forward" or ch["family"] not in ("ip", "ip6", "inet"):
            continue
        key = (ch["family"], ch["table"], ch["name"])
        if (ch["family"], ch["table"]) in OUR_TABLES:
            continue
        if ch["family"] in ("ip", "ip6") and ch["table"] == "filter" and ch["name"] == "FORWARD":
            continue
        if ch.get("policy") == "drop" or key in ruled:
            chains.append(key)
    return chains


def _nft_forward(
    sandbox_id: str,
    items: list[dict[str, Any]],
    bridge: str,
    address: ipaddress.IPv4Address,
    address6: ipaddress.IPv6Address | None,
) -> list[str]:
    """nft commands inserting, at the head of each host forward chain that may drop, accept
    rules for what the sandbox sends and for answers and published-port connections to it."""
    c = f'comment "{tag(sandbox_id)}"'
    lines = []
    for family, table, chain in _host_forward_chains(items):
        for ip, addr in (("ip", address), ("ip6", address6)):
            if addr is None or family not in ("inet", ip):
                continue
            where = f"insert rule {family} {table} {chain}"
            lines += [
                f'{where} oifname "{bridge}" {ip} daddr {addr} ct status dnat accept {c}',
                f'{where} oifname "{bridge}" {ip} daddr {addr} ct state established,related '
                f"accept {c}",
                f'{where} iifname "{bridge}" {ip} saddr {addr} accept {c}',
            ]
    return lines


def remove_rules(sandbox_id: str) -> int:
    """Delete every rule tagged with `sandbox_id`, in nftables and iptables; how many."""
    removed = _nft_remove(sandbox_id) if nft_available() else 0
    return removed + _iptables_remove(sandbox_id)


def _nft_remove(sandbox_id: str) -> int:
    """Delete every nftables rule tagged with `sandbox_id`, in our tables and the host's
    chains; our tables (and netdev chains) once nothing else is left in them."""
    items = _ruleset()
    rules = [i["rule"] for i in items if "rule" in i]
    mine = [r for r in rules if r.get("comment") == tag(sandbox_id)]
    lines = []
    for family, table in OUR_TABLES:
        left = [r for r in rules if (r["family"], r["table"]) == (family, table) and r not in mine]
        exists = any(
            "table" in i and (i["table"]["family"], i["table"]["name"]) == (family, table)
            for i in items
        )
        if exists and not left:
            lines.append(f"delete table {family} {table}")
        elif exists and family == "netdev":
            for i in items:
                ch = i.get("chain")
                if (
                    ch
                    and (ch["family"], ch["table"]) == (family, table)
                    and not any(r["chain"] == ch["name"] for r in left)
                ):
                    lines.append(f"delete chain {family} {table} {ch['name']}")
    gone = {f for f, _ in OUR_TABLES if f"delete table {f} {TABLE}" in lines}
    for r in mine:
        if not (r["table"] == TABLE and r["family"] in gone):
            lines.insert(
                0, f"delete rule {r['family']} {r['table']} {r['chain']} handle {r['handle']}"
            )
    if lines:
        nft("\n".join(lines) + "\n")
    return len(mine)
