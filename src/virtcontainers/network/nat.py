"""Outbound NAT and published ports with nftables (iptables where nft is absent), each
rule tagged with its sandbox.

Rules live in one table (`ip virtc`) of the bridge's namespace, every rule with the comment
`virtc:<sandbox id>`, so a sandbox's cleanup deletes exactly its own (and the table once it
is empty). libnftables (or the `nft` program) applies each change as one transaction. Without
either, the same rules go into iptables' nat table (one `iptables-restore --noflush`
transaction), with the same comments.

A firewall whose forward policy drops (Docker sets `iptables -P FORWARD DROP`) would drop the
sandbox's routed traffic whatever our table says (a packet must pass every table's forward
hook), so where iptables' FORWARD chain does not accept by policy, or always with the iptables
fallback, the sandbox's address gets tagged accept rules at the head of that chain.

Published ports are DNAT rules in both the prerouting chain (traffic from outside) and the
output chain (connections made on this host, to any of its addresses); with route_localnet
on the bridge, 127.0.0.1 works too: connections arriving by loopback, or from another
sandbox on the bridge (hairpin), are masqueraded so the guest's answer comes back the same
way. No userland proxy is involved.
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
from typing import Any

from ..errors import ConfigError, HypervisorError
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


def iptables(*args: str, restore: str | None = None) -> str:
    """Run `iptables ARGS` (or, given `restore`, feed it to `iptables-restore --noflush` as
    one transaction) in the calling thread's namespace; the output."""
    name = "iptables-restore" if restore is not None else "iptables"
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


def _iptables_rules(table: str) -> list[str]:
    """The `-A CHAIN ...` lines of an iptables table ([] without iptables)."""
    if not _iptables_binary("iptables"):
        return []
    return [line for line in iptables("-t", table, "-S").splitlines() if line.startswith("-A ")]


def _comment_of(line: str) -> str:
    words = shlex.split(line)
    return words[words.index("--comment") + 1] if "--comment" in words else ""


def _forward_drops() -> bool:
    """Whether iptables' FORWARD chain (if there is one) does not accept by policy, or has
    rules of its own that may drop."""
    binary = _iptables_binary("iptables")
    if not binary:
        return False
    if _libnftables() is not None and "nft" in os.path.basename(os.path.realpath(binary)):
        return _nft_chain_drops("ip", "filter", "FORWARD")
    lines = iptables("-t", "filter", "-S", "FORWARD").splitlines()
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


def _forward_rules(sandbox_id: str, address: ipaddress.IPv4Address, bridge: str) -> list[str]:
    """iptables-restore lines: what `address` sends, and answers and published-port
    connections to it, are forwarded (inserted ahead of the chain's own rules)."""
    c = f'-m comment --comment "{tag(sandbox_id)}"'
    return [
        "*filter",
        f"-I FORWARD -i {bridge} -s {address}/32 {c} -j ACCEPT",
        f"-I FORWARD -o {bridge} -d {address}/32 -m conntrack "
        f"--ctstate RELATED,ESTABLISHED,DNAT {c} -j ACCEPT",
        "COMMIT",
    ]


def _iptables_nat_rules(
    sandbox_id: str,
    address: ipaddress.IPv4Address,
    subnet: ipaddress.IPv4Network,
    bridge: str,
    ports: list[PortMapping],
) -> list[str]:
    """iptables-restore lines for what `add_rules` makes with nft."""
    c = f'-m comment --comment "{tag(sandbox_id)}"'
    lines = ["*nat", f"-A POSTROUTING -s {address}/32 ! -o {bridge} {c} -j MASQUERADE"]
    if ports:
        for src in ("127.0.0.0/8", str(subnet)):
            lines.append(
                f"-A POSTROUTING -o {bridge} -s {src} -d {address}/32 "
                f"-m conntrack --ctstate DNAT {c} -j MASQUERADE"
            )
    for p in ports:
        where = f"-d {p.host_ip}/32" if p.host_ip else "-m addrtype --dst-type LOCAL"
        rule = (
            f"{where} -p {p.protocol} -m {p.protocol} --dport {p.host_port} {c} "
            f"-j DNAT --to-destination {address}:{p.guest_port}"
        )
        lines.append(f"-A PREROUTING {rule}")
        lines.append(f"-A OUTPUT {rule}")
    lines.append("COMMIT")
    return lines


def _iptables_ports() -> dict[tuple[str, int], str]:
    """(protocol, host port) -> tag of every published port in iptables' nat table."""
    taken: dict[tuple[str, int], str] = {}
    for line in _iptables_rules("nat"):
        m = re.search(r"^-A PREROUTING .*-p (\w+) .*--dport (\d+)", line)
        comment = _comment_of(line)
        if m and comment.startswith("virtc:"):
            taken[(m.group(1), int(m.group(2)))] = comment
    return taken


def _iptables_remove(sandbox_id: str) -> int:
    """Delete every iptables rule (nat and filter tables) tagged with `sandbox_id`."""
    lines: list[str] = []
    count = 0
    for table in ("nat", "filter"):
        mine = [r for r in _iptables_rules(table) if _comment_of(r) == tag(sandbox_id)]
        if mine:
            count += len(mine)
            lines += [f"*{table}", *("-D" + r[2:] for r in mine), "COMMIT"]
    if lines:
        iptables(restore="\n".join(lines) + "\n")
    return count


def _rules() -> list[dict[str, Any]]:
    """Every rule of our table ([] when there is no table)."""
    try:
        out = nft(f"list table ip {TABLE}", json_output=True)
    except HypervisorError as e:
        if "No such file or directory" in str(e):
            return []
        raise
    return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]


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
    for p in ports:
        owner = taken.get((p.protocol, p.host_port))
        if owner:
            raise ConfigError(
                f"published port {p}: host port {p.host_port}/{p.protocol} is already "
                f"published by sandbox {owner.removeprefix('virtc:')}"
            )
        kind = socket.SOCK_STREAM if p.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((p.host_ip or "0.0.0.0", p.host_port))
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
    address: ipaddress.IPv4Address,
    subnet: ipaddress.IPv4Network,
    bridge: str,
    ports: list[PortMapping],
) -> None:
    """Masquerade what `address` sends out of any interface but `bridge`; DNAT each published
    port to it; let a dropping forward policy pass its traffic. One transaction per firewall:
    all of it or nothing (what was added is removed if the second refuses)."""
    if not nft_available():
        restore = _iptables_nat_rules(sandbox_id, address, subnet, bridge, ports)
        restore += _forward_rules(sandbox_id, address, bridge)
        iptables(restore="\n".join(restore) + "\n")
        return
    c = f'comment "{tag(sandbox_id)}"'
    lines = [
        f"add table ip {TABLE}",
        f"add chain ip {TABLE} prerouting {{ type nat hook prerouting priority -100; }}",
        f"add chain ip {TABLE} output {{ type nat hook output priority -100; }}",
        f"add chain ip {TABLE} postrouting {{ type nat hook postrouting priority 100; }}",
        f'add rule ip {TABLE} postrouting ip saddr {address} oifname != "{bridge}" masquerade {c}',
    ]
    if ports:
        lines.append(
            f'add rule ip {TABLE} postrouting oifname "{bridge}" ip daddr {address} '
            f"ip saddr {{ 127.0.0.0/8, {subnet} }} ct status dnat masquerade {c}"
        )
    for p in ports:
        where = f"ip daddr {p.host_ip}" if p.host_ip else "fib daddr type local"
        rule = f"{where} {p.protocol} dport {p.host_port} dnat to {address}:{p.guest_port} {c}"
        lines.append(f"add rule ip {TABLE} prerouting {rule}")
        lines.append(f"add rule ip {TABLE} output {rule}")
    nft("\n".join(lines) + "\n")
    if _forward_drops():
        try:
            iptables(restore="\n".join(_forward_rules(sandbox_id, address, bridge)) + "\n")
        except BaseException:
            _nft_remove(sandbox_id)
            raise


def remove_rules(sandbox_id: str) -> int:
    """Delete every rule tagged with `sandbox_id`, in nftables and iptables; how many."""
    removed = _nft_remove(sandbox_id) if nft_available() else 0
    return removed + _iptables_remove(sandbox_id)


def _nft_remove(sandbox_id: str) -> int:
    """Delete our table's rules tagged with `sandbox_id` (and the table once empty)."""
    rules = _rules()
    mine = [r for r in rules if r.get("comment") == tag(sandbox_id)]
    lines = [f"delete rule ip {TABLE} {r['chain']} handle {r['handle']}" for r in mine]
    if rules and len(mine) == len(rules):
        lines = [f"delete table ip {TABLE}"]
    if lines:
        nft("\n".join(lines) + "\n")
    return len(mine)
