"""A fake hypervisor for the factory's unit tests, and tests that it behaves.

`FakeHV` is the mock driver plus what the factory needs from a real one: an agent (the
in-process `FakeAgent`) listening on the VM's own agent socket while it runs, `to_grpc` /
`from_grpc`, failure injection, and a registry of running VMs to detect leaks.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from virtcontainers import hypervisor, persist
from virtcontainers.agent import ExecResult
from virtcontainers.agent.fake import ExecRequest, FakeAgent, builtin_exec
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.errors import LaunchError, StateError
from virtcontainers.hypervisor import Hypervisor, VMState
from virtcontainers.types import Capabilities, HypervisorType, Socket, VSock

ALL_CAPS = (
    Capabilities.PAUSE
    | Capabilities.TEMPLATE
    | Capabilities.CPU_HOTPLUG
    | Capabilities.MEMORY_HOTPLUG
    | Capabilities.NET_DEVICE_HOTPLUG
    | Capabilities.BLOCK_DEVICE_HOTPLUG
)


class FakeHV(MockHypervisor):
    """Mock VM with a live fake agent on its own socket while it runs."""

    hypervisor_type = HypervisorType.MOCK
    caps: ClassVar[Capabilities] = ALL_CAPS
    guest_lags: ClassVar[bool] = False
    """The fake guest never sees hot-added vCPUs."""
    fail_start: ClassVar[int] = 0
    """Number of upcoming starts that fail with LaunchError."""
    started: ClassVar[int] = 0
    running: ClassVar[dict[str, FakeHV]] = {}
    agents: ClassVar[dict[str, FakeAgent]] = {}

    def __init__(self, run_root: str | None = None) -> None:
        super().__init__(run_root)
        self.agent_path = ""

    @classmethod
    def reset(cls) -> None:
        cls.caps = ALL_CAPS
        cls.guest_lags = False
        cls.fail_start = 0
        cls.started = 0
        cls.running = {}
        cls.agents = {}

    def generate_socket(self, id: str, use_vsock: bool) -> Socket | VSock:
        sock = Hypervisor.generate_socket(self, id, use_vsock)
        assert isinstance(sock, Socket)
        self.agent_path = sock.host_path
        return sock

    def capabilities(self) -> Capabilities:
        return type(self).caps

    async def start_sandbox(self, timeout: float) -> None:
        if type(self).fail_start > 0:
            type(self).fail_start -= 1
            self.state = VMState.STOPPED
            raise LaunchError(f"fake VM {self.id} failed to launch")
        await super().start_sandbox(timeout)
        persist.ensure_dir(os.path.dirname(self.agent_path))
        agent = FakeAgent(self.agent_path, exec_handler=functools.partial(_guest_exec, self.id))
        type(self).agents[self.id] = await agent.start()
        type(self).running[self.id] = self
        type(self).started += 1

    async def stop_sandbox(self) -> None:
        agent = type(self).agents.pop(self.id, None)
        if agent is not None:
            await agent.stop()
        type(self).running.pop(self.id, None)
        if self.id:
            shutil.rmtree(persist.vm_dir(self.id, self.run_root), ignore_errors=True)
        await super().stop_sandbox()

    async def to_grpc(self) -> bytes:
        return json.dumps(
            {"id": self.id, "state": self.state.value, "agent": self.agent_path}
        ).encode()

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise StateError(f"fake VM state unreadable: {exc}") from exc
        if doc["id"] not in type(self).running:
            raise StateError(f"fake VM {doc['id']} is gone")
        self.id = doc["id"]
        self.agent_path = doc["agent"]
        self._config = config
        self.vcpus, self.memory_mb = config.num_vcpus, config.memory_size
        self.state = VMState(doc["state"])
        type(self).running[self.id] = self


async def _guest_exec(vm_id: str, req: ExecRequest) -> ExecResult:
    """The fake guest: answers the factory's CPU/memory query from the VM's current size."""
    if req.argv[:2] == ["/bin/sh", "-c"] and "cpuinfo" in req.argv[2]:
        hv = FakeHV.running[vm_id]
        cpus = min(hv.vcpus, hv.hypervisor_config().num_vcpus) if FakeHV.guest_lags else hv.vcpus
        out = f"{cpus}\nMemTotal:  {hv.memory_mb * 1024 - 30000} kB\n"
        return ExecResult(0, out.encode(), b"")
    return await builtin_exec(req)


def fake_config(**overrides: Any) -> HypervisorConfig:
    kw: dict[str, Any] = {
        "kernel_path": "/fake/vmlinuz",
        "initrd_path": "/fake/initrd.img",
        "num_vcpus": 1,
        "memory_size": 256,
    }
    kw.update(overrides)
    return HypervisorConfig(**kw)


@pytest.fixture
def fake_hv(monkeypatch: pytest.MonkeyPatch, run_root: str) -> Iterator[type[FakeHV]]:
    """`new_hypervisor("mock")` builds a `FakeHV`; checks no fake VM is left running after."""
    FakeHV.reset()
    monkeypatch.setitem(hypervisor._REGISTRY, HypervisorType.MOCK, FakeHV)
    yield FakeHV
    left = sorted(FakeHV.running)
    FakeHV.reset()
    assert not left, f"fake VMs left running: {left}"


# -- the fake itself --------------------------------------------------------------------------
async def test_fake_vm_serves_its_agent_on_its_own_socket(fake_hv: type[FakeHV]) -> None:
    from virtcontainers.factory import VMConfig, boot_vm

    vm = await boot_vm(VMConfig.of(fake_config(), "mock"), id="a1")
    try:
        assert vm.agent_endpoint.path.endswith("/vm/a1/kata.sock")
        assert os.path.exists(vm.agent_endpoint.path)
        res = await (await vm.agent()).exec(["echo", "hi"])
        assert res.stdout == b"hi\n"
    finally:
        await vm.stop()
    assert not os.path.exists(vm.agent_endpoint.path)
    assert fake_hv.running == {}


async def test_fake_launch_failure_leaves_nothing(fake_hv: type[FakeHV], run_root: str) -> None:
    from virtcontainers.factory import VMConfig, boot_vm

    fake_hv.fail_start = 1
    with pytest.raises(LaunchError, match="failed to launch"):
        await boot_vm(VMConfig.of(fake_config(), "mock"), id="a2")
    assert fake_hv.running == {}
    assert not os.path.exists(persist.vm_dir("a2", run_root))


async def test_a_booted_vm_keeps_its_first_agent_connection(
    fake_hv: type[FakeHV], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM the factory just booted (a pool's refill) has had no other agent client, so its
    first connection is kept (`booting`), as `Sandbox.start` does; a VM handed out again
    (its agent talked to before) may reconnect."""
    from virtcontainers.agent import client as client_mod
    from virtcontainers.factory import VMConfig, boot_vm

    seen: list[bool] = []
    real = client_mod.AgentClient.connect.__func__  # type: ignore[attr-defined]

    async def spy(cls: Any, target: Any, timeout: float = 30.0, **kw: Any) -> Any:
        seen.append(kw.get("booting", False))
        return await real(cls, target, timeout, **kw)

    monkeypatch.setattr(client_mod.AgentClient, "connect", classmethod(spy))
    vm = await boot_vm(VMConfig.of(fake_config(), "mock"), id="a3")
    try:
        await vm.close_agent()
        await vm.wait_agent(5)
    finally:
        await vm.stop()
    assert seen == [True, False]
