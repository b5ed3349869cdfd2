"""VMs from the factory (a template's clones, the VM cache server's pool) joined to the endpoint
of a network namespace as Kata joins factory VMs: the VMM runs outside the namespace, so the
tap made there (tc-redirected to the veth) is handed to QEMU open with a hot-added NIC, and
the guest is configured from what the namespace holds. Real QEMU (TCG); traffic only between
namespaces the test makes and the guest; the host's namespace left as it was."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_network import (
    IN4,
    MTU,
    OUT4,
    get,
    get_fails,
    guest_get,
    guest_serve,
    mac_of,
    second_endpoint_comes_and_goes,
    serve,
)
from test_template_clone import NAME, Made, made_template

from net_support import Namespace, namespaces, veth
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError, HypervisorError
from virtcontainers.factory import (
    DaemonSpec,
    daemon_status,
    sandbox_from_factory,
    start_daemon,
    stop_daemon,
)
from virtcontainers.network import NetworkConfig, PortMapping

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check", "host_untouched")]


@pytest.fixture(scope="module")
def template(guest_assets: Any) -> Iterator[Made]:
    """Two vCPUs: each NIC has two queues, so two open fds of a multiqueue tap."""
    yield from made_template(guest_assets, num_vcpus=2)


async def clone(template: Made, run_root: str, net: NetworkConfig) -> Sandbox:
    """A sandbox on a clone of the module's template, with network `net`."""
    return await sandbox_from_factory(
        template.config,
        template=NAME,
        templates=template.store_root,
        run_root=run_root,
        network=net,
    )


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


async def check_joined(sb: Sandbox, out: Namespace, sbns: Namespace, mac: str) -> None:
    """`sb`'s VM, running outside `sbns`, took its eth0: the same MAC and address in the
    guest, the tap tc-redirected to it, TCP both ways between `out` and the guest."""
    vmm = sb.hypervisor.get_pids()[0]
    assert netns_inode(vmm) != os.stat(sbns.path).st_ino  # the fd path, not QEMU in sbns
    assert "tap0_vc" in sbns.links()
    filters = sbns.run("tc", "filter", "show", "dev", "eth0", "ingress")
    assert "mirred (Egress Redirect to device tap0_vc)" in filters
    found = (await sb.exec(f"grep -l {mac} /sys/class/net/*/address")).stdout.decode()
    dev = found.strip().split("/")[-2]
    queues = (await sb.exec(f"ls /sys/class/net/{dev}/queues")).stdout.split()
    assert sorted(queues) == [b"rx-0", b"rx-1", b"tx-0", b"tx-1"]
    addrs = (await sb.exec(f"ip addr show dev {dev}")).stdout.decode()
    assert f"{IN4}/24" in addrs and "UP" in addrs and f"mtu {MTU}" in addrs, addrs
    assert f"default via {OUT4}" in (await sb.exec("ip route")).stdout.decode()
    assert (await sb.exec("hostname")).stdout.strip() == b"fvm-net"
    resolv = (await sb.read_file("/etc/resolv.conf")).decode()
    assert resolv == "nameserver 192.168.77.53\n"
    assert f"{IN4}\tfvm-net" in (await sb.read_file("/etc/hosts")).decode()
    # The MTU carried over: a full-size packet with DF set crosses, one byte more does not.
    out.run("ping", "-c", "2", "-W", "5", "-M", "do", "-s", str(MTU - 28), IN4)
    assert not out.ok("ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(MTU - 27), IN4)
    await guest_serve(sb, 80, "from-factory-vm")
    assert get(out, f"http://{IN4}/") == "from-factory-vm"
    assert await guest_get(sb, f"http://{OUT4}:8081/") == "from-outside"


@pytest.mark.parametrize("source", ["template", "cache"])
async def test_a_factory_vm_takes_the_namespace_endpoint(
    source: str, template: Made, run_root: str, tmp_path: Path
) -> None:
    async with namespaces(2) as (out, sbns):
        await veth(
            out, "vth0", [f"{OUT4}/24"], sbns, "eth0", [f"{IN4}/24"], mtu=MTU, b_gateway=OUT4
        )
        mac = await asyncio.to_thread(mac_of, sbns, "eth0")
        server = serve(out, tmp_path, 8081, "from-outside")
        net = NetworkConfig(
            mode="ns", netns_path=sbns.path, hostname="fvm-net", dns=["192.168.77.53"]
        )
        started = False
        try:
            if source == "cache":
                spec = DaemonSpec(size=1, template=NAME, template_root=template.store_root)
                await start_daemon(spec, run_root=run_root)
                started = True
                for _ in range(600):
                    if (await daemon_status(run_root)).vms:
                        break
                    await asyncio.sleep(0.1)
            sb = await sandbox_from_factory(
                template.config,
                template=NAME if source == "template" else None,
                templates=template.store_root,
                use_cache=source == "cache",
                run_root=run_root,
                network=net,
            )
            try:
                if source == "cache":  # the pool's VM, not a boot
                    status = await daemon_status(run_root)
                    assert status.handed_out == 1, status
                else:  # a clone: QEMU restored the template's state
                    vmm = sb.hypervisor.get_pids()[0]
                    assert b"-incoming" in Path(f"/proc/{vmm}/cmdline").read_bytes()
                await check_joined(sb, out, sbns, mac)
                # A second endpoint put into the namespace later goes the same way (the
                # sandbox's record says its VMM is outside), and comes out again.
                await second_endpoint_comes_and_goes(sb, out, sbns, "from-factory-vm")
            finally:
                await sb.stop()
            # Our taps and the endpoints' qdiscs are gone, the endpoints stay, unreachable.
            assert sbns.links() == ["eth0", "eth1", "lo"]
            assert "ingress" not in sbns.run("tc", "qdisc", "show", "dev", "eth0")
            assert get_fails(out, f"http://{IN4}/")
            assert Sandbox.list(run_root) == []
        finally:
            if started:
                await stop_daemon(run_root)
            server.kill()
            server.wait()


async def test_a_namespace_that_vanished_stops_the_vm(template: Made, run_root: str) -> None:
    """The namespace is checked once the VM is taken: a clear error naming it, the clone
    stopped, nothing left."""
    net = NetworkConfig(mode="ns", netns_path="/var/run/netns/vctn-gone")
    with pytest.raises(ConfigError, match="vctn-gone does not exist"):
        await clone(template, run_root, net)
    assert Sandbox.list(run_root) == []


async def test_bridge_mode_on_a_clone(template: Made, run_root: str, tmp_path: Path) -> None:
    """`--net bridge` on a clone, the bridge and its rules in a test namespace ("the host")
    linked to another ("the world"): the sandbox's namespace and veth are made, the veth's
    tap handed to the clone; a published port reaches the guest and outbound NAT reaches
    the world; afterwards the "host" has only what it had."""
    async with namespaces(2) as (host, world):
        await veth(host, "up0", ["203.0.113.1/24"], world, "wan0", ["203.0.113.2/24"])
        server = serve(world, tmp_path, 8090, "outside-world")
        net = NetworkConfig(mode="bridge", host_netns=host.path, ports=[PortMapping(8080, 80)])
        try:
            sb = await clone(template, run_root, net)
            try:
                assert sb.network is not None
                ip = str(sb.network.summary()["ip"])
                assert ip.startswith("10.213.0."), ip
                addrs = (await sb.exec("ip -4 addr")).stdout.decode()
                assert f"{ip}/" in addrs, addrs
                await guest_serve(sb, 80, "bridged-clone")
                assert get(host, "http://127.0.0.1:8080/") == "bridged-clone"
                assert get(world, "http://203.0.113.1:8080/") == "bridged-clone"
                assert await guest_get(sb, "http://203.0.113.2:8090/") == "outside-world"
            finally:
                await sb.stop()
        finally:
            server.kill()
            server.wait()
        assert host.links() == ["lo", "up0"]
        assert host.run("nft", "list", "ruleset").strip() == ""
        assert Sandbox.list(run_root) == []


async def test_more_endpoints_than_root_ports_fail_cleanly(template: Made, run_root: str) -> None:
    """A namespace with more endpoints than the clone has free PCIe root ports: the NIC that
    finds none fails the hand-out with the QEMU driver's error, and the clone, its taps and
    the endpoints' tc filters are all undone."""
    async with namespaces(2) as (out, sbns):
        for n in range(3):
            await veth(out, f"vth{n}", [f"192.168.{80 + n}.1/24"], sbns, f"eth{n}", [])
        net = NetworkConfig(mode="ns", netns_path=sbns.path, dns=[])
        with pytest.raises(HypervisorError, match="no free pcie-root-port"):
            await clone(template, run_root, net)
        assert sbns.links() == ["eth0", "eth1", "eth2", "lo"]
        for n in range(3):
            assert "ingress" not in sbns.run("tc", "qdisc", "show", "dev", f"eth{n}")
        assert Sandbox.list(run_root) == []
