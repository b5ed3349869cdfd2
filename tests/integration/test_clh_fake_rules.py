"""The fake Cloud Hypervisor answers like the real server (codes per tests/data/specs/SOURCES.md).

Talks to the fake process with the driver's own API client, so these also check the client's
error mapping end to end: any non-2xx is a `ClhApiError` carrying the status and the JSON-array
error chain.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fakes.clh.launcher import REPO_ROOT
from leaks import LeakCheck
from virtcontainers.drivers.clh import ClhApi, ClhApiError

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(run_root: str) -> AsyncIterator[tuple[ClhApi, str]]:
    """A running fake VMM (no VM yet) and a client for it; the scratch dir for files."""
    check = LeakCheck(run_root)
    tmp = tempfile.mkdtemp(prefix="clhr-", dir="/tmp")
    sock = os.path.join(run_root, "api.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.clh", "--api-socket", f"path={sock}"],
        cwd=REPO_ROOT,
    )
    client = ClhApi(sock, timeout=5)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.025)
        yield client, tmp
        await client.shutdown_vmm()
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert not os.path.exists(sock)
    finally:
        await client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    await check.verify()


def vm_config(tmp: str, **extra: Any) -> dict[str, Any]:
    kernel = os.path.join(tmp, "vmlinux")
    with open(kernel, "wb") as f:
        f.write(b"\x7fELF")
    cfg: dict[str, Any] = {
        "payload": {"kernel": kernel, "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
        "memory": {"size": 128 << 20},
    }
    cfg.update(extra)
    return cfg


async def expect(status: int, text: str, call: Any) -> ClhApiError:
    with pytest.raises(ClhApiError) as ei:
        await call
    assert ei.value.status == status, str(ei.value)
    assert text in str(ei.value)
    return ei.value


async def test_lifecycle_rules(api: tuple[ClhApi, str]) -> None:
    client, tmp = api
    assert (await client.ping())["version"]
    await expect(500, "VM is not created", client.info())  # #8678: not the spec's 404
    await expect(500, "VM is not created", client.boot())
    await client.create(vm_config(tmp))
    assert (await client.info())["state"] == "Created"
    await expect(500, "already created", client.create(vm_config(tmp)))
    await expect(500, "Invalid transition", client.pause())  # #8680: not the spec's 405
    await client.boot()
    await expect(500, "Invalid VM state transition", client.boot())
    await expect(500, "Invalid transition", client.resume())
    await expect(500, "VM is not paused", client.snapshot(f"file://{tmp}"))
    await client.pause()
    await expect(500, "Invalid transition", client.pause())
    await client.snapshot(f"file://{tmp}")
    assert {"config.json", "state.json", "memory-ranges"} <= set(os.listdir(tmp))
    await client.resume()
    assert (await client.info())["state"] == "Running"


async def test_request_bodies_are_checked_against_the_spec(api: tuple[ClhApi, str]) -> None:
    client, tmp = api
    err = await expect(
        400,
        "cpus/boot_vcpus",
        client.create(vm_config(tmp, cpus={"boot_vcpus": 0, "max_vcpus": 1})),
    )
    assert err.detail.startswith("Error parsing request")
    await expect(
        400, "'tap_name' was unexpected", client.create(vm_config(tmp, net=[{"tap_name": "x"}]))
    )
    await expect(400, "'payload' is a required property", client.call("PUT", "vm.create", {}))
    await expect(404, "no such route", client.call("GET", "vm.nonsense"))
    await expect(400, "method not allowed", client.call("GET", "vm.boot"))
    await expect(
        500,
        "Max vCPUs lower than boot vCPUs",
        client.create(vm_config(tmp, cpus={"boot_vcpus": 3, "max_vcpus": 2})),
    )
    await expect(
        500,
        "requires using shared memory",
        client.create(
            vm_config(tmp, fs=[{"tag": "t", "socket": "/x", "num_queues": 1, "queue_size": 1024}])
        ),
    )


async def test_hotplug_codes(api: tuple[ClhApi, str]) -> None:
    client, tmp = api
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.write(b"\0" * 512)
    await expect(404, "VM is not created", client.add("disk", {"path": disk}))
    await client.create(vm_config(tmp, memory={"size": 128 << 20, "hotplug_size": 256 << 20}))
    await client.boot()
    info = await client.add("disk", {"path": disk, "id": "d0"})
    assert info is not None and info["id"] == "d0" and info["bdf"].startswith("0000:00:")
    await expect(409, "not unique", client.add("disk", {"path": disk, "id": "d0"}))
    await expect(400, "'bogus' was unexpected", client.add("disk", {"path": disk, "bogus": 1}))
    await expect(500, "Failed to open disk image", client.add("disk", {"path": tmp + "/none"}))
    await expect(404, "No device with id nope", client.remove_device("nope"))
    await client.remove_device("d0")
    await expect(500, "exceeds max vCPUs", client.resize(vcpus=3))
    await client.resize(vcpus=2, ram_bytes=384 << 20)
    config = (await client.info())["config"]
    assert config["cpus"]["boot_vcpus"] == 2
    assert config["memory"]["hotplugged_size"] == 256 << 20
    await expect(500, "cannot shrink", client.resize(ram_bytes=256 << 20))
