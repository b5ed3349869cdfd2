"""Outbound NAT and published ports with nftables, each rule tagged with its sandbox.

Rules live in one table (`ip virtc`) of the bridge's namespace, every rule with the comment
`virtc:<sandbox id>`, so a sandbox's cleanup deletes exactly its own (and the table once it
is empty). The `nft` program applies each change as one transaction.

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
import shutil
import socket
import subprocess
from typing import Any

from ..errors import ConfigError, HypervisorError
from .model import PortMapping

TABLE = "virtc"
NFT_TIMEOUT = 30.0


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


def nft(commands: str, *, json_output: bool = False) -> str:
    """Run nft commands (one transaction) in the calling thread's namespace; the output.

    libnftables when it is installed, else the `nft` program; `HypervisorError` with nft's
    message when it refuses."""
    lib = _libnftables()
    if lib is not None:
        rc, out, err = lib.run(commands, json_output)
    else:
        binary = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
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
    taken = {
        _rule_ports(r): r.get("comment", "")
        for r in _rules()
        if r.get("chain") == "prerouting" and r.get("comment") != tag(sandbox_id)
    }
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
    port to it. One transaction: all of it or nothing."""
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


def remove_rules(sandbox_id: str) -> int:
    """Delete every rule tagged with `sandbox_id` (and the table once empty); how many."""
    rules = _rules()
    mine = [r for r in rules if r.get("comment") == tag(sandbox_id)]
    lines = [f"delete rule ip {TABLE} {r['chain']} handle {r['handle']}" for r in mine]
    if rules and len(mine) == len(rules):
        lines = [f"delete table ip {TABLE}"]
    if lines:
        nft("\n".join(lines) + "\n")
    return len(mine)
