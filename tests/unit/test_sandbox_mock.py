"""Sandbox API on the mock driver: lifecycle, persistence across instances, bad input."""

from __future__ import annotations

import os

import pytest

from virtcontainers import ConfigError, StateError, UnsupportedError
from virtcontainers.hypervisor import VMState
from virtcontainers.sandbox import MOCK_GUEST, Sandbox

MOCK_CFG = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}


async def test_lifecycle_and_persistence(run_root: str) -> None:
    sb = Sandbox("mock1", "mock", run_root=run_root, num_vcpus=2, **MOCK_CFG)
    await sb.start()
    assert sb.state is VMState.RUNNING
    [info] = Sandbox.list(run_root)
    assert (info.id, info.hypervisor, info.state, info.vcpus) == ("mock1", "mock", "running", 2)

    other = await Sandbox.attach("mock1", run_root=run_root)
    assert other.state is VMState.RUNNING
    assert other.config.num_vcpus == 2
    await other.pause()
    assert Sandbox.list(run_root)[0].state == "paused"
    with pytest.raises(StateError, match="paused"):
        await other.pause()
    await other.resume()
    await other.stop()
    assert Sandbox.list(run_root) == []
    assert os.listdir(os.path.join(run_root, "sbs")) == []


async def test_context_manager_cleans_up_on_error(run_root: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with Sandbox("mock2", "mock", run_root=run_root, **MOCK_CFG):
            raise RuntimeError("boom")
    assert Sandbox.list(run_root) == []


async def test_bad_input(run_root: str) -> None:
    with pytest.raises(ConfigError, match="unknown sandbox option 'cpus'"):
        await Sandbox("m", "mock", run_root=run_root, cpus=2, **MOCK_CFG).start()
    with pytest.raises(ConfigError, match="Unknown hypervisor type vmware"):
        Sandbox("m", "vmware", run_root=run_root)
    with pytest.raises(ConfigError):
        Sandbox("../escape", "mock", run_root=run_root)
    with pytest.raises(StateError, match="no such sandbox: ghost"):
        await Sandbox.attach("ghost", run_root=run_root)
    with pytest.raises(ConfigError, match="Missing image and initrd path"):
        await Sandbox("m", "mock", run_root=run_root, kernel_path="/k").start()
    assert Sandbox.list(run_root) == []


async def test_duplicate_id_refused(run_root: str) -> None:
    async with Sandbox("dup", "mock", run_root=run_root, **MOCK_CFG):
        with pytest.raises(StateError, match="sandbox dup already exists"):
            await Sandbox("dup", "mock", run_root=run_root, **MOCK_CFG).start()
        assert [i.id for i in Sandbox.list(run_root)] == ["dup"]


async def test_mock_runs_commands_with_a_stand_in_agent(run_root: str) -> None:
    """The mock boots nothing (placeholder guest assets) and a fake agent answers its exec
    and file requests, while the process that started it holds it."""
    async with Sandbox("agent1", "mock", run_root=run_root) as sb:
        assert sb.config.kernel_path == MOCK_GUEST["kernel_path"]
        res = await sb.exec(["echo", "hi"])
        assert (res.exit_code, res.stdout) == (0, b"hi\n")
        assert (await sb.exec(["exit", "3"])).exit_code == 3
        await sb.write_file("/tmp/f", b"data")
        assert await sb.read_file("/tmp/f") == b"data"
        other = await Sandbox.attach("agent1", run_root=run_root)
        with pytest.raises(
            UnsupportedError, match=r"mock does not support guest agent .* detached"
        ):
            await other.exec(["true"])
        await other.detach()
    assert Sandbox.list(run_root) == []
    assert os.listdir(os.path.join(run_root, "vm")) == []  # the agent's socket went with it


async def test_disks_persist_across_attach(run_root: str, tmp_path: object) -> None:
    async with Sandbox("disks", "mock", run_root=run_root, **MOCK_CFG) as sb:
        drive = await sb.add_disk("/tmp/data.img", "data")
        assert drive.id == "data"
        other = await Sandbox.attach("disks", run_root=run_root)
        assert list(other.disks) == ["data"]
        with pytest.raises(ConfigError, match="no hot-added disk 'nope'"):
            await other.remove_disk("nope")
        await other.remove_disk("data")
        assert other.disks == {}


async def test_pause_state_crosses_processes_without_rewriting_the_document(
    run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtcontainers import persist

    async with Sandbox("mock3", "mock", run_root=run_root, **MOCK_CFG) as sb:
        other = await Sandbox.attach("mock3", run_root=run_root)
        doc_path = persist.StateStore(run_root).path("mock3")
        inode = os.stat(doc_path).st_ino
        await other.pause()
        assert os.stat(doc_path).st_ino == inode  # only the one-byte run state changed
        with pytest.raises(StateError, match="paused"):
            await sb.pause()  # sb sees the other manager's pause
        assert (await Sandbox.attach("mock3", run_root=run_root)).state is VMState.PAUSED
        await sb.resume()
        assert other.state is VMState.PAUSED  # stale until its next operation
        await other.detach()
        assert Sandbox.list(run_root)[0].state == "running"

        def full(id: str, state: str) -> None:
            raise StateError(f"cannot write runstate of {id}: No space left on device")

        monkeypatch.setattr(sb._store, "set_runstate", full)
        with pytest.raises(StateError, match="No space left"):
            await sb.pause()
        assert sb.state is VMState.RUNNING  # the pause was undone
        assert Sandbox.list(run_root)[0].state == "running"
