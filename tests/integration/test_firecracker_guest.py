"""Guest-side Firecracker checks: the project's kernel and initrd boot, the agent answers over
the hybrid vsock, a placeholder-drive "hotplug" shows in the guest, a pause keeps the agent.

These need a host whose KVM can run an ordinary guest (Firecracker has no emulator fallback).
"""

from __future__ import annotations

import os

import pytest
from fc_support import make_config, real_backend, short_tmp  # noqa: F401 - fixture

from virtcontainers import host
from virtcontainers.agent import AGENT_PORT, AgentClient, HybridVsock
from virtcontainers.devices import BlockDrive
from virtcontainers.drivers.firecracker import Firecracker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not host.kvm_usable(),
        reason="KVM cannot run a guest on this host (host.kvm_usable() is false); "
        "Firecracker needs it for guest-side checks",
    ),
]


async def test_agent_over_hybrid_vsock_and_disk_hotplug(short_tmp: str) -> None:  # noqa: F811
    from virtcontainers.guest import ensure_assets

    assets = ensure_assets()
    backend = real_backend()
    disk = os.path.join(short_tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    fc = Firecracker(run_root=short_tmp)
    async with fc:
        await fc.create_sandbox(
            "fc-guest", None, make_config(backend, (str(assets.kernel), str(assets.initrd)))
        )
        await fc.start_sandbox(timeout=30)
        agent = await AgentClient.connect(HybridVsock(fc.vsock_path, AGENT_PORT), timeout=30)
        try:
            result = await agent.exec(["echo", "hello from firecracker"])
            assert result.exit_code == 0
            assert result.stdout == b"hello from firecracker\n"
            drive = await fc.hotplug_add_device(BlockDrive(id="data", path=disk))
            name = "vd" + chr(ord("a") + drive.index)
            size = await agent.exec(["cat", f"/sys/block/{name}/size"])
            assert size.stdout.strip() == str((4 << 20) // 512).encode()
            await fc.pause_sandbox()
            await fc.resume_sandbox()
            assert (await agent.exec(["true"])).exit_code == 0
        finally:
            await agent.close()
        with open(fc.console_path, "rb") as f:
            assert b"VC-AGENT-READY" in f.read()
