"""The one agent endpoint type and the one way the agent channel is plugged."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from virtcontainers.agent import AGENT_PORT, AgentEndpoint, HybridVsock, plug_agent_channel
from virtcontainers.agent.client import VsockAddress
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import SerialPort
from virtcontainers.drivers.firecracker.state import FirecrackerState
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.errors import StateError
from virtcontainers.hypervisor import new_hypervisor
from virtcontainers.types import AGENT_VSOCK_PORT


def test_targets_and_persisted_forms() -> None:
    unix = AgentEndpoint.unix("/r/vm/a/kata.sock")
    hybrid = AgentEndpoint.hybrid("/r/vm/a/agent-vsock.sock")
    vsock = AgentEndpoint.vsock(7, 2000)
    assert AGENT_PORT == AGENT_VSOCK_PORT == 1024 and hybrid.port == 1024
    assert unix.target() == "/r/vm/a/kata.sock"
    assert hybrid.target() == HybridVsock("/r/vm/a/agent-vsock.sock", 1024)
    assert vsock.target() == VsockAddress(7, 2000)
    # The persisted form is the one sandbox documents always had: old files still read.
    assert unix.to_doc() == ["unix", "/r/vm/a/kata.sock", 0]
    assert hybrid.to_doc() == ["hybrid", "/r/vm/a/agent-vsock.sock", 1024]
    assert vsock.to_doc() == ["vsock", 7, 2000]
    for ep in (unix, hybrid, vsock):
        assert AgentEndpoint.from_doc(ep.to_doc()) == ep


@pytest.mark.parametrize(
    "doc", [None, [], ["serial", "/x", 0], ["unix", 5, 0], ["vsock", "x", 1], "unix:/x"]
)
def test_unreadable_persisted_endpoint_is_named(doc: object) -> None:
    with pytest.raises(StateError, match="unreadable agent endpoint"):
        AgentEndpoint.from_doc(doc)


async def test_plug_serial_port_channel() -> None:
    hv = MockHypervisor()
    await hv.create_sandbox("a", None, HypervisorConfig(kernel_path="/k", initrd_path="/i"))
    ep = await plug_agent_channel(hv, "a")
    assert ep == AgentEndpoint.unix("/tmp/socket")
    [dev] = hv.cold_devices
    assert isinstance(dev, SerialPort) and dev.socket.host_path == ep.path


async def test_plug_hybrid_vsock_channel() -> None:
    tmp = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    try:
        fc = new_hypervisor("firecracker", run_root=tmp)
        binary = os.path.join(tmp, "firecracker")
        with open(binary, "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        os.chmod(binary, 0o755)
        cfg = HypervisorConfig(kernel_path="/k", initrd_path="/i", hypervisor_path=binary)
        await fc.create_sandbox("a", None, cfg)
        ep = await plug_agent_channel(fc, "a")
        assert ep == AgentEndpoint.hybrid(os.path.join(tmp, "vm", "a", "agent-vsock.sock"))
        own = fc.save().driver_state(FirecrackerState)
        assert own.agent_port == AGENT_PORT and fc.save().agent_socket == ep.path
        await fc.cleanup()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
