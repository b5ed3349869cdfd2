"""Sandbox networking: set-up cost, TCP throughput and latency, tap (tc redirect) vs QEMU
user-mode networking, measured in the same run.

Set-up cost: a sandbox start with `--net bridge` against one with `--net none` (both
configure the guest with the agent's NETWORK request: loopback, hostname, /etc/hosts),
alternated, 2 x --runs starts each; and the host side alone (mock VMM: namespace, veth,
bridge, nftables, no guest), in wall time and in CPU time, in all and the part made before the
VMM is launched (the rest overlaps the boot). Each start is cut in three: before the VMM's
launch (the host's namespace and tap), the launch to the agent's answer (the boot), and
after it (the bridge joined, the agent's NETWORK request). Target: <= 50 ms extra, checked on
the difference of the two candidates' medians of the first and third parts together
(`net_part`), where all of the network's work is but for the NIC's presence during the boot
(its PCI enumeration and probe, 2-3 ms by initcall_debug), with a 90% bootstrap interval.
The whole start's difference is given too, with its interval: it holds the boots' own
spread, a second over a few dozen starts (below), which no affordable number of starts
narrows to 50 ms (its interval was -170..+330 ms over 24 + 24 starts on a quiet machine),
and so is the boot part's difference, which should be near 0. Also the NETWORK request alone,
QEMU's CPU time when the start returns, and the start's difference run by run (bridge and
none back to back).

Why the starts spread (console stamps per boot phase, the guest's printk clock against the
host's, per-thread schedstat of QEMU; 2026-12-06; docs/architecture.md 6.4): QEMU's CPU time
when the start returns equals the start within 50 ms on a quiet machine, so the guest's one
vCPU did not wait for a host CPU; the spread (1.3 s in 12 boots) is CPU time the same guest
work took. Part of it was the guest kernel's TSC calibration (the quick PIT one fails under
TCG in about half the boots, the fallback took 130-220 ms instead of ~10): gone, the host's
TSC rate is on the command line. So is a host-side wait: the agent client hung up on a hello
unanswered for 2 s and paused before the next, and an agent that started in the pause was
answered up to 0.3 s late (a start now keeps its first connection). The rest is the host's
speed: most phases of a slow boot are slower alike, and a fixed Python loop's CPU time varies
as much (this machine is itself a KVM guest sharing a physical host); on a loaded machine the
vCPU's waits for a CPU (seconds) add to that. Neither is the network's: more starts and the
interval are the answer, not a statistic that hides them.

Throughput: iperf3 (from the Debian test image, in a container of each sandbox) against an
iperf3 server on the host side, one TCP stream for 5 s (the first second omitted) each
way: "host -> guest" with -R (the host sends), "guest -> host" without. The metric is the
seconds 100 MiB take at the rate the receiver measured. "tap" is Kata's model (a veth in the
sandbox's namespace, a tap joined to it with tc redirects; the server at the veth's far end);
"user" is QEMU's user-mode stack (the guest connects to its gateway, which QEMU forwards to
the server on the host's loopback). Target: tap >= 2x user (time ratio tap / user <= 0.5).
Latency: 20 pings from the guest to its gateway (the host side's address; QEMU's stack for
user mode), median and p99 RTT.

On this machine QEMU runs under TCG (no usable /dev/kvm) and without vhost-net: virtio-net
is emulated in QEMU's userspace and the guest's one vCPU is emulated too, so both paths are
bound by the guest's CPU (the TCP stack and iperf3 in an emulated vCPU), and the ratio says
what the tap saves over QEMU's user-mode stack (which ends every TCP connection in QEMU and
opens another to the server), not what KVM with vhost-net would reach.

Everything runs inside network namespaces this script makes ("the host"), never the
machine's own: no traffic leaves them.

    .venv/bin/python benchmarks/network.py [--runs 5] [--quick]

VC_BENCH_NET_THROUGHPUT=0 measures the set-up cost alone.

Where a bridge's extra start time goes (found with the guest kernel's timestamps and
initcall_debug, function_graph traces of the NETWORK request, the agent's vc.debug log and
QEMU's CPU time; 2026-12-06, boots alternated in one run at a load of 1-1.6 on 2 CPUs): on
the host before the VMM is launched, the namespace, veth and tap only (the rest is made while
the VM boots); the firmware runs no option ROM for the NIC (`romfile=`); in the kernel's
boot, nothing measurable (initcall_debug, 4 boots each: the initcalls' median times differ by
2 ms in all, the NIC's virtio-pci probe takes 3 ms). The rest is the guest's one emulated
vCPU, which is never idle from its kernel's start to the ready marker: loading failover,
net_failover and virtio_net with the NIC's probe (register_netdev and its IPv4/IPv6 set-up,
~20-30 ms), then the NETWORK request's work for the link (up: its receive ring filled, NAPI,
the qdisc, IPv4/IPv6 notifiers; addresses, routes; ~20 ms). What was cut: each module's
signature check (sha256 + RSA-4096, ~5 ms a module under TCG: the initrd carries them
unsigned, the three NIC modules 42 -> 21 ms, every boot ~70 ms less); the host's own IPv6 on
the tap and on the veth's bridge end (their DAD, MLD and router solicitations were 15 of the
20 frames the guest had to handle when the start returned); the NIC's driver is loaded right
after the ready marker instead of before it, so that it runs while the host answers the
marker and sends NETWORK (which waits for the link, woken by the kernel's link announcement:
before, a dump every 10 ms), in vCPU time the background module loading had (guest time from
the agent's start to NETWORK's end, bridge - none: 43 -> 34 ms, 8 boots each); no duplicate
address detection and no waiting for carrier, link-local addresses or router discovery. Tried
and left: `preempt=full` (the background loader, at nice 19, holds the vCPU inside
finit_module: it doubled loopback's bring-up in one trace, but full preemption did not
shorten the start), .BTF stripped from the modules (no gain beyond the signatures'). What the
start's NETWORK request now holds for a bridge is the NIC driver's remaining load and the
link's set-up; bringing loopback up (~30 ms, its first local routes) is in both starts. Later
(the agent's debug log stamps each module load and NETWORK's steps on the guest's clock): the
background driver loading (nice 19, but the SCSI controller's bus scan runs in kernel workers)
ran through a bridge start's NETWORK request; it now waits until NETWORK is answered (guest
time from the marker to the answer, load 7-11: bridge 498 -> 378 ms, none 280 -> 257 ms; at
load ~2 no difference beyond the spread). The
host makes the tap in the thread that creates the namespace (ioctls, no second visit, the
veth's inner MAC and MTU chosen, not read back): mock creates, bridge - none 81 -> 50 ms at
load ~7. A new bridge's own link chatter (its DAD, a router solicitation, MLDv2 and IGMPv3
reports: 5-7 frames QEMU kept for the guest until its link came up) no longer reaches a
bridge guest: its link up 31.6 -> 20.1 ms of the agent's CPU (15 alternated starts each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
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
    median_difference_ci,
    new_result,
    temp_run_root,
)
from pyroute2 import IPRoute

from virtcontainers.containers import Container
from virtcontainers.images import ImageStore
from virtcontainers.images.build import debian_image
from virtcontainers.network import NetworkConfig
from virtcontainers.network.netlink import call_in_netns, create_netns, remove_netns
from virtcontainers.network.sandbox_net import USER_NET, SandboxNetwork
from virtcontainers.sandbox import Sandbox
from virtcontainers.types import HypervisorType

TITLE = "Sandbox networking: set-up cost, TCP throughput and ping RTT, tap vs user-mode (TCG)"
SETUP_TARGET = 0.050
BOOT_RUNS_FACTOR = 2
"""Starts per candidate: 2 x --runs. The start's difference is a few tens of milliseconds in
boots that spread over hundreds (the host's own speed varies: see the module's text)."""
THROUGHPUT_TARGET = 0.5
"""tap transfer time / user-mode transfer time (<= 0.5: at least twice the throughput)."""
SECONDS = 5
PORT = 5201
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
def cpu_time() -> float:
    """CPU seconds (user + system) of this process's threads and its waited-for children: the
    host-side work itself, which a loaded machine stretches less than wall time."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def vmm_cpu(sb: Sandbox) -> float:
    """CPU seconds the VMM process has used so far (user + system, from /proc)."""
    pid = sb.hypervisor.get_pids()[0]
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def timed_calls(cls: type, name: str) -> Iterator[list[tuple[float, float]]]:
    """(start, end) perf_counter stamps of each call of the coroutine method `cls.name`
    (for the start's NETWORK request and its wait for the agent), appended to the list
    yielded."""
    seen: list[tuple[float, float]] = []
    real = getattr(cls, name)

    async def timed(self: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await real(self, *args, **kw)
        finally:
            seen.append((t0, time.perf_counter()))

    setattr(cls, name, timed)
    try:
        yield seen
    finally:
        setattr(cls, name, real)


async def setup_cost(opts: Options, run_root: str, host: str) -> dict[str, dict[str, list[float]]]:
    counter = iter(range(1_000_000))

    def starter(net: Callable[[], NetworkConfig], **kw: Any) -> Candidate:
        async def run(_i: int) -> Sample:
            sb = Sandbox(f"nb{next(counter)}", run_root=run_root, network=net(), **kw)
            t0, c0 = time.perf_counter(), cpu_time()
            try:
                with (
                    timed_calls(SandboxNetwork, "configure_guest") as requests,
                    timed_calls(Sandbox, "_connect_agent") as connects,
                ):
                    await sb.create()  # all the host side the VMM waits for
                    created = time.perf_counter()
                    await sb.start()  # the bridge and its rules: while the VM boots
                end = time.perf_counter()
                sample = {
                    "start": end - t0,
                    "start_cpu": cpu_time() - c0,
                    "before_launch": created - t0,
                }
                if sb.hypervisor_type is not HypervisorType.MOCK:
                    connected = connects[0][1]
                    sample["boot"] = connected - created
                    sample["after_boot"] = end - connected
                    sample["net_part"] = (created - t0) + (end - connected)
                    sample["network_request"] = requests[0][1] - requests[0][0]
                    sample["vmm_cpu"] = vmm_cpu(sb)
                return sample
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
    return await alternate(cands, opts.scaled(BOOT_RUNS_FACTOR), opts.warmup, settle=0.3)


# -- throughput and latency -------------------------------------------------------------------
@contextlib.contextmanager
def iperf3_server(netns: str) -> Iterator[None]:
    """`iperf3 -s` in the bench's host namespace (every address, IPv4 and IPv6), stopped after."""
    binary = shutil.which("iperf3")
    if binary is None:
        raise RuntimeError("iperf3 is missing on the host: apt-get install iperf3")
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns}", "--", binary, "-s", "-p", str(PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


async def iperf3(ctr: Container, server: str, reverse: bool) -> float:
    """One iperf3 run from the guest's container to `server`: seconds per 100 MiB at the rate
    the receiver saw (`reverse`: the host sends, the guest receives)."""
    argv = ["iperf3", "-c", server, "-p", str(PORT), "-t", str(SECONDS), "-O", "1", "-J"]
    for _ in range(50):  # the server may still be finishing the previous test
        r = await ctr.exec([*argv, *(["-R"] if reverse else [])], timeout=SECONDS + 60)
        if r.ok:
            break
        if b"busy" not in r.stdout + r.stderr:
            raise RuntimeError(f"iperf3 -c {server}: {r.stdout[-500:]!r} {r.stderr[-500:]!r}")
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError(f"iperf3 server {server} stayed busy")
    bits = float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"])
    if bits <= 0:
        raise RuntimeError(f"iperf3 -c {server}: nothing received")
    return (100 << 20) * 8 / bits


async def rtts(sb: Sandbox, gateway: str) -> list[float]:
    r = await sb.exec(f"ping -c {PINGS} -i 0.2 {gateway}", timeout=60)
    found = [float(x) / 1000 for x in re.findall(rb"time=([0-9.]+) ms", r.stdout)]
    if len(found) < PINGS // 2:
        raise RuntimeError(f"ping {gateway} from the guest: {r.stdout!r} {r.stderr!r}")
    return found


async def throughput(opts: Options, run_root: str) -> dict[str, dict[str, list[float]]]:
    store = ImageStore(os.path.join(run_root, "images"))
    (image,) = await asyncio.to_thread(store.import_archive, debian_image())
    async with namespace("vcbh") as host, namespace("vcbs") as sbns:
        await asyncio.to_thread(_veth, host, sbns)
        tap_cfg = NetworkConfig(mode="ns", netns_path=sbns, dns=[])
        user_cfg = NetworkConfig(mode="user", host_netns=host, dns=[])
        kw: dict[str, Any] = {
            "run_root": run_root, "memory_size": 512, "image": image.name,
            "image_store": store.root,
        }  # fmt: skip
        with iperf3_server(host):
            async with (
                Sandbox("nbtap", network=tap_cfg, **kw) as tap,
                Sandbox("nbuser", network=user_cfg, **kw) as user,
            ):
                guests = {}
                for name, sb in (("tap", tap), ("user", user)):
                    ctr = await sb.create_container(["sleep", "infinity"])
                    await ctr.start(detach=True)
                    guests[name] = ctr

                def over(name: str, server: str) -> Candidate:
                    async def run(_i: int) -> Sample:
                        return {
                            "host_to_guest": await iperf3(guests[name], server, reverse=True),
                            "guest_to_host": await iperf3(guests[name], server, reverse=False),
                        }

                    return run

                print(f"TCP throughput, iperf3 {SECONDS} s each way: tap vs user", flush=True)
                out = await alternate(
                    {"tap": over("tap", HOST_IP), "user": over("user", str(USER_NET[2]))},
                    opts.runs,
                    opts.warmup,
                )
                out["tap"]["ping_rtt"] = await rtts(tap, HOST_IP)
                out["user"]["ping_rtt"] = await rtts(user, str(USER_NET[2]))
                return out


async def bench(opts: Options) -> Result:
    result = new_result("network", TITLE, opts, unit="s")
    samples: dict[str, dict[str, list[float]]] = {}

    def _paired(a: str, b: str, metric: str) -> list[float]:
        """Run i of `a` minus run i of `b` (measured in the same cycle of orders)."""
        xs, ys = samples.get(a, {}).get(metric, []), samples.get(b, {}).get(metric, [])
        return [x - y for x, y in zip(xs, ys, strict=False)]

    async with temp_run_root() as run_root, namespace("vcbn") as host:
        samples.update(await setup_cost(opts, run_root, host))
        if os.environ.get("VC_BENCH_NET_THROUGHPUT", "1") != "0":
            samples.update(await throughput(opts, run_root))
    add_metrics(result, samples)
    bridge, none = (
        median(result, "boot_net_bridge", "start"),
        median(result, "boot_net_none", "start"),
    )

    def resolved(metric: str, what: str, judge: bool = True) -> float:
        """The note on bridge - none for `metric`: difference of medians with its 90%
        bootstrap interval and (`judge`) what that says of the target; returns the
        difference."""
        xs, ys = samples["boot_net_bridge"][metric], samples["boot_net_none"][metric]
        diff = statistics.median(xs) - statistics.median(ys)
        lo, hi = median_difference_ci(xs, ys)
        verdict = "met" if hi <= SETUP_TARGET else "missed" if lo > SETUP_TARGET else "not resolved"
        result["notes"].append(
            f"{what}, bridge - none, difference of medians {diff * 1000:.0f} ms, 90% bootstrap "
            f"interval {lo * 1000:.0f} to {hi * 1000:.0f} ms over {len(xs)} + {len(ys)} starts"
            + (f": the {SETUP_TARGET * 1000:.0f} ms target is {verdict} by it" if judge else "")
        )
        return diff

    if bridge is not None and none is not None:
        # Not clamped at 0: a negative difference is noise, and says so.
        add_limit(
            result, "start's network parts: --net bridge - --net none (median)",
            resolved("net_part", "the start's network parts (before the launch and after the "
                     "agent's answer)"),
            SETUP_TARGET,
        )  # fmt: skip
        resolved("start", "the whole start (the boots' spread included)")
        resolved("boot", "the boot alone (the same guest work but the NIC's: ~0 expected)", False)
        spread = [
            median(result, c, "start", "max") - median(result, c, "start", "min")  # type: ignore[operator]
            for c in ("boot_net_bridge", "boot_net_none")
        ]
        result["notes"].append(
            f"starts spread over {spread[0]:.2f} s (bridge) and {spread[1]:.2f} s (none), "
            "max - min (the host's own speed varies, see the docstring)"
        )
        parts = []
        for metric, what in (
            ("before_launch", "before the VMM's launch"),
            ("boot", "launch to the agent's answer"),
            ("after_boot", "then the bridge joined and NETWORK"),
        ):
            b = median(result, "boot_net_bridge", metric)
            n = median(result, "boot_net_none", metric)
            if b is not None and n is not None:
                parts.append(f"{what} {(b - n) * 1000:+.0f} ms")
        if parts:
            result["notes"].append(
                "start, bridge - none, by part (differences of medians): " + ", ".join(parts)
                + "; the boot's part carries the boots' noise, the others little"
            )  # fmt: skip
        pairs = _paired("boot_net_bridge", "boot_net_none", "start")
        if pairs:
            result["notes"].append(
                f"start, bridge - none, run by run (back to back): median "
                f"{statistics.median(pairs) * 1000:.0f} ms over {len(pairs)} pairs"
            )
    for metric, what in (
        ("network_request", "the start's NETWORK request (host to guest and back)"),
        ("vmm_cpu", "QEMU's CPU time when the start returns"),
    ):
        b = median(result, "boot_net_bridge", metric)
        n = median(result, "boot_net_none", metric)
        if b is not None and n is not None:
            result["notes"].append(
                f"{what}: bridge {b * 1000:.0f} ms, none {n * 1000:.0f} ms (medians), "
                f"difference {(b - n) * 1000:.0f} ms"
            )
    mb, mn = median(result, "mock_net_bridge", "start"), median(result, "mock_net_none", "start")
    if mb is not None and mn is not None:
        add_limit(result, "host side alone (mock VMM): bridge - none", mb - mn, SETUP_TARGET)
    lb = median(result, "mock_net_bridge", "before_launch")
    ln = median(result, "mock_net_none", "before_launch")
    if lb is not None and ln is not None:
        add_limit(
            result, "host side before the VMM is launched (mock): bridge - none", lb - ln,
            SETUP_TARGET,
        )  # fmt: skip
        result["notes"].append(
            "before the VMM is launched a bridge sandbox gets only its namespace and tap; the "
            "veth with its inner addresses and tc redirect, the bridge, the veth's place on it "
            "and the NAT/port/forward rules are made while the VM boots (the mock's start "
            "waits for them: the host side alone above)"
        )
    cb = median(result, "mock_net_bridge", "start_cpu")
    cn = median(result, "mock_net_none", "start_cpu")
    if cb is not None and cn is not None:
        result["notes"].append(
            f"host side alone, CPU time (this process and its children): bridge - none = "
            f"{(cb - cn) * 1000:.1f} ms (median); the wall-time difference above also holds "
            f"the kernel's waits and, on a busy machine, waiting for a CPU"
        )
    load = os.getloadavg()[0]
    result["notes"].append(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} CPUs")
    for metric in ("host_to_guest", "guest_to_host"):
        add_ratio(
            result, f"{metric} time: tap / user-mode", ("tap", metric), ("user", metric),
            target=THROUGHPUT_TARGET,
        )  # fmt: skip
        for cand in ("tap", "user"):
            t = median(result, cand, metric)
            if t:
                mbit = 100 * 8 * 1.048576 / t
                result["notes"].append(f"{cand} {metric}: {mbit:.0f} Mbit/s (median)")
    result["notes"].append(
        "vhost-net: " + ("present" if os.path.exists("/dev/vhost-net") else "absent on this host "
                         "(virtio-net runs in QEMU's userspace)")
    )  # fmt: skip
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
