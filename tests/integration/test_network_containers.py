"""A container's view of its sandbox's network, on real QEMU inside test namespaces: the
guest's /etc/hosts, /etc/resolv.conf and /etc/hostname bound into its root (as Kata does),
its hostname the sandbox's; and `virtc run --image` bridged by default (NAT to "the world")."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_network import IN4, OUT4, serve

from net_support import namespaces, veth
from virtcontainers import Sandbox
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image
from virtcontainers.network import NetworkConfig

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check", "host_untouched")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    s = ImageStore(str(tmp_path_factory.mktemp("images")))
    s.import_archive(busybox_image())
    yield s


async def test_container_gets_the_guests_network_files(
    run_root: str, store: ImageStore, guest_assets: Any, tmp_path: Path
) -> None:
    async with namespaces(2) as (out, sbns):
        await veth(out, "vth0", [f"{OUT4}/24"], sbns, "eth0", [f"{IN4}/24"], b_gateway=OUT4)
        server = serve(out, tmp_path, 8081, "from-outside")
        cfg = NetworkConfig(
            mode="ns",
            netns_path=sbns.path,
            hostname="ctr-net",
            dns=["192.168.77.53"],
            dns_search=["example.test"],
            extra_hosts={"outside.test": OUT4},
        )
        try:
            async with Sandbox(
                image="busybox", image_store=store.root, run_root=run_root, network=cfg
            ) as sb:
                script = (
                    "cat /etc/hosts; echo --; cat /etc/resolv.conf; echo --; cat /etc/hostname;"
                    " echo --; hostname; wget -q -O - http://outside.test:8081/"
                )
                c = await sb.create_container(["sh", "-c", script])
                result = await c.run(timeout=60)
                assert result.exit_code == 0, result
                hosts, resolv, name_file, rest = result.stdout.decode().split("--\n")
                assert hosts == (await sb.read_file("/etc/hosts")).decode()
                assert f"{OUT4}\toutside.test" in hosts and f"{IN4}\tctr-net" in hosts
                assert resolv == "nameserver 192.168.77.53\nsearch example.test\n"
                assert name_file == "ctr-net\n"
                assert rest.split() == ["ctr-net", "from-outside"]
        finally:
            server.kill()
            server.wait()


def test_cli_run_image_is_bridged_by_default(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """`virtc run --image` (no --net) inside a test namespace ("the host") linked to "the
    world": the container has a bridge address and reaches the world through NAT."""
    import asyncio

    async def body() -> None:
        async with namespaces(2) as (host, world):
            await veth(host, "up0", ["203.0.113.1/24"], world, "wan0", ["203.0.113.2/24"])
            server = serve(world, tmp_path, 8090, "outside-world")
            env = dict(os.environ, VC_RUN_ROOT=run_root, VC_IMAGE_ROOT=store.root)
            argv = [sys.executable, "-m", "virtcontainers.cli", "run", "--image", "busybox"]
            script = "ip -4 addr show eth0; wget -q -O - http://203.0.113.2:8090/"
            try:
                res = await asyncio.to_thread(
                    subprocess.run,
                    ["nsenter", f"--net={host.path}", "--", *argv, "--", "sh", "-c", script],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=300,
                    check=False,
                )
            finally:
                server.kill()
                server.wait()
            assert res.returncode == 0, res.stderr
            assert "inet 10.213.0." in res.stdout and "outside-world" in res.stdout
            # The bridge, its rules and the sandbox's namespace went with the sandbox.
            assert host.links() == ["lo", "up0"]
            assert host.run("nft", "list", "ruleset").strip() == ""

    asyncio.run(body())
