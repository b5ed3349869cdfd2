"""Sandbox networking: set-up cost, TCP throughput and latency, tap (tc redirect) vs QEMU
user-mode networking, measured in the same run.

Set-up cost: a sandbox start with `--net bridge` against one with `--net none` (both
configure the guest: loopback, hostname, /etc/hosts), alternated; and the host side alone
(mock VMM: namespace, veth, bridge, nftables, no guest). Target: <= 50 ms extra.

Throughput: 16 MiB over one TCP connection host -> guest and guest -> host, timed on the
host from connect (or accept) to the end of the stream; the guest side is busybox `nc`
(the initrd has no iperf3). "tap" is Kata's model (a veth in the sandbox's namespace, a
tap joined to it with tc redirects); "user" is QEMU's user-mode stack with a published
port (-p) and the guest connecting to its gateway. Target: tap >= 2x user (time ratio
tap / user <= 0.5). Latency: 20 pings from the guest to its gateway (the host side's
address; QEMU's stack for user mode), median and p99 RTT.

Everything runs inside network namespaces this script makes ("the host"), never the
machine's own: no traffic leaves them.

    .venv/bin/python benchmarks/network.py [--runs 5] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    add_limit,
    add_metrics,
    add_ratio,
    alternate,
    main,
    median,
    new_result,
    temp_run_root,
)
from pyroute2 import IPRoute

from virtcontainers.network import NetworkConfig, PortMapping
from virtcontainers.network.netlink import call_in_netns, create_netns, remove_netns
from virtcontainers.sandbox import Sandbox

TITLE = "Sandbox networking: set-up cost, TCP throughput and ping RTT, tap vs user-mode (TCG)"
SETUP_TARGET = 0.050
THROUGHPUT_TARGET = 0.5
"""tap transfer time / user-mode transfer time (<= 0.5: at least twice the throughput)."""
MIB = 16
PORT = 5001
PINGS = 20
HOST_IP, GUEST_IP = "192.168.99.1", "192.168.99.2"
MOCK = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}


@contextlib.asynccontextmanager
async def namespace(prefix: str) -> AsyncIterator[str]:
    name = f"{prefix}-{secrets.token_hex(4)}"
    path = await asyncio.to_thread(create_netns, name)
    try:
        yield path
    finally:
        await asyncio.to_thread(remove_netns, name)


def _veth(host_path: str, sandbox_path: str) -> None:
    """veth `bh0` (HOST_IP) in the bench namespace to `eth0` (GUEST_IP) in the sandbox's."""

    def inside(name: str, ip: str, gateway: str = "") -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=idx, address=ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")
            if gateway:
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway)

    def make() -> None:
        with IPRoute() as ipr:
            fd = os.open(sandbox_path, os.O_RDONLY)
            try:
                ipr.link("add", ifname="bh0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            finally:
                os.close(fd)
        inside("bh0", HOST_IP)

    call_in_netns(host_path, make)
    call_in_netns(sandbox_path, inside, "eth0", GUEST_IP, HOST_IP)


# -- set-up cost ------------------------------------------------------------------------------
async def setup_cost(opts: Options, run_root: str, host: str) -> dict[str, dict[str, list[float]]]:
    counter = iter(range(1_000_000))

    def starter(net: Callable[[], NetworkConfig], **kw: Any) -> Candidate:
        async def run(_i: int) -> Sample:
            sb = Sandbox(f"nb{next(counter)}", run_root=run_root, network=net(), **kw)
            t0 = time.perf_counter()
            try:
                await sb.start()
                return {"start": time.perf_counter() - t0}
            finally:
                await sb.stop()

        return run

    cands: dict[str, Candidate] = {
        "boot_net_bridge": starter(lambda: NetworkConfig(mode="bridge", host_netns=host)),
        "boot_net_none": starter(lambda: NetworkConfig(mode="none")),
        "mock_net_bridge": starter(
            lambda: NetworkConfig(mode="bridge", host_netns=host), hypervisor="mock", **MOCK
        ),
        "mock_net_none": starter(lambda: NetworkConfig(mode="none"), hypervisor="mock", **MOCK),
    }
    print("set-up cost: --net bridge vs --net none", flush=True)
    return await alternate(cands, opts.runs, opts.warmup, settle=0.3)


# -- throughput and latency -------------------------------------------------------------------
def _receive(listener: socket.socket) -> tuple[float, int]:
    """Accept one connection and read it to the end: (seconds from accept, bytes)."""
    listener.settimeout(120)
    conn, _ = listener.accept()
    t0 = time.perf_counter()
    n = 0
    with conn:
        while chunk := conn.recv(1 << 20):
            n += len(chunk)
    return time.perf_counter() - t0, n


def _send(addr: tuple[str, int], size: int) -> float:
    """Connect, send `size` bytes, wait for the peer to close: seconds from connect."""
    block = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(100):
        try:
            s = socket.create_connection(addr, timeout=120)
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"nothing listens on {addr}")
    t0 = time.perf_counter()
    with s:
        for _ in range(size // len(block)):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    return time.perf_counter() - t0


async def transfer_pair(
    sb: Sandbox, netns: str, target: tuple[str, int], guest_peer: str, listen_ip: str
) -> Sample:
    """One host -> guest and one guest -> host transfer of MIB MiB; seconds each."""
    size = MIB << 20
    # host -> guest: the guest's nc listens, we send (to `target`, a published port or its IP).
    r = await sb.exec(f"(nc -l -p {PORT} > /dev/null &) ; sleep 0.2")
    if not r.ok:
        raise RuntimeError(f"guest nc -l: {r.stderr!r}")
    h2g = await asyncio.to_thread(call_in_netns, netns, _send, target, size)
    # guest -> host: we listen, the guest's dd | nc sends.
    listener = call_in_netns(netns, socket.create_server, (listen_ip, PORT + 1))
    with listener:
        got = asyncio.create_task(asyncio.to_thread(_receive, listener))
        r = await sb.exec(
            f"dd if=/dev/zero bs=1M count={MIB} 2>/dev/null | nc {guest_peer} {PORT + 1}",
            timeout=300,
        )
        g2h, n = await got
    if n != size:
        raise RuntimeError(f"guest -> host: {n} of {size} bytes arrived ({r.stderr!r})")
    return {"host_to_guest": h2g, "guest_to_host": g2h}


async def rtts(sb: Sandbox, gateway: str) -> list[float]:
    r = await sb.exec(f"ping -c {PINGS} -i 0.2 {gateway}", timeout=60)
    found = [float(x) / 1000 for x in re.findall(rb"time=([0-9.]+) ms", r.stdout)]
    if len(found) < PINGS // 2:
        raise RuntimeError(f"ping {gateway} from the guest: {r.stdout!r} {r.stderr!r}")
    return found


async def throughput(opts: Options, run_root: str) -> dict[str, dict[str, list[float]]]:
    async with namespace("vcbh") as host, namespace("vcbs") as sbns:
        await asyncio.to_thread(_veth, host, sbns)
        tap_cfg = NetworkConfig(mode="ns", netns_path=sbns, dns=[])
        user_cfg = NetworkConfig(
            mode="user", host_netns=host, ports=[PortMapping(PORT, PORT, host_ip="127.0.0.1")]
        )
        async with (
            Sandbox("nbtap", run_root=run_root, network=tap_cfg, memory_size=512) as tap,
            Sandbox("nbuser", run_root=run_root, network=user_cfg, memory_size=512) as user,
        ):

            async def over_tap(_i: int) -> Sample:
                return await transfer_pair(tap, host, (GUEST_IP, PORT), HOST_IP, HOST_IP)

            async def over_user(_i: int) -> Sample:
                return await transfer_pair(user, host, ("127.0.0.1", PORT), "10.0.2.2", "127.0.0.1")

            print(f"TCP throughput, {MIB} MiB each way: tap vs user-mode", flush=True)
            out = await alternate({"tap": over_tap, "user": over_user}, opts.runs, opts.warmup)
            out["tap"]["ping_rtt"] = await rtts(tap, HOST_IP)
            out["user"]["ping_rtt"] = await rtts(user, "10.0.2.2")
            return out


async def bench(opts: Options) -> Result:
    result = new_result("network", TITLE, opts, unit="s")
    async with temp_run_root() as run_root, namespace("vcbn") as host:
        samples = await setup_cost(opts, run_root, host)
        samples.update(await throughput(opts, run_root))
    add_metrics(result, samples)
    bridge, none = (
        median(result, "boot_net_bridge", "start"),
        median(result, "boot_net_none", "start"),
    )
    if bridge is not None and none is not None:
        add_limit(
            result,
            "start: --net bridge - --net none (median)",
            max(bridge - none, 0.0),
            SETUP_TARGET,
        )
    mb, mn = median(result, "mock_net_bridge", "start"), median(result, "mock_net_none", "start")
    if mb is not None and mn is not None:
        add_limit(result, "host side alone (mock VMM): bridge - none", mb - mn, SETUP_TARGET)
    for metric in ("host_to_guest", "guest_to_host"):
        add_ratio(
            result, f"{metric} time: tap / user-mode", ("tap", metric), ("user", metric),
            target=THROUGHPUT_TARGET,
        )  # fmt: skip
        for cand in ("tap", "user"):
            t = median(result, cand, metric)
            if t:
                result["notes"].append(f"{cand} {metric}: {MIB * 8 / t:.0f} Mbit/s (median)")
    result["notes"].append(
        "vhost-net: " + ("present" if os.path.exists("/dev/vhost-net") else "absent on this host "
                         "(virtio-net runs in QEMU's userspace)")
    )  # fmt: skip
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
