"""What a sandbox's network is: the request (`NetworkConfig`, published ports) and what the
host read in the namespace (`Interface`, `Route`, `Neighbour`) for the guest to copy."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

MODES = ("none", "bridge", "ns", "user")
MODELS = ("tcfilter", "macvtap", "none")
DEFAULT_BRIDGE = "vc0"
IFNAMSIZ = 15
"""Longest Linux interface name (IFNAMSIZ - 1)."""

_PORT_RE = re.compile(
    r"^(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(?P<host>\d{1,5}):(?P<guest>\d{1,5})"
    r"(?:/(?P<proto>tcp|udp))?$"
)


@dataclass(frozen=True)
class PortMapping:
    """A published port: `host_ip:host_port` on the host reaches `guest_port` in the guest."""

    host_port: int
    guest_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def __str__(self) -> str:
        ip = (
            f"[{self.host_ip}]:" if ":" in self.host_ip else f"{self.host_ip}:" * bool(self.host_ip)
        )
        return f"{ip}{self.host_port}:{self.guest_port}/{self.protocol}"

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions it is published on: its host address's, or both without one."""
        if not self.host_ip:
            return (4, 6)
        return (ipaddress.ip_address(self.host_ip).version,)

    @classmethod
    def parse(cls, spec: str) -> PortMapping:
        """`[IP:]HOST_PORT:GUEST_PORT[/tcp|udp]`, as Docker's `-p`; an IPv6 host address in
        brackets (`[::1]:8080:80`)."""
        m = _PORT_RE.match(spec.strip())
        if not m:
            raise ConfigError(
                f"published port {spec!r}: expected [IP:]HOST_PORT:GUEST_PORT[/tcp|udp]"
            )
        ip = (m["ip"] or "").strip("[]")
        if ip:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"published port {spec!r}: {ip!r} is not an IP address") from None
            if (addr.version == 6) != m["ip"].startswith("["):
                raise ConfigError(
                    f"published port {spec!r}: an IPv6 host address goes in brackets, "
                    "an IPv4 one without"
                )
            ip = str(addr)
        host, guest = int(m["host"]), int(m["guest"])
        for name, port in (("host", host), ("guest", guest)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"published port {spec!r}: {name} port {port} is not in 1..65535")
        return cls(host, guest, m["proto"] or "tcp", ip)


@dataclass
class NetworkConfig:
    """How a sandbox is networked.

    `mode`: "none" (loopback only), "bridge" (a namespace of its own, a veth to `bridge` in
    `host_netns`, outbound NAT, published `ports`; IPv4 `subnet` and IPv6 `subnet6`, each
    chosen clear of the host's routes when empty; `subnet6` "none" for IPv4 only), "ns"
    (join the namespace at `netns_path`: what CNI and the shim hand over), "user" (QEMU
    user-mode networking, no root needed).
    `model` is how endpoints are joined to the VM ("tcfilter": a tap with tc redirects both
    ways; "macvtap": a macvtap on the endpoint whose queues QEMU is handed as open fds,
    cold-plug only; "none": not at all). `host_netns` (a namespace path, default the caller's) is
    where the bridge, its NAT and the published ports live.
    """

    mode: str = "none"
    netns_path: str = ""
    bridge: str = DEFAULT_BRIDGE
    subnet: str = ""
    subnet6: str = ""
    ports: list[PortMapping] = field(default_factory=list)
    dns: list[str] | None = None
    dns_search: list[str] = field(default_factory=list)
    hostname: str = ""
    extra_hosts: dict[str, str] = field(default_factory=dict)
    model: str = "tcfilter"
    host_netns: str = ""

    def validate(self) -> None:
        """Refuse a bad request before anything is created."""
        if self.mode not in MODES:
            raise ConfigError(f"network mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.model not in MODELS:
            raise ConfigError(f"network model {self.model!r}: expected one of {', '.join(MODELS)}")
        if self.mode == "ns" and not self.netns_path:
            raise ConfigError("network mode ns needs a namespace path (--net ns:PATH)")
        if self.ports and self.mode not in ("bridge", "user"):
            raise ConfigError(f"published ports need --net bridge or --net user, not {self.mode}")
        if self.mode == "bridge":
            check_ifname("bridge", self.bridge)
            if self.subnet:
                parse_subnet(self.subnet)
            if self.subnet6 and self.subnet6 != "none":
                parse_subnet6(self.subnet6)
        seen: set[tuple[str, int]] = set()
        for p in self.ports:
            if self.mode == "user" and p.host_ip and ":" in p.host_ip:
                raise ConfigError(f"published port {p}: --net user publishes on IPv4 only")
            if (p.protocol, p.host_port) in seen:
                raise ConfigError(f"published port {p}: host port {p.host_port} given twice")
            seen.add((p.protocol, p.host_port))
        for server in self.dns or []:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ConfigError(f"DNS server {server!r} is not an IP address") from None
        for name, ip in self.extra_hosts.items():
            if not name or any(c.isspace() for c in name):
                raise ConfigError(f"extra host name {name!r} is empty or has blanks")
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"extra host {name}: {ip!r} is not an IP address") from None

    @classmethod
    def parse(
        cls, text: str, ports: list[str] | None = None, subnet: str = "", subnet6: str = ""
    ) -> NetworkConfig:
        """`none`, `bridge`, `bridge:NAME`, `ns:PATH` or `user`, with `-p` specs."""
        mode, _, arg = text.partition(":")
        cfg = cls(
            mode=mode,
            subnet=subnet,
            subnet6=subnet6,
            ports=[PortMapping.parse(p) for p in ports or []],
        )
        if mode == "ns":
            cfg.netns_path = arg
        elif mode == "bridge" and arg:
            cfg.bridge = arg
        elif arg:
            raise ConfigError(f"network {text!r}: mode {mode} takes no argument")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (persisted with the sandbox)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        d = dict(d)
        d["ports"] = [PortMapping(**p) for p in d.get("ports") or []]
        return cls(**d)


def check_ifname(what: str, name: str) -> None:
    """A Linux interface name: 1-15 characters, no '/', blank or ':'."""
    if not name or len(name) > IFNAMSIZ or any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise ConfigError(
            f"{what} name {name!r}: must be 1-{IFNAMSIZ} characters without '/', ':' or blanks"
        )


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 subnet with room for a gateway and sandboxes (prefix /8../29)."""
    net = _parse_network(text, 4)
    assert isinstance(net, ipaddress.IPv4Network)
    return net


def parse_subnet6(text: str) -> ipaddress.IPv6Network:
    """An IPv6 subnet for the bridge (prefix /48../112: room for the gateway, the
    loopback-return address and a sandbox per IPv4 lease)."""
    net = _parse_network(text, 6)
    assert isinstance(net, ipaddress.IPv6Network)
    return net


_SUBNET_RULES = {
    4: ("subnet", 8, 29, "not an IPv4 subnet (an IPv6 one is subnet6)"),
    6: ("IPv6 subnet", 48, 112, "not an IPv6 subnet"),
}


def _parse_network(text: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    what, shortest, longest, other = _SUBNET_RULES[version]
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ConfigError(f"{what} {text!r}: {e}") from None
    if net.version != version:
        raise ConfigError(f"{what} {text!r}: {other}")
    if not shortest <= net.prefixlen <= longest:
        raise ConfigError(f"{what} {text!r}: prefix must be /{shortest} to /{longest}")
    return net


@dataclass(frozen=True)
class Address:
    """An interface address (`ip` with `prefixlen`); `family` 4 or 6."""

    ip: str
    prefixlen: int

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.ip).version

    def __str__(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


@dataclass(frozen=True)
class Route:
    """A route to copy into the guest (`dest` "" is the default route)."""

    dest: str = ""
    gateway: str = ""
    family: int = 4
    device: str = ""
    """The namespace interface it leaves by ("" when it has no device)."""


@dataclass(frozen=True)
class Neighbour:
    """A static ARP/NDP entry of the namespace."""

    ip: str
    mac: str
    device: str

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.ip).version


@dataclass
class Interface:
    """An endpoint found in the namespace and the tap that carries it to the VM."""

    name: str
    kind: str
    mac: str
    mtu: int
    addresses: list[Address] = field(default_factory=list)
    tap: str = ""
    nic_id: str = ""
    tap_index: int = 0
    """The macvtap's interface index (its queues are /dev/tap<index>); 0 for a tap."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Interface:
        d = dict(d)
        d["addresses"] = [Address(**a) for a in d.get("addresses") or []]
        return cls(**d)


@dataclass
class GuestNetwork:
    """Everything the guest is told: interfaces (by MAC), routes, neighbours, names."""

    interfaces: list[Interface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    hostname: str = ""
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    extra_hosts: dict[str, str] = field(default_factory=dict)
