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
from test_network import IN4, OUT4, get, get_fails, guest_get, guest_serve, mac_of, serve
from test_template_clone import NAME, Made, made_template

from net_support import Namespace, namespaces, veth
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError
from virtcontainers.factory import (
    DaemonSpec,
    daemon_status,
    sandbox_from_factory,
    start_daemon,
    stop_daemon,
)
from virtcontainers.network import NetworkConfig

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check", "host_untouched")]


@pytest.fixture(scope="module")
def template(guest_assets: Any) -> Iterator[Made]:
    yield from made_template(guest_assets)


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
    addrs = (await sb.exec(f"ip addr show dev {dev}")).stdout.decode()
    assert f"{IN4}/24" in addrs and "UP" in addrs, addrs
    assert f"default via {OUT4}" in (await sb.exec("ip route")).stdout.decode()
    assert (await sb.exec("hostname")).stdout.strip() == b"fvm-net"
    resolv = (await sb.read_file("/etc/resolv.conf")).decode()
    assert resolv == "nameserver 192.168.77.53\n"
    await guest_serve(sb, 80, "from-factory-vm")
    assert get(out, f"http://{IN4}/") == "from-factory-vm"
    assert await guest_get(sb, f"http://{OUT4}:8081/") == "from-outside"


@pytest.mark.parametrize("source", ["template", "cache"])
async def test_a_factory_vm_takes_the_namespace_endpoint(
    source: str, template: Made, run_root: str, tmp_path: Path
) -> None:
    async with namespaces(2) as (out, sbns):
        await veth(out, "vth0", [f"{OUT4}/24"], sbns, "eth0", [f"{IN4}/24"], b_gateway=OUT4)
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
            finally:
                await sb.stop()
            # Our tap and the endpoint's qdisc are gone, the endpoint stays, unreachable.
            assert sbns.links() == ["eth0", "lo"]
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
        await sandbox_from_factory(
            template.config,
            template=NAME,
            templates=template.store_root,
            run_root=run_root,
            network=net,
        )
    assert Sandbox.list(run_root) == []
