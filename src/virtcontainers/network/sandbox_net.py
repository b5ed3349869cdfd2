"""One sandbox's network: what is made for it on the host, how it reaches the VM, how it
is undone.

Everything a sandbox may create is named from its id before anything is created (its
namespace `vc-<id>`, the bridge-side veth `vcv<hash>`, taps `tap<N>_vc`, NAT rules tagged
`virtc:<id>`), and the plan is persisted first: a manager killed half-way leaves a record
from which `teardown` removes exactly that sandbox's pieces and nothing else.

QEMU is launched inside the sandbox's namespace (the driver runs it under `nsenter`), so it
opens the taps by name both at start and on hotplug (`netdev_add ifname=`), without
passing file descriptors around, and its user-mode stack (if any) lives there too. A VM
from the factory runs outside it (`vmm_outside`): its taps are opened in the namespace and
handed to QEMU open with each hot-added NIC (`nic`), as Kata does for factory VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..devices import Device, NetworkEndpoint, UserNetwork, random_mac
from ..errors import ConfigError, HypervisorError, UnsupportedError
from . import nat, netlink
from .model import (
    Address,
    GuestNetwork,
    Interface,
    Neighbour,
    NetworkConfig,
    PortMapping,
    Route,
    parse_subnet,
    parse_subnet6,
)

if TYPE_CHECKING:
    from ..agent import AgentClient

log = logging.getLogger(__name__)

LOCK_PATH = "/run/lock/virtc-net.lock"
"""Serialises bridge creation/removal and address leases across managers."""
SUBNET_CANDIDATES = ("10.213.0.0/16", "10.214.0.0/16", "172.29.0.0/16", "192.168.213.0/24")
"""Default bridge subnets, the first that no route of the bridge's namespace overlaps."""
SUBNET6_CANDIDATES = ("fd5c:76c1:a7e3::/64", "fd5c:76c1:a7e3:1::/64", "fd9b:3e05:41d2::/64")
"""Default IPv6 bridge subnets (unique local addresses, RFC 4193), chosen the same way."""
INNER_IFNAME = "eth0"
INNER_MTU = 1500
"""The MTU the veth's inner end is made with (a veth's default), carried over to the NIC."""
USER_NET = ipaddress.IPv4Network("10.0.2.0/24")
"""QEMU user-mode networking: guest .15, gateway .2, DNS .3."""
RESOLV_CONF = "/etc/resolv.conf"


def host_dns(path: str = RESOLV_CONF) -> tuple[list[str], list[str]]:
    """Nameservers (loopback ones dropped: the guest cannot reach them) and search domains."""
    servers: list[str] = []
    search: list[str] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(words[1]).is_loopback:
                        servers.append(words[1])
            elif words and words[0] in ("search", "domain"):
                search = words[1:]
    return servers, search


@contextlib.contextmanager
def _net_lock() -> Iterator[None]:
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hash(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass
class SandboxNetwork:
    """The plan and the state of one sandbox's network (persisted with the sandbox)."""

    sandbox_id: str
    config: NetworkConfig
    run_root: str
    netns_name: str = ""
    """Set when the namespace is ours (bridge mode): removed with the sandbox."""
    netns_path: str = ""
    """Where QEMU runs ("" for the caller's namespace)."""
    host_veth: str = ""
    lease_dir: str = ""
    address: str = ""
    gateway: str = ""
    address6: str = ""
    gateway6: str = ""
    interfaces: list[Interface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    bridged: bool = False
    """Bridge mode: the veth is on the bridge and the rules are in (`join_bridge`)."""
    vmm_outside: bool = False
    """The VMM runs outside the sandbox's namespace (a VM from the factory): its NICs are
    hot-added with their taps opened in the namespace (`nic`)."""

    # -- planning (no side effects) -----------------------------------------------------------
    @classmethod
    def plan(cls, sandbox_id: str, config: NetworkConfig, run_root: str) -> SandboxNetwork:
        """Validate `config` and name everything this sandbox may create."""
        config.validate()
        net = cls(sandbox_id, config, run_root)
        if config.host_netns and not os.path.exists(config.host_netns):
            raise ConfigError(f"network namespace {config.host_netns} does not exist")
        if config.mode == "bridge":
            net.netns_name = f"vc-{sandbox_id}"
            net.netns_path = netlink.netns_path(net.netns_name)
            net.host_veth = f"vcv{_hash(sandbox_id, 10)}"
            host_ns = config.host_netns or "/proc/thread-self/ns/net"
            ino = os.stat(host_ns).st_ino
            net.lease_dir = os.path.join(run_root, "net", f"{ino}-{config.bridge}")
        elif config.mode == "ns":
            if not os.path.exists(config.netns_path):
                raise ConfigError(f"network namespace {config.netns_path} does not exist")
            net.netns_path = config.netns_path
        if config.dns is not None:
            net.dns = list(config.dns)
            net.dns_search = list(config.dns_search)
        elif config.mode == "user":
            net.dns = [str(USER_NET[3])]
        elif config.mode != "none":
            net.dns, net.dns_search = host_dns()
        return net

    @property
    def vmm_netns(self) -> str | None:
        """The namespace the VMM runs in (None: the caller's)."""
        return self.netns_path or self.config.host_netns or None

    @property
    def hostname(self) -> str:
        return self.config.hostname or self.sandbox_id[:63]

    # -- setting up ---------------------------------------------------------------------------
    async def setup(self, queues: int, persist: Callable[[], None]) -> None:
        """Make the host side; `persist` is called whenever the record grows, before the
        thing it names is created. On failure everything made so far is undone."""
        try:
            if self.config.mode == "bridge":
                await netlink.in_netns(self.config.host_netns, self._bridge_side, queues)
                persist()
            if self.config.mode == "user":
                await netlink.in_netns(self.config.host_netns, self._check_ports)
                self.interfaces = [
                    Interface("user", "user", random_mac(), 1500, [Address(str(USER_NET[15]), 24)])
                ]
                self.routes = [Route(gateway=str(USER_NET[2]))]
            # Bridge mode with tcfilter: the tap was made with the namespace, nothing to visit.
            if (self.config.mode == "bridge" and not self._inner_later()) or (
                self.config.mode == "ns" and self.config.model != "none"
            ):
                await netlink.in_netns(self.netns_path, self._take_endpoints, queues, persist)
        except BaseException:
            await self.teardown()
            raise

    def _take_endpoints(self, queues: int, persist: Callable[[], None]) -> None:
        """In the sandbox's namespace (one visit, one netlink socket): find the endpoints
        (bridge mode: the veth just made), record them, then join each to the VM. (Bridge
        mode with taps joined by tc does not come here: its tap is made with the namespace,
        and the veth's inner end is configured and joined to it while the VM boots, by
        `join_bridge`.)"""
        if self.config.mode == "bridge":  # made and recorded by `_bridge_side`
            # macvtap then takes the addresses away; "none" leaves them.
            self._configure_inner()
            found, routes, neighbours = self.interfaces, self.routes, self.neighbours
            if self.config.model == "none":  # the VM is not joined to it
                persist()
                return
        else:
            found, routes, neighbours = netlink.scan()
        for n, iface in enumerate(found):
            self._check_endpoint(iface)
            self._name_tap(iface, n)
        self.interfaces, self.routes, self.neighbours = found, routes, neighbours
        persist()
        for iface in found:
            self._connect_here(iface, queues)

    def _inner_later(self) -> bool:
        """Whether `join_bridge` configures the veth's inner end and joins it to its tap."""
        return self.config.mode == "bridge" and self.config.model == "tcfilter"

    def _name_tap(self, iface: Interface, n: int) -> None:
        iface.nic_id = f"net{n}"
        if iface.kind == "tap":
            iface.tap = iface.name
        elif self.config.model == "macvtap":
            iface.tap = f"mvt{n}{netlink.TAP_SUFFIX}"
        else:
            iface.tap = f"tap{n}{netlink.TAP_SUFFIX}"

    def _check_ports(self) -> None:
        nat.check_ports_free(self.sandbox_id, self.config.ports)

    def _check_endpoint(self, iface: Interface) -> None:
        if iface.kind in ("macvtap", "tun"):
            raise UnsupportedError(
                "qemu",
                f"network endpoint {iface.name} ({iface.kind})",
                "only veth-like endpoints (joined by a tap with tc redirects) and taps are taken",
            )

    def _connect_here(self, iface: Interface, queues: int) -> None:
        """Join endpoint `iface` to its tap (in the sandbox's namespace)."""
        if iface.kind == "tap":
            return
        if self.config.model == "macvtap":
            iface.tap_index = netlink.connect_macvtap(iface.name, iface.tap)
        else:
            netlink.connect_tcfilter(iface.name, iface.tap, queues, iface.mtu)

    def _bridge_side(self, queues: int) -> None:
        """In the bridge's namespace: check, lease, then the namespace, recorded; with the
        tcfilter model the tap in it (all the VMM needs), by the thread that makes the
        namespace, and the veth waits for `join_bridge` with the bridge and the rules; with
        the other models the veth now (the VM's endpoint is made on it before the launch)."""
        cfg = self.config
        with _net_lock():
            self._check_ports()
            gw = netlink.bridge_address(cfg.bridge)
            if gw is None:
                gw = self._gateway_for_new_bridge()
            elif cfg.subnet and gw.network != parse_subnet(cfg.subnet):
                raise ConfigError(
                    f"bridge {cfg.bridge} already serves {gw.network}, not subnet {cfg.subnet}"
                )
            addr = self._lease(gw)
            self.address, self.gateway = str(addr), str(gw.ip)
            subnet6 = self._bridge_subnet6()
            addr6 = None
            if subnet6 is not None:
                # The IPv4 lease's offset in the IPv6 subnet: no second lease to keep.
                offset = int(addr.ip) - int(gw.network.network_address)
                if offset >= subnet6.num_addresses - 2:
                    raise ConfigError(
                        f"IPv6 subnet {subnet6} is too small for {gw.network}'s address {addr.ip}"
                    )
                addr6 = ipaddress.IPv6Interface(f"{subnet6[offset]}/{subnet6.prefixlen}")
                self.address6, self.gateway6 = str(addr6), str(subnet6[1])
            self._record_inner(random_mac())
            eth = self.interfaces[0]
            inside = None
            if self._inner_later():
                self._name_tap(eth, 0)
                inside = functools.partial(netlink.make_tap, eth.tap, queues, eth.mtu, eth.name)
            netlink.create_netns(self.netns_name, inside)
            if not self._inner_later():
                self._add_veth()

    def _add_veth(self) -> None:
        """The veth pair, its inner end in the sandbox's namespace with the recorded MAC and
        MTU (its host end's name is in the plan: `teardown` removes it, made or not)."""
        eth = self.interfaces[0]
        netlink.add_veth(self.host_veth, self.netns_path, INNER_IFNAME, eth.mac, eth.mtu)

    def _record_inner(self, mac: str) -> None:
        """Record the veth's inner end (made with `mac`) with its lease, as `netlink.scan`
        would find it once configured."""
        addr = ipaddress.IPv4Interface(self.address)
        eth = Interface(
            INNER_IFNAME, "veth", mac, INNER_MTU, [Address(str(addr.ip), addr.network.prefixlen)]
        )
        self.routes = [Route(gateway=self.gateway, family=4, device=INNER_IFNAME)]
        if self.address6:
            addr6 = ipaddress.IPv6Interface(self.address6)
            eth.addresses.append(Address(str(addr6.ip), addr6.network.prefixlen))
            self.routes.append(Route(gateway=self.gateway6, family=6, device=INNER_IFNAME))
        self.interfaces = [eth]

    def _configure_inner(self) -> None:
        """In the sandbox's namespace: the veth's inner end gets the lease and the routes."""
        addr6 = ipaddress.IPv6Interface(self.address6) if self.address6 else None
        gw6 = ipaddress.IPv6Address(self.gateway6) if self.gateway6 else None
        netlink.configure_inner(
            INNER_IFNAME,
            ipaddress.IPv4Interface(self.address),
            ipaddress.IPv4Address(self.gateway),
            addr6,
            gw6,
        )

    def _finish_inner(self) -> None:
        """In the sandbox's namespace, while the VM boots: `_configure_inner`, then each
        endpoint joined to its tap."""
        self._configure_inner()
        for iface in self.interfaces:
            if iface.tap:
                netlink.redirect(iface.name, iface.tap, reports=False)

    async def join_bridge(self) -> None:
        """Bridge mode: put the veth's host end on the bridge (made now if missing) and add
        the NAT, port and forward rules; meanwhile, in the sandbox's namespace, configure
        the veth's inner end and join it to its tap (tcfilter model, whose veth is made
        first, here). Not needed before the guest's network is configured, so it runs while
        the VM boots; the caller tears down on failure."""
        if self.config.mode != "bridge" or self.bridged:
            return
        if self._inner_later():
            await netlink.in_netns(self.config.host_netns, self._add_veth)
        jobs = [netlink.in_netns(self.config.host_netns, self._join_bridge)]
        if self._inner_later():  # the sandbox's side of the veth, at the same time
            jobs.append(netlink.in_netns(self.netns_path, self._finish_inner))
        # Both finish before a failure is raised: the caller then undoes everything.
        for outcome in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        self.bridged = True

    def _join_bridge(self) -> None:
        cfg = self.config
        addr = ipaddress.IPv4Interface(self.address)
        want = ipaddress.IPv4Interface(f"{self.gateway}/{addr.network.prefixlen}")
        addr6 = ipaddress.IPv6Interface(self.address6) if self.address6 else None
        with _net_lock():
            gw = netlink.bridge_address(cfg.bridge)
            if gw is None:
                netlink.create_bridge(cfg.bridge, want)
            elif gw != want:
                raise ConfigError(
                    f"bridge {cfg.bridge} now serves {gw.network}, not {addr.network}"
                )
            if addr6 is not None:
                have6 = netlink.bridge_network6(cfg.bridge)
                if have6 is None:
                    netlink.add_bridge_subnet6(cfg.bridge, addr6.network)
                elif have6 != addr6.network:
                    raise ConfigError(
                        f"bridge {cfg.bridge} now serves {have6}, not IPv6 {addr6.network}"
                    )
            netlink.enslave(self.host_veth, cfg.bridge)
            nat.add_rules(
                self.sandbox_id,
                nat.Bridge(
                    cfg.bridge, addr.network, addr6.network if addr6 else None, self.host_veth
                ),
                addr.ip,
                addr6.ip if addr6 is not None else None,
                cfg.ports,
            )

    def _bridge_subnet6(self) -> ipaddress.IPv6Network | None:
        """The bridge's IPv6 subnet (chosen if it has none: `join_bridge` gives it); None
        without IPv6."""
        cfg = self.config
        if cfg.subnet6 == "none":
            return None
        if not netlink.ipv6_enabled():
            if cfg.subnet6:
                raise ConfigError(f"IPv6 subnet {cfg.subnet6}: IPv6 is disabled on this host")
            return None
        have = netlink.bridge_network6(cfg.bridge)
        if have is not None:
            if cfg.subnet6 and have != parse_subnet6(cfg.subnet6):
                raise ConfigError(
                    f"bridge {cfg.bridge} already serves {have}, not IPv6 subnet {cfg.subnet6}"
                )
            return have
        subnet6 = self._free_subnet(cfg.subnet6, SUBNET6_CANDIDATES, 6)
        assert isinstance(subnet6, ipaddress.IPv6Network)
        return subnet6

    def _gateway_for_new_bridge(self) -> ipaddress.IPv4Interface:
        subnet = self._free_subnet(self.config.subnet, SUBNET_CANDIDATES, 4)
        return ipaddress.IPv4Interface(f"{subnet[1]}/{subnet.prefixlen}")

    @staticmethod
    def _free_subnet(
        asked: str, candidates: tuple[str, ...], version: int
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """`asked` if no route of this namespace overlaps it, else (when not asked) the first
        candidate that none overlaps."""
        parse = parse_subnet if version == 4 else parse_subnet6
        what = "subnet" if version == 4 else "IPv6 subnet"
        taken = netlink.route_networks(version)
        if asked:
            subnet = parse(asked)
            clash = [r for r in taken if r.overlaps(subnet)]
            if clash:
                raise ConfigError(f"{what} {subnet} overlaps the route to {clash[0]} on this host")
            return subnet
        for c in candidates:
            subnet = parse(c)
            if not any(r.overlaps(subnet) for r in taken):
                return subnet
        option = "--subnet" if version == 4 else "--subnet6"
        raise ConfigError(
            f"every default bridge {what} ({', '.join(candidates)}) overlaps a route of "
            f"this host: choose one with {option}"
        )

    def _lease(self, gw: ipaddress.IPv4Interface) -> ipaddress.IPv4Interface:
        """The first free address of the bridge's subnet, held by a file named after it."""
        os.makedirs(self.lease_dir, mode=0o700, exist_ok=True)
        for ip in gw.network.hosts():
            if ip == gw.ip:
                continue
            try:
                fd = os.open(
                    os.path.join(self.lease_dir, str(ip)),
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                    0o600,
                )
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.sandbox_id)
            return ipaddress.IPv4Interface(f"{ip}/{gw.network.prefixlen}")
        raise ConfigError(f"bridge {self.config.bridge}: no free address left in {gw.network}")

    def _release_leases(self) -> bool:
        """Drop this sandbox's leases; True when the bridge has no lease left."""
        try:
            names = os.listdir(self.lease_dir)
        except FileNotFoundError:
            return True
        left = 0
        for name in names:
            path = os.path.join(self.lease_dir, name)
            try:
                with open(path) as f:
                    owner = f.read()
            except FileNotFoundError:
                continue
            if owner == self.sandbox_id:
                os.unlink(path)
            else:
                left += 1
        if not left:
            with contextlib.suppress(OSError):
                os.rmdir(self.lease_dir)
                os.rmdir(os.path.dirname(self.lease_dir))
        return not left

    # -- the VM side --------------------------------------------------------------------------
    def devices(self, queues: int, vhost: bool) -> list[Device]:
        """The NICs to cold-plug (one per endpoint)."""
        if self.config.mode == "user":
            iface = self.interfaces[0]
            fwd = [
                f"{p.protocol}:{p.host_ip}:{p.host_port}-{USER_NET[15]}:{p.guest_port}"
                for p in self.config.ports
            ]
            return [UserNetwork(id="user0", mac=iface.mac, net=str(USER_NET), host_forwards=fwd)]
        return [self.endpoint(i, queues, vhost) for i in self.interfaces if i.tap]

    def endpoint(
        self, iface: Interface, queues: int, vhost: bool, *, open_queues: bool = True
    ) -> NetworkEndpoint:
        """The NIC of one interface. A macvtap's queues are opened here (unless not
        `open_queues`: a NIC being removed): the fds go to the VMM with the device (the
        driver closes its copies once the VMM runs; `Sandbox.add_network` once hotplugged)."""
        if iface.kind == "tap":
            queues = 1  # someone else's tap: single queue unless made otherwise
        fds: list[int] = []
        if iface.tap_index and open_queues:
            path = f"/dev/tap{iface.tap_index}"
            try:
                for _ in range(queues):
                    fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                raise HypervisorError(f"cannot open {path} (macvtap {iface.tap}): {e}") from e
        return NetworkEndpoint(
            id=iface.nic_id, tap_name=iface.tap, mac=iface.mac, queues=queues, vhost=vhost, fds=fds
        )

    async def nic(self, iface: Interface, queues: int, vhost: bool) -> NetworkEndpoint:
        """The NIC of `iface` to hot-add: `endpoint`, with its tap's queues opened in the
        sandbox's namespace when the VMM runs outside it. The caller closes `fds` once the
        VMM has its copies."""
        ep = self.endpoint(iface, queues, vhost)
        if not self.vmm_outside or ep.fds:  # a macvtap's queues are open already
            return ep
        fds = await netlink.in_netns(self.netns_path, netlink.open_tap, ep.tap_name, ep.queues)
        return replace(ep, fds=fds)

    def guest(self) -> GuestNetwork:
        """What the guest is told."""
        return GuestNetwork(
            interfaces=[i for i in self.interfaces if i.tap or self.config.mode == "user"],
            routes=self.routes,
            neighbours=self.neighbours,
            hostname=self.hostname,
            dns=self.dns,
            dns_search=self.dns_search,
            extra_hosts=self.config.extra_hosts,
        )

    async def configure_guest(self, agent: AgentClient) -> None:
        from .guest import configure_guest_network

        await configure_guest_network(agent, self.guest())

    # -- hotplug ------------------------------------------------------------------------------
    async def find_new(self, name: str) -> tuple[Interface, list[Route], list[Neighbour]]:
        """Endpoint `name`, newly put into the sandbox's namespace, named for its tap."""
        if not self.netns_path:
            raise ConfigError(
                f"sandbox {self.sandbox_id} has no network namespace ({self.config.mode} mode)"
            )
        if any(i.name == name for i in self.interfaces):
            raise ConfigError(f"sandbox {self.sandbox_id}: endpoint {name} is already added")
        found, routes, neighbours = await netlink.in_netns(self.netns_path, netlink.scan)
        for iface in found:
            if iface.name == name:
                self._check_endpoint(iface)
                used = {i.nic_id for i in self.interfaces}
                n = next(k for k in range(len(used) + 1) if f"net{k}" not in used)
                self._name_tap(iface, n)
                mine = [r for r in routes if r.device == name]
                return iface, mine, [nb for nb in neighbours if nb.device == name]
        raise ConfigError(
            f"sandbox {self.sandbox_id}: no interface {name} in namespace {self.netns_path}"
        )

    async def connect(self, iface: Interface, queues: int) -> None:
        await netlink.in_netns(self.netns_path, self._connect_here, iface, queues)

    async def disconnect(self, iface: Interface) -> None:
        if iface.kind == "tap" or not os.path.exists(self.netns_path):
            return
        if self.config.model == "macvtap":
            routes = [r for r in self.routes if r.device == iface.name]
            await netlink.in_netns(
                self.netns_path,
                netlink.disconnect_macvtap,
                iface.name,
                iface.tap,
                iface.mac,
                iface.addresses,
                routes,
            )
        else:
            await netlink.in_netns(
                self.netns_path, netlink.disconnect_tcfilter, iface.name, iface.tap
            )

    # -- teardown -----------------------------------------------------------------------------
    async def teardown(self) -> None:
        """Remove what this sandbox's record names; whatever is already gone is skipped."""
        if self.config.mode == "bridge":
            host_ns = self.config.host_netns
            if host_ns and not os.path.exists(host_ns):
                log.warning("sandbox %s: bridge namespace %s is gone", self.sandbox_id, host_ns)
                netlink.remove_netns(self.netns_name)
                self._release_leases()
                return
            await netlink.in_netns(host_ns, self._bridge_teardown)
        elif self.netns_path and os.path.exists(self.netns_path):
            for iface in self.interfaces:
                if iface.tap and iface.kind != "tap":
                    await self.disconnect(iface)

    def _bridge_teardown(self) -> None:
        with _net_lock():
            nat.remove_rules(self.sandbox_id)
            netlink.delete_link(self.host_veth)
            netlink.remove_netns(self.netns_name)
            if self._release_leases() and netlink.bridge_ports(self.config.bridge) == 0:
                netlink.delete_link(self.config.bridge)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxNetwork:
        d = dict(d)
        d["config"] = NetworkConfig.from_dict(d["config"])
        d["interfaces"] = [Interface.from_dict(i) for i in d.get("interfaces") or []]
        d["routes"] = [Route(**r) for r in d.get("routes") or []]
        d["neighbours"] = [Neighbour(**n) for n in d.get("neighbours") or []]
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """What `virtc inspect` shows."""
        return {
            "mode": self.config.mode,
            "netns": self.netns_path,
            "ip": self.address.split("/")[0] if self.address else self._first_ip(4),
            "ip6": self.address6.split("/")[0] if self.address6 else self._first_ip(6),
            "gateway": self.gateway,
            "gateway6": self.gateway6,
            "interfaces": [
                {
                    "name": i.name,
                    "mac": i.mac,
                    "mtu": i.mtu,
                    "addresses": [str(a) for a in i.addresses],
                }
                for i in self.interfaces
            ],
            "ports": [str(p) for p in self.config.ports],
            "dns": self.dns,
        }

    def _first_ip(self, family: int) -> str:
        for i in self.interfaces:
            for a in i.addresses:
                if a.family == family:
                    return a.ip
        return ""


__all__ = ["PortMapping", "SandboxNetwork"]
