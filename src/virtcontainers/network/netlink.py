"""Netlink work through pyroute2, inside a chosen network namespace.

pyroute2's synchronous API runs an event loop of its own, so everything here is blocking
and is run off the caller's loop (`in_netns`). A namespace is entered by a fresh thread
that calls setns(2) on itself: netlink sockets, sysctl files and child processes (nft)
opened by that thread all belong to the namespace, and no pooled thread is left in it.
Everything one `call_in_netns` does shares one rtnetlink socket (opening a pyroute2
`IPRoute` costs more than most requests made on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..devices import random_mac
from ..errors import ConfigError, HypervisorError
from .model import Address, Interface, Neighbour, Route

if TYPE_CHECKING:
    from pyroute2 import IPRoute


def _netlink_error() -> Any:
    """pyroute2's NetlinkError. pyroute2 is imported on first use: its package imports all
    of itself (~140 ms of a CLI's start), which a sandbox without host networking (`--net
    none`, or no network) never needs."""
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 1 << 20
MNT_DETACH = 2
NETNS_RUN_DIR = "/var/run/netns"
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
NUD_PERMANENT = 0x80
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
RTPROT_KERNEL = 2
IFA_F_NODAD = 0x02
TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
SIOCSIFMTU = 0x8922
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100
REPORT_KEYS: tuple[tuple[int, list[str]], ...] = (
    (ETH_P_IPV6, ["0xff020000/0xffffffff+24", "0x0/0xffffffff+28", "0x0/0xffffffff+32",
                  "0x16/0xffffffff+36"]),
    (ETH_P_IP, ["0xe0000016/0xffffffff+16"]),
)  # fmt: skip
"""u32 keys on the network header: IPv6 to ff02::16 (MLDv2 reports) and IPv4 to 224.0.0.22
(IGMPv3 reports), which only multicast routers and snooping switches read (RFC 3810 and
3376: a host does not suppress its own reports on hearing others')."""
TAP_SUFFIX = "_vc"
"""Taps this package makes end with it (Kata's are `tapN_kata`): never taken as endpoints."""

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


_session = threading.local()
"""Per thread: `active` inside `call_in_netns`, and the `ipr` its calls share."""


def _in_session(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with one rtnetlink socket for all it does (closed afterwards)."""
    if getattr(_session, "active", False):
        return fn(*args)
    _session.active = True
    try:
        return fn(*args)
    finally:
        _session.active = False
        ipr, _session.ipr = getattr(_session, "ipr", None), None
        if ipr is not None:
            ipr.close()


def call_in_netns(path: str, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in the namespace at `path` ("" for the caller's) and return its result."""
    if not path:
        return _in_session(fn, *args)
    if not os.path.exists(path):
        raise ConfigError(f"network namespace {path} does not exist")
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            _enter(path)
            box["result"] = _in_session(fn, *args)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name="vc-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


async def in_netns(path: str, fn: Callable[..., T], *args: Any) -> T:
    """`call_in_netns` off the event loop (for another namespace, its thread reports straight
    back to the loop: no pooled thread waits on it)."""
    if not path:
        return await asyncio.to_thread(_in_session, fn, *args)
    if not os.path.exists(path):
        raise ConfigError(f"network namespace {path} does not exist")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def report(error: BaseException | None, result: Any = None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def body() -> None:
        try:
            _enter(path)
            result = _in_session(fn, *args)
        except BaseException as e:  # handed to the loop
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                loop.call_soon_threadsafe(report, e)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(report, None, result)

    threading.Thread(target=body, name="vc-netns", daemon=True).start()
    return await asyncio.shield(done)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def create_netns(name: str, inside: Callable[[], None] | None = None) -> str:
    """A new named namespace (bound at /var/run/netns/<name>, as `ip netns add` does) with
    its loopback up; returns its path. Made by a thread of its own (no fork), which then
    runs `inside` there (one visit instead of two). On failure nothing is left."""
    path = netns_path(name)
    _prepare_run_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise HypervisorError(f"network namespace {name} already exists") from None
    box: dict[str, BaseException] = {}

    def body() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise _errno_error("unshare(CLONE_NEWNET)")
            if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None):
                raise _errno_error(f"bind mount on {path}")
            _loopback_up()
            if inside is not None:
                inside()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name="vc-netns-new", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        remove_netns(name)
        error = box["error"]
        if isinstance(error, HypervisorError):
            raise error
        raise HypervisorError(f"cannot create network namespace {name}: {error}")
    return path


def _prepare_run_dir() -> None:
    """/var/run/netns as a shared mount point, so namespaces bound there show everywhere."""
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    run_dir = NETNS_RUN_DIR.encode()
    if _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if _libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None) != 0:
        raise _errno_error(f"bind mount of {NETNS_RUN_DIR}")
    if _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) != 0:
        raise _errno_error(f"making {NETNS_RUN_DIR} shared")


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def remove_netns(name: str) -> bool:
    """Delete a named namespace (its interfaces go once nothing else holds it); False if it
    was not there."""
    path = netns_path(name)
    if not os.path.exists(path):
        return False
    _libc.umount2(path.encode(), MNT_DETACH)  # fails harmlessly when it was never mounted
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    """An rtnetlink socket of the current namespace: inside `call_in_netns` the one its
    calls share (opened on first use), else one of its own."""
    from pyroute2 import IPRoute

    if getattr(_session, "active", False):
        if getattr(_session, "ipr", None) is None:
            _session.ipr = IPRoute()
        yield _session.ipr
        return
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(name: str) -> int | None:
    """The index of interface `name` in the current thread's namespace, None if there is none
    (an ioctl: a hundredth of what a pyroute2 request costs)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _loopback_up() -> None:
    """Loopback up in the current namespace (two ioctls: no rtnetlink socket to open)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _set_up(s, "lo")


def _set_up(s: socket.socket, name: str) -> None:
    """Interface `name` of this namespace up, through `s` (any AF_INET socket)."""
    req = struct.pack("16sH14x", name.encode(), 0)
    flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))


def link_exists(name: str) -> bool:
    return _index(name) is not None


def delete_link(name: str) -> bool:
    """Delete an interface of the current namespace; False if there was none."""
    with _ipr() as ipr:
        idx = _index(name)
        if idx is None:
            return False
        with contextlib.suppress(_netlink_error()):
            ipr.link("del", index=idx)
        return True


# -- reading a namespace ---------------------------------------------------------------------


def _kind(link: Any) -> str:
    info = link.get("IFLA_LINKINFO")
    kind = info.get("IFLA_INFO_KIND") if info else None
    if kind == "tun":
        data = info.get("IFLA_INFO_DATA")
        return "tap" if data and data.get("IFLA_TUN_TYPE") == 2 else "tun"
    return str(kind or "device")


def scan() -> tuple[list[Interface], list[Route], list[Neighbour]]:
    """The endpoints of the current namespace (every interface but loopback and our own
    taps), their global addresses, the routes leaving by them and static neighbours."""
    with _ipr() as ipr:
        names: dict[int, str] = {}
        found: list[Interface] = []
        for link in ipr.get_links():
            name = str(link.get("IFLA_IFNAME"))
            names[int(link["index"])] = name
            if name == "lo" or name.endswith(TAP_SUFFIX):
                continue
            iface = Interface(
                name=name,
                kind=_kind(link),
                mac=str(link.get("IFLA_ADDRESS") or ""),
                mtu=int(link.get("IFLA_MTU") or 1500),
            )
            for a in ipr.get_addr(index=link["index"]):
                ip = a.get("IFA_ADDRESS")
                if ip and not ipaddress.ip_address(ip).is_link_local:
                    iface.addresses.append(Address(str(ip), int(a["prefixlen"])))
            found.append(iface)
        ours = {i.name for i in found}
        routes: list[Route] = []
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for r in ipr.get_routes(family=family, table=254):
                dev = names.get(int(r.get("RTA_OIF") or 0), "")
                if r["proto"] == RTPROT_KERNEL or (dev and dev not in ours):
                    continue
                dst = r.get("RTA_DST")
                if dst and ipaddress.ip_address(dst).is_link_local:
                    continue
                routes.append(
                    Route(
                        dest=f"{dst}/{r['dst_len']}" if dst else "",
                        gateway=str(r.get("RTA_GATEWAY") or ""),
                        family=version,
                        device=dev,
                    )
                )
        neighbours = [
            Neighbour(str(n.get("NDA_DST")), str(n.get("NDA_LLADDR")), names[n["ifindex"]])
            for n in ipr.get_neighbours()
            if n["state"] & NUD_PERMANENT
            and names.get(n["ifindex"]) in ours
            and n.get("NDA_LLADDR")
        ]
    return found, routes, neighbours


# -- Kata's tcfilter model -------------------------------------------------------------------


def connect_tcfilter(endpoint: str, tap: str, queues: int, mtu: int) -> None:
    """`make_tap` then `redirect`: the tap made and joined to `endpoint` both ways. On
    failure the tap is removed again."""
    if _index(endpoint) is None:
        raise ConfigError(f"network endpoint {endpoint} is not in the sandbox's namespace")
    make_tap(tap, queues, mtu, endpoint)
    try:
        redirect(endpoint, tap)
    except HypervisorError:
        delete_link(tap)
        raise


def make_tap(tap: str, queues: int, mtu: int, endpoint: str = "") -> None:
    """Tap `tap` (multiqueue when `queues` > 1), up with `mtu`: all QEMU needs to open it.
    `endpoint` (the one it will be joined to) only names it in errors. Made with ioctls
    (TUNSETIFF, TUNSETPERSIST, then the MTU and the flags), as `ip tuntap` does: no
    rtnetlink socket to open in a namespace that may have none yet."""
    what = f" for endpoint {endpoint}" if endpoint else ""
    if _index(tap) is not None:  # TUNSETIFF would open it, not make a new one
        raise HypervisorError(f"cannot create tap {tap}{what}: it exists already")
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), flags))
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise HypervisorError(f"cannot create tap {tap}{what}: {e}") from e
    try:
        quiet_link(tap)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si12x", tap.encode(), mtu))
            _set_up(s, tap)
    except OSError as e:
        delete_link(tap)
        raise HypervisorError(f"cannot bring tap {tap}{what} up (mtu {mtu}): {e}") from e


def redirect(endpoint: str, tap: str, reports: bool = True) -> None:
    """Join `tap` to `endpoint` both ways (Kata's tcfilter model): an ingress qdisc on each
    with a u32 match-all filter whose mirred action redirects every frame out of the other.
    What arrives on the endpoint goes to the VM and back, but with `reports` False the
    multicast listener reports (`REPORT_KEYS`) from the endpoint: those are left to the
    namespace's own stack, which drops them, and the guest, a host on the link, never
    handles them (a new bridge's own reports were most of the frames queued for a guest
    until its link came up). Undone on failure."""
    with _ipr() as ipr:
        ep, tp = _index(endpoint), _index(tap)
        if ep is None:
            raise ConfigError(f"network endpoint {endpoint} is not in the sandbox's namespace")
        if tp is None:
            raise ConfigError(f"tap {tap} is not in the sandbox's namespace")
        try:
            for src, dst in ((ep, tp), (tp, ep)):
                with contextlib.suppress(_netlink_error()):  # an ingress qdisc may already be there
                    ipr.tc("add", "ingress", src, "ffff:")
                if src == ep and not reports:
                    for prio, (proto, keys) in enumerate(REPORT_KEYS, 1):
                        # Matched first; no action: the frame goes on to the namespace.
                        ipr.tc(
                            "add-filter", "u32", src, f":{prio + 1}", parent="ffff:",
                            prio=prio, protocol=proto, keys=keys, target=0x10020,
                        )  # fmt: skip
                ipr.tc(
                    "add-filter",
                    "u32",
                    src,
                    ":1",
                    parent="ffff:",
                    prio=len(REPORT_KEYS) + 1,
                    protocol=ETH_P_ALL,
                    keys=["0x0/0x0+0"],
                    target=0x10020,
                    action={
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": dst,
                    },
                )
            ipr.link("set", index=ep, state="up")
        except _netlink_error() as e:
            for index in (tp, ep):
                with contextlib.suppress(_netlink_error()):
                    ipr.tc("del", "ingress", index, "ffff:")
            raise HypervisorError(
                f"cannot redirect endpoint {endpoint} to tap {tap} with tc: {e}"
            ) from e


def open_tap(name: str, queues: int) -> list[int]:
    """`queues` open queues of tap `name` in this namespace (as QEMU opens a tap by name),
    for a VMM that runs in another namespace: the fds are handed to it with the NIC."""
    if _index(name) is None:  # else TUNSETIFF would make a new, unconnected tap
        raise ConfigError(f"tap {name} is not in the sandbox's namespace")
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    ifr = struct.pack("16sH22x", name.encode(), flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
            fcntl.ioctl(fds[-1], TUNSETIFF, ifr)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise HypervisorError(f"cannot open tap {name} ({queues} queues): {e}") from e
    return fds


def connect_macvtap(endpoint: str, name: str) -> int:
    """Kata's macvtap model: a macvtap `name` (bridge mode) on `endpoint` takes the
    endpoint's MAC (the guest's), the endpoint a random one and loses its addresses (the
    namespace would otherwise answer for the guest). Returns the macvtap's index."""
    with _ipr() as ipr:
        ep = _index(endpoint)
        if ep is None:
            raise ConfigError(f"network endpoint {endpoint} is not in the sandbox's namespace")
        (link,) = ipr.get_links(ep)
        mac, mtu = link.get("IFLA_ADDRESS"), link.get("IFLA_MTU")
        try:
            ipr.link("set", index=ep, address=random_mac())
            ipr.flush_addr(index=ep)
            ipr.link("add", ifname=name, kind="macvtap", link=ep, macvtap_mode="bridge")
            idx = _index(name)
            assert idx is not None
            ipr.link("set", index=idx, address=mac, mtu=mtu, state="up")
            ipr.link("set", index=ep, state="up")
        except _netlink_error() as e:
            disconnect_macvtap(endpoint, name, str(mac), [], [])
            raise HypervisorError(f"cannot make macvtap {name} on {endpoint}: {e}") from e
        return idx


def disconnect_macvtap(
    endpoint: str, name: str, mac: str, addresses: list[Address], routes: list[Route]
) -> None:
    """Undo `connect_macvtap`: the macvtap goes, the endpoint gets its MAC, `addresses`
    and `routes` back."""
    with _ipr() as ipr:
        idx = _index(name)
        if idx is not None:
            with contextlib.suppress(_netlink_error()):
                ipr.link("del", index=idx)
        ep = _index(endpoint)
        if ep is None:
            return
        with contextlib.suppress(_netlink_error()):
            if mac:
                ipr.link("set", index=ep, address=mac)
            for a in addresses:
                ipr.addr("replace", index=ep, address=a.ip, prefixlen=a.prefixlen)
            for r in routes:
                dst = r.dest or ("0.0.0.0/0" if r.family == 4 else "::/0")
                kw: dict[str, Any] = {"dst": dst, "oif": ep}
                if r.gateway:
                    kw["gateway"] = r.gateway
                ipr.route("replace", **kw)


def disconnect_tcfilter(endpoint: str, tap: str) -> None:
    """Undo `connect_tcfilter`: the tap goes (its qdisc with it), the endpoint's ingress
    qdisc too. Whatever is already gone is skipped."""
    with _ipr() as ipr:
        tp = _index(tap)
        if tp is not None:
            with contextlib.suppress(_netlink_error()):
                ipr.link("del", index=tp)
        ep = _index(endpoint) if endpoint else None
        if ep is not None:
            try:
                ipr.tc("del", "ingress", ep, "ffff:")
            except _netlink_error() as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise


# -- the bridge side -------------------------------------------------------------------------


def route_networks(version: int = 4) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The IPv`version` destinations of the current namespace's routes (the default route,
    link-local and multicast ones aside)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    with _ipr() as ipr:
        out = []
        for r in ipr.get_routes(family=family, table=254):
            dst = r.get("RTA_DST")
            if dst and r["dst_len"]:
                net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
                if not (net.is_link_local or net.is_multicast):
                    out.append(net)
        return out


def ipv6_enabled() -> bool:
    """Whether the current namespace has IPv6 (the kernel's, and not disabled)."""
    try:
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def bridge_address(name: str) -> ipaddress.IPv4Interface | None:
    """The IPv4 address of bridge `name`, None when there is no such bridge.

    `ConfigError` when `name` exists but is no bridge or has no IPv4 address.
    """
    with _ipr() as ipr:
        idx = _index(name)
        if idx is None:
            return None
        (link,) = ipr.get_links(idx)
        if _kind(link) != "bridge":
            raise ConfigError(f"bridge {name}: an interface of that name exists and is no bridge")
        for a in ipr.get_addr(index=idx, family=socket.AF_INET):
            return ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        raise ConfigError(f"bridge {name} exists but has no IPv4 address")


def bridge_network6(name: str) -> ipaddress.IPv6Network | None:
    """The IPv6 subnet of bridge `name` (its first global address's), None without one."""
    with _ipr() as ipr:
        idx = _index(name)
        if idx is None:
            return None
        for a in ipr.get_addr(index=idx, family=socket.AF_INET6):
            ip = ipaddress.IPv6Address(a.get("IFA_ADDRESS"))
            if not ip.is_link_local:
                return ipaddress.IPv6Network(f"{ip}/{a['prefixlen']}", strict=False)
        return None


def add_bridge_subnet6(name: str, subnet: ipaddress.IPv6Network) -> None:
    """Give bridge `name` IPv6: the gateway (`subnet`'s ::1) and the loopback-return address
    (`loopback_return6`, deprecated so no socket picks it as its source), both without
    duplicate address detection (usable at once); IPv6 forwarding on."""
    write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "0")
    with _ipr() as ipr:
        idx = _index(name)
        assert idx is not None
        ipr.addr(
            "add", index=idx, address=str(subnet[1]), prefixlen=subnet.prefixlen, flags=IFA_F_NODAD
        )
        ipr.addr(
            "add",
            index=idx,
            address=str(loopback_return6(subnet)),
            prefixlen=subnet.prefixlen,
            flags=IFA_F_NODAD,
            preferred_lft=0,
        )
    enable_ipv6_forwarding()


def loopback_return6(subnet: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The bridge's address that connections from ::1 to a published port are masqueraded
    to (see nat.py: there is no route_localnet for IPv6)."""
    return subnet[-2]


def enable_ipv6_forwarding() -> None:
    """IPv6 forwarding on in the current namespace. Forwarding makes the kernel ignore router
    advertisements where accept_ra is 1, so those interfaces get 2 first (what they did
    before: a host configured by SLAAC keeps its routes)."""
    if read_sysctl("net/ipv6/conf/all/forwarding") == "1":
        return
    for name in os.listdir("/proc/sys/net/ipv6/conf"):
        if name != "all" and read_sysctl(f"net/ipv6/conf/{name}/accept_ra") == "1":
            write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "2")
    write_sysctl("net/ipv6/conf/all/forwarding", "1")


def create_bridge(name: str, gateway: ipaddress.IPv4Interface) -> None:
    """A bridge with the subnet's gateway address; loopback-sourced traffic may be routed
    out of it (route_localnet: published ports reached on 127.0.0.1).

    Its MAC is set explicitly: a bridge otherwise takes its lowest port's, which changes when
    that sandbox goes, and the other guests' ARP caches would hold a dead gateway MAC."""
    with _ipr() as ipr:
        ipr.link("add", ifname=name, kind="bridge", address=random_mac())
        idx = _index(name)
        assert idx is not None
        try:
            quiet_gateway6(name)
            ipr.addr("add", index=idx, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
            ipr.link("set", index=idx, state="up")
        except (_netlink_error(), OSError):
            ipr.link("del", index=idx)
            raise
    write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
    write_sysctl("net/ipv4/ip_forward", "1")


def bridge_ports(name: str) -> int:
    """How many interfaces are enslaved to bridge `name` (-1 when there is no such bridge:
    an interface of that name that is no bridge is not ours to remove)."""
    with _ipr() as ipr:
        idx = _index(name)
        if idx is None or _kind(ipr.get_links(idx)[0]) != "bridge":
            return -1
        return sum(1 for link in ipr.get_links() if link.get("IFLA_MASTER") == idx)


def add_veth(host_end: str, ns_path: str, inner: str, inner_mac: str, inner_mtu: int) -> None:
    """A veth pair: `host_end` up here (on no bridge yet: `enslave`), `inner` with MAC
    `inner_mac` and `inner_mtu` in the namespace at `ns_path` (configured there by
    `configure_inner`)."""
    with _ipr() as ipr:
        fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            peer = {"ifname": inner, "net_ns_fd": fd, "address": inner_mac, "mtu": inner_mtu}
            ipr.link("add", ifname=host_end, kind="veth", peer=peer)
        finally:
            os.close(fd)
        idx = _index(host_end)
        assert idx is not None
        quiet_link(host_end)
        ipr.link("set", index=idx, state="up")


def configure_inner(
    inner: str,
    address: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address,
    address6: ipaddress.IPv6Interface | None = None,
    gateway6: ipaddress.IPv6Address | None = None,
) -> None:
    """In the sandbox's namespace: `inner` up with `address` and a default route via
    `gateway` (and the same in IPv6, if given)."""
    with _ipr() as ipr:
        idx = _index(inner)
        assert idx is not None
        ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
        if address6 is not None and gateway6 is not None:
            ipr.addr(
                "add",
                index=idx,
                address=str(address6.ip),
                prefixlen=address6.network.prefixlen,
                flags=IFA_F_NODAD,
            )
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway))
        if address6 is not None and gateway6 is not None:
            ipr.route("add", dst="::/0", gateway=str(gateway6), family=socket.AF_INET6)


def enslave(name: str, bridge: str) -> None:
    """Put interface `name` on `bridge`."""
    with _ipr() as ipr:
        idx, br = _index(name), _index(bridge)
        if idx is None or br is None:
            raise ConfigError(f"cannot put {name} on bridge {bridge}: one of them is gone")
        ipr.link("set", index=idx, master=br)


def read_sysctl(key: str) -> str:
    """/proc/sys/<key> of the current namespace ("" when it does not exist)."""
    try:
        with open(os.path.join("/proc/sys", key)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def quiet_link(name: str) -> None:
    """No IPv6 of the host's own on link `name`, a pipe for the guest's frames (its tap, its
    veth's end on the bridge): with it, each such link sent its duplicate address detection,
    MLD reports and router solicitations, which reached the guest (15 of the 20 frames it
    had received when its start returned, each handled by its emulated vCPU)."""
    if read_sysctl(f"net/ipv6/conf/{name}/disable_ipv6") == "0":
        write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")


def quiet_gateway6(name: str) -> None:
    """Link `name`, a gateway the host's namespace owns (the bridge), before it goes up: no
    duplicate address detection (its addresses are ours: the link-local one is usable at
    once) and no router solicitations (it is the router). Both were sent to every port,
    so into each guest's queue until its link came up. Nothing without IPv6."""
    if not os.path.isdir(f"/proc/sys/net/ipv6/conf/{name}"):
        return
    write_sysctl(f"net/ipv6/conf/{name}/accept_dad", "0")
    write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")


def write_sysctl(key: str, value: str) -> None:
    """Write /proc/sys/<key> of the current namespace."""
    with open(os.path.join("/proc/sys", key), "w") as f:
        f.write(value)
