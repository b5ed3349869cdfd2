"""VM templates on real QEMU: boot a template, save it, start clones from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from virtcontainers.agent import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import SerialPort
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import HypervisorError
from virtcontainers.hypervisor import VMState
from virtcontainers.types import Socket

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

BOOT_TIMEOUT = 60.0


def config(guest_assets: Any, tpl: Path, **kw: Any) -> HypervisorConfig:
    return HypervisorConfig(
        kernel_path=guest_assets.kernel,
        initrd_path=guest_assets.initrd,
        memory_size=256,
        memory_path=str(tpl / "memory"),
        devices_state_path=str(tpl / "state"),
        **kw,
    )


async def create(run_root: str, cfg: HypervisorConfig, id: str) -> tuple[QemuHypervisor, str]:
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox(id, None, cfg)
    sock = drv.generate_socket(id, use_vsock=False)
    assert isinstance(sock, Socket)
    await drv.add_device(SerialPort(sock))
    return drv, sock.host_path


async def make_template(run_root: str, guest_assets: Any, tpl: Path) -> None:
    drv, agent_sock = await create(
        run_root, config(guest_assets, tpl, boot_to_be_template=True), "tpl"
    )
    try:
        await drv.start_sandbox(BOOT_TIMEOUT)
        assert "spawn=deny" in drv.argv[drv.argv.index("-sandbox") + 1]  # no shell needed
        agent = await AgentClient.connect(agent_sock, BOOT_TIMEOUT)
        await agent.ping()
        await agent.close()
        await drv.pause_sandbox()
        await drv.save_sandbox()
    finally:
        await drv.stop_sandbox()
    assert (tpl / "state").stat().st_size > 0
    assert (tpl / "memory").stat().st_size == 256 << 20


async def test_clone_from_template_runs_agent(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    await make_template(run_root, guest_assets, tmp_path)
    clones = []
    try:
        for n in range(2):
            drv, sock = await create(
                run_root, config(guest_assets, tmp_path, boot_from_template=True), f"clone{n}"
            )
            clones.append(drv)
            await drv.start_sandbox(BOOT_TIMEOUT)
            assert drv.state == VMState.RUNNING
            assert drv.argv[drv.argv.index("-incoming") + 1] == "defer"
            assert (await drv._execute("query-status"))["status"] == "running"
            agent = await AgentClient.connect(sock, BOOT_TIMEOUT)
            try:
                res = await agent.exec(["sh", "-c", f"echo clone{n} > /tmp/who; cat /tmp/who"])
                assert res.stdout == f"clone{n}\n".encode()
            finally:
                await agent.close()
        # Private copy-on-write memory: the template file is not changed by the clones.
        await clones[0].check()
    finally:
        for drv in clones:
            await drv.stop_sandbox()
    assert os.path.exists(tmp_path / "memory")


@pytest.mark.parametrize(
    "name",
    [
        "t $(cd ..;cd ..;touch pwned) 'q' \"d\"",  # a command substitution, quoted words
        "it's \"x",  # unbalanced quotes
    ],
)
async def test_template_root_with_hostile_name(
    run_root: str, guest_assets: Any, tmp_path: Path, name: str
) -> None:
    """The template's files are handed to QEMU, never spelled out to a shell."""
    tpl = tmp_path / name
    tpl.mkdir()
    await make_template(run_root, guest_assets, tpl)
    drv, sock = await create(run_root, config(guest_assets, tpl, boot_from_template=True), "c")
    try:
        await drv.start_sandbox(BOOT_TIMEOUT)
        assert "spawn=deny" in drv.argv[drv.argv.index("-sandbox") + 1]
        agent = await AgentClient.connect(sock, BOOT_TIMEOUT)
        try:
            assert (await agent.exec(["echo", "clone"])).stdout == b"clone\n"
        finally:
            await agent.close()
    finally:
        await drv.stop_sandbox()
    assert sorted(os.listdir(tpl)) == ["memory", "state"]
    assert not os.path.exists(os.path.join(run_root, "pwned"))


async def test_clone_with_missing_state_fails_clearly(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    await make_template(run_root, guest_assets, tmp_path)
    (tmp_path / "state").write_bytes(b"garbage")
    drv, _ = await create(
        run_root, config(guest_assets, tmp_path, boot_from_template=True), "clone"
    )
    with pytest.raises(HypervisorError, match="migration failed"):
        await drv.start_sandbox(BOOT_TIMEOUT)
    assert drv.state == VMState.STOPPED
    assert not os.path.exists(os.path.join(run_root, "vm", "clone"))
