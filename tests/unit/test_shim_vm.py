"""`SandboxVM` over stand-in containers: what its Start waits for in the guest, and what waits
for the container's first process to be known running instead. (The real guest:
tests/integration/test_shim_vm.py and the containerd tests.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from virtcontainers.shim.vm import ProcessSpec, SandboxVM


class FakeContainer:
    """Records the guest requests a container would make, in order; its pid file appears
    when `written` is set."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.written = asyncio.Event()

    async def start(self, **_: Any) -> str:
        self.calls.append("start")
        return "process"

    async def until_running(self) -> None:
        self.calls.append("look for the pid")
        await self.written.wait()
        self.calls.append("pid seen")

    async def kill(self, sig: int) -> None:
        self.calls.append(f"kill {sig}")

    async def pids(self) -> list[int]:
        self.calls.append("pids")
        return [1]

    async def start_exec(self, argv: list[str], **_: Any) -> str:
        self.calls.append(f"exec {argv[0]}")
        return "exec"

    async def pid(self) -> int:
        self.calls.append("read the pid")
        return 7


def vm_with(tmp_path: Path, run_root: str, **containers: FakeContainer) -> SandboxVM:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    vm = SandboxVM("sb", str(tmp_path), run_root=run_root)
    vm.containers.update(containers)  # type: ignore[arg-type]
    vm.first = next(iter(containers))
    return vm


async def test_first_containers_start_does_not_wait_for_its_pid(
    tmp_path: Path, run_root: str
) -> None:
    """The VM's first container's task pid is the VMM's: its Start answers once the agent has
    started it, with no guest request looking for its pid file beside the container's own
    start (one vCPU under TCG); a kill, exec or ps waits until the pid is written."""
    calls: list[str] = []
    c = FakeContainer(calls)
    vm = vm_with(tmp_path, run_root, c=c)
    start = vm.start_process("c", "", ProcessSpec(["true"], []), 24, 80)
    assert await asyncio.wait_for(start, 5) == "process"
    await asyncio.sleep(0.05)
    assert calls == ["start"]
    assert vm.task_pid("c") == vm.pid
    kill = asyncio.ensure_future(vm.kill("c", 15))
    ps = asyncio.ensure_future(vm.pids("c"))
    await asyncio.sleep(0.05)
    assert calls == ["start", "look for the pid"]  # one look, however many wait
    c.written.set()
    await asyncio.gather(kill, ps)
    assert calls[:3] == ["start", "look for the pid", "pid seen"]
    assert sorted(calls[3:]) == ["kill 15", "pids"]
    await vm.start_process("c", "e1", ProcessSpec(["echo"], []), 24, 80)
    assert calls[-1] == "exec echo"  # the pid was seen: no second look


async def test_later_containers_start_waits_for_its_guest_pid(
    tmp_path: Path, run_root: str
) -> None:
    """A pod's later container is known by its guest pid: its Start still waits for it."""
    calls: list[str] = []
    first, second = FakeContainer([]), FakeContainer(calls)
    vm = vm_with(tmp_path, run_root, c=first, d=second)
    start = asyncio.ensure_future(vm.start_process("d", "", ProcessSpec(["true"], []), 24, 80))
    await asyncio.sleep(0.05)
    assert not start.done()
    second.written.set()
    await start
    assert calls == ["start", "look for the pid", "pid seen", "read the pid"]
    assert vm.task_pid("d") == 7


def test_the_first_container_uses_the_guests_network_namespace(
    tmp_path: Path, run_root: str
) -> None:
    """A bundle asking for a new network namespace (ctr run without a network) gets the
    guest's, as a pod's containers do: the VM is the pod, and has only its loopback then."""
    spec = {
        "process": {"args": ["true"]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
    }
    (tmp_path / "config.json").write_text(json.dumps(spec))
    vm = SandboxVM("sb", str(tmp_path), run_root=run_root)
    assert vm.bundle == str(tmp_path)
    guest = json.loads(Path(str(vm.sandbox.bundle), "config.json").read_text())
    assert [ns["type"] for ns in guest["linux"]["namespaces"]] == ["pid", "mount"]
    assert guest["root"]["path"] == str(tmp_path / "rootfs")


def test_a_bundle_without_namespaces_keeps_the_defaults(tmp_path: Path, run_root: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    vm = SandboxVM("sb", str(tmp_path), run_root=run_root)
    guest = json.loads(Path(str(vm.sandbox.bundle), "config.json").read_text())
    assert "namespaces" not in guest["linux"]
